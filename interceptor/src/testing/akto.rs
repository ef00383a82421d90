//! A fake Akto server for tests: answers `POST /api/http-proxy` over plain
//! HTTP (1.1 or 2) with programmable replies, one per direction, and records
//! every call from its own side.
//!
//! Which reply a call gets depends on its query: `guardrails=true` takes the
//! request reply, `response_guardrails=true` the response reply, and an
//! ingest-only call (`ingest_data=true` alone) gets `{"success": true}`.
//! Other paths answer 404. Both replies start as [`Reply::allowed`].
//!
//! The server runs on the current tokio runtime and stops when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::task::{JoinHandle, JoinSet};

use super::{Netns, in_netns};

/// Largest request body the fake reads.
const MAX_BODY: usize = 64 * 1024 * 1024;

/// What the fake answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// 200 with this JSON body.
    Json(Value),
    /// This status with this body (e.g. 422 with `actionErrors`, or 500).
    Status(u16, String),
    /// Waits, then answers with the inner reply (for timeouts).
    Delay(Duration, Box<Reply>),
    /// 200 with a body that is not JSON.
    Garbage,
}

impl Reply {
    /// The 200 envelope around a `guardrailsResult`.
    pub fn guardrails(result: Value) -> Reply {
        Reply::Json(json!({
            "success": true,
            "message": "Guardrails check completed",
            "data": { "guardrailsResult": result }
        }))
    }

    pub fn allowed() -> Reply {
        Reply::guardrails(json!({
            "Allowed": true,
            "Modified": false,
            "ModifiedPayload": "",
            "Reason": ""
        }))
    }

    /// `Allowed: false`, `behaviour: block`, with policy metadata.
    pub fn blocked(reason: &str) -> Reply {
        Reply::guardrails(json!({
            "Allowed": false,
            "Modified": false,
            "ModifiedPayload": "",
            "Reason": reason,
            "behaviour": "block",
            "Metadata": {
                "policy_name": "test-policy",
                "rule_violated": "test-rule",
                "severity": "HIGH"
            }
        }))
    }

    /// `Allowed: false` with the passive `behaviour: alert`.
    pub fn alert(reason: &str) -> Reply {
        Reply::guardrails(json!({
            "Allowed": false,
            "Modified": false,
            "ModifiedPayload": "",
            "Reason": reason,
            "behaviour": "alert",
            "Metadata": {
                "policy_name": "test-policy",
                "rule_violated": "test-rule",
                "severity": "LOW"
            }
        }))
    }

    /// `Modified: true` with this `ModifiedPayload` (a JSON string, as Akto sends it).
    pub fn modified(payload: &str) -> Reply {
        Reply::guardrails(json!({
            "Allowed": true,
            "Modified": true,
            "ModifiedPayload": payload,
            "Reason": "payload redacted",
            "behaviour": "mask"
        }))
    }

    /// What the guardrail service answers when it timed out itself.
    pub fn fail_open() -> Reply {
        Reply::guardrails(json!({
            "Allowed": true,
            "failOpen": true,
            "error": "guardrails service timeout"
        }))
    }

    /// A 422 with these `actionErrors`.
    pub fn rejected(messages: &[&str]) -> Reply {
        Reply::Status(422, json!({ "actionErrors": messages }).to_string())
    }

    /// The form the server answers when both checks ran: the request
    /// verdict at the top with `Allowed` = AND of both, plus `requestResult`
    /// and `responseResult`. Replies without a `guardrailsResult` count as
    /// empty results.
    pub fn merged(request: &Reply, response: &Reply) -> Reply {
        let req = request.guardrails_result().cloned().unwrap_or_else(|| json!({}));
        let resp = response.guardrails_result().cloned().unwrap_or_else(|| json!({}));
        let allowed = |v: &Value| v.get("Allowed").and_then(Value::as_bool).unwrap_or(true);
        let mut top = req.as_object().cloned().unwrap_or_default();
        top.insert("Allowed".into(), Value::Bool(allowed(&req) && allowed(&resp)));
        if !allowed(&resp)
            && let Some(reason) = resp.get("Reason")
        {
            top.insert("Reason".into(), reason.clone());
        }
        top.insert("requestResult".into(), req);
        top.insert("responseResult".into(), resp);
        Reply::guardrails(Value::Object(top))
    }

