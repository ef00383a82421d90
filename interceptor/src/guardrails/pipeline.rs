//! The guardrail pipeline: the data plane's [`Hook`], running the configured
//! backends (the local engine, the Akto service) on every intercepted
//! request, response and stream, and turning their verdicts into the seed's
//! contract:
//!
//! * allowed: forwarded unchanged;
//! * modified: the changed texts are written back into the original JSON
//!   (every other field survives) and Content-Length is fixed;
//! * blocked: `403`, body `{"error": "<reason>"}`, header
//!   `X-Akto-Guardrails-Decision: blocked`; a blocked request never reaches
//!   the provider; a blocked stream ends with an error event valid for the
//!   provider's format.
//!
//! Backends run in the configured order; a block short-circuits. A backend
//! failure follows the fail mode of its direction (open: let through and
//! record; closed: refuse with `503`). Every decision becomes one audit event
//! and a metric. WebSocket connections are inspected by `websocket`, with the
//! same backends (request checks) and stream guard (provider text).

mod websocket;

use std::{sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, StatusCode, header};
use http_body_util::Full;
use serde_json::Value;
use tokio::sync::watch;

use super::{
    akto::{AktoClient, CallInfo, RemoteVerdict, merge_modified_payload, redact_path},
    decode::{DecodeError, decode_body_bounded, decode_charset},
    engine::{Decision as EngineDecision, Engine, Scan, ScanContext, WorkloadRef},
    framing::{FramingKind, eventstream, json_array::JsonArrayStream, sse::SseParser},
    model::{Direction, NormalizedRequest, Provider, Role, TextKind, TextSpan},
    offload,
    providers::{self, StreamEventRef},
};
use crate::{
    audit::{self, AuditEvent, AuditLog, WorkloadInfo},
    config::{Backend, FailMode, GuardrailsConfig, OversizeAction, SigV4Action, StreamMode, UndecodableAction},
    metrics::{BackendLabels, DecisionLabels, Metrics},
    proxy::hook::{
        BodyAction, BodyInspector, ChunkAction, Exchange, Hook, RequestAction, ResponseAction, Unclassified,
        UpgradeAction,
    },
    respond::{self, Problem},
};

/// The backends and settings in force; replaced whole on reload.
pub struct Guardrails {
    pub engine: Option<Arc<Engine>>,
    pub akto: Option<Arc<AktoClient>>,
    pub cfg: GuardrailsConfig,
}

/// The data plane's guardrail hook.
pub struct Pipeline {
    current: watch::Receiver<Arc<Guardrails>>,
    audit: AuditLog,
    metrics: Arc<Metrics>,
}

impl Pipeline {
    pub fn new(current: watch::Receiver<Arc<Guardrails>>, audit: AuditLog, metrics: Arc<Metrics>) -> Self {
        Self { current, audit, metrics }
    }
}

/// Carried from the request to its response in the request's extensions.
#[derive(Clone)]
struct RequestState {
    request_id: String,
    provider: Provider,
    model: Option<String>,
    call: Arc<CallInfo>,
}

/// A request's texts and decoded body, for [`Pipeline::check_request`].
struct RequestBody<'a> {
    /// Shared with the scan, which may run on another thread.
    texts: &'a Arc<Vec<TextSpan>>,
    decoded: &'a [u8],
    /// Add the policy's system instructions to `doc`.
    instructions: bool,
    /// `texts[read_by_parser..]` are strings the provider parser did not
    /// read (named in the audit event when something is found there).
    read_by_parser: usize,
    /// A body that is not JSON can be replaced by its redacted text; false
    /// when it was decoded from another charset.
    raw_rewritable: bool,
}

/// What the backends decided for one check, accumulated in order.
#[derive(Default)]
struct Outcome {
    block: Option<Block>,
    modified: bool,
    alert: bool,
    error: bool,
    rules: Vec<String>,
    detectors: Vec<String>,
    reasons: Vec<String>,
    backends: Vec<&'static str>,
}

struct Block {
    status: StatusCode,
    reason: String,
    backend: &'static str,
    rule: String,
}

impl Outcome {
    fn decision(&self) -> &'static str {
        if self.block.is_some() {
            "block"
        } else if self.modified {
            "modify"
        } else if self.error {
            "error"
        } else if self.alert {
            "alert"
        } else {
            "allow"
        }
    }

    fn note_rule(&mut self, rule: &str) {
        if !self.rules.iter().any(|r| r == rule) {
            self.rules.push(rule.to_string());
        }
    }

    fn note_detector(&mut self, detector: &str) {
        if !self.detectors.iter().any(|d| d == detector) {
            self.detectors.push(detector.to_string());
        }
    }

    /// Folds a local scan in: rules and detectors noted, a block or an
    /// alert recorded. Returns whether texts must be redacted.
    fn local(&mut self, scan: &Scan) -> bool {
        for f in &scan.findings {
            self.note_rule(&f.rule_id);
            self.note_detector(&f.detector);
        }
        match &scan.decision {
            EngineDecision::Block(b) => {
                self.block = Some(Block {
                    status: StatusCode::FORBIDDEN,
                    reason: b.reason.clone(),
                    backend: "local",
                    rule: b.rule_id.to_string(),
                });
                false
            }
            EngineDecision::Redact => true,
            EngineDecision::Alert => {
                self.alert = true;
                false
            }
            EngineDecision::Allow => false,
        }
    }

    /// Folds a remote verdict in; returns a payload to merge when modified.
    fn remote(&mut self, v: &RemoteVerdict, default_reason: &str) -> Option<String> {
        for rule in v.rule.iter().chain(v.policy.iter()) {
            self.note_rule(rule);
        }
        if let Some(reason) = &v.reason {
            self.reasons.push(reason.clone());
        }
        if v.block {
            self.block = Some(Block {
                status: StatusCode::FORBIDDEN,
                reason: v.reason.clone().unwrap_or_else(|| default_reason.to_string()),
                backend: "akto",
                rule: v.rule.clone().or_else(|| v.policy.clone()).unwrap_or_default(),
            });
            return None;
        }
        if !v.allowed {
            self.alert = true;
        }
        v.modified_payload.clone()
    }

    /// A backend failed: fail open (record) or closed (refuse).
    fn backend_failed(&mut self, backend: &'static str, error: &str, mode: FailMode) {
        self.error = true;
        self.reasons.push(format!("{backend} unavailable: {error}"));
        if mode == FailMode::Closed {
            self.block = Some(Block {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: "guardrail backend unavailable".into(),
                backend,
                rule: "fail_closed".into(),
            });
        }
    }
}

