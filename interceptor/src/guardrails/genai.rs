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

use serde_json::Value;

use super::model::Provider;

/// Most bytes of completion text kept for a span (with `audit_prompts`).
const MAX_CONTENT: usize = 64 << 10;

/// `gen_ai.provider.name`: the conventions' well-known names, from the
/// parser the exchange uses and, for OpenAI-compatible APIs, the host.
pub fn provider_name(provider: Provider, host: &str) -> Cow<'static, str> {
    let host = host.to_ascii_lowercase();
    let on = |domain: &str| host == domain || host.ends_with(&format!(".{domain}"));
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
        Provider::Generic => return Cow::Owned(host),
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

/// What an answer says of itself, gathered from its body or its events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResponseFacts {
    pub model: Option<String>,
    pub id: Option<String>,
    /// In the order they were first seen, each once.
    pub finish_reasons: Vec<String>,
    /// The answer's text, when content is recorded.
    pub completion: Option<String>,
}

impl ResponseFacts {
    /// Keeps the answer's text too ([`ResponseFacts::text`]).
    pub fn with_content(mut self) -> Self {
        self.completion = Some(String::new());
        self
    }

    /// The facts of a whole response body.
    pub fn of_body(doc: &Value) -> Self {
        let mut facts = Self::default();
        facts.observe(None, doc);
        // A Responses API body is the response object itself.
        if doc.get("object").and_then(Value::as_str) == Some("response")
            && let Some(status) = doc.get("status").and_then(Value::as_str)
        {
            facts.finish(status);
        }
        facts
    }

    /// One parsed JSON event of a stream (or a whole body); `event` is the
    /// SSE event name or the event-stream frame's type.
    pub fn observe(&mut self, event: Option<&str>, v: &Value) {
        let str_at = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let kind = v.get("type").and_then(Value::as_str).or(event);
        let inner = match kind {
            Some("message_start") => v.get("message"),
            Some(k) if k.starts_with("response.") => v.get("response"),
            _ => None,
        };
        for object in [Some(v), inner].into_iter().flatten() {
            if let Some(model) = str_at(object, "model").or_else(|| str_at(object, "modelVersion")) {
                self.model = Some(model);
            }
            if self.id.is_none() {
                self.id = str_at(object, "id").or_else(|| str_at(object, "responseId"));
            }
        }
        if matches!(kind, Some("response.completed" | "response.incomplete" | "response.failed"))
            && let Some(status) = inner.and_then(|r| r.get("status")).and_then(Value::as_str)
        {
            self.finish(status);
        }
        for choice in v.get("choices").and_then(Value::as_array).into_iter().flatten() {
            if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish(reason);
            }
        }
        for candidate in v.get("candidates").and_then(Value::as_array).into_iter().flatten() {
            if let Some(reason) = candidate.get("finishReason").and_then(Value::as_str) {
                self.finish(reason);
            }
        }
        let delta = v.get("delta");
        for reason in [v.get("stop_reason"), delta.and_then(|d| d.get("stop_reason")), v.get("stopReason")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            self.finish(reason);
        }
        if event.is_none()
            && kind.is_none()
            && let Some(reason) = v.get("finish_reason").and_then(Value::as_str)
        {
            self.finish(reason);
        }
    }

    fn finish(&mut self, reason: &str) {
        if !reason.is_empty() && !self.finish_reasons.iter().any(|r| r == reason) {
            self.finish_reasons.push(reason.to_owned());
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
        let facts = ResponseFacts::of_body(&chat);
        assert_eq!(facts.model.as_deref(), Some("gpt-4o-2024"));
        assert_eq!(facts.id.as_deref(), Some("chatcmpl-1"));
        assert_eq!(facts.finish_reasons, ["stop", "length"]);
        let claude = json!({"id": "msg_1", "model": "claude-x", "stop_reason": "end_turn"});
        assert_eq!(ResponseFacts::of_body(&claude).finish_reasons, ["end_turn"]);
        let responses = json!({"id": "resp_1", "object": "response", "model": "gpt-5", "status": "completed"});
        assert_eq!(ResponseFacts::of_body(&responses).finish_reasons, ["completed"]);
        let gemini =
            json!({"modelVersion": "gemini-2.0", "responseId": "r1", "candidates": [{"finishReason": "STOP"}]});
        let facts = ResponseFacts::of_body(&gemini);
        assert_eq!((facts.model.as_deref(), facts.id.as_deref()), (Some("gemini-2.0"), Some("r1")));
        assert_eq!(facts.finish_reasons, ["STOP"]);
        assert_eq!(ResponseFacts::of_body(&json!({"stopReason": "end_turn"})).finish_reasons, ["end_turn"]);
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
