//! Stream framings the providers use, as incremental byte-level parsers.
//!
//! * [`sse`] — Server-Sent Events (OpenAI, Anthropic, Gemini `?alt=sse`).
//! * [`eventstream`] — AWS event-stream (Bedrock `invoke-with-response-stream`
//!   and `converse-stream`), decoder and encoder.
//! * [`json_array`] — Gemini's `streamGenerateContent` without `alt=sse`: one
//!   JSON array whose elements arrive one by one.
//!
//! Every parser takes arbitrary chunks (one byte at a time is fine), keeps a
//! bounded buffer, and reports for each item how many input bytes it covers
//! (`raw_len`) so the caller can hold and release the original bytes. Pure: no
//! I/O, no async, no knowledge of providers.
//!
//! [`Framer`] is the one dispatch over the three: whoever reads a stream of a
//! given [`FramingKind`] feeds it and gets [`Frame`]s back.

pub mod eventstream;
pub mod json_array;
pub mod sse;

use serde::Serialize;

use self::{
    eventstream::{Decoder, EventStreamError, Message},
    json_array::{ArrayElement, JsonArrayError, JsonArrayStream},
    sse::{SseError, SseEvent, SseParser},
};

/// How a streamed response body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FramingKind {
    /// `text/event-stream`.
    Sse,
    /// `application/vnd.amazon.eventstream`.
    EventStream,
    /// A JSON array streamed element by element (Gemini without `alt=sse`).
    JsonArray,
}

impl FramingKind {
    /// The framing a `Content-Type` announces, if it is a streaming one.
    ///
    /// `application/json` is not a stream by itself: whether it is Gemini's
    /// streamed array depends on the request path, see
    /// `providers::response_framing`.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/event-stream" => Some(Self::Sse),
            "application/vnd.amazon.eventstream" => Some(Self::EventStream),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sse => "sse",
            Self::EventStream => "event_stream",
            Self::JsonArray => "json_array",
        }
    }
}

