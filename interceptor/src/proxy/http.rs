//! HTTP on an intercepted connection: served with hyper (HTTP/1.1 or HTTP/2
//! as negotiated with the client) and relayed to the provider through the
//! pooled upstream client (HTTP/1.1 or HTTP/2 as negotiated with the
//! provider). Bodies stream in both directions; trailers pass through. The
//! guardrail hook, when present, runs here. A WebSocket upgrade is put to the
//! hook (refused, tunnelled, or relayed message by message through its
//! inspector: `websocket`); without a hook it is tunnelled after the 101.
//! The connection is done when its upgraded connection is: [`serve`] waits
//! for it, so the connection record has the tunnel's real byte counts.
//!
//! Faults end cleanly: a provider that cannot be reached gets the client a
//! JSON error (502, or 504 when it sends no response head within the idle
//! timeout); a provider that fails or goes quiet mid-body cuts the client's
//! body with an error (HTTP/1.1: the connection closes before the end of the
//! body; HTTP/2: the stream is reset), logged with the exchange; a client
//! that leaves cancels the upstream request, also mid-stream.
//!
//! Bodies buffered for inspection reserve their bytes from the global
//! [`BodyBudget`] as they grow; the reservation is held until the response
//! that depends on them is finished (or dropped), and an exchange that would
//! take the budget past its size gets `503` with `retry-after`.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::{
    body::{Body, Frame, SizeHint},
    service::service_fn,
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
};
use tokio_rustls::server::TlsStream;
use tracing::{Instrument as _, Span, field::Empty};

use super::{
    BoxBody, BoxError, ProxyError, ProxySettings,
    budget::{BodyBudget, BodyKind, BudgetExhausted, Reservation},
    hook::{
        BodyAction, BodyInspector, ChunkAction, Exchange, ExchangeState, Hook, MessageInspector, RequestAction,
        ResponseAction, UpgradeAction,
    },
    park,
    upstream::Upstream,
    websocket::{self, ByteCounts, WsLimits},
};

use crate::{
    config::OversizeAction,
    respond::{self, Problem},
};

/// Boxes a body error. A plain function, not `BoxError::from`: the latter
/// leaves a lifetime for the compiler to infer through hyper's bounds.
fn boxed<E: std::error::Error + Send + Sync + 'static>(error: E) -> BoxError {
    Box::new(error)
}

/// The provider sent nothing for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the provider sent nothing for {timeout:?}")]
pub struct UpstreamIdle {
    pub timeout: Duration,
}

/// Per-connection state of an intercepted connection.
pub struct Intercepted {
    pub exchange: Arc<Exchange>,
    /// Shared with the other connections to the same destination and name.
    pub upstream: Arc<Upstream>,
    pub hook: Option<Arc<dyn Hook>>,
    pub limits: HttpLimits,
    /// Bytes buffered for inspection, shared by every connection.
    pub budget: Arc<BodyBudget>,
    /// Requests whose response is not finished yet (the idle clock runs
    /// only while this is zero).
    pub active: watch::Sender<usize>,
    pub requests: AtomicU64,
    /// Request bodies not dropped yet (see `park`).
    pub receiving: Arc<std::sync::atomic::AtomicUsize>,
    /// Set when the connection's own name is not an AI name but shares its
    /// AI address and parent domain with one: intercepted only so that no
    /// AI request rides on it (HTTP/2 connection coalescing, or a Host that
    /// disagrees with the SNI). Requests for a name this policy intercepts
    /// get `421 Misdirected Request`, so the client opens a connection of
    /// their own; the rest is relayed without the hook.
    pub coalesced_guard: Option<Arc<crate::policy::DomainPolicy>>,
    pub upgrades: Upgrades,
}

/// The upgraded connections (WebSocket) of a connection: their tasks,
/// awaited before the connection counts as done, and their bytes.
#[derive(Default)]
pub struct Upgrades {
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    pub counts: ByteCounts,
}

impl Upgrades {
    fn push(&self, task: tokio::task::JoinHandle<()>) {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(task);
    }

    /// Waits until every upgraded connection has ended.
    async fn wait(&self) {
        loop {
            let Some(task) = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).pop() else { return };
            if let Err(error) = task.await {
                tracing::warn!(%error, "upgraded connection task failed");
            }
        }
    }
}

/// A WebSocket upgrade on its way: the client's side, and what to do once
/// the provider answers 101.
struct Upgrading {
    client: hyper::upgrade::OnUpgrade,
    inspector: Option<Box<dyn MessageInspector>>,
    /// Relay message by message (else tunnel the bytes).
    relay: bool,
}

/// Limits on what one client may make an intercepted connection hold.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub max_inspected_body: usize,
    pub oversize: OversizeAction,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
}

impl From<&ProxySettings> for HttpLimits {
    fn from(s: &ProxySettings) -> Self {
        Self {
            max_inspected_body: s.max_inspected_body,
            oversize: s.oversize,
            max_header_bytes: s.max_header_bytes,
            header_read_timeout: s.header_read_timeout,
            idle_timeout: s.idle_timeout,
        }
    }
}

