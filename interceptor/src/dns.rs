//! DNS forwarder for DNS-aware targeting.
//!
//! Agents' DNS queries are redirected here by the kernel (not this module's
//! concern). Each query is forwarded unchanged to the server its client
//! asked (its original destination, which an [`AskedServer`] recovers), or to
//! configured resolvers ([`Upstreams`]); when the answer maps an AI domain to
//! addresses, the forwarder hands them to a [`DnsObserver`] and holds the
//! reply until the observer returns, so the client's next `connect()` to
//! those addresses is already redirected.
//!
//! Asking the server the client asked is what keeps DNS loop-free when
//! resolvers themselves are covered: a stub such as systemd-resolved on
//! 127.0.0.53, or CoreDNS in a pod, is asked by its clients through us, and
//! its own upstream query comes through us too, on its way to its own
//! upstream; nothing goes round. What could still go round (resolvers that
//! send their queries to the forwarder's port directly, or configured
//! upstreams whose own queries are redirected back) is detected and
//! refused: see [`LOOP_DEPTH`].
//! Answers about AI names lose their Encrypted ClientHello configurations
//! (`ech` in HTTPS and SVCB records), so clients name the host they reach.
//!
//! This module owns the DNS exchange (wire format through `hickory-proto`,
//! never by hand). It does not decide what an AI domain is and does not touch
//! redirect state: the observer does both. Upstream sockets carry the
//! configured `SO_MARK` so the redirect skips the forwarder's own traffic.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    os::fd::AsFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::{
    ProtoError,
    op::{Header, Message, MessageType, ResponseCode},
    rr::{
        Name, RData,
        rdata::{
            HTTPS,
            svcb::{SvcParamKey, SvcParamValue},
        },
    },
    serialize::binary::{BinDecodable, BinDecoder, DecodeError},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream, UdpSocket},
    sync::{Semaphore, watch},
    task::JoinHandle,
    time::timeout,
};

use crate::{error, net::set_mark};

/// How long one upstream attempt may take.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reply is held for the observer.
pub const DEFAULT_OBSERVER_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client TCP connection may sit without a complete query.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Queries answered at once (and, separately, client TCP connections).
pub const DEFAULT_MAX_INFLIGHT: usize = 1024;
/// A query is a loop when it arrives from the host of upstream X, for a
/// question that is already on its way to X this many times: X is asking
/// us what we asked it. One or two at once happen legitimately (clients on
/// X's host asking the same name concurrently); a loop adds one per round
/// trip, so it is cut after this many rounds and X sees at most this many
/// plus one copies.
pub const LOOP_DEPTH: u32 = 8;
/// At most one loop error is logged per this interval; the others are
/// counted into the next one.
const LOOP_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// The largest DNS message: a UDP datagram or a TCP frame (RFC 1035 4.2.2).
const MAX_MESSAGE: usize = 65535;
/// Pause after a failed `accept()` (e.g. out of file descriptors) so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot open a socket for upstream {upstream}")]
    Socket {
        upstream: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mark {mark:#x} on a socket for upstream {upstream}")]
    Mark {
        upstream: SocketAddr,
        mark: u32,
        #[source]
        source: io::Error,
    },
    #[error("exchange with upstream {upstream} failed")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {upstream} did not answer within {timeout:?}")]
    Timeout { upstream: SocketAddr, timeout: Duration },
    #[error("reply from upstream {upstream} does not parse")]
    Decode {
        upstream: SocketAddr,
        #[source]
        source: DecodeError,
    },
    #[error("reply from upstream {upstream} does not match the query")]
    Mismatch { upstream: SocketAddr },
    #[error("cannot encode a dns message")]
    Encode {
        #[source]
        source: ProtoError,
    },
    #[error(
        "dns loop: {client} asks for {name} while {depth} queries for it are already waiting on {upstream}, \
         which is on {client}'s host: a resolver is sending its own queries back to us (one that forwards to the \
         interceptor's DNS port directly, or a configured upstream whose queries are redirected); answering servfail"
    )]
    Loop { client: SocketAddr, name: String, upstream: SocketAddr, depth: u32 },
}

/// Where the forwarder sends queries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstreams {
    /// The server the client asked (the query's original destination, see
    /// [`AskedServer`]). When that cannot be told (a query sent to the
    /// forwarder's port directly, a redirect mode without records), or it is
    /// a loopback address asked from another network namespace (a pod's
    /// local resolver, unreachable from here), the `fallback` resolvers, in
    /// order.
    Asked { fallback: Vec<SocketAddr> },
    /// These resolvers, in order, whatever the client asked.
    Configured(Vec<SocketAddr>),
}

/// Recovers the server a redirected query was sent to: the redirect's
/// record, kept by the kernel side.
pub trait AskedServer: Send + Sync + 'static {
    /// For a datagram from `client` received on `local`.
    fn udp(&self, client: SocketAddr, local: SocketAddr) -> Option<SocketAddr>;
    /// For an accepted connection from `client`.
    fn tcp(&self, stream: &TcpStream, client: SocketAddr) -> Option<SocketAddr>;
}

/// No redirect records: every query goes to the fallback resolvers.
#[derive(Clone, Copy, Debug, Default)]
pub struct NothingAsked;

impl AskedServer for NothingAsked {
    fn udp(&self, _: SocketAddr, _: SocketAddr) -> Option<SocketAddr> {
        None
    }
    fn tcp(&self, _: &TcpStream, _: SocketAddr) -> Option<SocketAddr> {
        None
    }
}

/// An address an answer tied to an AI domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Learned {
    /// The AI domain that matched: the query name or the first name in its
    /// CNAME chain that is one (lowercase, no trailing dot).
    pub name: String,
    pub addr: IpAddr,
    /// The A/AAAA record's TTL (may be zero).
    pub ttl: Duration,
}

/// Decides which names matter and takes what answers teach.
#[async_trait::async_trait]
pub trait DnsObserver: Send + Sync + 'static {
    /// Whether `name` (lowercase, no trailing dot) is an AI domain.
    fn is_ai_domain(&self, name: &str) -> bool;

    /// Called with what an answer taught; the reply is held until this
    /// returns or [`ForwarderConfig::observer_timeout`] passes.
    async fn learned(&self, learned: Vec<Learned>);
}

/// How the forwarder reaches upstream and bounds its work.
#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    /// Where queries go; a list is tried in order, the next one on error or
    /// timeout. The forwarder's own listening addresses are never used.
    pub upstreams: Upstreams,
    /// `SO_MARK` on upstream sockets; 0 sets none.
    pub mark: u32,
    /// Per upstream attempt.
    pub timeout: Duration,
    /// How long a reply waits for [`DnsObserver::learned`]. Past it the reply
    /// goes out anyway and an error is logged: learning fails open, so the
    /// client may connect before its address is redirected, but DNS never
    /// hangs on a stuck observer.
    pub observer_timeout: Duration,
    /// How long a client TCP connection may stay without a complete query.
    pub idle_timeout: Duration,
    /// Queries handled at once; UDP queries beyond it are dropped (the client
    /// retries), TCP queries wait. Client TCP connections have their own
    /// limit of the same size.
    pub max_inflight: usize,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            upstreams: Upstreams::Asked { fallback: Vec::new() },
            mark: 0,
            timeout: DEFAULT_UPSTREAM_TIMEOUT,
            observer_timeout: DEFAULT_OBSERVER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_inflight: DEFAULT_MAX_INFLIGHT,
        }
    }
}

