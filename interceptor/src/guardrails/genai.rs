//! The OpenTelemetry GenAI semantic conventions' view of an exchange: the
//! operation and provider names a span carries, and what an answer says of
//! itself (the model that answered, its id, why it stopped), read from
//! whole bodies and, event by event, from streams. Pure: no I/O.
//!
//! Where the providers put it:
//!
//! | provider | model | id | finish reasons |
//! |---|---|---|---|
//! | OpenAI chat (and compatible) | `model` | `id` | `choices[].finish_reason` |
//! | OpenAI Responses | `model` (`response.model` in events) | `id` | `status` (`response.completed`, …) |
//! | Anthropic | `model` (`message_start`: `message.model`) | `id` | `stop_reason` (`message_delta`: `delta.stop_reason`) |
//! | Bedrock Converse | — | — | `stopReason` (`messageStop`) |
//! | Gemini | `modelVersion` | `responseId` | `candidates[].finishReason` |
//! | Cohere | — | `id` | `finish_reason` |

use std::borrow::Cow;

use serde::{
    Deserialize, Deserializer,
    de::{self, IgnoredAny, MapAccess, SeqAccess, value::MapAccessDeserializer},
};
use serde_json::Value;

use super::{
    model::Provider,
    providers::strings::{self, Member, Walked},
};

/// Most bytes of completion text kept for a span (with `audit_prompts`).
const MAX_CONTENT: usize = 64 << 10;

/// `gen_ai.provider.name`: the conventions' well-known names, from the
/// parser the exchange uses and, for OpenAI-compatible APIs, the host.
pub fn provider_name(provider: Provider, host: &str) -> Cow<'static, str> {
    let on = |domain: &str| {
        let (host, domain) = (host.as_bytes(), domain.as_bytes());
        let Some(start) = host.len().checked_sub(domain.len()) else { return false };
        host[start..].eq_ignore_ascii_case(domain) && (start == 0 || host[start - 1] == b'.')
    };
    let name = match provider {
        Provider::OpenAiChat | Provider::OpenAiResponses if on("openai.azure.com") => "azure.ai.openai",
        Provider::OpenAiChat | Provider::OpenAiResponses if on("openai.com") => "openai",
        Provider::Anthropic if on("anthropic.com") => "anthropic",
        Provider::BedrockInvoke | Provider::BedrockConverse | Provider::BedrockAgent => "aws.bedrock",
        Provider::Gemini if on("aiplatform.googleapis.com") => "gcp.vertex_ai",
        Provider::Gemini => "gcp.gemini",
        Provider::Cohere => "cohere",
        Provider::Mcp => "mcp",
        _ if on("groq.com") => "groq",
        _ if on("mistral.ai") => "mistral_ai",
        _ if on("deepseek.com") => "deepseek",
        _ if on("x.ai") => "x_ai",
        _ if on("perplexity.ai") => "perplexity",
        Provider::OpenAiChat | Provider::OpenAiResponses => "openai",
        Provider::Anthropic => "anthropic",
        Provider::Generic => return Cow::Owned(host.to_ascii_lowercase()),
    };
    Cow::Borrowed(name)
}

/// `gen_ai.operation.name`, from the provider and the path.
pub fn operation(provider: Provider, path: &str) -> &'static str {
    let path = path.split('?').next().unwrap_or_default();
    if path.contains("embed") {
        return "embeddings";
    }
    match provider {
        Provider::Gemini => "generate_content",
        Provider::Mcp => "execute_tool",
        Provider::BedrockAgent => "invoke_agent",
        _ if path.ends_with("/completions") && !path.ends_with("/chat/completions") => "text_completion",
        _ => "chat",
    }
}

/// What an answer says of itself, gathered from its body (borrowed from
/// it, `'a`) or its events (owned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseFacts<'a> {
    pub model: Option<Cow<'a, str>>,
    pub id: Option<Cow<'a, str>>,
    /// In the order they were first seen, each once.
    pub finish_reasons: Vec<Cow<'a, str>>,
    /// The answer's text, when content is recorded.
    pub completion: Option<String>,
}

impl<'a> ResponseFacts<'a> {
    /// Keeps the answer's text too ([`ResponseFacts::text`]).
    pub fn with_content(mut self) -> Self {
        self.completion = Some(String::new());
        self
    }

