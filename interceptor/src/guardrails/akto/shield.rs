//! MCP exchanges in the form of Akto's MCP endpoint shield: what an MCP
//! check sends to `/api/http-proxy`, and how a `ModifiedPayload` goes back
//! into the JSON-RPC body. Pure: no I/O.
//!
//! Akto's shield and its client hooks (public code:
//! `akto-api-security/akto`, `apps/mcp-endpoint-shield/`) describe a tool
//! call as a mirrored HTTP exchange that Akto's runtime classifies as MCP:
//! path `/mcp` (its `JsonRpcUtils.isMcpPath` wants `mcp`, `sse` or
//! `message` in it, and the guardrail service's tool-call anomaly checks a
//! `/mcp` prefix), method `POST`, the JSON-RPC `tools/call` request as
//! `requestPayload` and its JSON-RPC result as `responsePayload`, a `host`
//! of `<device>.<client>.<server>` (the guardrail service takes the MCP
//! server's name from `host` and filters policies by its last segments and
//! its device label by the first), `x-mcp-server`, the tag
//! `{"mcp-server": "MCP Server", "mcp-client": <client>}` and
//! `contextSource` `ENDPOINT`. `docs/mcp-akto.md` has the field-by-field
//! mapping and what the public code does not show.
//!
//! Here the real exchange is known, so the JSON-RPC messages are the ones
//! on the wire (the shield rebuilds them from a hook's tool name and
//! input), the device is the app name, the client the process that made
//! the call, and the server the MCP server's host name.

use serde_json::{Map, Value, json};

use super::{AktoError, wire::normalize_app_name};
use crate::workload::Workload;

/// The path Akto's shield mirrors every MCP exchange on.
pub const MCP_PATH: &str = "/mcp";
/// The tag key (and value) Akto marks MCP traffic with (`Constants.AKTO_MCP_SERVER_TAG`).
pub const MCP_SERVER_TAG: (&str, &str) = ("mcp-server", "MCP Server");
/// The tag key naming the MCP client (`Constants.AKTO_MCP_CLIENT_TAG`).
pub const MCP_CLIENT_TAG: &str = "mcp-client";
/// The request header the shield names the MCP server in.
pub const MCP_SERVER_HEADER: &str = "x-mcp-server";
/// The client's name when the process is not known.
pub const UNKNOWN_CLIENT: &str = "interceptor";
/// The `ModifiedPayload` and `responsePayload` of the shield's blocked-call
/// report name the blocker so.
pub const BLOCKED_BY: &str = "Akto Proxy";

/// An MCP call, as the shield form names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct McpCall {
    /// The MCP server's host name (the SNI, or the plain server's host).
    pub server: String,
    /// The MCP client: the process that made the call (`comm`), or
    /// [`UNKNOWN_CLIENT`].
    pub client: String,
    /// The request's JSON-RPC method (of the first message of a batch).
    pub method: Option<String>,
    /// `params.name` of a `tools/call`.
    pub tool: Option<String>,
}

impl McpCall {
    /// Describes an MCP call to `server` made by `workload`; `request` is
    /// the client's JSON-RPC body, when it is JSON.
    pub fn new(server: &str, workload: Option<&Workload>, request: Option<&Value>) -> Self {
        let client = workload.map(|w| w.comm.trim()).filter(|c| !c.is_empty()).unwrap_or(UNKNOWN_CLIENT);
        let first = match request {
            Some(Value::Array(batch)) => batch.first(),
            other => other,
        };
        let method = first.and_then(|m| m.get("method")).and_then(Value::as_str).map(str::to_owned);
        let tool = match method.as_deref() {
            Some("tools/call") => {
                first.and_then(|m| m.pointer("/params/name")).and_then(Value::as_str).map(str::to_owned)
            }
            _ => None,
        };
        Self { server: server.to_owned(), client: client.to_owned(), method, tool }
    }

