//! MCP tool calls through the in-process data plane, with the official MCP
//! Python SDK (`mcp`) as both the client and the server: streamable HTTP
//! over TLS to a fake `mcp.example.test` (listed in `mcp.domains_extra`),
//! the built-in policy plus a rule redacting card numbers in tool results,
//! answers as SSE streams and as JSON.
//!
//! * a `tools/call` carrying a private key is answered with a JSON-RPC error
//!   (-32001) in the same session, and the server never receives the key;
//! * a tool result holding a card number reaches the client redacted;
//! * a poisoned tool description is flagged;
//! * a tool definition that changes in a later session is reported (or
//!   refused, with `mcp.tool_changes = "block"`), after a restart too;
//! * a tool denied by the policy's tool list is neither listed nor called;
//! * each tool call is one `mcp_tool_call` audit event.
//!
//! The `direct` tests run the same client and server against each other
//! without the proxy: they show what the server does and logs unguarded, so
//! the guarded tests' assertions mean something.
//!
//! Secrets are built at run time so no secret-shaped literal sits here.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use interceptor::{
    config::Config,
    guardrails::engine::BUILTIN_POLICY,
    testing::{
        clients::ClientEnv,
        mcp::{
            FakeMcpServer, McpServerOptions, McpStep, McpTranscript, REDACT_CARDS_IN_TOOL_RESULTS, mcp_client,
            private_key,
        },
        provider::TestPki,
    },
};
use interceptor_tests::inprocess::InProcessProxy;
use serde_json::{Value, json};

const HOST: &str = "mcp.example.test";
const URL: &str = "https://mcp.example.test/mcp";
/// A Luhn-valid test card number, as the fake server's `lookup_card` returns it.
const CARD: &str = "4111 1111 1111 1111";
/// What the built-in `redact_with` puts in its place.
const REDACTED_CARD: &str = "[REDACTED:credit_card]";
/// JSON-RPC error code of a refusal (the server never saw the request).
const BLOCKED_CODE: i64 = -32001;
/// Bound on one client run, and on waiting for an audit event.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How the server answers POSTs.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Answers {
    /// `text/event-stream` (the SDK's default).
    Sse,
    /// `application/json`.
    Json,
}

impl Answers {
    fn content_type(self) -> &'static str {
        match self {
            Self::Sse => "text/event-stream",
            Self::Json => "application/json",
        }
    }
}

/// The fake server, its certificate and test CA on disk.
struct Server {
    server: FakeMcpServer,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    dir: tempfile::TempDir,
}

async fn server(answers: Answers) -> Result<Server> {
    let pki = TestPki::new(&[HOST], &[])?;
    let dir = tempfile::tempdir()?;
    let ca = pki.write_ca(dir.path())?;
    let (cert, key) = pki.write_server_files(dir.path())?;
    let options =
        McpServerOptions { json_response: answers == Answers::Json, ..McpServerOptions::tls(HOST, cert, key, CARD) };
    let server = FakeMcpServer::start(&options, None).await?;
    Ok(Server { server, ca, dir })
}

