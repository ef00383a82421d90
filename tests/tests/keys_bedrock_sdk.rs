//! The official `boto3` SDK (`bedrock-runtime`: `converse`,
//! `converse_stream`, `invoke_model`) holding only placeholder AWS
//! credentials, through the in-process proxy with key brokering: the proxy
//! redacts a card number in flight and signs the request again with the
//! real credentials, which the fake Bedrock verifies (SigV4, as AWS does);
//! the fake never sees a placeholder, and no log line or audit event holds
//! a real credential. A placeholder used by a workload outside its scope,
//! and real credentials sent by a brokered workload, are refused; without
//! brokering, a redaction on a SigV4 request is still blocked.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use interceptor::{
    config::{Backend, Config, GuardrailsConfig, KeysConfig},
    dataplane,
    guardrails::keys::KeysFile,
    proxy::ProxySettings,
    telemetry,
    testing::{
        clients::{ClientEnv, python_script},
        provider::{FakeProvider, TestPki},
        sigv4::{AwsCredentialsExpected, SigV4Check},
    },
    workload::Workload,
};
use interceptor_tests::{captured::CapturedLog, inprocess::InProcessProxy};
use serde_json::{Value, json};
use tracing_subscriber::{EnvFilter, util::SubscriberInitExt as _};

const REAL_AKID: &str = "AKIAREALBEDROCK00042";
const REAL_SECRET: &str = "RealSecretAccessKey/forTeamA+0000000000042";
const REAL_TOKEN: &str = "RealSessionTokenForTeamA0000000042";
/// Credentials a workload holds for itself (no brokering covers it).
const OWN_AKID: &str = "AKIAOWNCREDENTIALS01";
const OWN_SECRET: &str = "OwnSecretAccessKey0000000000000000000001";
const CARD: &str = "4111 1111 1111 1111";

fn holds_a_real_credential(text: &str) -> bool {
    [REAL_AKID, REAL_SECRET, REAL_TOKEN].iter().any(|k| text.contains(k))
}

/// boto3 against each target of `TARGETS` (a JSON list of `{label, port,
/// prompt, calls, creds?}`), with the provider's host names resolving to
/// loopback, trusting the CAs in `AWS_CA_BUNDLE`. Credentials come from the
/// environment unless a target gives its own. Prints one JSON object: the
/// AWS credential variables, the whole environment (but the test's
/// `TARGETS`, which may give the direct calls real credentials), and per target and
/// call, the answer's text or the error.
const SCRIPT: &str = r#"
import json, os, socket
import boto3, botocore.config, botocore.exceptions
_resolve = socket.getaddrinfo
def _to_loopback(host, *args, **kwargs):
    if host.endswith(".amazonaws.com"):
        host = "127.0.0.1"
    return _resolve(host, *args, **kwargs)
socket.getaddrinfo = _to_loopback
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
out = {"env": sorted(f"{k}={v}" for k, v in os.environ.items() if k in CREDENTIALS), "environ": {k: v for k, v in os.environ.items() if k != "TARGETS"}}
MODEL = "amazon.nova-lite-v1:0"
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
def converse(c, text):
    r = c.converse(modelId=MODEL, messages=[{"role": "user", "content": [{"text": text}]}])
    return r["output"]["message"]["content"][0]["text"]
def converse_stream(c, text):
    r = c.converse_stream(modelId=MODEL, messages=[{"role": "user", "content": [{"text": text}]}])
    return "".join(e["contentBlockDelta"]["delta"]["text"] for e in r["stream"] if "contentBlockDelta" in e)
def invoke_model(c, text):
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 32, "messages": [{"role": "user", "content": text}]}
    r = c.invoke_model(modelId=CLAUDE, body=json.dumps(body))
    return "".join(b["text"] for b in json.loads(r["body"].read())["content"])
CALLS = {"converse": converse, "converse_stream": converse_stream, "invoke_model": invoke_model}
for t in json.loads(os.environ["TARGETS"]):
    creds = t.get("creds") or {}
    c = boto3.client(
        "bedrock-runtime",
        region_name="us-east-1",
        endpoint_url=f"https://bedrock-runtime.us-east-1.amazonaws.com:{t['port']}",
        config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}),
        **creds,
    )
    for name in t["calls"]:
        key = f"{t['label']}.{name}"
        try:
            out[key] = {"ok": True, "text": CALLS[name](c, t["prompt"])}
        except botocore.exceptions.ClientError as e:
            meta = e.response.get("ResponseMetadata", {})
            out[key] = {
                "ok": False,
                "status": meta.get("HTTPStatusCode"),
                "code": e.response.get("Error", {}).get("Code"),
                "decision": meta.get("HTTPHeaders", {}).get("x-akto-guardrails-decision"),
            }
print(json.dumps(out))
"#;

