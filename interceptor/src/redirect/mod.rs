//! Sending target connections to the proxy, and finding out afterwards where
//! they were going and who opened them.
//!
//! A [`Redirector`] owns the kernel state (eBPF programs or iptables rules):
//! it installs it, updates the target set, and removes it. An
//! [`OrigDstResolver`] is what the data plane uses per connection; it never
//! names eBPF or iptables.

pub mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod liveness;
pub mod owner;
pub mod sockdiag;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc};

use serde::Serialize;
use tokio::net::TcpStream;

use crate::{
    net::{self, ClientAddr, OrigDstAddr},
    targets::TargetSet,
};

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot load the eBPF programs")]
    Load(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot attach {program} to {path}")]
    Attach {
        program: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot update eBPF map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pinned redirect state in bpffs: {0}")]
    Pin(String),
    #[error("no original destination for connection from {client}")]
    NoOriginalDst {
        client: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Where the proxy listens: the addresses connections are rewritten to.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ProxyAddrs {
    pub v4: std::net::SocketAddrV4,
    pub v6: Option<std::net::SocketAddrV6>,
    pub mark: u32,
}

impl ProxyAddrs {
    /// Whether `addr` is one of the proxy's own listening addresses.
    pub fn is_proxy(&self, addr: SocketAddr) -> bool {
        match net::canonical(addr) {
            SocketAddr::V4(a) => a == self.v4,
            SocketAddr::V6(a) => self.v6.is_some_and(|v6| v6.ip() == a.ip() && v6.port() == a.port()),
        }
    }
}

/// The process that opened a redirected connection: as the kernel saw it at
/// `connect()` time (eBPF mode), or as its socket shows it when the proxy
/// accepts the connection (iptables mode). A `pid` of 0 means the process
/// was not found (then `comm` is empty) though the socket was: its `uid`
/// and `cgroup_id` still hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
}

impl Workload {
    /// Whether the process is known (not only its socket's uid and cgroup).
    pub fn has_process(&self) -> bool {
        self.pid != 0 && !self.comm.is_empty()
    }
}

/// A workload lookup in progress (it may read `/proc`, so it runs off the
/// async threads where it has to).
pub type WorkloadLookup = Pin<Box<dyn Future<Output = Option<Workload>> + Send>>;

/// Per-connection lookups the data plane needs.
pub trait OrigDstResolver: Send + Sync + 'static {
    fn original_dst(&self, sock: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, RedirectError>;
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

/// Finds a redirected DNS datagram's server from its client's address and
/// the address it was received on.
pub type DnsOrigLookup = Arc<dyn Fn(ClientAddr, SocketAddr) -> Option<SocketAddr> + Send + Sync>;

/// Kernel state that sends target connections to the proxy.
pub trait Redirector: Send {
    fn mode(&self) -> &'static str;
    /// Human-readable attach point, for logs and status.
    fn attach_point(&self) -> String;
    /// Replaces the target set; takes effect for new connections at once.
    fn set_targets(&mut self, targets: &TargetSet) -> Result<(), RedirectError>;
    /// Removes every trace from the kernel. Idempotent.
    fn uninstall(&mut self) -> Result<(), RedirectError>;
    /// The resolver matching this redirect mode.
    fn resolver(&self) -> Arc<dyn OrigDstResolver>;
    /// The heartbeat that keeps the redirect on, if the mode has one: the
    /// caller beats it every `interval()` while the proxy is healthy.
    fn liveness(&self) -> Option<Arc<dyn Liveness>> {
        None
    }
    /// Kernel-side counters, if the mode has them.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

/// Proof of life the redirect needs from the proxy (see [`liveness`]).
pub trait Liveness: Send + Sync {
    fn interval(&self) -> std::time::Duration;
    fn beat(&self);
}

/// Answers from `SO_ORIGINAL_DST`: conntrack in iptables mode, our getsockopt
/// program in eBPF mode. Optionally consults a workload table.
pub struct SockoptResolver {
    workloads: Option<Arc<dyn Fn(ClientAddr) -> Option<Workload> + Send + Sync>>,
    dns: Option<DnsOrigLookup>,
}

impl SockoptResolver {
    pub fn new(workloads: Option<Arc<dyn Fn(ClientAddr) -> Option<Workload> + Send + Sync>>) -> Self {
        Self { workloads, dns: None }
    }

    /// Answers [`OrigDstResolver::dns_original_dst`] with `lookup`.
    pub fn with_dns(mut self, lookup: DnsOrigLookup) -> Self {
        self.dns = Some(lookup);
        self
    }
}

impl OrigDstResolver for SockoptResolver {
    fn original_dst(&self, sock: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, RedirectError> {
        let local = sock.local_addr().map_err(|source| RedirectError::NoOriginalDst { client: client.0, source })?;
        net::original_dst(sock, local)
            .map(OrigDstAddr)
            .map_err(|source| RedirectError::NoOriginalDst { client: client.0, source })
    }

    fn workload(&self, client: ClientAddr, _: OrigDstAddr) -> WorkloadLookup {
        let found = self.workloads.as_ref().and_then(|f| f(client));
        Box::pin(std::future::ready(found))
    }

    fn dns_original_dst(&self, client: ClientAddr, local: SocketAddr) -> Option<OrigDstAddr> {
        self.dns.as_ref().and_then(|f| f(client, local)).map(OrigDstAddr)
    }
}

/// `--redirect none`: something else redirects; we only read
/// `SO_ORIGINAL_DST`.
pub struct NoRedirect;

impl Redirector for NoRedirect {
    fn mode(&self) -> &'static str {
        "none"
    }
    fn attach_point(&self) -> String {
        "none".into()
    }
    fn set_targets(&mut self, _: &TargetSet) -> Result<(), RedirectError> {
        Ok(())
    }
    fn uninstall(&mut self) -> Result<(), RedirectError> {
        Ok(())
    }
    fn resolver(&self) -> Arc<dyn OrigDstResolver> {
        Arc::new(SockoptResolver::new(None).with_dns(conntrack_dns()))
    }
}

/// DNS datagrams' servers from conntrack, for NAT redirects (ours in
/// iptables mode, or whatever redirects in `none` mode).
pub fn conntrack_dns() -> DnsOrigLookup {
    Arc::new(|client: ClientAddr, local: SocketAddr| conntrack::udp_original_dst(local, client.0))
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
    fn original_dst(&self, _: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, RedirectError> {
        let map = self.dst.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&client.0).copied().or(self.default).map(OrigDstAddr).ok_or_else(|| RedirectError::NoOriginalDst {
            client: client.0,
            source: std::io::ErrorKind::NotFound.into(),
        })
    }

    fn workload(&self, _: ClientAddr, _: OrigDstAddr) -> WorkloadLookup {
        Box::pin(std::future::ready(self.workload.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_address_check_handles_v4_mapped_form() {
        let p = ProxyAddrs { v4: "127.0.0.1:15443".parse().unwrap(), v6: None, mark: 1 };
        assert!(p.is_proxy("[::ffff:127.0.0.1]:15443".parse().unwrap()));
        assert!(p.is_proxy("127.0.0.1:15443".parse().unwrap()));
        assert!(!p.is_proxy("127.0.0.1:443".parse().unwrap()));
        assert!(!p.is_proxy("[::1]:15443".parse().unwrap()));
    }
}
