//! The response phases of an MCP exchange: a JSON answer, collected whole,
//! or an SSE stream of JSON-RPC messages (a POST's answer, the GET stream,
//! the old HTTP+SSE transport), checked event by event as each arrives (an
//! event is held only until its own check is done, whatever
//! `stream_mode` says).
//!
//! Each answer is checked by the method of its request (found in the
//! session table, else by its shape): tool results, resources, prompts and
//! tool lists. A refused answer is replaced by a JSON-RPC error for its id;
//! a redacted one is rewritten in place. A `tools/list` answer is compared
//! with the tool pins (a changed definition is alerted, or refused with
//! `mcp.tool_changes = "block"`) and loses the tools a tool list denies.
//! A request the server sends (`sampling/createMessage`,
//! `elicitation/create`) is checked as a request; refused, its event is
//! dropped from the stream (a JSON answer holding it gets the `403`
//! contract). Every answered tool call is one `mcp_tool_call` event.
//!
//! A stream that cannot be read is never relayed unseen: one the server
//! compressed although asked not to, or with an event over 16 MiB, is cut
//! there, and the cut audited as a block.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, header};
use serde_json::Value;

use super::{
    info, refusal, session_in_query,
    sessions::{Pending, SessionKey},
    stronger, with_unread,
};
use crate::{
    audit::{EventKind, McpInfo},
    config::mcp::ToolChangeAction,
    guardrails::{
        backend::{Call, Phase},
        engine::{Action, WorkloadRef},
        mcp::{self, McpStream, Message, Payload, StreamItem},
        model::{Decision, Direction, PathSeg, Role, Stage, TextKind, TextSpan},
        pipeline::{
            Guardrails, Pipeline,
            outcome::{Block, Outcome},
        },
        providers::{value_at, value_at_mut},
    },
    proxy::hook::{BodyAction, BodyInspector, ChunkAction, ResponseAction},
    respond,
};

/// Maximum size of one SSE event of an MCP stream.
const MAX_EVENT: usize = 16 << 20;

/// The rule of a changed tool definition.
pub const TOOL_CHANGED_RULE: &str = "tool_definition_changed";

/// How an MCP answer is inspected: an SSE stream event by event, JSON (or
/// an empty answer) whole; anything else is forwarded.
pub(in crate::guardrails::pipeline) fn on_response(
    p: &Pipeline,
    g: Arc<Guardrails>,
    call: Arc<Call>,
    head: &http::response::Parts,
) -> ResponseAction {
    let content_type = head.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    // We asked for identity: a server that compresses its stream anyway
    // cannot have it read event by event.
    let compressed = head
        .headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .filter(|e| !e.trim().eq_ignore_ascii_case("identity"))
        .map(str::to_owned);
    match media.as_str() {
        "text/event-stream" => ResponseAction::Inspect(Box::new(McpGuard {
            p: p.clone(),
            g,
            call,
            stream: McpStream::new(MAX_EVENT),
            status: head.status,
            headers: head.headers.clone(),
            compressed,
        })),
        "" => ResponseAction::Collect,
        m if m.contains("json") => ResponseAction::Collect,
        _ => ResponseAction::Forward,
    }
}

/// What the check of one server document (a JSON answer, or one SSE
/// event's data) left.
struct Checked {
    doc: Value,
    outcome: Outcome,
    /// `doc` differs from what the server sent.
    changed: bool,
    /// A request of the server's was refused: the document must not reach
    /// the client.
    refused_request: bool,
    /// Whether it held an answer or a request (not only notifications).
    answers: bool,
}

impl Pipeline {
    /// Checks a whole MCP answer (decoded); `None` when it holds no
    /// JSON-RPC message, to be checked as any other body.
    pub(in crate::guardrails::pipeline) async fn mcp_body(
        &self,
        g: &Guardrails,
        call: &Call,
        head: &http::response::Parts,
        decoded: &[u8],
        started: Instant,
    ) -> Option<BodyAction> {
        let doc: Value = serde_json::from_slice(decoded).ok()?;
        let messages = mcp::parse_messages(&doc).ok()?;
        let checked = self.check_server_doc(g, call, head.status, &head.headers, doc, &messages).await;
        let event_info = McpInfo { method: answered_method(&messages), ..info(call, &messages, None) };
        let outcome = &checked.outcome;
        self.audit_as(
            g,
            call,
            EventKind::GuardrailDecision,
            Direction::Response,
            outcome,
            started,
            None,
            Some(event_info),
        )
        .await;
        if checked.refused_request {
            let block = outcome.block.as_ref().map_or("refused by guardrails", |b| b.reason.as_str());
            return Some(BodyAction::Respond(respond::blocked(StatusCode::FORBIDDEN, block)));
        }
        if checked.changed {
            return Some(BodyAction::ReplaceBody(checked.doc.to_string().into()));
        }
        Some(BodyAction::Forward)
    }