    /// The same reply with every key inside `guardrailsResult` lower-cased
    /// (as some Akto versions send it).
    pub fn lowercase_keys(self) -> Reply {
        match self {
            Reply::Json(mut v) => {
                if let Some(result) = v.get_mut("data").and_then(|d| d.get_mut("guardrailsResult")) {
                    *result = lowercase(result.take());
                }
                Reply::Json(v)
            }
            Reply::Delay(d, inner) => Reply::Delay(d, Box::new(inner.lowercase_keys())),
            other => other,
        }
    }

    /// The same reply after `delay`.
    pub fn delayed(self, delay: Duration) -> Reply {
        Reply::Delay(delay, Box::new(self))
    }

    fn guardrails_result(&self) -> Option<&Value> {
        match self {
            Reply::Json(v) => v.get("data")?.get("guardrailsResult"),
            Reply::Delay(_, inner) => inner.guardrails_result(),
            _ => None,
        }
    }
}

fn lowercase(value: Value) -> Value {
    match value {
        Value::Object(obj) => Value::Object(obj.into_iter().map(|(k, v)| (k.to_lowercase(), lowercase(v))).collect()),
        other => other,
    }
}

/// One call as the fake saw it.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    pub method: String,
    pub path: String,
    /// The raw query string (without `?`).
    pub query: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Value::String` of the raw text when it is not JSON).
    pub body: Value,
}

impl RecordedCall {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The value of query parameter `name` (not percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
    }
}

#[derive(Debug)]
struct Shared {
    request_reply: Mutex<Reply>,
    response_reply: Mutex<Reply>,
    calls: Mutex<Vec<RecordedCall>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fake Akto `/api/http-proxy`; see the module docs.
pub struct FakeAkto {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for FakeAkto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeAkto").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl FakeAkto {
    /// Serves on `127.0.0.1:0`. Must be called within a tokio runtime.
    pub fn start() -> Result<FakeAkto> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?;
        FakeAkto::serve(listener)
    }

    /// Binds `addr` inside `netns` (the address must already be on one of
    /// its interfaces) and serves there. Must be called within a tokio runtime.
    pub fn start_in(netns: &Netns, addr: SocketAddr) -> Result<FakeAkto> {
        let listener = in_netns(netns, || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", netns.name()))?;
        FakeAkto::serve(listener)
    }

    /// Serves on a caller-made listener. Must be called within a tokio runtime.
    pub fn serve(listener: std::net::TcpListener) -> Result<FakeAkto> {
        tokio::runtime::Handle::try_current().context("the fake Akto needs a tokio runtime (call from within one)")?;
        listener.set_nonblocking(true).context("set listener non-blocking")?;
        let local_addr = listener.local_addr().context("listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("register listener")?;
        let shared = Arc::new(Shared {
            request_reply: Mutex::new(Reply::allowed()),
            response_reply: Mutex::new(Reply::allowed()),
            calls: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(FakeAkto { local_addr, shared, accept })
    }

    /// The base URL to use as `AKTO_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The reply to request checks (`guardrails=true`) from now on.
    pub fn set_request_reply(&self, reply: Reply) {
        *lock(&self.shared.request_reply) = reply;
    }

    /// The reply to response and stream-batch checks (`response_guardrails=true`).
    pub fn set_response_reply(&self, reply: Reply) {
        *lock(&self.shared.response_reply) = reply;
    }

    /// Every call so far, in arrival order (recorded before any delay).
    pub fn calls(&self) -> Vec<RecordedCall> {
        lock(&self.shared.calls).clone()
    }

    pub fn clear_calls(&self) {
        lock(&self.shared.calls).clear();
    }
}

