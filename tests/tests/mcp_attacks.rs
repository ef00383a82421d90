//! MCP from the attacker's side, through the in-process proxy and a
//! scripted plain-HTTP MCP server (a `mcp.plain`-style target, recognized
//! as MCP by its content): what an agent or a malicious server can try to
//! slip past the guardrails.
//!
//! * a batch hiding a key behind a harmless call is refused whole;
//! * a compressed `tools/call` body is decoded and refused;
//! * the client's answer to a server's sampling request carrying a key is
//!   refused with the block contract;
//! * a server request (`sampling/createMessage`) carrying a key is dropped
//!   from the SSE stream, the events around it go through;
//! * a card number split across SSE chunks still reaches the client
//!   redacted;
//! * on the old HTTP+SSE transport, an answer on the event stream is
//!   matched to the call POSTed to the endpoint it named;
//! * an event stream the server compressed anyway is cut, not relayed
//!   unseen.
//!
//! A test that sends a secret asserts the server never received it.

use std::{
    io::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use bytes::Bytes;
use interceptor::{
    config::{Backend, Config, GuardrailsConfig, McpConfig, StreamMode},
    dataplane,
    guardrails::engine::BUILTIN_POLICY,
    proxy::ProxySettings,
    testing::mcp::{REDACT_CARDS_IN_TOOL_RESULTS, private_key},
};
use interceptor_tests::{
    inprocess::InProcessProxy,
    plain_http::{self, Answer},
};
use serde_json::{Value, json};

/// What the server received: request bodies.
type Seen = Arc<Mutex<Vec<String>>>;

/// A Luhn-valid test card number.
const CARD: &str = "4111 1111 1111 1111";
const REDACTED_CARD: &str = "[REDACTED:credit_card]";

fn sse_event(message: &Value) -> String {
    format!("event: message\ndata: {message}\n\n")
}

/// The server's answer to one POST: scripted by the tool called.
fn script(request: &Value) -> (&'static str, &'static str, Vec<Bytes>) {
    let id = request["id"].clone();
    let tool = request["params"]["name"].as_str().unwrap_or_default();
    let result =
        |text: String| json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": text}]}});
    match tool {
        // A server request carrying a key, between a progress notification
        // and the result.
        "ask_model" => {
            let sampling = json!({"jsonrpc": "2.0", "id": "srv-1", "method": "sampling/createMessage", "params": {
                "messages": [{"role": "user", "content": {"type": "text", "text": format!("summarize {}", private_key())}}],
                "maxTokens": 100
            }});
            let progress = json!({"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": 1, "progress": 0.5}});
            let events = [sse_event(&progress), sse_event(&sampling), sse_event(&result("asked".into()))];
            ("text/event-stream", "", vec![events.concat().into()])
        }
        // The card split across chunks, one byte at the seams.
        "split_card" => {
            let event = sse_event(&result(format!("Card on file: {CARD}.")));
            let at = event.find("1111 1111").unwrap_or(1);
            let chunks = [&event[..at], &event[at..at + 3], &event[at + 3..]];
            ("text/event-stream", "", chunks.iter().map(|c| Bytes::from(c.to_string())).collect())
        }
        // A card in a gzip-compressed stream, although the proxy asked for
        // none.
        "gzip_card" => {
            let event = sse_event(&result(format!("Card on file: {CARD}.")));
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let body = gz.write_all(event.as_bytes()).and_then(|()| gz.finish()).unwrap_or_default();
            ("text/event-stream", "gzip", vec![body.into()])
        }
        _ => ("application/json", "", vec![result("done".into()).to_string().into()]),
    }
}

/// The old HTTP+SSE transport's event stream (`GET /sse`): the `endpoint`
/// event naming session `old-1`, then the answer to `tools/call` 9 (POSTed
/// to that endpoint), holding a card number.
fn old_transport_stream() -> Vec<Bytes> {
    let result =
        json!({"jsonrpc": "2.0", "id": 9, "result": {"content": [{"type": "text", "text": format!("Card: {CARD}")}]}});
    let endpoint = "event: endpoint\ndata: /messages?sessionId=old-1\n\n".to_string();
    vec![endpoint.into(), sse_event(&result).into()]
}