/// A body over the inspection limits, per the oversize policy: an alert
/// when passed, and the response to send when blocked (the same JSON error
/// the data plane sends for a body over `max_inspected_body`).
fn oversize(
    outcome: &mut Outcome,
    action: OversizeAction,
    problem: Problem,
    reason: String,
) -> Option<http::Response<Full<Bytes>>> {
    outcome.backends.push("decode");
    match action {
        OversizeAction::Pass => {
            outcome.alert = true;
            outcome.reasons.push(reason);
            None
        }
        OversizeAction::Block => {
            let response = respond::error(problem, &reason);
            outcome.block =
                Some(Block { status: problem.status(), reason, backend: "decode", rule: "oversize".into() });
            Some(response)
        }
    }
}

/// Notes, for the audit event, findings in texts the provider parser did not
/// read (`texts[read_by_parser..]`): where they were, at most three.
fn note_unread_findings(
    outcome: &mut Outcome,
    scan: &Scan,
    texts: &[TextSpan],
    read_by_parser: usize,
    provider: Provider,
) {
    let mut paths: Vec<String> = Vec::new();
    for f in scan.findings.iter().filter(|f| f.text_index >= read_by_parser) {
        let Some(span) = texts.get(f.text_index) else { continue };
        let mut path = providers::path_string(&span.path);
        if path.len() > 120 {
            let cut = (0..=120).rev().find(|&i| path.is_char_boundary(i)).unwrap_or(0);
            path.truncate(cut);
            path.push('…');
        }
        if !paths.contains(&path) && paths.len() < 3 {
            paths.push(path);
        }
    }
    if !paths.is_empty() {
        outcome.reasons.push(format!(
            "found in a field the {} parser does not read: {}",
            provider.as_str(),
            paths.join(", ")
        ));
    }
}

fn workload_ref(ex: &Exchange) -> Option<WorkloadRef<'_>> {
    ex.workload.as_ref().map(|w| WorkloadRef { comm: &w.comm, cgroup: None })
}

fn request_id(headers: &http::HeaderMap) -> String {
    for name in ["x-request-id", "request-id"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok())
            && !v.is_empty()
            && v.len() <= 128
        {
            return v.to_string();
        }
    }
    format!("{:032x}", rand::random::<u128>())
}

/// Headers the Akto call may see; the client module drops credentials again.
/// Only copied when Akto is configured.
fn visible_headers(g: &Guardrails, headers: &http::HeaderMap) -> Vec<(String, String)> {
    if g.akto.is_none() {
        return Vec::new();
    }
    headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string()))).collect()
}

fn is_sigv4(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("AWS4-HMAC-SHA256"))
}

/// What Akto's `requestPayload` holds: `{"messages": [...]}` when the body
/// has messages, else `{"raw": <body>}`.
fn akto_payload(doc: Option<&Value>, raw: &[u8]) -> String {
    match doc.and_then(|d| d.get("messages")) {
        Some(messages) => serde_json::json!({ "messages": messages }).to_string(),
        None => serde_json::json!({ "raw": String::from_utf8_lossy(raw) }).to_string(),
    }
}

impl Pipeline {
    /// A request body that cannot be decoded for inspection (unknown or
    /// corrupt content coding, unknown charset): `415` in the block shape
    /// whatever `fail_mode_request` says, since the client chose the
    /// encoding; with `undecodable = "pass"`, forwarded uninspected and
    /// audited as such.
    async fn undecodable(
        &self,
        g: &Guardrails,
        ex: &Exchange,
        state: &RequestState,
        mut outcome: Outcome,
        started: Instant,
        error: &DecodeError,
    ) -> RequestAction {
        outcome.backends.push("decode");
        outcome.note_rule("undecodable");
        let why = error.to_string();
        let action = match g.cfg.undecodable {
            UndecodableAction::Block => {
                let reason = format!("request body cannot be decoded for inspection: {why}");
                outcome.block = Some(Block {
                    status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    reason: reason.clone(),
                    backend: "decode",
                    rule: "undecodable".into(),
                });
                RequestAction::Respond(respond::blocked(StatusCode::UNSUPPORTED_MEDIA_TYPE, &reason))
            }
            UndecodableAction::Pass => {
                outcome.alert = true;
                outcome.reasons.push(format!("not inspected: body cannot be decoded ({why})"));
                RequestAction::Forward
            }
        };
        self.audit(g, ex, state, Direction::Request, &outcome, started, None).await;
        action
    }

    fn snapshot(&self) -> Arc<Guardrails> {
        Arc::clone(&self.current.borrow())
    }

    fn record_metrics(&self, provider: Provider, direction: Direction, outcome: &Outcome, started: Instant) {
        self.metrics.guardrail_seconds.observe(started.elapsed().as_secs_f64());
        let direction = match direction {
            Direction::Request => "request",
            Direction::Response => "response",
        };
        let rules: Vec<String> = if outcome.rules.is_empty() { vec![String::new()] } else { outcome.rules.clone() };
        for rule in rules {
            self.metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    provider: provider.as_str(),
                    direction,
                    action: outcome.decision(),
                    rule,
                })
                .inc();
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn audit(
        &self,
        g: &Guardrails,
        ex: &Exchange,
        state: &RequestState,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
        prompt: Option<String>,
    ) {
        self.record_metrics(state.provider, direction, outcome, started);
        let event = self.event(g, ex, state, direction, outcome, started, prompt);
        self.audit.record(event).await;
    }

