//! `Content-Encoding` decompression with a hard output limit, and the inverse
//! for re-encoding a modified body.
//!
//! Decoders are streamed into a buffer whose capacity never exceeds the limit,
//! so a compression bomb costs at most `max_decoded` bytes (plus the
//! decoders' fixed state: zstd's window is capped too). A ratio limit stops
//! earlier still: a body may not decode to more than `max_ratio` times its
//! compressed size, so a 100-byte bomb is refused after a few kilobytes. Stacked encodings
//! (`gzip, br`) were applied in listed order, so they are undone in reverse.
//!
//! Re-encoding: [`encode_like`] reproduces the same stack. The pipeline may
//! instead send a modified body as identity and drop `Content-Encoding`
//! (always acceptable to a client and to providers); either is correct, and
//! identity avoids spending CPU on recompression.

use std::{
    borrow::Cow,
    io::{self, Read, Write},
};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("decoded body exceeds the {max} byte limit")]
    TooLarge { max: usize },
    #[error("body decompresses to more than {max_ratio} times its {compressed} bytes")]
    RatioExceeded { max_ratio: usize, compressed: usize },
    #[error("unsupported content-encoding {encoding:?}")]
    Unsupported { encoding: String },
    #[error("corrupt {encoding} data")]
    Corrupt {
        encoding: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{encoding} encoding failed")]
    Encode {
        encoding: &'static str,
        #[source]
        source: io::Error,
    },
}

impl DecodeError {
    /// The body is too large to inspect (a limit, not corruption).
    pub fn is_oversize(&self) -> bool {
        matches!(self, Self::TooLarge { .. } | Self::RatioExceeded { .. })
    }
}

/// One supported content coding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    /// HTTP `deflate`: zlib-wrapped per RFC 9110, but raw deflate is common
    /// enough in the wild that the decoder accepts both.
    Deflate,
    Brotli,
    Zstd,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Deflate => "deflate",
            Self::Brotli => "br",
            Self::Zstd => "zstd",
        }
    }
}

/// Parses a `Content-Encoding` value into codings in the order they were
/// applied; `identity` and empty entries are skipped.
pub fn parse_encodings(content_encoding: Option<&str>) -> Result<Vec<Encoding>, DecodeError> {
    let Some(value) = content_encoding else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for token in value.split(',') {
        let token = token.trim();
        if token.is_empty() || token.eq_ignore_ascii_case("identity") {
            continue;
        }
        let enc = match token.to_ascii_lowercase().as_str() {
            "gzip" | "x-gzip" => Encoding::Gzip,
            "deflate" => Encoding::Deflate,
            "br" => Encoding::Brotli,
            "zstd" => Encoding::Zstd,
            _ => return Err(DecodeError::Unsupported { encoding: token.to_owned() }),
        };
        out.push(enc);
    }
    Ok(out)
}

/// Decodes `body` per `content_encoding`, refusing to produce more than
/// `max_decoded` bytes. An identity body is borrowed, not copied (and is held
/// to the same limit).
pub fn decode_body<'a>(
    content_encoding: Option<&str>,
    body: &'a [u8],
    max_decoded: usize,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    decode_body_bounded(content_encoding, body, max_decoded, usize::MAX)
}

/// [`decode_body`] that also refuses to decode to more than `max_ratio`
/// times the compressed size (every layer of a stack is held to the size of
/// the body as received).
pub fn decode_body_bounded<'a>(
    content_encoding: Option<&str>,
    body: &'a [u8],
    max_decoded: usize,
    max_ratio: usize,
) -> Result<Cow<'a, [u8]>, DecodeError> {
    let encodings = parse_encodings(content_encoding)?;
    if encodings.is_empty() || body.is_empty() {
        if body.len() > max_decoded {
            return Err(DecodeError::TooLarge { max: max_decoded });
        }
        return Ok(Cow::Borrowed(body));
    }
    let by_ratio = body.len().saturating_mul(max_ratio.max(1));
    let cap = max_decoded.min(by_ratio);
    let mut current: Cow<'a, [u8]> = Cow::Borrowed(body);
    for enc in encodings.into_iter().rev() {
        let decoded = match decode_one(enc, &current, cap) {
            Err(DecodeError::TooLarge { .. }) if by_ratio < max_decoded => {
                return Err(DecodeError::RatioExceeded { max_ratio, compressed: body.len() });
            }
            other => other?,
        };
        current = Cow::Owned(decoded);
    }
    Ok(current)
}

