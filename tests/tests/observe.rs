//! `interceptor observe`: the live view of decisions from the admin API.
//! The in-process proxy with the built-in guardrails in front of a fake
//! provider, the admin API on loopback, and the real binary watching with
//! `--decision block`: a blocked request shows up on its output, an allowed
//! one does not.

use std::{process::Stdio, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, ensure};
use interceptor::{
    admin,
    config::{Backend, Config, GuardrailsConfig},
    dataplane,
    observe::LiveEvents,
    policy::DomainsConfig,
    testing::{
        interceptor_bin,
        mcp::private_key,
        provider::{FakeProvider, TestPki},
    },
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// Bound on every wait.
const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_shows_a_block_as_it_happens_and_nothing_it_was_not_asked_for() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let live = LiveEvents::default();
    let guardrails = GuardrailsConfig { enabled: true, backends: vec![Backend::Local], ..GuardrailsConfig::default() };
    let config = Config { guardrails, ..Config::default() };
    let metrics = Arc::new(interceptor::metrics::Metrics::new());
    let (hook, _handle) = dataplane::guardrails_with_state(&config, &metrics, None, Some(live.clone()))?;
    let proxy = InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), hook).await?;
    let listener = admin::bind("127.0.0.1:0".parse()?).await?;
    let admin_addr = listener.local_addr()?;
    let (_status, status_rx) = tokio::sync::watch::channel(Arc::new(admin::Status::default()));
    tokio::spawn(admin::serve(listener, status_rx, Arc::clone(&metrics), live.clone()));

    let mut watcher = tokio::process::Command::new(interceptor_bin())
        .args(["observe", "--admin", &admin_addr.to_string(), "--decision", "block", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while live.watchers() == 0 {
        ensure!(tokio::time::Instant::now() < deadline, "interceptor observe never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client = client_for("api.openai.com", proxy.addr, &[&proxy.ca_pem], false)?;
    let send = |prompt: String| {
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": prompt}]});
        client.post("https://api.openai.com/v1/chat/completions").json(&body).send()
    };
    let allowed = send("hello there".into()).await?;
    assert_eq!(allowed.status(), 200);
    let blocked = send(format!("deploy with {}", private_key())).await?;
    assert_eq!(blocked.status(), 403);
    let happened = std::time::Instant::now();

    let stdout = watcher.stdout.take().context("stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(TIMEOUT, lines.next_line()).await.context("no event within the bound")??;
    let line = line.context("observe exited without printing")?;
    println!("block shown {:?} after the response", happened.elapsed());
    let event: Value = serde_json::from_str(&line)?;
    assert_eq!(event["decision"], "block", "{event:#}");
    assert_eq!(event["direction"], "request", "{event:#}");
    assert_eq!(event["host"], "api.openai.com", "{event:#}");
    assert!(!line.contains("PRIVATE KEY"), "the live view holds the key: {line}");
    // The allowed request came first and was left out: the first line is
    // the block.
    drop(proxy);
    Ok(())
}

#[tokio::test]
async fn observe_says_when_the_admin_api_is_not_there() -> Result<()> {
    let unused = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let out = tokio::process::Command::new(interceptor_bin())
        .args(["observe", "--admin", &unused.to_string()])
        .output()
        .await?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("admin API") && stderr.contains("is the interceptor running?"), "{stderr}");
    Ok(())
}