    /// The audit event of a decision.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        g: &Guardrails,
        ex: &Exchange,
        state: &RequestState,
        direction: Direction,
        outcome: &Outcome,
        started: Instant,
        prompt: Option<String>,
    ) -> AuditEvent {
        let w = ex.workload.as_ref();
        AuditEvent {
            time: audit::now(),
            event: "guardrail_decision",
            request_id: state.request_id.clone(),
            direction: match direction {
                Direction::Request => "request",
                Direction::Response => "response",
            },
            decision: outcome.decision(),
            provider: state.provider.as_str(),
            host: ex.sni.clone(),
            path: redact_path(&state.call.path),
            method: state.call.method.clone(),
            model: state.model.clone(),
            rules: outcome.rules.clone(),
            detectors: outcome.detectors.clone(),
            reasons: outcome.block.iter().map(|b| b.reason.clone()).chain(outcome.reasons.iter().cloned()).collect(),
            backends: outcome.backends.clone(),
            latency_ms: started.elapsed().as_secs_f64() * 1e3,
            client: ex.client.to_string(),
            orig_dst: ex.orig_dst.to_string(),
            workload: WorkloadInfo::of(w),
            prompt: if g.cfg.audit_prompts { prompt } else { None },
            websocket: None,
        }
    }

    /// Runs the request backends in order over a request's texts: the local
    /// engine (redacting into `doc`, or into `raw_text` for a body that is
    /// not JSON, and adding the policy's system instructions when
    /// `body.instructions`), then Akto. Shared by HTTP requests and
    /// WebSocket client messages.
    #[allow(clippy::too_many_arguments)]
    async fn check_request(
        &self,
        g: &Guardrails,
        ex: &Exchange,
        state: &mut RequestState,
        body: RequestBody<'_>,
        doc: &mut Option<Value>,
        raw_text: &mut Option<String>,
        outcome: &mut Outcome,
    ) {
        for backend in &g.cfg.backends {
            if outcome.block.is_some() {
                break;
            }
            match backend {
                Backend::Local => {
                    let Some(engine) = &g.engine else { continue };
                    outcome.backends.push("local");
                    let ctx = ScanContext {
                        direction: Direction::Request,
                        provider: state.provider,
                        host: &ex.sni,
                        workload: workload_ref(ex),
                    };
                    let scan = match offload::scan(engine, &ctx, body.texts).await {
                        Ok(scan) => scan,
                        Err(error) => {
                            self.backend_error("local", "internal");
                            outcome.backend_failed("local", &crate::telemetry::chain(&error), g.cfg.fail_mode_request);
                            continue;
                        }
                    };
                    note_unread_findings(outcome, &scan, body.texts, body.read_by_parser, state.provider);
                    if outcome.local(&scan) {
                        for (i, t) in body.texts.iter().enumerate() {
                            let Some(new) = scan.redacted(i, &t.text) else { continue };
                            match doc.as_mut() {
                                Some(d) if !t.path.is_empty() => {
                                    if providers::set_text(d, &t.path, &new).is_ok() {
                                        outcome.modified = true;
                                    }
                                }
                                // A body that is not JSON but was decoded from
                                // another charset cannot be rewritten in place:
                                // what must be redacted is refused instead.
                                None if !body.raw_rewritable => {
                                    outcome.block = Some(Block {
                                        status: StatusCode::FORBIDDEN,
                                        reason: "request must be redacted but its text cannot be rewritten in place; \
                                                 blocked instead"
                                            .into(),
                                        backend: "local",
                                        rule: "unredactable".into(),
                                    });
                                    break;
                                }
                                _ => {
                                    *raw_text = Some(new);
                                    outcome.modified = true;
                                }
                            }
                        }
                    }
                    if body.instructions
                        && outcome.block.is_none()
                        && let Some(d) = doc.as_mut()
                    {
                        for instruction in engine.system_instructions(&ctx) {
                            match providers::insert_instruction(state.provider, d, &instruction.text) {
                                Ok(()) => {
                                    outcome.modified = true;
                                    outcome.note_rule(&instruction.id);
                                }
                                Err(error) => outcome
                                    .reasons
                                    .push(format!("system instruction {} not applied: {error}", instruction.id)),
                            }
                        }
                    }
                }
                Backend::Akto => {
                    let Some(akto) = &g.akto else { continue };
                    outcome.backends.push("akto");
                    let current = current_body(doc.as_ref(), raw_text.as_deref(), body.decoded, outcome.modified);
                    let payload = akto_payload(doc.as_ref(), &current);
                    let call = Arc::new(CallInfo { request_body: current.clone(), ..(*state.call).clone() });
                    state.call = Arc::clone(&call);
                    match akto.check_request(&call, &payload).await {
                        Ok(verdict) => {
                            if let Some(modified) = outcome.remote(&verdict, "blocked by guardrail policy") {
                                match doc.as_ref().map(|d| merge_modified_payload(d, &modified)) {
                                    Some(Ok(merged)) => {
                                        *doc = Some(merged);
                                        outcome.modified = true;
                                    }
                                    Some(Err(error)) => {
                                        outcome.backend_failed("akto", &error.to_string(), g.cfg.fail_mode_request)
                                    }
                                    None => {
                                        *raw_text = Some(modified);
                                        outcome.modified = true;
                                    }
                                }
                            }
                        }
                        Err(error) => {
                            self.backend_error("akto", error.kind());
                            outcome.backend_failed("akto", &error.to_string(), g.cfg.fail_mode_request);
                        }
                    }
                }
            }
        }
    }

    fn backend_error(&self, backend: &'static str, kind: &'static str) {
        self.metrics.backend_errors.get_or_create(&BackendLabels { backend, kind }).inc();
    }
}

