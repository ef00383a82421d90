//! The guardrail pipeline: the data plane's [`Hook`], running the configured
//! backends (the local engine, the Akto service) on every intercepted
//! request, response and stream, and turning their verdicts into the seed's
//! contract:
//!
//! * allowed: forwarded unchanged;
//! * modified: the changed texts are written back into the original JSON
//!   (every other field survives) and Content-Length is fixed;
//! * blocked: `403`, body `{"error": "<reason>"}`, header
//!   `X-Akto-Guardrails-Decision: blocked` ([`respond::blocked`]); a blocked
//!   request never reaches the provider; a blocked stream ends with an error
//!   event valid for the provider's format.
//!
//! Backends run in the configured order; a block short-circuits. A backend
//! failure follows the fail mode of its direction (open: let through and
//! record; closed: refuse with `503`). Every decision becomes one audit event
//! and a metric.
//!
//! By phase:
//!
//! * `request` — decoding, parsing and checking a request body;
//! * `response` — a whole response body, and the choice between collecting,
//!   streaming through the guard, or forwarding;
//! * `stream` — the [`StreamGuard`](stream::StreamGuard): windows over a
//!   streamed response's text;
//! * `backends` — the one loop over the configured backends, for every
//!   phase, and how verdicts change the body;
//! * `outcome` — what the backends decided, and its audit event and metrics;
//! * `websocket` — WebSocket connections, with the same backends (request
//!   checks) and stream guard (provider text).
//!
//! The exchange's [`Call`] is made once, by the request phase (or the
//! upgrade), and handed back by the data plane to the response phases as the
//! hook's [`ExchangeState`].
//!
//! [`respond::blocked`]: crate::respond::blocked

mod backends;
pub mod mcp;
mod outcome;
mod quick;
mod request;
mod response;
mod stream;
mod trace;
mod websocket;

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::watch;

use super::{
    akto::{AktoClient, redact_path},
    backend::{Backend, Call},
    budgets::Budgets,
    engine::{self, Engine, ScanContext, WorkloadRef},
    genai,
    keys::{self, Broker},
    model::{Direction, TextKind},
    providers,
};
use crate::{
    audit::AuditLog,
    config::{self, GuardrailsConfig},
    metrics::Metrics,
    proxy::hook::{
        BodyAction, Exchange, ExchangeState, Hook, RequestAction, ResponseAction, Unclassified, UpgradeAction,
    },
    telemetry::otlp::Otlp,
    workload::Workload,
};

/// The backends and settings in force; replaced whole on reload.
pub struct Guardrails {
    pub engine: Option<Arc<Engine>>,
    pub akto: Option<Arc<AktoClient>>,
    pub cfg: GuardrailsConfig,
    /// Key brokering, when `keys.enabled` (its file is reloaded on its own).
    pub keys: Option<Arc<Broker>>,
}

impl Guardrails {
    /// The backend a configured name stands for, if it is set up.
    fn backend(&self, configured: config::Backend) -> Option<&dyn Backend> {
        match configured {
            config::Backend::Local => self.engine.as_ref().map(|e| e as &dyn Backend),
            config::Backend::Akto => self.akto.as_ref().map(|a| a as &dyn Backend),
        }
    }

    /// Every backend that is set up, whether or not the checks use it.
    fn present(&self) -> impl Iterator<Item = &dyn Backend> {
        let engine = self.engine.as_ref().map(|e| e as &dyn Backend);
        let akto = self.akto.as_ref().map(|a| a as &dyn Backend);
        engine.into_iter().chain(akto)
    }

    /// Whether a backend reads request or response headers (they are only
    /// copied then).
    fn reads_headers(&self) -> bool {
        self.present().any(|b| b.reads_headers())
    }
}

/// The data plane's guardrail hook.
#[derive(Clone)]
pub struct Pipeline {
    current: watch::Receiver<Arc<Guardrails>>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    /// MCP settings, sessions and tool pins, kept across reloads.
    mcp: Arc<mcp::McpState>,
    /// Budgets and rate limits, their counters kept across reloads.
    budgets: Option<Arc<Budgets>>,
    /// Where each exchange's span goes, when traces are exported.
    otlp: Option<Arc<Otlp>>,
}

impl Pipeline {
    /// MCP sessions and pins in memory; see [`Pipeline::with_mcp`].
    pub fn new(current: watch::Receiver<Arc<Guardrails>>, audit: AuditLog, metrics: Arc<Metrics>) -> Self {
        Self { current, audit, metrics, mcp: Arc::new(mcp::McpState::in_memory()), budgets: None, otlp: None }
    }

    /// The budgets to enforce (see `guardrails::budgets`).
    pub fn with_budgets(mut self, budgets: Option<Arc<Budgets>>) -> Self {
        self.budgets = budgets;
        self
    }

    /// Exports a span per exchange through `otlp` (when it exports traces).
    pub fn with_otlp(mut self, otlp: Option<Arc<Otlp>>) -> Self {
        self.otlp = otlp.filter(|o| o.traces());
        self
    }

