//! Content-encoding decoding with limits, on any body and any
//! `Content-Encoding` header; charset decoding on any body and `Content-Type`.
#![no_main]

use interceptor::guardrails::decode::{decode_body, decode_charset, encode_like};
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
    "x-custom",
    "",
];
const CONTENT_TYPES: &[&str] = &[
    "application/json",
    "application/json; charset=utf-16",
    "application/json; charset=UTF-16LE",
    "text/plain; charset=utf-32be",
    "text/plain; charset=iso-8859-1",
    "application/json; charset=shift_jis",
    "multipart/form-data; boundary=x",
    "",
];
const LIMITS: &[usize] = &[0, 1, 64, 4096, 1 << 20];

fuzz_target!(|data: &[u8]| {
    let [select, limit, body @ ..] = data else { return };
    let encoding = ENCODINGS[usize::from(*select) % ENCODINGS.len()];
    let max = LIMITS[usize::from(*limit) % LIMITS.len()];

    // Any body's text decodes to UTF-8 or names the charset it cannot
    // decode.
    let content_type = CONTENT_TYPES[usize::from(*limit) % CONTENT_TYPES.len()];
    match decode_charset(Some(content_type).filter(|c| !c.is_empty()), body) {
        Ok(text) if text.from.is_some() => {
            assert!(std::str::from_utf8(&text.text).is_ok(), "{content_type}: transcoded text is not UTF-8");
        }
        Ok(_) => {}
        Err(error) => assert!(content_type.contains("shift_jis"), "{content_type}: {error}"),
    }

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