fn decode_one(enc: Encoding, input: &[u8], max: usize) -> Result<Vec<u8>, DecodeError> {
    let corrupt = |source| DecodeError::Corrupt { encoding: enc.as_str(), source };
    match enc {
        Encoding::Gzip => read_limited(flate2::read::MultiGzDecoder::new(input), enc, max, input.len()),
        Encoding::Deflate => {
            // A raw stream can start with bytes that pass the zlib header
            // check; fall back to raw when zlib decoding fails.
            let raw = || read_limited(flate2::read::DeflateDecoder::new(input), enc, max, input.len());
            if !looks_like_zlib(input) {
                return raw();
            }
            match read_limited(flate2::read::ZlibDecoder::new(input), enc, max, input.len()) {
                Err(DecodeError::Corrupt { .. }) => raw(),
                other => other,
            }
        }
        Encoding::Brotli => read_limited(brotli::Decompressor::new(input, 16 * 1024), enc, max, input.len()),
        Encoding::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(input).map_err(corrupt)?;
            // A frame may declare a window of up to 2 GiB and zstd would
            // allocate it: cap it near the output limit (but allow the 8 MiB
            // window high compression levels use).
            d.window_log_max(zstd_window_log(max)).map_err(corrupt)?;
            read_limited(d, enc, max, input.len())
        }
    }
}

fn zstd_window_log(max: usize) -> u32 {
    let needed = usize::BITS - max.saturating_sub(1).leading_zeros();
    needed.clamp(23, 31)
}

/// RFC 1950 header: CM = 8, CINFO <= 7, and the 16-bit header a multiple of 31.
fn looks_like_zlib(input: &[u8]) -> bool {
    match input {
        [cmf, flg, ..] => cmf & 0x0f == 8 && cmf >> 4 <= 7 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0,
        _ => false,
    }
}

fn read_limited(mut r: impl Read, enc: Encoding, max: usize, input_len: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out: Vec<u8> = Vec::with_capacity(input_len.saturating_mul(4).max(1024).min(max));
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(DecodeError::Corrupt { encoding: enc.as_str(), source }),
        };
        let need = out.len() + n;
        if need > max {
            return Err(DecodeError::TooLarge { max });
        }
        if need > out.capacity() {
            // Double, but never past the limit.
            let target = need.max(out.capacity().saturating_mul(2)).min(max);
            out.reserve_exact(target - out.len());
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(out)
}

