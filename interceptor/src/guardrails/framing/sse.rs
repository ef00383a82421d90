//! Incremental Server-Sent Events parser, following the WHATWG "event stream
//! interpretation" algorithm.
//!
//! Lines end with `\n`, `\r\n` or a lone `\r`; `data:` takes one optional
//! space; several `data` lines join with `\n`; lines starting with `:` are
//! comments; a blank line dispatches the event; an event with no `data` line
//! is not dispatched; a leading UTF-8 BOM is skipped; `id` persists across
//! events as the spec's "last event ID". Unlike the spec, an event without an
//! `event:` line has `event == None` rather than `"message"`, so callers can
//! tell OpenAI's data-only stream from a named one.
//!
//! The parser never waits for more input than it needs: an event is emitted on
//! its terminating line end, even a `\r` whose `\n` has not arrived yet.

/// Default bound on the bytes one event may span (16 MiB).
pub const DEFAULT_MAX_EVENT_SIZE: usize = 16 << 20;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// One dispatched event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, `None` when absent or empty.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The last event ID seen so far on the stream (it persists, per the spec).
    pub id: Option<String>,
    /// Input bytes this event accounts for: everything after the previous
    /// event (comments and data-less blocks included) through the line end
    /// that dispatched it. A `\n` following that `\r` counts for the next one.
    pub raw_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SseError {
    #[error("event exceeds the {max} byte limit")]
    EventTooLarge { max: usize },
}

/// Incremental parser: [`SseParser::feed`] chunks, collect events.
#[derive(Debug)]
pub struct SseParser {
    max_event: usize,
    /// The current line, without its terminator.
    line: Vec<u8>,
    /// The last byte seen was a `\r`: a `\n` right after it is the same line end.
    skip_lf: bool,
    first_line: bool,
    /// The spec's data buffer: each `data` value followed by `\n`.
    data: String,
    event: String,
    last_id: Option<String>,
    /// Bytes consumed since the last dispatched event.
    pending: usize,
    failed: bool,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_SIZE)
    }
}

impl SseParser {
    /// A parser refusing events that span more than `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Self {
            max_event,
            line: Vec::new(),
            skip_lf: false,
            first_line: true,
            data: String::new(),
            event: String::new(),
            last_id: None,
            pending: 0,
            failed: false,
        }
    }

    /// Feeds the next chunk; returns the events it completed, in order.
    ///
    /// After an error the parser stays failed: the stream cannot be resynced.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        if self.failed {
            return Err(SseError::EventTooLarge { max: self.max_event });
        }
        let mut out = Vec::new();
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if self.skip_lf {
                self.skip_lf = false;
                if first == b'\n' {
                    self.pending += 1;
                    rest = tail;
                    continue;
                }
            }
            match memchr::memchr2(b'\n', b'\r', rest) {
                Some(pos) => {
                    self.line.extend_from_slice(&rest[..pos]);
                    self.pending += pos + 1;
                    self.skip_lf = rest[pos] == b'\r';
                    rest = &rest[pos + 1..];
                    self.check_size()?;
                    if let Some(ev) = self.process_line() {
                        out.push(ev);
                    }
                }
                None => {
                    self.line.extend_from_slice(rest);
                    self.pending += rest.len();
                    rest = &[];
                    self.check_size()?;
                }
            }
        }
        Ok(out)
    }

    /// Ends the stream: an event still missing its blank line is dispatched.
    ///
    /// The spec tells browsers to discard it, but several SDKs (OpenAI's
    /// Python decoder among them) do yield it, so a guardrail must see it.
    pub fn finish(&mut self) -> Option<SseEvent> {
        if self.failed {
            return None;
        }
        if !self.line.is_empty() {
            let _ = self.process_line();
        }
        self.dispatch()
    }

    /// Bytes fed but not yet accounted for by an emitted event.
    pub fn buffered_len(&self) -> usize {
        self.pending
    }

    fn check_size(&mut self) -> Result<(), SseError> {
        if self.pending > self.max_event {
            self.failed = true;
            self.line = Vec::new();
            self.data = String::new();
            return Err(SseError::EventTooLarge { max: self.max_event });
        }
        Ok(())
    }

    fn process_line(&mut self) -> Option<SseEvent> {
        let line = std::mem::take(&mut self.line);
        let mut l = line.as_slice();
        if self.first_line {
            self.first_line = false;
            l = l.strip_prefix(BOM).unwrap_or(l);
        }
        let ev = if l.is_empty() {
            self.dispatch()
        } else {
            if l[0] != b':' {
                let (name, value) = match l.iter().position(|&b| b == b':') {
                    Some(p) => {
                        let v = &l[p + 1..];
                        (&l[..p], v.strip_prefix(b" ").unwrap_or(v))
                    }
                    None => (l, &[][..]),
                };
                match name {
                    b"event" => self.event = lossy(value).into_owned(),
                    b"data" => {
                        self.data.push_str(&lossy(value));
                        self.data.push('\n');
                    }
                    // An id containing NUL is ignored (spec).
                    b"id" if !value.contains(&0) => {
                        self.last_id = Some(lossy(value).into_owned());
                    }
                    // `retry` and unknown fields are ignored.
                    _ => {}
                }
            }
            None
        };
        // Keep the allocation for the next line.
        let mut line = line;
        line.clear();
        self.line = line;
        ev
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if self.data.is_empty() {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        let raw_len = std::mem::take(&mut self.pending);
        Some(SseEvent { event: (!event.is_empty()).then_some(event), data, id: self.last_id.clone(), raw_len })
    }
}

