//! Provider parsers on any request or response body: every text found (and
//! every text no parser reads) can be read back and rewritten at its path,
//! instructions insert, stream events parse, and the error events that end a blocked stream stay well framed
//! whatever the reason says. The allowed path's one search over all of a
//! body's strings never clears a body with a string the prescan does not
//! clear on its own.
#![no_main]

use std::sync::LazyLock;

use interceptor::guardrails::{
    engine::{Engine, ScanContext},
    framing::{Frame, Framer, FramingKind},
    model::{Direction, Provider},
    providers::{
        self, StreamEventRef, detect, strings, detect_from_body, insert_instruction, json_array_block, model_from_path,
        parse_request, parse_response, path_requests_stream, set_text, stream_block, stream_delta, text_at,
    },
};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let [select, body @ ..] = data else { return };
    let provider = Provider::ALL[usize::from(*select) % Provider::ALL.len()];
    let text = String::from_utf8_lossy(body);

    // Host and path detection on any text.
    let (host, path) = text.split_once('\n').unwrap_or(("api.openai.com", &text));
    let _ = detect(host, path);
    let _ = model_from_path(path);
    let _ = path_requests_stream(path);
    let _ = providers::response_framing(provider, path, host);

    // Stream events of every framing, from the raw bytes.
    let (event, sse_data) = text.split_once('\u{0}').map_or((None, &*text), |(e, d)| (Some(e), d));
    let _ = stream_delta(provider, StreamEventRef::Sse { event, data: sse_data });
    for message_type in ["event", "exception"] {
        for event_type in ["chunk", "contentBlockDelta", "messageStop", ""] {
            let _ = stream_delta(provider, StreamEventRef::EventStream { event_type, message_type, payload: body });
        }
    }

    // Block events carry any reason without breaking their framing.
    check_block_framing(provider, &text);

    check_search_over_all_strings(provider, body);

    let Ok(mut doc) = serde_json::from_slice::<Value>(body) else { return };
    let _ = detect_from_body(&doc);
    let _ = stream_delta(provider, StreamEventRef::JsonElement(&doc));
    let _ = parse_response(provider, &doc);

    let request = parse_request(provider, &doc);
    for span in &request.texts {
        assert_eq!(
            text_at(&doc, &span.path),
            Some(span.text.as_str()),
            "span not at {}",
            providers::path_string(&span.path)
        );
    }
    // What the parser does not read is found at its own path, apart from
    // what it reads, and can be rewritten too.
    let unread = providers::unread_texts(&doc, &request.texts);
    for span in &unread {
        assert_eq!(text_at(&doc, &span.path), Some(span.text.as_str()), "unread span not at its path");
        assert!(!request.texts.iter().any(|t| t.path == span.path), "a span both read and unread");
        let mut changed = doc.clone();
        set_text(&mut changed, &span.path, "[REDACTED]").expect("an unread text can be rewritten");
    }

    // Redacting every span in turn leaves the others where they were.
    let mut redacted = doc.clone();
    for span in &request.texts {
        set_text(&mut redacted, &span.path, "[REDACTED]").expect("a found text can be rewritten");
    }
    for span in &request.texts {
        assert_eq!(text_at(&redacted, &span.path), Some("[REDACTED]"));
    }

    if insert_instruction(provider, &mut doc, "Never reveal secrets.").is_ok() {
        let after = parse_request(provider, &doc);
        assert!(
            after.texts.iter().any(|t| t.text.contains("Never reveal secrets.")),
            "{provider:?}: inserted instruction not found in {doc}"
        );
    }
});

/// What the allowed path's one search over all of a body's strings clears,
/// the prescan clears string by string.
fn check_search_over_all_strings(provider: Provider, body: &[u8]) {
    static ENGINE: LazyLock<Engine> = LazyLock::new(|| Engine::builtin().expect("built-in policy"));
    let (mut all, mut ends) = (String::new(), Vec::new());
    let gathered = strings::each_string(body, &mut |s| {
        all.push_str(s);
        ends.push(all.len());
        all.push('"');
        true
    });
    if gathered.is_err() {
        return;
    }
    for direction in [Direction::Request, Direction::Response] {
        let ctx = ScanContext { direction, provider, host: "api.openai.com", workload: None };
        if ENGINE.prescan(&ctx).clear_pieces(&all, &ends) {
            let mut prescan = ENGINE.prescan(&ctx);
            let mut unclear = None;
            let _ = strings::each_string(body, &mut |s| {
                unclear = (!prescan.clear(s)).then(|| s.to_owned());
                unclear.is_none()
            });
            assert_eq!(unclear, None, "cleared with the other strings, not on its own ({direction:?})");
        }
    }
}

fn check_block_framing(provider: Provider, reason: &str) {
    for framing in [FramingKind::Sse, FramingKind::EventStream, FramingKind::JsonArray] {
        let bytes = stream_block(provider, framing, reason);
        let mut framer = Framer::new(framing, usize::MAX);
        if framing == FramingKind::JsonArray {
            // The block tail continues an array already opened.
            let whole = json_array_block(reason, false);
            serde_json::from_slice::<Value>(&whole).expect("a whole block array is json");
            let mut tail = b"[{}".to_vec();
            tail.extend_from_slice(&bytes);
            serde_json::from_slice::<Value>(&tail).expect("a block array tail closes the array");
            framer.feed(b"[{}").expect("an opened array");
        }
        let items = framer.feed(&bytes).expect("block bytes parse in their framing");
        assert!(!items.is_empty(), "no event in {:?}", String::from_utf8_lossy(&bytes));
        assert!(framer.finish().expect("block bytes end the stream").is_empty());
        match framing {
            FramingKind::Sse => {
                assert_eq!(framer.buffered_len(), 0, "a block event is left unfinished");
                for item in &items {
                    let Frame::Sse(ev) = item else { unreachable!("an SSE parser yields events") };
                    if ev.data == "[DONE]" {
                        continue;
                    }
                    serde_json::from_str::<Value>(&ev.data).expect("block event data is json");
                    // Generic and MCP streams have no model schema: every string is text.
                    if !matches!(provider, Provider::Generic | Provider::Mcp) {
                        let delta = stream_delta(provider, item.into());
                        assert!(delta.texts.is_empty(), "a block event carries model text: {delta:?}");
                    }
                }
            }
            FramingKind::EventStream => {
                assert_eq!(items.len(), 1);
                assert!(stream_delta(provider, (&items[0]).into()).end, "an exception frame ends the stream");
            }
            FramingKind::JsonArray => {}
        }
    }
}
