//! A fake AI provider for tests: a throwaway test PKI ([`TestPki`]) and a real
//! HTTPS server ([`FakeProvider`]) that answers like a provider and records
//! every TLS handshake and request from its own side.
//!
//! The server speaks HTTP/1.1 and HTTP/2 (chosen by ALPN), streams server-sent
//! events with real gaps between them, upgrades `GET /ws` to an echoing
//! WebSocket, and sends trailers on `GET /trailers`. Routes:
//!
//! | request | answer |
//! |---|---|
//! | `POST /v1/responses` | OpenAI Responses object; with `"stream": true`, its SSE events (`event:` lines, no `[DONE]`) |
//! | `POST /v1/messages` | Anthropic message; with `"stream": true`, the Messages SSE sequence |
//! | `POST /model/{id}/invoke` | Bedrock InvokeModel: the Anthropic message for an `anthropic.` model id, a Titan body otherwise |
//! | `POST /model/{id}/invoke-with-response-stream` | `application/vnd.amazon.eventstream` `chunk` frames wrapping the same model's stream events |
//! | `POST /model/{id}/converse` | Bedrock Converse output |
//! | `POST /model/{id}/converse-stream` | event-stream frames `messageStart`, `contentBlockDelta`…, `contentBlockStop`, `messageStop`, `metadata` |
//! | `POST …/models/{m}:generateContent` | Gemini `GenerateContentResponse` |
//! | `POST …/models/{m}:streamGenerateContent?alt=sse` | SSE `data:` chunks, no `[DONE]` |
//! | `POST …/models/{m}:streamGenerateContent` | one JSON array streamed element by element (`[{…},\r\n{…}]`) |
//! | any other `POST` | 200 JSON chat completion (about 1 KB) with `"echo_len"`; with `"stream": true` in a JSON body, an SSE stream of chunks instead |
//! | `GET /sse?n=5&interval_ms=200` | `text/event-stream`: `n` events, one per write, `interval_ms` apart, then `data: [DONE]` |
//! | `GET /stall-head` | no response at all: the request is read, then nothing is sent, ever |
//! | `GET /stall-mid-stream?after=2` | `/sse` that sends `after` events, then nothing more, ever (a stalled provider) |
//! | `GET /reset-mid-body?after=2` | `/sse` that sends `after` events, then resets the TCP connection (RST) |
//! | `GET /ws` | WebSocket upgrade (HTTP/1.1), then every text or binary message is echoed |
//! | `GET /v1/responses` (upgrade) | the Responses API's WebSocket mode: each `response.create` is answered with `response.created`, `response.output_text.delta`s, `response.output_text.done`, `response.completed` |
//! | `GET /v1/realtime` (upgrade) | OpenAI Realtime: `session.created` at once; `conversation.item.create` gets `conversation.item.created`; `response.create` gets `response.created`, one `response.output_audio.delta`, `response.output_text.delta`s, `response.done` |
//! | `GET /ws/google.ai.generativelanguage.*.BidiGenerateContent` (upgrade) | Gemini Live, in binary frames: `setup` gets `setupComplete`; `clientContent` gets `serverContent.modelTurn` parts, then `turnComplete` |
//! | `GET /trailers` | HTTP/2 or chunked HTTP/1.1 body followed by the trailer `x-checksum: abc` (over HTTP/1.1 only if the request says `te: trailers`: hyper's rule) |
//! | `GET /status/{code}` | that status, empty body |
//! | `GET /big?bytes=N` | `N` bytes of `abc…z` repeated, with a content length |
//! | anything else | 404 JSON error |
//!
//! Every message a WebSocket client sends is recorded
//! ([`FakeProvider::ws_messages`]).
//!
//! Given real AWS credentials ([`FakeProvider::expect_aws_credentials`]),
//! the Bedrock routes (`/model/…`) check each request's SigV4 signature
//! against them as AWS does (`testing::sigv4`), record the outcome
//! ([`RecordedRequest::sigv4`]) and answer a bad one `403` with AWS's error
//! type in `x-amzn-ErrorType` (`InvalidSignatureException`,
//! `UnrecognizedClientException`) and `{"message": …}`, which the AWS SDKs
//! read as that error.
//!
//! A request header `x-fake-status: <code>` (400 to 599) makes a `POST` answer
//! that status with the provider's error body instead (Anthropic's shape on
//! `/v1/messages`, OpenAI's elsewhere), as a rate limit or a bad key would.
//!
//! A request header `x-fake-id: <id>` replaces the `id` of a chat completion
//! (and of each chunk of a streamed one; on a WebSocket upgrade, the ids of
//! the Responses and Realtime answers), as a provider that echoes what it
//! was given there would.
//!
//! A request header `x-fake-reply: <text>` replaces the assistant text in chat
//! answers (and in the WebSocket answers, set on the upgrade request), so a test can make the "model" say something specific. Streams
//! split that text into deltas at word boundaries, and words longer than
//! twelve characters (a token, a key) across several deltas, as real models
//! do; each event or frame is its own write, `interval_ms` (query, default
//! 20; 50 for chat completions) apart. Answers carry no clock or random
//! values: the same request always gets the same bytes.
//!
//! Lockstep: `gated=1` in the query of a streamed chat completion (or
//! `/sse`) sends each event (and the final `[DONE]`) only once the test lets
//! it through ([`FakeProvider::release_events`]); the server counts the
//! events it handed to the connection ([`FakeProvider::sse_events_sent`]).
//! A test can then wait for what the client saw before the provider sends
//! more, and know exactly what the provider had sent.
//!
//! Faults: `fault=stall&after=N` or `fault=reset&after=N` in the query of a
//! streamed chat completion (or `/sse`) stops the stream after `N` events,
//! as `/stall-mid-stream` and `/reset-mid-body` do. The server counts streams
//! that ended before their last event ([`FakeProvider::cancelled_streams`])
//! and uploads that broke off ([`FakeProvider::incomplete_uploads`]), which is
//! what a client or proxy giving up looks like from the provider's side.
//!
//! The server runs on the current tokio runtime and stops when dropped.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::respond::ErrorShape;
use anyhow::{Context, Result, bail};
use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::sigv4::{self, AwsCredentialsExpected, SigV4Check};
use super::{Netns, in_netns};
use crate::guardrails::framing::eventstream;

/// A fixed chat completion of about 1 KB, the answer the benchmarks measure
/// (the fake provider's own answers vary with the request).
pub fn sample_chat_completion() -> String {
    let text = "The quarterly report shows steady growth in every region, with operating costs held flat. ".repeat(9);
    json!({
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text.trim_end()}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 420, "completion_tokens": 180, "total_tokens": 600}
    })
    .to_string()
}

/// Host names the default [`TestPki`] certificate covers: the providers the
/// interceptor knows, plus one name it should pass through untouched.
pub const DEFAULT_NAMES: &[&str] = &[
    "api.openai.com",
    "chatgpt.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    "bedrock-runtime.us-east-1.amazonaws.com",
    "passthrough.example",
];

/// The address tests give the fake provider inside their namespace (TEST-NET
/// benchmarking range, never routed).
pub const PROVIDER_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 18, 0, 10));

/// Common name of the test CA, as clients report it in the issuer.
pub const TEST_CA_NAME: &str = "Interceptor Test Upstream CA";

/// Common name of the fake provider's certificate, as clients report it in the subject.
pub const PROVIDER_CERT_NAME: &str = "fake-provider";

/// ALPN the fake provider offers by default, in preference order.
pub const DEFAULT_ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body the server reads.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Chunk size of `/big` bodies: a multiple of 26, so the `a..z` pattern runs on.
const BIG_CHUNK: usize = 26 * 2048;
/// Longest `/sse` stream accepted (events and gap), so a typo cannot hang a test.
const MAX_SSE_EVENTS: u64 = 10_000;
const MAX_SSE_INTERVAL_MS: u64 = 60_000;

/// A throwaway CA (ECDSA P-256) and one server certificate it signed. The CA
/// plays the real providers' public CA: tests write it out for clients and for
/// the interceptor's `--upstream-ca`.
pub struct TestPki {
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
    /// The server certificate and key, PEM, for servers that read files.
    server_pem: (String, String),
}

impl std::fmt::Debug for TestPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki").finish_non_exhaustive()
    }
}

impl TestPki {
    /// A fresh CA and a server certificate for `names` (DNS) and `ips`.
    pub fn new(names: &[&str], ips: &[IpAddr]) -> Result<TestPki> {
        let now = time::OffsetDateTime::now_utc();
        // Backdated a day so clock skew between processes never matters.
        let not_before = now - time::Duration::days(1);
        let not_after = now + time::Duration::days(365);

        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("CA key")?;
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = name(TEST_CA_NAME);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        ca_params.not_before = not_before;
        ca_params.not_after = not_after;
        ca_params.serial_number = Some(random_serial());
        let ca_cert = ca_params.self_signed(&ca_key).context("sign CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let sans: Vec<String> =
            names.iter().map(|n| (*n).to_owned()).chain(ips.iter().map(IpAddr::to_string)).collect();
        let mut params = CertificateParams::new(sans).context("server certificate names")?;
        params.distinguished_name = name(PROVIDER_CERT_NAME);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial());
        let server_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("server key")?;
        let server_cert = params.signed_by(&server_key, &issuer).context("sign server certificate")?;

        Ok(TestPki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            server_chain: vec![server_cert.der().clone()],
            server_key: PrivatePkcs8KeyDer::from(server_key.serialize_der()),
            server_pem: (server_cert.pem(), server_key.serialize_pem()),
        })
    }

    /// [`TestPki::new`] for [`DEFAULT_NAMES`] and [`PROVIDER_IP`].
    pub fn with_defaults() -> Result<TestPki> {
        TestPki::new(DEFAULT_NAMES, &[PROVIDER_IP])
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca_pem.clone()
    }

    /// The CA certificate, DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca_der.clone()
    }

    /// Writes the CA certificate to `dir/test-ca.pem` and returns that path.
    pub fn write_ca(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("test-ca.pem");
        std::fs::write(&path, &self.ca_pem).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// Writes the server certificate and its key (mode 0600) to
    /// `dir/server.pem` and `dir/server.key`, for servers such as nginx.
    pub fn write_server_files(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let cert = dir.join("server.pem");
        let key = dir.join("server.key");
        std::fs::write(&cert, &self.server_pem.0).with_context(|| format!("write {}", cert.display()))?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&key)
            .with_context(|| format!("create {}", key.display()))?;
        std::io::Write::write_all(&mut file, self.server_pem.1.as_bytes())
            .with_context(|| format!("write {}", key.display()))?;
        Ok((cert, key))
    }

    /// A server configuration presenting the server certificate and offering
    /// `alpn` (e.g. [`DEFAULT_ALPN`], or `&[b"http/1.1"]` for an HTTP/1-only provider).
    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(self.server_key.clone_key());
        // A fresh rcgen key and certificate always match; failure is a bug here.
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("default protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.server_chain.clone(), key)
            .expect("test certificate and key match");
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// A client configuration that trusts only this CA and offers `alpn`,
    /// for in-process clients.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        // Our own freshly generated CA always parses.
        roots.add(self.ca_der.clone()).expect("test CA parses");
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("default protocol versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Interceptor Tests");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, as DER integers for serials must be.
    bytes[0] &= 0x7f;
    rcgen::SerialNumber::from_slice(&bytes)
}