/// A stream framing's error; each message is its parser's own.
#[derive(Debug, thiserror::Error)]
pub enum FramingError {
    #[error(transparent)]
    Sse(#[from] SseError),
    #[error(transparent)]
    EventStream(#[from] EventStreamError),
    #[error(transparent)]
    JsonArray(#[from] JsonArrayError),
}

/// One item of a framed stream: an SSE event, an event-stream frame or an
/// array element.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Sse(SseEvent),
    EventStream(Message),
    JsonElement(ArrayElement),
}

impl Frame {
    /// Input bytes this item accounts for (see each parser's `raw_len`): the
    /// lengths of a stream's frames add up to the bytes fed, less
    /// [`Framer::buffered_len`].
    pub fn raw_len(&self) -> usize {
        match self {
            Self::Sse(event) => event.raw_len,
            Self::EventStream(message) => message.raw_len,
            Self::JsonElement(element) => element.raw_len,
        }
    }
}

/// The incremental parser for one stream, whichever its framing.
#[derive(Debug)]
pub enum Framer {
    Sse(SseParser),
    EventStream(Decoder),
    JsonArray(JsonArrayStream),
}

impl Framer {
    /// A parser for `kind` refusing items larger than `max_item` bytes.
    pub fn new(kind: FramingKind, max_item: usize) -> Self {
        match kind {
            FramingKind::Sse => Self::Sse(SseParser::new(max_item)),
            FramingKind::EventStream => Self::EventStream(Decoder::new(max_item)),
            FramingKind::JsonArray => Self::JsonArray(JsonArrayStream::new(max_item)),
        }
    }

    pub fn kind(&self) -> FramingKind {
        match self {
            Self::Sse(_) => FramingKind::Sse,
            Self::EventStream(_) => FramingKind::EventStream,
            Self::JsonArray(_) => FramingKind::JsonArray,
        }
    }

    /// Feeds the next chunk; returns the items it completed, in order. After
    /// an error the parser stays failed: the stream cannot be resynced.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Frame>, FramingError> {
        Ok(match self {
            Self::Sse(p) => p.feed(chunk)?.into_iter().map(Frame::Sse).collect(),
            Self::EventStream(d) => d.feed(chunk)?.into_iter().map(Frame::EventStream).collect(),
            Self::JsonArray(a) => a.feed(chunk)?.into_iter().map(Frame::JsonElement).collect(),
        })
    }

    /// Ends the stream. An event-stream that stops inside a frame, or an
    /// array that is not closed, is an error; an SSE event still missing its
    /// blank line is returned (see [`SseParser::finish`]), so a caller that
    /// must not see it ignores the `Ok` value.
    pub fn finish(&mut self) -> Result<Vec<Frame>, FramingError> {
        match self {
            Self::Sse(p) => Ok(p.finish().map(Frame::Sse).into_iter().collect()),
            Self::EventStream(d) => Ok(d.finish().map(|()| Vec::new())?),
            Self::JsonArray(a) => Ok(a.finish().map(|()| Vec::new())?),
        }
    }

    /// Bytes fed but not yet accounted for by a returned item.
    pub fn buffered_len(&self) -> usize {
        match self {
            Self::Sse(p) => p.buffered_len(),
            Self::EventStream(d) => d.buffered_len(),
            Self::JsonArray(a) => a.buffered_len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [FramingKind; 3] = [FramingKind::Sse, FramingKind::EventStream, FramingKind::JsonArray];

    /// Two items of each framing, as bytes.
    fn two_items(kind: FramingKind) -> Vec<u8> {
        match kind {
            FramingKind::Sse => [sse::encode_event(None, "{\"a\":1}"), sse::encode_event(Some("x"), "b")].concat(),
            FramingKind::EventStream => {
                let frame = |payload: &[u8]| {
                    eventstream::encode_frame(&[(":message-type", "event".into())], payload).expect("small frame")
                };
                [frame(b"{\"a\":1}"), frame(b"b")].concat()
            }
            FramingKind::JsonArray => b"[{\"a\":1}\r\n,\"b\"]".to_vec(),
        }
    }

    /// Fed one byte at a time or whole, each framing yields the same items,
    /// their raw lengths cover the input, and the parser is the one asked for.
    #[test]
    fn feeds_each_framing_in_any_chunks() {
        for kind in KINDS {
            let bytes = two_items(kind);
            let mut whole = Framer::new(kind, 1 << 10);
            assert_eq!(whole.kind(), kind);
            let frames = whole.feed(&bytes).unwrap();
            assert_eq!(frames.len(), 2, "{kind:?}");
            assert!(whole.finish().unwrap().is_empty(), "{kind:?}");

            let mut bytewise = Framer::new(kind, 1 << 10);
            let mut one_by_one = Vec::new();
            for b in &bytes {
                one_by_one.extend(bytewise.feed(std::slice::from_ref(b)).unwrap());
            }
            assert_eq!(one_by_one, frames, "{kind:?}");
            let covered: usize = frames.iter().map(Frame::raw_len).sum();
            assert_eq!(covered + bytewise.buffered_len(), bytes.len(), "{kind:?}");
            let first_is = |f: &Frame| match (kind, f) {
                (FramingKind::Sse, Frame::Sse(e)) => e.data == "{\"a\":1}",
                (FramingKind::EventStream, Frame::EventStream(m)) => m.payload == b"{\"a\":1}",
                (FramingKind::JsonArray, Frame::JsonElement(el)) => el.value == serde_json::json!({"a": 1}),
                _ => false,
            };
            assert!(first_is(&frames[0]), "{kind:?}: {:?}", frames[0]);
        }
    }

    /// A stream cut inside an item: event-stream and array report it,
    /// SSE dispatches the event that lacks its blank line.
    #[test]
    fn finish_reports_a_cut_stream() {
        for kind in KINDS {
            let bytes = two_items(kind);
            let mut framer = Framer::new(kind, 1 << 10);
            framer.feed(&bytes[..bytes.len() - 2]).unwrap();
            let end = framer.finish();
            match kind {
                FramingKind::Sse => assert!(matches!(&end.unwrap()[..], [Frame::Sse(e)] if e.data == "b")),
                FramingKind::EventStream => {
                    assert!(matches!(end, Err(FramingError::EventStream(EventStreamError::Truncated { .. }))))
                }
                FramingKind::JsonArray => {
                    assert!(matches!(end, Err(FramingError::JsonArray(JsonArrayError::Truncated))))
                }
            }
        }
    }

    /// Errors carry the parser's own message, and a failed parser stays failed.
    #[test]
    fn errors_are_the_parsers_own() {
        for kind in KINDS {
            let mut framer = Framer::new(kind, 4);
            let error = framer.feed(&two_items(kind)).unwrap_err();
            let own = match kind {
                FramingKind::Sse => SseParser::new(4).feed(&two_items(kind)).unwrap_err().to_string(),
                FramingKind::EventStream => Decoder::new(4).feed(&two_items(kind)).unwrap_err().to_string(),
                FramingKind::JsonArray => JsonArrayStream::new(4).feed(&two_items(kind)).unwrap_err().to_string(),
            };
            assert_eq!(error.to_string(), own, "{kind:?}");
            assert!(framer.feed(b"\n\n").is_err(), "{kind:?}: failed parser recovered");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(FramingKind::from_content_type("text/event-stream; charset=utf-8"), Some(FramingKind::Sse));
        assert_eq!(FramingKind::from_content_type("Text/Event-Stream"), Some(FramingKind::Sse));
        assert_eq!(
            FramingKind::from_content_type("application/vnd.amazon.eventstream"),
            Some(FramingKind::EventStream)
        );
        assert_eq!(FramingKind::from_content_type("application/json"), None);
    }
}
