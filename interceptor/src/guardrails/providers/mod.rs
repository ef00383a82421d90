//! Provider wire formats: which provider a request is for, where its texts
//! live, how to rewrite one of them or add an instruction, what text a stream
//! event carries, and how to end a stream with an error the provider's SDKs
//! understand.
//!
//! Pure functions over `serde_json::Value` and bytes; no I/O. Parsers never
//! fail: a body that does not have the expected shape yields fewer texts, and
//! unknown fields are ignored. Images, audio, files and other binary content
//! are never texts.
//!
//! Roles of spans: instructions carry the author role (`System`/`Developer`),
//! tool calls `Assistant` and tool results `Tool` whatever message they sit in
//! (Anthropic and Gemini put tool results in a user turn).

use serde_json::Value;

use crate::guardrails::framing::{Frame, FramingKind, eventstream, sse::SseEvent};
use crate::guardrails::model::{
    NormalizedRequest, NormalizedResponse, PathSeg, Provider, Role, StreamDelta, TextKind, TextSpan,
};

/// Builds a `Vec<PathSeg>` from `&str` keys and `usize` indices.
macro_rules! jpath {
    ($($seg:expr),* $(,)?) => {
        ::std::vec::Vec::<$crate::guardrails::model::PathSeg>::from([
            $($crate::guardrails::providers::IntoSeg::into_seg($seg)),*
        ])
    };
}

mod anthropic;
mod bedrock;
mod bedrock_agent;
mod cohere;
mod gemini;
mod generic;
mod openai;
pub mod strings;

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("no value at {path}")]
    PathNotFound { path: String },
    #[error("value at {path} is not a string")]
    NotAString { path: String },
    #[error("{provider} bodies have no place for an instruction")]
    Unsupported { provider: &'static str },
    #[error("body does not have the expected shape: {what}")]
    Shape { what: &'static str },
}

/// One event of a response stream, as the framing parsers produce it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StreamEventRef<'a> {
    /// A Server-Sent Event.
    Sse { event: Option<&'a str>, data: &'a str },
    /// An AWS event-stream frame. For exceptions `event_type` is the
    /// `:exception-type`.
    EventStream { event_type: &'a str, message_type: &'a str, payload: &'a [u8] },
    /// One element of a streamed JSON array.
    JsonElement(&'a Value),
}

impl<'a> From<&'a SseEvent> for StreamEventRef<'a> {
    fn from(ev: &'a SseEvent) -> Self {
        Self::Sse { event: ev.event.as_deref(), data: &ev.data }
    }
}

impl<'a> From<&'a eventstream::Message> for StreamEventRef<'a> {
    fn from(m: &'a eventstream::Message) -> Self {
        Self::EventStream {
            event_type: m.event_type().or_else(|| m.exception_type()).unwrap_or(""),
            message_type: m.message_type().unwrap_or("event"),
            payload: &m.payload,
        }
    }
}

impl<'a> From<&'a Value> for StreamEventRef<'a> {
    fn from(v: &'a Value) -> Self {
        Self::JsonElement(v)
    }
}

impl<'a> From<&'a Frame> for StreamEventRef<'a> {
    fn from(frame: &'a Frame) -> Self {
        match frame {
            Frame::Sse(event) => event.into(),
            Frame::EventStream(message) => message.into(),
            Frame::JsonElement(element) => (&element.value).into(),
        }
    }
}

// ---------------------------------------------------------------------------
// Detection

