//! Plain-HTTP MCP targets (`mcp.plain`) through the in-process proxy: a
//! connection whose original destination is a plain target is served as
//! HTTP/1.1 without TLS, relayed as plain HTTP to that destination, and
//! inspected by the guardrails under the target's name.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use interceptor::{config::GuardrailsConfig, proxy::ProxySettings};
use interceptor_tests::{
    inprocess::{InProcessProxy, local_pipeline},
    plain_http::{self, Answer},
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the plain server received: (Host header, body).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A plain-HTTP JSON-RPC server on loopback answering every POST with a
/// result for its id.
async fn plain_server() -> Result<(SocketAddr, Seen)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    plain_http::serve(listener, move |_, head, body| {
        let host = head.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("").to_string();
        let text = String::from_utf8_lossy(body).into_owned();
        let id = serde_json::from_str::<Value>(&text).ok().map(|v| v["id"].clone()).unwrap_or(Value::Null);
        record.lock().unwrap_or_else(|e| e.into_inner()).push((host, text));
        Answer::json(&json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": "done"}]}}))
    });
    Ok((addr, seen))
}

struct Setup {
    proxy: InProcessProxy,
    server: SocketAddr,
    seen: Seen,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn setup() -> Result<Setup> {
    let (server, seen) = plain_server().await?;
    let dir = tempfile::tempdir()?;
    let audit = dir.path().join("audit.jsonl");
    let hook = local_pipeline(GuardrailsConfig::default(), Some(audit.clone()))?;
    // No TLS upstream is reached; any CA file will do.
    let pki = interceptor::testing::provider::TestPki::with_defaults()?;
    let ca = pki.write_ca(dir.path())?;
    let settings = ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
    let proxy =
        InProcessProxy::start_with(server, &ca, interceptor::policy::DomainsConfig::default(), Some(hook), settings)
            .await?;
    Ok(Setup { proxy, server, seen, audit, _dir: dir })
}

fn call(id: u64, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": "save_note", "arguments": {"text": text}}})
}

/// The request audit events, once there are `n` of them.
async fn request_events(audit: &std::path::Path, n: usize) -> Result<Vec<Value>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(audit).unwrap_or_default();
        let events: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["direction"] == "request")
            .collect();
        if events.len() >= n {
            return Ok(events);
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "{} of {n} audit events: {text}", events.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n-----END RSA PRIVATE KEY-----";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_target_is_relayed_as_http_and_inspected_under_its_name() -> Result<()> {
    let s = setup().await?;
    s.proxy.set_plain_target(s.server, "tools.agents.test");
    // The client speaks plain HTTP to the proxy, as a redirected client
    // of the server would.
    let client = reqwest::Client::builder().no_proxy().build()?;
    let url = format!("http://{}/mcp", s.proxy.addr);
    let resp = client
        .post(&url)
        .header("host", format!("tools.agents.test:{}", s.server.port()))
        .header("accept", "application/json, text/event-stream")
        .json(&call(1, "buy milk"))
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await?;
    assert_eq!(answer["result"]["content"][0]["text"], "done", "{answer}");
    {
        let seen = s.seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, format!("tools.agents.test:{}", s.server.port()), "the Host is kept");
        assert!(seen[0].1.contains("buy milk"));
    }
    let events = request_events(&s.audit, 1).await?;
    assert_eq!(events[0]["host"], "tools.agents.test", "inspected under the target's name: {}", events[0]);

    // A private key in the arguments never reaches the server.
    let resp = client
        .post(&url)
        .header("accept", "application/json, text/event-stream")
        .json(&call(2, &format!("keep this: {KEY}")))
        .send()
        .await?;
    let status = resp.status();
    let body = resp.text().await?;
    assert!(!body.contains("\"done\""), "the server answered: {status} {body}");
    for (_, body) in s.seen.lock().unwrap().iter() {
        assert!(!body.contains("PRIVATE KEY"), "the server received the key: {body}");
    }
    let events = request_events(&s.audit, 2).await?;
    assert_eq!(events[1]["decision"], "block", "{}", events[1]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_http_are_refused_with_400() -> Result<()> {
    let s = setup().await?;
    s.proxy.set_plain_target(s.server, "tools.agents.test");
    let mut stream = tokio::net::TcpStream::connect(s.proxy.addr).await?;
    stream.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n").await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(s.seen.lock().unwrap().is_empty(), "nothing reaches the server");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_destination_is_not_a_plain_target() -> Result<()> {
    let s = setup().await?;
    // The server's address on another port is the plain target: this
    // connection's destination is not, so it is classified as TLS traffic
    // (a plain request is relayed untouched, not inspected).
    let other = SocketAddr::new(s.server.ip(), s.server.port().wrapping_add(1).max(1));
    s.proxy.set_plain_target(other, "tools.agents.test");
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client.post(format!("http://{}/mcp", s.proxy.addr)).json(&call(1, "buy milk")).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.seen.lock().unwrap().len(), 1, "relayed");
    assert!(std::fs::read_to_string(&s.audit).unwrap_or_default().is_empty(), "not inspected");
    Ok(())
}