    /// The MCP sessions and tool pins to use (pins loaded from their file).
    pub fn with_mcp(mut self, mcp: Arc<mcp::McpState>) -> Self {
        self.mcp = mcp;
        self
    }

    fn snapshot(&self) -> Arc<Guardrails> {
        Arc::clone(&self.current.borrow())
    }
}

/// The exchange's [`Call`], as its request head shows it: the provider from
/// the host and path (a body or an upgrade may say better), no model yet;
/// its span opened (export on and sampled).
fn new_call(p: &Pipeline, g: &Guardrails, ex: &Exchange, head: &http::request::Parts, body: Bytes) -> Call {
    let path = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let provider = providers::detect(&ex.sni, &path);
    let ctx = ScanContext {
        direction: Direction::Request,
        provider,
        host: &ex.sni,
        workload: ex.workload.as_ref().map(WorkloadRef::of),
    };
    let request_id = request_id(detectors(g), &ctx, &head.headers);
    // The data plane's `request` span names the request from here on.
    crate::proxy::hook::record_request_id(&request_id);
    let recorded_path = recorded_path(detectors(g), &ctx, &path);
    let workload_key = workload_key(ex.workload.as_ref());
    Call {
        span: trace::open(p.otlp.as_ref(), ex, head, provider, &path, &recorded_path, &workload_key),
        request_id,
        provider,
        model: None,
        method: head.method.to_string(),
        path,
        recorded_path,
        host: ex.sni.clone(),
        client: ex.client,
        orig_dst: ex.orig_dst,
        workload: ex.workload.clone(),
        workload_key,
        request_headers: if g.reads_headers() { head.headers.clone() } else { http::HeaderMap::new() },
        request_body: body,
        mcp_session: None,
        budget: None,
    }
}

/// Who a workload is, stably (the MCP tool pins are kept per key, tokens
/// are counted per key): a pod's namespace and service account (stable
/// across its restarts), else its executable or process name; `*` when the
/// workload is unknown.
fn workload_key(workload: Option<&Workload>) -> String {
    let Some(w) = workload else { return "*".into() };
    if let Some(pod) = &w.pod {
        let account = pod.service_account.as_deref().unwrap_or("default");
        return format!("k8s:{}/{account}", pod.namespace);
    }
    match (&w.exe, w.comm.is_empty()) {
        (Some(exe), _) => format!("exe:{exe}"),
        (None, false) => format!("comm:{}", w.comm),
        (None, true) => "*".into(),
    }
}

/// What recorded strings are checked with: the local engine, or the
/// built-in detectors when it is not set up.
fn detectors(g: &Guardrails) -> Option<&Engine> {
    static BUILTIN: std::sync::OnceLock<Option<Engine>> = std::sync::OnceLock::new();
    g.engine.as_deref().or_else(|| BUILTIN.get_or_init(|| Engine::builtin().ok()).as_ref())
}

/// Replaces each finding of the detectors in `text` with its placeholder.
/// For what a body says of itself and the exchange records (the model's
/// name, an answer's id and finish reasons): those copies are recorded
/// whatever the verdict, a blocked request's model too, so what the
/// guardrails stop in a body must not come back through them. The local
/// engine's detectors, or the built-in ones when it is not set up.
fn scrub<T: AsRef<str> + From<String>>(g: &Guardrails, call: &Call, direction: Direction, text: &mut T) {
    let Some(engine) = detectors(g) else { return };
    let scan = engine.scan(&call.scan_context(direction), [(TextKind::Identifier, text.as_ref())]);
    if !scan.findings.is_empty() {
        *text = T::from(engine::redact(text.as_ref(), &scan.findings));
    }
}

/// `model`, as the exchange records it ([`scrub`]).
fn recorded_model(g: &Guardrails, call: &Call, model: Option<String>) -> Option<String> {
    let mut model = model?;
    scrub(g, call, Direction::Request, &mut model);
    Some(model)
}

/// An answer's facts, as its span records them ([`scrub`]).
fn scrub_facts(g: &Guardrails, call: &Call, facts: &mut genai::ResponseFacts<'_>) {
    let texts = facts.model.iter_mut().chain(facts.id.iter_mut()).chain(facts.finish_reasons.iter_mut());
    for text in texts {
        scrub(g, call, Direction::Response, text);
    }
}

/// The call the request phase kept for this exchange.
fn call_of(state: &ExchangeState) -> Option<Arc<Call>> {
    state.clone().and_then(|s| s.downcast::<Call>().ok())
}

/// `path` as the exchange records it: secret-named query parameters
/// removed ([`redact_path`]), then what the detectors find in it (a token
/// sent as a path segment or a query value) replaced by its placeholder.
/// The prescan clears almost every path at once.
fn recorded_path(detectors: Option<&Engine>, ctx: &ScanContext<'_>, path: &str) -> String {
    let mut recorded = redact_path(path);
    if let Some(engine) = detectors
        && !engine.prescan(ctx).clear(&recorded)
    {
        let scan = engine.scan(ctx, [(TextKind::Identifier, recorded.as_str())]);
        if !scan.findings.is_empty() {
            recorded = engine::redact(&recorded, &scan.findings);
        }
    }
    recorded
}

