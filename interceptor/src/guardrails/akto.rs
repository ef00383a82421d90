//! The Akto-compatible remote guardrail backend: the client for Akto's
//! `/api/http-proxy` endpoint that the mitmproxy egress addon used.
//!
//! This module owns the wire format (the flat JSON body where every value is
//! a string or null, the query flags, the tolerant reading of the verdict),
//! the merge of a `ModifiedPayload` back into the provider body, and a
//! circuit breaker that fails fast while Akto is down. It does not decide
//! what a failure means (fail open or closed is the pipeline's call), never
//! retries, and never logs bodies or the token.
//!
//! Reporting: Akto records the traffic it checks when the check carries
//! `ingest_data=true`, and its guardrail service raises the security event
//! for its own verdicts, so a call Akto blocks needs nothing more. Every body
//! also carries the workload (`process_id`, and process name, uid, cgroup and
//! upstream host as extra keys of the `metadata` JSON string; `tag` stays
//! exactly as the addon sent it). For a call the *local* engine blocked,
//! [`AktoClient::report_local_block`] sends the same endpoint with
//! `ingest_data=true` and no guardrail flag: the exchange (prompt and the 403
//! we answered, rule in `metadata`) is ingested without asking for a verdict.
//! No other endpoint is used.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::HeaderValue;
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

use super::model::Direction;
pub use crate::config::akto::{API_PATH, AktoConfig};
use crate::{config::akto::endpoint_url, workload::Workload};

/// Environment variables with the seed's meaning.
pub const ENV_URL: &str = "AKTO_URL";
pub const ENV_APP_NAME: &str = "APP_NAME";
pub const ENV_TOKEN: &str = "AKTO_API_TOKEN";

/// `tag` (and the base of `metadata`), byte for byte what the addon sends
/// (Python's `json.dumps` spacing).
const AGENTIC_TAG: &str = r#"{"gen-ai": "Gen AI", "source": "AGENTIC"}"#;
/// Headers the guardrail service reads session ids from; copied from the
/// intercepted request onto the check call itself as well.
const SESSION_HEADERS: &[&str] = &["x-session-id", "x-conversation-id", "x-user-id"];
/// Largest reply read from Akto (a `ModifiedPayload` can be as big as a prompt).
const MAX_REPLY: usize = 64 * 1024 * 1024;
/// How much of an error reply is kept in [`AktoError::Status`].
const MAX_ERROR_BODY: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum AktoError {
    #[error("invalid akto configuration:\n  - {}", .errors.join("\n  - "))]
    InvalidConfig { errors: Vec<String> },
    #[error("cannot build the http client for akto")]
    Client(#[source] reqwest::Error),
    #[error("akto did not answer the {check} check within {timeout:?}")]
    Timeout { check: CheckKind, timeout: Duration },
    #[error("akto is unreachable at {endpoint}")]
    Unreachable {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the {check} call to akto failed")]
    Transport {
        check: CheckKind,
        #[source]
        source: reqwest::Error,
    },
    #[error("akto answered the {check} check with http {status}")]
    Status { check: CheckKind, status: u16, body: String },
    #[error("akto rejected the {check} check: {}", .messages.join("; "))]
    Rejected { check: CheckKind, messages: Vec<String> },
    #[error("cannot understand akto's reply to the {check} check: {reason}")]
    Malformed {
        check: CheckKind,
        reason: &'static str,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("akto circuit is open after repeated failures, next attempt in {retry_after:?}")]
    CircuitOpen { retry_after: Duration },
    #[error("cannot encode the akto request")]
    Encode(#[source] serde_json::Error),
    #[error("cannot merge the modified payload: {reason}")]
    ModifiedPayload {
        reason: &'static str,
        #[source]
        source: Option<serde_json::Error>,
    },
}

impl AktoError {
    /// Short label for metrics and audit events.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidConfig { .. } | Self::Client(_) => "config",
            Self::Timeout { .. } => "timeout",
            Self::Unreachable { .. } => "unreachable",
            Self::Transport { .. } => "transport",
            Self::Status { .. } => "status",
            Self::Rejected { .. } => "rejected",
            Self::Malformed { .. } => "malformed",
            Self::CircuitOpen { .. } => "circuit_open",
            Self::Encode(_) => "encode",
            Self::ModifiedPayload { .. } => "modified_payload",
        }
    }

    /// Whether the error says something about Akto's health (and so counts
    /// towards opening the circuit). A 422 is about one request's content.
    fn trips_breaker(&self) -> bool {
        matches!(
            self,
            Self::Timeout { .. }
                | Self::Unreachable { .. }
                | Self::Transport { .. }
                | Self::Status { .. }
                | Self::Malformed { .. }
        )
    }
}

/// Which call to Akto this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    Request,
    Response,
    StreamBatch,
    /// Ingest only, no verdict asked (local-engine block reports).
    Ingest,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Response => "response",
            Self::StreamBatch => "stream batch",
            Self::Ingest => "ingest",
        }
    }

    fn direction(self) -> Direction {
        match self {
            Self::Request | Self::Ingest => Direction::Request,
            Self::Response | Self::StreamBatch => Direction::Response,
        }
    }
}

impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One intercepted call, as the Akto body describes it. The same
/// `request_id` goes on the request and the response checks.
#[derive(Clone, Default)]
pub struct CallInfo {
    pub request_id: String,
    pub method: String,
    /// Path and query. Secret query parameters are redacted here again.
    pub path: String,
    /// The real upstream host (sent in `metadata`; `host` is the app name).
    pub host: String,
    /// Request headers; credentials are dropped here again.
    pub request_headers: Vec<(String, String)>,
    /// The request body as forwarded upstream: response and stream-batch
    /// checks resend it as `requestPayload`, as the addon does (the server
    /// answers 422 to an empty one).
    pub request_body: Bytes,
    /// Unknown addresses are sent as `127.0.0.1`, as the addon does.
    pub client_ip: Option<IpAddr>,
    pub dest_ip: Option<IpAddr>,
    pub workload: Option<Workload>,
}

impl fmt::Debug for CallInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let header_names: Vec<&str> = self.request_headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("CallInfo")
            .field("request_id", &self.request_id)
            .field("method", &self.method)
            .field("host", &self.host)
            .field("path", &redact_path(&self.path))
            .field("request_headers", &header_names)
            .field("request_body_len", &self.request_body.len())
            .field("client_ip", &self.client_ip)
            .field("dest_ip", &self.dest_ip)
            .field("workload", &self.workload)
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

/// State of the client's circuit breaker, for status and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

/// Client for Akto's `/api/http-proxy`. Cheap to share behind an `Arc`; one
/// pooled keep-alive HTTP client for every call.
pub struct AktoClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    request_url: reqwest::Url,
    response_url: reqwest::Url,
    ingest_url: reqwest::Url,
    token: Option<HeaderValue>,
    /// Normalized app name for the `host` request header, if set.
    app_host: Option<String>,
    cfg: AktoConfig,
    breaker: Breaker,
}

impl fmt::Debug for AktoClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AktoClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("app_host", &self.app_host)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("circuit", &self.circuit_state())
            .finish_non_exhaustive()
    }
}

