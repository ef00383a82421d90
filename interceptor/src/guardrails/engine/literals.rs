//! The prescan's literal prefilter: whether a text can match any regex of
//! the engine's combined set, answered by one vectorized multi-literal
//! search (Teddy) instead of a run of the set's lazy DFA over every byte.
//!
//! It owns the literals and the search; the engine still decides: a text
//! the prefilter passes goes on to the set and the detectors, as before.
//!
//! # How
//!
//! Every regex is *folded*: each byte its literals and classes accept goes
//! through [`fold`] (ASCII letters to lower case, ASCII digits to `0`). The
//! prefixes every match of the folded regex starts with are read from its
//! syntax tree; the text is folded the same way and searched for all of
//! them at once. Folding is what makes the literals few and long: a
//! case-insensitive phrase is one literal, not one per spelling, and a run
//! of digits is a run of `0`s.
//!
//! Soundness: [`fold`] maps byte to byte, so where a regex matches a text,
//! the folded regex matches the folded text at the same place (a literal
//! byte stays equal to its text byte, a class keeps the text byte in it,
//! and word characters stay word characters, so `\b` is unchanged), and
//! that match starts with one of the folded regex's prefixes. A regex with
//! no finite set of prefixes (one that starts with a wide class, such as
//! an email address) is matched by its own small set, as before. A text in
//! which neither finds anything cannot match the combined set.
//!
//! The search stays fast only while it is small: at most
//! [`MAX_LITERALS`] literals per Teddy search (literals under
//! [`TEDDY_BYTES`] long in a search of their own, so they do not blunt the
//! others), at most [`MAX_SEARCHES`] searches. Literals that share a long
//! prefix are replaced by it when they would not fit (the 170 spellings of
//! `secret access key` become `secret`): still sound, since a text holding
//! a literal holds its prefix. Past the budget, the set answers alone.
//!
//! Only the regexes of detectors in use are searched for: a rule for MCP
//! tool definitions (whose prefixes are common words such as `send `) does
//! not slow the prescan of a chat request down. There is one prefilter per
//! set of rules that apply, built on first use.

use std::sync::OnceLock;

use aho_corasick::packed;
use regex_syntax::{
    hir::{
        Class, ClassBytes, ClassBytesRange, Hir, HirKind, Repetition,
        literal::{ExtractKind, Extractor},
    },
    utf8::Utf8Sequences,
};

/// Literals per Teddy search: past 32 it switches to its slower 16-bucket
/// form, and its candidates multiply.
const MAX_LITERALS: usize = 32;

/// Searches per text, at most; more would cost about what the set's own
/// pass does.
const MAX_SEARCHES: usize = 4;

/// How many leading bytes of its literals Teddy compares at once, at most.
const TEDDY_BYTES: usize = 4;

/// Literals that share a prefix this long or longer are replaced by it
/// while there are more than one search takes; a shorter one (`you `)
/// would be found in too many plain texts.
const MIN_SHARED: usize = 6;

/// Literals are cut to this length: a longer one filters no better.
const MAX_LITERAL_LEN: usize = 64;

/// A text is folded this many bytes at a time, on the stack; one this
/// short or shorter in a window this short.
const WINDOW: usize = 4096;
const SHORT_WINDOW: usize = 256;

/// Literals shorter than this would be found in nearly every text.
const MIN_LITERAL: usize = 2;

/// Classes of up to this many members (after folding) are spelled out
/// into literals; a wider one ends the literals before it.
const LIMIT_CLASS: usize = 16;

/// The two characters outside ASCII that a case-insensitive regex matches
/// for an ASCII letter (Unicode simple case folding): LATIN SMALL LETTER
/// LONG S for `s` and KELVIN SIGN for `k`. They fold to that letter.
const FOLDS_TO_ASCII: [(char, u8); 2] = [('\u{17F}', b's'), ('\u{212A}', b'k')];

/// Maps one ASCII byte of a text (or of a regex) to its folded form:
/// letters to lower case, digits to `0`, tab, carriage return and line feed
/// to a space. Every other byte maps to itself.
fn fold(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b'0',
        b'\t' | b'\r' | b'\n' => b' ',
        _ => b.to_ascii_lowercase(),
    }
}

/// A character folded: an ASCII one by [`fold`], one of
/// [`FOLDS_TO_ASCII`] to its letter, any other to itself.
fn fold_char(c: char) -> char {
    match FOLDS_TO_ASCII.iter().find(|(from, _)| *from == c) {
        Some(&(_, to)) => char::from(to),
        None if c.is_ascii() => char::from(fold(c as u8)),
        None => c,
    }
}

