//! Token usage of one exchange, read from the provider's own usage fields:
//! whole bodies ([`from_response`], or the borrowed walk of the allowed
//! path, [`from_fields`]) and streams ([`UsageMeter`], fed each event the
//! stream guard already parses). Pure: no I/O.
//!
//! Where the providers put it:
//!
//! | provider | body | stream |
//! |---|---|---|
//! | OpenAI chat | `usage.prompt_tokens`, `completion_tokens` | the last chunk's `usage` (only with `stream_options.include_usage`) |
//! | OpenAI Responses | `usage.input_tokens`, `output_tokens` | `response.completed`: `response.usage` |
//! | Anthropic (and Claude on Bedrock) | `usage.input_tokens`, `output_tokens`, plus the cache's input tokens | `message_start`: `message.usage`, then `message_delta`: `usage` |
//! | Bedrock Converse | `usage.inputTokens`, `outputTokens`, plus the cache's | `metadata`: `usage` |
//! | Gemini | `usageMetadata.promptTokenCount`, `candidatesTokenCount` plus `thoughtsTokenCount` | every chunk's `usageMetadata`, the last one winning |
//!
//! Input tokens are every token of the prompt the provider read (Anthropic
//! and Bedrock report cached ones apart; they are added), output tokens
//! every token it generated (Gemini reports thinking apart; it is added).
//! A field seen again replaces the earlier value, which is how the streams
//! above report running totals.
//!
//! A stream that ends without any usage field (an OpenAI chat stream whose
//! client did not ask for it, a stream cut short) is estimated: the output
//! tokens are the streamed text's UTF-8 bytes divided by four, rounded up
//! (about what the providers' tokenizers give for English), the input is
//! unknown (0), and the usage says `estimated`. Other providers and bodies
//! without usage fields have no usage.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::model::Provider;

/// The tokens one exchange used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Counted from the streamed text because the provider sent no usage.
    pub estimated: bool,
}

/// Whether a token count is of the prompt or of the answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Input,
    Output,
}

/// The usage fields this module reads, by their names in the providers'
/// usage objects. The names do not clash across providers.
const FIELDS: [(&str, Kind); 13] = [
    // OpenAI chat
    ("prompt_tokens", Kind::Input),
    ("completion_tokens", Kind::Output),
    // OpenAI Responses, Anthropic
    ("input_tokens", Kind::Input),
    ("output_tokens", Kind::Output),
    ("cache_creation_input_tokens", Kind::Input),
    ("cache_read_input_tokens", Kind::Input),
    // Bedrock Converse
    ("inputTokens", Kind::Input),
    ("outputTokens", Kind::Output),
    ("cacheReadInputTokens", Kind::Input),
    ("cacheWriteInputTokens", Kind::Input),
    // Gemini (`promptTokenCount` already holds `cachedContentTokenCount`)
    ("promptTokenCount", Kind::Input),
    ("candidatesTokenCount", Kind::Output),
    ("thoughtsTokenCount", Kind::Output),
];

/// The index in [`Fields`] of a usage field's name.
pub fn field(name: &str) -> Option<usize> {
    FIELDS.iter().position(|(n, _)| *n == name)
}

/// The usage fields found in one usage object (or, merged, a stream's),
/// each the last value seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fields {
    values: [Option<u64>; FIELDS.len()],
}

impl Fields {
    /// Sets field `index` (from [`field`]).
    pub fn set(&mut self, index: usize, value: u64) {
        if let Some(slot) = self.values.get_mut(index) {
            *slot = Some(value);
        }
    }

    /// The fields of a usage object; nothing for anything else.
    pub fn of(object: &Value) -> Fields {
        let mut fields = Fields::default();
        fields.merge_object(object);
        fields
    }

    /// Takes the fields `object` has (those it lacks keep their value).
    fn merge_object(&mut self, object: &Value) {
        let Some(map) = object.as_object() else { return };
        for (name, value) in map {
            if let (Some(index), Some(n)) = (field(name), value.as_u64()) {
                self.set(index, n);
            }
        }
    }

