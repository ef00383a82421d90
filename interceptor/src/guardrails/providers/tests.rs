//! Shared test helpers and cross-provider tests: detection, rewriting,
//! instruction insertion, block events.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::guardrails::framing::{eventstream::Decoder, json_array::JsonArrayStream, sse::SseParser};
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

/// Parses an SSE fixture in 3-byte chunks; the texts must match and only the
/// last event may end the stream.
pub(super) fn check_sse_stream(provider: Provider, body: &str, want: &[(TextKind, &str)]) {
    let mut p = SseParser::default();
    let mut ds = Vec::new();
    for piece in body.as_bytes().chunks(3) {
        for ev in p.feed(piece).unwrap() {
            ds.push(stream_delta(provider, StreamEventRef::from(&ev)));
        }
    }
    assert!(p.finish().is_none());
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
        ("chatgpt.com", "/backend-api/conversation", Generic),
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
