//! The AWS event-stream decoder on any bytes cut into any chunks: the same
//! frames whatever the cuts, every byte accounted for, and encoded frames
//! decode back.
#![no_main]

mod common;

use interceptor::guardrails::framing::eventstream::{Decoder, HeaderValue, Message, encode_frame};
use libfuzzer_sys::{
    arbitrary::{Result, Unstructured},
    fuzz_target,
};

const MAX: usize = 1 << 20;

fn decode(chunks: &[&[u8]]) -> Option<Vec<Message>> {
    let mut d = Decoder::new(MAX);
    let mut frames = Vec::new();
    let mut fed = 0;
    for chunk in chunks {
        frames.extend(d.feed(chunk).ok()?);
        fed += chunk.len();
        let accounted: usize = frames.iter().map(|m| m.raw_len).sum::<usize>() + d.buffered_len();
        assert_eq!(accounted, fed, "bytes not accounted for");
    }
    Some(frames)
}

fn header(u: &mut Unstructured<'_>) -> Result<(String, HeaderValue)> {
    let name: String = u.arbitrary()?;
    let value = match u.int_in_range(0u8..=9)? {
        0 => HeaderValue::Bool(true),
        1 => HeaderValue::Bool(false),
        2 => HeaderValue::Byte(u.arbitrary()?),
        3 => HeaderValue::Short(u.arbitrary()?),
        4 => HeaderValue::Int(u.arbitrary()?),
        5 => HeaderValue::Long(u.arbitrary()?),
        6 => HeaderValue::Bytes(u.arbitrary()?),
        7 => HeaderValue::String(u.arbitrary()?),
        8 => HeaderValue::Timestamp(u.arbitrary()?),
        _ => HeaderValue::Uuid(u.arbitrary()?),
    };
    Ok((name, value))
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = common::cuts_and_stream(data);
    // Headers for the round trip, drawn from the same bytes.
    let mut u = Unstructured::new(stream);
    let mut headers = Vec::new();
    for _ in 0..u.int_in_range(0u8..=4).unwrap_or(0) {
        if let Ok(h) = header(&mut u) {
            headers.push(h);
        }
    }

    let whole = decode(&[stream]);
    let chunks = common::chunks(cuts, stream);
    assert_eq!(whole, decode(&chunks), "chunking changed the frames");

    // Whatever encodes decodes back to the same headers and payload.
    let refs: Vec<(&str, HeaderValue)> = headers.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    if let Ok(frame) = encode_frame(&refs, stream) {
        let frames = decode(&[&frame]).expect("our own frame decodes");
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].payload, stream);
        assert_eq!(frames[0].headers, headers);
        assert_eq!(frames[0].raw_len, frame.len());
    }
});