#[async_trait::async_trait]
impl Hook for Pipeline {
    async fn on_request(&self, ex: &Exchange, head: &mut http::request::Parts, body: &Bytes) -> RequestAction {
        let g = self.snapshot();
        let started = Instant::now();
        let path_and_query = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        let mut provider = providers::detect(&ex.sni, &path_and_query);
        let request_id = request_id(&head.headers);
        let call = Arc::new(CallInfo {
            request_id: request_id.clone(),
            method: head.method.to_string(),
            path: path_and_query.clone(),
            host: ex.sni.clone(),
            request_headers: visible_headers(&g, &head.headers),
            request_body: body.clone(),
            client_ip: Some(ex.client.0.ip()),
            dest_ip: Some(ex.orig_dst.0.ip()),
            workload: ex.workload.clone(),
        });
        let mut state = RequestState { request_id, provider, model: None, call };
        let mut outcome = Outcome::default();

        // Responses are inspected as they stream: ask for them uncompressed.
        head.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));

        let encoding = head.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let (max_decoded, max_ratio) = (g.cfg.max_decoded_body, g.cfg.max_decompression_ratio);
        let decoded = match decode_body_bounded(encoding.as_deref(), body, max_decoded, max_ratio) {
            Ok(d) => d,
            Err(error) if error.is_oversize() => {
                head.extensions.insert(state.clone());
                let reason = format!("not inspected: too large ({error})");
                let blocked = oversize(&mut outcome, g.cfg.oversize, Problem::RequestTooLarge, reason);
                self.audit(&g, ex, &state, Direction::Request, &outcome, started, None).await;
                return match blocked {
                    Some(response) => RequestAction::Respond(response),
                    None => RequestAction::Forward,
                };
            }
            Err(error) => {
                head.extensions.insert(state.clone());
                return self.undecodable(&g, ex, &state, outcome, started, &error).await;
            }
        };
        let content_type = head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = match decode_charset(content_type.as_deref(), &decoded) {
            Ok(text) => text,
            Err(error) => {
                head.extensions.insert(state.clone());
                return self.undecodable(&g, ex, &state, outcome, started, &error).await;
            }
        };
        let mut doc: Option<Value> = serde_json::from_slice(&text.text).ok();
        if provider == Provider::Generic
            && let Some(p) = doc.as_ref().and_then(providers::detect_from_body)
        {
            provider = p;
        }
        state.provider = provider;
        let mut normalized = match &doc {
            Some(d) => providers::parse_request(provider, d),
            None if decoded.is_empty() => NormalizedRequest::default(),
            None => {
                let raw_span =
                    |text: String| TextSpan { path: Vec::new(), role: Role::Unknown, kind: TextKind::Other, text };
                let mut texts = vec![raw_span(String::from_utf8_lossy(&text.text).into_owned())];
                if text.from.is_some() {
                    // Not JSON in the detected charset: the bytes as UTF-8
                    // too, in case the receiver reads them that way.
                    texts.push(raw_span(String::from_utf8_lossy(&decoded).into_owned()));
                }
                NormalizedRequest { model: None, stream: false, texts }
            }
        };
        // What the provider parser did not read is scanned too (at its own
        // path, so it can be redacted in place); see `unread_texts`.
        let read_by_parser = normalized.texts.len();
        if let Some(d) = &doc {
            let unread = providers::unread_texts(d, &normalized.texts);
            normalized.texts.extend(unread);
        }
        state.model = normalized.model.clone().or_else(|| providers::model_from_path(&path_and_query));
        // Shared with the scan, which may run on another thread.
        let texts = Arc::new(normalized.texts);
        let mut raw_text: Option<String> = None;
        let body = RequestBody {
            texts: &texts,
            decoded: &decoded,
            instructions: true,
            read_by_parser,
            raw_rewritable: text.from.is_none(),
        };
        self.check_request(&g, ex, &mut state, body, &mut doc, &mut raw_text, &mut outcome).await;

        if outcome.block.is_none() && outcome.modified && is_sigv4(&head.headers) {
            // The body hash is signed: a rewrite would be rejected upstream.
            match g.cfg.sigv4 {
                SigV4Action::Block => {
                    outcome.block = Some(Block {
                        status: StatusCode::FORBIDDEN,
                        reason: "request must be modified by a guardrail but is signed with AWS SigV4; blocked instead"
                            .into(),
                        backend: "local",
                        rule: "sigv4_unmodifiable".into(),
                    });
                }
                SigV4Action::Alert => {
                    outcome.modified = false;
                    outcome.alert = true;
                    outcome.reasons.push("modification skipped: body is signed with AWS SigV4".into());
                }
            }
        }

        let prompt = g.cfg.audit_prompts.then(|| texts.iter().map(|t| t.text.as_str()).collect::<Vec<_>>().join("\n"));
        head.extensions.insert(state.clone());
        self.audit(&g, ex, &state, Direction::Request, &outcome, started, prompt).await;
        if let Some(block) = outcome.block {
            if block.backend == "local"
                && let Some(akto) = g.akto.clone()
            {
                // Report local blocks to Akto as security events.
                let (call, payload, rule, reason) = (
                    Arc::clone(&state.call),
                    akto_payload(doc.as_ref(), &decoded),
                    block.rule.clone(),
                    block.reason.clone(),
                );
                tokio::spawn(async move {
                    if let Err(error) = akto.report_local_block(&call, &payload, &rule, &reason).await {
                        tracing::debug!(%error, "could not report a local block to Akto");
                    }
                });
            }
            return RequestAction::Respond(respond::blocked(block.status, &block.reason));
        }
        if outcome.modified {
            head.headers.remove(header::CONTENT_ENCODING);
            if text.from.is_some()
                && let Some(ct) = content_type.as_deref()
            {
                // The rewritten body is UTF-8 JSON whatever charset it came in.
                let media = ct.split(';').next().unwrap_or("application/json").trim();
                if let Ok(v) = HeaderValue::from_str(&format!("{media}; charset=utf-8")) {
                    head.headers.insert(header::CONTENT_TYPE, v);
                }
            }
            return RequestAction::ReplaceBody(current_body(doc.as_ref(), raw_text.as_deref(), &decoded, true));
        }
        RequestAction::Forward
    }

    async fn on_response(
        &self,
        _ex: &Exchange,
        request: &http::request::Parts,
        head: &http::response::Parts,
    ) -> ResponseAction {
        let Some(state) = request.extensions.get::<RequestState>() else {
            return ResponseAction::Forward;
        };
        if !head.status.is_success() {
            return ResponseAction::Forward;
        }
        let g = self.snapshot();
        if g.engine.is_none() && g.akto.is_none() {
            return ResponseAction::Forward;
        }
        let content_type = head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let path = request.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        if head.headers.contains_key(header::CONTENT_ENCODING) {
            // We asked for identity; a compressed stream cannot be inspected
            // incrementally, a compressed whole body can.
            if providers::response_framing(state.provider, path, content_type).is_some() {
                return ResponseAction::Forward;
            }
            return ResponseAction::Collect;
        }
        match providers::response_framing(state.provider, path, content_type) {
            Some(kind) => ResponseAction::Inspect(Box::new(StreamGuard::new(self, g, state.clone(), kind, head))),
            None if content_type.contains("json") || content_type.is_empty() => ResponseAction::Collect,
            None => ResponseAction::Forward,
        }
    }

    async fn on_not_inspected(
        &self,
        ex: &Exchange,
        request: &http::request::Parts,
        response: Option<&http::response::Parts>,
        reason: &str,
    ) {
        let g = self.snapshot();
        let started = Instant::now();
        let state = match request.extensions.get::<RequestState>() {
            Some(state) => state.clone(),
            None => {
                // The request itself was not inspected: only its head is known.
                let path = request.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
                let request_id = request_id(&request.headers);
                RequestState {
                    request_id: request_id.clone(),
                    provider: providers::detect(&ex.sni, &path),
                    model: providers::model_from_path(&path),
                    call: Arc::new(CallInfo {
                        request_id,
                        method: request.method.to_string(),
                        path,
                        host: ex.sni.clone(),
                        request_headers: Vec::new(),
                        request_body: Bytes::new(),
                        client_ip: Some(ex.client.0.ip()),
                        dest_ip: Some(ex.orig_dst.0.ip()),
                        workload: ex.workload.clone(),
                    }),
                }
            }
        };
        let mut outcome = Outcome { alert: true, ..Outcome::default() };
        outcome.reasons.push(format!("not inspected: too large ({reason})"));
        let direction = if response.is_some() { Direction::Response } else { Direction::Request };
        self.audit(&g, ex, &state, direction, &outcome, started, None).await;
    }

    async fn on_unclassified(&self, conn: &Unclassified<'_>) {
        let outcome = if conn.refused {
            let block = Block {
                status: StatusCode::FORBIDDEN,
                reason: format!("unclassified connection refused: {}", conn.reason),
                backend: "proxy",
                rule: "unclassified".into(),
            };
            Outcome { block: Some(block), rules: vec!["unclassified".into()], ..Outcome::default() }
        } else {
            Outcome { alert: true, reasons: vec![format!("not inspected: {}", conn.reason)], ..Outcome::default() }
        };
        self.record_metrics(Provider::Generic, Direction::Request, &outcome, Instant::now());
        self.audit
            .record(AuditEvent {
                time: audit::now(),
                event: "unclassified_connection",
                request_id: request_id(&http::HeaderMap::new()),
                direction: "request",
                decision: outcome.decision(),
                provider: Provider::Generic.as_str(),
                host: conn.sni.unwrap_or_default().to_string(),
                path: String::new(),
                method: String::new(),
                model: None,
                rules: Vec::new(),
                detectors: Vec::new(),
                reasons: outcome
                    .block
                    .iter()
                    .map(|b| b.reason.clone())
                    .chain(outcome.reasons.iter().cloned())
                    .collect(),
                backends: Vec::new(),
                latency_ms: 0.0,
                client: conn.client.to_string(),
                orig_dst: conn.orig_dst.to_string(),
                workload: WorkloadInfo::of(conn.workload),
                prompt: None,
                websocket: None,
            })
            .await;
    }

    async fn on_response_body(
        &self,
        ex: &Exchange,
        request: &http::request::Parts,
        head: &http::response::Parts,
        body: &Bytes,
    ) -> BodyAction {
        let Some(state) = request.extensions.get::<RequestState>() else {
            return BodyAction::Forward;
        };
        let g = self.snapshot();
        let started = Instant::now();
        let mut outcome = Outcome::default();
        let encoding = head.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
        let (max_decoded, max_ratio) = (g.cfg.max_decoded_body, g.cfg.max_decompression_ratio);
        let decoded = match decode_body_bounded(encoding, body, max_decoded, max_ratio) {
            Ok(d) => d,
            Err(error) if error.is_oversize() => {
                let reason = format!("not inspected: too large ({error})");
                let blocked = oversize(&mut outcome, g.cfg.oversize, Problem::ResponseTooLarge, reason);
                self.audit(&g, ex, state, Direction::Response, &outcome, started, None).await;
                return match blocked {
                    Some(response) => BodyAction::Respond(response),
                    None => BodyAction::Forward,
                };
            }
            Err(error) => {
                outcome.backend_failed("decode", &error.to_string(), g.cfg.fail_mode_response);
                self.audit(&g, ex, state, Direction::Response, &outcome, started, None).await;
                return match outcome.block {
                    Some(b) => BodyAction::Respond(respond::blocked(b.status, &b.reason)),
                    None => BodyAction::Forward,
                };
            }
        };
        let mut doc: Option<Value> = serde_json::from_slice(&decoded).ok();
        let texts: Arc<Vec<TextSpan>> = Arc::new(match &doc {
            Some(d) => providers::parse_response(state.provider, d).texts,
            None => vec![TextSpan {
                path: Vec::new(),
                role: Role::Assistant,
                kind: TextKind::Other,
                text: String::from_utf8_lossy(&decoded).into_owned(),
            }],
        });
        for backend in &g.cfg.backends {
            if outcome.block.is_some() {
                break;
            }
            match backend {
                Backend::Local => {
                    let Some(engine) = &g.engine else { continue };
                    outcome.backends.push("local");
                    let ctx = ScanContext {
                        direction: Direction::Response,
                        provider: state.provider,
                        host: &ex.sni,
                        workload: workload_ref(ex),
                    };
                    let scan = match offload::scan(engine, &ctx, &texts).await {
                        Ok(scan) => scan,
                        Err(error) => {
                            self.backend_error("local", "internal");
                            outcome.backend_failed("local", &crate::telemetry::chain(&error), g.cfg.fail_mode_response);
                            continue;
                        }
                    };
                    if outcome.local(&scan) {
                        for (i, t) in texts.iter().enumerate() {
                            if let (Some(new), Some(d)) = (scan.redacted(i, &t.text), doc.as_mut())
                                && !t.path.is_empty()
                                && providers::set_text(d, &t.path, &new).is_ok()
                            {
                                outcome.modified = true;
                            }
                        }
                    }
                }
                Backend::Akto => {
                    let Some(akto) = &g.akto else { continue };
                    outcome.backends.push("akto");
                    let headers = visible_headers(&g, &head.headers);
                    let payload = String::from_utf8_lossy(&decoded);
                    match akto.check_response(&state.call, head.status.as_u16(), &headers, &payload).await {
                        Ok(verdict) => {
                            if let Some(modified) = outcome.remote(&verdict, "response blocked by guardrail policy") {
                                match doc.as_ref().map(|d| merge_modified_payload(d, &modified)) {
                                    Some(Ok(merged)) => {
                                        doc = Some(merged);
                                        outcome.modified = true;
                                    }
                                    _ => outcome.backend_failed(
                                        "akto",
                                        "unusable modified payload",
                                        g.cfg.fail_mode_response,
                                    ),
                                }
                            }
                        }
                        Err(error) => {
                            self.backend_error("akto", error.kind());
                            outcome.backend_failed("akto", &error.to_string(), g.cfg.fail_mode_response);
                        }
                    }
                }
            }
        }
        self.audit(&g, ex, state, Direction::Response, &outcome, started, None).await;
        if let Some(block) = outcome.block {
            return BodyAction::Respond(respond::blocked(block.status, &block.reason));
        }
        if outcome.modified
            && let Some(d) = doc
        {
            return BodyAction::ReplaceBody(Bytes::from(serde_json::to_vec(&d).unwrap_or_default()));
        }
        BodyAction::Forward
    }

    /// Known WebSocket protocols are inspected message by message; others
    /// follow `guardrails.unknown_websocket` (see `pipeline::websocket`).
    async fn on_upgrade(&self, ex: &Exchange, head: &mut http::request::Parts) -> UpgradeAction {
        websocket::on_upgrade(self, ex, head).await
    }
}

