//! Helpers of the budget tests: an in-process proxy whose guardrails are
//! built from a `Config` with `[budgets]` (as `interceptor run` builds them,
//! state directory included), the official SDKs sending requests until one
//! is refused, and reading the audit trail.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use interceptor::{
    config::{Backend, BudgetsConfig, Config, GuardrailsConfig},
    dataplane::{self, GuardrailsHandle},
    metrics::Metrics,
    proxy::ProxySettings,
    testing::{
        clients::{ClientEnv, python_script},
        provider::{FakeProvider, TestPki},
    },
    workload::Workload,
};
use serde_json::Value;

use crate::inprocess::InProcessProxy;

/// The fake provider (TLS, signed by a throwaway CA) behind the proxies of
/// a test, and a temporary directory for their state and audit trails.
pub struct Upstream {
    pub provider: FakeProvider,
    pub ca: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Upstream {
    pub fn start() -> Result<Upstream> {
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let ca = pki.write_ca(dir.path())?;
        Ok(Upstream { provider, ca, dir })
    }

    /// A proxy in front of the provider, as the workload `comm`, with its
    /// counters in the directory `state` and its audit trail in
    /// `<audit>.jsonl` (both in the test's directory).
    pub async fn proxy(&self, state: &str, audit: &str, budgets: BudgetsConfig, comm: &str) -> Result<BudgetProxy> {
        self.proxy_with(state, audit, budgets, comm, settings()).await
    }

    /// [`Upstream::proxy`] with these proxy settings.
    pub async fn proxy_with(
        &self,
        state: &str,
        audit: &str,
        budgets: BudgetsConfig,
        comm: &str,
        settings: ProxySettings,
    ) -> Result<BudgetProxy> {
        let state = self.dir.path().join(state);
        std::fs::create_dir_all(&state)?;
        let audit = self.dir.path().join(format!("{audit}.jsonl"));
        BudgetProxy::start(self.provider.local_addr(), &self.ca, &state, audit, budgets, comm, settings).await
    }
}

/// The proxy settings of the budget tests.
pub fn settings() -> ProxySettings {
    ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() }
}

/// The in-process proxy with budgets, as the workload `comm`.
pub struct BudgetProxy {
    pub proxy: InProcessProxy,
    pub handle: GuardrailsHandle,
    pub metrics: Arc<Metrics>,
    pub audit: PathBuf,
}

impl BudgetProxy {
    /// Guardrails (local engine) with `budgets`, the counters in
    /// `state_dir`, the audit trail in `audit`.
    pub async fn start(
        upstream: std::net::SocketAddr,
        upstream_ca: &Path,
        state_dir: &Path,
        audit: PathBuf,
        budgets: BudgetsConfig,
        comm: &str,
        settings: ProxySettings,
    ) -> Result<BudgetProxy> {
        let config = Config {
            guardrails: GuardrailsConfig {
                enabled: true,
                backends: vec![Backend::Local],
                audit_file: audit.clone(),
                ..GuardrailsConfig::default()
            },
            budgets,
            ..Config::default()
        };
        config.validate()?;
        let metrics = Arc::new(Metrics::new());
        let (hook, handle) = dataplane::guardrails_with_state(&config, &metrics, Some(state_dir), None)?;
        let workload = Workload { pid: 9, comm: comm.into(), ..Workload::default() };
        let proxy = InProcessProxy::start_hooked_as(upstream, upstream_ca, hook, settings, Some(workload)).await?;
        Ok(BudgetProxy { proxy, handle, metrics, audit })
    }

