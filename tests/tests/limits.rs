//! Limits against hostile clients and providers, end to end in-process:
//! oversized request heads and bodies, compression bombs, slow and idle
//! clients, connection floods, malformed HTTP, JSON and provider streams,
//! and ClientHellos without SNI or made of junk. Each gets its defined
//! outcome while other clients keep being served.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use interceptor::{
    config::{GuardrailsConfig, OversizeAction, StreamMode},
    guardrails::framing::eventstream::{self, Decoder, HeaderValue},
    policy::DomainsConfig,
    proxy::ProxySettings,
    testing::provider::TestPki,
};
use interceptor_tests::inprocess::{GuardedProxy, InProcessProxy, client_for, local_pipeline};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_rustls::client::TlsStream;

const HOST: &str = "api.openai.com";
const CHAT: &str = "https://api.openai.com/v1/chat/completions";

type Setup = GuardedProxy;

/// The fake provider behind the in-process proxy with the local guardrails.
async fn setup(cfg: GuardrailsConfig, settings: ProxySettings) -> Result<Setup> {
    GuardedProxy::start(cfg, settings).await
}

fn settings() -> ProxySettings {
    ProxySettings { client_hello_timeout: Duration::from_secs(2), ..ProxySettings::default() }
}

/// A TLS connection to the proxy for `host` from `source` (any loopback
/// address: each is another workload), trusting only our CA.
async fn tls(proxy: &InProcessProxy, alpn: &[&[u8]], source: IpAddr) -> Result<TlsStream<TcpStream>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(proxy.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(source, 0))?;
    let tcp = sock.connect(proxy.addr).await?;
    let name = rustls_pki_types::ServerName::try_from(HOST.to_string())?;
    let connect = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp);
    Ok(tokio::time::timeout(Duration::from_secs(5), connect).await.context("TLS handshake timed out")??)
}

/// A connection from `source` as soon as the proxy has a slot for it: a
/// connection the client just closed is released when the proxy sees the
/// close, not when the client drops it.
async fn tls_once_free(proxy: &InProcessProxy, source: IpAddr) -> Result<TlsStream<TcpStream>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tls(proxy, &[b"http/1.1"], source).await {
            Ok(c) => return Ok(c),
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(error) => return Err(error.context("slot never freed")),
        }
    }
}

