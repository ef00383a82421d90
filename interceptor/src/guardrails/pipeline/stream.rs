//! The stream phase: the [`StreamGuard`] inspects a streamed response as it
//! arrives. Completion text is accumulated into windows that overlap, each
//! checked by the backends (`backends`), so a phrase split across two
//! windows is still caught. `monitor` forwards every chunk at once and
//! records verdicts; `enforce` holds back the bytes of at most one window
//! until its verdict and ends the stream with a provider-valid error event
//! on a block. WebSocket provider messages go through the same windows
//! (`websocket`).

use std::{collections::VecDeque, sync::Arc, time::Instant};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::{
    Guardrails, Pipeline,
    backends::Subject,
    outcome::{Block, Outcome},
};
use crate::{
    audit::WorkloadInfo,
    config::StreamMode,
    guardrails::{
        backend::{Call, Phase},
        framing::{Framer, FramingKind},
        model::{Direction, Role, Stage, StreamDelta, TextKind, TextSpan},
        providers::{self, StreamEventRef},
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
    /// Enforce: the parsed events among the held bytes, oldest first: (raw
    /// length, characters of text).
    held_events: VecDeque<(usize, usize)>,
    released_any: bool,
    /// The last byte released, to finish a CRLF line before an error event.
    last_released: Option<u8>,
    outcome: Outcome,
    started: Instant,
    workload: WorkloadInfo,
    framing_broken: bool,
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
            released_any: false,
            last_released: None,
            outcome: Outcome::default(),
            started: Instant::now(),
            framing_broken: false,
        }
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
        let delta = |ev: StreamEventRef<'_>| providers::stream_delta(provider, ev);
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
    pub(super) async fn check_window(&mut self) -> Option<String> {
        if self.pending.is_empty() {
            return self.outcome.block.as_ref().map(|b| b.reason.clone());
        }
        let text = format!("{}{}", self.carry, self.pending);
        self.pending.clear();
        let overlap = self.g.cfg.stream_overlap;
        self.carry = tail_chars(&text, overlap).to_string();
        let texts = Arc::new(vec![TextSpan { path: Vec::new(), role: Role::Assistant, kind: TextKind::Content, text }]);
        let mut subject = Subject::text(&texts, (self.status, &self.headers), self.enforce());
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
        p.record_metrics(self.call.provider, Direction::Response, &self.outcome, self.started);
        let workload = self.workload.clone();
        let mut event = p.event(&self.g, &self.call, Direction::Response, &self.outcome, self.started, None, workload);
        // A stream's event names the peers by address only.
        event.client = self.call.client.0.ip().to_string();
        event.orig_dst = self.call.orig_dst.0.ip().to_string();
        p.audit.record(event).await;
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
}
