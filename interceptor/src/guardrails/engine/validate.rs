//! Checks run on a regex candidate before it becomes a finding: checksums
//! (Luhn, IBAN mod-97), number-plan rules (SSN areas, IPv4 octets), shape
//! rules that regexes cannot express without look-around (what may stand
//! next to a match), and the ends of private key blocks.
//!
//! Every function takes the whole text and the candidate's byte range, so it
//! can look at the neighbours. Ranges always come from the regex engine and
//! lie on character boundaries.

use std::ops::Range;

use base64::Engine as _;

/// The byte before `start`, if any.
fn before(text: &str, start: usize) -> Option<u8> {
    start.checked_sub(1).and_then(|i| text.as_bytes().get(i).copied())
}

/// The byte at `end`, if any.
fn after(text: &str, end: usize) -> Option<u8> {
    text.as_bytes().get(end).copied()
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'+' || b == b'/'
}

/// Whether `s` has an ASCII lowercase letter, an uppercase letter and a digit.
fn mixed_classes(s: &str) -> bool {
    let b = s.as_bytes();
    b.iter().any(u8::is_ascii_lowercase) && b.iter().any(u8::is_ascii_uppercase) && b.iter().any(u8::is_ascii_digit)
}

fn digits(s: &str) -> impl Iterator<Item = u8> + '_ {
    s.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0')
}

/// The Luhn checksum over the ASCII digits of `s` (other bytes are skipped).
pub(super) fn luhn(s: &str) -> bool {
    let mut sum = 0u32;
    let mut n = 0usize;
    for (i, d) in s.bytes().rev().filter(u8::is_ascii_digit).map(|b| u32::from(b - b'0')).enumerate() {
        sum += if i % 2 == 1 {
            let x = d * 2;
            if x > 9 { x - 9 } else { x }
        } else {
            d
        };
        n += 1;
    }
    n > 0 && sum.is_multiple_of(10)
}

/// A payment card number: 13 to 19 digits, one kind of separator at most,
/// a first digit issuers use (2 to 6), and a valid Luhn checksum.
pub(super) fn credit_card(text: &str, r: Range<usize>) -> bool {
    let s = &text[r];
    let mut seps = s.bytes().filter(|b| !b.is_ascii_digit());
    if let Some(first) = seps.next()
        && seps.any(|b| b != first)
    {
        return false;
    }
    let n = digits(s).count();
    (13..=19).contains(&n) && digits(s).next().is_some_and(|d| (2..=6).contains(&d)) && luhn(s)
}

/// A US social security number `AAA-GG-SSSS` (or with spaces): the same
/// separator twice, area not 000, 666 or 9xx, group not 00, serial not 0000,
/// and not part of a longer dashed number.
pub(super) fn us_ssn(text: &str, r: Range<usize>) -> bool {
    let b = &text.as_bytes()[r.clone()];
    if b.len() != 11 || b[3] != b[6] {
        return false;
    }
    let area = &b[0..3];
    if area == b"000" || area == b"666" || area[0] == b'9' || &b[4..6] == b"00" || &b[7..11] == b"0000" {
        return false;
    }
    let dashed_before = before(text, r.start).is_some_and(|c| c == b'-' || c == b'.')
        && r.start.checked_sub(2).and_then(|i| text.as_bytes().get(i)).is_some_and(u8::is_ascii_digit);
    !dashed_before && !continues_number(text, r.end)
}

/// Whether a separator and a digit follow `end` (the match is the start of a
/// longer dotted or dashed number, a version string, a date, an OID).
fn continues_number(text: &str, end: usize) -> bool {
    let b = text.as_bytes();
    matches!(b.get(end), Some(b'-' | b'.')) && b.get(end + 1).is_some_and(u8::is_ascii_digit)
}

/// Expected IBAN length per country (ISO 13616 registry).
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HN", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
    (b"YE", 30),
];