/// The connection was closed for having no request in flight too long.
#[derive(Debug, thiserror::Error)]
#[error("closed after {timeout:?} without a request")]
pub struct ClientIdle {
    pub timeout: Duration,
}

/// Counts a request as in flight until its response body is dropped.
struct InFlight(Arc<Intercepted>);

impl InFlight {
    fn new(conn: &Arc<Intercepted>) -> Self {
        conn.active.send_modify(|n| *n += 1);
        Self(Arc::clone(conn))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Resolves once no request has been in flight for `timeout`.
async fn idle_for(mut active: watch::Receiver<usize>, timeout: Duration) {
    loop {
        if active.wait_for(|n| *n == 0).await.is_err() {
            return std::future::pending().await;
        }
        if tokio::time::timeout(timeout, active.wait_for(|n| *n > 0)).await.is_err() {
            return;
        }
    }
}

/// A client connection HTTP is served on: a terminated TLS stream, or the
/// TCP stream of a plain target.
pub trait ClientIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {
    /// HTTP/1.1 (else HTTP/2, as negotiated by ALPN).
    fn http1(&self) -> bool;
    /// Resolves when the client has sent something.
    fn readable(&mut self) -> impl Future<Output = std::io::Result<()>> + Send;
}

impl ClientIo for TlsStream<TcpStream> {
    fn http1(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(b"http/1.1")
    }

    /// TLS bytes on the socket, or plaintext rustls already holds.
    async fn readable(&mut self) -> std::io::Result<()> {
        let (tcp, tls) = self.get_mut();
        let held = tls.process_new_packets().map_err(std::io::Error::other)?.plaintext_bytes_to_read();
        if held > 0 {
            return Ok(());
        }
        tcp.readable().await
    }
}

impl ClientIo for TcpStream {
    /// Plain targets speak HTTP/1.1 only.
    fn http1(&self) -> bool {
        true
    }

    async fn readable(&mut self) -> std::io::Result<()> {
        TcpStream::readable(self).await
    }
}

/// Serves HTTP on a client connection until the client is done.
///
/// The stream comes boxed and stays boxed: an async fn keeps a slot for
/// each argument it was called with for as long as it runs, so a TLS stream
/// (over a kilobyte) passed by value down the serving functions would take
/// that much again, dead, at every level, in every idle connection.
pub async fn serve<I: ClientIo>(io: Box<I>, conn: Arc<Intercepted>) -> Result<(), BoxError> {
    let upgraded = Arc::clone(&conn);
    let result = serve_http(io, conn).await;
    // An upgraded connection outlives hyper's: the connection ends with it.
    upgraded.upgrades.wait().await;
    result
}

async fn serve_http<I: ClientIo>(io: Box<I>, conn: Arc<Intercepted>) -> Result<(), BoxError> {
    let http1 = io.http1();
    let parking = Arc::clone(&conn);
    let conn_span = Span::current();
    let service = service_fn(move |req| {
        let conn = Arc::clone(&conn);
        // Counted when hyper hands the request over, not when its future
        // first runs: an idle connection is parked only with none in flight.
        conn.requests.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight::new(&conn);
        // The pipeline records the id it gives the request (see `hook::record_request_id`).
        let span = tracing::info_span!(parent: &conn_span, "request", request_id = Empty);
        // Boxed: spelling out `Send` here spares the compiler a higher-ranked
        // inference it cannot finish through hyper's service bounds.
        let fut: Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>> = Box::pin(
            async move {
                let resp = handle(req, conn).await;
                // The closure owns the guard: dropped with the body.
                Ok(resp.map(|b| {
                    b.map_frame(move |f| {
                        let _held = &in_flight;
                        f
                    })
                    .boxed_unsync()
                }))
            }
            .instrument(span),
        );
        fut
    });
    // Each way boxed, with `Send` spelled out as the service's future is
    // above: this future then holds one pointer while the connection lives,
    // not the larger of the two ways (HTTP/2's builder and connection).
    let serving: Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send + '_>> = if http1 {
        Box::pin(serve_http1_parked(io, &parking, service))
    } else {
        Box::pin(serve_auto(io, &parking, service))
    };
    serving.await
}

/// Serves HTTP/2, or HTTP/1.1 without ALPN, with hyper's automatic choice;
/// the connection is closed after the idle timeout without a request.
async fn serve_auto<I: ClientIo, S>(io: Box<I>, conn: &Intercepted, service: S) -> Result<(), BoxError>
where
    S: hyper::service::Service<Request<hyper::body::Incoming>, Response = Response<BoxBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let limits = &conn.limits;
    // The connection's span: HTTP/2 streams run in tasks of their own.
    let executor = SpanExecutor(Span::current());
    let idle = idle_for(conn.active.subscribe(), limits.idle_timeout);
    let mut builder = auto::Builder::new(executor);
    // An oversized HTTP/1.1 head gets 431 from hyper; a slow one is closed
    // after the timeout (which also bounds an idle kept-alive connection).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(crate::config::MIN_HEADER_BYTES));
    // HTTP/2: an oversized header list resets the stream; a peer that stops
    // answering pings is closed.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let mut connection = Box::pin(builder.serve_connection_with_upgrades(TokioIo::new(io), service));
    let mut idle = Box::pin(idle);
    tokio::select! {
        result = connection.as_mut() => return result.map_err(|e| -> BoxError { e }),
        () = &mut idle => {}
    }
    // HTTP/2 gets a GOAWAY; a request that raced in may finish.
    connection.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.header_read_timeout, connection).await {
        Ok(Err(error)) => Err(error),
        Ok(Ok(())) | Err(_) => Err(boxed(ClientIdle { timeout: limits.idle_timeout })),
    }
}