/// The body to forward: the rewritten JSON, the rewritten raw text, or the
/// decoded original.
fn current_body(doc: Option<&Value>, raw_text: Option<&str>, decoded: &[u8], modified: bool) -> Bytes {
    if !modified {
        return Bytes::copy_from_slice(decoded);
    }
    match (doc, raw_text) {
        (_, Some(raw)) => Bytes::from(raw.to_owned()),
        (Some(d), None) => Bytes::from(serde_json::to_vec(d).unwrap_or_default()),
        (None, None) => Bytes::copy_from_slice(decoded),
    }
}

/// Incremental parser for whichever framing the stream uses.
enum Framer {
    Sse(SseParser),
    EventStream(eventstream::Decoder),
    JsonArray(JsonArrayStream),
}

/// Maximum size of one stream event (SSE event, frame or array element).
const MAX_EVENT: usize = 16 << 20;

/// Inspects a streamed response: completion text is accumulated into
/// windows that overlap, so a phrase split across two windows is still
/// caught. `monitor` forwards every chunk at once and records verdicts;
/// `enforce` holds back the bytes of at most one window until its verdict and
/// ends the stream with a provider-valid error event on a block.
struct StreamGuard {
    g: Arc<Guardrails>,
    state: RequestState,
    kind: FramingKind,
    framer: Framer,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    status: u16,
    headers: Vec<(String, String)>,
    /// Text of parsed events not yet checked.
    pending: String,
    /// Tail of the previous window, checked again with the next one.
    carry: String,
    /// Enforce: bytes received but not yet released.
    held: BytesMut,
    /// Enforce: the parsed events among the held bytes, oldest first: (raw
    /// length, characters of text).
    held_events: std::collections::VecDeque<(usize, usize)>,
    released_any: bool,
    /// The last byte released, to finish a CRLF line before an error event.
    last_released: Option<u8>,
    outcome: Outcome,
    started: Instant,
    exchange_host: String,
    workload_comm: Option<String>,
    client: String,
    orig_dst: String,
    workload: WorkloadInfo,
    framing_broken: bool,
}

