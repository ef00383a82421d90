//! The official `openai` and `anthropic` Python SDKs holding only
//! placeholders (in `OPENAI_API_KEY`, `ANTHROPIC_API_KEY`), through the
//! in-process proxy with key brokering: the fake provider receives the real
//! keys, the SDKs see answers, and a placeholder replayed by another
//! workload is refused with a 403 the SDK reads as a permission error.

use std::{os::unix::fs::PermissionsExt as _, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use interceptor::{
    config::{Backend, Config, GuardrailsConfig, KeysConfig},
    dataplane,
    guardrails::keys::KeysFile,
    proxy::ProxySettings,
    testing::{
        clients::{ClientEnv, python_script},
        provider::{FakeProvider, TestPki},
    },
    workload::Workload,
};
use interceptor_tests::inprocess::InProcessProxy;
use serde_json::Value;

const REAL_OPENAI: &str = "sk-proj-REALsdkOPENAIkey-000111";
const REAL_ANTHROPIC: &str = "sk-ant-REALsdkANTHROPICkey-000222";

/// Both SDKs, each sending one request to its provider's usual host (name
/// resolution sends those hosts to the proxy on loopback). Prints one JSON
/// object.
const SCRIPT: &str = r#"
import json, os, socket
import anthropic, openai
_resolve = socket.getaddrinfo
def _to_proxy(host, *args, **kwargs):
    if host in ("api.openai.com", "api.anthropic.com"):
        host = "127.0.0.1"
    return _resolve(host, *args, **kwargs)
socket.getaddrinfo = _to_proxy
port = os.environ["PROXY_PORT"]
out = {"env": sorted(v for k, v in os.environ.items() if k.endswith("_API_KEY"))}
o = openai.OpenAI(base_url=f"https://api.openai.com:{port}/v1", max_retries=0)
a = anthropic.Anthropic(base_url=f"https://api.anthropic.com:{port}", max_retries=0)
def call(name, f):
    try:
        out[name] = {"ok": True, "text": f()}
    except (openai.PermissionDeniedError, anthropic.PermissionDeniedError) as e:
        out[name] = {"ok": False, "denied": True, "status": e.status_code, "body": e.response.text}
    except (openai.APIStatusError, anthropic.APIStatusError) as e:
        out[name] = {"ok": False, "status": e.status_code, "body": e.response.text}
call("openai", lambda: o.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello"}]).choices[0].message.content)
call("anthropic", lambda: "".join(b.text for b in a.messages.create(model="claude-sonnet-4-5", max_tokens=32, messages=[{"role": "user", "content": "hello"}]).content if b.type == "text"))
print(json.dumps(out))
"#;

async fn run_sdks(proxy: &InProcessProxy, openai: &str, anthropic: &str) -> Result<(Value, String)> {
    let env = ClientEnv::new(&proxy.ca_path);
    let ca = proxy.ca_path.to_string_lossy().to_string();
    let port = proxy.addr.port().to_string();
    let vars = [
        ("SSL_CERT_FILE", ca.as_str()),
        ("PROXY_PORT", port.as_str()),
        ("OPENAI_API_KEY", openai),
        ("ANTHROPIC_API_KEY", anthropic),
    ];
    let out = python_script(&env, SCRIPT, &vars).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let all = format!("{stdout}\n{stderr}");
    if all.contains(REAL_OPENAI) || all.contains(REAL_ANTHROPIC) {
        bail!("the SDKs' output holds a real key");
    }
    match serde_json::from_str(stdout.trim()) {
        Ok(v) => Ok((v, all)),
        Err(_) => bail!("sdk script printed {stdout:?}; stderr: {stderr}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_with_placeholders_reach_the_provider_with_the_real_keys() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let keys = dir.path().join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[real]]\nprovider = \"openai\"\nscope.workloads = [\"comm:python3\"]\nkey = \"{REAL_OPENAI}\"\n\n\
             [[real]]\nprovider = \"anthropic\"\nscope.workloads = [\"comm:python3\"]\nkey = \"{REAL_ANTHROPIC}\"\n"
        ),
    )?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600))?;
    let mut file = KeysFile::open(&keys, "ik-")?;
    let openai = file.issue("openai", &["comm:python3".into()], "now")?;
    let anthropic = file.issue("anthropic", &["comm:python3".into()], "now")?;
    drop(file);

    let config = Config {
        guardrails: GuardrailsConfig { enabled: true, backends: vec![Backend::Local], ..GuardrailsConfig::default() },
        keys: KeysConfig { enabled: true, file: keys.clone(), ..KeysConfig::default() },
        ..Config::default()
    };
    let metrics = Arc::new(interceptor::metrics::Metrics::new());
    let (hook, _handle) = dataplane::guardrails(&config, &metrics)?;
    let hook = hook.context("no hook")?;
    let as_comm = |comm: &str| Some(Workload { pid: 9, comm: comm.into(), ..Workload::default() });
    let settings = || ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
    let covered = InProcessProxy::start_hooked_as(
        provider.local_addr(),
        &upstream_ca,
        Some(hook),
        settings(),
        as_comm("python3"),
    )
    .await?;

    let (out, _) = run_sdks(&covered, &openai, &anthropic).await?;
    assert_eq!(
        out["env"],
        serde_json::json!([anthropic.clone(), openai.clone()].iter().collect::<std::collections::BTreeSet<_>>())
    );
    assert_eq!(out["openai"]["ok"], true, "{out}");
    assert_eq!(out["anthropic"]["ok"], true, "{out}");
    let seen = provider.requests();
    assert_eq!(seen.len(), 2);
    let openai_req = seen.iter().find(|r| r.path.starts_with("/v1/chat/completions")).context("no openai request")?;
    let anthropic_req = seen.iter().find(|r| r.path.starts_with("/v1/messages")).context("no anthropic request")?;
    assert!(
        openai_req.header("authorization") == Some(format!("Bearer {REAL_OPENAI}").as_str()),
        "openai: not the real key"
    );
    // SDK versions differ in where they put the key: `x-api-key`, or
    // `Authorization: Bearer`.
    let bearer = format!("Bearer {REAL_ANTHROPIC}");
    let credential = anthropic_req.header("x-api-key").or(anthropic_req.header("authorization"));
    assert!(credential == Some(REAL_ANTHROPIC) || credential == Some(bearer.as_str()), "anthropic: not the real key");
    assert!(seen.iter().all(|r| !format!("{:?}", r.headers).contains("ik-")), "a placeholder reached the provider");

    // The same placeholders from a workload outside their scope.
    let (hook, _handle) = dataplane::guardrails(&config, &metrics)?;
    let outside =
        InProcessProxy::start_hooked_as(provider.local_addr(), &upstream_ca, hook, settings(), as_comm("curl")).await?;
    let (out, _) = run_sdks(&outside, &openai, &anthropic).await?;
    for name in ["openai", "anthropic"] {
        assert_eq!(out[name]["denied"], true, "{name}: {out}");
        assert!(out[name]["body"].as_str().unwrap_or_default().contains("outside its scope"), "{name}: {out}");
    }
    assert_eq!(provider.requests().len(), 2, "a refused request reached the provider");
    Ok(())
}
