//! `Content-Encoding` decompression with a hard output limit, the inverse
//! for re-encoding a modified body, and the charset of a body's text
//! ([`decode_charset`]: UTF-16 and UTF-32 JSON become UTF-8 for the parsers).
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
    #[error("unsupported charset {charset:?}")]
    UnsupportedCharset { charset: String },
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
    if body.is_empty() {
        // Nothing to decode, whatever the header says.
        return Ok(Cow::Borrowed(body));
    }
    let encodings = parse_encodings(content_encoding)?;
    if encodings.is_empty() {
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

// ---------------------------------------------------------------------------
// Charsets

/// A text encoding other than UTF-8 that bodies are decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Charset {
    Utf16Le,
    Utf16Be,
    Utf32Le,
    Utf32Be,
    /// Also what `iso-8859-1` and `us-ascii` labels get (as in browsers,
    /// WHATWG Encoding): every byte is a character, so nothing is lost.
    Windows1252,
}

impl Charset {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Utf16Le => "utf-16le",
            Self::Utf16Be => "utf-16be",
            Self::Utf32Le => "utf-32le",
            Self::Utf32Be => "utf-32be",
            Self::Windows1252 => "windows-1252",
        }
    }
}

/// The body's text as UTF-8, and the charset it was decoded from (`None`:
/// the body is used as it is, UTF-8 or binary).
#[derive(Debug)]
pub struct DecodedText<'a> {
    pub text: Cow<'a, [u8]>,
    pub from: Option<Charset>,
}

/// Decodes the text of `body` to UTF-8.
///
/// The charset is, first match wins:
/// 1. a byte order mark (UTF-8's is removed; UTF-16 and UTF-32 in either
///    byte order);
/// 2. the `charset` parameter of `content_type`: `utf-8`, `us-ascii`,
///    `utf-16`/`utf-32` (byte order from the zero-byte pattern below, else
///    big-endian per RFC 2781), `utf-16le`/`be`, `utf-32le`/`be`,
///    `iso-8859-1`/`latin1`/`windows-1252`; any other label is
///    [`DecodeError::UnsupportedCharset`];
/// 3. the pattern of zero bytes in the first four, which is how RFC 4627
///    tells UTF-16 and UTF-32 JSON apart (its first two characters are
///    ASCII): `00 00 00 xx` UTF-32BE, `00 xx 00 xx` UTF-16BE, `xx 00 00 00`
///    UTF-32LE, `xx 00 xx 00` UTF-16LE;
/// 4. otherwise the body as it is.
///
/// UTF-16 and UTF-32 are decoded leniently: an unpaired surrogate or an
/// invalid code point becomes U+FFFD and every other character is kept, so
/// a broken sequence cannot hide the text around it. A `multipart/*` body is
/// left as it is (its parts are binary or UTF-8 and carry their own types).
pub fn decode_charset<'a>(content_type: Option<&str>, body: &'a [u8]) -> Result<DecodedText<'a>, DecodeError> {
    let unchanged = |text: &'a [u8]| DecodedText { text: Cow::Borrowed(text), from: None };
    if body.is_empty() {
        // Nothing to decode, whatever the label says.
        return Ok(unchanged(body));
    }
    let media = content_type.and_then(|ct| ct.split(';').next()).unwrap_or("").trim().to_ascii_lowercase();
    if media.starts_with("multipart/") {
        return Ok(unchanged(body));
    }
    if let Some(rest) = body.strip_prefix(b"\xEF\xBB\xBF") {
        return Ok(unchanged(rest));
    }
    let by_bom = match body {
        [0xFF, 0xFE, 0, 0, ..] => Some((Charset::Utf32Le, 4)),
        [0, 0, 0xFE, 0xFF, ..] => Some((Charset::Utf32Be, 4)),
        [0xFF, 0xFE, ..] => Some((Charset::Utf16Le, 2)),
        [0xFE, 0xFF, ..] => Some((Charset::Utf16Be, 2)),
        _ => None,
    };
    if let Some((charset, bom)) = by_bom {
        return Ok(transcode(charset, &body[bom..]));
    }
    let charset = match content_type.and_then(charset_param) {
        Some(label) => match label.as_str() {
            "utf-8" | "utf8" | "unicode-1-1-utf-8" | "us-ascii" | "ascii" => None,
            "utf-16" => Some(zero_pattern(body).filter(|c| matches!(c, Charset::Utf16Le)).unwrap_or(Charset::Utf16Be)),
            "utf-16le" => Some(Charset::Utf16Le),
            "utf-16be" => Some(Charset::Utf16Be),
            "utf-32" => Some(zero_pattern(body).filter(|c| matches!(c, Charset::Utf32Le)).unwrap_or(Charset::Utf32Be)),
            "utf-32le" => Some(Charset::Utf32Le),
            "utf-32be" => Some(Charset::Utf32Be),
            "iso-8859-1" | "iso8859-1" | "iso_8859-1" | "latin1" | "l1" | "cp819" | "windows-1252" | "cp1252"
            | "x-cp1252" => Some(Charset::Windows1252),
            _ => return Err(DecodeError::UnsupportedCharset { charset: label }),
        },
        None => zero_pattern(body),
    };
    Ok(match charset {
        Some(charset) => transcode(charset, body),
        None => unchanged(body),
    })
}