/// The server behind the in-process proxy.
struct Guarded {
    server: FakeMcpServer,
    proxy: InProcessProxy,
    audit: PathBuf,
    /// `mcp.pins_file`.
    pins: PathBuf,
    config: Config,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts the server and the proxy with the built-in policy, the card rule
/// and `policy_extra`; `mcp_extra` goes into the `[mcp]` section.
async fn guarded(answers: Answers, policy_extra: &str, mcp_extra: &str) -> Result<Guarded> {
    let Server { server, ca, dir } = server(answers).await?;
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, [BUILTIN_POLICY, REDACT_CARDS_IN_TOOL_RESULTS, policy_extra].concat())?;
    let audit = dir.path().join("audit.jsonl");
    let pins = dir.path().join("mcp-tool-pins.json");
    let config_path = dir.path().join("interceptor.toml");
    let text = format!(
        "[mcp]\ndomains_extra = [{host}]\npins_file = {pins}\n{mcp_extra}\n\n\
         [guardrails]\nbackends = [\"local\"]\npolicy_file = {policy}\naudit_file = {audit}\nstream_mode = \"enforce\"\n",
        host = toml_string(HOST),
        policy = toml_string(&policy.display().to_string()),
        audit = toml_string(&audit.display().to_string()),
        pins = toml_string(&pins.display().to_string()),
    );
    let config = Config::from_toml(&text, &config_path)?;
    config.validate()?;
    let proxy = InProcessProxy::from_config(server.addr(), &ca, config.clone()).await?;
    Ok(Guarded { server, proxy, audit, pins, config, ca, _dir: dir })
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl Guarded {
    /// Stops the proxy, then starts a new one with the same configuration
    /// (the same pins file and audit file), as a restart would.
    async fn restart(self) -> Result<Self> {
        let Guarded { server, proxy, audit, pins, config, ca, _dir } = self;
        ensure!(proxy.shutdown(Duration::from_secs(5)).await, "connections outlived the drain");
        let proxy = InProcessProxy::from_config(server.addr(), &ca, config.clone()).await?;
        Ok(Guarded { server, proxy, audit, pins, config, ca, _dir })
    }

    /// Runs the client through the proxy, trusting only the proxy's CA.
    async fn client(&self, sessions: &[Vec<McpStep>]) -> Result<McpTranscript> {
        let env = ClientEnv::new(&self.proxy.ca_path).with_timeout(TIMEOUT);
        mcp_client(&env, URL, Some(self.proxy.addr), sessions).await
    }
}

/// The audit events so far.
fn audit_events(audit: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    text.lines().filter_map(|line| serde_json::from_str(line).ok()).collect()
}

/// The first audit event `matches` accepts, once it is written.
async fn audit_event(audit: &Path, what: &str, matches: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let events = audit_events(audit);
        if let Some(event) = events.iter().find(|e| matches(e)) {
            return Ok(event.clone());
        }
        ensure!(Instant::now() < deadline, "no audit event {what} in {events:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An MCP field of an audit event: its own, or in its `mcp` object.
fn mcp_field<'a>(event: &'a Value, name: &str) -> &'a Value {
    match event.get(name) {
        Some(value) => value,
        None => &event["mcp"][name],
    }
}

fn is_tool_call(event: &Value, tool: &str) -> bool {
    event["event"] == "mcp_tool_call" && mcp_field(event, "tool") == tool
}

/// Whether an event reports a changed tool definition.
fn reports_change(event: &Value) -> bool {
    event.to_string().contains("tool_definition_changed")
}

fn strings(value: &Value) -> Vec<&str> {
    value.as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default()
}

/// The text blocks of a `call_tool` result line.
fn texts(line: &Value) -> Vec<&str> {
    line["content"].as_array().map(|c| c.iter().filter_map(|b| b["text"].as_str()).collect()).unwrap_or_default()
}

/// The definition named `name` in a `list_tools` result line.
fn tool<'a>(line: &'a Value, name: &str) -> Option<&'a Value> {
    line["tools"].as_array()?.iter().find(|t| t["name"] == name)
}

fn tool_names(line: &Value) -> Vec<&str> {
    line["tools"].as_array().map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect()).unwrap_or_default()
}

/// `tools/call` messages the server received for `tool`.
fn calls_received(server: &FakeMcpServer, tool: &str) -> Result<Vec<Value>> {
    Ok(server.messages()?.into_iter().filter(|m| m["method"] == "tools/call" && m["params"]["name"] == tool).collect())
}

/// Asserts a step's result is the guardrails' JSON-RPC refusal naming `rule`.
fn assert_blocked(line: &Value, rule: &str) {
    let error = &line["error"];
    assert_eq!(error["code"], BLOCKED_CODE, "{line:#}");
    let message = error["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("Blocked by guardrails"), "{line:#}");
    assert_eq!(error["data"]["decision"], "block", "{line:#}");
    assert_eq!(error["data"]["rule"], rule, "{line:#}");
}

macro_rules! in_both_modes {
    ($($name:ident),* $(,)?) => {
        mod sse {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Answers::Sse).await
                }
            )*
        }
        mod json {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    super::$name(super::Answers::Json).await
                }
            )*
        }
    };
}

in_both_modes!(
    direct_sdk_client_and_server,
    private_key_in_tool_call_is_answered_with_jsonrpc_error,
    card_number_in_tool_result_is_redacted,
    poisoned_tool_description_is_flagged,
    changed_tool_definition_is_reported,
    changed_tool_definition_is_refused_when_configured,
    tool_pins_survive_a_restart,
    denied_tool_is_hidden_and_refused,
    tool_call_is_audited,
);

