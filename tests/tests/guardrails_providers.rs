//! The guardrail pipeline end to end for every provider wire format: the
//! in-process proxy with the built-in local policy (streams enforced) in
//! front of the fake provider, which answers in each provider's own shape.
//!
//! For OpenAI Chat Completions, OpenAI Responses, Anthropic Messages, Bedrock
//! InvokeModel (Claude), Bedrock Converse and Gemini, over HTTP/1.1 and
//! HTTP/2:
//!
//! * an allowed exchange passes byte for byte, streams included;
//! * a card number is redacted and every other field arrives unchanged;
//! * a private key is refused with the seed's 403 before the provider;
//! * a credential leaking into a stream cuts it with the provider's own
//!   error event, and the credential never reaches the client;
//! * each decision is one audit event, without prompt text or secrets.
//!
//! Secrets are built at run time so no secret-shaped literal sits here.
//! Each test checks every shape and reports all failures at once.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use interceptor::{
    audit::AuditLog,
    config::{GuardrailsConfig, StreamMode},
    guardrails::{
        engine::Engine,
        framing::eventstream::Decoder,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    policy::DomainsConfig,
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::{Value, json};
use tokio::sync::watch;

const OPENAI: &str = "api.openai.com";
const ANTHROPIC: &str = "api.anthropic.com";
const BEDROCK: &str = "bedrock-runtime.us-east-1.amazonaws.com";
const GEMINI: &str = "generativelanguage.googleapis.com";

const CLAUDE_ON_BEDROCK: &str = "/model/anthropic.claude-3-5-sonnet-20241022-v2:0";
const NOVA_ON_BEDROCK: &str = "/model/amazon.nova-pro-v1:0";
const GEMINI_MODEL: &str = "/v1beta/models/gemini-2.0-flash";

/// A harmless prompt.
const QUESTION: &str = "What is the capital of France?";
/// What the fake model says in allowed streams: long enough for several
/// deltas, short enough to stay quick.
const STREAM_REPLY: &str = "Paris is the capital of France, and its largest city by population.";
/// A Luhn-valid test card number.
const CARD: &str = "4111 1111 1111 1111";

/// `ghp_` and 36 alphanumerics: the shape of a GitHub token.
fn github_token() -> String {
    format!("{}_{}", "ghp", "a1B2".repeat(9))
}

/// An RSA private key block (not a real key).
fn private_key() -> String {
    let label = ["RSA", "PRIVATE", "KEY"].join(" ");
    let body = format!("MIIB{}", "Zm9vYmFy".repeat(8));
    format!("-----BEGIN {label}-----\n{body}\n-----END {label}-----")
}

/// How a streamed answer is framed, and so how its cut must look.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// `data: {"error": …}` then `data: [DONE]`.
    OpenAiChat,
    /// `event: error`, no `response.completed`.
    Responses,
    /// `event: error` ending the stream.
    Anthropic,
    /// An AWS event-stream exception frame last.
    EventStream,
    /// `data:` chunks, the last an error.
    GeminiSse,
    /// One JSON array, the last element an error.
    GeminiArray,
}

#[derive(Clone)]
struct StreamRoute {
    path: String,
    /// The body asks for the stream (`"stream": true`); otherwise the path does.
    in_body: bool,
    cut: Cut,
}

/// One provider wire format.
struct Shape {
    name: &'static str,
    host: &'static str,
    path: String,
    /// `provider` in audit events.
    provider: &'static str,
    /// The request body carrying `text` as the user's message, with the other
    /// fields a real client sends.
    body: fn(&str) -> Value,
    streams: Vec<StreamRoute>,
}

fn openai_chat_body(text: &str) -> Value {
    json!({
        "model": "gpt-4o",
        "max_tokens": 64,
        "temperature": 0.2,
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        }}],
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": text},
        ],
    })
}

fn openai_responses_body(text: &str) -> Value {
    json!({
        "model": "gpt-4.1",
        "instructions": "Be terse.",
        "max_output_tokens": 64,
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "input": [{"role": "user", "content": [{"type": "input_text", "text": text}]}],
    })
}

