//! OpenAI Chat Completions and Responses (also Codex on chatgpt.com, Copilot,
//! Azure and the many OpenAI-compatible endpoints), and the ChatGPT apps'
//! conversation requests, whose messages have an `author` and a `content`
//! object holding `parts`.

use serde_json::{Value, json};

use super::{Collector, RewriteError, append_paragraph, delta, join, kind_for, push_str, role_of, str_field};
use crate::guardrails::framing::sse::encode_event;
use crate::guardrails::model::{PathSeg, Role, StreamDelta, TextKind};

// ---------------------------------------------------------------------------
// Chat Completions

pub(super) fn chat_request(doc: &Value, c: &mut Collector) {
    for (i, m) in doc.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        chat_message(m, &jpath!["messages", i], Role::Unknown, c);
    }
    // Predicted Outputs: text the client expects back, string or parts.
    if let Some(prediction) = doc.get("prediction") {
        chat_content(prediction.get("content"), jpath!["prediction", "content"], Role::User, TextKind::Content, c);
    }
    // Tool definitions (and the legacy `functions`): descriptions are
    // instructions to the model.
    for (i, tool) in doc.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        if let Some(f) = tool.get("function") {
            function_definition(f, jpath!["tools", i, "function"], c);
        }
    }
    for (i, f) in doc.get("functions").and_then(Value::as_array).into_iter().flatten().enumerate() {
        function_definition(f, jpath!["functions", i], c);
    }
}

/// A function tool's `description` and its parameters' descriptions.
pub(super) fn function_definition(f: &Value, base: Vec<PathSeg>, c: &mut Collector) {
    c.string(f.get("description"), join(&base, jpath!["description"]), Role::System, TextKind::Instructions);
    c.descriptions(f.get("parameters"), join(&base, jpath!["parameters"]));
}

/// One chat message (request history, or a response's `message`, whose role
/// defaults to the assistant's).
pub(super) fn chat_message(m: &Value, base: &[PathSeg], default_role: Role, c: &mut Collector) {
    // The ChatGPT apps name the role in `author.role`.
    let role = m
        .get("role")
        .or_else(|| m.get("author").and_then(|a| a.get("role")))
        .and_then(Value::as_str)
        .map_or(default_role, role_of);
    chat_content(m.get("content"), join(base, jpath!["content"]), role, kind_for(role), c);
    // An assistant turn's refusal (`refusal` field, not a content part).
    c.string(m.get("refusal"), join(base, jpath!["refusal"]), role, TextKind::Content);
    // Reasoning text some compatible servers return (DeepSeek, vLLM, OpenRouter).
    c.string(m.get("reasoning_content"), join(base, jpath!["reasoning_content"]), role, TextKind::Reasoning);
    c.string(m.get("reasoning"), join(base, jpath!["reasoning"]), role, TextKind::Reasoning);
    if let Some(calls) = m.get("tool_calls").and_then(Value::as_array) {
        for (k, call) in calls.iter().enumerate() {
            let args = call.get("function").and_then(|f| f.get("arguments"));
            c.string(
                args,
                join(base, jpath!["tool_calls", k, "function", "arguments"]),
                Role::Assistant,
                TextKind::ToolCall,
            );
        }
    }
    // Legacy single `function_call`.
    let args = m.get("function_call").and_then(|f| f.get("arguments"));
    c.string(args, join(base, jpath!["function_call", "arguments"]), Role::Assistant, TextKind::ToolCall);
}