/// Serves HTTP/1.1 (negotiated by ALPN), parking the connection between
/// requests without hyper's buffers (see `park`). An idle connection is
/// closed after the idle timeout without a request, or after the header
/// timeout parked, whichever comes first (hyper's own header timeout
/// would have closed it then).
async fn serve_http1_parked<I: ClientIo, S>(io: Box<I>, conn: &Intercepted, service: S) -> Result<(), BoxError>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = BoxBody> + Clone + Unpin + Send + 'static,
    S::Future: Unpin + Send + 'static,
    S::Error: Into<BoxError>,
{
    let limits = &conn.limits;
    let mut builder = hyper::server::conn::http1::Builder::new();
    // An oversized head gets 431 from hyper; a slow one is closed after the
    // timeout.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(crate::config::MIN_HEADER_BYTES));
    let mut active = conn.active.subscribe();
    // Boxed (by the caller): moved between hyper's connections and the
    // parked state, it takes one slot in this future instead of one per
    // place it passes.
    let (mut ahead, mut stream, mut service) = (Bytes::new(), io, service);
    let mut idle_since = tokio::time::Instant::now();
    let mut requests = conn.requests.load(Ordering::Relaxed);
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) && ahead.is_empty() {
            // Parked: nothing but the TLS stream until the client sends.
            let now = tokio::time::Instant::now();
            if conn.requests.load(Ordering::Relaxed) != requests {
                requests = conn.requests.load(Ordering::Relaxed);
                idle_since = now;
            }
            let (deadline, timeout) = std::cmp::min(
                (idle_since + limits.idle_timeout, limits.idle_timeout),
                (now + limits.header_read_timeout, limits.header_read_timeout),
            );
            match tokio::time::timeout_at(deadline, stream.readable()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(boxed(error)),
                Err(_) => {
                    // A clean close: close_notify, then the end of stream.
                    use tokio::io::AsyncWriteExt as _;
                    let _ = tokio::time::timeout(limits.header_read_timeout, stream.shutdown()).await;
                    return Err(boxed(ClientIdle { timeout }));
                }
            }
        }
        let io = park::ParkIo::new(std::mem::take(&mut ahead), stream);
        let seen = io.seen();
        let mut connection = Box::new(builder.serve_connection(TokioIo::new(io), service).with_upgrades());
        // Not parked (a request body still alive, say), the idle timeout
        // closes it as it closes any connection.
        let idle = idle_for(conn.active.subscribe(), limits.idle_timeout);
        tokio::select! {
            driven = park::drive(&mut connection, &seen, &mut active, &conn.requests, &conn.receiving) => match driven {
                park::Driven::Done(result) => return result.map_err(|e| -> BoxError { Box::new(e) }),
                park::Driven::Idle => {}
            },
            () = idle => {
                std::pin::Pin::new(&mut *connection).graceful_shutdown();
                return match tokio::time::timeout(limits.header_read_timeout, &mut *connection).await {
                    Ok(Err(error)) => Err(Box::new(error)),
                    Ok(Ok(())) | Err(_) => Err(boxed(ClientIdle { timeout: limits.idle_timeout })),
                };
            }
        }
        // Idle between messages: keep the stream and what hyper read ahead,
        // drop the rest.
        let Some(parts) = connection.into_parts() else {
            return Ok(());
        };
        (ahead, stream) = parts.io.into_inner().into_inner(parts.read_buf);
        service = parts.service;
    }
}

/// Runs hyper's tasks (HTTP/2 streams) in the connection's span.
#[derive(Clone)]
struct SpanExecutor(Span);

impl<F> hyper::rt::Executor<F> for SpanExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        TokioExecutor::new().execute(fut.instrument(self.0.clone()));
    }
}

