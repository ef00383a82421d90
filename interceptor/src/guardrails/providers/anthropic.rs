//! Anthropic Messages (also Claude on Bedrock InvokeModel and on Vertex
//! `rawPredict`, whose bodies are Messages bodies with `anthropic_version`).

use serde_json::{Value, json};

use super::{Collector, RewriteError, append_paragraph, delta, join, kind_for, push_str, role_of, str_field};
use crate::guardrails::framing::sse::encode_event;
use crate::guardrails::model::{PathSeg, Role, StreamDelta, TextKind};

pub(super) fn request(doc: &Value, c: &mut Collector) {
    match doc.get("system") {
        Some(Value::String(_)) => c.string(doc.get("system"), jpath!["system"], Role::System, TextKind::Instructions),
        Some(Value::Array(blocks)) => content_blocks(blocks, &jpath!["system"], Role::System, c),
        _ => {}
    }
    for (i, m) in doc.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let role = role_of(str_field(m, "role"));
        let base = jpath!["messages", i, "content"];
        match m.get("content") {
            Some(Value::String(_)) => c.string(m.get("content"), base, role, TextKind::Content),
            Some(Value::Array(blocks)) => content_blocks(blocks, &base, role, c),
            _ => {}
        }
    }
    // Client tools: `description` and the `input_schema` descriptions are
    // instructions to the model. Server tools (`web_search_…`) have none.
    for (i, tool) in doc.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        c.string(tool.get("description"), jpath!["tools", i, "description"], Role::System, TextKind::Instructions);
        c.descriptions(tool.get("input_schema"), jpath!["tools", i, "input_schema"]);
    }
}

pub(super) fn response(doc: &Value, c: &mut Collector) {
    if let Some(blocks) = doc.get("content").and_then(Value::as_array) {
        content_blocks(blocks, &jpath!["content"], Role::Assistant, c);
    }
}

/// A list of content blocks of a message (or of `system`, or of a tool result).
fn content_blocks(blocks: &[Value], base: &[PathSeg], role: Role, c: &mut Collector) {
    for (j, block) in blocks.iter().enumerate() {
        let here = |tail: Vec<PathSeg>| join(base, [vec![PathSeg::Index(j)], tail].concat());
        match str_field(block, "type") {
            "text" => c.string(block.get("text"), here(jpath!["text"]), role, kind_for(role)),
            "thinking" => c.string(block.get("thinking"), here(jpath!["thinking"]), role, TextKind::Reasoning),
            // `input` is a JSON object: each string in it is inspected.
            "tool_use" | "server_tool_use" | "mcp_tool_use" => {
                c.leaves(block.get("input"), here(jpath!["input"]), Role::Assistant, TextKind::ToolCall);
            }
            "tool_result" | "mcp_tool_result" => match block.get("content") {
                Some(Value::String(_)) => {
                    c.string(block.get("content"), here(jpath!["content"]), Role::Tool, TextKind::ToolResult);
                }
                Some(Value::Array(inner)) => content_blocks(inner, &here(jpath!["content"]), Role::Tool, c),
                _ => {}
            },
            // Plain-text documents carry their text in `source.data`;
            // `content` documents carry blocks. PDFs (base64) are skipped.
            // `title` and `context` are shown to the model too.
            "document" => {
                c.string(block.get("title"), here(jpath!["title"]), role, kind_for(role));
                c.string(block.get("context"), here(jpath!["context"]), role, kind_for(role));
                let source = block.get("source");
                match source.map(|s| str_field(s, "type")) {
                    Some("text") => c.string(
                        source.and_then(|s| s.get("data")),
                        here(jpath!["source", "data"]),
                        role,
                        kind_for(role),
                    ),
                    Some("content") => match source.and_then(|s| s.get("content")) {
                        Some(Value::String(_)) => c.string(
                            source.and_then(|s| s.get("content")),
                            here(jpath!["source", "content"]),
                            role,
                            kind_for(role),
                        ),
                        Some(Value::Array(inner)) => content_blocks(inner, &here(jpath!["source", "content"]), role, c),
                        _ => {}
                    },
                    _ => {}
                }
            }
            // A search result given for citations (top level, or in a tool
            // result): `title`, and text blocks in `content`; `source` is
            // its URL or identifier.
            "search_result" => {
                c.string(block.get("title"), here(jpath!["title"]), role, kind_for(role));
                if let Some(inner) = block.get("content").and_then(Value::as_array) {
                    content_blocks(inner, &here(jpath!["content"]), role, c);
                }
            }
            // image, redacted_thinking (opaque), web search results
            // (encrypted), …
            _ => {}
        }
    }
}

/// Whether message blocks use Anthropic-only block types.
pub(super) fn has_anthropic_blocks(messages: &[Value]) -> bool {
    messages.iter().filter_map(|m| m.get("content").and_then(Value::as_array)).flatten().any(|b| {
        matches!(
            str_field(b, "type"),
            "tool_use" | "tool_result" | "thinking" | "redacted_thinking" | "document" | "search_result"
        ) || (str_field(b, "type") == "image" && b.get("source").is_some())
    })
}