    /// `host`: `<device>.<client>.<server>`, each part normalized as Akto
    /// normalizes a host (lower case, characters outside `[a-z0-9.:-]` as
    /// `-`), the dots of the device and client made `-` so that Akto's
    /// first segment is the device and its last ones the server. `device`
    /// is the rendered app name; empty: [`UNKNOWN_CLIENT`].
    pub fn host(&self, device: &str) -> String {
        let label = |s: &str| normalize_app_name(s).replace('.', "-");
        let device = Some(label(device)).filter(|d| !d.is_empty()).unwrap_or_else(|| UNKNOWN_CLIENT.to_owned());
        let client = Some(label(&self.client)).filter(|c| !c.is_empty()).unwrap_or_else(|| UNKNOWN_CLIENT.to_owned());
        let server = normalize_app_name(&self.server);
        if server.is_empty() { format!("{device}.{client}") } else { format!("{device}.{client}.{server}") }
    }

    /// `tag`: the shield's MCP tag, with `source` (the context source) as
    /// its atlas mode and Akto's other MCP connectors add it.
    pub fn tag(&self, context_source: &str) -> Map<String, Value> {
        let mut tag = Map::new();
        tag.insert(MCP_SERVER_TAG.0.into(), MCP_SERVER_TAG.1.into());
        tag.insert(MCP_CLIENT_TAG.into(), normalize_app_name(&self.client).into());
        tag.insert("source".into(), context_source.into());
        tag
    }

    /// Extra `metadata` keys: the server, method and tool.
    pub fn annotations(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("mcp_server", self.server.clone())];
        out.extend(self.method.clone().map(|m| ("mcp_method", m)));
        out.extend(self.tool.clone().map(|t| ("mcp_tool", t)));
        out
    }
}

/// `path`: the server's own path when it already starts with `/mcp` (as
/// most do), else [`MCP_PATH`], so that Akto classifies the exchange as
/// MCP whatever the server's path (the real one is in `metadata`).
pub fn path(real: &str) -> String {
    if real.starts_with(MCP_PATH) { super::wire::redact_path(real) } else { MCP_PATH.to_owned() }
}

/// `requestPayload` of a request check: the client's JSON-RPC body as it
/// goes upstream (`doc` when parsed, else `body`). A batch goes whole (see
/// `docs/mcp-akto.md`). Never empty (Akto answers 422 to an empty one).
pub fn request_payload(doc: Option<&Value>, body: &[u8]) -> Result<String, AktoError> {
    match doc {
        Some(doc) => serde_json::to_string(doc).map_err(AktoError::Encode),
        None => Ok(text_or_empty_object(body)),
    }
}

/// `requestPayload` of a response check: the request the response answers.
/// From a batch, the message with the response's `id`; a GET stream has
/// no request body: `{}`.
pub fn answered_request(request_body: &[u8], response: Option<&Value>) -> Result<String, AktoError> {
    let Ok(request) = serde_json::from_slice::<Value>(request_body) else {
        return Ok(text_or_empty_object(request_body));
    };
    let id = response.and_then(|r| r.get("id"));
    let chosen = match (&request, id) {
        (Value::Array(batch), Some(id)) => batch.iter().find(|m| m.get("id") == Some(id)).unwrap_or(&request),
        _ => &request,
    };
    serde_json::to_string(chosen).map_err(AktoError::Encode)
}

/// `responsePayload` of a response check: the JSON-RPC answer (`doc` when
/// parsed, else the body as text, e.g. an event stream Akto's runtime
/// parses itself).
pub fn response_payload(doc: Option<&Value>, body: &[u8]) -> Result<String, AktoError> {
    match doc {
        Some(doc) => serde_json::to_string(doc).map_err(AktoError::Encode),
        None => Ok(String::from_utf8_lossy(body).into_owned()),
    }
}

/// `responsePayload` of a stream window: a `tools/call` result holding the
/// window's text, answering `id` (the request's, else `1` as the shield's
/// hooks number theirs).
pub fn stream_payload(text: &str, id: Option<&Value>) -> Result<String, AktoError> {
    let id = id.cloned().unwrap_or_else(|| json!(1));
    let result = json!({"jsonrpc": "2.0", "id": id, "result": {"content": [{"type": "text", "text": text}]}});
    serde_json::to_string(&result).map_err(AktoError::Encode)
}

/// The `id` of a single JSON-RPC request body.
pub fn request_id(request_body: &[u8]) -> Option<Value> {
    let request: Value = serde_json::from_slice(request_body).ok()?;
    request.get("id").cloned()
}