/// A plain-HTTP MCP server answering by [`script`]; an answer to a
/// JSON-RPC response (a client's answer to a sampling request) is `202`.
async fn server() -> Result<(SocketAddr, Seen)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen: Seen = Arc::default();
    let record = Arc::clone(&seen);
    plain_http::serve(listener, move |_, head, body| {
        let text = String::from_utf8_lossy(body).into_owned();
        record.lock().unwrap_or_else(|e| e.into_inner()).push(text.clone());
        if head.uri.path() == "/sse" {
            return Answer {
                status: http::StatusCode::OK,
                content_type: "text/event-stream",
                content_encoding: "",
                chunks: old_transport_stream(),
            };
        }
        let request = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
        if request.get("method").is_none() || head.uri.path() == "/messages" {
            return Answer {
                status: http::StatusCode::ACCEPTED,
                content_type: "",
                content_encoding: "",
                chunks: Vec::new(),
            };
        }
        let (content_type, content_encoding, chunks) = script(&request);
        Answer { status: http::StatusCode::OK, content_type, content_encoding, chunks }
    });
    Ok((addr, seen))
}

struct Setup {
    proxy: InProcessProxy,
    seen: Seen,
    audit: std::path::PathBuf,
    metrics: Arc<interceptor::metrics::Metrics>,
    _dir: tempfile::TempDir,
}

async fn setup() -> Result<Setup> {
    let (server, seen) = server().await?;
    let dir = tempfile::tempdir()?;
    let audit = dir.path().join("audit.jsonl");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, [BUILTIN_POLICY, REDACT_CARDS_IN_TOOL_RESULTS].concat())?;
    let guardrails = GuardrailsConfig {
        enabled: true,
        backends: vec![Backend::Local],
        policy_file: policy,
        audit_file: audit.clone(),
        stream_mode: StreamMode::Monitor,
        ..GuardrailsConfig::default()
    };
    // The server is a plain MCP target: MCP by its name, whatever it sends.
    let mcp = McpConfig { plain: vec![format!("tools.agents.test:{}", server.port())], ..McpConfig::default() };
    let config = Config { guardrails, mcp, ..Config::default() };
    let metrics = Arc::new(interceptor::metrics::Metrics::new());
    let (hook, _handle) = dataplane::guardrails(&config, &metrics)?;
    let pki = interceptor::testing::provider::TestPki::with_defaults()?;
    let ca = pki.write_ca(dir.path())?;
    let settings = ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
    let proxy =
        InProcessProxy::start_with(server, &ca, interceptor::policy::DomainsConfig::default(), hook, settings).await?;
    proxy.set_plain_target(server, "tools.agents.test");
    Ok(Setup { proxy, seen, audit, metrics, _dir: dir })
}

impl Setup {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy.addr)
    }

    /// POSTs `body` to `/mcp` as an MCP client does, in session `s-1`; the
    /// status, content type and body.
    async fn post(&self, body: Vec<u8>, gzip: bool) -> Result<(u16, String, String)> {
        self.post_to("/mcp", Some("s-1"), body, gzip).await
    }

    async fn post_to(
        &self,
        path: &str,
        session: Option<&str>,
        body: Vec<u8>,
        gzip: bool,
    ) -> Result<(u16, String, String)> {
        let client = reqwest::Client::builder().no_proxy().build()?;
        let mut request = client
            .post(self.url(path))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        if gzip {
            request = request.header("content-encoding", "gzip");
        }
        let resp = request.body(body).send().await?;
        let status = resp.status().as_u16();
        let content_type =
            resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        Ok((status, content_type, resp.text().await?))
    }

    /// Whether the server ever received `needle`.
    fn server_saw(&self, needle: &str) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|b| b.contains(needle))
    }

    /// The audit events, once one of them matches.
    async fn audit_until(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
            let events: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
            if events.iter().any(&matches) {
                return Ok(events);
            }
            ensure!(std::time::Instant::now() < deadline, "no audit event {what}: {text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn tools_call(id: u64, tool: &str, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": {"text": text}}})
}