/// A running forwarder: its UDP and TCP listener tasks.
pub struct DnsForwarder {
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for DnsForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsForwarder").field("upstreams", &self.shared.cfg.upstreams).finish_non_exhaustive()
    }
}

impl DnsForwarder {
    /// Serves UDP and TCP on the given sockets until `shutdown` turns true
    /// (or its sender is dropped). Must be called within a tokio runtime.
    pub fn serve(
        udp: UdpSocket,
        tcp: TcpListener,
        cfg: ForwarderConfig,
        observer: Arc<dyn DnsObserver>,
        asked: Arc<dyn AskedServer>,
        shutdown: watch::Receiver<bool>,
    ) -> DnsForwarder {
        match &cfg.upstreams {
            Upstreams::Configured(list) if list.is_empty() => {
                tracing::warn!("no dns upstreams configured; every query will be answered with servfail")
            }
            Upstreams::Asked { fallback } if fallback.is_empty() => tracing::warn!(
                "no fallback dns resolver: queries whose server cannot be told will be answered with servfail"
            ),
            _ => {}
        }
        let limit = cfg.max_inflight.clamp(1, Semaphore::MAX_PERMITS);
        let own =
            [udp.local_addr().ok(), tcp.local_addr().ok()].into_iter().flatten().map(crate::net::canonical).collect();
        let shared = Arc::new(Shared {
            cfg,
            observer,
            asked,
            own,
            inflight: Arc::new(Semaphore::new(limit)),
            waiting: Mutex::new(HashMap::new()),
            loops: LoopReport::default(),
        });
        let stats = Arc::clone(&shared);
        let udp = tokio::spawn(serve_udp(udp, shared.clone(), shutdown.clone()));
        let tcp = tokio::spawn(serve_tcp(tcp, shared, limit, shutdown));
        DnsForwarder { udp, tcp, shared: stats }
    }

    /// Queries refused as loops so far.
    pub fn loops_refused(&self) -> u64 {
        self.shared.loops.total.load(Ordering::Relaxed)
    }

    /// Waits for both listeners to stop. Queries already in flight finish on
    /// their own, bounded by the timeouts.
    pub async fn join(self) {
        for (transport, task) in [("udp", self.udp), ("tcp", self.tcp)] {
            if let Err(error) = task.await {
                tracing::error!(transport, %error, "dns listener task failed");
            }
        }
    }

    /// Stops both listeners at once, without waiting for `shutdown`.
    pub fn abort(&self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

/// The `nameserver` entries of a resolv.conf, on port 53, in order, without
/// duplicates. A numeric IPv6 zone (`fe80::1%2`) becomes the scope id; a named
/// one cannot be resolved without I/O, so that entry is skipped.
pub fn system_upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for line in resolv_conf.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next().and_then(parse_nameserver) else {
            continue;
        };
        if !upstreams.contains(&addr) {
            upstreams.push(addr);
        }
    }
    upstreams
}

fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    let (ip, zone) = match word.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (word, None),
    };
    match (ip.parse::<IpAddr>().ok()?, zone) {
        (IpAddr::V4(v4), None) => Some(SocketAddr::new(IpAddr::V4(v4), 53)),
        (IpAddr::V4(_), Some(_)) => None,
        (IpAddr::V6(v6), None) => Some(SocketAddr::new(IpAddr::V6(v6), 53)),
        (IpAddr::V6(v6), Some(zone)) => {
            let scope = zone.parse::<u32>().ok()?;
            Some(SocketAddr::V6(SocketAddrV6::new(v6, 53, 0, scope)))
        }
    }
}

/// What an answer teaches: the A and AAAA records of the answer section owned
/// by the query name or a name its CNAME chain (in the answer section)
/// reaches, when the query name or any name of that chain is an AI domain.
/// Records not connected to the question are ignored; names compare without
/// case or trailing dot; each address is reported once.
pub fn extract(message: &Message, observer: &dyn DnsObserver) -> Vec<Learned> {
    let chain = cname_chain(message);
    let Some(ai_name) = chain.iter().find(|name| observer.is_ai_domain(name)) else {
        return Vec::new();
    };

    let mut learned: Vec<Learned> = Vec::new();
    for record in &message.answers {
        if !chain.contains(&normalize(&record.name)) {
            continue;
        }
        let ttl = Duration::from_secs(u64::from(record.ttl));
        let mut learn = |addr: IpAddr| {
            if !learned.iter().any(|l| l.addr == addr) {
                learned.push(Learned { name: ai_name.clone(), addr, ttl });
            }
        };
        match &record.data {
            RData::A(a) => learn(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => learn(IpAddr::V6(aaaa.0)),
            // Clients may connect to the address hints of an HTTPS or SVCB
            // record without asking for A or AAAA records.
            RData::HTTPS(HTTPS(svcb)) | RData::SVCB(svcb) => {
                for (_, value) in &svcb.svc_params {
                    match value {
                        SvcParamValue::Ipv4Hint(hint) => hint.0.iter().for_each(|a| learn(IpAddr::V4(a.0))),
                        SvcParamValue::Ipv6Hint(hint) => hint.0.iter().for_each(|a| learn(IpAddr::V6(a.0))),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    learned
}

/// The question's name and the names its CNAME chain in the answer section
/// reaches, normalized.
fn cname_chain(message: &Message) -> Vec<String> {
    let Some(question) = message.queries.first() else {
        return Vec::new();
    };
    let mut chain = vec![normalize(question.name())];
    // A chain may be listed in any order and may loop; it cannot be longer
    // than the answer section.
    while chain.len() <= message.answers.len() {
        let Some(current) = chain.last() else {
            break;
        };
        let next = message.answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if normalize(&record.name) == *current => Some(normalize(&target.0)),
            _ => None,
        });
        match next {
            Some(next) if !chain.contains(&next) => chain.push(next),
            _ => break,
        }
    }
    chain
}

/// Removes the Encrypted ClientHello configurations (`ech` parameters) of
/// the HTTPS and SVCB records in a reply about an AI name (its question or
/// CNAME chain): a client using ECH shows the proxy only an outer server
/// name, and its requests could not be classified. Without the parameter
/// clients connect with a plain ClientHello (RFC 9849's non-ECH fallback).
/// Returns whether anything was removed.
pub fn strip_ech(message: &mut Message, observer: &dyn DnsObserver) -> bool {
    if !cname_chain(message).iter().any(|name| observer.is_ai_domain(name)) {
        return false;
    }
    let mut stripped = false;
    for record in message.answers.iter_mut().chain(message.additionals.iter_mut()) {
        let svcb = match &mut record.data {
            RData::HTTPS(HTTPS(svcb)) | RData::SVCB(svcb) => svcb,
            _ => continue,
        };
        let before = svcb.svc_params.len();
        svcb.svc_params.retain(|(key, _)| *key != SvcParamKey::EchConfigList);
        stripped |= svcb.svc_params.len() != before;
    }
    stripped
}

/// Lowercase ASCII (IDNs as punycode) without the trailing dot.
fn normalize(name: &Name) -> String {
    let mut text = name.to_ascii().to_ascii_lowercase();
    if text.ends_with('.') {
        text.pop();
    }
    text
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Udp,
    Tcp,
}

struct Shared {
    cfg: ForwarderConfig,
    observer: Arc<dyn DnsObserver>,
    asked: Arc<dyn AskedServer>,
    /// Our own listening addresses: never an upstream.
    own: Vec<SocketAddr>,
    inflight: Arc<Semaphore>,
    /// Exchanges under way, per upstream address and question: the loop
    /// detector's window.
    waiting: Mutex<HashMap<(IpAddr, QuestionKey), u32>>,
    loops: LoopReport,
}

/// A question as the loop detector compares it: name (normalized), type,
/// class.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct QuestionKey(String, u16, u16);

impl QuestionKey {
    fn of(message: &Message) -> Option<Self> {
        let q = message.queries.first()?;
        Some(Self(normalize(q.name()), u16::from(q.query_type()), u16::from(q.query_class())))
    }
}

/// One exchange counted in [`Shared::waiting`] until dropped (also when the
/// query is cancelled).
struct Waiting<'a> {
    shared: &'a Shared,
    key: (IpAddr, QuestionKey),
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.shared.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = waiting.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                waiting.remove(&self.key);
            }
        }
    }
}

