//! Shared test helpers and cross-provider tests: detection, rewriting,
//! instruction insertion, block events.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::guardrails::framing::{Framer, eventstream::Decoder, json_array::JsonArrayStream, sse::SseParser};
use crate::guardrails::model::{Role, TextKind};

/// An expected span: path (as [`path_string`] renders it), role, kind, text.
#[derive(Clone, Debug)]
pub(super) struct Expect(pub &'static str, pub Role, pub TextKind, pub &'static str);

fn spans(texts: &[TextSpan]) -> Vec<(String, Role, TextKind, String)> {
    texts.iter().map(|s| (path_string(&s.path), s.role, s.kind, s.text.clone())).collect()
}

fn expected(want: &[Expect]) -> Vec<(String, Role, TextKind, String)> {
    want.iter().map(|e| (e.0.to_owned(), e.1, e.2, e.3.to_owned())).collect()
}

/// Every span's path leads to its text, and rewriting it shows up at the
/// same path on a re-parse.
fn check_paths_rewrite(doc: &Value, texts: &[TextSpan], reparse: impl Fn(&Value) -> Vec<TextSpan>) {
    for span in texts {
        assert_eq!(text_at(doc, &span.path), Some(span.text.as_str()), "{}", path_string(&span.path));
        let mut changed = doc.clone();
        set_text(&mut changed, &span.path, "[REDACTED]").unwrap();
        let again = reparse(&changed);
        let hit = again.iter().find(|s| s.path == span.path).unwrap();
        assert_eq!(hit.text, "[REDACTED]");
        assert_eq!(again.len(), texts.len());
    }
}

pub(super) fn check_request(provider: Provider, body: &str, model: Option<&str>, stream: bool, want: &[Expect]) {
    let doc: Value = serde_json::from_str(body).unwrap();
    let req = parse_request(provider, &doc);
    assert_eq!(spans(&req.texts), expected(want));
    assert_eq!(req.model.as_deref(), model);
    assert_eq!(req.stream, stream);
    check_paths_rewrite(&doc, &req.texts, |d| parse_request(provider, d).texts);
}

pub(super) fn check_response(provider: Provider, body: &str, want: &[Expect]) {
    let doc: Value = serde_json::from_str(body).unwrap();
    let resp = parse_response(provider, &doc);
    assert_eq!(spans(&resp.texts), expected(want));
    check_paths_rewrite(&doc, &resp.texts, |d| parse_response(provider, d).texts);
}

/// Merges consecutive same-kind fragments; returns them and the index of the
/// first delta that ends the stream.
pub(super) fn collect_stream(ds: &[StreamDelta]) -> (Vec<(TextKind, String)>, Option<usize>) {
    let mut out: Vec<(TextKind, String)> = Vec::new();
    for d in ds {
        for (kind, text) in &d.texts {
            match out.last_mut() {
                Some((k, t)) if k == kind => t.push_str(text),
                _ => out.push((*kind, text.clone())),
            }
        }
    }
    (out, ds.iter().position(|d| d.end))
}

/// Feeds `stream` to its framing in `chunk`-byte pieces and runs every item
/// through `stream_delta`; the stream must end on an item boundary (no SSE
/// event missing its blank line, no cut frame, a closed array).
pub(super) fn framed_deltas(provider: Provider, framing: FramingKind, stream: &[u8], chunk: usize) -> Vec<StreamDelta> {
    let mut framer = Framer::new(framing, 16 << 20);
    let mut ds = Vec::new();
    for piece in stream.chunks(chunk) {
        for item in framer.feed(piece).unwrap() {
            ds.push(stream_delta(provider, StreamEventRef::from(&item)));
        }
    }
    assert!(framer.finish().unwrap().is_empty(), "a partial event at the end");
    ds
}

/// Parses an SSE fixture in 3-byte chunks; the texts must match and only the
/// last event may end the stream.
pub(super) fn check_sse_stream(provider: Provider, body: &str, want: &[(TextKind, &str)]) {
    let ds = framed_deltas(provider, FramingKind::Sse, body.as_bytes(), 3);
    let (texts, end_at) = collect_stream(&ds);
    let want: Vec<(TextKind, String)> = want.iter().map(|(k, t)| (*k, (*t).to_owned())).collect();
    assert_eq!(texts, want);
    assert_eq!(end_at, Some(ds.len() - 1));
}

// ---------------------------------------------------------------------------
// Detection

