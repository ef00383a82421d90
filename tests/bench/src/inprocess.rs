//! The in-process loopback benchmark (`cargo xtask bench --inprocess`):
//! requests per second and latency of the intercepted path against a direct
//! connection, with the fake provider, the proxy and the load generator in
//! one process.
//!
//! They share this process and the machine's cores, so the ratios are what
//! count, not the absolute figures. Modes: direct, intercepted (TLS
//! terminated and relayed, no guardrails), and intercepted with the default
//! local guardrails. Each mode runs a fixed time with a fixed number of
//! keep-alive connections sending ~2 KB chat-completion requests.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use interceptor::{
    config::{Config, StreamMode},
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};

const CONNECTIONS: usize = 16;
const WARMUP: Duration = Duration::from_secs(1);
const MEASURE: Duration = Duration::from_secs(5);

struct Figures {
    requests: usize,
    errors: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
}

async fn load(addr: SocketAddr, trusted_pem: &str, body: Arc<String>) -> Result<Figures> {
    let client = client_for("api.openai.com", addr, &[trusted_pem], false)?;
    let run = |until: Instant| {
        let mut tasks = Vec::new();
        for _ in 0..CONNECTIONS {
            let (client, body) = (client.clone(), Arc::clone(&body));
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = 0;
                while Instant::now() < until {
                    let start = Instant::now();
                    let resp = client
                        .post("https://api.openai.com/v1/chat/completions")
                        .header("content-type", "application/json")
                        .body(body.as_str().to_owned())
                        .send()
                        .await;
                    match resp {
                        Ok(r) if r.status().is_success() => match r.bytes().await {
                            Ok(_) => latencies.push(start.elapsed()),
                            Err(_) => errors += 1,
                        },
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            }));
        }
        tasks
    };
    for task in run(Instant::now() + WARMUP) {
        task.await?;
    }
    let started = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for task in run(started + MEASURE) {
        let (lat, err) = task.await?;
        all.extend(lat);
        errors += err;
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied();
    Ok(Figures {
        requests: all.len(),
        errors,
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50).unwrap_or_default(),
        p99: pct(0.99).unwrap_or_default(),
    })
}

/// Median time to the first and to the last chunk of a streamed (SSE)
/// response, over sequential requests on one keep-alive connection.
async fn stream_timing(addr: SocketAddr, trusted_pem: &str) -> Result<(Duration, Duration)> {
    let client = client_for("api.openai.com", addr, &[trusted_pem], false)?;
    let (mut first, mut last) = (Vec::new(), Vec::new());
    for i in 0..STREAMS + 3 {
        let start = Instant::now();
        let mut resp = client.get("https://api.openai.com/sse?n=5&interval_ms=10").send().await?;
        let mut first_at = None;
        while let Some(_chunk) = resp.chunk().await? {
            first_at.get_or_insert_with(|| start.elapsed());
        }
        // The first requests warm the connection and the certificate cache.
        if i >= 3 {
            first.push(first_at.unwrap_or_default());
            last.push(start.elapsed());
        }
    }
    first.sort();
    last.sort();
    Ok((first[first.len() / 2], last[last.len() / 2]))
}

const STREAMS: usize = 40;

fn chat_body() -> String {
    super::chat_body(false)
}

pub async fn run() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    // Each mode's data plane is the one `interceptor run` builds for its
    // configuration (the default one, but for the guardrails).
    let mut relay_only = Config::default();
    relay_only.guardrails.enabled = false;
    let proxy = InProcessProxy::from_config(provider.local_addr(), &upstream_ca, relay_only).await?;
    let guarded = InProcessProxy::from_config(provider.local_addr(), &upstream_ca, Config::default()).await?;
    let body = Arc::new(chat_body());
    println!(
        "interceptor benchmark: loopback, one process, {CONNECTIONS} keep-alive connections, {} byte JSON POST, {}s per mode",
        body.len(),
        MEASURE.as_secs()
    );
    let direct = load(provider.local_addr(), &pki.ca_pem(), Arc::clone(&body)).await?;
    let intercepted = load(proxy.addr, &proxy.ca_pem, Arc::clone(&body)).await?;
    let guardrails = load(guarded.addr, &guarded.ca_pem, Arc::clone(&body)).await?;
    println!(
        "{:<14}{:>10}{:>8}{:>12}{:>10}{:>10}{:>12}",
        "mode", "requests", "errors", "req/s", "p50 ms", "p99 ms", "vs direct"
    );
    for (name, f) in [("direct", &direct), ("intercepted", &intercepted), ("+guardrails", &guardrails)] {
        println!(
            "{:<14}{:>10}{:>8}{:>12.0}{:>10.3}{:>10.3}{:>11.0}%",
            name,
            f.requests,
            f.errors,
            f.rps,
            f.p50.as_secs_f64() * 1e3,
            f.p99.as_secs_f64() * 1e3,
            100.0 * f.rps / direct.rps.max(1.0)
        );
    }
    for (name, f) in [("intercepted", &intercepted), ("+guardrails", &guardrails)] {
        println!("{name}: added p50 latency {:.3} ms", (f.p50.as_secs_f64() - direct.p50.as_secs_f64()) * 1e3);
    }

    let mut enforce = Config::default();
    enforce.guardrails.stream_mode = StreamMode::Enforce;
    let enforcing = InProcessProxy::from_config(provider.local_addr(), &upstream_ca, enforce).await?;
    println!("\nstreamed response (SSE, 5 events 10 ms apart), median of {STREAMS} on one keep-alive connection:");
    println!("{:<22}{:>15}{:>15}{:>22}", "mode", "first byte ms", "last byte ms", "added first / last");
    let (d_first, d_last) = stream_timing(provider.local_addr(), &pki.ca_pem()).await?;
    for (name, addr, pem) in [
        ("direct", provider.local_addr(), pki.ca_pem()),
        ("intercepted", proxy.addr, proxy.ca_pem.clone()),
        ("guardrails monitor", guarded.addr, guarded.ca_pem.clone()),
        ("guardrails enforce", enforcing.addr, enforcing.ca_pem.clone()),
    ] {
        let (first, last) = if name == "direct" { (d_first, d_last) } else { stream_timing(addr, &pem).await? };
        println!(
            "{:<22}{:>15.3}{:>15.3}{:>12.3} / {:.3}",
            name,
            first.as_secs_f64() * 1e3,
            last.as_secs_f64() * 1e3,
            (first.as_secs_f64() - d_first.as_secs_f64()) * 1e3,
            (last.as_secs_f64() - d_last.as_secs_f64()) * 1e3
        );
    }
    Ok(())
}