/// The data of each SSE event of `body`.
fn sse_data(body: &str) -> Vec<Value> {
    body.split("\n\n")
        .filter_map(|event| event.lines().find_map(|l| l.strip_prefix("data: ")))
        .filter_map(|data| serde_json::from_str(data).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_hiding_a_key_behind_a_harmless_call_is_refused_whole() -> Result<()> {
    let s = setup().await?;
    let key = private_key();
    let batch = json!([tools_call(1, "echo", "harmless"), tools_call(2, "echo", &format!("use {key}"))]);
    let (status, content_type, body) = s.post(batch.to_string().into_bytes(), false).await?;
    assert_eq!((status, content_type.as_str()), (200, "application/json"), "{body}");
    let answers: Value = serde_json::from_str(&body)?;
    let answers = answers.as_array().context("a batch answer")?;
    assert_eq!(answers.len(), 2, "{body}");
    for (answer, id) in answers.iter().zip([1, 2]) {
        assert_eq!(answer["id"], id, "{body}");
        assert_eq!(answer["error"]["code"], -32001, "{body}");
    }
    assert!(answers[0]["error"]["message"].as_str().unwrap_or_default().contains("refused with its batch"), "{body}");
    assert!(s.seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty(), "the server received the batch");
    let events =
        s.audit_until("for both calls", |e| e["event"] == "mcp_tool_call" && e["mcp"]["tool"] == "echo").await?;
    let calls: Vec<&Value> = events.iter().filter(|e| e["event"] == "mcp_tool_call").collect();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(calls.iter().all(|e| e["decision"] == "block"), "{calls:#?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_tool_call_is_decoded_and_refused() -> Result<()> {
    let s = setup().await?;
    let key = private_key();
    let plain = tools_call(7, "echo", &format!("store {key}")).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(plain.as_bytes())?;
    let (status, _, body) = s.post(gz.finish()?, true).await?;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body)?;
    assert_eq!((answer["id"].clone(), answer["error"]["code"].clone()), (json!(7), json!(-32001)), "{body}");
    assert!(s.seen.lock().unwrap_or_else(|e| e.into_inner()).is_empty(), "the server received the call");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sampling_answer_carrying_a_key_is_refused() -> Result<()> {
    let s = setup().await?;
    let key = private_key();
    // The client's answer to a server's sampling request: no id to answer
    // with an error, so the block contract.
    let answer = json!({"jsonrpc": "2.0", "id": "srv-1", "result": {
        "role": "assistant", "model": "m", "content": {"type": "text", "text": format!("here: {key}")}
    }});
    let (status, _, body) = s.post(answer.to_string().into_bytes(), false).await?;
    assert_eq!(status, 403, "{body}");
    assert!(!s.server_saw("PRIVATE KEY"), "the server received the key");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_request_carrying_a_key_is_dropped_from_the_stream() -> Result<()> {
    let s = setup().await?;
    let (status, content_type, body) = s.post(tools_call(3, "ask_model", "go").to_string().into_bytes(), false).await?;
    assert_eq!((status, content_type.as_str()), (200, "text/event-stream"), "{body}");
    assert!(!body.contains("PRIVATE KEY"), "the key reached the client: {body}");
    let messages = sse_data(&body);
    let methods: Vec<&str> = messages.iter().filter_map(|m| m["method"].as_str()).collect();
    assert_eq!(methods, ["notifications/progress"], "{body}");
    let result = messages.iter().find(|m| m["id"] == 3).context("the tool result")?;
    assert_eq!(result["result"]["content"][0]["text"], "asked", "{body}");
    s.audit_until("blocking the sampling request", |e| e["decision"] == "block" && e["direction"] == "response")
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_split_across_chunks_is_redacted() -> Result<()> {
    let s = setup().await?;
    let (status, _, body) = s.post(tools_call(4, "split_card", "go").to_string().into_bytes(), false).await?;
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains(CARD), "the card reached the client: {body}");
    let messages = sse_data(&body);
    assert_eq!(messages.len(), 1, "{body}");
    assert_eq!(messages[0]["id"], 4, "{body}");
    assert_eq!(messages[0]["result"]["content"][0]["text"], format!("Card on file: {REDACTED_CARD}."), "{body}");
    let events = s.audit_until("for the split_card call", |e| e["event"] == "mcp_tool_call").await?;
    let call = events.iter().find(|e| e["event"] == "mcp_tool_call").context("tool call event")?;
    assert_eq!(call["decision"], "modify", "{call:#}");
    assert_eq!(call["mcp"]["tool"], "split_card", "{call:#}");
    let metrics = s.metrics.encode();
    let counter =
        r#"interceptor_mcp_tool_calls_total{server="tools.agents.test",tool="split_card",decision="modify"} 1"#;
    assert!(metrics.contains(counter), "{metrics}");
    Ok(())
}

/// The old HTTP+SSE transport: the call is POSTed to the endpoint the
/// event stream named, and answered on that stream. The answer is matched
/// to its call through the session the `endpoint` event names: redacted,
/// and reported as the call's `mcp_tool_call` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_transport_answer_is_matched_to_its_call_and_redacted() -> Result<()> {
    let s = setup().await?;
    let call = tools_call(9, "lookup_card", "mine");
    let (status, _, body) = s.post_to("/messages?sessionId=old-1", None, call.to_string().into_bytes(), false).await?;
    assert_eq!(status, 202, "{body}");
    let client = reqwest::Client::builder().no_proxy().build()?;
    let resp = client.get(s.url("/sse")).header("accept", "text/event-stream").send().await?;
    assert_eq!(resp.status(), 200);
    let stream = resp.text().await?;
    assert!(stream.contains("event: endpoint\ndata: /messages?sessionId=old-1\n\n"), "{stream}");
    assert!(!stream.contains(CARD), "the card reached the client: {stream}");
    let answer = sse_data(&stream).into_iter().find(|m| m["id"] == 9).context("the answer")?;
    assert_eq!(answer["result"]["content"][0]["text"], format!("Card: {REDACTED_CARD}"), "{stream}");
    let events = s.audit_until("for the old transport's call", |e| e["event"] == "mcp_tool_call").await?;
    let event = events.iter().find(|e| e["event"] == "mcp_tool_call").context("tool call event")?;
    assert_eq!(event["mcp"]["tool"], "lookup_card", "{event:#}");
    assert_eq!(event["mcp"]["session"], "old-1", "{event:#}");
    assert_eq!(event["decision"], "modify", "{event:#}");
    Ok(())
}

/// A server that compresses its event stream although the proxy asked for
/// none cannot slip a result past the checks: the stream is cut before its
/// first byte, and the cut is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_event_stream_is_cut_not_relayed_unseen() -> Result<()> {
    let s = setup().await?;
    let client = reqwest::Client::builder().no_proxy().no_gzip().build()?;
    let resp = client
        .post(s.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&tools_call(11, "gzip_card", "go"))
        .send()
        .await?;
    let body = resp.bytes().await.unwrap_or_default();
    assert!(body.is_empty(), "bytes of the compressed stream reached the client: {body:?}");
    let events =
        s.audit_until("for the cut stream", |e| e["decision"] == "block" && e["direction"] == "response").await?;
    let cut = events.iter().find(|e| e["decision"] == "block").context("the block")?;
    assert!(cut.to_string().contains("compressed (gzip)"), "{cut:#}");
    Ok(())
}

/// Text where the MCP parser does not look (a `_meta` field, an unknown
/// method's params) is scanned too: a key hidden there never reaches the
/// server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_field_the_parser_does_not_read_is_refused() -> Result<()> {
    let s = setup().await?;
    let key = private_key();
    let hidden_in_meta = json!({"jsonrpc": "2.0", "id": 21, "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hi"}, "_meta": {"note": key}}});
    let unknown_method = json!({"jsonrpc": "2.0", "id": 22, "method": "tools/export", "params": {"payload": key}});
    for (id, body) in [(21, hidden_in_meta), (22, unknown_method)] {
        let (status, _, answer) = s.post(body.to_string().into_bytes(), false).await?;
        assert_eq!(status, 200, "{answer}");
        let answer: Value = serde_json::from_str(&answer)?;
        assert_eq!((answer["id"].clone(), answer["error"]["code"].clone()), (json!(id), json!(-32001)), "{answer}");
    }
    assert!(!s.server_saw("PRIVATE KEY"), "the server received the key");
    Ok(())
}