impl StreamGuard {
    fn new(
        p: &Pipeline,
        g: Arc<Guardrails>,
        state: RequestState,
        kind: FramingKind,
        head: &http::response::Parts,
    ) -> Self {
        let framer = match kind {
            FramingKind::Sse => Framer::Sse(SseParser::new(MAX_EVENT)),
            FramingKind::EventStream => Framer::EventStream(eventstream::Decoder::new(MAX_EVENT)),
            FramingKind::JsonArray => Framer::JsonArray(JsonArrayStream::new(MAX_EVENT)),
        };
        let call = &state.call;
        let w = call.workload.as_ref();
        let headers = visible_headers(&g, &head.headers);
        Self {
            exchange_host: call.host.clone(),
            workload_comm: w.map(|w| w.comm.clone()),
            client: call.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            orig_dst: call.dest_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            workload: WorkloadInfo::of(w),
            g,
            state,
            kind,
            framer,
            audit: p.audit.clone(),
            metrics: Arc::clone(&p.metrics),
            status: head.status.as_u16(),
            headers,
            pending: String::new(),
            carry: String::new(),
            held: BytesMut::new(),
            held_events: std::collections::VecDeque::new(),
            released_any: false,
            last_released: None,
            outcome: Outcome::default(),
            started: Instant::now(),
            framing_broken: false,
        }
    }

    fn enforce(&self) -> bool {
        self.g.cfg.stream_mode == StreamMode::Enforce
    }

