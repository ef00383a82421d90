//! The point where guardrails plug into the data plane.
//!
//! A [`Hook`] sees every intercepted request with its whole body (buffered up
//! to a limit) and every response head; it may let the exchange through,
//! replace the request body, answer the client itself (the provider is then
//! never called), or inspect and rewrite the response body chunk by chunk as
//! it streams. Without a hook, bodies are streamed through untouched and
//! nothing is buffered.
//!
//! What the hook keeps about an exchange between its request and its
//! response is its own: [`Hook::on_request`] returns it as an
//! [`ExchangeState`], which the data plane holds, never opens, and hands
//! back to the response phases of the same exchange.
//!
//! A WebSocket upgrade asks the hook what to do with the upgraded connection
//! ([`Hook::on_upgrade`]): tunnel it, answer the client itself (e.g. `426`),
//! or relay it message by message through a [`MessageInspector`]. The data
//! plane owns the framing (`proxy::websocket`); the inspector only sees whole
//! messages, never frames.

use std::{any::Any, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;

use crate::{
    net::{ClientAddr, OrigDstAddr},
    workload::Workload,
};

/// Names the request being handled in its log lines: the data plane runs
/// each request in a `request` span whose `request_id` the hook fills in,
/// since the hook decides the id (the client's, or one it makes).
pub fn record_request_id(id: &str) {
    tracing::Span::current().record("request_id", id);
}

/// What the data plane knows about an intercepted connection.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    pub sni: String,
    pub workload: Option<Workload>,
}

/// A connection to an AI address whose first bytes could not be classified
/// by name (late, missing, unparseable or oversized ClientHello, not TLS, or
/// no server name and no AI name known for the address).
#[derive(Clone, Copy, Debug)]
pub struct Unclassified<'a> {
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    pub workload: Option<&'a Workload>,
    pub sni: Option<&'a str>,
    pub reason: &'a str,
    /// Closed (`true`) or relayed uninspected because the operator chose so.
    pub refused: bool,
}

/// What a hook keeps about one exchange (a request and its response)
/// between its phases: returned by [`Hook::on_request`], held by the data
/// plane until the response is done, and handed back to
/// [`Hook::on_response`], [`Hook::on_response_body`] and
/// [`Hook::on_not_inspected`] of the same exchange. Opaque to the data
/// plane. `None`: the hook keeps nothing, or its request phase did not run
/// (a request body over the inspection limit).
pub type ExchangeState = Option<Arc<dyn Any + Send + Sync>>;

pub enum RequestAction {
    /// Forward the request unchanged.
    Forward,
    /// Forward with this body instead (Content-Length is fixed).
    ReplaceBody(Bytes),
    /// Answer the client with this response; the provider is not called.
    Respond(http::Response<Full<Bytes>>),
}

pub enum ResponseAction {
    /// Stream the response unchanged.
    Forward,
    /// Replace the whole response.
    Respond(http::Response<Full<Bytes>>),
    /// Stream the body through this inspector.
    Inspect(Box<dyn BodyInspector>),
    /// Read the whole body (up to the inspection limit) and call
    /// [`Hook::on_response_body`] before anything is sent to the client, so
    /// the verdict can still change the status.
    Collect,
}

pub enum BodyAction {
    Forward,
    /// Send this body instead (Content-Length is fixed).
    ReplaceBody(Bytes),
    Respond(http::Response<Full<Bytes>>),
}

pub enum ChunkAction {
    /// Send these bytes to the client (the chunk itself, or a rewrite of it;
    /// empty to hold it back).
    Forward(Bytes),
    /// Send these bytes, then end the body: the rest of the upstream body is
    /// dropped.
    End(Bytes),
}

/// What to do with a WebSocket upgrade request.
pub enum UpgradeAction {
    /// Relay the upgraded bytes untouched; the inspector, if any, is only
    /// told how the connection ended ([`MessageInspector::on_close`]).
    Tunnel(Option<Box<dyn MessageInspector>>),
    /// Relay message by message through this inspector. The extension
    /// offer is removed from the upgrade request, so no message is
    /// compressed.
    Inspect(Box<dyn MessageInspector>),
    /// Answer the client with this response; the provider is not called.
    Respond(http::Response<Full<Bytes>>),
}

/// One whole WebSocket data message (fragments joined).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsData {
    Text(String),
    Binary(Bytes),
}

