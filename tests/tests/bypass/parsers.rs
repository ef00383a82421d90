//! Shapes and encodings: a ChatGPT conversation, a body of a shape no parser
//! knows, a client-chosen `x-` content coding and UTF-16 JSON, each carrying
//! a private key from a process in the redirected cgroup to a provider name
//! (resolved to the fake provider in the namespace). Each asserts that the
//! provider never received the key and that an audit event says why.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use base64::Engine as _;
use interceptor::testing::{clients::python_script, require_privileges};
use interceptor_tests::stage::Stage;
use serde_json::{Value, json};

const KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n-----END RSA PRIVATE KEY-----";

/// Sends one request with Python's `http.client` (exact headers and body
/// bytes) from the stage's client cgroup; prints `{"status", "body"}`.
const SEND: &str = r#"
import base64, http.client, json, os, ssl
req = json.loads(os.environ["REQUEST"])
conn = http.client.HTTPSConnection(req["host"], 443, context=ssl.create_default_context(), timeout=20)
conn.request("POST", req["path"], body=base64.b64decode(req["body"]), headers=req["headers"])
resp = conn.getresponse()
print(json.dumps({"status": resp.status, "body": resp.read().decode("utf-8", "replace")}))
"#;

struct Bypass {
    stage: Stage,
    audit: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Bypass {
    fn start(name: &str) -> Result<Bypass> {
        let dir = tempfile::tempdir()?;
        let audit = dir.path().join("audit.jsonl");
        let stage = Stage::new(name, "ebpf", &format!("[guardrails]\naudit_file = \"{}\"\n", audit.display()))?;
        Ok(Bypass { stage, audit, _dir: dir })
    }

    async fn send(&self, host: &str, path: &str, headers: Value, body: &[u8]) -> Result<(u16, String)> {
        let request = json!({
            "host": host,
            "path": path,
            "headers": headers,
            "body": base64::engine::general_purpose::STANDARD.encode(body),
        })
        .to_string();
        let bundle = self.stage.bundle.to_string_lossy().to_string();
        let out = python_script(&self.stage.env(), SEND, &[("SSL_CERT_FILE", &bundle), ("REQUEST", &request)]).await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Ok(v) = serde_json::from_str::<Value>(stdout.trim()) else {
            bail!("client printed {stdout:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
        };
        Ok((v["status"].as_u64().unwrap_or(0) as u16, v["body"].as_str().unwrap_or_default().to_string()))
    }

    /// The first request audit event, once written.
    fn request_event(&self) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(&self.audit).unwrap_or_default();
            let found = text
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|e| e["direction"] == "request");
            if let Some(event) = found {
                return Ok(event);
            }
            if Instant::now() > deadline {
                bail!("no request audit event; log:\n{}", self.stage.proxy.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Nothing the provider received holds the key, in any charset.
    fn provider_never_received_the_key(&self) {
        for r in self.stage.provider.requests() {
            let utf8 = String::from_utf8_lossy(&r.body).to_string();
            let utf16: String =
                char::decode_utf16(r.body.chunks(2).map(|p| u16::from_le_bytes([p[0], *p.get(1).unwrap_or(&0)])))
                    .map(|c| c.unwrap_or('\u{fffd}'))
                    .collect();
            assert!(
                !utf8.contains("PRIVATE KEY") && !utf16.contains("PRIVATE KEY"),
                "the provider received the key: {r:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_chatgpt_conversation_is_blocked() -> Result<()> {
    if !require_privileges("a_key_in_a_chatgpt_conversation_is_blocked") {
        return Ok(());
    }
    let b = Bypass::start("byp-chatgpt")?;
    let body = json!({
        "action": "next",
        "messages": [{"id": "aaa1", "author": {"role": "user"}, "content": {"content_type": "text", "parts": [KEY]}}],
        "parent_message_id": "client-created-root",
        "model": "auto",
    });
    let headers = json!({"content-type": "application/json", "authorization": "Bearer not-a-real-token"});
    let (status, text) =
        b.send("chatgpt.com", "/backend-api/conversation", headers, body.to_string().as_bytes()).await?;
    assert_eq!(status, 403, "{text}");
    b.provider_never_received_the_key();
    let event = b.request_event()?;
    assert_eq!(event["decision"], "block", "{event}");
    assert_eq!(event["provider"], "openai_chat", "{event}");
    assert!(event["detectors"].to_string().contains("private_key"), "{event}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_shape_no_parser_knows_is_blocked() -> Result<()> {
    if !require_privileges("a_key_in_a_shape_no_parser_knows_is_blocked") {
        return Ok(());
    }
    let b = Bypass::start("byp-shape")?;
    // A Messages request whose key sits in a field the parser does not read.
    let body = json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "summarize the attachment"}],
        "attachment": {"kind": "note", "body": KEY},
    });
    let headers =
        json!({"content-type": "application/json", "x-api-key": "sk-ant-not-real", "anthropic-version": "2023-06-01"});
    let (status, text) = b.send("api.anthropic.com", "/v1/messages", headers, body.to_string().as_bytes()).await?;
    assert_eq!(status, 403, "{text}");
    b.provider_never_received_the_key();
    let event = b.request_event()?;
    assert_eq!(event["decision"], "block", "{event}");
    assert!(
        event["reasons"].to_string().contains("field the anthropic parser does not read: attachment.body"),
        "{event}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_under_an_x_content_encoding_is_refused() -> Result<()> {
    if !require_privileges("a_key_under_an_x_content_encoding_is_refused") {
        return Ok(());
    }
    // The default request fail mode is open: the refusal must not depend on it.
    let b = Bypass::start("byp-xenc")?;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": KEY}]});
    let headers = json!({"content-type": "application/json", "content-encoding": "x-custom"});
    let (status, text) = b.send("api.openai.com", "/v1/chat/completions", headers, body.to_string().as_bytes()).await?;
    assert_eq!(status, 415, "{text}");
    assert!(text.contains("cannot be decoded"), "{text}");
    b.provider_never_received_the_key();
    assert!(b.stage.provider.requests().is_empty());
    let event = b.request_event()?;
    assert_eq!(event["decision"], "block", "{event}");
    assert!(event["reasons"].to_string().contains("unsupported content-encoding \\\"x-custom\\\""), "{event}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_utf16_json_is_blocked() -> Result<()> {
    if !require_privileges("a_key_in_utf16_json_is_blocked") {
        return Ok(());
    }
    let b = Bypass::start("byp-utf16")?;
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": KEY}]}).to_string();
    // No BOM, no charset: recognized from the zero bytes, as RFC 4627 says.
    let utf16: Vec<u8> = body.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let headers = json!({"content-type": "application/json"});
    let (status, text) = b.send("api.openai.com", "/v1/chat/completions", headers, &utf16).await?;
    assert_eq!(status, 403, "{text}");
    b.provider_never_received_the_key();
    let event = b.request_event()?;
    assert_eq!(event["decision"], "block", "{event}");
    assert_eq!(event["provider"], "openai_chat", "{event}");
    assert!(event["detectors"].to_string().contains("private_key"), "{event}");
    Ok(())
}
