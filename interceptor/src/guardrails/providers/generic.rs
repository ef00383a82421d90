//! Unknown JSON bodies: every string leaf is a text, except binary data.
//! Fields that are obviously identifiers or enums are texts of their own
//! kind ([`TextKind::Identifier`]): a policy can leave them to the
//! credential rules, but nothing the receiver reads goes unscanned.

use serde_json::Value;

use super::{Collector, looks_base64};
use crate::guardrails::model::{Role, StreamDelta, TextKind};

/// Keys whose string values are never prose: identifiers and enums.
const IDENTIFIER_KEYS: &[&str] = &[
    "model",
    "id",
    "type",
    "role",
    "object",
    "created",
    "system_fingerprint",
    "finish_reason",
    "stop_reason",
    "finishReason",
    "stopReason",
    "call_id",
    "tool_call_id",
    "tool_use_id",
    "toolUseId",
    "response_id",
    "previous_response_id",
    "conversation_id",
    "parent_message_id",
    "mime_type",
    "mimeType",
    "media_type",
    "encrypted_content",
    "signature",
    "status",
    "service_tier",
];

/// Whether `key` names an identifier or an enum ([`IDENTIFIER_KEYS`]).
pub(super) fn is_identifier_key(key: &str) -> bool {
    IDENTIFIER_KEYS.contains(&key)
}

/// Whether the generic walk skips `key` (holding `v`): inline image or
/// audio bytes (`data`, `b64_json`, `bytes`).
pub(super) fn skip_key(key: &str, v: &Value) -> bool {
    let Value::String(s) = v else { return false };
    match key {
        "data" | "b64_json" | "bytes" => s.len() >= 16 && !s.contains(' ') && looks_base64(s),
        _ => false,
    }
}

pub(super) fn texts(doc: &Value, c: &mut Collector) {
    let mut path = Vec::new();
    c.walk(doc, &mut path, Role::Unknown, TextKind::Other, true);
}

/// A JSON stream event of an unknown format.
pub(super) fn chunk(v: &Value) -> StreamDelta {
    let mut c = Collector::default();
    texts(v, &mut c);
    StreamDelta { texts: c.texts.into_iter().map(|s| (s.kind, s.text)).collect(), end: false }
}

/// A stream event whose data is not JSON: the data itself is the text.
pub(super) fn raw_text(data: &str) -> StreamDelta {
    let texts = if data.is_empty() { Vec::new() } else { vec![(TextKind::Other, data.to_owned())] };
    StreamDelta { texts, end: false }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{Expect, check_request};
    use crate::guardrails::model::{Provider, Role::*, TextKind::*};

    #[test]
    fn every_prose_leaf() {
        let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
        let body = format!(
            r#"{{"model":"x-1","id":"abc","stream":true,"query":"find my ssn","options":{{"lang":"en","tags":["a b","c"]}},
            "image":{{"data":"{png}","mime_type":"image/png"}},"image_url":{{"url":"data:image/png;base64,{png}"}},"n":3}}"#
        );
        check_request(
            Provider::Generic,
            &body,
            Some("x-1"),
            true,
            // Document order: objects keep their key order (serde_json's
            // `preserve_order`), so a rewritten body is byte-for-byte faithful.
            &[
                Expect("model", Unknown, Identifier, "x-1"),
                Expect("id", Unknown, Identifier, "abc"),
                Expect("query", Unknown, Other, "find my ssn"),
                Expect("options.lang", Unknown, Other, "en"),
                Expect("options.tags[0]", Unknown, Other, "a b"),
                Expect("options.tags[1]", Unknown, Other, "c"),
                Expect("image.mime_type", Unknown, Identifier, "image/png"),
            ],
        );
    }
}