impl WsData {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Text(t) => t.as_bytes(),
            Self::Binary(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

/// The verdict on a client message.
pub enum ClientAction {
    /// Send it to the provider unchanged.
    Forward,
    /// Send this instead.
    Replace(WsData),
    /// Never send it: answer the client with `reply` (the provider's own
    /// error event, if the protocol has one) and close both sides, the
    /// client's with 1008 (policy violation) and `reason`.
    Block { reply: Option<WsData>, reason: String },
}

/// The verdict on a provider message.
pub enum ServerAction {
    /// Send these to the client now (the message itself, held ones released
    /// with it, or nothing while it is held).
    Forward(Vec<WsData>),
    /// Send `release`, then `reply`, then close both sides (the client's with
    /// 1008 and `reason`). Everything else held is dropped.
    Block { release: Vec<WsData>, reply: Option<WsData>, reason: String },
}

/// How an upgraded connection ended, for the inspector's last record.
#[derive(Clone, Debug, Default)]
pub struct UpgradeClosed {
    /// Bytes read from the client and written to it (frames and all).
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Who ended it, or what went wrong.
    pub ended_by: String,
}

/// Inspects a WebSocket connection message by message. Calls come from one
/// task, in the order the messages arrived.
#[async_trait::async_trait]
pub trait MessageInspector: Send + 'static {
    async fn on_client_message(&mut self, message: &WsData) -> ClientAction;
    async fn on_server_message(&mut self, message: WsData) -> ServerAction;
    /// Whether provider messages are held back waiting for a verdict.
    fn holding(&self) -> bool {
        false
    }
    /// The provider paused (or ended) with messages held: check what is held
    /// and release it.
    async fn flush(&mut self) -> ServerAction {
        ServerAction::Forward(Vec::new())
    }
    /// A message over the inspection limit was forwarded uninspected (the
    /// oversize policy is `pass`). `from_client` says which way it went.
    async fn on_not_inspected(&mut self, _from_client: bool, _reason: &str) {}
    /// A message over the inspection limit was refused (the oversize policy
    /// is `block`): the connection is closed.
    async fn on_refused(&mut self, _from_client: bool, _reason: &str) {}
    /// The connection ended; record it.
    async fn on_close(&mut self, _closed: &UpgradeClosed) {}
}

#[async_trait::async_trait]
pub trait Hook: Send + Sync + 'static {
    /// `head` may be changed (headers). Returns the action and what the
    /// hook keeps for the response phases.
    async fn on_request(
        &self,
        exchange: &Exchange,
        head: &mut http::request::Parts,
        body: &Bytes,
    ) -> (RequestAction, ExchangeState);

    /// `state` is what [`Hook::on_request`] returned for this exchange.
    async fn on_response(
        &self,
        exchange: &Exchange,
        state: &ExchangeState,
        request: &http::request::Parts,
        head: &http::response::Parts,
    ) -> ResponseAction;

    /// A body is forwarded uninspected: it is over an inspection limit and
    /// the oversize policy is `pass`. `response` is `None` for the request
    /// body (`state` is then `None`: the request phase did not run).
    /// Records it; cannot stop it.
    async fn on_not_inspected(
        &self,
        _exchange: &Exchange,
        _state: &ExchangeState,
        _request: &http::request::Parts,
        _response: Option<&http::response::Parts>,
        _reason: &str,
    ) {
    }

    /// A request whose body is forwarded uninspected (over the inspection
    /// limit, oversize policy `pass`), before it is sent: `head` may be
    /// changed (headers, target), or the client answered instead. Called
    /// before [`Hook::on_not_inspected`]. The default forwards it.
    async fn on_uninspected_request(
        &self,
        _exchange: &Exchange,
        _head: &mut http::request::Parts,
    ) -> Option<http::Response<Full<Bytes>>> {
        None
    }

    /// A connection to an AI address was refused, or relayed uninspected,
    /// before any request: records it.
    async fn on_unclassified(&self, _conn: &Unclassified<'_>) {}

    /// The whole response body, after [`ResponseAction::Collect`].
    async fn on_response_body(
        &self,
        _exchange: &Exchange,
        _state: &ExchangeState,
        _request: &http::request::Parts,
        _head: &http::response::Parts,
        _body: &Bytes,
    ) -> BodyAction {
        BodyAction::Forward
    }

    /// A WebSocket upgrade request (`head` may be changed). The default
    /// tunnels it.
    async fn on_upgrade(&self, _exchange: &Exchange, _head: &mut http::request::Parts) -> UpgradeAction {
        UpgradeAction::Tunnel(None)
    }
}

#[async_trait::async_trait]
pub trait BodyInspector: Send + 'static {
    async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction;
    /// The inspector only records (it never changes, holds or cuts the
    /// body): the data plane then forwards each chunk before handing it
    /// over, so the inspection adds nothing to the bytes' way to the client.
    /// Its [`ChunkAction::Forward`] bytes are ignored.
    fn observes_only(&self) -> bool {
        false
    }
    /// Bytes to send before the body ends (e.g. held-back text).
    async fn on_end(&mut self) -> Bytes;
    /// The body will not end normally (the provider failed or went quiet,
    /// or the client left): record what was seen. Nothing more is sent.
    async fn on_abort(&mut self, _reason: &str) {
        let _ = self.on_end().await;
    }
}