fn anthropic_body(text: &str) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "system": "Be terse.",
        "tools": [{"name": "get_weather", "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    })
}

fn bedrock_claude_body(text: &str) -> Value {
    json!({
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 64,
        "temperature": 0.2,
        "system": "Be terse.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    })
}

fn bedrock_converse_body(text: &str) -> Value {
    json!({
        "system": [{"text": "Be terse."}],
        "messages": [{"role": "user", "content": [{"text": text}]}],
        "inferenceConfig": {"maxTokens": 64, "temperature": 0.2, "topP": 0.9},
        "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather", "description": "Weather for a city",
            "inputSchema": {"json": {"type": "object", "properties": {"city": {"type": "string"}}}}}}]},
    })
}

fn gemini_body(text: &str) -> Value {
    json!({
        "systemInstruction": {"parts": [{"text": "Be terse."}]},
        "contents": [{"role": "user", "parts": [{"text": text}]}],
        "generationConfig": {"maxOutputTokens": 64, "temperature": 0.2},
        "tools": [{"functionDeclarations": [{"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}],
    })
}

fn shapes() -> Vec<Shape> {
    let body_stream = |path: &str, cut| vec![StreamRoute { path: path.to_owned(), in_body: true, cut }];
    let path_stream = |path: String, cut| StreamRoute { path, in_body: false, cut };
    vec![
        Shape {
            name: "openai-chat",
            host: OPENAI,
            path: "/v1/chat/completions".into(),
            provider: "openai_chat",
            body: openai_chat_body,
            streams: body_stream("/v1/chat/completions", Cut::OpenAiChat),
        },
        Shape {
            name: "openai-responses",
            host: OPENAI,
            path: "/v1/responses".into(),
            provider: "openai_responses",
            body: openai_responses_body,
            streams: body_stream("/v1/responses", Cut::Responses),
        },
        Shape {
            name: "anthropic",
            host: ANTHROPIC,
            path: "/v1/messages".into(),
            provider: "anthropic",
            body: anthropic_body,
            streams: body_stream("/v1/messages", Cut::Anthropic),
        },
        Shape {
            name: "bedrock-invoke",
            host: BEDROCK,
            path: format!("{CLAUDE_ON_BEDROCK}/invoke"),
            // Claude bodies on Bedrock are Anthropic Messages bodies.
            provider: "anthropic",
            body: bedrock_claude_body,
            streams: vec![path_stream(format!("{CLAUDE_ON_BEDROCK}/invoke-with-response-stream"), Cut::EventStream)],
        },
        Shape {
            name: "bedrock-converse",
            host: BEDROCK,
            path: format!("{NOVA_ON_BEDROCK}/converse"),
            provider: "bedrock_converse",
            body: bedrock_converse_body,
            streams: vec![path_stream(format!("{NOVA_ON_BEDROCK}/converse-stream"), Cut::EventStream)],
        },
        Shape {
            name: "gemini",
            host: GEMINI,
            path: format!("{GEMINI_MODEL}:generateContent"),
            provider: "gemini",
            body: gemini_body,
            streams: vec![
                path_stream(format!("{GEMINI_MODEL}:streamGenerateContent?alt=sse"), Cut::GeminiSse),
                path_stream(format!("{GEMINI_MODEL}:streamGenerateContent"), Cut::GeminiArray),
            ],
        },
    ]
}

/// `shape`'s body for `text`, asking for a stream when `route` says so.
fn body_for(shape: &Shape, route: Option<&StreamRoute>, text: &str) -> Vec<u8> {
    let mut body = (shape.body)(text);
    if route.is_some_and(|r| r.in_body)
        && let Some(obj) = body.as_object_mut()
    {
        obj.insert("stream".into(), Value::Bool(true));
    }
    serde_json::to_vec(&body).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// Set-up

struct World {
    pki: TestPki,
    provider: FakeProvider,
    proxy: InProcessProxy,
    audit: std::path::PathBuf,
    _reload: watch::Sender<Arc<Guardrails>>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start() -> Result<World> {
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let metrics = Arc::new(Metrics::new());
        let audit = dir.path().join("audit.jsonl");
        let guardrails = Guardrails {
            engine: Some(Arc::new(Engine::builtin()?)),
            akto: None,
            cfg: GuardrailsConfig { stream_mode: StreamMode::Enforce, ..Default::default() },
            keys: None,
        };
        let (reload, current) = watch::channel(Arc::new(guardrails));
        let pipeline = Pipeline::new(current, AuditLog::start(Some(audit.clone()), Arc::clone(&metrics)), metrics);
        let proxy = InProcessProxy::start(
            provider.local_addr(),
            &upstream_ca,
            DomainsConfig::default(),
            Some(Arc::new(pipeline)),
        )
        .await?;
        Ok(World { pki, provider, proxy, audit, _reload: reload, _dir: dir })
    }

    /// A client through the proxy, trusting only the proxy's CA.
    fn via_proxy(&self, host: &str, http2: bool) -> Result<reqwest::Client> {
        client_for(host, self.proxy.addr, &[&self.proxy.ca_pem], http2)
    }

    /// A client straight to the fake provider, for the reference answer.
    fn direct(&self, host: &str, http2: bool) -> Result<reqwest::Client> {
        client_for(host, self.provider.local_addr(), &[&self.pki.ca_pem()], http2)
    }
}

/// A response as the client saw it.
struct Got {
    status: u16,
    content_type: String,
    decision: Option<String>,
    body: Bytes,
}

async fn post(
    client: &reqwest::Client,
    host: &str,
    path: &str,
    body: &[u8],
    request_id: &str,
    reply: Option<&str>,
) -> Result<Got> {
    let mut req = client
        .post(format!("https://{host}{path}"))
        .header("content-type", "application/json")
        .header("x-request-id", request_id)
        .body(body.to_vec());
    if let Some(reply) = reply {
        req = req.header("x-fake-reply", reply);
    }
    let resp = req.send().await.with_context(|| format!("POST {path}"))?;
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let (status, content_type, decision) =
        (resp.status().as_u16(), header("content-type").unwrap_or_default(), header("x-akto-guardrails-decision"));
    let body = resp.bytes().await.with_context(|| format!("body of POST {path}"))?;
    Ok(Got { status, content_type, decision, body })
}

fn protocol(http2: bool) -> &'static str {
    if http2 { "h2" } else { "h1" }
}

/// Runs `check` for every shape over both protocols; returns the failures.
async fn for_each_shape<F, Fut>(mut check: F) -> Vec<String>
where
    F: FnMut(Shape, bool) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut failures = Vec::new();
    for http2 in [false, true] {
        for shape in shapes() {
            let name = format!("{} over {}", shape.name, protocol(http2));
            if let Err(e) = check(shape, http2).await {
                failures.push(format!("{name}: {e:#}"));
            }
        }
    }
    failures
}

// ---------------------------------------------------------------------------
// Audit

/// Per request id: the provider named, and the (direction, decision) of
/// each event in order.
type Expected = BTreeMap<String, (&'static str, Vec<(&'static str, &'static str)>)>;

/// Waits until the audit file holds `n` events (and no more arrive), then
/// returns them with the raw text.
async fn audit_events(path: &std::path::Path, n: usize) -> Result<(Vec<Value>, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    // Only complete lines: the writer may be mid-write when we read.
    let complete = |text: &str| -> Vec<String> {
        text.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| l.trim_end().to_owned()).collect()
    };
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if complete(&text).len() >= n || tokio::time::Instant::now() >= deadline {
            // A little longer, so that an extra event would show.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let events = complete(&text).iter().map(|l| serde_json::from_str(l)).collect::<Result<Vec<Value>, _>>()?;
            return Ok((events, text));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every request id has exactly the expected (direction, decision) events,
/// in order, naming `provider`; nothing else is recorded, and no event
/// holds prompt text or any of `secrets`.
async fn check_audit(path: &std::path::Path, expected: &Expected, secrets: &[&str]) -> Vec<String> {
    let want: usize = expected.values().map(|(_, events)| events.len()).sum();
    let (events, text) = match audit_events(path, want).await {
        Ok(read) => read,
        Err(e) => return vec![format!("audit file: {e:#}")],
    };
    let mut failures = Vec::new();
    if events.len() != want {
        failures.push(format!("audit: {} events, expected {want}", events.len()));
    }
    let mut seen: BTreeMap<String, Vec<(String, String, String)>> = BTreeMap::new();
    for e in &events {
        let field = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        seen.entry(field("request_id")).or_default().push((field("direction"), field("decision"), field("provider")));
        if e.get("prompt").is_some() {
            failures.push(format!("audit event carries the prompt: {e}"));
        }
    }
    for (id, (provider, want)) in expected {
        let got = seen.remove(id).unwrap_or_default();
        let got_pairs: Vec<(&str, &str)> = got.iter().map(|(d, k, _)| (d.as_str(), k.as_str())).collect();
        if &got_pairs != want {
            failures.push(format!("audit {id}: got {got_pairs:?}, expected {want:?}"));
        }
        if let Some((_, _, p)) = got.iter().find(|(_, _, p)| p != provider) {
            failures.push(format!("audit {id}: provider {p:?}, expected {provider:?}"));
        }
    }
    for id in seen.keys() {
        failures.push(format!("audit: unexpected events for request id {id:?}"));
    }
    for needle in [QUESTION].iter().chain(secrets) {
        if text.contains(needle) {
            failures.push(format!("audit file contains {needle:?}"));
        }
    }
    failures
}

fn report(what: &str, failures: Vec<String>) {
    assert!(failures.is_empty(), "{what}: {} failure(s)\n{}", failures.len(), failures.join("\n"));
}

// ---------------------------------------------------------------------------
// Tests

/// An exchange nothing objects to, plain and streamed, reaches the provider
/// exactly as sent and the client exactly as answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_exchanges_pass_byte_for_byte() -> Result<()> {
    let w = World::start().await?;
    let mut expected = Expected::new();
    let failures = for_each_shape(|shape, http2| {
        let w = &w;
        let mut cases: Vec<(String, Option<StreamRoute>)> = vec![(shape.path.clone(), None)];
        cases.extend(shape.streams.iter().map(|r| (r.path.clone(), Some(r.clone()))));
        for i in 0..cases.len() {
            let id = format!("allow-{}-{}-{i}", shape.name, protocol(http2));
            expected.insert(id, (shape.provider, vec![("request", "allow"), ("response", "allow")]));
        }
        async move {
            for (i, (path, route)) in cases.iter().enumerate() {
                let id = format!("allow-{}-{}-{i}", shape.name, protocol(http2));
                let body = body_for(&shape, route.as_ref(), QUESTION);
                let reply = route.as_ref().map(|_| STREAM_REPLY);
                let direct = post(&w.direct(shape.host, http2)?, shape.host, path, &body, &id, reply).await?;
                ensure!(direct.status == 200, "{path}: the fake answered {}", direct.status);
                let before = w.provider.requests().len();
                let got = post(&w.via_proxy(shape.host, http2)?, shape.host, path, &body, &id, reply).await?;
                let seen = w.provider.requests();
                ensure!(seen.len() == before + 1, "{path}: the provider saw {} requests", seen.len() - before);
                let seen = seen.last().context("request")?;
                ensure!(seen.body == body, "{path}: request body changed:\n{}", String::from_utf8_lossy(&seen.body));
                ensure!(got.status == 200, "{path}: status {}: {}", got.status, String::from_utf8_lossy(&got.body));
                ensure!(got.content_type == direct.content_type, "{path}: content type {:?}", got.content_type);
                ensure!(
                    got.body == direct.body,
                    "{path}: response changed\n got: {:?}\nwant: {:?}",
                    String::from_utf8_lossy(&got.body),
                    String::from_utf8_lossy(&direct.body)
                );
                if route.is_some() {
                    ensure!(got.body.len() > STREAM_REPLY.len(), "{path}: a stream that short is suspicious");
                }
            }
            Ok(())
        }
    })
    .await;
    report("allowed exchanges", failures);
    report("audit", check_audit(&w.audit, &expected, &[]).await);
    Ok(())
}

/// The card number is replaced, and the rest of the body arrives as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_numbers_are_redacted_and_every_other_field_kept() -> Result<()> {
    let w = World::start().await?;
    let text = format!("Please charge my card {CARD} for the order.");
    let mut expected = Expected::new();
    let failures = for_each_shape(|shape, http2| {
        let w = &w;
        let id = format!("redact-{}-{}", shape.name, protocol(http2));
        expected.insert(id.clone(), (shape.provider, vec![("request", "modify"), ("response", "allow")]));
        let text = text.clone();
        async move {
            let body = body_for(&shape, None, &text);
            let before = w.provider.requests().len();
            let got = post(&w.via_proxy(shape.host, http2)?, shape.host, &shape.path, &body, &id, None).await?;
            ensure!(got.status == 200, "status {}: {}", got.status, String::from_utf8_lossy(&got.body));
            let seen = w.provider.requests();
            ensure!(seen.len() == before + 1, "the provider saw {} requests", seen.len() - before);
            let seen = seen.last().context("request")?;
            if let Some(len) = seen.header("content-length") {
                ensure!(len == seen.body.len().to_string(), "content-length {len} for {} bytes", seen.body.len());
            }
            let sent: Value = serde_json::from_slice(&body)?;
            let arrived: Value = seen.json()?;
            let mut changed = Vec::new();
            diff_strings(&sent, &arrived, "$", &mut changed)?;
            ensure!(changed.len() == 1, "expected one changed string, got {changed:?}");
            let (at, before_text, after_text) = &changed[0];
            let (prefix, suffix) = before_text.split_once(CARD).context("the changed string held no card")?;
            ensure!(
                after_text.starts_with(prefix) && after_text.ends_with(suffix),
                "{at}: more than the card changed: {after_text:?}"
            );
            let middle = &after_text[prefix.len()..after_text.len() - suffix.len()];
            ensure!(!middle.contains("1111"), "{at}: card digits left: {after_text:?}");
            Ok(())
        }
    })
    .await;
    report("redaction", failures);
    report("audit", check_audit(&w.audit, &expected, &[CARD]).await);
    Ok(())
}

/// Collects `(path, sent, arrived)` for every string that differs; any
/// other difference (a key, a number, a type, key order) is an error.
fn diff_strings(sent: &Value, arrived: &Value, at: &str, out: &mut Vec<(String, String, String)>) -> Result<()> {
    match (sent, arrived) {
        (Value::Object(a), Value::Object(b)) => {
            let (ka, kb): (Vec<_>, Vec<_>) = (a.keys().collect(), b.keys().collect());
            ensure!(ka == kb, "{at}: keys {kb:?}, sent {ka:?}");
            for (k, v) in a {
                diff_strings(v, &b[k], &format!("{at}.{k}"), out)?;
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            ensure!(a.len() == b.len(), "{at}: {} items, sent {}", b.len(), a.len());
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                diff_strings(x, y, &format!("{at}[{i}]"), out)?;
            }
        }
        (Value::String(a), Value::String(b)) if a != b => out.push((at.to_owned(), a.clone(), b.clone())),
        (a, b) if a != b => bail!("{at}: {b}, sent {a}"),
        _ => {}
    }
    Ok(())
}

/// A private key never reaches the provider: the client gets the seed's 403.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_are_blocked_before_the_provider() -> Result<()> {
    let w = World::start().await?;
    let key = private_key();
    let text = format!("Store this key for me:\n{key}\nThanks.");
    let mut expected = Expected::new();
    let failures = for_each_shape(|shape, http2| {
        let w = &w;
        let id = format!("block-{}-{}", shape.name, protocol(http2));
        expected.insert(id.clone(), (shape.provider, vec![("request", "block")]));
        let (text, key) = (text.clone(), key.clone());
        async move {
            let body = body_for(&shape, None, &text);
            let before = w.provider.requests().len();
            let got = post(&w.via_proxy(shape.host, http2)?, shape.host, &shape.path, &body, &id, None).await?;
            ensure!(got.status == 403, "status {}: {}", got.status, String::from_utf8_lossy(&got.body));
            ensure!(got.decision.as_deref() == Some("blocked"), "decision header {:?}", got.decision);
            let json: Value = serde_json::from_slice(&got.body).context("403 body is not JSON")?;
            let obj = json.as_object().context("403 body is not an object")?;
            ensure!(obj.len() == 1, "403 body has keys {:?}", obj.keys().collect::<Vec<_>>());
            let reason = obj.get("error").and_then(Value::as_str).context("no string `error`")?;
            ensure!(!reason.is_empty(), "empty reason");
            ensure!(!reason.contains("MIIB") && !reason.contains(&key), "the reason quotes the key: {reason}");
            ensure!(w.provider.requests().len() == before, "the provider saw the blocked request");
            Ok(())
        }
    })
    .await;
    report("blocking", failures);
    let key = private_key();
    let key_body = key.lines().nth(1).unwrap_or_default().to_owned();
    report("audit", check_audit(&w.audit, &expected, &[&key, &key_body]).await);
    Ok(())
}

/// A token the model leaks mid-stream cuts the stream with the provider's
/// own error event; no part of the token reaches the client. The token sits
/// in the first inspection window, so nothing was released before the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaked_tokens_cut_streams_with_the_providers_error_event() -> Result<()> {
    leaked_tokens_are_cut(false).await
}

/// As above, after more text than one inspection window, so the start of
/// the answer was released; the token straddles the window boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_straddling_an_inspection_window_do_not_leak_a_prefix() -> Result<()> {
    leaked_tokens_are_cut(true).await
}

