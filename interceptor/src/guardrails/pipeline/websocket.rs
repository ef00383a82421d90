//! The pipeline on a WebSocket connection: which upgrades are inspected,
//! refused or tunnelled, and the [`MessageInspector`] of an inspected one.
//!
//! A client message is checked like a request, by the same backends in the
//! same order ([`Pipeline::check_request`]): blocked, it never reaches the
//! provider (the client gets the provider's error event and a 1008 close);
//! redacted, the rewritten message is sent instead. Provider text is checked
//! like a stream, with the stream guard's windows, overlap and mode: in
//! `enforce`, messages are held until the window holding their text is
//! checked, so a secret split across deltas is cut before its end reaches
//! the client. Audio is forwarded and counted, never inspected.
//!
//! Audit: one `guardrail_decision` per client message that is not simply
//! allowed, one for the provider's side (as for a stream), and a
//! `websocket_closed` summary when the connection ends.

use std::{collections::VecDeque, sync::Arc, time::Instant};

use bytes::Bytes;
use http::StatusCode;

use super::{
    Guardrails, Pipeline,
    backends::Subject,
    new_call,
    outcome::{Block, Outcome},
    recorded_model,
    stream::StreamGuard,
};
use crate::{
    audit::{EventDirection, EventKind, WebSocketStats, WorkloadInfo},
    config::{OversizeAction, UnknownWebSocket},
    guardrails::{
        backend::{Call, Phase, current_body},
        framing::FramingKind,
        model::{Decision, Direction, Stage},
        providers,
        websocket::{self as protocol, WsProtocol},
    },
    proxy::hook::{ClientAction, Exchange, MessageInspector, ServerAction, UpgradeAction, UpgradeClosed, WsData},
    respond::{self, Problem},
};

/// Decides what happens to a WebSocket upgrade.
pub(super) async fn on_upgrade(p: &Pipeline, ex: &Exchange, head: &http::request::Parts) -> UpgradeAction {
    let g = p.snapshot();
    let mut call = new_call(p, &g, ex, head, Bytes::new());
    let protocol = WsProtocol::detect(&ex.sni, &call.path);
    if let Some(protocol) = protocol {
        call.provider = protocol.provider();
    }
    let model = query_param(&call.path, "model").or_else(|| providers::model_from_path(&call.path));
    call.model = recorded_model(&g, &call, model);
    let session = Session::new(p, Arc::clone(&g), protocol, Arc::new(call));
    if protocol.is_some() {
        return UpgradeAction::Inspect(Box::new(session));
    }
    let started = Instant::now();
    let mut outcome = Outcome::default();
    outcome.stages.push(Stage::WebSocket);
    match g.cfg.unknown_websocket {
        UnknownWebSocket::Refuse => {
            let reason = "WebSocket protocol cannot be inspected on this host; use HTTPS".to_string();
            outcome.note_rule("unknown_websocket");
            outcome.block = Some(Block {
                status: StatusCode::UPGRADE_REQUIRED,
                reason: reason.clone(),
                stage: Stage::WebSocket,
                rule: "unknown_websocket".into(),
            });
            p.audit(&g, &session.call, Direction::Request, &outcome, started, None).await;
            UpgradeAction::Respond(respond::blocked(StatusCode::UPGRADE_REQUIRED, &reason))
        }
        UnknownWebSocket::Tunnel => {
            outcome.alert = true;
            outcome.note_rule("unknown_websocket");
            outcome.reasons.push("WebSocket protocol not understood: tunnelled uninspected".into());
            p.audit(&g, &session.call, Direction::Request, &outcome, started, None).await;
            UpgradeAction::Tunnel(Some(Box::new(session)))
        }
    }
}

fn query_param(path: &str, name: &str) -> Option<String> {
    let (_, query) = path.split_once('?')?;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| providers::percent_decode(v))
        .filter(|v| !v.is_empty())
}

/// One WebSocket connection under inspection (or tunnelled, for its close
/// record only).
struct Session {
    p: Pipeline,
    /// `None`: tunnelled, not understood.
    protocol: Option<WsProtocol>,
    call: Arc<Call>,
    /// The provider's side, checked like a stream.
    guard: StreamGuard,
    /// Enforce: provider messages not yet released, with the characters of
    /// text each carried, oldest first.
    held: VecDeque<(WsData, usize)>,
    /// The provider side's decision is recorded (at a block, or at the end).
    response_audited: bool,
    stats: WebSocketStats,
    started: Instant,
}