#[test]
fn detect_by_host_and_path() {
    use Provider::*;
    let cases = [
        ("api.openai.com", "/v1/chat/completions", OpenAiChat),
        ("API.OpenAI.com:443", "/v1/chat/completions?foo=1", OpenAiChat),
        ("api.openai.com.", "/v1/chat/completions/", OpenAiChat),
        ("[::1]:8443", "/v1/chat/completions", OpenAiChat),
        ("api.openai.com", "/v1/responses", OpenAiResponses),
        ("api.openai.com", "/v1/embeddings", Generic),
        ("api.openai.com", "/v1/responses/resp_123", Generic),
        ("chatgpt.com", "/backend-api/codex/responses", OpenAiResponses),
        ("chatgpt.com", "/backend-api/conversation", OpenAiChat),
        ("chatgpt.com", "/backend-api/f/conversation", OpenAiChat),
        ("chatgpt.com", "/backend-anon/conversation", OpenAiChat),
        ("chatgpt.com", "/backend-api/conversation/abc/textdocs", Generic),
        ("api.githubcopilot.com", "/chat/completions", OpenAiChat),
        ("api.business.githubcopilot.com", "/responses", OpenAiResponses),
        ("api.individual.githubcopilot.com", "/models", Generic),
        ("api.anthropic.com", "/v1/messages", Anthropic),
        ("api.anthropic.com", "/v1/messages/count_tokens", Generic),
        (
            "bedrock-runtime.us-east-1.amazonaws.com",
            "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke",
            Anthropic,
        ),
        (
            "bedrock-runtime.us-west-2.amazonaws.com",
            "/model/us.anthropic.claude-sonnet-4-20250514-v1:0/invoke-with-response-stream",
            Anthropic,
        ),
        ("bedrock-runtime-fips.us-east-1.amazonaws.com", "/model/amazon.titan-text-express-v1/invoke", BedrockInvoke),
        (
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "/model/meta.llama3-8b-instruct-v1:0/invoke-with-response-stream",
            BedrockInvoke,
        ),
        ("bedrock-runtime.us-east-1.amazonaws.com", "/model/amazon.nova-lite-v1:0/converse", BedrockConverse),
        ("vpce-0a1b.bedrock-runtime.us-east-1.vpce.amazonaws.com", "/model/x/converse-stream", BedrockConverse),
        ("bedrock.us-east-1.amazonaws.com", "/model/x/invoke", Generic),
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-pro:generateContent", Gemini),
        (
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=k",
            Gemini,
        ),
        ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-pro:countTokens", Generic),
        (
            "us-central1-aiplatform.googleapis.com",
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:streamGenerateContent",
            Gemini,
        ),
        (
            "aiplatform.googleapis.com",
            "/v1/projects/p/locations/global/publishers/google/models/gemini-2.5-pro:generateContent",
            Gemini,
        ),
        (
            "us-east5-aiplatform.googleapis.com",
            "/v1/projects/p/locations/us-east5/publishers/anthropic/models/claude-sonnet-4@20250514:streamRawPredict",
            Anthropic,
        ),
        ("openrouter.ai", "/api/v1/chat/completions", OpenAiChat),
        ("myres.openai.azure.com", "/openai/deployments/gpt4o/chat/completions", OpenAiChat),
        ("myres.openai.azure.com", "/openai/responses", OpenAiResponses),
        ("api.deepseek.com", "/anthropic/v1/messages", Anthropic),
        ("example.com", "/v1/completions", Generic),
        ("myres.cognitiveservices.azure.com", "/openai/responses?api-version=2025-04-01-preview", OpenAiResponses),
        ("api.groq.com", "/openai/v1/chat/completions", OpenAiChat),
        ("api.fireworks.ai", "/inference/v1/chat/completions", OpenAiChat),
        ("api.cohere.com", "/v2/chat", Cohere),
        ("api.cohere.ai", "/v1/chat", Cohere),
        ("api.cohere.com", "/v1/embed", Generic),
        ("api.cohere.com", "/compatibility/v1/chat/completions", OpenAiChat),
        ("bedrock-agent-runtime.us-east-1.amazonaws.com", "/agents/A1/agentAliases/B2/sessions/s/text", BedrockAgent),
        ("bedrock-agent-runtime-fips.us-west-2.amazonaws.com", "/retrieveAndGenerate", BedrockAgent),
        ("bedrock-agent.us-east-1.amazonaws.com", "/agents/", Generic),
    ];
    for (host, path, want) in cases {
        assert_eq!(detect(host, path), want, "{host}{path}");
    }
}

#[test]
fn detect_from_bodies() {
    use Provider::*;
    let cases: &[(Value, Option<Provider>)] = &[
        (json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}), Some(OpenAiChat)),
        (
            json!({"model": "m", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}),
            Some(OpenAiChat),
        ),
        (json!({"anthropic_version": "bedrock-2023-05-31", "messages": []}), Some(Anthropic)),
        (
            json!({"model": "claude", "max_tokens": 10, "system": "s", "messages": [{"role": "user", "content": "hi"}]}),
            Some(Anthropic),
        ),
        (
            json!({"model": "c", "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}]}),
            Some(Anthropic),
        ),
        (json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}), Some(BedrockConverse)),
        (json!({"contents": [{"parts": [{"text": "hi"}]}]}), Some(Gemini)),
        (json!({"model": "gpt-5", "input": "hi"}), Some(OpenAiResponses)),
        (json!({"model": "gpt-5", "input": [{"role": "user", "content": "hi"}]}), Some(OpenAiResponses)),
        (json!({"inputText": "hi"}), Some(BedrockInvoke)),
        (json!({"prompt": "hi", "max_gen_len": 10}), Some(BedrockInvoke)),
        (json!({"message": "hi", "chat_history": []}), Some(BedrockInvoke)),
        (json!({"object": "chat.completion", "choices": []}), Some(OpenAiChat)),
        (json!({"object": "response", "output": []}), Some(OpenAiResponses)),
        (json!({"type": "message", "content": [{"type": "text", "text": "x"}]}), Some(Anthropic)),
        (json!({"candidates": []}), Some(Gemini)),
        (json!({"output": {"message": {"content": []}}}), Some(BedrockConverse)),
        (json!({"query": "hi"}), None),
        (json!("just a string"), None),
    ];
    for (body, want) in cases {
        assert_eq!(detect_from_body(body), *want, "{body}");
    }
    assert_eq!(detect_with_body("example.com", "/x", &json!({"contents": []})), Gemini);
    assert_eq!(detect_with_body("api.openai.com", "/v1/responses", &json!({"contents": []})), OpenAiResponses);
}

