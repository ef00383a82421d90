//! Akto's wire format: the flat JSON body where every value is a string or
//! null (with the addon's `tag` and our `metadata`), the tolerant reading of
//! the verdict, and the merge of a `ModifiedPayload` back into the provider
//! body. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::shield;
use super::{AktoConfig, AktoError, CheckKind, shield::McpCall};
use crate::{app_name::AppName, guardrails::model::Direction, workload::Workload};

/// `tag` (and the base of `metadata`), byte for byte what the addon sends
/// (Python's `json.dumps` spacing).
pub(super) const AGENTIC_TAG: &str = r#"{"gen-ai": "Gen AI", "source": "AGENTIC"}"#;
/// `contextSource` of LLM traffic, as the addon sends it.
const AGENTIC: &str = "AGENTIC";
/// How much of an error reply is kept in [`AktoError::Status`].
pub(super) const MAX_ERROR_BODY: usize = 512;

/// One intercepted call, as the Akto body describes it. The same
/// `request_id` goes on the request and the response checks.
#[derive(Clone, Default)]
pub struct CallInfo {
    pub request_id: String,
    pub method: String,
    /// Path and query. Secret query parameters are redacted here again.
    pub path: String,
    /// The path as this proxy's own logs name it (see `Call::recorded_path`).
    pub recorded_path: String,
    /// The real upstream host (sent in `metadata`; `host` is the app name).
    pub host: String,
    /// Request headers; credentials are dropped here again.
    pub request_headers: Vec<(String, String)>,
    /// The request body as the provider received it (after any
    /// modification): response and stream-batch checks resend it as
    /// `requestPayload`, as the addon does (the server answers 422 to an
    /// empty one).
    pub request_body: Bytes,
    /// Unknown addresses are sent as `127.0.0.1`, as the addon does.
    pub client_ip: Option<IpAddr>,
    pub dest_ip: Option<IpAddr>,
    pub workload: Option<Workload>,
    /// An MCP call: the body takes the form of Akto's MCP endpoint shield
    /// (see `shield`).
    pub mcp: Option<McpCall>,
}

impl fmt::Debug for CallInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.request_headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("CallInfo")
            .field("request_id", &self.request_id)
            .field("method", &self.method)
            .field("host", &self.host)
            .field("path", &self.recorded_path)
            .field("request_headers", &header_names)
            .field("request_body_len", &self.request_body.len())
            .field("client_ip", &self.client_ip)
            .field("dest_ip", &self.dest_ip)
            .field("workload", &self.workload)
            .field("mcp", &self.mcp)
            .finish()
    }
}

/// What Akto said about one check.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RemoteVerdict {
    /// `Allowed` (missing counts as allowed).
    pub allowed: bool,
    /// Whether the proxy must block: `behaviour: block`, or `Allowed: false`
    /// when [`AktoConfig::block_on_disallowed`] is set.
    pub block: bool,
    /// `ModifiedPayload` when `Modified` is true; see [`merge_modified_payload`].
    pub modified_payload: Option<String>,
    pub reason: Option<String>,
    pub policy: Option<String>,
    pub rule: Option<String>,
    pub severity: Option<String>,
    /// Lower-cased `behaviour` (`block`, `alert`, `warn`, `mask`, ...).
    pub behaviour: Option<String>,
    /// The guardrail service failed and answered "allowed" on its own.
    pub fail_open: bool,
    /// The service's `error`, if any.
    pub error: Option<String>,
}

impl RemoteVerdict {
    /// Akto's guardrail service did not judge: it answered "allowed" on its
    /// own after failing (`failOpen`, e.g. its 3 s timeout), or reported an
    /// `error`. A block still stands.
    pub fn unjudged(&self) -> bool {
        !self.block && (self.fail_open || self.error.is_some())
    }

