use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::guardrails::{
    model::{Role, TextKind},
    providers::{path_string, set_text, text_at},
};

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn recognizes_mcp_by_body_headers_and_accept() {
    let none = HeaderMap::new();
    let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
    assert!(recognize(&Method::POST, &none, call));
    assert!(recognize(&Method::POST, &none, br#" [{"jsonrpc":"2.0","method":"notifications/initialized"}]"#));
    assert!(recognize(&Method::POST, &none, br#"{"jsonrpc":"2.0","id":"a","method":"ping"}"#));
    // Other JSON-RPC, LLM bodies, junk.
    assert!(!recognize(&Method::POST, &none, br#"{"jsonrpc":"2.0","id":1,"method":"eth_call"}"#));
    assert!(!recognize(
        &Method::POST,
        &none,
        br#"{"model":"gpt","messages":[{"role":"user","content":"\"jsonrpc\""}]}"#
    ));
    assert!(!recognize(&Method::POST, &none, br#"{"jsonrpc":"1.0","method":"tools/call"}"#));
    assert!(!recognize(&Method::POST, &none, b"\xff\"jsonrpc\"{"));
    assert!(!recognize(&Method::POST, &none, b""));
    // Headers.
    assert!(recognize(&Method::GET, &headers(&[("mcp-session-id", "abc")]), b""));
    assert!(recognize(&Method::POST, &headers(&[("mcp-protocol-version", "2025-06-18")]), b"{}"));
    let both = headers(&[("accept", "application/json, text/event-stream;q=0.9")]);
    assert!(recognize(&Method::POST, &both, b"{}"));
    let split = headers(&[("accept", "application/json"), ("accept", "Text/Event-Stream")]);
    assert!(recognize(&Method::POST, &split, b"{}"));
    assert!(!recognize(&Method::GET, &both, b""));
    assert!(!recognize(&Method::POST, &headers(&[("accept", "text/event-stream")]), b"{}"));
}

#[test]
fn parses_single_messages_and_batches() {
    let doc = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"add"}});
    let msgs = parse_messages(&doc).unwrap();
    assert_eq!(msgs.len(), 1);
    assert!(msgs[0].0.is_empty());
    assert_eq!(tool_name(&msgs[0].1), Some("add"));
    assert_eq!(msgs[0].1.id(), Some(&Id::Number(7.into())));

    let batch = json!([
        {"jsonrpc":"2.0","method":"notifications/initialized"},
        {"jsonrpc":"2.0","id":"s-1","result":{"content":[]}},
        {"jsonrpc":"2.0","id":3,"error":{"code":-32601,"message":"nope"}}
    ]);
    let msgs = parse_messages(&batch).unwrap();
    assert_eq!(msgs[0].0, [PathSeg::Index(0)]);
    assert!(
        matches!(&msgs[0].1, Message::Notification { method, params: None } if method == "notifications/initialized")
    );
    assert!(matches!(&msgs[1].1, Message::Response { id: Id::String(s), .. } if s == "s-1"));
    assert!(matches!(&msgs[2].1, Message::Error { id, .. } if *id == Id::Number(3.into())));
    assert_eq!(msgs[2].0, [PathSeg::Index(2)]);

    for bad in [
        json!([]),
        json!(3),
        json!({"jsonrpc":"2.0","id":1}),
        json!({"jsonrpc":"2.0","id":1,"method":5}),
        json!({"jsonrpc":"2.0","id":{},"method":"ping"}),
        json!({"jsonrpc":"2.0","id":1,"result":1,"error":{}}),
        json!([{"jsonrpc":"2.0","method":"ping","id":1}, "x"]),
    ] {
        assert!(parse_messages(&bad).is_err(), "{bad}");
    }
}

#[test]
fn a_blocked_request_is_answered_with_a_json_rpc_error() {
    let e = error_message(&Id::String("r1".into()), BLOCKED_CODE, "Blocked by guardrails: x", json!({"rule":"r"}));
    assert_eq!(
        e,
        json!({"jsonrpc":"2.0","id":"r1","error":{"code":-32001,"message":"Blocked by guardrails: x","data":{"rule":"r"}}})
    );
    let e = error_message(&Id::Number(4.into()), BLOCKED_CODE, "m", Value::Null);
    assert_eq!(e.to_string(), r#"{"jsonrpc":"2.0","id":4,"error":{"code":-32001,"message":"m"}}"#);
}

/// (path, role, kind, text) of every span.
fn spans(texts: &[crate::guardrails::model::TextSpan]) -> Vec<(String, Role, TextKind, String)> {
    texts.iter().map(|t| (path_string(&t.path), t.role, t.kind, t.text.clone())).collect()
}

#[test]
fn tool_call_arguments_are_every_string_leaf() {
    let batch = json!([{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"deploy","arguments":{
        "key":"-----BEGIN PRIVATE KEY-----","opts":{"tags":["a b"],"n":3,"type":"prod"}}}}]);
    let msgs = parse_messages(&batch).unwrap();
    let texts = request_texts(&msgs[0].1, &msgs[0].0);
    assert_eq!(
        spans(&texts),
        [
            (
                "[0].params.arguments.key".into(),
                Role::Assistant,
                TextKind::ToolCall,
                "-----BEGIN PRIVATE KEY-----".into()
            ),
            ("[0].params.arguments.opts.tags[0]".into(), Role::Assistant, TextKind::ToolCall, "a b".into()),
            ("[0].params.arguments.opts.type".into(), Role::Assistant, TextKind::ToolCall, "prod".into()),
        ]
    );
    // The paths rewrite the body in place.
    let mut doc = batch.clone();
    for t in &texts {
        assert_eq!(text_at(&doc, &t.path), Some(t.text.as_str()));
        set_text(&mut doc, &t.path, "[REDACTED]").unwrap();
    }
    assert_eq!(doc[0]["params"]["arguments"]["key"], "[REDACTED]");
    assert_eq!(doc[0]["params"]["name"], "deploy");
}

#[test]
fn sampling_requests_and_results_are_request_direction_texts() {
    let req = json!({"jsonrpc":"2.0","id":9,"method":"sampling/createMessage","params":{
    "systemPrompt":"be brief","maxTokens":10,
    "messages":[
        {"role":"user","content":{"type":"text","text":"summarize my ssn"}},
        {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{"q":"x"}}]},
        {"role":"user","content":[{"type":"tool_result","toolUseId":"t1","content":[{"type":"text","text":"out"}]},
                                  {"type":"image","data":"aGVsbG8=","mimeType":"image/png"}]}
    ]}});
    let msgs = parse_messages(&req).unwrap();
    assert_eq!(
        spans(&request_texts(&msgs[0].1, &msgs[0].0)),
        [
            ("params.systemPrompt".into(), Role::System, TextKind::Instructions, "be brief".into()),
            ("params.messages[0].content.text".into(), Role::User, TextKind::Content, "summarize my ssn".into()),
            ("params.messages[1].content[0].input.q".into(), Role::Assistant, TextKind::ToolCall, "x".into()),
            ("params.messages[2].content[0].content[0].text".into(), Role::Tool, TextKind::ToolResult, "out".into()),
        ]
    );
    let result = json!({"jsonrpc":"2.0","id":9,"result":{"role":"assistant","content":{"type":"text","text":"sure"},"model":"m"}});
    let msgs = parse_messages(&result).unwrap();
    assert_eq!(
        spans(&request_texts(&msgs[0].1, &msgs[0].0)),
        [("result.content.text".into(), Role::Assistant, TextKind::Content, "sure".into())]
    );
    let elicited =
        json!({"jsonrpc":"2.0","id":2,"result":{"action":"accept","content":{"card":"4111 1111 1111 1111"}}});
    let msgs = parse_messages(&elicited).unwrap();
    assert_eq!(spans(&request_texts(&msgs[0].1, &msgs[0].0))[0].0, "result.content.card");
}

#[test]
fn results_by_method() {
    let call = json!({"content":[
        {"type":"text","text":"card 4111111111111111"},
        {"type":"resource","resource":{"uri":"file:///a","mimeType":"text/plain","text":"file text"}},
        {"type":"resource_link","uri":"file:///b","name":"b.txt","description":"a file"},
        {"type":"image","data":"aGVsbG8=","mimeType":"image/png"}
    ],"structuredContent":{"total":"12"},"isError":false});
    let prefix = [PathSeg::Index(1)];
    assert_eq!(
        spans(&result_texts("tools/call", &call, &prefix)),
        [
            ("[1].result.content[0].text".into(), Role::Tool, TextKind::ToolResult, "card 4111111111111111".into()),
            ("[1].result.content[1].resource.text".into(), Role::Tool, TextKind::ToolResult, "file text".into()),
            ("[1].result.content[2].name".into(), Role::Tool, TextKind::ToolResult, "b.txt".into()),
            ("[1].result.content[2].description".into(), Role::Tool, TextKind::ToolResult, "a file".into()),
            ("[1].result.structuredContent.total".into(), Role::Tool, TextKind::ToolResult, "12".into()),
        ]
    );
    let read = json!({"contents":[{"uri":"file:///x","text":"secret"},{"uri":"file:///y","blob":"AAAA"}]});
    assert_eq!(
        spans(&result_texts("resources/read", &read, &[])),
        [("result.contents[0].text".into(), Role::Tool, TextKind::Resource, "secret".into())]
    );
    let prompt = json!({"description":"Review code","messages":[{"role":"user","content":{"type":"text","text":"Review this"}}]});
    assert_eq!(
        spans(&result_texts("prompts/get", &prompt, &[])),
        [
            ("result.description".into(), Role::System, TextKind::Prompt, "Review code".into()),
            ("result.messages[0].content.text".into(), Role::User, TextKind::Prompt, "Review this".into()),
        ]
    );
    let list = json!({"tools":[{"name":"add","title":"Add","description":"Adds two numbers.",
        "inputSchema":{"type":"object","properties":{"a":{"type":"number","description":"first"}},"required":["a"]},
        "annotations":{"title":"Adder","readOnlyHint":true}}]});
    assert_eq!(
        spans(&result_texts("tools/list", &list, &[])),
        [
            ("result.tools[0].name".into(), Role::System, TextKind::ToolDefinition, "add".into()),
            ("result.tools[0].title".into(), Role::System, TextKind::ToolDefinition, "Add".into()),
            ("result.tools[0].description".into(), Role::System, TextKind::ToolDefinition, "Adds two numbers.".into()),
            ("result.tools[0].annotations.title".into(), Role::System, TextKind::ToolDefinition, "Adder".into()),
            (
                "result.tools[0].inputSchema.properties.a.description".into(),
                Role::System,
                TextKind::ToolDefinition,
                "first".into()
            ),
        ]
    );
    // An unknown method (a task's result) is read by shape.
    assert_eq!(result_texts("tasks/result", &call, &[]).len(), 5);
    assert!(result_texts("ping", &json!({}), &[]).is_empty());
    assert!(result_texts("tools/call", &json!("x"), &[]).is_empty());
}

const STREAM: &[u8] = b"event: endpoint\ndata: /messages?sessionId=abc\n\n: ping\n\nretry: 3000\nid: 1\r\n\
event: message\ndata: {\"jsonrpc\":\"2.0\",\"id\":1,\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"hi\"}]}}\n\n\
id: 2\ndata:\n\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\n\
data: \"params\":{\"level\":\"info\",\"data\":\"x\"}}\n\ndata: not json\n\ndata: {\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"sampling/createMessage\",\"params\":{}}";

fn read_all(chunks: &[&[u8]]) -> (Vec<StreamItem>, Vec<u8>) {
    let mut s = McpStream::new(1 << 20);
    let mut items = Vec::new();
    for c in chunks {
        items.extend(s.feed(c).unwrap());
    }
    let end = s.finish();
    items.extend(end.item);
    (items, end.rest)
}

#[test]
fn stream_items_keep_fields_and_bytes() {
    let (items, rest) = read_all(&[STREAM]);
    assert!(rest.is_empty());
    let raw: Vec<u8> = items.iter().flat_map(|i| i.raw.clone()).collect();
    assert_eq!(raw, STREAM);
    assert_eq!(items.len(), 6);
    assert_eq!(items[0].payload, Payload::Endpoint("/messages?sessionId=abc".into()));
    assert_eq!(items[0].fields, EventFields { event: Some("endpoint".into()), id: None, retry: None });
    assert_eq!(items[1].fields, EventFields { event: Some("message".into()), id: Some("1".into()), retry: Some(3000) });
    let Payload::Messages { doc, messages } = &items[1].payload else { panic!("{:?}", items[1].payload) };
    assert_eq!(messages.len(), 1);
    assert_eq!(result_texts("tools/call", &doc["result"], &messages[0].0)[0].text, "hi");
    assert_eq!(items[2].payload, Payload::Empty);
    assert_eq!(items[2].fields.id.as_deref(), Some("2"));
    assert!(
        matches!(&items[3].payload, Payload::Messages { messages, .. } if messages[0].1.method() == Some("notifications/message"))
    );
    // The persisted id is not repeated on events that did not set it.
    assert_eq!(items[3].fields.id, None);
    assert_eq!(items[4].payload, Payload::Unrecognized);
    assert!(
        matches!(&items[5].payload, Payload::Messages { messages, .. } if messages[0].1.method() == Some("sampling/createMessage"))
    );

    // A rewritten event keeps its fields and parses back to the new data.
    let Payload::Messages { doc, .. } = &items[1].payload else { unreachable!() };
    let mut doc = doc.clone();
    set_text(
        &mut doc,
        &[
            PathSeg::Key("result".into()),
            PathSeg::Key("content".into()),
            PathSeg::Index(0),
            PathSeg::Key("text".into()),
        ],
        "[REDACTED]",
    )
    .unwrap();
    let bytes = items[1].encode_doc(&doc);
    assert!(bytes.starts_with(b"retry: 3000\nid: 1\nevent: message\ndata: {"));
    let (again, _) = read_all(&[&bytes]);
    assert_eq!(again[0].fields, items[1].fields);
    assert!(again[0].data.contains("[REDACTED]"));
}

#[test]
fn trailing_bytes_without_an_event_are_handed_back() {
    let mut s = McpStream::new(1 << 20);
    assert!(s.feed(b": comment\n\nretry: 10\n").unwrap().is_empty());
    assert_eq!(s.buffered_len(), 21);
    let end = s.finish();
    assert_eq!(end.item, None);
    assert_eq!(end.rest, b": comment\n\nretry: 10\n");
}

#[test]
fn an_oversized_event_fails_the_stream() {
    let mut s = McpStream::new(16);
    assert!(s.feed(b"data: 0123456789abcdef\n\n").is_err());
    assert!(s.feed(b"data: x\n\n").is_err());
}

proptest! {
    #[test]
    fn any_chunking_gives_the_same_items(cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..16)) {
        let whole = read_all(&[STREAM]);
        let mut points: Vec<usize> = cuts.iter().map(|c| c.index(STREAM.len() + 1)).collect();
        points.sort_unstable();
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut prev = 0;
        for p in points {
            chunks.push(&STREAM[prev..p]);
            prev = p;
        }
        chunks.push(&STREAM[prev..]);
        prop_assert_eq!(read_all(&chunks), whole);
    }

    #[test]
    fn arbitrary_json_never_panics(s in "[\\[\\]{}\",:a-z0-9 /\\\\]{0,200}") {
        if let Ok(doc) = serde_json::from_str::<Value>(&s)
            && let Ok(msgs) = parse_messages(&doc)
        {
            for (prefix, m) in &msgs {
                let _ = request_texts(m, prefix);
                let _ = tool_name(m);
                if let Message::Response { result, .. } = m {
                    for method in ["tools/call", "resources/read", "prompts/get", "tools/list", "initialize", "x"] {
                        let _ = result_texts(method, result, prefix);
                    }
                }
            }
        }
        let _ = recognize(&Method::POST, &HeaderMap::new(), s.as_bytes());
    }
}