/// The provider a request is for, from its host and path (query ignored).
///
/// Known hosts are matched exactly; on other hosts the OpenAI- and
/// Anthropic-compatible path suffixes (`/chat/completions`, `/v1/responses`,
/// `/v1/messages`) are recognized, since many gateways and vendors mirror
/// them. Everything else is `Generic`; see [`detect_with_body`].
pub fn detect(host: &str, path: &str) -> Provider {
    let host = normalize_host(host);
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
    let host = host.as_str();

    if host == "api.openai.com" {
        return match path {
            "/v1/chat/completions" => Provider::OpenAiChat,
            "/v1/responses" => Provider::OpenAiResponses,
            _ => Provider::Generic,
        };
    }
    if host == "chatgpt.com" {
        return match path {
            "/backend-api/codex/responses" => Provider::OpenAiResponses,
            // The ChatGPT apps (signed in and anonymous, with and without the
            // `/f/` prefix the web app moved to): `messages[].content.parts`.
            "/backend-api/conversation"
            | "/backend-api/f/conversation"
            | "/backend-anon/conversation"
            | "/backend-anon/f/conversation" => Provider::OpenAiChat,
            _ => Provider::Generic,
        };
    }
    if host == "api.cohere.com" || host == "api.cohere.ai" {
        return match path {
            "/v1/chat" | "/v2/chat" => Provider::Cohere,
            // The OpenAI-compatible endpoint.
            p if p.ends_with("/chat/completions") => Provider::OpenAiChat,
            _ => Provider::Generic,
        };
    }
    if is_bedrock_agent_host(host) {
        // InvokeAgent, InvokeInlineAgent, RetrieveAndGenerate(Stream),
        // Retrieve, InvokeFlow: one parser reads them all.
        return Provider::BedrockAgent;
    }
    if host == "githubcopilot.com" || host.ends_with(".githubcopilot.com") {
        return match path {
            "/chat/completions" | "/v1/chat/completions" => Provider::OpenAiChat,
            "/responses" | "/v1/responses" => Provider::OpenAiResponses,
            "/v1/messages" => Provider::Anthropic,
            _ => Provider::Generic,
        };
    }
    if host == "api.anthropic.com" {
        return match path {
            "/v1/messages" => Provider::Anthropic,
            _ => Provider::Generic,
        };
    }
    if is_bedrock_host(host) {
        return bedrock::detect_path(path);
    }
    if host == "generativelanguage.googleapis.com" || host.ends_with("aiplatform.googleapis.com") {
        if path.contains(":generateContent") || path.contains(":streamGenerateContent") {
            return Provider::Gemini;
        }
        // Claude on Vertex: Messages bodies with `anthropic_version`.
        if path.contains("/publishers/anthropic/models/")
            && (path.ends_with(":rawPredict") || path.ends_with(":streamRawPredict"))
        {
            return Provider::Anthropic;
        }
    }
    if path.ends_with("/chat/completions") {
        return Provider::OpenAiChat;
    }
    if path.ends_with("/v1/responses") || (is_azure_openai_host(host) && path.ends_with("/responses")) {
        return Provider::OpenAiResponses;
    }
    if path.ends_with("/v1/messages") {
        return Provider::Anthropic;
    }
    Provider::Generic
}

/// A host the detection knows, with the request formats it reads there:
/// what `interceptor check-config` shows for each AI domain.
#[derive(Debug)]
pub struct KnownHost {
    /// The AI domain pattern, as in the built-in `domains.ai` list.
    pub pattern: &'static str,
    /// Example paths and the format each is read as; the tests check them
    /// against [`detect`].
    pub routes: &'static [(&'static str, Provider)],
}

const CHAT_V1: (&str, Provider) = ("/v1/chat/completions", Provider::OpenAiChat);
const RESPONSES_V1: (&str, Provider) = ("/v1/responses", Provider::OpenAiResponses);
const BEDROCK_ROUTES: &[(&str, Provider)] = &[
    ("/model/anthropic.claude-sonnet-4-5-20250929-v1:0/invoke", Provider::Anthropic),
    ("/model/meta.llama3-70b-instruct-v1:0/invoke", Provider::BedrockInvoke),
    ("/model/amazon.nova-pro-v1:0/converse", Provider::BedrockConverse),
];
const BEDROCK_AGENT_ROUTES: &[(&str, Provider)] = &[
    ("/agents/AGENT1234/agentAliases/TSTALIASID/sessions/s1/text", Provider::BedrockAgent),
    ("/retrieveAndGenerate", Provider::BedrockAgent),
    ("/knowledgebases/KB1234/retrieve", Provider::BedrockAgent),
];
const VERTEX_ROUTES: &[(&str, Provider)] = &[
    ("/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent", Provider::Gemini),
    ("/v1/projects/p/locations/l/publishers/anthropic/models/claude-sonnet-4-5:rawPredict", Provider::Anthropic),
];
const COPILOT_ROUTES: &[(&str, Provider)] = &[
    ("/chat/completions", Provider::OpenAiChat),
    ("/responses", Provider::OpenAiResponses),
    ("/v1/messages", Provider::Anthropic),
];
const AZURE_ROUTES: &[(&str, Provider)] = &[
    ("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", Provider::OpenAiChat),
    ("/openai/v1/chat/completions", Provider::OpenAiChat),
    ("/openai/responses?api-version=2025-04-01-preview", Provider::OpenAiResponses),
    ("/openai/v1/responses", Provider::OpenAiResponses),
    ("/models/chat/completions?api-version=2024-05-01-preview", Provider::OpenAiChat),
];
const COHERE_ROUTES: &[(&str, Provider)] = &[
    ("/v2/chat", Provider::Cohere),
    ("/v1/chat", Provider::Cohere),
    ("/compatibility/v1/chat/completions", Provider::OpenAiChat),
];

