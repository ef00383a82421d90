//! Soak: the in-process proxy with the built-in local policy (streams
//! enforced) and an audit file, under a bounded mix of allowed, redacted,
//! blocked, streamed, passthrough and failing requests from several
//! concurrent clients that keep opening new connections. Afterwards memory
//! and open file descriptors are back to where they were after a warm-up,
//! and the audit file holds exactly the events each request calls for:
//!
//! | kind | audit events (request id) |
//! |---|---|
//! | allowed | request `allow`, response `allow` |
//! | redacted | request `modify`, response `allow` |
//! | blocked | request `block` (the provider is never called) |
//! | streamed | request `allow`, response `allow` (when the stream ends) |
//! | passthrough | none: a non-AI server name is relayed byte for byte, never decrypted |
//! | failing (provider down, 502) | request `allow`: the request is checked before the upstream is reached; no response event |

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use interceptor::{
    config::{GuardrailsConfig, StreamMode},
    policy::DomainsConfig,
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::inprocess::{InProcessProxy, client_for, local_pipeline};
use serde_json::{Value, json};

/// Concurrent clients.
const WORKERS: usize = 6;
/// Each client opens new connections after this many rounds.
const ROUNDS_PER_CONNECTION: usize = 5;
/// Warm-up rounds per client before the baseline is taken.
const WARMUP_ROUNDS: usize = 5;
/// The soak stops at whichever bound comes first...
const SOAK_TIME: Duration = Duration::from_secs(60);
const MAX_ROUNDS: usize = 1000;
/// ...and must have done at least this many rounds per client.
const MIN_ROUNDS: usize = 20;
/// How much resident memory may grow from the warm-up baseline.
const RSS_TOLERANCE_KIB: u64 = 24 * 1024;
/// How long connections get to close once clients are gone.
const SETTLE_TIME: Duration = Duration::from_secs(15);

const OPENAI: &str = "api.openai.com";
const PASSTHROUGH: &str = "passthrough.example";
/// A Luhn-valid test card number (redacted by the built-in policy).
const CARD: &str = "4111 1111 1111 1111";
const STREAM_REPLY: &str = "The capital of France is Paris, on the Seine.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Allowed,
    Redacted,
    Blocked,
    Streamed,
    Passthrough,
    Failing,
}

const KINDS: [Kind; 6] =
    [Kind::Allowed, Kind::Redacted, Kind::Blocked, Kind::Streamed, Kind::Passthrough, Kind::Failing];

impl Kind {
    /// The audit events of one request of this kind: (direction, decision).
    fn expected_audit(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Kind::Allowed | Kind::Streamed => &[("request", "allow"), ("response", "allow")],
            Kind::Redacted => &[("request", "modify"), ("response", "allow")],
            Kind::Blocked => &[("request", "block")],
            Kind::Passthrough => &[],
            Kind::Failing => &[("request", "allow")],
        }
    }
}

/// An RSA private key block (not a real key), built at run time.
fn private_key() -> String {
    let label = ["RSA", "PRIVATE", "KEY"].join(" ");
    format!("-----BEGIN {label}-----\nMIIB{}\n-----END {label}-----", "Zm9vYmFy".repeat(8))
}