/// One request as the fake provider saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Number of the TLS connection it came on (1 for the first handshake).
    pub connection: u64,
    /// Server name the client sent in its ClientHello.
    pub sni: Option<String>,
    /// Negotiated ALPN protocol (`h2`, `http/1.1`), if any.
    pub alpn: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
    pub method: String,
    /// Path with query, e.g. `/sse?n=5`.
    pub path: String,
    /// Authority from the request target (HTTP/2) or the `host` header.
    pub authority: Option<String>,
    /// Header names lower-case, values lossily decoded, in received order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client address as the server saw it.
    pub peer: SocketAddr,
    /// The SigV4 check, on a Bedrock route when AWS credentials are
    /// expected.
    pub sigv4: Option<SigV4Check>,
}

impl RecordedRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).context("request body is not JSON")
    }
}

/// A completed TLS handshake as the fake provider saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeInfo {
    /// Number of the connection (1 for the first).
    pub connection: u64,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub peer: SocketAddr,
}

/// One message a WebSocket client sent, as the fake provider received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsMessage {
    pub connection: u64,
    /// Path of the upgrade request.
    pub path: String,
    /// The message (binary ones lossily decoded).
    pub text: String,
    pub binary: bool,
}

#[derive(Default)]
struct Recorder {
    requests: Mutex<Vec<RecordedRequest>>,
    ws_messages: Mutex<Vec<WsMessage>>,
    handshakes: Mutex<Vec<HandshakeInfo>>,
    failed_handshakes: AtomicUsize,
    next_connection: AtomicU64,
    cancelled_streams: AtomicUsize,
    incomplete_uploads: AtomicUsize,
    open_connections: AtomicUsize,
    /// Events `gated=1` streams may still send.
    gate: Gate,
    /// Events every `/sse`-shaped stream handed to its connection.
    sse_events_sent: AtomicUsize,
    /// The real AWS credentials Bedrock requests must be signed with.
    aws: Mutex<Option<AwsCredentialsExpected>>,
}

/// Permits for the events of `gated=1` streams; none at first.
struct Gate(tokio::sync::Semaphore);

impl Default for Gate {
    fn default() -> Self {
        Self(tokio::sync::Semaphore::new(0))
    }
}

/// What one connection knows about itself, shared by its requests.
#[derive(Clone)]
struct ConnInfo {
    connection: u64,
    sni: Option<String>,
    alpn: Option<String>,
    peer: SocketAddr,
    recorder: Arc<Recorder>,
    shutdown: watch::Receiver<()>,
    /// Notified by a response that wants its connection reset.
    reset: Arc<tokio::sync::Notify>,
}

/// How a stream misbehaves after some events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Sends nothing more and never ends.
    Stall,
    /// Resets the TCP connection.
    Reset,
}

/// `fault=stall|reset&after=N` from a query.
fn fault_of(query: &str) -> Option<(Fault, u64)> {
    let after = query_u64(query, "after").unwrap_or(2);
    let fault = query.split('&').find_map(|pair| match pair {
        "fault=stall" => Some(Fault::Stall),
        "fault=reset" => Some(Fault::Reset),
        _ => None,
    })?;
    Some((fault, after))
}

/// Counts a stream as cancelled when it is dropped before its end.
struct StreamGuard {
    recorder: Arc<Recorder>,
    finished: bool,
}

impl StreamGuard {
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.recorder.cancelled_streams.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A fake HTTPS provider; see the module docs for its routes. Dropping it
/// stops the listener and every connection.
pub struct FakeProvider {
    local_addr: SocketAddr,
    recorder: Arc<Recorder>,
    accept: JoinHandle<()>,
    // Dropping the sender wakes every task waiting on `shutdown.changed()`.
    _shutdown: watch::Sender<()>,
}

impl std::fmt::Debug for FakeProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvider").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl FakeProvider {
    /// Serves on an already bound listener with the PKI's server certificate,
    /// offering `h2` and `http/1.1`. Must be called within a tokio runtime.
    pub fn start(listener: std::net::TcpListener, pki: &TestPki) -> Result<FakeProvider> {
        FakeProvider::start_with_tls(listener, pki.server_config(DEFAULT_ALPN))
    }

