//! [`AktoClient`]: one pooled keep-alive HTTP client for Akto's
//! `/api/http-proxy`, the four calls (request, response, stream batch,
//! ingest), their timeouts, and the circuit breaker around them. Never
//! retries; never logs bodies or the token.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::{
    app_name::AppName,
    config::{GuardrailsConfig, StreamMode, akto::endpoint_url},
};

use super::{
    AktoConfig, AktoError, CheckKind,
    breaker::{Breaker, CircuitState, Transition},
    shield,
    wire::{
        CallInfo, MAX_ERROR_BODY, RemoteVerdict, Stamp, action_errors, parse_verdict, request_payload, truncate_lossy,
    },
};

/// Headers the guardrail service reads session ids from; copied from the
/// intercepted request onto the check call itself as well.
const SESSION_HEADERS: &[&str] = &["x-session-id", "x-conversation-id", "x-user-id"];
/// Largest reply read from Akto (a `ModifiedPayload` can be as big as a prompt).
const MAX_REPLY: usize = 64 * 1024 * 1024;

/// Client for Akto's `/api/http-proxy`. Cheap to share behind an `Arc`; one
/// pooled keep-alive HTTP client for every call.
pub struct AktoClient {
    http: reqwest::Client,
    endpoint: reqwest::Url,
    request_url: reqwest::Url,
    response_url: reqwest::Url,
    ingest_url: reqwest::Url,
    token: Option<HeaderValue>,
    /// The app name template (`app_name`), rendered per call for the `host`
    /// request header.
    app_name: AppName,
    cfg: AktoConfig,
    breaker: Breaker,
}

