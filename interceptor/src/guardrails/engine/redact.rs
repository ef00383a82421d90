//! Rewriting matched ranges with placeholders, and nothing else.

use super::Finding;

/// `text` with every finding's range replaced by its placeholder. The bytes
/// outside the ranges are copied unchanged. Overlapping ranges are merged
/// into one and take the placeholder of the finding that starts first;
/// ranges that merely touch stay separate. Findings whose range does not fit
/// `text` (not on character boundaries, out of bounds) are skipped: give
/// only the findings of this text.
pub fn redact<'f>(text: &str, findings: impl IntoIterator<Item = &'f Finding>) -> String {
    let mut ranges: Vec<(usize, usize, &str)> = findings
        .into_iter()
        .filter(|f| f.start < f.end && text.get(f.start..f.end).is_some())
        .map(|f| (f.start, f.end, &*f.placeholder))
        .collect();
    ranges.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut iter = ranges.into_iter().peekable();
    while let Some((start, mut end, placeholder)) = iter.next() {
        while let Some(&(s, e, _)) = iter.peek() {
            if s >= end {
                break;
            }
            end = end.max(e);
            iter.next();
        }
        out.push_str(&text[copied..start]);
        out.push_str(placeholder);
        copied = end;
    }
    out.push_str(&text[copied..]);
    out
}