async fn leaked_tokens_are_cut(after_window: bool) -> Result<()> {
    let w = World::start().await?;
    let token = github_token();
    let reply = if after_window {
        // 569 characters, then the token across the default 600-character
        // window's end.
        format!("{}Finally, the deploy token is {token} and it expires tomorrow.", FILLER.repeat(20))
    } else {
        format!("Sure. The deploy token is {token} and it expires tomorrow.")
    };
    let mut expected = Expected::new();
    let failures = for_each_shape(|shape, http2| {
        let w = &w;
        let routes: Vec<(String, StreamRoute)> = shape
            .streams
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("leak-{}-{}-{i}", shape.name, protocol(http2)), r.clone()))
            .collect();
        for (id, _) in &routes {
            expected.insert(id.clone(), (shape.provider, vec![("request", "allow"), ("response", "block")]));
        }
        let (reply, token) = (reply.clone(), token.clone());
        async move {
            let mut errors = Vec::new();
            for (id, route) in &routes {
                let body = body_for(&shape, Some(route), QUESTION);
                // Many deltas: keep the gaps short.
                let path = if after_window { with_query(&route.path, "interval_ms=1") } else { route.path.clone() };
                let got = post(&w.via_proxy(shape.host, http2)?, shape.host, &path, &body, id, Some(&reply)).await?;
                if let Err(e) = check_cut(route, &got, &token, after_window) {
                    errors.push(format!("{path}: {:?}: {e:#}", route.cut));
                }
            }
            ensure!(errors.is_empty(), "{}", errors.join("\n    "));
            Ok(())
        }
    })
    .await;
    report("stream cuts", failures);
    report("audit", check_audit(&w.audit, &expected, &[&github_token()]).await);
    Ok(())
}

