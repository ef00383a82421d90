//! Amazon Bedrock agent runtime (`bedrock-agent-runtime.{region}.amazonaws.com`).
//!
//! * InvokeAgent (`POST /agents/{agent}/agentAliases/{alias}/sessions/{session}/text`):
//!   `inputText`, `sessionState` (prompt and session attributes, the
//!   conversation history, results of returned-control tool calls).
//! * InvokeInlineAgent (`POST /agents/{session}`): the same, plus the
//!   agent's `instruction` and the descriptions of its action groups,
//!   knowledge bases and collaborators.
//! * RetrieveAndGenerate(Stream) (`input.text`), Retrieve
//!   (`retrievalQuery.text`), InvokeFlow (`inputs[].content.document`).
//!
//! Prompt templates and other configuration strings are not read here; the
//! pipeline scans every string a parser does not read
//! ([`super::unread_texts`]). Responses stream as AWS event-stream frames:
//! InvokeAgent's `chunk` carries base64 text (not JSON), RetrieveAndGenerateStream's
//! `output` a `{text}`, InvokeFlow's `flowOutputEvent` a document.

use base64::Engine as _;
use serde_json::Value;

use super::{Collector, RewriteError, append_paragraph, delta, join, kind_for, push_str, role_of, str_field};
use crate::guardrails::model::{PathSeg, Role, StreamDelta, TextKind};

pub(super) fn request(doc: &Value, c: &mut Collector) {
    c.string(doc.get("instruction"), jpath!["instruction"], Role::System, TextKind::Instructions);
    for key in ["sessionState", "inlineSessionState"] {
        if let Some(state) = doc.get(key) {
            session_state(state, jpath![key], c);
        }
    }
    c.string(doc.get("inputText"), jpath!["inputText"], Role::User, TextKind::Content);
    let input = doc.get("input").and_then(|i| i.get("text"));
    c.string(input, jpath!["input", "text"], Role::User, TextKind::Content);
    let query = doc.get("retrievalQuery").and_then(|q| q.get("text"));
    c.string(query, jpath!["retrievalQuery", "text"], Role::User, TextKind::Content);
    for (i, item) in doc.get("inputs").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let document = item.get("content").and_then(|c| c.get("document"));
        c.leaves(document, jpath!["inputs", i, "content", "document"], Role::User, TextKind::Content);
    }
    // An inline agent's tools and sources: their descriptions steer the
    // model like instructions.
    for key in ["actionGroups", "knowledgeBases", "collaborators"] {
        c.descriptions(doc.get(key), jpath![key]);
    }
}

fn session_state(state: &Value, base: Vec<PathSeg>, c: &mut Collector) {
    // Attributes are substituted into the agent's prompts.
    for key in ["promptSessionAttributes", "sessionAttributes"] {
        for (name, value) in state.get(key).and_then(Value::as_object).into_iter().flatten() {
            c.string(Some(value), join(&base, jpath![key, name.as_str()]), Role::User, TextKind::Content);
        }
    }
    let history = state.get("conversationHistory").and_then(|h| h.get("messages")).and_then(Value::as_array);
    for (i, m) in history.into_iter().flatten().enumerate() {
        let role = role_of(str_field(m, "role"));
        for (j, block) in m.get("content").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let path = join(&base, jpath!["conversationHistory", "messages", i, "content", j, "text"]);
            c.string(block.get("text"), path, role, kind_for(role));
        }
    }
    let results = state.get("returnControlInvocationResults");
    c.leaves(results, join(&base, jpath!["returnControlInvocationResults"]), Role::Tool, TextKind::ToolResult);
}

pub(super) fn response(doc: &Value, c: &mut Collector) {
    // RetrieveAndGenerate
    let output = doc.get("output").and_then(|o| o.get("text"));
    c.string(output, jpath!["output", "text"], Role::Assistant, TextKind::Content);
    // Retrieve: the passages found.
    for (i, r) in doc.get("retrievalResults").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let text = r.get("content").and_then(|c| c.get("text"));
        c.string(text, jpath!["retrievalResults", i, "content", "text"], Role::Tool, TextKind::ToolResult);
    }
}

/// One event-stream `event` frame, by its `:event-type`.
pub(super) fn event(event_type: &str, payload: &[u8]) -> StreamDelta {
    let Ok(v) = serde_json::from_slice::<Value>(payload) else { return StreamDelta::default() };
    let mut texts = Vec::new();
    match event_type {
        // InvokeAgent: `{"bytes": "<base64 of the answer's text>"}`.
        "chunk" => {
            let raw = v
                .get("bytes")
                .and_then(Value::as_str)
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
            if let Some(raw) = raw {
                texts.push((TextKind::Content, String::from_utf8_lossy(&raw).into_owned()));
            }
        }
        // RetrieveAndGenerateStream.
        "output" => push_str(&mut texts, TextKind::Content, v.get("text")),
        // InvokeFlow: a node's output document.
        "flowOutputEvent" => {
            let mut c = Collector::default();
            let document = v.get("content").and_then(|c| c.get("document"));
            c.leaves(document, Vec::new(), Role::Assistant, TextKind::Content);
            texts.extend(c.texts.into_iter().map(|s| (s.kind, s.text)));
        }
        _ => {}
    }
    delta(texts, event_type == "flowCompletionEvent")
}

