//! Input layout shared by the stream targets, simple enough to write seeds
//! by hand: one byte `n`, then `n` chunk lengths (one byte each, at most
//! 255), then the stream. The stream is cut at those lengths, the rest being
//! the last chunk.

#![allow(dead_code)]

/// Splits `data` into (cuts, stream).
pub fn cuts_and_stream(data: &[u8]) -> (&[u8], &[u8]) {
    match data.split_first() {
        Some((&n, rest)) => rest.split_at(usize::from(n).min(rest.len())),
        None => (&[], &[]),
    }
}

/// `stream` cut into chunks of the given lengths, then the rest.
pub fn chunks<'a>(cuts: &[u8], stream: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut rest = stream;
    for &cut in cuts {
        let (a, b) = rest.split_at(usize::from(cut).min(rest.len()));
        out.push(a);
        rest = b;
    }
    out.push(rest);
    out
}
