//! Incremental splitter for a streamed top-level JSON array, as Gemini's
//! `streamGenerateContent` sends without `alt=sse`: `[{…}\r\n,{…}\r\n]`.
//!
//! Each element is scanned once, byte by byte, tracking string, escape and
//! nesting state; only a complete element is handed to `serde_json`, so the
//! buffer is never re-parsed. A body that is a single top-level object (an
//! error answer instead of an array) is yielded as one element.

use serde_json::Value;

/// Default bound on one element, separators included.
pub const DEFAULT_MAX_ELEMENT_SIZE: usize = 16 << 20;

/// One complete element of the array.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayElement {
    pub value: Value,
    /// Input bytes this element accounts for: everything after the previous
    /// element (the `[` or the `,` and whitespace) through its last byte. The
    /// closing `]` is left in [`JsonArrayStream::buffered_len`].
    pub raw_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum JsonArrayError {
    #[error("unexpected byte {found:#04x} {context}")]
    Unexpected { found: u8, context: &'static str },
    #[error("element exceeds the {max} byte limit")]
    TooLarge { max: usize },
    #[error("element is not valid json")]
    Invalid(#[source] serde_json::Error),
    #[error("stream ends before the array is closed")]
    Truncated,
    #[error("splitter already failed")]
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Before the opening `[` (or a lone top-level object).
    Start,
    /// After `[`: an element or `]`.
    FirstOrEnd,
    /// After `,`: an element.
    Element,
    /// Inside an object or array element.
    Nested,
    /// Inside a string element.
    StringElem,
    /// Inside a number / `true` / `false` / `null` element.
    Scalar,
    /// After an element: `,` or `]`.
    AfterElement,
    /// Inside the single top-level object that replaced the array.
    Single,
    Done,
    Failed,
}

/// Incremental splitter: [`JsonArrayStream::feed`] chunks, collect elements.
#[derive(Debug)]
pub struct JsonArrayStream {
    max_element: usize,
    state: State,
    elem: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Bytes consumed since the last yielded element.
    pending: usize,
    count: usize,
}

impl Default for JsonArrayStream {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ELEMENT_SIZE)
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn is_delim(b: u8) -> bool {
    is_ws(b) || b == b',' || b == b']'
}

impl JsonArrayStream {
    pub fn new(max_element: usize) -> Self {
        Self {
            max_element,
            state: State::Start,
            elem: Vec::new(),
            depth: 0,
            in_string: false,
            escape: false,
            pending: 0,
            count: 0,
        }
    }

    /// Feeds the next chunk; returns the elements it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<ArrayElement>, JsonArrayError> {
        if self.state == State::Failed {
            return Err(JsonArrayError::Failed);
        }
        let mut out = Vec::new();
        for &b in chunk {
            if let Err(e) = self.step(b, &mut out) {
                self.state = State::Failed;
                self.elem = Vec::new();
                return Err(e);
            }
        }
        Ok(out)
    }

    /// Ends the stream: an error unless the array was closed.
    pub fn finish(&self) -> Result<(), JsonArrayError> {
        match self.state {
            State::Done => Ok(()),
            State::Failed => Err(JsonArrayError::Failed),
            _ => Err(JsonArrayError::Truncated),
        }
    }

    /// The array (or lone object) is complete.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Elements yielded so far.
    pub fn elements(&self) -> usize {
        self.count
    }

    /// Bytes fed but not yet accounted for by a yielded element.
    pub fn buffered_len(&self) -> usize {
        self.pending
    }

    fn step(&mut self, b: u8, out: &mut Vec<ArrayElement>) -> Result<(), JsonArrayError> {
        self.pending += 1;
        // `pending` covers the element being scanned plus its separators.
        if self.pending > self.max_element {
            return Err(JsonArrayError::TooLarge { max: self.max_element });
        }
        match self.state {
            State::Start => match b {
                b'[' => self.state = State::FirstOrEnd,
                b'{' => {
                    self.begin(b);
                    self.state = State::Single;
                }
                b if is_ws(b) => {}
                // A UTF-8 BOM some servers put in front of JSON.
                0xEF | 0xBB | 0xBF if self.pending <= 3 => {}
                _ => return Err(JsonArrayError::Unexpected { found: b, context: "before the array" }),
            },
            State::FirstOrEnd | State::Element => match b {
                b']' if self.state == State::FirstOrEnd => self.state = State::Done,
                b'{' | b'[' => {
                    self.begin(b);
                    self.state = State::Nested;
                }
                b'"' => {
                    self.begin(b);
                    self.state = State::StringElem;
                }
                b if is_ws(b) => {}
                b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                    self.begin(b);
                    self.state = State::Scalar;
                }
                _ => return Err(JsonArrayError::Unexpected { found: b, context: "where an element should start" }),
            },
            State::Nested | State::Single => {
                self.elem.push(b);
                if self.in_string {
                    if self.escape {
                        self.escape = false;
                    } else if b == b'\\' {
                        self.escape = true;
                    } else if b == b'"' {
                        self.in_string = false;
                    }
                } else {
                    match b {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => self.depth += 1,
                        b'}' | b']' => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                let single = self.state == State::Single;
                                self.complete(out)?;
                                self.state = if single { State::Done } else { State::AfterElement };
                            }
                        }
                        _ => {}
                    }
                }
            }
            State::StringElem => {
                self.elem.push(b);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.complete(out)?;
                    self.state = State::AfterElement;
                }
            }
            State::Scalar => {
                if is_delim(b) {
                    // The delimiter belongs to what follows the element.
                    self.pending -= 1;
                    self.complete(out)?;
                    self.state = State::AfterElement;
                    return self.step(b, out);
                }
                self.elem.push(b);
            }
            State::AfterElement => match b {
                b',' => self.state = State::Element,
                b']' => self.state = State::Done,
                b if is_ws(b) => {}
                _ => return Err(JsonArrayError::Unexpected { found: b, context: "after an element" }),
            },
            State::Done => {
                if !is_ws(b) {
                    return Err(JsonArrayError::Unexpected { found: b, context: "after the array" });
                }
            }
            State::Failed => return Err(JsonArrayError::Failed),
        }
        Ok(())
    }

    fn begin(&mut self, b: u8) {
        self.elem.clear();
        self.elem.push(b);
        self.depth = usize::from(b == b'{' || b == b'[');
        self.in_string = false;
        self.escape = false;
    }

    fn complete(&mut self, out: &mut Vec<ArrayElement>) -> Result<(), JsonArrayError> {
        let value = serde_json::from_slice(&self.elem).map_err(JsonArrayError::Invalid)?;
        self.elem.clear();
        self.count += 1;
        out.push(ArrayElement { value, raw_len: std::mem::take(&mut self.pending) });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const GEMINI: &[u8] = br#"[{"candidates": [{"content": {"parts": [{"text": "Hel"}],"role": "model"},"index": 0}]}
,
{"candidates": [{"content": {"parts": [{"text": "lo \"]}{[, world\\"}],"role": "model"},"finishReason": "STOP","index": 0}]}
]"#;

    fn split(chunks: &[&[u8]]) -> Vec<ArrayElement> {
        let mut s = JsonArrayStream::default();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.feed(c).unwrap());
        }
        s.finish().unwrap();
        out
    }

    #[test]
    fn splits_gemini_stream() {
        let els = split(&[GEMINI]);
        assert_eq!(els.len(), 2);
        assert_eq!(els[0].value["candidates"][0]["content"]["parts"][0]["text"], "Hel");
        assert_eq!(els[1].value["candidates"][0]["content"]["parts"][0]["text"], "lo \"]}{[, world\\");
        // `]` is the only byte not covered by an element.
        let covered: usize = els.iter().map(|e| e.raw_len).sum();
        assert_eq!(covered + 2, GEMINI.len());
    }

    #[test]
    fn every_split_point_and_byte_by_byte() {
        let whole = split(&[GEMINI]);
        for i in 0..=GEMINI.len() {
            assert_eq!(split(&[&GEMINI[..i], &GEMINI[i..]]), whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = GEMINI.chunks(1).collect();
        assert_eq!(split(&bytes), whole);
    }

    #[test]
    fn scalars_strings_and_empty() {
        let els = split(&[br#" [ 1 , -2.5e3,"a,]\"b" ,true,null,[1,[2]] ] "#]);
        let vals: Vec<Value> = els.into_iter().map(|e| e.value).collect();
        assert_eq!(vals, vec![json!(1), json!(-2500.0), json!("a,]\"b"), json!(true), json!(null), json!([1, [2]])]);
        assert!(split(&[b"[]"]).is_empty());
        assert!(split(&[b"\r\n[\r\n]\r\n"]).is_empty());
    }

    #[test]
    fn lone_object_is_one_element() {
        let els = split(&[br#"{"error": {"code": 400, "message": "bad"}}"#]);
        assert_eq!(els[0].value["error"]["code"], 400);
    }

    #[test]
    fn errors() {
        let mut s = JsonArrayStream::default();
        assert!(matches!(s.feed(b"x"), Err(JsonArrayError::Unexpected { .. })));
        assert!(matches!(s.feed(b"[]"), Err(JsonArrayError::Failed)));

        let mut s = JsonArrayStream::default();
        assert!(matches!(s.feed(b"[{\"a\":}]"), Err(JsonArrayError::Invalid(_))));

        let mut s = JsonArrayStream::default();
        s.feed(b"[{\"a\":1}").unwrap();
        assert!(matches!(s.finish(), Err(JsonArrayError::Truncated)));

        let mut s = JsonArrayStream::default();
        assert!(matches!(s.feed(b"[{} {}]"), Err(JsonArrayError::Unexpected { .. })));

        let mut s = JsonArrayStream::default();
        assert!(matches!(s.feed(b"[] x"), Err(JsonArrayError::Unexpected { .. })));

        let mut s = JsonArrayStream::new(8);
        assert!(matches!(s.feed(b"[{\"a\":\"0123456789\"}]"), Err(JsonArrayError::TooLarge { max: 8 })));
    }
}
