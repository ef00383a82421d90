//! Budgets and rate limits through the in-process proxy, with the official
//! `openai`, `anthropic` and `boto3` SDKs against the fake provider:
//!
//! * a token budget lets requests through until the tokens the answers used
//!   reach it, then answers `429` in the provider's own error shape with
//!   `retry-after`, which each SDK raises as its rate-limit error; the
//!   refused request never reaches the provider; its audit event names the
//!   budget, and `interceptor_budget_refusals_total` counts it;
//! * a requests-per-minute limit, the same way;
//! * a concurrent-requests limit: a second request while a stream is held
//!   open is refused, and admitted once the stream is done;
//! * a body too large to inspect (forwarded uninspected) still counts;
//! * the counters survive a restart (the state file), and a corrupt state
//!   file is survived.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use interceptor::{
    config::{
        BudgetsConfig, OversizeAction,
        budgets::{LimitConfig, LimitKind, Period, ScopeConfig},
    },
    proxy::ProxySettings,
};
use interceptor_tests::{
    budgets::{
        BudgetProxy, Upstream, answered_then_limited, audit_events, away_from_window_end, sdk_until_refused, settings,
    },
    inprocess::client_for,
};
use serde_json::{Value, json};

fn limit(name: &str, kind: LimitKind, limit: u64, period: Option<Period>) -> LimitConfig {
    LimitConfig {
        name: name.into(),
        scope: ScopeConfig { workloads: vec!["comm:python3".into(), "comm:agent".into()] },
        kind,
        limit,
        period,
    }
}

fn budgets(limits: Vec<LimitConfig>) -> BudgetsConfig {
    BudgetsConfig { limits, ..BudgetsConfig::default() }
}

/// Tokens of the answered response events.
fn tokens(events: &[Value]) -> u64 {
    events
        .iter()
        .map(|e| e["usage"]["input_tokens"].as_u64().unwrap_or(0) + e["usage"]["output_tokens"].as_u64().unwrap_or(0))
        .sum()
}

fn is_response(e: &Value) -> bool {
    e["direction"] == "response" && e["usage"].is_object()
}

fn is_refusal(e: &Value) -> bool {
    e["direction"] == "request" && e["budget"].is_object()
}