/// Without the proxy: the client and the server agree on everything the
/// guarded tests look at, and the server's log holds what it received.
async fn direct_sdk_client_and_server(answers: Answers) -> Result<()> {
    let Server { server, ca, dir: _dir } = server(answers).await?;
    let env = ClientEnv::new(&ca).with_timeout(TIMEOUT);
    let key = private_key();
    let first = vec![
        McpStep::ListTools,
        McpStep::call("echo", json!({"text": "hello"})),
        McpStep::call("lookup_card", json!({})),
        McpStep::call("weather", json!({"city": "Paris", "notes": key})),
    ];
    let run = mcp_client(&env, URL, Some(server.addr()), &[first]).await?;
    let init = &run.session(0)[0];
    assert_eq!(init["server"], "fake-mcp", "{init:#}");
    assert!(init["session_id"].as_str().is_some_and(|s| !s.is_empty()), "{init:#}");

    let listed = run.step(0, 0)?;
    assert_eq!(tool_names(listed), ["echo", "lookup_card", "weather", "save_note"], "{listed:#}");
    let weather = tool(listed, "weather").context("weather")?;
    assert!(weather["description"].as_str().unwrap_or_default().contains("<IMPORTANT>"), "{weather:#}");
    assert_eq!(texts(run.step(0, 1)?), ["hello"]);
    assert_eq!(texts(run.step(0, 2)?), [format!("Card on file: {CARD}, expires 12/30.")]);
    assert_eq!(texts(run.step(0, 3)?), ["Sunny in Paris, 21 C."]);

    // What the guarded tests assert the server never sees, it sees here.
    let received = calls_received(&server, "weather")?;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["params"]["arguments"]["notes"], key.as_str());
    assert!(server.requests()?.iter().all(|r| r.host.as_deref() == Some(HOST)));
    // The mode under test is the one the server answered in.
    let answer = server.responses()?.into_iter().find(|r| r.body.contains("\"tools/call\"")).context("answer")?;
    assert_eq!(answer.content_type.as_deref().map(|c| c.split(';').next().unwrap_or(c)), Some(answers.content_type()));

    let heads: Vec<&Value> = run.http().into_iter().filter(|h| h["rpc"] == "tools/call").collect();
    assert_eq!(heads.len(), 3, "{heads:#?}");
    assert!(heads.iter().all(|h| h["status"] == 200 && h["decision"].is_null()), "{heads:#?}");

    // A later session lists the changed definition.
    server.set_revision(2)?;
    let second = mcp_client(&env, URL, Some(server.addr()), &[vec![McpStep::ListTools]]).await?;
    let before = tool(listed, "save_note").context("save_note before")?;
    let after = tool(second.step(0, 0)?, "save_note").context("save_note after")?;
    assert_ne!(before, after);
    assert!(after["inputSchema"]["properties"]["team"].is_object(), "{after:#}");
    Ok(())
}

