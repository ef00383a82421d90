//! The WebSocket protocols agents speak to AI providers, and where their
//! messages carry text (pure; no I/O):
//!
//! * the OpenAI Responses API's WebSocket mode (`/v1/responses`, also
//!   `chatgpt.com/backend-api/codex/responses`: the Codex CLI): the client
//!   sends `response.create` (the fields of a `POST /v1/responses` body) and
//!   the server answers with the Responses streaming events;
//! * OpenAI Realtime (`/v1/realtime`, Azure `/openai/realtime`): client
//!   events `session.update`, `conversation.item.create`, `response.create`,
//!   `input_audio_buffer.append`; server events `response.output_text.delta`
//!   (beta: `response.text.delta`), audio transcripts, audio;
//! * Gemini Live (`/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent`,
//!   also `v1alpha` and the `…Constrained` endpoint of ephemeral tokens):
//!   client `setup`, `clientContent`, `realtimeInput`, `toolResponse`;
//!   server `serverContent` (JSON, often in binary frames).
//!
//! A client message's texts are the protocol's own fields (with their roles
//! and kinds) plus every other prose string of the message (the generic
//! walk), so a field this module does not know is still checked. Audio is
//! never text: it is reported so it can be counted as not inspected.

use serde_json::{Value, json};

use super::{
    model::{PathSeg, Provider, Role, StreamDelta, TextKind, TextSpan},
    providers::{self, StreamEventRef},
};

/// A WebSocket protocol the guardrails can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WsProtocol {
    OpenAiResponses,
    OpenAiRealtime,
    GeminiLive,
}

impl WsProtocol {
    /// The protocol of a WebSocket upgrade to `host` and `path` (with query).
    pub fn detect(host: &str, path: &str) -> Option<Self> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let path = path.split(['?', '#']).next().unwrap_or("");
        let path = if path.len() > 1 { path.trim_end_matches('/') } else { path };
        if providers::detect(&host, path) == Provider::OpenAiResponses {
            return Some(Self::OpenAiResponses);
        }
        let openai = host == "api.openai.com" || host.ends_with(".openai.azure.com");
        if openai && (path == "/v1/realtime" || path == "/openai/realtime" || path == "/openai/v1/realtime") {
            return Some(Self::OpenAiRealtime);
        }
        if (host == "generativelanguage.googleapis.com" || host.ends_with("aiplatform.googleapis.com"))
            && path.starts_with("/ws/google.")
            && path.contains(".BidiGenerateContent")
        {
            return Some(Self::GeminiLive);
        }
        None
    }

    /// The name in audit events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OpenAiResponses => "openai_responses_websocket",
            Self::OpenAiRealtime => "openai_realtime",
            Self::GeminiLive => "gemini_live",
        }
    }

    /// The provider whose policies apply (Realtime has its own shapes:
    /// policies scoped to `generic` apply to it).
    pub fn provider(self) -> Provider {
        match self {
            Self::OpenAiResponses => Provider::OpenAiResponses,
            Self::OpenAiRealtime => Provider::Generic,
            Self::GeminiLive => Provider::Gemini,
        }
    }
}

/// What a client message holds.
#[derive(Debug, Default)]
pub struct ClientMessage {
    /// The message as JSON (`None`: not JSON; its text is then one span
    /// with an empty path).
    pub doc: Option<Value>,
    pub texts: Vec<TextSpan>,
    /// It carries audio (or video), which is not inspected.
    pub audio: bool,
    /// `type` of an OpenAI event, for the error event's `event_id`.
    pub event_id: Option<String>,
    /// A Responses `response.create`: the policy's system instructions go in.
    pub creates_response: bool,
}