/// `content`: a string, parts of which only the text-bearing ones count, or
/// an object: the ChatGPT apps' `{"content_type": "text", "parts": [...]}`
/// (parts are strings, or objects with a `text`), or `{"text": ...}`.
fn chat_content(v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind, c: &mut Collector) {
    match v {
        Some(Value::String(_)) => c.string(v, path, role, kind),
        Some(Value::Object(obj)) => {
            c.string(obj.get("text"), join(&path, jpath!["text"]), role, kind);
            for (j, part) in obj.get("parts").and_then(Value::as_array).into_iter().flatten().enumerate() {
                match part {
                    Value::String(_) => c.string(Some(part), join(&path, jpath!["parts", j]), role, kind),
                    _ => c.string(part.get("text"), join(&path, jpath!["parts", j, "text"]), role, kind),
                }
            }
            // ChatGPT's custom instructions (`user_editable_context`).
            for field in ["user_profile", "user_instructions"] {
                c.string(obj.get(field), join(&path, jpath![field]), Role::System, TextKind::Instructions);
            }
        }
        Some(Value::Array(parts)) => {
            for (j, part) in parts.iter().enumerate() {
                if part.is_string() {
                    c.string(Some(part), join(&path, jpath![j]), role, kind);
                    continue;
                }
                match str_field(part, "type") {
                    "text" | "input_text" | "output_text" | "" => {
                        c.string(part.get("text"), join(&path, jpath![j, "text"]), role, kind);
                    }
                    "refusal" => c.string(part.get("refusal"), join(&path, jpath![j, "refusal"]), role, kind),
                    // image_url, input_audio, file: never text.
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

pub(super) fn chat_response(doc: &Value, c: &mut Collector) {
    let Some(choices) = doc.get("choices").and_then(Value::as_array) else { return };
    for (i, choice) in choices.iter().enumerate() {
        if let Some(m) = choice.get("message") {
            chat_message(m, &jpath!["choices", i, "message"], Role::Assistant, c);
        }
    }
}

pub(super) fn chat_chunk(v: &Value) -> StreamDelta {
    let mut texts = Vec::new();
    for choice in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
        let Some(d) = choice.get("delta") else { continue };
        push_str(&mut texts, TextKind::Reasoning, d.get("reasoning_content"));
        push_str(&mut texts, TextKind::Reasoning, d.get("reasoning"));
        push_str(&mut texts, TextKind::Content, d.get("content"));
        push_str(&mut texts, TextKind::Content, d.get("refusal"));
        for call in d.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
            push_str(&mut texts, TextKind::ToolCall, call.get("function").and_then(|f| f.get("arguments")));
        }
        push_str(&mut texts, TextKind::ToolCall, d.get("function_call").and_then(|f| f.get("arguments")));
    }
    // A mid-stream `{"error": …}` ends it (the SDKs raise on it).
    delta(texts, v.get("error").is_some_and(|e| !e.is_null()))
}

pub(super) fn chat_insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    let messages = doc
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .ok_or(RewriteError::Shape { what: "no messages array" })?;
    // A ChatGPT conversation request gets a message in its own shape.
    let conversation = messages.iter().any(|m| m.get("author").is_some() && m.get("role").is_none());
    let message = if conversation {
        json!({"author": {"role": "system"}, "content": {"content_type": "text", "parts": [text]}})
    } else {
        json!({"role": "system", "content": text})
    };
    messages.insert(0, message);
    Ok(())
}

pub(super) fn chat_block(reason: &str) -> Vec<u8> {
    let err = json!({"error": {"message": reason, "type": "guardrail_blocked", "param": null, "code": "blocked"}});
    let mut out = encode_event(None, &err.to_string());
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}

// ---------------------------------------------------------------------------
// Responses

pub(super) fn responses_request(doc: &Value, c: &mut Collector) {
    c.string(doc.get("instructions"), jpath!["instructions"], Role::System, TextKind::Instructions);
    // Variables substituted into a stored prompt template are user text.
    if let Some(vars) = doc.get("prompt").and_then(|p| p.get("variables")) {
        let mut path = jpath!["prompt", "variables"];
        c.walk(vars, &mut path, Role::User, TextKind::Content, true);
    }
    match doc.get("input") {
        Some(Value::String(_)) => c.string(doc.get("input"), jpath!["input"], Role::User, TextKind::Content),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                responses_item(item, &jpath!["input", i], c);
            }
        }
        _ => {}
    }
    // Function and custom tools are flat here (`{"type": "function", "name",
    // "description", "parameters"}`); a nested `function` is read too.
    for (i, tool) in doc.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        match tool.get("function") {
            Some(f) => function_definition(f, jpath!["tools", i, "function"], c),
            None => function_definition(tool, jpath!["tools", i], c),
        }
    }
}

pub(super) fn responses_response(doc: &Value, c: &mut Collector) {
    // `instructions` is echoed back in the response object: it is the
    // request's, not output, so it is not collected here.
    for (i, item) in doc.get("output").and_then(Value::as_array).into_iter().flatten().enumerate() {
        responses_item(item, &jpath!["output", i], c);
    }
}