/// An IBAN: a registered country code with its exact length, and the ISO
/// 7064 mod-97 check (the rearranged number modulo 97 is 1).
pub(super) fn iban(text: &str, r: Range<usize>) -> bool {
    let compact: Vec<u8> = text.as_bytes()[r].iter().copied().filter(|b| *b != b' ').collect();
    let Some(country) = compact.get(..2) else { return false };
    let Some(&(_, len)) = IBAN_LENGTHS.iter().find(|(c, _)| c.as_slice() == country) else { return false };
    if compact.len() != len {
        return false;
    }
    let mut rem = 0u32;
    for &b in compact[4..].iter().chain(&compact[..4]) {
        rem = match b {
            b'0'..=b'9' => (rem * 10 + u32::from(b - b'0')) % 97,
            b'A'..=b'Z' => (rem * 100 + u32::from(b - b'A') + 10) % 97,
            _ => return false,
        };
    }
    rem == 1
}

/// A dotted-quad IPv4 address: octets 0 to 255 without leading zeros, and
/// not part of a longer dotted sequence (`1.2.3.4.5`, an OID).
pub(super) fn ipv4(text: &str, r: Range<usize>) -> bool {
    let s = &text[r.clone()];
    let octets_ok = s.split('.').all(|o| !(o.len() > 1 && o.starts_with('0')) && o.parse::<u8>().is_ok());
    octets_ok && before(text, r.start) != Some(b'.') && !continues_number(text, r.end)
}

/// An IPv6 address as the standard library parses it, standing alone (no
/// word character, `:` or `.` on either side), with at least one decimal
/// digit and two groups (so `Foo::Bar` paths and `::` are not addresses).
pub(super) fn ipv6(text: &str, r: Range<usize>) -> bool {
    let s = &text[r.clone()];
    let lone = !before(text, r.start).is_some_and(|b| is_word(b) || b == b':' || b == b'.')
        && !after(text, r.end).is_some_and(|b| is_word(b) || b == b':');
    let groups = s.split([':', '.']).filter(|g| !g.is_empty()).count();
    lone && groups >= 2 && s.bytes().any(|b| b.is_ascii_digit()) && s.parse::<std::net::Ipv6Addr>().is_ok()
}

/// A phone number: not glued to a word character, `+` or `)` on the left,
/// and not the start of a longer dotted or dashed number on the right.
pub(super) fn phone(text: &str, r: Range<usize>) -> bool {
    let n = digits(&text[r.clone()]).count();
    (10..=15).contains(&n)
        && !before(text, r.start).is_some_and(|b| is_word(b) || b == b'+' || b == b')')
        && !continues_number(text, r.end)
}

/// An e-mail address whose local part neither starts nor ends with a dot.
pub(super) fn email(text: &str, r: Range<usize>) -> bool {
    let s = &text[r];
    s.split_once('@').is_some_and(|(local, _)| !local.starts_with('.') && !local.ends_with('.'))
}

/// A 40-character AWS secret access key: not cut out of a longer base64
/// run, with upper and lower case letters and a digit or symbol.
pub(super) fn aws_secret(text: &str, r: Range<usize>) -> bool {
    let s = &text[r.clone()];
    let b = s.as_bytes();
    !before(text, r.start).is_some_and(is_base64)
        && !after(text, r.end).is_some_and(|c| is_base64(c) || c == b'=')
        && b.iter().any(u8::is_ascii_lowercase)
        && b.iter().any(u8::is_ascii_uppercase)
        && b.iter().any(|c| c.is_ascii_digit() || *c == b'+' || *c == b'/')
}

/// A token that must not continue into more token characters.
pub(super) fn token_end(text: &str, r: Range<usize>) -> bool {
    !after(text, r.end).is_some_and(|b| is_word(b) || b == b'-')
}

