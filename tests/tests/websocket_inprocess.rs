//! WebSocket inspection end to end (in-process): the Responses API's
//! WebSocket mode, OpenAI Realtime and Gemini Live through the proxy with the
//! local guardrails, against the fake provider's scripted endpoints, with the
//! `websockets` package (deflate offered or not) and tokio-tungstenite as
//! clients. Each secret test asserts what the provider received.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use interceptor::{
    config::{GuardrailsConfig, StreamMode, UnknownWebSocket},
    proxy::ProxySettings,
    testing::clients::{ClientEnv, WsConversation, WsConversationResult, python_websockets},
};
use interceptor_tests::inprocess::GuardedProxy;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};

const RESPONSES: &str = "wss://api.openai.com/v1/responses";
const REALTIME: &str = "wss://api.openai.com/v1/realtime?model=gpt-realtime";
const LIVE: &str = "wss://generativelanguage.googleapis.com/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";

fn key() -> String {
    format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIBOgIBAAJBAK".repeat(4))
}

fn settings() -> ProxySettings {
    ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() }
}

async fn setup(cfg: GuardrailsConfig) -> Result<GuardedProxy> {
    GuardedProxy::start(cfg, settings()).await
}

fn conversation(s: &GuardedProxy, url: &str, send: &[String], deflate: bool) -> WsConversation {
    WsConversation {
        url: url.into(),
        connect_to: Some(s.proxy.addr),
        deflate,
        headers: Vec::new(),
        send: send.to_vec(),
        until: None,
    }
}

async fn talk(s: &GuardedProxy, c: &WsConversation) -> Result<WsConversationResult> {
    let env = ClientEnv { timeout: Duration::from_secs(10), ..ClientEnv::new(&s.proxy.ca_path) };
    python_websockets(&env, c).await
}