    /// One word for logs: `block`, `fail_open`, `error`, `modify`, `alert`
    /// or `allow`.
    pub fn decision(&self) -> &'static str {
        if self.block {
            "block"
        } else if self.fail_open {
            "fail_open"
        } else if self.error.is_some() {
            "error"
        } else if self.modified_payload.is_some() {
            "modify"
        } else if !self.allowed {
            "alert"
        } else {
            "allow"
        }
    }
}

/// What the client stamps on every body, from its configuration.
pub(super) struct Stamp<'a> {
    pub cfg: &'a AktoConfig,
    /// The app name template for the `host` request header.
    pub app_name: &'a AppName,
}

impl Stamp<'_> {
    /// The flat Akto body; every value a string or null. `request_payload`
    /// is the `requestPayload` string ([`request_payload`]).
    pub(super) fn body(
        &self,
        call: &CallInfo,
        request_payload: String,
        response_status: Option<u16>,
        response_headers: &[(String, String)],
        mut response_payload: String,
        annotations: &[(&str, &str)],
    ) -> Result<Vec<u8>, AktoError> {
        let status = response_status.unwrap_or(200).to_string();
        let response_headers = match response_status {
            None => "{}".to_owned(),
            Some(_) => headers_json(response_headers, BTreeMap::new())?,
        };
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let ip = |addr: Option<IpAddr>| addr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)).to_canonical().to_string();
        // The LLM form is the addon's; an MCP call takes the shield's.
        let (path, method, http_type, tag, context_source) = match &call.mcp {
            None => (redact_path(&call.path), call.method.clone(), None, AGENTIC_TAG.to_owned(), AGENTIC),
            Some(mcp) => {
                // The shield sends an empty JSON object before there is an answer.
                if response_payload.is_empty() {
                    response_payload = "{}".to_owned();
                }
                let source = self.cfg.mcp_context_source.as_str();
                let tag = serde_json::to_string(&mcp.tag(source)).map_err(AktoError::Encode)?;
                (shield::path(&call.path), "POST".to_owned(), Some("HTTP/1.1"), tag, source)
            }
        };
        let body = json!({
            "path": path,
            "method": method,
            "requestHeaders": self.request_headers_json(call)?,
            "responseHeaders": response_headers,
            "requestPayload": request_payload,
            "responsePayload": response_payload,
            "ip": ip(call.client_ip),
            "destIp": ip(call.dest_ip),
            "time": time_ms.to_string(),
            "statusCode": status,
            "type": http_type,
            "status": status,
            "akto_account_id": self.cfg.account_id,
            "akto_vxlan_id": self.cfg.vxlan_id,
            "is_pending": "false",
            "source": "MIRRORING",
            "direction": null,
            "process_id": call.workload.as_ref().map(|w| w.pid.to_string()),
            "socket_id": null,
            "daemonset_id": self.cfg.daemonset_id.as_deref().filter(|d| !d.is_empty()),
            "enabled_graph": null,
            "tag": tag,
            "metadata": metadata_json(call, annotations, &self.cfg.mcp_context_source)?,
            "contextSource": context_source,
        });
        serde_json::to_vec(&body).map_err(AktoError::Encode)
    }

    /// `requestHeaders`: the call's headers minus credentials, `host` set to
    /// the app name (an MCP call: the shield's `<app>.<client>.<server>` and
    /// `x-mcp-server`), the request id, and a content type.
    fn request_headers_json(&self, call: &CallInfo) -> Result<String, AktoError> {
        let mut fixed = BTreeMap::new();
        let app = normalize_app_name(&self.app_name.render(call.workload.as_ref()));
        let host = match &call.mcp {
            Some(mcp) => {
                fixed.insert(shield::MCP_SERVER_HEADER.to_owned(), mcp.server.clone());
                mcp.host(&app)
            }
            None => Some(app).filter(|h| !h.is_empty()).unwrap_or_else(|| normalize_app_name(&call.host)),
        };
        if !host.is_empty() {
            fixed.insert("host".to_owned(), host);
        }
        if !call.request_id.is_empty() {
            fixed.insert("x-request-id".to_owned(), call.request_id.clone());
        }
        let has_content_type = call.request_headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if !has_content_type {
            fixed.insert("content-type".to_owned(), "application/json".to_owned());
        }
        headers_json(&call.request_headers, fixed)
    }
}

