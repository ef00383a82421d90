//! Gemini `generateContent` / `streamGenerateContent` (Google AI and Vertex).
//!
//! Google's JSON mapping accepts both lowerCamelCase and the proto's
//! snake_case field names (`systemInstruction` / `system_instruction`), and
//! clients send either, so both are read. The model and whether the call
//! streams are in the path, not the body.

use serde_json::{Value, json};

use super::{Collector, RewriteError, delta, join, kind_for, role_of};
use crate::guardrails::framing::sse::encode_event;
use crate::guardrails::model::{PathSeg, Role, StreamDelta, TextKind};

/// `v[camel]` or `v[snake]`, with the key actually present.
fn either<'a>(v: &'a Value, camel: &'static str, snake: &'static str) -> Option<(&'static str, &'a Value)> {
    v.get(camel).map(|x| (camel, x)).or_else(|| v.get(snake).map(|x| (snake, x)))
}

pub(super) fn request(doc: &Value, c: &mut Collector) {
    if let Some((key, sys)) = either(doc, "systemInstruction", "system_instruction") {
        parts(sys.get("parts"), &jpath![key, "parts"], Role::System, c);
    }
    for (i, content) in doc.get("contents").and_then(Value::as_array).into_iter().flatten().enumerate() {
        // A missing role means the user.
        let role = content.get("role").and_then(Value::as_str).map_or(Role::User, role_of);
        parts(content.get("parts"), &jpath!["contents", i, "parts"], role, c);
    }
    // Function declarations: `description` and the parameters' descriptions
    // (`parameters` is an OpenAPI schema, `parametersJsonSchema` a JSON one).
    for (i, tool) in doc.get("tools").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let Some((key, decls)) = either(tool, "functionDeclarations", "function_declarations") else { continue };
        for (j, decl) in decls.as_array().into_iter().flatten().enumerate() {
            let base = jpath!["tools", i, key, j];
            c.string(decl.get("description"), join(&base, jpath!["description"]), Role::System, TextKind::Instructions);
            for schema in ["parameters", "parametersJsonSchema", "parameters_json_schema"] {
                c.descriptions(decl.get(schema), join(&base, jpath![schema]));
            }
        }
    }
}

pub(super) fn response(doc: &Value, c: &mut Collector) {
    for (i, cand) in doc.get("candidates").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let parts_v = cand.get("content").and_then(|x| x.get("parts"));
        parts(parts_v, &jpath!["candidates", i, "content", "parts"], Role::Assistant, c);
    }
}

fn parts(v: Option<&Value>, base: &[PathSeg], role: Role, c: &mut Collector) {
    for (j, part) in v.and_then(Value::as_array).into_iter().flatten().enumerate() {
        let p = join(base, jpath![j]);
        // Thought summaries are parts with `thought: true`.
        let kind = if part.get("thought").and_then(Value::as_bool) == Some(true) {
            TextKind::Reasoning
        } else {
            kind_for(role)
        };
        c.string(part.get("text"), join(&p, jpath!["text"]), role, kind);
        if let Some((key, call)) = either(part, "functionCall", "function_call") {
            c.leaves(call.get("args"), join(&p, jpath![key, "args"]), Role::Assistant, TextKind::ToolCall);
        }
        if let Some((key, resp)) = either(part, "functionResponse", "function_response") {
            c.leaves(resp.get("response"), join(&p, jpath![key, "response"]), Role::Tool, TextKind::ToolResult);
        }
        if let Some((key, code)) = either(part, "executableCode", "executable_code") {
            c.string(code.get("code"), join(&p, jpath![key, "code"]), Role::Assistant, TextKind::ToolCall);
        }
        if let Some((key, res)) = either(part, "codeExecutionResult", "code_execution_result") {
            c.string(res.get("output"), join(&p, jpath![key, "output"]), Role::Tool, TextKind::ToolResult);
        }
        // inlineData / fileData: binary, never text.
    }
}

/// One streamed `GenerateContentResponse` (SSE data or array element).
/// There is no terminator event: a `finishReason` marks the last chunk.
pub(super) fn chunk(v: &Value) -> StreamDelta {
    let mut c = Collector::default();
    response(v, &mut c);
    let texts = c.texts.into_iter().map(|s| (s.kind, s.text)).collect();
    let cands = v.get("candidates").and_then(Value::as_array);
    let finished = cands.into_iter().flatten().any(|cand| cand.get("finishReason").is_some_and(|r| !r.is_null()));
    let blocked = v.get("promptFeedback").and_then(|f| f.get("blockReason")).is_some();
    let error = v.get("error").is_some();
    delta(texts, finished || blocked || error)
}