#[test]
fn path_helpers() {
    assert_eq!(
        model_from_path("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.meta.llama3/invoke")
            .as_deref(),
        Some("arn:aws:bedrock:us-east-1:1:inference-profile/us.meta.llama3")
    );
    assert_eq!(
        model_from_path("/v1beta/models/gemini-2.5-pro:generateContent?key=x").as_deref(),
        Some("gemini-2.5-pro")
    );
    assert_eq!(
        model_from_path(
            "/v1/projects/p/locations/l/publishers/google/models/gemini-2.0-flash-001:streamGenerateContent"
        )
        .as_deref(),
        Some("gemini-2.0-flash-001")
    );
    assert_eq!(model_from_path("/v1/chat/completions"), None);
    assert!(path_requests_stream("/v1beta/models/g:streamGenerateContent?alt=sse"));
    assert!(path_requests_stream("/model/x/invoke-with-response-stream"));
    assert!(path_requests_stream("/model/x/converse-stream"));
    assert!(!path_requests_stream("/model/x/converse"));
    assert!(!path_requests_stream("/v1beta/models/g:generateContent"));
    assert_eq!(
        response_framing(Provider::Gemini, "/v1beta/models/g:streamGenerateContent", "application/json; charset=UTF-8"),
        Some(FramingKind::JsonArray)
    );
    assert_eq!(response_framing(Provider::Gemini, "/v1beta/models/g:generateContent", "application/json"), None);
    assert_eq!(response_framing(Provider::Anthropic, "/v1/messages", "text/event-stream"), Some(FramingKind::Sse));
    assert_eq!(percent_decode("a%2Fb%zz%4"), "a/b%zz%4");
}

// ---------------------------------------------------------------------------
// Rewriting

#[test]
fn set_text_errors() {
    let mut doc = json!({"a": [{"b": "x"}, 3]});
    assert!(
        matches!(set_text(&mut doc, &jpath!["a", 0, "c"], "y"), Err(RewriteError::PathNotFound { path }) if path == "a[0].c")
    );
    assert!(matches!(set_text(&mut doc, &jpath!["a", 1], "y"), Err(RewriteError::NotAString { .. })));
    assert!(matches!(set_text(&mut doc, &jpath!["a", "b"], "y"), Err(RewriteError::PathNotFound { .. })));
    set_text(&mut doc, &jpath!["a", 0, "b"], "y").unwrap();
    assert_eq!(doc, json!({"a": [{"b": "y"}, 3]}));
}

/// The instruction shows up as an `Instructions` span when the body is
/// parsed again.
fn check_insert(provider: Provider, body: Value, want: Value) {
    let mut doc = body;
    insert_instruction(provider, &mut doc, "RULE").unwrap();
    assert_eq!(doc, want, "{provider:?}");
    let texts = parse_request(provider, &doc).texts;
    assert!(
        texts.iter().any(|s| s.kind == TextKind::Instructions && s.text.contains("RULE")),
        "{provider:?}: {texts:?}"
    );
}