/// `responseHeaders` and `responsePayload` of the shield's report of a
/// blocked call (status 403).
pub fn blocked_response(reason: &str) -> Result<(Vec<(String, String)>, String), AktoError> {
    let headers = vec![
        ("content-type".to_owned(), "application/json".to_owned()),
        ("x-blocked-by".to_owned(), BLOCKED_BY.to_owned()),
    ];
    let reason = if reason.is_empty() { "Policy violation" } else { reason };
    let body = json!({"body": {"x-blocked-by": BLOCKED_BY, "reason": reason}});
    Ok((headers, serde_json::to_string(&body).map_err(AktoError::Encode)?))
}

/// Writes a `ModifiedPayload` (the JSON-RPC body Akto was sent, redacted)
/// back into `original`, message by message: a `tools/call` takes the new
/// `params.arguments` (what the shield's hooks take), another request its
/// `params`, a response its `result`. `id`, `method` and `jsonrpc` stay the
/// client's. Anything else does not fit, and the fail mode decides.
pub fn merge_modified_payload(original: &Value, modified: &str) -> Result<Value, AktoError> {
    let modified: Value = serde_json::from_str(modified)
        .map_err(|e| AktoError::ModifiedPayload { reason: "not JSON", source: Some(e) })?;
    match (original, &modified) {
        (Value::Array(messages), Value::Array(changed)) if messages.len() == changed.len() => {
            messages.iter().zip(changed).map(|(m, c)| merge_message(m, c)).collect::<Result<_, _>>().map(Value::Array)
        }
        (Value::Object(_), Value::Object(_)) => merge_message(original, &modified),
        _ => Err(unfit("it does not have the shape of the JSON-RPC body")),
    }
}

fn merge_message(original: &Value, modified: &Value) -> Result<Value, AktoError> {
    let mut out = original.clone();
    let obj = out.as_object_mut().ok_or_else(|| unfit("a message is not an object"))?;
    let is_tool_call = original.get("method").and_then(Value::as_str) == Some("tools/call");
    if obj.contains_key("params") {
        let params = modified.get("params").filter(|p| p.is_object()).ok_or_else(|| unfit("no params"))?;
        if is_tool_call {
            let arguments = params.get("arguments").ok_or_else(|| unfit("no params.arguments"))?;
            match obj.get_mut("params").and_then(Value::as_object_mut) {
                Some(p) => {
                    p.insert("arguments".into(), arguments.clone());
                }
                None => return Err(unfit("the call's params are not an object")),
            }
        } else {
            obj.insert("params".into(), params.clone());
        }
        return Ok(out);
    }
    if obj.contains_key("result") {
        let result = modified.get("result").ok_or_else(|| unfit("no result"))?;
        obj.insert("result".into(), result.clone());
        return Ok(out);
    }
    // A notification without params, an error: nothing Akto could redact.
    if modified == original { Ok(out) } else { Err(unfit("the message has neither params nor result")) }
}

fn unfit(reason: &'static str) -> AktoError {
    AktoError::ModifiedPayload { reason, source: None }
}

