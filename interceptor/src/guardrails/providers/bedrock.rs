//! Amazon Bedrock: Converse / ConverseStream, and InvokeModel with
//! model-native bodies (Titan, Llama, Mistral, Cohere, AI21, DeepSeek, Nova,
//! OpenAI-shaped models; Claude bodies go to `anthropic`).
//!
//! Invoke bodies are recognized by their fields, not by the model id, so an
//! application inference profile ARN (which does not name the model) still
//! parses.

use base64::Engine as _;
use serde_json::{Value, json};

use super::{
    Collector, RewriteError, anthropic, append_paragraph, delta, generic, join, kind_for, openai, percent_decode,
    push_str, role_of, str_field,
};
use crate::guardrails::framing::eventstream::{self, HeaderValue};
use crate::guardrails::model::{PathSeg, Provider, Role, StreamDelta, TextKind};

/// `/model/{modelId}/{operation}` on a bedrock-runtime host.
pub(super) fn detect_path(path: &str) -> Provider {
    let Some((id, op)) = path.strip_prefix("/model/").and_then(|rest| rest.rsplit_once('/')) else {
        return Provider::Generic;
    };
    match op {
        // The id is URL-encoded (ARNs carry `:` and `/` as %3A / %2F).
        "invoke" | "invoke-with-response-stream" => {
            if percent_decode(id).contains("anthropic.") {
                Provider::Anthropic
            } else {
                Provider::BedrockInvoke
            }
        }
        "converse" | "converse-stream" => Provider::BedrockConverse,
        _ => Provider::Generic,
    }
}

// ---------------------------------------------------------------------------
// Converse

/// Converse-shaped: content blocks keyed by kind (`{text}`, `{toolUse}`)
/// rather than tagged with `type`, or `system` as a list of `{text}`.
pub(super) fn is_converse_shaped(doc: &Value) -> bool {
    let untyped = |b: &Value| {
        b.as_object().is_some_and(|o| {
            !o.contains_key("type")
                && ["text", "toolUse", "toolResult", "image", "document", "reasoningContent", "cachePoint"]
                    .iter()
                    .any(|k| o.contains_key(*k))
        })
    };
    let msgs = doc.get("messages").and_then(Value::as_array);
    let in_messages =
        msgs.into_iter().flatten().filter_map(|m| m.get("content").and_then(Value::as_array)).flatten().any(untyped);
    let in_system = doc.get("system").and_then(Value::as_array).is_some_and(|s| s.iter().any(untyped));
    in_messages || in_system
}

pub(super) fn converse_request(doc: &Value, c: &mut Collector) {
    for (i, block) in doc.get("system").and_then(Value::as_array).into_iter().flatten().enumerate() {
        converse_block(block, &jpath!["system", i], Role::System, c);
    }
    for (i, m) in doc.get("messages").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let role = role_of(str_field(m, "role"));
        for (j, block) in m.get("content").and_then(Value::as_array).into_iter().flatten().enumerate() {
            converse_block(block, &jpath!["messages", i, "content", j], role, c);
        }
    }
    let tools = doc.get("toolConfig").and_then(|t| t.get("tools")).and_then(Value::as_array);
    for (i, tool) in tools.into_iter().flatten().enumerate() {
        let Some(spec) = tool.get("toolSpec") else { continue };
        let base = jpath!["toolConfig", "tools", i, "toolSpec"];
        c.string(spec.get("description"), join(&base, jpath!["description"]), Role::System, TextKind::Instructions);
        c.descriptions(spec.get("inputSchema").and_then(|s| s.get("json")), join(&base, jpath!["inputSchema", "json"]));
    }
}

pub(super) fn converse_response(doc: &Value, c: &mut Collector) {
    let blocks = doc.get("output").and_then(|o| o.get("message")).and_then(|m| m.get("content"));
    for (j, block) in blocks.and_then(Value::as_array).into_iter().flatten().enumerate() {
        converse_block(block, &jpath!["output", "message", "content", j], Role::Assistant, c);
    }
}

