//! Sending target connections to the proxy, and finding out afterwards where
//! they were going and who opened them.
//!
//! A [`Redirector`] owns the kernel state (eBPF programs or iptables rules):
//! it installs it, updates the target set, and removes it. Each mode answers
//! the data plane's per-connection questions by implementing
//! [`OrigDstResolver`] (defined in [`crate::net`]).
//!
//! This is a control-plane module: the data path (`proxy`, `guardrails`,
//! `audit`, `metrics`, the DNS forwarder) never imports it, and only the
//! control plane and `app` name its types.

pub mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod liveness;
pub mod names;
pub mod owner;
pub mod sockdiag;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use crate::{
    net::{self, ClientAddr, NoOriginalDst, OrigDstAddr, OrigDstResolver, WorkloadLookup},
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

/// Finds the workload of a connection from its client's address.
pub type WorkloadTable = Arc<dyn Fn(ClientAddr) -> WorkloadLookup + Send + Sync>;

/// Answers from `SO_ORIGINAL_DST`: conntrack in iptables mode, our getsockopt
/// program in eBPF mode. Optionally consults a workload table.
pub struct SockoptResolver {
    workloads: Option<WorkloadTable>,
    dns: Option<DnsOrigLookup>,
}

impl SockoptResolver {
    pub fn new(workloads: Option<WorkloadTable>) -> Self {
        Self { workloads, dns: None }
    }

    /// Answers [`OrigDstResolver::dns_original_dst`] with `lookup`.
    pub fn with_dns(mut self, lookup: DnsOrigLookup) -> Self {
        self.dns = Some(lookup);
        self
    }
}

impl OrigDstResolver for SockoptResolver {
    fn original_dst(&self, sock: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, NoOriginalDst> {
        let local = sock.local_addr().map_err(|source| NoOriginalDst { client: client.0, source })?;
        net::original_dst(sock, local).map(OrigDstAddr).map_err(|source| NoOriginalDst { client: client.0, source })
    }

    fn workload(&self, client: ClientAddr, _: OrigDstAddr) -> WorkloadLookup {
        match &self.workloads {
            Some(table) => table(client),
            None => Box::pin(std::future::ready(None)),
        }
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
