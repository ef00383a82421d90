//! The data plane: accept redirected connections, find where they were going
//! and who opened them, peek at the TLS ClientHello, and either terminate TLS
//! and relay HTTP through the guardrail hook (AI domains) or relay the bytes
//! untouched (everything else). Upstream sockets carry the proxy's mark, which
//! the redirect never sends back to us.
//!
//! Every connection is recorded exactly once, when it ends, by a drop guard.
//! Connections beyond the global cap or their workload's cap are closed at
//! once, before any byte is read.
//! This module knows nothing of eBPF or iptables: it only sees an
//! [`OrigDstResolver`], and it reads the domain policy from an immutable
//! snapshot the control plane publishes.

pub mod budget;
pub mod hook;
pub mod http;
pub mod sni;
pub mod tls;
pub mod upstream;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};

pub use self::upstream::connect_upstream;
use self::{
    hook::{Exchange, Hook},
    sni::Peeked,
    tls::TlsTermination,
};
use crate::{
    config::OversizeAction,
    metrics::{ConnectionLabels, Metrics},
    net::{self, ClientAddr, OrigDstAddr},
    policy::DomainPolicy,
    redirect::{OrigDstResolver, ProxyAddrs, Workload},
    telemetry,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {dst}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {dst} timed out after {timeout:?}")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error("cannot mark the upstream socket (needs CAP_NET_ADMIN)")]
    Mark(#[source] std::io::Error),
    #[error("cannot use the upstream CA file {path}: {reason}")]
    UpstreamCa { path: PathBuf, reason: String },
    #[error("{0:?} is not a valid server name")]
    Sni(String),
    #[error("no trusted root certificates for upstream connections (install ca-certificates or set tls.upstream_ca)")]
    NoRoots,
}

/// What the control plane publishes for the data plane; replaced whole on
/// every policy change, read once per connection.
pub struct Snapshot {
    pub policy: DomainPolicy,
}

/// The bound listeners, before serving.
pub struct Listeners {
    v4: TcpListener,
    v6: Option<TcpListener>,
    pub addrs: ProxyAddrs,
}

impl Listeners {
    /// Binds the IPv4 address and, if given, the IPv6 address on the same
    /// port. Port 0 picks a free port (the IPv6 listener then reuses it).
    pub async fn bind(v4: Ipv4Addr, v6: Option<Ipv6Addr>, port: u16, mark: u32) -> Result<Self, ProxyError> {
        let addr = SocketAddr::from((v4, port));
        let l4 = net::shared_listener(addr).map_err(|source| ProxyError::Bind { addr, source })?;
        let port = l4.local_addr().map_err(|source| ProxyError::Bind { addr, source })?.port();
        let l6 = match v6 {
            Some(ip) => {
                let addr = SocketAddr::from((ip, port));
                Some(net::shared_listener(addr).map_err(|source| ProxyError::Bind { addr, source })?)
            }
            None => None,
        };
        let addrs =
            ProxyAddrs { v4: SocketAddrV4::new(v4, port), v6: v6.map(|ip| SocketAddrV6::new(ip, port, 0, 0)), mark };
        Ok(Self { v4: l4, v6: l6, addrs })
    }
}

/// Settings of the data plane.
#[derive(Clone)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
    /// How long to wait for a TLS ClientHello before passing a connection
    /// through untouched.
    pub client_hello_timeout: Duration,
    pub max_inspected_body: usize,
    /// After a client rejects our certificate (pinning, untrusted CA), pass
    /// that (process, host) pair through instead of failing every time.
    pub passthrough_on_reject: bool,
    /// A body over `max_inspected_body`: refuse it or pass it uninspected.
    pub oversize: OversizeAction,
    /// Bytes of bodies buffered for inspection by all connections together
    /// (`guardrails.max_buffered_total`, resolved); over it, `503`.
    pub max_buffered_total: usize,
    /// Largest request head (HTTP/1.1 buffer, HTTP/2 header list).
    pub max_header_bytes: usize,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// An intercepted connection with no request in flight this long is
    /// closed.
    pub idle_timeout: Duration,
    /// Connections served at once; 0: no cap.
    pub max_connections: usize,
    /// Connections served at once per workload; 0: no cap.
    pub max_connections_per_workload: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            client_hello_timeout: Duration::from_secs(5),
            max_inspected_body: 16 << 20,
            passthrough_on_reject: false,
            oversize: OversizeAction::Block,
            max_buffered_total: budget::AUTO_FLOOR as usize,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(120),
            max_connections: 8192,
            max_connections_per_workload: 1024,
        }
    }
}