/// Runs [`SCRIPT`] with `aws` as its AWS credentials; fails if its output
/// (its whole environment among it) holds a real credential.
async fn boto3(ca_bundle: &Path, aws: &[(&str, &str)], targets: &Value) -> Result<Value> {
    let env = ClientEnv::new(ca_bundle).with_timeout(Duration::from_secs(60));
    let ca = ca_bundle.to_string_lossy().to_string();
    let targets = targets.to_string();
    let mut vars = vec![
        ("AWS_CA_BUNDLE", ca.as_str()),
        ("TARGETS", targets.as_str()),
        // Nothing but the variables below: no profile, no instance metadata.
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    vars.extend_from_slice(aws);
    let out = python_script(&env, SCRIPT, &vars).await?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if holds_a_real_credential(&format!("{stdout}\n{stderr}")) {
        bail!("boto3's output holds a real credential");
    }
    let mut value: Value =
        serde_json::from_str(stdout.trim()).with_context(|| format!("boto3 printed {stdout:?}; stderr: {stderr}"))?;
    // Searched above; too long for failure messages.
    value.as_object_mut().map(|o| o.remove("environ"));
    Ok(value)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// The audit file once it holds at least `n` events.
async fn wait_for_events(path: &Path, n: usize) -> Result<Vec<Value>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let events: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if events.len() >= n || tokio::time::Instant::now() > deadline {
            return Ok(events);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_with_placeholders_is_redacted_and_signed_again_with_the_real_credentials() -> Result<()> {
    let captured = CapturedLog::default();
    // The only test of this binary: the proxy's tasks run on every worker
    // thread. The signer's own trace events are asked for too.
    telemetry::json_subscriber(EnvFilter::new("debug,aws_sigv4=trace"), captured.clone()).try_init()?;

    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    provider.expect_aws_credentials(AwsCredentialsExpected {
        access_key_id: REAL_AKID.into(),
        secret_access_key: REAL_SECRET.into(),
        session_token: Some(REAL_TOKEN.into()),
    });
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let audit = dir.path().join("audit.jsonl");
    let keys = dir.path().join("keys.toml");
    write_private(
        &keys,
        &format!(
            "[[real]]\nprovider = \"bedrock\"\nscope.workloads = [\"comm:python3\"]\n\
             aws_access_key_id = \"{REAL_AKID}\"\naws_secret_access_key = \"{REAL_SECRET}\"\n\
             aws_session_token = \"{REAL_TOKEN}\"\n"
        ),
    )?;
    let placeholder = KeysFile::open(&keys, "ik-")?.issue("bedrock", &["comm:python3".into()], "now")?;

    let config = Config {
        guardrails: GuardrailsConfig {
            enabled: true,
            backends: vec![Backend::Local],
            audit_file: audit.clone(),
            ..GuardrailsConfig::default()
        },
        keys: KeysConfig { enabled: true, file: keys.clone(), ..KeysConfig::default() },
        ..Config::default()
    };
    let metrics = Arc::new(interceptor::metrics::Metrics::new());
    let (hook, _handle) = dataplane::guardrails(&config, &metrics)?;
    let hook = hook.context("no hook")?;
    let as_comm = |comm: &str| Some(Workload { pid: 11, comm: comm.into(), ..Workload::default() });
    let settings = || ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() };
    let upstream = provider.local_addr();
    let covered =
        InProcessProxy::start_hooked_as(upstream, &upstream_ca, Some(hook.clone()), settings(), as_comm("python3"))
            .await?;
    let outside =
        InProcessProxy::start_hooked_as(upstream, &upstream_ca, Some(hook), settings(), as_comm("curl")).await?;
    // boto3 trusts each proxy's CA (and the fake's, for the direct calls).
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, format!("{}\n{}\n{}", covered.ca_pem, outside.ca_pem, pki.ca_pem()))?;
    let secret_prompt = format!("my card is {CARD}, please remember it");

    // 1. Placeholders only, in the environment: redacted, signed again,
    //    verified; the same placeholder from another workload is refused.
    let placeholder_env = [
        ("AWS_ACCESS_KEY_ID", placeholder.as_str()),
        ("AWS_SECRET_ACCESS_KEY", "placeholder-secret-anything"),
        ("AWS_SESSION_TOKEN", "placeholder-session-token"),
    ];
    let targets = json!([
        {"label": "covered", "port": covered.addr.port(), "prompt": secret_prompt,
         "calls": ["converse", "converse_stream", "invoke_model"]},
        {"label": "outside", "port": outside.addr.port(), "prompt": "hello", "calls": ["converse"]},
    ]);
    let out = boto3(&bundle, &placeholder_env, &targets).await?;
    assert_eq!(
        out["env"],
        json!([
            format!("AWS_ACCESS_KEY_ID={placeholder}"),
            "AWS_SECRET_ACCESS_KEY=placeholder-secret-anything",
            "AWS_SESSION_TOKEN=placeholder-session-token",
        ])
    );
    for call in ["converse", "converse_stream", "invoke_model"] {
        let answer = &out[format!("covered.{call}")];
        assert_eq!(answer["ok"], true, "{call}: {out}");
        assert!(!answer["text"].as_str().unwrap_or_default().is_empty(), "{call}: {out}");
    }
    let outside_answer = &out["outside.converse"];
    assert_eq!((outside_answer["status"].as_u64(), outside_answer["decision"].as_str()), (Some(403), Some("blocked")));

    let seen = provider.wait_requests(3, Duration::from_secs(10)).await?;
    assert_eq!(seen.len(), 3, "a refused request reached the provider");
    for request in &seen {
        let check = request.sigv4.as_ref().context("no SigV4 check")?;
        assert!(check.is_verified(), "{} failed the provider's SigV4 check: {check:?}", request.path);
        if let SigV4Check::Verified { access_key_id, region, service, .. } = check {
            assert_eq!(
                (access_key_id.as_str(), region.as_str(), service.as_str()),
                (REAL_AKID, "us-east-1", "bedrock")
            );
        }
        let body = String::from_utf8_lossy(&request.body);
        assert!(!body.contains(CARD) && !body.contains("4111111111111111"), "{}: not redacted", request.path);
        assert!(body.contains("please remember it"), "{}: the rest of the prompt is lost: {body}", request.path);
        let headers = format!("{:?}", request.headers);
        assert!(!headers.contains("ik-") && !headers.contains("placeholder"), "a placeholder reached the provider");
    }
    assert!(seen.iter().any(|r| r.path.ends_with("/converse-stream")), "no streamed request");

    // 2. Credentials a workload holds for itself: from a brokered
    //    workload, refused; from one brokering does not cover, left alone,
    //    and then a redaction on its signed body is blocked as before.
    //    Straight to the fake, boto3's own signature passes its check with
    //    the real credentials and fails with a wrong secret.
    let own_env = [("AWS_ACCESS_KEY_ID", OWN_AKID), ("AWS_SECRET_ACCESS_KEY", OWN_SECRET)];
    let real = json!({"aws_access_key_id": REAL_AKID, "aws_secret_access_key": REAL_SECRET,
                      "aws_session_token": REAL_TOKEN});
    let wrong = json!({"aws_access_key_id": REAL_AKID, "aws_secret_access_key": "not-the-secret",
                       "aws_session_token": REAL_TOKEN});
    let targets = json!([
        {"label": "brokered_own", "port": covered.addr.port(), "prompt": "hello", "calls": ["converse"]},
        {"label": "unbrokered", "port": outside.addr.port(), "prompt": secret_prompt, "calls": ["converse"]},
        {"label": "direct", "port": upstream.port(), "prompt": "hello", "calls": ["converse"], "creds": real},
        {"label": "direct_wrong", "port": upstream.port(), "prompt": "hello", "calls": ["converse"], "creds": wrong},
    ]);
    let out = boto3(&bundle, &own_env, &targets).await?;
    for label in ["brokered_own", "unbrokered"] {
        let answer = &out[format!("{label}.converse")];
        assert_eq!((answer["status"].as_u64(), answer["decision"].as_str()), (Some(403), Some("blocked")), "{out}");
    }
    assert_eq!(out["direct.converse"]["ok"], true, "{out}");
    assert_eq!(out["direct_wrong.converse"]["code"], "InvalidSignatureException", "{out}");
    let seen = provider.wait_requests(5, Duration::from_secs(10)).await?;
    assert_eq!(seen.len(), 5, "a refused or blocked request reached the provider");
    assert!(seen[3].sigv4.as_ref().is_some_and(SigV4Check::is_verified), "boto3's own signature: {:?}", seen[3].sigv4);

    // The audit: the refusals and the block, each with its reason; neither
    // the audit nor the proxy's log holds a real credential.
    let events = wait_for_events(&audit, 6).await?;
    let audit_text = std::fs::read_to_string(&audit)?;
    assert!(!holds_a_real_credential(&audit_text), "the audit log holds a real credential");
    let blocks: Vec<&Value> = events.iter().filter(|e| e["decision"] == "block").collect();
    let reasons: Vec<String> = blocks.iter().map(|e| e.to_string()).collect();
    for expected in ["outside its scope", "not a placeholder", "signed with AWS SigV4"] {
        assert!(reasons.iter().any(|r| r.contains(expected)), "no block for `{expected}`: {reasons:#?}");
    }
    let log = captured.text();
    assert!(log.contains("request refused by key brokering"), "the refusals were not logged");
    assert!(log.contains("signed again with the brokered AWS credentials"), "the signing was not logged");
    // `aws_sigv4=trace` is on: the signer's own events (which name the
    // access key id) must not reach the log either.
    assert!(!holds_a_real_credential(&log), "the proxy's log holds a real credential");
    Ok(())
}