/// A string→string JSON object of `headers`: names lower-cased, repeated
/// names joined with `, `, credentials and pseudo-headers dropped; `fixed`
/// entries win.
fn headers_json(headers: &[(String, String)], fixed: BTreeMap<String, String>) -> Result<String, AktoError> {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if name.starts_with(':') || is_secret_name(&name) || fixed.contains_key(&name) {
            continue;
        }
        map.entry(name)
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value);
            })
            .or_insert_with(|| value.clone());
    }
    map.extend(fixed);
    serde_json::to_string(&map).map_err(AktoError::Encode)
}

/// `metadata`: the tag (the addon's, or the shield's for an MCP call),
/// plus what we know about the call.
fn metadata_json(call: &CallInfo, annotations: &[(&str, &str)], mcp_context_source: &str) -> Result<String, AktoError> {
    let mut extra: Vec<(String, String)> = Vec::new();
    if !call.host.is_empty() {
        extra.push(("upstream_host".into(), call.host.clone()));
    }
    if let Some(w) = &call.workload {
        extra.push(("process_name".into(), w.comm.clone()));
        extra.push(("pid".into(), w.pid.to_string()));
        extra.push(("uid".into(), w.uid.to_string()));
        extra.push(("cgroup_id".into(), w.cgroup_id.to_string()));
    }
    if let Some(mcp) = &call.mcp {
        extra.push(("upstream_path".into(), redact_path(&call.path)));
        extra.extend(mcp.annotations().into_iter().map(|(k, v)| (k.to_owned(), v)));
    }
    extra.extend(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let mut map = match &call.mcp {
        Some(mcp) => mcp.tag(mcp_context_source),
        None if extra.is_empty() => return Ok(AGENTIC_TAG.to_owned()),
        None => {
            let mut map = Map::new();
            map.insert("gen-ai".into(), Value::String("Gen AI".into()));
            map.insert("source".into(), Value::String(AGENTIC.into()));
            map
        }
    };
    for (k, v) in extra {
        map.insert(k, Value::String(v));
    }
    serde_json::to_string(&map).map_err(AktoError::Encode)
}

/// `requestPayload`, as the addon builds it: `{"messages": [...]}` when the
/// body has `messages`, else `{"raw": <the parsed body>}` (the Responses
/// API, Gemini, Bedrock models other than Claude, embeddings). `doc` is the
/// body already parsed, if it is JSON (a body decoded from another charset
/// parses only there); otherwise `body` is parsed. A body that is not JSON
/// goes as `{"raw": "<text>"}`, where the addon sends an empty string that
/// the server answers with 422.
pub fn request_payload(doc: Option<&Value>, body: &[u8]) -> Result<String, AktoError> {
    let parsed;
    let doc = match doc {
        Some(doc) => Some(doc),
        None => {
            parsed = serde_json::from_slice::<Value>(body).ok();
            parsed.as_ref()
        }
    };
    let value = match doc {
        Some(Value::Object(obj)) if obj.contains_key("messages") => {
            json!({ "messages": obj.get("messages").unwrap_or(&Value::Null) })
        }
        Some(doc) => json!({ "raw": doc }),
        None => json!({ "raw": String::from_utf8_lossy(body) }),
    };
    serde_json::to_string(&value).map_err(AktoError::Encode)
}

/// Header and query-parameter names that carry credentials. Generous on
/// purpose: dropping a harmless header only costs Akto a little context.
fn is_secret_name(name: &str) -> bool {
    const PARTS: &[&str] = &["key", "token", "secret", "password", "auth", "cookie", "credential", "signature"];
    let name = name.to_ascii_lowercase();
    name == "sig" || PARTS.iter().any(|p| name.contains(p))
}

/// Replaces the value of every secret query parameter (Gemini's `?key=`,
/// SigV4 query signing, ...) with `REDACTED`.
pub fn redact_path(path: &str) -> String {
    let Some((base, query)) = path.split_once('?') else {
        return path.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(n, _)| n);
            let decoded = percent_decode(name);
            if is_secret_name(&decoded) { format!("{name}=REDACTED") } else { pair.to_owned() }
        })
        .collect();
    let mut out = format!("{base}?{}", parts.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Decodes `%XX` and `+` in a query-parameter name, leniently.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The app name as Akto stores it: lower-cased, characters outside
/// `[a-z0-9.:-]` mapped to `-`.
pub fn normalize_app_name(name: &str) -> String {
    name.trim()
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | ':') { c } else { '-' }
        })
        .collect()
}