    /// The facts of a whole response body (JSON); `None` when it is not
    /// JSON. See [`ResponseFacts::of_walked`].
    pub fn of_body(body: &'a [u8]) -> Option<Self> {
        strings::each_string(body, &mut |_| true).ok().map(Self::of_walked)
    }

    /// The facts of a whole response body, from the walk over its strings
    /// (which the allowed path makes anyway): its strings are borrowed from
    /// the body (unless escaped), nothing is parsed twice. A whole answer
    /// says what it is at its top level and in its choices; the objects a
    /// stream's events nest (`message`, `response`, `delta`) are read from
    /// events only ([`ResponseFacts::observe`]).
    pub fn of_walked(mut walked: Walked<'a>) -> Self {
        let model = walked.model.take().or_else(|| walked.take(Member::ModelVersion));
        let id = walked.take(Member::Id).or_else(|| walked.take(Member::ResponseId));
        let mut facts = Self { model, id, ..Self::default() };
        // Cohere's reason is top-level; a typed object's is not a finish.
        let finish_reason = walked.text(Member::Type).is_none().then(|| walked.take(Member::FinishReason));
        // A Responses API body is the response object itself.
        let status = walked.text(Member::Object).is_some_and(|o| o == "response").then(|| walked.take(Member::Status));
        let stops = [walked.take(Member::StopReason), walked.take(Member::StopReasonCamel)];
        let reasons = std::mem::take(&mut walked.choice_reasons).into_iter().chain(stops.into_iter().flatten());
        for reason in reasons.chain(finish_reason.flatten()).chain(status.flatten()) {
            facts.finish(reason);
        }
        facts
    }

    /// One parsed JSON event of a stream; `event` is the SSE event name or
    /// the event-stream frame's type. What is kept is copied.
    pub fn observe(&mut self, event: Option<&str>, v: &Value) {
        let Ok(v) = Shape::deserialize(v) else { return };
        let owned = |s: &Cow<'_, str>| Cow::Owned(s.to_string());
        let kind = v.kind.0.as_deref().or(event);
        let inner = match kind {
            Some("message_start") => v.message.0.as_deref(),
            Some(k) if k.starts_with("response.") => v.response.0.as_deref(),
            _ => None,
        };
        for object in [Some(&v), inner].into_iter().flatten() {
            if let Some(model) = object.model.0.as_ref().or(object.model_version.0.as_ref()) {
                self.model = Some(owned(model));
            }
            if self.id.is_none() {
                self.id = object.id.0.as_ref().or(object.response_id.0.as_ref()).map(owned);
            }
        }
        if matches!(kind, Some("response.completed" | "response.incomplete" | "response.failed"))
            && let Some(status) = inner.and_then(|r| r.status.0.as_ref())
        {
            self.finish(owned(status));
        }
        for choice in v.choices.0.iter().chain(&v.candidates.0).filter_map(|c| c.0.as_ref()) {
            if let Some(reason) = choice.finish_reason.0.as_ref().or(choice.finish_reason_camel.0.as_ref()) {
                self.finish(owned(reason));
            }
        }
        let delta = v.delta.0.as_ref().and_then(|d| d.stop_reason.0.as_ref());
        for reason in [v.stop_reason.0.as_ref(), delta, v.stop_reason_camel.0.as_ref()].into_iter().flatten() {
            self.finish(owned(reason));
        }
        if event.is_none()
            && kind.is_none()
            && let Some(reason) = v.finish_reason.0.as_ref()
        {
            self.finish(owned(reason));
        }
    }

    /// A reason the answer finished, kept once.
    fn finish(&mut self, reason: Cow<'a, str>) {
        if !reason.is_empty() && !self.finish_reasons.contains(&reason) {
            self.finish_reasons.push(reason);
        }
    }

    /// Text the answer carried (kept when content is recorded, up to
    /// [`MAX_CONTENT`] bytes).
    pub fn text(&mut self, text: &str) {
        let Some(completion) = &mut self.completion else { return };
        let room = MAX_CONTENT.saturating_sub(completion.len());
        let mut end = text.len().min(room);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        completion.push_str(&text[..end]);
    }
}