/// One input or output item.
fn responses_item(item: &Value, base: &[PathSeg], c: &mut Collector) {
    if item.is_string() {
        // A bare string in the `input` array reads as user text.
        c.string(Some(item), base.to_vec(), Role::User, TextKind::Content);
        return;
    }
    match str_field(item, "type") {
        "message" | "" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some(r) => role_of(r),
                None => Role::Assistant,
            };
            chat_content(item.get("content"), join(base, jpath!["content"]), role, kind_for(role), c);
        }
        "function_call" | "mcp_call" => {
            c.string(item.get("arguments"), join(base, jpath!["arguments"]), Role::Assistant, TextKind::ToolCall);
            c.string(item.get("output"), join(base, jpath!["output"]), Role::Tool, TextKind::ToolResult);
        }
        // Freeform tools (Codex's apply_patch) carry raw `input`.
        "custom_tool_call" => {
            c.string(item.get("input"), join(base, jpath!["input"]), Role::Assistant, TextKind::ToolCall);
        }
        "local_shell_call" => {
            let cmd = item.get("action").and_then(|a| a.get("command"));
            c.leaves(cmd, join(base, jpath!["action", "command"]), Role::Assistant, TextKind::ToolCall);
        }
        "function_call_output" | "custom_tool_call_output" | "local_shell_call_output" => match item.get("output") {
            // `output` may also be a list of input_text / input_image parts.
            Some(Value::Array(_)) => {
                chat_content(item.get("output"), join(base, jpath!["output"]), Role::Tool, TextKind::ToolResult, c);
            }
            other => c.string(other, join(base, jpath!["output"]), Role::Tool, TextKind::ToolResult),
        },
        "reasoning" => {
            // `encrypted_content` is opaque; `summary` and `content` are text.
            for field in ["summary", "content"] {
                for (j, part) in item.get(field).and_then(Value::as_array).into_iter().flatten().enumerate() {
                    c.string(
                        part.get("text"),
                        join(base, jpath![field, j, "text"]),
                        Role::Assistant,
                        TextKind::Reasoning,
                    );
                }
            }
        }
        _ => {}
    }
}

/// Responses stream event; the type is in the data's `type` (and mirrored
/// in the SSE `event:` line).
pub(super) fn responses_event(event: Option<&str>, v: &Value) -> StreamDelta {
    let ty = v.get("type").and_then(Value::as_str).or(event).unwrap_or("");
    let kind = match ty {
        "response.output_text.delta" | "response.refusal.delta" => Some(TextKind::Content),
        "response.function_call_arguments.delta"
        | "response.custom_tool_call_input.delta"
        | "response.mcp_call_arguments.delta"
        | "response.code_interpreter_call_code.delta" => Some(TextKind::ToolCall),
        "response.reasoning_summary_text.delta" | "response.reasoning_text.delta" => Some(TextKind::Reasoning),
        _ => None,
    };
    let mut texts = Vec::new();
    if let Some(kind) = kind {
        // `delta` is a plain string in every one of these events.
        push_str(&mut texts, kind, v.get("delta"));
    }
    let end = matches!(ty, "response.completed" | "response.incomplete" | "response.failed" | "error");
    delta(texts, end)
}

pub(super) fn responses_insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    if let Some(Value::Array(items)) = doc.get_mut("input") {
        items.insert(
            0,
            json!({"type": "message", "role": "developer", "content": [{"type": "input_text", "text": text}]}),
        );
        return Ok(());
    }
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    let merged = match obj.get("instructions") {
        Some(Value::String(s)) => append_paragraph(s, text),
        None | Some(Value::Null) => text.to_owned(),
        Some(_) => return Err(RewriteError::Shape { what: "instructions is not a string" }),
    };
    obj.insert("instructions".into(), Value::String(merged));
    Ok(())
}

