//! Privileged end-to-end guardrail tests with the redirect active: the
//! official OpenAI and Anthropic Python SDKs, pointed at their normal hosts
//! (resolved to the fake provider inside the namespace), with no proxy
//! settings; and a live policy reload with a valid and an invalid file.

use std::time::Duration;

use anyhow::{Result, bail};
use interceptor::testing::{clients::python_script, require_privileges};
use interceptor_tests::stage::Stage;
use serde_json::Value;

/// Runs a Python snippet with the SDKs in the stage's client cgroup and
/// namespace; it prints one JSON object.
async fn sdk(stage: &Stage, script: &str) -> Result<Value> {
    let bundle = stage.bundle.to_string_lossy().to_string();
    let vars = [
        ("SSL_CERT_FILE", bundle.as_str()),
        ("OPENAI_API_KEY", "sk-test-not-a-real-key"),
        ("ANTHROPIC_API_KEY", "sk-ant-test-not-a-real-key"),
        ("OPENAI_MAX_RETRIES", "0"),
    ];
    let out = python_script(&stage.env(), script, &vars).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match serde_json::from_str(stdout.trim()) {
        Ok(v) => Ok(v),
        Err(_) => bail!("sdk script printed {stdout:?}; stderr: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

const OPENAI: &str = r#"
import json, openai
# Trust comes from SSL_CERT_FILE, as an operator would set it.
client = openai.OpenAI(max_retries=0)
out = {}
def call(prompt):
    try:
        r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": prompt}])
        return {"ok": True, "text": r.choices[0].message.content}
    except openai.APIStatusError as e:
        return {"ok": False, "status": e.status_code, "body": e.response.text}
out["plain"] = call("hello")
out["card"] = call("charge card 4111 1111 1111 1111 please")
out["key"] = call("-----BEGIN RSA PRIVATE KEY-----\n" + "MIIBOgIBAAJBAK" * 4 + "\n-----END RSA PRIVATE KEY-----")
print(json.dumps(out))
"#;

const ANTHROPIC: &str = r#"
import json, anthropic
client = anthropic.Anthropic(max_retries=0)
out = {}
def call(prompt):
    try:
        r = client.messages.create(model="claude-sonnet-4-5", max_tokens=64, messages=[{"role": "user", "content": prompt}])
        return {"ok": True, "text": "".join(b.text for b in r.content if b.type == "text")}
    except anthropic.APIStatusError as e:
        return {"ok": False, "status": e.status_code, "body": e.response.text}
out["plain"] = call("hello")
out["card"] = call("my card is 4111 1111 1111 1111")
out["key"] = call("-----BEGIN RSA PRIVATE KEY-----\n" + "MIIBOgIBAAJBAK" * 4 + "\n-----END RSA PRIVATE KEY-----")
print(json.dumps(out))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdks_are_guardrailed_without_proxy_settings() -> Result<()> {
    if !require_privileges("official_sdks_are_guardrailed_without_proxy_settings") {
        return Ok(());
    }
    let stage = Stage::new("sdk", "ebpf", "")?;
    for (name, script, path) in [("openai", OPENAI, "/v1/chat/completions"), ("anthropic", ANTHROPIC, "/v1/messages")] {
        let out = sdk(&stage, script).await?;
        assert_eq!(out["plain"]["ok"], true, "{name}: {out}");
        assert_eq!(out["card"]["ok"], true, "{name}: {out}");
        assert_eq!(out["key"]["ok"], false, "{name}: a private key must be blocked: {out}");
        assert_eq!(out["key"]["status"], 403, "{name}: {out}");
        let body: Value = serde_json::from_str(out["key"]["body"].as_str().unwrap_or("{}"))?;
        assert!(body["error"].as_str().is_some_and(|e| e.contains("private_key")), "{name}: {body}");

        let seen: Vec<_> = stage.provider.requests().into_iter().filter(|r| r.path.starts_with(path)).collect();
        assert_eq!(seen.len(), 2, "{name}: the blocked call never reached the provider: {seen:#?}");
        let card = String::from_utf8_lossy(&seen[1].body).to_string();
        assert!(!card.contains("4111 1111 1111 1111"), "{name}: card not redacted: {card}");
        assert!(card.contains("REDACTED"), "{name}: {card}");
        let rec = stage.records_of("python3")?;
        assert_eq!(rec["mode"], "intercept", "{rec}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_file_reloads_live_and_an_invalid_one_is_rejected() -> Result<()> {
    if !require_privileges("the_policy_file_reloads_live_and_an_invalid_one_is_rejected") {
        return Ok(());
    }
    // The policy file lives next to the stage; it is written before start.
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    let blocking = "[[rules]]\nid = \"codename\"\ndetectors = [\"codename\"]\naction = \"block\"\n\n\
                    [[detectors]]\nname = \"codename\"\nkeywords = [\"project zebra\"]\n";
    let allowing = blocking.replace("action = \"block\"", "action = \"alert\"");
    std::fs::write(&policy, blocking)?;
    let extra = format!("[guardrails]\npolicy_file = \"{}\"\n", policy.display());
    let stage = Stage::new("reload", "ebpf", &extra)?;
    let script = OPENAI.replace("call(\"hello\")", "call(\"tell me about Project Zebra\")");
    let stage = &stage;
    let ask = |_: &str| sdk(stage, &script);

    let out = ask("tell me about Project Zebra").await?;
    assert_eq!(out["plain"]["status"], 403, "the keyword rule blocks: {out}");

    std::fs::write(&policy, &allowing)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = ask("tell me about Project Zebra").await?;
        if out["plain"]["ok"] == true {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "new policy never applied: {out}\n{}", stage.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    std::fs::write(&policy, "[[rules]]\nid = \"broken\"\naction = \"explode\"\n")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !stage.proxy.log_text().contains("guardrail policy rejected") {
        assert!(std::time::Instant::now() < deadline, "invalid policy not reported:\n{}", stage.proxy.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = ask("tell me about Project Zebra").await?;
    assert_eq!(out["plain"]["ok"], true, "the previous policy keeps running: {out}");
    // A policy file replaces the built-in policy: this one has no credential rule.
    assert_eq!(out["key"]["ok"], true, "{out}");
    Ok(())
}

/// One provider's endpoints and request shape.
struct Shape {
    name: &'static str,
    host: &'static str,
    path: &'static str,
    stream_path: &'static str,
    body: fn(&str, bool) -> Value,
}

fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "openai",
            host: "api.openai.com",
            path: "/v1/chat/completions",
            stream_path: "/v1/chat/completions",
            body: |p, stream| serde_json::json!({"model": "gpt-4o", "max_tokens": 32, "stream": stream, "messages": [{"role": "user", "content": p}]}),
        },
        Shape {
            name: "anthropic",
            host: "api.anthropic.com",
            path: "/v1/messages",
            stream_path: "/v1/messages",
            body: |p, stream| serde_json::json!({"model": "claude-sonnet-4-5", "max_tokens": 32, "stream": stream, "messages": [{"role": "user", "content": p}]}),
        },
        Shape {
            name: "bedrock",
            host: "bedrock-runtime.us-east-1.amazonaws.com",
            path: "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/invoke",
            stream_path: "/model/anthropic.claude-3-5-sonnet-20240620-v1:0/invoke-with-response-stream",
            body: |p, _| serde_json::json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 32, "messages": [{"role": "user", "content": p}]}),
        },
        Shape {
            name: "gemini",
            host: "generativelanguage.googleapis.com",
            path: "/v1beta/models/gemini-2.0-flash:generateContent",
            stream_path: "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse",
            body: |p, _| serde_json::json!({"generationConfig": {"maxOutputTokens": 32}, "contents": [{"role": "user", "parts": [{"text": p}]}]}),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_provider_shape_is_guardrailed_through_the_redirect() -> Result<()> {
    use interceptor::testing::clients::{HttpRequest, HttpVersion, curl};
    if !require_privileges("every_provider_shape_is_guardrailed_through_the_redirect") {
        return Ok(());
    }
    let stage = Stage::new("shapes", "ebpf", "[guardrails]\nstream_mode = \"enforce\"\n")?;
    let env = stage.env();
    let key = format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIBOgIBAAJBAK".repeat(4));
    let token = format!("ghp_{}", "a1B2".repeat(9));
    for shape in shapes() {
        let url = |path: &str| format!("https://{}{}", shape.host, path);
        let n = shape.name;

        // A card number is redacted before the provider sees it; the rest of
        // the body is untouched.
        let body = (shape.body)("pay with 4111 1111 1111 1111", false);
        let r = curl(&env, &HttpRequest::post_json(&url(shape.path), &body), HttpVersion::Http2).await?;
        assert_eq!(r.status, 200, "{n}: {}", r.body_text());
        let seen = stage.provider.requests().pop().expect("forwarded");
        let sent: Value = serde_json::from_slice(&seen.body)?;
        let text = sent.to_string();
        assert!(!text.contains("4111 1111 1111 1111") && text.contains("REDACTED"), "{n}: {text}");
        let mut expected = body.clone();
        let mut got = sent.clone();
        for v in [&mut expected, &mut got] {
            strip_strings_with(v, "pay with");
        }
        assert_eq!(got, expected, "{n}: only the card may change");

        // A private key is blocked with the exact contract; nothing reaches the provider.
        let before = stage.provider.requests().len();
        let body = (shape.body)(&key, false);
        let r = curl(&env, &HttpRequest::post_json(&url(shape.path), &body), HttpVersion::Http11).await?;
        assert_eq!(r.status, 403, "{n}");
        assert_eq!(r.header("x-akto-guardrails-decision"), Some("blocked"), "{n}");
        let json: Value = serde_json::from_slice(&r.body)?;
        assert_eq!(json.as_object().map(|o| o.len()), Some(1), "{n}: {json}");
        assert!(json["error"].is_string(), "{n}: {json}");
        assert_eq!(stage.provider.requests().len(), before, "{n}: the provider was called");

        // A streamed answer that leaks a token is cut with an error event.
        let body = (shape.body)("hello", true);
        let req = HttpRequest::post_json(&url(shape.stream_path), &body)
            .header("x-fake-reply", &format!("here: {token} done"));
        let r = curl(&env, &req, HttpVersion::Http2).await?;
        let text = String::from_utf8_lossy(&r.body).to_string();
        assert!(!text.contains(&token), "{n}: the secret reached the client: {text}");
        assert!(text.contains("rror") || text.contains("xception"), "{n}: no error event: {text}");
    }
    Ok(())
}

/// Replaces every string containing `marker` with a fixed value.
fn strip_strings_with(v: &mut Value, marker: &str) {
    match v {
        Value::String(s) if s.contains(marker) => *s = "<text>".into(),
        Value::Array(a) => a.iter_mut().for_each(|x| strip_strings_with(x, marker)),
        Value::Object(o) => o.values_mut().for_each(|x| strip_strings_with(x, marker)),
        _ => {}
    }
}

/// A client that reports its own pid and local port, and sends a private key
/// to the provider through the plain standard library.
const LEAKER: &str = r#"
import json, os, ssl, http.client
ctx = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
c = http.client.HTTPSConnection("api.openai.com", 443, context=ctx, timeout=10)
c.connect()
port = c.sock.getsockname()[1]
key = "-----BEGIN RSA PRIVATE KEY-----\n" + "MIIBOgIBAAJBAK" * 4 + "\n-----END RSA PRIVATE KEY-----"
body = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": key}]})
c.request("POST", "/v1/chat/completions", body=body,
          headers={"content-type": "application/json", "authorization": "Bearer sk-test"})
r = c.getresponse()
print(json.dumps({"pid": os.getpid(), "port": port, "status": r.status, "body": r.read().decode()}))
"#;

/// The audit events the interceptor logged so far.
fn audit_events(stage: &Stage) -> Vec<Value> {
    stage.proxy.audit_events()
}

/// The audit event for the request from client port `port`, waiting for it.
async fn audit_event_from(stage: &Stage, port: u64) -> Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let suffix = format!(":{port}");
        if let Some(e) = audit_events(stage)
            .into_iter()
            .find(|e| e["direction"] == "request" && e["client"].as_str().is_some_and(|c| c.ends_with(&suffix)))
        {
            return Ok(e);
        }
        if std::time::Instant::now() > deadline {
            bail!("no audit event from port {port}:\n{}", stage.proxy.log_text());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// iptables mode keeps no record of the process behind a connection; the
/// interceptor finds it from the client's socket. A Python process and a
/// curl process leaking a private key are blocked, and the audit event and
/// connection record name each one (pid, name, uid, cgroup), as in eBPF
/// mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn iptables_mode_names_the_process_behind_each_blocked_request() -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;

    use interceptor::testing::clients::{HttpRequest, HttpVersion, curl};
    if !require_privileges("iptables_mode_names_the_process_behind_each_blocked_request") {
        return Ok(());
    }
    let stage = Stage::new("attrib_ipt", "iptables", "")?;
    let cgroup_id = std::fs::metadata(stage.client_cg.path())?.ino();

    let out = sdk(&stage, LEAKER).await?;
    assert_eq!(out["status"], 403, "a private key must be blocked: {out}");
    assert!(out["body"].as_str().is_some_and(|b| b.contains("private_key")), "{out}");
    assert!(stage.provider.requests().is_empty(), "the key reached the provider");
    let pid = out["pid"].as_u64().expect("pid");
    let port = out["port"].as_u64().expect("port");
    let event = audit_event_from(&stage, port).await?;
    assert_eq!(event["decision"], "block", "{event}");
    let w = &event["workload"];
    assert_eq!(w["pid"], pid, "the audit event names the client process: {event}");
    assert_eq!(w["comm"], "python3", "{event}");
    assert_eq!(w["uid"], 0, "{event}");
    assert_eq!(w["cgroup_id"], cgroup_id, "{event}");
    let rec = stage.record(port as u16)?;
    assert_eq!((&rec["pid"], &rec["tid"], &rec["comm"]), (&pid.into(), &pid.into(), &"python3".into()), "{rec}");
    assert_eq!(rec["cgroup_id"], cgroup_id, "{rec}");
    assert_eq!(rec["mode"], "intercept", "{rec}");

    // Another program, another process.
    let body = serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content":
        "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----"}]});
    let req = HttpRequest::post_json("https://api.openai.com/v1/chat/completions", &body);
    let r = curl(&stage.env(), &req, HttpVersion::Http11).await?;
    assert_eq!(r.status, 403, "{}", r.body_text());
    assert!(stage.provider.requests().is_empty(), "the key reached the provider");
    let event = audit_event_from(&stage, u64::from(r.local_port)).await?;
    assert_eq!(event["workload"]["comm"], "curl", "{event}");
    assert!(event["workload"]["pid"].as_u64().is_some_and(|p| p != pid && p != 0), "{event}");
    let rec = stage.record(r.local_port)?;
    assert_eq!(rec["comm"], "curl", "{rec}");
    assert_eq!(rec["pid"], event["workload"]["pid"], "{rec}");
    Ok(())
}
