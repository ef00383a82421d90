//! MCP recognition, message parsing and text finding on any body: never a
//! panic, and every text found is at its path.
#![no_main]

use http::{HeaderMap, Method};
use interceptor::guardrails::{
    mcp::{self, Message},
    providers::text_at,
};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 8] = [
    "tools/call",
    "tools/list",
    "resources/read",
    "prompts/get",
    "initialize",
    "sampling/createMessage",
    "elicitation/create",
    "",
];

fuzz_target!(|data: &[u8]| {
    let _ = mcp::recognize(&Method::POST, &HeaderMap::new(), data);
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let _ = mcp::tools::definitions(&doc);
    let Ok(messages) = mcp::parse_messages(&doc) else { return };
    for (prefix, m) in &messages {
        let _ = mcp::tool_name(m);
        let mut texts = mcp::request_texts(m, prefix);
        if let Message::Response { result, .. } = m {
            for method in METHODS {
                texts.extend(mcp::result_texts(method, result, prefix));
            }
        }
        for t in &texts {
            assert_eq!(text_at(&doc, &t.path), Some(t.text.as_str()), "a text is not at its path");
        }
        if let Some(id) = m.id() {
            let _ = mcp::error_message(id, mcp::BLOCKED_CODE, "blocked", serde_json::Value::Null);
        }
    }
});