/// Text a long leaking reply starts with, before the token.
const FILLER: &str = "Paris is lovely in spring. ";

/// `path` with `param` added to its query.
fn with_query(path: &str, param: &str) -> String {
    format!("{path}{}{param}", if path.contains('?') { '&' } else { '?' })
}

/// The client's view of a cut stream: its status and framing kept, the
/// provider's error last, and nothing of the token; with `released`, the
/// text before the token did arrive.
fn check_cut(route: &StreamRoute, got: &Got, token: &str, released: bool) -> Result<()> {
    let raw = String::from_utf8_lossy(&got.body);
    ensure!(got.status == 200, "status {}: {raw}", got.status);
    if released && !matches!(route.cut, Cut::EventStream) {
        ensure!(raw.contains("lovely"), "nothing before the token was released: {raw}");
    }
    // The fake splits the token over several deltas, released in order; the
    // first holds `ghp_`, so its absence means no piece got out.
    let leaked = |text: &str| text.contains(token) || text.contains(&token[..4]);
    match route.cut {
        Cut::OpenAiChat | Cut::Responses | Cut::Anthropic | Cut::GeminiSse => {
            ensure!(got.content_type.starts_with("text/event-stream"), "content type {:?}", got.content_type);
            ensure!(!leaked(&raw), "the token leaked: {raw}");
            let events = parse_sse(&raw);
            let last = events.last().context("no events at all")?;
            match route.cut {
                Cut::OpenAiChat => {
                    ensure!(last.1 == "[DONE]", "does not end with [DONE]: {raw}");
                    let error = events.len().checked_sub(2).and_then(|i| events.get(i)).context("no error event")?;
                    let error: Value = serde_json::from_str(&error.1)?;
                    ensure!(error["error"]["message"].is_string(), "no error before [DONE]: {raw}");
                }
                Cut::Responses => {
                    let error = events.iter().find(|(e, _)| e.as_deref() == Some("error")).context("no error event")?;
                    let data: Value = serde_json::from_str(&error.1)?;
                    ensure!(data["type"] == "error", "error event data: {data}");
                    ensure!(
                        !events.iter().any(|(e, _)| e.as_deref() == Some("response.completed")),
                        "completed after the cut: {raw}"
                    );
                    ensure!(
                        matches!(last.0.as_deref(), Some("error" | "response.failed")),
                        "last event {:?}: {raw}",
                        last.0
                    );
                }
                Cut::Anthropic => {
                    ensure!(last.0.as_deref() == Some("error"), "last event {:?}: {raw}", last.0);
                    let data: Value = serde_json::from_str(&last.1)?;
                    ensure!(data["type"] == "error" && data["error"]["message"].is_string(), "error data: {data}");
                    ensure!(!events.iter().any(|(e, _)| e.as_deref() == Some("message_stop")), "stopped normally");
                }
                _ => {
                    for (_, data) in &events {
                        serde_json::from_str::<Value>(data).with_context(|| format!("chunk is not JSON: {data}"))?;
                    }
                    let data: Value = serde_json::from_str(&last.1)?;
                    ensure!(data["error"]["message"].is_string(), "last chunk is not an error: {data}");
                }
            }
        }
        Cut::GeminiArray => {
            ensure!(!leaked(&raw), "the token leaked: {raw}");
            let whole: Value =
                serde_json::from_slice(&got.body).with_context(|| format!("not one JSON value: {raw}"))?;
            let last = whole.as_array().and_then(|a| a.last()).with_context(|| format!("not a JSON array: {raw}"))?;
            ensure!(last["error"]["message"].is_string(), "last element is not an error: {last}");
        }
        Cut::EventStream => {
            ensure!(got.content_type == "application/vnd.amazon.eventstream", "content type {:?}", got.content_type);
            let mut decoder = Decoder::default();
            let messages = decoder.feed(&got.body).context("client bytes are not event-stream frames")?;
            decoder.finish().context("a partial frame at the end")?;
            let last = messages.last().context("no frames at all")?;
            ensure!(last.message_type() == Some("exception"), "last frame: {:?}", last.headers);
            ensure!(last.exception_type().is_some(), "exception without a type: {:?}", last.headers);
            let data: Value = serde_json::from_slice(&last.payload)?;
            ensure!(data["message"].is_string(), "exception payload: {data}");
            if released {
                ensure!(messages.len() > 1, "nothing before the token was released");
            }
            for m in &messages {
                // Claude chunks carry their JSON base64-encoded: look inside too.
                let payload = String::from_utf8_lossy(&m.payload).into_owned();
                let inner = serde_json::from_str::<Value>(&payload)
                    .ok()
                    .and_then(|v| v["bytes"].as_str().and_then(base64_decode))
                    .unwrap_or_default();
                ensure!(!leaked(&payload) && !leaked(&inner), "the token leaked in a frame: {payload} {inner}");
            }
        }
    }
    Ok(())
}