    /// Parses a chunk: the completed events' raw lengths and text go to
    /// `held_events` and `pending`; returns whether one of them ends the
    /// stream.
    fn parse(&mut self, chunk: &[u8]) -> bool {
        if self.framing_broken {
            return false;
        }
        let provider = self.state.provider;
        let delta = |ev: StreamEventRef<'_>| providers::stream_delta(provider, ev);
        let result: Result<Vec<(usize, super::model::StreamDelta)>, String> = match &mut self.framer {
            Framer::Sse(p) => p
                .feed(chunk)
                .map(|evs| evs.iter().map(|e| (e.raw_len, delta(e.into()))).collect())
                .map_err(|e| e.to_string()),
            Framer::EventStream(p) => p
                .feed(chunk)
                .map(|fs| fs.iter().map(|f| (f.raw_len, delta(f.into()))).collect())
                .map_err(|e| e.to_string()),
            Framer::JsonArray(p) => p
                .feed(chunk)
                .map(|els| els.iter().map(|el| (el.raw_len, delta((&el.value).into()))).collect())
                .map_err(|e| e.to_string()),
        };
        let events = match result {
            Ok(events) => events,
            Err(error) => {
                self.framing_failed(error);
                Vec::new()
            }
        };
        let mut end = false;
        for (raw_len, delta) in events {
            end |= delta.end;
            let mut chars = 0;
            for (_, text) in delta.texts {
                chars += text.chars().count();
                self.pending.push_str(&text);
            }
            self.held_events.push_back((raw_len, chars));
        }
        end
    }

    /// The provider's stream cannot be parsed (bad CRC, truncated frame,
    /// oversized event): inspection stops. Enforce: what cannot be read
    /// cannot be vouched for, so the stream is cut with the provider's error
    /// event. Monitor: the rest passes through and the error is logged.
    fn framing_failed(&mut self, error: String) {
        self.framing_broken = true;
        self.outcome.error = true;
        if self.enforce() {
            self.outcome.block = Some(Block {
                status: StatusCode::BAD_GATEWAY,
                reason: "the provider's stream could not be parsed".into(),
                backend: "framing",
                rule: "malformed_stream".into(),
            });
            self.outcome.reasons.push(format!("malformed stream: {error}"));
        } else {
            self.outcome.reasons.push(format!("malformed stream, not inspected further: {error}"));
            tracing::warn!(
                request_id = %self.state.request_id,
                provider = self.state.provider.as_str(),
                host = %self.exchange_host,
                %error,
                "malformed provider stream passed through uninspected (monitor mode)"
            );
        }
    }

    /// A framing error the end of the stream reveals: a frame cut short.
    fn check_finished(&mut self) {
        if self.framing_broken {
            return;
        }
        let unfinished = match &mut self.framer {
            Framer::EventStream(d) => d.finish().err().map(|e| e.to_string()),
            Framer::JsonArray(a) => a.finish().err().map(|e| e.to_string()),
            Framer::Sse(_) => None,
        };
        if let Some(error) = unfinished {
            self.framing_failed(error);
        }
    }

    /// Releases the held bytes of checked events, except those carrying the
    /// last `stream_overlap` characters: they are checked again with the next
    /// window, and a secret that starts in them must not be half-sent.
    /// `all`: release every held byte (end of stream, or failing open).
    fn release(&mut self, all: bool) -> Bytes {
        let count = if all {
            self.held.len()
        } else {
            let mut keep = self.held_events.len();
            let mut tail = 0;
            while keep > 0 && tail < self.g.cfg.stream_overlap {
                keep -= 1;
                tail += self.held_events[keep].1;
            }
            self.held_events.drain(..keep).map(|(raw, _)| raw).sum::<usize>().min(self.held.len())
        };
        if all {
            self.held_events.clear();
        }
        let out = self.held.split_to(count).freeze();
        if let Some(&last) = out.last() {
            self.released_any = true;
            self.last_released = Some(last);
        }
        out
    }

