//! The data plane: accept redirected connections, find where they were going
//! and who opened them, peek at the TLS ClientHello, and either terminate TLS
//! and relay HTTP through the guardrail hook (AI domains) or relay the bytes
//! untouched (everything else; spliced in the kernel, `splice`). Upstream
//! sockets carry the proxy's mark, which the redirect never sends back to us.
//!
//! A connection whose original destination is an AI address (configured,
//! resolved or learned from DNS) is inspected unless its ClientHello proves
//! otherwise: only a parsed ClientHello naming a non-AI host passes through.
//! One without a server name is intercepted as the AI name the address is
//! known by, or refused; a late, unparseable, oversized or non-TLS one is
//! refused (`targets.unclassified` can relay them instead, audited).
//! Addresses not known to be AI (`all-tls`) keep the SNI-only rule.
//! A connection to a plain-HTTP MCP target (`mcp.plain`, known by its exact
//! original address and port: `plain`) is served as HTTP/1.1 without TLS,
//! without waiting for a ClientHello, and relayed as plain HTTP through the
//! hook, under the target's configured name.
//!
//! Every connection is recorded exactly once, when it ends, by a drop guard.
//! Each runs in a `conn` span (client, then original destination, workload
//! and SNI as they become known), so log calls inside carry only what is new.
//! Connections beyond the global cap or their workload's cap are closed at
//! once, before any byte is read.
//! This module knows nothing of eBPF or iptables: it only sees an
//! [`OrigDstResolver`], and it reads the domain policy from an immutable
//! snapshot the control plane publishes.

pub mod budget;
pub mod hook;
pub mod http;
pub mod park;
pub mod plain;
pub mod sni;
pub mod splice;
pub mod tls;
pub mod upstream;
pub mod websocket;

