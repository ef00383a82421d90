//! The stream phase: the [`StreamGuard`] inspects a streamed response as it
//! arrives. `monitor` forwards every chunk at once and records verdicts;
//! `enforce` holds back what could still be part of a finding and ends the
//! stream with a provider-valid error event on a block.
//!
//! Two ways to follow the text:
//!
//! * tracked (enforce, local engine only): a [`StreamTracker`] carries the
//!   detectors' automaton state from event to event; every event's text is
//!   checked as it arrives, and every event whose text is settled (can no
//!   longer be part of a finding, see `engine::incremental`) is released at
//!   once. Only the events carrying a live partial match are held.
//! * windows (monitor, a remote backend, or detectors no automaton can
//!   follow): completion text is accumulated into windows that overlap, each
//!   checked by the backends (`backends`), so a phrase split across two
//!   windows is still caught; enforce holds back the bytes of at most one
//!   window until its verdict. WebSocket provider messages go through the
//!   same windows (`websocket`).
//!
//! Either way, the other strings of each event (its id, model, finish
//! reason, …) are what the client reads too: each is checked whole, as an
//! identifier, before the event is released; the local engine's prescan
//! clears almost all of them at once (`unread`).

use std::{collections::VecDeque, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::{
    Guardrails, Pipeline,
    backends::Subject,
    outcome::{Block, Outcome},
    scrub_facts, trace,
};
use crate::{
    audit::WorkloadInfo,
    config::{self, StreamMode},
    guardrails::{
        backend::{Call, Phase},
        engine::StreamTracker,
        framing::{Framer, FramingKind},
        genai::ResponseFacts,
        model::{Direction, Role, Stage, StreamDelta, TextKind, TextSpan},
        providers::{self, StreamEventRef, strings},
        usage::UsageMeter,
    },
    proxy::hook::{BodyInspector, ChunkAction},
};

/// Maximum size of one stream event (SSE event, frame or array element).
const MAX_EVENT: usize = 16 << 20;

/// Inspects a streamed response (or a WebSocket's provider messages): see
/// the module documentation.
pub(super) struct StreamGuard {
    pub(super) p: Pipeline,
    pub(super) g: Arc<Guardrails>,
    call: Arc<Call>,
    kind: FramingKind,
    framer: Framer,
    status: StatusCode,
    /// The response's headers, kept only when a backend reads them.
    headers: HeaderMap,
    /// Text of parsed events not yet checked.
    pub(super) pending: String,
    /// Tail of the previous window, checked again with the next one.
    carry: String,
    /// Enforce: bytes received but not yet released.
    held: BytesMut,
    /// Enforce: the parsed events among the held bytes, oldest first.
    held_events: VecDeque<HeldEvent>,
    /// Enforce with the local engine only: the stream's text as the
    /// detectors follow it (`None`: windows).
    tracker: Option<StreamTracker>,
    /// Tracked: the text length at the last check.
    checked: usize,
    released_any: bool,
    /// The last byte released, to finish a CRLF line before an error event.
    last_released: Option<u8>,
    outcome: Outcome,
    started: Instant,
    workload: WorkloadInfo,
    framing_broken: bool,
    /// The answer's usage, for a successful HTTP stream.
    meter: Option<UsageMeter>,
    /// What the answer says of itself, for the exchange's span (when it
    /// has one).
    facts: Option<ResponseFacts<'static>>,
    /// Whether text went by (the span's time to first chunk is noted).
    text_seen: bool,
    /// Strings of the parsed events besides their text that the local
    /// engine's prescan did not clear, not yet checked.
    unread: Vec<String>,
    /// An event's strings, each followed by a `"`, and where each ends:
    /// gathered for one literal search over them all
    /// ([`Prescan::clear_pieces`](crate::guardrails::engine::Prescan::clear_pieces)),
    /// the buffers kept from event to event.
    gathered: (String, Vec<usize>),
}

impl StreamGuard {
    pub(super) fn new(
        p: &Pipeline,
        g: Arc<Guardrails>,
        call: Arc<Call>,
        kind: FramingKind,
        head: &http::response::Parts,
    ) -> Self {
        let framer = Framer::new(kind, MAX_EVENT);
        let facts = call.span.as_ref().map(|_| {
            let facts = ResponseFacts::default();
            if g.cfg.audit_prompts { facts.with_content() } else { facts }
        });
        let headers = if g.reads_headers() { head.headers.clone() } else { HeaderMap::new() };
        Self {
            workload: WorkloadInfo::of(call.workload.as_ref()),
            p: p.clone(),
            g,
            call,
            kind,
            framer,
            status: head.status,
            headers,
            pending: String::new(),
            carry: String::new(),
            held: BytesMut::new(),
            held_events: VecDeque::new(),
            tracker: None,
            checked: 0,
            released_any: false,
            last_released: None,
            outcome: Outcome::default(),
            started: Instant::now(),
            framing_broken: false,
            meter: None,
            facts,
            text_seen: false,
            unread: Vec::new(),
            gathered: (String::new(), Vec::new()),
        }
    }

    /// Follows the stream's usage too (for the audit event and the token
    /// counters).
    pub(super) fn metered(mut self) -> Self {
        self.meter = Some(UsageMeter::new(self.call.provider));
        self
    }

    /// Follows the text with the engine's automaton instead of windows,
    /// when the stream enforces, the local engine is the only backend, and
    /// its detectors can be followed.
    pub(super) fn tracked(mut self) -> Self {
        let local_only = self.g.cfg.backends.iter().all(|b| *b == config::Backend::Local);
        if self.enforce() && local_only {
            self.tracker = self.g.engine.as_ref().and_then(|e| e.stream_tracker(self.g.cfg.stream_window));
        }
        self
    }

    pub(super) fn enforce(&self) -> bool {
        self.g.cfg.stream_mode == StreamMode::Enforce
    }

    /// Parses a chunk: the completed events' raw lengths and text go to
    /// `held_events` and `pending`; returns whether one of them ends the
    /// stream.
    fn parse(&mut self, chunk: &[u8]) -> bool {
        if self.framing_broken {
            return false;
        }
        let provider = self.call.provider;
        let (meter, facts, unread) = (&mut self.meter, &mut self.facts, &mut self.unread);
        let (all, ends) = &mut self.gathered;
        let ctx = self.call.scan_context(Direction::Response);
        let mut prescan = self.g.engine.as_deref().map(|engine| engine.prescan(&ctx));
        let mut delta = |ev: StreamEventRef<'_>| {
            let before = unread.len();
            let delta = match (&mut *meter, &mut *facts, &mut prescan) {
                (None, None, None) => providers::stream_delta(provider, ev),
                (meter, facts, prescan) => providers::stream_delta_observed(provider, ev, &mut |event, v| {
                    if let Some(meter) = meter.as_mut() {
                        meter.observe(event, v);
                    }
                    if let Some(facts) = facts.as_mut() {
                        facts.observe(event, v);
                    }
                    if let Some(prescan) = prescan.as_mut() {
                        // One literal search over all the event's strings;
                        // when it finds something, each string on its own.
                        all.clear();
                        ends.clear();
                        providers::each_leaf(v, &mut |s| {
                            all.push_str(s);
                            ends.push(all.len());
                            all.push('"');
                        });
                        if !prescan.clear_pieces(all, ends) {
                            providers::each_leaf(v, &mut |s| {
                                if !prescan.clear(s) {
                                    unread.push(s.to_owned());
                                }
                            });
                        }
                    }
                }),
            };
            // The event's text is followed as text.
            let mut i = before;
            while i < unread.len() {
                if delta.texts.iter().any(|(_, text)| *text == unread[i]) {
                    unread.swap_remove(i);
                } else {
                    i += 1;
                }
            }
            delta
        };
        let result: Result<Vec<(usize, StreamDelta)>, String> = self
            .framer
            .feed(chunk)
            .map(|frames| frames.iter().map(|f| (f.raw_len(), delta(f.into()))).collect())
            .map_err(|e| e.to_string());
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
            if !self.text_seen && !delta.texts.is_empty() {
                self.text_seen = true;
                trace::first_token(&self.call);
            }
            for (_, text) in delta.texts {
                if let Some(meter) = &mut self.meter {
                    meter.text(&text);
                }
                if let Some(facts) = &mut self.facts {
                    facts.text(&text);
                }
                match &mut self.tracker {
                    Some(tracker) => tracker.push(&text),
                    None => {
                        chars += text.chars().count();
                        self.pending.push_str(&text);
                    }
                }
            }
            let end = self.tracker.as_ref().map_or(0, StreamTracker::len);
            self.held_events.push_back(HeldEvent { raw: raw_len, chars, end });
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
                stage: Stage::Framing,
                rule: "malformed_stream".into(),
            });
            self.outcome.reasons.push(format!("malformed stream: {error}"));
        } else {
            self.outcome.reasons.push(format!("malformed stream, not inspected further: {error}"));
            tracing::warn!(
                request_id = %self.call.request_id,
                provider = self.call.provider.as_str(),
                host = %self.call.host,
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
        // A trailing SSE event without its blank line is not an event the
        // client's SDK would read; only a cut frame or array is an error.
        let unfinished = self.framer.finish().err().map(|e| e.to_string());
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
            if let Some(tracker) = &self.tracker {
                // Every event whose text is settled.
                keep = self.held_events.iter().take_while(|e| e.end <= tracker.settled()).count();
            } else {
                let mut tail = 0;
                while keep > 0 && tail < self.g.cfg.stream_overlap {
                    keep -= 1;
                    tail += self.held_events[keep].chars;
                }
            }
            self.held_events.drain(..keep).map(|e| e.raw).sum::<usize>().min(self.held.len())
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

    /// Notes the strings of a message's JSON `data` besides its `texts` that
    /// the local engine's prescan does not clear (`unread`), for
    /// [`Self::check_unread`]. Data that is not JSON has no other strings.
    pub(super) fn note_unread(&mut self, data: &[u8], texts: &[(TextKind, String)]) {
        let Some(engine) = self.g.engine.as_deref() else { return };
        let ctx = self.call.scan_context(Direction::Response);
        let mut prescan = engine.prescan(&ctx);
        let unread = &mut self.unread;
        let _ = strings::each_string(data, &mut |s| {
            if !prescan.clear(s) && !texts.iter().any(|(_, text)| text == s) {
                unread.push(s.to_owned());
            }
            true
        });
    }

    /// Checks the events' other strings the prescan did not clear
    /// (`unread`), each whole. Returns the block reason, if they had one.
    pub(super) async fn check_unread(&mut self) -> Option<String> {
        if self.unread.is_empty() {
            return None;
        }
        let span = |text| TextSpan { path: Vec::new(), role: Role::Assistant, kind: TextKind::Identifier, text };
        let texts = Arc::new(self.unread.drain(..).map(span).collect());
        self.check(&texts).await
    }

    /// Checks the pending window (with the carried overlap). Returns the
    /// block reason, if any.
    pub(super) async fn check_window(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return self.outcome.block.as_ref().map(|b| b.reason.clone());
        }
        let text = format!("{}{}", self.carry, self.pending);
        self.pending.clear();
        let overlap = self.g.cfg.stream_overlap;
        self.carry = tail_chars(&text, overlap).to_string();
        let texts = Arc::new(vec![TextSpan { path: Vec::new(), role: Role::Assistant, kind: TextKind::Content, text }]);
        self.check(&texts).await
    }

    /// Runs the backends on `texts`; monitor mode records a block as an
    /// alert. Returns the block reason, if any.
    async fn check(&mut self, texts: &Arc<Vec<TextSpan>>) -> Option<String> {
        let mut subject = Subject::text(texts, (self.status, &self.headers), self.enforce());
        self.p.run_backends(&self.g, Phase::Stream, &self.call, &mut subject, &mut self.outcome).await;
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

    /// Tracked: checks the kept text when new text came. Returns the block
    /// reason, if any.
    async fn check_tracked(&mut self) -> Option<String> {
        let tracker = self.tracker.as_ref()?;
        if tracker.len() > self.checked {
            self.checked = tracker.len();
            let text = tracker.text().to_owned();
            let texts =
                Arc::new(vec![TextSpan { path: Vec::new(), role: Role::Assistant, kind: TextKind::Content, text }]);
            let mut subject = Subject::text(&texts, (self.status, &self.headers), true);
            let before = self.outcome.reasons.len();
            self.p.run_backends(&self.g, Phase::Stream, &self.call, &mut subject, &mut self.outcome).await;
            // The kept text may be checked more than once: name each
            // finding once.
            let (old, new) = self.outcome.reasons.split_at(before);
            let mut fresh: Vec<String> = Vec::new();
            for reason in new {
                if !old.contains(reason) && !fresh.contains(reason) {
                    fresh.push(reason.clone());
                }
            }
            self.outcome.reasons.truncate(before);
            self.outcome.reasons.extend(fresh);
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
            kind => providers::stream_block(self.call.provider, kind, reason),
        });
        Bytes::from(out)
    }

    /// Records the stream's decision: one audit event for the whole stream.
    pub(super) async fn finish_audit(&mut self) {
        let p = &self.p;
        p.record_metrics(&self.call.workload_key, self.call.provider, Direction::Response, &self.outcome, self.started);
        let workload = self.workload.clone();
        if let Some(facts) = &mut self.facts {
            scrub_facts(&self.g, &self.call, facts);
            trace::response(&self.call, facts);
        }
        let mut event = p.event(&self.g, &self.call, Direction::Response, &self.outcome, self.started, None, workload);
        event.usage = p.count_usage(&self.call, self.meter.as_ref().and_then(UsageMeter::usage)).await;
        event.budget_counting = super::outcome::budget_counting(&self.call);
        p.audit.record(event).await;
    }
}

/// An event among the held bytes.
struct HeldEvent {
    /// Its length in the provider's stream.
    raw: usize,
    /// Windows: the characters of text it carries.
    chars: usize,
    /// Tracked: the length of the stream's text after it.
    end: usize,
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
        let _ = self.check_unread().await;
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
        if self.tracker.is_some() {
            if let Some(reason) = self.check_tracked().await {
                self.finish_audit().await;
                return ChunkAction::End(self.block_bytes(&reason));
            }
            return ChunkAction::Forward(self.release(false));
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

    /// Monitor: every chunk passes as it came.
    fn observes_only(&self) -> bool {
        !self.enforce()
    }

    async fn on_end(&mut self) -> Bytes {
        self.check_finished();
        if let Some(tracker) = &mut self.tracker {
            tracker.finish();
        }
        let blocked = match self.check_tracked().await {
            Some(reason) => Some(reason),
            None => self.check_window().await,
        };
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
}