/// The exchange's id, named in its every log line, audit event and span:
/// the client's `x-request-id` (or `request-id`) when it has one of at most
/// 128 bytes in which the detectors' prescan finds nothing (a key sent as
/// the id is not recorded), else a new random one.
fn request_id(detectors: Option<&Engine>, ctx: &ScanContext<'_>, headers: &http::HeaderMap) -> String {
    for name in ["x-request-id", "request-id"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok())
            && !v.is_empty()
            && v.len() <= 128
        {
            if detectors.is_some_and(|d| !d.prescan(ctx).clear(v)) {
                break;
            }
            return v.to_string();
        }
    }
    new_request_id()
}

/// A new random request id: 128 random bits in lowercase hex.
fn new_request_id() -> String {
    let bits = rand::random::<u128>();
    (0..32).rev().map(|i| char::from_digit(((bits >> (4 * i)) & 0xf) as u32, 16).unwrap_or('0')).collect()
}

#[async_trait::async_trait]
impl Hook for Pipeline {
    async fn on_request(
        &self,
        ex: &Exchange,
        head: &mut http::request::Parts,
        body: &Bytes,
    ) -> (RequestAction, ExchangeState) {
        let (action, call) = request::on_request(self, ex, head, body).await;
        (action, Some(Arc::new(call)))
    }

    async fn on_response(
        &self,
        _ex: &Exchange,
        state: &ExchangeState,
        request: &http::request::Parts,
        head: &http::response::Parts,
    ) -> ResponseAction {
        match call_of(state) {
            Some(call) => {
                trace::response_head(&call, head.status);
                response::on_response(self, call, request, head)
            }
            None => ResponseAction::Forward,
        }
    }

    async fn on_not_inspected(
        &self,
        ex: &Exchange,
        state: &ExchangeState,
        request: &http::request::Parts,
        response: Option<&http::response::Parts>,
        reason: &str,
    ) {
        self.not_inspected(ex, call_of(state), request, response.is_some(), reason).await;
    }

    /// Key brokering and budgets still apply to a body that is not
    /// inspected.
    async fn on_uninspected_request(
        &self,
        ex: &Exchange,
        head: &mut http::request::Parts,
    ) -> Option<http::Response<http_body_util::Full<Bytes>>> {
        let admitted = match request::broker_keys(self, ex, head).await {
            Ok(swaps) => request::admit_unphased(self, ex, head).await.map(|()| swaps),
            Err(refused) => Err(refused),
        };
        match admitted {
            Ok(swaps) => {
                keys::apply(head, &swaps);
                None
            }
            Err(refused) => Some(refused),
        }
    }

    async fn on_unclassified(&self, conn: &Unclassified<'_>) {
        self.unclassified(conn).await;
    }

    async fn on_response_body(
        &self,
        _ex: &Exchange,
        state: &ExchangeState,
        _request: &http::request::Parts,
        head: &http::response::Parts,
        body: &Bytes,
    ) -> BodyAction {
        match call_of(state) {
            Some(call) => response::on_body(self, &call, head, body).await,
            None => BodyAction::Forward,
        }
    }

    /// Known WebSocket protocols are inspected message by message; others
    /// follow `guardrails.unknown_websocket` (see `pipeline::websocket`).
    async fn on_upgrade(&self, ex: &Exchange, head: &mut http::request::Parts) -> UpgradeAction {
        let swaps = match request::broker_keys(self, ex, head).await {
            Ok(swaps) => swaps,
            Err(refused) => return UpgradeAction::Respond(refused),
        };
        if let Err(refused) = request::admit_unphased(self, ex, head).await {
            return UpgradeAction::Respond(refused);
        }
        let action = websocket::on_upgrade(self, ex, head).await;
        if !matches!(action, UpgradeAction::Respond(_)) {
            keys::apply(head, &swaps);
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    #[test]
    fn request_ids_are_reused_or_made() {
        let engine = Engine::builtin().unwrap();
        let ctx = ScanContext {
            direction: Direction::Request,
            provider: crate::guardrails::model::Provider::OpenAiChat,
            host: "api.openai.com",
            workload: None,
        };
        let mut h = http::HeaderMap::new();
        assert_eq!(request_id(Some(&engine), &ctx, &h).len(), 32);
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(Some(&engine), &ctx, &h), "abc");
        // A key as the id is not recorded: a new id instead.
        let token = format!("ghp_{}", "a1B2c3D4e5F6".repeat(3));
        h.insert("x-request-id", HeaderValue::from_str(&token).unwrap());
        let id = request_id(Some(&engine), &ctx, &h);
        assert!(id.len() == 32 && id != token, "{id}");
        assert_eq!(request_id(None, &ctx, &h), token);
    }
}