const TOKENS: u64 = 60;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sdk_reads_a_spent_token_budget_as_its_rate_limit_error() -> Result<()> {
    let up = Upstream::start()?;
    away_from_window_end(Period::Day.seconds()).await;
    for (sdk, path) in [("openai", "/v1/chat/completions"), ("anthropic", "/v1/messages"), ("boto3", "/model/")] {
        let cfg = budgets(vec![limit("team-tokens", LimitKind::Tokens, TOKENS, Some(Period::Day))]);
        let w = up.proxy(sdk, sdk, cfg, "python3").await?;
        let audit = w.audit.clone();

        let outcomes = sdk_until_refused(&w.proxy, sdk, 20).await?;
        let answered = answered_then_limited(sdk, &outcomes)?;
        ensure!(answered >= 1, "{sdk}: the first request was refused: {outcomes:?}");
        let message = outcomes[answered]["message"].as_str().unwrap_or_default();
        ensure!(message.contains("team-tokens"), "{sdk}: {message}");

        // The provider saw the answered requests only.
        let seen = up.provider.take_requests();
        ensure!(seen.len() == answered, "{sdk}: the provider got {} requests, {answered} answered", seen.len());
        ensure!(
            seen.iter().all(|r| r.path.starts_with(path)),
            "{sdk}: {:?}",
            seen.iter().map(|r| &r.path).collect::<Vec<_>>()
        );

        // The answers used the budget: the last one took it to the limit.
        let responses = audit_events(&audit, answered, is_response).await?;
        let used = tokens(&responses);
        ensure!(used >= TOKENS && used - tokens(&responses[answered - 1..]) < TOKENS, "{sdk}: {used} tokens");
        let refusal = audit_events(&audit, 1, is_refusal).await?.remove(0);
        let budget = &refusal["budget"];
        ensure!(
            budget["name"] == "team-tokens"
                && budget["kind"] == "tokens"
                && budget["limit"] == TOKENS
                && budget["used"] == used
                && budget["period"] == "day"
                && budget["scope"] == json!(["comm:python3", "comm:agent"]),
            "{sdk}: {refusal}"
        );
        ensure!(refusal["decision"] == "block" && refusal["rules"] == json!(["budget"]), "{sdk}: {refusal}");
        let refused = w.sample(r#"interceptor_budget_refusals_total{budget="team-tokens",kind="tokens"}"#);
        ensure!(refused == 1, "{sdk}: {refused} refusals counted");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_minute_are_limited() -> Result<()> {
    let up = Upstream::start()?;
    let cfg = budgets(vec![limit("team-rpm", LimitKind::Requests, 3, None)]);
    let w = up.proxy("state", "audit", cfg, "python3").await?;
    let audit = w.audit.clone();
    away_from_window_end(Period::Minute.seconds()).await;
    let outcomes = sdk_until_refused(&w.proxy, "openai", 10).await?;
    ensure!(answered_then_limited("openai", &outcomes)? == 3, "{outcomes:?}");
    ensure!(up.provider.requests().len() == 3, "the provider got a refused request");
    let refusal = audit_events(&audit, 1, is_refusal).await?.remove(0);
    ensure!(refusal["budget"]["kind"] == "requests" && refusal["budget"]["used"] == 4, "{refusal}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_holds_its_slot_until_it_ends() -> Result<()> {
    let up = Upstream::start()?;
    let cfg = budgets(vec![limit("one-stream", LimitKind::Concurrent, 1, None)]);
    let w = up.proxy("state", "audit", cfg, "agent").await?;
    let audit = w.audit.clone();
    let host = "api.openai.com";
    let client = client_for(host, w.proxy.addr, &[&w.proxy.ca_pem], false)?;
    let body = json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let post = |query: &str| client.post(format!("https://{host}/v1/chat/completions{query}")).json(&body).send();

    // The stream's head arrives; its events wait for the test.
    let mut held = post("?gated=1").await?;
    ensure!(held.status() == 200, "{}", held.status());
    let refused = post("").await?;
    ensure!(refused.status() == 429, "{}", refused.status());
    ensure!(refused.headers().get("retry-after").is_some_and(|v| v == "1"));
    let error: Value = refused.json().await?;
    ensure!(error["error"]["type"] == "rate_limit_exceeded", "{error}");
    ensure!(up.provider.requests().len() == 1, "the refused request reached the provider");

    // Released, the stream ends; its slot is given back with it.
    up.provider.release_events(1000);
    let mut text = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(10), held.chunk()).await.context("stream")?? {
        text.extend_from_slice(&chunk);
    }
    ensure!(String::from_utf8_lossy(&text).contains("[DONE]"));
    audit_events(&audit, 1, |e| e["direction"] == "response").await?;
    // The exchange is dropped just after its last event: at most a few
    // refusals while it is, each one never reaching the up.provider.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = post("").await?;
        if resp.status() == 200 {
            break;
        }
        ensure!(resp.status() == 429 && tokio::time::Instant::now() < deadline, "{}", resp.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(up.provider.requests().len() == 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_a_restart_and_a_corrupt_file() -> Result<()> {
    let up = Upstream::start()?;
    let state = up.dir.path().join("state");
    let cfg = || BudgetsConfig {
        save_interval: Duration::from_secs(1),
        ..budgets(vec![limit("team-tokens", LimitKind::Tokens, 1, Some(Period::Day))])
    };
    away_from_window_end(Period::Day.seconds()).await;
    let host = "api.openai.com";
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]});
    let ask = |w: &BudgetProxy| {
        let client = client_for(host, w.proxy.addr, &[&w.proxy.ca_pem], false);
        let body = body.clone();
        async move {
            let resp = client?.post(format!("https://{host}/v1/chat/completions")).json(&body).send().await?;
            anyhow::Ok(resp.status().as_u16())
        }
    };

    let first = up.proxy("state", "a", cfg(), "agent").await?;
    ensure!(ask(&first).await? == 200);
    audit_events(&first.audit, 1, is_response).await?;
    ensure!(ask(&first).await? == 429);
    // The saver writes the counters by itself, off the request path.
    let file = state.join("budgets.json");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&file).unwrap_or_default().contains("team-tokens") {
        ensure!(tokio::time::Instant::now() < deadline, "the counters were not saved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Shutdown saves too.
    first.handle.budgets.as_ref().context("no budgets")?.save();
    drop(first);

    let second = up.proxy("state", "b", cfg(), "agent").await?;
    ensure!(ask(&second).await? == 429, "the budget was forgotten across the restart");
    drop(second);
    ensure!(up.provider.requests().len() == 1);

    std::fs::write(&file, b"{\"version\": 1, \"counters\": [trunc")?;
    let third = up.proxy("state", "c", cfg(), "agent").await?;
    ensure!(ask(&third).await? == 200, "a corrupt file is not a fresh start");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_to_inspect_still_counts() -> Result<()> {
    let up = Upstream::start()?;
    let cfg = budgets(vec![limit("team-rpm", LimitKind::Requests, 1, Some(Period::Hour))]);
    let settings = ProxySettings { max_inspected_body: 1024, oversize: OversizeAction::Pass, ..settings() };
    let w = up.proxy_with("state", "audit", cfg, "agent", settings).await?;
    away_from_window_end(Period::Hour.seconds()).await;
    let host = "api.openai.com";
    let client = client_for(host, w.proxy.addr, &[&w.proxy.ca_pem], false)?;
    let big = "x".repeat(4096);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": big}]});
    let post = || client.post(format!("https://{host}/v1/chat/completions")).json(&body).send();
    ensure!(post().await?.status() == 200);
    let refused = post().await?;
    ensure!(refused.status() == 429, "{}", refused.status());
    ensure!(up.provider.requests().len() == 1, "the refused request reached the provider");
    Ok(())
}
