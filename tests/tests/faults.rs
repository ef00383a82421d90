//! Fault injection: for each way a dependency can fail, what the client sees,
//! what is logged and audited, and that nothing leaks. The README's "Failure
//! behaviour" table states the same outcomes.
//!
//! In-process tests (guardrail backend, provider, client, DNS upstream, audit
//! disk) run the data plane on loopback with a mock original destination and
//! capture the process's own log. Privileged tests (config reload, state
//! directory) run the real binary in a test namespace.
//!
//! The in-process tests count this process's file descriptors and tokio
//! tasks, so they take one lock and run one at a time.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use hickory_proto::{
    op::{Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use interceptor::{
    audit::AuditLog,
    config::{Backend, FailMode, GuardrailsConfig},
    dns::{DnsForwarder, DnsObserver, ForwarderConfig, Learned, NothingAsked, Upstreams},
    guardrails::{
        akto::{AktoClient, AktoConfig},
        engine::Engine,
        pipeline::{Guardrails, Pipeline},
    },
    metrics::Metrics,
    proxy::hook::Hook,
    testing::{
        ADMIN, Interceptor, Netns,
        akto::{FakeAkto, Reply},
        http_get, interceptor_bin,
        provider::{FakeProvider, TestPki},
        require_privileges, spawn_in,
    },
};
use interceptor_tests::inprocess::{InProcessProxy, client_for};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::watch,
};

// ---- log capture and serialisation ----

/// Everything this process logged (JSON lines), from the first test on.
fn log_buffer() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::clone(&buffer);
        // The product's JSON lines: span fields (client, SNI) at the top level.
        let subscriber =
            interceptor::telemetry::json_subscriber(tracing_subscriber::EnvFilter::new("info"), move || {
                Capture(Arc::clone(&writer))
            });
        let _ = tracing_subscriber::util::SubscriberInitExt::try_init(subscriber);
        buffer
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log from `mark` on.
struct Logs {
    mark: usize,
}

impl Logs {
    fn start() -> Self {
        let mark = log_buffer().lock().unwrap_or_else(|e| e.into_inner()).len();
        Self { mark }
    }

