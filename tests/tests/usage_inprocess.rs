//! Usage accounting end to end: the in-process proxy with the local
//! guardrails in front of the fake provider, for OpenAI Chat Completions,
//! OpenAI Responses, Anthropic Messages, Claude on Bedrock, Bedrock Converse
//! and Gemini, whole answers and streams (streams both monitored and
//! enforced):
//!
//! * each answer's audit event carries, whether the answer took the
//!   allowed path's borrowed walk or the full path (with
//!   `guardrails.audit_prompts`, every body is parsed), the usage the fake provider reported
//!   (a quarter of the request's and of the reply's bytes);
//! * an OpenAI chat stream reports usage only when the client asked for it
//!   (`stream_options.include_usage`); otherwise it is estimated from the
//!   streamed text, and says so;
//! * `interceptor_tokens_total` adds up exactly the audit events' usage,
//!   per workload, provider and model.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Context, Result, ensure};
use interceptor::{
    audit::AuditLog,
    config::{GuardrailsConfig, StreamMode},
    guardrails::{
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    proxy::{ProxySettings, hook::Hook},
    testing::provider::{FakeProvider, TestPki},
    workload::Workload,
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

/// What the fake model answers: several stream deltas long.
const REPLY: &str = "Paris is the capital of France, and its largest city by population.";

/// One exchange: where it goes and what it sends.
struct Case {
    name: &'static str,
    host: &'static str,
    path: String,
    body: Value,
    /// What the fake provider reports (false: an OpenAI chat stream the
    /// client did not ask usage of).
    reported: bool,
}

fn cases() -> Vec<Case> {
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Capital of France?"}]});
    let mut chat_stream = chat.clone();
    chat_stream["stream"] = json!(true);
    let mut chat_stream_usage = chat_stream.clone();
    chat_stream_usage["stream_options"] = json!({"include_usage": true});
    let responses = json!({"model": "gpt-4.1", "input": "Capital of France?"});
    let mut responses_stream = responses.clone();
    responses_stream["stream"] = json!(true);
    let messages = json!({"model": "claude-sonnet-4-5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Capital of France?"}]});
    let mut messages_stream = messages.clone();
    messages_stream["stream"] = json!(true);
    let invoke = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64,
        "messages": [{"role": "user", "content": "Capital of France?"}]});
    let converse = json!({"messages": [{"role": "user", "content": [{"text": "Capital of France?"}]}]});
    let gemini = json!({"contents": [{"role": "user", "parts": [{"text": "Capital of France?"}]}]});
    let case = |name, host, path: String, body: &Value| Case { name, host, path, body: body.clone(), reported: true };
    vec![
        case("openai chat", OPENAI, "/v1/chat/completions".into(), &chat),
        case("openai chat stream with usage", OPENAI, "/v1/chat/completions".into(), &chat_stream_usage),
        Case { reported: false, ..case("openai chat stream", OPENAI, "/v1/chat/completions".into(), &chat_stream) },
        case("openai responses", OPENAI, "/v1/responses".into(), &responses),
        case("openai responses stream", OPENAI, "/v1/responses".into(), &responses_stream),
        case("anthropic", ANTHROPIC, "/v1/messages".into(), &messages),
        case("anthropic stream", ANTHROPIC, "/v1/messages".into(), &messages_stream),
        case("claude on bedrock", BEDROCK, format!("{CLAUDE_ON_BEDROCK}/invoke"), &invoke),
        case("claude on bedrock stream", BEDROCK, format!("{CLAUDE_ON_BEDROCK}/invoke-with-response-stream"), &invoke),
        case("bedrock converse", BEDROCK, format!("{NOVA_ON_BEDROCK}/converse"), &converse),
        case("bedrock converse stream", BEDROCK, format!("{NOVA_ON_BEDROCK}/converse-stream"), &converse),
        case("gemini", GEMINI, format!("{GEMINI_MODEL}:generateContent"), &gemini),
        case("gemini sse stream", GEMINI, format!("{GEMINI_MODEL}:streamGenerateContent?alt=sse"), &gemini),
        case("gemini array stream", GEMINI, format!("{GEMINI_MODEL}:streamGenerateContent"), &gemini),
    ]
}

struct World {
    pki: TestPki,
    provider: FakeProvider,
    proxy: InProcessProxy,
    metrics: Arc<Metrics>,
    audit: std::path::PathBuf,
    _reload: watch::Sender<Arc<Guardrails>>,
    _dir: tempfile::TempDir,
}