/// An OpenAI key: random-looking (mixed case and digits) after the `sk-`
/// prefix, and not an Anthropic key (`sk-ant-`).
pub(super) fn openai_key(text: &str, r: Range<usize>) -> bool {
    let s = &text[r];
    !s.starts_with("sk-ant-") && s.get(3..).is_some_and(mixed_classes)
}

/// A Slack token: long enough and with digits (workspace and user ids).
pub(super) fn slack_token(text: &str, r: Range<usize>) -> bool {
    let s = &text[r];
    s.len() >= 24 && s.bytes().filter(u8::is_ascii_digit).count() >= 6
}

/// A JWT: the header decodes (base64url) to a JSON object with an `alg`.
pub(super) fn jwt(text: &str, r: Range<usize>) -> bool {
    let s = &text[r];
    let Some((header, _)) = s.split_once('.') else { return false };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .is_ok_and(|json| json.starts_with(b"{") && json.windows(5).any(|w| w == b"\"alg\""))
}

/// How far the body of a private key block may run past its header.
const MAX_KEY_BLOCK: usize = 64 * 1024;

const END_MARKER: &[u8] = b"-----END";
const DASHES: &[u8] = b"-----";

/// What the searches for the ends of key blocks found so far in one text,
/// so that the headers of a text (visited left to right) share them: each
/// byte is searched about once, however many headers the text repeats.
/// Without it, every header searched the 64 KiB after it again, and a body
/// of nothing but headers cost about two thousand times a plain one.
#[derive(Debug, Default)]
pub(super) struct KeyBlocks {
    /// Where the last `-----END` search started, and the first marker from
    /// there (`None`: none up to the end of the text).
    marker: Option<(usize, Option<usize>)>,
    /// A marker, and the first `-----` after it (`None`: none at all).
    close: Option<(usize, Option<usize>)>,
    /// The last chain of adjacent blocks: from its first header's end to
    /// its end. A header ending inside it belongs to it.
    chain: Option<(usize, usize)>,
    /// Bytes looked at, for the tests that prove the work is linear.
    examined: usize,
}

impl KeyBlocks {
    /// Bytes looked at so far.
    #[cfg(test)]
    pub(super) fn examined(&self) -> usize {
        self.examined
    }

    /// The first `-----END` at or after `from`; `from` never decreases
    /// between calls on one text.
    fn next_marker(&mut self, b: &[u8], from: usize) -> Option<usize> {
        if let Some((searched_from, found)) = self.marker
            && searched_from <= from
            && found.is_none_or(|at| at >= from)
        {
            return found;
        }
        let found = memchr::memmem::find(&b[from..], END_MARKER).map(|i| from + i);
        self.examined += found.map_or(b.len(), |at| at + END_MARKER.len()) - from;
        self.marker = Some((from, found));
        found
    }

    /// The first `-----` after the marker at `marker`: the end of its line.
    fn closing(&mut self, b: &[u8], marker: usize) -> Option<usize> {
        if let Some((m, found)) = self.close
            && m == marker
        {
            return found;
        }
        let rest = marker + END_MARKER.len();
        let found = memchr::memmem::find(&b[rest..], DASHES).map(|i| rest + i);
        self.examined += found.map_or(b.len(), |at| at + DASHES.len()) - rest;
        self.close = Some((marker, found));
        found
    }
}

/// Extends a `-----BEGIN ... PRIVATE KEY-----` header over the key: to the end
/// of the matching `-----END ...-----` line when there is one within
/// [`MAX_KEY_BLOCK`], otherwise over the base64 body that follows (a
/// truncated key, or one split across stream chunks). Literal `\n` escapes
/// count as line breaks. A header that follows right away (whitespace
/// between) continues the block: adjacent keys are one finding, and a body
/// of nothing but headers is one block, not one finding per header.
///
/// Linear over all the headers of a text: the marker searches and the last
/// chain are shared through `blocks`, and a body run stops at the next
/// header's first `-`, so body runs never overlap.
pub(super) fn private_key_end(text: &str, end: usize, blocks: &mut KeyBlocks) -> usize {
    if let Some((start, chain_end)) = blocks.chain
        && (start..chain_end).contains(&end)
    {
        return chain_end;
    }
    let b = text.as_bytes();
    let mut block_end = one_key_block_end(b, end, blocks);
    loop {
        let next = skip_separators(b, block_end);
        blocks.examined += next - block_end;
        let Some(header_end) = key_header_end(b, next) else { break };
        blocks.examined += header_end - next;
        block_end = one_key_block_end(b, header_end, blocks);
    }
    blocks.chain = Some((end, block_end));
    block_end
}

