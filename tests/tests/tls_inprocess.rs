//! In-process end-to-end tests of the TLS-terminating proxy: the proxy on
//! loopback with a mock original destination, a fake HTTPS provider signed by
//! a throwaway test CA, and clients that trust our CA. No privileges, no
//! fixed ports, no network.

use std::{sync::Arc, time::Duration};

use anyhow::Result;
use bytes::Bytes;
use interceptor::{
    policy::DomainsConfig,
    proxy::hook::{BodyInspector, ChunkAction, Exchange, ExchangeState, Hook, RequestAction, ResponseAction},
    testing::provider::{FakeProvider, TestPki},
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};

struct Setup {
    provider: FakeProvider,
    pki: TestPki,
    proxy: InProcessProxy,
    _dir: tempfile::TempDir,
}

async fn setup(hook: Option<Arc<dyn Hook>>) -> Result<Setup> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let proxy = InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), hook).await?;
    Ok(Setup { provider, pki, proxy, _dir: dir })
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepts_ai_domain_with_our_certificate_over_http1_and_http2() -> Result<()> {
    let s = setup(None).await?;
    for http2 in [false, true] {
        // Trusting only our CA: success proves the certificate is ours and
        // names the SNI.
        let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], http2)?;
        let resp = client
            .post("https://api.openai.com/v1/chat/completions")
            .header("authorization", "Bearer sk-test")
            .header("content-type", "application/json")
            .body(CHAT)
            .send()
            .await?;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), if http2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 });
        let body: serde_json::Value = resp.json().await?;
        assert_eq!(body["echo_len"], CHAT.len());
        let seen = s.provider.requests().pop().expect("the provider saw the request");
        assert_eq!(seen.sni.as_deref(), Some("api.openai.com"), "upstream SNI is the client's");
        assert_eq!(seen.authority.as_deref(), Some("api.openai.com"));
        assert_eq!(seen.body, CHAT.as_bytes(), "body relayed byte for byte");
        assert_eq!(seen.header("authorization"), Some("Bearer sk-test"));
        assert_eq!(seen.path, "/v1/chat/completions");
        // The provider offers h2, so the pooled upstream speaks it whatever
        // the client negotiated with us.
        assert_eq!(seen.version, "HTTP/2.0");
    }
    // The provider's own certificate is not what an intercepted client sees.
    let only_provider_ca = client_for("api.openai.com", s.proxy.addr, &[&s.pki.ca_pem()], false)?;
    assert!(only_provider_ca.get("https://api.openai.com/status/200").send().await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_non_ai_hosts_through_with_the_providers_own_certificate() -> Result<()> {
    let s = setup(None).await?;
    // Trusting only the provider's CA works: the bytes went through untouched.
    let client = client_for("passthrough.example", s.proxy.addr, &[&s.pki.ca_pem()], false)?;
    let resp = client.get("https://passthrough.example/status/204").send().await?;
    assert_eq!(resp.status(), 204);
    let seen = s.provider.requests().pop().expect("request reached the provider");
    assert_eq!(seen.sni.as_deref(), Some("passthrough.example"));
    // And our CA is not involved.
    let ours = client_for("passthrough.example", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    assert!(ours.get("https://passthrough.example/status/204").send().await.is_err());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_server_sent_events_as_they_arrive() -> Result<()> {
    let s = setup(None).await?;
    for http2 in [false, true] {
        let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], http2)?;
        let start = std::time::Instant::now();
        let mut resp = client.get("https://api.openai.com/sse?n=5&interval_ms=200").send().await?;
        let mut arrivals = Vec::new();
        let mut text = String::new();
        while let Some(chunk) = resp.chunk().await? {
            arrivals.push(start.elapsed());
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        assert!(text.contains("[DONE]"), "{text}");
        let (first, last) = (arrivals[0], *arrivals.last().expect("chunks"));
        assert!(last - first >= Duration::from_millis(600), "events were buffered: first {first:?}, last {last:?}");
        assert!(arrivals.len() >= 5, "expected one chunk per event, got {}", arrivals.len());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuses_pooled_upstream_connections_across_client_connections() -> Result<()> {
    let s = setup(None).await?;
    for _ in 0..5 {
        // A new client each time: a new downstream connection and handshake.
        let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
        let resp = client.post("https://api.openai.com/v1/chat/completions").body(CHAT).send().await?;
        assert_eq!(resp.status(), 200);
        resp.bytes().await?;
    }
    assert_eq!(s.provider.requests().len(), 5);
    assert_eq!(s.provider.handshakes(), 1, "upstream connections must be pooled per (destination, SNI)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_provider_is_spoken_to_in_http1() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let tls = pki.server_config(&[b"http/1.1"]);
    let provider = FakeProvider::start_with_tls(std::net::TcpListener::bind("127.0.0.1:0")?, tls)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let proxy = InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), None).await?;
    let client = client_for("api.openai.com", proxy.addr, &[&proxy.ca_pem], true)?;
    let resp = client.post("https://api.openai.com/v1/chat/completions").body(CHAT).send().await?;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_2, "the client side stays HTTP/2");
    assert_eq!(provider.requests().pop().expect("request").version, "HTTP/1.1");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_gets_a_json_502_from_the_interceptor() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let proxy = InProcessProxy::start(dead, &upstream_ca, DomainsConfig::default(), None).await?;
    let client = client_for("api.openai.com", proxy.addr, &[&proxy.ca_pem], false)?;
    let resp = client.post("https://api.openai.com/v1/chat/completions").body(CHAT).send().await?;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-interceptor-error"], "upstream_unreachable");
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_is_verified() -> Result<()> {
    // The proxy trusts some other CA, not the provider's: it must refuse.
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let other = TestPki::with_defaults()?;
    let dir = tempfile::tempdir()?;
    let wrong_ca = other.write_ca(dir.path())?;
    let proxy = InProcessProxy::start(provider.local_addr(), &wrong_ca, DomainsConfig::default(), None).await?;
    let client = client_for("api.openai.com", proxy.addr, &[&proxy.ca_pem], false)?;
    let resp = client.post("https://api.openai.com/v1/chat/completions").body(CHAT).send().await?;
    assert_eq!(resp.status(), 502);
    assert_eq!(resp.headers()["x-interceptor-error"], "upstream_tls_error");
    assert!(provider.requests().is_empty(), "no request may reach an unverified upstream");
    Ok(())
}

/// A hook that blocks bodies containing "BLOCK", rewrites "secret" and
/// upper-cases streamed response text.
struct TestHook;

struct Upper;

#[async_trait::async_trait]
impl BodyInspector for Upper {
    async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction {
        ChunkAction::Forward(Bytes::from(chunk.to_ascii_uppercase()))
    }
    async fn on_end(&mut self) -> Bytes {
        Bytes::from_static(b"<end>")
    }
}

#[async_trait::async_trait]
impl Hook for TestHook {
    async fn on_request(
        &self,
        _: &Exchange,
        _: &mut http::request::Parts,
        body: &Bytes,
    ) -> (RequestAction, ExchangeState) {
        (Self::request(body), None)
    }

    async fn on_response(
        &self,
        _: &Exchange,
        _: &ExchangeState,
        req: &http::request::Parts,
        _: &http::response::Parts,
    ) -> ResponseAction {
        if req.uri.path() == "/sse" { ResponseAction::Inspect(Box::new(Upper)) } else { ResponseAction::Forward }
    }
}

impl TestHook {
    fn request(body: &Bytes) -> RequestAction {
        let text = String::from_utf8_lossy(body);
        if text.contains("BLOCK") {
            let resp = http::Response::builder()
                .status(403)
                .body(http_body_util::Full::new(Bytes::from_static(b"{\"error\":\"blocked\"}")))
                .expect("static response");
            return RequestAction::Respond(resp);
        }
        if text.contains("secret") {
            return RequestAction::ReplaceBody(Bytes::from(text.replace("secret", "[redacted]")));
        }
        RequestAction::Forward
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_can_block_rewrite_and_inspect_streams() -> Result<()> {
    let s = setup(Some(Arc::new(TestHook))).await?;
    let client = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;

    let blocked = client.post("https://api.openai.com/v1/chat/completions").body("BLOCK me").send().await?;
    assert_eq!(blocked.status(), 403);
    assert!(s.provider.requests().is_empty(), "a blocked request never reaches the provider");

    let body = r#"{"messages":[{"role":"user","content":"my secret"}]}"#;
    let ok = client.post("https://api.openai.com/v1/chat/completions").body(body).send().await?;
    assert_eq!(ok.status(), 200);
    let seen = s.provider.requests().pop().expect("forwarded");
    assert_eq!(String::from_utf8_lossy(&seen.body), body.replace("secret", "[redacted]"));
    assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));

    let sse = client.get("https://api.openai.com/sse?n=2&interval_ms=10").send().await?.text().await?;
    assert!(sse.contains("DATA:") && sse.ends_with("<end>"), "{sse}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_rejects_our_certificate_does_not_disturb_others() -> Result<()> {
    let s = setup(None).await?;
    let distrustful = client_for("api.openai.com", s.proxy.addr, &[&s.pki.ca_pem()], false)?;
    for _ in 0..3 {
        // By default a rejection is not turned into a bypass: it keeps failing.
        assert!(distrustful.get("https://api.openai.com/status/200").send().await.is_err());
    }
    let good = client_for("api.openai.com", s.proxy.addr, &[&s.proxy.ca_pem], false)?;
    assert_eq!(good.get("https://api.openai.com/status/200").send().await?.status(), 200);
    Ok(())
}

/// A TLS connection to the proxy for `host`, trusting only our CA, offering `alpn`.
async fn tls_to_proxy(
    proxy: &InProcessProxy,
    host: &str,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(proxy.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await?;
    let name = rustls_pki_types::ServerName::try_from(host.to_string())?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled_after_the_101() -> Result<()> {
    use futures_util::{SinkExt as _, StreamExt as _};
    let s = setup(None).await?;
    let tls = tls_to_proxy(&s.proxy, "api.openai.com", &[b"http/1.1"]).await?;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://api.openai.com/ws", tls).await?;
    assert_eq!(resp.status(), 101);
    for text in ["hello", "world"] {
        ws.send(tokio_tungstenite::tungstenite::Message::text(text)).await?;
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await?.expect("echo")?;
        assert_eq!(echoed.into_text()?.as_str(), text);
    }
    let seen = s.provider.requests().pop().expect("upgrade request");
    assert_eq!(seen.path, "/ws");
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_trailers_are_preserved() -> Result<()> {
    use http_body_util::BodyExt as _;
    let s = setup(None).await?;
    let tls = tls_to_proxy(&s.proxy, "api.openai.com", &[b"h2"]).await?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tls))
            .await?;
    tokio::spawn(conn);
    let req = http::Request::get("https://api.openai.com/trailers")
        .header("te", "trailers")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await?;
    let trailers = collected.trailers().cloned().expect("trailers relayed");
    assert_eq!(trailers["x-checksum"], "abc");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_certificate_can_turn_into_passthrough_for_that_process_and_host() -> Result<()> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let settings = interceptor::proxy::ProxySettings {
        passthrough_on_reject: true,
        client_hello_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let proxy =
        InProcessProxy::start_as(provider.local_addr(), &upstream_ca, settings, Some(workload("pinned-app"))).await?;
    // A "pinned" client that only accepts the provider's own certificate.
    let pinned = client_for("api.openai.com", proxy.addr, &[&pki.ca_pem()], false)?;
    assert!(pinned.get("https://api.openai.com/status/200").send().await.is_err(), "first attempt meets our CA");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        // The rejection is noted when the handshake fails; later connections
        // of the same (process, host) pass through untouched.
        match pinned.get("https://api.openai.com/status/200").send().await {
            Ok(resp) => {
                assert_eq!(resp.status(), 200);
                break;
            }
            Err(e) => assert!(std::time::Instant::now() < deadline, "never passed through: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Without the setting (the default), the client keeps failing: see
    // `a_client_that_rejects_our_certificate_does_not_disturb_others`.
    Ok(())
}

fn workload(comm: &str) -> interceptor::workload::Workload {
    interceptor::workload::Workload {
        pid: 4242,
        tid: 4242,
        uid: 1000,
        gid: 1000,
        comm: comm.into(),
        cgroup_id: 77,
        ..Default::default()
    }
}

/// A proxy with `passthrough_on_reject = true` whose connections are all
/// attributed to `who`, and a client that only trusts the provider's CA.
async fn pinned_setup(
    who: Option<interceptor::workload::Workload>,
) -> Result<(FakeProvider, InProcessProxy, reqwest::Client, tempfile::TempDir)> {
    let pki = TestPki::with_defaults()?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let settings = interceptor::proxy::ProxySettings {
        passthrough_on_reject: true,
        client_hello_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let proxy = InProcessProxy::start_as(provider.local_addr(), &upstream_ca, settings, who).await?;
    let pinned = client_for("api.openai.com", proxy.addr, &[&pki.ca_pem()], false)?;
    Ok((provider, proxy, pinned, dir))
}

/// Keyed by an empty identity, one aborted handshake from a process the
/// redirect could not name would exempt every unnamed process from
/// inspection for that host. An unknown process's rejection is not
/// remembered: the next unnamed client is intercepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejection_by_an_unknown_process_exempts_nobody() -> Result<()> {
    let socket_only = interceptor::workload::Workload {
        pid: 0,
        tid: 0,
        uid: 0,
        gid: 0,
        comm: String::new(),
        cgroup_id: 0,
        ..Default::default()
    };
    for who in [None, Some(socket_only)] {
        let (provider, _proxy, pinned, _dir) = pinned_setup(who.clone()).await?;
        for attempt in 0..5 {
            assert!(
                pinned.get("https://api.openai.com/status/200").send().await.is_err(),
                "attempt {attempt} ({who:?}) was passed through: the rejection was remembered for nobody"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(provider.requests().is_empty(), "nothing reached the provider");
    }
    Ok(())
}

/// A client that hangs up in the middle of the handshake has not rejected
/// our certificate (a scanner, a timeout and an attacker do the same): it
/// must not turn the process's later connections into passthrough.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hang_up_mid_handshake_is_not_a_certificate_rejection() -> Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (provider, proxy, pinned, _dir) = pinned_setup(Some(workload("python3"))).await?;
    let config =
        rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth();
    for _ in 0..3 {
        // A ClientHello for an AI host, then EOF once the server answered.
        let name = rustls_pki_types::ServerName::try_from("api.openai.com")?;
        let mut hello = rustls::ClientConnection::new(Arc::new(config.clone()), name)?;
        let mut bytes = Vec::new();
        hello.write_tls(&mut bytes)?;
        let mut tcp = tokio::net::TcpStream::connect(proxy.addr).await?;
        tcp.write_all(&bytes).await?;
        let mut buf = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut buf)).await??;
        // Half-close, and wait for the proxy to give up on the handshake
        // and close its side: the failure has been judged by then.
        tcp.shutdown().await?;
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await??;
    }
    // The process's next connection meets our certificate again (and this
    // client rejects it), instead of being relayed uninspected.
    assert!(
        pinned.get("https://api.openai.com/status/200").send().await.is_err(),
        "passed through after a mere hang-up"
    );
    assert!(provider.requests().is_empty(), "nothing reached the provider");
    Ok(())
}

/// HTTP/2 connection coalescing, or a Host that disagrees with the SNI: an
/// AI request sent on a connection made for a sibling name (same address,
/// same parent domain, a certificate that covers both) must not ride it to
/// the provider uninspected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ai_request_on_a_connection_made_for_a_sibling_name_gets_421() -> Result<()> {
    use http_body_util::{BodyExt as _, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rustls_pki_types::pem::PemObject as _;

    let pki = TestPki::new(&["www.googleapis.com", "generativelanguage.googleapis.com"], &[])?;
    let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
    let dir = tempfile::tempdir()?;
    let upstream_ca = pki.write_ca(dir.path())?;
    let hook = interceptor_tests::inprocess::local_pipeline(Default::default(), None)?;
    let proxy =
        InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), Some(hook)).await?;
    proxy.set_ai_address(provider.local_addr().ip(), &["generativelanguage.googleapis.com"]);

    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(proxy.ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await?;
    let name = rustls_pki_types::ServerName::try_from("www.googleapis.com")?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
    tokio::spawn(conn);

    let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n-----END RSA PRIVATE KEY-----";
    let body = serde_json::json!({"contents": [{"parts": [{"text": key}]}]}).to_string();
    let coalesced =
        http::Request::post("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
    let resp = sender.send_request(coalesced).await?;
    assert_eq!(resp.status(), 421, "an AI request on the sibling's connection");
    let text = resp.into_body().collect().await?.to_bytes();
    assert!(String::from_utf8_lossy(&text).contains("misdirected_request"), "{text:?}");

    // The connection's own name is relayed as before.
    let own = http::Request::get("https://www.googleapis.com/discovery/v1/apis").body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(own).await?;
    assert_ne!(resp.status(), 421);
    let seen = provider.requests();
    assert_eq!(seen.len(), 1, "only the sibling's own request reached the provider: {seen:#?}");
    assert_eq!(seen[0].path, "/discovery/v1/apis");
    assert_eq!(seen[0].sni.as_deref(), Some("www.googleapis.com"));
    Ok(())
}

/// Streamed answers inspected by the guardrails (monitor and enforce) from
/// an HTTP/1.1-only provider, one after the other on one kept-alive client
/// connection: the upstream connection goes back to the pool when a stream
/// ends, so every request after the first is sent on it, with no new
/// handshake to the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspected_streams_reuse_the_upstream_connection() -> Result<()> {
    use interceptor::config::{GuardrailsConfig, StreamMode};
    for stream_mode in [StreamMode::Monitor, StreamMode::Enforce] {
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start_with_tls(
            std::net::TcpListener::bind("127.0.0.1:0")?,
            pki.server_config(&[b"http/1.1"]),
        )?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let hook =
            interceptor_tests::inprocess::local_pipeline(GuardrailsConfig { stream_mode, ..Default::default() }, None)?;
        let proxy =
            InProcessProxy::start(provider.local_addr(), &upstream_ca, DomainsConfig::default(), Some(hook)).await?;
        let client = client_for("api.openai.com", proxy.addr, &[&proxy.ca_pem], false)?;
        let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
        for _ in 0..10 {
            let resp =
                client.post("https://api.openai.com/v1/chat/completions?interval_ms=1").body(body).send().await?;
            assert_eq!(resp.status(), 200);
            let text = resp.text().await?;
            assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        }
        assert_eq!(provider.requests().len(), 10);
        assert_eq!(provider.handshakes(), 1, "{stream_mode:?}: each stream opened a new upstream connection");
    }
    Ok(())
}
