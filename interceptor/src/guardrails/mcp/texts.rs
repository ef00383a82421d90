//! Where the texts of MCP messages are, with their kinds.
//!
//! Request direction (what a client sends, and what a server asks of the
//! client's model): `tools/call` arguments (every string leaf, `ToolCall`),
//! `sampling/createMessage` (system prompt as `Instructions`, messages as
//! `Content`, tool uses as `ToolCall`, tool results as `ToolResult`, tools
//! offered as `ToolDefinition`), a client's sampling result (`Content`),
//! `elicitation/create` messages and the answers to them (`Content`),
//! `prompts/get` and `completion/complete` arguments (`Content`).
//!
//! Response direction, by the method of the request answered: `tools/call`
//! content and structured content (`ToolResult`), `resources/read` contents
//! (`Resource`), `prompts/get` description and messages (`Prompt`),
//! `tools/list` names, titles, descriptions and schema strings
//! (`ToolDefinition`), `initialize` instructions (`ToolDefinition`: server
//! text the model reads as instructions). A method this module does not
//! know is read by the shape of its result.

use serde_json::Value;

use super::Message;
use crate::guardrails::model::{PathSeg, Role, TextKind, TextSpan};

/// Keys of content blocks and schemas whose strings are identifiers, enums
/// or bytes, never prose.
const SKIPPED_KEYS: &[&str] =
    &["type", "mimeType", "uri", "blob", "data", "annotations", "_meta", "id", "toolUseId", "icons"];

/// Schema keys whose strings are identifiers.
const SCHEMA_SKIPPED_KEYS: &[&str] = &["type", "$schema", "$id", "$ref", "format", "pattern", "required", "_meta"];

/// The texts of a message going towards a model or a server: see the
/// module doc. `prefix` is the message's path (as [`super::parse_messages`]
/// gives it); spans are at `prefix` + `params`/`result` + ….
pub fn request_texts(msg: &Message, prefix: &[PathSeg]) -> Vec<TextSpan> {
    let mut out = Vec::new();
    match msg {
        Message::Request { method, params: Some(params), .. }
        | Message::Notification { method, params: Some(params) } => {
            let at = |keys: &[&str]| path(prefix, "params", keys);
            match method.as_str() {
                "tools/call" => leaves(
                    params.get("arguments"),
                    at(&["arguments"]),
                    Role::Assistant,
                    TextKind::ToolCall,
                    false,
                    &mut out,
                ),
                "sampling/createMessage" => {
                    string(
                        params.get("systemPrompt"),
                        at(&["systemPrompt"]),
                        Role::System,
                        TextKind::Instructions,
                        &mut out,
                    );
                    if let Some(Value::Array(msgs)) = params.get("messages") {
                        for (i, m) in msgs.iter().enumerate() {
                            let mut p = at(&["messages"]);
                            p.push(PathSeg::Index(i));
                            sampling_message(m, p, &mut out);
                        }
                    }
                    if let Some(Value::Array(tools)) = params.get("tools") {
                        tool_definitions(tools, at(&["tools"]), &mut out);
                    }
                }
                "elicitation/create" => {
                    string(params.get("message"), at(&["message"]), Role::Unknown, TextKind::Content, &mut out)
                }
                "prompts/get" => {
                    leaves(params.get("arguments"), at(&["arguments"]), Role::User, TextKind::Content, false, &mut out)
                }
                "completion/complete" => {
                    string(
                        params.get("argument").and_then(|a| a.get("value")),
                        at(&["argument", "value"]),
                        Role::User,
                        TextKind::Content,
                        &mut out,
                    );
                }
                _ => {}
            }
        }
        Message::Response { result, .. } => {
            // A client's answer to a server request, known by its shape.
            let method = if result.get("model").is_some() && result.get("content").is_some() {
                "sampling/createMessage"
            } else if result.get("action").is_some_and(Value::is_string) {
                "elicitation/create"
            } else {
                return out;
            };
            return result_texts(method, result, prefix);
        }
        _ => {}
    }
    out
}