fn lo(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// Reads until the peer closes (or resets) the connection, at most `limit`.
/// Returns what arrived and when the connection ended.
async fn read_until_closed(stream: &mut (impl AsyncRead + Unpin), limit: Duration) -> Result<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = limit.checked_sub(started.elapsed()).context("connection still open")?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => bail!("connection still open after {limit:?}; got {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok((got, started.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One `connection: close` HTTP/1.1 request over `stream`; the status.
async fn get_status(stream: &mut TlsStream<TcpStream>, path: &str) -> Result<u16> {
    let head = format!("GET {path} HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    let (got, _) = read_until_closed(stream, Duration::from_secs(10)).await?;
    let text = String::from_utf8_lossy(&got);
    text.split(' ').nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("no status line in {text:?}"))
}

/// Audit events matching `pred`, waiting for at least one.
async fn audit_events(path: &Path, pred: impl Fn(&Value) -> bool) -> Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found: Vec<Value> =
            text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|e| pred(e)).collect();
        if !found.is_empty() {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("no matching audit event in:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reasons(event: &Value) -> String {
    event["reasons"].to_string()
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_gets_431_while_normal_requests_are_served() -> Result<()> {
    let s = setup(GuardrailsConfig::default(), ProxySettings { max_header_bytes: 8192, ..settings() }).await?;
    // HTTP/1.1: a 12 kB header against an 8 kB limit.
    let mut conn = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    let head = format!("GET /status/200 HTTP/1.1\r\nhost: {HOST}\r\nx-big: {}\r\n\r\n", "a".repeat(12 * 1024));
    // The proxy may stop reading before the whole head is written.
    let _ = conn.write_all(head.as_bytes()).await;
    let (got, _) = read_until_closed(&mut conn, Duration::from_secs(5)).await?;
    assert!(got.starts_with(b"HTTP/1.1 431"), "{:?}", String::from_utf8_lossy(&got));

    // HTTP/2: the header list over the limit is refused (431 or a reset
    // stream), and the same connection serves the next request.
    let h2 = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], true)?;
    let big = h2.get("https://api.openai.com/status/200").header("x-big", "a".repeat(12 * 1024)).send().await;
    assert!(big.as_ref().map_or(true, |r| r.status() == 431), "{big:?}");
    assert_eq!(h2.get("https://api.openai.com/status/200").send().await?.status(), 200);
    let h1 = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    assert_eq!(h1.get("https://api.openai.com/status/200").send().await?.status(), 200);
    assert!(
        s.provider.requests().iter().all(|r| r.header("x-big").is_none()),
        "an oversized head reached the provider"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_inspection_limit_passes_uninspected_when_the_policy_says_pass() -> Result<()> {
    let cfg = GuardrailsConfig { oversize: OversizeAction::Pass, ..GuardrailsConfig::default() };
    let limits = ProxySettings { max_inspected_body: 4096, oversize: OversizeAction::Pass, ..settings() };
    let s = setup(cfg, limits).await?;
    let client = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    // A card number the guardrail would redact, were the body inspected.
    let content = format!("card 4111 1111 1111 1111 {}", "x".repeat(20_000));
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}).to_string();
    let resp = client.post(CHAT).header("content-type", "application/json").body(body.clone()).send().await?;
    assert_eq!(resp.status(), 200);
    let seen = s.provider.requests().pop().context("forwarded")?;
    assert!(seen.body == body.as_bytes(), "the body must be forwarded unmodified");
    let events = audit_events(&s.audit, |e| e["direction"] == "request").await?;
    assert_eq!(events[0]["decision"], "alert");
    assert!(reasons(&events[0]).contains("not inspected: too large"), "{}", events[0]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compression_bomb_is_oversize_per_the_policy() -> Result<()> {
    // 100 MiB of zeros in about 100 kB: a hundred gzip members of 1 MiB each.
    let bomb = gzip(&vec![0u8; 1 << 20])?.repeat(100);
    assert!(bomb.len() < 200 << 10, "{}", bomb.len());
    for action in [OversizeAction::Block, OversizeAction::Pass] {
        let cfg = GuardrailsConfig { oversize: action, ..GuardrailsConfig::default() };
        let s = setup(cfg, ProxySettings { oversize: action, ..settings() }).await?;
        let client = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], false)?;
        let started = Instant::now();
        let resp = client
            .post(CHAT)
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(bomb.clone())
            .send()
            .await?;
        let events = audit_events(&s.audit, |e| e["direction"] == "request").await?;
        assert!(reasons(&events[0]).contains("not inspected: too large"), "{action:?}: {}", events[0]);
        match action {
            OversizeAction::Block => {
                assert_eq!(resp.status(), 413);
                assert_eq!(resp.headers()["x-interceptor-error"], "request_too_large");
                let body: Value = resp.json().await?;
                assert!(body["error"]["message"].as_str().is_some_and(|e| e.contains("too large")), "{body}");
                assert!(s.provider.requests().is_empty(), "a bomb reached the provider");
                assert_eq!(events[0]["decision"], "block");
            }
            OversizeAction::Pass => {
                assert_eq!(resp.status(), 200);
                let seen = s.provider.requests().pop().context("forwarded")?;
                assert!(seen.body == bomb, "forwarded as received");
                assert_eq!(events[0]["decision"], "alert");
            }
        }
        // Decoding stops at the limit instead of inflating 100 MiB.
        assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_closed_after_the_header_timeout_while_others_are_served() -> Result<()> {
    let limits = ProxySettings { header_read_timeout: Duration::from_secs(2), ..settings() };
    let s = setup(GuardrailsConfig::default(), limits).await?;
    let mut slow = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    let head = format!("GET /status/200 HTTP/1.1\r\nhost: {HOST}\r\n\r\n").into_bytes();
    let (mut read, mut write) = tokio::io::split(&mut slow);
    let dribble = async {
        // One byte every 300 ms: the head would take 12 s.
        for byte in &head {
            if write.write_all(&[*byte]).await.is_err() || write.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let client = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    let others = async {
        let mut served = 0;
        for _ in 0..5 {
            if client.get("https://api.openai.com/status/200").send().await?.status() == 200 {
                served += 1;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::Ok(served)
    };
    let closed = async { read_until_closed(&mut read, Duration::from_secs(8)).await };
    let dribbler = async {
        tokio::select! {
            () = dribble => {}
            () = tokio::time::sleep(Duration::from_secs(9)) => {}
        }
    };
    let (closed, served, ()) = tokio::join!(closed, others, dribbler);
    let (got, after) = closed?;
    assert!(!got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
    assert!(after >= Duration::from_millis(1500) && after < Duration::from_secs(6), "closed after {after:?}");
    assert_eq!(served?, 5, "other clients are served meanwhile");

    // A client that sends its ClientHello and then stalls the handshake.
    let hello = {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(HOST)?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        out
    };
    let mut stalled = TcpStream::connect(s.proxy.addr).await?;
    stalled.write_all(&hello).await?;
    let (_, after) = read_until_closed(&mut stalled, Duration::from_secs(8)).await?;
    assert!(after >= Duration::from_millis(1500) && after < Duration::from_secs(6), "closed after {after:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_idle_timeout_but_a_long_response_is_not() -> Result<()> {
    let limits = ProxySettings { idle_timeout: Duration::from_secs(1), ..settings() };
    let s = setup(GuardrailsConfig::default(), limits).await?;

    // HTTP/1.1 kept alive after one request.
    let mut h1 = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    h1.write_all(format!("GET /status/200 HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes()).await?;
    let (got, after) = read_until_closed(&mut h1, Duration::from_secs(5)).await?;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
    assert!(after >= Duration::from_millis(900), "closed after {after:?}");

    // A request body that stops coming while it is buffered for inspection.
    let mut slow_body = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    let head = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\ncontent-length: 100\r\n\r\n");
    slow_body.write_all(format!("{head}{{\"model\":").as_bytes()).await?;
    let (got, after) = read_until_closed(&mut slow_body, Duration::from_secs(5)).await?;
    assert!(got.starts_with(b"HTTP/1.1 408"), "{:?}", String::from_utf8_lossy(&got));
    assert!(after >= Duration::from_millis(900), "answered after {after:?}");
    assert!(s.provider.requests().iter().all(|r| r.method != "POST"), "a partial body reached the provider");

    // HTTP/2: a stream lasting twice the idle timeout completes, then the
    // idle connection is closed (GOAWAY).
    let tls2 = tls(&s.proxy, &[b"h2"], lo(1)).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls2))
            .await?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get("https://api.openai.com/sse?n=5&interval_ms=400")
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 200);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await?.to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("[DONE]"), "stream cut short: {body:?}");
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn).await.context("idle HTTP/2 connection still open")???;
    assert!(idle_since.elapsed() >= Duration::from_millis(900), "closed after {:?}", idle_since.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_workload_and_global_caps_are_closed_at_once_others_served() -> Result<()> {
    let limits = ProxySettings { max_connections: 3, max_connections_per_workload: 2, ..settings() };
    let s = setup(GuardrailsConfig::default(), limits).await?;
    // Each loopback source address is its own workload (no cgroup in-process).
    let a1 = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    let mut a2 = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    let started = Instant::now();
    assert!(tls(&s.proxy, &[b"http/1.1"], lo(1)).await.is_err(), "a third connection of one workload");
    assert!(started.elapsed() < Duration::from_secs(2), "not closed at once: {:?}", started.elapsed());

    // Another workload is served.
    let mut b1 = tls(&s.proxy, &[b"http/1.1"], lo(2)).await?;
    assert_eq!(get_status(&mut b1, "/status/200").await?, 200);
    drop(b1);
    // The proxy sees the close a moment later: until then b1 still counts.
    let b2 = tls_once_free(&s.proxy, lo(2)).await?;
    // Three open: the global cap closes a third workload's connection.
    assert!(tls(&s.proxy, &[b"http/1.1"], lo(3)).await.is_err(), "over the global cap");

    // A closed connection frees its slot.
    drop(a1);
    let mut again = tls_once_free(&s.proxy, lo(1)).await?;
    assert_eq!(get_status(&mut again, "/status/200").await?, 200);
    assert_eq!(get_status(&mut a2, "/status/200").await?, 200);
    drop(b2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_and_malformed_json_get_their_defined_answers() -> Result<()> {
    let s = setup(GuardrailsConfig::default(), settings()).await?;
    // Not HTTP at all: 400, the connection closes.
    let mut junk = tls(&s.proxy, &[b"http/1.1"], lo(1)).await?;
    junk.write_all(b"GARBAGE \x00\x01\x02 nonsense\r\n\r\n").await?;
    let (got, _) = read_until_closed(&mut junk, Duration::from_secs(5)).await?;
    assert!(got.starts_with(b"HTTP/1.1 400"), "{:?}", String::from_utf8_lossy(&got));

    // Truncated JSON with invalid UTF-8: inspected as text, forwarded
    // byte for byte when nothing matches.
    let client = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    let broken = b"{\"model\": \"gpt-4o\", \"messages\": [{\"content\": \"hi \xff\xfe\xc3 there".to_vec();
    let resp = client.post(CHAT).header("content-type", "application/json").body(broken.clone()).send().await?;
    assert_eq!(resp.status(), 200);
    assert!(s.provider.requests().pop().context("forwarded")?.body == broken, "forwarded unchanged");
    // The same broken JSON carrying a private key is still blocked.
    let key = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----", "MIIEvQIBADANBgkq".repeat(3));
    let mut with_key = broken.clone();
    with_key.extend_from_slice(key.as_bytes());
    let resp = client.post(CHAT).header("content-type", "application/json").body(with_key).send().await?;
    assert_eq!(resp.status(), 403);
    assert_eq!(client.get("https://api.openai.com/status/200").send().await?.status(), 200);
    Ok(())
}

/// A provider that answers every request with `body` as `content_type`.
async fn raw_provider(pki: &TestPki, body: Vec<u8>, content_type: &'static str) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(&[b"http/1.1"]));
    let body = bytes::Bytes::from(body);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        http::Response::builder()
                            .header("content-type", content_type)
                            .body(http_body_util::Full::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn chunk_frame(text: &str) -> Result<Vec<u8>> {
    let inner = json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}});
    let b64 = base64::engine::general_purpose::STANDARD.encode(inner.to_string());
    Ok(eventstream::encode_frame(
        &[
            (":event-type", HeaderValue::String("chunk".into())),
            (":content-type", HeaderValue::String("application/json".into())),
            (":message-type", HeaderValue::String("event".into())),
        ],
        json!({ "bytes": b64 }).to_string().as_bytes(),
    )?)
}

/// One malformed stream from a provider, and how to read the client's body.
struct BrokenStream {
    what: &'static str,
    host: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    /// Enforce: the client's body is well-formed and ends with an error.
    ends_with_error: fn(&[u8]) -> Result<bool>,
}

fn eventstream_ends_with_exception(got: &[u8]) -> Result<bool> {
    let mut decoder = Decoder::new(1 << 20);
    let frames = decoder.feed(got).context("client got broken frames")?;
    decoder.finish()?;
    Ok(frames.last().is_some_and(|f| f.message_type() == Some("exception")))
}

fn json_array_ends_with_error(got: &[u8]) -> Result<bool> {
    let array: Value = serde_json::from_slice(got).context("client got a broken array")?;
    Ok(array.as_array().and_then(|a| a.last()).is_some_and(|e| e.get("error").is_some()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_provider_stream_ends_with_an_error_event_in_enforce_and_passes_in_monitor() -> Result<()> {
    let good = chunk_frame("hello")?;
    let mut bad_crc = chunk_frame("world")?;
    *bad_crc.last_mut().context("empty frame")? ^= 0xff;
    let truncated = chunk_frame("truncated")?[..20].to_vec();
    let bedrock = "bedrock-runtime.us-east-1.amazonaws.com";
    let invoke = "/model/anthropic.claude-3-haiku-20240307-v1:0/invoke-with-response-stream";
    let eventstream = "application/vnd.amazon.eventstream";
    let element = r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"hello"}]}}]}"#;
    let cases = [
        BrokenStream {
            what: "bad crc",
            host: bedrock,
            path: invoke,
            content_type: eventstream,
            body: [good.clone(), bad_crc, good.clone()].concat(),
            ends_with_error: eventstream_ends_with_exception,
        },
        BrokenStream {
            what: "truncated frame",
            host: bedrock,
            path: invoke,
            content_type: eventstream,
            body: [good, truncated].concat(),
            ends_with_error: eventstream_ends_with_exception,
        },
        BrokenStream {
            what: "truncated array",
            host: "generativelanguage.googleapis.com",
            path: "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
            content_type: "application/json",
            body: format!("[{element},\r\n{{\"candidates\":[{{\"content").into_bytes(),
            ends_with_error: json_array_ends_with_error,
        },
    ];
    let request = json!({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 16,
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    for case in &cases {
        let what = case.what;
        for mode in [StreamMode::Enforce, StreamMode::Monitor] {
            let pki = TestPki::with_defaults()?;
            let upstream = raw_provider(&pki, case.body.clone(), case.content_type).await?;
            let dir = tempfile::tempdir()?;
            let audit = dir.path().join("audit.jsonl");
            let cfg = GuardrailsConfig { stream_mode: mode, ..GuardrailsConfig::default() };
            let hook = local_pipeline(cfg, Some(audit.clone()))?;
            let upstream_ca = pki.write_ca(dir.path())?;
            let proxy =
                InProcessProxy::start_with(upstream, &upstream_ca, DomainsConfig::default(), Some(hook), settings())
                    .await?;
            let client = client_for(case.host, proxy.addr, &[&proxy.ca_pem], false)?;
            let url = format!("https://{}{}", case.host, case.path);
            let resp =
                client.post(&url).header("content-type", "application/json").body(request.clone()).send().await?;
            assert_eq!(resp.status(), 200, "{what} {mode:?}");
            // The body ends cleanly either way.
            let got = resp.bytes().await.with_context(|| format!("{what} {mode:?}: body"))?;
            match mode {
                StreamMode::Enforce => {
                    let ended = (case.ends_with_error)(&got).with_context(|| format!("{what}: {got:?}"))?;
                    assert!(ended, "{what}: no error at the end: {got:?}");
                    assert_ne!(&got[..], &case.body[..], "{what}: malformed bytes forwarded");
                }
                StreamMode::Monitor => assert!(got[..] == case.body[..], "{what}: monitor must pass the bytes through"),
            }
            let events = audit_events(&audit, |e| e["direction"] == "response").await?;
            assert!(reasons(&events[0]).contains("malformed stream"), "{what} {mode:?}: {}", events[0]);
            let expected = if mode == StreamMode::Enforce { "block" } else { "error" };
            assert_eq!(events[0]["decision"], expected, "{what} {mode:?}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_hellos_without_sni_or_made_of_junk_pass_through_byte_for_byte() -> Result<()> {
    // A plain TCP "original destination" that reports what it receives.
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    let pki = TestPki::with_defaults()?;
    let dir = tempfile::tempdir()?;
    let proxy =
        InProcessProxy::start(upstream_addr, &pki.write_ca(dir.path())?, DomainsConfig::default(), None).await?;

    let no_sni = {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let ip = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::new(198, 18, 0, 10).into());
        let mut conn = rustls::ClientConnection::new(Arc::new(config), ip)?;
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        out
    };
    let cases: [(&str, Vec<u8>); 3] = [
        ("ClientHello without SNI", no_sni),
        ("TLS record header, junk inside", vec![0x16, 3, 1, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff, 0x42]),
        ("not TLS", b"\x00\xffnot tls at all\r\n".to_vec()),
    ];
    for (what, bytes) in cases {
        let mut client = TcpStream::connect(proxy.addr).await?;
        client.write_all(&bytes).await?;
        let (mut server, _) = tokio::time::timeout(Duration::from_secs(5), upstream.accept())
            .await
            .with_context(|| format!("{what}: never relayed"))??;
        let mut got = vec![0u8; bytes.len()];
        tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got)).await??;
        assert_eq!(got, bytes, "{what}: relayed bytes differ");
        // And back: the relay is two-way.
        server.write_all(b"pong").await?;
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut back)).await??;
        assert_eq!(&back, b"pong", "{what}");
    }
    Ok(())
}

/// A chat request carrying a private key, as a client would send it inside
/// TLS; here it is sent in the clear or after a handshake game.
fn private_key_chat() -> Vec<u8> {
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PRIVATE_KEY}]}).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

const PRIVATE_KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_an_ai_address_a_connection_that_cannot_be_classified_never_reaches_the_provider() -> Result<()> {
    // The original destination reports every connection it gets.
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    let pki = TestPki::with_defaults()?;
    let dir = tempfile::tempdir()?;
    let audit = dir.path().join("audit.jsonl");
    let hook = local_pipeline(GuardrailsConfig::default(), Some(audit.clone()))?;
    let settings = ProxySettings { client_hello_timeout: Duration::from_millis(300), ..ProxySettings::default() };
    let proxy = InProcessProxy::start_with(
        upstream_addr,
        &pki.write_ca(dir.path())?,
        DomainsConfig::default(),
        Some(hook),
        settings,
    )
    .await?;
    // A configured CIDR target: an AI address known by no name.
    proxy.set_ai_address(upstream_addr.ip(), &[]);

    let no_sni = {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let ip = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let mut conn = rustls::ClientConnection::new(Arc::new(config), ip)?;
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        out
    };
    let cases: [(&str, Option<Vec<u8>>, &str); 4] = [
        ("no SNI, no name known", Some(no_sni), "no server name"),
        ("junk in a handshake record", Some(vec![0x16, 3, 1, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff]), "cannot be parsed"),
        ("plain HTTP with a private key", Some(private_key_chat()), "not TLS"),
        // Says nothing until the proxy gives up waiting.
        ("late ClientHello", None, "no ClientHello in time"),
    ];
    for (i, (what, bytes, reason)) in cases.into_iter().enumerate() {
        let mut client = TcpStream::connect(proxy.addr).await?;
        if let Some(bytes) = &bytes {
            client.write_all(bytes).await?;
        }
        // The proxy closes the connection: the event this case waits for.
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut got))
            .await
            .with_context(|| format!("{what}: never closed"))?;
        assert!(got.is_empty(), "{what}: got {got:?}");
        // Once the client is closed the decision is made; a relay would have
        // connected before.
        use futures_util::FutureExt as _;
        assert!(upstream.accept().now_or_never().is_none(), "{what}: reached the original destination");
        let events = audit_events(&audit, |e| e["event"] == "unclassified_connection").await?;
        assert!(events.len() > i, "{what}: no audit event");
        let event = &events[i];
        assert_eq!(event["decision"], "block", "{what}: {event}");
        assert!(reasons(event).contains(reason), "{what}: {event}");
        assert_eq!(event["orig_dst"], upstream_addr.to_string(), "{what}: {event}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_without_sni_to_a_learned_ai_address_is_inspected_as_its_name() -> Result<()> {
    let s = setup(GuardrailsConfig::default(), settings()).await?;
    // The address was learned for api.openai.com (the fake provider has its
    // certificate, so upstream verification uses that name).
    s.proxy.set_ai_address(s.provider.local_addr().ip(), &["api.openai.com"]);
    // A client that connects by address sends no SNI and, like Python with
    // `server_hostname=None`, checks no name.
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(20))
        .build()?;
    let url = format!("https://{}/v1/chat/completions", s.proxy.addr);
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": PRIVATE_KEY}]});
    let resp = client.post(&url).header("content-type", "application/json").body(body.to_string()).send().await?;
    assert_eq!(resp.status(), 403, "the private key is blocked");
    let plain = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]});
    let resp = client.post(&url).header("content-type", "application/json").body(plain.to_string()).send().await?;
    assert_eq!(resp.status(), 200, "and the rest is relayed to the provider");
    let seen = s.provider.requests();
    assert_eq!(seen.len(), 1, "{seen:#?}");
    assert!(!String::from_utf8_lossy(&seen[0].body).contains("PRIVATE KEY"));
    let events = audit_events(&s.audit, |e| e["decision"] == "block").await?;
    assert_eq!(events[0]["host"], "api.openai.com", "{}", events[0]);
    Ok(())
}

