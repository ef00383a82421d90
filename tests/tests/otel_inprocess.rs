//! OpenTelemetry export end to end: the in-process proxy with the local
//! guardrails in front of the fake provider, exporting to a test OTLP
//! receiver built on the official protocol definitions
//! (`opentelemetry-proto`, `scripts/otlp_receiver.py`), while the official
//! OpenAI and Anthropic SDKs make plain and streamed calls through it:
//!
//! * each exchange's span carries the GenAI attributes with the values the
//!   fake provider sent (the SDKs report them too): operation, provider,
//!   request and response model, usage, finish reasons, and the time to
//!   first chunk of streams; and ours (workload, decision, an event per
//!   decision);
//! * a blocked call's span says so (status error, decision `block`), and
//!   the provider never saw it;
//! * no span and no log record carries a credential (the raw export is
//!   searched for the API keys), nor the prompt without `audit_prompts`;
//! * a client's `traceparent` is continued (our span is its child) and
//!   forwarded unchanged; without one, none is sent upstream;
//! * the audit events arrive as log records whose bodies are the audit
//!   file's lines;
//! * over gRPC too, with prompt and completion content when
//!   `audit_prompts` is on.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use interceptor::{
    audit::AuditLog,
    config::{GuardrailsConfig, StreamMode},
    guardrails::{
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    proxy::{ProxySettings, hook::Hook},
    telemetry::otlp::{Otlp, OtlpConfig, OtlpCounters, OtlpProtocol},
    testing::provider::{FakeProvider, TestPki},
    workload::Workload,
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::{Value, json};
use tokio::sync::watch;

const RECEIVER: &str = include_str!("../src/scripts/otlp_receiver.py");
const REPLY: &str = "Paris is the capital of France, and its largest city by population.";
const OPENAI_KEY: &str = "sk-otel-openai-0123456789abcdefSECRET";
const ANTHROPIC_KEY: &str = "sk-ant-otel-0123456789abcdefSECRET";
/// A client span the streamed OpenAI call continues.
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// The receiver process; ends when dropped (its standard input closes).
struct Receiver {
    child: Child,
    http: u16,
    grpc: u16,
    records: PathBuf,
    raw: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Result<Receiver> {
        let dir = tempfile::tempdir()?;
        let records = dir.path().join("records.jsonl");
        let raw = dir.path().join("raw.bin");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(RECEIVER)
            .arg(&records)
            .arg(&raw)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the OTLP receiver (python3 with opentelemetry-proto and grpcio)")?;
        let mut line = String::new();
        let stdout = child.stdout.take().context("receiver stdout")?;
        BufReader::new(stdout).read_line(&mut line)?;
        let ports: Value = serde_json::from_str(&line).with_context(|| format!("receiver said {line:?}"))?;
        let port = |k: &str| ports[k].as_u64().and_then(|p| u16::try_from(p).ok()).context("receiver port");
        Ok(Receiver { http: port("http")?, grpc: port("grpc")?, child, records, raw, _dir: dir })
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The spans, once one per request id in `ids` has arrived (20 s at
    /// most; export batches wait half a second).
    async fn spans_of(&self, ids: &[&str]) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Value> = self.records().into_iter().filter(|r| r["signal"] == "traces").collect();
            let missing: Vec<&&str> = ids
                .iter()
                .filter(|id| !spans.iter().any(|s| s["attributes"]["interceptor.request_id"] == **id))
                .collect();
            if missing.is_empty() {
                return Ok(spans);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no span for {missing:?}; got {spans:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The log records, once `count` of them have arrived.
    async fn logs(&self, count: usize) -> Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let logs: Vec<Value> = self.records().into_iter().filter(|r| r["signal"] == "logs").collect();
            if logs.len() >= count {
                return Ok(logs);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{} log records, expected {count}: {logs:#?}", logs.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct World {
    receiver: Receiver,
    provider: FakeProvider,
    proxy: InProcessProxy,
    metrics: Arc<Metrics>,
    audit: PathBuf,
    _reload: watch::Sender<Arc<Guardrails>>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(protocol: OtlpProtocol, audit_prompts: bool) -> Result<World> {
        let receiver = Receiver::start()?;
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let metrics = Arc::new(Metrics::new());
        let audit = dir.path().join("audit.jsonl");
        let port = match protocol {
            OtlpProtocol::Http => receiver.http,
            OtlpProtocol::Grpc => receiver.grpc,
        };
        let cfg = OtlpConfig {
            endpoint: format!("http://127.0.0.1:{port}"),
            protocol,
            logs: true,
            headers: [("x-collector-token".to_string(), "collector-token-not-a-provider-key".to_string())].into(),
            ..OtlpConfig::default()
        };
        let otlp = Otlp::start(&cfg, OtlpCounters::default())?.context("export is on")?;
        let guardrails = Guardrails {
            engine: Some(Arc::new(Engine::builtin()?)),
            akto: None,
            cfg: GuardrailsConfig { stream_mode: StreamMode::Enforce, audit_prompts, ..Default::default() },
            keys: None,
        };
        let (reload, current) = watch::channel(Arc::new(guardrails));
        let log = AuditLog::start(Some(audit.clone()), Arc::clone(&metrics)).with_otlp(Some(Arc::clone(&otlp)));
        let pipeline = Pipeline::new(current, log, Arc::clone(&metrics)).with_otlp(Some(otlp));
        let workload = Workload { pid: 4242, comm: "agent".into(), ..Default::default() };
        let settings = ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
        let hook: Arc<dyn Hook> = Arc::new(pipeline);
        let proxy =
            InProcessProxy::start_hooked_as(provider.local_addr(), &upstream_ca, Some(hook), settings, Some(workload))
                .await?;
        Ok(World { receiver, provider, proxy, metrics, audit, _reload: reload, _dir: dir })
    }

    /// The audit file's lines of `request_id`.
    fn audit_lines(&self, request_id: &str) -> Vec<String> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_ok_and(|e| e["request_id"] == request_id))
            .map(str::to_owned)
            .collect()
    }

    /// The `traceparent` the provider received with `request_id`, if it got
    /// that request.
    fn upstream_traceparent(&self, request_id: &str) -> Option<Option<String>> {
        self.provider
            .requests()
            .into_iter()
            .find(|r| r.header("x-request-id") == Some(request_id))
            .map(|r| r.header("traceparent").map(str::to_owned))
    }
}

fn span<'a>(spans: &'a [Value], request_id: &str) -> &'a Value {
    static NONE: Value = Value::Null;
    spans.iter().find(|s| s["attributes"]["interceptor.request_id"] == request_id).unwrap_or(&NONE)
}

/// OTLP's span kind and status codes.
const KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;

const SDK_SCRIPT: &str = r#"
import json, os, socket
import openai, anthropic

params = json.loads(os.environ["OTEL_SDK_PARAMS"])
resolve = socket.getaddrinfo
def loopback(host, port, *args, **kwargs):
    if host in ("api.openai.com", "api.anthropic.com"):
        host = "127.0.0.1"
    return resolve(host, port, *args, **kwargs)
socket.getaddrinfo = loopback
port, reply = params["port"], params["reply"]
headers = lambda rid: {"x-request-id": rid, "x-fake-reply": reply}
messages = [{"role": "user", "content": "Capital of France?"}]
out = {}

oai = openai.OpenAI(api_key=params["openai_key"], base_url=f"https://api.openai.com:{port}/v1", max_retries=0)
c = oai.chat.completions.create(model="gpt-4o", messages=messages, extra_headers=headers("otel-openai"))
out["otel-openai"] = {"model": c.model, "input": c.usage.prompt_tokens, "output": c.usage.completion_tokens,
                      "finish": [c.choices[0].finish_reason]}

streamed = {"finish": []}
stream = oai.chat.completions.create(model="gpt-4o", messages=messages, stream=True,
    stream_options={"include_usage": True},
    extra_headers={**headers("otel-openai-stream"), "traceparent": params["traceparent"]})
for chunk in stream:
    streamed["model"] = chunk.model
    for choice in chunk.choices:
        if choice.finish_reason:
            streamed["finish"].append(choice.finish_reason)
    if chunk.usage is not None:
        streamed["input"], streamed["output"] = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
out["otel-openai-stream"] = streamed

try:
    oai.chat.completions.create(model="gpt-4o", extra_headers=headers("otel-blocked"),
        messages=[{"role": "user", "content": "deploy with " + params["token"]}])
    out["otel-blocked"] = {"status": 200}
except openai.APIStatusError as e:
    out["otel-blocked"] = {"status": e.status_code}

ant = anthropic.Anthropic(api_key=params["anthropic_key"], base_url=f"https://api.anthropic.com:{port}", max_retries=0)
m = ant.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=messages,
                        extra_headers=headers("otel-anthropic"))
out["otel-anthropic"] = {"model": m.model, "input": m.usage.input_tokens, "output": m.usage.output_tokens,
                         "finish": [m.stop_reason]}
with ant.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=messages,
                         extra_headers=headers("otel-anthropic-stream")) as s:
    m = s.get_final_message()
out["otel-anthropic-stream"] = {"model": m.model, "input": m.usage.input_tokens, "output": m.usage.output_tokens,
                                "finish": [m.stop_reason]}
print(json.dumps(out))
"#;

const SDK_CALLS: [&str; 5] =
    ["otel-openai", "otel-openai-stream", "otel-blocked", "otel-anthropic", "otel-anthropic-stream"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_calls_become_genai_spans_over_otlp_http() -> Result<()> {
    let w = World::start(OtlpProtocol::Http, false).await?;
    let token = format!("ghp_{}", "Zx9Q".repeat(9));
    let params = json!({
        "port": w.proxy.addr.port(), "reply": REPLY, "openai_key": OPENAI_KEY, "anthropic_key": ANTHROPIC_KEY,
        "token": token, "traceparent": format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
    });
    let run = tokio::process::Command::new("python3")
        .args(["-c", SDK_SCRIPT])
        .env("OTEL_SDK_PARAMS", params.to_string())
        .env("SSL_CERT_FILE", &w.proxy.ca_path)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(90), run).await.context("the SDK script timed out")??;
    ensure!(out.status.success(), "SDK script failed: {}", String::from_utf8_lossy(&out.stderr));
    let sdk: Value = serde_json::from_slice(&out.stdout).context("the SDK script's output")?;
    ensure!(sdk["otel-blocked"]["status"] == 403, "the leaked token was not blocked: {sdk}");

    let spans = w.receiver.spans_of(&SDK_CALLS).await?;
    let mut failures = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };
    for (id, provider) in [
        ("otel-openai", "openai"),
        ("otel-openai-stream", "openai"),
        ("otel-anthropic", "anthropic"),
        ("otel-anthropic-stream", "anthropic"),
    ] {
        let s = span(&spans, id);
        let a = &s["attributes"];
        let seen = &sdk[id];
        let requested = if provider == "openai" { "gpt-4o" } else { "claude-sonnet-4-5" };
        check(s["kind"] == KIND_CLIENT, format!("{id}: kind {}", s["kind"]));
        check(s["status"]["code"] != STATUS_ERROR, format!("{id}: status {}", s["status"]));
        check(s["name"] == format!("chat {requested}"), format!("{id}: name {}", s["name"]));
        check(s["scope"] == "interceptor", format!("{id}: scope {}", s["scope"]));
        check(s["resource"]["service.name"] == "interceptor", format!("{id}: resource {}", s["resource"]));
        for (key, expected) in [
            ("gen_ai.operation.name", json!("chat")),
            ("gen_ai.provider.name", json!(provider)),
            ("gen_ai.request.model", json!(requested)),
            ("gen_ai.response.model", seen["model"].clone()),
            ("gen_ai.usage.input_tokens", seen["input"].clone()),
            ("gen_ai.usage.output_tokens", seen["output"].clone()),
            ("gen_ai.response.finish_reasons", seen["finish"].clone()),
            ("interceptor.guardrail.decision", json!("allow")),
            ("interceptor.workload", json!("comm:agent")),
            ("process.pid", json!(4242)),
            ("http.response.status_code", json!(200)),
        ] {
            check(a[key] == expected, format!("{id}: {key} is {}, expected {expected}", a[key]));
        }
        check(a["gen_ai.usage.input_tokens"].as_u64().is_some_and(|n| n > 0), format!("{id}: no usage {a}"));
        let decisions: Vec<&Value> = s["events"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["name"] == "interceptor.guardrail.decision")
            .collect();
        let directions: Vec<&Value> = decisions.iter().map(|e| &e["attributes"]["direction"]).collect();
        check(directions == [&json!("request"), &json!("response")], format!("{id}: decision events {decisions:?}"));
        check(a["interceptor.upstream.latency_ms"].as_f64().is_some(), format!("{id}: no upstream latency {a}"));
        check(a["interceptor.guardrail.latency_ms"].as_f64().is_some(), format!("{id}: no guardrail latency {a}"));
        let streamed = id.ends_with("-stream");
        let ttft = a["gen_ai.response.time_to_first_chunk"].as_f64();
        check(ttft.is_some() == streamed, format!("{id}: time to first chunk {ttft:?}"));
        check(a.get("gen_ai.input.messages").is_none(), format!("{id}: prompt exported without audit_prompts"));
    }
    // The client's trace is continued, its header forwarded unchanged; no
    // other request gets one.
    let continued = span(&spans, "otel-openai-stream");
    check(continued["trace_id"] == CLIENT_TRACE, format!("trace not continued: {}", continued["trace_id"]));
    check(continued["parent_span_id"] == CLIENT_SPAN, format!("parent: {}", continued["parent_span_id"]));
    let sent = w.upstream_traceparent("otel-openai-stream");
    check(sent == Some(Some(format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))), format!("forwarded {sent:?}"));
    for id in ["otel-openai", "otel-anthropic", "otel-anthropic-stream"] {
        let s = span(&spans, id);
        check(s["parent_span_id"] == "", format!("{id}: a parent was invented: {}", s["parent_span_id"]));
        let sent = w.upstream_traceparent(id);
        check(sent == Some(None), format!("{id}: upstream traceparent {sent:?}"));
    }
    // The blocked call: its span says so, and it never left.
    let blocked = span(&spans, "otel-blocked");
    let a = &blocked["attributes"];
    check(blocked["status"]["code"] == STATUS_ERROR, format!("blocked status {}", blocked["status"]));
    check(a["interceptor.guardrail.decision"] == "block", format!("blocked decision {a}"));
    check(a["error.type"] == "guardrail_blocked", format!("blocked error.type {a}"));
    check(a["interceptor.guardrail.rules"].as_array().is_some_and(|r| !r.is_empty()), format!("blocked rules {a}"));
    let block_event = blocked["events"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["name"] == "interceptor.guardrail.decision" && e["attributes"]["decision"] == "block");
    check(block_event, format!("no block event: {}", blocked["events"]));
    check(w.upstream_traceparent("otel-blocked").is_none(), "the blocked call reached the provider".into());

    // The audit events, as log records: the same JSON as the file's lines.
    let expected: Vec<String> = SDK_CALLS.iter().flat_map(|id| w.audit_lines(id)).collect();
    let logs = w.receiver.logs(expected.len()).await?;
    for line in &expected {
        let found = logs.iter().any(|l| l["body"].as_str() == Some(line) && l["event_name"] == "interceptor.audit");
        check(found, format!("audit line not exported: {line}"));
    }
    // No credential anywhere in the export, nor the blocked prompt.
    let raw = std::fs::read(&w.receiver.raw)?;
    let records = std::fs::read_to_string(&w.receiver.records)?;
    for secret in [OPENAI_KEY, ANTHROPIC_KEY, token.as_str(), "collector-token-not-a-provider-key", "Capital of France"]
    {
        let in_raw = raw.windows(secret.len()).any(|w| w == secret.as_bytes());
        check(!in_raw && !records.contains(secret), format!("the export carries {secret:?}"));
    }
    let dropped = w.metrics.encode();
    check(!dropped.contains("interceptor_otlp_dropped_total{signal=\"traces\"} 1"), "spans dropped".into());
    ensure!(failures.is_empty(), "{}\nspans: {spans:#?}", failures.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_over_grpc_with_content_when_prompts_are_audited() -> Result<()> {
    let w = World::start(OtlpProtocol::Grpc, true).await?;
    let client = client_for("api.openai.com", w.proxy.addr, &[&w.proxy.ca_pem], false)?;
    for (id, stream) in [("grpc-plain", false), ("grpc-stream", true)] {
        let body = json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "Capital of France?"}]});
        let resp = client
            .post("https://api.openai.com/v1/chat/completions")
            .header("authorization", format!("Bearer {OPENAI_KEY}"))
            .header("x-request-id", id)
            .header("x-fake-reply", REPLY)
            .body(body.to_string())
            .send()
            .await?;
        ensure!(resp.status().is_success(), "{id}: {}", resp.status());
        resp.bytes().await?;
    }
    let spans = w.receiver.spans_of(&["grpc-plain", "grpc-stream"]).await?;
    for id in ["grpc-plain", "grpc-stream"] {
        let s = span(&spans, id);
        let a = &s["attributes"];
        ensure!(s["transport"] == "grpc", "{id}: {s}");
        ensure!(a["gen_ai.provider.name"] == "openai" && a["gen_ai.request.model"] == "gpt-4o", "{id}: {a}");
        ensure!(a["gen_ai.response.finish_reasons"] == json!(["stop"]), "{id}: {a}");
        let input = a["gen_ai.input.messages"].as_str().unwrap_or_default();
        ensure!(input.contains("Capital of France?"), "{id}: input messages {input:?}");
        let output = a["gen_ai.output.messages"].as_str().unwrap_or_default();
        ensure!(output.contains("Paris is the capital"), "{id}: output messages {output:?}");
    }
    let logs = w.receiver.logs(4).await?;
    ensure!(logs.iter().all(|l| l["transport"] == "grpc"), "{logs:?}");
    let raw = std::fs::read(&w.receiver.raw)?;
    ensure!(!raw.windows(OPENAI_KEY.len()).any(|w| w == OPENAI_KEY.as_bytes()), "the export carries the key");
    Ok(())
}

