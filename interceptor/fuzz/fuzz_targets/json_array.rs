//! The streamed JSON array splitter on any bytes cut into any chunks: the
//! same elements whatever the cuts, and every byte accounted for.
#![no_main]

mod common;

use interceptor::guardrails::framing::json_array::{ArrayElement, JsonArrayStream};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 1 << 20;

fn split(chunks: &[&[u8]]) -> Option<(Vec<ArrayElement>, bool)> {
    let mut s = JsonArrayStream::new(MAX);
    let mut elements = Vec::new();
    let mut fed = 0;
    for chunk in chunks {
        elements.extend(s.feed(chunk).ok()?);
        fed += chunk.len();
        let accounted: usize = elements.iter().map(|e| e.raw_len).sum::<usize>() + s.buffered_len();
        assert_eq!(accounted, fed, "bytes not accounted for");
        assert_eq!(s.elements(), elements.len());
    }
    Some((elements, s.finish().is_ok()))
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = common::cuts_and_stream(data);

    let whole = split(&[stream]);
    let chunks = common::chunks(cuts, stream);
    assert_eq!(whole, split(&chunks), "chunking changed the elements");

    // A complete array is valid JSON, and its elements are the array's.
    if let Some((elements, true)) = &whole
        && let Ok(serde_json::Value::Array(items)) = serde_json::from_slice::<serde_json::Value>(stream)
    {
        let values: Vec<_> = elements.iter().map(|e| e.value.clone()).collect();
        assert_eq!(values, items);
    }
});
