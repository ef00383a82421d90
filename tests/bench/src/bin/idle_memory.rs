//! `idle_memory [--connections N]`: the interceptor's memory per idle
//! kept-alive TLS connection, without privileges.
//!
//! This process runs the data plane `app` runs for the default configuration
//! (default local guardrails) on loopback and nothing else; a child copy of
//! this binary (`idle_memory client`) runs the fake provider and the clients,
//! so neither counts in the figures. The child opens N TLS connections
//! through the proxy (HTTP/1.1, 64 at a time), makes one ~2 KB chat request
//! on each, and holds them all open. Printed: the proxy's VmRSS and its live
//! heap (counted by this binary's allocator) before and after, per
//! connection, the live allocations per connection by size, and the RSS
//! 10,000 such connections would take, against the < 200 MB target.
//!
//! ```text
//! cargo run --release -p interceptor-bench --bin idle_memory -- --connections 2000
//! ```

use std::{
    alloc::{GlobalAlloc, Layout, System},
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use interceptor::{
    config::Config,
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::inprocess::InProcessProxy;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde::{Deserialize, Serialize};

/// Live heap bytes and allocations, in all and by size class (powers of two).
struct Counting;

const CLASSES: usize = 32;
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BY_CLASS: [AtomicI64; CLASSES] = [const { AtomicI64::new(0) }; CLASSES];

fn class(size: usize) -> usize {
    (usize::BITS - size.max(1).saturating_sub(1).leading_zeros()).min(CLASSES as u32 - 1) as usize
}

/// Live allocations of 1 KiB and more by exact size (to 64 KiB), the
/// buffers worth naming.
const EXACT_FROM: usize = 1024;
const EXACT_TO: usize = 64 * 1024;
static LIVE_BY_SIZE: [AtomicI64; EXACT_TO - EXACT_FROM + 1] = [const { AtomicI64::new(0) }; EXACT_TO - EXACT_FROM + 1];

fn counted(size: usize, sign: i64) {
    LIVE_BYTES.fetch_add(sign * size as i64, Ordering::Relaxed);
    LIVE_BY_CLASS[class(size)].fetch_add(sign, Ordering::Relaxed);
    if (EXACT_FROM..=EXACT_TO).contains(&size) {
        LIVE_BY_SIZE[size - EXACT_FROM].fetch_add(sign, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters are only observed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        counted(layout.size(), 1);
        // SAFETY: the caller's contract is passed on as is.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        counted(layout.size(), 1);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        counted(layout.size(), -1);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        counted(layout.size(), -1);
        counted(new_size, 1);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// What the child tells the parent first.
#[derive(Serialize, Deserialize)]
struct ProviderInfo {
    addr: SocketAddr,
    ca: PathBuf,
}

/// What the parent tells the child.
#[derive(Serialize, Deserialize)]
struct ProxyInfo {
    addr: SocketAddr,
    ca: PathBuf,
}

const SNI: &str = "api.openai.com";
const CONCURRENCY: usize = 64;
/// Connections opened (and closed) before the baseline, so that caches,
/// pools and the allocator's arenas are warm.
const WARMUP: usize = 256;
const TARGET_MB: f64 = 200.0;
const TARGET_CONNECTIONS: f64 = 10_000.0;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [client, n] if client == "client" => {
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(child(n.parse()?))
        }
        [] => parent(2000),
        [flag, n] if flag == "--connections" => parent(n.parse()?),
        _ => bail!("usage: idle_memory [--connections N]"),
    }
}

struct Snapshot {
    rss: u64,
    heap: i64,
    classes: [i64; CLASSES],
    sizes: Vec<i64>,
}

fn snapshot() -> Result<Snapshot> {
    Ok(Snapshot {
        rss: interceptor_bench::procstat::rss_bytes(std::process::id())?,
        heap: LIVE_BYTES.load(Ordering::Relaxed),
        classes: std::array::from_fn(|i| LIVE_BY_CLASS[i].load(Ordering::Relaxed)),
        sizes: LIVE_BY_SIZE.iter().map(|n| n.load(Ordering::Relaxed)).collect(),
    })
}

fn parent(connections: usize) -> Result<()> {
    // The runtime `interceptor run` uses: one worker per core.
    let runtime = tokio::runtime::Runtime::new()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["client", &connections.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut to_child = child.stdin.take().context("child stdin")?;
    let mut from_child = BufReader::new(child.stdout.take().context("child stdout")?);
    let mut line = String::new();
    let mut read_line = |line: &mut String| -> Result<()> {
        line.clear();
        if from_child.read_line(line)? == 0 {
            bail!("the client process ended early");
        }
        Ok(())
    };
    read_line(&mut line)?;
    let provider: ProviderInfo = serde_json::from_str(line.trim())?;
    let mut config = Config::default();
    config.proxy.max_connections = connections + 1024;
    config.proxy.max_connections_per_workload = connections + 1024;
    let proxy = runtime.block_on(InProcessProxy::from_config(provider.addr, &provider.ca, config))?;
    writeln!(to_child, "{}", serde_json::to_string(&ProxyInfo { addr: proxy.addr, ca: proxy.ca_path.clone() })?)?;
    read_line(&mut line)?; // warm-up done
    std::thread::sleep(Duration::from_millis(500));
    let before = snapshot()?;
    writeln!(to_child, "go")?;
    read_line(&mut line)?;
    let opened: usize = line.trim().parse().with_context(|| format!("child said {line:?}"))?;
    // Let the last responses' buffers go.
    std::thread::sleep(Duration::from_millis(500));
    let after = snapshot()?;
    drop(to_child);
    let _ = child.wait();
    if opened == 0 {
        bail!("no connection opened");
    }

    let n = opened as f64;
    let rss_per = (after.rss as f64 - before.rss as f64) / n;
    let heap_per = (after.heap - before.heap) as f64 / n;
    let mb = |b: f64| b / (1024.0 * 1024.0);
    println!("idle keep-alive TLS connections held: {opened} of {connections}");
    println!("proxy VmRSS: {:.1} MB before, {:.1} MB after", mb(before.rss as f64), mb(after.rss as f64));
    println!("per idle connection: {rss_per:.0} bytes of RSS, {heap_per:.0} bytes of live heap");
    println!("live allocations per connection, by size:");
    for (i, (b, a)) in before.classes.iter().zip(after.classes).enumerate() {
        let per = (a - b) as f64 / n;
        if per.abs() >= 0.05 {
            let low = if i == 0 { 0 } else { (1usize << (i - 1)) + 1 };
            println!("  {low:>7}..={:<7} {per:>6.2}", 1usize << i);
        }
    }
    println!("live allocations of {EXACT_FROM} bytes or more per connection, by exact size:");
    for (i, (b, a)) in before.sizes.iter().zip(&after.sizes).enumerate() {
        let per = (a - b) as f64 / n;
        if per.abs() >= 0.05 {
            println!("  {:>7} {per:>6.2}", i + EXACT_FROM);
        }
    }
    let projected = mb(before.rss as f64 + rss_per * TARGET_CONNECTIONS);
    let met = projected < TARGET_MB;
    println!(
        "RSS with {TARGET_CONNECTIONS} idle connections (projected): {projected:.1} MB, target < {TARGET_MB} MB: {}",
        if met { "met" } else { "missed" }
    );
    runtime.block_on(proxy.shutdown(Duration::from_secs(1)));
    Ok(())
}

async fn child(connections: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let info = ProviderInfo { addr: provider.local_addr(), ca: pki.write_ca(dir.path())? };
    println!("{}", serde_json::to_string(&info)?);
    let mut stdin = BufReader::new(std::io::stdin());
    let mut line = String::new();
    stdin.read_line(&mut line)?;
    let proxy: ProxyInfo = serde_json::from_str(line.trim())?;
    let tls = connector(&proxy.ca)?;
    let body = Bytes::from(interceptor_bench::chat_body(false));

    // The warm-up connections are closed, and seen closed, before the
    // baseline is taken.
    let warm = open_many(&tls, proxy.addr, &body, WARMUP).await?;
    let closing: Vec<_> = warm.into_iter().map(|(_, conn)| conn).collect();
    for conn in closing {
        let _ = conn.await;
    }
    println!("warm");
    // The parent's lines, read off the runtime so that the connections'
    // tasks keep running meanwhile; the channel closes with its stdin.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        while stdin.read_line(&mut line).is_ok_and(|n| n > 0) && tx.send(std::mem::take(&mut line)).is_ok() {}
    });
    lines.recv().await.context("the parent ended early")?;
    let held = open_many(&tls, proxy.addr, &body, connections).await?;
    println!("{}", held.len());
    // Hold them until the parent closes our stdin.
    while lines.recv().await.is_some() {}
    drop(held);
    drop(provider);
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type Held = (Sender, tokio::task::JoinHandle<hyper::Result<()>>);

async fn open_many(tls: &tokio_rustls::TlsConnector, addr: SocketAddr, body: &Bytes, n: usize) -> Result<Vec<Held>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (tls, sem, body) = (tls.clone(), Arc::clone(&sem), body.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let (mut s, conn) = tokio::time::timeout(Duration::from_secs(30), open(&tls, addr)).await??;
            let req = http::Request::post("/v1/chat/completions")
                .header("host", SNI)
                .header("content-type", "application/json")
                .body(Full::new(body))?;
            let resp = s.send_request(req).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if !status.is_success() {
                bail!("status {status}");
            }
            anyhow::Ok((s, conn))
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(s) => held.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("{} of {n} connections failed, first: {e:#}", n - held.len());
    }
    Ok(held)
}

async fn open(tls: &tokio_rustls::TlsConnector, addr: SocketAddr) -> Result<Held> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(ServerName::try_from(SNI)?, tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(conn)))
}

fn connector(ca: &PathBuf) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("read {}", ca.display()))? {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
