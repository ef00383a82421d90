//! Cohere Chat (`api.cohere.com`, `api.cohere.ai`).
//!
//! * v2 (`POST /v2/chat`): `messages[]` like OpenAI's (`content` a string or
//!   `{type: "text"}` parts; assistant `tool_calls[].function.arguments`),
//!   plus an assistant `tool_plan`, `{type: "document", document: {data}}`
//!   parts in tool results, and top-level `documents` (strings or objects).
//!   Streams are SSE with `content-delta`, `tool-plan-delta`,
//!   `tool-call-delta` … `message-end` events.
//! * v1 (`POST /v1/chat`): `message`, `preamble` (the system prompt),
//!   `chat_history[]` with upper-case roles (`USER`, `CHATBOT`, `SYSTEM`,
//!   `TOOL`), `documents`, `tool_results`. Streams are JSON lines with an
//!   `event_type`.

use serde_json::{Value, json};

use super::{Collector, RewriteError, append_paragraph, delta, join, kind_for, openai, push_str, role_of, str_field};
use crate::guardrails::model::{PathSeg, Role, StreamDelta, TextKind};

pub(super) fn request(doc: &Value, c: &mut Collector) {
    // v1
    c.string(doc.get("preamble"), jpath!["preamble"], Role::System, TextKind::Instructions);
    for (i, turn) in doc.get("chat_history").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let role = role_of(str_field(turn, "role"));
        c.string(turn.get("message"), jpath!["chat_history", i, "message"], role, kind_for(role));
        tool_results(turn.get("tool_results"), jpath!["chat_history", i, "tool_results"], c);
    }
    c.string(doc.get("message"), jpath!["message"], Role::User, TextKind::Content);
    tool_results(doc.get("tool_results"), jpath!["tool_results"], c);
    // v2
    for (i, m) in doc.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        message(m, &jpath!["messages", i], Role::Unknown, c);
    }
    // Grounding documents, both versions: strings, or objects of fields.
    for (i, d) in doc.get("documents").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let mut path = jpath!["documents", i];
        c.walk(d, &mut path, Role::User, TextKind::Content, true);
    }
    for (i, tool) in doc.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        match tool.get("function") {
            // v2: OpenAI's shape.
            Some(f) => openai::function_definition(f, jpath!["tools", i, "function"], c),
            // v1: `description`, and `parameter_definitions.{name}.description`.
            None => {
                let base = jpath!["tools", i];
                c.string(
                    tool.get("description"),
                    join(&base, jpath!["description"]),
                    Role::System,
                    TextKind::Instructions,
                );
                c.descriptions(tool.get("parameter_definitions"), join(&base, jpath!["parameter_definitions"]));
            }
        }
    }
}

/// One v2 message: OpenAI's fields, then Cohere's own.
fn message(m: &Value, base: &[PathSeg], default_role: Role, c: &mut Collector) {
    openai::chat_message(m, base, default_role, c);
    let role = m.get("role").and_then(Value::as_str).map_or(default_role, role_of);
    c.string(m.get("tool_plan"), join(base, jpath!["tool_plan"]), role, TextKind::Reasoning);
    for (j, part) in m.get("content").and_then(Value::as_array).into_iter().flatten().enumerate() {
        match str_field(part, "type") {
            "document" => {
                let data = part.get("document").and_then(|d| d.get("data"));
                c.leaves(data, join(base, jpath!["content", j, "document", "data"]), role, kind_for(role));
            }
            "thinking" => {
                c.string(part.get("thinking"), join(base, jpath!["content", j, "thinking"]), role, TextKind::Reasoning);
            }
            _ => {}
        }
    }
}

/// v1 `tool_results`: `[{call: {name, parameters}, outputs: [{…}]}]`.
fn tool_results(v: Option<&Value>, base: Vec<PathSeg>, c: &mut Collector) {
    for (k, r) in v.and_then(Value::as_array).into_iter().flatten().enumerate() {
        let params = r.get("call").and_then(|call| call.get("parameters"));
        c.leaves(params, join(&base, jpath![k, "call", "parameters"]), Role::Assistant, TextKind::ToolCall);
        c.leaves(r.get("outputs"), join(&base, jpath![k, "outputs"]), Role::Tool, TextKind::ToolResult);
    }
}

pub(super) fn response(doc: &Value, c: &mut Collector) {
    // v2
    if let Some(m) = doc.get("message").filter(|m| m.is_object()) {
        message(m, &jpath!["message"], Role::Assistant, c);
    }
    // v1
    c.string(doc.get("text"), jpath!["text"], Role::Assistant, TextKind::Content);
    for (k, call) in doc.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        c.leaves(call.get("parameters"), jpath!["tool_calls", k, "parameters"], Role::Assistant, TextKind::ToolCall);
    }
}

/// A v2 SSE event (the type is in the data's `type`, mirrored in `event:`)
/// or a v1 JSON-lines event (`event_type`).
pub(super) fn chunk(event: Option<&str>, v: &Value) -> StreamDelta {
    let ty = v.get("type").or_else(|| v.get("event_type")).and_then(Value::as_str).or(event).unwrap_or("");
    let m = v.get("delta").and_then(|d| d.get("message")).unwrap_or(&Value::Null);
    let mut texts = Vec::new();
    match ty {
        "content-start" | "content-delta" => {
            let content = m.get("content").unwrap_or(&Value::Null);
            push_str(&mut texts, TextKind::Reasoning, content.get("thinking"));
            push_str(&mut texts, TextKind::Content, content.get("text"));
        }
        "tool-plan-delta" => push_str(&mut texts, TextKind::Reasoning, m.get("tool_plan")),
        "tool-call-start" | "tool-call-delta" => {
            let args = m.get("tool_calls").and_then(|t| t.get("function")).and_then(|f| f.get("arguments"));
            push_str(&mut texts, TextKind::ToolCall, args);
        }
        // v1
        "text-generation" => push_str(&mut texts, TextKind::Content, v.get("text")),
        _ => {}
    }
    let finished = v.get("is_finished").and_then(Value::as_bool).unwrap_or(false);
    delta(texts, finished || matches!(ty, "message-end" | "stream-end"))
}

