//! TLS termination towards the client with leaf certificates minted by our
//! CA for the SNI the client asked for, and the upstream connection pool.

use std::sync::Arc;

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::upstream::UpstreamPool;
use crate::ca::LeafIssuer;

/// Stateful session cache size for client resumption.
const SESSION_CACHE: usize = 4096;

pub struct TlsTermination {
    acceptor: TlsAcceptor,
    issuer: Arc<LeafIssuer>,
    pub pool: UpstreamPool,
}

impl TlsTermination {
    pub fn new(issuer: Arc<LeafIssuer>, pool: UpstreamPool) -> Self {
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver { issuer: Arc::clone(&issuer) }));
        // Offer both; hyper serves whichever the client picks.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        Self { acceptor: TlsAcceptor::from(Arc::new(config)), issuer, pool }
    }

    /// Mints (or finds) the leaf for `sni` off the runtime, then runs the
    /// handshake, whose certificate lookup is then a cache hit.
    pub async fn accept(&self, stream: TcpStream, sni: &str) -> std::io::Result<TlsStream<TcpStream>> {
        self.issuer.certified_key(sni).await.map_err(std::io::Error::other)?;
        self.acceptor.accept(stream).await
    }

    /// Like [`TlsTermination::accept`] for a client that sent no server
    /// name: presents the leaf for `name`, the AI name its destination
    /// address is known by.
    pub async fn accept_as(&self, stream: TcpStream, name: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let key = self.issuer.certified_key(name).await.map_err(std::io::Error::other)?;
        let mut config = rustls::ServerConfig::builder().with_no_client_auth().with_cert_resolver(Arc::new(Fixed(key)));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsAcceptor::from(Arc::new(config)).accept(stream).await
    }
}

/// One certificate whatever the ClientHello says.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

#[derive(Debug)]
struct LeafResolver {
    issuer: Arc<LeafIssuer>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?;
        // Normally warmed by `accept`; mint here only if evicted meanwhile.
        self.issuer.cached(name).or_else(|| self.issuer.issue_blocking(name).ok())
    }
}

/// Whether a failed handshake means the client refused our certificate: it
/// sent a certificate-related alert. A client that merely hangs up
/// mid-handshake (a plain EOF or reset) is not counted: a port scanner, a
/// timeout or a crash does the same, and counting it would let anyone who
/// can abort one handshake exempt a process from inspection.
pub fn is_certificate_rejection(error: &std::io::Error) -> bool {
    use rustls::AlertDescription as A;
    let Some(rustls::Error::AlertReceived(alert)) = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return false;
    };
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
            | A::DecryptError
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_alerts_count_as_rejection_other_errors_do_not() {
        let alert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
        );
        assert!(is_certificate_rejection(&alert));
        // A hang-up is no rejection, whatever the client's reason.
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(!is_certificate_rejection(&eof));
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert!(!is_certificate_rejection(&eof));
        let other = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion),
        );
        assert!(!is_certificate_rejection(&other));
        assert!(!is_certificate_rejection(&std::io::Error::from(std::io::ErrorKind::ConnectionReset)));
    }
}