impl Session {
    fn new(p: &Pipeline, g: Arc<Guardrails>, protocol: Option<WsProtocol>, call: Arc<Call>) -> Self {
        // The guard's framer is never fed: messages arrive whole.
        let head = http::Response::new(()).into_parts().0;
        let guard = StreamGuard::new(p, g, Arc::clone(&call), FramingKind::Sse, &head);
        Self {
            p: p.clone(),
            protocol,
            call,
            guard,
            held: VecDeque::new(),
            response_audited: false,
            stats: WebSocketStats {
                protocol: protocol.map_or("unknown", WsProtocol::as_str),
                inspected: protocol.is_some(),
                ..WebSocketStats::default()
            },
            started: Instant::now(),
        }
    }

    /// Held messages to release: all, or all but those carrying the last
    /// `stream_overlap` characters (checked again with the next window, as
    /// in a stream, so a secret starting in them is never half-sent).
    fn release(&mut self, all: bool) -> Vec<WsData> {
        let keep = if all {
            0
        } else {
            let mut keep = self.held.len();
            let mut tail = 0;
            while keep > 0 && tail < self.guard.g.cfg.stream_overlap {
                keep -= 1;
                tail += self.held[keep].1;
            }
            keep
        };
        self.held.drain(..keep).map(|(m, _)| m).collect()
    }

    async fn block_server(&mut self, reason: String) -> ServerAction {
        self.held.clear();
        self.stats.blocked += 1;
        self.guard.finish_audit().await;
        self.response_audited = true;
        let reply = self.protocol.and_then(|p| protocol::error_event(p, &reason, None)).map(WsData::Text);
        ServerAction::Block { release: Vec::new(), reply, reason }
    }

    /// An audit event for a message that was not inspected or was refused
    /// for its size.
    async fn size_event(&mut self, from_client: bool, reason: &str, refused: bool) {
        let g = self.p.snapshot();
        let started = Instant::now();
        let mut outcome = Outcome::default();
        let action = if refused { OversizeAction::Block } else { OversizeAction::Pass };
        let problem = if from_client { Problem::RequestTooLarge } else { Problem::ResponseTooLarge };
        let _ = outcome.oversize(action, problem, format!("not inspected: too large ({reason})"));
        let direction = if from_client { Direction::Request } else { Direction::Response };
        self.p.audit(&g, &self.call, direction, &outcome, started, None).await;
    }
}

#[async_trait::async_trait]
impl MessageInspector for Session {
    async fn on_client_message(&mut self, message: &WsData) -> ClientAction {
        self.stats.client_messages += 1;
        let Some(proto) = self.protocol else { return ClientAction::Forward };
        let msg = protocol::client_message(proto, message.as_bytes());
        if msg.audio {
            self.stats.audio_not_inspected += 1;
        }
        if msg.texts.is_empty() {
            return ClientAction::Forward;
        }
        self.stats.messages_inspected += 1;
        let g = self.p.snapshot();
        let started = Instant::now();
        let call = Call {
            request_id: format!("{}:{}", self.call.request_id, self.stats.client_messages),
            ..(*self.call).clone()
        };
        let mut outcome = Outcome::default();
        // As for HTTP bodies, what the message parser does not read is
        // scanned too.
        let mut texts = msg.texts;
        let read_by_parser = texts.len();
        if let Some(d) = &msg.doc {
            let unread = providers::unread_texts(d, &texts);
            texts.extend(unread);
        }
        let texts = Arc::new(texts);
        let mut subject = Subject {
            texts: &texts,
            read_by_parser,
            original: message.as_bytes(),
            doc: msg.doc,
            raw_text: None,
            raw_rewritable: true,
            instructions: msg.creates_response,
            response: None,
            wait: true,
            resends_request: false,
        };
        self.p.run_backends(&g, Phase::Request, &call, &mut subject, &mut outcome).await;
        if outcome.decision() == Decision::Allow {
            self.p.record_metrics(&call.workload_key, call.provider, Direction::Request, &outcome, started);
        } else {
            let prompt = g
                .cfg
                .audit_prompts
                .then(|| texts[..read_by_parser].iter().map(|t| t.text.as_str()).collect::<Vec<_>>().join("\n"));
            self.p.audit(&g, &call, Direction::Request, &outcome, started, prompt).await;
        }
        if let Some(block) = outcome.block {
            self.stats.blocked += 1;
            let reply = protocol::error_event(proto, &block.reason, msg.event_id.as_deref()).map(WsData::Text);
            return ClientAction::Block { reply, reason: block.reason };
        }
        if outcome.modified {
            self.stats.modified += 1;
            let new = current_body(subject.doc.as_ref(), subject.raw_text.as_deref(), message.as_bytes(), true);
            return ClientAction::Replace(match (message, String::from_utf8(new.to_vec())) {
                (WsData::Text(_), Ok(text)) => WsData::Text(text),
                _ => WsData::Binary(new),
            });
        }
        ClientAction::Forward
    }

