//! The request phase: the body decoded (content coding, charset, limits),
//! parsed by its provider's parser (plus the strings no parser reads),
//! checked by the backends, and then forwarded, rewritten or refused.

use std::{
    sync::Arc,
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use serde_json::Value;

use super::{
    Guardrails, Pipeline,
    backends::Subject,
    mcp, new_call,
    outcome::{Block, Outcome},
    quick, recorded_model,
};
use crate::{
    config::{SigV4Action, UndecodableAction},
    guardrails::{
        backend::{Call, Phase, current_body},
        budgets,
        decode::{DecodeError, DecodedText, decode_body_bounded, decode_charset},
        keys::{self, Brokered, Swap, Verdict},
        model::{Direction, NormalizedRequest, Provider, Role, Stage, TextKind, TextSpan},
        providers,
    },
    proxy::hook::{Exchange, RequestAction},
    respond::{self, Problem},
};

/// Checks a request; the exchange's [`Call`] is made here, once, and kept
/// for the response phases.
pub(super) async fn on_request(
    p: &Pipeline,
    ex: &Exchange,
    head: &mut http::request::Parts,
    body: &Bytes,
) -> (RequestAction, Call) {
    let g = p.snapshot();
    let started = Instant::now();
    let mut call = new_call(p, &g, ex, head, body.clone());
    if p.mcp.settings.classify(&ex.sni, head, body) {
        call.provider = Provider::Mcp;
        call.mcp_session = mcp::session_of(head);
    }
    // Responses are inspected as they stream: ask for them uncompressed.
    head.headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    // Keys are judged before the checks (a refused request is not checked)
    // and swapped after them, so no backend ever sees a real key. A SigV4
    // request is signed again last, over the body as it leaves.
    let brokered = match g.keys.as_deref().map(|b| b.decide(&ex.sni, ex.workload.as_ref(), head)) {
        None | Some(Verdict::Untouched) => Brokered::default(),
        Some(Verdict::Replace(brokered)) => brokered,
        Some(Verdict::Refuse(reason)) => {
            return (RequestAction::Respond(p.refuse_key(&g, &call, reason, started).await), call);
        }
    };
    // Budgets next: a refused request is neither checked nor forwarded.
    match admit(p, &g, ex, &mut call, started).await {
        Ok(ticket) => call.budget = ticket,
        Err(refused) => return (RequestAction::Respond(refused), call),
    }
    let resigned = brokered.resign.is_some();
    let action = p.inspect_request(&g, &mut call, head, body, started, resigned).await;
    if matches!(action, RequestAction::Respond(_)) {
        return (action, call);
    }
    keys::apply(head, &brokered.swaps);
    if let Some(resign) = &brokered.resign {
        let sent = match &action {
            RequestAction::ReplaceBody(new) => new,
            _ => body,
        };
        if let Err(error) = resign.apply(head, sent, SystemTime::now()) {
            let reason = format!("cannot sign the request with the brokered AWS credentials: {error}");
            return (RequestAction::Respond(p.refuse_key(&g, &call, reason, started).await), call);
        }
        tracing::debug!(rule = keys::RULE, "signed again with the brokered AWS credentials");
    }
    (action, call)
}

/// Key brokering for a request that has no request phase of its own (a
/// WebSocket upgrade, a body over the inspection limit): the swaps to make once the request is let through,
/// or the refusal (audited) to answer. A SigV4 placeholder is refused
/// there: the signature covers a body that is not at hand.
pub(super) async fn broker_keys(
    p: &Pipeline,
    ex: &Exchange,
    head: &http::request::Parts,
) -> Result<Vec<Swap>, http::Response<http_body_util::Full<Bytes>>> {
    let g = p.snapshot();
    let reason = match g.keys.as_deref().map(|b| b.decide(&ex.sni, ex.workload.as_ref(), head)) {
        None | Some(Verdict::Untouched) => return Ok(Vec::new()),
        Some(Verdict::Replace(Brokered { swaps, resign: None })) => return Ok(swaps),
        Some(Verdict::Replace(Brokered { resign: Some(_), .. })) => {
            "an AWS SigV4 request whose body is not inspected (over the inspection limit, or an upgrade) \
             cannot be signed again with brokered credentials"
                .to_owned()
        }
        Some(Verdict::Refuse(reason)) => reason,
    };
    let call = new_call(p, &g, ex, head, Bytes::new());
    Err(p.refuse_key(&g, &call, reason, Instant::now()).await)
}

/// The budgets' admission of a request: what it holds while in flight
/// (`None` when no budget covers it), or the refusal (audited) to answer.
async fn admit(
    p: &Pipeline,
    g: &Guardrails,
    ex: &Exchange,
    call: &mut Call,
    started: Instant,
) -> Result<Option<Arc<budgets::Ticket>>, http::Response<http_body_util::Full<Bytes>>> {
    let Some(budgets) = &p.budgets else { return Ok(None) };
    match budgets.admit(ex.workload.as_ref()).await {
        Ok(ticket) if ticket.is_empty() => Ok(None),
        Ok(ticket) => Ok(Some(Arc::new(ticket))),
        Err(refusal) => Err(p.refuse_budget(g, call, refusal, started).await),
    }
}

/// Budgets for a request that has no request phase of its own (a WebSocket
/// upgrade, a body over the inspection limit): it counts as a request and
/// is refused over a spent budget, but its answer is not charged and it
/// holds no `concurrent` slot past this call.
pub(super) async fn admit_unphased(
    p: &Pipeline,
    ex: &Exchange,
    head: &http::request::Parts,
) -> Result<(), http::Response<http_body_util::Full<Bytes>>> {
    if p.budgets.is_none() {
        return Ok(());
    }
    let g = p.snapshot();
    let mut call = new_call(p, &g, ex, head, Bytes::new());
    admit(p, &g, ex, &mut call, Instant::now()).await.map(drop)
}

/// A request body parsed: the JSON (if it is), and every text in it.
struct Parsed {
    doc: Option<Value>,
    texts: Vec<TextSpan>,
    /// `texts[read_by_parser..]` are strings the provider parser did not read.
    read_by_parser: usize,
}

impl Pipeline {
    async fn inspect_request(
        &self,
        g: &Guardrails,
        call: &mut Call,
        head: &mut http::request::Parts,
        body: &Bytes,
        started: Instant,
        resigned: bool,
    ) -> RequestAction {
        let encoding = head.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
        let (max_decoded, max_ratio) = (g.cfg.max_decoded_body, g.cfg.max_decompression_ratio);
        let decoded = match decode_body_bounded(encoding, body, max_decoded, max_ratio) {
            Ok(d) => d,
            Err(error) if error.is_oversize() => {
                let mut outcome = Outcome::default();
                let reason = format!("not inspected: too large ({error})");
                let blocked = outcome.oversize(g.cfg.oversize, Problem::RequestTooLarge, reason);
                self.audit(g, call, Direction::Request, &outcome, started, None).await;
                return blocked.map_or(RequestAction::Forward, RequestAction::Respond);
            }
            Err(error) => return self.undecodable(g, call, started, &error).await,
        };
        let content_type = head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = match decode_charset(content_type.as_deref(), &decoded) {
            Ok(text) => text,
            Err(error) => return self.undecodable(g, call, started, &error).await,
        };
        if call.provider == Provider::Mcp
            && let Some(action) = self.mcp_request(g, call, head, &text.text, started).await
        {
            return action;
        }
        if let Some(clean) = quick::clean(g, call, Direction::Request, &text.text) {
            // The walk found nothing in the body's model; the path's is
            // checked on its own.
            call.model = match clean.model {
                Some(model) => Some(model),
                None => recorded_model(g, call, providers::model_from_path(&call.path)),
            };
            self.audit(g, call, Direction::Request, &clean.outcome, started, None).await;
            return RequestAction::Forward;
        }
        let parsed = parse(call, &decoded, &text);
        let model = call.model.take();
        call.model = recorded_model(g, call, model);
        let texts = Arc::new(parsed.texts);
        let mut subject = Subject {
            texts: &texts,
            read_by_parser: parsed.read_by_parser,
            original: &decoded,
            doc: parsed.doc,
            raw_text: None,
            raw_rewritable: text.from.is_none(),
            instructions: true,
            response: None,
            wait: true,
            resends_request: false,
        };
        let mut outcome = Outcome::default();
        self.run_backends(g, Phase::Request, call, &mut subject, &mut outcome).await;
        if !resigned {
            sigv4(g, head, &mut outcome);
        }
        if subject.resends_request {
            // Response checks resend the request the provider got, modified
            // or not (decoded), as the addon does.
            let raw = subject.raw_text.as_deref();
            call.request_body = current_body(subject.doc.as_ref(), raw, &decoded, outcome.modified);
        }

        let prompt = g.cfg.audit_prompts.then(|| texts.iter().map(|t| t.text.as_str()).collect::<Vec<_>>().join("\n"));
        self.audit(g, call, Direction::Request, &outcome, started, prompt).await;
        if let Some(block) = outcome.block {
            report_block(g, call, &subject, &block, outcome.modified);
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
            let doc = subject.doc.as_ref();
            return RequestAction::ReplaceBody(current_body(doc, subject.raw_text.as_deref(), &decoded, true));
        }
        RequestAction::Forward
    }

    /// A credential key brokering refuses: audited (rule `key_brokering`,
    /// the reason holds no key) and answered with the block contract.
    async fn refuse_key(
        &self,
        g: &Guardrails,
        call: &Call,
        reason: String,
        started: Instant,
    ) -> http::Response<http_body_util::Full<Bytes>> {
        tracing::warn!(rule = keys::RULE, %reason, "request refused by key brokering");
        let mut outcome = Outcome::default();
        outcome.stages.push(Stage::Keys);
        outcome.note_rule(keys::RULE);
        let status = StatusCode::FORBIDDEN;
        outcome.block = Some(Block { status, reason: reason.clone(), stage: Stage::Keys, rule: keys::RULE.into() });
        self.audit(g, call, Direction::Request, &outcome, started, None).await;
        respond::blocked(status, &reason)
    }

    /// A request over a budget: audited (rule `budget`, the budget in the
    /// event's `budget`), counted, and answered `429` in the provider's
    /// error shape with `retry-after`.
    async fn refuse_budget(
        &self,
        g: &Guardrails,
        call: &mut Call,
        refusal: budgets::Refusal,
        started: Instant,
    ) -> http::Response<http_body_util::Full<Bytes>> {
        let reason = refusal.message();
        tracing::warn!(rule = budgets::RULE, budget = %refusal.name, %reason, "request refused by a budget");
        call.model = recorded_model(g, call, providers::model_from_path(&call.path));
        let mut outcome = Outcome::default();
        outcome.stages.push(Stage::Budget);
        outcome.note_rule(budgets::RULE);
        let status = StatusCode::TOO_MANY_REQUESTS;
        outcome.block =
            Some(Block { status, reason: reason.clone(), stage: Stage::Budget, rule: budgets::RULE.into() });
        let shape = budgets::Refusal::shape(call.provider);
        let retry_after = refusal.retry_after_secs;
        self.audit_budget_refusal(g, call, &outcome, started, refusal).await;
        respond::rate_limited(shape, &reason, retry_after)
    }

    /// A request body that cannot be decoded for inspection (unknown or
    /// corrupt content coding, unknown charset): `415` in the block shape
    /// whatever `fail_mode_request` says, since the client chose the
    /// encoding; with `undecodable = "pass"`, forwarded uninspected and
    /// audited as such.
    async fn undecodable(&self, g: &Guardrails, call: &Call, started: Instant, error: &DecodeError) -> RequestAction {
        let mut outcome = Outcome::default();
        outcome.stages.push(Stage::Decode);
        outcome.note_rule("undecodable");
        let why = error.to_string();
        let action = match g.cfg.undecodable {
            UndecodableAction::Block => {
                let reason = format!("request body cannot be decoded for inspection: {why}");
                outcome.block = Some(Block {
                    status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    reason: reason.clone(),
                    stage: Stage::Decode,
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
        self.audit(g, call, Direction::Request, &outcome, started, None).await;
        action
    }
}

/// Parses a decoded body with its provider's parser (the provider found
/// from the body when the host and path did not say), adds the strings the
/// parser did not read (at their own paths, so they can be redacted in
/// place; see `unread_texts`), and notes the model in `call`.
fn parse(call: &mut Call, decoded: &[u8], text: &DecodedText<'_>) -> Parsed {
    let doc: Option<Value> = serde_json::from_slice(&text.text).ok();
    if call.provider == Provider::Generic
        && let Some(p) = doc.as_ref().and_then(providers::detect_from_body)
    {
        call.provider = p;
    }
    let mut normalized = match &doc {
        Some(d) => providers::parse_request(call.provider, d),
        None if decoded.is_empty() => NormalizedRequest::default(),
        None => {
            let raw_span =
                |text: String| TextSpan { path: Vec::new(), role: Role::Unknown, kind: TextKind::Other, text };
            let mut texts = vec![raw_span(String::from_utf8_lossy(&text.text).into_owned())];
            if text.from.is_some() {
                // Not JSON in the detected charset: the bytes as UTF-8 too,
                // in case the receiver reads them that way.
                texts.push(raw_span(String::from_utf8_lossy(decoded).into_owned()));
            }
            NormalizedRequest { model: None, stream: false, texts }
        }
    };
    let read_by_parser = normalized.texts.len();
    if let Some(d) = &doc {
        let unread = providers::unread_texts(d, &normalized.texts);
        normalized.texts.extend(unread);
    }
    call.model = normalized.model.take().or_else(|| providers::model_from_path(&call.path));
    Parsed { doc, texts: normalized.texts, read_by_parser }
}

/// A modification of a body signed with AWS SigV4 would be rejected
/// upstream (the body hash is signed): blocked or skipped, per `sigv4`.
/// Not called when key brokering signs the request again (the new
/// signature covers the rewritten body).
fn sigv4(g: &Guardrails, head: &http::request::Parts, outcome: &mut Outcome) {
    if outcome.block.is_some() || !outcome.modified || !is_sigv4(&head.headers) {
        return;
    }
    match g.cfg.sigv4 {
        SigV4Action::Block => {
            outcome.block = Some(Block {
                status: StatusCode::FORBIDDEN,
                reason: "request must be modified by a guardrail but is signed with AWS SigV4; blocked instead".into(),
                stage: Stage::Local,
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

fn is_sigv4(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("AWS4-HMAC-SHA256"))
}

/// A block by one backend is reported to the others that keep records
/// (the local engine's blocks to Akto, as security events).
fn report_block(g: &Guardrails, call: &Call, subject: &Subject<'_>, block: &Block, modified: bool) {
    let check = subject.check(Phase::Request, call, modified);
    for backend in g.present() {
        if backend.stage() != block.stage {
            backend.report_block(&check, block.stage, &block.rule, &block.reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigv4_is_recognized() {
        let mut h = http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("AWS4-HMAC-SHA256 Credential=x"));
        assert!(is_sigv4(&h));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(!is_sigv4(&h));
    }
}