/// Sets of applying rules are told apart up to this many rules; past it,
/// one prefilter covers every detector (a superset: still sound).
const MAX_KEYED_RULES: usize = 8;

/// The prefilters of one engine: the prefixes of every regex of its set,
/// read once, and a prefilter per set of applying rules.
pub(super) struct Prefilters {
    regexes: Vec<String>,
    /// Each regex's detector.
    detectors: Vec<usize>,
    /// Each regex's folded prefixes (`None`: it has no finite set).
    prefixes: Vec<Option<Vec<Vec<u8>>>>,
    /// Indexed by the set of applying rules (a bit per rule), or one entry
    /// when there are too many rules to tell their sets apart.
    built: Box<[OnceLock<Option<Prefilter>>]>,
}

impl Prefilters {
    /// `regexes` are the combined set's, with each one's detector; `rules`
    /// is the number of the engine's rules.
    pub(super) fn new(regexes: Vec<String>, detectors: Vec<usize>, rules: usize) -> Self {
        let prefixes = regexes.iter().map(|r| prefixes(r)).collect();
        let keyed = if rules <= MAX_KEYED_RULES { 1 << rules } else { 1 };
        Self { regexes, detectors, prefixes, built: (0..keyed).map(|_| OnceLock::new()).collect() }
    }

    /// The prefilter when the rules in `applying` (a bit per rule) apply,
    /// which puts the detectors in `active` in use.
    pub(super) fn get(&self, applying: u64, active: &[bool]) -> Option<&Prefilter> {
        let keyed = self.built.len() > 1;
        let slot = if keyed { usize::try_from(applying).ok().and_then(|i| self.built.get(i))? } else { &self.built[0] };
        slot.get_or_init(|| {
            let used = |i: usize| !keyed || active.get(self.detectors[i]).copied().unwrap_or(true);
            Prefilter::build(
                (0..self.regexes.len()).filter(|&i| used(i)).map(|i| (&self.regexes[i], &self.prefixes[i])),
            )
        })
        .as_ref()
    }
}

/// The literal search and the regexes it does not cover.
pub(super) struct Prefilter {
    /// Each searches for a share of the literals (Teddy is fast for a few
    /// dozen at a time).
    searchers: Vec<Search>,
    /// The longest literal's length (at most [`MAX_LITERAL_LEN`]).
    longest: usize,
    /// The regexes without a finite set of prefixes, as a set.
    rest: Option<regex::RegexSet>,
    /// No regex of `rest` looks for the start or end of a text or line
    /// ([`Prefilter::searches_within`]).
    rest_unanchored: bool,
}