use std::{
    borrow::Cow,
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
use tracing::{Instrument as _, Span, field::Empty};

pub use self::upstream::connect_upstream;
use self::{
    hook::{Exchange, Hook},
    sni::Peeked,
    tls::TlsTermination,
};
use crate::{
    config::{Config, OversizeAction, Unclassified},
    error,
    metrics::{ConnectionLabels, ConnectionMode, ConnectionOutcome, Metrics},
    net::{self, ClientAddr, OrigDstAddr, OrigDstResolver, ProxyAddrs},
    observe::LiveEvents,
    policy::{DomainPolicy, Reason},
    targets::{AiAddress, TargetSet},
    workload::{PodLookup, Workload},
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

/// What the control plane publishes for the data plane; replaced on every
/// policy or target change, read once per connection.
#[derive(Clone)]
pub struct Snapshot {
    pub policy: Arc<DomainPolicy>,
    /// The redirect targets, to tell AI addresses (and their names) apart.
    pub targets: Arc<TargetSet>,
    /// Plain-HTTP MCP servers, by exact address and port.
    pub plain: Arc<plain::PlainTargets>,
}

impl Snapshot {
    pub fn new(policy: DomainPolicy) -> Self {
        Self { policy: Arc::new(policy), targets: Arc::default(), plain: Arc::default() }
    }
}

/// The bound listeners, before serving: one IPv4 listener (and one IPv6
/// listener) per worker, all on one port with `SO_REUSEPORT`, so that the
/// kernel spreads new connections across the workers.
pub struct Listeners {
    /// Per worker: IPv4, IPv6. Registered with a runtime only when served,
    /// by the worker that serves them.
    sets: Vec<(std::net::TcpListener, Option<std::net::TcpListener>)>,
    pub addrs: ProxyAddrs,
}

impl Listeners {
    /// Binds the IPv4 address and, if given, the IPv6 address on the same
    /// port, for one worker. Port 0 picks a free port (the IPv6 listener
    /// then reuses it).
    pub async fn bind(v4: Ipv4Addr, v6: Option<Ipv6Addr>, port: u16, mark: u32) -> Result<Self, ProxyError> {
        Self::bind_workers(v4, v6, port, mark, 1).await
    }

    /// [`Listeners::bind`] for `workers` workers (at least one), each with
    /// listeners of its own on the one port.
    pub async fn bind_workers(
        v4: Ipv4Addr,
        v6: Option<Ipv6Addr>,
        mut port: u16,
        mark: u32,
        workers: usize,
    ) -> Result<Self, ProxyError> {
        let listen = |addr: SocketAddr| {
            net::shared_listener(addr).and_then(|l| l.into_std()).map_err(|source| ProxyError::Bind { addr, source })
        };
        let mut sets = Vec::with_capacity(workers.max(1));
        for _ in 0..workers.max(1) {
            let addr = SocketAddr::from((v4, port));
            let l4 = listen(addr)?;
            // Port 0: the others join the port the first one got.
            port = l4.local_addr().map_err(|source| ProxyError::Bind { addr, source })?.port();
            let l6 = v6.map(|ip| listen(SocketAddr::from((ip, port)))).transpose()?;
            sets.push((l4, l6));
        }
        let addrs =
            ProxyAddrs { v4: SocketAddrV4::new(v4, port), v6: v6.map(|ip| SocketAddrV6::new(ip, port, 0, 0)), mark };
        Ok(Self { sets, addrs })
    }

    /// How many workers these listeners are for.
    pub fn workers(&self) -> usize {
        self.sets.len()
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
    /// A connection to an AI address that cannot be classified: refuse or
    /// relay it.
    pub unclassified: Unclassified,
}

impl ProxySettings {
    /// The settings the configuration gives: `[proxy]`,
    /// `tls.client_hello_timeout`, `tls.passthrough_on_reject`,
    /// `guardrails.oversize` and `targets.unclassified`. `max_buffered_total`
    /// is `guardrails.max_buffered_total` in bytes (`auto` already sized).
    pub fn from_config(config: &Config, max_buffered_total: usize) -> Self {
        Self {
            connect_timeout: config.proxy.connect_timeout,
            client_hello_timeout: config.tls.client_hello_timeout,
            max_inspected_body: config.proxy.max_inspected_body,
            passthrough_on_reject: config.tls.passthrough_on_reject,
            oversize: config.guardrails.oversize,
            max_buffered_total,
            max_header_bytes: config.proxy.max_header_bytes,
            header_read_timeout: config.proxy.header_read_timeout,
            idle_timeout: config.proxy.idle_timeout,
            max_connections: config.proxy.max_connections,
            max_connections_per_workload: config.proxy.max_connections_per_workload,
            unclassified: config.targets.unclassified,
        }
    }
}

impl Default for ProxySettings {
    /// The documented defaults ([`Config::default`]), with the inspection
    /// budget at the floor of `auto` rather than sized from this machine.
    fn default() -> Self {
        Self::from_config(&Config::default(), budget::AUTO_FLOOR as usize)
    }
}

/// Everything a connection handler needs.
#[derive(Clone)]
pub struct DataPlane {
    pub resolver: Arc<dyn OrigDstResolver>,
    pub settings: ProxySettings,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// TLS termination; `None` passes every connection through.
    pub tls: Option<Arc<TlsTermination>>,
    pub hook: Option<Arc<dyn Hook>>,
    pub metrics: Arc<Metrics>,
    /// Names the pod of a workload whose cgroup is a pod's (Kubernetes).
    pub pods: Option<Arc<dyn PodLookup>>,
    /// Watchers of the live view, who get each connection's record too.
    pub live: Option<LiveEvents>,
}

/// What a worker's connections share: with each other, and (behind the
/// `Arc`s) with the other workers.
struct Shared {
    plane: DataPlane,
    addrs: ProxyAddrs,
    /// Which worker this is (0: the thread that called [`Proxy::serve`]).
    /// Upstream connections are pooled per worker: each is driven by the
    /// event loop of the worker that opened it.
    worker: usize,
    /// (process, host) pairs whose client rejected our certificate.
    rejected: Arc<Mutex<HashSet<(String, String)>>>,
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
    /// Each resolves when one worker's accept loops have ended.
    accepting: Vec<tokio::sync::oneshot::Receiver<()>>,
    /// Tells the workers on threads of their own to stop (also when
    /// dropped): their runtimes, with whatever still runs on them, end.
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Starts accepting on every listener until `shutdown` turns true.
    ///
    /// Worker 0's listeners are served on the calling runtime; each further
    /// worker's on a thread of its own, with a single-threaded runtime. A
    /// connection stays on the worker whose listener accepted it, and so do
    /// the tasks it spawns and the upstream connections it opens: nothing on
    /// a request's path wakes another thread, and no worker steals another's
    /// work (which, with a work-stealing runtime, costs wake-ups, parking
    /// and cache misses on every request).
    pub fn serve(listeners: Listeners, plane: DataPlane, shutdown: watch::Receiver<bool>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(1);
        let limits = Arc::new(ConnectionLimits::new(&plane.settings));
        let budget = budget::BodyBudget::new(
            plane.settings.max_buffered_total,
            plane.metrics.inspection_budget_refusals.clone(),
        );
        let rejected = Arc::new(Mutex::new(HashSet::new()));
        let (stop, stopped) = watch::channel(false);
        let mut proxy = Self { in_flight: rx, accepting: Vec::new(), stop, threads: Vec::new() };
        for (worker, (v4, v6)) in listeners.sets.into_iter().enumerate() {
            let shared = Arc::new(Shared {
                budget: Arc::clone(&budget),
                plane: plane.clone(),
                addrs: listeners.addrs,
                worker,
                rejected: Arc::clone(&rejected),
                in_flight: tx.clone(),
                limits: Arc::clone(&limits),
            });
            let (accepted, accepting) = tokio::sync::oneshot::channel();
            proxy.accepting.push(accepting);
            let serve = accept_loops(v4, v6, shared, shutdown.clone(), accepted);
            if worker == 0 {
                tokio::spawn(serve);
                continue;
            }
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let mut stopped = stopped.clone();
            let thread = std::thread::Builder::new().name(format!("proxy-worker-{worker}")).spawn(move || {
                runtime.block_on(async move {
                    serve.await;
                    // Its connections run on until draining is over.
                    let _ = stopped.wait_for(|s| *s).await;
                });
            })?;
            proxy.threads.push(thread);
        }
        Ok(proxy)
    }

    /// Waits until every accepted connection has finished, at most `deadline`.
    /// Returns whether all finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        for accepting in self.accepting.drain(..) {
            let _ = accepting.await;
        }
        // The accept loops are gone, so only connections hold senders now.
        let finished = tokio::time::timeout(deadline, self.in_flight.recv()).await.is_ok();
        let _ = self.stop.send(true);
        let threads = std::mem::take(&mut self.threads);
        // Their runtimes drop what still runs on them; bounded all the same.
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(5), joined).await;
        finished
    }
}