#[test]
fn insert_instruction_per_provider() {
    use Provider::*;
    check_insert(
        OpenAiChat,
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "m", "messages": [{"role": "system", "content": "RULE"}, {"role": "user", "content": "hi"}]}),
    );
    check_insert(
        OpenAiResponses,
        json!({"model": "m", "instructions": "Codex prompt", "input": [{"role": "user", "content": "hi"}]}),
        json!({"model": "m", "instructions": "Codex prompt", "input": [
            {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "RULE"}]},
            {"role": "user", "content": "hi"}]}),
    );
    check_insert(
        OpenAiResponses,
        json!({"model": "m", "input": "hi"}),
        json!({"model": "m", "input": "hi", "instructions": "RULE"}),
    );
    check_insert(
        OpenAiResponses,
        json!({"model": "m", "input": "hi", "instructions": "Be nice."}),
        json!({"model": "m", "input": "hi", "instructions": "Be nice.\n\nRULE"}),
    );
    check_insert(
        Anthropic,
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        json!({"system": "RULE", "messages": [{"role": "user", "content": "hi"}]}),
    );
    check_insert(
        Anthropic,
        json!({"system": "Be nice.", "messages": []}),
        json!({"system": "Be nice.\n\nRULE", "messages": []}),
    );
    check_insert(
        Anthropic,
        json!({"system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}], "messages": []}),
        json!({"system": [{"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "RULE"}], "messages": []}),
    );
    check_insert(
        BedrockConverse,
        json!({"messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
        json!({"system": [{"text": "RULE"}], "messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
    );
    check_insert(
        BedrockConverse,
        json!({"system": [{"text": "A"}], "messages": []}),
        json!({"system": [{"text": "A"}, {"text": "RULE"}], "messages": []}),
    );
    check_insert(
        Gemini,
        json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        json!({"systemInstruction": {"parts": [{"text": "RULE"}]}, "contents": [{"parts": [{"text": "hi"}]}]}),
    );
    check_insert(
        Gemini,
        json!({"system_instruction": {"parts": [{"text": "A"}]}, "contents": []}),
        json!({"system_instruction": {"parts": [{"text": "A"}, {"text": "RULE"}]}, "contents": []}),
    );
    check_insert(
        BedrockInvoke,
        json!({"message": "hi", "chat_history": []}),
        json!({"message": "hi", "chat_history": [], "preamble": "RULE"}),
    );
    check_insert(
        BedrockInvoke,
        json!({"anthropic_version": "bedrock-2023-05-31", "messages": []}),
        json!({"anthropic_version": "bedrock-2023-05-31", "messages": [], "system": "RULE"}),
    );
    check_insert(
        BedrockInvoke,
        json!({"schemaVersion": "messages-v1", "messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
        json!({"schemaVersion": "messages-v1", "system": [{"text": "RULE"}], "messages": [{"role": "user", "content": [{"text": "hi"}]}]}),
    );
    check_insert(
        BedrockInvoke,
        json!({"messages": [{"role": "user", "content": "hi"}]}),
        json!({"messages": [{"role": "system", "content": "RULE"}, {"role": "user", "content": "hi"}]}),
    );

    // Raw prompts are prefixed: the rule is part of the user-visible prompt.
    for (body, key) in
        [(json!({"inputText": "hi"}), "inputText"), (json!({"prompt": "hi", "max_gen_len": 5}), "prompt")]
    {
        let mut doc = body;
        insert_instruction(BedrockInvoke, &mut doc, "RULE").unwrap();
        assert_eq!(doc[key], "RULE\n\nhi");
    }

    let mut doc = json!({"query": "hi"});
    assert!(matches!(insert_instruction(Generic, &mut doc, "RULE"), Err(RewriteError::Unsupported { .. })));
    assert!(matches!(insert_instruction(OpenAiChat, &mut doc, "RULE"), Err(RewriteError::Shape { .. })));
    assert!(matches!(insert_instruction(BedrockInvoke, &mut doc, "RULE"), Err(RewriteError::Shape { .. })));
    assert!(matches!(insert_instruction(Anthropic, &mut json!([1]), "RULE"), Err(RewriteError::Shape { .. })));
    assert!(matches!(
        insert_instruction(Anthropic, &mut json!({"system": 5}), "RULE"),
        Err(RewriteError::Shape { .. })
    ));
    assert_eq!(doc, json!({"query": "hi"}));
}

// ---------------------------------------------------------------------------
// Block events

fn sse_events(bytes: &[u8]) -> Vec<crate::guardrails::framing::sse::SseEvent> {
    let mut p = SseParser::default();
    let events = p.feed(bytes).unwrap();
    assert_eq!(p.buffered_len(), 0, "block bytes end on an event boundary");
    events
}

#[test]
fn block_openai_chat() {
    let events = sse_events(&stream_block(Provider::OpenAiChat, FramingKind::Sse, "blocked: secret \"key\""));
    assert_eq!(events.len(), 2);
    let data: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data["error"]["message"], "blocked: secret \"key\"");
    assert_eq!(data["error"]["type"], "guardrail_blocked");
    assert_eq!(data["error"]["code"], "blocked");
    assert_eq!(events[1].data, "[DONE]");
    let d = stream_delta(Provider::OpenAiChat, StreamEventRef::from(&events[0]));
    assert!(d.end);
}

#[test]
fn block_openai_responses() {
    let events = sse_events(&stream_block(Provider::OpenAiResponses, FramingKind::Sse, "no"));
    assert_eq!(events[0].event.as_deref(), Some("error"));
    let data: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data["type"], "error");
    assert_eq!(data["code"], "guardrail_blocked");
    assert_eq!(data["message"], "no");
    assert!(data["sequence_number"].is_u64());
    // The key the OpenAI SDKs raise on.
    assert_eq!(data["error"]["message"], "no");
    assert_eq!(events[1].event.as_deref(), Some("response.failed"));
    let failed: Value = serde_json::from_str(&events[1].data).unwrap();
    assert_eq!(failed["response"]["status"], "failed");
    assert_eq!(failed["response"]["error"]["message"], "no");
    assert!(stream_delta(Provider::OpenAiResponses, StreamEventRef::from(&events[1])).end);
}

#[test]
fn block_anthropic() {
    let events = sse_events(&stream_block(Provider::Anthropic, FramingKind::Sse, "no"));
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event.as_deref(), Some("error"));
    let data: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data, json!({"type": "error", "error": {"type": "permission_error", "message": "no"}}));
    assert!(stream_delta(Provider::Anthropic, StreamEventRef::from(&events[0])).end);
}

#[test]
fn block_gemini() {
    let events = sse_events(&stream_block(Provider::Gemini, FramingKind::Sse, "no"));
    let data: Value = serde_json::from_str(&events[0].data).unwrap();
    assert_eq!(data, json!({"error": {"code": 403, "message": "no", "status": "PERMISSION_DENIED"}}));
    assert!(stream_delta(Provider::Gemini, StreamEventRef::from(&events[0])).end);

    let mut body = br#"[{"candidates":[{"content":{"parts":[{"text":"a"}],"role":"model"}}]}"#.to_vec();
    body.extend(stream_block(Provider::Gemini, FramingKind::JsonArray, "no"));
    let mut s = JsonArrayStream::default();
    let els = s.feed(&body).unwrap();
    s.finish().unwrap();
    assert_eq!(els.len(), 2);
    assert_eq!(els[1].value["error"]["message"], "no");
    assert!(stream_delta(Provider::Gemini, StreamEventRef::from(&els[1].value)).end);
}

#[test]
fn block_event_stream_for_any_bedrock_provider() {
    for p in [Provider::Anthropic, Provider::BedrockInvoke, Provider::BedrockConverse] {
        let bytes = stream_block(p, FramingKind::EventStream, "no");
        let msgs = Decoder::default().feed(&bytes).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].message_type(), Some("exception"));
        assert_eq!(msgs[0].exception_type(), Some("validationException"));
        assert!(stream_delta(p, StreamEventRef::from(&msgs[0])).end);
    }
}

#[test]
fn stream_delta_tolerates_garbage() {
    for p in [Provider::OpenAiChat, Provider::OpenAiResponses, Provider::Anthropic, Provider::Gemini] {
        let d = stream_delta(p, StreamEventRef::Sse { event: None, data: "not json" });
        assert_eq!(d, StreamDelta::default());
    }
    let d = stream_delta(Provider::Generic, StreamEventRef::Sse { event: None, data: "plain words" });
    assert_eq!(d.texts, vec![(TextKind::Other, "plain words".to_owned())]);
    let d = stream_delta(
        Provider::BedrockInvoke,
        StreamEventRef::EventStream { event_type: "chunk", message_type: "event", payload: b"{\"bytes\":\"%%%\"}" },
    );
    assert_eq!(d, StreamDelta::default());
}

// ---------------------------------------------------------------------------
// Property: set_text on one path changes nothing else

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        "[a-z \\n\"é]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every leaf with its path.
fn leaves(v: &Value, path: &mut Vec<PathSeg>, out: &mut Vec<(Vec<PathSeg>, Value)>) {
    match v {
        Value::Array(a) => {
            out.push((path.clone(), json!("<array>")));
            for (i, x) in a.iter().enumerate() {
                path.push(PathSeg::Index(i));
                leaves(x, path, out);
                path.pop();
            }
        }
        Value::Object(m) => {
            out.push((path.clone(), json!("<object>")));
            for (k, x) in m {
                path.push(PathSeg::Key(k.clone()));
                leaves(x, path, out);
                path.pop();
            }
        }
        _ => out.push((path.clone(), v.clone())),
    }
}

proptest! {
    #[test]
    fn set_text_touches_only_its_path(doc in arb_json(), pick in any::<prop::sample::Index>(), new in ".{0,10}") {
        let mut before = Vec::new();
        leaves(&doc, &mut Vec::new(), &mut before);
        let strings: Vec<&Vec<PathSeg>> = before.iter().filter(|(_, v)| v.is_string() && !matches!(v.as_str(), Some("<array>" | "<object>"))).map(|(p, _)| p).collect();
        prop_assume!(!strings.is_empty());
        let target = strings[pick.index(strings.len())].clone();
        let mut changed = doc.clone();
        set_text(&mut changed, &target, &new).unwrap();
        let mut after = Vec::new();
        leaves(&changed, &mut Vec::new(), &mut after);
        prop_assert_eq!(before.len(), after.len());
        for ((p1, v1), (p2, v2)) in before.iter().zip(&after) {
            prop_assert_eq!(p1, p2);
            if *p1 == target {
                prop_assert_eq!(v2, &Value::from(new.as_str()));
            } else {
                prop_assert_eq!(v1, v2);
            }
        }
    }

    /// Every span a generic parse reports can be rewritten in place.
    #[test]
    fn generic_spans_are_rewritable(doc in arb_json()) {
        for span in parse_request(Provider::Generic, &doc).texts {
            let mut changed = doc.clone();
            prop_assert_eq!(text_at(&doc, &span.path), Some(span.text.as_str()));
            set_text(&mut changed, &span.path, "x").unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// Known hosts and the built-in AI domains

/// A concrete host name a pattern matches: `x` for a wildcard label.
fn sample_host(pattern: &str) -> String {
    pattern
        .split('.')
        .map(|label| if label.starts_with('*') { label.replacen('*', "x", 1) } else { label.to_owned() })
        .collect::<Vec<_>>()
        .join(".")
}

#[test]
fn known_hosts_agree_with_detection() {
    for h in KNOWN_HOSTS {
        let host = sample_host(h.pattern);
        for (path, want) in h.routes {
            assert_eq!(detect(&host, path), *want, "{} ({host}) {path}", h.pattern);
        }
        assert!(!describe_domain(h.pattern).is_empty());
    }
    assert!(
        describe_domain("api.openai.com")
            .starts_with("openai_chat (/v1/chat/completions), openai_responses (/v1/responses);")
    );
    assert!(describe_domain("MYRES.openai.azure.com").contains("by path"), "an unknown name is read by path");
}

#[test]
fn every_default_ai_domain_is_a_known_host() {
    let known: Vec<&str> = KNOWN_HOSTS.iter().map(|h| h.pattern).collect();
    for domain in crate::policy::DEFAULT_AI_DOMAINS {
        assert!(known.contains(domain), "{domain} is in DEFAULT_AI_DOMAINS but not in KNOWN_HOSTS");
    }
    for pattern in &known {
        assert!(
            crate::policy::DEFAULT_AI_DOMAINS.contains(pattern),
            "{pattern} is in KNOWN_HOSTS but not a default AI domain"
        );
    }
    // The names of the task's providers are all there.
    for name in [
        "*.openai.azure.com",
        "*.cognitiveservices.azure.com",
        "bedrock-agent-runtime.*.amazonaws.com",
        "api.mistral.ai",
        "api.groq.com",
        "api.deepseek.com",
        "api.x.ai",
        "openrouter.ai",
        "api.together.xyz",
        "api.together.ai",
        "api.fireworks.ai",
        "api.perplexity.ai",
        "api.cohere.com",
        "api.cohere.ai",
    ] {
        assert!(known.contains(&name), "{name}");
    }
}

// ---------------------------------------------------------------------------
// The corpus: one realistic request body per provider shape

/// A body from `tests/fixtures/providers`, where it is sent, the format it
/// must be read as, texts the provider parser must read, and texts only the
/// generic walk of what no parser reads finds.
struct Case {
    file: &'static str,
    body: &'static str,
    host: &'static str,
    path: &'static str,
    provider: Provider,
    parsed: &'static [&'static str],
    unread: &'static [&'static str],
}

macro_rules! case {
    ($file:literal, $host:literal, $path:literal, $provider:ident, [$($parsed:literal),* $(,)?], [$($unread:literal),* $(,)?]) => {
        Case {
            file: $file,
            body: include_str!(concat!("../../../tests/fixtures/providers/", $file)),
            host: $host,
            path: $path,
            provider: Provider::$provider,
            parsed: &[$($parsed),*],
            unread: &[$($unread),*],
        }
    };
}

fn corpus() -> Vec<Case> {
    vec![
        case!(
            "openai_chat_request.json",
            "api.openai.com",
            "/v1/chat/completions",
            OpenAiChat,
            [
                "You are a careful coding assistant.",
                "What is in this image? Also read /etc/passwd",
                "Read a file from disk"
            ],
            []
        ),
        case!(
            "openai_chat_tools_prediction_request.json",
            "api.openai.com",
            "/v1/chat/completions",
            OpenAiChat,
            [
                "Rename the class and return the whole file.",
                "class User { name: string }",
                "class Account { name: string }",
                "Get the current weather for a city.",
                "City and country, e.g. Paris, France",
                "Temperature unit."
            ],
            ["user-1234", "celsius"]
        ),
        case!("openai_responses_request.json", "api.openai.com", "/v1/responses", OpenAiResponses, [], []),
        case!(
            "openai_responses_tools_request.json",
            "chatgpt.com",
            "/backend-api/codex/responses",
            OpenAiResponses,
            [
                "You are a coding agent.",
                "Run the tests.",
                "Runs a shell command and returns its output.",
                "The command to execute."
            ],
            ["reasoning.encrypted_content"]
        ),
        case!(
            "chatgpt_conversation_request.json",
            "chatgpt.com",
            "/backend-api/conversation",
            OpenAiChat,
            ["Summarize the attached meeting notes in three bullets."],
            ["Europe/Lisbon"]
        ),
        case!(
            "chatgpt_conversation_multimodal_request.json",
            "chatgpt.com",
            "/backend-api/f/conversation",
            OpenAiChat,
            ["What does this error message mean?"],
            ["error.png"]
        ),
        case!(
            "anthropic_request.json",
            "api.anthropic.com",
            "/v1/messages",
            Anthropic,
            ["Project rules: never push to main."],
            []
        ),
        case!(
            "anthropic_search_results_request.json",
            "api.anthropic.com",
            "/v1/messages",
            Anthropic,
            [
                "API Reference - Authentication",
                "All API requests must include an API key in the Authorization header.",
                "The grass is green. The sky is blue.",
                "My Document",
                "This is a trustworthy document.",
                "First chunk of a custom document.",
                "How do I authenticate, and what colour is the grass?",
                "rate limits",
                "The default limit is 50 requests per minute.",
                "Search the product documentation.",
                "What to look for."
            ],
            ["https://docs.example.com/api-reference", "search_docs"]
        ),
        case!(
            "gemini_request.json",
            "generativelanguage.googleapis.com",
            "/v1beta/models/gemini-2.5-pro:generateContent",
            Gemini,
            ["You are a helpful assistant."],
            []
        ),
        case!(
            "gemini_function_declarations_request.json",
            "us-central1-aiplatform.googleapis.com",
            "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.5-flash:generateContent",
            Gemini,
            [
                "Turn the living room lights down to 30%.",
                "Sets the brightness and color temperature of a light.",
                "Light level from 0 to 100.",
                "Color temperature of the light fixture."
            ],
            ["daylight"]
        ),
        case!(
            "bedrock_converse_request.json",
            "bedrock-runtime.us-east-1.amazonaws.com",
            "/model/amazon.nova-pro-v1:0/converse",
            BedrockConverse,
            ["You are a travel agent.", "Book me a flight to Lisbon"],
            []
        ),
        case!(
            "bedrock_converse_tools_request.json",
            "bedrock-runtime.eu-west-1.amazonaws.com",
            "/model/anthropic.claude-3-haiku-20240307-v1:0/converse",
            BedrockConverse,
            [
                "What is the most popular song on WZPZ?",
                "Get the most popular song played on a radio station.",
                "The call sign for the radio station, e.g. WZPZ."
            ],
            ["top_song"]
        ),
        case!(
            "bedrock_agent_invoke_request.json",
            "bedrock-agent-runtime.us-east-1.amazonaws.com",
            "/agents/AGENT12345/agentAliases/TSTALIASID/sessions/s-1/text",
            BedrockAgent,
            [
                "Friday at half past seven, please.",
                "Jane Roe, premium plan",
                "Book me a table for two.",
                "Table 12 is free at 19:30."
            ],
            ["79e0feaa-c6f7-49bf-814d-b7c498505172"]
        ),
        case!(
            "bedrock_agent_retrieve_and_generate_request.json",
            "bedrock-agent-runtime.eu-central-1.amazonaws.com",
            "/retrieveAndGenerate",
            BedrockAgent,
            ["What is our parental leave policy?"],
            ["Answer from these results only: $search_results$"]
        ),
        case!(
            "azure_openai_chat_request.json",
            "contoso.openai.azure.com",
            "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
            OpenAiChat,
            ["You are an assistant for Contoso employees.", "Draft a reply declining the meeting on Thursday."],
            ["Answer only from the HR policies index."]
        ),
        case!(
            "mistral_chat_request.json",
            "api.mistral.ai",
            "/v1/chat/completions",
            OpenAiChat,
            [
                "Reply in French.",
                "Describe this picture.",
                "{\"transaction_id\": \"T1001\"}",
                "{\"status\": \"Paid\"}",
                "Get payment status of a transaction",
                "The transaction id."
            ],
            ["https://example.com/cat.jpg"]
        ),
        case!(
            "groq_chat_request.json",
            "api.groq.com",
            "/openai/v1/chat/completions",
            OpenAiChat,
            ["You are a terse assistant.", "Explain the importance of fast language models"],
            []
        ),
        case!(
            "deepseek_chat_request.json",
            "api.deepseek.com",
            "/chat/completions",
            OpenAiChat,
            [
                "You are a helpful assistant",
                "Compare the tenths: 8 > 1.",
                "How many Rs are there in the word 'strawberry'?"
            ],
            []
        ),
        case!(
            "xai_chat_request.json",
            "api.x.ai",
            "/v1/chat/completions",
            OpenAiChat,
            ["What is the meaning of life, the universe, and everything?"],
            []
        ),
        case!(
            "openrouter_chat_request.json",
            "openrouter.ai",
            "/api/v1/chat/completions",
            OpenAiChat,
            ["What is in this PDF?"],
            ["https://example.com/report.pdf", "openai/gpt-4o"]
        ),
        case!(
            "together_chat_request.json",
            "api.together.xyz",
            "/v1/chat/completions",
            OpenAiChat,
            ["You are an expert travel guide.", "What are some fun things to do in New York?"],
            []
        ),
        case!(
            "fireworks_chat_request.json",
            "api.fireworks.ai",
            "/inference/v1/chat/completions",
            OpenAiChat,
            ["Say this is a test"],
            []
        ),
        case!(
            "perplexity_chat_request.json",
            "api.perplexity.ai",
            "/chat/completions",
            OpenAiChat,
            ["Be precise and concise.", "How many stars are there in our galaxy?"],
            ["nasa.gov"]
        ),
        case!(
            "cohere_v2_request.json",
            "api.cohere.com",
            "/v2/chat",
            Cohere,
            [
                "You are a support agent for Acme.",
                "I will look the order up.",
                "{\"status\":\"shipped\"}",
                "Returns are accepted for 30 days."
            ],
            []
        ),
        case!(
            "cohere_v1_request.json",
            "api.cohere.ai",
            "/v1/chat",
            Cohere,
            ["Answer like a pirate.", "Ahoy!", "What should I wear today?", "Two shirts, one hat.", "City name."],
            []
        ),
    ]
}

#[test]
fn corpus_yields_its_texts() {
    for case in corpus() {
        let doc: Value = serde_json::from_str(case.body).unwrap_or_else(|e| panic!("{}: {e}", case.file));
        let provider = detect_with_body(case.host, case.path, &doc);
        assert_eq!(provider, case.provider, "{}", case.file);
        let parsed = parse_request(provider, &doc).texts;
        let unread = unread_texts(&doc, &parsed);
        for want in case.parsed {
            assert!(
                parsed.iter().any(|t| t.text == *want),
                "{}: the {} parser misses {want:?}",
                case.file,
                provider.as_str()
            );
        }
        for want in case.unread {
            assert!(unread.iter().any(|t| t.text == *want), "{}: no walk finds {want:?}", case.file);
        }
        // The two never overlap, every span is where it says, and together
        // they are every string the generic walk finds.
        for span in parsed.iter().chain(&unread) {
            assert_eq!(
                text_at(&doc, &span.path),
                Some(span.text.as_str()),
                "{}: {}",
                case.file,
                path_string(&span.path)
            );
        }
        for span in &unread {
            assert!(!parsed.iter().any(|p| p.path == span.path), "{}: {} twice", case.file, path_string(&span.path));
        }
        let generic = parse_request(Provider::Generic, &doc).texts;
        for g in &generic {
            assert!(
                parsed.iter().chain(&unread).any(|t| t.path == g.path),
                "{}: {} hidden",
                case.file,
                path_string(&g.path)
            );
        }
    }
}

#[test]
fn every_request_fixture_is_in_the_corpus() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers");
    let listed: Vec<&str> = corpus().iter().map(|c| c.file).collect();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with("_request.json") {
            assert!(listed.contains(&name.as_str()), "{name} is not in the corpus");
        }
    }
}

// ---------------------------------------------------------------------------
// What no parser reads

#[test]
fn unread_texts_are_what_the_parser_skips() {
    let key = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----";
    // A chat body with the secret in a field no chat parser reads.
    let doc = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": "hi", "x_note": key}],
        "metadata": {"ticket": key},
        "id": "not prose",
    });
    let parsed = parse_request(Provider::OpenAiChat, &doc).texts;
    assert_eq!(parsed.len(), 1);
    let unread = unread_texts(&doc, &parsed);
    let paths: Vec<String> = unread.iter().map(|t| path_string(&t.path)).collect();
    assert_eq!(paths, ["model", "messages[0].role", "messages[0].x_note", "metadata.ticket", "id"]);
    // Identifiers are texts of their own kind, not skipped: a key put in
    // `model` or `id` reaches the provider like any other string.
    let identifiers: Vec<&str> =
        unread.iter().filter(|t| t.kind == TextKind::Identifier).map(|t| t.text.as_str()).collect();
    assert_eq!(identifiers, ["gpt-4o", "user", "not prose"]);
    let unread: Vec<_> = unread.into_iter().filter(|t| t.kind != TextKind::Identifier).collect();
    assert!(unread.iter().all(|t| t.text == key && t.kind == TextKind::Other));
    // Redacting them in place works like any span.
    let mut redacted = doc.clone();
    for span in &unread {
        set_text(&mut redacted, &span.path, "[REDACTED]").unwrap();
    }
    assert!(!redacted.to_string().contains("PRIVATE KEY"));
    // A body the parser reads whole leaves nothing unread but identifiers.
    let plain = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
    let unread = unread_texts(&plain, &parse_request(Provider::OpenAiChat, &plain).texts);
    assert!(unread.iter().all(|t| t.kind == TextKind::Identifier), "{unread:?}");
}

#[test]
fn padding_what_the_parser_reads_does_not_hide_the_rest() {
    // A comparison of text lengths would call this body fully read: the
    // message the parser reads is far longer than the hidden field.
    let doc = json!({
        "messages": [{"role": "user", "content": "a".repeat(10_000)}],
        "hidden": "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
    });
    let parsed = parse_request(Provider::OpenAiChat, &doc).texts;
    let unread: Vec<_> = unread_texts(&doc, &parsed).into_iter().filter(|t| t.kind != TextKind::Identifier).collect();
    assert_eq!(unread.len(), 1);
    assert_eq!(path_string(&unread[0].path), "hidden");
}

// ---------------------------------------------------------------------------
// Shapes the parsers read

#[test]
fn chatgpt_conversation_parts() {
    check_request(
        Provider::OpenAiChat,
        r#"{"action":"next","messages":[{"id":"m1","author":{"role":"user"},"content":{"content_type":"text","parts":["first","second"]}},
            {"id":"m2","author":{"role":"system"},"content":{"content_type":"user_editable_context","user_profile":"I am a nurse.","user_instructions":"Be brief."}},
            {"id":"m3","author":{"role":"user"},"content":{"content_type":"multimodal_text","parts":[{"content_type":"image_asset_pointer","asset_pointer":"file-service://f"},{"text":"object part"},"caption"]}}],
            "parent_message_id":"p","model":"auto"}"#,
        Some("auto"),
        false,
        &[
            Expect("messages[0].content.parts[0]", Role::User, TextKind::Content, "first"),
            Expect("messages[0].content.parts[1]", Role::User, TextKind::Content, "second"),
            Expect("messages[1].content.user_profile", Role::System, TextKind::Instructions, "I am a nurse."),
            Expect("messages[1].content.user_instructions", Role::System, TextKind::Instructions, "Be brief."),
            Expect("messages[2].content.parts[1].text", Role::User, TextKind::Content, "object part"),
            Expect("messages[2].content.parts[2]", Role::User, TextKind::Content, "caption"),
        ],
    );
    // Detected from the body alone too, and an instruction goes in in the
    // conversation's own shape.
    let mut doc =
        json!({"messages": [{"author": {"role": "user"}, "content": {"content_type": "text", "parts": ["x"]}}]});
    assert_eq!(detect_from_body(&doc), Some(Provider::OpenAiChat));
    insert_instruction(Provider::OpenAiChat, &mut doc, "RULE").unwrap();
    assert_eq!(
        doc["messages"][0],
        json!({"author": {"role": "system"}, "content": {"content_type": "text", "parts": ["RULE"]}})
    );
}