    /// Checks the messages of one server document in place: see the module
    /// documentation.
    async fn check_server_doc(
        &self,
        g: &Guardrails,
        call: &Call,
        status: StatusCode,
        headers: &HeaderMap,
        doc: Value,
        messages: &[(Vec<PathSeg>, Message)],
    ) -> Checked {
        let key = SessionKey { server: call.host.clone(), session: call.mcp_session.clone().unwrap_or_default() };
        let mut doc = Some(doc);
        let mut overall = Outcome::default();
        let (mut changed, mut refused_request, mut answers) = (false, false, false);
        for (prefix, msg) in messages {
            match msg {
                Message::Response { id, result } => {
                    answers = true;
                    let pending = self.mcp.sessions.answer(&key, &id.to_string());
                    let method = pending.as_ref().map_or("", |p| p.method.as_str());
                    let mut outcome = Outcome::default();
                    let lists_tools = method == "tools/list"
                        || (method.is_empty() && result.get("tools").is_some_and(Value::is_array));
                    if lists_tools && let Some(d) = doc.as_mut() {
                        outcome = self.tool_list(g, call, d, prefix).await;
                    }
                    if outcome.block.is_none() {
                        let at = [prefix.as_slice(), &[PathSeg::Key("result".into())]].concat();
                        let texts = doc
                            .as_ref()
                            .and_then(|d| value_at(d, &at))
                            .map(|r| mcp::result_texts(method, r, prefix))
                            .unwrap_or_default();
                        let texts = with_unread(doc.as_ref(), prefix, texts);
                        let response = Some((status, headers));
                        outcome.absorb(self.check_texts(g, Phase::Response, call, &mut doc, texts, response).await);
                    }
                    if let Some(block) = &outcome.block
                        && let Some(d) = doc.as_mut()
                    {
                        let error = refusal(id, &block.reason, &block.rule);
                        match value_at_mut(d, prefix) {
                            Some(slot) => *slot = error,
                            None => *d = error,
                        }
                    }
                    changed |= outcome.modified || outcome.block.is_some();
                    if let Some(pending) = pending
                        && pending.tool.is_some()
                    {
                        self.tool_answered(g, call, pending, &outcome).await;
                    }
                    overall.absorb(outcome);
                }
                Message::Error { id, .. } => {
                    answers = true;
                    if let Some(pending) = self.mcp.sessions.answer(&key, &id.to_string())
                        && pending.tool.is_some()
                    {
                        let mut outcome = Outcome::default();
                        outcome.reasons.push("the server answered with an error".into());
                        self.tool_answered(g, call, pending, &outcome).await;
                    }
                }
                Message::Request { .. } | Message::Notification { .. } => {
                    answers |= matches!(msg, Message::Request { .. });
                    let texts = with_unread(doc.as_ref(), prefix, mcp::request_texts(msg, prefix));
                    let outcome = self.check_texts(g, Phase::Request, call, &mut doc, texts, None).await;
                    refused_request |= outcome.block.is_some();
                    changed |= outcome.modified;
                    overall.absorb(outcome);
                }
            }
        }
        Checked { doc: doc.unwrap_or(Value::Null), outcome: overall, changed, refused_request, answers }
    }

    /// A tool call's answer checked: its `mcp_tool_call` event, with the
    /// stronger of its request's and its answer's decisions.
    async fn tool_answered(&self, g: &Guardrails, call: &Call, pending: Pending, answer: &Outcome) {
        let mut both = answer.clone();
        match stronger(pending.decision, answer.decision()) {
            Decision::Modify => both.modified = true,
            Decision::Alert => both.alert = true,
            Decision::Error => both.error = true,
            Decision::Allow | Decision::Block => {}
        }
        for rule in pending.rules.iter().rev() {
            if !both.rules.contains(rule) {
                both.rules.insert(0, rule.clone());
            }
        }
        let event_info = McpInfo {
            server: call.host.clone(),
            session: call.mcp_session.clone(),
            method: pending.method.clone(),
            tool: pending.tool.clone(),
            arguments: pending.arguments.clone(),
        };
        self.tool_call_done(g, call, Direction::Response, &both, pending.started, event_info).await;
    }