/// Serves one worker's listeners on the current runtime until `shutdown`;
/// `accepted` is dropped when both accept loops have ended.
async fn accept_loops(
    v4: std::net::TcpListener,
    v6: Option<std::net::TcpListener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
    accepted: tokio::sync::oneshot::Sender<()>,
) {
    let mut loops = Vec::with_capacity(2);
    for listener in std::iter::once(v4).chain(v6) {
        match TcpListener::from_std(listener) {
            Ok(listener) => loops.push(tokio::spawn(accept_loop(listener, Arc::clone(&shared), shutdown.clone()))),
            // Bound and listening already: registering with the event loop
            // fails only when the process is out of resources.
            Err(error) => tracing::error!(%error, worker = shared.worker, "cannot serve a proxy listener"),
        }
    }
    for task in loops {
        let _ = task.await;
    }
    drop(accepted);
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
                        refused(&shared.plane.metrics, ConnectionOutcome::OverMaxConnections);
                        let _ = shared.limits.warn_refused("max_connections", client, None);
                        continue;
                    };
                    let shared = Arc::clone(&shared);
                    let span = tracing::info_span!(
                        "conn",
                        client = %client,
                        orig_dst = Empty,
                        sni = Empty,
                        workload = Empty
                    );
                    tokio::spawn(
                        async move {
                            let guard = shared.in_flight.clone();
                            handle(stream, client, slot, &shared).await;
                            drop(guard);
                        }
                        .instrument(span),
                    );
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

fn refused(metrics: &Metrics, outcome: ConnectionOutcome) {
    metrics.connections.get_or_create(&ConnectionLabels { mode: ConnectionMode::None, outcome }).inc();
}

/// What happened to one connection; logged once when dropped.
struct ConnectionRecord {
    metrics: Arc<Metrics>,
    client: ClientAddr,
    orig_dst: Option<OrigDstAddr>,
    workload: Option<Workload>,
    sni: Option<String>,
    mode: ConnectionMode,
    reason: Option<String>,
    outcome: ConnectionOutcome,
    error: Option<String>,
    requests: u64,
    bytes_up: u64,
    bytes_down: u64,
    started: Instant,
    /// Already counted and logged elsewhere.
    quiet: bool,
    live: Option<LiveEvents>,
}

impl ConnectionRecord {
    /// A connection just accepted: nothing known yet but its client.
    fn new(metrics: Arc<Metrics>, client: ClientAddr) -> Self {
        Self {
            metrics,
            client,
            orig_dst: None,
            workload: None,
            sni: None,
            mode: ConnectionMode::None,
            reason: None,
            outcome: ConnectionOutcome::Closed,
            error: None,
            requests: 0,
            bytes_up: 0,
            bytes_down: 0,
            started: Instant::now(),
            quiet: false,
            live: None,
        }
    }

    fn fail(&mut self, outcome: ConnectionOutcome, error: &dyn std::error::Error) {
        self.outcome = outcome;
        self.error = Some(error::chain(error));
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
            outcome = self.outcome.as_str(),
            mode = self.mode.as_str(),
            client = %self.client,
            orig_dst = self.orig_dst.map(|d| d.to_string()),
            sni = self.sni.as_deref(),
            reason = self.reason.as_deref(),
            pid = w.map(|w| w.pid).filter(|&p| p != 0),
            tid = w.map(|w| w.tid).filter(|&t| t != 0),
            uid = w.map(|w| w.uid),
            comm = w.map(|w| w.comm.as_str()).filter(|c| !c.is_empty()),
            thread = w.map(|w| w.thread.as_str()).filter(|t| !t.is_empty()),
            exe = w.and_then(|w| w.exe.as_deref()),
            cgroup_id = w.map(|w| w.cgroup_id).filter(|&id| id != 0),
            pod = w.and_then(|w| w.pod.as_deref()).filter(|p| !p.name.is_empty()).map(|p| format!("{}/{}", p.namespace, p.name)),
            requests = self.requests,
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = self.error.as_deref(),
            "connection closed"
        );
        if let Some(live) = self.live.as_ref().filter(|l| l.is_watched()) {
            live.publish(self.live_json().as_bytes());
        }
    }
}

impl ConnectionRecord {
    /// The record as the live view shows it (`"event": "connection"`).
    fn live_json(&self) -> String {
        let workload = crate::audit::WorkloadInfo::of(self.workload.as_ref());
        serde_json::json!({
            "time": crate::audit::Timestamp::now(),
            "event": "connection",
            "outcome": self.outcome.as_str(),
            "mode": self.mode.as_str(),
            "client": self.client.to_string(),
            "orig_dst": self.orig_dst.map(|d| d.to_string()),
            "host": self.sni,
            "reason": self.reason,
            "workload": workload,
            "requests": self.requests,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration_ms": self.started.elapsed().as_millis() as u64,
            "error": self.error,
        })
        .to_string()
    }
}

