//! The MCP stream reader on any bytes cut into any chunks: the same items
//! whatever the cuts, every byte handed back exactly once, never a panic.
#![no_main]

mod common;

use interceptor::guardrails::mcp::{Finished, McpStream, Payload, StreamItem, request_texts, result_texts};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 20;

/// Feeds `chunks`; `None` if the reader refused the stream.
fn read(chunks: &[&[u8]]) -> Option<(Vec<StreamItem>, Finished)> {
    let mut s = McpStream::new(MAX);
    let mut items = Vec::new();
    for chunk in chunks {
        items.extend(s.feed(chunk).ok()?);
    }
    let end = s.finish();
    Some((items, end))
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = common::cuts_and_stream(data);
    let whole = read(&[stream]);
    let split = read(&common::chunks(cuts, stream));
    assert_eq!(whole, split, "chunking changed the items");
    let Some((items, end)) = whole else { return };
    let mut raw: Vec<u8> = items.iter().chain(end.item.as_ref()).flat_map(|i| i.raw.clone()).collect();
    raw.extend_from_slice(&end.rest);
    assert_eq!(raw, stream, "bytes not handed back exactly once");
    for item in &items {
        if let Payload::Messages { doc, messages } = &item.payload {
            for (prefix, m) in messages {
                let _ = request_texts(m, prefix);
                if let interceptor::guardrails::mcp::Message::Response { result, .. } = m {
                    let _ = result_texts("", result, prefix);
                }
            }
            let _ = item.encode_doc(doc);
        }
    }
});
