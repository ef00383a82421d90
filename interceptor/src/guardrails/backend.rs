//! The seam between the pipeline and the guardrail backends: a [`Check`]
//! in, a [`Verdict`] out.
//!
//! The pipeline runs the configured backends in order over every check of
//! every phase (the request, a whole response, a window of a stream) and
//! applies their verdicts to the body; a backend only judges. It never
//! rewrites the body itself, never decides what its failure means (the
//! fail mode is the pipeline's), and owns its wire format: what it sends
//! is built from the check here, behind the trait.
//!
//! The per-exchange context is a [`Call`]: made once per request (or
//! WebSocket upgrade) by the pipeline, and passed explicitly to every phase
//! and every check.

use std::{fmt, sync::Arc};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::{
    engine::{ScanContext, WorkloadRef},
    model::{Direction, Provider, Stage, TextSpan},
};
use crate::{
    net::{ClientAddr, OrigDstAddr},
    telemetry::otlp::ExchangeSpan,
    workload::Workload,
};

/// Which phase of an exchange a check belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// The request body, before it goes upstream (also a WebSocket client
    /// message).
    Request,
    /// A whole response body, before anything reaches the client.
    Response,
    /// One window of a streamed response's text (also WebSocket provider
    /// messages).
    Stream,
}

impl Phase {
    pub fn direction(self) -> Direction {
        match self {
            Self::Request => Direction::Request,
            Self::Response | Self::Stream => Direction::Response,
        }
    }
}

/// One exchange (a request and its response, or a WebSocket connection) as
/// the guardrails know it.
#[derive(Clone)]
pub struct Call {
    /// The client's `x-request-id` (or `request-id`), else a random one; the
    /// same on every check and audit event of the exchange.
    pub request_id: String,
    pub provider: Provider,
    pub model: Option<String>,
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The path and query as the exchange records them (audit events,
    /// spans): secret-named query parameters removed, then whatever the
    /// detectors find replaced by its placeholder.
    pub recorded_path: String,
    /// The name the client asked for (SNI).
    pub host: String,
    pub client: ClientAddr,
    pub orig_dst: OrigDstAddr,
    pub workload: Option<Workload>,
    /// Who the workload is, stably (a pod's namespace and service account,
    /// else its executable or process name; `*` when unknown): what the
    /// metrics, spans, token counts and MCP tool pins are kept by. Named
    /// once per exchange.
    pub workload_key: String,
    /// The request's headers; empty unless a configured backend reads them
    /// ([`Backend::reads_headers`]).
    pub request_headers: HeaderMap,
    /// The request body as received, until a request check of a backend
    /// that resends it replaces it with the body it saw
    /// ([`Backend::resends_request_body`]).
    pub request_body: Bytes,
    /// An MCP exchange (`provider` is [`Provider::Mcp`]): the request's
    /// `Mcp-Session-Id` (or the old transport's `sessionId` query), if any.
    pub mcp_session: Option<String>,
    /// What the budgets admitted the request with (its slots of
    /// `concurrent` budgets, given back when the exchange is done, and the
    /// token budgets its answer is charged to); `None` when no budget
    /// covers it.
    pub budget: Option<Arc<super::budgets::Ticket>>,
    /// The exchange's OpenTelemetry span (export on and sampled), exported
    /// when the last copy of the call is dropped.
    pub span: Option<Arc<ExchangeSpan>>,
}

impl Call {
    /// What the local engine's rules are matched against for `direction`.
    pub fn scan_context(&self, direction: Direction) -> ScanContext<'_> {
        ScanContext {
            direction,
            provider: self.provider,
            host: &self.host,
            workload: self.workload.as_ref().map(WorkloadRef::of),
        }
    }
}

/// Header values, the query and the body are left out: they may carry
/// credentials.
impl fmt::Debug for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.request_headers.keys().map(|k| k.as_str()).collect();
        f.debug_struct("Call")
            .field("request_id", &self.request_id)
            .field("provider", &self.provider)
            .field("model", &self.model)
            .field("method", &self.method)
            .field("host", &self.host)
            .field("path", &self.path.split('?').next().unwrap_or_default())
            .field("client", &self.client)
            .field("orig_dst", &self.orig_dst)
            .field("workload", &self.workload)
            .field("request_headers", &header_names)
            .field("request_body_len", &self.request_body.len())
            .finish()
    }
}