/// Audit events matching `pred`, waiting up to five seconds for one.
async fn audit_events(s: &GuardedProxy, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&s.audit).unwrap_or_default();
        let found: Vec<Value> =
            text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|e| pred(e)).collect();
        if !found.is_empty() {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            bail!("no such audit event in: {text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn parsed(received: &[String]) -> Vec<Value> {
    received.iter().filter_map(|m| serde_json::from_str(m).ok()).collect()
}

fn provider_got(s: &GuardedProxy, needle: &str) -> bool {
    s.provider.ws_messages().iter().any(|m| m.text.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_create_with_a_private_key_is_blocked_with_1008_and_never_forwarded() -> Result<()> {
    let s = setup(GuardrailsConfig::default()).await?;
    let hello = json!({"type": "response.create", "model": "gpt-5", "input": "say hello"}).to_string();
    let leak = json!({"type": "response.create", "model": "gpt-5",
        "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": key()}]}]})
    .to_string();
    // First an allowed turn, read to its end.
    let mut c = conversation(&s, RESPONSES, std::slice::from_ref(&hello), true);
    c.until = Some("response.completed".into());
    let r = talk(&s, &c).await?;
    assert_eq!(r.extensions, None, "no extension may be negotiated on an inspected WebSocket");
    assert!(r.received.iter().any(|m| m.contains("response.output_text.delta")), "{r:?}");
    let upgrade = s.provider.requests().into_iter().find(|q| q.path == "/v1/responses").context("upgrade")?;
    assert_eq!(upgrade.header("sec-websocket-extensions"), None, "the deflate offer reached the provider");

    let r = talk(&s, &conversation(&s, RESPONSES, &[leak], true)).await?;
    assert_eq!(r.close_code, Some(1008), "{r:?}");
    let error = parsed(&r.received).into_iter().find(|e| e["type"] == "error").context("no error event")?;
    assert_eq!(error["error"]["code"], "guardrail_blocked", "{error}");
    assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
    assert!(!provider_got(&s, "PRIVATE KEY"), "the key reached the provider");
    let events = audit_events(&s, |e| e["decision"] == "block" && e["direction"] == "request").await?;
    assert!(
        events[0]["rules"].to_string().contains("private_key")
            || events[0]["detectors"].to_string().contains("private_key"),
        "{}",
        events[0]
    );
    assert_eq!(events[0]["path"], "/v1/responses");
    let closed = audit_events(&s, |e| e["event"] == "websocket_closed" && e["decision"] == "block").await?;
    assert_eq!(closed[0]["websocket"]["protocol"], "openai_responses_websocket");
    assert_eq!(closed[0]["websocket"]["blocked"], 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_input_text_with_a_private_key_is_blocked_plain_and_with_deflate_offered() -> Result<()> {
    let s = setup(GuardrailsConfig::default()).await?;
    for deflate in [false, true] {
        let item = json!({"type": "conversation.item.create", "event_id": "evt_1",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": key()}]}})
        .to_string();
        let r = talk(&s, &conversation(&s, REALTIME, &[item], deflate)).await?;
        assert_eq!(r.extensions, None, "deflate {deflate}");
        assert_eq!(r.close_code, Some(1008), "deflate {deflate}: {r:?}");
        // The provider's `session.created` may or may not be relayed before
        // the block closes the connection: the client sends at once.
        let events = parsed(&r.received);
        let error = events.iter().find(|e| e["type"] == "error").context("no error event")?;
        assert_eq!(error["error"]["code"], "guardrail_blocked");
        assert_eq!(error["error"]["event_id"], "evt_1");
    }
    assert!(!provider_got(&s, "PRIVATE KEY"), "the key reached the provider");
    let blocks = audit_events(&s, |e| e["decision"] == "block" && e["direction"] == "request").await?;
    assert!(blocks.iter().all(|e| e["path"] == "/v1/realtime?model=gpt-realtime"), "{blocks:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_number_is_redacted_in_the_frame_the_provider_receives() -> Result<()> {
    let s = setup(GuardrailsConfig::default()).await?;
    let item = json!({"type": "conversation.item.create",
        "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "pay with 4111 1111 1111 1111"}]}});
    let mut c = conversation(&s, REALTIME, &[item.to_string()], true);
    c.until = Some("conversation.item.created".into());
    let r = talk(&s, &c).await?;
    assert!(r.received.iter().any(|m| m.contains("conversation.item.created")), "{r:?}");
    let got = s.provider.ws_messages().into_iter().find(|m| m.text.contains("pay with")).context("not forwarded")?;
    assert!(!got.text.contains("4111 1111 1111 1111") && got.text.contains("REDACTED"), "{}", got.text);
    let sent: Value = serde_json::from_str(&got.text)?;
    assert_eq!(sent["type"], "conversation.item.create", "every other field survives: {sent}");
    assert_eq!(sent["item"]["content"][0]["type"], "input_text");
    audit_events(&s, |e| e["decision"] == "modify" && e["direction"] == "request").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_split_across_server_deltas_is_cut_before_its_end_reaches_the_client() -> Result<()> {
    let cfg = GuardrailsConfig { stream_mode: StreamMode::Enforce, ..GuardrailsConfig::default() };
    let s = setup(cfg).await?;
    let token = format!("ghp_{}", "a1B2".repeat(9));
    let create = json!({"type": "response.create", "model": "gpt-5", "input": "hi"}).to_string();
    for url in [RESPONSES, REALTIME] {
        let mut c = conversation(&s, url, std::slice::from_ref(&create), true);
        c.headers = vec![("x-fake-reply".into(), format!("here: {token} done"))];
        let r = talk(&s, &c).await?;
        let deltas: String = parsed(&r.received)
            .iter()
            .filter(|e| e["type"] == "response.output_text.delta")
            .filter_map(|e| e["delta"].as_str().map(str::to_owned))
            .collect();
        assert!(
            !deltas.contains(&token) && !r.received.concat().contains(&token),
            "{url}: the token reached the client: {r:?}"
        );
        assert_eq!(r.close_code, Some(1008), "{url}: {r:?}");
        assert!(parsed(&r.received).iter().any(|e| e["type"] == "error"), "{url}: {r:?}");
        // The provider did send it, split: this is the response path.
        assert!(token.len() > 12);
    }
    audit_events(&s, |e| e["decision"] == "block" && e["direction"] == "response").await?;
    Ok(())
}

/// A provider that puts a token where an id goes: the message carrying it
/// never reaches the client (the rest of a server message is read too,
/// not only its text), in enforce mode; monitor mode records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_in_a_server_message_id_is_cut_before_the_client() -> Result<()> {
    let token = format!("ghp_{}", "Zq8W".repeat(9));
    let create = json!({"type": "response.create", "model": "gpt-5", "input": "hi"}).to_string();
    for mode in [StreamMode::Enforce, StreamMode::Monitor] {
        let s = setup(GuardrailsConfig { stream_mode: mode, ..GuardrailsConfig::default() }).await?;
        for url in [RESPONSES, REALTIME] {
            let mut c = conversation(&s, url, std::slice::from_ref(&create), false);
            c.headers = vec![("x-fake-id".into(), token.clone())];
            let r = talk(&s, &c).await?;
            let reached = r.received.concat().contains(&token);
            match mode {
                StreamMode::Enforce => {
                    assert!(!reached, "{url}: the token reached the client: {r:?}");
                    assert_eq!(r.close_code, Some(1008), "{url}: {r:?}");
                }
                StreamMode::Monitor => assert!(reached, "{url}: monitor mode held a message back: {r:?}"),
            }
        }
        let decision = if mode == StreamMode::Enforce { "block" } else { "alert" };
        audit_events(&s, |e| e["decision"] == decision && e["direction"] == "response").await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemini_live_client_content_with_a_key_is_blocked_and_model_text_flows() -> Result<()> {
    let s = setup(GuardrailsConfig::default()).await?;
    let setup_msg = json!({"setup": {"model": "models/gemini-2.0-flash-live-001"}}).to_string();
    let hello =
        json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "hello"}]}], "turnComplete": true}});
    let mut c = conversation(&s, LIVE, &[setup_msg.clone(), hello.to_string()], true);
    c.until = Some("turnComplete".into());
    let r = talk(&s, &c).await?;
    assert!(r.received.iter().any(|m| m.contains("modelTurn")), "{r:?}");
    let leak =
        json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": key()}]}], "turnComplete": true}});
    let r = talk(&s, &conversation(&s, LIVE, &[setup_msg, leak.to_string()], false)).await?;
    assert_eq!(r.close_code, Some(1008), "{r:?}");
    assert!(!provider_got(&s, "PRIVATE KEY"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_websocket_on_an_ai_host_is_refused_with_426_or_tunnelled_when_configured() -> Result<()> {
    let s = setup(GuardrailsConfig::default()).await?;
    let r = talk(&s, &conversation(&s, "wss://api.openai.com/ws", &["hi".into()], true)).await?;
    assert_eq!(r.status, Some(426), "{r:?}");
    let body: Value = serde_json::from_str(r.body.as_deref().unwrap_or_default())?;
    assert!(body["error"].is_string(), "{body}");
    assert!(s.provider.requests().iter().all(|q| q.path != "/ws"), "the provider was called");
    audit_events(&s, |e| e["decision"] == "block" && e["rules"].to_string().contains("unknown_websocket")).await?;

    let cfg = GuardrailsConfig { unknown_websocket: UnknownWebSocket::Tunnel, ..GuardrailsConfig::default() };
    let s = setup(cfg).await?;
    let mut c = conversation(&s, "wss://api.openai.com/ws", &["echo me".into()], true);
    c.until = Some("echo me".into());
    let r = talk(&s, &c).await?;
    assert_eq!(r.received, ["echo me"], "{r:?}");
    let closed = audit_events(&s, |e| e["event"] == "websocket_closed").await?;
    let ws = &closed[0]["websocket"];
    assert_eq!(ws["inspected"], false);
    assert_eq!(closed[0]["decision"], "alert");
    assert!(ws["bytes_up"].as_u64() > Some(0) && ws["bytes_down"].as_u64() > Some(0), "{ws}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_is_forwarded_and_counted_as_not_inspected() -> Result<()> {
    let s = setup(GuardrailsConfig::default()).await?;
    let audio = "UklGRiQAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQAAAAA=".repeat(12);
    let append = json!({"type": "input_audio_buffer.append", "audio": audio}).to_string();
    let create = json!({"type": "response.create"}).to_string();
    let mut c = conversation(&s, REALTIME, &[append.clone(), create], true);
    c.until = Some("response.done".into());
    let r = talk(&s, &c).await?;
    assert!(r.received.iter().any(|m| m.contains("response.output_audio.delta")), "{r:?}");
    assert!(s.provider.ws_messages().iter().any(|m| m.text == append), "audio forwarded unchanged");
    let closed = audit_events(&s, |e| e["event"] == "websocket_closed").await?;
    let ws = &closed[0]["websocket"];
    assert_eq!(ws["audio_not_inspected"], 2, "one up, one down: {ws}");
    assert!(ws["messages_inspected"].as_u64() >= Some(1), "{ws}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_pings_and_oversize_messages_follow_the_protocol() -> Result<()> {
    let settings = ProxySettings { max_inspected_body: 4096, ..settings() };
    let s = GuardedProxy::start(GuardrailsConfig::default(), settings).await?;
    // Ping gets a pong; a compressed (RSV1) frame closes with 1002 and is
    // never relayed.
    let mut ws = rust_client(&s, REALTIME).await?;
    let _created = next(&mut ws).await?;
    ws.send(Message::Ping("p1".into())).await?;
    loop {
        match next(&mut ws).await? {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"p1");
                break;
            }
            Message::Text(_) => continue,
            other => bail!("expected a pong, got {other:?}"),
        }
    }
    use tokio::io::AsyncWriteExt as _;
    let payload = b"{\"type\":\"rsv1-smuggled\"}";
    let mut frame = vec![0xC1, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    ws.get_mut().write_all(&frame).await?;
    ws.get_mut().flush().await?;
    match next(&mut ws).await {
        Ok(Message::Close(Some(f))) => assert_eq!(f.code, CloseCode::Protocol),
        other => bail!("expected a close 1002, got {other:?}"),
    }
    assert!(!provider_got(&s, "rsv1-smuggled"));

    // Over the inspection limit: refused (oversize policy block) with 1009.
    let mut ws = rust_client(&s, REALTIME).await?;
    let big = json!({"type": "conversation.item.create", "item": {"content": [{"type": "input_text", "text": "x".repeat(8000)}]}});
    ws.send(Message::text(big.to_string())).await?;
    let code = loop {
        match next(&mut ws).await? {
            Message::Close(f) => break f.map(|f| f.code),
            _ => continue,
        }
    };
    assert_eq!(code, Some(CloseCode::Size));
    assert!(!provider_got(&s, "xxxxxxxx"));
    audit_events(&s, |e| e["decision"] == "block" && e["reasons"].to_string().contains("too large")).await?;
    Ok(())
}

type RustWs = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn rust_client(s: &GuardedProxy, url: &str) -> Result<RustWs> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(s.proxy.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(s.proxy.addr).await?;
    let host = url.split('/').nth(2).context("host")?.to_string();
    let name = rustls_pki_types::ServerName::try_from(host)?;
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?;
    let (ws, resp) = tokio_tungstenite::client_async(url, tls).await?;
    assert_eq!(resp.status(), 101);
    Ok(ws)
}

async fn next(ws: &mut RustWs) -> Result<Message> {
    Ok(tokio::time::timeout(Duration::from_secs(5), ws.next()).await?.context("closed")??)
}

// ---- the connection record ----

/// Everything this process logged (JSON lines), from the first use on.
fn log_buffer() -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        let _ = tracing_subscriber::fmt()
            .json()
            .with_max_level(tracing_subscriber::filter::LevelFilter::INFO)
            .with_writer(move || Capture(Arc::clone(&writer)))
            .try_init();
        buffer
    })
}

struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The connection record of the client at `client`, if written yet.
fn record_of(client: std::net::SocketAddr) -> Option<Value> {
    let buf = log_buffer().lock().unwrap_or_else(|e| e.into_inner()).clone();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["fields"]["event"] == "connection" && l["fields"]["client"] == client.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_record_is_written_at_the_close_with_the_real_byte_counts() -> Result<()> {
    log_buffer();
    let s = setup(GuardrailsConfig::default()).await?;
    let mut ws = rust_client(&s, REALTIME).await?;
    let client = ws.get_ref().get_ref().0.local_addr()?;
    let _created = next(&mut ws).await?;
    let item = json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": "a".repeat(20_000)}]}});
    ws.send(Message::text(item.to_string())).await?;
    let answer = next(&mut ws).await?;
    assert!(answer.to_text()?.contains("conversation.item.created"), "{answer:?}");
    assert!(record_of(client).is_none(), "the record was written before the WebSocket closed: {:?}", record_of(client));
    ws.close(None).await?;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {}
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(5);
    let record = loop {
        if let Some(r) = record_of(client) {
            break r;
        }
        if Instant::now() >= deadline {
            bail!("no connection record for {client}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let f = &record["fields"];
    assert_eq!(f["mode"], "intercept", "{record}");
    assert!(f["bytes_up"].as_u64() > Some(20_000), "{record}");
    assert!(f["bytes_down"].as_u64() > Some(50), "{record}");
    let closed = audit_events(&s, |e| e["event"] == "websocket_closed").await?;
    assert_eq!(closed[0]["websocket"]["bytes_up"], f["bytes_up"], "the summary and the record agree");
    Ok(())
}
