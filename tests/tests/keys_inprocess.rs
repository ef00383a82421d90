//! In-process: key brokering through the proxy with the fake provider. The
//! provider receives only the real key; the client's side, the proxy's log
//! and the audit log hold only the placeholder; each misuse is answered 403
//! and audited; a changed brokering file takes effect without a restart.

use std::{os::unix::fs::PermissionsExt as _, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use interceptor::{
    config::{Backend, Config, GuardrailsConfig, KeysConfig, OversizeAction},
    dataplane::{self, GuardrailsHandle},
    guardrails::keys::{KeysFile, placeholder_id},
    proxy::ProxySettings,
    telemetry,
    testing::provider::{FakeProvider, TestPki},
    workload::Workload,
};
use interceptor_tests::{
    captured::CapturedLog,
    inprocess::{InProcessProxy, client_for},
};
use tracing_subscriber::{EnvFilter, util::SubscriberInitExt as _};

const REAL_OPENAI: &str = "sk-proj-REALopenaiKEY-for-team-a-0001";
const REAL_ANTHROPIC: &str = "sk-ant-REALanthropicKEY-team-a-0002";
const REAL_GEMINI: &str = "AIzaREALgeminiKEY-team-a-0003";
const NEW_OPENAI: &str = "sk-proj-ROTATEDopenaiKEY-team-a-0004";
const REAL_AKID: &str = "AKIAREALBEDROCKTEAMA5";
const REAL_AWS_SECRET: &str = "RealAwsSecretForTeamA00000000000000000005";

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn real_keys(openai: &str) -> String {
    format!(
        "[[real]]\nprovider = \"openai\"\nscope.workloads = [\"comm:agent\"]\nkey = \"{openai}\"\n\n\
         [[real]]\nprovider = \"anthropic\"\nscope.workloads = [\"comm:agent\"]\nkey = \"{REAL_ANTHROPIC}\"\n\n\
         [[real]]\nprovider = \"gemini\"\nscope.workloads = [\"comm:agent\"]\nkey = \"{REAL_GEMINI}\"\n\n\
         [[real]]\nprovider = \"bedrock\"\nscope.workloads = [\"comm:agent\"]\n\
         aws_access_key_id = \"{REAL_AKID}\"\naws_secret_access_key = \"{REAL_AWS_SECRET}\"\n"
    )
}

/// Whether any real key appears in `text` (the failure message never
/// prints one).
fn holds_a_real_key(text: &str) -> bool {
    [REAL_OPENAI, REAL_ANTHROPIC, REAL_GEMINI, NEW_OPENAI, REAL_AKID, REAL_AWS_SECRET].iter().any(|k| text.contains(k))
}

struct Setup {
    provider: FakeProvider,
    handle: GuardrailsHandle,
    audit: std::path::PathBuf,
    keys: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// The guardrails with brokering on (the file at `keys`), behind proxies
/// attributing connections to `comm:agent` and `comm:intruder`.
async fn setup() -> Result<(Setup, InProcessProxy, InProcessProxy)> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let audit = dir.path().join("audit.jsonl");
    let keys = dir.path().join("keys.toml");
    write_private(&keys, &real_keys(REAL_OPENAI))?;
    let guardrails = GuardrailsConfig {
        enabled: true,
        backends: vec![Backend::Local],
        audit_file: audit.clone(),
        ..GuardrailsConfig::default()
    };
    let config = Config {
        guardrails,
        keys: KeysConfig { enabled: true, file: keys.clone(), ..KeysConfig::default() },
        ..Config::default()
    };
    let metrics = Arc::new(interceptor::metrics::Metrics::new());
    let (hook, handle) = dataplane::guardrails(&config, &metrics)?;
    let hook = hook.context("no hook")?;
    let as_comm = |comm: &str| Some(Workload { pid: 7, comm: comm.into(), ..Workload::default() });
    // Bodies over 16 KiB are passed uninspected: brokering still applies.
    let settings = || ProxySettings {
        client_hello_timeout: Duration::from_secs(2),
        max_inspected_body: 16 * 1024,
        oversize: OversizeAction::Pass,
        ..ProxySettings::default()
    };
    let upstream = provider.local_addr();
    let agent =
        InProcessProxy::start_hooked_as(upstream, &upstream_ca, Some(hook.clone()), settings(), as_comm("agent"))
            .await?;
    let intruder =
        InProcessProxy::start_hooked_as(upstream, &upstream_ca, Some(hook), settings(), as_comm("intruder")).await?;
    Ok((Setup { provider, handle, audit, keys, _dir: dir }, agent, intruder))
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_gets_the_real_key_and_everything_else_only_the_placeholder() -> Result<()> {
    let captured = CapturedLog::default();
    // The only test of this binary: the proxy's tasks run on every worker thread.
    telemetry::json_subscriber(EnvFilter::new("debug"), captured.clone()).try_init()?;
    let (mut s, agent, intruder) = setup().await?;

    let mut file = KeysFile::open(&s.keys, "ik-")?;
    let openai = file.issue("openai", &["comm:agent".into()], "now")?;
    let anthropic = file.issue("anthropic", &["comm:agent".into()], "now")?;
    let gemini = file.issue("gemini", &["comm:agent".into()], "now")?;
    drop(file);
    s.handle.reload_keys_if_changed("ik-");

    let ca = agent.ca_pem.clone();
    let openai_client = client_for("api.openai.com", agent.addr, &[&ca], false)?;
    let anthropic_client = client_for("api.anthropic.com", agent.addr, &[&ca], false)?;
    let gemini_client = client_for("generativelanguage.googleapis.com", agent.addr, &[&ca], false)?;

    // Swapped in each place the providers' clients put a key.
    let resp = openai_client
        .post("https://api.openai.com/v1/chat/completions")
        .bearer_auth(&openai)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let resp = anthropic_client
        .post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", &anthropic)
        .header("content-type", "application/json")
        .body(r#"{"model":"claude","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let url = format!("https://generativelanguage.googleapis.com/v1beta/models/gemini:generateContent?key={gemini}");
    let resp = gemini_client
        .post(&url)
        .header("content-type", "application/json")
        .body(r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#)
        .send()
        .await?;
    assert!(resp.status().is_success(), "{}", resp.status());
    let resp = gemini_client
        .post("https://generativelanguage.googleapis.com/v1beta/models/gemini:generateContent")
        .header("x-goog-api-key", &gemini)
        .header("content-type", "application/json")
        .body(r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#)
        .send()
        .await?;
    assert!(resp.status().is_success(), "{}", resp.status());

    let got = s.provider.wait_requests(4, Duration::from_secs(10)).await?;
    let seen: Vec<String> = got.iter().map(|r| format!("{} {:?}", r.path, r.headers)).collect();
    assert!(seen[0].contains(&format!("Bearer {REAL_OPENAI}")), "openai: the provider did not get the real key");
    assert!(seen[1].contains(&format!("\"x-api-key\", \"{REAL_ANTHROPIC}\"")), "anthropic: no real key");
    assert!(got[2].path.ends_with(&format!("?key={REAL_GEMINI}")), "gemini: no real key in the query");
    assert!(seen[3].contains(&format!("\"x-goog-api-key\", \"{REAL_GEMINI}\"")), "gemini: no real key in the header");
    for (request, text) in got.iter().zip(&seen) {
        assert!(!text.contains("ik-"), "a placeholder reached the provider at {}", request.path);
    }

    // A body over the inspection limit: swapped all the same, and a real
    // key in it refused.
    let big = format!(r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(32 * 1024));
    let resp = openai_client
        .post("https://api.openai.com/v1/chat/completions")
        .bearer_auth(&openai)
        .header("content-type", "application/json")
        .body(big.clone())
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let last = s.provider.wait_requests(5, Duration::from_secs(10)).await?.pop().context("no request")?;
    assert!(last.body.len() > 32 * 1024, "not the big request");
    assert!(last.header("authorization") == Some(format!("Bearer {REAL_OPENAI}").as_str()), "uninspected: no real key");
    let resp = openai_client
        .post("https://api.openai.com/v1/chat/completions")
        .bearer_auth("sk-proj-someone-elses-key")
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await?;
    assert_eq!(resp.status(), 403, "uninspected: a real key from a brokered workload passed");

    // A WebSocket upgrade (OpenAI's Realtime API) carries the key in its
    // request head: swapped there too, and refused out of scope.
    let mut ws = websocket(&agent, REALTIME, &openai).await?;
    ws.close(None).await?;
    let last = s.provider.wait_requests(6, Duration::from_secs(10)).await?.pop().context("no request")?;
    assert!(last.path.starts_with("/v1/realtime"), "not the upgrade: {}", last.path);
    assert!(last.header("authorization") == Some(format!("Bearer {REAL_OPENAI}").as_str()), "upgrade: no real key");
    match websocket(&intruder, REALTIME, &openai).await {
        Err(error) => assert!(error.to_string().contains("403"), "{error}"),
        Ok(_) => panic!("a stolen placeholder opened a WebSocket"),
    }

    // Refused, audited, never forwarded.
    let refusals: Vec<(&reqwest::Client, reqwest::RequestBuilder, &str)> = vec![
        (
            &openai_client,
            openai_client
                .post("https://api.openai.com/v1/chat/completions")
                .bearer_auth("ik-neverIssued0000000000000000000"),
            "unknown or revoked placeholder",
        ),
        (
            &openai_client,
            openai_client.post("https://api.openai.com/v1/chat/completions").bearer_auth(&anthropic),
            "a placeholder for anthropic sent to openai",
        ),
        (
            &openai_client,
            openai_client.post("https://api.openai.com/v1/chat/completions").bearer_auth("sk-proj-someone-elses-key"),
            "not a placeholder",
        ),
    ];
    for (_, request, reason) in refusals {
        let resp = request.header("content-type", "application/json").body(CHAT).send().await?;
        assert_eq!(resp.status(), 403, "{reason}");
        assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
        let body: serde_json::Value = resp.json().await?;
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "`{error}` lacks `{reason}`");
    }
    // A placeholder replayed by a workload outside its scope.
    let stolen = client_for("api.openai.com", intruder.addr, &[&intruder.ca_pem], false)?;
    let resp = stolen
        .post("https://api.openai.com/v1/chat/completions")
        .bearer_auth(&openai)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await?.contains("outside its scope"));
    assert_eq!(s.provider.requests().len(), 6, "a refused request reached the provider");

    // Revoked, then the real key rotated: both take effect on reload.
    let mut file = KeysFile::open(&s.keys, "ik-")?;
    file.revoke(&placeholder_id(&anthropic)[..10])?;
    drop(file);
    let text = std::fs::read_to_string(&s.keys)?.replace(REAL_OPENAI, NEW_OPENAI);
    write_private(&s.keys, &text)?;
    s.handle.reload_keys_if_changed("ik-");
    let resp = anthropic_client
        .post("https://api.anthropic.com/v1/messages")
        .header("x-api-key", &anthropic)
        .header("content-type", "application/json")
        .body(r#"{"model":"claude","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await?;
    assert_eq!(resp.status(), 403, "a revoked placeholder was accepted");
    let resp = openai_client
        .post("https://api.openai.com/v1/chat/completions")
        .bearer_auth(&openai)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);
    let last = s.provider.wait_requests(7, Duration::from_secs(10)).await?.pop().context("no request")?;
    assert!(last.header("authorization") == Some(format!("Bearer {NEW_OPENAI}").as_str()), "not the rotated key");

    // A file others can read is refused on reload; the running keys stay.
    std::fs::set_permissions(&s.keys, std::fs::Permissions::from_mode(0o644))?;
    s.handle.reload_keys_if_changed("ik-");
    let resp = openai_client
        .post("https://api.openai.com/v1/chat/completions")
        .bearer_auth(&openai)
        .header("content-type", "application/json")
        .body(CHAT)
        .send()
        .await?;
    assert_eq!(resp.status(), 200);

    // The audit log: the refusals with their rule, no real key anywhere.
    let audit = wait_for_blocks(&s.audit, 7).await?;
    assert!(!holds_a_real_key(&audit), "the audit log holds a real key");
    let refused: Vec<serde_json::Value> = blocks(&audit);
    assert_eq!(refused.len(), 7, "{audit}");
    for event in &refused {
        assert_eq!(event["rules"][0], "key_brokering", "{event}");
        assert_eq!(event["backends"][0], "keys", "{event}");
    }
    let log = captured.text();
    assert!(log.contains("request refused by key brokering"), "the refusals were not logged");
    assert!(log.contains("can be read by others"), "the readable file was not reported");
    assert!(!holds_a_real_key(&log), "the proxy's log holds a real key");

    // A Bedrock placeholder access key id: signed again for a body the
    // proxy holds whole; refused for one over the inspection limit, whose
    // signature could not cover it.
    std::fs::set_permissions(&s.keys, std::fs::Permissions::from_mode(0o600))?;
    let mut file = KeysFile::open(&s.keys, "ik-")?;
    let bedrock = file.issue("bedrock", &["comm:agent".into()], "now")?;
    drop(file);
    s.handle.reload_keys_if_changed("ik-");
    let host = "bedrock-runtime.us-east-1.amazonaws.com";
    let bedrock_client = client_for(host, agent.addr, &[&ca], false)?;
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={bedrock}/20260101/us-east-1/bedrock/aws4_request, \
         SignedHeaders=content-type;host;x-amz-date, Signature=00ff"
    );
    let converse = |body: String| {
        bedrock_client
            .post(format!("https://{host}/model/amazon.nova-lite-v1%3A0/converse"))
            .header("authorization", &auth)
            .header("x-amz-date", "20260101T000000Z")
            .header("content-type", "application/json")
            .body(body)
    };
    let resp = converse(r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#.into()).send().await?;
    assert_eq!(resp.status(), 200);
    let before = s.provider.requests().len();
    let last = s.provider.requests().pop().context("no request")?;
    let signed = last.header("authorization").unwrap_or_default();
    assert!(signed.starts_with(&format!("AWS4-HMAC-SHA256 Credential={REAL_AKID}/")), "not signed again");
    assert!(!format!("{:?}", last.headers).contains("ik-"), "a placeholder reached the provider");
    let big = format!(r#"{{"messages":[{{"role":"user","content":[{{"text":"{}"}}]}}]}}"#, "x".repeat(32 * 1024));
    let resp = converse(big).send().await?;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await?.contains("cannot be signed again"));
    assert_eq!(s.provider.requests().len(), before, "the uninspected request reached the provider");
    let audit = wait_for_blocks(&s.audit, 8).await?;
    assert_eq!(blocks(&audit).len(), 8, "{audit}");
    assert!(!holds_a_real_key(&audit) && !holds_a_real_key(&captured.text()), "a real AWS credential was logged");
    Ok(())
}

fn blocks(audit: &str) -> Vec<serde_json::Value> {
    audit
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["decision"] == "block")
        .collect()
}

/// The audit file once it records at least `n` blocks.
async fn wait_for_blocks(path: &Path, n: usize) -> Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if blocks(&text).len() >= n || tokio::time::Instant::now() > deadline {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const REALTIME: &str = "wss://api.openai.com/v1/realtime?model=gpt-realtime";

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket through `proxy` to `url`, authorized with `bearer`.
async fn websocket(proxy: &InProcessProxy, url: &str, bearer: &str) -> Result<Ws> {
    use rustls_pki_types::pem::PemObject as _;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(proxy.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("api.openai.com")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", format!("Bearer {bearer}").parse()?);
    let (ws, _) = tokio_tungstenite::client_async(request, tls).await?;
    Ok(ws)
}