/// Rate-limits the loop error: a loop produces a query per round trip.
#[derive(Default)]
struct LoopReport {
    total: AtomicU64,
    last: Mutex<Option<std::time::Instant>>,
    suppressed: AtomicU64,
}

impl LoopReport {
    fn report(&self, error: &DnsError) {
        self.total.fetch_add(1, Ordering::Relaxed);
        let now = std::time::Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| now.duration_since(at) < LOOP_REPORT_INTERVAL) {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            *last = Some(now);
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::error!(event = "dns_loop", suppressed, error = %error::chain(error), "dns loop refused");
    }
}

/// Where a query from `client` that was sent to `asked` (when known) goes,
/// in order; never to one of `own` addresses (the forwarder's).
fn route(upstreams: &Upstreams, own: &[SocketAddr], client: SocketAddr, asked: Option<SocketAddr>) -> Vec<SocketAddr> {
    let list = match upstreams {
        Upstreams::Configured(list) => list.clone(),
        Upstreams::Asked { fallback } => match asked.map(crate::net::canonical) {
            // Sent to us directly (a connection that was not redirected
            // reports our own address as its original destination).
            Some(asked) if own.contains(&asked) => fallback.clone(),
            // A pod's local resolver is not ours.
            Some(asked) if asked.ip().is_loopback() && !canonical_ip(client.ip()).is_loopback() => {
                tracing::debug!(%client, %asked, "a loopback dns server asked from another namespace; using the fallback");
                fallback.clone()
            }
            Some(asked) => vec![asked],
            None => fallback.clone(),
        },
    };
    list.into_iter().filter(|u| !own.contains(&crate::net::canonical(*u))).collect()
}

/// Whether `a` and `b` are the same host as far as a loop goes: the same
/// address, or both loopback (a stub on 127.0.0.53 sends from 127.0.0.1).
fn same_host(a: IpAddr, b: IpAddr) -> bool {
    let (a, b) = (canonical_ip(a), canonical_ip(b));
    a == b || (a.is_loopback() && b.is_loopback())
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Resolves when `shutdown` turns true. A dropped sender also stops serving:
/// nobody is left to stop us later.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let local = socket.local_addr().ok();
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (len, client) = tokio::select! {
            () = stopped(&mut shutdown) => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(received) => received,
                Err(error) => {
                    tracing::debug!(%error, "cannot receive a dns datagram");
                    continue;
                }
            },
        };
        // Dropping beyond the limit keeps a flood from growing memory; the
        // client retries like it would after a lost datagram.
        let Ok(permit) = shared.inflight.clone().try_acquire_owned() else {
            tracing::debug!(%client, "too many dns queries in flight; dropping one");
            continue;
        };
        let query = buf[..len].to_vec();
        // Read at once: the kernel's record is freshest now.
        let asked = local.and_then(|local| shared.asked.udp(client, local));
        let socket = socket.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(reply) = shared.answer(&query, client, asked, Transport::Udp).await
                && let Err(error) = socket.send_to(&reply, client).await
            {
                tracing::debug!(%client, %error, "cannot send a dns reply");
            }
        });
    }
}

async fn serve_tcp(listener: TcpListener, shared: Arc<Shared>, limit: usize, mut shutdown: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(limit));
    loop {
        let (stream, client) = tokio::select! {
            () = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "cannot accept a dns connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!(%client, "too many dns connections; closing one");
            continue;
        };
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            shared.serve_connection(stream, client, shutdown).await;
        });
    }
}