/// Serves one accepted connection. Its future is the connection's task, as
/// large as its largest state for as long as the connection lives: so each
/// route's own work (peeking, passthrough, a plain target) is boxed, and
/// the intercepted route keeps little (see `a_connection_task_holds_little`).
async fn handle(stream: TcpStream, client: ClientAddr, mut slot: Slot, shared: &Shared) {
    let plane = &shared.plane;
    let mut record = ConnectionRecord::new(Arc::clone(&plane.metrics), client);
    record.live = plane.live.clone();
    let orig = match plane.resolver.original_dst(&stream, client) {
        Ok(orig) => OrigDstAddr(net::canonical(orig.0)),
        Err(error) => {
            // Not redirected to us (or the record was lost): refuse. The
            // proxy is never an open relay.
            record.fail(ConnectionOutcome::NoOriginalDst, &error);
            return;
        }
    };
    record.orig_dst = Some(orig);
    let span = Span::current();
    span.record("orig_dst", tracing::field::display(orig));
    record.workload = plane.resolver.workload(client, orig).await;
    if let Some(w) = record.workload.as_mut() {
        crate::workload::name_cgroup(w).await;
        if let Some(pods) = plane.pods.as_deref() {
            w.name_pod(pods);
        }
    }
    if let Some(w) = record.workload.as_ref().filter(|w| w.has_process()) {
        span.record("workload", w.comm.as_str());
    }
    if shared.addrs.is_proxy(orig.0) {
        record.outcome = ConnectionOutcome::RefusedLoop;
        return;
    }
    let key = WorkloadKey::of(record.workload.as_ref(), client);
    if !shared.limits.admit_workload(&mut slot, key) {
        // Counted and logged (rate-limited) here, not once per connection.
        record.quiet = true;
        refused(&plane.metrics, ConnectionOutcome::OverMaxConnectionsPerWorkload);
        let _ = shared.limits.warn_refused("max_connections_per_workload", client, Some(key));
        return;
    }
    let _ = stream.set_nodelay(true);

    // A plain target is known from its original destination: nothing to peek.
    let plain_name = plane.snapshot.borrow().plain.name(orig.0).map(str::to_owned);
    if let (Some(name), Some(tls)) = (plain_name, plane.tls.as_ref()) {
        record.sni = Some(name.clone());
        span.record("sni", name.as_str());
        record.mode = ConnectionMode::Plain;
        record.reason = Some("plain MCP target".into());
        return Box::pin(plain_connection(stream, orig, name, tls, shared, &mut record)).await;
    }

    let hello = Box::pin(sni::peek_client_hello(&stream, plane.settings.client_hello_timeout)).await;
    if let Peeked::Tls(info) = &hello {
        record.sni = info.sni.clone();
        if let Some(sni) = &record.sni {
            span.record("sni", sni.as_str());
        }
    }
    let Some(tls) = plane.tls.clone() else {
        // The operator turned interception off: every connection is relayed.
        record.reason = Some("TLS interception disabled".into());
        record.mode = ConnectionMode::Passthrough;
        return Box::pin(passthrough(stream, orig, shared, &mut record)).await;
    };
    let (route, reason) = {
        let snapshot = plane.snapshot.borrow();
        let ai = snapshot.targets.ai_address(orig.0.ip());
        route(&hello, ai, &snapshot.policy)
    };
    // Dropped now, not held (with its strings) for the connection's life.
    drop(hello);
    record.reason = Some(reason.into_owned());
    let guard = matches!(route, Route::Guard(_));
    match route {
        Route::Intercept(name) | Route::Guard(name) => {
            let who = rejection_identity(record.workload.as_ref());
            if shared.rejected_before(who.as_deref(), &name) {
                record.reason = Some("client rejected our certificate before".into());
                record.mode = ConnectionMode::Passthrough;
                Box::pin(passthrough(stream, orig, shared, &mut record)).await;
            } else {
                record.mode = if guard { ConnectionMode::Guard } else { ConnectionMode::Intercept };
                intercept_connection(stream, orig, name, who, tls, shared, &mut record).await;
            }
        }
        Route::Passthrough => {
            record.mode = ConnectionMode::Passthrough;
            Box::pin(passthrough(stream, orig, shared, &mut record)).await;
        }
        Route::Unclassified(why) => {
            let refused = plane.settings.unclassified == Unclassified::Refuse;
            if let Some(hook) = &plane.hook {
                let conn = hook::Unclassified {
                    client,
                    orig_dst: orig,
                    workload: record.workload.as_ref(),
                    sni: record.sni.as_deref(),
                    reason: why,
                    refused,
                };
                hook.on_unclassified(&conn).await;
            }
            if refused {
                tracing::warn!(
                    event = "unclassified_refused",
                    reason = why,
                    "connection to an AI address refused: it cannot be inspected"
                );
                record.mode = ConnectionMode::Refused;
                record.outcome = ConnectionOutcome::RefusedUnclassified;
            } else {
                record.mode = ConnectionMode::Passthrough;
                Box::pin(passthrough(stream, orig, shared, &mut record)).await;
            }
        }
        Route::Closed => record.outcome = ConnectionOutcome::ClientClosed,
    }
}

/// Where a connection goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Terminate TLS presenting this name, and verify the provider as it.
    Intercept(String),
    /// A non-AI name that shares its AI address and parent domain with an
    /// AI name: terminate TLS as it, answer 421 to any request for an AI
    /// name, relay the rest uninspected.
    Guard(String),
    /// Relay the bytes untouched.
    Passthrough,
    /// Bound for an AI address and cannot be classified, for this reason:
    /// refused, or relayed if the operator chose so.
    Unclassified(&'static str),
    /// The client closed before sending anything.
    Closed,
}

/// Decides a connection's route from its first bytes and what the target
/// set knows of its original destination, with the reason recorded for it.
/// Pure: the data plane's whole classification rule.
fn route(hello: &Peeked, dst: AiAddress<'_>, policy: &DomainPolicy) -> (Route, Cow<'static, str>) {
    const NO_NAME: &str = "no server name, and no AI name known for the address";
    let ai = dst != AiAddress::Unknown;
    let info = match hello {
        Peeked::Tls(info) => info,
        Peeked::Closed if ai => return (Route::Closed, Cow::Borrowed("closed before a ClientHello")),
        other => {
            let why = other.unclassified_reason().unwrap_or("not classified");
            let route = if ai { Route::Unclassified(why) } else { Route::Passthrough };
            return (route, Cow::Borrowed(why));
        }
    };
    let decision = policy.classify(info.sni.as_deref());
    match info.sni.as_deref() {
        Some(sni) if decision.intercept => {
            return (Route::Intercept(sni.to_string()), Cow::Borrowed(decision.reason.as_str()));
        }
        // A sibling of the address's AI names could carry their requests.
        Some(sni) if decision.reason == Reason::NotAiDomain && shares_parent(sni, dst) => {
            return (Route::Guard(sni.to_string()), Cow::Borrowed("shares an AI address and parent domain"));
        }
        // A parsed ClientHello naming a non-AI host is the one thing that
        // may pass through an AI address.
        Some(_) if decision.reason != Reason::InvalidSni => {
            return (Route::Passthrough, Cow::Borrowed(decision.reason.as_str()));
        }
        _ => {}
    }
    // No usable server name: only the address can tell.
    match dst {
        AiAddress::Named(names) => match names.iter().find(|n| policy.classify(Some(n.as_str())).intercept) {
            Some(name) => (
                Route::Intercept(name.clone()),
                Cow::Owned(format!("{}: intercepted as the address's AI name", decision.reason)),
            ),
            None => (Route::Unclassified(NO_NAME), Cow::Borrowed(NO_NAME)),
        },
        AiAddress::Configured => (Route::Unclassified(NO_NAME), Cow::Borrowed(NO_NAME)),
        AiAddress::Unknown => (Route::Passthrough, Cow::Borrowed(decision.reason.as_str())),
    }
}