/// (a) The key in `tools/call` arguments is refused with a JSON-RPC error
/// in the same session; the session goes on; the server never sees the key.
async fn private_key_in_tool_call_is_answered_with_jsonrpc_error(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", "").await?;
    let key = private_key();
    let steps = vec![
        McpStep::ListTools,
        // What a model obeying the poisoned description sends.
        McpStep::call("weather", json!({"city": "Paris", "notes": key})),
        McpStep::call("echo", json!({"text": format!("deploy with this key:\n{key}")})),
        McpStep::call("echo", json!({"text": "still here"})),
    ];
    let run = g.client(&[steps]).await?;
    assert_blocked(run.step(0, 1)?, "block-credentials-in-requests");
    assert_blocked(run.step(0, 2)?, "block-credentials-in-requests");
    assert_eq!(texts(run.step(0, 3)?), ["still here"], "the session must go on");
    // The refusals are ordinary JSON answers, marked as blocks.
    let calls: Vec<&Value> = run.http().into_iter().filter(|h| h["rpc"] == "tools/call").collect();
    let heads: Vec<(&Value, &str, &Value)> = calls
        .iter()
        .map(|h| {
            (
                &h["status"],
                h["content_type"].as_str().unwrap_or_default().split(';').next().unwrap_or_default(),
                &h["decision"],
            )
        })
        .collect();
    assert_eq!(heads.len(), 3, "{calls:#?}");
    assert_eq!(heads[0], (&json!(200), "application/json", &json!("blocked")), "{calls:#?}");
    assert_eq!(heads[1], (&json!(200), "application/json", &json!("blocked")), "{calls:#?}");
    assert_eq!(heads[2].2, &Value::Null, "{calls:#?}");

    let log = g.server.request_log();
    let key_line = key.lines().nth(1).context("key body")?;
    assert!(!log.contains(key_line) && !log.contains("PRIVATE KEY"), "the server saw the key: {log}");
    assert!(calls_received(&g.server, "weather")?.is_empty());
    assert_eq!(calls_received(&g.server, "echo")?.len(), 1);

    let event = audit_event(&g.audit, "for the blocked weather call", |e| {
        is_tool_call(e, "weather") && e["decision"] == "block"
    })
    .await?;
    assert!(strings(&event["rules"]).contains(&"block-credentials-in-requests"), "{event:#}");
    let audit = std::fs::read_to_string(&g.audit)?;
    assert!(!audit.contains(key_line), "the audit holds the key: {audit}");
    Ok(())
}

/// (b) A tool result holding a card number reaches the client redacted,
/// everything else in it unchanged.
async fn card_number_in_tool_result_is_redacted(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", "").await?;
    let run = g
        .client(&[vec![McpStep::call("lookup_card", json!({})), McpStep::call("echo", json!({"text": "ok"}))]])
        .await?;
    let result = run.step(0, 0)?;
    assert_eq!(result["is_error"], false, "{result:#}");
    assert_eq!(texts(result), [format!("Card on file: {REDACTED_CARD}, expires 12/30.")], "{result:#}");
    assert_eq!(texts(run.step(0, 1)?), ["ok"]);

    let event = audit_event(&g.audit, "for the redacted result", |e| {
        strings(&e["rules"]).contains(&"redact-cards-in-tool-results")
    })
    .await?;
    assert_eq!(event["direction"], "response", "{event:#}");
    assert_eq!(event["decision"], "modify", "{event:#}");
    let audit = std::fs::read_to_string(&g.audit)?;
    assert!(!audit.contains(CARD), "the audit holds the card: {audit}");
    Ok(())
}

/// (c) The `<IMPORTANT>` block in `weather`'s description is flagged by the
/// built-in rule; the list still reaches the client (the rule alerts).
async fn poisoned_tool_description_is_flagged(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", "").await?;
    let run = g.client(&[vec![McpStep::ListTools]]).await?;
    let listed = run.step(0, 0)?;
    assert_eq!(tool_names(listed), ["echo", "lookup_card", "weather", "save_note"], "{listed:#}");

    let event = audit_event(&g.audit, "flagging the poisoned description", |e| {
        strings(&e["rules"]).contains(&"flag-poisoned-tool-definitions")
    })
    .await?;
    assert_eq!(event["decision"], "alert", "{event:#}");
    assert_eq!(event["direction"], "response", "{event:#}");
    assert!(strings(&event["detectors"]).contains(&"hidden_instructions"), "{event:#}");
    Ok(())
}

/// The `[mcp]` line that makes a changed definition refuse the list.
const BLOCK_TOOL_CHANGES: &str = "tool_changes = \"block\"";

/// (d) The first session pins the definitions; a second session whose
/// `save_note` changed is reported, and (alert, the default) still served.
async fn changed_tool_definition_is_reported(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", "").await?;
    let first = g.client(&[vec![McpStep::ListTools, McpStep::call("echo", json!({"text": "one"}))]]).await?;
    assert!(tool(first.step(0, 0)?, "save_note").is_some());
    // The call's event comes after the list was checked.
    audit_event(&g.audit, "for the first session's call", |e| is_tool_call(e, "echo")).await?;
    let events = audit_events(&g.audit);
    assert!(!events.iter().any(reports_change), "a first sight is no change: {events:#?}");

    g.server.set_revision(2)?;
    let second = g.client(&[vec![McpStep::ListTools]]).await?;
    let after = tool(second.step(0, 0)?, "save_note").context("save_note after the change")?;
    assert!(after["inputSchema"]["properties"]["team"].is_object(), "{after:#}");
    let event = audit_event(&g.audit, "reporting the change", reports_change).await?;
    assert_eq!(event["decision"], "alert", "{event:#}");
    Ok(())
}