    async fn on_server_message(&mut self, message: WsData) -> ServerAction {
        self.stats.server_messages += 1;
        let Some(proto) = self.protocol else { return ServerAction::Forward(vec![message]) };
        let event = protocol::server_event(proto, message.as_bytes());
        if event.audio {
            self.stats.audio_not_inspected += 1;
        }
        let mut chars = 0;
        for (_, text) in &event.delta.texts {
            chars += text.chars().count();
            self.guard.pending.push_str(text);
        }
        if chars > 0 {
            self.stats.messages_inspected += 1;
        }
        // Its other strings (ids, …) reach the client too.
        self.guard.note_unread(message.as_bytes(), &event.delta.texts);
        let unread_block = self.guard.check_unread().await;
        let end = event.delta.end;
        let window = self.guard.g.cfg.stream_window.max(1);
        if !self.guard.enforce() {
            if self.guard.pending.len() >= window || end {
                let _ = self.guard.check_window().await;
            }
            return ServerAction::Forward(vec![message]);
        }
        if let Some(reason) = unread_block {
            return self.block_server(reason).await;
        }
        self.held.push_back((message, chars));
        if self.guard.pending.len() >= window || end {
            if let Some(reason) = self.guard.check_window().await {
                return self.block_server(reason).await;
            }
            // The end of a response releases everything: the client waits
            // for it before it asks for more.
            return ServerAction::Forward(self.release(end));
        }
        if self.guard.pending.is_empty() {
            // Nothing unchecked: only the overlap rule holds messages back.
            return ServerAction::Forward(self.release(false));
        }
        ServerAction::Forward(Vec::new())
    }

    fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    async fn flush(&mut self) -> ServerAction {
        if self.held.is_empty() && self.guard.pending.is_empty() {
            return ServerAction::Forward(Vec::new());
        }
        if let Some(reason) = self.guard.check_window().await
            && self.guard.enforce()
        {
            return self.block_server(reason).await;
        }
        ServerAction::Forward(self.release(true))
    }

    async fn on_not_inspected(&mut self, from_client: bool, reason: &str) {
        self.stats.oversize_not_inspected += 1;
        if from_client {
            self.stats.client_messages += 1;
        } else {
            self.stats.server_messages += 1;
        }
        self.size_event(from_client, reason, false).await;
    }

    async fn on_refused(&mut self, from_client: bool, reason: &str) {
        self.stats.blocked += 1;
        self.size_event(from_client, reason, true).await;
    }

    async fn on_close(&mut self, closed: &UpgradeClosed) {
        if self.protocol.is_some() && !self.response_audited {
            let _ = self.guard.check_window().await;
            self.guard.finish_audit().await;
            self.response_audited = true;
        }
        let g = self.p.snapshot();
        let mut stats = std::mem::take(&mut self.stats);
        stats.bytes_up = closed.bytes_up;
        stats.bytes_down = closed.bytes_down;
        stats.ended_by = closed.ended_by.clone();
        let mut outcome = Outcome::default();
        if stats.blocked > 0 {
            outcome.block = Some(Block {
                status: StatusCode::FORBIDDEN,
                reason: format!("{} message(s) blocked; connection closed", stats.blocked),
                stage: Stage::WebSocket,
                rule: String::new(),
            });
        }
        outcome.modified = stats.modified > 0;
        outcome.alert = !stats.inspected || stats.oversize_not_inspected > 0;
        if !stats.inspected {
            outcome.reasons.push("WebSocket tunnelled uninspected".into());
        }
        if stats.audio_not_inspected > 0 {
            outcome.reasons.push(format!("{} audio message(s) not inspected", stats.audio_not_inspected));
        }
        let workload = WorkloadInfo::of(self.call.workload.as_ref());
        let mut event = self.p.event(&g, &self.call, Direction::Request, &outcome, self.started, None, workload);
        event.event = EventKind::WebsocketClosed;
        event.direction = EventDirection::Both;
        event.websocket = Some(stats);
        self.p.audit.record(event).await;
    }
}