/// `(event name, data)` of each event. Events end with a blank line in
/// one of the three forms Google's Gemini SDKs split on (`\r\n\r\n`,
/// `\n\n`, `\r\r`): stricter than the SSE spec, which would also take a
/// mixed `\r\n\r`.
fn parse_sse(text: &str) -> Vec<(Option<String>, String)> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = ["\r\n\r\n", "\n\n", "\r\r"].iter().filter_map(|sep| rest.find(sep).map(|i| (i, sep.len()))).min();
        match end {
            Some((i, len)) => {
                blocks.push(&rest[..i]);
                rest = &rest[i + len..];
            }
            None => {
                blocks.push(rest);
                rest = "";
            }
        }
    }
    blocks
        .into_iter()
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.split("\r\n").flat_map(|l| l.split(['\n', '\r'])) {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            (event, data.join("\n"))
        })
        .collect()
}

/// Standard base64 (with padding) to text; `None` when malformed.
fn base64_decode(s: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut nbits = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|&c| c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        bits = bits << 6 | v;
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            out.push((bits >> nbits) as u8);
            bits &= (1 << nbits) - 1;
        }
    }
    String::from_utf8(out).ok()
}

#[test]
fn helpers_decode_what_providers_send() {
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ=").as_deref(), Some("hello world"));
    assert_eq!(base64_decode("!"), None);
    let events = parse_sse("event: a\r\ndata: 1\r\n\r\ndata: {\"x\":2}\n\ndata: 3\r\rdata: 4");
    let data = |d: &str| (None, d.to_owned());
    assert_eq!(events, vec![(Some("a".into()), "1".into()), data("{\"x\":2}"), data("3"), data("4")]);
    // A blank line split between CRLF and LF runs two events together.
    assert_eq!(parse_sse("data: 1\r\n\rdata: 2\n\n"), vec![data("1\n2")]);
    assert!(github_token().len() == 40 && private_key().lines().count() == 3);
}