async fn handle(mut req: Request<hyper::body::Incoming>, conn: Arc<Intercepted>) -> Response<BoxBody> {
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    if let Err(response) = prepare_request(&mut parts, &conn.exchange, upgrade, conn.upstream.plain) {
        return *response;
    }
    // The request is in flight while its body is alive, too (see `park`).
    // Counted until dropped: a connection is parked only with no request
    // body alive (see `park`).
    let mut body: BoxBody = park::Receiving::wrap(body, &conn.receiving).map_err(boxed).boxed_unsync();
    let client_upgrade = match (client_upgrade, &conn.hook) {
        (Some(client), Some(hook)) => {
            let (inspector, relay) = match hook.on_upgrade(&conn.exchange, &mut parts).await {
                UpgradeAction::Respond(response) => return response.map(|b| b.map_err(boxed).boxed_unsync()),
                UpgradeAction::Tunnel(inspector) => (inspector, false),
                UpgradeAction::Inspect(inspector) => {
                    // Nothing may be compressed: the relay reads every message.
                    parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
                    (Some(inspector), true)
                }
            };
            // The upgrade request itself has no body to inspect.
            let upgrading = Upgrading { client, inspector, relay };
            let (Ok(resp) | Err(resp)) = send(Request::from_parts(parts, body), &conn, true, Some(upgrading)).await;
            return resp;
        }
        (client, _) => client.map(|client| Upgrading { client, inspector: None, relay: false }),
    };

    if let Some(policy) = &conn.coalesced_guard {
        let host = parts.uri.host().unwrap_or_default();
        if policy.classify(Some(host)).intercept {
            tracing::warn!(
                event = "misdirected_request",
                authority = host,
                "an AI request on a connection made for another name: answered 421"
            );
            let message = format!("{host} needs a connection of its own; this one was made for {}", conn.exchange.sni);
            // Read (and drop) what the client is still sending, so that it
            // sees the answer rather than a reset mid-upload.
            discard(body, conn.limits.max_inspected_body, conn.limits.idle_timeout).await;
            return error_response(Problem::MisdirectedRequest, &message);
        }
        let (Ok(resp) | Err(resp)) = send(Request::from_parts(parts, body), &conn, upgrade, client_upgrade).await;
        return resp;
    }

    if let Some(hook) = &conn.hook {
        let max = conn.limits.max_inspected_body;
        // Held until the response is done: the pipeline keeps the request
        // body (for the response phase) as long as that.
        let mut reservation = conn.budget.reservation(BodyKind::Request);
        let bytes = match collect_limited(body, max, Some(conn.limits.idle_timeout), &mut reservation).await {
            Ok(Collected::Whole(bytes)) => bytes,
            Ok(Collected::Over { prefix, rest }) => {
                let reason = format!("request body exceeds the inspection limit of {max} bytes");
                if conn.limits.oversize == OversizeAction::Block {
                    tracing::warn!(%reason, "request refused");
                    return error_response(Problem::RequestTooLarge, &reason);
                }
                if let Some(response) = hook.on_uninspected_request(&conn.exchange, &mut parts).await {
                    return response.map(|b| b.map_err(boxed).boxed_unsync());
                }
                hook.on_not_inspected(&conn.exchange, &None, &parts, None, &reason).await;
                let body = holding(prepend(prefix, rest), reservation);
                let (Ok(resp) | Err(resp)) =
                    send(Request::from_parts(parts, body), &conn, upgrade, client_upgrade).await;
                return resp;
            }
            Err(error) if error.is::<BudgetExhausted>() => {
                return budget_exhausted(&conn, BodyKind::Request, &error);
            }
            Err(error) if error.is::<ClientBodyIdle>() => {
                tracing::warn!(%error, "request refused");
                return error_response(Problem::RequestBodyTimeout, &error.to_string());
            }
            Err(error) => {
                return error_response(Problem::RequestBodyError, &error.to_string());
            }
        };
        let (action, state) = hook.on_request(&conn.exchange, &mut parts, &bytes).await;
        let bytes = match action {
            RequestAction::Forward => bytes,
            RequestAction::ReplaceBody(new) => {
                set_content_length(&mut parts.headers, new.len());
                new
            }
            RequestAction::Respond(response) => return response.map(|b| b.map_err(boxed).boxed_unsync()),
        };
        body = Full::new(bytes).map_err(boxed).boxed_unsync();
        let request_head = parts.clone();
        let response = send(Request::from_parts(parts, body), &conn, upgrade, client_upgrade).await;
        let response = match response {
            Ok(resp) => inspect_response(hook.as_ref(), &conn, &state, &request_head, resp).await,
            Err(resp) => resp,
        };
        return response.map(|b| holding(b, reservation));
    }
    match send(Request::from_parts(parts, body), &conn, upgrade, client_upgrade).await {
        Ok(resp) | Err(resp) => resp,
    }
}

/// Reads a request body that will not be forwarded, at most `max` bytes,
/// each frame within `idle`; gives up quietly past either.
async fn discard(mut body: BoxBody, max: usize, idle: Duration) {
    let mut read = 0;
    while read <= max {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => read += frame.data_ref().map_or(0, Bytes::len),
            _ => return,
        }
    }
}

/// A body read up to a limit.
enum Collected {
    Whole(Bytes),
    /// Over the limit: what was buffered (at most the limit) and the rest
    /// (starting with the frame that went over), to forward untouched or
    /// drop.
    Over {
        prefix: Bytes,
        rest: BoxBody,
    },
}

/// The client stopped sending a body that is being buffered.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no body bytes for {timeout:?}")]
pub struct ClientBodyIdle {
    pub timeout: Duration,
}