/// The hosts of the built-in AI domains and what is read on each. On any
/// host, paths ending in `/chat/completions`, `/v1/responses` and
/// `/v1/messages` are read as OpenAI chat, Responses and Anthropic; other
/// bodies by their shape ([`detect_from_body`]), else every string field.
pub const KNOWN_HOSTS: &[KnownHost] = &[
    KnownHost { pattern: "api.openai.com", routes: &[CHAT_V1, RESPONSES_V1] },
    KnownHost {
        pattern: "chatgpt.com",
        routes: &[
            ("/backend-api/codex/responses", Provider::OpenAiResponses),
            ("/backend-api/conversation", Provider::OpenAiChat),
            ("/backend-api/f/conversation", Provider::OpenAiChat),
            ("/backend-anon/conversation", Provider::OpenAiChat),
        ],
    },
    KnownHost { pattern: "api.anthropic.com", routes: &[("/v1/messages", Provider::Anthropic)] },
    KnownHost { pattern: "claude.ai", routes: &[] },
    KnownHost { pattern: "bedrock-runtime.amazonaws.com", routes: BEDROCK_ROUTES },
    KnownHost { pattern: "bedrock-runtime.*.amazonaws.com", routes: BEDROCK_ROUTES },
    KnownHost { pattern: "bedrock-runtime-fips.*.amazonaws.com", routes: BEDROCK_ROUTES },
    KnownHost { pattern: "bedrock-agent-runtime.*.amazonaws.com", routes: BEDROCK_AGENT_ROUTES },
    KnownHost { pattern: "bedrock-agent-runtime-fips.*.amazonaws.com", routes: BEDROCK_AGENT_ROUTES },
    KnownHost {
        pattern: "generativelanguage.googleapis.com",
        routes: &[
            ("/v1beta/models/gemini-2.5-pro:generateContent", Provider::Gemini),
            ("/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse", Provider::Gemini),
            ("/v1beta/openai/chat/completions", Provider::OpenAiChat),
        ],
    },
    KnownHost { pattern: "aiplatform.googleapis.com", routes: VERTEX_ROUTES },
    KnownHost { pattern: "*-aiplatform.googleapis.com", routes: VERTEX_ROUTES },
    KnownHost { pattern: "api.githubcopilot.com", routes: COPILOT_ROUTES },
    KnownHost { pattern: "api.individual.githubcopilot.com", routes: COPILOT_ROUTES },
    KnownHost { pattern: "api.business.githubcopilot.com", routes: COPILOT_ROUTES },
    KnownHost { pattern: "api.enterprise.githubcopilot.com", routes: COPILOT_ROUTES },
    KnownHost { pattern: "*.githubcopilot.com", routes: COPILOT_ROUTES },
    KnownHost { pattern: "copilot-proxy.githubusercontent.com", routes: &[] },
    KnownHost { pattern: "*.openai.azure.com", routes: AZURE_ROUTES },
    KnownHost { pattern: "*.cognitiveservices.azure.com", routes: AZURE_ROUTES },
    KnownHost { pattern: "*.services.ai.azure.com", routes: AZURE_ROUTES },
    KnownHost { pattern: "api.mistral.ai", routes: &[CHAT_V1] },
    KnownHost {
        pattern: "api.groq.com",
        routes: &[
            ("/openai/v1/chat/completions", Provider::OpenAiChat),
            ("/openai/v1/responses", Provider::OpenAiResponses),
        ],
    },
    KnownHost {
        pattern: "api.deepseek.com",
        routes: &[
            ("/chat/completions", Provider::OpenAiChat),
            CHAT_V1,
            ("/anthropic/v1/messages", Provider::Anthropic),
        ],
    },
    KnownHost { pattern: "api.x.ai", routes: &[CHAT_V1, RESPONSES_V1, ("/v1/messages", Provider::Anthropic)] },
    KnownHost {
        pattern: "openrouter.ai",
        routes: &[("/api/v1/chat/completions", Provider::OpenAiChat), ("/api/v1/responses", Provider::OpenAiResponses)],
    },
    KnownHost { pattern: "api.together.xyz", routes: &[CHAT_V1] },
    KnownHost { pattern: "api.together.ai", routes: &[CHAT_V1] },
    KnownHost { pattern: "api.fireworks.ai", routes: &[("/inference/v1/chat/completions", Provider::OpenAiChat)] },
    KnownHost { pattern: "api.perplexity.ai", routes: &[("/chat/completions", Provider::OpenAiChat), CHAT_V1] },
    KnownHost { pattern: "api.cohere.com", routes: COHERE_ROUTES },
    KnownHost { pattern: "api.cohere.ai", routes: COHERE_ROUTES },
];