    /// Takes every field `other` has.
    fn merge(&mut self, other: &Fields) {
        for (mine, theirs) in self.values.iter_mut().zip(other.values) {
            if theirs.is_some() {
                *mine = theirs;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.values.iter().all(Option::is_none)
    }

    /// The usage the fields add up to; `None` when there are none.
    fn usage(&self) -> Option<Usage> {
        if self.is_empty() {
            return None;
        }
        let mut usage = Usage::default();
        for ((_, kind), value) in FIELDS.iter().zip(self.values) {
            let total = match kind {
                Kind::Input => &mut usage.input_tokens,
                Kind::Output => &mut usage.output_tokens,
            };
            *total = total.saturating_add(value.unwrap_or(0));
        }
        Some(usage)
    }
}

/// The top-level key of the usage object of `provider`'s bodies, for the
/// providers whose usage is read.
pub fn usage_key(provider: Provider) -> Option<&'static str> {
    match provider {
        Provider::OpenAiChat | Provider::OpenAiResponses | Provider::Anthropic | Provider::BedrockConverse => {
            Some("usage")
        }
        Provider::Gemini => Some("usageMetadata"),
        Provider::BedrockInvoke | Provider::Cohere | Provider::BedrockAgent | Provider::Generic | Provider::Mcp => None,
    }
}

/// The usage a whole response body reports.
pub fn from_response(provider: Provider, doc: &Value) -> Option<Usage> {
    let key = usage_key(provider)?;
    Fields::of(doc.get(key)?).usage()
}

/// The usage of a whole body from its top-level usage object's fields, as
/// the borrowed walk of the allowed path collects them
/// (`providers::strings::Walked`): `usage` is the `usage` object's,
/// `usage_metadata` the `usageMetadata` object's.
pub fn from_fields(provider: Provider, usage: &Fields, usage_metadata: &Fields) -> Option<Usage> {
    match usage_key(provider)? {
        "usageMetadata" => usage_metadata.usage(),
        _ => usage.usage(),
    }
}

/// Follows a stream's usage, event by event.
#[derive(Clone, Debug)]
pub struct UsageMeter {
    provider: Provider,
    fields: Fields,
    /// UTF-8 bytes of the streamed text, for the estimate.
    text_bytes: u64,
}

impl UsageMeter {
    pub fn new(provider: Provider) -> Self {
        Self { provider, fields: Fields::default(), text_bytes: 0 }
    }

    /// Whether the provider's streams carry usage this meter reads.
    pub fn reads(&self) -> bool {
        usage_key(self.provider).is_some()
    }

    /// One parsed JSON event of the stream (the data of an SSE event, the
    /// payload of an event-stream frame or Claude chunk, an element of a
    /// JSON array); `event` is the SSE event name or frame event type.
    pub fn observe(&mut self, event: Option<&str>, v: &Value) {
        let usage = match self.provider {
            // The final chunk; `null` on the others.
            Provider::OpenAiChat => v.get("usage"),
            Provider::OpenAiResponses => match v.get("type").and_then(Value::as_str).or(event) {
                Some("response.completed" | "response.incomplete" | "response.failed") => {
                    v.get("response").and_then(|r| r.get("usage"))
                }
                _ => None,
            },
            Provider::Anthropic => match v.get("type").and_then(Value::as_str) {
                Some("message_start") => v.get("message").and_then(|m| m.get("usage")),
                Some("message_delta") => v.get("usage"),
                _ => None,
            },
            Provider::BedrockConverse if event == Some("metadata") => v.get("usage"),
            Provider::Gemini => v.get("usageMetadata"),
            _ => None,
        };
        if let Some(usage) = usage {
            self.fields.merge(&Fields::of(usage));
        }
    }

    /// Text the stream carried (for the estimate when it reports no usage).
    pub fn text(&mut self, text: &str) {
        self.text_bytes = self.text_bytes.saturating_add(text.len() as u64);
    }