/// One content (or system) block, keyed by what it holds.
fn converse_block(block: &Value, base: &[PathSeg], role: Role, c: &mut Collector) {
    let kind = kind_for(role);
    c.string(block.get("text"), join(base, jpath!["text"]), role, kind);
    let guarded = block.get("guardContent").and_then(|g| g.get("text")).and_then(|t| t.get("text"));
    c.string(guarded, join(base, jpath!["guardContent", "text", "text"]), role, kind);
    let doc_text = block.get("document").and_then(|d| d.get("source")).and_then(|s| s.get("text"));
    c.string(doc_text, join(base, jpath!["document", "source", "text"]), role, kind);
    if let Some(tool_use) = block.get("toolUse") {
        c.leaves(tool_use.get("input"), join(base, jpath!["toolUse", "input"]), Role::Assistant, TextKind::ToolCall);
    }
    if let Some(result) = block.get("toolResult") {
        for (k, part) in result.get("content").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let p = join(base, jpath!["toolResult", "content", k]);
            c.string(part.get("text"), join(&p, jpath!["text"]), Role::Tool, TextKind::ToolResult);
            c.leaves(part.get("json"), join(&p, jpath!["json"]), Role::Tool, TextKind::ToolResult);
        }
    }
    let reasoning = block.get("reasoningContent").and_then(|r| r.get("reasoningText")).and_then(|t| t.get("text"));
    c.string(reasoning, join(base, jpath!["reasoningContent", "reasoningText", "text"]), role, TextKind::Reasoning);
}

/// A ConverseStream event: the name comes from `:event-type`, the payload is
/// the event body. Also accepts the SDK's wrapped form
/// (`{"contentBlockDelta": {...}}`) when no name is given.
pub(super) fn converse_event(event_type: &str, v: &Value) -> StreamDelta {
    if event_type.is_empty()
        && let Some((name, inner)) = wrapped_converse_event(v)
    {
        return converse_event(name, inner);
    }
    let mut texts = Vec::new();
    if event_type == "contentBlockDelta" {
        let d = v.get("delta").unwrap_or(&Value::Null);
        push_str(&mut texts, TextKind::Content, d.get("text"));
        push_str(&mut texts, TextKind::ToolCall, d.get("toolUse").and_then(|t| t.get("input")));
        push_str(&mut texts, TextKind::Reasoning, d.get("reasoningContent").and_then(|r| r.get("text")));
    }
    let end = event_type == "messageStop" || event_type.ends_with("Exception");
    delta(texts, end)
}

const CONVERSE_EVENTS: [&str; 6] =
    ["messageStart", "contentBlockStart", "contentBlockDelta", "contentBlockStop", "messageStop", "metadata"];

/// `{"<eventName>": {...}, ...}`: the event a wrapped object holds.
fn wrapped_converse_event(v: &Value) -> Option<(&'static str, &Value)> {
    let o = v.as_object()?;
    CONVERSE_EVENTS.iter().find_map(|name| o.get(*name).map(|inner| (*name, inner)))
}

pub(super) fn converse_insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    match obj.get_mut("system") {
        Some(Value::Array(blocks)) => blocks.push(json!({"text": text})),
        None | Some(Value::Null) => {
            obj.insert("system".into(), json!([{"text": text}]));
        }
        Some(_) => return Err(RewriteError::Shape { what: "system is not a list" }),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// InvokeModel, model-native bodies

/// A model-native body of a non-Anthropic model (request or response).
pub(super) fn is_invoke_native(doc: &Value) -> bool {
    let Some(o) = doc.as_object() else { return false };
    o.contains_key("inputText")
        || o.contains_key("results")
        || o.contains_key("generation")
        || (o.contains_key("prompt") && !o.contains_key("model"))
        || (o.get("message").is_some_and(Value::is_string)
            && (o.contains_key("chat_history") || o.contains_key("preamble")))
}

pub(super) fn invoke_request(doc: &Value, c: &mut Collector) {
    if doc.get("anthropic_version").is_some() {
        return anthropic::request(doc, c);
    }
    let before = c.texts.len();
    // Titan
    c.string(doc.get("inputText"), jpath!["inputText"], Role::User, TextKind::Content);
    // Llama, Mistral, DeepSeek, Cohere Command (generate), AI21 Jurassic
    c.string(doc.get("prompt"), jpath!["prompt"], Role::User, TextKind::Content);
    // Cohere Command R: `preamble` is the system prompt, history has upper-case roles.
    c.string(doc.get("preamble"), jpath!["preamble"], Role::System, TextKind::Instructions);
    for (i, turn) in doc.get("chat_history").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let role = role_of(str_field(turn, "role"));
        c.string(turn.get("message"), jpath!["chat_history", i, "message"], role, kind_for(role));
    }
    c.string(doc.get("message"), jpath!["message"], Role::User, TextKind::Content);
    if doc.get("messages").is_some() {
        if is_converse_shaped(doc) {
            // Nova (`schemaVersion: messages-v1`) uses the Converse shape.
            converse_request(doc, c);
        } else {
            // Jamba, Mistral chat, gpt-oss: Chat Completions shape.
            openai::chat_request(doc, c);
        }
    }
    if c.texts.len() == before {
        generic::texts(doc, c);
    }
}