/// The texts of one client message.
pub fn client_message(protocol: WsProtocol, raw: &[u8]) -> ClientMessage {
    let Ok(doc) = serde_json::from_slice::<Value>(raw) else {
        let text = String::from_utf8_lossy(raw).into_owned();
        let texts = if text.is_empty() {
            Vec::new()
        } else {
            vec![TextSpan { path: Vec::new(), role: Role::Unknown, kind: TextKind::Other, text }]
        };
        return ClientMessage { texts, ..ClientMessage::default() };
    };
    let mut texts = Vec::new();
    let mut audio = false;
    let ty = doc.get("type").and_then(Value::as_str).unwrap_or("");
    match protocol {
        WsProtocol::OpenAiResponses => {
            texts = providers::parse_request(Provider::OpenAiResponses, &doc).texts;
            // An early shape nested the request under `response`.
            if let Some(inner) = doc.get("response").filter(|r| r.is_object()) {
                texts.extend(prefixed("response", providers::parse_request(Provider::OpenAiResponses, inner).texts));
            }
        }
        WsProtocol::OpenAiRealtime => {
            let session = doc.get("session");
            push(
                &mut texts,
                session.and_then(|s| s.get("instructions")),
                key_path(&["session", "instructions"]),
                Role::System,
                TextKind::Instructions,
            );
            if let Some(item) = doc.get("item") {
                audio |= realtime_item(item, vec![key("item")], &mut texts);
            }
            if let Some(response) = doc.get("response") {
                push(
                    &mut texts,
                    response.get("instructions"),
                    key_path(&["response", "instructions"]),
                    Role::System,
                    TextKind::Instructions,
                );
                if let Some(items) = response.get("input").and_then(Value::as_array) {
                    for (i, item) in items.iter().enumerate() {
                        let path = vec![key("response"), key("input"), PathSeg::Index(i)];
                        audio |= realtime_item(item, path, &mut texts);
                    }
                }
            }
            audio |= ty == "input_audio_buffer.append";
        }
        WsProtocol::GeminiLive => {
            if let Some(parts) = doc.pointer("/setup/systemInstruction/parts").and_then(Value::as_array) {
                for (i, part) in parts.iter().enumerate() {
                    let path =
                        vec![key("setup"), key("systemInstruction"), key("parts"), PathSeg::Index(i), key("text")];
                    push(&mut texts, part.get("text"), path, Role::System, TextKind::Instructions);
                }
            }
            if let Some(turns) = doc.pointer("/clientContent/turns").and_then(Value::as_array) {
                for (t, turn) in turns.iter().enumerate() {
                    let role = match turn.get("role").and_then(Value::as_str) {
                        Some("model") => Role::Assistant,
                        _ => Role::User,
                    };
                    let Some(parts) = turn.get("parts").and_then(Value::as_array) else { continue };
                    for (i, part) in parts.iter().enumerate() {
                        let path = vec![
                            key("clientContent"),
                            key("turns"),
                            PathSeg::Index(t),
                            key("parts"),
                            PathSeg::Index(i),
                            key("text"),
                        ];
                        push(&mut texts, part.get("text"), path, role, TextKind::Content);
                        audio |= part.get("inlineData").is_some();
                    }
                }
            }
            if let Some(input) = doc.get("realtimeInput") {
                push(
                    &mut texts,
                    input.get("text"),
                    key_path(&["realtimeInput", "text"]),
                    Role::User,
                    TextKind::Content,
                );
                audio |= ["mediaChunks", "audio", "video"].iter().any(|k| input.get(k).is_some());
            }
        }
    }
    // Every other prose string of the message is checked too.
    for span in providers::parse_request(Provider::Generic, &doc).texts {
        if !texts.iter().any(|t| t.path == span.path) && !is_media(&span) {
            texts.push(span);
        }
    }
    let event_id = doc.get("event_id").and_then(Value::as_str).map(str::to_owned);
    let creates_response = protocol == WsProtocol::OpenAiResponses && ty == "response.create";
    ClientMessage { doc: Some(doc), texts, audio, event_id, creates_response }
}

/// What a provider message adds to the stream.
#[derive(Debug, Default, PartialEq)]
pub struct ServerEvent {
    pub delta: StreamDelta,
    /// It carries audio, which is not inspected.
    pub audio: bool,
}