/// A Messages stream event (SSE data, or the inner JSON of a Bedrock chunk).
pub(super) fn event(event: Option<&str>, v: &Value) -> StreamDelta {
    let ty = v.get("type").and_then(Value::as_str).or(event).unwrap_or("");
    let mut texts = Vec::new();
    match ty {
        "content_block_delta" => {
            let d = v.get("delta").unwrap_or(&Value::Null);
            match str_field(d, "type") {
                "text_delta" => push_str(&mut texts, TextKind::Content, d.get("text")),
                "input_json_delta" => push_str(&mut texts, TextKind::ToolCall, d.get("partial_json")),
                "thinking_delta" => push_str(&mut texts, TextKind::Reasoning, d.get("thinking")),
                // signature_delta, citations_delta: no text of their own.
                _ => {}
            }
        }
        // A block may start with text already in it (usually empty).
        "content_block_start" => {
            let b = v.get("content_block").unwrap_or(&Value::Null);
            match str_field(b, "type") {
                "text" => push_str(&mut texts, TextKind::Content, b.get("text")),
                "thinking" => push_str(&mut texts, TextKind::Reasoning, b.get("thinking")),
                _ => {}
            }
        }
        _ => {}
    }
    delta(texts, matches!(ty, "message_stop" | "error"))
}

pub(super) fn insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    match obj.get_mut("system") {
        Some(Value::String(s)) => *s = append_paragraph(s, text),
        Some(Value::Array(blocks)) => blocks.push(json!({"type": "text", "text": text})),
        None | Some(Value::Null) => {
            obj.insert("system".into(), Value::String(text.to_owned()));
        }
        Some(_) => return Err(RewriteError::Shape { what: "system is neither a string nor a list" }),
    }
    Ok(())
}

pub(super) fn block(reason: &str) -> Vec<u8> {
    let err = json!({"type": "error", "error": {"type": "permission_error", "message": reason}});
    encode_event(Some("error"), &err.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request, check_response, check_sse_stream};
    use crate::guardrails::model::{Provider, Role::*, TextKind::*};

    #[test]
    fn request_fixture() {
        check_request(
            Provider::Anthropic,
            include_str!("../../../tests/fixtures/providers/anthropic_request.json"),
            Some("claude-sonnet-4-5"),
            true,
            &[
                Expect(
                    "system[0].text",
                    System,
                    Instructions,
                    "You are Claude Code, Anthropic's official CLI for Claude.",
                ),
                Expect("system[1].text", System, Instructions, "Project rules: never push to main."),
                Expect("messages[0].content", User, Content, "List the files, then summarize README.md"),
                Expect("messages[1].content[0].thinking", Assistant, Reasoning, "I should list the directory first."),
                Expect("messages[1].content[2].text", Assistant, Content, "Listing files."),
                Expect("messages[1].content[3].input.command", Assistant, ToolCall, "ls -la"),
                Expect("messages[1].content[3].input.description", Assistant, ToolCall, "List files"),
                Expect("messages[2].content[0].content", Tool, ToolResult, "README.md\nsrc\n"),
                Expect("messages[2].content[1].content[0].text", Tool, ToolResult, "# Project\nA demo."),
                Expect("messages[2].content[3].text", User, Content, "Here is a screenshot too."),
                Expect("messages[2].content[4].title", User, Content, "notes"),
                Expect("messages[2].content[4].source.data", User, Content, "Plain text document body."),
                Expect("tools[0].description", System, Instructions, "Executes a bash command"),
            ],
        );
    }

    #[test]
    fn string_system() {
        check_request(
            Provider::Anthropic,
            r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":100,"system":"Be brief.","messages":[{"role":"user","content":"hi"}]}"#,
            None,
            false,
            &[Expect("system", System, Instructions, "Be brief."), Expect("messages[0].content", User, Content, "hi")],
        );
    }

    #[test]
    fn response_fixture() {
        check_response(
            Provider::Anthropic,
            include_str!("../../../tests/fixtures/providers/anthropic_response.json"),
            &[
                Expect("content[0].thinking", Assistant, Reasoning, "The user wants the weather."),
                Expect("content[1].text", Assistant, Content, "Let me check the weather."),
                Expect("content[2].input.location", Assistant, ToolCall, "San Francisco, CA"),
                Expect("content[2].input.units[0]", Assistant, ToolCall, "celsius"),
            ],
        );
    }

    #[test]
    fn stream_fixture() {
        check_sse_stream(
            Provider::Anthropic,
            include_str!("../../../tests/fixtures/providers/anthropic_stream.txt"),
            &[(Reasoning, "Let me think."), (Content, "Hello, world"), (ToolCall, "{\"location\": \"Paris\"}")],
        );
    }
}