impl Drop for FakeAkto {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Connections live in this set, so aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(req, &shared).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

async fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    if parts.uri.path() != "/api/http-proxy" {
        return json_response(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.into());
    }
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return json_response(StatusCode::BAD_REQUEST, r#"{"error":"unreadable body"}"#.into()),
    };
    let body =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    let call = RecordedCall {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or("").to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        body,
    };
    let reply = if call.query_param("guardrails") == Some("true") {
        lock(&shared.request_reply).clone()
    } else if call.query_param("response_guardrails") == Some("true") {
        lock(&shared.response_reply).clone()
    } else {
        Reply::Json(json!({ "success": true, "message": "ingested", "data": Map::new() }))
    };
    lock(&shared.calls).push(call);

    let mut reply = reply;
    loop {
        match reply {
            Reply::Delay(delay, inner) => {
                tokio::time::sleep(delay).await;
                reply = *inner;
            }
            Reply::Json(v) => return json_response(StatusCode::OK, v.to_string()),
            Reply::Status(code, body) => {
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return json_response(status, body);
            }
            Reply::Garbage => {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"<html>502 Bad Gateway</html>")));
                resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/html"));
                return resp;
            }
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_reply_ands_the_verdicts() {
        let Reply::Json(v) = Reply::merged(&Reply::allowed(), &Reply::blocked("leak")) else {
            panic!("json");
        };
        let r = &v["data"]["guardrailsResult"];
        assert_eq!(r["Allowed"], false);
        assert_eq!(r["Reason"], "leak");
        assert_eq!(r["requestResult"]["Allowed"], true);
        assert_eq!(r["responseResult"]["behaviour"], "block");
    }

    #[test]
    fn lowercase_keys_reaches_nested_objects() {
        let Reply::Delay(_, inner) = Reply::blocked("x").delayed(Duration::from_millis(1)).lowercase_keys() else {
            panic!("delay");
        };
        let Reply::Json(v) = *inner else { panic!("json") };
        let r = &v["data"]["guardrailsResult"];
        assert_eq!(r["allowed"], false);
        assert_eq!(r["metadata"]["policy_name"], "test-policy");
        assert!(r.get("Allowed").is_none());
    }

    #[tokio::test]
    async fn routes_by_query_and_records() {
        let fake = FakeAkto::start().unwrap();
        fake.set_response_reply(Reply::blocked("no"));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let post = |query: &'static str| {
            client
                .post(format!("{}/api/http-proxy?{query}", fake.url()))
                .header("x-request-id", "r1")
                .body(r#"{"path":"/v1"}"#)
                .send()
        };
        let v: Value = post("guardrails=true").await.unwrap().json().await.unwrap();
        assert_eq!(v["data"]["guardrailsResult"]["Allowed"], true);
        let v: Value = post("response_guardrails=true&ingest_data=true").await.unwrap().json().await.unwrap();
        assert_eq!(v["data"]["guardrailsResult"]["Allowed"], false);
        let v: Value = post("ingest_data=true").await.unwrap().json().await.unwrap();
        assert_eq!(v["success"], true);
        let resp = client.post(format!("{}/other", fake.url())).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);

        let calls = fake.calls();
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].header("X-Request-Id"), Some("r1"));
        assert_eq!(calls[1].query_param("ingest_data"), Some("true"));
        assert_eq!(calls[2].body["path"], "/v1");
        fake.clear_calls();
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn status_and_garbage_replies() {
        let fake = FakeAkto::start().unwrap();
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("{}/api/http-proxy?guardrails=true", fake.url());
        fake.set_request_reply(Reply::rejected(&["requestPayload is empty"]));
        let resp = client.post(&url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 422);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["actionErrors"][0], "requestPayload is empty");

        fake.set_request_reply(Reply::Garbage);
        let text = client.post(&url).send().await.unwrap().text().await.unwrap();
        assert!(serde_json::from_str::<Value>(&text).is_err());
    }
}
