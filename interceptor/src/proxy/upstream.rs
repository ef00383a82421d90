//! Connections to the real provider: to the original destination address
//! (never re-resolved), from a socket carrying the proxy's mark, over TLS
//! with the client's SNI, verified against the platform roots plus any
//! configured extra CA. Connections are pooled per (proxy worker, original
//! destination, SNI) by hyper's client; HTTP/2 is used when the provider
//! negotiates it. A worker uses only the connections it opened, which its
//! own event loop drives.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::{TcpSocket, TcpStream};

use super::{BoxBody, ProxyError};
use crate::net;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Upper bound on distinct (worker, destination, SNI) with a live pool entry.
const MAX_POOLS: usize = 4096;

pub type UpstreamClient = Client<HttpsConnector<MarkedConnector>, BoxBody>;

/// Builds the TLS client configuration for upstream connections.
pub fn client_tls_config(extra_ca: Option<&Path>) -> Result<rustls::ClientConfig, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::warn!(%error, "cannot load some platform root certificates");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    if ignored > 0 {
        tracing::debug!(ignored, "unparsable platform root certificates skipped");
    }
    let mut extra = 0;
    if let Some(path) = extra_ca {
        use rustls_pki_types::pem::PemObject as _;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| ProxyError::UpstreamCa { path: path.to_path_buf(), reason: e.to_string() })?;
        for cert in certs {
            let cert = cert.map_err(|e| ProxyError::UpstreamCa { path: path.to_path_buf(), reason: e.to_string() })?;
            roots.add(cert).map_err(|e| ProxyError::UpstreamCa { path: path.to_path_buf(), reason: e.to_string() })?;
            extra += 1;
        }
        if extra == 0 {
            return Err(ProxyError::UpstreamCa {
                path: path.to_path_buf(),
                reason: "no certificate in the file".into(),
            });
        }
    }
    if roots.is_empty() {
        return Err(ProxyError::NoRoots);
    }
    tracing::info!(platform = added, extra, "upstream trust roots loaded");
    Ok(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// Connects TCP to one fixed address, whatever the URI says.
#[derive(Clone)]
pub struct MarkedConnector {
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
}

impl tower_service::Service<Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (dst, mark, timeout) = (self.dst, self.mark, self.timeout);
        Box::pin(async move { connect_upstream(dst, mark, timeout).await.map(TokioIo::new) })
    }
}

/// Connects to `dst` from a socket carrying `mark` (never redirected).
pub async fn connect_upstream(dst: SocketAddr, mark: u32, timeout: Duration) -> Result<TcpStream, ProxyError> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|source| ProxyError::Connect { dst, source })?;
    if mark != 0 {
        net::set_mark(&sock, mark).map_err(ProxyError::Mark)?;
    }
    let stream = tokio::time::timeout(timeout, sock.connect(dst))
        .await
        .map_err(|_| ProxyError::ConnectTimeout { dst, timeout })?
        .map_err(|source| ProxyError::Connect { dst, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The clients for one (destination, SNI): HTTP/1.1 + HTTP/2 by ALPN, and
/// HTTP/1.1 only for upgrades (WebSocket runs over HTTP/1.1).
#[derive(Clone)]
pub struct Upstream {
    pub client: UpstreamClient,
    pub http1: UpstreamClient,
    /// Longest silence from the provider while a response is awaited or
    /// streamed.
    pub idle_timeout: Duration,
    /// Plain HTTP (a plain MCP target): requests go out as `http://`.
    pub plain: bool,
}

/// Pools keyed by (proxy worker, original destination, SNI).
pub struct UpstreamPool {
    tls: rustls::ClientConfig,
    mark: u32,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Shared by every connection to the same key: a client is a few
    /// hundred bytes, which each connection, idle or not, would otherwise
    /// carry twice.
    pools: Mutex<HashMap<(usize, SocketAddr, String), Arc<Upstream>>>,
}

impl UpstreamPool {
    /// `idle_timeout` is the longest silence from the provider (see
    /// [`Upstream::idle_timeout`]; `proxy.upstream_idle_timeout`).
    pub fn new(tls: rustls::ClientConfig, mark: u32, connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self { tls, mark, connect_timeout, idle_timeout, pools: Mutex::new(HashMap::new()) }
    }

    /// The pool of `worker` for `dst` and `sni`. Its connections are
    /// spawned on the runtime of the first request that needs one: a
    /// worker's requests must use the worker's pool, or another worker's
    /// event loop would carry them (a wake-up of another thread each way).
    pub fn get(&self, worker: usize, dst: SocketAddr, sni: &str) -> Result<Arc<Upstream>, ProxyError> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        let key = (worker, dst, sni.to_string());
        if let Some(found) = pools.get(&key) {
            return Ok(Arc::clone(found));
        }
        if pools.len() >= MAX_POOLS {
            // Entries are cheap handles; in-flight requests keep their own
            // clone. Start over rather than grow without bound.
            pools.clear();
        }
        let upstream = Arc::new(Upstream {
            client: self.build(dst, sni, true)?,
            http1: self.build(dst, sni, false)?,
            idle_timeout: self.idle_timeout,
            plain: false,
        });
        pools.insert(key, Arc::clone(&upstream));
        Ok(upstream)
    }

    /// The pool of `worker` for a plain-HTTP destination (a plain MCP
    /// target): HTTP/1.1 without TLS, from marked sockets like the others.
    pub fn get_plain(&self, worker: usize, dst: SocketAddr) -> Arc<Upstream> {
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        // No TLS pool has an empty name (it cannot name a server).
        let key = (worker, dst, String::new());
        if let Some(found) = pools.get(&key) {
            return Arc::clone(found);
        }
        if pools.len() >= MAX_POOLS {
            pools.clear();
        }
        let connector = MarkedConnector { dst, mark: self.mark, timeout: self.connect_timeout };
        // `http://` URIs only ever reach this connector's plain branch.
        let http = HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(http);
        let upstream =
            Arc::new(Upstream { client: client.clone(), http1: client, idle_timeout: self.idle_timeout, plain: true });
        pools.insert(key, Arc::clone(&upstream));
        upstream
    }

    fn build(&self, dst: SocketAddr, sni: &str, h2: bool) -> Result<UpstreamClient, ProxyError> {
        let connector = MarkedConnector { dst, mark: self.mark, timeout: self.connect_timeout };
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_only()
            .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                rustls_pki_types::ServerName::try_from(sni.to_string())
                    .map_err(|_| ProxyError::Sni(sni.to_string()))?,
            ))
            .enable_http1();
        let https =
            if h2 { builder.enable_http2().wrap_connector(connector) } else { builder.wrap_connector(connector) };
        Ok(Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .build(https))
    }
}

/// Arc alias used by the data plane.
pub type SharedPool = Arc<UpstreamPool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_worker_has_pools_of_its_own() {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let pool = UpstreamPool::new(tls, 0, Duration::from_secs(1), Duration::from_secs(1));
        let dst: SocketAddr = "192.0.2.1:443".parse().unwrap();
        let first = pool.get(0, dst, "api.openai.com").unwrap();
        let again = pool.get(0, dst, "api.openai.com").unwrap();
        assert_eq!(pool.pools.lock().unwrap().len(), 1, "one pool per worker, destination and name");
        // One copy of the clients, however many connections hold them.
        assert!(Arc::ptr_eq(&first, &again));
        pool.get(1, dst, "api.openai.com").unwrap();
        let pools = pool.pools.lock().unwrap();
        assert!(
            pools.contains_key(&(0, dst, "api.openai.com".into()))
                && pools.contains_key(&(1, dst, "api.openai.com".into()))
        );
    }
}