/// The end of one key block whose header ends at `end`.
fn one_key_block_end(b: &[u8], end: usize, blocks: &mut KeyBlocks) -> usize {
    let limit = (end + MAX_KEY_BLOCK).min(b.len());
    if let Some(marker) = blocks.next_marker(b, end)
        && marker + END_MARKER.len() <= limit
        && let Some(close) = blocks.closing(b, marker)
        && close + DASHES.len() <= limit
    {
        return close + DASHES.len();
    }
    let body = b[end..limit]
        .iter()
        .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=' | b'\r' | b'\n' | b'\\'))
        .count();
    blocks.examined += body + 1;
    end + body
}

/// Past ASCII whitespace and literal `\n` / `\r` escapes from `at`.
fn skip_separators(b: &[u8], mut at: usize) -> usize {
    loop {
        match b.get(at..at + 2) {
            Some([b'\\', b'n' | b'r']) => at += 2,
            _ if b.get(at).is_some_and(u8::is_ascii_whitespace) => at += 1,
            _ => return at,
        }
    }
}

/// The leftmost private key header at or after `at`: what the detector's
/// regex finds there, by a literal search for `-----BEGIN`.
pub(super) fn next_key_header(text: &str, mut at: usize) -> Option<Range<usize>> {
    let b = text.as_bytes();
    loop {
        let start = at + memchr::memmem::find(b.get(at..)?, b"-----BEGIN")?;
        if let Some(end) = key_header_end(b, start) {
            return Some(start..end);
        }
        at = start + 1;
    }
}