impl fmt::Debug for AktoClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AktoClient")
            .field("endpoint", &self.endpoint.as_str())
            .field("app_name", &self.app_name.to_string())
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
        let app_name =
            AppName::parse(&cfg.app_name).map_err(|e| AktoError::InvalidConfig { errors: vec![e.to_string()] })?;
        let breaker = Breaker::new(cfg.circuit_failures, cfg.circuit_cooldown);
        Ok(Self { http, endpoint, request_url, response_url, ingest_url, token, app_name, cfg, breaker })
    }

    /// The addon's start-up line (`[AKTO] starting | url=… | mode=… |
    /// threshold=… | log_payloads=… | stream_timeout=…`), with what the
    /// guardrail settings `g` add: fail modes, the overlap, the backend
    /// order. The token is named only as set or not.
    pub fn log_settings(&self, g: &GuardrailsConfig) {
        let mode = match g.stream_mode {
            StreamMode::Monitor => "async",
            StreamMode::Enforce => "sync",
        };
        tracing::info!(
            url = %self.endpoint,
            app_name = %self.cfg.app_name,
            token = self.token.is_some(),
            mode,
            stream_mode = ?g.stream_mode,
            threshold = g.stream_window,
            overlap = g.stream_overlap,
            log_payloads = self.cfg.log_payloads,
            request_timeout = ?self.cfg.request_timeout,
            stream_timeout = ?self.cfg.stream_timeout,
            fail_mode_request = ?g.fail_mode_request,
            fail_mode_response = ?g.fail_mode_response,
            block_on_disallowed = self.cfg.block_on_disallowed,
            ingest = self.cfg.ingest,
            backends = ?g.backends,
            "akto backend ready"
        );
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

    /// Checks a request body (`guardrails=true`) before it goes upstream:
    /// `call.request_body`, with `doc` its parsed form when known (see
    /// [`request_payload`]).
    pub async fn check_request(&self, call: &CallInfo, doc: Option<&Value>) -> Result<RemoteVerdict, AktoError> {
        let payload = request_payload_of(call, doc)?;
        let body = self.stamp().body(call, payload, None, &[], String::new(), &[])?;
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
        let payload = match call.mcp {
            None => request_payload(None, &call.request_body)?,
            Some(_) => {
                let answer = serde_json::from_str::<Value>(response_payload).ok();
                shield::answered_request(&call.request_body, answer.as_ref())?
            }
        };
        let body = self.stamp().body(
            call,
            payload,
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
        let (request, payload) = match call.mcp {
            None => {
                let payload = json!({"content": [{"type": "text", "text": text}]});
                let payload = serde_json::to_string(&payload).map_err(AktoError::Encode)?;
                (request_payload(None, &call.request_body)?, payload)
            }
            Some(_) => {
                let id = shield::request_id(&call.request_body);
                (shield::answered_request(&call.request_body, None)?, shield::stream_payload(text, id.as_ref())?)
            }
        };
        let body = self.stamp().body(call, request, Some(response_status), response_headers, payload, &[])?;
        self.check(CheckKind::StreamBatch, call, body, self.cfg.stream_timeout).await
    }

    /// Ingests an exchange without asking for a verdict (`ingest_data=true`
    /// only): `call.request_body` (`doc` its parsed form, when known) and
    /// the response. `annotations` are added to the `metadata` JSON string.
    /// A no-op when ingestion is off.
    pub async fn ingest(
        &self,
        call: &CallInfo,
        doc: Option<&Value>,
        response_status: u16,
        response_headers: &[(String, String)],
        response_payload: &str,
        annotations: &[(&str, &str)],
    ) -> Result<(), AktoError> {
        if !self.cfg.ingest {
            return Ok(());
        }
        let body = self.stamp().body(
            call,
            request_payload_of(call, doc)?,
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
    /// `403 {"error": <reason>}` the client got (an MCP call: the 403 the
    /// shield reports a blocked call with), and the rule in `metadata`
    /// (`guardrail_decision`, `guardrail_source`, `guardrail_rule`,
    /// `guardrail_reason`).
    pub async fn report_local_block(
        &self,
        call: &CallInfo,
        doc: Option<&Value>,
        rule: &str,
        reason: &str,
    ) -> Result<(), AktoError> {
        let (mut headers, response) = match call.mcp {
            None => {
                let response = serde_json::to_string(&json!({ "error": reason })).map_err(AktoError::Encode)?;
                (vec![("content-type".to_owned(), "application/json".to_owned())], response)
            }
            Some(_) => shield::blocked_response(reason)?,
        };
        headers.push(("x-akto-guardrails-decision".to_owned(), "blocked".to_owned()));
        let annotations = [
            ("guardrail_decision", "blocked"),
            ("guardrail_source", "local"),
            ("guardrail_rule", rule),
            ("guardrail_reason", reason),
        ];
        self.ingest(call, doc, 403, &headers, &response, &annotations).await
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
            Ok(v) if v.unjudged() => tracing::warn!(
                check = kind.as_str(),
                request_id = %call.request_id,
                latency_ms,
                decision = v.decision(),
                error = v.error.as_deref().unwrap_or(""),
                "akto verdict: its guardrail service did not judge; the fail mode decides"
            ),
            // The addon's per-check lines (`REQUEST | agent=… | POST host/path`,
            // `response | request | status=200 | latency=…`, `decision=BLOCKED
            // | <reason>`, `alert | behaviour=…`) as one event.
            Ok(v) => tracing::info!(
                check = kind.as_str(),
                request_id = %call.request_id,
                client = %call.client_ip.map(|ip| ip.to_canonical().to_string()).unwrap_or_default(),
                method = %call.method,
                host = %call.host,
                path = %call.recorded_path,
                latency_ms,
                decision = v.decision(),
                behaviour = v.behaviour.as_deref().unwrap_or(""),
                reason = v.reason.as_deref().unwrap_or(""),
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
        if self.cfg.log_payloads {
            // The addon's `AKTO_LOG_PAYLOADS`. The body holds no credential
            // (they are dropped from it); the token is a header, never logged.
            tracing::info!(
                check = kind.as_str(),
                request_id = %call.request_id,
                url = %url,
                body = %String::from_utf8_lossy(&body),
                "akto call"
            );
        }
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
        if self.cfg.log_payloads {
            tracing::info!(
                check = kind.as_str(),
                request_id = %call.request_id,
                status = status.as_u16(),
                body = %String::from_utf8_lossy(&reply),
                "akto reply"
            );
        }
        if status.is_success() {
            return Ok(reply);
        }
        if status.as_u16() == 422 {
            return Err(AktoError::Rejected { check: kind, messages: action_errors(&reply) });
        }
        Err(AktoError::Status { check: kind, status: status.as_u16(), body: truncate_lossy(&reply, MAX_ERROR_BODY) })
    }

    fn stamp(&self) -> Stamp<'_> {
        Stamp { cfg: &self.cfg, app_name: &self.app_name }
    }
}

/// `requestPayload` of a request check or an ingest: the addon's form, or
/// for an MCP call the JSON-RPC body itself.
fn request_payload_of(call: &CallInfo, doc: Option<&Value>) -> Result<String, AktoError> {
    match call.mcp {
        None => request_payload(doc, &call.request_body),
        Some(_) => shield::request_payload(doc, &call.request_body),
    }
}

#[cfg(test)]
#[cfg(feature = "testing")]
mod wire_tests {
    use std::collections::BTreeMap;

    use serde_json::Value;

    use super::*;
    use crate::testing::akto::{FakeAkto, RecordedCall, Reply};
    use crate::{
        guardrails::akto::{merge_modified_payload, wire::AGENTIC_TAG},
        workload::Workload,
    };

    fn config(fake: &FakeAkto) -> AktoConfig {
        AktoConfig { url: fake.url(), app_name: "My Agent_1".into(), ..AktoConfig::default() }
    }

    fn call() -> CallInfo {
        CallInfo {
            request_id: "req-123".into(),
            method: "POST".into(),
            path: "/v1beta/models/gemini:generateContent?key=AIzaLEAKED&alt=sse".into(),
            recorded_path: "/v1beta/models/gemini:generateContent?key=REDACTED&alt=sse".into(),
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
                ..Default::default()
            }),
            mcp: None,
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
        let v = akto.check_request(&call, None).await.unwrap();
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
        let v = akto.check_request(&call, None).await.unwrap();
        assert!(v.block && !v.allowed);
        assert_eq!(v.reason.as_deref(), Some("injection detected"));
        assert!(v.rule.is_some() && v.policy.is_some() && v.severity.is_some());

        fake.set_request_reply(Reply::blocked("lower").lowercase_keys());
        let v = akto.check_request(&call, None).await.unwrap();
        assert!(v.block);
        assert_eq!(v.reason.as_deref(), Some("lower"));

        fake.set_request_reply(Reply::modified(r#"{"messages":[{"role":"user","content":"[X]"}]}"#));
        let v = akto.check_request(&call, None).await.unwrap();
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
        assert!(!akto.check_request(&call, None).await.unwrap().block);

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
        match akto.check_request(&call, None).await {
            Err(AktoError::Rejected { check: CheckKind::Request, messages }) => {
                assert_eq!(messages, vec!["requestPayload is empty"]);
            }
            other => panic!("{other:?}"),
        }

        fake.set_request_reply(Reply::Status(500, "boom".into()));
        match akto.check_request(&call, None).await {
            Err(AktoError::Status { status: 500, body, .. }) => assert_eq!(body, "boom"),
            other => panic!("{other:?}"),
        }

        fake.set_request_reply(Reply::Garbage);
        let err = akto.check_request(&call, None).await.unwrap_err();
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
        let err = akto.check_request(&call(), None).await.unwrap_err();
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
            assert!(matches!(akto.check_request(&call, None).await, Err(AktoError::Status { .. })));
        }
        assert_eq!(akto.circuit_state(), CircuitState::Open);
        let err = akto.check_request(&call, None).await.unwrap_err();
        assert!(matches!(err, AktoError::CircuitOpen { .. }), "{err:?}");
        assert_eq!(fake.calls().len(), 2, "an open circuit makes no network call");

        // After the cooldown one probe goes through and closes the circuit.
        tokio::time::sleep(cooldown).await;
        fake.set_request_reply(Reply::allowed());
        assert!(akto.check_request(&call, None).await.unwrap().allowed);
        assert_eq!(akto.circuit_state(), CircuitState::Closed);
        assert_eq!(fake.calls().len(), 3);

        // A 422 is the request's fault and does not count.
        fake.set_request_reply(Reply::rejected(&["bad"]));
        for _ in 0..3 {
            assert!(matches!(akto.check_request(&call, None).await, Err(AktoError::Rejected { .. })));
        }
        assert_eq!(akto.circuit_state(), CircuitState::Closed);
    }

    #[tokio::test]
    async fn local_block_is_ingested_without_a_verdict() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |_| {});
        let call = call();
        akto.report_local_block(&call, None, "pii.credit_card", "card number").await.unwrap();
        let c = &fake.calls()[0];
        assert_shape(c);
        assert_eq!(c.query, "ingest_data=true");
        assert_eq!(str_field(c, "statusCode"), "403");
        assert_eq!(serde_json::from_str::<Value>(str_field(c, "responsePayload")).unwrap()["error"], "card number");
        let metadata: Value = serde_json::from_str(str_field(c, "metadata")).unwrap();
        assert_eq!(metadata["guardrail_rule"], "pii.credit_card");
        assert_eq!(metadata["guardrail_decision"], "blocked");

        let quiet = client(&fake, |c| c.ingest = false);
        quiet.report_local_block(&call, None, "r", "x").await.unwrap();
        assert_eq!(fake.calls().len(), 1, "no ingestion when ingest is off");
    }

    #[tokio::test]
    async fn a_body_without_messages_is_sent_parsed_and_wrapped_once() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |_| {});
        let mut call = call();
        let body = json!({"model": "gpt-4.1", "input": "hi \"there\""});
        call.request_body = Bytes::from(body.to_string());
        akto.check_request(&call, None).await.unwrap();
        akto.check_request(&call, Some(&body)).await.unwrap();
        akto.check_response(&call, 200, &[], "{}").await.unwrap();
        akto.check_stream_batch(&call, 200, &[], "x").await.unwrap();
        let calls = fake.calls();
        assert_eq!(calls.len(), 4);
        for c in &calls {
            let payload: Value = serde_json::from_str(str_field(c, "requestPayload")).unwrap();
            assert_eq!(payload, json!({ "raw": body }), "{}", c.query);
        }
    }

    #[tokio::test]
    async fn app_name_falls_back_to_the_upstream_host() {
        let fake = FakeAkto::start().unwrap();
        let akto = client(&fake, |c| c.app_name = String::new());
        let mut call = call();
        call.workload = None;
        call.host = String::new();
        call.request_body = Bytes::from_static(b"not json");
        akto.check_request(&call, None).await.unwrap();
        let c = &fake.calls()[0];
        let headers: BTreeMap<String, String> = serde_json::from_str(str_field(c, "requestHeaders")).unwrap();
        assert!(!headers.contains_key("host"));
        assert!(c.body["process_id"].is_null());
        assert_eq!(str_field(c, "metadata"), AGENTIC_TAG);
        assert_eq!(str_field(c, "requestPayload"), r#"{"raw":"not json"}"#);

        call.host = "API.OpenAI.com".into();
        akto.check_request(&call, None).await.unwrap();
        let c = &fake.calls()[1];
        let headers: BTreeMap<String, String> = serde_json::from_str(str_field(c, "requestHeaders")).unwrap();
        assert_eq!(headers["host"], "api.openai.com");
    }
}
