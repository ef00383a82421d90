//! The monitoring files in `deploy/monitoring/`: the Grafana dashboard is
//! what `dashboard.py` builds with Grafana's own `grafana-foundation-sdk`
//! types, the alert rules pass `promtool check rules`, and every metric
//! their queries name is one the interceptor really exports: read from a
//! live `/metrics` scrape of the admin API, after traffic that makes every
//! family show (decisions, a failing backend, connections, MCP tool calls,
//! a changed tool definition, a body over the inspection budget) and, from
//! a second data plane in front of the fake provider, an LLM answer's
//! tokens and its workload's decisions.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use interceptor::{
    admin,
    config::{Backend, BufferedTotal, Config, FailMode, GuardrailsConfig},
    guardrails::akto::AktoConfig,
    observe::LiveEvents,
    testing::{
        mcp::private_key,
        provider::{FakeProvider, TestPki},
    },
};
use interceptor_tests::{
    inprocess::{InProcessProxy, client_for},
    plain_http::{self, Answer},
};
use serde_json::{Value, json};

fn monitoring_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/monitoring")
}

#[test]
fn the_dashboard_is_what_the_grafana_sdk_builds() -> Result<()> {
    let dir = monitoring_dir();
    let out = Command::new("python3").arg(dir.join("dashboard.py")).output().context("running dashboard.py")?;
    ensure!(out.status.success(), "dashboard.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let committed = std::fs::read_to_string(dir.join("interceptor-dashboard.json"))?;
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "deploy/monitoring/interceptor-dashboard.json is not what dashboard.py builds: rebuild it with \
         `python3 deploy/monitoring/dashboard.py > deploy/monitoring/interceptor-dashboard.json`"
    );
    Ok(())
}

#[test]
fn the_alert_rules_pass_promtool() -> Result<()> {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(monitoring_dir().join("interceptor-alerts.yml"))
        .output()
        .context("running promtool (Debian's prometheus package, installed by `cargo xtask setup`)")?;
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Every `interceptor_*` name in the dashboard's queries and the alert
/// rules' expressions.
fn referenced_metrics() -> Result<BTreeSet<String>> {
    let dir = monitoring_dir();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("interceptor-dashboard.json"))?)?;
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    let rules = std::fs::read_to_string(dir.join("interceptor-alerts.yml"))?;
    exprs.extend(rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(str::to_owned));
    ensure!(exprs.len() > 10, "too few queries found: {exprs:?}");
    let mut names = BTreeSet::new();
    for expr in &exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("interceptor_") {
            let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
    }
    Ok(names)
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(fields) => {
            if let Some(Value::String(expr)) = fields.get("expr") {
                out.push(expr.clone());
            }
            fields.values().for_each(|v| collect_exprs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// A plain MCP server whose `echo` tool's description changes at every
/// `tools/list` (a rug pull), answering calls with "ok".
fn mcp_server(listener: tokio::net::TcpListener) {
    let lists = AtomicU32::new(0);
    plain_http::serve(listener, move |_, _, body| {
        let request: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let id = request["id"].clone();
        let result = match request["method"].as_str() {
            Some("tools/list") => {
                let n = lists.fetch_add(1, Ordering::SeqCst);
                json!({"tools": [{"name": "echo", "description": format!("Echoes its text (v{n})."),
                    "inputSchema": {"type": "object"}}]})
            }
            _ => json!({"content": [{"type": "text", "text": "ok"}]}),
        };
        Answer::json(&json!({"jsonrpc": "2.0", "id": id, "result": result}))
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_name_is_exported() -> Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = listener.local_addr()?;
    mcp_server(listener);
    // Akto at a port nobody listens on, failing open: backend errors.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let akto = AktoConfig {
        url: format!("http://{closed}"),
        request_timeout: Duration::from_secs(2),
        stream_timeout: Duration::from_secs(2),
        ..AktoConfig::default()
    };
    let guardrails = GuardrailsConfig {
        enabled: true,
        backends: vec![Backend::Local, Backend::Akto],
        fail_mode_request: FailMode::Open,
        fail_mode_response: FailMode::Open,
        akto,
        // Small, so that one large body is refused for want of it.
        max_buffered_total: BufferedTotal::Bytes(64 * 1024),
        ..GuardrailsConfig::default()
    };
    let dir = tempfile::tempdir()?;
    let config = Config {
        guardrails,
        mcp: interceptor::config::McpConfig {
            pins_file: dir.path().join("pins.json"),
            ..interceptor::config::McpConfig::default()
        },
        ..Config::default()
    };
    let pki = TestPki::with_defaults()?;
    let ca = pki.write_ca(dir.path())?;
    let proxy = InProcessProxy::from_config(server, &ca, config).await?;
    proxy.set_plain_target(server, "tools.agents.test");

    {
        let client = reqwest::Client::builder().no_proxy().build()?;
        for (id, method, params) in [
            (1, "tools/list", json!({})),
            (2, "tools/call", json!({"name": "echo", "arguments": {"text": "hello"}})),
            (3, "tools/call", json!({"name": "echo", "arguments": {"text": private_key()}})),
            (4, "tools/list", json!({})),
        ] {
            let resp = client
                .post(format!("http://{}/mcp", proxy.addr))
                .header("accept", "application/json, text/event-stream")
                .json(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
                .send()
                .await?;
            ensure!(resp.status() == 200, "{method}: {}", resp.status());
            let _ = resp.bytes().await?;
        }
        // Over the inspection budget: refused.
        let large = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "echo", "arguments": {"text": "x".repeat(256 * 1024)}}});
        let resp = client.post(format!("http://{}/mcp", proxy.addr)).json(&large).send().await?;
        ensure!(resp.status() == 503, "a body over the budget: {}", resp.status());
        let _ = resp.bytes().await;
        // Dropped: its connection closes, and a connection is counted when
        // it closes.
    }

    // An LLM answer with usage, through a data plane of its own in front of
    // the fake provider (the first one's every connection goes to the MCP
    // server): tokens, and decisions by workload.
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let llm = InProcessProxy::from_config(provider.local_addr(), &ca, Config::default()).await?;
    {
        let client = client_for("api.openai.com", llm.addr, &[&llm.ca_pem], false)?;
        let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "Capital of France?"}]});
        let resp = client.post("https://api.openai.com/v1/chat/completions").json(&body).send().await?;
        ensure!(resp.status() == 200, "chat completion: {}", resp.status());
        let _ = resp.bytes().await?;
    }

    // The live scrapes, from the admin API of each.
    let (mut admins, mut statuses) = (Vec::new(), Vec::new());
    for metrics in [&proxy.metrics, &llm.metrics] {
        let admin_listener = admin::bind("127.0.0.1:0".parse()?).await?;
        admins.push(admin_listener.local_addr()?);
        let (status, status_rx) = tokio::sync::watch::channel(Arc::new(admin::Status::default()));
        statuses.push(status);
        tokio::spawn(admin::serve(admin_listener, status_rx, Arc::clone(metrics), LiveEvents::default()));
    }
    let wanted = referenced_metrics()?;
    let scraper = reqwest::Client::builder().no_proxy().build()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut scrape = String::new();
        for admin_addr in &admins {
            scrape += &scraper.get(format!("http://{admin_addr}/metrics")).send().await?.text().await?;
        }
        let exported: BTreeSet<&str> =
            scrape.lines().filter(|l| !l.starts_with('#')).filter_map(|l| l.split(['{', ' ']).next()).collect();
        let missing: Vec<&String> = wanted.iter().filter(|name| !exported.contains(name.as_str())).collect();
        if missing.is_empty() {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "not exported: {missing:?}\nscrape:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
