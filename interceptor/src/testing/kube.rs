//! A fake Kubernetes API server for tests: `GET /api/v1/pods` over plain
//! HTTP/1.1, as a list (`PodList` with a `resourceVersion`) or as a watch
//! (`watch=true`: one JSON event per line, `ADDED`, `MODIFIED`, `DELETED`),
//! filtered by the `spec.nodeName=` field selector, and recording every
//! request's query from its own side.
//!
//! Pods are changed with [`FakeKubeApi::apply`] and [`FakeKubeApi::delete`];
//! each change bumps the resource version and reaches the open watches.
//! [`FakeKubeApi::expire`] compacts the history: open watches get a `410
//! Gone` error event and end, and a watch from an older version gets the same
//! (a client must list again). [`Availability`] takes the server down (every
//! connection closed unanswered, open watches ended) or makes it refuse
//! (`403 Forbidden`, as a missing RBAC binding does).
//!
//! The server runs on the current tokio runtime and stops when dropped.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::{Netns, in_netns};

/// Whether the fake answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Availability {
    Up,
    /// Every connection is closed before a response (a crashed or
    /// unreachable API server).
    Down,
    /// Every request gets `403 Forbidden` (the service account may not list
    /// pods).
    Forbidden,
}

/// A pod as the fake serves it.
#[derive(Clone, Debug, Default)]
pub struct FakePod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// (name, runtime id) of each running container; the status reports the
    /// id as `containerd://<id>`.
    pub containers: Vec<(String, String)>,
}

impl FakePod {
    pub fn new(uid: &str, name: &str, namespace: &str, node: &str) -> Self {
        Self {
            uid: uid.into(),
            name: name.into(),
            namespace: namespace.into(),
            node: node.into(),
            service_account: Some("default".into()),
            ..Self::default()
        }
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn service_account(mut self, name: &str) -> Self {
        self.service_account = Some(name.into());
        self
    }

    pub fn container(mut self, name: &str, id: &str) -> Self {
        self.containers.push((name.into(), id.into()));
        self
    }

    /// The pod as the API server writes it, at `resource_version`.
    pub fn to_json(&self, resource_version: u64) -> Value {
        let containers: Vec<Value> =
            self.containers.iter().map(|(name, _)| json!({ "name": name, "image": "example/agent:1" })).collect();
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, id)| {
                json!({
                    "name": name,
                    "containerID": format!("containerd://{id}"),
                    "image": "example/agent:1",
                    "imageID": "example/agent@sha256:00",
                    "ready": true,
                    "restartCount": 0,
                    "started": true,
                    "state": { "running": { "startedAt": "2025-01-01T00:00:00Z" } }
                })
            })
            .collect();
        let mut spec = json!({ "nodeName": self.node, "containers": containers });
        if let Some(sa) = &self.service_account {
            spec["serviceAccountName"] = Value::String(sa.clone());
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": resource_version.to_string(),
                "labels": self.labels,
            },
            "spec": spec,
            "status": { "phase": "Running", "containerStatuses": statuses }
        })
    }
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct KubeRequest {
    pub path: String,
    /// Query parameters, percent-decoded, in order.
    pub query: Vec<(String, String)>,
}

impl KubeRequest {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch") == Some("true") || self.param("watch") == Some("1")
    }
}

struct State {
    availability: Availability,
    resource_version: u64,
    /// Versions at or below this one are compacted: a watch from them gets 410.
    compacted: u64,
    pods: BTreeMap<String, (u64, FakePod)>,
    /// (version, node, event line) of every change after `compacted`.
    history: Vec<(u64, String, Bytes)>,
    /// Open watches: the node each follows, and where its lines go.
    watches: Vec<(Option<String>, mpsc::UnboundedSender<Bytes>)>,
    requests: Vec<KubeRequest>,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every request, so tests can wait for one.
    seen: watch::Sender<usize>,
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A fake Kubernetes API server; see the module docs.
pub struct FakeKubeApi {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl FakeKubeApi {
    /// Serves on `127.0.0.1:0`. Must be called within a tokio runtime.
    pub fn start() -> Result<Self> {
        Self::serve(std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0")?)
    }

    /// Binds `addr` inside `netns` and serves there. Must be called within a
    /// tokio runtime.
    pub fn start_in(netns: &Netns, addr: SocketAddr) -> Result<Self> {
        let listener = in_netns(netns, || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", netns.name()))?;
        Self::serve(listener)
    }

    /// Serves on a caller-made listener. Must be called within a tokio runtime.
    pub fn serve(listener: std::net::TcpListener) -> Result<Self> {
        tokio::runtime::Handle::try_current().context("the fake API server needs a tokio runtime")?;
        listener.set_nonblocking(true).context("set listener non-blocking")?;
        let local_addr = listener.local_addr().context("listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("register listener")?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                availability: Availability::Up,
                resource_version: 1,
                compacted: 0,
                pods: BTreeMap::new(),
                history: Vec::new(),
                watches: Vec::new(),
                requests: Vec::new(),
            }),
            seen: watch::channel(0).0,
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Self { local_addr, shared, accept })
    }