/// The text one provider message adds, whether it ends a response, and
/// whether it is audio.
pub fn server_event(protocol: WsProtocol, raw: &[u8]) -> ServerEvent {
    let Ok(v) = serde_json::from_slice::<Value>(raw) else {
        return match std::str::from_utf8(raw) {
            Ok(text) if !text.is_empty() => ServerEvent {
                delta: StreamDelta { texts: vec![(TextKind::Other, text.to_owned())], end: false },
                audio: false,
            },
            Ok(_) => ServerEvent::default(),
            // Binary that is neither JSON nor text.
            Err(_) => ServerEvent { delta: StreamDelta::default(), audio: true },
        };
    };
    match protocol {
        WsProtocol::OpenAiResponses => ServerEvent {
            delta: providers::stream_delta(Provider::OpenAiResponses, StreamEventRef::JsonElement(&v)),
            audio: false,
        },
        WsProtocol::OpenAiRealtime => {
            let ty = v.get("type").and_then(Value::as_str).unwrap_or("");
            let kind = match ty {
                "response.text.delta"
                | "response.output_text.delta"
                | "response.audio_transcript.delta"
                | "response.output_audio_transcript.delta" => Some(TextKind::Content),
                "response.function_call_arguments.delta" => Some(TextKind::ToolCall),
                _ => None,
            };
            let mut texts = Vec::new();
            if let (Some(kind), Some(Value::String(d))) = (kind, v.get("delta"))
                && !d.is_empty()
            {
                texts.push((kind, d.clone()));
            }
            let end = matches!(ty, "response.done" | "error");
            let audio = matches!(ty, "response.audio.delta" | "response.output_audio.delta");
            ServerEvent { delta: StreamDelta { texts, end }, audio }
        }
        WsProtocol::GeminiLive => {
            let mut texts = Vec::new();
            let mut audio = false;
            let content = v.get("serverContent");
            if let Some(parts) = content.and_then(|c| c.pointer("/modelTurn/parts")).and_then(Value::as_array) {
                for part in parts {
                    if let Some(Value::String(t)) = part.get("text")
                        && !t.is_empty()
                    {
                        texts.push((TextKind::Content, t.clone()));
                    }
                    audio |= part.get("inlineData").is_some();
                }
            }
            if let Some(Value::String(t)) = content.and_then(|c| c.pointer("/outputTranscription/text"))
                && !t.is_empty()
            {
                texts.push((TextKind::Content, t.clone()));
            }
            if let Some(calls) = v.pointer("/toolCall/functionCalls").and_then(Value::as_array) {
                for call in calls {
                    if let Some(args) = call.get("args") {
                        texts.push((TextKind::ToolCall, args.to_string()));
                    }
                }
            }
            let flag = |name: &str| content.and_then(|c| c.get(name)).and_then(Value::as_bool).unwrap_or(false);
            let end = flag("turnComplete") || flag("interrupted") || v.get("error").is_some();
            ServerEvent { delta: StreamDelta { texts, end }, audio }
        }
    }
}

/// The provider's own error event for a blocked message, if the protocol
/// has one (Gemini Live reports errors in the close frame only).
pub fn error_event(protocol: WsProtocol, reason: &str, client_event_id: Option<&str>) -> Option<String> {
    match protocol {
        WsProtocol::OpenAiResponses => Some(
            json!({
                "type": "error",
                "status": 403,
                "error": {"type": "invalid_request_error", "code": "guardrail_blocked", "message": reason, "param": null},
            })
            .to_string(),
        ),
        WsProtocol::OpenAiRealtime => Some(
            json!({
                "type": "error",
                "event_id": "event_guardrail_blocked",
                "error": {
                    "type": "invalid_request_error",
                    "code": "guardrail_blocked",
                    "message": reason,
                    "param": null,
                    "event_id": client_event_id,
                },
            })
            .to_string(),
        ),
        WsProtocol::GeminiLive => None,
    }
}

/// The texts of a Realtime conversation item at `path`; true if it carries
/// audio.
fn realtime_item(item: &Value, path: Vec<PathSeg>, texts: &mut Vec<TextSpan>) -> bool {
    let role = match item.get("role").and_then(Value::as_str) {
        Some("system") => Role::System,
        Some("assistant") => Role::Assistant,
        _ => Role::User,
    };
    let kind = if role == Role::System { TextKind::Instructions } else { TextKind::Content };
    let at = |k: &str| {
        let mut p = path.clone();
        p.push(key(k));
        p
    };
    // function_call_output / function_call.
    push(texts, item.get("output"), at("output"), Role::Tool, TextKind::ToolResult);
    push(texts, item.get("arguments"), at("arguments"), Role::Assistant, TextKind::ToolCall);
    let mut audio = false;
    if let Some(parts) = item.get("content").and_then(Value::as_array) {
        for (i, part) in parts.iter().enumerate() {
            let mut base = at("content");
            base.push(PathSeg::Index(i));
            for field in ["text", "transcript"] {
                let mut p = base.clone();
                p.push(key(field));
                push(texts, part.get(field), p, role, kind);
            }
            audio |= part.get("audio").is_some();
        }
    }
    audio
}

fn key(k: &str) -> PathSeg {
    PathSeg::Key(k.to_owned())
}

fn key_path(keys: &[&str]) -> Vec<PathSeg> {
    keys.iter().map(|k| key(k)).collect()
}

fn push(texts: &mut Vec<TextSpan>, v: Option<&Value>, path: Vec<PathSeg>, role: Role, kind: TextKind) {
    if let Some(Value::String(s)) = v
        && !s.is_empty()
    {
        texts.push(TextSpan { path, role, kind, text: s.clone() });
    }
}

fn prefixed(prefix: &str, spans: Vec<TextSpan>) -> impl Iterator<Item = TextSpan> {
    spans.into_iter().map(move |mut s| {
        s.path.insert(0, key(prefix));
        s
    })
}