/// Everything a connection handler needs.
pub struct DataPlane {
    pub resolver: Arc<dyn OrigDstResolver>,
    pub settings: ProxySettings,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// TLS termination; `None` passes every connection through.
    pub tls: Option<Arc<TlsTermination>>,
    pub hook: Option<Arc<dyn Hook>>,
    pub metrics: Arc<Metrics>,
}

struct Shared {
    plane: DataPlane,
    addrs: ProxyAddrs,
    /// (process, host) pairs whose client rejected our certificate.
    rejected: Mutex<HashSet<(String, String)>>,
    /// Each connection holds a clone; draining waits for all to drop.
    in_flight: mpsc::Sender<()>,
    limits: Arc<ConnectionLimits>,
    /// Bytes of bodies buffered for inspection, all connections together.
    budget: Arc<budget::BodyBudget>,
}

/// Whom a per-workload connection cap counts against: the cgroup when the
/// redirect recorded it, else the client address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum WorkloadKey {
    Cgroup(u64),
    Client(IpAddr),
}

impl WorkloadKey {
    fn of(workload: Option<&Workload>, client: ClientAddr) -> Self {
        match workload {
            Some(w) if w.cgroup_id != 0 => Self::Cgroup(w.cgroup_id),
            _ => Self::Client(client.0.ip()),
        }
    }
}

/// Open connections, all together and per workload.
struct ConnectionLimits {
    max_total: usize,
    max_per_workload: usize,
    total: AtomicUsize,
    per_workload: Mutex<HashMap<WorkloadKey, usize>>,
    /// When the last refusal was logged, and how many went unlogged since.
    warned: Mutex<(Option<Instant>, u64)>,
}

/// A connection counted against the caps; released on drop.
struct Slot {
    limits: Arc<ConnectionLimits>,
    key: Option<WorkloadKey>,
}

impl ConnectionLimits {
    fn new(settings: &ProxySettings) -> Self {
        Self {
            max_total: settings.max_connections,
            max_per_workload: settings.max_connections_per_workload,
            total: AtomicUsize::new(0),
            per_workload: Mutex::new(HashMap::new()),
            warned: Mutex::new((None, 0)),
        }
    }

    /// A slot under the global cap, or `None` when it is reached.
    fn admit(self: &Arc<Self>) -> Option<Slot> {
        let admitted = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (self.max_total == 0 || n < self.max_total).then_some(n + 1)
            })
            .is_ok();
        admitted.then(|| Slot { limits: Arc::clone(self), key: None })
    }

    /// Counts the slot against its workload too; false when that workload
    /// is at its cap.
    fn admit_workload(&self, slot: &mut Slot, key: WorkloadKey) -> bool {
        let mut per = self.per_workload.lock().unwrap_or_else(|e| e.into_inner());
        let open = per.entry(key).or_insert(0);
        if self.max_per_workload != 0 && *open >= self.max_per_workload {
            if *open == 0 {
                per.remove(&key);
            }
            return false;
        }
        *open += 1;
        slot.key = Some(key);
        true
    }

    /// Logs a refused connection, at most once a second (with how many were
    /// refused unlogged in between), so a flood cannot flood the log.
    /// Returns whether it logged.
    fn warn_refused(&self, limit: &'static str, client: ClientAddr, key: Option<WorkloadKey>) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if warned.0.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            warned.1 += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut warned.1);
        warned.0 = Some(now);
        let (cgroup_id, max) = match limit {
            "max_connections" => (None, self.max_total),
            _ => {
                (key.and_then(|k| if let WorkloadKey::Cgroup(id) = k { Some(id) } else { None }), self.max_per_workload)
            }
        };
        tracing::warn!(
            event = "connection_refused",
            limit,
            max,
            client = %client,
            cgroup_id,
            suppressed,
            "connection closed: too many open connections"
        );
        true
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = self.key {
            let mut per = self.limits.per_workload.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(open) = per.get_mut(&key) {
                *open -= 1;
                if *open == 0 {
                    per.remove(&key);
                }
            }
        }
    }
}