impl Prefilter {
    /// The prefilter of `regexes` (each with its prefixes), or `None` when
    /// their literals would not make a fast search: the combined set then
    /// answers alone.
    fn build<'r>(regexes: impl Iterator<Item = (&'r String, &'r Option<Vec<Vec<u8>>>)>) -> Option<Self> {
        let mut literals: Vec<Vec<u8>> = Vec::new();
        let mut rest = Vec::new();
        for (regex, prefixes) in regexes {
            match prefixes {
                Some(found) => literals.extend(found.iter().cloned()),
                None => rest.push(regex.as_str()),
            }
        }
        let literals = fewest(literals.into_iter().map(|mut l| {
            l.truncate(MAX_LITERAL_LEN);
            l
        }));
        let longest = literals.iter().map(Vec::len).max()?;
        // Teddy looks at as many leading bytes as its shortest literal has
        // (up to 4): the short literals go apart, not to blunt the others.
        let (short, long): (Vec<_>, Vec<_>) = literals.into_iter().partition(|l| l.len() < TEDDY_BYTES);
        let mut searchers = Vec::new();
        for group in [short, long].iter().filter(|g| !g.is_empty()) {
            let per_search = group.len().div_ceil(group.len().div_ceil(MAX_LITERALS));
            for chunk in group.chunks(per_search) {
                searchers.push(Search::new(chunk)?);
            }
        }
        if searchers.len() > MAX_SEARCHES {
            return None;
        }
        let rest_unanchored =
            rest.iter().all(|r| regex_syntax::parse(r).is_ok_and(|hir| !hir.properties().look_set().contains_anchor()));
        let rest = if rest.is_empty() { None } else { Some(regex::RegexSet::new(rest).ok()?) };
        Some(Self { searchers, longest, rest, rest_unanchored })
    }

    /// Whether [`Prefilter::find_in`] can stand for [`Prefilter::may_match`]
    /// on each text that stands in `outer` between two non-word characters:
    /// no character of `outer` folds to a shorter one, and no regex of
    /// `rest` (which `find_in` does not look for) matches `outer` or looks
    /// for the start or end of a text or line. A regex that matches a text
    /// matches it where it stands in `outer`: its first and last characters
    /// have the same non-word neighbours for `\b` as at a text's edges.
    pub(super) fn searches_within(&self, outer: &str) -> bool {
        let refolds = !outer.is_ascii() && FOLDS_TO_ASCII.iter().any(|(c, _)| outer.contains(*c));
        !refolds && self.rest_unanchored && !self.rest.as_ref().is_some_and(|r| r.is_match(outer))
    }

    /// Where the first of the literals at or after `from` in `text`
    /// (folded) starts, or `None`: no literal is there. A literal that
    /// starts before the one found and is not found ends after it.
    pub(super) fn find_in(&self, text: &str, from: usize) -> Option<usize> {
        self.find(text.as_bytes(), from, true)
    }

    /// Whether `text` may match one of the regexes (`false`: it cannot).
    pub(super) fn may_match(&self, text: &str) -> bool {
        let found = if !text.is_ascii() && FOLDS_TO_ASCII.iter().any(|(c, _)| text.contains(*c)) {
            // Rare: characters that fold to a shorter one. Folding the
            // result again by bytes changes nothing.
            self.finds(text.chars().map(fold_char).collect::<String>().as_bytes())
        } else {
            self.finds(text.as_bytes())
        };
        found || self.rest.as_ref().is_some_and(|r| r.is_match(text))
    }

    /// Whether `text`, folded, holds a literal.
    fn finds(&self, text: &[u8]) -> bool {
        self.find(text, 0, false).is_some()
    }

    /// [`Prefilter::find_from`] in a window fit for what is left of `text`:
    /// most texts are short, and not worth clearing a whole window for.
    fn find(&self, text: &[u8], from: usize, first: bool) -> Option<usize> {
        if text.len().saturating_sub(from) <= SHORT_WINDOW {
            self.find_from::<SHORT_WINDOW>(text, from, first)
        } else {
            self.find_from::<WINDOW>(text, from, first)
        }
    }

    /// Where a literal at or after `from` in `text` (folded) starts: the
    /// first one when `first`, else whichever a search finds. `text` is
    /// folded `N` bytes at a time on the stack, each window starting early
    /// enough to hold any literal that the one before cut (`N` is longer
    /// than any literal), so a literal found in a window is the first of
    /// those it holds whole.
    fn find_from<const N: usize>(&self, text: &[u8], from: usize, first: bool) -> Option<usize> {
        let mut window = [0u8; N];
        let mut start = from;
        while start < text.len() {
            let end = (start + N).min(text.len());
            let folded = &mut window[..end - start];
            for (to, &from) in folded.iter_mut().zip(&text[start..end]) {
                *to = fold(from);
            }
            let mut found = self.searchers.iter().filter_map(|s| s.find(folded));
            if let Some(at) = if first { found.min() } else { found.next() } {
                return Some(start + at);
            }
            if end == text.len() {
                break;
            }
            start = end - (self.longest - 1);
        }
        None
    }
}

/// One search for some of the literals.
enum Search {
    /// A single literal: a plain substring search.
    One(memchr::memmem::Finder<'static>),
    /// Several, at once (Teddy).
    Many(packed::Searcher),
}

impl Search {
    fn new(literals: &[Vec<u8>]) -> Option<Self> {
        match literals {
            [one] => Some(Self::One(memchr::memmem::Finder::new(one).into_owned())),
            _ => packed::Config::new().builder().extend(literals).build().map(Self::Many),
        }
    }

