//! The normalized model every provider format is parsed into.
//!
//! Texts are not copied out of their document and forgotten: each
//! [`TextSpan`] carries the JSON path it came from, so a guardrail can
//! rewrite exactly that string and leave every other field (`model`,
//! `tools`, `max_tokens`, ...) byte-for-byte intact. Pure types, no I/O.

use serde::Serialize;

/// Which wire format a body is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// OpenAI Chat Completions (also Copilot's `/chat/completions`).
    OpenAiChat,
    /// OpenAI Responses (also `chatgpt.com/backend-api/codex/responses`, Copilot `/responses`).
    OpenAiResponses,
    /// Anthropic Messages (also Bedrock InvokeModel with an Anthropic model).
    Anthropic,
    /// Bedrock InvokeModel with a non-Anthropic model-native body (Titan, Llama, Mistral, Cohere).
    BedrockInvoke,
    /// Bedrock Converse / ConverseStream.
    BedrockConverse,
    /// Gemini generateContent / streamGenerateContent (and Vertex).
    Gemini,
    /// Cohere Chat, v1 (`message`, `chat_history`, `preamble`) and v2
    /// (`messages` close to OpenAI's, with documents).
    Cohere,
    /// Bedrock agent runtime: InvokeAgent (`inputText`), InvokeInlineAgent,
    /// RetrieveAndGenerate (`input.text`), Retrieve (`retrievalQuery.text`).
    BedrockAgent,
    /// Unknown JSON: every string field is inspected.
    Generic,
    /// The Model Context Protocol (JSON-RPC 2.0 over streamable HTTP or
    /// HTTP+SSE), read by `guardrails::mcp`. The LLM parsers treat it as
    /// [`Provider::Generic`].
    Mcp,
}

/// Fails to compile when a provider is added, so [`Provider::ALL`] is kept whole.
const _: fn(Provider) = |p| match p {
    Provider::OpenAiChat
    | Provider::OpenAiResponses
    | Provider::Anthropic
    | Provider::BedrockInvoke
    | Provider::BedrockConverse
    | Provider::Gemini
    | Provider::Cohere
    | Provider::BedrockAgent
    | Provider::Generic
    | Provider::Mcp => {}
};

impl Provider {
    /// Every provider.
    pub const ALL: [Provider; 10] = [
        Provider::OpenAiChat,
        Provider::OpenAiResponses,
        Provider::Anthropic,
        Provider::BedrockInvoke,
        Provider::BedrockConverse,
        Provider::Gemini,
        Provider::Generic,
        // After `Generic`, so the fuzz seeds that pick a provider by index
        // keep theirs.
        Provider::Cohere,
        Provider::BedrockAgent,
        Provider::Mcp,
    ];

    /// The provider's name in policies, metrics and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiChat => "openai_chat",
            Self::OpenAiResponses => "openai_responses",
            Self::Anthropic => "anthropic",
            Self::BedrockInvoke => "bedrock_invoke",
            Self::BedrockConverse => "bedrock_converse",
            Self::Gemini => "gemini",
            Self::Cohere => "cohere",
            Self::BedrockAgent => "bedrock_agent",
            Self::Generic => "generic",
            Self::Mcp => "mcp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    System,
    Developer,
    User,
    Assistant,
    Tool,
    Unknown,
}

/// What a piece of text is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TextKind {
    /// Message content (prompt or completion text).
    Content,
    /// System or developer instructions.
    Instructions,
    /// Arguments of a tool call the model made (a JSON string, or JSON).
    ToolCall,
    /// Output of a tool sent back to the model.
    ToolResult,
    /// Reasoning / thinking text.
    Reasoning,
    /// A string field of an unknown body.
    Other,
    /// Contents of a resource a server returned (MCP `resources/read`).
    Resource,
    /// A prompt template a server returned (MCP `prompts/get` description
    /// and messages).
    Prompt,
    /// What a server says about its tools (MCP `tools/list`: names, titles,
    /// descriptions, parameter descriptions): text the model reads as
    /// instructions.
    ToolDefinition,
    /// The value of a field that names or tags something rather than
    /// saying it (`model`, `id`, `call_id`, `type`, `status`, …): still
    /// what the receiver reads, so a credential put there is found.
    Identifier,
}

/// One step of a JSON path.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(untagged)]
pub enum PathSeg {
    Key(String),
    Index(usize),
}

/// A string inside a JSON document, with where it lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TextSpan {
    /// Path from the document root to the JSON string holding the text.
    pub path: Vec<PathSeg>,
    pub role: Role,
    pub kind: TextKind,
    pub text: String,
}

/// A request body, normalized.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NormalizedRequest {
    pub model: Option<String>,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    pub texts: Vec<TextSpan>,
}

/// A whole (non-streamed) response body, normalized.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NormalizedResponse {
    pub texts: Vec<TextSpan>,
}

/// The text a single stream event adds (completion text, tool-call argument
/// fragments, reasoning), in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StreamDelta {
    pub texts: Vec<(TextKind, String)>,
    /// The event ends the stream (e.g. `[DONE]`, `message_stop`, `response.completed`).
    pub end: bool,
}

/// Which direction a check is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The direction's name in metrics and audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
        }
    }
}

/// What the guardrails decided about one check, as audit events and
/// metrics name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Let through unchanged.
    Allow,
    /// Let through rewritten.
    Modify,
    /// Refused.
    Block,
    /// Let through, with something to look at.
    Alert,
    /// A backend failed and the fail mode let it through.
    Error,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Modify => "modify",
            Self::Block => "block",
            Self::Alert => "alert",
            Self::Error => "error",
        }
    }
}

/// What took part in a decision: a guardrail backend, or one of the
/// pipeline's own checks. Named in audit events (`backends`) and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The embedded engine.
    Local,
    /// The Akto guardrail service.
    Akto,
    /// Body decoding: content coding, charset, size limits.
    Decode,
    /// The provider's stream framing.
    Framing,
    /// The WebSocket protocol check.
    #[serde(rename = "websocket")]
    WebSocket,
    /// The proxy, before any request (unclassified connections).
    Proxy,
    /// Key brokering (placeholders and real keys).
    Keys,
    /// Budgets and rate limits.
    Budget,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Akto => "akto",
            Self::Decode => "decode",
            Self::Framing => "framing",
            Self::WebSocket => "websocket",
            Self::Proxy => "proxy",
            Self::Keys => "keys",
            Self::Budget => "budget",
        }
    }
}

impl AsRef<str> for Stage {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}
