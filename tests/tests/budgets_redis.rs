//! Budgets shared across nodes through a real `redis-server` (Debian's
//! package, installed by `cargo xtask setup`), started by the test on a free
//! loopback port with no persistence:
//!
//! * two in-process proxies sharing a token budget through it refuse, both
//!   of them, once the tokens both let through reach it;
//! * with Redis stopped, a proxy counts on its own: the request is
//!   admitted, its audit events say `budget_counting: "local_fallback"`, and
//!   `interceptor_budget_redis_fallbacks_total` counts it.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use interceptor::config::{
    BudgetsConfig,
    budgets::{LimitConfig, LimitKind, Period, ScopeConfig},
};
use interceptor_tests::{
    budgets::{BudgetProxy, Upstream, audit_events, away_from_window_end},
    inprocess::client_for,
};
use serde_json::{Value, json};

/// A `redis-server` of the test's own, killed on drop.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    /// Started and answering `PING`; `None` (the test skips) when
    /// `redis-server` is not installed outside CI.
    fn start() -> Result<Option<Redis>> {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join("redis-server"))
            .find(|p| p.is_file());
        let Some(server) = found else {
            if std::env::var_os("CI").is_some() {
                bail!("redis-server is not installed (cargo xtask setup installs it)");
            }
            eprintln!("skip: redis-server is not installed (cargo xtask setup installs it)");
            return Ok(None);
        };
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(server)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server")?;
        let redis = Redis { child, port, _dir: dir };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !redis.pings() {
            ensure!(std::time::Instant::now() < deadline, "redis-server did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Some(redis))
    }

    fn pings(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stop(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKENS: u64 = 150;

fn shared(url: String) -> BudgetsConfig {
    BudgetsConfig {
        redis_url: url,
        // Generous: a loaded machine must not make the test count locally.
        redis_timeout: Duration::from_secs(2),
        limits: vec![LimitConfig {
            name: "team-tokens".into(),
            scope: ScopeConfig { workloads: vec!["comm:agent".into()] },
            kind: LimitKind::Tokens,
            limit: TOKENS,
            period: Some(Period::Day),
        }],
        ..BudgetsConfig::default()
    }
}

async fn ask(w: &BudgetProxy) -> Result<u16> {
    let host = "api.openai.com";
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]});
    let client = client_for(host, w.proxy.addr, &[&w.proxy.ca_pem], false)?;
    let resp = client.post(format!("https://{host}/v1/chat/completions")).json(&body).send().await?;
    Ok(resp.status().as_u16())
}

fn tokens(e: &Value) -> u64 {
    e["usage"]["input_tokens"].as_u64().unwrap_or(0) + e["usage"]["output_tokens"].as_u64().unwrap_or(0)
}

fn is_response(e: &Value) -> bool {
    e["direction"] == "response" && e["usage"].is_object()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_one_budget_through_redis() -> Result<()> {
    let Some(mut redis) = Redis::start()? else { return Ok(()) };
    let up = Upstream::start()?;
    let mut proxies = Vec::new();
    for name in ["a", "b"] {
        proxies.push(up.proxy(name, name, shared(redis.url()), "agent").await?);
    }
    away_from_window_end(Period::Day.seconds()).await;

    // Alternately through each proxy until one refuses.
    let mut answered = [0usize; 2];
    let mut refused_by = None;
    for i in 0..20 {
        let w = &proxies[i % 2];
        match ask(w).await? {
            200 => {
                answered[i % 2] += 1;
                audit_events(&w.audit, answered[i % 2], is_response).await?;
            }
            429 => {
                refused_by = Some(i % 2);
                break;
            }
            status => bail!("status {status}"),
        }
    }
    let refused_by = refused_by.context("never refused")?;
    ensure!(answered[0] >= 1 && answered[1] >= 1, "one proxy answered everything: {answered:?}");
    let mut events = Vec::new();
    for (i, (w, n)) in proxies.iter().zip(answered).enumerate() {
        let own = audit_events(&w.audit, n, is_response).await?;
        // The refusing node's own answers alone do not reach the budget:
        // only the shared count does.
        let own_tokens: u64 = own.iter().map(tokens).sum();
        ensure!(i != refused_by || own_tokens < TOKENS, "the refusing node alone used {own_tokens}");
        events.extend(own);
    }
    let used: u64 = events.iter().map(tokens).sum();
    ensure!(used >= TOKENS, "refused at {used} of {TOKENS} tokens");
    ensure!(events.iter().all(|e| e["budget_counting"].is_null()), "counted locally with redis up");
    // Either proxy refuses now; neither asked the provider.
    ensure!(ask(&proxies[1 - refused_by]).await? == 429);
    ensure!(up.provider.requests().len() == answered.iter().sum::<usize>());
    let refusal = audit_events(&proxies[refused_by].audit, 1, |e| e["budget"].is_object()).await?.remove(0);
    ensure!(refusal["budget"]["used"] == used, "{refusal}");

    // Redis gone: a new node counts on its own, and says so.
    redis.stop()?;
    let c = up.proxy("c", "c", shared(redis.url()), "agent").await?;
    let audit = c.audit.clone();
    ensure!(ask(&c).await? == 200, "refused with redis down and redis_fail = local");
    let events = audit_events(&audit, 2, |e| e["budget_counting"] == "local_fallback").await?;
    ensure!(events.iter().any(|e| e["direction"] == "request") && events.iter().any(|e| e["direction"] == "response"));
    ensure!(c.sample("interceptor_budget_redis_fallbacks_total") >= 1);
    Ok(())
}
