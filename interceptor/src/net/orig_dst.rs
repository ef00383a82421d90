//! The port between the data plane and whatever redirects connections to
//! it: per connection, where it was going ([`OrigDstAddr`]) and who opened
//! it ([`Workload`]).
//!
//! The proxy and the DNS forwarder see only [`OrigDstResolver`]; the eBPF
//! and iptables implementations live in `redirect`, which the data plane
//! never imports. [`MockOrigDst`] answers in-process tests.

use std::{future::Future, net::SocketAddr, pin::Pin};

use tokio::net::TcpStream;

use super::{ClientAddr, OrigDstAddr};
use crate::workload::Workload;

/// The redirect mode cannot tell where an accepted connection was going.
#[derive(Debug, thiserror::Error)]
#[error("no original destination for connection from {client}")]
pub struct NoOriginalDst {
    pub client: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// A workload lookup in progress (it may read `/proc`, so it runs off the
/// async threads where it has to).
pub type WorkloadLookup = Pin<Box<dyn Future<Output = Option<Workload>> + Send>>;

/// Per-connection lookups the data plane needs.
pub trait OrigDstResolver: Send + Sync + 'static {
    fn original_dst(&self, sock: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, NoOriginalDst>;
    /// Who opened the connection from `client` to `orig_dst`, when the
    /// redirect mode can tell. Consumes the record: call once per
    /// connection, while it is open.
    fn workload(&self, client: ClientAddr, orig_dst: OrigDstAddr) -> WorkloadLookup;
    /// The server a redirected DNS datagram from `client`, received on
    /// `local`, was sent to; `None` when the mode cannot tell (or the
    /// datagram was not redirected).
    fn dns_original_dst(&self, _client: ClientAddr, _local: SocketAddr) -> Option<OrigDstAddr> {
        None
    }
}

/// A resolver with fixed answers, for in-process tests.
#[cfg(any(test, feature = "testing"))]
pub struct MockOrigDst {
    pub dst: std::sync::Mutex<std::collections::HashMap<SocketAddr, SocketAddr>>,
    pub default: Option<SocketAddr>,
    /// The workload every connection is attributed to.
    pub workload: Option<Workload>,
}

#[cfg(any(test, feature = "testing"))]
impl OrigDstResolver for MockOrigDst {
    fn original_dst(&self, _: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, NoOriginalDst> {
        let map = self.dst.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&client.0)
            .copied()
            .or(self.default)
            .map(OrigDstAddr)
            .ok_or_else(|| NoOriginalDst { client: client.0, source: std::io::ErrorKind::NotFound.into() })
    }

    fn workload(&self, _: ClientAddr, _: OrigDstAddr) -> WorkloadLookup {
        Box::pin(std::future::ready(self.workload.clone()))
    }
}