/// Bound on remembered certificate rejections.
const MAX_REJECTED: usize = 4096;

/// A running proxy. `drain` waits for in-flight connections.
pub struct Proxy {
    in_flight: mpsc::Receiver<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts accepting on every listener until `shutdown` turns true.
    pub fn serve(listeners: Listeners, plane: DataPlane, shutdown: watch::Receiver<bool>) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let limits = Arc::new(ConnectionLimits::new(&plane.settings));
        let budget = budget::BodyBudget::new(
            plane.settings.max_buffered_total,
            plane.metrics.inspection_budget_refusals.clone(),
        );
        let shared = Arc::new(Shared {
            budget,
            plane,
            addrs: listeners.addrs,
            rejected: Mutex::new(HashSet::new()),
            in_flight: tx,
            limits,
        });
        let mut tasks = vec![tokio::spawn(accept_loop(listeners.v4, Arc::clone(&shared), shutdown.clone()))];
        if let Some(v6) = listeners.v6 {
            tasks.push(tokio::spawn(accept_loop(v6, Arc::clone(&shared), shutdown)));
        }
        Self { in_flight: rx, tasks }
    }

    /// Waits until every accepted connection has finished, at most `deadline`.
    /// Returns whether all finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        // The accept loops are gone, so only connections hold senders now.
        tokio::time::timeout(deadline, self.in_flight.recv()).await.is_ok()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let client = ClientAddr(net::canonical(peer));
                    let Some(slot) = shared.limits.admit() else {
                        // Closed before anything is read or spawned.
                        drop(stream);
                        refused(&shared.plane.metrics, "over_max_connections");
                        let _ = shared.limits.warn_refused("max_connections", client, None);
                        continue;
                    };
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let guard = shared.in_flight.clone();
                        handle(stream, client, slot, &shared).await;
                        drop(guard);
                    });
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn refused(metrics: &Metrics, outcome: &'static str) {
    metrics.connections.get_or_create(&ConnectionLabels { mode: "none", outcome }).inc();
}

/// What happened to one connection; logged once when dropped.
struct ConnectionRecord {
    metrics: Arc<Metrics>,
    client: ClientAddr,
    orig_dst: Option<OrigDstAddr>,
    workload: Option<Workload>,
    sni: Option<String>,
    mode: &'static str,
    reason: Option<String>,
    outcome: &'static str,
    error: Option<String>,
    requests: u64,
    bytes_up: u64,
    bytes_down: u64,
    started: Instant,
    /// Already counted and logged elsewhere.
    quiet: bool,
}

impl ConnectionRecord {
    fn fail(&mut self, outcome: &'static str, error: &dyn std::error::Error) {
        self.outcome = outcome;
        self.error = Some(telemetry::chain(error));
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        if self.quiet {
            return;
        }
        self.metrics.connections.get_or_create(&ConnectionLabels { mode: self.mode, outcome: self.outcome }).inc();
        let w = self.workload.as_ref();
        tracing::info!(
            event = "connection",
            outcome = self.outcome,
            mode = self.mode,
            client = %self.client,
            orig_dst = self.orig_dst.map(|d| d.to_string()),
            sni = self.sni.as_deref(),
            reason = self.reason.as_deref(),
            pid = w.map(|w| w.pid),
            tid = w.map(|w| w.tid),
            uid = w.map(|w| w.uid),
            comm = w.map(|w| w.comm.as_str()),
            cgroup_id = w.map(|w| w.cgroup_id),
            requests = self.requests,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = self.error.as_deref(),
            "connection closed"
        );
    }
}