struct Soak {
    provider: FakeProvider,
    proxy: InProcessProxy,
    /// A second proxy whose provider is down: every request gets a 502.
    failing: InProcessProxy,
    pki: TestPki,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// One client's connections: a new set every [`ROUNDS_PER_CONNECTION`] rounds.
struct Clients {
    ai: reqwest::Client,
    passthrough: reqwest::Client,
    failing: reqwest::Client,
}

impl Soak {
    fn clients(&self) -> Result<Clients> {
        let provider_ca = self.pki.ca_pem();
        Ok(Clients {
            ai: client_for(OPENAI, self.proxy.addr, &[&self.proxy.ca_pem], false)?,
            passthrough: client_for(PASSTHROUGH, self.proxy.addr, &[&provider_ca], false)?,
            failing: client_for(OPENAI, self.failing.addr, &[&self.failing.ca_pem], false)?,
        })
    }
}

/// Sends one request of `kind` and checks its answer.
async fn request(clients: &Clients, kind: Kind, id: &str) -> Result<()> {
    let chat = |content: &str, stream: bool| {
        json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": content}]}).to_string()
    };
    let post = |client: &reqwest::Client, url: &str, body: String| {
        client.post(url).header("x-request-id", id).header("content-type", "application/json").body(body)
    };
    let url = "https://api.openai.com/v1/chat/completions";
    match kind {
        Kind::Allowed => {
            let resp = post(&clients.ai, url, chat("What is the capital of France?", false)).send().await?;
            ensure!(resp.status() == 200, "{id}: {}", resp.status());
            let body: Value = resp.json().await?;
            ensure!(body["object"] == "chat.completion", "{id}: {body}");
        }
        Kind::Redacted => {
            let resp = post(&clients.ai, url, chat(&format!("My card is {CARD}."), false)).send().await?;
            ensure!(resp.status() == 200, "{id}: {}", resp.status());
            resp.bytes().await?;
        }
        Kind::Blocked => {
            let resp = post(&clients.ai, url, chat(&private_key(), false)).send().await?;
            ensure!(resp.status() == 403, "{id}: {}", resp.status());
            resp.bytes().await?;
        }
        Kind::Streamed => {
            let resp = post(&clients.ai, &format!("{url}?interval_ms=1"), chat("Name a capital.", true))
                .header("x-fake-reply", STREAM_REPLY)
                .send()
                .await?;
            ensure!(resp.status() == 200, "{id}: {}", resp.status());
            let text = resp.text().await?;
            ensure!(text.trim_end().ends_with("data: [DONE]"), "{id}: stream not complete: {text}");
            ensure!(text.contains("Seine"), "{id}: {text}");
        }
        Kind::Passthrough => {
            let resp = clients
                .passthrough
                .get(format!("https://{PASSTHROUGH}/big?bytes=2048"))
                .header("x-request-id", id)
                .send()
                .await?;
            ensure!(resp.status() == 200, "{id}: {}", resp.status());
            ensure!(resp.bytes().await?.len() == 2048, "{id}: short body");
        }
        Kind::Failing => {
            let resp = post(&clients.failing, url, chat("Is anyone there?", false)).send().await?;
            ensure!(resp.status() == 502, "{id}: {}", resp.status());
            resp.bytes().await?;
        }
    }
    Ok(())
}

/// Runs rounds of every kind (in an order that differs per client and
/// round) until `rounds` are done or `stop` is set; returns the request ids
/// sent, by kind.
async fn worker(
    soak: Arc<Soak>,
    phase: &'static str,
    worker: usize,
    rounds: usize,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(String, Kind)>> {
    let mut sent = Vec::new();
    let mut clients = soak.clients()?;
    for round in 0..rounds {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if round > 0 && round % ROUNDS_PER_CONNECTION == 0 {
            clients = soak.clients()?;
        }
        for i in 0..KINDS.len() {
            let kind = KINDS[(i + worker + round) % KINDS.len()];
            let id = format!("{phase}-{worker}-{round}-{kind:?}");
            request(&clients, kind, &id).await.with_context(|| format!("request {id}"))?;
            sent.push((id, kind));
        }
    }
    Ok(sent)
}

/// Runs `WORKERS` clients concurrently; stops all on the first failure.
async fn run_phase(
    soak: &Arc<Soak>,
    phase: &'static str,
    rounds: usize,
    time: Duration,
) -> Result<Vec<(String, Kind)>> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        tasks.spawn(worker(Arc::clone(soak), phase, w, rounds, Arc::clone(&stop)));
    }
    let timer = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut sent = Vec::new();
    let mut failure = None;
    while let Some(joined) = tasks.join_next().await {
        match joined? {
            Ok(ids) => sent.extend(ids),
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                failure.get_or_insert(e);
            }
        }
    }
    timer.abort();
    match failure {
        Some(e) => Err(e),
        None => Ok(sent),
    }
}

fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

fn open_fds() -> Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count())
}

/// Upstream connections the proxy keeps in its pool when idle: the fake
/// provider speaks HTTP/2, so one per (destination, server name).
const POOLED_UPSTREAM: usize = 1;

/// Waits until connections have closed: the fake provider has no more open
/// than the proxy's idle pool holds, and the fd count has not changed for a
/// second (at most `SETTLE_TIME`). Returns the fd count.
async fn settle(provider: &FakeProvider) -> Result<usize> {
    let deadline = Instant::now() + SETTLE_TIME;
    let (mut last, mut stable) = (usize::MAX, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let fds = open_fds()?;
        stable = if fds == last { stable + 1 } else { 0 };
        if provider.open_connections() <= POOLED_UPSTREAM && stable >= 4 {
            return Ok(fds);
        }
        if Instant::now() >= deadline {
            bail!("connections did not close: {} open at the provider, {fds} fds", provider.open_connections());
        }
        last = fds;
    }
}