    /// The base URL (`kubernetes.api_url`).
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// Adds `pod`, or replaces the pod with its UID (`ADDED` or `MODIFIED`).
    pub fn apply(&self, pod: FakePod) {
        let mut state = lock(&self.shared);
        state.resource_version += 1;
        let rv = state.resource_version;
        let kind = if state.pods.contains_key(&pod.uid) { "MODIFIED" } else { "ADDED" };
        let line = event_line(kind, &pod.to_json(rv));
        let node = pod.node.clone();
        state.pods.insert(pod.uid.clone(), (rv, pod));
        publish(&mut state, rv, node, line);
    }

    /// Removes the pod with `uid` (`DELETED`); false when there is none.
    pub fn delete(&self, uid: &str) -> bool {
        let mut state = lock(&self.shared);
        let Some((_, pod)) = state.pods.remove(uid) else { return false };
        state.resource_version += 1;
        let rv = state.resource_version;
        let line = event_line("DELETED", &pod.to_json(rv));
        publish(&mut state, rv, pod.node, line);
        true
    }

    /// Compacts the history: open watches get `410 Gone` and end, and so does
    /// any later watch from a version before now.
    pub fn expire(&self) {
        let mut state = lock(&self.shared);
        state.compacted = state.resource_version;
        state.history.clear();
        for (_, tx) in state.watches.drain(..) {
            let _ = tx.send(gone_line());
        }
    }

    pub fn set_availability(&self, availability: Availability) {
        let mut state = lock(&self.shared);
        state.availability = availability;
        if availability != Availability::Up {
            // Dropping the senders ends the open watch responses.
            state.watches.clear();
        }
    }

    /// Every request answered or refused so far, in arrival order.
    pub fn requests(&self) -> Vec<KubeRequest> {
        lock(&self.shared).requests.clone()
    }

    /// How many lists (not watches) were answered.
    pub fn lists(&self) -> usize {
        lock(&self.shared).requests.iter().filter(|r| !r.is_watch()).count()
    }