    /// A `tools/list` answer: compared with the tool pins, then stripped of
    /// the tools a tool list denies (block lists; alert lists are
    /// recorded).
    async fn tool_list(&self, g: &Guardrails, call: &Call, doc: &mut Value, prefix: &[PathSeg]) -> Outcome {
        let mut outcome = Outcome::default();
        let at = [prefix, &[PathSeg::Key("result".into())]].concat();
        let Some(result) = value_at(doc, &at) else { return outcome };
        let definitions = mcp::tools::definitions(result);
        let tools: Vec<(&str, [u8; 32])> = definitions.iter().map(|d| (d.name.as_str(), d.hash)).collect();
        let accept = self.mcp.settings.tool_changes == ToolChangeAction::Alert;
        let pins = self.mcp.pins.check(&call.host, &call.workload_key, &tools, accept);
        if !pins.added.is_empty() || (accept && !pins.changed.is_empty()) {
            self.save_pins().await;
        }
        if !pins.changed.is_empty() {
            self.metrics.mcp_tool_changes(&call.host, pins.changed.len() as u64);
            outcome.stages.push(Stage::Local);
            outcome.note_rule(TOOL_CHANGED_RULE);
            let reason = format!("tool definitions changed since first seen: {}", pins.changed.join(", "));
            if !accept {
                outcome.block = Some(Block {
                    status: StatusCode::FORBIDDEN,
                    reason,
                    stage: Stage::Local,
                    rule: TOOL_CHANGED_RULE.into(),
                });
                return outcome;
            }
            outcome.alert = true;
            outcome.reasons.push(reason);
        }
        let Some(engine) = g.engine.as_ref().filter(|e| e.has_tool_lists()) else { return outcome };
        let workload = call.workload.as_ref().map(WorkloadRef::of);
        let at = [at.as_slice(), &[PathSeg::Key("tools".into())]].concat();
        let Some(Value::Array(listed)) = value_at_mut(doc, &at) else { return outcome };
        let mut hidden = Vec::new();
        let mut alerted = Vec::new();
        listed.retain(|tool| {
            let Some(name) = tool.get("name").and_then(Value::as_str) else { return true };
            match engine.tool_denial(&call.host, workload.as_ref(), name) {
                Some(d) if d.action == Action::Block => {
                    hidden.push((name.to_owned(), d.list.to_owned()));
                    false
                }
                Some(d) => {
                    alerted.push((name.to_owned(), d.list.to_owned()));
                    true
                }
                None => true,
            }
        });
        for (tool, list) in hidden.iter().chain(&alerted) {
            if !outcome.stages.contains(&Stage::Local) {
                outcome.stages.push(Stage::Local);
            }
            outcome.note_rule(list);
            let what = if hidden.iter().any(|(t, _)| t == tool) { "hidden" } else { "listed, flagged" };
            outcome.reasons.push(format!("tool {tool:?} {what} by tool list {list}"));
        }
        outcome.modified |= !hidden.is_empty();
        outcome.alert |= !alerted.is_empty();
        outcome
    }

    /// Writes the tool pins to their file, off the runtime's threads; a
    /// failure is logged (the pins stay in memory).
    async fn save_pins(&self) {
        let state = Arc::clone(&self.mcp);
        match tokio::task::spawn_blocking(move || state.pins.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %error, "cannot save the MCP tool pins"),
            Err(error) => tracing::warn!(error = %error, "cannot save the MCP tool pins"),
        }
    }
}

/// The method an answer document is about: its first answered request's
/// (as the session table knew it, now taken) is not available here, so the
/// first message's method, if any.
fn answered_method(messages: &[(Vec<PathSeg>, Message)]) -> String {
    messages.iter().find_map(|(_, m)| m.method()).unwrap_or_default().to_owned()
}

/// An MCP SSE stream, checked event by event.
struct McpGuard {
    p: Pipeline,
    g: Arc<Guardrails>,
    call: Arc<Call>,
    stream: McpStream,
    status: StatusCode,
    headers: HeaderMap,
    /// The stream's content coding, when it has one: the stream is cut
    /// before its first byte, since it cannot be read event by event.
    compressed: Option<String>,
}

