//! WebSocket on an intercepted connection, after the provider's 101: a byte
//! tunnel, or a relay of whole messages through the hook's
//! [`MessageInspector`].
//!
//! The framing (masking, fragments joined into messages, control frames, the
//! close handshake, size limits) is tungstenite's; this module owns the relay
//! only: which message goes where, in which order, and how the connection
//! ends. Every byte read from and written to the client is counted for the
//! connection record, which is written when the upgraded connection ends.
//!
//! No extension is negotiated on an inspected connection (`http` removes the
//! offer from the upgrade request and any answer from the 101), so a frame
//! with a reserved bit set (a compressed frame, `permessage-deflate`) is a
//! protocol error: both sides are closed and the frame is never relayed.
//! Pings are answered by each side's framing and forwarded to the other
//! side; pongs are not forwarded (each peer got its own).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures_util::{SinkExt as _, StreamExt as _};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        self, Message,
        error::{CapacityError, ProtocolError},
        protocol::{CloseFrame, Role, WebSocketConfig, frame::coding::CloseCode},
    },
};
use tracing::Instrument as _;

use super::hook::{ClientAction, MessageInspector, ServerAction, UpgradeClosed, WsData};
use crate::config::OversizeAction;

/// How long provider messages may be held while the provider is quiet
/// before what is held is checked and released (a response whose end the
/// inspector does not recognize must not hang the client).
const FLUSH_AFTER: Duration = Duration::from_millis(500);
/// How long to wait for a peer's close reply once we closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
/// Hard cap on one message forwarded uninspected (oversize policy `pass`);
/// tungstenite's default.
const MAX_PASSED_MESSAGE: usize = 64 << 20;

/// Bytes of an upgraded connection, as the client sees them.
#[derive(Clone, Default)]
pub struct ByteCounts {
    pub up: Arc<AtomicU64>,
    pub down: Arc<AtomicU64>,
}

impl ByteCounts {
    pub fn load(&self) -> (u64, u64) {
        (self.up.load(Ordering::Relaxed), self.down.load(Ordering::Relaxed))
    }
}

/// Limits of an inspected connection.
#[derive(Clone, Copy, Debug)]
pub struct WsLimits {
    /// Largest message inspected (`proxy.max_inspected_body`).
    pub max_message: usize,
    pub oversize: OversizeAction,
}