    fn text(&self) -> String {
        let buf = log_buffer().lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&buf[self.mark.min(buf.len())..]).into_owned()
    }

    fn lines(&self) -> Vec<Value> {
        self.text().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// Waits (bounded) for a log line whose message contains `needle`.
    async fn wait_for(&self, needle: &str) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) =
                self.lines().into_iter().find(|l| l["message"].as_str().is_some_and(|m| m.contains(needle)))
            {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!("no log line with {needle:?}; log:\n{}", self.text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One in-process fault test at a time: they count descriptors and tasks.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let guard = SERIAL.lock().await;
    log_buffer();
    guard
}

/// Polls `cond` every 20 ms for at most `limit`.
async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !cond() {
        if Instant::now() > deadline {
            bail!("not within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current().metrics().num_alive_tasks()
}

/// Waits until open descriptors and live tasks are back to a baseline.
async fn back_to_baseline(fds: usize, tasks: usize) -> Result<()> {
    eventually(Duration::from_secs(5), &format!("descriptors back to {fds} (now {})", open_fds()), || {
        open_fds() <= fds
    })
    .await?;
    eventually(Duration::from_secs(5), &format!("tasks back to {tasks} (now {})", alive_tasks()), || {
        alive_tasks() <= tasks
    })
    .await
}

/// A port on 127.0.0.1 nothing listens on (TCP and UDP).
fn closed_port() -> Result<SocketAddr> {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = tcp.local_addr()?;
        if std::net::UdpSocket::bind(addr).is_ok() {
            return Ok(addr);
        }
    }
}

// ---- the in-process data plane ----

/// The proxy in this process in front of a fake provider, with its own
/// metrics, upstream idle timeout and (optionally) guardrail pipeline.
struct Plane {
    provider: FakeProvider,
    proxy: InProcessProxy,
    /// The pipeline's metrics.
    metrics: Arc<Metrics>,
    audit: PathBuf,
    _dir: tempfile::TempDir,
}

enum Guard {
    None,
    Local,
    Akto { url: String, fail: FailMode },
}

impl Plane {
    async fn start(guard: Guard, idle: Duration, audit_file: Option<PathBuf>) -> Result<Plane> {
        let pki = TestPki::with_defaults()?;
        let provider = FakeProvider::start(std::net::TcpListener::bind("127.0.0.1:0")?, &pki)?;
        let dir = tempfile::tempdir()?;
        let upstream_ca = pki.write_ca(dir.path())?;
        let metrics = Arc::new(Metrics::new());
        let audit = audit_file.unwrap_or_else(|| dir.path().join("audit.jsonl"));
        let hook: Option<Arc<dyn Hook>> = match guard {
            Guard::None => None,
            Guard::Local => {
                let g = Guardrails {
                    engine: Some(Arc::new(Engine::builtin()?)),
                    akto: None,
                    cfg: GuardrailsConfig::default(),
                    keys: None,
                };
                Some(pipeline(g, &audit, &metrics))
            }
            Guard::Akto { url, fail } => {
                let akto = AktoConfig {
                    url,
                    app_name: "Billing Agent".into(),
                    request_timeout: Duration::from_secs(2),
                    stream_timeout: Duration::from_secs(2),
                    ..AktoConfig::default()
                };
                let cfg = GuardrailsConfig {
                    backends: vec![Backend::Akto],
                    fail_mode_request: fail,
                    fail_mode_response: fail,
                    akto: akto.clone(),
                    ..GuardrailsConfig::default()
                };
                let g = Guardrails { engine: None, akto: Some(Arc::new(AktoClient::new(akto)?)), cfg, keys: None };
                Some(pipeline(g, &audit, &metrics))
            }
        };
        let proxy = InProcessProxy::start_with_upstream_idle(provider.local_addr(), &upstream_ca, hook, idle).await?;
        Ok(Plane { provider, proxy, metrics, audit, _dir: dir })
    }

    fn client(&self, http2: bool) -> Result<reqwest::Client> {
        client_for("api.openai.com", self.proxy.addr, &[&self.proxy.ca_pem], http2)
    }

    /// Audit events written so far.
    fn audit(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    async fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(found) = self.audit().into_iter().find(|e| pred(e)) {
                return Ok(found);
            }
            if Instant::now() > deadline {
                bail!("no audit event: {what}; audit: {:#?}", self.audit());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics.encode();
        text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// Stops accepting; true when every connection finished in time.
    async fn drain(&mut self, deadline: Duration) -> bool {
        self.proxy.drain(deadline).await
    }

    /// A raw HTTP/1.1-over-TLS connection to the proxy for `api.openai.com`.
    async fn raw(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(self.proxy.ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let mut cfg = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(self.proxy.addr).await?;
        let name = rustls_pki_types::ServerName::try_from("api.openai.com")?;
        Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?)
    }

    /// One whole request on a fresh connection (`Connection: close`).
    async fn raw_exchange(&self, request: &[u8]) -> Result<String> {
        let mut tls = self.raw().await?;
        tls.write_all(request).await?;
        let mut out = Vec::new();
        // A TLS close without close_notify still ends the exchange.
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

fn pipeline(g: Guardrails, audit: &Path, metrics: &Arc<Metrics>) -> Arc<dyn Hook> {
    // The receiver keeps the last value after the sender is gone.
    let (_, rx) = watch::channel(Arc::new(g));
    let audit = AuditLog::start(Some(audit.to_path_buf()), Arc::clone(metrics));
    Arc::new(Pipeline::new(rx, audit, Arc::clone(metrics)))
}

/// POSTs a JSON body to `api.openai.com` at `path`.
async fn post_chat(client: &reqwest::Client, path: &str, body: String) -> Result<reqwest::Response> {
    let url = format!("https://api.openai.com{path}");
    Ok(client.post(url).header("content-type", "application/json").body(body).send().await?)
}

fn chat(prompt: &str, stream: bool) -> String {
    json!({ "model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": prompt}] }).to_string()
}

fn post_request(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: api.openai.com\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

// ---- 1. guardrail backend ----

enum AktoFault {
    Down,
    Status5xx,
    Garbage,
}

/// The backend fails: failing open forwards the request and records an
/// error decision; failing closed answers 503 with a JSON error and never
/// calls the provider. Both log the failure with its kind.
async fn backend_fault(fault: AktoFault, kind: &str) -> Result<()> {
    for fail in [FailMode::Open, FailMode::Closed] {
        let akto = FakeAkto::start()?;
        let url = match fault {
            AktoFault::Down => format!("http://{}", closed_port()?),
            AktoFault::Status5xx => {
                akto.set_request_reply(Reply::Status(503, r#"{"error":"overloaded"}"#.into()));
                akto.set_response_reply(Reply::Status(500, "internal error".into()));
                akto.url()
            }
            AktoFault::Garbage => {
                akto.set_request_reply(Reply::Garbage);
                akto.set_response_reply(Reply::Garbage);
                akto.url()
            }
        };
        let plane = Plane::start(Guard::Akto { url, fail }, Duration::from_secs(30), None).await?;
        let logs = Logs::start();
        let resp = post_chat(&plane.client(false)?, "/v1/chat/completions", chat("hello", false)).await?;
        let line = logs.wait_for("akto check failed").await?;
        assert_eq!(line["kind"], kind, "{line}");
        assert_eq!(line["level"], "WARN");
        match fail {
            FailMode::Open => {
                assert_eq!(resp.status(), 200);
                assert_eq!(plane.provider.requests().len(), 1, "failing open forwards");
                let event = plane.wait_audit("request error", |e| e["direction"] == "request").await?;
                assert_eq!(event["decision"], "error", "{event}");
                let reasons = event["reasons"].to_string();
                assert!(reasons.contains("akto unavailable"), "{event}");
            }
            FailMode::Closed => {
                assert_eq!(resp.status(), 503);
                assert_eq!(resp.headers()["x-akto-guardrails-decision"], "blocked");
                assert_eq!(resp.headers()["content-type"], "application/json");
                let body: Value = resp.json().await?;
                assert_eq!(body, json!({ "error": "guardrail backend unavailable" }));
                assert!(plane.provider.requests().is_empty(), "failing closed never reaches the provider");
                let event = plane.wait_audit("request block", |e| e["direction"] == "request").await?;
                assert_eq!(event["decision"], "block", "{event}");
                assert!(event["reasons"].to_string().contains("akto unavailable"), "{event}");
            }
        }
        assert!(
            plane.metric(&format!("interceptor_guardrail_backend_errors_total{{backend=\"akto\",kind=\"{kind}\"}}"))
                >= Some(1.0),
            "{}",
            plane.metrics.encode()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn akto_down_fails_open_with_an_error_event_or_closed_with_a_503() -> Result<()> {
    let _serial = serial().await;
    backend_fault(AktoFault::Down, "unreachable").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn akto_answering_5xx_fails_open_with_an_error_event_or_closed_with_a_503() -> Result<()> {
    let _serial = serial().await;
    backend_fault(AktoFault::Status5xx, "status").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn akto_answering_garbage_fails_open_with_an_error_event_or_closed_with_a_503() -> Result<()> {
    let _serial = serial().await;
    backend_fault(AktoFault::Garbage, "malformed").await
}

// ---- 2. provider ----

/// Reads a response body to its end or first error, at most 10 s: the
/// bytes, and whether it ended with an error.
async fn read_body(mut resp: reqwest::Response) -> Result<(Vec<u8>, Option<String>)> {
    let mut got = Vec::new();
    let read = async {
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => got.extend_from_slice(&chunk),
                Ok(None) => return None,
                Err(error) => return Some(format!("{error:?}")),
            }
        }
    };
    let error = tokio::time::timeout(Duration::from_secs(10), read).await.context("the client body hung")?;
    Ok((got, error))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_resetting_mid_response_cuts_the_client_body_with_an_error_and_a_log_line() -> Result<()> {
    let _serial = serial().await;
    let plane = Plane::start(Guard::None, Duration::from_secs(30), None).await?;
    for http2 in [false, true] {
        let logs = Logs::start();
        let resp = plane.client(http2)?.get("https://api.openai.com/reset-mid-body?after=2").send().await?;
        assert_eq!(resp.status(), 200);
        let (got, error) = read_body(resp).await?;
        let text = String::from_utf8_lossy(&got);
        // Bytes in flight when the reset lands are lost with it.
        assert!(text.contains("\"i\":0"), "the events before the reset arrive: {text}");
        assert!(error.is_some(), "the body must end with an error, not look complete (http2: {http2}): {text}");
        assert!(!text.contains("[DONE]"));
        let line = logs.wait_for("upstream response body failed").await?;
        assert_eq!(line["sni"], "api.openai.com", "{line}");
        assert_eq!(line["path"], "/reset-mid-body", "{line}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_stalling_before_or_mid_response_is_given_up_after_the_idle_timeout_logged_and_audited() -> Result<()>
{
    let _serial = serial().await;
    let idle = Duration::from_millis(600);
    let plane = Plane::start(Guard::Local, idle, None).await?;
    for http2 in [false, true] {
        let logs = Logs::start();
        let started = Instant::now();
        let path = "/v1/chat/completions?fault=stall&after=2&interval_ms=10";
        let resp = post_chat(&plane.client(http2)?, path, chat("tell me a story", true)).await?;
        assert_eq!(resp.status(), 200);
        let (got, error) = read_body(resp).await?;
        let elapsed = started.elapsed();
        let text = String::from_utf8_lossy(&got);
        assert!(text.contains("\"i\":1"), "the events before the stall arrive: {text}");
        assert!(error.is_some(), "a stalled stream must end with an error (http2: {http2}): {text}");
        assert!(elapsed >= idle, "cut before the idle timeout: {elapsed:?}");
        assert!(elapsed < idle + Duration::from_secs(3), "cut long after the idle timeout: {elapsed:?}");
        let line = logs.wait_for("upstream response body failed").await?;
        assert!(line["error"].as_str().is_some_and(|e| e.contains("sent nothing")), "{line}");
    }
    // No response head at all: a 504 from the interceptor.
    let logs = Logs::start();
    let started = Instant::now();
    let resp = plane.client(false)?.get("https://api.openai.com/stall-head").send().await?;
    let elapsed = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["x-interceptor-error"], "upstream_timeout");
    assert!(elapsed >= idle && elapsed < idle + Duration::from_secs(3), "{elapsed:?}");
    let body: Value = resp.json().await?;
    assert!(body["error"]["message"].as_str().is_some_and(|m| m.contains("sent nothing")), "{body}");
    logs.wait_for("no response head from the provider").await?;

    // The response's audit event is not lost: it says the stream was cut.
    let cut: Vec<Value> = plane
        .audit()
        .into_iter()
        .filter(|e| e["direction"] == "response" && e["reasons"].to_string().contains("stream cut short"))
        .collect();
    assert_eq!(cut.len(), 2, "{:#?}", plane.audit());
    assert_eq!(cut[0]["decision"], "error");
    eventually(Duration::from_secs(3), "the stalled upstream requests are given up", || {
        plane.provider.cancelled_streams() == 3
    })
    .await
    .with_context(|| format!("cancelled: {}", plane.provider.cancelled_streams()))?;
    Ok(())
}

// ---- 3. client ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_upload_or_mid_stream_cancels_the_upstream_request_and_leaks_nothing() -> Result<()> {
    let _serial = serial().await;

    // Mid-upload, nothing buffered: the request body streams to the provider.
    let mut plane = Plane::start(Guard::None, Duration::from_secs(30), None).await?;
    let warm = plane.raw_exchange(&post_request("/v1/chat/completions", &chat("warm up", false))).await?;
    assert!(warm.starts_with("HTTP/1.1 200"), "{warm}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds, tasks) = (open_fds(), alive_tasks());
    let logs = Logs::start();
    {
        let mut tls = plane.raw().await?;
        let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: api.openai.com\r\n\
                    content-type: application/json\r\ncontent-length: 1000000\r\n\r\n";
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(&[b' '; 64 * 1024]).await?;
        tls.flush().await?;
        eventually(Duration::from_secs(5), "the upload reaches the provider", || plane.provider.open_connections() > 0)
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Gone without finishing the body.
    }
    eventually(Duration::from_secs(5), "the provider sees the upload broken off", || {
        plane.provider.incomplete_uploads() == 1
    })
    .await?;
    let record = logs.wait_for("connection closed").await?;
    assert_eq!(record["mode"], "intercept", "{record}");
    assert_eq!(plane.provider.requests().len(), 1, "only the warm-up request completed");
    back_to_baseline(fds, tasks).await?;
    assert!(plane.drain(Duration::from_secs(2)).await, "every connection task finished");

    // Mid-stream, with the stream inspected, while the provider is quiet:
    // the inspection task must notice the client left without waiting for
    // the provider's next byte.
    let mut plane = Plane::start(Guard::Local, Duration::from_secs(600), None).await?;
    let warm = plane.raw_exchange(&post_request("/v1/chat/completions", &chat("warm up", false))).await?;
    assert!(warm.starts_with("HTTP/1.1 200"), "{warm}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds, tasks) = (open_fds(), alive_tasks());
    let logs = Logs::start();
    {
        let mut tls = plane.raw().await?;
        tls.write_all(&post_request("/v1/chat/completions?fault=stall&after=1", &chat("stream please", true))).await?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let read = async {
            while !String::from_utf8_lossy(&got).contains("data: ") {
                let n = tls.read(&mut buf).await?;
                anyhow::ensure!(n > 0, "closed before the first event");
                got.extend_from_slice(&buf[..n]);
            }
            Ok(())
        };
        tokio::time::timeout(Duration::from_secs(5), read).await??;
        // Gone mid-stream.
    }
    eventually(Duration::from_secs(3), "the provider's stream is cancelled", || {
        plane.provider.cancelled_streams() == 1
    })
    .await?;
    let event =
        plane.wait_audit("the cut stream", |e| e["direction"] == "response" && e["decision"] == "error").await?;
    assert!(event["reasons"].to_string().contains("the client went away"), "{event}");
    logs.wait_for("connection closed").await?;
    back_to_baseline(fds, tasks).await?;
    assert!(plane.drain(Duration::from_secs(2)).await, "every connection task finished");
    Ok(())
}

// ---- 4. DNS upstream ----

struct NoAi;

#[async_trait::async_trait]
impl DnsObserver for NoAi {
    fn is_ai_domain(&self, _: &str) -> bool {
        false
    }
    async fn learned(&self, _: Vec<Learned>) {}
}

fn dns_query(id: u16) -> Result<Vec<u8>> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii("example.com.")?, RecordType::A));
    Ok(m.to_vec()?)
}

async fn dns_ask(server: SocketAddr, id: u16) -> Result<(Message, Duration)> {
    let socket = UdpSocket::bind("127.0.0.1:0").await?;
    let asked = Instant::now();
    socket.send_to(&dns_query(id)?, server).await?;
    let mut buf = vec![0u8; 4096];
    let len = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await.context("no dns reply")??;
    let reply = Message::from_vec(&buf[..len])?;
    ensure!(reply.metadata.id == id, "reply to another query");
    Ok((reply, asked.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_dns_upstream_gets_servfail_promptly_and_the_next_query_is_served() -> Result<()> {
    let _serial = serial().await;
    // One upstream refuses (nothing listens); the other stays silent for the
    // first query and answers the second.
    let scripted = UdpSocket::bind("127.0.0.1:0").await?;
    let timeout = Duration::from_millis(400);
    let cfg = ForwarderConfig {
        upstreams: Upstreams::Configured(vec![closed_port()?, scripted.local_addr()?]),
        timeout,
        ..Default::default()
    };
    let udp = UdpSocket::bind("127.0.0.1:0").await?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server = udp.local_addr()?;
    let (_stop, shutdown) = watch::channel(false);
    let _forwarder = DnsForwarder::serve(udp, tcp, cfg, Arc::new(NoAi), Arc::new(NothingAsked), shutdown);

    let logs = Logs::start();
    let (reply, elapsed) = dns_ask(server, 0x0101).await?;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert!(elapsed < timeout * 2 + Duration::from_secs(1), "servfail took {elapsed:?}");
    let line = logs.wait_for("every dns upstream failed").await?;
    assert_eq!(line["name"], "example.com", "{line}");
    // The silent upstream did get the query (and ignores it).
    let mut buf = vec![0u8; 4096];
    let (len, _) = tokio::time::timeout(Duration::from_secs(1), scripted.recv_from(&mut buf)).await??;
    assert_eq!(Message::from_vec(&buf[..len])?.metadata.id, 0x0101);

    let answering = tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        let (len, peer) = scripted.recv_from(&mut buf).await?;
        let query = Message::from_vec(&buf[..len])?;
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_available = true;
        reply.add_query(query.queries[0].clone());
        reply.add_answer(Record::from_rdata(Name::from_ascii("example.com.")?, 60, RData::A(A::new(192, 0, 2, 7))));
        scripted.send_to(&reply.to_vec()?, peer).await?;
        anyhow::Ok(())
    });
    let (reply, _) = dns_ask(server, 0x0102).await?;
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    let addrs: Vec<_> = reply.answers.iter().filter_map(|r| r.data.ip_addr()).collect();
    assert_eq!(addrs, vec!["192.0.2.7".parse::<std::net::IpAddr>()?], "the forwarder serves on after a failure");
    answering.await??;
    Ok(())
}

// ---- 6. audit disk full ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_audit_disk_lets_requests_flow_and_counts_and_logs_every_lost_event() -> Result<()> {
    let _serial = serial().await;
    // /dev/full accepts the open and fails every write with ENOSPC.
    let plane = Plane::start(Guard::Local, Duration::from_secs(30), Some(PathBuf::from("/dev/full"))).await?;
    let logs = Logs::start();
    let client = plane.client(false)?;
    for prompt in ["one", "two", "three"] {
        let resp = post_chat(&client, "/v1/chat/completions", chat(prompt, false)).await?;
        assert_eq!(resp.status(), 200, "requests flow while the audit file is broken");
    }
    // Two events per request (request and response), none in the file.
    eventually(Duration::from_secs(5), "6 dropped events counted", || {
        plane.metric("interceptor_audit_events_dropped_total") == Some(6.0)
    })
    .await
    .with_context(|| plane.metrics.encode())?;
    let line = logs.wait_for("cannot write the audit file").await?;
    assert_eq!(line["level"], "ERROR");
    assert_eq!(line["path"], "/dev/full");
    assert!(line["error"].as_str().is_some_and(|e| e.contains("No space left")), "{line}");
    // Loud once, not once per event.
    let errors = logs.lines().into_iter().filter(|l| l["level"] == "ERROR").count();
    assert_eq!(errors, 1, "{}", logs.text());
    // Every event still reached the log.
    let decisions = logs.lines().into_iter().filter(|l| l["message"] == "guardrail decision").count();
    assert_eq!(decisions, 6, "{}", logs.text());
    Ok(())
}

// ---- 5. config and policy files (privileged, the real binary) ----

fn wait_log(proxy: &Interceptor, needle: &str, after: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !proxy.log_text().get(after..).is_some_and(|t| t.contains(needle)) {
        if Instant::now() > deadline {
            bail!("no {needle:?} in the log:\n{}", proxy.log_text());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn has_target(proxy: &Interceptor, netns: &Netns, cidr: &str) -> Result<bool> {
    Ok(proxy.status(netns)?["targets"].to_string().contains(cidr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_corrupted_config_or_policy_keeps_the_running_one_until_a_valid_one_returns() -> Result<()> {
    if !require_privileges("a_deleted_or_corrupted_config_or_policy_keeps_the_running_one_until_a_valid_one_returns") {
        return Ok(());
    }
    let netns = Netns::new("faults_reload")?;
    let dir = tempfile::tempdir()?;
    let policy = dir.path().join("policy.toml");
    let policy_v1 = "[[rules]]\nid = \"codename\"\ndetectors = [\"codename\"]\naction = \"block\"\n\n\
                     [[detectors]]\nname = \"codename\"\nkeywords = [\"project zebra\"]\n";
    std::fs::write(&policy, policy_v1)?;
    let config = |cidr: &str| {
        format!(
            "[targets]\nmode = \"resolve\"\ndomains = []\ncidrs = [\"{cidr}\"]\nresolve_interval = \"1s\"\n\
             [guardrails]\npolicy_file = \"{}\"\n",
            policy.display()
        )
    };
    let mut proxy = Interceptor::start(&netns, None, &config("198.18.0.10"), &["--redirect", "none"])?;
    proxy.wait_ready(&netns, Duration::from_secs(20))?;
    assert!(has_target(&proxy, &netns, "198.18.0.10")?);
    let path = proxy.config_path();

    // Deleted: an error, and the running configuration stays.
    let mark = proxy.log_text().len();
    std::fs::remove_file(&path)?;
    wait_log(&proxy, "cannot read the config file; keeping the running configuration", mark)?;
    assert!(has_target(&proxy, &netns, "198.18.0.10")?, "targets kept after the file went away");

    // Corrupted (not TOML): rejected, still running on the old one.
    let mark = proxy.log_text().len();
    std::fs::write(&path, "[targets\ncidrs = ")?;
    wait_log(&proxy, "config reload rejected", mark)?;
    assert!(has_target(&proxy, &netns, "198.18.0.10")?);

    // A valid file again: picked up.
    let mark = proxy.log_text().len();
    std::fs::write(&path, config("198.18.0.77"))?;
    wait_log(&proxy, "configuration reloaded", mark)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_target(&proxy, &netns, "198.18.0.77")? {
        ensure!(Instant::now() < deadline, "the new targets were not applied: {}", proxy.status(&netns)?);
        std::thread::sleep(Duration::from_millis(200));
    }

    // The policy file likewise: deleted, kept; back with a change, reloaded.
    let mark = proxy.log_text().len();
    std::fs::remove_file(&policy)?;
    wait_log(&proxy, "cannot read the policy file; keeping the running policy", mark)?;
    let mark = proxy.log_text().len();
    std::fs::write(&policy, policy_v1.replace("action = \"block\"", "action = \"alert\""))?;
    wait_log(&proxy, "guardrail policy reloaded", mark)?;

    // Still serving.
    let (code, _) = http_get(&netns, ADMIN.parse()?, "/readyz")?;
    assert_eq!(code, 200);
    let status = proxy.terminate(Duration::from_secs(15))?;
    assert!(status.success(), "{status}");
    Ok(())
}

// ---- 7. unwritable state directory (privileged, the real binary) ----

/// A read-only tmpfs, unmounted on drop.
struct ReadOnlyMount {
    dir: tempfile::TempDir,
}

impl ReadOnlyMount {
    fn new() -> Result<Self> {
        use nix::mount::{MsFlags, mount};
        let dir = tempfile::tempdir()?;
        mount(Some("tmpfs"), dir.path(), Some("tmpfs"), MsFlags::empty(), Some("size=16k,mode=0700"))?;
        let ro = Self { dir };
        mount(None::<&str>, ro.dir.path(), None::<&str>, MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>)?;
        Ok(ro)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_directory_stops_the_start_before_any_redirect() -> Result<()> {
    if !require_privileges("an_unwritable_state_directory_stops_the_start_before_any_redirect") {
        return Ok(());
    }
    let netns = Netns::new("faults_ca")?;
    let state = ReadOnlyMount::new()?;
    ensure!(std::fs::write(state.dir.path().join("probe"), b"x").is_err(), "the mount is not read-only");
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[targets]\nmode = \"resolve\"\ndomains = []\ncidrs = [\"198.18.0.10\"]\n")?;
    let log_path = dir.path().join("log");
    let mut cmd = std::process::Command::new(interceptor_bin());
    cmd.arg("--config")
        .arg(&config)
        .arg("run")
        .arg("--state-dir")
        .arg(state.dir.path())
        .args(["--redirect", "iptables", "--log-format", "json"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path)?);
    let mut child = spawn_in(&mut cmd, Some(&netns), None)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running with a read-only state directory:\n{}", std::fs::read_to_string(&log_path)?);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&log_path)?;
    assert!(!status.success(), "{status}\n{log}");
    let error = log.lines().find(|l| l.starts_with("error:")).with_context(|| format!("no error line:\n{log}"))?;
    assert!(error.contains(&state.dir.path().display().to_string()), "the message names the directory: {error}");
    assert!(error.contains("certificate authority") && error.contains("Read-only"), "{error}");
    assert!(!log.contains("redirect installed"), "nothing may be redirected before the CA is ready:\n{log}");
    let rules = netns.exec(&["iptables", "-t", "nat", "-S"])?;
    assert!(!rules.to_lowercase().contains("interceptor"), "{rules}");
    Ok(())
}