pub(super) fn truncate_lossy(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    text.into_owned()
}

/// The messages of a 422 `{"actionErrors": [...]}` (or the body itself).
pub(super) fn action_errors(body: &[u8]) -> Vec<String> {
    let parsed = serde_json::from_slice::<Value>(body).ok();
    let errors = parsed.as_ref().and_then(|v| get_ci(v, "actionErrors")).and_then(Value::as_array);
    match errors {
        Some(list) => list.iter().map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned)).collect(),
        None => vec![truncate_lossy(body, MAX_ERROR_BODY)],
    }
}

/// Looks `key` up in an object ignoring case, `_` and `-` (`Allowed`,
/// `allowed`, `failOpen`, `fail_open`, `ModifiedPayload`, ...).
fn get_ci<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    let obj = value.as_object()?;
    if let Some(v) = obj.get(key) {
        return Some(v);
    }
    let norm = |s: &str| s.chars().filter(|c| !matches!(c, '_' | '-')).flat_map(char::to_lowercase).collect::<String>();
    let wanted = norm(key);
    obj.iter().find(|(k, _)| norm(k) == wanted).map(|(_, v)| v)
}

fn as_bool(value: Option<&Value>) -> Option<bool> {
    match value? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        Value::Number(n) => n.as_i64().map(|n| n != 0),
        _ => None,
    }
}

