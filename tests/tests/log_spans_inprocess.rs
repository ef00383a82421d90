//! In-process: a log line written inside a connection carries the
//! connection's span fields (client, SNI) at its top level, once each, in the
//! JSON log format.

use anyhow::{Context, Result};
use interceptor::{
    policy::DomainsConfig,
    telemetry,
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::{
    captured::CapturedLog,
    inprocess::{InProcessProxy, client_for},
};
use tracing_subscriber::{EnvFilter, util::SubscriberInitExt as _};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_line_inside_a_connection_carries_its_client_and_sni_once() -> Result<()> {
    let captured = CapturedLog::default();
    // The only test of this binary: the proxy's tasks run on every worker thread.
    telemetry::json_subscriber(EnvFilter::new("info"), captured.clone()).try_init()?;

    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let proxy = InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), None).await?;
    // A client that does not trust our CA: the proxy logs the rejection from
    // inside the connection, with no client or SNI field of its own.
    let distrustful = client_for("api.openai.com", proxy.addr, &[&pki.ca_pem()], false)?;
    assert!(distrustful.get("https://api.openai.com/status/200").send().await.is_err());

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let line = loop {
        let text = captured.text();
        if let Some(line) = text.lines().find(|l| l.contains("\"event\":\"certificate_rejected\"")) {
            break line.to_owned();
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "no certificate_rejected line in:\n{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let value: serde_json::Value = serde_json::from_str(&line).context("a JSON line")?;
    assert_eq!(value["sni"], "api.openai.com", "{line}");
    assert!(value["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "{line}");
    assert!(value["orig_dst"].is_string(), "{line}");
    for key in ["\"client\":", "\"sni\":", "\"orig_dst\":"] {
        assert_eq!(line.matches(key).count(), 1, "{key} in {line}");
    }
    assert_eq!(value["level"], "WARN", "{line}");
    proxy.shutdown(std::time::Duration::from_secs(2)).await;
    Ok(())
}