/// Serializes one event (`event:` line if any, one `data:` line per line of
/// `data`, blank line). Line ends inside `data` (any of the three forms)
/// become separate `data:` lines, and any in `event` are dropped, so the
/// framing cannot be broken by the content.
pub fn encode_event(event: Option<&str>, data: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 32);
    if let Some(event) = event {
        out.extend_from_slice(b"event: ");
        out.extend(event.bytes().filter(|&b| b != b'\r' && b != b'\n'));
        out.push(b'\n');
    }
    let data = data.replace("\r\n", "\n").replace('\r', "\n");
    for line in data.split('\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out.push(b'\n');
    out
}

/// `bytes` as text, invalid UTF-8 replaced as `String::from_utf8_lossy`
/// does; valid text (nearly every line) is checked by the fast validator.
fn lossy(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(bytes) {
        Ok(text) => std::borrow::Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut p = SseParser::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(p.feed(c).unwrap());
        }
        out.extend(p.finish());
        out
    }

    fn ev(event: Option<&str>, data: &str) -> (Option<String>, String) {
        (event.map(str::to_owned), data.to_owned())
    }

    fn simple(events: &[SseEvent]) -> Vec<(Option<String>, String)> {
        events.iter().map(|e| (e.event.clone(), e.data.clone())).collect()
    }

    const SAMPLE: &[u8] = b"\xEF\xBB\xBF: keep-alive\r\n\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r\n\
data:no-space\ndata:  two spaces\n\nid: 7\nevent: x\ndata\ndata: last\rretry: 10\r\r:comment only\n\n\
event: ignored-no-data\n\ndata: [DONE]\n\n";

    #[test]
    fn spec_cases() {
        let events = parse_all(&[SAMPLE]);
        assert_eq!(
            simple(&events),
            vec![
                ev(Some("message_start"), "{\"a\":1}"),
                ev(None, "no-space\n two spaces"),
                ev(Some("x"), "\nlast"),
                ev(None, "[DONE]"),
            ]
        );
        assert_eq!(events[2].id.as_deref(), Some("7"));
        // The id persists.
        assert_eq!(events[3].id.as_deref(), Some("7"));
        assert_eq!(events[0].id, None);
    }

    #[test]
    fn raw_len_accounts_for_every_byte() {
        let mut p = SseParser::default();
        let events = p.feed(SAMPLE).unwrap();
        let total: usize = events.iter().map(|e| e.raw_len).sum();
        assert_eq!(total + p.buffered_len(), SAMPLE.len());
        assert_eq!(p.buffered_len(), 0);
        // The first event's bytes include the BOM and the comment block.
        let first = b"\xEF\xBB\xBF: keep-alive\r\n\r\nevent: message_start\r\ndata: {\"a\":1}\r\n\r";
        assert_eq!(events[0].raw_len, first.len());
    }

    #[test]
    fn one_byte_at_a_time_matches_whole() {
        let whole = parse_all(&[SAMPLE]);
        let bytes: Vec<&[u8]> = SAMPLE.chunks(1).collect();
        assert_eq!(parse_all(&bytes), whole);
    }

    #[test]
    fn every_split_point_matches_whole() {
        let whole = parse_all(&[SAMPLE]);
        for i in 0..=SAMPLE.len() {
            assert_eq!(parse_all(&[&SAMPLE[..i], &SAMPLE[i..]]), whole, "split at {i}");
        }
    }

    #[test]
    fn unterminated_last_event_is_flushed_by_finish() {
        let mut p = SseParser::default();
        assert!(p.feed(b"data: tail").unwrap().is_empty());
        let last = p.finish().unwrap();
        assert_eq!(last.data, "tail");
        assert_eq!(last.raw_len, 10);
    }

    #[test]
    fn oversized_event_fails_and_stays_failed() {
        let mut p = SseParser::new(16);
        assert!(p.feed(b"data: 0123456789").is_ok());
        assert!(matches!(p.feed(b"abcdef"), Err(SseError::EventTooLarge { max: 16 })));
        assert!(p.feed(b"\n\n").is_err());
        // A stream of small events never hits the limit.
        let mut p = SseParser::new(16);
        for _ in 0..1000 {
            assert_eq!(p.feed(b"data: x\n\n").unwrap().len(), 1);
        }
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        let events = parse_all(&[b"data: \xFF\xFEok\n\n"]);
        assert_eq!(events[0].data, "\u{FFFD}\u{FFFD}ok");
    }

    #[test]
    fn encode_round_trips() {
        let bytes = encode_event(Some("error"), "line1\nline2");
        let events = parse_all(&[&bytes]);
        assert_eq!(simple(&events), vec![ev(Some("error"), "line1\nline2")]);
        let bytes = encode_event(Some("a\r\nb"), "x\ry\r\nz\n\n");
        let events = parse_all(&[&bytes]);
        assert_eq!(simple(&events), vec![ev(Some("ab"), "x\ny\nz\n\n")]);
    }

    fn arb_stream() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            "[a-z ]{0,12}".prop_map(|s| format!("data: {s}")),
            "[a-z]{0,6}".prop_map(|s| format!("data:{s}")),
            "[a-z_.]{0,10}".prop_map(|s| format!("event: {s}")),
            "[0-9]{0,3}".prop_map(|s| format!("id: {s}")),
            "[a-z ]{0,8}".prop_map(|s| format!(":{s}")),
            Just(String::new()),
            Just("data".to_owned()),
            Just("é€😀".to_owned()),
        ];
        let end = prop_oneof![Just("\n"), Just("\r\n"), Just("\r")];
        prop::collection::vec((line, end), 0..40).prop_map(|lines| {
            let mut s = Vec::new();
            for (l, e) in lines {
                s.extend_from_slice(l.as_bytes());
                s.extend_from_slice(e.as_bytes());
            }
            s
        })
    }

    proptest! {
        #[test]
        fn output_is_independent_of_chunking(stream in arb_stream(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12)) {
            let whole = parse_all(&[&stream]);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks: Vec<&[u8]> = Vec::new();
            let mut prev = 0;
            for p in points {
                chunks.push(&stream[prev..p]);
                prev = p;
            }
            chunks.push(&stream[prev..]);
            prop_assert_eq!(parse_all(&chunks), whole);
        }
    }
}