/// What one backend is asked to judge.
pub struct Check<'a> {
    pub phase: Phase,
    pub call: &'a Call,
    /// The texts to judge (shared with a scan that may run on another
    /// thread). A stream window is one text.
    pub texts: &'a Arc<Vec<TextSpan>>,
    /// `texts[read_by_parser..]` are strings the provider parser does not
    /// read.
    pub read_by_parser: usize,
    /// The body as the backends before this one left it, parsed (`None`:
    /// not JSON).
    pub doc: Option<&'a Value>,
    /// The body as it arrived (decoded).
    pub original: &'a [u8],
    /// The rewritten text of a body that is not JSON, if any.
    pub raw_text: Option<&'a str>,
    /// Whether a backend before this one changed the body.
    pub modified: bool,
    /// The provider's status and headers (response and stream checks).
    pub response: Option<(StatusCode, &'a HeaderMap)>,
    /// The request may take the policy's system instructions.
    pub instructions: bool,
    /// `false` in a stream in monitor mode: a backend must not hold the
    /// stream up (a remote one checks in the background, and its verdict
    /// is only logged).
    pub wait: bool,
}

impl Check<'_> {
    /// The body as it stands: the rewritten JSON, the rewritten raw text, or
    /// the original.
    pub fn body(&self) -> Bytes {
        current_body(self.doc, self.raw_text, self.original, self.modified)
    }
}

/// The body to forward: the rewritten JSON, the rewritten raw text, or the
/// decoded original.
pub fn current_body(doc: Option<&Value>, raw_text: Option<&str>, original: &[u8], modified: bool) -> Bytes {
    if !modified {
        return Bytes::copy_from_slice(original);
    }
    match (doc, raw_text) {
        (_, Some(raw)) => Bytes::from(raw.to_owned()),
        (Some(d), None) => Bytes::from(serde_json::to_vec(d).unwrap_or_default()),
        (None, None) => Bytes::copy_from_slice(original),
    }
}

/// What a backend says about one check. The pipeline folds it into the
/// exchange's outcome, in backend order.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Rules that matched, in order (noted once each).
    pub rules: Vec<String>,
    pub detectors: Vec<String>,
    /// Why, for the audit event.
    pub reasons: Vec<String>,
    /// Refuse the exchange (`403`).
    pub block: Option<Refusal>,
    /// Let it through, with something to look at.
    pub alert: bool,
    /// Change the body (ignored after a block; a stream cannot be rewritten,
    /// so there it is an alert).
    pub rewrite: Option<Rewrite>,
    /// System instructions to add to the request, in order.
    pub instructions: Vec<Instruction>,
}

#[derive(Debug)]
pub struct Refusal {
    pub reason: String,
    pub rule: String,
}

#[derive(Debug)]
pub enum Rewrite {
    /// New texts, by index into [`Check::texts`], in order.
    Texts(Vec<(usize, String)>),
    /// A new JSON body.
    Doc(Value),
    /// A new body for one that is not JSON.
    Raw(String),
    /// The backend asked for a change that does not fit this body: a
    /// failure of the backend, with why; the fail mode decides.
    Unusable(String),
}

#[derive(Debug)]
pub struct Instruction {
    pub id: Arc<str>,
    pub text: Arc<str>,
}

/// A backend could not judge; the fail mode decides.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// Short label for the `guardrail_backend_errors` metric.
    pub kind: &'static str,
    /// What the audit event says.
    pub message: String,
}

/// A guardrail backend.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Its name in audit events and metrics.
    fn stage(&self) -> Stage;

    /// Whether its checks read the request's headers ([`Call::request_headers`]).
    fn reads_headers(&self) -> bool {
        false
    }

    /// Whether its response checks resend the request body as its request
    /// check saw it ([`Call::request_body`]).
    fn resends_request_body(&self) -> bool {
        false
    }

    async fn check(&self, check: &Check<'_>) -> Result<Verdict, BackendError>;

    /// Another backend blocked the request (`check` as it stood then):
    /// record it, if this backend keeps records. Must not wait.
    fn report_block(&self, _check: &Check<'_>, _by: Stage, _rule: &str, _reason: &str) {}
}