/// A generic span that is audio or video bytes: a base64 string under an
/// audio field (a non-base64 one is text and checked).
fn is_media(span: &TextSpan) -> bool {
    let under_media = span.path.iter().any(|s| {
        matches!(s, PathSeg::Key(k) if matches!(k.as_str(), "audio" | "mediaChunks" | "video" | "inlineData" | "delta"))
    });
    under_media && span.text.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA\n-----END RSA PRIVATE KEY-----";

    /// The message's texts but its identifiers.
    fn texts(protocol: WsProtocol, msg: &Value) -> Vec<String> {
        client_message(protocol, msg.to_string().as_bytes())
            .texts
            .into_iter()
            .filter(|t| t.kind != TextKind::Identifier)
            .map(|t| t.text)
            .collect()
    }

    /// The message's identifiers.
    fn identifiers(protocol: WsProtocol, msg: &Value) -> Vec<String> {
        client_message(protocol, msg.to_string().as_bytes())
            .texts
            .into_iter()
            .filter(|t| t.kind == TextKind::Identifier)
            .map(|t| t.text)
            .collect()
    }

    #[test]
    fn protocols_are_known_by_host_and_path() {
        use WsProtocol::*;
        assert_eq!(WsProtocol::detect("api.openai.com", "/v1/responses"), Some(OpenAiResponses));
        assert_eq!(WsProtocol::detect("chatgpt.com", "/backend-api/codex/responses"), Some(OpenAiResponses));
        assert_eq!(WsProtocol::detect("api.openai.com", "/v1/realtime?model=gpt-realtime"), Some(OpenAiRealtime));
        assert_eq!(WsProtocol::detect("x.openai.azure.com", "/openai/realtime?api-version=1"), Some(OpenAiRealtime));
        let live = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent?key=k";
        assert_eq!(WsProtocol::detect("generativelanguage.googleapis.com", live), Some(GeminiLive));
        let alpha = "/ws/google.ai.generativelanguage.v1alpha.GenerativeService.BidiGenerateContentConstrained";
        assert_eq!(WsProtocol::detect("generativelanguage.googleapis.com", alpha), Some(GeminiLive));
        assert_eq!(WsProtocol::detect("api.openai.com", "/ws"), None);
        assert_eq!(WsProtocol::detect("api.anthropic.com", "/v1/responses/x"), None);
    }

    #[test]
    fn responses_create_texts_and_unknown_fields() {
        let msg = json!({"type": "response.create", "model": "gpt-5", "instructions": "be brief",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": KEY}]}],
            "metadata": {"note": "also prose"}});
        let m = client_message(WsProtocol::OpenAiResponses, msg.to_string().as_bytes());
        assert!(m.creates_response);
        let t: Vec<_> = m.texts.iter().filter(|t| t.kind != TextKind::Identifier).map(|t| t.text.as_str()).collect();
        assert!(t.contains(&KEY) && t.contains(&"be brief") && t.contains(&"also prose"), "{t:?}");
        assert!(!t.contains(&"response.create") && !t.contains(&"gpt-5"));
        // The event type and the model are identifiers: scanned, as such.
        let ids = identifiers(WsProtocol::OpenAiResponses, &msg);
        assert!(ids.contains(&"response.create".to_string()) && ids.contains(&"gpt-5".to_string()), "{ids:?}");
        // A string input too, and the early nested shape.
        assert!(
            texts(WsProtocol::OpenAiResponses, &json!({"type": "response.create", "input": KEY}))
                .contains(&KEY.to_string())
        );
        let nested = json!({"type": "response.create", "response": {"input": KEY}});
        let m = client_message(WsProtocol::OpenAiResponses, nested.to_string().as_bytes());
        let span = m.texts.iter().find(|t| t.text == KEY).expect("nested input");
        assert_eq!(providers::path_string(&span.path), "response.input");
    }

    #[test]
    fn realtime_events() {
        let item = json!({"type": "conversation.item.create", "event_id": "e1",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": KEY}]}});
        let m = client_message(WsProtocol::OpenAiRealtime, item.to_string().as_bytes());
        assert_eq!(m.event_id.as_deref(), Some("e1"));
        assert_eq!(providers::path_string(&m.texts[0].path), "item.content[0].text");
        assert_eq!(m.texts[0].kind, TextKind::Content);
        let session =
            json!({"type": "session.update", "session": {"type": "realtime", "instructions": "secret rules"}});
        assert_eq!(texts(WsProtocol::OpenAiRealtime, &session), ["secret rules"]);
        let create = json!({"type": "response.create", "response": {"instructions": "x",
            "input": [{"type": "function_call_output", "call_id": "c", "output": "tool said"}]}});
        assert_eq!(texts(WsProtocol::OpenAiRealtime, &create), ["x", "tool said"]);
        let audio = "UklGRiQAAABXQVZFZm10IBAAAAABAAEA".repeat(20);
        let append = json!({"type": "input_audio_buffer.append", "audio": audio});
        let m = client_message(WsProtocol::OpenAiRealtime, append.to_string().as_bytes());
        assert!(m.audio && m.texts.iter().all(|t| t.kind == TextKind::Identifier), "{:?}", m.texts);
        // Text smuggled in an audio field is text.
        let smuggled = json!({"type": "input_audio_buffer.append", "audio": KEY});
        assert!(texts(WsProtocol::OpenAiRealtime, &smuggled).contains(&KEY.to_string()));
    }

    #[test]
    fn gemini_live_messages() {
        let setup = json!({"setup": {"model": "models/gemini-2.0-flash-live-001",
            "systemInstruction": {"parts": [{"text": "sys"}]}}});
        assert_eq!(texts(WsProtocol::GeminiLive, &setup), ["sys"]);
        assert_eq!(identifiers(WsProtocol::GeminiLive, &setup), ["models/gemini-2.0-flash-live-001"]);
        let content =
            json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": KEY}]}], "turnComplete": true}});
        let m = client_message(WsProtocol::GeminiLive, content.to_string().as_bytes());
        assert_eq!(providers::path_string(&m.texts[0].path), "clientContent.turns[0].parts[0].text");
        let media = json!({"realtimeInput": {"mediaChunks": [{"mimeType": "audio/pcm", "data": "AAAA".repeat(100)}]}});
        let m = client_message(WsProtocol::GeminiLive, media.to_string().as_bytes());
        assert!(m.audio && m.texts.is_empty());
        assert_eq!(texts(WsProtocol::GeminiLive, &json!({"realtimeInput": {"text": "hi"}})), ["hi"]);
    }

    #[test]
    fn non_json_client_text_is_one_raw_span() {
        let m = client_message(WsProtocol::OpenAiRealtime, KEY.as_bytes());
        assert!(m.doc.is_none());
        assert_eq!(m.texts.len(), 1);
        assert!(m.texts[0].path.is_empty());
    }

    #[test]
    fn server_events() {
        let d = |p, v: Value| server_event(p, v.to_string().as_bytes());
        let e = d(WsProtocol::OpenAiResponses, json!({"type": "response.output_text.delta", "delta": "ab"}));
        assert_eq!(e.delta.texts, [(TextKind::Content, "ab".to_string())]);
        assert!(d(WsProtocol::OpenAiResponses, json!({"type": "response.completed"})).delta.end);
        for ty in ["response.text.delta", "response.output_text.delta", "response.output_audio_transcript.delta"] {
            let e = d(WsProtocol::OpenAiRealtime, json!({"type": ty, "delta": "x"}));
            assert_eq!(e.delta.texts.len(), 1, "{ty}");
        }
        assert!(d(WsProtocol::OpenAiRealtime, json!({"type": "response.output_audio.delta", "delta": "AAAA"})).audio);
        assert!(d(WsProtocol::OpenAiRealtime, json!({"type": "response.done"})).delta.end);
        let g = d(
            WsProtocol::GeminiLive,
            json!({"serverContent": {"modelTurn": {"parts": [{"text": "hi"}]}, "turnComplete": true}}),
        );
        assert_eq!(g.delta.texts, [(TextKind::Content, "hi".to_string())]);
        assert!(g.delta.end);
        let a = d(
            WsProtocol::GeminiLive,
            json!({"serverContent": {"modelTurn": {"parts": [{"inlineData": {"data": "AA"}}]}}}),
        );
        assert!(a.audio && a.delta.texts.is_empty());
    }

    #[test]
    fn error_events_are_the_providers_shapes() {
        let e: Value = serde_json::from_str(&error_event(WsProtocol::OpenAiResponses, "no", None).unwrap()).unwrap();
        assert_eq!(e["type"], "error");
        assert_eq!(e["error"]["code"], "guardrail_blocked");
        assert_eq!(e["error"]["type"], "invalid_request_error");
        let r: Value =
            serde_json::from_str(&error_event(WsProtocol::OpenAiRealtime, "no", Some("e1")).unwrap()).unwrap();
        assert_eq!(r["error"]["event_id"], "e1");
        assert!(error_event(WsProtocol::GeminiLive, "no", None).is_none());
    }
}
