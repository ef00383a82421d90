//! The Akto-compatible remote backend end to end: the in-process proxy with
//! the guardrail pipeline calling a fake Akto service, in front of a fake
//! provider. Verdicts in both key casings, the merged request/response
//! shape, a 422, timeouts in fail-open and fail-closed, and the local
//! engine short-circuiting the remote one.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use interceptor::{
    audit::AuditLog,
    config::{Backend, FailMode, GuardrailsConfig},
    guardrails::{
        akto::{AktoClient, AktoConfig},
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    policy::DomainsConfig,
    testing::{
        akto::{FakeAkto, Reply},
        provider::{FakeProvider, TestPki},
    },
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::{Value, json};
use tokio::sync::watch;

struct Setup {
    provider: FakeProvider,
    akto: FakeAkto,
    proxy: InProcessProxy,
    audit: std::path::PathBuf,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
}

async fn setup(backends: Vec<Backend>, fail: FailMode, timeout: Duration) -> Result<Setup> {
    setup_with(backends, fail, timeout, |_| {}).await
}

async fn setup_with(
    backends: Vec<Backend>,
    fail: FailMode,
    timeout: Duration,
    tweak: impl FnOnce(&mut AktoConfig),
) -> Result<Setup> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let akto = FakeAkto::start()?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let akto_cfg = AktoConfig {
        url: akto.url(),
        app_name: "Billing Agent".into(),
        token: Some("akto-secret-token".into()),
        request_timeout: timeout,
        stream_timeout: timeout,
        ..AktoConfig::default()
    };
    let mut akto_cfg = akto_cfg;
    tweak(&mut akto_cfg);
    let cfg = GuardrailsConfig {
        backends: backends.clone(),
        fail_mode_request: fail,
        fail_mode_response: fail,
        akto: akto_cfg.clone(),
        ..GuardrailsConfig::default()
    };
    let guardrails = Guardrails {
        engine: backends.contains(&Backend::Local).then(|| Engine::builtin().map(Arc::new)).transpose()?,
        akto: Some(Arc::new(AktoClient::new(akto_cfg)?)),
        cfg,
        keys: None,
    };
    // The receiver keeps the last value after the sender is gone.
    let (_, rx) = watch::channel(Arc::new(guardrails));
    let metrics = Arc::new(Metrics::new());
    let audit = dir.path().join("audit.jsonl");
    let pipeline = Pipeline::new(rx, AuditLog::start(Some(audit.clone()), Arc::clone(&metrics)), Arc::clone(&metrics));
    let proxy =
        InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), Some(Arc::new(pipeline)))
            .await?;
    Ok(Setup { provider, akto, proxy, audit, metrics, _dir: dir })
}

fn chat_body(prompt: &str) -> String {
    json!({
        "model": "gpt-4o",
        "max_tokens": 64,
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "messages": [{"role": "user", "content": prompt}]
    })
    .to_string()
}

async fn post(s: &Setup, body: &str) -> Result<reqwest::Response> {
    let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    Ok(client
        .post("https://api.openai.com/v1/chat/completions")
        .header("authorization", "Bearer sk-user-key")
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await?)
}

async fn assert_blocked(resp: reqwest::Response, reason: &str) -> Result<()> {
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
    let body: Value = resp.json().await?;
    assert_eq!(body, json!({ "error": reason }), "exact block body");
    Ok(())
}