    /// Waits until the requests so far satisfy `pred` (bounded by `timeout`).
    pub async fn wait_until(&self, timeout: std::time::Duration, pred: impl Fn(&[KubeRequest]) -> bool) -> Result<()> {
        let mut seen = self.shared.seen.subscribe();
        let waited = tokio::time::timeout(timeout, async {
            loop {
                if pred(&lock(&self.shared).requests) {
                    return true;
                }
                if seen.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        match waited {
            Ok(true) => Ok(()),
            _ => {
                anyhow::bail!("the fake API server's requests never matched within {timeout:?}: {:?}", self.requests())
            }
        }
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn gone_line() -> Bytes {
    event_line(
        "ERROR",
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": "too old resource version",
            "reason": "Expired",
            "code": 410
        }),
    )
}

fn publish(state: &mut State, rv: u64, node: String, line: Bytes) {
    state.watches.retain(|(follows, tx)| follows.as_ref().is_some_and(|n| *n != node) || tx.send(line.clone()).is_ok());
    state.history.push((rv, node, line));
}

async fn accept_loop(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // Connections live in this set, so aborting this task ends them too.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                if lock(&shared).availability == Availability::Down {
                    drop(stream);
                    continue;
                }
                let shared = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = Arc::clone(&shared);
                        async move { Ok::<_, Infallible>(handle(req, &shared)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn handle(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let query: Vec<(String, String)> = reqwest::Url::parse(&format!("http://fake{}", req.uri()))
        .map(|u| u.query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
        .unwrap_or_default();
    let request = KubeRequest { path: req.uri().path().to_owned(), query };
    let response = {
        let mut state = lock(shared);
        state.requests.push(request.clone());
        respond(&mut state, &request)
    };
    shared.seen.send_modify(|n| *n += 1);
    response
}

fn respond(state: &mut State, request: &KubeRequest) -> Response<Body> {
    match state.availability {
        Availability::Up => {}
        // The connection was accepted before the server went down.
        Availability::Down => return status(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "down"),
        Availability::Forbidden => {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                "pods is forbidden: User \"system:serviceaccount:interceptor:interceptor\" cannot list resource \
                 \"pods\" in API group \"\" at the cluster scope",
            );
        }
    }
    if request.path != "/api/v1/pods" {
        return status(StatusCode::NOT_FOUND, "NotFound", "the server could not find the requested resource");
    }
    let node = request.param("fieldSelector").and_then(|s| s.strip_prefix("spec.nodeName=")).map(str::to_owned);
    let on_node = |n: &str| node.as_deref().is_none_or(|want| want == n);
    if !request.is_watch() {
        let items: Vec<Value> =
            state.pods.values().filter(|(_, p)| on_node(&p.node)).map(|(rv, p)| p.to_json(*rv)).collect();
        let list = json!({
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": { "resourceVersion": state.resource_version.to_string() },
            "items": items
        });
        return json_response(StatusCode::OK, list.to_string());
    }
    let from: u64 = request.param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let (tx, rx) = mpsc::unbounded_channel();
    if from < state.compacted {
        let _ = tx.send(gone_line());
        drop(tx);
    } else {
        for (rv, n, line) in &state.history {
            if *rv > from && on_node(n) {
                let _ = tx.send(line.clone());
            }
        }
        state.watches.push((node, tx));
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
    });
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16()
    });
    json_response(code, body.to_string())
}

fn json_response(code: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(BodyExt::boxed(Full::new(Bytes::from(body))));
    *resp.status_mut() = code;
    resp.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The next line of a streamed body (bounded wait).
    async fn next_line(resp: &mut reqwest::Response, pending: &mut String) -> String {
        loop {
            if let Some(i) = pending.find('\n') {
                let line = pending[..i].to_owned();
                pending.drain(..=i);
                return line;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await.unwrap().unwrap().unwrap();
            pending.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    #[tokio::test]
    async fn lists_filter_by_node_and_watches_follow_changes() {
        let api = FakeKubeApi::start().unwrap();
        api.apply(FakePod::new("u1", "a", "ns", "node-a").container("c", "abc"));
        api.apply(FakePod::new("u2", "b", "ns", "node-b"));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let pods = format!("{}/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a", api.url());
        let list: Value = client.get(&pods).send().await.unwrap().json().await.unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), 1);
        assert_eq!(list["items"][0]["status"]["containerStatuses"][0]["containerID"], "containerd://abc");
        let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_owned();

        let mut resp = client.get(format!("{pods}&watch=true&resourceVersion={rv}")).send().await.unwrap();
        api.apply(FakePod::new("u3", "c", "ns", "node-b"));
        api.apply(FakePod::new("u1", "a", "ns", "node-a").label("x", "y"));
        assert!(api.delete("u1"));
        let mut pending = String::new();
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let event: Value = serde_json::from_str(&next_line(&mut resp, &mut pending).await).unwrap();
            assert_eq!(event["object"]["metadata"]["uid"], "u1", "other nodes' pods are not sent: {event}");
            kinds.push(event["type"].as_str().unwrap().to_owned());
        }
        assert_eq!(kinds, ["MODIFIED", "DELETED"]);
        api.expire();
        let line = next_line(&mut resp, &mut pending).await;
        assert!(line.contains("\"code\":410"), "{line}");
        assert_eq!(api.requests()[0].param("fieldSelector"), Some("spec.nodeName=node-a"));
        assert_eq!(api.lists(), 1);

        api.set_availability(Availability::Forbidden);
        let resp = client.get(format!("{}/api/v1/pods", api.url())).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        api.set_availability(Availability::Down);
        // A new connection: a pooled one would be answered 503.
        let fresh = reqwest::Client::builder().no_proxy().build().unwrap();
        assert!(fresh.get(format!("{}/api/v1/pods", api.url())).send().await.is_err());
    }
}
