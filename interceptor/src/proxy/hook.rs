//! The point where guardrails plug into the data plane.
//!
//! A [`Hook`] sees every intercepted request with its whole body (buffered up
//! to a limit) and every response head; it may let the exchange through,
//! replace the request body, answer the client itself (the provider is then
//! never called), or inspect and rewrite the response body chunk by chunk as
//! it streams. Without a hook, bodies are streamed through untouched and
//! nothing is buffered.

use bytes::Bytes;
use http_body_util::Full;

use crate::{
    net::{ClientAddr, OrigDstAddr},
    redirect::Workload,
};

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

#[async_trait::async_trait]
pub trait Hook: Send + Sync + 'static {
    /// `head` may be changed (headers, extensions carried to the response).
    async fn on_request(&self, exchange: &Exchange, head: &mut http::request::Parts, body: &Bytes) -> RequestAction;

    async fn on_response(
        &self,
        exchange: &Exchange,
        request: &http::request::Parts,
        head: &http::response::Parts,
    ) -> ResponseAction;

    /// A body is forwarded uninspected: it is over an inspection limit and
    /// the oversize policy is `pass`. `response` is `None` for the request
    /// body. Records it; cannot stop it.
    async fn on_not_inspected(
        &self,
        _exchange: &Exchange,
        _request: &http::request::Parts,
        _response: Option<&http::response::Parts>,
        _reason: &str,
    ) {
    }

    /// A connection to an AI address was refused, or relayed uninspected,
    /// before any request: records it.
    async fn on_unclassified(&self, _conn: &Unclassified<'_>) {}

    /// The whole response body, after [`ResponseAction::Collect`].
    async fn on_response_body(
        &self,
        _exchange: &Exchange,
        _request: &http::request::Parts,
        _head: &http::response::Parts,
        _body: &Bytes,
    ) -> BodyAction {
        BodyAction::Forward
    }
}

#[async_trait::async_trait]
pub trait BodyInspector: Send + 'static {
    async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction;
    /// Bytes to send before the body ends (e.g. held-back text).
    async fn on_end(&mut self) -> Bytes;
    /// The body will not end normally (the provider failed or went quiet,
    /// or the client left): record what was seen. Nothing more is sent.
    async fn on_abort(&mut self, _reason: &str) {
        let _ = self.on_end().await;
    }
}