/// Whether `sni` and one of the AI names `dst` is known by share a parent
/// domain of at least two labels (`www.googleapis.com` and
/// `generativelanguage.googleapis.com` share `googleapis.com`): a server
/// certificate for one may well cover the other.
fn shares_parent(sni: &str, dst: AiAddress<'_>) -> bool {
    let AiAddress::Named(names) = dst else { return false };
    let sni = sni.trim_end_matches('.');
    names.iter().any(|name| {
        let Some((_, parent)) = name.split_once('.') else { return false };
        parent.contains('.')
            && (sni.eq_ignore_ascii_case(parent)
                || sni.len() > parent.len()
                    && sni.as_bytes()[sni.len() - parent.len() - 1] == b'.'
                    && sni[sni.len() - parent.len()..].eq_ignore_ascii_case(parent))
    })
}

/// The identity a certificate rejection is remembered under: the process
/// name, when the redirect found the process. An unknown process has none,
/// so its rejection exempts nobody (keyed by an empty name, one aborted
/// handshake would pass every unattributed client of that host through).
fn rejection_identity(workload: Option<&Workload>) -> Option<String> {
    workload.filter(|w| w.has_process()).map(|w| w.comm.clone())
}

impl Shared {
    fn rejected_before(&self, who: Option<&str>, sni: &str) -> bool {
        let Some(who) = who else { return false };
        self.plane.settings.passthrough_on_reject
            && self.rejected.lock().unwrap_or_else(|e| e.into_inner()).contains(&(who.to_string(), sni.to_string()))
    }

    /// Logs a client's rejection of our certificate once per (process,
    /// host), and remembers it when the process is known. Returns whether
    /// it was remembered.
    fn note_rejection(&self, who: Option<&str>, sni: &str, record: &ConnectionRecord, error: &str) -> bool {
        let mut rejected = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
        let key = who.map(|who| (who.to_string(), sni.to_string()));
        if key.as_ref().is_some_and(|k| rejected.contains(k)) {
            return true;
        }
        let remembered = key.is_some();
        if let Some(key) = key {
            if rejected.len() >= MAX_REJECTED {
                rejected.clear();
            }
            rejected.insert(key);
        }
        tracing::warn!(
            event = "certificate_rejected",
            comm = who,
            pid = record.workload.as_ref().map(|w| w.pid).filter(|&p| p != 0),
            error,
            passthrough_from_now = self.plane.settings.passthrough_on_reject && remembered,
            "client rejected the interceptor's certificate (pinned certificate, or our CA is not trusted: see `interceptor ca install`)"
        );
        remembered
    }
}

async fn intercept_connection(
    stream: TcpStream,
    orig: OrigDstAddr,
    sni: String,
    who: Option<String>,
    tls: Arc<TlsTermination>,
    shared: &Shared,
    record: &mut ConnectionRecord,
) {
    if record.sni.is_none() {
        // Intercepted as the address's AI name: the connection's name from now on.
        Span::current().record("sni", sni.as_str());
    }
    // A client that stalls mid-handshake is bounded like a slow request head.
    let handshake_timeout = shared.plane.settings.header_read_timeout;
    // The stream boxed as it comes out of the handshake (see `http::serve`).
    let handshake = async {
        match record.sni {
            Some(_) => tls.accept(stream, &sni).await.map(Box::new),
            None => tls.accept_as(stream, &sni).await.map(Box::new),
        }
    };
    // Boxed, like every stage that ends before the connection does: the
    // connection's task then keeps only what it needs while idle.
    let tls_stream = match tokio::time::timeout(handshake_timeout, Box::pin(handshake)).await {
        Err(_) => {
            record.outcome = ConnectionOutcome::ClientTlsTimeout;
            record.error = Some(format!("TLS handshake not finished within {handshake_timeout:?}"));
            return;
        }
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            let text = error::chain(&error);
            if tls::is_certificate_rejection(&error) {
                shared.note_rejection(who.as_deref(), &sni, record, &text);
                record.outcome = ConnectionOutcome::ClientRejectedCertificate;
            } else {
                record.outcome = ConnectionOutcome::ClientTlsFailed;
            }
            record.error = Some(text);
            return;
        }
    };
    let upstream = match tls.pool.get(shared.worker, orig.0, &sni) {
        Ok(u) => u,
        Err(error) => {
            record.fail(ConnectionOutcome::InvalidSni, &error);
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
        receiving: Default::default(),
        coalesced_guard: (record.mode == ConnectionMode::Guard)
            .then(|| Arc::clone(&shared.plane.snapshot.borrow().policy)),
        upgrades: Default::default(),
    });
    let result = http::serve(tls_stream, Arc::clone(&conn)).await;
    record.requests = conn.requests.load(Ordering::Relaxed);
    (record.bytes_up, record.bytes_down) = conn.upgrades.counts.load();
    match result {
        Ok(()) => record.outcome = ConnectionOutcome::Intercepted,
        Err(error) => {
            record.outcome = ConnectionOutcome::Intercepted;
            record.error = Some(error::chain(error.as_ref()));
        }
    }
}

