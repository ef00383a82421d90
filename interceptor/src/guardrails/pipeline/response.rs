//! The response phases: what to do with a response head (collect the whole
//! body, stream it through the [`StreamGuard`], or forward it), and the
//! check of a whole response body.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::header;
use serde_json::Value;

use super::{
    Guardrails, Pipeline, backends::Subject, outcome::Outcome, quick, scrub_facts, stream::StreamGuard, trace,
};
use crate::{
    guardrails::{
        backend::{Call, Phase, current_body},
        decode::decode_body_bounded,
        genai::ResponseFacts,
        model::{Direction, Provider, Role, Stage, TextKind, TextSpan},
        providers, usage,
    },
    proxy::hook::{BodyAction, ResponseAction},
    respond::{self, Problem},
};

/// Chooses how a response is inspected. Error answers too (a `429`, a
/// `400` that echoes the prompt): Akto's addon sends them to its response
/// check, which is how Akto records them.
pub(super) fn on_response(
    p: &Pipeline,
    call: Arc<Call>,
    request: &http::request::Parts,
    head: &http::response::Parts,
) -> ResponseAction {
    let g = p.snapshot();
    if g.engine.is_none() && g.akto.is_none() {
        return ResponseAction::Forward;
    }
    if call.provider == Provider::Mcp {
        // Compressed JSON is collected and decoded whole like any other.
        return super::mcp::on_response(p, g, call, head);
    }
    let content_type = head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let path = request.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    if head.headers.contains_key(header::CONTENT_ENCODING) {
        // We asked for identity; a compressed stream cannot be inspected
        // incrementally, a compressed whole body can.
        if providers::response_framing(call.provider, path, content_type).is_some() {
            return ResponseAction::Forward;
        }
        return ResponseAction::Collect;
    }
    match providers::response_framing(call.provider, path, content_type) {
        Some(kind) => {
            let guard = StreamGuard::new(p, g, call, kind, head).tracked();
            // Only a successful answer's tokens are counted.
            let guard = if head.status.is_success() { guard.metered() } else { guard };
            ResponseAction::Inspect(Box::new(guard))
        }
        None if content_type.contains("json") || content_type.is_empty() => ResponseAction::Collect,
        None => ResponseAction::Forward,
    }
}

/// Checks a whole response body before anything is sent to the client.
pub(super) async fn on_body(p: &Pipeline, call: &Call, head: &http::response::Parts, body: &Bytes) -> BodyAction {
    let g = p.snapshot();
    let started = Instant::now();
    let mut outcome = Outcome::default();
    let encoding = head.headers.get(header::CONTENT_ENCODING).and_then(|v| v.to_str().ok());
    let (max_decoded, max_ratio) = (g.cfg.max_decoded_body, g.cfg.max_decompression_ratio);
    let decoded = match decode_body_bounded(encoding, body, max_decoded, max_ratio) {
        Ok(d) => d,
        Err(error) if error.is_oversize() => {
            let reason = format!("not inspected: too large ({error})");
            let blocked = outcome.oversize(g.cfg.oversize, Problem::ResponseTooLarge, reason);
            p.audit(&g, call, Direction::Response, &outcome, started, None).await;
            return blocked.map_or(BodyAction::Forward, BodyAction::Respond);
        }
        Err(error) => {
            outcome.backend_failed(Stage::Decode, &error.to_string(), g.cfg.fail_mode_response);
            p.audit(&g, call, Direction::Response, &outcome, started, None).await;
            return match outcome.block {
                Some(b) => BodyAction::Respond(respond::blocked(b.status, &b.reason)),
                None => BodyAction::Forward,
            };
        }
    };
    if call.provider == Provider::Mcp
        && let Some(action) = p.mcp_body(&g, call, head, &decoded, started).await
    {
        return action;
    }
    let success = head.status.is_success();
    let mut clean = quick::clean(&g, call, Direction::Response, &decoded);
    if call.span.is_some() {
        // A clean answer's facts are clean: the walk handed them to the
        // detectors with every other string.
        let facts = clean.as_mut().and_then(|c| c.facts.take()).or_else(|| {
            let mut facts = answer_facts(&g, call, &decoded)?;
            scrub_facts(&g, call, &mut facts);
            Some(facts)
        });
        if let Some(facts) = facts {
            trace::response(call, &facts);
        }
    }
    if let Some(clean) = clean {
        let usage = clean.usage.filter(|_| success);
        p.audit_response(&g, call, &clean.outcome, started, usage).await;
        return BodyAction::Forward;
    }
    let doc: Option<Value> = serde_json::from_slice(&decoded).ok();
    let usage = doc.as_ref().filter(|_| success).and_then(|d| usage::from_response(call.provider, d));
    let mut texts = match &doc {
        Some(d) => providers::parse_response(call.provider, d).texts,
        None => vec![TextSpan {
            path: Vec::new(),
            role: Role::Assistant,
            kind: TextKind::Other,
            text: String::from_utf8_lossy(&decoded).into_owned(),
        }],
    };
    // With the strings the parser does not read (an id, a field it does
    // not know): the client reads them all the same.
    let read_by_parser = texts.len();
    if let Some(d) = &doc {
        let unread = providers::unread_texts(d, &texts);
        texts.extend(unread);
    }
    let texts = Arc::new(texts);
    let mut subject = Subject {
        texts: &texts,
        read_by_parser,
        original: &decoded,
        doc,
        raw_text: None,
        raw_rewritable: false,
        instructions: false,
        response: Some((head.status, &head.headers)),
        wait: true,
        resends_request: false,
    };
    p.run_backends(&g, Phase::Response, call, &mut subject, &mut outcome).await;
    p.audit_response(&g, call, &outcome, started, usage).await;
    if let Some(block) = outcome.block {
        return BodyAction::Respond(respond::blocked(block.status, &block.reason));
    }
    if outcome.modified {
        let body = current_body(subject.doc.as_ref(), subject.raw_text.as_deref(), &decoded, true);
        return BodyAction::ReplaceBody(body);
    }
    BodyAction::Forward
}

/// What a traced answer says of itself, read from its whole body (its text
/// too when prompts are audited).
fn answer_facts<'a>(g: &Guardrails, call: &Call, decoded: &'a [u8]) -> Option<ResponseFacts<'a>> {
    let mut facts = ResponseFacts::of_body(decoded)?;
    if g.cfg.audit_prompts
        && let Ok(doc) = serde_json::from_slice::<Value>(decoded)
    {
        facts = facts.with_content();
        for text in providers::parse_response(call.provider, &doc).texts.iter().filter(|t| t.role == Role::Assistant) {
            facts.text(&text.text);
        }
    }
    Some(facts)
}