    /// The value of `series` (name and labels) in the metrics, 0 if absent.
    pub fn sample(&self, series: &str) -> u64 {
        self.metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Waits until the audit trail at `path` has `n` events `matching`; returns
/// them (at most 10 s).
pub async fn audit_events(path: &Path, n: usize, matching: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let events: Vec<Value> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| matching(e))
            .collect();
        if events.len() >= n {
            return Ok(events);
        }
        ensure!(tokio::time::Instant::now() < deadline, "{} audit events of {n} in {}", events.len(), path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sleeps past the end of the current window of `period` seconds if less
/// than 30 s of it are left, so that requests made next fall in one window.
pub async fn away_from_window_end(period: u64) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let into = now.as_secs_f64() % period as f64;
    if into > period as f64 - 30.0 {
        tokio::time::sleep(Duration::from_secs_f64(period as f64 - into + 0.5)).await;
    }
}

/// One official SDK (`openai`, `anthropic` or `boto3`, the last against
/// Bedrock Converse) sending requests to its provider's usual host (name
/// resolution sends it to the proxy on loopback) until one fails, at most
/// `MAX` of them, without retries. Prints a JSON list: `{"ok": true}` per
/// answer, then the failure: `rate_limited` when the SDK raised its own
/// rate-limit error (`openai.RateLimitError`, `anthropic.RateLimitError`,
/// botocore's `ClientError` with code `ThrottlingException`), the status,
/// `retry-after` and the message.
const SCRIPT: &str = r#"
import json, os, socket
_resolve = socket.getaddrinfo
HOSTS = ("api.openai.com", "api.anthropic.com", "bedrock-runtime.us-east-1.amazonaws.com")
def _to_proxy(host, *args, **kwargs):
    if host in HOSTS:
        host = "127.0.0.1"
    return _resolve(host, *args, **kwargs)
socket.getaddrinfo = _to_proxy
port = os.environ["PROXY_PORT"]
sdk = os.environ["SDK"]
out = []
def outcome(f):
    try:
        f()
        out.append({"ok": True})
        return True
    except Exception as e:
        status = getattr(e, "status_code", None)
        response = getattr(e, "response", None)
        retry_after, message, limited = None, str(e), False
        if sdk == "openai":
            import openai
            limited = isinstance(e, openai.RateLimitError)
            if response is not None:
                retry_after = response.headers.get("retry-after")
                message = e.body.get("message") if isinstance(e.body, dict) else str(e.body)
        elif sdk == "anthropic":
            import anthropic
            limited = isinstance(e, anthropic.RateLimitError)
            if response is not None:
                retry_after = response.headers.get("retry-after")
                message = e.body["error"]["message"] if isinstance(e.body, dict) else str(e.body)
        else:
            import botocore.exceptions
            if isinstance(e, botocore.exceptions.ClientError):
                limited = e.response["Error"]["Code"] == "ThrottlingException"
                meta = e.response["ResponseMetadata"]
                status = meta["HTTPStatusCode"]
                retry_after = meta["HTTPHeaders"].get("retry-after")
                message = e.response["Error"]["Message"]
        out.append({"ok": False, "rate_limited": limited, "status": status, "retry_after": retry_after,
                    "message": message, "kind": type(e).__name__})
        return False
if sdk == "openai":
    import openai
    c = openai.OpenAI(base_url=f"https://api.openai.com:{port}/v1", api_key="sk-test", max_retries=0)
    call = lambda: c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}])
elif sdk == "anthropic":
    import anthropic
    c = anthropic.Anthropic(base_url=f"https://api.anthropic.com:{port}", api_key="sk-ant-test", max_retries=0)
    call = lambda: c.messages.create(model="claude-sonnet-4-5", max_tokens=32, messages=[{"role": "user", "content": "hello"}])
else:
    import boto3, botocore.config
    c = boto3.client("bedrock-runtime", region_name="us-east-1",
        endpoint_url=f"https://bedrock-runtime.us-east-1.amazonaws.com:{port}", verify=os.environ["SSL_CERT_FILE"],
        aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="secret",
        config=botocore.config.Config(retries={"total_max_attempts": 1}))
    call = lambda: c.converse(modelId="amazon.nova-pro-v1:0", messages=[{"role": "user", "content": [{"text": "hello"}]}])
for _ in range(int(os.environ["MAX"])):
    if not outcome(call):
        break
print(json.dumps(out))
"#;

/// Runs [`SCRIPT`] with `sdk` through `proxy`; the outcomes.
pub async fn sdk_until_refused(proxy: &InProcessProxy, sdk: &str, max: usize) -> Result<Vec<Value>> {
    let env = ClientEnv::new(&proxy.ca_path);
    let ca = proxy.ca_path.to_string_lossy().to_string();
    let port = proxy.addr.port().to_string();
    let max = max.to_string();
    let vars = [("SSL_CERT_FILE", ca.as_str()), ("PROXY_PORT", port.as_str()), ("SDK", sdk), ("MAX", max.as_str())];
    let out = python_script(&env, SCRIPT, &vars).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    match serde_json::from_str::<Value>(stdout.trim()) {
        Ok(Value::Array(v)) => Ok(v),
        _ => bail!("{sdk} script printed {stdout:?}; stderr: {stderr}"),
    }
}

/// The outcomes are `ok`s, then one rate-limit error the SDK recognized;
/// returns how many were answered.
pub fn answered_then_limited(sdk: &str, outcomes: &[Value]) -> Result<usize> {
    let (last, answered) = outcomes.split_last().context("no outcome")?;
    ensure!(answered.iter().all(|o| o["ok"] == true), "{sdk}: {outcomes:?}");
    ensure!(last["rate_limited"] == true, "{sdk}: not refused as a rate limit: {outcomes:?}");
    ensure!(last["status"] == 429, "{sdk}: {last}");
    let retry_after: u64 = last["retry_after"].as_str().and_then(|s| s.parse().ok()).context("no retry-after")?;
    ensure!(retry_after >= 1, "{sdk}: {last}");
    Ok(answered.len())
}
