//! DNS-aware targeting: the DNS forwarder's two ports, answered by the
//! control plane. [`Learner`] makes the AI addresses agents' own answers
//! carry redirect targets before the answer is released; [`RedirectRecords`]
//! tells the forwarder which server a redirected query was sent to, from the
//! redirect's records. [`dns_upstreams`] picks where the forwarder asks.
//!
//! This module only adapts: it holds no state of its own beyond the learned
//! TTL bounds, and never answers a query itself.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::watch;

use super::targeting::SharedTargeting;
use crate::{
    admin::Status,
    config::{Config, TargetsConfig},
    dns::{self, AskedServer, DnsObserver, Learned, Upstreams},
    error,
    net::{ClientAddr, OrigDstResolver},
    proxy::Snapshot,
};

/// Learns AI providers' addresses from the answers agents get, and makes
/// them targets before the answer is released.
pub struct Learner {
    targeting: SharedTargeting,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    status: Arc<watch::Sender<Arc<Status>>>,
    floor: Duration,
    grace: Duration,
}

impl Learner {
    /// Learned addresses stay targets for their TTL, at least
    /// `targets.learned_ttl_floor`, plus `targets.learned_grace`.
    pub fn new(
        targeting: SharedTargeting,
        snapshot: watch::Receiver<Arc<Snapshot>>,
        status: Arc<watch::Sender<Arc<Status>>>,
        targets: &TargetsConfig,
    ) -> Self {
        Self { targeting, snapshot, status, floor: targets.learned_ttl_floor, grace: targets.learned_grace }
    }
}

#[async_trait::async_trait]
impl DnsObserver for Learner {
    fn is_ai_domain(&self, name: &str) -> bool {
        self.snapshot.borrow().policy.classify(Some(name)).intercept
    }

    async fn learned(&self, learned: Vec<Learned>) {
        let mut t = self.targeting.lock();
        let mut new = 0;
        for l in &learned {
            if t.resolver.learn(&l.name, l.addr, l.ttl, self.floor, self.grace) {
                new += 1;
            }
        }
        let applied = t.apply();
        let targets = t.targets.clone();
        drop(t);
        self.status.send_modify(|s| Arc::make_mut(s).targets = targets);
        match applied {
            Ok(()) if new > 0 => tracing::info!(new, "learned AI provider addresses from DNS"),
            Ok(()) => {}
            Err(error) => tracing::error!(error = %error::chain(&error), "cannot redirect learned addresses"),
        }
    }
}

/// The redirect's records, as the DNS forwarder asks for them.
pub struct RedirectRecords(pub Arc<dyn OrigDstResolver>);

impl AskedServer for RedirectRecords {
    fn udp(&self, client: SocketAddr, local: SocketAddr) -> Option<SocketAddr> {
        self.0.dns_original_dst(ClientAddr(client), local).map(|a| a.0)
    }

    fn tcp(&self, stream: &tokio::net::TcpStream, client: SocketAddr) -> Option<SocketAddr> {
        let client = ClientAddr(client);
        let asked = self.0.original_dst(stream, client).ok();
        // Consumes the connection's record (eBPF mode keeps one until read,
        // and reads it when asked; the lookup itself is not needed).
        if let Some(asked) = asked {
            drop(self.0.workload(client, asked));
        }
        asked.map(|a| a.0)
    }
}

/// Where the forwarder sends queries: the configured resolvers, else the
/// server each client asked, with /etc/resolv.conf's resolvers for queries
/// whose server cannot be told.
pub fn dns_upstreams(config: &Config) -> anyhow::Result<Upstreams> {
    let own: [Option<IpAddr>; 2] = [Some(config.proxy.address_v4.into()), config.proxy.address_v6.map(IpAddr::from)];
    // Never forward to ourselves.
    let not_own = |u: &SocketAddr| !(u.port() == config.targets.dns_port && own.contains(&Some(u.ip())));
    let configured: Vec<SocketAddr> =
        config.targets.dns_upstreams.iter().filter_map(|u| crate::config::parse_dns_upstream(u)).collect();
    if !configured.is_empty() {
        let upstreams: Vec<SocketAddr> = configured.into_iter().filter(not_own).collect();
        if upstreams.is_empty() {
            anyhow::bail!(
                "targets.dns_upstreams names only the interceptor's own DNS port: set other resolvers, or leave it \
                 empty to ask the server each client asked"
            );
        }
        return Ok(Upstreams::Configured(upstreams));
    }
    let fallback = match std::fs::read_to_string("/etc/resolv.conf") {
        Ok(text) => dns::system_upstreams(&text).into_iter().filter(not_own).collect(),
        Err(error) => {
            tracing::warn!(%error, "cannot read /etc/resolv.conf: DNS queries whose server cannot be told will fail");
            Vec::new()
        }
    };
    Ok(Upstreams::Asked { fallback })
}