async fn handle(stream: TcpStream, client: ClientAddr, mut slot: Slot, shared: &Shared) {
    let plane = &shared.plane;
    let mut record = ConnectionRecord {
        metrics: Arc::clone(&plane.metrics),
        client,
        orig_dst: None,
        workload: None,
        sni: None,
        mode: "none",
        reason: None,
        outcome: "closed",
        error: None,
        requests: 0,
        bytes_up: 0,
        bytes_down: 0,
        started: Instant::now(),
        quiet: false,
    };
    let orig = match plane.resolver.original_dst(&stream, client) {
        Ok(orig) => OrigDstAddr(net::canonical(orig.0)),
        Err(error) => {
            // Not redirected to us (or the record was lost): refuse. The
            // proxy is never an open relay.
            record.fail("no_original_dst", &error);
            return;
        }
    };
    record.orig_dst = Some(orig);
    record.workload = plane.resolver.workload(client);
    if shared.addrs.is_proxy(orig.0) {
        record.outcome = "refused_loop";
        return;
    }
    let key = WorkloadKey::of(record.workload.as_ref(), client);
    if !shared.limits.admit_workload(&mut slot, key) {
        // Counted and logged (rate-limited) here, not once per connection.
        record.quiet = true;
        refused(&plane.metrics, "over_max_connections_per_workload");
        let _ = shared.limits.warn_refused("max_connections_per_workload", client, Some(key));
        return;
    }
    let _ = stream.set_nodelay(true);

    let hello = sni::peek_client_hello(&stream, plane.settings.client_hello_timeout).await;
    let intercept = match (&hello, &plane.tls) {
        (Peeked::Tls(info), Some(tls)) => {
            record.sni = info.sni.clone();
            let decision = plane.snapshot.borrow().policy.classify(info.sni.as_deref());
            record.reason = Some(decision.reason.to_string());
            match info.sni.as_deref() {
                Some(sni) if decision.intercept => {
                    let comm = record.workload.as_ref().map(|w| w.comm.clone()).unwrap_or_default();
                    if shared.rejected_before(&comm, sni) {
                        record.reason = Some("client rejected our certificate before".into());
                        None
                    } else {
                        Some((Arc::clone(tls), sni.to_string(), comm))
                    }
                }
                _ => None,
            }
        }
        (Peeked::Tls(info), None) => {
            record.sni = info.sni.clone();
            record.reason = Some("TLS interception disabled".into());
            None
        }
        (Peeked::NotTls, _) => {
            record.reason = Some("not TLS".into());
            None
        }
        (Peeked::Timeout, _) => {
            record.reason = Some("no ClientHello in time".into());
            None
        }
    };
    match intercept {
        Some((tls, sni, comm)) => {
            record.mode = "intercept";
            intercept_connection(stream, orig, sni, comm, tls, shared, &mut record).await;
        }
        None => {
            record.mode = "passthrough";
            passthrough(stream, orig, shared, &mut record).await;
        }
    }
}

impl Shared {
    fn rejected_before(&self, comm: &str, sni: &str) -> bool {
        self.plane.settings.passthrough_on_reject
            && self.rejected.lock().unwrap_or_else(|e| e.into_inner()).contains(&(comm.to_string(), sni.to_string()))
    }

    /// Logs a client's rejection of our certificate once per (process, host).
    fn note_rejection(&self, comm: &str, sni: &str, record: &ConnectionRecord, error: &str) {
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let key = (comm.to_string(), sni.to_string());
        if rejected.contains(&key) {
            return;
        }
        if rejected.len() >= MAX_REJECTED {
            rejected.clear();
        }
        rejected.insert(key);
        tracing::warn!(
            event = "certificate_rejected",
            sni,
            comm,
            pid = record.workload.as_ref().map(|w| w.pid),
            error,
            passthrough_from_now = self.plane.settings.passthrough_on_reject,
            "client rejected the interceptor's certificate (pinned certificate, or our CA is not trusted: see `interceptor ca install`)"
        );
    }
}