/// Encodes `body` with the same stack of codings as `content_encoding`.
pub fn encode_like(content_encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let mut current = body.to_vec();
    for enc in parse_encodings(content_encoding)? {
        let failed = |source| DecodeError::Encode { encoding: enc.as_str(), source };
        current = match enc {
            Encoding::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&current).map_err(failed)?;
                e.finish().map_err(failed)?
            }
            Encoding::Deflate => {
                let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(&current).map_err(failed)?;
                e.finish().map_err(failed)?
            }
            Encoding::Brotli => {
                let mut out = Vec::new();
                {
                    // Quality 5, 4 MiB window: the usual on-the-fly setting.
                    let mut w = brotli::CompressorWriter::new(&mut out, 16 * 1024, 5, 22);
                    w.write_all(&current).map_err(failed)?;
                    w.flush().map_err(failed)?;
                }
                out
            }
            Encoding::Zstd => zstd::stream::encode_all(current.as_slice(), 3).map_err(failed)?,
        };
    }
    Ok(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &[u8] = b"{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"hello hello hello\"}]}";

    #[test]
    fn identity_is_borrowed() {
        for ce in [None, Some(""), Some("identity"), Some(" Identity ")] {
            let out = decode_body(ce, TEXT, 1 << 20).unwrap();
            assert!(matches!(out, Cow::Borrowed(_)));
            assert_eq!(&*out, TEXT);
        }
        assert!(matches!(decode_body(None, TEXT, 10), Err(DecodeError::TooLarge { max: 10 })));
    }

    #[test]
    fn each_encoding_round_trips() {
        for ce in ["gzip", "x-gzip", "deflate", "br", "zstd", "GZIP", "gzip, br", "br,zstd, deflate", "identity, gzip"]
        {
            let encoded = encode_like(Some(ce), TEXT).unwrap();
            assert_ne!(encoded, TEXT, "{ce}");
            let decoded = decode_body(Some(ce), &encoded, 1 << 20).unwrap();
            assert_eq!(&*decoded, TEXT, "{ce}");
        }
    }

    #[test]
    fn raw_deflate_is_accepted() {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(TEXT).unwrap();
        let raw = e.finish().unwrap();
        assert_eq!(&*decode_body(Some("deflate"), &raw, 1 << 20).unwrap(), TEXT);
    }

    #[test]
    fn concatenated_gzip_members() {
        let mut both = encode_like(Some("gzip"), b"abc").unwrap();
        both.extend(encode_like(Some("gzip"), b"def").unwrap());
        assert_eq!(&*decode_body(Some("gzip"), &both, 100).unwrap(), b"abcdef");
    }

    #[test]
    fn stacked_order_matters() {
        let encoded = encode_like(Some("gzip, br"), TEXT).unwrap();
        assert!(decode_body(Some("br, gzip"), &encoded, 1 << 20).is_err());
    }

    #[test]
    fn bombs_hit_the_limit() {
        let zeros = vec![0u8; 8 << 20];
        for ce in ["gzip", "deflate", "br", "zstd", "gzip, zstd"] {
            let bomb = encode_like(Some(ce), &zeros).unwrap();
            assert!(bomb.len() < 64 << 10, "{ce}: {}", bomb.len());
            let r = decode_body(Some(ce), &bomb, 1 << 20);
            assert!(matches!(r, Err(DecodeError::TooLarge { max }) if max == 1 << 20), "{ce}");
            // Exactly at the limit is fine.
            assert_eq!(decode_body(Some(ce), &bomb, 8 << 20).unwrap().len(), 8 << 20);
        }
    }

    #[test]
    fn ratio_stops_a_bomb_long_before_the_size_limit() {
        // 32 MiB of zeros is about 32 kB of gzip and far less of zstd or br.
        let zeros = vec![0u8; 32 << 20];
        for ce in ["gzip", "zstd", "br"] {
            let bomb = encode_like(Some(ce), &zeros).unwrap();
            let r = decode_body_bounded(Some(ce), &bomb, 256 << 20, 100);
            assert!(
                matches!(r, Err(DecodeError::RatioExceeded { max_ratio: 100, compressed }) if compressed == bomb.len()),
                "{ce}: {r:?}"
            );
            assert!(r.unwrap_err().is_oversize());
            // The size limit, when it is the smaller one, is named instead.
            let r = decode_body_bounded(Some(ce), &bomb, 1 << 20, 1_000_000);
            assert!(matches!(r, Err(DecodeError::TooLarge { max }) if max == 1 << 20), "{ce}");
        }
        // Ordinary JSON is far below any sane ratio.
        let encoded = encode_like(Some("gzip"), TEXT).unwrap();
        assert_eq!(&*decode_body_bounded(Some("gzip"), &encoded, 1 << 20, 10).unwrap(), TEXT);
        assert!(!DecodeError::Unsupported { encoding: "x".into() }.is_oversize());
    }

    #[test]
    fn capacity_never_exceeds_limit() {
        let zeros = vec![0u8; 3 << 20];
        let bomb = encode_like(Some("gzip"), &zeros).unwrap();
        let out = read_limited(flate2::read::MultiGzDecoder::new(bomb.as_slice()), Encoding::Gzip, 3 << 20, bomb.len())
            .unwrap();
        assert!(out.capacity() <= 3 << 20);
    }

    #[test]
    fn unsupported_and_corrupt() {
        assert!(matches!(
            decode_body(Some("compress"), TEXT, 100),
            Err(DecodeError::Unsupported { encoding }) if encoding == "compress"
        ));
        for ce in ["gzip", "deflate", "br", "zstd"] {
            let r = decode_body(Some(ce), b"this is not compressed at all, not even a little", 1 << 20);
            assert!(matches!(r, Err(DecodeError::Corrupt { .. })), "{ce}: {r:?}");
        }
        let mut truncated = encode_like(Some("gzip"), TEXT).unwrap();
        truncated.truncate(truncated.len() / 2);
        assert!(matches!(decode_body(Some("gzip"), &truncated, 1 << 20), Err(DecodeError::Corrupt { .. })));
    }

    #[test]
    fn empty_body_with_encoding() {
        assert_eq!(&*decode_body(Some("gzip"), b"", 10).unwrap(), b"");
    }
}
