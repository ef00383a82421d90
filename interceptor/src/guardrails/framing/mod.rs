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

pub mod eventstream;
pub mod json_array;
pub mod sse;

use serde::Serialize;

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

#[cfg(test)]
mod tests {
    use super::*;

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