/// The fields of an answer, or of one of its events, that [`ResponseFacts`]
/// reads (an object nested under `message` or `response` has the same
/// shape); every other field is skipped unread. Each field is tolerant: a
/// value of another type than expected reads as absent, never as an error.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Shape<'a> {
    #[serde(rename = "type", borrow)]
    kind: Text<'a>,
    #[serde(borrow)]
    status: Text<'a>,
    #[serde(borrow)]
    model: Text<'a>,
    #[serde(rename = "modelVersion", borrow)]
    model_version: Text<'a>,
    #[serde(borrow)]
    id: Text<'a>,
    #[serde(rename = "responseId", borrow)]
    response_id: Text<'a>,
    /// `message_start`'s message.
    #[serde(borrow)]
    message: Loose<Box<Shape<'a>>>,
    /// A Responses API event's response.
    #[serde(borrow)]
    response: Loose<Box<Shape<'a>>>,
    #[serde(borrow)]
    choices: List<Loose<Choice<'a>>>,
    #[serde(borrow)]
    candidates: List<Loose<Choice<'a>>>,
    #[serde(borrow)]
    delta: Loose<Delta<'a>>,
    #[serde(borrow)]
    stop_reason: Text<'a>,
    #[serde(rename = "stopReason", borrow)]
    stop_reason_camel: Text<'a>,
    #[serde(borrow)]
    finish_reason: Text<'a>,
}

/// An OpenAI choice or a Gemini candidate.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Choice<'a> {
    #[serde(borrow)]
    finish_reason: Text<'a>,
    #[serde(rename = "finishReason", borrow)]
    finish_reason_camel: Text<'a>,
}

/// An Anthropic `message_delta`'s delta.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Delta<'a> {
    #[serde(borrow)]
    stop_reason: Text<'a>,
}

/// A string (borrowed from the input unless it had escapes), or absent
/// when the value is anything else.
#[derive(Default)]
struct Text<'a>(Option<Cow<'a, str>>);

/// An object read as `T`, or absent when the value is anything else.
struct Loose<T>(Option<T>);

impl<T> Default for Loose<T> {
    fn default() -> Self {
        Self(None)
    }
}

/// An array's elements, or none when the value is anything else.
struct List<T>(Vec<T>);

impl<T> Default for List<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

/// How a tolerant field reads each kind of JSON value: what it does not
/// expect is skipped (so the rest of the document still parses) and reads
/// as the default.
trait Tolerant<'de>: Default {
    fn from_str(_: &str) -> Self {
        Self::default()
    }
    fn from_borrowed_str(s: &'de str) -> Self {
        Self::from_str(s)
    }
    fn from_map<A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::default())
    }
}

impl<'de: 'a, 'a> Tolerant<'de> for Text<'a> {
    fn from_str(s: &str) -> Self {
        Self(Some(Cow::Owned(s.to_owned())))
    }
    fn from_borrowed_str(s: &'de str) -> Self {
        Self(Some(Cow::Borrowed(s)))
    }
}

impl<'de, T: Deserialize<'de>> Tolerant<'de> for Loose<T> {
    fn from_map<A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map)).map(|t| Self(Some(t)))
    }
}

impl<'de, T: Deserialize<'de>> Tolerant<'de> for List<T> {
    fn from_seq<A: SeqAccess<'de>>(mut seq: A) -> Result<Self, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Self(items))
    }
}