fn as_text(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::Null => None,
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// Reads a 2xx reply into a verdict. Tolerant of key casing, of a
/// `guardrailsResult` sent as a JSON string, and of the merged form with
/// `requestResult` / `responseResult` (the one for `kind`'s direction is
/// used). A reply without a `guardrailsResult` means no guardrail applied.
pub fn parse_verdict(body: &[u8], kind: CheckKind, block_on_disallowed: bool) -> Result<RemoteVerdict, AktoError> {
    let malformed = |reason, source| AktoError::Malformed { check: kind, reason, source };
    let root: Value = serde_json::from_slice(body).map_err(|e| malformed("not JSON", Some(e)))?;
    if !root.is_object() {
        return Err(malformed("not a JSON object", None));
    }
    let result =
        get_ci(&root, "data").and_then(|d| get_ci(d, "guardrailsResult")).or_else(|| get_ci(&root, "guardrailsResult"));
    let decoded;
    let result = match result {
        None | Some(Value::Null) => return Ok(RemoteVerdict { allowed: true, ..RemoteVerdict::default() }),
        Some(Value::String(s)) => {
            decoded =
                serde_json::from_str::<Value>(s).map_err(|e| malformed("guardrailsResult is not JSON", Some(e)))?;
            &decoded
        }
        Some(v) => v,
    };
    if !result.is_object() {
        return Err(malformed("guardrailsResult is not an object", None));
    }
    let nested = match kind.direction() {
        Direction::Request => "requestResult",
        Direction::Response => "responseResult",
    };
    let result = get_ci(result, nested).filter(|v| v.is_object()).unwrap_or(result);

    let allowed = as_bool(get_ci(result, "Allowed")).unwrap_or(true);
    let behaviour = as_text(get_ci(result, "behaviour")).map(|b| b.to_ascii_lowercase());
    let modified = as_bool(get_ci(result, "Modified"));
    let modified_payload = match modified {
        Some(false) => None,
        _ => as_text(get_ci(result, "ModifiedPayload")),
    };
    let metadata = get_ci(result, "Metadata");
    let meta = |key| metadata.and_then(|m| as_text(get_ci(m, key)));
    let block = behaviour.as_deref() == Some("block") || (block_on_disallowed && !allowed);
    Ok(RemoteVerdict {
        allowed,
        block,
        modified_payload,
        reason: as_text(get_ci(result, "Reason")),
        policy: meta("policy_name"),
        rule: meta("rule_violated"),
        severity: meta("severity"),
        behaviour,
        fail_open: as_bool(get_ci(result, "failOpen")).unwrap_or(false),
        error: as_text(get_ci(result, "error")),
    })
}

/// Applies a `ModifiedPayload` to the original request body so `model`,
/// `max_tokens`, `tools` and the rest survive:
///
/// * `{"messages": [...]}` (or a bare array): replaces `messages` only;
/// * `{"body": {...}}` and `{"raw": {...}}`: merges those keys;
/// * `{"raw": "<json>"}`: the string is the new body, merged the same way;
/// * any other object: a whole (redacted) body, merged key by key.
///
/// Errors when the payload is not JSON or does not fit the original (e.g.
/// modified messages for a body without any); the caller then decides
/// between blocking and forwarding unchanged.
pub fn merge_modified_payload(original_body: &Value, modified_payload: &str) -> Result<Value, AktoError> {
    let invalid = |reason| AktoError::ModifiedPayload { reason, source: None };
    let modified: Value = serde_json::from_str(modified_payload)
        .map_err(|e| AktoError::ModifiedPayload { reason: "not JSON", source: Some(e) })?;
    match modified {
        Value::Array(messages) => replace_messages(original_body, Value::Array(messages)),
        Value::Object(mut obj) => {
            if obj.len() == 1 {
                if let Some(body) = obj.remove("body") {
                    return merge_object(original_body, body);
                }
                if let Some(raw) = obj.remove("raw") {
                    return match raw {
                        Value::String(text) => match serde_json::from_str::<Value>(&text) {
                            Ok(parsed) => merge_object(original_body, parsed),
                            // A non-JSON raw body replaces a non-JSON original.
                            Err(_) if original_body.is_string() => Ok(Value::String(text)),
                            Err(e) => {
                                Err(AktoError::ModifiedPayload { reason: "raw body is not JSON", source: Some(e) })
                            }
                        },
                        other => merge_object(original_body, other),
                    };
                }
                if let Some(messages) = obj.remove("messages") {
                    return replace_messages(original_body, messages);
                }
            }
            if obj.is_empty() {
                return Err(invalid("empty object"));
            }
            merge_object(original_body, Value::Object(obj))
        }
        _ => Err(invalid("neither an object nor a message list")),
    }
}

fn replace_messages(original: &Value, messages: Value) -> Result<Value, AktoError> {
    let invalid = |reason| AktoError::ModifiedPayload { reason, source: None };
    if !messages.is_array() {
        return Err(invalid("messages is not a list"));
    }
    let mut out = original.clone();
    let obj = out.as_object_mut().ok_or_else(|| invalid("the original body is not an object"))?;
    if !obj.contains_key("messages") {
        return Err(invalid("the original body has no messages"));
    }
    obj.insert("messages".into(), messages);
    Ok(out)
}

/// Shallow merge: the modified keys win, the others stay. A non-object
/// original is replaced by an object.
fn merge_object(original: &Value, modified: Value) -> Result<Value, AktoError> {
    let Value::Object(modified) = modified else {
        return Err(AktoError::ModifiedPayload { reason: "modified body is not an object", source: None });
    };
    let mut out = match original {
        Value::Object(obj) => obj.clone(),
        _ => Map::new(),
    };
    out.extend(modified);
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_name_is_normalized_like_the_server() {
        assert_eq!(normalize_app_name("My AI_Agent/v2"), "my-ai-agent-v2");
        assert_eq!(normalize_app_name("svc.ns:8080"), "svc.ns:8080");
        assert_eq!(normalize_app_name(" x "), "x");
    }

    #[test]
    fn secret_query_parameters_are_redacted() {
        assert_eq!(
            redact_path("/v1beta/models/g:generateContent?key=AIzaSECRET&alt=sse"),
            "/v1beta/models/g:generateContent?key=REDACTED&alt=sse"
        );
        assert_eq!(
            redact_path("/x?X-Amz-Signature=abc&X-Amz-Credential=def&a=1#frag"),
            "/x?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&a=1#frag"
        );
        assert_eq!(redact_path("/x?api%5Fkey=s"), "/x?api%5Fkey=REDACTED");
        assert_eq!(redact_path("/v1/messages"), "/v1/messages");
        assert_eq!(redact_path("/x?flag"), "/x?flag");
    }

    #[test]
    fn credential_headers_are_dropped() {
        let headers = vec![
            ("Authorization".to_owned(), "Bearer sk-secret".to_owned()),
            ("x-api-key".to_owned(), "sk-ant-secret".to_owned()),
            ("X-Goog-Api-Key".to_owned(), "AIzaSECRET".to_owned()),
            ("api-key".to_owned(), "azure-secret".to_owned()),
            ("Cookie".to_owned(), "session=secret".to_owned()),
            ("Proxy-Authorization".to_owned(), "Basic secret".to_owned()),
            ("x-amz-security-token".to_owned(), "secret".to_owned()),
            (":authority".to_owned(), "api.openai.com".to_owned()),
            ("Accept".to_owned(), "a".to_owned()),
            ("accept".to_owned(), "b".to_owned()),
            ("anthropic-version".to_owned(), "2023-06-01".to_owned()),
        ];
        let json = headers_json(&headers, BTreeMap::new()).unwrap();
        assert!(!json.contains("secret"), "{json}");
        assert!(!json.contains("AIza"), "{json}");
        let map: BTreeMap<String, String> = serde_json::from_str(&json).unwrap();
        assert_eq!(map.get("accept").map(String::as_str), Some("a, b"));
        assert_eq!(map.get("anthropic-version").map(String::as_str), Some("2023-06-01"));
        assert_eq!(map.len(), 2, "{map:?}");
    }

    #[test]
    fn request_payload_wraps_messages_or_raw() {
        let payload = |doc: Option<&Value>, body: &[u8]| -> Value {
            serde_json::from_str(&request_payload(doc, body).unwrap()).unwrap()
        };
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        assert_eq!(payload(None, chat), json!({"messages": [{"role": "user", "content": "hi"}]}));

        // A body without messages goes parsed, once wrapped, as the addon
        // sends it.
        let responses = br#"{"model":"gpt-4o","input":"hi"}"#;
        assert_eq!(payload(None, responses), json!({"raw": {"model": "gpt-4o", "input": "hi"}}));
        let doc: Value = serde_json::from_slice(responses).unwrap();
        assert_eq!(payload(Some(&doc), b"\xff\xfe{\x00"), json!({"raw": {"model": "gpt-4o", "input": "hi"}}));
        assert_eq!(payload(None, b"[1,2]"), json!({"raw": [1, 2]}));

        assert_eq!(payload(None, b"not json"), json!({"raw": "not json"}));
        assert_eq!(payload(None, b""), json!({"raw": ""}));
    }

    fn reply(result: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"success": true, "message": "ok", "data": {"guardrailsResult": result}})).unwrap()
    }

    #[test]
    fn verdict_in_capitalized_keys() {
        let body = reply(json!({
            "Allowed": false,
            "Modified": false,
            "ModifiedPayload": "",
            "Reason": "prompt injection",
            "Metadata": {"policy_name": "p1", "rule_violated": "injection", "severity": "HIGH"},
            "behaviour": "block"
        }));
        let v = parse_verdict(&body, CheckKind::Request, true).unwrap();
        assert_eq!(
            v,
            RemoteVerdict {
                allowed: false,
                block: true,
                modified_payload: None,
                reason: Some("prompt injection".into()),
                policy: Some("p1".into()),
                rule: Some("injection".into()),
                severity: Some("HIGH".into()),
                behaviour: Some("block".into()),
                fail_open: false,
                error: None,
            }
        );
    }

    #[test]
    fn verdict_in_lowercase_keys() {
        let body = reply(json!({
            "allowed": true,
            "modified": true,
            "modifiedpayload": "{\"messages\":[]}",
            "reason": "pii",
            "metadata": {"POLICY_NAME": "p2"},
            "Behaviour": "MASK",
            "fail_open": "true"
        }));
        let v = parse_verdict(&body, CheckKind::Response, true).unwrap();
        assert!(v.allowed && !v.block && v.fail_open);
        assert_eq!(v.modified_payload.as_deref(), Some("{\"messages\":[]}"));
        assert_eq!(v.behaviour.as_deref(), Some("mask"));
        assert_eq!(v.policy.as_deref(), Some("p2"));
    }

    #[test]
    fn disallowed_alert_blocks_only_when_configured() {
        let body = reply(json!({"Allowed": false, "behaviour": "alert", "Reason": "r"}));
        assert!(parse_verdict(&body, CheckKind::Request, true).unwrap().block);
        let v = parse_verdict(&body, CheckKind::Request, false).unwrap();
        assert!(!v.block && !v.allowed);
        let body = reply(json!({"Allowed": true, "behaviour": "block"}));
        assert!(parse_verdict(&body, CheckKind::Request, false).unwrap().block);
    }

    #[test]
    fn merged_result_uses_the_checks_direction() {
        let body = reply(json!({
            "Allowed": false,
            "Reason": "response leaked a key",
            "requestResult": {"Allowed": true},
            "responseResult": {"Allowed": false, "Reason": "response leaked a key", "behaviour": "block"}
        }));
        let req = parse_verdict(&body, CheckKind::Request, true).unwrap();
        assert!(req.allowed && !req.block);
        let resp = parse_verdict(&body, CheckKind::StreamBatch, true).unwrap();
        assert!(!resp.allowed && resp.block);
        assert_eq!(resp.reason.as_deref(), Some("response leaked a key"));
    }

    #[test]
    fn tolerant_envelopes() {
        let v = parse_verdict(br#"{"success":true,"data":{}}"#, CheckKind::Request, true).unwrap();
        assert!(v.allowed && !v.block);
        let nested = json!({"data": {"guardrailsResult": "{\"Allowed\":false}"}}).to_string();
        assert!(parse_verdict(nested.as_bytes(), CheckKind::Request, true).unwrap().block);
        let modified_false = reply(json!({"Allowed": true, "Modified": false, "ModifiedPayload": "x"}));
        assert_eq!(parse_verdict(&modified_false, CheckKind::Request, true).unwrap().modified_payload, None);
        assert!(matches!(
            parse_verdict(b"<html>", CheckKind::Request, true),
            Err(AktoError::Malformed { reason: "not JSON", .. })
        ));
        assert!(matches!(parse_verdict(b"[1]", CheckKind::Request, true), Err(AktoError::Malformed { .. })));
    }

    #[test]
    fn action_errors_are_read() {
        assert_eq!(action_errors(br#"{"actionErrors":["requestPayload is empty"]}"#), vec!["requestPayload is empty"]);
        assert_eq!(action_errors(b"nope"), vec!["nope"]);
    }

    fn original() -> Value {
        json!({
            "model": "claude-sonnet-4",
            "max_tokens": 1024,
            "system": "be nice",
            "tools": [{"name": "search", "input_schema": {"type": "object"}}],
            "messages": [{"role": "user", "content": "my card is 4111 1111 1111 1111"}],
            "stream": true
        })
    }

    fn redacted_messages() -> Value {
        json!([{"role": "user", "content": "my card is [REDACTED]"}])
    }

    fn assert_kept(merged: &Value) {
        assert_eq!(merged["model"], "claude-sonnet-4");
        assert_eq!(merged["max_tokens"], 1024);
        assert_eq!(merged["tools"][0]["name"], "search");
        assert_eq!(merged["stream"], true);
        assert_eq!(merged["messages"], redacted_messages());
    }

    #[test]
    fn merge_messages_only() {
        let payload = json!({"messages": redacted_messages()}).to_string();
        assert_kept(&merge_modified_payload(&original(), &payload).unwrap());
        assert_kept(&merge_modified_payload(&original(), &redacted_messages().to_string()).unwrap());
    }

    #[test]
    fn merge_body_and_raw_and_whole() {
        let body = json!({"body": {"messages": redacted_messages()}}).to_string();
        assert_kept(&merge_modified_payload(&original(), &body).unwrap());

        let raw_obj = json!({"raw": {"messages": redacted_messages(), "model": "claude-sonnet-4"}}).to_string();
        assert_kept(&merge_modified_payload(&original(), &raw_obj).unwrap());

        let raw_str = json!({"raw": json!({"messages": redacted_messages()}).to_string()}).to_string();
        assert_kept(&merge_modified_payload(&original(), &raw_str).unwrap());

        let whole = json!({"model": "claude-sonnet-4", "messages": redacted_messages()}).to_string();
        assert_kept(&merge_modified_payload(&original(), &whole).unwrap());
    }

    #[test]
    fn a_raw_payload_echoed_back_is_unwrapped() {
        // A Responses-API body goes to Akto as {"raw": <body>}; its
        // redaction comes back in the same shape.
        let original = json!({
            "model": "gpt-4.1",
            "instructions": "be terse",
            "input": "my card is 4111 1111 1111 1111",
            "stream": true
        });
        let sent: Value =
            serde_json::from_str(&request_payload(None, original.to_string().as_bytes()).unwrap()).unwrap();
        let mut echoed = sent.clone();
        echoed["raw"]["input"] = json!("my card is [CARD]");
        let merged = merge_modified_payload(&original, &echoed.to_string()).unwrap();
        let mut expected = original.clone();
        expected["input"] = json!("my card is [CARD]");
        assert_eq!(merged, expected, "no stray top-level raw");
    }

    #[test]
    fn merge_rejects_what_does_not_fit() {
        assert!(matches!(
            merge_modified_payload(&original(), "my card is [REDACTED]"),
            Err(AktoError::ModifiedPayload { reason: "not JSON", .. })
        ));
        let no_messages = json!({"model": "gpt-4o", "input": "hi"});
        let payload = json!({"messages": redacted_messages()}).to_string();
        assert!(merge_modified_payload(&no_messages, &payload).is_err());
        assert!(merge_modified_payload(&original(), "{}").is_err());
        assert!(merge_modified_payload(&original(), "42").is_err());
        assert!(merge_modified_payload(&original(), r#"{"raw": "plain text"}"#).is_err());
        assert_eq!(
            merge_modified_payload(&Value::String("plain".into()), r#"{"raw": "plain [X]"}"#).unwrap(),
            Value::String("plain [X]".into())
        );
    }
}