impl Shared {
    /// Answers length-prefixed queries one after another until the client
    /// closes, idles, sends garbage, or the forwarder stops.
    async fn serve_connection(&self, mut stream: TcpStream, client: SocketAddr, mut shutdown: watch::Receiver<bool>) {
        let idle = self.cfg.idle_timeout;
        let asked = self.asked.tcp(&stream, client);
        loop {
            let len = tokio::select! {
                () = stopped(&mut shutdown) => return,
                read = timeout(idle, stream.read_u16()) => match read {
                    Ok(Ok(len)) => len,
                    Ok(Err(error)) => {
                        if error.kind() != io::ErrorKind::UnexpectedEof {
                            tracing::debug!(%client, %error, "cannot read a dns query");
                        }
                        return;
                    }
                    Err(_) => return,
                },
            };
            let mut query = vec![0u8; usize::from(len)];
            match timeout(idle, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%client, %error, "cannot read a dns query");
                    return;
                }
                Err(_) => return,
            }
            let Ok(_permit) = self.inflight.acquire().await else {
                return;
            };
            let Some(reply) = self.answer(&query, client, asked, Transport::Tcp).await else {
                return;
            };
            match timeout(idle, write_frame(&mut stream, &reply)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%client, %error, "cannot send a dns reply");
                    return;
                }
                Err(_) => return,
            }
        }
    }

    /// The bytes to send back for one query from `client`, which sent it to
    /// `asked` (when known), or `None` to stay silent (unparsable header, or
    /// not a query).
    async fn answer(
        &self,
        query: &[u8],
        client: SocketAddr,
        asked: Option<SocketAddr>,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let request = match Message::from_vec(query) {
            Ok(request) => request,
            Err(error) => return format_error(query, &error),
        };
        if request.metadata.message_type != MessageType::Query {
            tracing::debug!(id = request.metadata.id, "ignoring a dns message that is not a query");
            return None;
        }
        let upstreams = self.upstreams(client, asked);
        let Some((mut reply, mut message)) = self.forward(query, &request, client, &upstreams, transport).await else {
            return encode(&servfail(&request));
        };
        if strip_ech(&mut message, self.observer.as_ref()) {
            tracing::debug!(name = %query_name(&message), "removed ECH configurations from an AI name's answer");
            reply = encode(&message)?;
        }
        let learned = extract(&message, self.observer.as_ref());
        if !learned.is_empty() {
            let count = learned.len();
            if timeout(self.cfg.observer_timeout, self.observer.learned(learned)).await.is_err() {
                tracing::error!(
                    name = %query_name(&message),
                    count,
                    timeout = ?self.cfg.observer_timeout,
                    "dns observer did not finish in time; replying anyway, the addresses may not be redirected yet"
                );
            }
        }
        Some(reply)
    }

    /// Where a query from `client` that was sent to `asked` goes, in order;
    /// never to one of our own addresses.
    fn upstreams(&self, client: SocketAddr, asked: Option<SocketAddr>) -> Vec<SocketAddr> {
        route(&self.cfg.upstreams, &self.own, client, asked)
    }

    /// Counts an exchange of `request` with `upstream`, or refuses it as a
    /// loop (see [`LOOP_DEPTH`]).
    fn enter(
        &self,
        client: SocketAddr,
        upstream: SocketAddr,
        request: &Message,
    ) -> Result<Option<Waiting<'_>>, DnsError> {
        let Some(question) = QuestionKey::of(request) else {
            return Ok(None);
        };
        let key = (canonical_ip(upstream.ip()), question);
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let depth = waiting.get(&key).copied().unwrap_or(0);
        if depth >= LOOP_DEPTH && same_host(client.ip(), upstream.ip()) {
            return Err(DnsError::Loop { client, name: key.1.0, upstream, depth });
        }
        *waiting.entry(key.clone()).or_insert(0) += 1;
        Ok(Some(Waiting { shared: self, key }))
    }

    /// Tries each upstream in order; the raw reply and its parse on success.
    async fn forward(
        &self,
        query: &[u8],
        request: &Message,
        client: SocketAddr,
        upstreams: &[SocketAddr],
        transport: Transport,
    ) -> Option<(Vec<u8>, Message)> {
        for &upstream in upstreams {
            let _waiting = match self.enter(client, upstream, request) {
                Ok(waiting) => waiting,
                Err(error) => {
                    // Unwinds the loop: every query in it gets this answer.
                    self.loops.report(&error);
                    return None;
                }
            };
            let attempt = match transport {
                Transport::Udp => self.exchange_udp(upstream, query, request).await,
                Transport::Tcp => self.exchange_tcp(upstream, query, request).await,
            };
            match attempt {
                Ok(reply) => return Some(reply),
                Err(error) => tracing::debug!(error = %error::chain(&error), "dns upstream attempt failed"),
            }
        }
        tracing::warn!(
            name = %query_name(request),
            %client,
            upstreams = ?upstreams,
            "every dns upstream failed; answering servfail"
        );
        None
    }

    // The query goes upstream byte for byte, with the client's ID, from a
    // fresh connected socket (random source port): off-path spoofing is as
    // hard as it would have been for the client talking to the resolver
    // itself, and nothing in the query is rewritten (in the reply, only the
    // ECH parameters of an AI name's records: see `strip_ech`).
    async fn exchange_udp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        request: &Message,
    ) -> Result<(Vec<u8>, Message), DnsError> {
        let io_err = |source| DnsError::Io { upstream, source };
        let exchange = async {
            let socket =
                UdpSocket::bind(unspecified(upstream)).await.map_err(|source| DnsError::Socket { upstream, source })?;
            self.mark(&socket, upstream)?;
            socket.connect(upstream).await.map_err(io_err)?;
            socket.send(query).await.map_err(io_err)?;
            let mut buf = vec![0u8; MAX_MESSAGE];
            loop {
                let len = socket.recv(&mut buf).await.map_err(io_err)?;
                let bytes = &buf[..len];
                match Message::from_vec(bytes) {
                    // A truncated reply is relayed as is; the client retries over TCP.
                    Ok(reply) if replies_to(request, &reply) => return Ok((bytes.to_vec(), reply)),
                    Ok(_) => tracing::debug!(%upstream, "ignoring a dns reply that does not match the query"),
                    Err(error) => tracing::debug!(%upstream, %error, "ignoring an unparsable dns reply"),
                }
            }
        };
        timeout(self.cfg.timeout, exchange)
            .await
            .map_err(|_| DnsError::Timeout { upstream, timeout: self.cfg.timeout })?
    }

    async fn exchange_tcp(
        &self,
        upstream: SocketAddr,
        query: &[u8],
        request: &Message,
    ) -> Result<(Vec<u8>, Message), DnsError> {
        let io_err = |source| DnsError::Io { upstream, source };
        let exchange = async {
            let socket = match upstream {
                SocketAddr::V4(_) => TcpSocket::new_v4(),
                SocketAddr::V6(_) => TcpSocket::new_v6(),
            }
            .map_err(|source| DnsError::Socket { upstream, source })?;
            self.mark(&socket, upstream)?;
            let mut stream = socket.connect(upstream).await.map_err(io_err)?;
            write_frame(&mut stream, query).await.map_err(io_err)?;
            let reply = read_frame(&mut stream).await.map_err(io_err)?;
            let message = Message::from_vec(&reply).map_err(|source| DnsError::Decode { upstream, source })?;
            if !replies_to(request, &message) {
                return Err(DnsError::Mismatch { upstream });
            }
            Ok((reply, message))
        };
        timeout(self.cfg.timeout, exchange)
            .await
            .map_err(|_| DnsError::Timeout { upstream, timeout: self.cfg.timeout })?
    }

    fn mark<F: AsFd>(&self, socket: &F, upstream: SocketAddr) -> Result<(), DnsError> {
        let mark = self.cfg.mark;
        if mark == 0 {
            return Ok(());
        }
        set_mark(socket, mark).map_err(|source| DnsError::Mark { upstream, mark, source })
    }
}

/// Whether `reply` answers `request`: same ID, a response, the same question
/// (names compare without case). Some servers leave the question out of an
/// error reply, so an empty question is accepted there.
fn replies_to(request: &Message, reply: &Message) -> bool {
    reply.metadata.id == request.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && (reply.queries == request.queries
            || (reply.queries.is_empty() && reply.metadata.response_code != ResponseCode::NoError))
}

/// FORMERR for a query whose header parses but whose body does not; nothing
/// when even the header is unreadable or the message is not a query.
fn format_error(query: &[u8], error: &DecodeError) -> Option<Vec<u8>> {
    let Ok(header) = Header::read(&mut BinDecoder::new(query)) else {
        tracing::debug!(%error, len = query.len(), "dropping an unparsable dns message");
        return None;
    };
    let metadata = header.metadata;
    if metadata.message_type != MessageType::Query {
        tracing::debug!(%error, id = metadata.id, "dropping an unparsable dns message that is not a query");
        return None;
    }
    tracing::debug!(%error, id = metadata.id, "answering formerr to an unparsable dns query");
    let mut reply = Message::error_msg(metadata.id, metadata.op_code, ResponseCode::FormErr);
    reply.metadata.recursion_desired = metadata.recursion_desired;
    encode(&reply)
}

fn servfail(request: &Message) -> Message {
    let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, ResponseCode::ServFail);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries.iter().cloned());
    reply
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(source) => {
            let error = DnsError::Encode { source };
            tracing::error!(error = %error::chain(&error), "cannot answer a dns query");
            None
        }
    }
}