struct TolerantVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: Tolerant<'de>> de::Visitor<'de> for TolerantVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_i64<E>(self, _: i64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_u64<E>(self, _: u64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_none<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_str<E>(self, s: &str) -> Result<T, E> {
        Ok(T::from_str(s))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<T, E> {
        Ok(T::from_borrowed_str(s))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        T::from_seq(seq)
    }
}

fn tolerant<'de, T: Tolerant<'de>, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(TolerantVisitor(std::marker::PhantomData))
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        tolerant(d)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Loose<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        tolerant(d)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for List<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        tolerant(d)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_of_providers_and_operations() {
        assert_eq!(provider_name(Provider::OpenAiChat, "api.openai.com"), "openai");
        assert_eq!(provider_name(Provider::OpenAiChat, "x.openai.azure.com"), "azure.ai.openai");
        assert_eq!(provider_name(Provider::Anthropic, "api.anthropic.com"), "anthropic");
        assert_eq!(provider_name(Provider::BedrockConverse, "bedrock-runtime.us-east-1.amazonaws.com"), "aws.bedrock");
        assert_eq!(provider_name(Provider::Gemini, "generativelanguage.googleapis.com"), "gcp.gemini");
        assert_eq!(provider_name(Provider::OpenAiChat, "api.groq.com"), "groq");
        assert_eq!(provider_name(Provider::Anthropic, "API.Anthropic.COM"), "anthropic");
        assert_eq!(provider_name(Provider::OpenAiChat, "api.notgroq.com"), "openai");
        assert_eq!(provider_name(Provider::Generic, "LLM.example.test"), "llm.example.test");
        assert_eq!(provider_name(Provider::Generic, "llm.example.test"), "llm.example.test");
        assert_eq!(operation(Provider::OpenAiChat, "/v1/chat/completions"), "chat");
        assert_eq!(operation(Provider::OpenAiChat, "/v1/embeddings"), "embeddings");
        assert_eq!(operation(Provider::OpenAiChat, "/v1/completions"), "text_completion");
        assert_eq!(
            operation(Provider::Gemini, "/v1beta/models/gemini-2.0-flash:generateContent?key=k"),
            "generate_content"
        );
        assert_eq!(operation(Provider::Anthropic, "/v1/messages"), "chat");
    }

    #[test]
    fn facts_of_bodies() {
        let chat = json!({"id": "chatcmpl-1", "model": "gpt-4o-2024", "choices": [{"finish_reason": "stop"}, {"finish_reason": "length"}]});
        let chat = chat.to_string();
        let facts = ResponseFacts::of_body(chat.as_bytes()).unwrap();
        assert_eq!(facts.model.as_deref(), Some("gpt-4o-2024"));
        assert_eq!(facts.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(facts.finish_reasons, ["stop", "length"]);
        // Unescaped strings are borrowed from the body, not copied.
        assert!(matches!(facts.model, Some(Cow::Borrowed(_))), "{facts:?}");
        assert!(facts.finish_reasons.iter().all(|r| matches!(r, Cow::Borrowed(_))), "{facts:?}");
        let claude = json!({"id": "msg_1", "model": "claude-x", "stop_reason": "end_turn"});
        assert_eq!(ResponseFacts::of_body(claude.to_string().as_bytes()).unwrap().finish_reasons, ["end_turn"]);
        let responses = json!({"id": "resp_1", "object": "response", "model": "gpt-5", "status": "completed"});
        assert_eq!(ResponseFacts::of_body(responses.to_string().as_bytes()).unwrap().finish_reasons, ["completed"]);
        let gemini =
            json!({"modelVersion": "gemini-2.0", "responseId": "r1", "candidates": [{"finishReason": "STOP"}]});
        let gemini = gemini.to_string();
        let facts = ResponseFacts::of_body(gemini.as_bytes()).unwrap();
        assert_eq!((facts.model.as_deref(), facts.id.as_deref()), (Some("gemini-2.0"), Some("r1")));
        assert_eq!(facts.finish_reasons, ["STOP"]);
        assert_eq!(ResponseFacts::of_body(br#"{"stopReason": "end_turn"}"#).unwrap().finish_reasons, ["end_turn"]);
    }

    /// Fields of unexpected types read as absent and do not hide the rest;
    /// a body that is not JSON has no facts.
    #[test]
    fn facts_tolerate_unexpected_types() {
        let odd = br#"{"message": "an error", "response": [1], "choices": {"a": 1}, "delta": "x",
            "candidates": [7, null, {"finishReason": 3}, {"finishReason": "STOP", "x": {"y": [1, {"z": null}]}}],
            "model": {"name": "m"}, "modelVersion": "v2", "id": 5, "responseId": "r9", "stop_reason": true}"#;
        let facts = ResponseFacts::of_body(odd).unwrap();
        assert_eq!(facts.model.as_deref(), Some("v2"));
        assert_eq!(facts.id.as_deref(), Some("r9"));
        assert_eq!(facts.finish_reasons, ["STOP"]);
        let escaped = ResponseFacts::of_body(br#"{"model": "gpt-\u00e9\n", "id": "a\"b"}"#).unwrap();
        assert_eq!((escaped.model.as_deref(), escaped.id.as_deref()), (Some("gpt-\u{e9}\n"), Some("a\"b")));
        assert_eq!(ResponseFacts::of_body(b"data: not json"), None);
        assert_eq!(ResponseFacts::of_body(b"[1, 2]"), Some(ResponseFacts::default()));
        let mut streamed = ResponseFacts::default();
        streamed.observe(Some("message_start"), &json!({"type": "message_start", "message": "not an object"}));
        streamed.observe(None, &json!({"choices": [{"finish_reason": "stop"}], "model": 1}));
        assert_eq!((streamed.model, streamed.finish_reasons), (None, vec![Cow::from("stop")]));
    }

    /// A whole answer's facts come from the walk over its strings, borrowed
    /// from the body, and say what the same answer read as one event says
    /// (a Responses body's status aside: only a whole body is the response
    /// object itself).
    #[test]
    fn whole_bodies_are_read_in_the_walk_as_events_are_read() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/providers");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with("_response.json") {
                continue;
            }
            let body = std::fs::read(&path).unwrap();
            let facts = ResponseFacts::of_body(&body).unwrap();
            let mut event = ResponseFacts::default();
            event.observe(None, &serde_json::from_slice(&body).unwrap());
            if name.starts_with("openai_responses") {
                assert_eq!(facts.finish_reasons, ["completed"], "{name}");
                event.finish_reasons.push(Cow::from("completed"));
            }
            assert_eq!(facts, event, "{name}");
            assert!(
                facts.model.is_some() && facts.id.is_some() && !facts.finish_reasons.is_empty(),
                "{name}: {facts:?}"
            );
            assert!(matches!(facts.model, Some(Cow::Borrowed(_))), "{name}: the model is borrowed");
            read += 1;
        }
        assert!(read >= 4, "{read} response fixtures");
        // One reason per choice, its own before its camel-case one; choices
        // nested deeper are not the answer's.
        let body = br#"{"choices": [{"finishReason": "B", "finish_reason": "A"}, {"finishReason": "C"}],
            "data": {"choices": [{"finish_reason": "D"}], "model": "inner"}}"#;
        let facts = ResponseFacts::of_body(body).unwrap();
        assert_eq!((facts.finish_reasons, facts.model), (vec![Cow::from("A"), Cow::from("C")], None));
    }

    #[test]
    fn facts_of_streams() {
        let mut openai = ResponseFacts::default();
        openai.observe(None, &json!({"id": "c1", "model": "gpt-4o", "choices": [{"finish_reason": null}]}));
        openai.observe(None, &json!({"id": "c1", "model": "gpt-4o", "choices": [{"finish_reason": "stop"}]}));
        assert_eq!(openai.finish_reasons, ["stop"]);
        let mut claude = ResponseFacts::default();
        claude.observe(
            Some("message_start"),
            &json!({"type": "message_start", "message": {"id": "msg_1", "model": "claude-x", "stop_reason": null}}),
        );
        claude
            .observe(Some("message_delta"), &json!({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}}));
        assert_eq!(claude.model.as_deref(), Some("claude-x"));
        assert_eq!(claude.id.as_deref(), Some("msg_1"));
        assert_eq!(claude.finish_reasons, ["max_tokens"]);
        let mut responses = ResponseFacts::default();
        responses.observe(None, &json!({"type": "response.created", "response": {"id": "r", "status": "in_progress"}}));
        responses.observe(
            None,
            &json!({"type": "response.completed", "response": {"model": "gpt-5", "status": "completed"}}),
        );
        assert_eq!(responses.finish_reasons, ["completed"]);
        assert_eq!(responses.model.as_deref(), Some("gpt-5"));
    }

    #[test]
    fn content_is_bounded_on_a_char_boundary() {
        let mut facts = ResponseFacts::default();
        facts.text("ignored");
        assert_eq!(facts.completion, None);
        let mut facts = ResponseFacts::default().with_content();
        facts.text(&"é".repeat(MAX_CONTENT));
        let kept = facts.completion.unwrap();
        assert!(kept.len() <= MAX_CONTENT && kept.len() >= MAX_CONTENT - 1);
    }
}