/// The texts of `result`, the answer to a request for `method`: see the
/// module doc. `prefix` is the answer message's path (as
/// [`super::parse_messages`] gives it); spans are at `prefix` + `result` + ….
pub fn result_texts(method: &str, result: &Value, prefix: &[PathSeg]) -> Vec<TextSpan> {
    let mut out = Vec::new();
    let at = |keys: &[&str]| path(prefix, "result", keys);
    let method = match method {
        "tools/call"
        | "resources/read"
        | "prompts/get"
        | "tools/list"
        | "initialize"
        | "sampling/createMessage"
        | "elicitation/create" => method,
        // Unknown (or `tasks/result`, which carries the result of the task's
        // own request): by shape.
        _ if result.get("content").is_some_and(Value::is_array) => "tools/call",
        _ if result.get("contents").is_some_and(Value::is_array) => "resources/read",
        _ if result.get("messages").is_some_and(Value::is_array) => "prompts/get",
        _ if result.get("tools").is_some_and(Value::is_array) => "tools/list",
        _ => return out,
    };
    match method {
        "tools/call" => {
            tool_result(result, at(&[]), &mut out);
        }
        "resources/read" => {
            if let Some(Value::Array(contents)) = result.get("contents") {
                for (i, c) in contents.iter().enumerate() {
                    let mut p = at(&["contents"]);
                    p.extend([PathSeg::Index(i), PathSeg::Key("text".into())]);
                    string(c.get("text"), p, Role::Tool, TextKind::Resource, &mut out);
                }
            }
        }
        "prompts/get" => {
            string(result.get("description"), at(&["description"]), Role::System, TextKind::Prompt, &mut out);
            if let Some(Value::Array(msgs)) = result.get("messages") {
                for (i, m) in msgs.iter().enumerate() {
                    let role = role_of(m);
                    let mut p = at(&["messages"]);
                    p.extend([PathSeg::Index(i), PathSeg::Key("content".into())]);
                    blocks(m.get("content"), p, role, TextKind::Prompt, &mut out);
                }
            }
        }
        "tools/list" => {
            if let Some(Value::Array(tools)) = result.get("tools") {
                tool_definitions(tools, at(&["tools"]), &mut out);
            }
        }
        "initialize" => {
            string(result.get("instructions"), at(&["instructions"]), Role::System, TextKind::ToolDefinition, &mut out);
        }
        "sampling/createMessage" => {
            let role = role_of(result);
            let content = result.get("content");
            sampling_content(content, at(&["content"]), role, &mut out);
        }
        "elicitation/create" => {
            leaves(result.get("content"), at(&["content"]), Role::User, TextKind::Content, false, &mut out)
        }
        _ => {}
    }
    out
}

fn path(prefix: &[PathSeg], first: &str, keys: &[&str]) -> Vec<PathSeg> {
    let mut p = prefix.to_vec();
    p.push(PathSeg::Key(first.into()));
    p.extend(keys.iter().map(|k| PathSeg::Key((*k).into())));
    p
}

fn child(p: &[PathSeg], seg: PathSeg) -> Vec<PathSeg> {
    let mut p = p.to_vec();
    p.push(seg);
    p
}

fn role_of(m: &Value) -> Role {
    match m.get("role").and_then(Value::as_str) {
        Some("user") => Role::User,
        Some("assistant") => Role::Assistant,
        _ => Role::Unknown,
    }
}

fn string(v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind, out: &mut Vec<TextSpan>) {
    if let Some(Value::String(s)) = v
        && !s.is_empty()
    {
        out.push(TextSpan { path, role, kind, text: s.clone() });
    }
}

/// Every string leaf under `v`; with `skip_keys`, not those under
/// [`SKIPPED_KEYS`].
fn leaves(v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind, skip_keys: bool, out: &mut Vec<TextSpan>) {
    if let Some(v) = v {
        let mut path = path;
        walk(v, &mut path, role, kind, if skip_keys { SKIPPED_KEYS } else { &[] }, out);
    }
}