/// Serves a plain target's connection as HTTP/1.1 and relays it as plain
/// HTTP to its original destination, through the hook. Bytes that are not
/// HTTP get hyper's `400` and a `not_http` record.
async fn plain_connection(
    stream: TcpStream,
    orig: OrigDstAddr,
    name: String,
    tls: &TlsTermination,
    shared: &Shared,
    record: &mut ConnectionRecord,
) {
    let upstream = tls.pool.get_plain(shared.worker, orig.0);
    let conn = Arc::new(http::Intercepted {
        exchange: Arc::new(Exchange {
            client: record.client,
            orig_dst: orig,
            sni: name,
            workload: record.workload.clone(),
        }),
        upstream,
        hook: shared.plane.hook.clone(),
        limits: http::HttpLimits::from(&shared.plane.settings),
        budget: Arc::clone(&shared.budget),
        active: tokio::sync::watch::Sender::new(0),
        requests: Default::default(),
        receiving: Default::default(),
        coalesced_guard: None,
        upgrades: Default::default(),
    });
    let result = http::serve(Box::new(stream), Arc::clone(&conn)).await;
    record.requests = conn.requests.load(Ordering::Relaxed);
    (record.bytes_up, record.bytes_down) = conn.upgrades.counts.load();
    record.outcome = ConnectionOutcome::Intercepted;
    if let Err(error) = result {
        let not_http = record.requests == 0 && error.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_parse);
        if not_http {
            record.outcome = ConnectionOutcome::NotHttp;
            tracing::warn!(
                event = "plain_not_http",
                "a plain MCP target's client sent something that is not HTTP/1.1: answered 400 and closed"
            );
        }
        record.error = Some(error::chain(error.as_ref()));
    }
}

async fn passthrough(mut client_stream: TcpStream, orig: OrigDstAddr, shared: &Shared, record: &mut ConnectionRecord) {
    let settings = &shared.plane.settings;
    let mut upstream = match connect_upstream(orig.0, shared.addrs.mark, settings.connect_timeout).await {
        Ok(s) => s,
        Err(error) => {
            record.fail(ConnectionOutcome::UpstreamConnectFailed, &error);
            return;
        }
    };
    // The ClientHello was only peeked: it is still the first thing to read.
    let (counts, result) = match splice::Pipes::new() {
        Ok(pipes) => splice::relay(&client_stream, &upstream, pipes).await,
        Err(error) => {
            copy_fallback(&shared.plane.metrics, &error);
            match tokio::io::copy_bidirectional(&mut client_stream, &mut upstream).await {
                Ok((up, down)) => (splice::Relayed { up, down }, Ok(())),
                Err(error) => (splice::Relayed::default(), Err(error)),
            }
        }
    };
    record.bytes_up = counts.up;
    record.bytes_down = counts.down;
    match result {
        Ok(()) => record.outcome = ConnectionOutcome::Relayed,
        Err(error) => record.fail(ConnectionOutcome::RelayError, &error),
    }
}