pub(super) fn invoke_response(doc: &Value, c: &mut Collector) {
    if doc.get("content").is_some_and(Value::is_array) && doc.get("type").is_some() {
        return anthropic::response(doc, c);
    }
    let before = c.texts.len();
    let a = Role::Assistant;
    let k = TextKind::Content;
    for (i, r) in doc.get("results").and_then(Value::as_array).into_iter().flatten().enumerate() {
        c.string(r.get("outputText"), jpath!["results", i, "outputText"], a, k);
    }
    c.string(doc.get("generation"), jpath!["generation"], a, k);
    for (i, o) in doc.get("outputs").and_then(Value::as_array).into_iter().flatten().enumerate() {
        c.string(o.get("text"), jpath!["outputs", i, "text"], a, k);
    }
    c.string(doc.get("text"), jpath!["text"], a, k);
    for (i, g) in doc.get("generations").and_then(Value::as_array).into_iter().flatten().enumerate() {
        c.string(g.get("text"), jpath!["generations", i, "text"], a, k);
    }
    for (i, g) in doc.get("completions").and_then(Value::as_array).into_iter().flatten().enumerate() {
        c.string(g.get("data").and_then(|d| d.get("text")), jpath!["completions", i, "data", "text"], a, k);
    }
    converse_response(doc, c);
    openai::chat_response(doc, c);
    if c.texts.len() == before {
        generic::texts(doc, c);
    }
}

/// The decoded model-native JSON of one `chunk` frame of
/// InvokeModelWithResponseStream.
pub(super) fn invoke_chunk(v: &Value) -> StreamDelta {
    // Claude bodies behind an inference profile that hides the model name.
    if v.get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.starts_with("message_") || t.starts_with("content_block_"))
    {
        return anthropic::event(None, v);
    }
    // Nova wraps each event in its name, like the Converse SDK shape.
    if let Some((name, inner)) = wrapped_converse_event(v) {
        return converse_event(name, inner);
    }
    if v.get("choices").is_some() {
        return openai::chat_chunk(v);
    }
    let mut texts = Vec::new();
    let mut end = false;
    let not_null = |x: Option<&Value>| x.is_some_and(|x| !x.is_null());
    // Titan
    push_str(&mut texts, TextKind::Content, v.get("outputText"));
    end |= not_null(v.get("completionReason"));
    // Llama, DeepSeek
    push_str(&mut texts, TextKind::Content, v.get("generation"));
    end |= not_null(v.get("stop_reason"));
    // Mistral
    for o in v.get("outputs").and_then(Value::as_array).into_iter().flatten() {
        push_str(&mut texts, TextKind::Content, o.get("text"));
        end |= not_null(o.get("stop_reason"));
    }
    // Cohere
    push_str(&mut texts, TextKind::Content, v.get("text"));
    for g in v.get("generations").and_then(Value::as_array).into_iter().flatten() {
        push_str(&mut texts, TextKind::Content, g.get("text"));
    }
    end |= v.get("is_finished").and_then(Value::as_bool).unwrap_or(false);
    delta(texts, end)
}

/// A `chunk` frame's payload is `{"bytes": "<base64 of the model's JSON>"}`.
pub(super) fn unwrap_chunk(payload: &[u8]) -> Option<Value> {
    let outer: Value = serde_json::from_slice(payload).ok()?;
    let b64 = outer.get("bytes")?.as_str()?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    serde_json::from_slice(&raw).ok()
}