    /// Binds `addr` inside `netns` (the address must already be on one of its
    /// interfaces, e.g. `netns.add_addr("lo", "198.18.0.10/32")`) and serves
    /// there. Must be called within a tokio runtime.
    pub fn start_in(netns: &Netns, addr: SocketAddr, pki: &TestPki) -> Result<FakeProvider> {
        let listener = in_netns(netns, || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", netns.name()))?;
        FakeProvider::start(listener, pki)
    }

    /// Serves on `listener` with a caller-made TLS configuration (another
    /// certificate, or other ALPN). Must be called within a tokio runtime.
    pub fn start_with_tls(listener: std::net::TcpListener, tls: Arc<ServerConfig>) -> Result<FakeProvider> {
        tokio::runtime::Handle::try_current()
            .context("the fake provider needs a tokio runtime (call from within one)")?;
        listener.set_nonblocking(true).context("set listener non-blocking")?;
        let local_addr = listener.local_addr().context("listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("register listener")?;
        let recorder = Arc::new(Recorder::default());
        let (shutdown_tx, shutdown) = watch::channel(());
        let accept =
            tokio::spawn(accept_loop(listener, tokio_rustls::TlsAcceptor::from(tls), Arc::clone(&recorder), shutdown));
        Ok(FakeProvider { local_addr, recorder, accept, _shutdown: shutdown_tx })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Every request completed so far (head and whole body read), in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.recorder.requests).clone()
    }

    /// Every request recorded so far, forgetting them and the handshake log
    /// (counters stay), so a long-running test does not grow the recorder
    /// without bound.
    pub fn take_requests(&self) -> Vec<RecordedRequest> {
        lock(&self.recorder.handshakes).clear();
        std::mem::take(&mut *lock(&self.recorder.requests))
    }

    /// Every WebSocket message received so far, in order.
    pub fn ws_messages(&self) -> Vec<WsMessage> {
        lock(&self.recorder.ws_messages).clone()
    }

    /// Number of completed TLS handshakes (one per connection).
    pub fn handshakes(&self) -> usize {
        lock(&self.recorder.handshakes).len()
    }

    /// The completed TLS handshakes, in order.
    pub fn handshake_log(&self) -> Vec<HandshakeInfo> {
        lock(&self.recorder.handshakes).clone()
    }

    /// Number of TLS handshakes that failed or timed out (e.g. a client that
    /// rejected the certificate).
    pub fn failed_handshakes(&self) -> usize {
        self.recorder.failed_handshakes.load(Ordering::Relaxed)
    }

    /// Streamed responses dropped before their last event: the peer went
    /// away (or the connection was reset) mid-stream.
    pub fn cancelled_streams(&self) -> usize {
        self.recorder.cancelled_streams.load(Ordering::Relaxed)
    }

    /// Requests whose body broke off before its end.
    pub fn incomplete_uploads(&self) -> usize {
        self.recorder.incomplete_uploads.load(Ordering::Relaxed)
    }

    /// TLS connections currently open.
    /// Lets `gated=1` streams send `n` more events (shared by all of them).
    pub fn release_events(&self, n: usize) {
        self.recorder.gate.0.add_permits(n);
    }

    /// Events (the final `[DONE]` included) that `/sse`-shaped streams have
    /// handed to their connections so far.
    pub fn sse_events_sent(&self) -> usize {
        self.recorder.sse_events_sent.load(Ordering::SeqCst)
    }

    pub fn open_connections(&self) -> usize {
        self.recorder.open_connections.load(Ordering::Relaxed)
    }

    /// From now on, Bedrock requests must be signed (SigV4) with these
    /// credentials; see the module docs.
    pub fn expect_aws_credentials(&self, expected: AwsCredentialsExpected) {
        *lock(&self.recorder.aws) = Some(expected);
    }

    /// Waits up to `timeout` until at least `n` requests are recorded; returns them.
    pub async fn wait_requests(&self, n: usize, timeout: Duration) -> Result<Vec<RecordedRequest>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let requests = self.requests();
            if requests.len() >= n {
                return Ok(requests);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("fake provider saw {} requests within {timeout:?}, wanted {n}: {requests:#?}", requests.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeProvider {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    recorder: Arc<Recorder>,
    shutdown: watch::Receiver<()>,
) {
    // Connections live in this set, so aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve_connection(
                        stream,
                        peer,
                        acceptor.clone(),
                        Arc::clone(&recorder),
                        shutdown.clone(),
                    ));
                }
                // Transient (e.g. out of descriptors): back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    recorder: Arc<Recorder>,
    shutdown: watch::Receiver<()>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        _ => {
            recorder.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let (sni, alpn) = {
        let conn = tls.get_ref().1;
        (conn.server_name().map(str::to_owned), conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()))
    };
    let connection = recorder.next_connection.fetch_add(1, Ordering::Relaxed) + 1;
    lock(&recorder.handshakes).push(HandshakeInfo { connection, sni: sni.clone(), alpn: alpn.clone(), peer });
    let fd = std::os::fd::AsRawFd::as_raw_fd(tls.get_ref().0);
    let reset = Arc::new(tokio::sync::Notify::new());
    recorder.open_connections.fetch_add(1, Ordering::Relaxed);
    let _open = OpenGuard(Arc::clone(&recorder));
    let info = ConnInfo {
        connection,
        sni,
        alpn: alpn.clone(),
        peer,
        recorder,
        shutdown: shutdown.clone(),
        reset: Arc::clone(&reset),
    };
    let service = service_fn(move |req| {
        let info = info.clone();
        async move { Ok::<_, Infallible>(handle(req, info).await) }
    });
    // Mirror ALPN like a real provider; without ALPN, detect by the h2 preface.
    let builder = match alpn.as_deref() {
        Some("h2") => auto::Builder::new(TokioExecutor::new()).http2_only(),
        Some("http/1.1") => auto::Builder::new(TokioExecutor::new()).http1_only(),
        _ => auto::Builder::new(TokioExecutor::new()),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
    let mut shutdown = shutdown;
    tokio::select! {
        _ = conn => {}
        _ = shutdown.changed() => {}
        () = reset.notified() => {
            // SAFETY: `conn` owns the socket and is only dropped at the end
            // of this function, so the descriptor is open here.
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            // A zero linger makes the close below send RST instead of FIN.
            let _ = nix::sys::socket::setsockopt(
                &sock,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger { l_onoff: 1, l_linger: 0 },
            );
        }
    }
}

struct OpenGuard(Arc<Recorder>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn empty() -> Body {
    Empty::new().boxed_unsync()
}

fn respond(status: StatusCode, content_type: Option<&'static str>, body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    response
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    respond(status, Some("application/json"), full(value.to_string()))
}

async fn handle(mut req: Request<Incoming>, info: ConnInfo) -> Response<Body> {
    // Taken before the body is read: the upgrade handle lives in the extensions.
    let upgrade =
        (req.method() == Method::GET && ws_script(req.uri().path()).is_some()).then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(e) => {
            info.recorder.incomplete_uploads.fetch_add(1, Ordering::Relaxed);
            return json_response(
                StatusCode::BAD_REQUEST,
                &error_json(&format!("cannot read request body: {e}"), "bad_request"),
            );
        }
    };
    let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| parts.headers.get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()));
    let expected = lock(&info.recorder.aws).clone();
    let sigv4 = expected.filter(|_| parts.uri.path().starts_with("/model/")).map(|expected| {
        let host = authority.as_deref().unwrap_or_default();
        sigv4::verify(parts.method.as_str(), host, &path, &parts.headers, &body, &expected)
    });
    let recorded = RecordedRequest {
        connection: info.connection,
        sni: info.sni.clone(),
        alpn: info.alpn.clone(),
        version: format!("{:?}", parts.version),
        method: parts.method.to_string(),
        path,
        authority,
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body,
        peer: info.peer,
        sigv4,
    };
    lock(&info.recorder.requests).push(recorded.clone());
    if let Some(SigV4Check::Rejected { code, why }) = &recorded.sigv4 {
        let mut response = json_response(StatusCode::FORBIDDEN, &json!({ "message": why }));
        let error_type = format!("{code}:http://internal.amazon.com/coral/com.amazon.coral.service/");
        if let Ok(v) = HeaderValue::from_str(&error_type) {
            response.headers_mut().insert("x-amzn-errortype", v);
        }
        return response;
    }
    if parts.uri.path() == "/stall-head" {
        // Until the connection goes: the request is then cancelled.
        let _guard = StreamGuard { recorder: Arc::clone(&info.recorder), finished: false };
        std::future::pending::<()>().await;
    }
    route(&parts, &recorded, upgrade, &info)
}

/// What a streamed response needs to misbehave and be counted.
struct StreamCtx {
    fault: Option<(Fault, u64)>,
    /// `gated=1`: each event waits for [`FakeProvider::release_events`].
    gated: bool,
    recorder: Arc<Recorder>,
    reset: Arc<tokio::sync::Notify>,
    /// The chunks' `id` (`x-fake-id`, else the default).
    id: String,
}

fn route(
    parts: &http::request::Parts,
    req: &RecordedRequest,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    info: &ConnInfo,
) -> Response<Body> {
    let query = parts.uri.query().unwrap_or("");
    let path = parts.uri.path();
    let gated = query.split('&').any(|pair| pair == "gated=1");
    let id = completion_id(&parts.headers, "chatcmpl-FAKESSE");
    let ctx = |fault| StreamCtx {
        fault,
        gated,
        recorder: Arc::clone(&info.recorder),
        reset: Arc::clone(&info.reset),
        id: id.clone(),
    };
    if parts.method == Method::POST {
        return post(parts, req, query, ctx(fault_of(query)));
    }
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return not_found(parts);
    }
    match path {
        "/sse" => {
            let n = query_u64(query, "n").unwrap_or(5);
            let interval = query_u64(query, "interval_ms").unwrap_or(200);
            if n > MAX_SSE_EVENTS || interval > MAX_SSE_INTERVAL_MS {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    &error_json("n or interval_ms too large", "bad_request"),
                );
            }
            let pieces = chat_pieces(&reply_text(&parts.headers));
            sse_response(n, Duration::from_millis(interval), pieces, ctx(fault_of(query)))
        }
        "/stall-mid-stream" | "/reset-mid-body" => {
            let fault = if path == "/stall-mid-stream" { Fault::Stall } else { Fault::Reset };
            let after = query_u64(query, "after").unwrap_or(2).min(MAX_SSE_EVENTS);
            let interval = query_u64(query, "interval_ms").unwrap_or(20).min(MAX_SSE_INTERVAL_MS);
            let pieces = chat_pieces(&reply_text(&parts.headers));
            sse_response(after + 5, Duration::from_millis(interval), pieces, ctx(Some((fault, after))))
        }
        p if ws_script(p).is_some() => websocket(parts, upgrade, info, ws_script(p).unwrap_or(WsScript::Echo)),
        "/trailers" => trailers_response(),
        "/big" => big_response(query_u64(query, "bytes").unwrap_or(0)),
        _ => match path.strip_prefix("/status/") {
            Some(code) => match code.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(status) => respond(status, None, empty()),
                None => json_response(
                    StatusCode::BAD_REQUEST,
                    &error_json(&format!("bad status code {code:?}"), "bad_request"),
                ),
            },
            None => not_found(parts),
        },
    }
}

fn query_u64(query: &str, key: &str) -> Option<u64> {
    query.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == key).and_then(|(_, v)| v.parse().ok())
}

fn error_json(message: &str, code: &str) -> serde_json::Value {
    json!({
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": null,
            "code": code,
        }
    })
}

fn not_found(parts: &http::request::Parts) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &error_json(&format!("no route for {} {}", parts.method, parts.uri.path()), "not_found"),
    )
}

const DEFAULT_REPLY: &str = "Hello! I am the fake provider used by the interceptor tests. \
    I answer every chat request with this canned text, which is long enough to look like a \
    real model reply and to exercise response inspection without being expensive to scan.";

/// The chat completion's `id`: `x-fake-id`, else `default`.
fn completion_id(headers: &HeaderMap, default: &str) -> String {
    headers.get("x-fake-id").map_or_else(|| default.to_owned(), |v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

fn reply_text(headers: &HeaderMap) -> String {
    headers
        .get("x-fake-reply")
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_else(|| DEFAULT_REPLY.to_owned())
}

/// The `created` time of every answer (2025-01-01): fixed, so that the same
/// request always gets the same bytes.
const FAKE_CREATED: u64 = 1_735_689_600;

/// Longest piece of one word in a streamed delta.
const MAX_PIECE_CHARS: usize = 12;

/// Default gap between the events of the provider-shaped streams.
const STREAM_INTERVAL_MS: u64 = 20;

/// `text` cut into stream deltas: each word with the whitespace after it,
/// words longer than [`MAX_PIECE_CHARS`] in several pieces. The pieces
/// concatenate to `text` exactly.
fn split_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let word_len = rest.find(char::is_whitespace).unwrap_or(rest.len());
        let (word, tail) = rest.split_at(word_len);
        let space_len = tail.find(|c: char| !c.is_whitespace()).unwrap_or(tail.len());
        let (space, next) = tail.split_at(space_len);
        let mut start = 0;
        for (cut, _) in word.char_indices().step_by(MAX_PIECE_CHARS).skip(1) {
            pieces.push(word[start..cut].to_owned());
            start = cut;
        }
        pieces.push(format!("{}{space}", &word[start..]));
        rest = next;
    }
    pieces
}

/// The deltas of a chat-completion stream: the words separated (and
/// followed) by one space, long words split.
fn chat_pieces(text: &str) -> Vec<String> {
    split_pieces(&format!("{} ", text.split_whitespace().collect::<Vec<_>>().join(" ")))
}