/// A passthrough relayed by copying, for want of pipes: counted every time,
/// logged the first time only (it happens when descriptors run out, which
/// would otherwise log once per connection).
fn copy_fallback(metrics: &Metrics, error: &std::io::Error) {
    static LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    metrics.passthrough_copy_fallbacks.inc();
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %error::chain(error),
            "cannot make pipes to splice a passthrough connection; relaying it by copying (counted in interceptor_passthrough_copy_fallbacks_total)"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{net::MockOrigDst, policy::DomainsConfig};

    /// What a connection's task holds, idle or not, for as long as the
    /// connection lives: a future takes the size of its largest state, so
    /// every stage that ends (the handshake) or that only other routes take
    /// (passthrough) is boxed, and the TLS stream is boxed (see
    /// `http::serve`). At 10,000 idle connections each kilobyte here is
    /// 10 MB. The bound leaves room for the unoptimized build.
    #[test]
    fn a_connection_task_holds_little() {
        fn returned<A, B, C, D, F>(_: impl FnOnce(A, B, C, D) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        // 5352 bytes when the TLS stream was passed by value and passthrough inline.
        let task = returned(handle);
        assert!(task <= 1400, "{task} bytes");
    }

    /// A closed connection's record reaches the live view's watchers, with
    /// what the log line says; nothing is built when nobody watches.
    #[tokio::test]
    async fn a_closed_connection_is_shown_to_live_watchers() {
        use http_body_util::BodyExt as _;
        let live = LiveEvents::default();
        let mut body = live.stream(crate::observe::Filter::default());
        let mut record = ConnectionRecord::new(Arc::new(Metrics::new()), ClientAddr("10.0.0.7:40000".parse().unwrap()));
        record.live = Some(live.clone());
        record.sni = Some("api.openai.com".into());
        record.mode = ConnectionMode::Intercept;
        record.outcome = ConnectionOutcome::Intercepted;
        record.requests = 3;
        drop(record);
        let line = body.frame().await.unwrap().unwrap().into_data().unwrap();
        let event: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(event["event"], "connection", "{event}");
        assert_eq!(event["host"], "api.openai.com", "{event}");
        assert_eq!(event["outcome"], ConnectionOutcome::Intercepted.as_str(), "{event}");
        assert_eq!(event["requests"], 3, "{event}");
        assert_eq!(event["client"], "10.0.0.7:40000", "{event}");
    }

    fn plane(resolver: Arc<dyn OrigDstResolver>) -> DataPlane {
        let policy = DomainPolicy::compile(&DomainsConfig::default()).unwrap();
        let (_tx, snapshot) = watch::channel(Arc::new(Snapshot::new(policy)));
        let settings = ProxySettings {
            connect_timeout: Duration::from_secs(2),
            client_hello_timeout: Duration::from_millis(200),
            ..ProxySettings::default()
        };
        DataPlane {
            resolver,
            settings,
            snapshot,
            tls: None,
            hook: None,
            metrics: Arc::new(Metrics::new()),
            pods: None,
            live: None,
        }
    }

    async fn start(default: Option<SocketAddr>) -> (Proxy, ProxyAddrs, watch::Sender<bool>) {
        let listeners = Listeners::bind(Ipv4Addr::LOCALHOST, None, 0, 0).await.unwrap();
        let addrs = listeners.addrs;
        let resolver = Arc::new(MockOrigDst { dst: std::sync::Mutex::new(HashMap::new()), default, workload: None });
        let (tx, rx) = watch::channel(false);
        (Proxy::serve(listeners, plane(resolver), rx).unwrap(), addrs, tx)
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
        let w = Workload { pid: 1, tid: 1, uid: 0, gid: 0, comm: "x".into(), cgroup_id: 9, ..Default::default() };
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
    fn an_ai_address_is_inspected_unless_a_parsed_hello_names_a_non_ai_host() {
        use std::collections::BTreeSet;

        use crate::proxy::sni::ClientHelloInfo;
        let policy = DomainPolicy::compile(&DomainsConfig::default()).unwrap();
        let names: BTreeSet<String> = ["api.openai.com".to_string()].into();
        let learned = AiAddress::Named(&names);
        let hello = |sni: Option<&str>| Peeked::Tls(ClientHelloInfo { sni: sni.map(str::to_owned), alpn: vec![] });
        let r = |p: &Peeked, dst| route(p, dst, &policy).0;

        for dst in [learned, AiAddress::Configured, AiAddress::Unknown] {
            assert_eq!(r(&hello(Some("api.anthropic.com")), dst), Route::Intercept("api.anthropic.com".into()));
            assert_eq!(r(&hello(Some("example.org")), dst), Route::Passthrough, "a non-AI name passes");
            // Chatty domains are the operator's explicit exception.
            assert_eq!(r(&hello(Some("telemetry.x.githubcopilot.com")), dst), Route::Passthrough);
        }
        // No server name: the name the address is known by, or nothing.
        let (route_, reason) = route(&hello(None), learned, &policy);
        assert_eq!(route_, Route::Intercept("api.openai.com".into()));
        assert!(reason.contains("no SNI"), "{reason}");
        assert!(matches!(r(&hello(None), AiAddress::Configured), Route::Unclassified(_)));
        assert_eq!(r(&hello(None), AiAddress::Unknown), Route::Passthrough);
        // Known only by names that are not intercepted: nothing to present.
        let chatty: BTreeSet<String> = ["telemetry.x.githubcopilot.com".to_string()].into();
        assert!(matches!(r(&hello(None), AiAddress::Named(&chatty)), Route::Unclassified(_)));

        // Whatever cannot be classified is refused at an AI address only.
        for p in [Peeked::NotTls, Peeked::Invalid, Peeked::TooLarge, Peeked::Timeout] {
            let why = p.unclassified_reason().unwrap();
            for dst in [learned, AiAddress::Configured] {
                assert_eq!(route(&p, dst, &policy), (Route::Unclassified(why), Cow::Borrowed(why)), "{p:?}");
            }
            assert_eq!(r(&p, AiAddress::Unknown), Route::Passthrough, "{p:?}");
        }
        // A sibling name at the address is watched for coalesced AI requests.
        let google: BTreeSet<String> = ["generativelanguage.googleapis.com".to_string()].into();
        let at_google = AiAddress::Named(&google);
        assert_eq!(r(&hello(Some("www.googleapis.com")), at_google), Route::Guard("www.googleapis.com".into()));
        assert_eq!(r(&hello(Some("GoogleApis.com.")), at_google), Route::Guard("GoogleApis.com.".into()));
        assert_eq!(r(&hello(Some("evilgoogleapis.com")), at_google), Route::Passthrough);
        assert_eq!(r(&hello(Some("www.googleapis.com")), AiAddress::Configured), Route::Passthrough);
        // A parent of one label (`com`) is no family.
        let chatgpt: BTreeSet<String> = ["chatgpt.com".to_string()].into();
        assert_eq!(r(&hello(Some("example.com")), AiAddress::Named(&chatgpt)), Route::Passthrough);
        assert_eq!(r(&Peeked::Closed, learned), Route::Closed);
        assert_eq!(r(&Peeked::Closed, AiAddress::Unknown), Route::Passthrough);
    }

    #[test]
    fn rejections_are_remembered_only_for_a_known_process() {
        let mut p = plane(Arc::new(MockOrigDst { dst: Default::default(), default: None, workload: None }));
        p.settings.passthrough_on_reject = true;
        let (in_flight, _rx) = mpsc::channel(1);
        let shared = Shared {
            limits: Arc::new(ConnectionLimits::new(&p.settings)),
            budget: budget::BodyBudget::new(
                p.settings.max_buffered_total,
                p.metrics.inspection_budget_refusals.clone(),
            ),
            plane: p,
            addrs: ProxyAddrs { v4: "127.0.0.1:1".parse().unwrap(), v6: None, mark: 0 },
            worker: 0,
            rejected: Arc::default(),
            in_flight,
        };
        let mut record = ConnectionRecord::new(Arc::new(Metrics::new()), ClientAddr("127.0.0.1:5000".parse().unwrap()));
        record.quiet = true;
        let known =
            Workload { pid: 7, tid: 7, uid: 0, gid: 0, comm: "curl".into(), cgroup_id: 0, ..Default::default() };
        // The socket was found but not its process (iptables mode).
        let socket_only =
            Workload { pid: 0, tid: 0, uid: 1000, gid: 0, comm: String::new(), cgroup_id: 9, ..Default::default() };
        assert_eq!(rejection_identity(Some(&known)).as_deref(), Some("curl"));
        assert_eq!(rejection_identity(Some(&socket_only)), None);
        assert_eq!(rejection_identity(None), None);

        // Unknown: logged, not remembered, nobody is exempted.
        assert!(!shared.note_rejection(None, "api.openai.com", &record, "alert"));
        assert!(!shared.rejected_before(None, "api.openai.com"));
        assert!(!shared.rejected_before(Some(""), "api.openai.com"));
        assert!(shared.rejected.lock().unwrap().is_empty());
        // Known: that process and host only.
        assert!(shared.note_rejection(Some("curl"), "api.openai.com", &record, "alert"));
        assert!(shared.rejected_before(Some("curl"), "api.openai.com"));
        assert!(!shared.rejected_before(Some("python3"), "api.openai.com"));
        assert!(!shared.rejected_before(Some("curl"), "api.anthropic.com"));
        assert!(!shared.rejected_before(None, "api.openai.com"));
    }

    #[tokio::test]
    async fn passthrough_splices_a_half_closed_exchange_and_records_its_bytes() {
        const UP: usize = 3 << 20;
        const DOWN: usize = 5 << 20;
        let p = plane(Arc::new(MockOrigDst { dst: Default::default(), default: None, workload: None }));
        let (in_flight, _rx) = mpsc::channel(1);
        let shared = Shared {
            limits: Arc::new(ConnectionLimits::new(&p.settings)),
            budget: budget::BodyBudget::new(
                p.settings.max_buffered_total,
                p.metrics.inspection_budget_refusals.clone(),
            ),
            plane: p,
            addrs: ProxyAddrs { v4: "127.0.0.1:1".parse().unwrap(), v6: None, mark: 0 },
            rejected: Arc::default(),
            in_flight,
            worker: 0,
        };
        // The provider reads the whole request (to the client's half-close),
        // then answers.
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let orig = OrigDstAddr(upstream.local_addr().unwrap());
        let provider = tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&vec![b'd'; DOWN]).await.unwrap();
            got
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(listener.local_addr().unwrap()), listener.accept());
        let (mut client, accepted) = (client.unwrap(), accepted.unwrap().0);
        let mut record =
            ConnectionRecord::new(Arc::clone(&shared.plane.metrics), ClientAddr("127.0.0.1:5000".parse().unwrap()));
        record.quiet = true;
        let drive = async {
            client.write_all(&vec![b'u'; UP]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(passthrough(accepted, orig, &shared, &mut record), drive);
        let got = provider.await.unwrap();
        assert!(got.len() == UP && got.iter().all(|&b| b == b'u'), "provider got {} bytes", got.len());
        assert!(back.len() == DOWN && back.iter().all(|&b| b == b'd'), "client got {} bytes", back.len());
        assert_eq!(record.outcome, ConnectionOutcome::Relayed);
        assert_eq!((record.bytes_up, record.bytes_down), (UP as u64, DOWN as u64));
        assert_eq!(shared.plane.metrics.passthrough_copy_fallbacks.get(), 0, "spliced, not copied");
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

    /// Records the name of the thread each connection is served on, then
    /// closes it (no original destination).
    #[derive(Default)]
    struct ThreadRecorder(Mutex<Vec<String>>);

    impl OrigDstResolver for ThreadRecorder {
        fn original_dst(&self, _: &TcpStream, client: ClientAddr) -> Result<OrigDstAddr, net::NoOriginalDst> {
            let name = std::thread::current().name().unwrap_or_default().to_owned();
            self.0.lock().unwrap().push(name);
            Err(net::NoOriginalDst { client: client.0, source: std::io::ErrorKind::NotFound.into() })
        }

        fn workload(&self, _: ClientAddr, _: OrigDstAddr) -> net::WorkloadLookup {
            Box::pin(std::future::ready(None))
        }
    }

    #[tokio::test]
    async fn workers_share_the_port_serve_on_their_own_threads_and_stop_when_drained() {
        let listeners = Listeners::bind_workers(Ipv4Addr::LOCALHOST, None, 0, 0, 2).await.unwrap();
        assert_eq!(listeners.workers(), 2);
        let addr = SocketAddr::V4(listeners.addrs.v4);
        let recorder = Arc::new(ThreadRecorder::default());
        let (stop, shutdown) = watch::channel(false);
        let proxy = Proxy::serve(listeners, plane(recorder.clone()), shutdown).unwrap();
        // The kernel picks a listener by a hash of each connection's
        // addresses: 64 connections all on one worker would be a 2^-63 chance.
        for _ in 0..64 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).await.unwrap();
        }
        let names = recorder.0.lock().unwrap().clone();
        assert_eq!(names.len(), 64);
        let on_worker_1 = names.iter().filter(|n| *n == "proxy-worker-1").count();
        assert!(on_worker_1 > 0 && on_worker_1 < 64, "worker 1 served {on_worker_1} of 64: {names:?}");
        // Worker 0 is the caller's runtime: this test's thread.
        let caller = std::thread::current().name().unwrap_or_default().to_owned();
        assert!(names.iter().all(|n| *n == caller || n == "proxy-worker-1"), "{names:?}");
        stop.send(true).unwrap();
        assert!(proxy.drain(Duration::from_secs(2)).await);
        // Every worker's listener is closed once draining returns.
        let refused = TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
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
            workload: None,
        });
        let (_tx, rx) = watch::channel(false);
        let _proxy = Proxy::serve(listeners, plane(resolver), rx).unwrap();
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
