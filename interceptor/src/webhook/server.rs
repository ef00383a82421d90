//! The webhook's HTTPS server: `POST /mutate` answers AdmissionReviews,
//! `GET /healthz` answers the kubelet's probes.
//!
//! Bounded everywhere: the handshake and the request head must arrive in
//! [`HANDSHAKE_TIMEOUT`], the body is read up to [`MAX_BODY`] (an
//! AdmissionReview for the largest pod etcd stores is about 3 MiB). A body
//! it cannot read gets `allowed: true` all the same.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::WebhookError;
use super::mutate::{InjectSettings, review};

/// Largest AdmissionReview read.
pub const MAX_BODY: usize = 8 << 20;
/// Time for the TLS handshake, and for a request head.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 256;

/// A bound webhook, ready to serve.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    settings: Arc<InjectSettings>,
}

impl WebhookServer {
    /// Binds `addr` with the serving certificate chain and key (PEM files).
    pub async fn bind(
        addr: SocketAddr,
        cert: &Path,
        key: &Path,
        settings: InjectSettings,
    ) -> Result<Self, WebhookError> {
        let acceptor = acceptor(cert, key)?;
        let listener = TcpListener::bind(addr).await.map_err(|source| WebhookError::Bind { addr, source })?;
        Ok(Self { listener, acceptor, settings: Arc::new(settings) })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, WebhookError> {
    let read =
        |path: &Path| std::fs::read(path).map_err(|source| WebhookError::Read { path: path.to_path_buf(), source });
    let cert_pem = read(cert)?;
    let mut chain = Vec::new();
    for item in CertificateDer::pem_slice_iter(&cert_pem) {
        chain.push(item.map_err(|source| WebhookError::Pem {
            path: cert.to_path_buf(),
            what: "certificate",
            source,
        })?);
    }
    if chain.is_empty() {
        return Err(WebhookError::Empty { path: cert.to_path_buf(), what: "certificate" });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| WebhookError::Pem {
        path: key.to_path_buf(),
        what: "private key",
        source,
    })?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|source| WebhookError::Tls { source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves until the task is dropped. Never returns an error for one
/// connection: each is logged and dropped.
pub async fn serve(server: WebhookServer) {
    let WebhookServer { listener, acceptor, settings } = server;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "webhook accept failed");
                // Out of file descriptors, say: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let settings = Arc::clone(&settings);
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "webhook tls handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "webhook tls handshake timed out");
                    return;
                }
            };
            let service = service_fn(move |req| {
                let settings = Arc::clone(&settings);
                async move { Ok::<_, Infallible>(route(req, &settings).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "webhook connection ended with an error");
            }
        });
    }
}

async fn route(req: Request<Incoming>, settings: &InjectSettings) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
        (&Method::POST, "/mutate") => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(error) => {
                    tracing::warn!(%error, "cannot read an admission review; allowing it unchanged");
                    Bytes::new()
                }
            };
            let (answer, outcome) = review(&body, settings);
            let uid = answer["response"]["uid"].as_str().unwrap_or_default();
            tracing::info!(uid, outcome = %outcome, "admission review");
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            reply(StatusCode::OK, "application/json", Bytes::from(bytes))
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"not found\n")),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}