    /// Checks the pending window (with the carried overlap). Returns the
    /// block reason, if any.
    async fn check_window(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return self.outcome.block.as_ref().map(|b| b.reason.clone());
        }
        let text = format!("{}{}", self.carry, self.pending);
        self.pending.clear();
        let overlap = self.g.cfg.stream_overlap;
        self.carry = tail_chars(&text, overlap).to_string();
        let g = Arc::clone(&self.g);
        for backend in &g.cfg.backends {
            if self.outcome.block.is_some() {
                break;
            }
            match backend {
                Backend::Local => {
                    let Some(engine) = &g.engine else { continue };
                    if !self.outcome.backends.contains(&"local") {
                        self.outcome.backends.push("local");
                    }
                    let workload = self.workload_comm.as_deref().map(|comm| WorkloadRef { comm, cgroup: None });
                    let ctx = ScanContext {
                        direction: Direction::Response,
                        provider: self.state.provider,
                        host: &self.exchange_host,
                        workload,
                    };
                    let scan = engine.scan(&ctx, [(TextKind::Content, text.as_str())]);
                    if self.outcome.local(&scan) {
                        // A stream cannot be rewritten in place: record it.
                        self.outcome.alert = true;
                    }
                }
                Backend::Akto => {
                    let Some(akto) = &g.akto else { continue };
                    if !self.outcome.backends.contains(&"akto") {
                        self.outcome.backends.push("akto");
                    }
                    if self.enforce() {
                        match akto.check_stream_batch(&self.state.call, self.status, &self.headers, &text).await {
                            Ok(v) => {
                                let _ = self.outcome.remote(&v, "response blocked by guardrail policy");
                            }
                            Err(error) => {
                                self.metrics
                                    .backend_errors
                                    .get_or_create(&BackendLabels { backend: "akto", kind: error.kind() })
                                    .inc();
                                self.outcome.backend_failed("akto", &error.to_string(), self.g.cfg.fail_mode_response);
                            }
                        }
                    } else {
                        // Monitor: never wait on the network in the stream path.
                        let (akto, call, status, headers, text) = (
                            Arc::clone(akto),
                            Arc::clone(&self.state.call),
                            self.status,
                            self.headers.clone(),
                            text.clone(),
                        );
                        tokio::spawn(async move {
                            match akto.check_stream_batch(&call, status, &headers, &text).await {
                                Ok(v) if v.block || !v.allowed => tracing::warn!(
                                    request_id = %call.request_id,
                                    reason = v.reason.as_deref().unwrap_or(""),
                                    "stream flagged by the remote guardrail (monitor mode: not cut)"
                                ),
                                Ok(_) => {}
                                Err(error) => tracing::debug!(%error, "stream batch check failed"),
                            }
                        });
                    }
                }
            }
        }
        if !self.enforce()
            && let Some(block) = self.outcome.block.take()
        {
            // Monitor mode records what enforce would have done.
            self.outcome.alert = true;
            self.outcome.reasons.push(format!("monitor mode, not enforced: {}", block.reason));
            self.outcome.note_rule(&block.rule);
            return None;
        }
        self.outcome.block.as_ref().map(|b| b.reason.clone())
    }

    fn block_bytes(&self, reason: &str) -> Bytes {
        let mut out = Vec::new();
        // An SSE event released up to its `\r` still owes the `\n` of a
        // CRLF line end; without it some SDKs would not see the next event.
        if self.kind == FramingKind::Sse && self.last_released == Some(b'\r') && self.held.first() == Some(&b'\n') {
            out.push(b'\n');
        }
        out.extend(match self.kind {
            FramingKind::JsonArray => providers::json_array_block(reason, self.released_any),
            kind => providers::stream_block(self.state.provider, kind, reason),
        });
        Bytes::from(out)
    }

    async fn finish_audit(&mut self) {
        let outcome = std::mem::take(&mut self.outcome);
        let metrics = &self.metrics;
        metrics.guardrail_seconds.observe(self.started.elapsed().as_secs_f64());
        let rules: Vec<String> = if outcome.rules.is_empty() { vec![String::new()] } else { outcome.rules.clone() };
        for rule in rules {
            metrics
                .decisions
                .get_or_create(&DecisionLabels {
                    provider: self.state.provider.as_str(),
                    direction: "response",
                    action: outcome.decision(),
                    rule,
                })
                .inc();
        }
        self.audit
            .record(AuditEvent {
                time: audit::now(),
                event: "guardrail_decision",
                request_id: self.state.request_id.clone(),
                direction: "response",
                decision: outcome.decision(),
                provider: self.state.provider.as_str(),
                host: self.exchange_host.clone(),
                path: redact_path(&self.state.call.path),
                method: self.state.call.method.clone(),
                model: self.state.model.clone(),
                rules: outcome.rules.clone(),
                detectors: outcome.detectors.clone(),
                reasons: outcome
                    .block
                    .iter()
                    .map(|b| b.reason.clone())
                    .chain(outcome.reasons.iter().cloned())
                    .collect(),
                backends: outcome.backends.clone(),
                latency_ms: self.started.elapsed().as_secs_f64() * 1e3,
                client: self.client.clone(),
                orig_dst: self.orig_dst.clone(),
                workload: self.workload.clone(),
                prompt: None,
                websocket: None,
            })
            .await;
        self.outcome = outcome;
    }
}

/// The last `n` characters of `s`.
fn tail_chars(s: &str, n: usize) -> &str {
    if n == 0 {
        return "";
    }
    match s.char_indices().rev().nth(n - 1) {
        Some((i, _)) => &s[i..],
        None => s,
    }
}

#[async_trait::async_trait]
impl BodyInspector for StreamGuard {
    async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction {
        let end = self.parse(&chunk);
        let window = self.g.cfg.stream_window.max(1);
        if !self.enforce() {
            if self.pending.len() >= window || end {
                let _ = self.check_window().await;
            }
            self.held_events.clear();
            self.released_any = true;
            return ChunkAction::Forward(chunk);
        }
        self.held.extend_from_slice(&chunk);
        if let Some(block) = &self.outcome.block {
            let reason = block.reason.clone();
            self.finish_audit().await;
            return ChunkAction::End(self.block_bytes(&reason));
        }
        if self.framing_broken {
            // Unreachable in enforce mode (a broken stream is cut above);
            // kept so nothing is ever held back for good.
            return ChunkAction::Forward(self.release(true));
        }
        if self.pending.len() >= window || end {
            if let Some(reason) = self.check_window().await {
                self.finish_audit().await;
                return ChunkAction::End(self.block_bytes(&reason));
            }
            return ChunkAction::Forward(self.release(false));
        }
        ChunkAction::Forward(Bytes::new())
    }

    async fn on_end(&mut self) -> Bytes {
        self.check_finished();
        let blocked = self.check_window().await;
        self.finish_audit().await;
        match blocked {
            Some(reason) if self.enforce() => self.block_bytes(&reason),
            _ => self.release(true),
        }
    }

    /// The text seen so far is still checked, and the audit event says the
    /// stream was cut short.
    async fn on_abort(&mut self, reason: &str) {
        let _ = self.check_window().await;
        self.outcome.error = true;
        self.outcome.reasons.push(format!("stream cut short: {reason}"));
        self.finish_audit().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_chars_counts_characters_not_bytes() {
        assert_eq!(tail_chars("héllo", 3), "llo");
        assert_eq!(tail_chars("hé", 5), "hé");
        assert_eq!(tail_chars("abc", 0), "");
    }

    #[test]
    fn akto_payload_prefers_messages() {
        let doc = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(akto_payload(Some(&doc), b""), r#"{"messages":[{"role":"user","content":"hi"}]}"#);
        assert_eq!(akto_payload(None, b"plain"), r#"{"raw":"plain"}"#);
    }

    #[test]
    fn sigv4_is_recognized() {
        let mut h = http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("AWS4-HMAC-SHA256 Credential=x"));
        assert!(is_sigv4(&h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(!is_sigv4(&h));
    }

    #[test]
    fn request_ids_are_reused_or_made() {
        let mut h = http::HeaderMap::new();
        assert_eq!(request_id(&h).len(), 32);
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
    }
}