/// The first query name, for logs.
fn query_name(message: &Message) -> String {
    message.queries.first().map(|q| normalize(q.name())).unwrap_or_default()
}

fn unspecified(upstream: SocketAddr) -> SocketAddr {
    match upstream {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

/// Writes one length-prefixed message (RFC 1035 4.2.2) in a single write.
async fn write_frame<W: AsyncWrite + Unpin>(stream: &mut W, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "dns message longer than 65535 bytes"))?;
    let mut frame = Vec::with_capacity(2 + message.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    stream.write_all(&frame).await
}

/// Reads one length-prefixed message (RFC 1035 4.2.2).
async fn read_frame<R: AsyncRead + Unpin>(stream: &mut R) -> io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut message = vec![0u8; usize::from(len)];
    stream.read_exact(&mut message).await?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use std::{str::FromStr, sync::Mutex};

    use hickory_proto::{
        op::Query,
        rr::{
            Record, RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };
    use tokio::time::Instant;

    use super::*;

    struct Recorder {
        delay: Duration,
        calls: Mutex<Vec<(Instant, Vec<Learned>)>>,
    }

    impl Recorder {
        fn new(delay: Duration) -> Arc<Self> {
            Arc::new(Self { delay, calls: Mutex::new(Vec::new()) })
        }

        fn calls(&self) -> Vec<(Instant, Vec<Learned>)> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait::async_trait]
    impl DnsObserver for Recorder {
        fn is_ai_domain(&self, name: &str) -> bool {
            name == "openai.com" || name.ends_with(".openai.com")
        }

        async fn learned(&self, learned: Vec<Learned>) {
            tokio::time::sleep(self.delay).await;
            self.calls.lock().unwrap().push((Instant::now(), learned));
        }
    }

    fn name(text: &str) -> Name {
        Name::from_str(text).unwrap()
    }

    fn a(owner: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(ip.parse().unwrap())))
    }

    fn aaaa(owner: &str, ip: &str, ttl: u32) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(ip.parse().unwrap())))
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 60, RData::CNAME(CNAME(name(target))))
    }

    fn response(qname: &str, qtype: RecordType, answers: Vec<Record>) -> Message {
        let mut message = Message::response(7, hickory_proto::op::OpCode::Query);
        message.add_query(Query::query(name(qname), qtype));
        message.add_answers(answers);
        message
    }

    fn learned(name: &str, addr: &str, ttl: u64) -> Learned {
        Learned { name: name.into(), addr: addr.parse().unwrap(), ttl: Duration::from_secs(ttl) }
    }

    fn observer() -> Arc<Recorder> {
        Recorder::new(Duration::ZERO)
    }

    fn https(owner: &str, params: Vec<(SvcParamKey, SvcParamValue)>) -> Record {
        let svcb = hickory_proto::rr::rdata::SVCB::new(1, name("."), params);
        Record::from_rdata(name(owner), 300, RData::HTTPS(HTTPS(svcb)))
    }

    fn ech_and_hints() -> Vec<(SvcParamKey, SvcParamValue)> {
        use hickory_proto::rr::rdata::svcb::{EchConfigList, IpHint};
        vec![
            (SvcParamKey::Ipv4Hint, SvcParamValue::Ipv4Hint(IpHint(vec![A("198.18.0.12".parse().unwrap())]))),
            (
                SvcParamKey::EchConfigList,
                SvcParamValue::EchConfigList(EchConfigList(vec![0xfe, 0x0d, 0, 4, 1, 2, 3, 4])),
            ),
            (SvcParamKey::Ipv6Hint, SvcParamValue::Ipv6Hint(IpHint(vec![AAAA("2001:db8::12".parse().unwrap())]))),
        ]
    }

    #[test]
    fn ech_is_removed_from_ai_names_answers_only_and_address_hints_are_learned() {
        let obs = observer();
        let mut m = response("api.openai.com.", RecordType::HTTPS, vec![https("api.openai.com.", ech_and_hints())]);
        assert!(strip_ech(&mut m, obs.as_ref()));
        let bytes = m.to_vec().unwrap();
        let m = Message::from_vec(&bytes).unwrap();
        let RData::HTTPS(HTTPS(svcb)) = &m.answers[0].data else { panic!("{m:?}") };
        let keys: Vec<_> = svcb.svc_params.iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![SvcParamKey::Ipv4Hint, SvcParamKey::Ipv6Hint], "only ech goes");
        assert_eq!(
            extract(&m, obs.as_ref()),
            vec![learned("api.openai.com", "198.18.0.12", 300), learned("api.openai.com", "2001:db8::12", 300)]
        );
        // Through a CNAME to a CDN name, too.
        let mut m = response(
            "api.openai.com.",
            RecordType::HTTPS,
            vec![cname("api.openai.com.", "edge.cdn.example."), https("edge.cdn.example.", ech_and_hints())],
        );
        assert!(strip_ech(&mut m, obs.as_ref()));
        // Other names keep their ECH.
        let mut m = response("example.com.", RecordType::HTTPS, vec![https("example.com.", ech_and_hints())]);
        assert!(!strip_ech(&mut m, obs.as_ref()));
        let RData::HTTPS(HTTPS(svcb)) = &m.answers[0].data else { panic!() };
        assert_eq!(svcb.svc_params.len(), 3);
    }

    #[test]
    fn extract_direct_a_and_aaaa() {
        let obs = observer();
        let m = response("api.openai.com.", RecordType::A, vec![a("api.openai.com.", "198.18.0.10", 30)]);
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "198.18.0.10", 30)]);

        let m = response("api.openai.com.", RecordType::AAAA, vec![aaaa("api.openai.com.", "2001:db8::10", 45)]);
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "2001:db8::10", 45)]);
    }

    #[test]
    fn extract_follows_the_cname_chain() {
        let obs = observer();
        let m = response(
            "api.openai.com.",
            RecordType::A,
            vec![
                cname("api.openai.com.", "x.cdn.example."),
                a("x.cdn.example.", "198.18.0.30", 20),
                a("x.cdn.example.", "198.18.0.31", 20),
            ],
        );
        assert_eq!(
            extract(&m, obs.as_ref()),
            vec![learned("api.openai.com", "198.18.0.30", 20), learned("api.openai.com", "198.18.0.31", 20),]
        );

        // Listed out of order, two hops.
        let m = response(
            "api.openai.com.",
            RecordType::A,
            vec![
                a("edge.cdn.example.", "198.18.0.32", 5),
                cname("x.cdn.example.", "edge.cdn.example."),
                cname("api.openai.com.", "x.cdn.example."),
            ],
        );
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "198.18.0.32", 5)]);
    }

    #[test]
    fn extract_learns_when_only_the_cname_target_is_ai() {
        let obs = observer();
        let m = response(
            "llm.corp.example.",
            RecordType::A,
            vec![
                cname("llm.corp.example.", "api.openai.com."),
                cname("api.openai.com.", "x.cdn.example."),
                a("x.cdn.example.", "198.18.0.40", 15),
            ],
        );
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "198.18.0.40", 15)]);
    }

    #[test]
    fn extract_ignores_non_ai_names() {
        let obs = observer();
        let m = response("example.com.", RecordType::A, vec![a("example.com.", "192.0.2.1", 300)]);
        assert!(extract(&m, obs.as_ref()).is_empty());
        let m = response(
            "www.example.com.",
            RecordType::A,
            vec![cname("www.example.com.", "cdn.example.net."), a("cdn.example.net.", "192.0.2.2", 300)],
        );
        assert!(extract(&m, obs.as_ref()).is_empty());
    }

    #[test]
    fn extract_ignores_records_not_connected_to_the_question() {
        let obs = observer();
        let m = response(
            "api.openai.com.",
            RecordType::A,
            vec![
                a("api.openai.com.", "198.18.0.10", 30),
                a("other.example.", "192.0.2.9", 30),
                // An AI name in the answer that the question does not lead to.
                cname("evil.example.", "chat.openai.com."),
                a("chat.openai.com.", "192.0.2.10", 30),
            ],
        );
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "198.18.0.10", 30)]);

        let m = response(
            "example.com.",
            RecordType::A,
            vec![a("example.com.", "192.0.2.1", 30), a("api.openai.com.", "198.18.0.10", 30)],
        );
        assert!(extract(&m, obs.as_ref()).is_empty());

        let m = Message::response(1, hickory_proto::op::OpCode::Query);
        assert!(extract(&m, obs.as_ref()).is_empty());
    }

    #[test]
    fn extract_ignores_case_and_trailing_dots_and_survives_loops() {
        let obs = observer();
        let m = response(
            "API.OpenAI.com.",
            RecordType::A,
            vec![cname("api.openai.COM", "X.CDN.example."), a("x.cdn.EXAMPLE", "198.18.0.50", 9)],
        );
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "198.18.0.50", 9)]);

        let m = response(
            "api.openai.com.",
            RecordType::A,
            vec![
                cname("api.openai.com.", "loop.example."),
                cname("loop.example.", "api.openai.com."),
                a("loop.example.", "198.18.0.51", 9),
                a("loop.example.", "198.18.0.51", 9),
            ],
        );
        assert_eq!(extract(&m, obs.as_ref()), vec![learned("api.openai.com", "198.18.0.51", 9)]);
    }

    #[test]
    fn system_upstreams_reads_nameserver_lines() {
        let conf = "\
# generated
nameserver 127.0.0.53
nameserver  2001:db8::1   # trailing comment
nameserver fe80::1%2
nameserver fe80::2%eth0
nameserver not-an-address
nameserver 10.0.0.1%3
;nameserver 10.0.0.2
#nameserver 10.0.0.3
search example.com
options edns0 trust-ad
nameserver 127.0.0.53
nameserver
";
        let expected: Vec<SocketAddr> = vec![
            "127.0.0.53:53".parse().unwrap(),
            "[2001:db8::1]:53".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 2)),
        ];
        assert_eq!(system_upstreams(conf), expected);
        assert!(system_upstreams("").is_empty());
    }

    // ---- end to end ----

    const WAIT: Duration = Duration::from_secs(5);

    /// What the fake upstream answers. `big.openai.com` is too large for
    /// UDP: the UDP answer only has the TC bit.
    fn fake_answer(query: &[u8], udp: bool) -> Option<Vec<u8>> {
        let query = Message::from_vec(query).ok()?;
        let question = query.queries.first()?.clone();
        let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
        reply.metadata.recursion_desired = query.metadata.recursion_desired;
        reply.metadata.recursion_available = true;
        reply.add_query(question.clone());
        match normalize(question.name()).as_str() {
            "api.openai.com" => {
                reply.add_answer(a("api.openai.com.", "198.18.0.10", 30));
            }
            "example.com" => {
                reply.add_answer(a("example.com.", "192.0.2.1", 300));
            }
            "big.openai.com" if udp => reply.metadata.truncation = true,
            "big.openai.com" => {
                reply.add_answer(a("big.openai.com.", "198.18.0.11", 60));
            }
            _ => reply.metadata.response_code = ResponseCode::NXDomain,
        }
        reply.to_vec().ok()
    }

    /// A fake resolver on 127.0.0.1, UDP and TCP on the same port.
    async fn fake_upstream() -> SocketAddr {
        let (udp, tcp) = same_port_pair().await;
        let addr = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            while let Ok((len, peer)) = udp.recv_from(&mut buf).await {
                if let Some(reply) = fake_answer(&buf[..len], true) {
                    let _ = udp.send_to(&reply, peer).await;
                }
            }
        });
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    while let Ok(query) = read_frame(&mut stream).await {
                        let Some(reply) = fake_answer(&query, false) else { return };
                        if write_frame(&mut stream, &reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn same_port_pair() -> (UdpSocket, TcpListener) {
        loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()).await {
                return (udp, tcp);
            }
        }
    }

    struct Running {
        udp: SocketAddr,
        tcp: SocketAddr,
        stop: watch::Sender<bool>,
        forwarder: DnsForwarder,
    }

    async fn start(cfg: ForwarderConfig, observer: Arc<dyn DnsObserver>) -> Running {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let (stop, shutdown) = watch::channel(false);
        let forwarder = DnsForwarder::serve(udp, tcp, cfg, observer, Arc::new(NothingAsked), shutdown);
        Running { udp: udp_addr, tcp: tcp_addr, stop, forwarder }
    }

    fn config(upstreams: Vec<SocketAddr>) -> ForwarderConfig {
        ForwarderConfig {
            upstreams: Upstreams::Configured(upstreams),
            timeout: Duration::from_millis(300),
            ..ForwarderConfig::default()
        }
    }

    fn query(qname: &str, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), RecordType::A));
        m.to_vec().unwrap()
    }

    async fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").await.unwrap()
    }

    async fn recv(socket: &UdpSocket, wait: Duration) -> Option<Message> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let len = timeout(wait, socket.recv(&mut buf)).await.ok()?.unwrap();
        Some(Message::from_vec(&buf[..len]).unwrap())
    }

    async fn ask_udp(server: SocketAddr, qname: &str, id: u16) -> Message {
        let socket = client().await;
        socket.send_to(&query(qname, id), server).await.unwrap();
        let reply = recv(&socket, WAIT).await.expect("a reply");
        assert_eq!(reply.metadata.id, id);
        reply
    }

    fn addrs(reply: &Message) -> Vec<IpAddr> {
        reply.answers.iter().filter_map(|r| r.data.ip_addr()).collect()
    }

    #[tokio::test]
    async fn udp_reply_waits_for_the_observer() {
        let upstream = fake_upstream().await;
        let obs = Recorder::new(Duration::from_millis(100));
        let fwd = start(config(vec![upstream]), obs.clone()).await;

        let asked = Instant::now();
        let reply = ask_udp(fwd.udp, "api.openai.com.", 0x1234).await;
        let answered = Instant::now();
        assert_eq!(addrs(&reply), vec!["198.18.0.10".parse::<IpAddr>().unwrap()]);
        let calls = obs.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].1, vec![learned("api.openai.com", "198.18.0.10", 30)]);
        assert!(calls[0].0 <= answered, "the reply left before the observer finished");
        assert!(answered - asked >= Duration::from_millis(100));

        let reply = ask_udp(fwd.udp, "example.com.", 0x1235).await;
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        let reply = ask_udp(fwd.udp, "nowhere.example.", 0x1236).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(obs.calls().len(), 1, "non-AI names taught something");

        fwd.stop.send_replace(true);
        timeout(WAIT, fwd.forwarder.join()).await.unwrap();
    }

    #[tokio::test]
    async fn tcp_serves_several_queries_per_connection() {
        let upstream = fake_upstream().await;
        let obs = Recorder::new(Duration::from_millis(100));
        let fwd = start(config(vec![upstream]), obs.clone()).await;

        let mut stream = TcpStream::connect(fwd.tcp).await.unwrap();
        write_frame(&mut stream, &query("api.openai.com.", 1)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        let answered = Instant::now();
        assert_eq!(reply.metadata.id, 1);
        assert_eq!(addrs(&reply), vec!["198.18.0.10".parse::<IpAddr>().unwrap()]);
        let calls = obs.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].0 <= answered);

        write_frame(&mut stream, &query("example.com.", 2)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 2);
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(obs.calls().len(), 1);
    }

    #[tokio::test]
    async fn truncated_udp_reply_is_relayed_and_tcp_has_the_answer() {
        let upstream = fake_upstream().await;
        let obs = observer();
        let fwd = start(config(vec![upstream]), obs.clone()).await;

        let reply = ask_udp(fwd.udp, "big.openai.com.", 9).await;
        assert!(reply.metadata.truncation);
        assert!(reply.answers.is_empty());

        let mut stream = TcpStream::connect(fwd.tcp).await.unwrap();
        write_frame(&mut stream, &query("big.openai.com.", 10)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        assert!(!reply.metadata.truncation);
        assert_eq!(addrs(&reply), vec!["198.18.0.11".parse::<IpAddr>().unwrap()]);
        assert_eq!(obs.calls().len(), 1);
    }

    /// A port nothing listens on (bound, read, released).
    async fn closed_port() -> SocketAddr {
        let (udp, tcp) = same_port_pair().await;
        let addr = udp.local_addr().unwrap();
        drop((udp, tcp));
        addr
    }

    #[tokio::test]
    async fn next_upstream_is_tried_after_a_failure() {
        let upstream = fake_upstream().await;
        let fwd = start(config(vec![closed_port().await, upstream]), observer()).await;
        let reply = ask_udp(fwd.udp, "example.com.", 3).await;
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);

        let mut stream = TcpStream::connect(fwd.tcp).await.unwrap();
        write_frame(&mut stream, &query("example.com.", 4)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn unreachable_upstreams_yield_servfail_within_the_timeout() {
        // One upstream that never answers (bound, never read, never
        // accepted) and one that refuses.
        let (silent_udp, silent_tcp) = same_port_pair().await;
        let silent = silent_udp.local_addr().unwrap();
        let cfg = config(vec![silent, closed_port().await]);
        let fwd = start(cfg, observer()).await;

        let asked = Instant::now();
        let reply = ask_udp(fwd.udp, "api.openai.com.", 0x0bad).await;
        let elapsed = asked.elapsed();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.queries.len(), 1);
        assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");

        let asked = Instant::now();
        let mut stream = TcpStream::connect(fwd.tcp).await.unwrap();
        write_frame(&mut stream, &query("api.openai.com.", 0x0bae)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 0x0bae);
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(asked.elapsed() < Duration::from_secs(2));
        drop((silent_udp, silent_tcp));
    }

    #[tokio::test]
    async fn no_upstreams_yield_servfail() {
        let fwd = start(config(Vec::new()), observer()).await;
        let reply = ask_udp(fwd.udp, "api.openai.com.", 5).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    }

    #[tokio::test]
    async fn stuck_observer_delays_the_reply_only_until_its_timeout() {
        let upstream = fake_upstream().await;
        let cfg = ForwarderConfig { observer_timeout: Duration::from_millis(200), ..config(vec![upstream]) };
        let fwd = start(cfg, Recorder::new(Duration::from_secs(60))).await;
        let asked = Instant::now();
        let reply = ask_udp(fwd.udp, "api.openai.com.", 6).await;
        assert_eq!(addrs(&reply), vec!["198.18.0.10".parse::<IpAddr>().unwrap()]);
        let elapsed = asked.elapsed();
        assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2), "{elapsed:?}");
    }

    #[tokio::test]
    async fn malformed_input_does_not_stop_the_server() {
        let upstream = fake_upstream().await;
        let obs = observer();
        let fwd = start(config(vec![upstream]), obs).await;
        let socket = client().await;

        // Too short for a header: dropped silently.
        socket.send_to(&[0x01], fwd.udp).await.unwrap();
        assert!(recv(&socket, Duration::from_millis(200)).await.is_none());

        // A header that promises a question that is not there: FORMERR.
        let full = query("api.openai.com.", 0x4242);
        socket.send_to(&full[..14], fwd.udp).await.unwrap();
        let reply = recv(&socket, WAIT).await.expect("formerr");
        assert_eq!(reply.metadata.id, 0x4242);
        assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);

        // A response sent to us is not answered.
        let mut not_a_query = Message::from_vec(&full).unwrap();
        not_a_query.metadata.message_type = MessageType::Response;
        socket.send_to(&not_a_query.to_vec().unwrap(), fwd.udp).await.unwrap();
        assert!(recv(&socket, Duration::from_millis(200)).await.is_none());

        // TCP garbage, an empty frame and a truncated frame close their
        // connections.
        for bytes in [&b"\x00\x03abc"[..], &b"\x00\x00"[..], &b"\x00\x10abc"[..]] {
            let mut stream = TcpStream::connect(fwd.tcp).await.unwrap();
            stream.write_all(bytes).await.unwrap();
            stream.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let read = timeout(WAIT, stream.read_to_end(&mut rest)).await.unwrap();
            assert!(read.is_err() || rest.is_empty(), "{rest:?}");
        }

        // Still serving.
        let reply = ask_udp(fwd.udp, "example.com.", 0x4343).await;
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        let mut stream = TcpStream::connect(fwd.tcp).await.unwrap();
        write_frame(&mut stream, &query("example.com.", 0x4344)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 0x4344);
    }

    #[test]
    fn queries_go_to_the_server_the_client_asked_and_never_to_us() {
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        let own = [sa("127.0.0.1:15053")];
        let asked = Upstreams::Asked { fallback: vec![sa("127.0.0.53:53"), sa("127.0.0.1:15053")] };
        let local = sa("127.0.0.1:40000");
        let pod = sa("10.1.2.3:40000");
        // The server the client asked, whatever the fallback.
        assert_eq!(route(&asked, &own, local, Some(sa("198.18.0.53:53"))), vec![sa("198.18.0.53:53")]);
        assert_eq!(route(&asked, &own, local, Some(sa("[::ffff:127.0.0.53]:53"))), vec![sa("127.0.0.53:53")]);
        assert_eq!(route(&asked, &own, pod, Some(sa("10.96.0.10:53"))), vec![sa("10.96.0.10:53")]);
        // Unknown, asked of us directly, or a pod's loopback resolver: the
        // fallback, without our own address.
        for (client, server) in [(local, None), (local, Some(own[0])), (pod, Some(sa("127.0.0.53:53")))] {
            assert_eq!(route(&asked, &own, client, server), vec![sa("127.0.0.53:53")], "{client} {server:?}");
        }
        // Configured upstreams win, without our own address.
        let configured = Upstreams::Configured(vec![sa("127.0.0.1:15053"), sa("192.0.2.53:53")]);
        assert_eq!(route(&configured, &own, local, Some(sa("198.18.0.53:53"))), vec![sa("192.0.2.53:53")]);
    }

    #[test]
    fn loopback_addresses_are_one_host() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_host(ip("127.0.0.1"), ip("127.0.0.53")));
        assert!(same_host(ip("::1"), ip("::ffff:127.0.0.53")));
        assert!(same_host(ip("10.0.0.5"), ip("::ffff:10.0.0.5")));
        assert!(!same_host(ip("10.0.0.5"), ip("10.0.0.6")));
        assert!(!same_host(ip("127.0.0.1"), ip("10.0.0.5")));
    }

    /// A resolver that sends every query it gets to `next` (with an ID of its
    /// own, as resolvers do) and relays the answer; counts what it got.
    async fn relay(next: Arc<Mutex<Option<SocketAddr>>>) -> (SocketAddr, Arc<AtomicU64>) {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_MESSAGE];
            while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
                let n = counter.fetch_add(1, Ordering::SeqCst);
                let mut query = buf[..len].to_vec();
                let Some(next) = *next.lock().unwrap() else { continue };
                let socket = socket.clone();
                tokio::spawn(async move {
                    let id = [query[0], query[1]];
                    query[..2].copy_from_slice(&(n as u16).wrapping_add(0x5000).to_be_bytes());
                    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
                    upstream.connect(next).await.unwrap();
                    upstream.send(&query).await.unwrap();
                    let mut reply = vec![0u8; MAX_MESSAGE];
                    let Ok(Ok(len)) = timeout(WAIT, upstream.recv(&mut reply)).await else { return };
                    reply[..2].copy_from_slice(&id);
                    let _ = socket.send_to(&reply[..len], peer).await;
                });
            }
        });
        (addr, seen)
    }

    #[derive(Clone, Default)]
    struct LogBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl LogBuf {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[tokio::test]
    async fn a_resolver_sending_our_query_back_is_refused_as_a_loop() {
        let logs = LogBuf::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
        // A current-thread runtime: every task logs through this subscriber.
        let _guard = tracing::subscriber::set_default(subscriber);

        // The resolver we are configured to ask forwards to our own port
        // (what a resolver whose queries are redirected back does).
        let next = Arc::new(Mutex::new(None));
        let (peer, seen) = relay(next.clone()).await;
        let cfg = ForwarderConfig { timeout: Duration::from_secs(3), ..config(vec![peer]) };
        let fwd = start(cfg, observer()).await;
        *next.lock().unwrap() = Some(fwd.udp);

        let asked = Instant::now();
        let reply = ask_udp(fwd.udp, "api.openai.com.", 0x700f).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        // Cut after a bounded number of rounds, long before any timeout.
        assert!(asked.elapsed() < Duration::from_secs(2), "{:?}", asked.elapsed());
        let rounds = seen.load(Ordering::SeqCst);
        assert!(rounds <= u64::from(LOOP_DEPTH) + 1, "the resolver saw {rounds} copies");
        assert_eq!(fwd.forwarder.loops_refused(), 1);
        let text = logs.text();
        assert!(
            text.contains("dns loop") && text.contains("api.openai.com") && text.contains(&peer.to_string()),
            "{text}"
        );

        // Again: refused again, the error is not repeated within its interval.
        let reply = ask_udp(fwd.udp, "api.openai.com.", 0x7010).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(fwd.forwarder.loops_refused(), 2);
        assert_eq!(logs.text().matches("dns loop refused").count(), 1, "{}", logs.text());
    }

    #[tokio::test]
    async fn concurrent_identical_queries_below_the_loop_depth_are_answered() {
        // A resolver on this host (a relay in front of the fake upstream)
        // gets the same question from several local clients at once.
        let upstream = fake_upstream().await;
        let (peer, seen) = relay(Arc::new(Mutex::new(Some(upstream)))).await;
        let fwd = start(config(vec![peer]), observer()).await;
        let asks = (0..LOOP_DEPTH as u16).map(|i| ask_udp(fwd.udp, "example.com.", 0x100 + i));
        for reply in futures_util::future::join_all(asks).await {
            assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        }
        assert_eq!(seen.load(Ordering::SeqCst), u64::from(LOOP_DEPTH));
        assert_eq!(fwd.forwarder.loops_refused(), 0);
    }

    struct Asks(SocketAddr);

    impl AskedServer for Asks {
        fn udp(&self, _: SocketAddr, _: SocketAddr) -> Option<SocketAddr> {
            Some(self.0)
        }
        fn tcp(&self, _: &TcpStream, _: SocketAddr) -> Option<SocketAddr> {
            Some(self.0)
        }
    }

    #[tokio::test]
    async fn each_query_goes_to_the_server_its_client_asked() {
        let upstream = fake_upstream().await;
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let cfg = ForwarderConfig {
            upstreams: Upstreams::Asked { fallback: vec![closed_port().await] },
            timeout: Duration::from_millis(300),
            ..ForwarderConfig::default()
        };
        let (_stop, shutdown) = watch::channel(false);
        let _fwd = DnsForwarder::serve(udp, tcp, cfg, observer(), Arc::new(Asks(upstream)), shutdown);
        let reply = ask_udp(udp_addr, "example.com.", 0x51).await;
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
        let mut stream = TcpStream::connect(tcp_addr).await.unwrap();
        write_frame(&mut stream, &query("example.com.", 0x52)).await.unwrap();
        let reply = Message::from_vec(&timeout(WAIT, read_frame(&mut stream)).await.unwrap().unwrap()).unwrap();
        assert_eq!(addrs(&reply), vec!["192.0.2.1".parse::<IpAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn a_query_asked_of_us_is_never_forwarded_to_us() {
        // The client asked our own address, and the fallback is us too:
        // servfail at once, no round.
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let own = udp.local_addr().unwrap();
        let cfg = ForwarderConfig {
            upstreams: Upstreams::Asked { fallback: vec![own] },
            timeout: Duration::from_secs(3),
            ..ForwarderConfig::default()
        };
        let (_stop, shutdown) = watch::channel(false);
        let _fwd = DnsForwarder::serve(udp, tcp, cfg, observer(), Arc::new(Asks(own)), shutdown);
        let asked = Instant::now();
        let reply = ask_udp(own, "example.com.", 0x53).await;
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(asked.elapsed() < Duration::from_secs(1), "{:?}", asked.elapsed());
    }

    #[tokio::test]
    async fn shutdown_stops_both_listeners() {
        let fwd = start(config(Vec::new()), observer()).await;
        fwd.stop.send_replace(true);
        timeout(WAIT, fwd.forwarder.join()).await.unwrap();
        // The listening sockets are gone with their tasks.
        assert!(TcpStream::connect(fwd.tcp).await.is_err());
    }
}