pub(super) fn responses_block(reason: &str) -> Vec<u8> {
    let error = json!({
        "type": "error",
        "code": "guardrail_blocked",
        "message": reason,
        "param": null,
        "sequence_number": 0,
        "error": {"type": "guardrail_blocked", "code": "guardrail_blocked", "message": reason},
    });
    let failed = json!({
        "type": "response.failed",
        "sequence_number": 1,
        "response": {
            "object": "response",
            "status": "failed",
            "error": {"code": "guardrail_blocked", "message": reason},
            "output": [],
        },
    });
    let mut out = encode_event(Some("error"), &error.to_string());
    out.extend(encode_event(Some("response.failed"), &failed.to_string()));
    out
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request, check_response, check_sse_stream};
    use crate::guardrails::model::{Provider, Role::*, TextKind::*};

    #[test]
    fn chat_request_fixture() {
        check_request(
            Provider::OpenAiChat,
            include_str!("../../../tests/fixtures/providers/openai_chat_request.json"),
            Some("gpt-4o"),
            true,
            &[
                Expect("messages[0].content", System, Instructions, "You are a careful coding assistant."),
                Expect("messages[1].content", Developer, Instructions, "Answer in English."),
                Expect("messages[2].content[0].text", User, Content, "What is in this image? Also read /etc/passwd"),
                Expect(
                    "messages[3].tool_calls[0].function.arguments",
                    Assistant,
                    ToolCall,
                    "{\"path\":\"/etc/passwd\"}",
                ),
                Expect("messages[4].content", Tool, ToolResult, "root:x:0:0:root:/root:/bin/bash"),
                Expect("messages[5].content", Assistant, Content, "The file lists one user."),
                Expect("messages[6].content", User, Content, "thanks"),
                Expect("tools[0].function.description", System, Instructions, "Read a file from disk"),
            ],
        );
    }

    #[test]
    fn chat_response_fixture() {
        check_response(
            Provider::OpenAiChat,
            include_str!("../../../tests/fixtures/providers/openai_chat_response.json"),
            &[
                Expect("choices[0].message.content", Assistant, Content, "I'll look that up."),
                Expect(
                    "choices[0].message.tool_calls[0].function.arguments",
                    Assistant,
                    ToolCall,
                    "{\"query\":\"weather in Paris\"}",
                ),
                Expect("choices[1].message.refusal", Assistant, Content, "I can't help with that."),
            ],
        );
    }

    #[test]
    fn chat_stream_fixture() {
        check_sse_stream(
            Provider::OpenAiChat,
            include_str!("../../../tests/fixtures/providers/openai_chat_stream.txt"),
            &[(Content, "Hello there!"), (ToolCall, "{\"city\":\"Paris\"}")],
        );
    }

    #[test]
    fn responses_request_fixture() {
        check_request(
            Provider::OpenAiResponses,
            include_str!("../../../tests/fixtures/providers/openai_responses_request.json"),
            Some("gpt-5-codex"),
            true,
            &[
                Expect("instructions", System, Instructions, "You are Codex, a coding agent."),
                Expect(
                    "input[0].content[0].text",
                    Developer,
                    Instructions,
                    "<permissions instructions>sandbox: workspace-write</permissions instructions>",
                ),
                Expect("input[1].content[0].text", User, Content, "Fix the failing test in src/lib.rs"),
                Expect("input[2].summary[0].text", Assistant, Reasoning, "**Inspecting the test**"),
                Expect("input[3].arguments", Assistant, ToolCall, "{\"command\":[\"cargo\",\"test\"]}"),
                Expect("input[4].output", Tool, ToolResult, "test result: FAILED. 1 failed"),
                Expect(
                    "input[5].input",
                    Assistant,
                    ToolCall,
                    "*** Begin Patch\n*** Update File: src/lib.rs\n-1\n+2\n*** End Patch",
                ),
                Expect("input[6].output", Tool, ToolResult, "Success. Updated src/lib.rs"),
                Expect("input[7].content[0].text", Assistant, Content, "Fixed."),
                Expect("input[8].content", User, Content, "now explain the screenshot"),
                Expect("tools[0].description", System, Instructions, "Runs a shell command"),
            ],
        );
    }

    #[test]
    fn responses_string_input() {
        check_request(
            Provider::OpenAiResponses,
            r#"{"model":"gpt-4.1","input":"Tell me a joke","instructions":null}"#,
            Some("gpt-4.1"),
            false,
            &[Expect("input", User, Content, "Tell me a joke")],
        );
    }

    #[test]
    fn responses_prompt_variables() {
        check_request(
            Provider::OpenAiResponses,
            r#"{"model":"gpt-5","prompt":{"id":"pmpt_1","version":"2","variables":{"city":"Paris","note":{"type":"input_text","text":"be brief"}}},"input":[]}"#,
            Some("gpt-5"),
            false,
            &[
                Expect("prompt.variables.city", User, Content, "Paris"),
                Expect("prompt.variables.note.type", User, Identifier, "input_text"),
                Expect("prompt.variables.note.text", User, Content, "be brief"),
            ],
        );
    }

    #[test]
    fn responses_response_fixture() {
        check_response(
            Provider::OpenAiResponses,
            include_str!("../../../tests/fixtures/providers/openai_responses_response.json"),
            &[
                Expect("output[0].summary[0].text", Assistant, Reasoning, "Thinking about the weather tool"),
                Expect("output[1].arguments", Assistant, ToolCall, "{\"location\":\"Boston, MA\"}"),
                Expect("output[2].content[0].text", Assistant, Content, "It is sunny in Boston."),
                Expect("output[2].content[1].refusal", Assistant, Content, "I won't share that."),
            ],
        );
    }

    #[test]
    fn responses_stream_fixture() {
        check_sse_stream(
            Provider::OpenAiResponses,
            include_str!("../../../tests/fixtures/providers/openai_responses_stream.txt"),
            &[(Reasoning, "Considering options"), (Content, "Hi there"), (ToolCall, "{\"q\":1}")],
        );
    }
}
