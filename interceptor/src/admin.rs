//! The loopback admin API: `/healthz` (the process answers), `/readyz` (the
//! proxy listens and the redirect is installed with its first target set),
//! `/status` (JSON: mode, attach point, targets, kernel counters, the pod
//! directory's state), `/targets`
//! (the redirected networks and the domains each address came from), `/metrics`
//! (Prometheus), `/events` (the audit events as JSON lines, live, filtered by
//! the query: see [`crate::observe`]).

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    kubernetes::DirectoryStatus,
    metrics::Metrics,
    net::ProxyAddrs,
    observe::{Filter, LiveEvents},
    targets::TargetSet,
};

/// What the control plane publishes for the admin API.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub ready: bool,
    pub redirect_mode: String,
    pub attach_point: String,
    pub proxy: Option<ProxyAddrs>,
    pub targets: TargetSet,
    pub counters: Vec<(&'static str, u64)>,
    /// The Kubernetes pod directory, when it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod_directory: Option<DirectoryStatus>,
}

/// Binds the admin address; serving happens in [`serve`].
/// Shared (`SO_REUSEPORT`) so that a second instance can start during an
/// upgrade; either answers.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    crate::net::shared_listener(addr)
}

pub async fn serve(
    listener: TcpListener,
    status: watch::Receiver<Arc<Status>>,
    metrics: Arc<Metrics>,
    live: LiveEvents,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let status = status.clone();
        let metrics = Arc::clone(&metrics);
        let live = live.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let snapshot = Arc::clone(&status.borrow());
                let response: Response<BoxBody<Bytes, Infallible>> = match req.uri().path() {
                    "/metrics" => Response::builder()
                        .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                        .body(Full::new(Bytes::from(metrics.encode())))
                        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "error\n"))
                        .map(BodyExt::boxed),
                    "/events" => events(&live, req.uri().query()),
                    _ => route(&req, &snapshot).map(BodyExt::boxed),
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn route<B>(req: &Request<B>, status: &Status) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if status.ready => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/targets" => json(&status.targets),
        "/status" => json(status),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "error\n")),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "error\n"),
    }
}

/// `/events`: the live audit events the query's filter accepts.
fn events(live: &LiveEvents, query: Option<&str>) -> Response<BoxBody<Bytes, Infallible>> {
    match Filter::from_query(query) {
        Ok(filter) => Response::builder()
            .header("content-type", "application/x-ndjson")
            .header("cache-control", "no-store")
            .body(live.stream(filter))
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "error\n").map(BodyExt::boxed)),
        Err(error) => {
            let mut resp = Response::new(Full::new(Bytes::from(format!("{error}\n"))).boxed());
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            resp
        }
    }
}

fn text(code: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = code;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_status() {
        let req = Request::get("/readyz").body(()).unwrap();
        assert_eq!(route(&req, &Status::default()).status(), StatusCode::SERVICE_UNAVAILABLE);
        let ready = Status { ready: true, ..Default::default() };
        assert_eq!(route(&req, &ready).status(), StatusCode::OK);
        let req = Request::get("/status").body(()).unwrap();
        assert_eq!(route(&req, &ready).status(), StatusCode::OK);
        let req = Request::get("/nope").body(()).unwrap();
        assert_eq!(route(&req, &ready).status(), StatusCode::NOT_FOUND);
    }
}