fn text_or_empty_object(body: &[u8]) -> String {
    if body.iter().all(u8::is_ascii_whitespace) { "{}".to_owned() } else { String::from_utf8_lossy(body).into_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Akto's runtime and guardrail service check to treat an
    /// exchange as an MCP tool call, from its public code:
    /// `JsonRpcUtils.isMcpPath` (the path holds `mcp`, `sse` or `message`),
    /// `JsonRpcUtils.isJsonRpcRequest` (the payload holds `jsonrpc`),
    /// `McpRequestResponseUtils.isMcpRequest` (its `method` is an MCP
    /// method), `McpCollectionResolver.isMcpTag` (the tag has the
    /// `mcp-server` key) and the guardrail service's `isToolCallPath`
    /// (`/mcp` prefix).
    fn akto_sees_an_mcp_tool_call(path: &str, request_payload: &str, tag: &str) -> bool {
        let mcp_path = ["mcp", "sse", "message"].iter().any(|p| path.contains(p));
        let request: Value = serde_json::from_str(request_payload).unwrap_or(Value::Null);
        let mcp_method = request_payload.contains("jsonrpc")
            && request.get("method").and_then(Value::as_str).is_some_and(|m| m.contains('/') || m == "initialize");
        let tag: Value = serde_json::from_str(tag).unwrap_or(Value::Null);
        let mcp_tag = tag.get(MCP_SERVER_TAG.0).is_some();
        mcp_path && mcp_method && mcp_tag && path.starts_with("/mcp")
    }

    fn tool_call() -> Value {
        json!({
            "jsonrpc": "2.0",
            "id": 7,
            "method": "tools/call",
            "params": {"name": "read_file", "arguments": {"path": "/home/u/.ssh/id_rsa", "lines": 3}}
        })
    }

    fn workload(comm: &str) -> Workload {
        Workload { pid: 1, comm: comm.into(), ..Default::default() }
    }

    #[test]
    fn a_tools_call_is_described_like_the_shield_describes_it() {
        let call = McpCall::new("mcp.example.test", Some(&workload("claude")), Some(&tool_call()));
        assert_eq!(call.method.as_deref(), Some("tools/call"));
        assert_eq!(call.tool.as_deref(), Some("read_file"));
        assert_eq!(call.client, "claude");
        // The shield's host is `<device>.<client>.<server>`.
        assert_eq!(call.host("My Agent_1"), "my-agent-1.claude.mcp.example.test");
        // Akto takes the device from the first dot-separated segment and the
        // server from the last ones: dots stay out of the first two.
        assert_eq!(call.host("svc.ns"), "svc-ns.claude.mcp.example.test");
        assert_eq!(call.host(""), "interceptor.claude.mcp.example.test");

        let tag = serde_json::to_string(&call.tag("ENDPOINT")).unwrap();
        let tag: Value = serde_json::from_str(&tag).unwrap();
        assert_eq!(tag, json!({"mcp-server": "MCP Server", "mcp-client": "claude", "source": "ENDPOINT"}));

        let unknown =
            McpCall::new("localhost", None, Some(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})));
        assert_eq!(unknown.client, "interceptor");
        assert_eq!(unknown.method.as_deref(), Some("tools/list"));
        assert_eq!(unknown.tool, None);
        let batch = json!([tool_call(), {"jsonrpc": "2.0", "method": "notifications/progress"}]);
        assert_eq!(McpCall::new("s", None, Some(&batch)).tool.as_deref(), Some("read_file"));
        assert_eq!(McpCall::new("s", None, None).method, None);
    }

    #[test]
    fn akto_classifies_the_exchange_as_mcp_whatever_the_servers_path() {
        let payload = request_payload(Some(&tool_call()), b"").unwrap();
        let tag = serde_json::to_string(&McpCall::new("h", None, None).tag("ENDPOINT")).unwrap();
        for real in ["/mcp", "/mcp/", "/", "/v1/tools", "/sse", "/messages?sessionId=abc"] {
            let sent = path(real);
            assert!(akto_sees_an_mcp_tool_call(&sent, &payload, &tag), "{real} -> {sent}");
        }
        assert_eq!(path("/mcp?session=1"), "/mcp?session=1");
        assert_eq!(path("/mcp?api_key=s3cr3t"), "/mcp?api_key=REDACTED");
        assert_eq!(path("/api/mcp"), "/mcp");
        // An LLM-form tag is not MCP to Akto.
        assert!(!akto_sees_an_mcp_tool_call("/mcp", &payload, super::super::wire::AGENTIC_TAG));
    }

    #[test]
    fn payloads_are_the_json_rpc_messages() {
        // The request check sends the JSON-RPC request as the shield's hooks
        // build it: jsonrpc, method, params {name, arguments}, id.
        let sent: Value = serde_json::from_str(&request_payload(Some(&tool_call()), b"").unwrap()).unwrap();
        assert_eq!(sent, tool_call());
        let raw = serde_json::to_vec(&tool_call()).unwrap();
        assert_eq!(request_payload(None, &raw).unwrap().as_bytes(), raw.as_slice());
        assert_eq!(request_payload(None, b"").unwrap(), "{}");

        // The response check sends the request it answers...
        let answer = json!({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "k"}]}});
        let request: Value = serde_json::from_str(&answered_request(&raw, Some(&answer)).unwrap()).unwrap();
        assert_eq!(request, tool_call());
        // ... picked by id from a batch...
        let batch = serde_json::to_vec(&json!([{"jsonrpc": "2.0", "id": 6, "method": "ping"}, tool_call()])).unwrap();
        let request: Value = serde_json::from_str(&answered_request(&batch, Some(&answer)).unwrap()).unwrap();
        assert_eq!(request, tool_call());
        // ... and never nothing (Akto answers 422): a GET stream has no body.
        assert_eq!(answered_request(b"", Some(&answer)).unwrap(), "{}");
        let sent: Value = serde_json::from_str(&response_payload(Some(&answer), b"").unwrap()).unwrap();
        assert_eq!(sent, answer);
        assert_eq!(response_payload(None, b"event: message\ndata: {}\n\n").unwrap(), "event: message\ndata: {}\n\n");

        // A stream window goes as the shield sends a tool result:
        // {"jsonrpc": "2.0", "id": <id>, "result": <result>}.
        let window: Value = serde_json::from_str(&stream_payload("part", request_id(&raw).as_ref()).unwrap()).unwrap();
        assert_eq!(
            window,
            json!({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "part"}]}})
        );
        let window: Value = serde_json::from_str(&stream_payload("part", None).unwrap()).unwrap();
        assert_eq!(window["id"], 1);
    }

    #[test]
    fn a_blocked_call_is_reported_as_the_shield_reports_it() {
        let (headers, body) = blocked_response("private key").unwrap();
        assert!(headers.contains(&("x-blocked-by".to_owned(), "Akto Proxy".to_owned())));
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body, json!({"body": {"x-blocked-by": "Akto Proxy", "reason": "private key"}}));
        let (_, body) = blocked_response("").unwrap();
        assert!(body.contains("Policy violation"), "{body}");
    }

    #[test]
    fn modified_arguments_go_back_into_the_tool_call() {
        // Akto answers the request it was sent with the text redacted; the
        // shield's hooks take params.arguments from it.
        let mut redacted = tool_call();
        redacted["params"]["arguments"]["path"] = json!("[REDACTED]");
        redacted["params"]["name"] = json!("renamed");
        redacted["id"] = json!(1);
        let merged = merge_modified_payload(&tool_call(), &redacted.to_string()).unwrap();
        let mut expected = tool_call();
        expected["params"]["arguments"]["path"] = json!("[REDACTED]");
        assert_eq!(merged, expected, "only the arguments change; id, method and tool stay the client's");

        // Another request takes its params; a response its result.
        let sampling = json!({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage",
            "params": {"messages": [{"role": "user", "content": {"type": "text", "text": "card 4111"}}]}});
        let mut changed = sampling.clone();
        changed["params"]["messages"][0]["content"]["text"] = json!("card [X]");
        assert_eq!(merge_modified_payload(&sampling, &changed.to_string()).unwrap(), changed);
        let answer = json!({"jsonrpc": "2.0", "id": 7, "result": {"content": [{"type": "text", "text": "4111"}]}});
        let mut changed = answer.clone();
        changed["result"]["content"][0]["text"] = json!("[X]");
        changed["id"] = json!(99);
        let mut expected = answer.clone();
        expected["result"]["content"][0]["text"] = json!("[X]");
        assert_eq!(merge_modified_payload(&answer, &changed.to_string()).unwrap(), expected);

        // A batch, message by message.
        let batch = json!([tool_call(), answer.clone()]);
        let changed = json!([redacted, {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}]);
        let merged = merge_modified_payload(&batch, &changed.to_string()).unwrap();
        assert_eq!(merged[0]["params"]["arguments"]["path"], "[REDACTED]");
        assert_eq!(merged[1]["result"], json!({"content": []}));
    }

    #[test]
    fn a_modified_payload_that_does_not_fit_is_refused() {
        let call = tool_call();
        for bad in [
            "[REDACTED]",
            r#"{"messages": []}"#,
            r#"{"body": {"path": "x"}}"#,
            r#"{"params": {"name": "read_file"}}"#,
            r#"[{"params": {"arguments": {}}}]"#,
            "42",
        ] {
            assert!(matches!(merge_modified_payload(&call, bad), Err(AktoError::ModifiedPayload { .. })), "{bad}");
        }
        let answer = json!({"jsonrpc": "2.0", "id": 7, "result": {}});
        assert!(merge_modified_payload(&answer, r#"{"params": {}}"#).is_err());
        let note = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        assert_eq!(merge_modified_payload(&note, &note.to_string()).unwrap(), note);
        assert!(merge_modified_payload(&note, r#"{"jsonrpc": "2.0", "method": "x"}"#).is_err());
    }
}