/// Reads a whole body, at most `max` bytes; never buffers more. With
/// `idle`, fails when no frame arrives for that long. Every allocation is
/// reserved first from the budget (its capacity, not just its length);
/// fails with [`BudgetExhausted`] when the budget cannot give it.
/// (Request trailers are not kept once a body is buffered.)
async fn collect_limited(
    mut body: BoxBody,
    max: usize,
    idle: Option<Duration>,
    reservation: &mut Reservation,
) -> Result<Collected, BoxError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let frame = match idle {
            Some(timeout) => {
                tokio::time::timeout(timeout, body.frame()).await.map_err(|_| boxed(ClientBodyIdle { timeout }))?
            }
            None => body.frame().await,
        };
        let Some(frame) = frame else { break };
        if let Ok(data) = frame?.into_data() {
            let needed = buf.len() + data.len();
            if needed > max {
                // This frame is not buffered: it goes first in the rest.
                return Ok(Collected::Over { prefix: Bytes::from(buf), rest: prepend(data, body) });
            }
            if needed > buf.capacity() {
                // Doubling (up to the limit, and up to the declared length
                // when there is one) keeps the number of copies logarithmic
                // and never reserves more than twice what arrived; the
                // budget sees the whole allocation.
                let rest = usize::try_from(body.size_hint().upper().unwrap_or(u64::MAX)).unwrap_or(usize::MAX);
                let capacity = needed.max(buf.capacity().saturating_mul(2).min(max).min(needed.saturating_add(rest)));
                reservation.grow_to(capacity).map_err(boxed)?;
                buf.reserve_exact(capacity - buf.len());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Collected::Whole(Bytes::from(buf)))
}

/// `body`, keeping `guard` alive until the body is dropped (after its last
/// frame, or when the client goes away).
fn holding<G: Send + 'static>(body: BoxBody, guard: G) -> BoxBody {
    body.map_frame(move |frame| {
        let _held = &guard;
        frame
    })
    .boxed_unsync()
}

/// The answer when a body would take the inspection budget past its size:
/// `503` in the usual error shape, with `retry-after`, counted and logged.
fn budget_exhausted(conn: &Intercepted, kind: BodyKind, error: &BoxError) -> Response<BoxBody> {
    let message = error.to_string();
    if let Some(exhausted) = error.downcast_ref::<BudgetExhausted>() {
        conn.budget.note_refusal(kind, exhausted);
    }
    let mut resp = error_response(Problem::InspectionBudgetExhausted, &message);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
    resp
}

/// What a client refused for want of inspection budget is told to wait:
/// bodies give their bytes back as soon as their exchange ends.
const RETRY_AFTER_SECONDS: &str = "1";

/// `prefix`, then the rest of `body`.
fn prepend(prefix: Bytes, rest: BoxBody) -> BoxBody {
    use futures_util::StreamExt as _;
    let first = futures_util::stream::once(async move { Ok::<_, BoxError>(Frame::data(prefix)) });
    StreamBody::new(first.chain(http_body_util::BodyStream::new(rest))).boxed_unsync()
}