/// (d) With `mcp.tool_changes = "block"` the changed list is answered with
/// a JSON-RPC error, and keeps being refused: the pins stay as they were.
async fn changed_tool_definition_is_refused_when_configured(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", BLOCK_TOOL_CHANGES).await?;
    let first = g.client(&[vec![McpStep::ListTools]]).await?;
    assert!(tool(first.step(0, 0)?, "save_note").is_some());

    g.server.set_revision(2)?;
    let later = g.client(&[vec![McpStep::ListTools], vec![McpStep::ListTools]]).await?;
    for session in 0..2 {
        let line = later.step(session, 0)?;
        assert_eq!(line["error"]["code"], BLOCKED_CODE, "session {session}: {line:#}");
        assert!(line.get("tools").is_none(), "{line:#}");
    }
    let event = audit_event(&g.audit, "refusing the change", reports_change).await?;
    assert_eq!(event["decision"], "block", "{event:#}");
    Ok(())
}

/// (d) The pins are kept in `mcp.pins_file`: after a restart, a changed
/// definition is reported in the first session.
async fn tool_pins_survive_a_restart(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", "").await?;
    g.client(&[vec![McpStep::ListTools, McpStep::call("echo", json!({"text": "one"}))]]).await?;
    audit_event(&g.audit, "for the first session's call", |e| is_tool_call(e, "echo")).await?;

    let g = g.restart().await?;
    ensure!(g.pins.is_file(), "no pins in {}", g.pins.display());
    g.server.set_revision(2)?;
    let after = g.client(&[vec![McpStep::ListTools]]).await?;
    assert!(tool(after.step(0, 0)?, "save_note").is_some());
    let event = audit_event(&g.audit, "reporting the change after the restart", reports_change).await?;
    assert_eq!(event["decision"], "alert", "{event:#}");
    Ok(())
}

/// A tool list: `save_*` denied. The tool is left out of `tools/list` and a
/// call to it is refused before the server.
const DENY_NOTES: &str = r#"
[[tools]]
id = "no-notes"
deny = ["save_*"]
action = "block"
"#;

async fn denied_tool_is_hidden_and_refused(answers: Answers) -> Result<()> {
    let g = guarded(answers, DENY_NOTES, "").await?;
    let run = g
        .client(&[vec![
            McpStep::ListTools,
            McpStep::call("save_note", json!({"note": "minutes"})),
            McpStep::call("echo", json!({"text": "allowed"})),
        ]])
        .await?;
    assert_eq!(tool_names(run.step(0, 0)?), ["echo", "lookup_card", "weather"]);
    assert_blocked(run.step(0, 1)?, "no-notes");
    assert_eq!(texts(run.step(0, 2)?), ["allowed"]);
    assert!(calls_received(&g.server, "save_note")?.is_empty());
    Ok(())
}

/// (e) One `mcp_tool_call` event per call: server, tool, decision, latency;
/// no arguments while `audit_prompts` is off.
async fn tool_call_is_audited(answers: Answers) -> Result<()> {
    let g = guarded(answers, "", "").await?;
    let text = "a harmless argument";
    let run = g.client(&[vec![McpStep::call("echo", json!({"text": text}))]]).await?;
    assert_eq!(texts(run.step(0, 0)?), [text]);

    let event = audit_event(&g.audit, "for the echo call", |e| is_tool_call(e, "echo")).await?;
    assert_eq!(mcp_field(&event, "server"), HOST, "{event:#}");
    assert_eq!(event["decision"], "allow", "{event:#}");
    assert!(event["latency_ms"].as_f64().is_some_and(|ms| ms >= 0.0), "{event:#}");
    assert!(event.get("workload").is_some(), "{event:#}");
    assert!(event.get("arguments").is_none(), "{event:#}");
    let events = audit_events(&g.audit);
    assert_eq!(events.iter().filter(|e| is_tool_call(e, "echo")).count(), 1, "{events:#?}");
    assert!(!events.iter().any(|e| e.to_string().contains(text)), "the audit holds the arguments: {events:#?}");
    Ok(())
}