/// The end of the private key header starting at `at`, if one does: what
/// the detector's regex `-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----`
/// matches there. Between `-----BEGIN` and the closing dashes every byte is
/// of the class, so the label is the whole run of class bytes.
fn key_header_end(b: &[u8], at: usize) -> Option<usize> {
    const BEGIN: &[u8] = b"-----BEGIN";
    const MAX_LABEL: usize = 40 + " PRIVATE KEY BLOCK".len();
    let rest = b.get(at..)?.strip_prefix(BEGIN)?;
    let label = rest.iter().take(MAX_LABEL + 1).take_while(|c| matches!(c, b'A'..=b'Z' | b'0'..=b'9' | b' ')).count();
    if !rest[label..].starts_with(DASHES) {
        return None;
    }
    let label = &rest[..label];
    let prefix_ok = |suffix: &[u8]| label.strip_suffix(suffix).is_some_and(|p| p.len() <= 40);
    (prefix_ok(b"PRIVATE KEY") || prefix_ok(b"PRIVATE KEY BLOCK"))
        .then(|| at + BEGIN.len() + label.len() + DASHES.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(f: fn(&str, Range<usize>) -> bool, s: &str) -> bool {
        f(s, 0..s.len())
    }

    #[test]
    fn luhn_checksum() {
        assert!(luhn("4111111111111111"));
        assert!(luhn("79927398713"));
        assert!(!luhn("4111111111111112"));
        assert!(!luhn(""));
    }

    #[test]
    fn cards() {
        assert!(whole(credit_card, "4111 1111 1111 1111"));
        assert!(whole(credit_card, "5500-0000-0000-0004"));
        assert!(whole(credit_card, "378282246310005"));
        assert!(!whole(credit_card, "4111 1111-1111 1111"), "mixed separators");
        assert!(!whole(credit_card, "4111111111111112"), "bad checksum");
        assert!(!whole(credit_card, "1000000000000008"), "issuer digit");
        assert!(!whole(credit_card, "0000000000000000"));
    }

    #[test]
    fn ssns() {
        assert!(whole(us_ssn, "123-45-6789"));
        assert!(whole(us_ssn, "123 45 6789"));
        for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000", "123-45 6789"] {
            assert!(!whole(us_ssn, bad), "{bad}");
        }
        assert!(!us_ssn("1-123-45-6789", 2..13));
        assert!(!us_ssn("123-45-6789-1", 0..11));
    }

    #[test]
    fn ibans() {
        assert!(whole(iban, "DE89370400440532013000"));
        assert!(whole(iban, "GB82 WEST 1234 5698 7654 32"));
        assert!(whole(iban, "NO9386011117947"));
        assert!(!whole(iban, "DE89370400440532013001"), "checksum");
        assert!(!whole(iban, "DE8937040044053201300"), "length");
        assert!(!whole(iban, "ZZ89370400440532013000"), "country");
    }

    #[test]
    fn ips() {
        assert!(whole(ipv4, "192.168.1.10"));
        assert!(whole(ipv4, "0.0.0.0"));
        assert!(!whole(ipv4, "999.1.1.1"));
        assert!(!whole(ipv4, "01.2.3.4"));
        assert!(!ipv4("1.2.3.4.5", 0..7));
        assert!(!ipv4("1.2.3.4.5", 2..9));
        assert!(whole(ipv6, "2001:db8::8a2e:370:7334"));
        assert!(whole(ipv6, "fe80::1"));
        assert!(whole(ipv6, "::ffff:192.0.2.1"));
        assert!(!whole(ipv6, "::"));
        assert!(!whole(ipv6, "ab::cd"), "no digit: a path, not an address");
        assert!(!whole(ipv6, "12:34:56"));
        assert!(!ipv6("x::1", 1..4));
    }

    #[test]
    fn jwts() {
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert!(whole(jwt, t));
        assert!(!whole(jwt, "eyJub3RoaW5nIjoxfQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc"), "no alg");
    }

    #[test]
    fn key_block_end() {
        let t = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\nabc=\n-----END RSA PRIVATE KEY-----\nafter";
        let end = private_key_end(t, 31, &mut KeyBlocks::default());
        assert_eq!(&t[end..], "\nafter");
        let t = "-----BEGIN PRIVATE KEY-----\\nMIIEvQIB\\nAAAB then words";
        let end = private_key_end(t, 27, &mut KeyBlocks::default());
        assert_eq!(&t[end..], " then words");
    }

    /// Runs the extender over every header of `text`, as the engine does,
    /// and returns the blocks found and the bytes examined.
    fn key_blocks(text: &str) -> (Vec<std::ops::Range<usize>>, usize) {
        let header = regex::Regex::new(r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----").unwrap();
        let mut blocks = KeyBlocks::default();
        let found = header.find_iter(text).map(|m| m.start()..private_key_end(text, m.end(), &mut blocks)).collect();
        (found, blocks.examined())
    }

    #[test]
    fn key_block_search_is_linear_in_the_text_whatever_the_number_of_headers() {
        let header = "-----BEGIN RSA PRIVATE KEY-----";
        let n = 8192;
        let cases = [
            ("headers only", format!("{header}\n").repeat(n)),
            ("headers glued", header.repeat(n)),
            ("headers, an end marker far away", format!("{}-----END RSA PRIVATE KEY", format!("{header} ").repeat(n))),
            ("headers, each with an unclosed end marker", format!("{header}\n-----END x\n").repeat(n)),
            ("headers with bodies", format!("{header}\nMIIEowIBAAKCAQEA\\n").repeat(n)),
        ];
        for (name, text) in cases {
            let (found, examined) = key_blocks(&text);
            assert_eq!(found.len(), n, "{name}");
            if name.starts_with("headers only") || name.starts_with("headers glued") {
                assert_eq!(found[0], 0..text.len(), "{name}: adjacent headers are one block");
            }
            // Before: every header examined up to 64 KiB after it (here
            // about 8192 * 64 KiB = 512 MiB for a text of under 1 MiB).
            assert!(examined <= 3 * text.len(), "{name}: {examined} bytes examined for a text of {}", text.len());
        }
    }

    #[test]
    fn key_headers_are_recognized_as_the_regex_does() {
        let header = regex::Regex::new(r"^-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----").unwrap();
        let long = "A".repeat(40);
        let too_long = "A".repeat(41);
        for h in [
            "-----BEGIN PRIVATE KEY-----",
            "-----BEGIN RSA PRIVATE KEY-----x",
            "-----BEGIN PGP PRIVATE KEY BLOCK-----",
            "-----BEGIN OPENSSH PRIVATE KEY----------",
            &format!("-----BEGIN{long}PRIVATE KEY-----"),
            &format!("-----BEGIN{long}PRIVATE KEY BLOCK-----"),
            &format!("-----BEGIN{too_long}PRIVATE KEY-----"),
            "-----BEGIN PUBLIC KEY-----",
            "-----BEGIN rsa PRIVATE KEY-----",
            "-----BEGIN PRIVATE KEY----",
            "-----BEGIN PRIVATE KEYS-----",
            "-----BEGIN PRIVATE KEY BLOCK BLOCK-----",
            "-----BEGIN",
            "",
        ] {
            let expected = header.find(h).map(|m| m.end());
            assert_eq!(key_header_end(h.as_bytes(), 0), expected, "{h:?}");
        }
    }

    #[test]
    fn the_header_finder_finds_what_the_regex_finds() {
        let header = regex::Regex::new(r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----").unwrap();
        let text = "x -----BEGIN -----BEGIN RSA PRIVATE KEY----------BEGIN PRIVATE KEY BLOCK----- \
                    -----BEGINPRIVATE KEY----- -----BEGIN PUBLIC KEY----- é-----BEGIN EC PRIVATE KEY-----é";
        for at in 0..=text.len() {
            if text.is_char_boundary(at) {
                assert_eq!(next_key_header(text, at), header.find_at(text, at).map(|m| m.range()), "at {at}");
            }
        }
    }

    #[test]
    fn shared_search_finds_the_same_blocks_as_a_fresh_one() {
        let block = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\nabc=\n-----END RSA PRIVATE KEY-----";
        let text = format!(
            "a {block} b -----BEGIN PRIVATE KEY-----\nMIIB c {block}{} -----BEGIN EC PRIVATE KEY----- -----END",
            " x".repeat(40_000)
        );
        let (shared, _) = key_blocks(&text);
        let header = regex::Regex::new(r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----").unwrap();
        let fresh: Vec<_> = header
            .find_iter(&text)
            .map(|m| m.start()..private_key_end(&text, m.end(), &mut KeyBlocks::default()))
            .collect();
        assert_eq!(shared, fresh);
        assert_eq!(&text[shared[0].clone()], block);
        assert_eq!(shared[1].end, shared[2].end, "an unterminated block runs to the next end line");
        assert_eq!(&text[shared[2].clone()], block);
        assert_eq!(&text[shared[3].clone()], "-----BEGIN EC PRIVATE KEY-----", "the end marker has no closing dashes");

        // Adjacent blocks are one, from any of their headers.
        let two = format!("{block}\n{block}\\n {block} end");
        let (found, _) = key_blocks(&two);
        assert_eq!(found.len(), 3);
        assert!(found.iter().all(|r| r.end == two.len() - " end".len()), "{found:?}");
        let fresh = private_key_end(&two, two.rfind("-----BEGIN").unwrap() + 31, &mut KeyBlocks::default());
        assert_eq!(fresh, found[0].end);
    }
}