#[test]
fn object_valued_content_and_predictions() {
    check_request(
        Provider::OpenAiChat,
        r#"{"messages":[{"role":"user","content":{"text":"as an object"}},{"role":"user","content":["bare","strings"]}],
            "prediction":{"type":"content","content":"predicted"}}"#,
        None,
        false,
        &[
            Expect("messages[0].content.text", Role::User, TextKind::Content, "as an object"),
            Expect("messages[1].content[0]", Role::User, TextKind::Content, "bare"),
            Expect("messages[1].content[1]", Role::User, TextKind::Content, "strings"),
            Expect("prediction.content", Role::User, TextKind::Content, "predicted"),
        ],
    );
    check_request(
        Provider::OpenAiResponses,
        r#"{"input":[{"role":"user","content":{"text":"object in responses"}}],"tools":[{"type":"function","name":"f","description":"Does f.","parameters":{"type":"object","properties":{"a":{"type":"string","description":"The a."}}}}]}"#,
        None,
        false,
        &[
            Expect("input[0].content.text", Role::User, TextKind::Content, "object in responses"),
            Expect("tools[0].description", Role::System, TextKind::Instructions, "Does f."),
            Expect("tools[0].parameters.properties.a.description", Role::System, TextKind::Instructions, "The a."),
        ],
    );
}

#[test]
fn cohere_and_agent_bodies_are_detected() {
    // Cohere v1 bodies on an unknown host keep reading as the Bedrock
    // invoke shape (which reads the same fields).
    assert_eq!(detect_with_body("api.cohere.com", "/v1/chat", &json!({"message": "hi"})), Provider::Cohere);
    let mut v2 = json!({"messages": [{"role": "user", "content": "hi"}]});
    insert_instruction(Provider::Cohere, &mut v2, "RULE").unwrap();
    assert_eq!(v2["messages"][0], json!({"role": "system", "content": "RULE"}));
    let mut v1 = json!({"message": "hi", "preamble": "Be nice."});
    insert_instruction(Provider::Cohere, &mut v1, "RULE").unwrap();
    assert_eq!(v1["preamble"], "Be nice.\n\nRULE");
}