impl AktoClient {
    /// Validates `cfg` and builds the HTTP client (proxy environment
    /// variables ignored: Akto is reached directly).
    pub fn new(cfg: AktoConfig) -> Result<Self, AktoError> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(AktoError::InvalidConfig { errors });
        }
        let endpoint = endpoint_url(&cfg.url).map_err(|e| AktoError::InvalidConfig { errors: vec![e] })?;
        let token = match cfg.token() {
            Some(t) => {
                let mut value = HeaderValue::from_str(t).map_err(|_| AktoError::InvalidConfig {
                    errors: vec!["akto token contains characters not allowed in an HTTP header".into()],
                })?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .user_agent(concat!("interceptor/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(32)
            .tcp_keepalive(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(AktoError::Client)?;
        let ingest = if cfg.ingest { "true" } else { "false" };
        let with_query = |flag: Option<&str>, ingest: &str| {
            let mut url = endpoint.clone();
            {
                let mut q = url.query_pairs_mut();
                if let Some(flag) = flag {
                    q.append_pair(flag, "true");
                }
                q.append_pair("ingest_data", ingest);
                if let Some(connector) = cfg.connector.as_deref().filter(|c| !c.is_empty()) {
                    q.append_pair("akto_connector", connector);
                }
            }
            url
        };
        let request_url = with_query(Some("guardrails"), ingest);
        let response_url = with_query(Some("response_guardrails"), ingest);
        let ingest_url = with_query(None, "true");
        let app_host = Some(normalize_app_name(&cfg.app_name)).filter(|h| !h.is_empty());
        let breaker = Breaker::new(cfg.circuit_failures, cfg.circuit_cooldown);
        Ok(Self { http, endpoint, request_url, response_url, ingest_url, token, app_host, cfg, breaker })
    }

    pub fn config(&self) -> &AktoConfig {
        &self.cfg
    }

    /// `AKTO_URL/api/http-proxy`, without query.
    pub fn endpoint(&self) -> &str {
        self.endpoint.as_str()
    }

    pub fn circuit_state(&self) -> CircuitState {
        self.breaker.state(Instant::now())
    }

    /// Checks a request body (`guardrails=true`) before it goes upstream.
    pub async fn check_request(&self, call: &CallInfo, request_payload_json: &str) -> Result<RemoteVerdict, AktoError> {
        let body = self.body(call, request_payload_json.as_bytes(), None, &[], String::new(), &[])?;
        self.check(CheckKind::Request, call, body, self.cfg.request_timeout).await
    }

    /// Checks a whole response body (`response_guardrails=true`).
    pub async fn check_response(
        &self,
        call: &CallInfo,
        response_status: u16,
        response_headers: &[(String, String)],
        response_payload: &str,
    ) -> Result<RemoteVerdict, AktoError> {
        let body = self.body(
            call,
            &call.request_body,
            Some(response_status),
            response_headers,
            response_payload.to_owned(),
            &[],
        )?;
        self.check(CheckKind::Response, call, body, self.cfg.request_timeout).await
    }

    /// Checks one batch of streamed completion text, sent as
    /// `{"content":[{"type":"text","text":<batch>}]}` with the stream
    /// timeout. Status and headers are the stream's response head.
    pub async fn check_stream_batch(
        &self,
        call: &CallInfo,
        response_status: u16,
        response_headers: &[(String, String)],
        text: &str,
    ) -> Result<RemoteVerdict, AktoError> {
        let payload = json!({"content": [{"type": "text", "text": text}]});
        let payload = serde_json::to_string(&payload).map_err(AktoError::Encode)?;
        let body = self.body(call, &call.request_body, Some(response_status), response_headers, payload, &[])?;
        self.check(CheckKind::StreamBatch, call, body, self.cfg.stream_timeout).await
    }

    /// Ingests an exchange without asking for a verdict (`ingest_data=true`
    /// only). `annotations` are added to the `metadata` JSON string. A no-op
    /// when ingestion is off.
    pub async fn ingest(
        &self,
        call: &CallInfo,
        request_payload_json: &str,
        response_status: u16,
        response_headers: &[(String, String)],
        response_payload: &str,
        annotations: &[(&str, &str)],
    ) -> Result<(), AktoError> {
        if !self.cfg.ingest {
            return Ok(());
        }
        let body = self.body(
            call,
            request_payload_json.as_bytes(),
            Some(response_status),
            response_headers,
            response_payload.to_owned(),
            annotations,
        )?;
        let timeout = self.cfg.request_timeout;
        self.guarded(CheckKind::Ingest, async { self.send(CheckKind::Ingest, call, body, timeout).await.map(drop) })
            .await
    }

    /// Reports a call the local engine blocked: ingests the prompt with the
    /// `403 {"error": <reason>}` the client got, and the rule in `metadata`
    /// (`guardrail_decision`, `guardrail_source`, `guardrail_rule`,
    /// `guardrail_reason`).
    pub async fn report_local_block(
        &self,
        call: &CallInfo,
        request_payload_json: &str,
        rule: &str,
        reason: &str,
    ) -> Result<(), AktoError> {
        let response = serde_json::to_string(&json!({ "error": reason })).map_err(AktoError::Encode)?;
        let headers = [
            ("content-type".to_owned(), "application/json".to_owned()),
            ("x-akto-guardrails-decision".to_owned(), "blocked".to_owned()),
        ];
        let annotations = [
            ("guardrail_decision", "blocked"),
            ("guardrail_source", "local"),
            ("guardrail_rule", rule),
            ("guardrail_reason", reason),
        ];
        self.ingest(call, request_payload_json, 403, &headers, &response, &annotations).await
    }

    async fn check(
        &self,
        kind: CheckKind,
        call: &CallInfo,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<RemoteVerdict, AktoError> {
        let block_on_disallowed = self.cfg.block_on_disallowed;
        let started = std::time::Instant::now();
        let result = self
            .guarded(kind, async {
                let reply = self.send(kind, call, body, timeout).await?;
                parse_verdict(&reply, kind, block_on_disallowed)
            })
            .await;
        let latency_ms = started.elapsed().as_millis() as u64;
        match &result {
            Ok(v) => tracing::debug!(
                check = kind.as_str(),
                request_id = %call.request_id,
                latency_ms,
                allowed = v.allowed,
                block = v.block,
                modified = v.modified_payload.is_some(),
                "akto verdict"
            ),
            // An open circuit was reported when it opened.
            Err(e @ AktoError::CircuitOpen { .. }) => tracing::debug!(
                check = kind.as_str(),
                request_id = %call.request_id,
                error = %e,
                "akto check skipped"
            ),
            Err(e) => tracing::warn!(
                check = kind.as_str(),
                request_id = %call.request_id,
                latency_ms,
                kind = e.kind(),
                error = %crate::error::chain(e),
                "akto check failed; the fail mode decides"
            ),
        }
        result
    }

    /// Runs `fut` through the circuit breaker.
    async fn guarded<T>(
        &self,
        kind: CheckKind,
        fut: impl Future<Output = Result<T, AktoError>>,
    ) -> Result<T, AktoError> {
        let permit =
            self.breaker.admit(Instant::now()).map_err(|retry_after| AktoError::CircuitOpen { retry_after })?;
        let result = fut.await;
        let healthy = result.as_ref().err().is_none_or(|e| !e.trips_breaker());
        if let Some(transition) = permit.finish(healthy) {
            match transition {
                Transition::Opened => tracing::warn!(
                    check = kind.as_str(),
                    cooldown = ?self.cfg.circuit_cooldown,
                    "akto circuit opened: failing fast"
                ),
                Transition::Closed => tracing::info!("akto circuit closed: akto answers again"),
            }
        }
        result
    }

    /// One POST; the successful reply body, or the error.
    async fn send(
        &self,
        kind: CheckKind,
        call: &CallInfo,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, AktoError> {
        let url = match kind {
            CheckKind::Request => &self.request_url,
            CheckKind::Response | CheckKind::StreamBatch => &self.response_url,
            CheckKind::Ingest => &self.ingest_url,
        };
        let mut req = self
            .http
            .post(url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .body(body);
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, token.clone());
        }
        if let Ok(id) = HeaderValue::from_str(&call.request_id)
            && !call.request_id.is_empty()
        {
            req = req.header("x-request-id", id);
        }
        for (name, value) in &call.request_headers {
            let name = name.to_ascii_lowercase();
            if SESSION_HEADERS.contains(&name.as_str())
                && let Ok(value) = HeaderValue::from_str(value)
            {
                req = req.header(name, value);
            }
        }

        let exchange = async {
            let mut resp = req.send().await?;
            let status = resp.status();
            let mut reply = Vec::new();
            while let Some(chunk) = resp.chunk().await? {
                if reply.len() + chunk.len() > MAX_REPLY {
                    return Ok((status, None));
                }
                reply.extend_from_slice(&chunk);
            }
            Ok::<_, reqwest::Error>((status, Some(Bytes::from(reply))))
        };
        let (status, reply) = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => return Err(AktoError::Timeout { check: kind, timeout }),
            Ok(Err(e)) if e.is_timeout() => return Err(AktoError::Timeout { check: kind, timeout }),
            Ok(Err(e)) if e.is_connect() => {
                return Err(AktoError::Unreachable { endpoint: self.endpoint.to_string(), source: e });
            }
            Ok(Err(source)) => return Err(AktoError::Transport { check: kind, source }),
            Ok(Ok(done)) => done,
        };
        let Some(reply) = reply else {
            return Err(AktoError::Malformed { check: kind, reason: "reply too large", source: None });
        };
        if status.is_success() {
            return Ok(reply);
        }
        if status.as_u16() == 422 {
            return Err(AktoError::Rejected { check: kind, messages: action_errors(&reply) });
        }
        Err(AktoError::Status { check: kind, status: status.as_u16(), body: truncate_lossy(&reply, MAX_ERROR_BODY) })
    }

    /// The flat Akto body; every value a string or null.
    fn body(
        &self,
        call: &CallInfo,
        request_body: &[u8],
        response_status: Option<u16>,
        response_headers: &[(String, String)],
        response_payload: String,
        annotations: &[(&str, &str)],
    ) -> Result<Vec<u8>, AktoError> {
        let status = response_status.unwrap_or(200).to_string();
        let response_headers = match response_status {
            None => "{}".to_owned(),
            Some(_) => headers_json(response_headers, BTreeMap::new())?,
        };
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let ip = |addr: Option<IpAddr>| addr.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)).to_canonical().to_string();
        let body = json!({
            "path": redact_path(&call.path),
            "method": call.method,
            "requestHeaders": self.request_headers_json(call)?,
            "responseHeaders": response_headers,
            "requestPayload": request_payload(request_body)?,
            "responsePayload": response_payload,
            "ip": ip(call.client_ip),
            "destIp": ip(call.dest_ip),
            "time": time_ms.to_string(),
            "statusCode": status,
            "type": null,
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
            "tag": AGENTIC_TAG,
            "metadata": metadata_json(call, annotations)?,
            "contextSource": "AGENTIC",
        });
        serde_json::to_vec(&body).map_err(AktoError::Encode)
    }

    /// `requestHeaders`: the call's headers minus credentials, `host` set to
    /// the app name, the request id, and a content type.
    fn request_headers_json(&self, call: &CallInfo) -> Result<String, AktoError> {
        let mut fixed = BTreeMap::new();
        let host = self.app_host.clone().unwrap_or_else(|| normalize_app_name(&call.host));
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

/// `metadata`: the addon's tag, plus what we know about the call.
fn metadata_json(call: &CallInfo, annotations: &[(&str, &str)]) -> Result<String, AktoError> {
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
    extra.extend(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    if extra.is_empty() {
        return Ok(AGENTIC_TAG.to_owned());
    }
    let mut map = Map::new();
    map.insert("gen-ai".into(), Value::String("Gen AI".into()));
    map.insert("source".into(), Value::String("AGENTIC".into()));
    for (k, v) in extra {
        map.insert(k, Value::String(v));
    }
    serde_json::to_string(&map).map_err(AktoError::Encode)
}

/// `requestPayload`: `{"messages": [...]}` when the body has `messages`,
/// else `{"raw": <body>}` (the body as JSON when it parses, as a string
/// otherwise). Never empty: the server answers 422 to an empty one.
fn request_payload(body: &[u8]) -> Result<String, AktoError> {
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(mut obj)) if obj.contains_key("messages") => {
            json!({ "messages": obj.remove("messages").unwrap_or(Value::Null) })
        }
        Ok(parsed) => json!({ "raw": parsed }),
        Err(_) => json!({ "raw": String::from_utf8_lossy(body) }),
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

fn truncate_lossy(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    text.into_owned()
}

/// The messages of a 422 `{"actionErrors": [...]}` (or the body itself).
fn action_errors(body: &[u8]) -> Vec<String> {
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

// ---------------------------------------------------------------------------
// Circuit breaker

/// `HalfOpen`: the cooldown is over; `probing` while the one probe is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BreakerState {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transition {
    Opened,
    Closed,
}

/// Consecutive-failure breaker: `threshold` failures open it for
/// `cooldown`, then one probe decides between closed and open again.
#[derive(Debug)]
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

/// Leave to make one call; report its outcome with [`Permit::finish`]. A
/// dropped (cancelled) probe frees the probe slot.
struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    finished: bool,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Self {
        Self { threshold, cooldown, state: Mutex::new(BreakerState::Closed { failures: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn state(&self, now: Instant) -> CircuitState {
        match *self.lock() {
            BreakerState::Closed { .. } => CircuitState::Closed,
            BreakerState::Open { until } if now >= until => CircuitState::HalfOpen,
            BreakerState::Open { .. } => CircuitState::Open,
            BreakerState::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// A permit, or how long until the next attempt may go through.
    fn admit(&self, now: Instant) -> Result<Permit<'_>, Duration> {
        let permit = |probe| Permit { breaker: self, probe, finished: false };
        if self.threshold == 0 {
            return Ok(permit(false));
        }
        let mut state = self.lock();
        match *state {
            BreakerState::Closed { .. } => Ok(permit(false)),
            BreakerState::Open { until } if now < until => Err(until - now),
            BreakerState::Open { .. } | BreakerState::HalfOpen { probing: false } => {
                *state = BreakerState::HalfOpen { probing: true };
                Ok(permit(true))
            }
            BreakerState::HalfOpen { probing: true } => Err(Duration::ZERO),
        }
    }

    fn record(&self, probe: bool, healthy: bool, now: Instant) -> Option<Transition> {
        if self.threshold == 0 {
            return None;
        }
        let mut state = self.lock();
        match (*state, probe, healthy) {
            (BreakerState::HalfOpen { .. }, true, true) => {
                *state = BreakerState::Closed { failures: 0 };
                Some(Transition::Closed)
            }
            (BreakerState::HalfOpen { .. }, true, false) => {
                *state = BreakerState::Open { until: now + self.cooldown };
                Some(Transition::Opened)
            }
            (BreakerState::Closed { .. }, false, true) => {
                *state = BreakerState::Closed { failures: 0 };
                None
            }
            (BreakerState::Closed { failures }, false, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.threshold {
                    *state = BreakerState::Open { until: now + self.cooldown };
                    Some(Transition::Opened)
                } else {
                    *state = BreakerState::Closed { failures };
                    None
                }
            }
            // Late outcomes of calls admitted before the state changed.
            _ => None,
        }
    }
}

impl Permit<'_> {
    fn finish(self, healthy: bool) -> Option<Transition> {
        self.finish_at(healthy, Instant::now())
    }

    fn finish_at(mut self, healthy: bool, now: Instant) -> Option<Transition> {
        self.finished = true;
        self.breaker.record(self.probe, healthy, now)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished && self.probe {
            let mut state = self.breaker.lock();
            if *state == (BreakerState::HalfOpen { probing: true }) {
                *state = BreakerState::HalfOpen { probing: false };
            }
        }
    }
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
        let chat = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
        let v: Value = serde_json::from_str(&request_payload(chat).unwrap()).unwrap();
        assert_eq!(v, json!({"messages": [{"role": "user", "content": "hi"}]}));

        let responses = br#"{"model":"gpt-4o","input":"hi"}"#;
        let v: Value = serde_json::from_str(&request_payload(responses).unwrap()).unwrap();
        assert_eq!(v, json!({"raw": {"model": "gpt-4o", "input": "hi"}}));

        let v: Value = serde_json::from_str(&request_payload(b"not json").unwrap()).unwrap();
        assert_eq!(v, json!({"raw": "not json"}));
        let v: Value = serde_json::from_str(&request_payload(b"").unwrap()).unwrap();
        assert_eq!(v, json!({"raw": ""}));
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

    #[test]
    fn breaker_opens_fails_fast_and_recovers() {
        let b = Breaker::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), None);
        }
        // A success resets the count.
        assert_eq!(b.admit(t0).unwrap().finish_at(true, t0), None);
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), None);
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), None);
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), Some(Transition::Opened));
        assert_eq!(b.state(t0), CircuitState::Open);
        assert_eq!(b.admit(t0 + Duration::from_secs(10)).err(), Some(Duration::from_secs(20)));

        // Cooldown over: one probe, the others still fail fast.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(b.state(later), CircuitState::HalfOpen);
        let probe = b.admit(later).unwrap();
        assert!(probe.probe);
        assert_eq!(b.admit(later).err(), Some(Duration::ZERO));
        // The probe fails: open again for a full cooldown.
        assert_eq!(probe.finish_at(false, later), Some(Transition::Opened));
        assert!(b.admit(later + Duration::from_secs(29)).is_err());

        // The next probe succeeds: closed.
        let again = later + Duration::from_secs(30);
        let probe = b.admit(again).unwrap();
        assert!(probe.probe);
        assert_eq!(probe.finish_at(true, again), Some(Transition::Closed));
        assert_eq!(b.state(again), CircuitState::Closed);
        assert!(!b.admit(again).unwrap().probe);
    }

    #[test]
    fn cancelled_probe_frees_the_slot() {
        let b = Breaker::new(1, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(b.admit(t0).unwrap().finish_at(false, t0), Some(Transition::Opened));
        let later = t0 + Duration::from_secs(1);
        let probe = b.admit(later).unwrap();
        assert!(probe.probe);
        drop(probe);
        assert!(b.admit(later).unwrap().probe);
    }

    #[test]
    fn zero_threshold_disables_the_breaker() {
        let b = Breaker::new(0, Duration::ZERO);
        let t0 = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.admit(t0).unwrap().finish(false), None);
        }
        assert_eq!(b.state(t0), CircuitState::Closed);
    }

    #[test]
    fn config_defaults_and_file_form() {
        let cfg: AktoConfig = toml::from_str(r#"url = "http://akto:9090""#).unwrap();
        assert_eq!(cfg.request_timeout, Duration::from_secs(15));
        assert_eq!(cfg.stream_timeout, Duration::from_secs(5));
        assert!(cfg.block_on_disallowed && cfg.ingest);
        assert_eq!(cfg.account_id, "1000000");
        assert_eq!(cfg.vxlan_id, "test");
        assert_eq!(cfg.circuit_failures, 5);
        assert!(cfg.validate().is_empty());

        let cfg: AktoConfig = toml::from_str(
            "url = \"https://akto.example.com/\"\nrequest_timeout = \"2s\"\ncircuit_cooldown = \"1m\"\ntoken = \"t\"",
        )
        .unwrap();
        assert_eq!(cfg.request_timeout, Duration::from_secs(2));
        assert_eq!(cfg.circuit_cooldown, Duration::from_secs(60));
        assert!(toml::from_str::<AktoConfig>("bogus = 1").is_err());
        // The token never leaves in a serialized config.
        let out = toml::to_string(&cfg).unwrap();
        assert!(!out.contains("token"), "{out}");
    }

    #[test]
    fn token_is_never_printed() {
        let cfg = AktoConfig { url: "http://a".into(), token: Some("s3cr3t-token".into()), ..AktoConfig::default() };
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        let client = AktoClient::new(cfg).unwrap();
        let dbg = format!("{client:?}");
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
    }

    #[test]
    fn invalid_configs_report_every_problem() {
        let cfg = AktoConfig {
            url: "ftp://akto".into(),
            token: Some("bad\ntoken".into()),
            request_timeout: Duration::ZERO,
            ..AktoConfig::default()
        };
        let Err(AktoError::InvalidConfig { errors }) = AktoClient::new(cfg) else {
            panic!("must be invalid");
        };
        assert_eq!(errors.len(), 3, "{errors:?}");
        for url in ["", "not a url", "http://user:pw@akto", "http://akto?x=1"] {
            let cfg = AktoConfig { url: url.into(), ..AktoConfig::default() };
            assert!(AktoClient::new(cfg).is_err(), "{url}");
        }
    }

    #[test]
    fn endpoint_is_appended_once() {
        assert_eq!(endpoint_url("http://akto:9090").unwrap().as_str(), "http://akto:9090/api/http-proxy");
        assert_eq!(endpoint_url("https://a.example/base/").unwrap().as_str(), "https://a.example/base/api/http-proxy");
        assert_eq!(endpoint_url("http://akto/api/http-proxy").unwrap().as_str(), "http://akto/api/http-proxy");
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod wire_tests {
    use super::*;
    use crate::testing::akto::{FakeAkto, RecordedCall, Reply};

    fn config(fake: &FakeAkto) -> AktoConfig {
        AktoConfig { url: fake.url(), app_name: "My Agent_1".into(), ..AktoConfig::default() }
    }

    fn call() -> CallInfo {
        CallInfo {
            request_id: "req-123".into(),
            method: "POST".into(),
            path: "/v1beta/models/gemini:generateContent?key=AIzaLEAKED&alt=sse".into(),
            host: "generativelanguage.googleapis.com".into(),
            request_headers: vec![
                ("Content-Type".into(), "application/json".into()),
                ("Authorization".into(), "Bearer sk-LEAKED".into()),
                ("x-api-key".into(), "sk-ant-LEAKED".into()),
                ("x-goog-api-key".into(), "AIzaLEAKED".into()),
                ("cookie".into(), "sid=LEAKED".into()),
                ("proxy-authorization".into(), "Basic LEAKED".into()),
                ("x-session-id".into(), "sess-9".into()),
                ("user-agent".into(), "openai-python/1.0".into()),
            ],
            request_body: Bytes::from_static(br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#),
            client_ip: Some("10.0.0.7".parse().unwrap()),
            dest_ip: Some("::ffff:162.159.140.245".parse().unwrap()),
            workload: Some(Workload {
                pid: 4242,
                tid: 4243,
                uid: 1000,
                gid: 1000,
                comm: "python3".into(),
                cgroup_id: 77,
            }),
        }
    }

    const ALL_FIELDS: &[&str] = &[
        "path",
        "method",
        "requestHeaders",
        "responseHeaders",
        "requestPayload",
        "responsePayload",
        "ip",
        "destIp",
        "time",
        "statusCode",
        "type",
        "status",
        "akto_account_id",
        "akto_vxlan_id",
        "is_pending",
        "source",
        "direction",
        "process_id",
        "socket_id",
        "daemonset_id",
        "enabled_graph",
        "tag",
        "metadata",
        "contextSource",
    ];

    fn str_field<'a>(c: &'a RecordedCall, name: &str) -> &'a str {
        c.body[name].as_str().unwrap_or_else(|| panic!("{name} is not a string: {}", c.body[name]))
    }

    /// Every field present, every value a string or null, no credential anywhere.
    fn assert_shape(c: &RecordedCall) {
        let obj = c.body.as_object().expect("object body");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut expected = ALL_FIELDS.to_vec();
        keys.sort_unstable();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        for (k, v) in obj {
            assert!(v.is_string() || v.is_null(), "{k} = {v}");
        }
        let text = c.body.to_string();
        assert!(!text.contains("LEAKED"), "credential leaked into the body: {text}");
        assert!(c.headers.iter().all(|(_, v)| !v.contains("LEAKED")), "{:?}", c.headers);
        assert_eq!(c.header("x-api-key"), None);
        assert_eq!(c.header("content-type"), Some("application/json"));
        assert_eq!(c.header("x-request-id"), Some("req-123"));
        assert_eq!(c.header("x-session-id"), Some("sess-9"));
        assert_eq!(c.method, "POST");
        assert_eq!(c.path, "/api/http-proxy");

        let headers: BTreeMap<String, String> = serde_json::from_str(str_field(c, "requestHeaders")).unwrap();
        assert_eq!(headers["host"], "my-agent-1");
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-request-id"], "req-123");
        assert_eq!(headers["x-session-id"], "sess-9");
        assert_eq!(headers["user-agent"], "openai-python/1.0");
        for gone in ["authorization", "x-api-key", "x-goog-api-key", "cookie", "proxy-authorization"] {
            assert!(!headers.contains_key(gone), "{gone}");
        }

        assert_eq!(str_field(c, "path"), "/v1beta/models/gemini:generateContent?key=REDACTED&alt=sse");
        assert_eq!(str_field(c, "method"), "POST");
        assert_eq!(str_field(c, "ip"), "10.0.0.7");
        assert_eq!(str_field(c, "destIp"), "162.159.140.245");
        assert!(str_field(c, "time").parse::<u64>().unwrap() > 1_600_000_000_000);
        assert_eq!(str_field(c, "akto_account_id"), "1000000");
        assert_eq!(str_field(c, "akto_vxlan_id"), "test");
        assert_eq!(str_field(c, "is_pending"), "false");
        assert_eq!(str_field(c, "source"), "MIRRORING");
        assert_eq!(str_field(c, "process_id"), "4242");
        assert_eq!(str_field(c, "daemonset_id"), "node-a");
        assert_eq!(str_field(c, "contextSource"), "AGENTIC");
        assert_eq!(str_field(c, "tag"), r#"{"gen-ai": "Gen AI", "source": "AGENTIC"}"#);
        for null in ["type", "direction", "socket_id", "enabled_graph"] {
            assert!(c.body[null].is_null(), "{null}");
        }
        let metadata: Value = serde_json::from_str(str_field(c, "metadata")).unwrap();
        assert_eq!(metadata["gen-ai"], "Gen AI");
        assert_eq!(metadata["source"], "AGENTIC");
        assert_eq!(metadata["process_name"], "python3");
        assert_eq!(metadata["pid"], "4242");
        assert_eq!(metadata["cgroup_id"], "77");
        assert_eq!(metadata["upstream_host"], "generativelanguage.googleapis.com");
        let payload: Value = serde_json::from_str(str_field(c, "requestPayload")).unwrap();
        assert_eq!(payload, json!({"messages": [{"role": "user", "content": "hi"}]}));
    }

    fn client(fake: &FakeAkto, tweak: impl FnOnce(&mut AktoConfig)) -> AktoClient {
        let mut cfg = config(fake);
        cfg.daemonset_id = Some("node-a".into());
        tweak(&mut cfg);
        AktoClient::new(cfg).unwrap()
    }

    #[tokio::test]
    async fn request_check_body_query_and_token() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.token = Some("tok-1".into()));
        let call = call();
        let body = std::str::from_utf8(&call.request_body).unwrap();
        let v = akto.check_request(&call, body).await.unwrap();
        assert!(v.allowed && !v.block);

        let calls = fake.calls();
        assert_eq!(calls.len(), 1);
        let c = &calls[0];
        assert_shape(c);
        assert_eq!(c.query, "guardrails=true&ingest_data=true");
        assert_eq!(c.header("authorization"), Some("tok-1"));
        assert_eq!(str_field(c, "responseHeaders"), "{}");
        assert_eq!(str_field(c, "responsePayload"), "");
        assert_eq!(str_field(c, "statusCode"), "200");
        assert_eq!(str_field(c, "status"), "200");
    }

    #[tokio::test]
    async fn response_check_body_and_query() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.connector = Some("interceptor".into()));
        let headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("set-cookie".to_owned(), "cf=LEAKED".to_owned()),
            ("x-request-id".to_owned(), "upstream-1".to_owned()),
        ];
        let v = akto.check_response(&call(), 201, &headers, r#"{"choices":[]}"#).await.unwrap();
        assert!(v.allowed);
        let c = &fake.calls()[0];
        assert_shape(c);
        assert_eq!(c.query, "response_guardrails=true&ingest_data=true&akto_connector=interceptor");
        assert_eq!(c.header("authorization"), None);
        assert_eq!(str_field(c, "statusCode"), "201");
        assert_eq!(str_field(c, "status"), "201");
        assert_eq!(str_field(c, "responsePayload"), r#"{"choices":[]}"#);
        let rh: BTreeMap<String, String> = serde_json::from_str(str_field(c, "responseHeaders")).unwrap();
        assert_eq!(rh.get("content-type").map(String::as_str), Some("application/json"));
        assert!(!rh.contains_key("set-cookie"));
    }

    #[tokio::test]
    async fn stream_batch_body_and_query() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.ingest = false);
        let headers = vec![("content-type".to_owned(), "text/event-stream".to_owned())];
        akto.check_stream_batch(&call(), 200, &headers, "Hello \"world\"").await.unwrap();
        let c = &fake.calls()[0];
        assert_shape(c);
        assert_eq!(c.query, "response_guardrails=true&ingest_data=false");
        let payload: Value = serde_json::from_str(str_field(c, "responsePayload")).unwrap();
        assert_eq!(payload, json!({"content": [{"type": "text", "text": "Hello \"world\""}]}));
    }

    #[tokio::test]
    async fn verdicts_through_the_wire() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |_| {});
        let call = call();

        fake.set_request_reply(Reply::blocked("injection detected"));
        let v = akto.check_request(&call, "{}").await.unwrap();
        assert!(v.block && !v.allowed);
        assert_eq!(v.reason.as_deref(), Some("injection detected"));
        assert!(v.rule.is_some() && v.policy.is_some() && v.severity.is_some());

        fake.set_request_reply(Reply::blocked("lower").lowercase_keys());
        let v = akto.check_request(&call, "{}").await.unwrap();
        assert!(v.block);
        assert_eq!(v.reason.as_deref(), Some("lower"));

        fake.set_request_reply(Reply::modified(r#"{"messages":[{"role":"user","content":"[X]"}]}"#));
        let v = akto.check_request(&call, "{}").await.unwrap();
        assert!(v.allowed && !v.block);
        let merged = merge_modified_payload(
            &serde_json::from_slice(&call.request_body).unwrap(),
            v.modified_payload.as_deref().unwrap(),
        )
        .unwrap();
        assert_eq!(merged["model"], "gpt-4o");
        assert_eq!(merged["messages"][0]["content"], "[X]");

        fake.set_response_reply(Reply::merged(&Reply::allowed(), &Reply::blocked("leak")));
        let v = akto.check_response(&call, 200, &[], "{}").await.unwrap();
        assert!(v.block);
        assert_eq!(v.reason.as_deref(), Some("leak"));
        fake.set_request_reply(Reply::merged(&Reply::allowed(), &Reply::blocked("leak")));
        assert!(!akto.check_request(&call, "{}").await.unwrap().block);

        fake.set_response_reply(Reply::alert("meh"));
        assert!(akto.check_stream_batch(&call, 200, &[], "x").await.unwrap().block);
        let lenient = client(&fake, |c| c.block_on_disallowed = false);
        let v = lenient.check_stream_batch(&call, 200, &[], "x").await.unwrap();
        assert!(!v.block && !v.allowed);
        assert_eq!(v.behaviour.as_deref(), Some("alert"));
    }

    #[tokio::test]
    async fn error_replies() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.circuit_failures = 0);
        let call = call();

        fake.set_request_reply(Reply::rejected(&["requestPayload is empty"]));
        match akto.check_request(&call, "{}").await {
            Err(AktoError::Rejected { check: CheckKind::Request, messages }) => {
                assert_eq!(messages, vec!["requestPayload is empty"]);
            }
            other => panic!("{other:?}"),
        }

        fake.set_request_reply(Reply::Status(500, "boom".into()));
        match akto.check_request(&call, "{}").await {
            Err(AktoError::Status { status: 500, body, .. }) => assert_eq!(body, "boom"),
            other => panic!("{other:?}"),
        }

        fake.set_request_reply(Reply::Garbage);
        let err = akto.check_request(&call, "{}").await.unwrap_err();
        assert!(matches!(err, AktoError::Malformed { .. }), "{err:?}");
        assert_eq!(err.kind(), "malformed");
    }

    #[tokio::test]
    async fn slow_akto_times_out() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.stream_timeout = Duration::from_millis(100));
        fake.set_response_reply(Reply::allowed().delayed(Duration::from_secs(5)));
        let started = std::time::Instant::now();
        let err = akto.check_stream_batch(&call(), 200, &[], "x").await.unwrap_err();
        assert!(matches!(err, AktoError::Timeout { check: CheckKind::StreamBatch, .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn closed_port_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let akto =
            AktoClient::new(AktoConfig { url: format!("http://127.0.0.1:{port}"), ..AktoConfig::default() }).unwrap();
        let err = akto.check_request(&call(), "{}").await.unwrap_err();
        assert!(matches!(err, AktoError::Unreachable { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn circuit_opens_then_recovers() {
        let fake = FakeAkto::start().unwrap();
        let cooldown = Duration::from_millis(300);
        let akto = client(&fake, |c| {
            c.circuit_failures = 2;
            c.circuit_cooldown = cooldown;
        });
        let call = call();
        fake.set_request_reply(Reply::Status(503, "down".into()));
        for _ in 0..2 {
            assert!(matches!(akto.check_request(&call, "{}").await, Err(AktoError::Status { .. })));
        }
        assert_eq!(akto.circuit_state(), CircuitState::Open);
        let err = akto.check_request(&call, "{}").await.unwrap_err();
        assert!(matches!(err, AktoError::CircuitOpen { .. }), "{err:?}");
        assert_eq!(fake.calls().len(), 2, "an open circuit makes no network call");

        // After the cooldown one probe goes through and closes the circuit.
        tokio::time::sleep(cooldown).await;
        fake.set_request_reply(Reply::allowed());
        assert!(akto.check_request(&call, "{}").await.unwrap().allowed);
        assert_eq!(akto.circuit_state(), CircuitState::Closed);
        assert_eq!(fake.calls().len(), 3);

        // A 422 is the request's fault and does not count.
        fake.set_request_reply(Reply::rejected(&["bad"]));
        for _ in 0..3 {
            assert!(matches!(akto.check_request(&call, "{}").await, Err(AktoError::Rejected { .. })));
        }
        assert_eq!(akto.circuit_state(), CircuitState::Closed);
    }

    #[tokio::test]
    async fn local_block_is_ingested_without_a_verdict() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |_| {});
        let call = call();
        let body = std::str::from_utf8(&call.request_body).unwrap();
        akto.report_local_block(&call, body, "pii.credit_card", "card number").await.unwrap();
        let c = &fake.calls()[0];
        assert_shape(c);
        assert_eq!(c.query, "ingest_data=true");
        assert_eq!(str_field(c, "statusCode"), "403");
        assert_eq!(serde_json::from_str::<Value>(str_field(c, "responsePayload")).unwrap()["error"], "card number");
        let metadata: Value = serde_json::from_str(str_field(c, "metadata")).unwrap();
        assert_eq!(metadata["guardrail_rule"], "pii.credit_card");
        assert_eq!(metadata["guardrail_decision"], "blocked");

        let quiet = client(&fake, |c| c.ingest = false);
        quiet.report_local_block(&call, body, "r", "x").await.unwrap();
        assert_eq!(fake.calls().len(), 1, "no ingestion when ingest is off");
    }

    #[tokio::test]
    async fn app_name_falls_back_to_the_upstream_host() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.app_name = String::new());
        let mut call = call();
        call.workload = None;
        call.host = String::new();
        akto.check_request(&call, "not json").await.unwrap();
        let c = &fake.calls()[0];
        let headers: BTreeMap<String, String> = serde_json::from_str(str_field(c, "requestHeaders")).unwrap();
        assert!(!headers.contains_key("host"));
        assert!(c.body["process_id"].is_null());
        assert_eq!(str_field(c, "metadata"), AGENTIC_TAG);
        assert_eq!(str_field(c, "requestPayload"), r#"{"raw":"not json"}"#);

        call.host = "API.OpenAI.com".into();
        akto.check_request(&call, "{}").await.unwrap();
        let c = &fake.calls()[1];
        let headers: BTreeMap<String, String> = serde_json::from_str(str_field(c, "requestHeaders")).unwrap();
        assert_eq!(headers["host"], "api.openai.com");
    }
}