pub(super) fn insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    let key = if obj.contains_key("system_instruction") { "system_instruction" } else { "systemInstruction" };
    let sys = obj.entry(key).or_insert_with(|| json!({}));
    if sys.is_null() {
        *sys = json!({});
    }
    let sys = sys.as_object_mut().ok_or(RewriteError::Shape { what: "systemInstruction is not an object" })?;
    match sys.entry("parts").or_insert_with(|| json!([])) {
        Value::Array(parts) => parts.push(json!({"text": text})),
        _ => return Err(RewriteError::Shape { what: "systemInstruction.parts is not a list" }),
    }
    Ok(())
}

fn error_value(reason: &str) -> Value {
    json!({"error": {"code": 403, "message": reason, "status": "PERMISSION_DENIED"}})
}

pub(super) fn sse_block(reason: &str) -> Vec<u8> {
    encode_event(None, &error_value(reason).to_string())
}

pub(super) fn json_array_block(reason: &str, elements_forwarded: bool) -> Vec<u8> {
    let body = error_value(reason).to_string();
    let lead = if elements_forwarded { ",\r\n" } else { "[" };
    format!("{lead}{body}\r\n]").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request, check_response, check_sse_stream, collect_stream, framed_deltas};
    use super::*;
    use crate::guardrails::framing::FramingKind;
    use crate::guardrails::model::{Provider, Role::*, TextKind::*};

    #[test]
    fn request_fixture() {
        check_request(
            Provider::Gemini,
            include_str!("../../../tests/fixtures/providers/gemini_request.json"),
            None,
            false,
            &[
                Expect("systemInstruction.parts[0].text", System, Instructions, "You are a helpful assistant."),
                Expect("contents[0].parts[0].text", User, Content, "What's the weather in Tokyo? See attached."),
                Expect("contents[1].parts[0].text", Assistant, Reasoning, "Need to call the weather tool."),
                Expect("contents[1].parts[1].functionCall.args.city", Assistant, ToolCall, "Tokyo"),
                Expect("contents[2].parts[0].functionResponse.response.forecast", Tool, ToolResult, "Rain, 18C"),
                Expect("contents[3].parts[0].text", Assistant, Content, "It will rain."),
                Expect("contents[4].parts[0].text", User, Content, "thanks"),
                Expect("tools[0].functionDeclarations[0].description", System, Instructions, "Weather by city"),
            ],
        );
    }

    #[test]
    fn snake_case_request() {
        check_request(
            Provider::Gemini,
            r#"{"system_instruction":{"parts":[{"text":"sys"}]},"contents":[{"parts":[{"text":"hi"},{"function_response":{"name":"f","response":{"out":"ok"}}}]}]}"#,
            None,
            false,
            &[
                Expect("system_instruction.parts[0].text", System, Instructions, "sys"),
                Expect("contents[0].parts[0].text", User, Content, "hi"),
                Expect("contents[0].parts[1].function_response.response.out", Tool, ToolResult, "ok"),
            ],
        );
    }

    #[test]
    fn response_fixture() {
        check_response(
            Provider::Gemini,
            include_str!("../../../tests/fixtures/providers/gemini_response.json"),
            &[
                Expect(
                    "candidates[0].content.parts[0].text",
                    Assistant,
                    Content,
                    "Here is a haiku:\nRain on the rooftops",
                ),
                Expect("candidates[0].content.parts[1].functionCall.args.query", Assistant, ToolCall, "rain haiku"),
            ],
        );
    }

    #[test]
    fn sse_stream_fixture() {
        check_sse_stream(
            Provider::Gemini,
            include_str!("../../../tests/fixtures/providers/gemini_stream_sse.txt"),
            &[(Content, "The quick brown fox jumps.")],
        );
    }

    #[test]
    fn json_array_stream_fixture() {
        let body = include_bytes!("../../../tests/fixtures/providers/gemini_stream_array.json");
        let ds = framed_deltas(Provider::Gemini, FramingKind::JsonArray, body, 5);
        let (texts, end_at) = collect_stream(&ds);
        assert_eq!(texts, vec![(Content, "The quick brown fox jumps.".to_owned())]);
        assert_eq!(end_at, Some(ds.len() - 1));
    }

    #[test]
    fn json_array_blocks_parse() {
        let mut after_one = br#"[{"candidates":[{"content":{"parts":[{"text":"a"}]}}]}"#.to_vec();
        after_one.extend(json_array_block("no", true));
        let v: Value = serde_json::from_slice(&after_one).unwrap();
        assert_eq!(v[1]["error"]["status"], "PERMISSION_DENIED");
        let v: Value = serde_json::from_slice(&json_array_block("no", false)).unwrap();
        assert_eq!(v[0]["error"]["message"], "no");
    }
}