/// v2: a `system` message first; v1: appended to `preamble`.
pub(super) fn insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    if doc.get("messages").is_some_and(Value::is_array) {
        return openai::chat_insert(doc, text);
    }
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    let merged = match obj.get("preamble") {
        Some(Value::String(s)) => append_paragraph(s, text),
        None | Some(Value::Null) => text.to_owned(),
        Some(_) => return Err(RewriteError::Shape { what: "preamble is not a string" }),
    };
    obj.insert("preamble".into(), json!(merged));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request, check_response, check_sse_stream};
    use crate::guardrails::model::{Provider, Role::*, TextKind::*};

    #[test]
    fn v2_request_fixture() {
        check_request(
            Provider::Cohere,
            include_str!("../../../tests/fixtures/providers/cohere_v2_request.json"),
            Some("command-a-03-2025"),
            false,
            &[
                Expect("messages[0].content", System, Instructions, "You are a support agent for Acme."),
                Expect("messages[1].content[0].text", User, Content, "What is the status of order 1234?"),
                Expect("messages[2].tool_calls[0].function.arguments", Assistant, ToolCall, "{\"order_id\":\"1234\"}"),
                Expect("messages[2].tool_plan", Assistant, Reasoning, "I will look the order up."),
                Expect("messages[3].content[0].document.data", Tool, ToolResult, "{\"status\":\"shipped\"}"),
                Expect("messages[4].content", Assistant, Content, "Order 1234 has shipped."),
                Expect("documents[0]", User, Content, "Orders ship within two days."),
                Expect("documents[1].id", User, Identifier, "policy-7"),
                Expect("documents[1].data.title", User, Content, "Returns policy"),
                Expect("documents[1].data.snippet", User, Content, "Returns are accepted for 30 days."),
                Expect("tools[0].function.description", System, Instructions, "Look up an order by its id."),
                Expect(
                    "tools[0].function.parameters.properties.order_id.description",
                    System,
                    Instructions,
                    "The order number.",
                ),
            ],
        );
    }

    #[test]
    fn v1_request_fixture() {
        check_request(
            Provider::Cohere,
            include_str!("../../../tests/fixtures/providers/cohere_v1_request.json"),
            Some("command-r-plus"),
            true,
            &[
                Expect("preamble", System, Instructions, "Answer like a pirate."),
                Expect("chat_history[0].message", User, Content, "Hi there"),
                Expect("chat_history[1].message", Assistant, Content, "Ahoy!"),
                Expect("chat_history[2].tool_results[0].call.parameters.city", Assistant, ToolCall, "Lisbon"),
                Expect("chat_history[2].tool_results[0].outputs[0].forecast", Tool, ToolResult, "sunny"),
                Expect("message", User, Content, "What should I wear today?"),
                Expect("documents[0].title", User, Content, "Wardrobe"),
                Expect("documents[0].snippet", User, Content, "Two shirts, one hat."),
                Expect("tools[0].description", System, Instructions, "Weather for a city."),
                Expect("tools[0].parameter_definitions.city.description", System, Instructions, "City name."),
            ],
        );
    }

    #[test]
    fn responses_both_versions() {
        check_response(
            Provider::Cohere,
            r#"{"id":"a","finish_reason":"COMPLETE","message":{"role":"assistant","tool_plan":"Plan.","content":[{"type":"text","text":"Done."}],"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]}}"#,
            &[
                Expect("message.content[0].text", Assistant, Content, "Done."),
                Expect("message.tool_calls[0].function.arguments", Assistant, ToolCall, "{}"),
                Expect("message.tool_plan", Assistant, Reasoning, "Plan."),
            ],
        );
        check_response(
            Provider::Cohere,
            r#"{"text":"Arr.","generation_id":"g","tool_calls":[{"name":"w","parameters":{"city":"Porto"}}]}"#,
            &[
                Expect("text", Assistant, Content, "Arr."),
                Expect("tool_calls[0].parameters.city", Assistant, ToolCall, "Porto"),
            ],
        );
    }

    #[test]
    fn v2_stream() {
        check_sse_stream(
            Provider::Cohere,
            concat!(
                "event: message-start\ndata: {\"type\":\"message-start\",\"id\":\"x\",\"delta\":{\"message\":{\"role\":\"assistant\",\"content\":[]}}}\n\n",
                "event: tool-plan-delta\ndata: {\"type\":\"tool-plan-delta\",\"delta\":{\"message\":{\"tool_plan\":\"Think.\"}}}\n\n",
                "event: content-start\ndata: {\"type\":\"content-start\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"type\":\"text\",\"text\":\"\"}}}}\n\n",
                "event: content-delta\ndata: {\"type\":\"content-delta\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"text\":\"Hello\"}}}}\n\n",
                "event: content-delta\ndata: {\"type\":\"content-delta\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"text\":\", world\"}}}}\n\n",
                "event: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"finish_reason\":\"COMPLETE\"}}\n\n",
            ),
            &[(Reasoning, "Think."), (Content, "Hello, world")],
        );
    }
}