pub(super) fn invoke_insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    if doc.get("anthropic_version").is_some() {
        return anthropic::insert(doc, text);
    }
    if doc.get("messages").is_some() {
        return if is_converse_shaped(doc) { converse_insert(doc, text) } else { openai::chat_insert(doc, text) };
    }
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    if obj.get("message").is_some_and(Value::is_string) {
        // Cohere Command R: the system prompt is `preamble`.
        let merged = append_paragraph(obj.get("preamble").and_then(Value::as_str).unwrap_or(""), text);
        obj.insert("preamble".into(), Value::String(merged));
        return Ok(());
    }
    for key in ["inputText", "prompt"] {
        if let Some(Value::String(prompt)) = obj.get_mut(key) {
            *prompt = prefix_prompt(prompt, text);
            return Ok(());
        }
    }
    Err(RewriteError::Shape { what: "no prompt field" })
}

/// Puts `text` ahead of a raw prompt, inside the model's chat template when
/// the prompt already uses one.
fn prefix_prompt(prompt: &str, text: &str) -> String {
    // Llama 3: a system header right after <|begin_of_text|>.
    const LLAMA3: &str = "<|begin_of_text|>";
    if let Some(rest) = prompt.strip_prefix(LLAMA3) {
        return format!("{LLAMA3}<|start_header_id|>system<|end_header_id|>\n\n{text}<|eot_id|>{rest}");
    }
    // Mistral / Llama 2: inside the first [INST] block.
    if let Some(pos) = prompt.find("[INST]") {
        let (head, tail) = prompt.split_at(pos + "[INST]".len());
        return format!("{head} {text}\n\n{}", tail.trim_start());
    }
    format!("{text}\n\n{prompt}")
}

