//! SSE streams of MCP messages: the answer to a POST, the GET stream of
//! server messages, and the HTTP+SSE transport of 2024-11-05 (whose first
//! event, `endpoint`, names the URL the client POSTs to).
//!
//! Incremental over [`SseParser`]: the items are the same however the
//! bytes are chunked. Each item keeps the input bytes it accounts for, so an
//! allowed event is forwarded byte for byte, and its `id`, `event` and
//! `retry` fields, so a rewritten one keeps them ([`StreamItem::encode`]).

use serde_json::Value;

use super::{McpError, Message, parse_messages};
use crate::guardrails::{framing::sse::SseParser, model::PathSeg};

/// The fields of an SSE event besides its data.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventFields {
    /// `event:`, when present and not empty.
    pub event: Option<String>,
    /// `id:`, when the event's bytes set one (it persists on the stream).
    pub id: Option<String>,
    /// `retry:` (milliseconds), when the event's bytes set one.
    pub retry: Option<u64>,
}

impl EventFields {
    /// The event with `data`: `retry:`, `id:`, `event:` lines as present,
    /// then the data lines and the blank line.
    pub fn encode(&self, data: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(retry) = self.retry {
            out.extend_from_slice(format!("retry: {retry}\n").as_bytes());
        }
        if let Some(id) = &self.id {
            out.extend_from_slice(b"id: ");
            out.extend(id.bytes().filter(|&b| b != b'\r' && b != b'\n' && b != 0));
            out.push(b'\n');
        }
        out.extend(crate::guardrails::framing::sse::encode_event(self.event.as_deref(), data));
        out
    }
}

/// What an event carries.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// JSON-RPC messages: the parsed data (rewrite it at the messages'
    /// paths, then [`StreamItem::encode_doc`]) and the messages in it.
    Messages { doc: Value, messages: Vec<(Vec<PathSeg>, Message)> },
    /// The 2024-11-05 transport's `endpoint` event: where the client POSTs
    /// its messages (relative or absolute, with the session in its query).
    Endpoint(String),
    /// Empty data (a stream's priming event for resumption).
    Empty,
    /// Data that is not a JSON-RPC message: to be inspected as text.
    Unrecognized,
}

/// One SSE event of an MCP stream.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamItem {
    pub fields: EventFields,
    /// The event's data.
    pub data: String,
    pub payload: Payload,
    /// The input bytes this item accounts for (comments and data-less
    /// blocks before it included): forward them to pass the event unchanged.
    pub raw: Vec<u8>,
}

impl StreamItem {
    /// The event with new data, keeping its fields.
    pub fn encode(&self, data: &str) -> Vec<u8> {
        self.fields.encode(data)
    }

    /// The event with its (rewritten) document as data.
    pub fn encode_doc(&self, doc: &Value) -> Vec<u8> {
        self.fields.encode(&doc.to_string())
    }
}

/// The end of a stream: an event that was missing its blank line, and the
/// bytes no event accounts for (trailing comments), to forward as they are.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Finished {
    pub item: Option<StreamItem>,
    pub rest: Vec<u8>,
}

/// An incremental reader of an MCP SSE stream.
#[derive(Debug)]
pub struct McpStream {
    parser: SseParser,
    /// Bytes fed and not yet handed out in an item.
    pending: Vec<u8>,
}

impl McpStream {
    /// A reader refusing events larger than `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Self { parser: SseParser::new(max_event), pending: Vec::new() }
    }

    /// Feeds the next chunk; returns the events it completed, in order.
    /// After an error (an event over the limit) the stream stays failed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<StreamItem>, McpError> {
        let events = self.parser.feed(chunk)?;
        self.pending.extend_from_slice(chunk);
        Ok(events.into_iter().map(|e| self.item(e.event, e.data, e.id, e.raw_len)).collect())
    }

    /// Ends the stream.
    pub fn finish(&mut self) -> Finished {
        let item = self.parser.finish().map(|e| self.item(e.event, e.data, e.id, e.raw_len));
        Finished { item, rest: std::mem::take(&mut self.pending) }
    }

    /// Bytes fed and not yet in an item.
    pub fn buffered_len(&self) -> usize {
        self.pending.len()
    }

    fn item(&mut self, event: Option<String>, data: String, last_id: Option<String>, raw_len: usize) -> StreamItem {
        let take = raw_len.min(self.pending.len());
        let rest = self.pending.split_off(take);
        let raw = std::mem::replace(&mut self.pending, rest);
        let (has_id, retry) = scan_fields(&raw);
        let payload = payload(event.as_deref(), &data);
        StreamItem { fields: EventFields { event, id: if has_id { last_id } else { None }, retry }, data, payload, raw }
    }
}

/// Whether the bytes hold a (valid) `id` line, and the last valid `retry`.
fn scan_fields(raw: &[u8]) -> (bool, Option<u64>) {
    let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
    let mut has_id = false;
    let mut retry = None;
    for line in raw.split(|&b| b == b'\n' || b == b'\r') {
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match name {
            b"id" if !value.contains(&0) => has_id = true,
            // The spec takes ASCII digits only.
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                retry = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok()).or(retry);
            }
            _ => {}
        }
    }
    (has_id, retry)
}

fn payload(event: Option<&str>, data: &str) -> Payload {
    if data.is_empty() {
        return Payload::Empty;
    }
    if event == Some("endpoint") {
        return Payload::Endpoint(data.trim().to_owned());
    }
    match serde_json::from_str::<Value>(data) {
        Ok(doc) => match parse_messages(&doc) {
            Ok(messages) => Payload::Messages { doc, messages },
            Err(_) => Payload::Unrecognized,
        },
        Err(_) => Payload::Unrecognized,
    }
}