/// A JSON event outside an event stream (not sent by the service; read
/// leniently for gateways that re-frame it).
pub(super) fn json_event(v: &Value) -> StreamDelta {
    let mut texts = Vec::new();
    push_str(&mut texts, TextKind::Content, v.get("text"));
    push_str(&mut texts, TextKind::Content, v.get("output").and_then(|o| o.get("text")));
    delta(texts, false)
}

/// An inline agent's `instruction` grows; other operations have no place
/// for one.
pub(super) fn insert(doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    let obj = doc.as_object_mut().ok_or(RewriteError::Shape { what: "body is not a json object" })?;
    let merged = match obj.get("instruction") {
        Some(Value::String(s)) => append_paragraph(s, text),
        None if obj.contains_key("foundationModel") => text.to_owned(),
        _ => return Err(RewriteError::Unsupported { provider: "bedrock_agent" }),
    };
    obj.insert("instruction".into(), Value::String(merged));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request, check_response};
    use super::*;
    use crate::guardrails::model::{Provider, Role::*, TextKind::*};

    #[test]
    fn invoke_agent_fixture() {
        check_request(
            Provider::BedrockAgent,
            include_str!("../../../tests/fixtures/providers/bedrock_agent_invoke_request.json"),
            None,
            false,
            &[
                Expect("sessionState.promptSessionAttributes.customer", User, Content, "Jane Roe, premium plan"),
                Expect("sessionState.sessionAttributes.locale", User, Content, "en-GB"),
                Expect(
                    "sessionState.conversationHistory.messages[0].content[0].text",
                    User,
                    Content,
                    "Book me a table for two.",
                ),
                Expect(
                    "sessionState.conversationHistory.messages[1].content[0].text",
                    Assistant,
                    Content,
                    "For which evening?",
                ),
                Expect(
                    "sessionState.returnControlInvocationResults[0].functionResult.actionGroup",
                    Tool,
                    ToolResult,
                    "reservations",
                ),
                Expect(
                    "sessionState.returnControlInvocationResults[0].functionResult.function",
                    Tool,
                    ToolResult,
                    "check_availability",
                ),
                Expect(
                    "sessionState.returnControlInvocationResults[0].functionResult.responseBody.TEXT.body",
                    Tool,
                    ToolResult,
                    "Table 12 is free at 19:30.",
                ),
                Expect("inputText", User, Content, "Friday at half past seven, please."),
            ],
        );
    }

    #[test]
    fn retrieve_and_generate_and_inline_agent() {
        check_request(
            Provider::BedrockAgent,
            include_str!("../../../tests/fixtures/providers/bedrock_agent_retrieve_and_generate_request.json"),
            None,
            false,
            &[Expect("input.text", User, Content, "What is our parental leave policy?")],
        );
        check_request(
            Provider::BedrockAgent,
            r#"{"foundationModel":"anthropic.claude-3-haiku-20240307-v1:0","instruction":"You are a travel agent.","inputText":"Find flights","actionGroups":[{"actionGroupName":"flights","description":"Search flights.","functionSchema":{"functions":[{"name":"search","description":"Search by route.","parameters":{"from":{"type":"string","description":"Origin airport.","required":true}}}]}}]}"#,
            None,
            false,
            &[
                Expect("instruction", System, Instructions, "You are a travel agent."),
                Expect("inputText", User, Content, "Find flights"),
                Expect("actionGroups[0].description", System, Instructions, "Search flights."),
                Expect(
                    "actionGroups[0].functionSchema.functions[0].description",
                    System,
                    Instructions,
                    "Search by route.",
                ),
                Expect(
                    "actionGroups[0].functionSchema.functions[0].parameters.from.description",
                    System,
                    Instructions,
                    "Origin airport.",
                ),
            ],
        );
        check_request(
            Provider::BedrockAgent,
            r#"{"retrievalQuery":{"text":"parental leave"},"retrievalConfiguration":{"vectorSearchConfiguration":{"numberOfResults":5}}}"#,
            None,
            false,
            &[Expect("retrievalQuery.text", User, Content, "parental leave")],
        );
    }

    #[test]
    fn responses_and_stream_events() {
        check_response(
            Provider::BedrockAgent,
            r#"{"sessionId":"s","output":{"text":"Sixteen weeks."},"citations":[]}"#,
            &[Expect("output.text", Assistant, Content, "Sixteen weeks.")],
        );
        let chunk = serde_json::json!({"bytes": base64::engine::general_purpose::STANDARD.encode("Booked for 19:30.")});
        let d = event("chunk", chunk.to_string().as_bytes());
        assert_eq!(d.texts, vec![(Content, "Booked for 19:30.".to_owned())]);
        let d = event("output", br#"{"text":"Sixteen"}"#);
        assert_eq!(d.texts, vec![(Content, "Sixteen".to_owned())]);
        assert!(event("trace", br#"{"trace":{}}"#).texts.is_empty());
        assert!(event("flowCompletionEvent", br#"{"completionReason":"SUCCESS"}"#).end);
    }

    #[test]
    fn instruction_only_for_inline_agents() {
        let mut inline = serde_json::json!({"foundationModel": "m", "inputText": "x"});
        insert(&mut inline, "RULE").unwrap();
        assert_eq!(inline["instruction"], "RULE");
        let mut agent = serde_json::json!({"inputText": "x"});
        assert!(matches!(insert(&mut agent, "RULE"), Err(RewriteError::Unsupported { .. })));
    }
}
