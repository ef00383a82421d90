//! The SSE parser on any bytes cut into any chunks: the same events whatever
//! the cuts, every byte accounted for, and encoded events parse back.
#![no_main]

mod common;

use interceptor::guardrails::framing::sse::{SseEvent, SseParser, encode_event};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 20;

/// Feeds `chunks`; `None` if the parser refused the stream.
fn parse(chunks: &[&[u8]]) -> Option<(Vec<SseEvent>, Option<SseEvent>)> {
    let mut p = SseParser::new(MAX);
    let mut events = Vec::new();
    let mut fed = 0;
    for chunk in chunks {
        events.extend(p.feed(chunk).ok()?);
        fed += chunk.len();
        let accounted: usize = events.iter().map(|e| e.raw_len).sum::<usize>() + p.buffered_len();
        assert_eq!(accounted, fed, "bytes not accounted for");
    }
    let last = p.finish();
    Some((events, last))
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = common::cuts_and_stream(data);

    let whole = parse(&[stream]);
    let chunks = common::chunks(cuts, stream);
    let split = parse(&chunks);
    assert_eq!(whole, split, "chunking changed the events");

    // An encoded event parses back with its data (line ends normalized).
    if let Ok(text) = std::str::from_utf8(stream) {
        let (event, data) = text.split_once('\u{0}').unwrap_or(("", text));
        let event = (!event.is_empty()).then_some(event);
        let bytes = encode_event(event, data);
        let mut p = SseParser::new(usize::MAX);
        let events = p.feed(&bytes).expect("no limit");
        assert_eq!(events.len(), 1, "{bytes:?}");
        assert_eq!(events[0].data, data.replace("\r\n", "\n").replace('\r', "\n"));
        let expected_event = event.map(|e| e.replace(['\r', '\n'], "")).filter(|e| !e.is_empty());
        assert_eq!(events[0].event, expected_event);
        assert_eq!(events[0].raw_len, bytes.len());
    }
});