/// The `charset` parameter of a `Content-Type`, lowercase, unquoted.
fn charset_param(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim().eq_ignore_ascii_case("charset").then(|| value.trim().trim_matches('"').to_ascii_lowercase())
    })
}

/// RFC 4627 section 3: the encoding of JSON text from its first four bytes.
fn zero_pattern(body: &[u8]) -> Option<Charset> {
    match body {
        [0, 0, 0, x, ..] if *x != 0 => Some(Charset::Utf32Be),
        [x, 0, 0, 0, ..] if *x != 0 => Some(Charset::Utf32Le),
        [0, x, 0, y, ..] if *x != 0 && *y != 0 => Some(Charset::Utf16Be),
        [x, 0, y, 0, ..] if *x != 0 && *y != 0 => Some(Charset::Utf16Le),
        // A one-character document.
        [0, x] if *x != 0 => Some(Charset::Utf16Be),
        [x, 0] if *x != 0 => Some(Charset::Utf16Le),
        _ => None,
    }
}

fn transcode(charset: Charset, body: &[u8]) -> DecodedText<'static> {
    let text: String = match charset {
        Charset::Utf16Le | Charset::Utf16Be => {
            let units = body.chunks(2).map(|pair| match (charset, pair) {
                (Charset::Utf16Le, [lo, hi]) => u16::from_le_bytes([*lo, *hi]),
                (_, [hi, lo]) => u16::from_be_bytes([*hi, *lo]),
                // A lone trailing byte.
                _ => 0xFFFD,
            });
            char::decode_utf16(units).map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER)).collect()
        }
        Charset::Utf32Le | Charset::Utf32Be => body
            .chunks(4)
            .map(|quad| {
                let value = match <[u8; 4]>::try_from(quad) {
                    Ok(b) if charset == Charset::Utf32Le => u32::from_le_bytes(b),
                    Ok(b) => u32::from_be_bytes(b),
                    Err(_) => 0xFFFD,
                };
                char::from_u32(value).unwrap_or(char::REPLACEMENT_CHARACTER)
            })
            .collect(),
        Charset::Windows1252 => body.iter().map(|&b| windows_1252(b)).collect(),
    };
    DecodedText { text: Cow::Owned(text.into_bytes()), from: Some(charset) }
}