/// An OpenAI-style chat completion, or a stream of chunks for `"stream": true`.
fn chat_completion(parts: &http::request::Parts, req: &RecordedRequest, query: &str, ctx: StreamCtx) -> Response<Body> {
    let request_json: Option<serde_json::Value> = serde_json::from_slice(&req.body).ok();
    let model = request_json
        .as_ref()
        .and_then(|v| v.get("model"))
        .and_then(|m| m.as_str())
        .unwrap_or("gpt-4o-mini-2024-07-18")
        .to_owned();
    let reply = reply_text(&parts.headers);
    if request_json.as_ref().and_then(|v| v.get("stream")).and_then(serde_json::Value::as_bool) == Some(true) {
        let pieces = chat_pieces(&reply);
        // At least five events, and enough to carry the whole reply once.
        let n = query_u64(query, "n").unwrap_or_else(|| pieces.len().max(5) as u64).min(MAX_SSE_EVENTS);
        let interval = query_u64(query, "interval_ms").unwrap_or(50).min(MAX_SSE_INTERVAL_MS);
        // With `stream_options.include_usage`, a last chunk without choices
        // carries the usage, as OpenAI sends it.
        let include_usage = request_json
            .as_ref()
            .and_then(|v| v.pointer("/stream_options/include_usage"))
            .and_then(serde_json::Value::as_bool)
            == Some(true);
        let usage = include_usage.then(|| chat_usage(req.body.len() / 4, reply.len() / 4));
        return sse_response_with_usage(n, Duration::from_millis(interval), pieces, usage, ctx);
    }
    let prompt_tokens = req.body.len() / 4;
    let completion_tokens = reply.len() / 4;
    let body = json!({
        "id": completion_id(&parts.headers, "chatcmpl-FAKE0123456789abcdefghijklmnop"),
        "object": "chat.completion",
        "created": FAKE_CREATED,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {
                "role": "assistant",
                "content": reply,
                "refusal": null,
                "annotations": [],
            },
            "logprobs": null,
            "finish_reason": "stop",
        }],
        "usage": chat_usage(prompt_tokens, completion_tokens),
        "service_tier": "default",
        "system_fingerprint": "fp_fake0001",
        "echo_len": req.body.len(),
        "echo_path": req.path,
    });
    let mut response = json_response(StatusCode::OK, &body);
    let headers = response.headers_mut();
    headers.insert("x-request-id", HeaderValue::from_static("req_fake0001"));
    headers.insert("openai-processing-ms", HeaderValue::from_static("12"));
    response
}

/// A chat completion's `usage` object.
fn chat_usage(prompt_tokens: usize, completion_tokens: usize) -> serde_json::Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    })
}

/// `n` chat-completion chunks as server-sent events, `interval` apart (the
/// first at once), each its own body frame, then `data: [DONE]`. Event `k`
/// carries `pieces[k % pieces.len()]`. With a fault, the stream stalls or the
/// connection is reset once `after` events are out.
fn sse_response(n: u64, interval: Duration, pieces: Vec<String>, ctx: StreamCtx) -> Response<Body> {
    sse_response_with_usage(n, interval, pieces, None, ctx)
}

/// [`sse_response`], with a chunk carrying `usage` (and no choices) in the
/// frame of `data: [DONE]`, when given.
fn sse_response_with_usage(
    n: u64,
    interval: Duration,
    pieces: Vec<String>,
    usage: Option<serde_json::Value>,
    ctx: StreamCtx,
) -> Response<Body> {
    let id = ctx.id.clone();
    let usage_event = usage.map(|usage| {
        let chunk = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": FAKE_CREATED,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [],
            "usage": usage,
        });
        format!("data: {chunk}\n\n")
    });
    let guard = StreamGuard { recorder: Arc::clone(&ctx.recorder), finished: false };
    let (fault, reset, gated, recorder) = (ctx.fault, ctx.reset, ctx.gated, ctx.recorder);
    let events = futures_util::stream::unfold((0u64, guard), move |(k, mut guard)| {
        let piece =
            pieces.get(usize::try_from(k).unwrap_or(usize::MAX) % pieces.len().max(1)).cloned().unwrap_or_default();
        let reset = Arc::clone(&reset);
        let recorder = Arc::clone(&recorder);
        let usage_event = usage_event.clone();
        let id = id.clone();
        async move {
            if k > n {
                guard.finish();
                return None;
            }
            if gated {
                // A closed gate never happens: the semaphore lives as long
                // as the recorder.
                if let Ok(permit) = recorder.gate.0.acquire().await {
                    permit.forget();
                }
            }
            match fault {
                Some((Fault::Stall, after)) if k == after => std::future::pending::<()>().await,
                Some((Fault::Reset, after)) if k == after => {
                    reset.notify_one();
                    std::future::pending::<()>().await;
                }
                _ => {}
            }
            if k > 0 && k < n && !gated {
                tokio::time::sleep(interval).await;
            }
            recorder.sse_events_sent.fetch_add(1, Ordering::SeqCst);
            if k == n {
                let last = format!("{}data: [DONE]\n\n", usage_event.as_deref().unwrap_or(""));
                let frame = Frame::data(Bytes::from(last));
                return Some((Ok::<_, Infallible>(frame), (k + 1, guard)));
            }
            // `i` first, so the events read `data: {"i":k,...}` (serde_json sorts keys).
            let rest = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": FAKE_CREATED,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{
                    "index": 0,
                    "delta": {"content": piece},
                    "finish_reason": if k + 1 == n { json!("stop") } else { json!(null) },
                }],
            });
            let rest = rest.to_string();
            let rest = rest.strip_prefix('{').unwrap_or(&rest);
            let frame = Frame::data(Bytes::from(format!("data: {{\"i\":{k},{rest}\n\n")));
            Some((Ok(frame), (k + 1, guard)))
        }
    });
    let mut response = respond(StatusCode::OK, Some("text/event-stream"), StreamBody::new(events).boxed_unsync());
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// A `POST`: the answer in the shape of the provider the path belongs to.
fn post(parts: &http::request::Parts, req: &RecordedRequest, query: &str, ctx: StreamCtx) -> Response<Body> {
    let path = parts.uri.path();
    if let Some(status) = fake_status(&parts.headers) {
        return provider_error(path, status);
    }
    let request: Option<serde_json::Value> = serde_json::from_slice(&req.body).ok();
    let wants_stream =
        request.as_ref().and_then(|v| v.get("stream")).and_then(serde_json::Value::as_bool) == Some(true);
    let model_in_body = request.as_ref().and_then(|v| v.get("model")).and_then(serde_json::Value::as_str);
    let interval =
        Duration::from_millis(query_u64(query, "interval_ms").unwrap_or(STREAM_INTERVAL_MS).min(MAX_SSE_INTERVAL_MS));
    let reply = Reply::new(reply_text(&parts.headers), req.body.len());
    if path == "/v1/responses" {
        let model = model_in_body.unwrap_or("gpt-4.1-2025-04-14");
        return if wants_stream {
            spaced(TEXT_EVENT_STREAM, responses_events(model, &reply), interval)
        } else {
            json_response(StatusCode::OK, &responses_object(model, &reply, "completed"))
        };
    }
    if path == "/v1/messages" {
        let model = model_in_body.unwrap_or("claude-sonnet-4-5-20250929");
        let mut response = if wants_stream {
            let events = anthropic_events(model, &reply, false)
                .into_iter()
                .map(|(name, data)| sse_bytes(Some(name), &data, "\n"))
                .collect();
            spaced(TEXT_EVENT_STREAM, events, interval)
        } else {
            json_response(StatusCode::OK, &anthropic_message(model, &reply))
        };
        response.headers_mut().insert("request-id", HeaderValue::from_static("req_fake0001"));
        return response;
    }
    if let Some((id, operation)) = path.strip_prefix("/model/").and_then(|rest| rest.rsplit_once('/'))
        && let Some(response) = bedrock(id, operation, &reply, interval)
    {
        return response;
    }
    if let Some((model_path, method)) = path.rsplit_once(':')
        && let Some((_, model)) = model_path.rsplit_once("/models/")
    {
        let sse = query.split('&').any(|pair| pair == "alt=sse");
        match method {
            "generateContent" => {
                return json_response(StatusCode::OK, &gemini_chunk(model, &reply.text, true, &reply));
            }
            "streamGenerateContent" => return gemini_stream(model, &reply, sse, interval),
            _ => {}
        }
    }
    chat_completion(parts, req, query, ctx)
}

/// The status asked for with `x-fake-status`, if it is an error status.
fn fake_status(headers: &HeaderMap) -> Option<StatusCode> {
    let code = headers.get("x-fake-status")?.to_str().ok()?.trim().parse::<u16>().ok()?;
    StatusCode::from_u16(code).ok().filter(|s| s.is_client_error() || s.is_server_error())
}

/// An error answer in the shape of the provider `path` belongs to
/// (Anthropic's on `/v1/messages`, Bedrock's on `/model/…`, Gemini's on
/// `…:generateContent`, OpenAI's elsewhere), as the interceptor's own
/// provider-shaped answers are built.
fn provider_error(path: &str, status: StatusCode) -> Response<Body> {
    let message = format!("fake provider error {}", status.as_u16());
    let shape = if path == "/v1/messages" {
        ErrorShape::Anthropic
    } else if path.starts_with("/model/") {
        ErrorShape::Bedrock
    } else if path.contains(":generateContent") || path.contains(":streamGenerateContent") {
        ErrorShape::Gemini
    } else {
        ErrorShape::OpenAi
    };
    let mut response = crate::respond::provider_error(shape, status, &message).map(BodyExt::boxed_unsync);
    response.headers_mut().insert("x-request-id", HeaderValue::from_static("req_fake0001"));
    response
}

const TEXT_EVENT_STREAM: &str = "text/event-stream";
const AMZ_EVENT_STREAM: &str = "application/vnd.amazon.eventstream";

/// The assistant text of one answer, its stream deltas and token counts
/// (a quarter of the bytes, like the chat completion's).
struct Reply {
    text: String,
    pieces: Vec<String>,
    input_tokens: usize,
    output_tokens: usize,
}