/// The client side of the upgraded connection, counting what crosses it.
struct Counted<T> {
    inner: T,
    counts: ByteCounts,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.counts.up.fetch_add(n as u64, Ordering::Relaxed);
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.counts.down.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Relays the upgraded bytes untouched until both sides are done; returns
/// how it ended.
pub async fn tunnel(client: Upgraded, upstream: Upgraded, counts: ByteCounts) -> String {
    let mut client = Counted { inner: TokioIo::new(client), counts };
    match tokio::io::copy_bidirectional(&mut client, &mut TokioIo::new(upstream)).await {
        Ok(_) => "closed".into(),
        Err(error) => format!("relay error: {error}"),
    }
}

type ClientWs = WebSocketStream<Counted<TokioIo<Upgraded>>>;
type UpstreamWs = WebSocketStream<TokioIo<Upgraded>>;

/// Why the relay stopped; becomes the record's `ended_by`.
enum End {
    /// A side closed (or went away); the other is closed in turn.
    Closed(String),
    /// We close both sides: the client's with this code and reason.
    Refuse { code: CloseCode, reason: String, log: String },
}

/// Relays messages between the client and the provider through `inspector`
/// until one side closes or a verdict closes both; returns how it ended.
pub async fn relay(
    client: Upgraded,
    upstream: Upgraded,
    inspector: &mut dyn MessageInspector,
    limits: WsLimits,
    counts: ByteCounts,
) -> String {
    // Over the inspection limit a message is refused by the framing itself
    // (never buffered past the limit), unless the policy passes it.
    let max = match limits.oversize {
        OversizeAction::Block => limits.max_message,
        OversizeAction::Pass => limits.max_message.max(MAX_PASSED_MESSAGE),
    };
    let config = WebSocketConfig::default().max_message_size(Some(max)).max_frame_size(Some(max));
    let counted = Counted { inner: TokioIo::new(client), counts };
    let mut down: ClientWs = WebSocketStream::from_raw_socket(counted, Role::Server, Some(config)).await;
    let mut up: UpstreamWs = WebSocketStream::from_raw_socket(TokioIo::new(upstream), Role::Client, Some(config)).await;
    let end = pump(&mut down, &mut up, inspector, limits).await;
    match end {
        End::Closed(how) => how,
        End::Refuse { code, reason, log } => {
            let frame = CloseFrame { code, reason: close_reason(&reason).into() };
            let away = CloseFrame { code: CloseCode::Away, reason: "".into() };
            tokio::join!(finish(&mut down, Some(frame)), finish(&mut up, Some(away)));
            log
        }
    }
}

/// Closes one side (a no-op past a close already sent) and waits a moment
/// for its close reply.
async fn finish<S>(ws: &mut WebSocketStream<S>, frame: Option<CloseFrame>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = ws.close(frame).await;
    let _ = tokio::time::timeout(CLOSE_WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// A close reason fits a control frame (123 bytes), cut on a character.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

fn message(data: WsData) -> Message {
    match data {
        WsData::Text(t) => Message::text(t),
        WsData::Binary(b) => Message::binary(b),
    }
}

/// Why a read failed, as a close code for the client and a record line.
fn read_failed(error: &tungstenite::Error, from_client: bool) -> End {
    let side = if from_client { "client" } else { "provider" };
    match error {
        tungstenite::Error::Capacity(CapacityError::MessageTooLong { .. }) => End::Refuse {
            code: CloseCode::Size,
            reason: "message exceeds the inspection limit".into(),
            log: format!("{side} message refused: {error}"),
        },
        tungstenite::Error::Protocol(ProtocolError::NonZeroReservedBits) => End::Refuse {
            code: CloseCode::Protocol,
            reason: "compressed or extended frames are not accepted".into(),
            log: format!("{side} protocol error: a frame with a reserved bit set (no extension was negotiated)"),
        },
        tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_) => End::Refuse {
            code: CloseCode::Protocol,
            reason: "protocol error".into(),
            log: format!("{side} protocol error: {error}"),
        },
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            End::Closed(format!("{side} closed"))
        }
        other => End::Closed(format!("{side} connection failed: {other}")),
    }
}

/// Sends provider messages to the client; false if the client is gone.
async fn deliver(down: &mut ClientWs, messages: Vec<WsData>) -> bool {
    for m in messages {
        if down.feed(message(m)).await.is_err() {
            return false;
        }
    }
    down.flush().await.is_ok()
}

/// Applies a verdict on provider messages; `Some` ends the relay.
async fn apply_server(down: &mut ClientWs, action: ServerAction) -> Option<End> {
    match action {
        ServerAction::Forward(messages) => {
            (!deliver(down, messages).await).then(|| End::Closed("client connection failed".into()))
        }
        ServerAction::Block { mut release, reply, reason } => {
            release.extend(reply);
            let _ = deliver(down, release).await;
            Some(End::Refuse { code: CloseCode::Policy, log: format!("provider message blocked: {reason}"), reason })
        }
    }
}

async fn pump(down: &mut ClientWs, up: &mut UpstreamWs, inspector: &mut dyn MessageInspector, limits: WsLimits) -> End {
    loop {
        let holding = inspector.holding();
        tokio::select! {
            read = down.next() => {
                let msg = match read {
                    None => return End::Closed("client closed".into()),
                    Some(Err(error)) => {
                        let end = read_failed(&error, true);
                        if let End::Refuse { code: CloseCode::Size, log, .. } = &end {
                            inspector.on_refused(true, log).await;
                        }
                        return end;
                    }
                    Some(Ok(msg)) => msg,
                };
                let data = match msg {
                    Message::Text(t) => WsData::Text(t.as_str().to_owned()),
                    Message::Binary(b) => WsData::Binary(b),
                    Message::Ping(p) => {
                        if up.send(Message::Ping(p)).await.is_err() {
                            return End::Closed("provider connection failed".into());
                        }
                        continue;
                    }
                    Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Close(frame) => {
                        // Whatever the provider still had held goes first.
                        if inspector.holding() {
                            let action = inspector.flush().await;
                            let _ = apply_server(down, action).await;
                        }
                        tokio::join!(finish(up, frame), finish(down, None));
                        return End::Closed("client closed".into());
                    }
                };
                if data.len() > limits.max_message {
                    // Only reachable with the oversize policy `pass`.
                    let reason = format!("message of {} bytes exceeds the inspection limit of {} bytes", data.len(), limits.max_message);
                    inspector.on_not_inspected(true, &reason).await;
                    if up.send(message(data)).await.is_err() {
                        return End::Closed("provider connection failed".into());
                    }
                    continue;
                }
                let out = match inspector.on_client_message(&data).await {
                    ClientAction::Forward => data,
                    ClientAction::Replace(new) => new,
                    ClientAction::Block { reply, reason } => {
                        if let Some(reply) = reply {
                            let _ = deliver(down, vec![reply]).await;
                        }
                        return End::Refuse {
                            code: CloseCode::Policy,
                            log: format!("client message blocked: {reason}"),
                            reason,
                        };
                    }
                };
                if up.send(message(out)).await.is_err() {
                    return End::Closed("provider connection failed".into());
                }
            }
            read = up.next() => {
                let msg = match read {
                    None => {
                        let action = inspector.flush().await;
                        let _ = apply_server(down, action).await;
                        finish(down, None).await;
                        return End::Closed("provider closed".into());
                    }
                    Some(Err(error)) => {
                        let end = read_failed(&error, false);
                        if let End::Refuse { code: CloseCode::Size, log, .. } = &end {
                            inspector.on_refused(false, log).await;
                        }
                        return end;
                    }
                    Some(Ok(msg)) => msg,
                };
                let data = match msg {
                    Message::Text(t) => WsData::Text(t.as_str().to_owned()),
                    Message::Binary(b) => WsData::Binary(b),
                    Message::Ping(p) => {
                        if down.send(Message::Ping(p)).await.is_err() {
                            return End::Closed("client connection failed".into());
                        }
                        continue;
                    }
                    Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Close(frame) => {
                        let action = inspector.flush().await;
                        if let Some(end) = apply_server(down, action).await {
                            return end;
                        }
                        tokio::join!(finish(down, frame), finish(up, None));
                        return End::Closed("provider closed".into());
                    }
                };
                if data.len() > limits.max_message {
                    let reason = format!("message of {} bytes exceeds the inspection limit of {} bytes", data.len(), limits.max_message);
                    // Held messages go first, checked; then this one, not.
                    let action = inspector.flush().await;
                    if let Some(end) = apply_server(down, action).await {
                        return end;
                    }
                    inspector.on_not_inspected(false, &reason).await;
                    if !deliver(down, vec![data]).await {
                        return End::Closed("client connection failed".into());
                    }
                    continue;
                }
                let action = inspector.on_server_message(data).await;
                if let Some(end) = apply_server(down, action).await {
                    return end;
                }
            }
            () = tokio::time::sleep(FLUSH_AFTER), if holding => {
                let action = inspector.flush().await;
                if let Some(end) = apply_server(down, action).await {
                    return end;
                }
            }
        }
    }
}

/// Runs a tunnel (`inspector` only told of the end) or, with `relay`, a
/// message relay through `inspector`; then reports the end to it.
pub async fn serve_upgraded(
    client: Upgraded,
    upstream: Upgraded,
    inspector: Option<Box<dyn MessageInspector>>,
    relay_messages: bool,
    limits: WsLimits,
    counts: ByteCounts,
) {
    // Inside the upgrade request's span: the session's lines name it too.
    let span = tracing::info_span!("websocket");
    serve_session(client, upstream, inspector, relay_messages, limits, counts).instrument(span).await
}

async fn serve_session(
    client: Upgraded,
    upstream: Upgraded,
    inspector: Option<Box<dyn MessageInspector>>,
    relay_messages: bool,
    limits: WsLimits,
    counts: ByteCounts,
) {
    let ended_by = match (inspector, relay_messages) {
        (Some(mut inspector), true) => {
            let ended_by = relay(client, upstream, inspector.as_mut(), limits, counts.clone()).await;
            Some((ended_by, inspector))
        }
        (inspector, _) => {
            let ended_by = tunnel(client, upstream, counts.clone()).await;
            inspector.map(|i| (ended_by, i))
        }
    };
    if let Some((ended_by, mut inspector)) = ended_by {
        let (bytes_up, bytes_down) = counts.load();
        inspector.on_close(&UpgradeClosed { bytes_up, bytes_down, ended_by }).await;
    }
}