async fn intercept_connection(
    stream: TcpStream,
    orig: OrigDstAddr,
    sni: String,
    comm: String,
    tls: Arc<TlsTermination>,
    shared: &Shared,
    record: &mut ConnectionRecord,
) {
    // A client that stalls mid-handshake is bounded like a slow request head.
    let handshake_timeout = shared.plane.settings.header_read_timeout;
    let tls_stream = match tokio::time::timeout(handshake_timeout, tls.accept(stream, &sni)).await {
        Err(_) => {
            record.outcome = "client_tls_timeout";
            record.error = Some(format!("TLS handshake not finished within {handshake_timeout:?}"));
            return;
        }
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            let text = telemetry::chain(&error);
            if tls::is_certificate_rejection(&error) {
                shared.note_rejection(&comm, &sni, record, &text);
                record.outcome = "client_rejected_certificate";
            } else {
                record.outcome = "client_tls_failed";
            }
            record.error = Some(text);
            return;
        }
    };
    let upstream = match tls.pool.get(orig.0, &sni) {
        Ok(u) => u,
        Err(error) => {
            record.fail("invalid_sni", &error);
            return;
        }
    };
    let conn = Arc::new(http::Intercepted {
        exchange: Arc::new(Exchange {
            client: record.client,
            orig_dst: orig,
            sni: sni.clone(),
            workload: record.workload.clone(),
        }),
        upstream,
        hook: shared.plane.hook.clone(),
        limits: http::HttpLimits::from(&shared.plane.settings),
        budget: Arc::clone(&shared.budget),
        active: tokio::sync::watch::Sender::new(0),
        requests: Default::default(),
    });
    let result = http::serve(tls_stream, Arc::clone(&conn)).await;
    record.requests = conn.requests.load(Ordering::Relaxed);
    match result {
        Ok(()) => record.outcome = "intercepted",
        Err(error) => {
            record.outcome = "intercepted";
            record.error = Some(telemetry::chain(error.as_ref()));
        }
    }
}