/// Reads the audit file until it holds `total` events (or a deadline), then
/// groups them by request id as (direction, decision).
async fn audit_events(path: &std::path::Path, total: usize) -> Result<HashMap<String, Vec<(String, String)>>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let n = text.lines().count();
        if n >= total || Instant::now() >= deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut by_id: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for line in text.lines() {
        let event: Value = serde_json::from_str(line).with_context(|| format!("audit line {line}"))?;
        let field = |k: &str| event[k].as_str().unwrap_or_default().to_string();
        by_id.entry(field("request_id")).or_default().push((field("direction"), field("decision")));
    }
    Ok(by_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_load_leaks_no_memory_no_fds_and_loses_no_audit_event() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let audit = dir.path().join("audit.jsonl");
    let cfg = GuardrailsConfig { stream_mode: StreamMode::Enforce, ..GuardrailsConfig::default() };
    // One pipeline (one audit writer) behind both proxies.
    let hook = local_pipeline(cfg, Some(audit.clone()))?;
    let proxy =
        InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), Some(Arc::clone(&hook)))
            .await?;
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?
    };
    let failing = InProcessProxy::start(dead, &upstream_ca, DomainsConfig::default(), Some(hook)).await?;
    let soak = Arc::new(Soak { provider, proxy, failing, pki, audit, _dir: dir });

    // Forwarded requests are drained as they come, so the fake provider's
    // record does not grow; none may carry the card or the key.
    let forwarded = Arc::new(AtomicUsize::new(0));
    let stop_drain = Arc::new(AtomicBool::new(false));
    let drain = {
        let (soak, forwarded, stop) = (Arc::clone(&soak), Arc::clone(&forwarded), Arc::clone(&stop_drain));
        tokio::spawn(async move {
            loop {
                let done = stop.load(Ordering::Relaxed);
                for r in soak.provider.take_requests() {
                    let body = String::from_utf8_lossy(&r.body);
                    ensure!(!body.contains(CARD), "a card number reached the provider: {body}");
                    ensure!(!body.contains("PRIVATE KEY"), "a blocked request reached the provider: {body}");
                    forwarded.fetch_add(1, Ordering::Relaxed);
                }
                if done {
                    return Ok::<(), anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let started = Instant::now();
    let mut sent = run_phase(&soak, "warmup", WARMUP_ROUNDS, SOAK_TIME).await?;
    let fds_before = settle(&soak.provider).await?;
    let rss_before = rss_kib()?;

    let soaked = run_phase(&soak, "soak", MAX_ROUNDS, SOAK_TIME).await?;
    let rounds = soaked.len() / KINDS.len();
    ensure!(rounds >= WORKERS * MIN_ROUNDS, "only {rounds} rounds in {SOAK_TIME:?}");
    sent.extend(soaked);
    let fds_after = settle(&soak.provider).await?;
    let rss_after = rss_kib()?;
    stop_drain.store(true, Ordering::Relaxed);
    drain.await??;

    let mut per_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for (_, kind) in &sent {
        *per_kind.entry(*kind).or_default() += 1;
    }
    println!(
        "soak: {} requests in {:.1}s {per_kind:?}; {} reached the provider; rss {rss_before} -> {rss_after} KiB; \
         fds {fds_before} -> {fds_after}",
        sent.len(),
        started.elapsed().as_secs_f64(),
        forwarded.load(Ordering::Relaxed),
    );

    ensure!(fds_after <= fds_before, "file descriptors leaked: {fds_before} -> {fds_after}");
    ensure!(
        rss_after <= rss_before + RSS_TOLERANCE_KIB,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );

    // Exactly the expected audit events, per request.
    let total: usize = sent.iter().map(|(_, k)| k.expected_audit().len()).sum();
    let mut events = audit_events(&soak.audit, total).await?;
    let mut wrong = Vec::new();
    for (id, kind) in &sent {
        let mut got = events.remove(id).unwrap_or_default();
        got.sort();
        let mut want: Vec<(String, String)> =
            kind.expected_audit().iter().map(|(d, v)| (d.to_string(), v.to_string())).collect();
        want.sort();
        if got != want {
            wrong.push(format!("{id}: {got:?}, want {want:?}"));
        }
    }
    ensure!(wrong.is_empty(), "{} requests with wrong audit events:\n{}", wrong.len(), wrong.join("\n"));
    ensure!(events.is_empty(), "audit events of no request sent: {events:?}");
    Ok(())
}