    /// The stream's usage: what it reported, else the estimate from its
    /// text; `None` for providers whose usage is not read.
    pub fn usage(&self) -> Option<Usage> {
        if !self.reads() {
            return None;
        }
        self.fields.usage().or(Some(Usage {
            input_tokens: 0,
            output_tokens: self.text_bytes.div_ceil(4),
            estimated: true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn whole_bodies_of_each_provider() {
        let chat = json!({"usage": {"prompt_tokens": 420, "completion_tokens": 180, "total_tokens": 600,
            "prompt_tokens_details": {"cached_tokens": 7}}});
        assert_eq!(
            from_response(Provider::OpenAiChat, &chat),
            Some(Usage { input_tokens: 420, output_tokens: 180, estimated: false })
        );
        let responses = json!({"usage": {"input_tokens": 5, "output_tokens": 9, "total_tokens": 14,
            "output_tokens_details": {"reasoning_tokens": 3}}});
        assert_eq!(
            from_response(Provider::OpenAiResponses, &responses).map(|u| (u.input_tokens, u.output_tokens)),
            Some((5, 9))
        );
        let anthropic = json!({"usage": {"input_tokens": 10, "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20, "output_tokens": 4}});
        assert_eq!(
            from_response(Provider::Anthropic, &anthropic).map(|u| (u.input_tokens, u.output_tokens)),
            Some((130, 4))
        );
        let converse = json!({"usage": {"inputTokens": 3, "outputTokens": 8, "totalTokens": 11}});
        assert_eq!(
            from_response(Provider::BedrockConverse, &converse).map(|u| (u.input_tokens, u.output_tokens)),
            Some((3, 8))
        );
        let gemini = json!({"usageMetadata": {"promptTokenCount": 6, "candidatesTokenCount": 2,
            "thoughtsTokenCount": 5, "cachedContentTokenCount": 4, "totalTokenCount": 13,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 6}]}});
        assert_eq!(from_response(Provider::Gemini, &gemini).map(|u| (u.input_tokens, u.output_tokens)), Some((6, 7)));
    }

    #[test]
    fn no_usage_without_usage_fields_or_for_other_providers() {
        assert_eq!(from_response(Provider::OpenAiChat, &json!({"choices": []})), None);
        assert_eq!(from_response(Provider::OpenAiChat, &json!({"usage": null})), None);
        assert_eq!(from_response(Provider::OpenAiChat, &json!({"usage": {"prompt_tokens": -1}})), None);
        assert_eq!(from_response(Provider::Generic, &json!({"usage": {"prompt_tokens": 1}})), None);
        // Gemini's usage is not under `usage`.
        assert_eq!(from_response(Provider::Gemini, &json!({"usage": {"prompt_tokens": 1}})), None);
    }

    #[test]
    fn streams_merge_running_totals_field_by_field() {
        let mut m = UsageMeter::new(Provider::Anthropic);
        m.observe(
            Some("message_start"),
            &json!({"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}}),
        );
        m.text("hello");
        m.observe(Some("message_delta"), &json!({"type": "message_delta", "usage": {"output_tokens": 30}}));
        assert_eq!(m.usage(), Some(Usage { input_tokens: 12, output_tokens: 30, estimated: false }));

        let mut m = UsageMeter::new(Provider::Gemini);
        m.observe(None, &json!({"usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 4}}));
        m.observe(None, &json!({"usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 9}}));
        assert_eq!(m.usage().map(|u| (u.input_tokens, u.output_tokens)), Some((4, 9)));

        let mut m = UsageMeter::new(Provider::BedrockConverse);
        m.observe(Some("contentBlockDelta"), &json!({"usage": {"inputTokens": 99}}));
        m.observe(Some("metadata"), &json!({"usage": {"inputTokens": 2, "outputTokens": 3}}));
        assert_eq!(m.usage().map(|u| (u.input_tokens, u.output_tokens)), Some((2, 3)));

        let mut m = UsageMeter::new(Provider::OpenAiResponses);
        m.observe(Some("response.created"), &json!({"type": "response.created", "response": {"usage": null}}));
        m.observe(
            Some("response.completed"),
            &json!({"type": "response.completed", "response": {"usage": {"input_tokens": 7, "output_tokens": 8}}}),
        );
        assert_eq!(m.usage().map(|u| (u.input_tokens, u.output_tokens)), Some((7, 8)));
    }

    #[test]
    fn a_stream_without_usage_is_estimated_from_its_text() {
        let mut m = UsageMeter::new(Provider::OpenAiChat);
        m.observe(None, &json!({"choices": [{"delta": {"content": "hello"}}], "usage": null}));
        m.text("hello");
        m.text(" wörld");
        // 5 + 7 bytes: 12 / 4 = 3.
        assert_eq!(m.usage(), Some(Usage { input_tokens: 0, output_tokens: 3, estimated: true }));
        m.text("!");
        assert_eq!(m.usage().map(|u| u.output_tokens), Some(4));
        m.observe(None, &json!({"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 2}}));
        assert_eq!(m.usage(), Some(Usage { input_tokens: 8, output_tokens: 2, estimated: false }));
        assert_eq!(UsageMeter::new(Provider::Generic).usage(), None);
    }
}