/// A chat request whose body is about `len` bytes, carrying `marker`.
fn chat_body(marker: &str, len: usize) -> String {
    let filler = "plain words ".repeat(len / 12);
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("{marker} {filler}")}]}).to_string()
}

/// Posts `body(attempt)` until the answer has status `want` (bounded);
/// returns that answer's headers and body, and the attempt that got it.
async fn post_until(
    client: &reqwest::Client,
    body: impl Fn(usize) -> String,
    want: u16,
) -> Result<(reqwest::header::HeaderMap, Value, usize)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    for attempt in 0.. {
        let resp = client.post(CHAT).header("content-type", "application/json").body(body(attempt)).send().await?;
        if resp.status() == want {
            let headers = resp.headers().clone();
            return Ok((headers, resp.json().await.unwrap_or(Value::Null), attempt));
        }
        if Instant::now() > deadline {
            bail!("no {want} within 10 s; last status {}", resp.status());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("out of attempts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bodies_share_one_budget_503_when_full_and_give_it_back_on_every_path() -> Result<()> {
    // Room for one body of the largest inspected size, no more.
    let budget = 256 << 10;
    let limits = ProxySettings { max_inspected_body: budget, max_buffered_total: budget, ..settings() };
    let s = setup(GuardrailsConfig::default(), limits).await?;
    let client = client_for(HOST, s.proxy.addr, &[&s.proxy.ca_pem], false)?;

    // Finished exchanges give their bytes back: allowed, blocked, and
    // refused as too large, many times the budget in all.
    for i in 0..6 {
        let _ = post_until(&client, |_| chat_body(&format!("allowed-{i}"), 200 << 10), 200)
            .await
            .context("an allowed request")?;
    }
    let key =
        format!("-----BEGIN RSA PRIVATE KEY-----\n{}\n-----END RSA PRIVATE KEY-----", "MIIEowIBAAKCAQEA".repeat(4));
    for _ in 0..4 {
        let _ = post_until(&client, |_| chat_body(&key, 200 << 10), 403).await.context("a blocked request")?;
    }
    for _ in 0..4 {
        let _ = post_until(&client, |_| chat_body("too-large", 300 << 10), 413)
            .await
            .context("a request over the inspection limit")?;
    }

    // A client sends all but the last KiB of a body and stalls: it holds
    // the budget (at most a KiB is left). Another client is then refused
    // with 503. The stalled request itself is refused instead when an
    // earlier exchange has not given its bytes back yet (the client sees an
    // answer a moment before the proxy is done with it): then it tries again.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        256 << 10
    );
    let mut attempts = 0;
    let (stalled, (headers, error, attempt)) = loop {
        attempts += 1;
        let mut stalled = tls(&s.proxy, &[b"http/1.1"], lo(2)).await?;
        stalled.write_all(head.as_bytes()).await?;
        stalled.write_all(&vec![b' '; 255 << 10]).await?;
        stalled.flush().await?;
        let mut answer = [0u8; 64];
        tokio::select! {
            refused = post_until(&client, |n| chat_body(&format!("refused-{attempts}-{n}"), 2 << 10), 503) => {
                break (stalled, refused.context("a request while the budget is held")?);
            }
            read = stalled.read(&mut answer) => {
                let got = String::from_utf8_lossy(&answer[..read.unwrap_or(0)]).to_string();
                ensure!(attempts < 5 && got.starts_with("HTTP/1.1 503"), "the stalled request was answered: {got:?}");
            }
        }
    };
    assert_eq!(error["error"]["type"], "interceptor_error", "{error}");
    assert_eq!(error["error"]["code"], "inspection_budget_exhausted", "{error}");
    assert_eq!(headers.get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    assert_eq!(headers.get("x-interceptor-error").and_then(|v| v.to_str().ok()), Some("inspection_budget_exhausted"));
    // Numbered by round too: a request of an earlier round (when the
    // stalled request was refused itself) may have been served.
    let marker = format!("refused-{attempts}-{attempt} ");
    let reached = s.provider.requests().iter().any(|r| String::from_utf8_lossy(&r.body).contains(&marker));
    assert!(!reached, "the refused request reached the provider");

    // The stalled client goes away mid-body: its bytes come back, and the
    // next request is served.
    drop(stalled);
    let (_, answer, _) = post_until(&client, |_| chat_body("after-abort", 2 << 10), 200)
        .await
        .context("a request after the client went away")?;
    assert!(answer.get("choices").is_some(), "{answer}");
    // And still the whole budget: a body of the largest size fits.
    let _ = post_until(&client, |_| chat_body("whole-budget", 250 << 10), 200)
        .await
        .context("a request of the whole budget")?;
    Ok(())
}