impl Reply {
    fn new(text: String, request_len: usize) -> Reply {
        let pieces = split_pieces(&text);
        Reply { input_tokens: request_len / 4, output_tokens: text.len() / 4, text, pieces }
    }
}

/// Each chunk its own body frame, `interval` apart (the first at once).
fn spaced(content_type: &'static str, chunks: Vec<Bytes>, interval: Duration) -> Response<Body> {
    let frames = futures_util::stream::iter(chunks.into_iter().enumerate()).then(move |(i, chunk)| async move {
        if i > 0 {
            tokio::time::sleep(interval).await;
        }
        Ok::<_, Infallible>(Frame::data(chunk))
    });
    let mut response = respond(StatusCode::OK, Some(content_type), StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// One server-sent event, lines ended by `eol`.
fn sse_bytes(event: Option<&str>, data: &serde_json::Value, eol: &str) -> Bytes {
    let event = event.map(|e| format!("event: {e}{eol}")).unwrap_or_default();
    Bytes::from(format!("{event}data: {data}{eol}{eol}"))
}

/// One AWS event-stream `event` frame.
fn event_frame(event_type: &str, payload: &serde_json::Value) -> Bytes {
    let headers = [
        (":event-type", eventstream::HeaderValue::from(event_type)),
        (":content-type", eventstream::HeaderValue::from("application/json")),
        (":message-type", eventstream::HeaderValue::from("event")),
    ];
    // Short fixed headers and a small payload always fit the frame format.
    eventstream::encode_frame(&headers, payload.to_string().as_bytes()).map(Bytes::from).unwrap_or_default()
}

// ---------------------------------------------------------------------------
// OpenAI Responses

fn responses_message(reply: &Reply, status: &str) -> serde_json::Value {
    json!({
        "id": "msg_fake0001",
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": reply.text, "annotations": []}],
    })
}

fn responses_object(model: &str, reply: &Reply, status: &str) -> serde_json::Value {
    let done = status == "completed";
    json!({
        "id": "resp_fake0001",
        "object": "response",
        "created_at": FAKE_CREATED,
        "status": status,
        "error": null,
        "model": model,
        "output": if done { json!([responses_message(reply, "completed")]) } else { json!([]) },
        "usage": if done {
            json!({
                "input_tokens": reply.input_tokens,
                "output_tokens": reply.output_tokens,
                "total_tokens": reply.input_tokens + reply.output_tokens,
            })
        } else {
            json!(null)
        },
    })
}

/// The Responses stream: `event:` lines mirroring each data's `type`,
/// numbered, ending with `response.completed` (no `[DONE]`).
fn responses_events(model: &str, reply: &Reply) -> Vec<Bytes> {
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let mut events = vec![
        json!({"type": "response.created", "response": responses_object(model, reply, "in_progress")}),
        json!({"type": "response.in_progress", "response": responses_object(model, reply, "in_progress")}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": {
            "id": "msg_fake0001", "type": "message", "status": "in_progress", "role": "assistant", "content": [],
        }}),
        json!({"type": "response.content_part.added", "item_id": "msg_fake0001", "output_index": 0,
            "content_index": 0, "part": part("")}),
    ];
    for piece in &reply.pieces {
        events.push(json!({"type": "response.output_text.delta", "item_id": "msg_fake0001", "output_index": 0,
            "content_index": 0, "delta": piece}));
    }
    events.extend([
        json!({"type": "response.output_text.done", "item_id": "msg_fake0001", "output_index": 0,
            "content_index": 0, "text": reply.text}),
        json!({"type": "response.content_part.done", "item_id": "msg_fake0001", "output_index": 0,
            "content_index": 0, "part": part(&reply.text)}),
        json!({"type": "response.output_item.done", "output_index": 0,
            "item": responses_message(reply, "completed")}),
        json!({"type": "response.completed", "response": responses_object(model, reply, "completed")}),
    ]);
    events
        .into_iter()
        .enumerate()
        .map(|(seq, mut event)| {
            let name = event["type"].as_str().unwrap_or_default().to_owned();
            if let Some(obj) = event.as_object_mut() {
                obj.insert("sequence_number".into(), json!(seq));
            }
            sse_bytes(Some(&name), &event, "\n")
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Anthropic Messages (also Claude on Bedrock)

fn anthropic_message(model: &str, reply: &Reply) -> serde_json::Value {
    json!({
        "id": "msg_fake0001",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply.text}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
    })
}

/// The Messages stream as (event name, data). Bedrock sends no `ping` and
/// adds its invocation metrics to `message_stop`.
fn anthropic_events(model: &str, reply: &Reply, bedrock: bool) -> Vec<(&'static str, serde_json::Value)> {
    let mut events = vec![
        (
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_fake0001", "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": reply.input_tokens, "output_tokens": 1},
            }}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    if !bedrock {
        events.push(("ping", json!({"type": "ping"})));
    }
    for piece in &reply.pieces {
        events.push((
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        ));
    }
    events.push(("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
    events.push((
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": reply.output_tokens}}),
    ));
    let mut stop = json!({"type": "message_stop"});
    if bedrock && let Some(obj) = stop.as_object_mut() {
        obj.insert(
            "amazon-bedrock-invocationMetrics".into(),
            json!({"inputTokenCount": reply.input_tokens, "outputTokenCount": reply.output_tokens,
                "invocationLatency": 120, "firstByteLatency": 40}),
        );
    }
    events.push(("message_stop", stop));
    events
}

// ---------------------------------------------------------------------------
// Amazon Bedrock

/// `/model/{id}/{operation}`; `None` for an operation this fake does not know.
fn bedrock(id: &str, operation: &str, reply: &Reply, interval: Duration) -> Option<Response<Body>> {
    // Ids are URL-encoded (inference profile ARNs); the provider name survives that.
    let claude = id.contains("anthropic.");
    let mut response = match operation {
        "invoke" if claude => json_response(StatusCode::OK, &anthropic_message(id, reply)),
        "invoke" => json_response(StatusCode::OK, &titan_body(reply)),
        "invoke-with-response-stream" => {
            let chunks: Vec<serde_json::Value> = if claude {
                anthropic_events(id, reply, true).into_iter().map(|(_, data)| data).collect()
            } else {
                titan_chunks(reply)
            };
            let frames = chunks
                .iter()
                .map(|inner| {
                    let bytes = base64::engine::general_purpose::STANDARD.encode(inner.to_string());
                    event_frame("chunk", &json!({"bytes": bytes}))
                })
                .collect();
            spaced(AMZ_EVENT_STREAM, frames, interval)
        }
        "converse" => json_response(
            StatusCode::OK,
            &json!({
                "output": {"message": {"role": "assistant", "content": [{"text": reply.text}]}},
                "stopReason": "end_turn",
                "usage": converse_usage(reply),
                "metrics": {"latencyMs": 120},
            }),
        ),
        "converse-stream" => {
            let mut frames = vec![event_frame("messageStart", &json!({"role": "assistant"}))];
            for piece in &reply.pieces {
                frames
                    .push(event_frame("contentBlockDelta", &json!({"contentBlockIndex": 0, "delta": {"text": piece}})));
            }
            frames.extend([
                event_frame("contentBlockStop", &json!({"contentBlockIndex": 0})),
                event_frame("messageStop", &json!({"stopReason": "end_turn"})),
                event_frame("metadata", &json!({"usage": converse_usage(reply), "metrics": {"latencyMs": 120}})),
            ]);
            spaced(AMZ_EVENT_STREAM, frames, interval)
        }
        _ => return None,
    };
    response.headers_mut().insert("x-amzn-requestid", HeaderValue::from_static("fake-0001"));
    Some(response)
}

fn converse_usage(reply: &Reply) -> serde_json::Value {
    json!({
        "inputTokens": reply.input_tokens,
        "outputTokens": reply.output_tokens,
        "totalTokens": reply.input_tokens + reply.output_tokens,
    })
}

/// Amazon Titan Text, for invoke calls on other models.
fn titan_body(reply: &Reply) -> serde_json::Value {
    json!({
        "inputTextTokenCount": reply.input_tokens,
        "results": [{"tokenCount": reply.output_tokens, "outputText": reply.text, "completionReason": "FINISH"}],
    })
}

fn titan_chunks(reply: &Reply) -> Vec<serde_json::Value> {
    let last = reply.pieces.len().saturating_sub(1);
    reply
        .pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            json!({"outputText": piece, "index": 0, "totalOutputTextTokenCount": i + 1,
                "completionReason": if i == last { json!("FINISH") } else { json!(null) },
                "inputTextTokenCount": reply.input_tokens})
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Gemini

/// A `GenerateContentResponse` carrying `text`; the last one of a stream (or
/// a whole answer) has the finish reason and the full usage.
fn gemini_chunk(model: &str, text: &str, last: bool, reply: &Reply) -> serde_json::Value {
    let mut candidate = json!({"content": {"parts": [{"text": text}], "role": "model"}, "index": 0});
    let mut usage = json!({"promptTokenCount": reply.input_tokens, "totalTokenCount": reply.input_tokens});
    if last {
        candidate["finishReason"] = json!("STOP");
        usage = json!({
            "promptTokenCount": reply.input_tokens,
            "candidatesTokenCount": reply.output_tokens,
            "totalTokenCount": reply.input_tokens + reply.output_tokens,
        });
    }
    json!({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "fake0001"})
}

/// `streamGenerateContent`: SSE `data:` chunks (CRLF, as Google sends them,
/// no `[DONE]`) with `alt=sse`, else one JSON array written an element at a
/// time: `[{…}`, `,\r\n{…}`, …, `]`.
fn gemini_stream(model: &str, reply: &Reply, sse: bool, interval: Duration) -> Response<Body> {
    let last = reply.pieces.len().saturating_sub(1);
    let chunks = reply.pieces.iter().enumerate().map(|(i, piece)| gemini_chunk(model, piece, i == last, reply));
    if sse {
        return spaced(TEXT_EVENT_STREAM, chunks.map(|c| sse_bytes(None, &c, "\r\n")).collect(), interval);
    }
    let mut writes: Vec<Bytes> =
        chunks.enumerate().map(|(i, c)| Bytes::from(format!("{}{c}", if i == 0 { "[" } else { ",\r\n" }))).collect();
    if writes.is_empty() {
        writes.push(Bytes::from_static(b"["));
    }
    writes.push(Bytes::from_static(b"]"));
    spaced("application/json; charset=UTF-8", writes, interval)
}

/// Two data frames then the trailer `x-checksum: abc`. Over HTTP/1.1 hyper
/// sends trailers only when the response announces them in `trailer` and the
/// request carried `te: trailers`; otherwise it drops them.
fn trailers_response() -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", HeaderValue::from_static("abc"));
    let frames = futures_util::stream::iter([
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"part one\n"))),
        Ok(Frame::data(Bytes::from_static(b"part two\n"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut response = respond(StatusCode::OK, Some("text/plain"), StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
    response
}

/// `bytes` bytes of the `a..z` pattern, streamed in chunks, with a content length.
fn big_response(bytes: u64) -> Response<Body> {
    let pattern: Bytes = (0..BIG_CHUNK).map(|i| b'a' + u8::try_from(i % 26).unwrap_or(0)).collect::<Vec<u8>>().into();
    let chunks = futures_util::stream::unfold(bytes, move |left| {
        let pattern = pattern.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = usize::try_from(left).map_or(BIG_CHUNK, |l| l.min(BIG_CHUNK));
            Some((Ok::<_, Infallible>(Frame::data(pattern.slice(..take))), left - take as u64))
        }
    });
    let mut response =
        respond(StatusCode::OK, Some("application/octet-stream"), StreamBody::new(chunks).boxed_unsync());
    response.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    response
}

/// What a WebSocket endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WsScript {
    Echo,
    Responses,
    Realtime,
    Live,
}

fn ws_script(path: &str) -> Option<WsScript> {
    match path {
        "/ws" => Some(WsScript::Echo),
        "/v1/responses" => Some(WsScript::Responses),
        "/v1/realtime" => Some(WsScript::Realtime),
        p if p.starts_with("/ws/google.ai.generativelanguage.") && p.contains(".BidiGenerateContent") => {
            Some(WsScript::Live)
        }
        _ => None,
    }
}

/// The provider's answer to one client message of a scripted endpoint;
/// `id` (the upgrade's `x-fake-id`) replaces the responses' ids.
fn ws_answer(script: WsScript, msg: &Message, reply: &str, id: Option<&str>) -> Vec<Message> {
    let json = |v: serde_json::Value| Message::text(v.to_string());
    let request: serde_json::Value = match msg {
        Message::Text(t) => serde_json::from_str(t.as_str()).unwrap_or_default(),
        Message::Binary(b) => serde_json::from_slice(b).unwrap_or_default(),
        _ => return Vec::new(),
    };
    let ty = request.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let pieces = chat_pieces(reply);
    let full = reply.split_whitespace().collect::<Vec<_>>().join(" ");
    match script {
        WsScript::Echo => vec![msg.clone()],
        WsScript::Responses if ty == "response.create" => {
            let id = id.unwrap_or("resp_ws");
            let mut out =
                vec![json(json!({"type": "response.created", "response": {"id": id, "status": "in_progress"}}))];
            out.extend(pieces.iter().map(|p| {
                json(json!({"type": "response.output_text.delta", "item_id": "msg_ws", "output_index": 0, "content_index": 0, "delta": p}))
            }));
            out.push(json(json!({"type": "response.output_text.done", "item_id": "msg_ws", "text": full})));
            out.push(json(json!({"type": "response.completed", "response": {"id": id, "status": "completed",
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": full}]}]}})));
            out
        }
        WsScript::Realtime if ty == "conversation.item.create" => {
            vec![json(json!({"type": "conversation.item.created", "item": {"id": "item_1"}}))]
        }
        WsScript::Realtime if ty == "response.create" => {
            let id = id.unwrap_or("resp_rt");
            let mut out = vec![
                json(json!({"type": "response.created", "response": {"id": id}})),
                json(json!({"type": "response.output_audio.delta", "response_id": id, "delta": "AAAAAAAAAAAAAAAA"})),
            ];
            out.extend(
                pieces
                    .iter()
                    .map(|p| json(json!({"type": "response.output_text.delta", "response_id": id, "delta": p}))),
            );
            out.push(json(json!({"type": "response.done", "response": {"id": id, "status": "completed"}})));
            out
        }
        WsScript::Live if request.get("setup").is_some() => {
            vec![Message::binary(json!({"setupComplete": {}}).to_string())]
        }
        WsScript::Live if request.get("clientContent").is_some() => {
            let mut out: Vec<Message> = pieces
                .iter()
                .map(|p| Message::binary(json!({"serverContent": {"modelTurn": {"parts": [{"text": p}]}}}).to_string()))
                .collect();
            out.push(Message::binary(json!({"serverContent": {"turnComplete": true}}).to_string()));
            out
        }
        _ => Vec::new(),
    }
}

/// Answers an HTTP/1.1 WebSocket upgrade with 101, then plays `script`
/// (recording every message) until the client closes the connection.
fn websocket(
    parts: &http::request::Parts,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    info: &ConnInfo,
    script: WsScript,
) -> Response<Body> {
    let mut shutdown = info.shutdown.clone();
    let recorder = Arc::clone(&info.recorder);
    let connection = info.connection;
    let path = parts.uri.path().to_owned();
    let reply = reply_text(&parts.headers);
    let id = parts.headers.get("x-fake-id").map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let wants_ws = parts.headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let key = parts.headers.get(header::SEC_WEBSOCKET_KEY);
    let (true, Some(key), Some(upgrade)) = (wants_ws, key, upgrade) else {
        return json_response(
            StatusCode::UPGRADE_REQUIRED,
            &error_json("websocket upgrade required", "upgrade_required"),
        );
    };
    let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
        return json_response(StatusCode::BAD_REQUEST, &error_json("bad sec-websocket-key", "bad_request"));
    };
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        let echo = async {
            if script == WsScript::Realtime
                && ws
                    .send(Message::text(json!({"type": "session.created", "session": {"id": "sess_1"}}).to_string()))
                    .await
                    .is_err()
            {
                return;
            }
            while let Some(Ok(msg)) = ws.next().await {
                let (text, binary) = match &msg {
                    Message::Text(t) => (t.as_str().to_owned(), false),
                    Message::Binary(b) => (String::from_utf8_lossy(b).into_owned(), true),
                    // The protocol layer queues pong and close replies;
                    // reading on sends them, and ends the stream after a close.
                    _ => continue,
                };
                lock(&recorder.ws_messages).push(WsMessage { connection, path: path.clone(), text, binary });
                for answer in ws_answer(script, &msg, &reply, id.as_deref()) {
                    if ws.feed(answer).await.is_err() {
                        return;
                    }
                    // One write per event, as a provider streams them.
                    if ws.flush().await.is_err() {
                        return;
                    }
                }
            }
        };
        tokio::select! {
            _ = echo => {}
            _ = shutdown.changed() => {}
        }
    });
    let mut response = respond(StatusCode::SWITCHING_PROTOCOLS, None, empty());
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use rustls_pki_types::ServerName;
    use tokio::net::TcpStream;
    use tokio_rustls::client::TlsStream;

    const STEP: Duration = Duration::from_secs(10);

    fn loopback(pki: &TestPki) -> FakeProvider {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        FakeProvider::start(listener, pki).expect("start")
    }

    async fn tls_connect(
        addr: SocketAddr,
        pki: &TestPki,
        server_name: &str,
        alpn: &[&[u8]],
    ) -> Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let connector = tokio_rustls::TlsConnector::from(pki.client_config(alpn));
        let name = ServerName::try_from(server_name.to_owned())?;
        Ok(tokio::time::timeout(STEP, connector.connect(name, tcp)).await??)
    }

    /// A response: head, body, and trailers.
    struct Got {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    }

    async fn read(response: Response<Incoming>) -> Result<Got> {
        let (parts, body) = response.into_parts();
        let collected = tokio::time::timeout(STEP, body.collect()).await??;
        let trailers = collected.trailers().cloned();
        Ok(Got { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers })
    }

    fn request(method: Method, uri: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
        Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, "api.openai.com")
            .body(Full::new(Bytes::from_static(body)))
            .expect("request")
    }

    async fn h1(addr: SocketAddr, pki: &TestPki) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let tls = tls_connect(addr, pki, "api.openai.com", &[b"http/1.1"]).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    async fn h2(addr: SocketAddr, pki: &TestPki) -> Result<hyper::client::conn::http2::SendRequest<Full<Bytes>>> {
        let tls = tls_connect(addr, pki, "api.openai.com", &[b"h2"]).await?;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(sender)
    }

    #[test]
    fn pki_writes_a_pem_ca() {
        let pki = TestPki::with_defaults().expect("pki");
        assert!(pki.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let dir = std::env::temp_dir().join(format!("interceptor-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = pki.write_ca(&dir).expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), pki.ca_pem());
        let _ = std::fs::remove_dir_all(&dir);
        // Two PKIs never trust each other.
        assert_ne!(TestPki::with_defaults().expect("pki").ca_pem(), pki.ca_pem());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificate_covers_names_and_ip_only() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let addr = provider.local_addr();
        for name in DEFAULT_NAMES.iter().copied().chain(["198.18.0.10"]) {
            let tls = tls_connect(addr, &pki, name, DEFAULT_ALPN).await.unwrap_or_else(|e| panic!("{name}: {e:#}"));
            drop(tls);
        }
        assert!(tls_connect(addr, &pki, "api.example.org", DEFAULT_ALPN).await.is_err());
        let other = TestPki::with_defaults().expect("other pki");
        assert!(tls_connect(addr, &other, "api.openai.com", DEFAULT_ALPN).await.is_err());
        let deadline = tokio::time::Instant::now() + STEP;
        // The server records a handshake when it finishes it, which may be
        // after the client's next one began: wait for all, in any order.
        while (provider.failed_handshakes() < 2 || provider.handshakes() < DEFAULT_NAMES.len() + 1)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(provider.failed_handshakes(), 2);
        let log = provider.handshake_log();
        assert_eq!(log.len(), DEFAULT_NAMES.len() + 1);
        let snis: Vec<Option<&str>> = log.iter().map(|h| h.sni.as_deref()).collect();
        for name in DEFAULT_NAMES {
            assert!(snis.contains(&Some(*name)), "{name}: {snis:?}");
        }
        // Clients send no SNI for an IP address.
        assert_eq!(snis.iter().filter(|sni| sni.is_none()).count(), 1, "{snis:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chat_over_http1_keeps_the_connection() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h1(provider.local_addr(), &pki).await.expect("connect");
        let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        for _ in 0..3 {
            // The HTTP/1 dispatcher takes the next request only once it has
            // finished with the previous response.
            tokio::time::timeout(STEP, sender.ready()).await.expect("in time").expect("ready");
            let got =
                read(sender.send_request(request(Method::POST, "/v1/chat/completions?x=1", body)).await.expect("send"))
                    .await
                    .expect("read");
            assert_eq!(got.status, StatusCode::OK);
            assert_eq!(got.headers[header::CONTENT_TYPE], "application/json");
            let json: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
            assert_eq!(json["echo_len"], body.len());
            assert_eq!(json["model"], "gpt-4o");
            assert_eq!(json["object"], "chat.completion");
            assert!(got.body.len() > 700, "{}", got.body.len());
        }
        assert_eq!(provider.handshakes(), 1);
        let requests = provider.requests();
        assert_eq!(requests.len(), 3);
        let r = &requests[0];
        assert_eq!(r.version, "HTTP/1.1");
        assert_eq!(r.alpn.as_deref(), Some("http/1.1"));
        assert_eq!(r.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/chat/completions?x=1");
        assert_eq!(r.authority.as_deref(), Some("api.openai.com"));
        assert_eq!(r.header("HOST"), Some("api.openai.com"));
        assert_eq!(r.body, body);
        assert_eq!(r.json().expect("json")["model"], "gpt-4o");
        assert!(requests.iter().all(|q| q.connection == 1 && q.peer == r.peer));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http2_routes_and_trailers() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h2(provider.local_addr(), &pki).await.expect("connect");
        let uri = |path: &str| format!("https://api.openai.com{path}");

        let got = read(sender.send_request(request(Method::GET, &uri("/trailers"), b"")).await.expect("send"))
            .await
            .expect("read");
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(&got.body[..], b"part one\npart two\n");
        assert_eq!(got.trailers.expect("trailers").get("x-checksum").expect("x-checksum"), "abc");

        let got = read(sender.send_request(request(Method::GET, &uri("/status/503"), b"")).await.expect("send"))
            .await
            .expect("read");
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(got.body.is_empty());

        let got = read(sender.send_request(request(Method::GET, &uri("/big?bytes=100000"), b"")).await.expect("send"))
            .await
            .expect("read");
        assert_eq!(got.body.len(), 100_000);
        assert_eq!(got.headers[header::CONTENT_LENGTH], "100000");
        assert!(got.body.iter().enumerate().all(|(i, &b)| b == b'a' + (i % 26) as u8));

        let got = read(sender.send_request(request(Method::GET, &uri("/nope"), b"")).await.expect("send"))
            .await
            .expect("read");
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        let json: serde_json::Value = serde_json::from_slice(&got.body).expect("json");
        assert_eq!(json["error"]["code"], "not_found");

        let requests = provider.requests();
        assert_eq!(requests.len(), 4);
        assert!(requests.iter().all(|r| r.version == "HTTP/2.0"
            && r.alpn.as_deref() == Some("h2")
            && r.authority.as_deref() == Some("api.openai.com")));
        assert_eq!(requests[1].path, "/status/503");
        assert_eq!(provider.handshakes(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http1_chunked_trailers() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h1(provider.local_addr(), &pki).await.expect("connect");
        // hyper sends HTTP/1.1 trailers only to a client that asked with `te: trailers`.
        let mut req = request(Method::GET, "/trailers", b"");
        req.headers_mut().insert(header::TE, HeaderValue::from_static("trailers"));
        let got = read(sender.send_request(req).await.expect("send")).await.expect("read");
        assert_eq!(got.headers[header::TRANSFER_ENCODING], "chunked");
        assert_eq!(got.headers[header::TRAILER], "x-checksum");
        assert_eq!(&got.body[..], b"part one\npart two\n");
        assert_eq!(got.trailers.expect("trailers").get("x-checksum").expect("x-checksum"), "abc");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sse_events_arrive_spaced() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h2(provider.local_addr(), &pki).await.expect("connect");
        let started = tokio::time::Instant::now();
        let response = sender
            .send_request(request(Method::GET, "https://api.openai.com/sse?n=3&interval_ms=150", b""))
            .await
            .expect("send");
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/event-stream");
        let mut body = response.into_body();
        let mut events = Vec::new();
        while let Some(frame) = tokio::time::timeout(STEP, body.frame()).await.expect("in time") {
            let frame = frame.expect("frame");
            if let Some(data) = frame.data_ref().filter(|d| !d.is_empty()) {
                events.push((started.elapsed(), String::from_utf8_lossy(data).into_owned()));
            }
        }
        assert_eq!(events.len(), 4, "{events:?}");
        assert!(events[0].1.starts_with("data: {\"i\":0,"), "{events:?}");
        assert_eq!(events[3].1, "data: [DONE]\n\n");
        assert!(events[0].0 + Duration::from_millis(250) < events[2].0, "{events:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streamed_chat_completion() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h1(provider.local_addr(), &pki).await.expect("connect");
        let mut req = request(
            Method::POST,
            "/v1/chat/completions?interval_ms=1",
            br#"{"model":"gpt-4o","stream":true,"messages":[]}"#,
        );
        req.headers_mut().insert("x-fake-reply", HeaderValue::from_static("alpha beta"));
        let got = read(sender.send_request(req).await.expect("send")).await.expect("read");
        let text = String::from_utf8_lossy(&got.body);
        assert_eq!(got.headers[header::CONTENT_TYPE], "text/event-stream");
        assert_eq!(text.matches("data: ").count(), 6, "{text}");
        assert!(text.contains(r#""content":"alpha ""#) && text.contains(r#""content":"beta ""#));
        assert!(text.ends_with("data: [DONE]\n\n"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fake_status_answers_the_providers_error() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h1(provider.local_addr(), &pki).await.expect("connect");
        for (path, status, shape) in
            [("/v1/chat/completions", "429", "rate_limit_exceeded"), ("/v1/messages", "401", "error")]
        {
            let mut req = request(Method::POST, path, br#"{"model":"m","messages":[]}"#);
            req.headers_mut().insert("x-fake-status", HeaderValue::from_static(status));
            // The HTTP/1 dispatcher takes the next request only once it has
            // finished with the previous response.
            tokio::time::timeout(STEP, sender.ready()).await.expect("in time").expect("ready");
            let got = read(sender.send_request(req).await.expect("send")).await.expect("read");
            assert_eq!(got.status.as_str(), status);
            assert_eq!(got.headers[header::CONTENT_TYPE], "application/json");
            let text = String::from_utf8_lossy(&got.body);
            assert!(text.contains(shape) && text.contains(&format!("fake provider error {status}")), "{text}");
        }
        // Not an error status: ignored.
        let mut req = request(Method::POST, "/v1/chat/completions", br#"{"messages":[]}"#);
        req.headers_mut().insert("x-fake-status", HeaderValue::from_static("204"));
        tokio::time::timeout(STEP, sender.ready()).await.expect("in time").expect("ready");
        let got = read(sender.send_request(req).await.expect("send")).await.expect("read");
        assert_eq!(got.status, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_echo() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let tls = tls_connect(provider.local_addr(), &pki, "api.openai.com", &[b"http/1.1"]).await.expect("connect");
        let (mut ws, response) =
            tokio::time::timeout(STEP, tokio_tungstenite::client_async("wss://api.openai.com/ws", tls))
                .await
                .expect("in time")
                .expect("upgrade");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        ws.send(Message::text("hello")).await.expect("send");
        let echoed = tokio::time::timeout(STEP, ws.next()).await.expect("in time");
        assert_eq!(echoed.expect("frame").expect("ok"), Message::text("hello"));
        ws.send(Message::binary(vec![1u8, 2, 3])).await.expect("send");
        let echoed = tokio::time::timeout(STEP, ws.next()).await.expect("in time");
        assert_eq!(echoed.expect("frame").expect("ok"), Message::binary(vec![1u8, 2, 3]));
        ws.close(None).await.expect("close");
        assert_eq!(provider.requests()[0].path, "/ws");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn websocket_without_upgrade_is_426() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h1(provider.local_addr(), &pki).await.expect("connect");
        let got = read(sender.send_request(request(Method::GET, "/ws", b"")).await.expect("send")).await.expect("read");
        assert_eq!(got.status, StatusCode::UPGRADE_REQUIRED);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http1_only_provider() {
        let pki = TestPki::with_defaults().expect("pki");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let provider = FakeProvider::start_with_tls(listener, pki.server_config(&[b"http/1.1"])).expect("start");
        let tls = tls_connect(provider.local_addr(), &pki, "api.openai.com", DEFAULT_ALPN).await.expect("connect");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_stops_the_server() {
        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let addr = provider.local_addr();
        let tls = tls_connect(addr, &pki, "api.openai.com", &[b"http/1.1"]).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.expect("handshake");
        // The connection task ends when it reads the server's close.
        let conn = tokio::spawn(conn);
        // Served before the drop: the connection is open on both sides.
        let response = sender.send_request(request(Method::GET, "/status/204", b"")).await.expect("served");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        drop(provider);
        let deadline = tokio::time::Instant::now() + STEP;
        while TcpStream::connect(addr).await.is_ok() {
            assert!(tokio::time::Instant::now() < deadline, "still listening");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The open connection is closed too. Wait for the client to see the
        // close, not for time: until then a request could still be written
        // (and, on a busy machine, even answered by a connection task that
        // was mid-poll when the server was dropped).
        let _ = tokio::time::timeout(STEP, conn).await.expect("the server closed the open connection");
        assert!(sender.is_closed());
        assert!(sender.send_request(request(Method::GET, "/status/200", b"")).await.is_err());
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let pki = TestPki::with_defaults().expect("pki");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(FakeProvider::start(listener, &pki).is_err());
    }

    #[test]
    fn pieces_concatenate_to_the_text() {
        let text = format!("Here  it is: {}\nbye ", "x".repeat(30));
        let pieces = split_pieces(&text);
        assert_eq!(pieces.concat(), text);
        assert_eq!(pieces[..3], ["Here  ", "it ", "is: "]);
        assert_eq!(pieces[3..6], ["x".repeat(12), "x".repeat(12), "x".repeat(6) + "\n"]);
        assert!(pieces.iter().all(|p| p.trim_end().chars().count() <= MAX_PIECE_CHARS));
        assert_eq!(chat_pieces("alpha  beta"), ["alpha ", "beta "]);
        assert!(split_pieces("").is_empty());
    }

    /// Every provider-shaped route, read back with the interceptor's own
    /// framing and provider parsers: the texts add up to the reply, streams
    /// end where the provider ends them and arrive one event per frame, and
    /// the same request gets the same bytes twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn provider_shapes_parse_as_their_provider() {
        use crate::guardrails::framing::{Frame, Framer, FramingKind};
        use crate::guardrails::model::Provider;
        use crate::guardrails::model::StreamDelta;
        use crate::guardrails::providers::{self, StreamEventRef, strings};
        use crate::guardrails::usage::{self, Usage, UsageMeter};

        const CLAUDE: &str = "/model/anthropic.claude-3-5-sonnet-20241022-v2:0";
        const TITAN: &str = "/model/amazon.titan-text-express-v1";
        const NOVA: &str = "/model/amazon.nova-pro-v1:0";
        const GEMINI: &str = "/v1beta/models/gemini-2.0-flash";
        let chat = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
        let chat_stream = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let chat_stream_usage = r#"{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
        let responses = r#"{"model":"gpt-4.1","input":"hi"}"#;
        let responses_stream = r#"{"model":"gpt-4.1","input":"hi","stream":true}"#;
        let messages = r#"{"model":"claude-sonnet-4-5","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#;
        let messages_stream =
            r#"{"model":"claude-sonnet-4-5","max_tokens":9,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let invoke =
            r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":9,"messages":[{"role":"user","content":"hi"}]}"#;
        let titan = r#"{"inputText":"hi"}"#;
        let converse = r#"{"messages":[{"role":"user","content":[{"text":"hi"}]}]}"#;
        let gemini = r#"{"contents":[{"role":"user","parts":[{"text":"hi"}]}]}"#;
        let cases: Vec<(&str, String, &str)> = vec![
            ("api.openai.com", "/v1/chat/completions".into(), chat),
            ("api.openai.com", "/v1/chat/completions".into(), chat_stream),
            ("api.openai.com", "/v1/chat/completions".into(), chat_stream_usage),
            ("api.openai.com", "/v1/responses".into(), responses),
            ("api.openai.com", "/v1/responses".into(), responses_stream),
            ("api.anthropic.com", "/v1/messages".into(), messages),
            ("api.anthropic.com", "/v1/messages".into(), messages_stream),
            ("bedrock-runtime.us-east-1.amazonaws.com", format!("{CLAUDE}/invoke"), invoke),
            ("bedrock-runtime.us-east-1.amazonaws.com", format!("{CLAUDE}/invoke-with-response-stream"), invoke),
            ("bedrock-runtime.us-east-1.amazonaws.com", format!("{TITAN}/invoke"), titan),
            ("bedrock-runtime.us-east-1.amazonaws.com", format!("{TITAN}/invoke-with-response-stream"), titan),
            ("bedrock-runtime.us-east-1.amazonaws.com", format!("{NOVA}/converse"), converse),
            ("bedrock-runtime.us-east-1.amazonaws.com", format!("{NOVA}/converse-stream"), converse),
            ("generativelanguage.googleapis.com", format!("{GEMINI}:generateContent"), gemini),
            ("generativelanguage.googleapis.com", format!("{GEMINI}:streamGenerateContent?alt=sse"), gemini),
            ("generativelanguage.googleapis.com", format!("{GEMINI}:streamGenerateContent"), gemini),
        ];
        let reply = format!("The word {} is long.", "x".repeat(30));
        let pieces = split_pieces(&reply).len();

        let pki = TestPki::with_defaults().expect("pki");
        let provider = loopback(&pki);
        let mut sender = h2(provider.local_addr(), &pki).await.expect("connect");
        for (host, path, body) in cases {
            let sep = if path.contains('?') { '&' } else { '?' };
            let send = || {
                Request::builder()
                    .method(Method::POST)
                    .uri(format!("https://{host}{path}{sep}interval_ms=1"))
                    .header("x-fake-reply", reply.as_str())
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .expect("request")
            };
            let response = sender.send_request(send()).await.expect("send");
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let content_type = response.headers()[header::CONTENT_TYPE].to_str().expect("ascii").to_owned();
            let mut frames = Vec::new();
            let mut body_stream = response.into_body();
            while let Some(frame) = tokio::time::timeout(STEP, body_stream.frame()).await.expect("in time") {
                if let Some(data) = frame.expect("frame").data_ref().filter(|d| !d.is_empty()) {
                    frames.push(data.clone());
                }
            }
            let got: Vec<u8> = frames.concat();
            let again = read(sender.send_request(send()).await.expect("send")).await.expect("read");
            assert_eq!(again.body, got, "{path}: not deterministic");

            let kind = providers::detect(host, &path);
            // The usage the fake reports (a quarter of the bytes), and what
            // the interceptor reads: Titan's is not read, a chat stream
            // reports it only when asked (else it is estimated).
            let reported =
                Usage { input_tokens: body.len() as u64 / 4, output_tokens: reply.len() as u64 / 4, estimated: false };
            let expected_usage = match kind {
                _ if path.starts_with(TITAN) => None,
                Provider::OpenAiChat if body == chat_stream => None,
                _ => Some(reported),
            };
            let mut deltas: Vec<StreamDelta> = Vec::new();
            let mut meter = UsageMeter::new(kind);
            match providers::response_framing(kind, &path, &content_type) {
                None => {
                    assert_eq!(frames.len(), 1, "{path}");
                    let doc: serde_json::Value = serde_json::from_slice(&got).expect("json");
                    let texts = providers::parse_response(kind, &doc).texts;
                    let text: String = texts.iter().map(|t| t.text.as_str()).collect();
                    assert_eq!(text, reply, "{path}: {doc}");
                    assert_eq!(usage::from_response(kind, &doc), expected_usage, "{path}");
                    // The allowed path's walk reads the same usage.
                    let walked = strings::each_string(&got, &mut |_| true).expect("walk");
                    assert_eq!(
                        usage::from_fields(kind, &walked.usage, &walked.usage_metadata),
                        expected_usage,
                        "{path}"
                    );
                    continue;
                }
                Some(framing) => {
                    let mut framer = Framer::new(framing, 1 << 20);
                    for item in framer.feed(&got).expect("framed stream") {
                        if let Frame::EventStream(message) = &item {
                            assert_eq!(message.message_type(), Some("event"));
                            assert_eq!(message.content_type(), Some("application/json"));
                        }
                        let observe = &mut |event: Option<&str>, v: &serde_json::Value| meter.observe(event, v);
                        let delta = providers::stream_delta_observed(kind, StreamEventRef::from(&item), observe);
                        delta.texts.iter().for_each(|(_, text)| meter.text(text));
                        deltas.push(delta);
                    }
                    // Whole frames, a closed array, no SSE event left without its blank line.
                    let rest = framer.finish().expect("whole frames");
                    assert!(rest.is_empty(), "{path}: trailing partial event");
                    if framing == FramingKind::JsonArray {
                        let whole: serde_json::Value = serde_json::from_slice(&got).expect("one json array");
                        assert_eq!(whole.as_array().map(Vec::len), Some(pieces), "{path}");
                    }
                }
            }
            let text: String = deltas.iter().flat_map(|d| d.texts.iter().map(|(_, t)| t.as_str())).collect();
            assert_eq!(text.trim_end(), reply, "{path}");
            let estimate = Usage { input_tokens: 0, output_tokens: (text.len() as u64).div_ceil(4), estimated: true };
            let usage = meter.usage();
            match (kind, expected_usage) {
                (_, Some(expected)) => assert_eq!(usage, Some(expected), "{path}"),
                (Provider::OpenAiChat, None) => assert_eq!(usage, Some(estimate), "{path}"),
                (_, None) => assert_eq!(usage, None, "{path}"),
            }
            assert!(deltas.iter().any(|d| d.end), "{path}: the stream never ends");
            let deltas_with_text = deltas.iter().filter(|d| !d.texts.is_empty()).count();
            assert_eq!(deltas_with_text, pieces, "{path}: one delta per piece");
            assert!(frames.len() >= pieces, "{path}: {} frames for {pieces} pieces", frames.len());
        }
    }

    #[test]
    fn query_parsing() {
        assert_eq!(query_u64("n=5&interval_ms=200", "interval_ms"), Some(200));
        assert_eq!(query_u64("n=x", "n"), None);
        assert_eq!(query_u64("", "n"), None);
    }
}