impl McpGuard {
    /// Checks one event and appends what the client gets of it to `out`.
    async fn item(&mut self, item: StreamItem, out: &mut Vec<u8>) {
        let started = Instant::now();
        let (p, g, call) = (&self.p, &*self.g, &*self.call);
        match &item.payload {
            Payload::Messages { doc, messages } => {
                let checked = p.check_server_doc(g, call, self.status, &self.headers, doc.clone(), messages).await;
                if checked.answers || checked.outcome.decision() != Decision::Allow {
                    let event_info = McpInfo { method: answered_method(messages), ..info(call, messages, None) };
                    let outcome = &checked.outcome;
                    p.audit_as(
                        g,
                        call,
                        EventKind::GuardrailDecision,
                        Direction::Response,
                        outcome,
                        started,
                        None,
                        Some(event_info),
                    )
                    .await;
                }
                if checked.refused_request {
                    return;
                }
                if checked.changed {
                    out.extend(item.encode_doc(&checked.doc));
                } else {
                    out.extend_from_slice(&item.raw);
                }
            }
            Payload::Unrecognized => {
                // Not JSON-RPC: its text is checked as it is.
                let text =
                    TextSpan { path: Vec::new(), role: Role::Unknown, kind: TextKind::Other, text: item.data.clone() };
                let response = Some((self.status, &self.headers));
                let outcome = p.check_texts(g, Phase::Response, call, &mut None, vec![text], response).await;
                let refused = outcome.block.is_some();
                if outcome.decision() != Decision::Allow {
                    let event_info = info(call, &[], None);
                    p.audit_as(
                        g,
                        call,
                        EventKind::GuardrailDecision,
                        Direction::Response,
                        &outcome,
                        started,
                        None,
                        Some(event_info),
                    )
                    .await;
                }
                if !refused {
                    out.extend_from_slice(&item.raw);
                }
            }
            Payload::Endpoint(url) => {
                // The old transport names its session here: the answers that
                // follow on this stream belong to the POSTs made to it.
                if let Some(session) = url.split_once('?').and_then(|(_, query)| session_in_query(query)) {
                    self.call = Arc::new(Call { mcp_session: Some(session), ..(*self.call).clone() });
                }
                out.extend_from_slice(&item.raw);
            }
            Payload::Empty => out.extend_from_slice(&item.raw),
        }
    }

    /// A stream that cannot be read (compressed, or an event over
    /// [`MAX_EVENT`]): it ends there, recorded as a block.
    async fn unreadable(&mut self, why: &str) {
        let mut outcome = Outcome::default();
        outcome.stages.push(Stage::Framing);
        outcome.error = true;
        outcome.block = Some(Block {
            status: StatusCode::BAD_GATEWAY,
            reason: format!("MCP stream cut: {why}"),
            stage: Stage::Framing,
            rule: "framing".into(),
        });
        let (g, call) = (&*self.g, &*self.call);
        let event_info = info(call, &[], None);
        self.p
            .audit_as(
                g,
                call,
                EventKind::GuardrailDecision,
                Direction::Response,
                &outcome,
                Instant::now(),
                None,
                Some(event_info),
            )
            .await;
    }
}

#[async_trait::async_trait]
impl BodyInspector for McpGuard {
    async fn on_chunk(&mut self, chunk: Bytes) -> ChunkAction {
        if let Some(encoding) = self.compressed.take() {
            self.unreadable(&format!("the event stream is compressed ({encoding}) and cannot be inspected")).await;
            return ChunkAction::End(Bytes::new());
        }
        match self.stream.feed(&chunk) {
            Ok(items) => {
                let mut out = Vec::new();
                for item in items {
                    self.item(item, &mut out).await;
                }
                ChunkAction::Forward(out.into())
            }
            Err(error) => {
                self.unreadable(&error.to_string()).await;
                ChunkAction::End(Bytes::new())
            }
        }
    }

    async fn on_end(&mut self) -> Bytes {
        let finished = self.stream.finish();
        let mut out = Vec::new();
        if let Some(item) = finished.item {
            self.item(item, &mut out).await;
        }
        out.extend_from_slice(&finished.rest);
        out.into()
    }
}
