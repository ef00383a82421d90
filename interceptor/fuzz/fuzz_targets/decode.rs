//! Content-encoding decoding with limits, on any body and any
//! `Content-Encoding` header.
#![no_main]

use interceptor::guardrails::decode::{decode_body, encode_like};
use libfuzzer_sys::fuzz_target;

const ENCODINGS: &[&str] = &[
    "gzip",
    "deflate",
    "br",
    "zstd",
    "x-gzip",
    "gzip, br",
    "zstd, gzip",
    "identity",
    "br, identity, deflate",
    "compress",
    "",
];
const LIMITS: &[usize] = &[0, 1, 64, 4096, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let [select, limit, body @ ..] = data else { return };
    let encoding = ENCODINGS[usize::from(*select) % ENCODINGS.len()];
    let max = LIMITS[usize::from(*limit) % LIMITS.len()];

    // Arbitrary bytes: an error or at most `max` bytes, never more.
    if let Ok(out) = decode_body(Some(encoding), body, max) {
        assert!(out.len() <= max, "{encoding}: {} bytes decoded past the {max} byte limit", out.len());
    }

    // Encoding then decoding gives the body back. The limit holds for every
    // layer of a stack, and a middle layer (compressed) may be a little
    // larger than the body, so the round trip gets some room; a single
    // encoding decodes with exactly the body's size as the limit.
    if let Ok(encoded) = encode_like(Some(encoding), body) {
        let room = body.len() + encoded.len() + 1024;
        let decoded = decode_body(Some(encoding), &encoded, room).expect("our own encoding decodes");
        assert_eq!(&*decoded, body, "{encoding} round trip");
        if !encoding.contains(',') {
            assert!(decode_body(Some(encoding), &encoded, body.len()).is_ok(), "{encoding}: exact limit refused");
        }
        if !body.is_empty() {
            assert!(decode_body(Some(encoding), &encoded, body.len() - 1).is_err(), "{encoding}: limit not enforced");
        }
    }
});