/// What [`detect`] reads on hosts matching an AI domain `pattern`, in one
/// line: `openai_chat (/v1/chat/completions), …`, or how an unknown host is
/// read.
pub fn describe_domain(pattern: &str) -> String {
    const OTHERWISE: &str = "other paths by body shape, else every string field";
    let wanted = pattern.trim_end_matches('.').to_ascii_lowercase();
    match KNOWN_HOSTS.iter().find(|h| h.pattern == wanted) {
        Some(h) if !h.routes.is_empty() => {
            let routes: Vec<String> = h
                .routes
                .iter()
                .map(|(path, p)| format!("{} ({})", p.as_str(), path.split('?').next().unwrap_or(path)))
                .collect();
            format!("{}; {OTHERWISE}", routes.join(", "))
        }
        _ => format!(
            "by path (…/chat/completions: openai_chat, …/v1/responses: openai_responses, …/v1/messages: anthropic); {OTHERWISE}"
        ),
    }
}

fn normalize_host(host: &str) -> String {
    let host = host.trim();
    // Strip a port; a bracketed IPv6 literal keeps its colons.
    let host = match host.strip_prefix('[').and_then(|h| h.split_once(']')) {
        Some((literal, _port)) => literal,
        None => match host.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        },
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

/// Azure OpenAI resources (`{resource}.openai.azure.com`, and the
/// multi-service `{resource}.cognitiveservices.azure.com` and AI Foundry
/// `{resource}.services.ai.azure.com`): `/openai/deployments/{d}/…` and
/// `/openai/v1/…` paths (with `?api-version=`), `api-key` header.
fn is_azure_openai_host(host: &str) -> bool {
    [".openai.azure.com", ".cognitiveservices.azure.com", ".services.ai.azure.com"]
        .iter()
        .any(|suffix| host.ends_with(suffix))
}

/// `bedrock-agent-runtime.{region}.amazonaws.com` and its FIPS and VPC
/// endpoint forms.
fn is_bedrock_agent_host(host: &str) -> bool {
    host.split('.').any(|label| label.starts_with("bedrock-agent-runtime"))
        && (host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn"))
}

fn is_bedrock_host(host: &str) -> bool {
    // bedrock-runtime.{region}.amazonaws.com, -fips, VPC endpoints
    // (vpce-….bedrock-runtime.{region}.vpce.amazonaws.com) and China regions.
    host.split('.').any(|label| label.starts_with("bedrock-runtime"))
        && (host.ends_with(".amazonaws.com") || host.ends_with(".amazonaws.com.cn"))
}

/// [`detect`], falling back to [`detect_from_body`] when the path says nothing.
pub fn detect_with_body(host: &str, path: &str, body: &Value) -> Provider {
    match detect(host, path) {
        Provider::Generic => detect_from_body(body).unwrap_or(Provider::Generic),
        p => p,
    }
}

/// Guesses the provider from a request (or whole response) body.
pub fn detect_from_body(body: &Value) -> Option<Provider> {
    let obj = body.as_object()?;
    if obj.contains_key("anthropic_version") {
        return Some(Provider::Anthropic);
    }
    if obj.contains_key("contents") || obj.contains_key("candidates") {
        return Some(Provider::Gemini);
    }
    if let Some(msgs) = obj.get("messages").and_then(Value::as_array) {
        if bedrock::is_converse_shaped(body) {
            return Some(Provider::BedrockConverse);
        }
        if obj.contains_key("system") || anthropic::has_anthropic_blocks(msgs) {
            return Some(Provider::Anthropic);
        }
        return Some(Provider::OpenAiChat);
    }
    match obj.get("object").and_then(Value::as_str) {
        Some("chat.completion" | "chat.completion.chunk") => return Some(Provider::OpenAiChat),
        Some("response") => return Some(Provider::OpenAiResponses),
        _ => {}
    }
    if obj.contains_key("choices") {
        return Some(Provider::OpenAiChat);
    }
    if matches!(obj.get("input"), Some(Value::String(_) | Value::Array(_))) || obj.contains_key("instructions") {
        return Some(Provider::OpenAiResponses);
    }
    if obj.get("type").and_then(Value::as_str) == Some("message") && obj.get("content").is_some_and(Value::is_array) {
        return Some(Provider::Anthropic);
    }
    if obj.get("output").and_then(|o| o.get("message")).is_some() {
        return Some(Provider::BedrockConverse);
    }
    if bedrock::is_invoke_native(body) {
        return Some(Provider::BedrockInvoke);
    }
    None
}

/// The model named in a Bedrock (`/model/{id}/…`, URL-decoded) or Gemini /
/// Vertex (`…/models/{model}:method`) path.
pub fn model_from_path(path: &str) -> Option<String> {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if let Some(rest) = path.strip_prefix("/model/") {
        let (id, _op) = rest.rsplit_once('/')?;
        return Some(percent_decode(id));
    }
    let start = path.rfind("/models/")? + "/models/".len();
    let tail = &path[start..];
    let end = tail.find(':').unwrap_or(tail.len());
    (end > 0).then(|| percent_decode(&tail[..end]))
}

/// Whether the path itself asks for a streamed response (Gemini and Bedrock
/// say so in the path, not the body).
pub fn path_requests_stream(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or("");
    path.contains(":streamGenerateContent")
        || path.ends_with(":streamRawPredict")
        || path.ends_with("/invoke-with-response-stream")
        || path.ends_with("/converse-stream")
}

/// How a response body with this `Content-Type` is framed, if it is a stream.
/// Gemini's `streamGenerateContent` without `alt=sse` answers
/// `application/json` that is really a streamed array.
pub fn response_framing(provider: Provider, path: &str, content_type: &str) -> Option<FramingKind> {
    if let Some(kind) = FramingKind::from_content_type(content_type) {
        return Some(kind);
    }
    let is_json = content_type.split(';').next().is_some_and(|e| e.trim().eq_ignore_ascii_case("application/json"));
    (provider == Provider::Gemini && is_json && path.contains(":streamGenerateContent"))
        .then_some(FramingKind::JsonArray)
}

pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (b.get(i + 1).and_then(hex), b.get(i + 2).and_then(hex))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: &u8) -> Option<u8> {
    (*b as char).to_digit(16).and_then(|d| u8::try_from(d).ok())
}

// ---------------------------------------------------------------------------
// Parsing

/// Every text of a request body with its path, role and kind.
///
/// `model` and `stream` come from the body's top-level fields when present.
/// Gemini and Bedrock name the model and ask for streaming in the path, so
/// for them `stream` is false here: use [`path_requests_stream`] and
/// [`model_from_path`].
pub fn parse_request(provider: Provider, doc: &Value) -> NormalizedRequest {
    let mut c = Collector::default();
    match provider {
        Provider::OpenAiChat => openai::chat_request(doc, &mut c),
        Provider::OpenAiResponses => openai::responses_request(doc, &mut c),
        Provider::Anthropic => anthropic::request(doc, &mut c),
        Provider::BedrockInvoke => bedrock::invoke_request(doc, &mut c),
        Provider::BedrockConverse => bedrock::converse_request(doc, &mut c),
        Provider::Gemini => gemini::request(doc, &mut c),
        Provider::Cohere => cohere::request(doc, &mut c),
        Provider::BedrockAgent => bedrock_agent::request(doc, &mut c),
        Provider::Generic | Provider::Mcp => generic::texts(doc, &mut c),
    }
    NormalizedRequest {
        model: doc.get("model").and_then(Value::as_str).map(str::to_owned),
        stream: provider != Provider::Gemini && doc.get("stream").and_then(Value::as_bool).unwrap_or(false),
        texts: c.texts,
    }
}

/// Every text of a whole (non-streamed) response body.
pub fn parse_response(provider: Provider, doc: &Value) -> NormalizedResponse {
    let mut c = Collector::default();
    match provider {
        Provider::OpenAiChat => openai::chat_response(doc, &mut c),
        Provider::OpenAiResponses => openai::responses_response(doc, &mut c),
        Provider::Anthropic => anthropic::response(doc, &mut c),
        Provider::BedrockInvoke => bedrock::invoke_response(doc, &mut c),
        Provider::BedrockConverse => bedrock::converse_response(doc, &mut c),
        Provider::Gemini => gemini::response(doc, &mut c),
        Provider::Cohere => cohere::response(doc, &mut c),
        Provider::BedrockAgent => bedrock_agent::response(doc, &mut c),
        Provider::Generic | Provider::Mcp => generic::texts(doc, &mut c),
    }
    NormalizedResponse { texts: c.texts }
}

/// Hands every string value under `v` to `each`, in document order.
pub fn each_leaf(v: &Value, each: &mut dyn FnMut(&str)) {
    match v {
        Value::String(s) => each(s),
        Value::Array(items) => items.iter().for_each(|item| each_leaf(item, each)),
        Value::Object(map) => map.values().for_each(|item| each_leaf(item, each)),
        _ => {}
    }
}

/// The strings of `doc` that the generic walk finds (every string leaf but
/// identifiers, enums and binary data) and that are not among `read`, the
/// spans a provider parser returned: the texts the parser would have hidden.
///
/// A provider parser reads the fields it knows; a body can always carry text
/// elsewhere (a field the parser does not know, a shape it was not written
/// for), and the provider may read it. The guardrails scan these too, at
/// their own paths, so a finding in them is redacted in place like any
/// other. This is stricter than comparing the amount of text the two walks
/// find, which padding a field the parser reads would defeat.
pub fn unread_texts(doc: &Value, read: &[TextSpan]) -> Vec<TextSpan> {
    let known: std::collections::HashSet<&[PathSeg]> = read.iter().map(|t| t.path.as_slice()).collect();
    let mut c = Collector { texts: Vec::new(), skip: Some(&known) };
    generic::texts(doc, &mut c);
    c.texts
}

// ---------------------------------------------------------------------------
// Rewriting

/// The value at `path`, if there is one.
pub fn value_at<'a>(doc: &'a Value, path: &[PathSeg]) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in path {
        cur = match (seg, cur) {
            (PathSeg::Key(k), Value::Object(m)) => m.get(k)?,
            (PathSeg::Index(i), Value::Array(a)) => a.get(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// The value at `path`, to change in place.
pub fn value_at_mut<'a>(doc: &'a mut Value, path: &[PathSeg]) -> Option<&'a mut Value> {
    let mut cur = doc;
    for seg in path {
        cur = match (seg, cur) {
            (PathSeg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (PathSeg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// The string at `path`, if there is one.
pub fn text_at<'a>(doc: &'a Value, path: &[PathSeg]) -> Option<&'a str> {
    value_at(doc, path)?.as_str()
}

/// Replaces the string at `path` with `new`, touching nothing else.
pub fn set_text(doc: &mut Value, path: &[PathSeg], new: &str) -> Result<(), RewriteError> {
    match value_at_mut(doc, path) {
        Some(Value::String(s)) => {
            new.clone_into(s);
            Ok(())
        }
        Some(_) => Err(RewriteError::NotAString { path: path_string(path) }),
        None => Err(RewriteError::PathNotFound { path: path_string(path) }),
    }
}

/// Adds a mandatory system-level instruction in the provider's own format.
///
/// * OpenAI chat: a `system` message prepended to `messages`.
/// * Responses: a `developer` message prepended to an `input` array; with a
///   string (or no) `input`, appended to `instructions` (created if absent).
///   The array form is preferred because the ChatGPT Codex backend rejects
///   any `instructions` other than the official Codex prompts.
/// * Anthropic: appended to `system` (a string grows, a block list gets a
///   text block; appending keeps prompt-cache prefixes intact).
/// * Converse: `{text}` pushed onto `system`.
/// * Gemini: `{text}` pushed onto `systemInstruction.parts`.
/// * Bedrock invoke: the model's own system slot where it has one (Anthropic,
///   Nova, Cohere `preamble`, Llama 3 system header), else prefixed to the
///   prompt.
/// * Generic: unsupported.
pub fn insert_instruction(provider: Provider, doc: &mut Value, text: &str) -> Result<(), RewriteError> {
    if !doc.is_object() {
        return Err(RewriteError::Shape { what: "body is not a json object" });
    }
    match provider {
        Provider::OpenAiChat => openai::chat_insert(doc, text),
        Provider::OpenAiResponses => openai::responses_insert(doc, text),
        Provider::Anthropic => anthropic::insert(doc, text),
        Provider::BedrockInvoke => bedrock::invoke_insert(doc, text),
        Provider::BedrockConverse => bedrock::converse_insert(doc, text),
        Provider::Gemini => gemini::insert(doc, text),
        Provider::Cohere => cohere::insert(doc, text),
        Provider::BedrockAgent => bedrock_agent::insert(doc, text),
        Provider::Generic | Provider::Mcp => Err(RewriteError::Unsupported { provider: provider.as_str() }),
    }
}

/// Renders a path for logs and errors: `messages[2].content[0].text`.
pub fn path_string(path: &[PathSeg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            PathSeg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            PathSeg::Index(i) => {
                out.push('[');
                out.push_str(&i.to_string());
                out.push(']');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Streams

/// The text one stream event adds, and whether it ends the stream.
///
/// `end` means no more text follows (`[DONE]`, `message_stop`,
/// `response.completed`, a Gemini `finishReason`, Bedrock `messageStop`, an
/// error or exception); trailing metadata events may still come. Events that
/// cannot be parsed yield an empty delta.
pub fn stream_delta(provider: Provider, ev: StreamEventRef<'_>) -> StreamDelta {
    stream_delta_observed(provider, ev, &mut |_, _| {})
}

/// [`stream_delta`], also handing the event's parsed JSON (with the SSE
/// event name or frame event type) to `observe`, so that what else a stream
/// carries (its usage) is read without parsing the event twice.
pub fn stream_delta_observed(
    provider: Provider,
    ev: StreamEventRef<'_>,
    observe: &mut dyn FnMut(Option<&str>, &Value),
) -> StreamDelta {
    match ev {
        StreamEventRef::Sse { event, data } => {
            if data.trim() == "[DONE]" {
                return StreamDelta { texts: Vec::new(), end: true };
            }
            match serde_json::from_str::<Value>(data) {
                Ok(v) => {
                    observe(event, &v);
                    json_event(provider, event, &v)
                }
                Err(_) if matches!(provider, Provider::Generic | Provider::Mcp) => generic::raw_text(data),
                Err(_) => StreamDelta::default(),
            }
        }
        StreamEventRef::JsonElement(v) => {
            observe(None, v);
            json_event(provider, None, v)
        }
        StreamEventRef::EventStream { event_type, message_type, payload } => {
            if message_type != "event" {
                // `exception` and `error` frames end the stream.
                return StreamDelta { texts: Vec::new(), end: true };
            }
            if provider == Provider::BedrockConverse {
                return match serde_json::from_slice::<Value>(payload) {
                    Ok(v) => {
                        observe(Some(event_type), &v);
                        bedrock::converse_event(event_type, &v)
                    }
                    Err(_) => StreamDelta::default(),
                };
            }
            if provider == Provider::BedrockAgent {
                return bedrock_agent::event(event_type, payload);
            }
            if event_type != "chunk" {
                return StreamDelta::default();
            }
            match bedrock::unwrap_chunk(payload) {
                Some(inner) => {
                    observe(None, &inner);
                    json_event(provider, None, &inner)
                }
                None => StreamDelta::default(),
            }
        }
    }
}

/// One JSON stream event in the provider's native shape.
fn json_event(provider: Provider, event: Option<&str>, v: &Value) -> StreamDelta {
    match provider {
        Provider::OpenAiChat => openai::chat_chunk(v),
        Provider::OpenAiResponses => openai::responses_event(event, v),
        Provider::Anthropic => anthropic::event(event, v),
        Provider::BedrockInvoke => bedrock::invoke_chunk(v),
        Provider::BedrockConverse => bedrock::converse_event(event.unwrap_or(""), v),
        Provider::Gemini => gemini::chunk(v),
        Provider::Cohere => cohere::chunk(event, v),
        Provider::BedrockAgent => bedrock_agent::json_event(v),
        Provider::Generic | Provider::Mcp => generic::chunk(v),
    }
}

/// Bytes to append to a stream (after the last complete event forwarded) so
/// the provider's SDKs raise a clean error carrying `reason` and stop.
///
/// * SSE, OpenAI chat (and Generic / Bedrock providers over SSE): a data-only
///   `{"error":{…,"type":"guardrail_blocked","code":"blocked"}}` event, then
///   `[DONE]`. The OpenAI SDKs raise `APIError` on any event whose data has an
///   `error` key.
/// * SSE, Responses: `event: error` with the documented error-event fields
///   plus an `error` object (without it the Python and Node SDKs yield the
///   event instead of raising), then `response.failed` for clients that wait
///   for a terminal event (Codex).
/// * SSE, Anthropic: `event: error` with `{"type":"error","error":{"type":
///   "permission_error",…}}`; both SDKs raise on an `error` event, and
///   `permission_error` (the 403 type) is one clients do not retry.
/// * SSE, Gemini: `data: {"error":{"code":403,…,"status":"PERMISSION_DENIED"}}`.
/// * JSON array (Gemini): `,{"error":{…}}]` — assumes at least one element
///   was forwarded; see [`json_array_block`] otherwise.
/// * Event-stream (Bedrock, any model): an exception frame
///   `:exception-type=validationException` with `{"message": reason}`, a
///   modeled exception of both InvokeModelWithResponseStream and
///   ConverseStream, so SDKs raise it as a typed error.
pub fn stream_block(provider: Provider, framing: FramingKind, reason: &str) -> Vec<u8> {
    match framing {
        FramingKind::EventStream => bedrock::exception_frame(reason),
        FramingKind::JsonArray => gemini::json_array_block(reason, true),
        FramingKind::Sse => match provider {
            Provider::OpenAiResponses => openai::responses_block(reason),
            Provider::Anthropic => anthropic::block(reason),
            Provider::Gemini => gemini::sse_block(reason),
            Provider::OpenAiChat
            | Provider::BedrockInvoke
            | Provider::BedrockConverse
            | Provider::BedrockAgent
            | Provider::Cohere
            | Provider::Generic
            | Provider::Mcp => openai::chat_block(reason),
        },
    }
}

/// The end of a Gemini streamed array carrying an error element:
/// `,{"error":…}]` after forwarded elements, or a whole `[{"error":…}]` when
/// none was forwarded (not even the `[`).
pub fn json_array_block(reason: &str, elements_forwarded: bool) -> Vec<u8> {
    gemini::json_array_block(reason, elements_forwarded)
}

// ---------------------------------------------------------------------------
// Shared helpers for the provider modules

pub(crate) trait IntoSeg {
    fn into_seg(self) -> PathSeg;
}

impl IntoSeg for &str {
    fn into_seg(self) -> PathSeg {
        PathSeg::Key(self.to_owned())
    }
}

impl IntoSeg for usize {
    fn into_seg(self) -> PathSeg {
        PathSeg::Index(self)
    }
}

/// `base` followed by `tail`.
fn join(base: &[PathSeg], tail: Vec<PathSeg>) -> Vec<PathSeg> {
    let mut p = Vec::with_capacity(base.len() + tail.len());
    p.extend_from_slice(base);
    p.extend(tail);
    p
}

/// Accumulates spans in document order.
#[derive(Default)]
struct Collector<'a> {
    texts: Vec<TextSpan>,
    /// Paths not to record (already read by a provider parser).
    skip: Option<&'a std::collections::HashSet<&'a [PathSeg]>>,
}

impl Collector<'_> {
    /// Records `v` if it is a non-empty string.
    fn string(&mut self, v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind) {
        if let Some(Value::String(s)) = v
            && !s.is_empty()
        {
            self.texts.push(TextSpan { path, role, kind, text: s.clone() });
        }
    }

    /// Records every string leaf under `v` (tool arguments and results given
    /// as JSON), skipping binary blobs.
    fn leaves(&mut self, v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind) {
        if let Some(v) = v {
            let mut path = path;
            self.walk(v, &mut path, role, kind, false);
        }
    }

    /// Records the `description` strings of a tool definition's JSON Schema
    /// (the tool's parameters, their properties, nested items), which the
    /// model reads as instructions.
    fn descriptions(&mut self, schema: Option<&Value>, path: Vec<PathSeg>) {
        let Some(schema) = schema else { return };
        let mut path = path;
        self.schema_walk(schema, &mut path, 0);
    }

    fn schema_walk(&mut self, v: &Value, path: &mut Vec<PathSeg>, depth: usize) {
        // serde_json refuses documents nested deeper than 128.
        if depth > 128 {
            return;
        }
        match v {
            Value::Object(map) => {
                for (k, item) in map {
                    path.push(PathSeg::Key(k.clone()));
                    match item {
                        Value::String(_) if k == "description" => {
                            self.string(Some(item), path.clone(), Role::System, TextKind::Instructions);
                        }
                        _ => self.schema_walk(item, path, depth + 1),
                    }
                    path.pop();
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(PathSeg::Index(i));
                    self.schema_walk(item, path, depth + 1);
                    path.pop();
                }
            }
            _ => {}
        }
    }

    fn walk(&mut self, v: &Value, path: &mut Vec<PathSeg>, role: Role, kind: TextKind, skip_keys: bool) {
        match v {
            Value::String(s) if !s.is_empty() && !is_blob(s) => {
                if self.skip.is_some_and(|skip| skip.contains(path.as_slice())) {
                    return;
                }
                self.texts.push(TextSpan { path: path.clone(), role, kind, text: s.clone() });
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    path.push(PathSeg::Index(i));
                    self.walk(item, path, role, kind, skip_keys);
                    path.pop();
                }
            }
            Value::Object(map) => {
                for (k, item) in map {
                    if skip_keys && generic::skip_key(k, item) {
                        continue;
                    }
                    let kind = if skip_keys && generic::is_identifier_key(k) { TextKind::Identifier } else { kind };
                    path.push(PathSeg::Key(k.clone()));
                    self.walk(item, path, role, kind, skip_keys);
                    path.pop();
                }
            }
            _ => {}
        }
    }
}

/// A `data:` URL or a long run of base64: image, audio or file bytes.
fn is_blob(s: &str) -> bool {
    if s.starts_with("data:") && s.contains(";base64,") {
        return true;
    }
    s.len() >= 256 && looks_base64(s)
}

fn looks_base64(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

/// A role string in any provider's spelling.
fn role_of(role: &str) -> Role {
    match role.to_ascii_lowercase().as_str() {
        "system" => Role::System,
        "developer" => Role::Developer,
        "user" => Role::User,
        "assistant" | "model" | "chatbot" => Role::Assistant,
        "tool" | "function" => Role::Tool,
        _ => Role::Unknown,
    }
}

/// The kind a message's own content has, from its role.
fn kind_for(role: Role) -> TextKind {
    match role {
        Role::System | Role::Developer => TextKind::Instructions,
        Role::Tool => TextKind::ToolResult,
        _ => TextKind::Content,
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn delta(texts: Vec<(TextKind, String)>, end: bool) -> StreamDelta {
    StreamDelta { texts: texts.into_iter().filter(|(_, t)| !t.is_empty()).collect(), end }
}

/// Pushes `v` onto `texts` if it is a string.
fn push_str(texts: &mut Vec<(TextKind, String)>, kind: TextKind, v: Option<&Value>) {
    if let Some(s) = v.and_then(Value::as_str) {
        texts.push((kind, s.to_owned()));
    }
}

/// Appends `text` to an instruction string, separated by a blank line.
fn append_paragraph(existing: &str, text: &str) -> String {
    if existing.is_empty() { text.to_owned() } else { format!("{existing}\n\n{text}") }
}

#[cfg(test)]
mod tests;