/// Sends the request upstream; on a 101, tunnels the two upgraded streams.
/// The response body comes back under the idle timeout.
async fn send(
    req: Request<BoxBody>,
    conn: &Intercepted,
    upgrade: bool,
    client_upgrade: Option<Upgrading>,
) -> Result<Response<BoxBody>, Response<BoxBody>> {
    let client = if upgrade { &conn.upstream.http1 } else { &conn.upstream.client };
    let idle = conn.upstream.idle_timeout;
    let path = req.uri().path().to_string();
    let mut resp = match tokio::time::timeout(idle, client.request(req)).await {
        Ok(resp) => resp.map_err(|e| upstream_error_response(&e))?,
        Err(_) => {
            let error = UpstreamIdle { timeout: idle };
            tracing::warn!(path, %error, "no response head from the provider; answering 504");
            return Err(error_response(Problem::UpstreamTimeout, &error.to_string()));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(Upgrading { client, inspector, relay }) = client_upgrade {
            if relay {
                // Whatever the provider says, no extension is in force.
                resp.headers_mut().remove(header::SEC_WEBSOCKET_EXTENSIONS);
            }
            let upstream_side = hyper::upgrade::on(&mut resp);
            let limits = WsLimits { max_message: conn.limits.max_inspected_body, oversize: conn.limits.oversize };
            let counts = conn.upgrades.counts.clone();
            conn.upgrades.push(tokio::spawn(
                async move {
                    match (client.await, upstream_side.await) {
                        (Ok(a), Ok(b)) => websocket::serve_upgraded(a, b, inspector, relay, limits, counts).await,
                        (Err(error), _) | (_, Err(error)) => tracing::debug!(%error, "upgrade failed"),
                    }
                }
                .in_current_span(),
            ));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut(), false);
    }
    Ok(resp.map(|inner| UpstreamBody::new(inner, idle, path).boxed_unsync()))
}

/// The provider's response body, failing when the provider sends nothing
/// for `idle` while a frame is awaited, and logging any way it ends badly.
/// The clock only runs while waiting on the provider, not while the client
/// is slow to read.
struct UpstreamBody {
    inner: hyper::body::Incoming,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    waiting: bool,
    path: String,
    /// The request's span: the body is polled wherever hyper polls it.
    span: Span,
}

impl UpstreamBody {
    fn new(inner: hyper::body::Incoming, idle: Duration, path: String) -> Self {
        let sleep = Box::pin(tokio::time::sleep(idle));
        Self { inner, idle, sleep, waiting: false, path, span: Span::current() }
    }

    fn failed(&self, error: &(dyn std::error::Error + 'static)) {
        let _span = self.span.enter();
        tracing::warn!(
            path = %self.path,
            error = %crate::error::chain(error),
            "upstream response body failed; the client's response is cut short"
        );
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.failed(&error);
                Poll::Ready(Some(Err(boxed(error))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + this.idle;
                    this.sleep.as_mut().reset(deadline);
                }
                match this.sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        let error = UpstreamIdle { timeout: this.idle };
                        this.failed(&error);
                        Poll::Ready(Some(Err(boxed(error))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn inspect_response(
    hook: &dyn Hook,
    conn: &Intercepted,
    state: &ExchangeState,
    request: &http::request::Parts,
    resp: Response<BoxBody>,
) -> Response<BoxBody> {
    let exchange = &conn.exchange;
    let (mut head, body) = resp.into_parts();
    match hook.on_response(exchange, state, request, &head).await {
        ResponseAction::Collect => {
            let max = conn.limits.max_inspected_body;
            let mut reservation = conn.budget.reservation(BodyKind::Response);
            // The provider's body has its own idle timeout.
            let bytes = match collect_limited(body, max, None, &mut reservation).await {
                Ok(Collected::Whole(bytes)) => bytes,
                Ok(Collected::Over { prefix, rest }) => {
                    let reason = format!("response body exceeds the inspection limit of {max} bytes");
                    if conn.limits.oversize == OversizeAction::Block {
                        tracing::warn!(%reason, "response refused");
                        return error_response(Problem::ResponseTooLarge, &reason);
                    }
                    hook.on_not_inspected(exchange, state, request, Some(&head), &reason).await;
                    return Response::from_parts(head, holding(prepend(prefix, rest), reservation));
                }
                Err(error) if error.is::<BudgetExhausted>() => {
                    return budget_exhausted(conn, BodyKind::Response, &error);
                }
                Err(error) => {
                    return error_response(Problem::UpstreamBodyError, &error.to_string());
                }
            };
            match hook.on_response_body(exchange, state, request, &head, &bytes).await {
                BodyAction::Forward => {
                    Response::from_parts(head, holding(Full::new(bytes).map_err(boxed).boxed_unsync(), reservation))
                }
                BodyAction::ReplaceBody(new) => {
                    set_content_length(&mut head.headers, new.len());
                    Response::from_parts(head, Full::new(new).map_err(boxed).boxed_unsync())
                }
                BodyAction::Respond(response) => response.map(|b| b.map_err(boxed).boxed_unsync()),
            }
        }
        ResponseAction::Forward => Response::from_parts(head, body),
        ResponseAction::Respond(response) => response.map(|b| b.map_err(boxed).boxed_unsync()),
        ResponseAction::Inspect(inspector) => {
            // The inspector may change the length.
            head.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(head, inspected_body(body, inspector))
        }
    }
}

/// Runs the upstream body through an inspector as it streams. The task
/// ends, and the upstream body with it, as soon as the client is gone, even
/// while the provider is quiet; a body cut short still gets its audit event.
fn inspected_body(mut body: BoxBody, mut inspector: Box<dyn BodyInspector>) -> BoxBody {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let span = Span::current();
    let observes_only = inspector.observes_only();
    tokio::spawn(
        async move {
            loop {
                // Biased: once the client is gone, nothing more is read.
                let next = tokio::select! {
                    biased;
                    () = tx.closed() => {
                        tracing::debug!("client left mid-stream; upstream request cancelled");
                        inspector.on_abort("the client went away").await;
                        return;
                    }
                    next = body.frame() => next,
                };
                let frame = match next {
                    Some(Ok(frame)) => frame,
                    Some(Err(error)) => {
                        inspector.on_abort(&error.to_string()).await;
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                    None => break,
                };
                match frame.into_data() {
                    Ok(chunk) if observes_only => {
                        // Forwarded first (the clone shares the bytes), then
                        // inspected while the client reads. The yield lets
                        // the connection's task write the chunk out before
                        // the inspection takes this worker.
                        if !chunk.is_empty() {
                            let _ = tx.send(Ok(Frame::data(chunk.clone()))).await;
                            tokio::task::yield_now().await;
                        }
                        if let ChunkAction::End(bytes) = inspector.on_chunk(chunk).await {
                            if !bytes.is_empty() {
                                let _ = tx.send(Ok(Frame::data(bytes))).await;
                            }
                            return;
                        }
                    }
                    Ok(chunk) => match inspector.on_chunk(chunk).await {
                        ChunkAction::Forward(bytes) => {
                            // A failed send means the client left: the next turn
                            // of the loop records that.
                            if !bytes.is_empty() {
                                let _ = tx.send(Ok(Frame::data(bytes))).await;
                            }
                        }
                        ChunkAction::End(bytes) => {
                            if !bytes.is_empty() {
                                let _ = tx.send(Ok(Frame::data(bytes))).await;
                            }
                            return;
                        }
                    },
                    Err(frame) => {
                        let _ = tx.send(Ok(frame)).await;
                    }
                }
            }
            let tail = inspector.on_end().await;
            if !tail.is_empty() {
                let _ = tx.send(Ok(Frame::data(tail))).await;
            }
        }
        .instrument(span),
    );
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    StreamBody::new(stream).boxed_unsync()
}

/// Makes the request absolute (`https://<authority><path>`, or `http://`
/// for a plain target) for the upstream client and removes hop-by-hop
/// headers.
fn prepare_request(
    parts: &mut http::request::Parts,
    exchange: &Exchange,
    upgrade: bool,
    plain: bool,
) -> Result<(), Box<Response<BoxBody>>> {
    let authority = match parts.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => match parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            Some(host) => host.to_string(),
            None => default_authority(exchange, plain),
        },
    };
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let scheme = if plain { "http" } else { "https" };
    parts.uri = match Uri::builder().scheme(scheme).authority(authority.as_str()).path_and_query(path).build() {
        Ok(uri) => uri,
        Err(error) => {
            return Err(Box::new(error_response(Problem::BadRequest, &format!("invalid request target: {error}"))));
        }
    };
    // The upstream client derives Host (HTTP/1.1) or :authority (HTTP/2)
    // from the URI; HTTP/2 forbids a conflicting Host header.
    parts.headers.remove(header::HOST);
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    Ok(())
}

fn default_authority(exchange: &Exchange, plain: bool) -> String {
    match (exchange.orig_dst.0.port(), plain) {
        (443, false) | (80, true) => exchange.sni.clone(),
        (port, _) if exchange.sni.contains(':') => format!("[{}]:{port}", exchange.sni),
        (port, _) => format!("{}:{port}", exchange.sni),
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes connection-specific headers (RFC 9110 section 7.6.1). For an
/// upgrade, `Connection: upgrade` and `Upgrade` must reach the provider.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "transfer-encoding"] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `TE: trailers` is the one TE value HTTP/2 allows; keep it.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

fn set_content_length(headers: &mut HeaderMap, len: usize) {
    headers.remove(header::TRANSFER_ENCODING);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// An interceptor-side failure as the client sees it ([`respond::error`]),
/// with the body type the data plane sends.
fn error_response(problem: Problem, message: &str) -> Response<BoxBody> {
    respond::error(problem, message).map(|b| b.map_err(boxed).boxed_unsync())
}

fn upstream_error_response(error: &hyper_util::client::legacy::Error) -> Response<BoxBody> {
    let problem = classify(error);
    let message = crate::error::chain(error);
    tracing::warn!(code = problem.code(), error = %message, "upstream request failed");
    error_response(problem, &message)
}

/// Which problem a failed upstream request is (whose fault and which
/// status): a connect timeout is a 504, any other failure to reach or verify
/// the provider a 502.
fn classify(error: &(dyn std::error::Error + 'static)) -> Problem {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(p) = e.downcast_ref::<ProxyError>() {
            return match p {
                ProxyError::ConnectTimeout { .. } => Problem::UpstreamTimeout,
                _ => Problem::UpstreamUnreachable,
            };
        }
        if is_tls_error(e) {
            return Problem::UpstreamTlsError;
        }
        source = e.source();
    }
    Problem::UpstreamError
}

/// A rustls error, possibly wrapped in (nested) I/O errors, whose `source`
/// skips the wrapped error itself.
fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    if e.downcast_ref::<rustls::Error>().is_some() {
        return true;
    }
    match e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
        Some(inner) => is_tls_error(inner),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a parked HTTP/1.1 connection's serving future holds (boxed, for
    /// as long as the connection lives): the stream is boxed by the caller,
    /// and no state of the loop holds much. At 10,000 idle connections each
    /// kilobyte here is 10 MB. The bound leaves room for the unoptimized
    /// build.
    #[test]
    fn the_parking_loop_holds_little() {
        type Responding = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, Infallible>> + Send>>;
        /// Sized as the real service is: a connection and a span.
        #[derive(Clone)]
        struct Service {
            _conn: Arc<()>,
            _span: Span,
        }
        impl hyper::service::Service<Request<hyper::body::Incoming>> for Service {
            type Response = Response<BoxBody>;
            type Error = Infallible;
            type Future = Responding;
            fn call(&self, _: Request<hyper::body::Incoming>) -> Responding {
                Box::pin(async { Ok(Response::new(BoxBody::default())) })
            }
        }
        fn returned<A, B, C, F>(_: impl FnOnce(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        // 2312 bytes when the stream was passed by value.
        let parked = returned(serve_http1_parked::<TlsStream<TcpStream>, Service>);
        assert!(parked <= 1280, "{parked} bytes");
    }

    #[test]
    fn hop_by_hop_headers_are_removed_but_upgrade_kept_when_asked() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-foo, upgrade"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("authorization", HeaderValue::from_static("Bearer x"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert!(plain.get("x-foo").is_none() && plain.get("keep-alive").is_none());
        assert!(plain.get(header::UPGRADE).is_none() && plain.get(header::CONNECTION).is_none());
        assert_eq!(plain.get(header::TE).unwrap(), "trailers");
        assert!(plain.get("authorization").is_some());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert!(h.get(header::CONNECTION).is_some());
    }

    /// Holds every chunk until the client has read it: only a data plane
    /// that forwards before inspecting gets past the first one.
    struct Recording {
        read: Arc<tokio::sync::Notify>,
        seen: Arc<std::sync::Mutex<Vec<Bytes>>>,
        observes_only: bool,
    }

    #[async_trait::async_trait]
    impl BodyInspector for Recording {
        async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction {
            self.read.notified().await;
            self.seen.lock().unwrap().push(chunk.clone());
            ChunkAction::Forward(chunk)
        }

        async fn on_end(&mut self) -> Bytes {
            Bytes::new()
        }

        fn observes_only(&self) -> bool {
            self.observes_only
        }
    }

    #[tokio::test]
    async fn an_observing_inspector_sees_chunks_after_the_client() {
        let (upstream, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
        let read = Arc::new(tokio::sync::Notify::new());
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inspector = Recording { read: Arc::clone(&read), seen: Arc::clone(&seen), observes_only: true };
        let mut body = inspected_body(StreamBody::new(stream).boxed_unsync(), Box::new(inspector));
        for chunk in ["data: one\n\n", "data: two\n\n"] {
            upstream.send(Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))).await.unwrap();
            // The inspector has not had it yet, and cannot until the
            // client has read it.
            // (A bound so that a data plane that inspects first fails
            // instead of hanging.)
            let next = tokio::time::timeout(Duration::from_secs(10), body.frame()).await;
            let got = next.expect("the chunk reached the client").unwrap().unwrap().into_data().unwrap();
            assert_eq!(got, chunk.as_bytes());
            read.notify_one();
        }
        drop(upstream);
        assert!(body.frame().await.is_none());
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    /// Works on each chunk without ever waiting, as the guardrail's own
    /// inspector does, and notes how many chunks the client had by then.
    struct Busy {
        delivered: Arc<std::sync::atomic::AtomicUsize>,
        had: Arc<std::sync::Mutex<Vec<usize>>>,
    }

    #[async_trait::async_trait]
    impl BodyInspector for Busy {
        async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction {
            self.had.lock().unwrap().push(self.delivered.load(std::sync::atomic::Ordering::SeqCst));
            ChunkAction::Forward(chunk)
        }

        async fn on_end(&mut self) -> Bytes {
            Bytes::new()
        }

        fn observes_only(&self) -> bool {
            true
        }
    }

    /// On one worker, an observed chunk goes out before its inspection
    /// runs: a first streamed byte is not held for the inspection's work.
    #[tokio::test(flavor = "current_thread")]
    async fn an_observed_chunk_reaches_the_client_before_its_inspection_runs() {
        let (upstream, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|i| (i, rx)) });
        let delivered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let had = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inspector = Busy { delivered: Arc::clone(&delivered), had: Arc::clone(&had) };
        let mut body = inspected_body(StreamBody::new(stream).boxed_unsync(), Box::new(inspector));
        let client = tokio::spawn({
            let delivered = Arc::clone(&delivered);
            async move {
                while let Some(frame) = body.frame().await {
                    frame.unwrap();
                    delivered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        });
        for chunk in ["data: one\n\n", "data: two\n\n"] {
            upstream.send(Ok(Frame::data(Bytes::from_static(chunk.as_bytes())))).await.unwrap();
        }
        drop(upstream);
        client.await.unwrap();
        assert_eq!(*had.lock().unwrap(), [1, 2], "chunks the client had when each inspection began");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        assert!(is_upgrade(&h));
    }

    #[test]
    fn connect_timeouts_are_504_other_failures_502() {
        let t = ProxyError::ConnectTimeout {
            dst: "192.0.2.1:443".parse().unwrap(),
            timeout: std::time::Duration::from_secs(1),
        };
        assert_eq!(classify(&t).status(), StatusCode::GATEWAY_TIMEOUT);
        let c = ProxyError::Connect {
            dst: "192.0.2.1:443".parse().unwrap(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!((classify(&c).status(), classify(&c).code()), (StatusCode::BAD_GATEWAY, "upstream_unreachable"));
        let tls = std::io::Error::other(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert_eq!((classify(&tls).status(), classify(&tls).code()), (StatusCode::BAD_GATEWAY, "upstream_tls_error"));
        // hyper-rustls wraps tokio-rustls's I/O error in another one.
        let nested = std::io::Error::other(std::io::Error::other(rustls::Error::DecryptError));
        assert_eq!(
            (classify(&nested).status(), classify(&nested).code()),
            (StatusCode::BAD_GATEWAY, "upstream_tls_error")
        );
    }
}