/// An exception frame ending an event stream. Encoding cannot fail for these
/// short fixed headers; were it to, an empty result just closes the stream.
pub(super) fn exception_frame(reason: &str) -> Vec<u8> {
    let payload = json!({"message": reason}).to_string();
    eventstream::encode_frame(
        &[
            (":message-type", HeaderValue::from("exception")),
            (":exception-type", HeaderValue::from("validationException")),
            (":content-type", HeaderValue::from("application/json")),
        ],
        payload.as_bytes(),
    )
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request, check_response, collect_stream, framed_deltas};
    use super::*;
    use crate::guardrails::framing::{FramingKind, eventstream::Decoder};
    use crate::guardrails::model::{Role::*, TextKind::*};

    fn frame(event_type: &str, payload: &str) -> Vec<u8> {
        eventstream::encode_frame(
            &[
                (":event-type", event_type.into()),
                (":content-type", "application/json".into()),
                (":message-type", "event".into()),
            ],
            payload.as_bytes(),
        )
        .unwrap()
    }

    fn chunk(inner: &Value) -> Vec<u8> {
        let b64 = base64::engine::general_purpose::STANDARD.encode(inner.to_string());
        frame("chunk", &json!({"bytes": b64, "p": "abcdefgh"}).to_string())
    }

    /// Decodes `stream` in small chunks and runs every frame through `stream_delta`.
    fn deltas(provider: Provider, stream: &[u8]) -> Vec<StreamDelta> {
        framed_deltas(provider, FramingKind::EventStream, stream, 7)
    }

    #[test]
    fn detects_paths() {
        assert_eq!(detect_path("/model/anthropic.claude-3-5-sonnet-20241022-v2:0/invoke"), Provider::Anthropic);
        assert_eq!(
            detect_path(
                "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123%3Ainference-profile%2Fus.anthropic.claude-sonnet-4/invoke-with-response-stream"
            ),
            Provider::Anthropic
        );
        assert_eq!(detect_path("/model/meta.llama3-70b-instruct-v1:0/invoke"), Provider::BedrockInvoke);
        assert_eq!(detect_path("/model/amazon.nova-pro-v1:0/converse-stream"), Provider::BedrockConverse);
        assert_eq!(detect_path("/model/anthropic.claude-v2/converse"), Provider::BedrockConverse);
        assert_eq!(detect_path("/model/x/count-tokens"), Provider::Generic);
        assert_eq!(detect_path("/guardrail/x/version/1/apply"), Provider::Generic);
    }

    #[test]
    fn converse_request_fixture() {
        check_request(
            Provider::BedrockConverse,
            include_str!("../../../tests/fixtures/providers/bedrock_converse_request.json"),
            None,
            false,
            &[
                Expect("system[0].text", System, Instructions, "You are a travel agent."),
                Expect("messages[0].content[0].text", User, Content, "Book me a flight to Lisbon"),
                Expect(
                    "messages[1].content[0].reasoningContent.reasoningText.text",
                    Assistant,
                    Reasoning,
                    "Need dates.",
                ),
                Expect("messages[1].content[1].text", Assistant, Content, "Searching flights."),
                Expect("messages[1].content[2].toolUse.input.destination", Assistant, ToolCall, "LIS"),
                Expect(
                    "messages[2].content[0].toolResult.content[0].text",
                    Tool,
                    ToolResult,
                    "No flights on that day.",
                ),
                Expect(
                    "messages[2].content[0].toolResult.content[1].json.alternatives[0]",
                    Tool,
                    ToolResult,
                    "2025-06-02",
                ),
                Expect("messages[2].content[2].guardContent.text.text", User, Content, "guarded user text"),
                Expect("toolConfig.tools[0].toolSpec.description", System, Instructions, "Search flights"),
            ],
        );
    }

    #[test]
    fn converse_response_fixture() {
        check_response(
            Provider::BedrockConverse,
            r#"{"output":{"message":{"role":"assistant","content":[{"text":"Flight booked."},{"toolUse":{"toolUseId":"t1","name":"pay","input":{"card":"4111 1111 1111 1111"}}}]}},"stopReason":"tool_use","usage":{"inputTokens":10,"outputTokens":5,"totalTokens":15},"metrics":{"latencyMs":300}}"#,
            &[
                Expect("output.message.content[0].text", Assistant, Content, "Flight booked."),
                Expect("output.message.content[1].toolUse.input.card", Assistant, ToolCall, "4111 1111 1111 1111"),
            ],
        );
    }

    #[test]
    fn converse_stream_frames() {
        let mut s = Vec::new();
        s.extend(frame("messageStart", r#"{"p":"abc","role":"assistant"}"#));
        s.extend(frame(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"reasoningContent":{"text":"hmm"}},"p":"ab"}"#,
        ));
        s.extend(frame("contentBlockDelta", r#"{"contentBlockIndex":1,"delta":{"text":"Hel"},"p":"abcd"}"#));
        s.extend(frame("contentBlockDelta", r#"{"contentBlockIndex":1,"delta":{"text":"lo"},"p":"a"}"#));
        s.extend(frame(
            "contentBlockStart",
            r#"{"contentBlockIndex":2,"start":{"toolUse":{"toolUseId":"t","name":"f"}}}"#,
        ));
        s.extend(frame("contentBlockDelta", r#"{"contentBlockIndex":2,"delta":{"toolUse":{"input":"{\"a\":"}}}"#));
        s.extend(frame("contentBlockDelta", r#"{"contentBlockIndex":2,"delta":{"toolUse":{"input":"1}"}}}"#));
        s.extend(frame("contentBlockStop", r#"{"contentBlockIndex":2}"#));
        s.extend(frame("messageStop", r#"{"stopReason":"tool_use"}"#));
        s.extend(frame(
            "metadata",
            r#"{"usage":{"inputTokens":1,"outputTokens":2,"totalTokens":3},"metrics":{"latencyMs":1}}"#,
        ));
        let ds = deltas(Provider::BedrockConverse, &s);
        let (texts, end_at) = collect_stream(&ds);
        assert_eq!(
            texts,
            vec![(Reasoning, "hmm".to_owned()), (Content, "Hello".to_owned()), (ToolCall, "{\"a\":1}".to_owned())]
        );
        assert_eq!(end_at, Some(8));
    }

    #[test]
    fn invoke_stream_claude_titan_llama_mistral_cohere_nova() {
        let cases: Vec<(Provider, Vec<Value>, &str)> = vec![
            (
                Provider::Anthropic,
                vec![
                    json!({"type":"message_start","message":{"id":"m","type":"message","role":"assistant","content":[],"model":"claude"}}),
                    json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
                    json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi "}}),
                    json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"there"}}),
                    json!({"type":"content_block_stop","index":0}),
                    json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":2}}),
                    json!({"type":"message_stop","amazon-bedrock-invocationMetrics":{"inputTokenCount":5}}),
                ],
                "Hi there",
            ),
            (
                Provider::BedrockInvoke,
                vec![
                    json!({"outputText":"Hi ","index":0,"totalOutputTextTokenCount":1,"completionReason":null,"inputTextTokenCount":3}),
                    json!({"outputText":"there","index":0,"totalOutputTextTokenCount":2,"completionReason":"FINISH"}),
                ],
                "Hi there",
            ),
            (
                Provider::BedrockInvoke,
                vec![
                    json!({"generation":"Hi ","prompt_token_count":5,"generation_token_count":1,"stop_reason":null}),
                    json!({"generation":"there","prompt_token_count":null,"generation_token_count":2,"stop_reason":"stop"}),
                ],
                "Hi there",
            ),
            (
                Provider::BedrockInvoke,
                vec![
                    json!({"outputs":[{"text":"Hi ","stop_reason":null}]}),
                    json!({"outputs":[{"text":"there","stop_reason":"stop"}]}),
                ],
                "Hi there",
            ),
            (
                Provider::BedrockInvoke,
                vec![
                    json!({"is_finished":false,"event_type":"text-generation","text":"Hi "}),
                    json!({"is_finished":false,"event_type":"text-generation","text":"there"}),
                    json!({"is_finished":true,"event_type":"stream-end","finish_reason":"COMPLETE"}),
                ],
                "Hi there",
            ),
            (
                Provider::BedrockInvoke,
                vec![
                    json!({"messageStart":{"role":"assistant"}}),
                    json!({"contentBlockDelta":{"delta":{"text":"Hi "},"contentBlockIndex":0}}),
                    json!({"contentBlockDelta":{"delta":{"text":"there"},"contentBlockIndex":0}}),
                    json!({"messageStop":{"stopReason":"end_turn"}}),
                ],
                "Hi there",
            ),
        ];
        for (provider, chunks, want) in cases {
            let stream: Vec<u8> = chunks.iter().flat_map(chunk).collect();
            let ds = deltas(provider, &stream);
            let (texts, end_at) = collect_stream(&ds);
            assert_eq!(texts, vec![(Content, want.to_owned())], "{chunks:?}");
            assert_eq!(end_at, Some(chunks.len() - 1), "{chunks:?}");
        }
    }

    #[test]
    fn exception_frames_end_the_stream() {
        let frame = eventstream::encode_frame(
            &[
                (":exception-type", "modelStreamErrorException".into()),
                (":content-type", "application/json".into()),
                (":message-type", "exception".into()),
            ],
            br#"{"message":"boom"}"#,
        )
        .unwrap();
        for p in [Provider::Anthropic, Provider::BedrockInvoke, Provider::BedrockConverse] {
            let ds = deltas(p, &frame);
            assert!(ds[0].end && ds[0].texts.is_empty());
        }
    }

    #[test]
    fn invoke_requests() {
        let cases: &[(&str, Expect)] = &[
            (
                r#"{"inputText":"Hello Titan","textGenerationConfig":{"maxTokenCount":100}}"#,
                Expect("inputText", User, Content, "Hello Titan"),
            ),
            (
                r#"{"prompt":"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>","max_gen_len":512,"temperature":0.5}"#,
                Expect(
                    "prompt",
                    User,
                    Content,
                    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
                ),
            ),
            (
                r#"{"prompt":"<s>[INST] Hi Mistral [/INST]","max_tokens":200}"#,
                Expect("prompt", User, Content, "<s>[INST] Hi Mistral [/INST]"),
            ),
            (
                r#"{"message":"Hi Cohere","chat_history":[],"max_tokens":100}"#,
                Expect("message", User, Content, "Hi Cohere"),
            ),
        ];
        for (body, want) in cases {
            check_request(Provider::BedrockInvoke, body, None, false, std::slice::from_ref(want));
        }
        check_request(
            Provider::BedrockInvoke,
            r#"{"preamble":"Be terse.","chat_history":[{"role":"USER","message":"a"},{"role":"CHATBOT","message":"b"}],"message":"c"}"#,
            None,
            false,
            &[
                Expect("preamble", System, Instructions, "Be terse."),
                Expect("chat_history[0].message", User, Content, "a"),
                Expect("chat_history[1].message", Assistant, Content, "b"),
                Expect("message", User, Content, "c"),
            ],
        );
        // Nova (Converse-shaped) and gpt-oss (Chat-shaped) through invoke.
        check_request(
            Provider::BedrockInvoke,
            r#"{"schemaVersion":"messages-v1","system":[{"text":"sys"}],"messages":[{"role":"user","content":[{"text":"hi nova"}]}],"inferenceConfig":{"maxTokens":10}}"#,
            None,
            false,
            &[
                Expect("system[0].text", System, Instructions, "sys"),
                Expect("messages[0].content[0].text", User, Content, "hi nova"),
            ],
        );
        check_request(
            Provider::BedrockInvoke,
            r#"{"messages":[{"role":"user","content":"hi oss"}],"max_completion_tokens":10}"#,
            None,
            false,
            &[Expect("messages[0].content", User, Content, "hi oss")],
        );
        // A Claude body behind an application inference profile.
        check_request(
            Provider::BedrockInvoke,
            r#"{"anthropic_version":"bedrock-2023-05-31","max_tokens":10,"messages":[{"role":"user","content":"hi claude"}]}"#,
            None,
            false,
            &[Expect("messages[0].content", User, Content, "hi claude")],
        );
    }

    #[test]
    fn invoke_responses() {
        let cases: &[(&str, Expect)] = &[
            (
                r#"{"inputTextTokenCount":3,"results":[{"tokenCount":5,"outputText":"Hi from Titan","completionReason":"FINISH"}]}"#,
                Expect("results[0].outputText", Assistant, Content, "Hi from Titan"),
            ),
            (
                r#"{"generation":"Hi from Llama","prompt_token_count":5,"generation_token_count":4,"stop_reason":"stop"}"#,
                Expect("generation", Assistant, Content, "Hi from Llama"),
            ),
            (
                r#"{"outputs":[{"text":"Hi from Mistral","stop_reason":"stop"}]}"#,
                Expect("outputs[0].text", Assistant, Content, "Hi from Mistral"),
            ),
            (
                r#"{"response_id":"r","text":"Hi from Cohere","generation_id":"g","chat_history":[],"finish_reason":"COMPLETE"}"#,
                Expect("text", Assistant, Content, "Hi from Cohere"),
            ),
            (
                r#"{"output":{"message":{"content":[{"text":"Hi from Nova"}],"role":"assistant"}},"stopReason":"end_turn","usage":{"inputTokens":1}}"#,
                Expect("output.message.content[0].text", Assistant, Content, "Hi from Nova"),
            ),
            (
                r#"{"id":"msg","type":"message","role":"assistant","content":[{"type":"text","text":"Hi from Claude"}],"stop_reason":"end_turn"}"#,
                Expect("content[0].text", Assistant, Content, "Hi from Claude"),
            ),
        ];
        for (body, want) in cases {
            check_response(Provider::BedrockInvoke, body, std::slice::from_ref(want));
        }
    }

    #[test]
    fn prompt_prefixing() {
        assert_eq!(
            prefix_prompt("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "RULE"),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nRULE<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        );
        assert_eq!(prefix_prompt("<s>[INST] Hi [/INST]", "RULE"), "<s>[INST] RULE\n\nHi [/INST]");
        assert_eq!(prefix_prompt("Human: hi", "RULE"), "RULE\n\nHuman: hi");
    }

    #[test]
    fn block_frame_decodes_as_exception() {
        let bytes = exception_frame("blocked by policy");
        let msgs = Decoder::default().feed(&bytes).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].message_type(), Some("exception"));
        assert_eq!(msgs[0].exception_type(), Some("validationException"));
        assert_eq!(msgs[0].content_type(), Some("application/json"));
        let payload: Value = serde_json::from_slice(&msgs[0].payload).unwrap();
        assert_eq!(payload, json!({"message": "blocked by policy"}));
    }
}