fn walk(v: &Value, path: &mut Vec<PathSeg>, role: Role, kind: TextKind, skipped: &[&str], out: &mut Vec<TextSpan>) {
    match v {
        Value::String(s) if !s.is_empty() && !is_blob(s) => {
            out.push(TextSpan { path: path.clone(), role, kind, text: s.clone() })
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.push(PathSeg::Index(i));
                walk(item, path, role, kind, skipped, out);
                path.pop();
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                if skipped.contains(&k.as_str()) {
                    continue;
                }
                path.push(PathSeg::Key(k.clone()));
                walk(item, path, role, kind, skipped, out);
                path.pop();
            }
        }
        _ => {}
    }
}

/// A `data:` URL or a long run of base64: bytes, not text.
fn is_blob(s: &str) -> bool {
    (s.starts_with("data:") && s.contains(";base64,"))
        || (s.len() >= 256
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')))
}

/// Content blocks (one or a list): text, embedded resources' text, resource
/// links' names and descriptions, unknown blocks' strings.
fn blocks(v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind, out: &mut Vec<TextSpan>) {
    leaves(v, path, role, kind, true, out);
}

/// A `CallToolResult` (also a sampling `tool_result` block): `content`
/// blocks and `structuredContent`.
fn tool_result(v: &Value, at: Vec<PathSeg>, out: &mut Vec<TextSpan>) {
    blocks(v.get("content"), child(&at, PathSeg::Key("content".into())), Role::Tool, TextKind::ToolResult, out);
    leaves(
        v.get("structuredContent"),
        child(&at, PathSeg::Key("structuredContent".into())),
        Role::Tool,
        TextKind::ToolResult,
        false,
        out,
    );
}

fn sampling_message(m: &Value, at: Vec<PathSeg>, out: &mut Vec<TextSpan>) {
    sampling_content(m.get("content"), child(&at, PathSeg::Key("content".into())), role_of(m), out);
}

/// Sampling content: one block or a list (2025-11-25), of text, image,
/// audio, `tool_use` and `tool_result` blocks.
fn sampling_content(v: Option<&Value>, at: Vec<PathSeg>, role: Role, out: &mut Vec<TextSpan>) {
    match v {
        Some(Value::Array(items)) => {
            for (i, b) in items.iter().enumerate() {
                sampling_block(b, child(&at, PathSeg::Index(i)), role, out);
            }
        }
        Some(b) => sampling_block(b, at, role, out),
        None => {}
    }
}

fn sampling_block(b: &Value, at: Vec<PathSeg>, role: Role, out: &mut Vec<TextSpan>) {
    match b.get("type").and_then(Value::as_str) {
        Some("tool_use") => leaves(
            b.get("input"),
            child(&at, PathSeg::Key("input".into())),
            Role::Assistant,
            TextKind::ToolCall,
            false,
            out,
        ),
        Some("tool_result") => tool_result(b, at, out),
        _ => leaves(Some(b), at, role, TextKind::Content, true, out),
    }
}

/// Tool definitions: name, title, description, annotation title, and the
/// strings of the input and output schemas but identifiers.
fn tool_definitions(tools: &[Value], at: Vec<PathSeg>, out: &mut Vec<TextSpan>) {
    for (i, tool) in tools.iter().enumerate() {
        let at = child(&at, PathSeg::Index(i));
        let key = |k: &str| child(&at, PathSeg::Key(k.into()));
        for k in ["name", "title", "description"] {
            string(tool.get(k), key(k), Role::System, TextKind::ToolDefinition, out);
        }
        let title = tool.get("annotations").and_then(|a| a.get("title"));
        string(
            title,
            child(&key("annotations"), PathSeg::Key("title".into())),
            Role::System,
            TextKind::ToolDefinition,
            out,
        );
        for k in ["inputSchema", "outputSchema"] {
            if let Some(schema) = tool.get(k) {
                let mut p = key(k);
                walk(schema, &mut p, Role::System, TextKind::ToolDefinition, SCHEMA_SKIPPED_KEYS, out);
            }
        }
    }
}