/// One windows-1252 byte: Latin-1, except 0x80–0x9F (WHATWG's table; the
/// five unassigned bytes map to the C1 controls, as there).
fn windows_1252(b: u8) -> char {
    const HIGH: [char; 32] = [
        '\u{20AC}', '\u{81}', '\u{201A}', '\u{0192}', '\u{201E}', '\u{2026}', '\u{2020}', '\u{2021}', '\u{02C6}',
        '\u{2030}', '\u{0160}', '\u{2039}', '\u{0152}', '\u{8D}', '\u{017D}', '\u{8F}', '\u{90}', '\u{2018}',
        '\u{2019}', '\u{201C}', '\u{201D}', '\u{2022}', '\u{2013}', '\u{2014}', '\u{02DC}', '\u{2122}', '\u{0161}',
        '\u{203A}', '\u{0153}', '\u{9D}', '\u{017E}', '\u{0178}',
    ];
    match b {
        0x80..=0x9F => HIGH[usize::from(b - 0x80)],
        _ => char::from(b),
    }
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

    fn encode_utf16(text: &str, le: bool, bom: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if bom {
            out.extend(if le { [0xFF, 0xFE] } else { [0xFE, 0xFF] });
        }
        for unit in text.encode_utf16() {
            out.extend(if le { unit.to_le_bytes() } else { unit.to_be_bytes() });
        }
        out
    }

    fn encode_utf32(text: &str, le: bool, bom: bool) -> Vec<u8> {
        let mut out = Vec::new();
        if bom {
            out.extend(if le { [0xFF, 0xFE, 0, 0] } else { [0, 0, 0xFE, 0xFF] });
        }
        for c in text.chars() {
            out.extend(if le { u32::from(c).to_le_bytes() } else { u32::from(c).to_be_bytes() });
        }
        out
    }

    const JSON: &str = "{\"messages\":[{\"role\":\"user\",\"content\":\"h\u{e9}llo \u{1F600}\"}]}";

    #[test]
    fn utf16_and_utf32_json_with_and_without_bom() {
        let cases = [
            (encode_utf16(JSON, true, true), Charset::Utf16Le),
            (encode_utf16(JSON, true, false), Charset::Utf16Le),
            (encode_utf16(JSON, false, true), Charset::Utf16Be),
            (encode_utf16(JSON, false, false), Charset::Utf16Be),
            (encode_utf32(JSON, true, true), Charset::Utf32Le),
            (encode_utf32(JSON, true, false), Charset::Utf32Le),
            (encode_utf32(JSON, false, true), Charset::Utf32Be),
            (encode_utf32(JSON, false, false), Charset::Utf32Be),
        ];
        for (body, charset) in cases {
            for ct in [None, Some("application/json"), Some("text/plain; charset=utf-16")] {
                // A declared `utf-16` on UTF-32 is overridden by the BOM only.
                if ct.is_some_and(|c| c.contains("utf-16")) && matches!(charset, Charset::Utf32Le | Charset::Utf32Be) {
                    continue;
                }
                let d = decode_charset(ct, &body).unwrap();
                assert_eq!(d.from, Some(charset), "{charset:?} {ct:?}");
                assert_eq!(std::str::from_utf8(&d.text).unwrap(), JSON, "{charset:?} {ct:?}");
            }
        }
    }

    #[test]
    fn declared_charsets() {
        let le = encode_utf16(JSON, true, false);
        let d = decode_charset(Some("application/json; charset=\"UTF-16LE\""), &le).unwrap();
        assert_eq!((d.from, &*d.text), (Some(Charset::Utf16Le), JSON.as_bytes()));
        // `utf-16` without a BOM or a little-endian pattern is big-endian.
        let be = encode_utf16("\u{4e2d}\u{6587}", false, false);
        let d = decode_charset(Some("text/plain;charset=utf-16"), &be).unwrap();
        assert_eq!(std::str::from_utf8(&d.text).unwrap(), "\u{4e2d}\u{6587}");
        let utf32 = encode_utf32(JSON, false, false);
        let d = decode_charset(Some("application/json; charset=utf-32be"), &utf32).unwrap();
        assert_eq!(&*d.text, JSON.as_bytes());
        // Latin-1 and windows-1252 bytes.
        let d = decode_charset(Some("text/plain; charset=ISO-8859-1"), b"caf\xe9 \x80 \x93x\x94").unwrap();
        assert_eq!(std::str::from_utf8(&d.text).unwrap(), "caf\u{e9} \u{20ac} \u{201c}x\u{201d}");
        // UTF-8 labels and no label leave UTF-8 alone (borrowed), without a BOM.
        for ct in [
            None,
            Some("application/json"),
            Some("application/json; charset=utf-8"),
            Some("text/plain; charset=us-ascii"),
        ] {
            let d = decode_charset(ct, JSON.as_bytes()).unwrap();
            assert!(matches!(d.text, Cow::Borrowed(_)) && d.from.is_none(), "{ct:?}");
        }
        let with_bom = [b"\xEF\xBB\xBF".as_slice(), JSON.as_bytes()].concat();
        assert_eq!(&*decode_charset(None, &with_bom).unwrap().text, JSON.as_bytes());
    }

    #[test]
    fn unknown_charsets_are_errors() {
        for ct in ["application/json; charset=shift_jis", "text/plain; charset=x-user-defined", "a/b; charset=\"\""] {
            assert!(matches!(decode_charset(Some(ct), b"{}"), Err(DecodeError::UnsupportedCharset { .. })), "{ct}");
        }
        assert!(
            decode_charset(Some("application/json; charset=shift_jis"), b"").is_ok(),
            "an empty body needs no decoding"
        );
        // A BOM decides before the label.
        assert!(decode_charset(Some("application/json; charset=shift_jis"), &encode_utf16("{}", true, true)).is_ok());
    }

    #[test]
    fn broken_sequences_keep_the_text_around_them() {
        let mut body = encode_utf16("secret-", true, false);
        body.extend([0x00, 0xD8]); // unpaired high surrogate
        body.extend(encode_utf16("-key", true, false));
        body.push(b'x'); // odd trailing byte
        let d = decode_charset(None, &body).unwrap();
        assert_eq!(std::str::from_utf8(&d.text).unwrap(), "secret-\u{fffd}-key\u{fffd}");
        let mut body = encode_utf32("ab", false, false);
        body.extend([0x00, 0x11, 0x00, 0x00, 0x01]); // past U+10FFFF, then a stray byte
        assert_eq!(std::str::from_utf8(&decode_charset(None, &body).unwrap().text).unwrap(), "ab\u{fffd}\u{fffd}");
    }

    #[test]
    fn binary_and_multipart_are_left_alone() {
        for body in [b"\x89PNG\r\n\x1a\n".as_slice(), b"RIFF\x24\x00\x00\x00WAVE", b"", b"{", b"\x00"] {
            let d = decode_charset(Some("application/octet-stream"), body).unwrap();
            assert!(d.from.is_none(), "{body:?}");
        }
        let utf16 = encode_utf16(JSON, true, true);
        assert!(decode_charset(Some("multipart/form-data; boundary=x"), &utf16).unwrap().from.is_none());
    }

    #[test]
    fn an_empty_body_needs_no_decoding_whatever_the_encoding() {
        assert_eq!(&*decode_body(Some("x-custom"), b"", 10).unwrap(), b"");
        assert!(matches!(decode_body(Some("x-custom"), b"{}", 10), Err(DecodeError::Unsupported { .. })));
    }
}