async fn passthrough(mut client_stream: TcpStream, orig: OrigDstAddr, shared: &Shared, record: &mut ConnectionRecord) {
    let settings = &shared.plane.settings;
    let mut upstream = match connect_upstream(orig.0, shared.addrs.mark, settings.connect_timeout).await {
        Ok(s) => s,
        Err(error) => {
            record.fail("upstream_connect_failed", &error);
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut client_stream, &mut upstream).await {
        Ok((up, down)) => {
            record.outcome = "relayed";
            record.bytes_up = up;
            record.bytes_down = down;
        }
        Err(error) => record.fail("relay_error", &error),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{policy::DomainsConfig, redirect::MockOrigDst};

    fn plane(resolver: Arc<dyn OrigDstResolver>) -> DataPlane {
        let policy = DomainPolicy::compile(&DomainsConfig::default()).unwrap();
        let (_tx, snapshot) = watch::channel(Arc::new(Snapshot { policy }));
        let settings = ProxySettings {
            connect_timeout: Duration::from_secs(2),
            client_hello_timeout: Duration::from_millis(200),
            ..ProxySettings::default()
        };
        DataPlane { resolver, settings, snapshot, tls: None, hook: None, metrics: Arc::new(Metrics::new()) }
    }

    async fn start(default: Option<SocketAddr>) -> (Proxy, ProxyAddrs, watch::Sender<bool>) {
        let listeners = Listeners::bind(Ipv4Addr::LOCALHOST, None, 0, 0).await.unwrap();
        let addrs = listeners.addrs;
        let resolver = Arc::new(MockOrigDst { dst: std::sync::Mutex::new(HashMap::new()), default });
        let (tx, rx) = watch::channel(false);
        (Proxy::serve(listeners, plane(resolver), rx), addrs, tx)
    }

    #[test]
    fn connection_caps_count_per_workload_and_release_on_drop() {
        let settings = ProxySettings { max_connections: 3, max_connections_per_workload: 2, ..Default::default() };
        let limits = Arc::new(ConnectionLimits::new(&settings));
        let a = WorkloadKey::Cgroup(7);
        let b = WorkloadKey::Client("10.0.0.2".parse().unwrap());
        let mut a1 = limits.admit().unwrap();
        assert!(limits.admit_workload(&mut a1, a));
        let mut a2 = limits.admit().unwrap();
        assert!(limits.admit_workload(&mut a2, a));
        let mut a3 = limits.admit().unwrap();
        assert!(!limits.admit_workload(&mut a3, a), "a third connection of one workload");
        drop(a3);
        let mut b1 = limits.admit().unwrap();
        assert!(limits.admit_workload(&mut b1, b), "another workload is not affected");
        assert!(limits.admit().is_none(), "the global cap");
        drop(a1);
        let mut again = limits.admit().unwrap();
        assert!(limits.admit_workload(&mut again, a), "a closed connection frees its slots");
        drop((a2, b1, again));
        assert_eq!(limits.total.load(Ordering::Relaxed), 0);
        assert!(limits.per_workload.lock().unwrap().is_empty(), "no entry left behind");
        // A workload with a cgroup is keyed by it, else by the client address.
        let w = Workload { pid: 1, tid: 1, uid: 0, gid: 0, comm: "x".into(), cgroup_id: 9 };
        let client = ClientAddr("10.0.0.3:5000".parse().unwrap());
        assert_eq!(WorkloadKey::of(Some(&w), client), WorkloadKey::Cgroup(9));
        assert_eq!(WorkloadKey::of(None, client), WorkloadKey::Client("10.0.0.3".parse().unwrap()));
        // Unlimited when 0.
        let open = Arc::new(ConnectionLimits::new(&ProxySettings {
            max_connections: 0,
            max_connections_per_workload: 0,
            ..Default::default()
        }));
        let mut slots = Vec::new();
        for _ in 0..100 {
            let mut s = open.admit().unwrap();
            assert!(open.admit_workload(&mut s, a));
            slots.push(s);
        }
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let limits = ConnectionLimits::new(&ProxySettings::default());
        let client = ClientAddr("10.0.0.3:5000".parse().unwrap());
        assert!(limits.warn_refused("max_connections", client, None));
        for _ in 0..1000 {
            assert!(!limits.warn_refused("max_connections", client, None));
        }
        assert_eq!(limits.warned.lock().unwrap().1, 1000, "suppressed refusals are counted");
    }

    #[tokio::test]
    async fn relays_non_tls_bytes_both_ways_to_the_original_destination() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&[&buf[..], b"-back"].concat()).await.unwrap();
        });
        let (proxy, addrs, stop) = start(Some(up_addr)).await;
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello-back");
        drop(c);
        stop.send(true).unwrap();
        assert!(proxy.drain(Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn connection_without_original_destination_is_closed() {
        let (_proxy, addrs, _stop) = start(None).await;
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn connection_aimed_at_the_proxy_itself_is_refused() {
        let listeners = Listeners::bind(Ipv4Addr::LOCALHOST, None, 0, 0).await.unwrap();
        let addrs = listeners.addrs;
        let resolver = Arc::new(MockOrigDst {
            dst: std::sync::Mutex::new(HashMap::new()),
            default: Some(SocketAddr::V4(addrs.v4)),
        });
        let (_tx, rx) = watch::channel(false);
        let _proxy = Proxy::serve(listeners, plane(resolver), rx);
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        let mut got = Vec::new();
        // Closed at once rather than looping into itself.
        tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut got)).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn unreachable_upstream_closes_the_client() {
        // A port nobody listens on.
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let (_proxy, addrs, _stop) = start(Some(dead)).await;
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut got)).await.unwrap().unwrap();
        assert!(got.is_empty());
    }
}
