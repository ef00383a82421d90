//! The Model Context Protocol (MCP): JSON-RPC 2.0 messages over streamable
//! HTTP (revisions 2025-03-26 and later: POSTed messages or batches,
//! answered as JSON or as an SSE stream; a GET stream of server messages)
//! and the older HTTP+SSE transport (2024-11-05: an `endpoint` event naming
//! where the client POSTs, then `message` events).
//!
//! It owns recognizing MCP traffic, splitting a body into its messages,
//! finding the texts of each message with their JSON paths (so that a
//! guardrail rewrites exactly those strings), the JSON-RPC error a block
//! answers, SSE streams of messages (`stream`) and tool-definition hashes
//! (`tools`). Pure: no I/O, no state across exchanges, no panics on any
//! input. It does not decide anything, and it does not know sessions: the
//! pipeline matches results to their requests' methods.

mod stream;
mod texts;
pub mod tools;

use std::fmt;

use http::{HeaderMap, Method};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

use crate::guardrails::model::PathSeg;

pub use stream::{EventFields, Finished, McpStream, Payload, StreamItem};
pub use texts::{request_texts, result_texts};

/// The JSON-RPC error code a guardrail block answers (in the range JSON-RPC
/// leaves to implementations).
pub const BLOCKED_CODE: i64 = -32001;

/// The session header of streamable HTTP.
pub const SESSION_HEADER: &str = "mcp-session-id";
/// The protocol version header clients send after initialization (2025-06-18).
pub const PROTOCOL_VERSION_HEADER: &str = "mcp-protocol-version";

/// Method names and families MCP defines (a family ends with `/`).
const METHODS: &[&str] = &[
    "initialize",
    "ping",
    "tools/",
    "resources/",
    "prompts/",
    "notifications/",
    "sampling/",
    "elicitation/",
    "completion/",
    "logging/",
    "roots/",
    "tasks/",
];

/// Whether `method` is an MCP method.
pub fn is_mcp_method(method: &str) -> bool {
    METHODS
        .iter()
        .any(|m| if m.ends_with('/') { method.starts_with(m) && method.len() > m.len() } else { method == *m })
}

/// A JSON-RPC request id: a number or a string (`Null` only in an error
/// answering a request whose id could not be read).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    Number(Number),
    String(String),
    Null,
}

impl Id {
    fn from_value(v: Option<&Value>) -> Result<Self, &'static str> {
        match v {
            None | Some(Value::Null) => Ok(Self::Null),
            Some(Value::Number(n)) => Ok(Self::Number(n.clone())),
            Some(Value::String(s)) => Ok(Self::String(s.clone())),
            Some(_) => Err("id is neither a number nor a string"),
        }
    }

    /// The id as JSON, as it was sent.
    pub fn to_value(&self) -> Value {
        match self {
            Self::Number(n) => Value::Number(n.clone()),
            Self::String(s) => Value::String(s.clone()),
            Self::Null => Value::Null,
        }
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::String(s) => write!(f, "{s:?}"),
            Self::Null => f.write_str("null"),
        }
    }
}

/// One JSON-RPC message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// A request (from either side): it has an id and expects an answer.
    Request { id: Id, method: String, params: Option<Value> },
    /// A notification: no id, no answer.
    Notification { method: String, params: Option<Value> },
    /// A successful answer.
    Response { id: Id, result: Value },
    /// An error answer.
    Error { id: Id, error: Value },
}

impl Message {
    /// The method of a request or notification.
    pub fn method(&self) -> Option<&str> {
        match self {
            Self::Request { method, .. } | Self::Notification { method, .. } => Some(method),
            _ => None,
        }
    }