fn request_checks(akto: &FakeAkto) -> Vec<interceptor::testing::akto::RecordedCall> {
    akto.calls().into_iter().filter(|c| c.query_param("guardrails") == Some("true")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_verdict_forwards_and_the_call_carries_the_akto_fields() -> Result<()> {
    let s = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    s.akto.set_request_reply(Reply::allowed());
    s.akto.set_response_reply(Reply::allowed());
    let body = chat_body("hello there");
    let resp = post(&s, &body).await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(s.provider.requests().pop().expect("forwarded").body, body.as_bytes());

    let calls = s.akto.calls();
    let check = calls.iter().find(|c| c.query_param("guardrails") == Some("true")).expect("request check");
    assert_eq!(check.query_param("ingest_data"), Some("true"));
    assert_eq!(check.header("authorization"), Some("akto-secret-token"));
    let b = &check.body;
    assert_eq!(b["method"], "POST");
    assert_eq!(b["path"], "/v1/chat/completions");
    assert_eq!(b["source"], "MIRRORING");
    assert_eq!(b["statusCode"], "200");
    let payload: Value = serde_json::from_str(b["requestPayload"].as_str().expect("string"))?;
    assert_eq!(payload["messages"][0]["content"], "hello there");
    let headers: Value = serde_json::from_str(b["requestHeaders"].as_str().expect("string"))?;
    assert_eq!(headers["host"], "billing-agent");
    // Every value is a string or null, and no credential leaks to Akto.
    for (k, v) in b.as_object().expect("object") {
        assert!(v.is_string() || v.is_null(), "{k} is {v}");
    }
    let text = b.to_string();
    assert!(!text.contains("sk-user-key") && !text.contains("akto-secret-token"), "{text}");
    // The response was checked too, with the same request id.
    let resp_check =
        calls.iter().find(|c| c.query_param("response_guardrails") == Some("true")).expect("response check");
    assert_eq!(resp_check.header("x-request-id"), check.header("x-request-id"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_verdicts_in_both_casings_answer_403_and_never_call_the_provider() -> Result<()> {
    let s = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    for reply in [Reply::blocked("no PII allowed"), Reply::blocked("no PII allowed").lowercase_keys()] {
        s.akto.set_request_reply(reply);
        assert_blocked(post(&s, &chat_body("my ssn")).await?, "no PII allowed").await?;
    }
    // The merged shape: the request result decides a request check.
    s.akto.set_request_reply(Reply::merged(&Reply::blocked("request says no"), &Reply::allowed()));
    assert_blocked(post(&s, &chat_body("x")).await?, "request says no").await?;
    assert!(s.provider.requests().is_empty(), "a blocked request never reaches the provider");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modified_verdict_rewrites_only_the_messages() -> Result<()> {
    let s = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    s.akto.set_response_reply(Reply::allowed());
    let modified = json!({"messages": [{"role": "user", "content": "my card is [MASKED]"}]}).to_string();
    s.akto.set_request_reply(Reply::modified(&modified));
    let resp = post(&s, &chat_body("my card is 4111 1111 1111 1111")).await?;
    assert_eq!(resp.status(), 200);
    let seen = s.provider.requests().pop().expect("forwarded");
    let sent: Value = serde_json::from_slice(&seen.body)?;
    assert_eq!(sent["messages"][0]["content"], "my card is [MASKED]");
    assert_eq!(sent["model"], "gpt-4o");
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["tools"][0]["function"]["name"], "lookup");
    assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_response_is_replaced_by_the_403_contract() -> Result<()> {
    let s = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    s.akto.set_request_reply(Reply::allowed());
    s.akto.set_response_reply(Reply::blocked("response leaks data"));
    assert_blocked(post(&s, &chat_body("hi")).await?, "response leaks data").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_follow_the_fail_mode() -> Result<()> {
    // A 422 and a timeout, failing open: forwarded, recorded as errors.
    let open = setup(vec![Backend::Akto], FailMode::Open, Duration::from_millis(300)).await?;
    open.akto.set_response_reply(Reply::allowed());
    open.akto.set_request_reply(Reply::rejected(&["requestPayload is empty"]));
    assert_eq!(post(&open, &chat_body("a")).await?.status(), 200);
    open.akto.set_request_reply(Reply::allowed().delayed(Duration::from_secs(2)));
    assert_eq!(post(&open, &chat_body("b")).await?.status(), 200);
    assert_eq!(open.provider.requests().len(), 2);
    let audit = std::fs::read_to_string(&open.audit)?;
    assert!(audit.lines().filter(|l| l.contains("\"decision\":\"error\"")).count() >= 2, "{audit}");

    // The same failures, failing closed: refused with 503, provider untouched.
    let closed = setup(vec![Backend::Akto], FailMode::Closed, Duration::from_millis(300)).await?;
    closed.akto.set_request_reply(Reply::rejected(&["requestPayload is empty"]));
    let resp = post(&closed, &chat_body("a")).await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
    closed.akto.set_request_reply(Reply::allowed().delayed(Duration::from_secs(2)));
    let started = std::time::Instant::now();
    assert_eq!(post(&closed, &chat_body("b")).await?.status(), 503);
    assert!(started.elapsed() < Duration::from_millis(1500), "the timeout bounds the wait");
    assert!(closed.provider.requests().is_empty());
    Ok(())
}

/// The audit file's events once it holds `n` of them (they are written off
/// the request path), within 5 s.
async fn audit_events(s: &Setup, n: usize) -> Result<Vec<Value>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&s.audit).unwrap_or_default();
        let events: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
        if events.len() >= n {
            return Ok(events);
        }
        assert!(std::time::Instant::now() < deadline, "{n} audit events expected, got: {text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verdict_akto_failed_to_reach_is_an_error_never_an_allow() -> Result<()> {
    // Akto's guardrail service timed out and answered "allowed" on its own
    // (`failOpen`). Failing open: forwarded, but audited and counted as the
    // failure it is.
    let open = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    open.akto.set_request_reply(Reply::fail_open());
    open.akto.set_response_reply(Reply::allowed());
    assert_eq!(post(&open, &chat_body("hello")).await?.status(), 200);
    assert_eq!(open.provider.requests().len(), 1);
    let events = audit_events(&open, 2).await?;
    let request = events.iter().find(|e| e["direction"] == "request").expect("a request event");
    assert_eq!(request["decision"], "error", "{request}");
    let reasons = request["reasons"].to_string();
    assert!(reasons.contains("failed open (guardrails service timeout)"), "{reasons}");
    let metrics = open.metrics.encode();
    assert!(
        metrics.contains("interceptor_guardrail_backend_errors_total{backend=\"akto\",kind=\"fail_open\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("direction=\"request\",action=\"error\""), "{metrics}");

    // Failing closed, nothing was checked, as when Akto is down: refused.
    let closed = setup(vec![Backend::Akto], FailMode::Closed, Duration::from_secs(5)).await?;
    closed.akto.set_request_reply(Reply::fail_open());
    let resp = post(&closed, &chat_body("hello")).await?;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
    assert!(closed.provider.requests().is_empty());
    let events = audit_events(&closed, 1).await?;
    assert_eq!(events[0]["decision"], "block", "{}", events[0]);
    assert!(events[0]["reasons"].to_string().contains("failed open"), "{}", events[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors_are_checked_and_a_redacted_text_payload_is_forwarded() -> Result<()> {
    let s = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    // A 429 gets a response check (which is what Akto records), with its
    // status and body.
    let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    let resp = client
        .post("https://api.openai.com/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-fake-status", "429")
        .body(chat_body("hello"))
        .send()
        .await?;
    assert_eq!(resp.status(), 429);
    let calls = s.akto.calls();
    let response = calls.iter().find(|c| c.query_param("response_guardrails") == Some("true")).expect("a check");
    assert_eq!(response.body["statusCode"], "429");
    assert!(response.body["responsePayload"].as_str().is_some_and(|p| p.contains("error")), "{:?}", response.body);

    // A ModifiedPayload that is not JSON is what the provider gets, as the
    // addon sends it: the original would carry what Akto redacted.
    s.akto.set_request_reply(Reply::modified("my card is [CARD]"));
    assert_eq!(post(&s, &chat_body("my card is 4111 1111 1111 1111")).await?.status(), 200);
    let sent = s.provider.requests();
    assert_eq!(sent.last().map(|r| r.body.as_slice()), Some(&b"my card is [CARD]"[..]));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_payloads_logs_what_akto_is_sent_and_answers_but_never_the_token() -> Result<()> {
    captured_log();
    let s = setup_with(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5), |c| c.log_payloads = true).await?;
    s.akto.set_request_reply(Reply::blocked("payload-log-marker-reason"));
    assert_blocked(post(&s, &chat_body("payload-log-marker-prompt")).await?, "payload-log-marker-reason").await?;
    let log = String::from_utf8_lossy(&captured_log().lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("payload-log-marker")).collect();
    assert!(lines.iter().any(|l| l.contains("akto call") && l.contains("payload-log-marker-prompt")), "{lines:#?}");
    assert!(lines.iter().any(|l| l.contains("akto reply") && l.contains("payload-log-marker-reason")), "{lines:#?}");
    // The per-check line, as the addon's `decision=BLOCKED | <reason>`.
    assert!(lines.iter().any(|l| l.contains("akto verdict") && l.contains("\"decision\":\"block\"")), "{lines:#?}");
    assert!(!log.contains("akto-secret-token"), "the token is logged");
    assert!(!log.contains("sk-user-key"), "the client's key is logged");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_block_short_circuits_the_remote_check() -> Result<()> {
    let s = setup(vec![Backend::Local, Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    s.akto.set_request_reply(Reply::allowed());
    let key = format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIBOgIBAAJBAK".repeat(4));
    let resp = post(&s, &chat_body(&key)).await?;
    assert_eq!(resp.status(), 403);
    assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
    let body: Value = resp.json().await?;
    assert!(body["error"].as_str().is_some_and(|r| r.contains("private_key") && !r.contains("MIIB")), "{body}");
    assert!(request_checks(&s.akto).is_empty(), "no remote verdict asked after a local block");
    assert!(s.provider.requests().is_empty());
    // The local block is reported to Akto as an event.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reported = s.akto.calls().into_iter().any(|c| c.body["statusCode"] == "403");
        if reported {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "local block not reported: {:?}", s.akto.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The audit writer appends off the request path: wait for the line.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let audit = loop {
        let audit = std::fs::read_to_string(&s.audit).unwrap_or_default();
        if audit.contains("\"decision\":\"block\"") {
            break audit;
        }
        assert!(std::time::Instant::now() < deadline, "no block in the audit log: {audit}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!audit.contains("MIIB"), "{audit}");
    Ok(())
}

/// Everything the process logs, at debug level for the interceptor, as JSON.
fn captured_log() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOG: std::sync::OnceLock<std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOG.get_or_init(|| {
        struct Sink;
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                captured_log().lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let _ = tracing_subscriber::fmt()
            .json()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,interceptor=debug"))
            .with_writer(|| Sink)
            .try_init();
        std::sync::Mutex::new(Vec::new())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credential_reaches_akto_the_audit_or_the_log() -> Result<()> {
    captured_log();
    let s = setup(vec![Backend::Local, Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    s.akto.set_request_reply(Reply::allowed());
    s.akto.set_response_reply(Reply::allowed());
    let secrets = ["sk-live-SECRET1", "sk-ant-SECRET2", "AIzaSECRET3", "azure-SECRET4", "AIzaSECRET5"];
    let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    let key = format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIBOgIBAAJBAK".repeat(4));
    let stream = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    // Allowed, streamed, and locally blocked (reported to Akto).
    for body in [chat_body("hello"), stream.to_string(), chat_body(&key)] {
        let resp = client
            .post(format!("https://api.openai.com/v1/chat/completions?alt=sse&key={}", secrets[4]))
            .header("authorization", format!("Bearer {}", secrets[0]))
            .header("x-api-key", secrets[1])
            .header("x-goog-api-key", secrets[2])
            .header("api-key", secrets[3])
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let _ = resp.bytes().await?;
    }
    // The provider gets the client's credentials: they are the client's to send.
    let seen = s.provider.requests();
    assert!(seen.iter().all(|r| r.header("authorization") == Some("Bearer sk-live-SECRET1")), "{seen:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !s.akto.calls().iter().any(|c| c.body["statusCode"] == "403") {
        assert!(std::time::Instant::now() < deadline, "local block not reported: {:?}", s.akto.calls());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let calls = s.akto.calls();
    assert!(calls.len() >= 4, "{calls:?}");
    // Audit lines are written off the request path: wait for the fifth.
    let audit = loop {
        // Not there at all until the writer's first line.
        let audit = std::fs::read_to_string(&s.audit).unwrap_or_default();
        if audit.lines().count() >= 5 {
            break audit;
        }
        assert!(std::time::Instant::now() < deadline + Duration::from_secs(5), "{audit}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = String::from_utf8_lossy(&captured_log().lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(log.contains("guardrail_decision") || log.contains("request_id"), "nothing captured: {log}");
    for secret in secrets {
        for call in &calls {
            // The fake provider echoes the request path in its answer, and
            // the provider's answer is forwarded as it is: leave it out.
            let mut body = call.body.clone();
            if let Some(o) = body.as_object_mut() {
                o.remove("responsePayload");
            }
            let text = format!("{} {} {:?} {}", call.path, call.query, call.headers, body);
            assert!(!text.contains(secret), "Akto call leaks {secret}: {text}");
        }
        assert!(!audit.contains(secret), "audit leaks {secret}: {audit}");
        assert!(!log.contains(secret), "log leaks {secret}");
    }
    Ok(())
}

/// An MCP tool call (recognized by its content on an intercepted host) goes
/// to Akto in the form of Akto's MCP endpoint shield: path `/mcp`, the
/// JSON-RPC message as the payload, the MCP tag and server header. Akto's
/// block is answered as a JSON-RPC error in the session, and the call never
/// reaches the server; an allowed call is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_tool_call_goes_to_akto_as_the_shield_sends_it_and_its_block_is_a_jsonrpc_error() -> Result<()> {
    let s = setup(vec![Backend::Akto], FailMode::Open, Duration::from_secs(5)).await?;
    s.akto.set_request_reply(Reply::blocked("tool not allowed by Akto"));
    let call = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "run_shell", "arguments": {"cmd": "cat ~/.ssh/id_rsa"}}});
    let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    let resp = client
        .post("https://api.openai.com/mcp")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", "s-9")
        .json(&call)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
    let answer: Value = resp.json().await?;
    assert_eq!(answer["id"], 5, "{answer}");
    assert_eq!(answer["error"]["code"], -32001, "{answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("tool not allowed by Akto"), "{answer}");
    assert!(s.provider.requests().is_empty(), "the server received the blocked call");

    let checks = request_checks(&s.akto);
    let check = checks.first().expect("a request check");
    let b = &check.body;
    assert_eq!(b["path"], "/mcp", "{b:#}");
    let payload: Value = serde_json::from_str(b["requestPayload"].as_str().expect("string"))?;
    assert_eq!(payload, call, "the JSON-RPC message as the payload");
    let tag: Value = serde_json::from_str(b["tag"].as_str().expect("string"))?;
    assert_eq!(tag["mcp-server"], "MCP Server", "{tag}");
    let headers: Value = serde_json::from_str(b["requestHeaders"].as_str().expect("string"))?;
    assert_eq!(headers["x-mcp-server"], "api.openai.com", "{headers}");
    assert!(headers["host"].as_str().is_some_and(|h| h.ends_with(".api.openai.com")), "{headers}");

    // Allowed: relayed.
    s.akto.set_request_reply(Reply::allowed());
    s.akto.set_response_reply(Reply::allowed());
    let call = json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "hi"}}});
    let resp = client
        .post("https://api.openai.com/mcp")
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", "s-9")
        .json(&call)
        .send()
        .await?;
    assert!(resp.headers().get("x-akto-guardrails-decision").is_none());
    let relayed = s.provider.requests();
    assert_eq!(relayed.len(), 1, "the allowed call is relayed");
    assert_eq!(serde_json::from_slice::<Value>(&relayed[0].body)?, call);
    Ok(())
}