impl World {
    async fn start(stream_mode: StreamMode, audit_prompts: bool) -> Result<World> {
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let metrics = Arc::new(Metrics::new());
        let audit = dir.path().join("audit.jsonl");
        let guardrails = Guardrails {
            engine: Some(Arc::new(Engine::builtin()?)),
            akto: None,
            cfg: GuardrailsConfig { stream_mode, audit_prompts, ..Default::default() },
            keys: None,
        };
        let (reload, current) = watch::channel(Arc::new(guardrails));
        let log = AuditLog::start(Some(audit.clone()), Arc::clone(&metrics));
        let pipeline = Pipeline::new(current, log, Arc::clone(&metrics));
        let workload = Workload { pid: 4242, comm: "agent".into(), ..Default::default() };
        let settings = ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
        let hook: Arc<dyn Hook> = Arc::new(pipeline);
        let proxy =
            InProcessProxy::start_hooked_as(provider.local_addr(), &upstream_ca, Some(hook), settings, Some(workload))
                .await?;
        Ok(World { pki, provider, proxy, metrics, audit, _reload: reload, _dir: dir })
    }
}

/// The response event of `request_id`, once the audit file has it.
async fn response_event(path: &std::path::Path, request_id: &str) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["request_id"] == request_id && e["direction"] == "response");
        if let Some(event) = found {
            return Ok(event);
        }
        ensure!(tokio::time::Instant::now() < deadline, "no response event for {request_id}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the sample `name{labels}` in the exposition, 0 if absent.
fn sample(exposition: &str, series: &str) -> u64 {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

async fn usage_is_accounted(stream_mode: StreamMode, audit_prompts: bool) -> Result<()> {
    let w = World::start(stream_mode, audit_prompts).await?;
    let mut failures = Vec::new();
    // (provider, model, kind) → tokens, from the audit events.
    let mut totals: BTreeMap<(String, String, &str), u64> = BTreeMap::new();
    for (i, case) in cases().into_iter().enumerate() {
        let request_id = format!("usage-{i}");
        let body = serde_json::to_vec(&case.body)?;
        let client = client_for(case.host, w.proxy.addr, &[&w.proxy.ca_pem], false)?;
        let resp = client
            .post(format!("https://{}{}", case.host, case.path))
            .header("content-type", "application/json")
            .header("x-request-id", &request_id)
            .header("x-fake-reply", REPLY)
            .body(body.clone())
            .send()
            .await
            .with_context(|| case.name)?;
        ensure!(resp.status().is_success(), "{}: status {}", case.name, resp.status());
        let answer = resp.bytes().await?;
        // The client got the provider's answer unchanged.
        let direct = client_for(case.host, w.provider.local_addr(), &[&w.pki.ca_pem()], false)?;
        let reference = direct
            .post(format!("https://{}{}", case.host, case.path))
            .header("content-type", "application/json")
            .header("x-fake-reply", REPLY)
            .body(body.clone())
            .send()
            .await?
            .bytes()
            .await?;
        if answer != reference {
            failures.push(format!("{}: the answer changed on the way", case.name));
        }
        let event = response_event(&w.audit, &request_id).await?;
        if event["decision"] != "allow" {
            failures.push(format!("{}: decision {}", case.name, event["decision"]));
        }
        let usage = &event["usage"];
        let expected = if case.reported {
            json!({"input_tokens": body.len() / 4, "output_tokens": REPLY.len() / 4, "estimated": false})
        } else {
            // The streamed text: the reply's words, each followed by a space.
            json!({"input_tokens": 0, "output_tokens": (REPLY.len() + 1).div_ceil(4), "estimated": true})
        };
        if *usage != expected {
            failures.push(format!("{}: usage {usage}, expected {expected}", case.name));
            continue;
        }
        let provider = event["provider"].as_str().unwrap_or_default().to_owned();
        let model = event["model"].as_str().unwrap_or("unknown").to_owned();
        for kind in ["input", "output"] {
            let tokens = usage[format!("{kind}_tokens")].as_u64().unwrap_or_default();
            *totals.entry((provider.clone(), model.clone(), kind)).or_default() += tokens;
        }
    }
    // The counters add up exactly what the audit events say.
    let exposition = w.metrics.encode();
    for ((provider, model, kind), tokens) in &totals {
        let series = format!(
            r#"interceptor_tokens_total{{workload="comm:agent",provider="{provider}",model="{model}",kind="{kind}"}}"#
        );
        let counted = sample(&exposition, &series);
        if counted != *tokens {
            failures.push(format!("{series} is {counted}, the audit events say {tokens}"));
        }
    }
    ensure!(totals.len() >= 12, "too few series: {totals:?}");
    ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_accounted_with_streams_enforced() -> Result<()> {
    usage_is_accounted(StreamMode::Enforce, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_accounted_with_streams_monitored() -> Result<()> {
    usage_is_accounted(StreamMode::Monitor, false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_is_accounted_on_the_full_path() -> Result<()> {
    usage_is_accounted(StreamMode::Enforce, true).await
}

/// The official SDKs, streaming through the proxy: the usage they report to
/// their caller is the usage the audit events carry and the counters add up
/// (OpenAI's with `stream_options.include_usage`, Anthropic's from
/// `message_start` and `message_delta`).
const SDK_SCRIPT: &str = r#"
import json, os, socket
import openai, anthropic

params = json.loads(os.environ["USAGE_SDK_PARAMS"])
# The provider names resolve to the proxy on loopback, for this process only.
resolve = socket.getaddrinfo
def loopback(host, port, *args, **kwargs):
    if host in ("api.openai.com", "api.anthropic.com"):
        host = "127.0.0.1"
    return resolve(host, port, *args, **kwargs)
socket.getaddrinfo = loopback
port = params["port"]
out = {}

client = openai.OpenAI(api_key="sk-usage-test", base_url=f"https://api.openai.com:{port}/v1", max_retries=0)
stream = client.chat.completions.create(
    model="gpt-4o", messages=[{"role": "user", "content": "Capital of France?"}], stream=True,
    stream_options={"include_usage": True},
    extra_headers={"x-request-id": "sdk-openai", "x-fake-reply": params["reply"]})
usage = None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
out["sdk-openai"] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}

client = anthropic.Anthropic(api_key="sk-ant-usage-test", base_url=f"https://api.anthropic.com:{port}", max_retries=0)
with client.messages.stream(
        model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": "Capital of France?"}],
        extra_headers={"x-request-id": "sdk-anthropic", "x-fake-reply": params["reply"]}) as stream:
    message = stream.get_final_message()
out["sdk-anthropic"] = {"input_tokens": message.usage.input_tokens, "output_tokens": message.usage.output_tokens}
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_sdks_report_is_the_usage_accounted() -> Result<()> {
    let w = World::start(StreamMode::Enforce, false).await?;
    let params = json!({"port": w.proxy.addr.port(), "ca": w.proxy.ca_path, "reply": REPLY});
    let run = tokio::process::Command::new("python3")
        .args(["-c", SDK_SCRIPT])
        .env("USAGE_SDK_PARAMS", params.to_string())
        // The SDKs trust the interceptor's CA through the variable their HTTP clients read.
        .env("SSL_CERT_FILE", &w.proxy.ca_path)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await.context("the SDK script timed out")??;
    ensure!(out.status.success(), "SDK script failed: {}", String::from_utf8_lossy(&out.stderr));
    let reported: Value = serde_json::from_slice(&out.stdout).context("the SDK script's output")?;
    let exposition = {
        let mut events = Vec::new();
        for request_id in ["sdk-openai", "sdk-anthropic"] {
            events.push(response_event(&w.audit, request_id).await?);
        }
        for (event, request_id) in events.iter().zip(["sdk-openai", "sdk-anthropic"]) {
            let sdk = &reported[request_id];
            ensure!(sdk["input_tokens"].as_u64().is_some_and(|n| n > 0), "{request_id}: the SDK saw {sdk}");
            let usage = &event["usage"];
            ensure!(usage["estimated"] == false, "{request_id}: {usage}");
            for kind in ["input_tokens", "output_tokens"] {
                ensure!(usage[kind] == sdk[kind], "{request_id}: audit {usage}, the SDK saw {sdk}");
            }
        }
        w.metrics.encode()
    };
    for (provider, model, request_id) in
        [("openai_chat", "gpt-4o", "sdk-openai"), ("anthropic", "claude-sonnet-4-5", "sdk-anthropic")]
    {
        for kind in ["input", "output"] {
            let series = format!(
                r#"interceptor_tokens_total{{workload="comm:agent",provider="{provider}",model="{model}",kind="{kind}"}}"#
            );
            let sdk = reported[request_id][format!("{kind}_tokens")].as_u64().unwrap_or_default();
            ensure!(sample(&exposition, &series) == sdk, "{series}: the SDK saw {sdk}\n{exposition}");
        }
    }
    Ok(())
}