    /// Where the first of the literals in `text` starts.
    fn find(&self, text: &[u8]) -> Option<usize> {
        match self {
            Self::One(finder) => finder.find(text),
            Self::Many(searcher) => searcher.find(text).map(|m| m.start()),
        }
    }
}

/// `literals` made few enough for a fast search. Duplicates go,
/// and so does a literal that starts with another (whatever text holds the
/// one holds the other); while there are still too many, the literals that
/// share the longest prefix are replaced by it, so that what is searched
/// for stays as long, and as rare in plain text, as the budget allows.
fn fewest(literals: impl Iterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
    let mut literals: Vec<Vec<u8>> = literals.collect();
    loop {
        literals.sort_unstable();
        literals.dedup();
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(literals.len());
        for literal in literals {
            if !kept.last().is_some_and(|k| literal.starts_with(k)) {
                kept.push(literal);
            }
        }
        literals = kept;
        if literals.len() <= MAX_LITERALS {
            return literals;
        }
        // Sorted, the longest shared prefix is one of two neighbours'.
        let common = |a: &[u8], b: &[u8]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let Some(pair) = literals.windows(2).max_by_key(|w| common(&w[0], &w[1])) else { return literals };
        let longest = common(&pair[0], &pair[1]);
        if longest < MIN_SHARED {
            return literals;
        }
        let shared = pair[0][..longest].to_vec();
        literals.push(shared);
    }
}

/// The folded prefixes every match of `regex` starts with; `None` when
/// there is no finite set of them, when one is too short to filter
/// anything, or when the regex does not parse or matches raw bytes outside
/// ASCII (which folding characters would not preserve).
fn prefixes(regex: &str) -> Option<Vec<Vec<u8>>> {
    let hir = regex_syntax::parse(regex).ok()?;
    let seq = Extractor::new().kind(ExtractKind::Prefix).limit_class(LIMIT_CLASS).extract(&folded(&hir)?);
    let literals = seq.literals()?;
    if literals.is_empty() || literals.iter().any(|l| l.as_bytes().len() < MIN_LITERAL) {
        return None;
    }
    Some(literals.iter().map(|l| l.as_bytes().to_vec()).collect())
}

/// `hir` with every character it accepts put through [`fold_char`], as
/// bytes: the part of a class outside ASCII becomes the alternation of its
/// UTF-8 encodings, so that a wide one still yields its leading bytes.
/// Captures are dropped (they match what their content does). `None` for
/// a regex that matches raw bytes outside ASCII.
fn folded(hir: &Hir) -> Option<Hir> {
    let class = |members: Vec<(u8, u8)>| {
        let ranges = members.into_iter().map(|(a, b)| ClassBytesRange::new(a, b));
        Hir::class(Class::Bytes(ClassBytes::new(ranges)))
    };
    Some(match hir.kind() {
        HirKind::Empty => Hir::empty(),
        HirKind::Look(look) => Hir::look(*look),
        HirKind::Literal(literal) => {
            let text = std::str::from_utf8(&literal.0).ok()?;
            Hir::literal(text.chars().map(fold_char).collect::<String>().into_bytes())
        }
        HirKind::Class(Class::Unicode(unicode)) => {
            let mut ascii = Vec::new();
            let mut wide = Vec::new();
            for r in unicode.ranges() {
                for c in u32::from(r.start())..=u32::from(r.end()).min(0x7F) {
                    let b = fold(c as u8);
                    ascii.push((b, b));
                }
                if r.end() > '\u{7F}' {
                    wide.push((r.start().max('\u{80}'), r.end()));
                }
            }
            // The characters that fold to a letter leave their range for it.
            for (c, to) in FOLDS_TO_ASCII {
                let Some(i) = wide.iter().position(|(a, b)| (*a..=*b).contains(&c)) else { continue };
                let (a, b) = wide.swap_remove(i);
                let (before, after) = (char::from_u32(u32::from(c) - 1)?, char::from_u32(u32::from(c) + 1)?);
                wide.extend([(a, before), (after, b)].into_iter().filter(|(a, b)| a <= b));
                ascii.push((to, to));
            }
            let mut alternatives = vec![class(ascii)];
            for (a, b) in wide {
                for seq in Utf8Sequences::new(a, b) {
                    alternatives
                        .push(Hir::concat(seq.as_slice().iter().map(|r| class(vec![(r.start, r.end)])).collect()));
                }
            }
            Hir::alternation(alternatives)
        }
        HirKind::Class(Class::Bytes(bytes)) => {
            if bytes.ranges().iter().any(|r| r.end() > 0x7F) {
                return None;
            }
            class(bytes.ranges().iter().flat_map(|r| r.start()..=r.end()).map(|b| (fold(b), fold(b))).collect())
        }
        HirKind::Repetition(rep) => Hir::repetition(Repetition { sub: Box::new(folded(&rep.sub)?), ..rep.clone() }),
        HirKind::Capture(capture) => folded(&capture.sub)?,
        HirKind::Concat(subs) => Hir::concat(subs.iter().map(folded).collect::<Option<_>>()?),
        HirKind::Alternation(subs) => Hir::alternation(subs.iter().map(folded).collect::<Option<_>>()?),
    })
}

#[cfg(test)]
fn of(regexes: &[&str]) -> Option<Prefilter> {
    let regexes: Vec<(String, Option<Vec<Vec<u8>>>)> = regexes.iter().map(|r| (r.to_string(), prefixes(r))).collect();
    Prefilter::build(regexes.iter().map(|(r, p)| (r, p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folding_keeps_what_a_regex_matches() {
        let cases = [
            (r"(?i:ignore previous instructions)", "Please IGNORE Previous instructions now"),
            (r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)", "key AKIA0123456789ABCDEF here"),
            (r"(?-u:\b)[0-9]{3}[- ][0-9]{2}[- ][0-9]{4}(?-u:\b)", "ssn 123-45-6789."),
            (r"[\x{200B}\x{2060}-\x{2064}]+", "a\u{2063}b"),
            (r"(?i:k)elvin", "\u{212A}elvin"),
        ];
        for (regex, text) in cases {
            let filter = of(&[regex]).expect(regex);
            assert!(regex::Regex::new(regex).unwrap().is_match(text), "{regex}");
            assert!(filter.may_match(text), "{regex} on {text:?}");
            assert!(!filter.may_match("nothing of the kind"), "{regex}");
        }
    }

    #[test]
    fn a_regex_without_prefixes_is_matched_by_the_rest() {
        let filter = of(&["sk-[a-z]{4}", "[a-z]+@[a-z]+\\.com"]).unwrap();
        assert!(filter.rest.is_some());
        assert!(filter.may_match("mail me at a@b.com"));
        assert!(filter.may_match("SK-abcd"));
        assert!(!filter.may_match("plain words"));
    }

    #[test]
    fn short_or_missing_literals_leave_the_set_to_answer() {
        assert!(of(&["a[b-z]+"]).is_none());
        assert!(of(&["[a-z]+@x"]).is_none());
        // Two digits fold to one literal of two bytes: long enough.
        assert!(of(&["[0-9]{2}"]).is_some());
    }

    #[test]
    fn a_literal_across_windows_is_found() {
        let filter = of(&["(?i:ignore previous instructions)"]).unwrap();
        let phrase = "IGNORE previous\ninstructions";
        for before in (WINDOW - phrase.len()..WINDOW + 2).chain([3 * WINDOW - 7]) {
            let text = format!("{}{phrase} then more", "x".repeat(before));
            assert!(filter.may_match(&text), "after {before} bytes");
            let cut = format!("{}{}", "x".repeat(before), &phrase[..phrase.len() - 1]);
            assert!(!filter.may_match(&cut), "after {before} bytes");
        }
    }

    #[test]
    fn too_many_literals_give_way_to_their_longest_shared_prefixes() {
        let mut literals: Vec<Vec<u8>> =
            (0..40).map(|i| format!("secret access key number {i:02}").into_bytes()).collect();
        literals.extend([b"you are now dan".to_vec(), b"you have no restrictions".to_vec(), b"sk-".to_vec()]);
        let kept = fewest(literals.into_iter());
        assert!(kept.len() <= MAX_LITERALS, "{}", kept.len());
        // The numbers share the most: some merge to their tens, no shorter;
        // `you ` is too short to merge to.
        let numbers: Vec<&Vec<u8>> = kept.iter().filter(|l| l.starts_with(b"secret")).collect();
        assert!(numbers.iter().all(|l| l.len() >= b"secret access key number 0".len()), "{kept:?}");
        assert!(numbers.contains(&&b"secret access key number 3".to_vec()), "{kept:?}");
        assert!(kept.contains(&b"you are now dan".to_vec()) && kept.contains(&b"sk-".to_vec()));
        // Too many that share nothing long: kept whole, in several searches.
        let distinct: Vec<String> =
            (0..100u8).map(|i| format!("{}{}zz", char::from(b'a' + i % 26), char::from(b'a' + i / 26))).collect();
        let filter = of(&distinct.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
        assert_eq!(filter.searchers.len(), 4);
        assert!(filter.may_match("the word ADZZ and more") && !filter.may_match("zzzz"));
        let more: Vec<String> =
            (0..130u8).map(|i| format!("{}{}zz", char::from(b'a' + i % 26), char::from(b'a' + i / 26))).collect();
        assert!(of(&more.iter().map(String::as_str).collect::<Vec<_>>()).is_none(), "past the budget, the set answers");
    }
}
