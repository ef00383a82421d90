//! Measurements made by a copy of the benchmark binary started inside the
//! client cgroup and namespace (cgroup membership is per process, and the
//! eBPF redirect applies to the client's cgroup): `bench probe <kind> <json>`
//! prints one JSON line of results.
//!
//! * `latency`: sequential requests, time to the first and the last body
//!   byte, on one kept-alive connection or a new TLS connection each time.
//! * `connect`: the cost of `connect()` to a listener on an address that is
//!   not a target, in a tight loop.
//! * `idle`: opens many TLS connections, makes one request on each, holds
//!   them open until its stdin closes.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyParams {
    pub addr: SocketAddr,
    pub sni: String,
    pub ca: PathBuf,
    /// Path and query of the POST.
    pub path: String,
    pub body: String,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    pub requests: usize,
    /// Requests made first and not counted (connection, leaf cache, pools).
    pub warmup: usize,
    pub new_connection: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyResult {
    pub first_p50_us: f64,
    pub first_p99_us: f64,
    pub last_p50_us: f64,
    pub last_p99_us: f64,
    pub bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectParams {
    /// A non-target address the probe listens on itself.
    pub addr: SocketAddr,
    pub iterations: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectResult {
    pub p50_ns: f64,
    pub p99_ns: f64,
    pub samples: Vec<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleParams {
    pub addr: SocketAddr,
    pub sni: String,
    pub ca: PathBuf,
    pub count: usize,
    pub concurrency: usize,
    pub body: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleResult {
    pub open: usize,
    pub failed: usize,
    pub first_error: String,
}

/// Entry point of `bench probe <kind> <json>`.
pub fn main(kind: &str, params: &str) -> Result<()> {
    let out = match kind {
        "latency" => serde_json::to_string(&runtime()?.block_on(latency(serde_json::from_str(params)?))?)?,
        "connect" => serde_json::to_string(&connect(serde_json::from_str(params)?)?)?,
        "idle" => return runtime()?.block_on(idle(serde_json::from_str(params)?)),
        other => bail!("unknown probe {other}"),
    };
    println!("{out}");
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn connector(ca: &PathBuf) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).with_context(|| format!("read {}", ca.display()))? {
        roots.add(cert?)?;
    }
    // One key exchange group every server here supports (nginx's OpenSSL 3.0
    // has no ML-KEM: offering it first would cost direct connections a
    // HelloRetryRequest that proxied ones do not pay).
    let provider = rustls::crypto::CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every new connection is a full handshake.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn open(tls: &TlsConnector, addr: SocketAddr, sni: &str) -> Result<Sender> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(ServerName::try_from(sni.to_owned())?, tcp).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

fn request(sni: &str, path: &str, body: &str, headers: &[(String, String)]) -> Result<http::Request<Full<Bytes>>> {
    let mut req = http::Request::post(path).header("host", sni).header("content-type", "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    Ok(req.body(Full::new(Bytes::from(body.to_owned())))?)
}

/// (time to first body byte, time to last, bytes), from before the
/// connection (new connection) or before the request.
async fn one(
    tls: &TlsConnector,
    p: &LatencyParams,
    sender: &mut Option<Sender>,
) -> Result<(Duration, Duration, usize)> {
    let start = Instant::now();
    if sender.is_none() || p.new_connection {
        *sender = Some(open(tls, p.addr, &p.sni).await?);
    }
    let s = sender.as_mut().context("no connection")?;
    s.ready().await?;
    let resp = s.send_request(request(&p.sni, &p.path, &p.body, &p.headers)?).await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let mut body = resp.into_body();
    let (mut first, mut bytes) = (None, 0);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data()
            && !data.is_empty()
        {
            first.get_or_insert_with(|| start.elapsed());
            bytes += data.len();
        }
    }
    Ok((first.unwrap_or_default(), start.elapsed(), bytes))
}

async fn latency(p: LatencyParams) -> Result<LatencyResult> {
    let tls = connector(&p.ca)?;
    let mut sender = None;
    let (mut firsts, mut lasts, mut bytes) = (Vec::new(), Vec::new(), 0);
    for i in 0..p.warmup + p.requests {
        let (first, last, n) = one(&tls, &p, &mut sender).await.with_context(|| format!("request {i}"))?;
        if i >= p.warmup {
            firsts.push(first.as_secs_f64() * 1e6);
            lasts.push(last.as_secs_f64() * 1e6);
            bytes = n;
        }
    }
    Ok(LatencyResult {
        first_p50_us: percentile(&mut firsts, 0.50),
        first_p99_us: percentile(&mut firsts, 0.99),
        last_p50_us: percentile(&mut lasts, 0.50),
        last_p99_us: percentile(&mut lasts, 0.99),
        bytes,
    })
}

/// The `p` quantile (nearest rank) of `v`, 0 when empty.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn connect(p: ConnectParams) -> Result<ConnectResult> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, setsockopt, socket, sockopt};
    let listener = std::net::TcpListener::bind(p.addr).with_context(|| format!("listen on {}", p.addr))?;
    std::thread::spawn(move || {
        while let Ok((s, _)) = listener.accept() {
            drop(s);
        }
    });
    let SocketAddr::V4(v4) = p.addr else { bail!("IPv4 only") };
    let sa = SockaddrIn::from(v4);
    let mut samples = Vec::with_capacity(p.iterations);
    for _ in 0..p.iterations {
        let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
        let start = Instant::now();
        nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &sa)?;
        samples.push(start.elapsed().as_nanos() as f64);
        // Reset on close: no TIME_WAIT piles up over thousands of iterations.
        setsockopt(&fd, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 })?;
    }
    let mut sorted = samples.clone();
    Ok(ConnectResult { p50_ns: percentile(&mut sorted, 0.5), p99_ns: percentile(&mut sorted, 0.99), samples })
}

async fn idle(p: IdleParams) -> Result<()> {
    use tokio::io::AsyncReadExt;
    let tls = connector(&p.ca)?;
    let sem = Arc::new(tokio::sync::Semaphore::new(p.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..p.count {
        let (tls, sem, p) = (tls.clone(), Arc::clone(&sem), p.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await?;
            let mut s = tokio::time::timeout(Duration::from_secs(30), open(&tls, p.addr, &p.sni)).await??;
            let resp = s.send_request(request(&p.sni, "/v1/chat/completions", &p.body, &[])?).await?;
            let status = resp.status();
            resp.into_body().collect().await?;
            if !status.is_success() {
                bail!("status {status}");
            }
            anyhow::Ok(s)
        });
    }
    let (mut held, mut result) = (Vec::new(), IdleResult::default());
    while let Some(done) = tasks.join_next().await {
        match done? {
            Ok(s) => held.push(s),
            Err(e) => {
                if result.failed == 0 {
                    result.first_error = format!("{e:#}");
                }
                result.failed += 1;
            }
        }
    }
    result.open = held.len();
    println!("{}", serde_json::to_string(&result)?);
    // Hold every connection until the parent closes our stdin.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(held);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 50.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
        assert_eq!(percentile(&mut [7.0], 0.99), 7.0);
    }
}