/// What a client or a provider writes where an identifier goes (the
/// request's `model`, the answer's `id`) is text like any other: a
/// credential put there is caught (the request never leaves, the answer
/// never reaches the client, streamed or not), and is copied neither into
/// a span nor into an audit event, whether or not the exchange was blocked
/// for it. Nor is a token sent as the request id recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_in_an_identifier_reaches_no_span_and_no_audit_event() -> Result<()> {
    let w = World::start(OtlpProtocol::Http, false).await?;
    let token = format!("ghp_{}", "Qk7W".repeat(9));
    let client = client_for("api.openai.com", w.proxy.addr, &[&w.proxy.ca_pem], false)?;
    let post = |url: &str, id: &str| {
        client
            .post(url)
            .header("authorization", format!("Bearer {OPENAI_KEY}"))
            .header("x-request-id", id)
            .header("x-fake-reply", REPLY)
    };
    let chat = |id: &str, model: &str, stream: bool| {
        let body =
            json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Capital of France?"}]});
        post("https://api.openai.com/v1/chat/completions", id).body(body.to_string())
    };
    let mut answers = Vec::new();
    // The client's model is the token: blocked before the provider.
    let resp = chat("id-in-model", &token, false).send().await?;
    ensure!(resp.status() == 403, "a token as the model was let through: {}", resp.status());
    answers.push(resp.text().await?);
    // The same, its first letter escaped in the JSON.
    let escaped = format!(
        r#"{{"model": "\u{:04x}{}", "messages": [{{"role": "user", "content": "Capital of France?"}}]}}"#,
        u32::from(token.as_bytes()[0]),
        &token[1..]
    );
    let resp = post("https://api.openai.com/v1/chat/completions", "id-in-model-escaped").body(escaped).send().await?;
    ensure!(resp.status() == 403, "an escaped token as the model was let through: {}", resp.status());
    ensure!(w.upstream_traceparent("id-in-model-escaped").is_none(), "the escaped token reached the provider");
    // The provider's answer id is the token, whole and streamed.
    for (id, stream) in [("id-in-answer", false), ("id-in-stream", true)] {
        let resp = chat(id, "gpt-4o", stream).header("x-fake-id", &token).send().await?;
        answers.push(resp.text().await?);
    }
    // The client's request id is the token: the exchange gets an id of
    // its own (found by its model).
    let resp = chat(&token, "gpt-4o-mini", false).send().await?;
    ensure!(resp.status().is_success(), "a token as the request id: {}", resp.status());
    answers.push(resp.text().await?);
    // The token in the URL, as a query value and as a path segment: the
    // URL is not guardrail text, but it is not recorded as sent.
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Capital of France?"}]});
    for (id, url) in [
        ("id-in-query", format!("https://api.openai.com/v1/chat/completions?ref={token}")),
        ("id-in-path", format!("https://api.openai.com/v1/chat/completions/{token}")),
    ] {
        post(&url, id).body(body.to_string()).send().await?.text().await?;
    }
    let ids = ["id-in-model", "id-in-answer", "id-in-stream", "id-in-query", "id-in-path"];
    let mut spans = w.receiver.spans_of(&ids).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !spans.iter().any(|s| s["attributes"]["gen_ai.request.model"] == "gpt-4o-mini") {
        ensure!(tokio::time::Instant::now() < deadline, "no span for the request with the token as its id: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        spans = w.receiver.records().into_iter().filter(|r| r["signal"] == "traces").collect();
    }
    ensure!(w.upstream_traceparent("id-in-model").is_none(), "the token reached the provider as the model");
    let audit = std::fs::read_to_string(&w.audit)?;
    for id in ids {
        ensure!(!w.audit_lines(id).is_empty(), "{id}: no audit event in {audit}");
    }
    let logs = w.receiver.logs(w.audit_lines("id-in-model").len()).await?;
    let raw = std::fs::read(&w.receiver.raw)?;
    let records = std::fs::read_to_string(&w.receiver.records)?;
    let mut leaks = Vec::new();
    if raw.windows(token.len()).any(|w| w == token.as_bytes()) || records.contains(&token) {
        leaks.push(format!("the export: {spans:#?}\n{logs:#?}"));
    }
    if audit.contains(&token) {
        leaks.push(format!("the audit file: {audit}"));
    }
    for (id, answer) in ids[..3].iter().zip(&answers) {
        if answer.contains(&token) {
            leaks.push(format!("the client's answer to {id}: {answer}"));
        }
    }
    ensure!(leaks.is_empty(), "the token is in {}", leaks.join("\n"));
    Ok(())
}