    /// The id of a request or answer.
    pub fn id(&self) -> Option<&Id> {
        match self {
            Self::Request { id, .. } | Self::Response { id, .. } | Self::Error { id, .. } => Some(id),
            Self::Notification { .. } => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("not a json-rpc message at {path}: {why}")]
    NotAMessage { path: String, why: &'static str },
    #[error("empty json-rpc batch")]
    EmptyBatch,
    #[error(transparent)]
    Sse(#[from] crate::guardrails::framing::sse::SseError),
}

/// The messages of a JSON-RPC body: one message (at path `[]`) or a batch
/// (each at `[Index(i)]`), with the path of each.
///
/// A batch with any element that is not a message is an error as a whole:
/// the caller then inspects the body as unknown JSON rather than trust a
/// partial reading.
pub fn parse_messages(doc: &Value) -> Result<Vec<(Vec<PathSeg>, Message)>, McpError> {
    match doc {
        Value::Array(items) if items.is_empty() => Err(McpError::EmptyBatch),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                parse_one(item)
                    .map(|m| (vec![PathSeg::Index(i)], m))
                    .map_err(|why| McpError::NotAMessage { path: format!("[{i}]"), why })
            })
            .collect(),
        _ => {
            parse_one(doc).map(|m| vec![(Vec::new(), m)]).map_err(|why| McpError::NotAMessage { path: "$".into(), why })
        }
    }
}

fn parse_one(v: &Value) -> Result<Message, &'static str> {
    let obj = v.as_object().ok_or("not an object")?;
    if let Some(version) = obj.get("jsonrpc")
        && version.as_str() != Some("2.0")
    {
        return Err("jsonrpc is not \"2.0\"");
    }
    if let Some(method) = obj.get("method") {
        let method = method.as_str().ok_or("method is not a string")?.to_owned();
        let params = obj.get("params").cloned();
        // An id of `null` is forbidden by MCP; such a message is read as a
        // request (its texts are the same either way).
        return Ok(match obj.get("id") {
            None => Message::Notification { method, params },
            id => Message::Request { id: Id::from_value(id)?, method, params },
        });
    }
    let id = Id::from_value(obj.get("id"))?;
    match (obj.get("result"), obj.get("error")) {
        (Some(result), None) => Ok(Message::Response { id, result: result.clone() }),
        (None, Some(error)) => Ok(Message::Error { id, error: error.clone() }),
        (Some(_), Some(_)) => Err("both result and error"),
        (None, None) => Err("no method, result or error"),
    }
}

/// The tool a `tools/call` request calls.
pub fn tool_name(msg: &Message) -> Option<&str> {
    match msg {
        Message::Request { method, params: Some(p), .. } if method == "tools/call" => p.get("name")?.as_str(),
        _ => None,
    }
}

/// A JSON-RPC error answer for request `id` (`data` left out when null).
pub fn error_message(id: &Id, code: i64, message: &str, data: Value) -> Value {
    let mut error = Map::new();
    error.insert("code".into(), code.into());
    error.insert("message".into(), message.into());
    if !data.is_null() {
        error.insert("data".into(), data);
    }
    let mut msg = Map::new();
    msg.insert("jsonrpc".into(), "2.0".into());
    msg.insert("id".into(), id.to_value());
    msg.insert("error".into(), Value::Object(error));
    Value::Object(msg)
}

/// Whether a request looks like MCP: a JSON-RPC 2.0 body (or batch) with an
/// MCP method, an `Mcp-Session-Id` or `MCP-Protocol-Version` header, a POST
/// whose `Accept` names both `application/json` and `text/event-stream`
/// (streamable HTTP requires it), or a GET asking for `text/event-stream`
/// with a session. `body` is the decoded body.
pub fn recognize(method: &Method, headers: &HeaderMap, body: &[u8]) -> bool {
    if headers.contains_key(SESSION_HEADER) || headers.contains_key(PROTOCOL_VERSION_HEADER) {
        return true;
    }
    if method == Method::POST && accepts(headers, "application/json") && accepts(headers, "text/event-stream") {
        return true;
    }
    body_is_mcp(body)
}

/// Whether an `Accept` header names `media` (parameters ignored).
fn accepts(headers: &HeaderMap, media: &str) -> bool {
    headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|item| item.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(media))))
}

/// Only the two fields recognition needs: serde skips the rest without
/// building it.
#[derive(Deserialize)]
struct Probe {
    jsonrpc: Option<String>,
    method: Option<String>,
}

impl Probe {
    fn is_mcp(&self) -> bool {
        self.jsonrpc.as_deref() == Some("2.0") && self.method.as_deref().is_some_and(is_mcp_method)
    }
}

fn body_is_mcp(body: &[u8]) -> bool {
    // Cheap refusal of everything that never names the field.
    if memchr::memmem::find(body, b"\"jsonrpc\"").is_none() {
        return false;
    }
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice::<Probe>(body).is_ok_and(|p| p.is_mcp()),
        Some(b'[') => serde_json::from_slice::<Vec<Probe>>(body).is_ok_and(|ps| ps.iter().any(Probe::is_mcp)),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
