//! eBPF redirect: loads the programs of `interceptor-ebpf`, attaches the
//! connect, sendmsg, recvmsg and sock_ops programs (and, while DNS is
//! redirected, the egress program that tells the forwarder which server each
//! query was for) to the target cgroup and the getsockopt program to the
//! proxy's own cgroup, and keeps the target maps in step with the target set.
//!
//! Links are file-descriptor based: when this process exits, however it
//! exits, the kernel detaches its programs. Only in fail-closed mode are the
//! connect and sendmsg links also pinned, on purpose, so that target
//! connections stay refused while no proxy runs (see [`super::liveness`]).
//! The maps are pinned per target cgroup so that instances can hand over.

use std::{
    collections::BTreeSet,
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockopt, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use interceptor_common::{
    CONFIG_F_ENABLED, CONFIG_F_FAIL_CLOSED, CONFIG_F_HAVE_V6, DnsOrig, MAP_BY_ADDR, MAP_BY_COOKIE, MAP_CONFIG,
    MAP_DNS_BY_ADDR, MAP_DNS_ORIG, MAP_HEARTBEAT, MAP_INSTANCES, MAP_PLAIN_TARGETS, MAP_STATS, MAP_TARGETS_V4,
    MAP_TARGETS_V6, MAX_PORTS, OrigDst, RedirectConfig, STAT_DNS_NOTED, STAT_DNS_REDIRECTED, STAT_ESTABLISHED,
    STAT_FAIL_CLOSED, STAT_FAIL_OPEN, STAT_ORIGDST_ANSWERED, STAT_REDIRECTED_V4, STAT_REDIRECTED_V6, STAT_SKIPPED_MARK,
    STAT_UDP_REFUSED, STAT_V6_REFUSED, SockKey, Target, v4_mapped,
};
use ipnet::IpNet;

use super::{
    Liveness, RedirectError, Redirector, SockoptResolver,
    liveness::{self, Heartbeat},
    names::ProcessNamer,
    owner::{Helper, OwnerSource},
};
use crate::{
    cgroup,
    config::FailSafe,
    net::{ClientAddr, OrigDstResolver, ProxyAddrs, WorkloadLookup},
    process::Procfs,
    targets::TargetSet,
    workload::Workload,
};

/// Maps shared by every instance covering the same cgroup (pinned).
const SHARED_MAPS: [&str; 11] = [
    MAP_CONFIG,
    MAP_TARGETS_V4,
    MAP_TARGETS_V6,
    MAP_PLAIN_TARGETS,
    MAP_BY_COOKIE,
    MAP_BY_ADDR,
    MAP_DNS_ORIG,
    MAP_DNS_BY_ADDR,
    MAP_STATS,
    MAP_HEARTBEAT,
    MAP_INSTANCES,
];

/// The compiled eBPF object, built by build.rs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/interceptor"));

/// Programs attached to the target cgroup: (program name, description).
const CGROUP_PROGRAMS: [&str; 6] =
    ["intercept_connect4", "intercept_connect6", "refuse_quic4", "refuse_quic6", "restore_dns4", "restore_dns6"];
const SOCK_OPS_PROGRAM: &str = "record_established";
const GETSOCKOPT_PROGRAM: &str = "answer_original_dst";
const DNS_EGRESS_PROGRAM: &str = "note_dns_source";

/// Attached with bpf_link (kernel >= 5.7), which always coexists with other
/// programs on the same cgroup (CNIs, systemd); the kernel rejects any
/// attach flag on link creation, so the mode must be the flagless one.
const ATTACH_MODE: CgroupAttachMode = CgroupAttachMode::Single;

type AddrMap = HashMap<MapData, SockKey, OrigDst>;
type DnsAddrMap = HashMap<MapData, SockKey, DnsOrig>;

pub struct EbpfRedirector {
    ebpf: Option<Ebpf>,
    config: Array<MapData, RedirectConfig>,
    config_value: RedirectConfig,
    targets_v4: LpmTrie<MapData, [u8; 4], Target>,
    targets_v6: LpmTrie<MapData, [u8; 16], Target>,
    /// Plain MCP targets: exact (address, port) pairs.
    plain: aya::maps::HashMap<MapData, SockKey, Target>,
    /// What `plain` holds, as this instance last wrote it.
    current_plain: BTreeSet<SocketAddr>,
    by_addr: Arc<Mutex<AddrMap>>,
    dns_by_addr: Arc<DnsAddrMap>,
    current: BTreeSet<IpNet>,
    cgroup: PathBuf,
    own_cgroup: PathBuf,
    beat: Arc<EbpfBeat>,
    /// Pin directory of the shared maps; `None` when bpffs is unavailable.
    pins: Option<PathBuf>,
    /// This instance's pinned links (fail closed), held open while it runs.
    pinned_links: Vec<PinnedLink>,
    /// Names the process behind each record.
    namer: Arc<ProcessNamer>,
}

/// The heartbeat, and the fail-mode counters at the last beat (to report
/// what happened while the proxy was unresponsive).
pub struct EbpfBeat {
    state: Mutex<(Heartbeat, [u64; 2], bool)>,
    stats: PerCpuArray<MapData, u64>,
    /// The shared pin directory, to remove the pinned links of instances
    /// that died while this one runs.
    pins: Option<PathBuf>,
}

impl EbpfBeat {
    fn fail_counters(&self) -> [u64; 2] {
        [STAT_FAIL_OPEN, STAT_FAIL_CLOSED].map(|i| self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
    }

    /// Deregisters; returns whether another live instance remains.
    fn leave(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.2 = true;
        state.0.leave()
    }
}

impl Liveness for EbpfBeat {
    fn interval(&self) -> std::time::Duration {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0.fail_safe.interval()
    }

    fn beat(&self) {
        let counters = self.fail_counters();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (heartbeat, last_counters, left) = &mut *state;
        if *left {
            return;
        }
        if let Some(gap) = heartbeat.beat() {
            tracing::warn!(
                event = "redirect_resumed",
                down_ms = gap.as_millis() as u64,
                went_direct = counters[0].saturating_sub(last_counters[0]),
                refused = counters[1].saturating_sub(last_counters[1]),
                fail_mode = if heartbeat.fail_safe.closed { "closed" } else { "open" },
                "the proxy was unresponsive beyond the heartbeat timeout; redirect resumes"
            );
        }
        *last_counters = counters;
        for id in heartbeat.prune() {
            if let Some(dir) = &self.pins {
                let _ = liveness::remove_tree(&liveness::links_dir(dir, id));
            }
            tracing::warn!(
                event = "redirect_instance_lost",
                instance = format!("{id:016x}"),
                "another interceptor sharing this redirect stopped without leaving (crash or kill)"
            );
        }
    }
}

fn load_err(e: impl std::error::Error + Send + Sync + 'static) -> RedirectError {
    RedirectError::Load(Box::new(e))
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |e| RedirectError::Map { map, source: Box::new(e) }
}

fn attach_err(program: &'static str, path: &Path) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    let path = path.to_path_buf();
    move |e| RedirectError::Attach { program, path, source: Box::new(e) }
}

/// Loads every program into the kernel without attaching anything: proves
/// that the verifier accepts them here. Used by `doctor`.
pub fn probe() -> Result<(), RedirectError> {
    let mut ebpf = Ebpf::load(PROGRAMS).map_err(load_err)?;
    for name in CGROUP_PROGRAMS {
        let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
        p.load().map_err(load_err)?;
    }
    let p: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
    p.load().map_err(load_err)?;
    let p: &mut CgroupSockopt = program(&mut ebpf, GETSOCKOPT_PROGRAM)?;
    p.load().map_err(load_err)?;
    let p: &mut CgroupSkb = program(&mut ebpf, DNS_EGRESS_PROGRAM)?;
    p.load().map_err(load_err)?;
    Ok(())
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| RedirectError::Load(format!("program {name} missing from the eBPF object").into()))?;
    p.try_into().map_err(load_err)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| RedirectError::Load(format!("map {name} missing from the eBPF object").into()))?;
    T::try_from(map).map_err(map_err(name))
}

impl EbpfRedirector {
    /// Loads and attaches the programs. `cgroup` empty means the cgroup2
    /// root. Must be called inside a tokio runtime (kernel log forwarding).
    /// `dns_port`: send UDP and TCP port 53 to the DNS forwarder on that port.
    pub fn install(
        cgroup: &Path,
        proxy: ProxyAddrs,
        ports: &[u16],
        dns_port: Option<u16>,
        fail_safe: FailSafe,
    ) -> Result<Self, RedirectError> {
        let root = cgroup::cgroup2_root()?;
        let target = if cgroup.as_os_str().is_empty() { root.clone() } else { cgroup.to_path_buf() };
        cgroup::check_cgroup_dir(&target, &root)?;
        let own = cgroup::own_cgroup(&root)?;

        let pins = match pin_dir(&target) {
            Ok(dir) => Some(dir),
            Err(reason) if fail_safe.closed => return Err(RedirectError::Pin(reason)),
            Err(reason) => {
                tracing::warn!(
                    reason,
                    "cannot pin the redirect maps: instances cannot hand over to each other (restarts leave a short \
                     window where traffic goes direct)"
                );
                None
            }
        };
        let mut loader = EbpfLoader::new();
        if let Some(dir) = &pins {
            for name in SHARED_MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(PROGRAMS).map_err(load_err)?;
        forward_kernel_logs(&mut ebpf);

        let mut config: Array<MapData, RedirectConfig> = take_map(&mut ebpf, MAP_CONFIG)?;
        let mut targets_v4: LpmTrie<MapData, [u8; 4], Target> = take_map(&mut ebpf, MAP_TARGETS_V4)?;
        let mut targets_v6: LpmTrie<MapData, [u8; 16], Target> = take_map(&mut ebpf, MAP_TARGETS_V6)?;
        let mut plain: aya::maps::HashMap<MapData, SockKey, Target> = take_map(&mut ebpf, MAP_PLAIN_TARGETS)?;
        let stats: PerCpuArray<MapData, u64> = take_map(&mut ebpf, MAP_STATS)?;
        let mut heartbeat =
            Heartbeat::new(fail_safe, take_map(&mut ebpf, MAP_HEARTBEAT)?, take_map(&mut ebpf, MAP_INSTANCES)?);
        let joined = heartbeat.join();
        let mut current = BTreeSet::new();
        let mut current_plain = BTreeSet::new();
        if joined.live.is_empty() {
            // Alone: whatever a crashed instance left in the shared maps is stale.
            clear_trie(&mut targets_v4);
            clear_trie(&mut targets_v6);
            let keys: Vec<SockKey> = plain.keys().filter_map(Result::ok).collect();
            for key in keys {
                let _ = plain.remove(&key);
            }
            if !joined.stale.is_empty() {
                tracing::warn!(
                    event = "redirect_recovered",
                    down_ms = joined.last_beat_age.map(|d| d.as_millis() as u64),
                    previous_instances = joined.stale.len(),
                    "the previous interceptor stopped without removing its redirect (crash or kill); taking over"
                );
            }
        } else {
            current.extend(trie_nets(&targets_v4, &targets_v6));
            current_plain.extend(
                plain
                    .keys()
                    .filter_map(Result::ok)
                    .map(|k| crate::net::canonical(SocketAddr::new(IpAddr::V6(k.addr.into()), k.port))),
            );
            tracing::info!(
                event = "redirect_handover",
                running_instances = joined.live.len(),
                targets = current.len(),
                "another interceptor is running on this cgroup; sharing its redirect"
            );
        }
        let config_value = redirect_config(proxy, ports, dns_port, fail_safe);
        config.set(0, config_value, 0).map_err(map_err(MAP_CONFIG))?;

        let target_fd = File::open(&target).map_err(|e| RedirectError::Attach {
            program: "cgroup",
            path: target.clone(),
            source: Box::new(e),
        })?;
        let links_dir = pins.as_ref().filter(|_| fail_safe.closed).map(|dir| liveness::links_dir(dir, heartbeat.id));
        if let Some(dir) = &links_dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| RedirectError::Pin(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut pinned_links = Vec::new();
        for name in CGROUP_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            p.load().map_err(load_err)?;
            let id = p.attach(&target_fd, ATTACH_MODE).map_err(attach_err(name, &target))?;
            if let Some(dir) = &links_dir {
                // Fail closed: the link must outlive this process.
                let link: FdLink = p.take_link(id).map_err(load_err)?.try_into().map_err(load_err)?;
                let path = dir.join(name);
                pinned_links.push(
                    link.pin(&path).map_err(|e| RedirectError::Pin(format!("cannot pin {}: {e}", path.display())))?,
                );
            }
        }
        let p: &mut SockOps = program(&mut ebpf, SOCK_OPS_PROGRAM)?;
        p.load().map_err(load_err)?;
        p.attach(&target_fd, ATTACH_MODE).map_err(attach_err(SOCK_OPS_PROGRAM, &target))?;
        if dns_port.is_some() {
            // Only while DNS is redirected: it looks at every packet the
            // covered processes send.
            let p: &mut CgroupSkb = program(&mut ebpf, DNS_EGRESS_PROGRAM)?;
            p.load().map_err(load_err)?;
            p.attach(&target_fd, CgroupSkbAttachType::Egress, ATTACH_MODE)
                .map_err(attach_err(DNS_EGRESS_PROGRAM, &target))?;
        }

        // Accepted sockets belong to the listener's cgroup, i.e. ours, which
        // need not be inside the target cgroup (an operator covering only
        // some workloads with --cgroup).
        let own_fd = File::open(&own).map_err(|e| RedirectError::Attach {
            program: "cgroup",
            path: own.clone(),
            source: Box::new(e),
        })?;
        let p: &mut CgroupSockopt = program(&mut ebpf, GETSOCKOPT_PROGRAM)?;
        p.load().map_err(load_err)?;
        p.attach(&own_fd, ATTACH_MODE).map_err(attach_err(GETSOCKOPT_PROGRAM, &own))?;

        let by_addr: AddrMap = take_map(&mut ebpf, MAP_BY_ADDR)?;
        let dns_by_addr: DnsAddrMap = take_map(&mut ebpf, MAP_DNS_BY_ADDR)?;
        if let Some(dir) = &pins {
            // Links a crashed fail-closed instance pinned: ours now do the job.
            let removed = liveness::remove_dead_links(dir, &heartbeat.live_ids());
            if removed > 0 {
                tracing::info!(removed, "removed the pinned links of stopped instances");
            }
        }
        tracing::info!(
            cgroup = %target.display(),
            own_cgroup = %own.display(),
            fail_mode = if fail_safe.closed { "closed" } else { "open" },
            heartbeat_timeout_ms = fail_safe.timeout_ms(),
            pinned = pins.as_ref().map(|d| d.display().to_string()),
            "eBPF redirect attached"
        );
        let beat = Arc::new(EbpfBeat { state: Mutex::new((heartbeat, [0; 2], false)), stats, pins: pins.clone() });
        beat.beat();
        // Started now, while this process still has the privileges the
        // helper keeps: it reads the executables of other users' processes.
        let reader = match Helper::spawn() {
            Ok(helper) => Some(OwnerSource::Helper(helper)),
            Err(error) => {
                tracing::warn!(
                    error = %crate::error::chain(&error),
                    "connections will carry no executable path: the attribution helper cannot start"
                );
                None
            }
        };
        Ok(Self {
            ebpf: Some(ebpf),
            config,
            config_value,
            targets_v4,
            targets_v6,
            plain,
            current_plain,
            by_addr: Arc::new(Mutex::new(by_addr)),
            dns_by_addr: Arc::new(dns_by_addr),
            current,
            cgroup: target,
            own_cgroup: own,
            beat,
            pins,
            pinned_links,
            namer: Arc::new(ProcessNamer::new(Procfs::default(), reader)),
        })
    }

    fn insert(&mut self, net: &IpNet) -> Result<(), aya::maps::MapError> {
        let value = Target::default();
        match net {
            IpNet::V4(n) => {
                self.targets_v4.insert(&Key::new(u32::from(n.prefix_len()), n.network().octets()), value, 0)
            }
            IpNet::V6(n) => {
                self.targets_v6.insert(&Key::new(u32::from(n.prefix_len()), n.network().octets()), value, 0)
            }
        }
    }

    fn remove(&mut self, net: &IpNet) -> Result<(), aya::maps::MapError> {
        match net {
            IpNet::V4(n) => self.targets_v4.remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
            IpNet::V6(n) => self.targets_v6.remove(&Key::new(u32::from(n.prefix_len()), n.network().octets())),
        }
    }
}

fn redirect_config(proxy: ProxyAddrs, ports: &[u16], dns_port: Option<u16>, fail_safe: FailSafe) -> RedirectConfig {
    let mut port_slots = [0u16; MAX_PORTS];
    for (slot, port) in port_slots.iter_mut().zip(ports) {
        *slot = *port;
    }
    let mut flags = CONFIG_F_ENABLED;
    if proxy.v6.is_some() {
        flags |= CONFIG_F_HAVE_V6;
    }
    if fail_safe.closed {
        flags |= CONFIG_F_FAIL_CLOSED;
    }
    RedirectConfig {
        proxy_addr_v4: proxy.v4.ip().octets(),
        proxy_addr_v6: proxy.v6.map(|a| a.ip().octets()).unwrap_or([0; 16]),
        proxy_port: proxy.v4.port(),
        flags,
        mark: proxy.mark,
        ports: port_slots,
        dns_port: dns_port.unwrap_or(0),
        _pad: 0,
        heartbeat_timeout_ms: fail_safe.timeout_ms(),
    }
}

/// Makes sure bpffs is mounted and returns (creating it) the pin directory
/// of the redirect covering `target`.
fn pin_dir(target: &Path) -> Result<PathBuf, String> {
    liveness::ensure_bpffs()?;
    let dir = liveness::pin_dir(target).map_err(|e| format!("cannot stat {}: {e}", target.display()))?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

fn clear_trie<K: aya::Pod>(trie: &mut LpmTrie<MapData, K, Target>) {
    let keys: Vec<Key<K>> = trie.keys().filter_map(Result::ok).collect();
    for key in keys {
        let _ = trie.remove(&key);
    }
}

/// The networks in the (shared) target tries.
fn trie_nets(v4: &LpmTrie<MapData, [u8; 4], Target>, v6: &LpmTrie<MapData, [u8; 16], Target>) -> Vec<IpNet> {
    let mut nets = Vec::new();
    for key in v4.keys().filter_map(Result::ok) {
        if let Ok(n) = ipnet::Ipv4Net::new(key.data().into(), key.prefix_len() as u8) {
            nets.push(IpNet::V4(n));
        }
    }
    for key in v6.keys().filter_map(Result::ok) {
        if let Ok(n) = ipnet::Ipv6Net::new(key.data().into(), key.prefix_len() as u8) {
            nets.push(IpNet::V6(n));
        }
    }
    nets
}

fn forward_kernel_logs(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            // SAFETY: the AsyncFd owns the logger, which owns the ring buffer
            // descriptor, so the descriptor stays open while registered.
            let registered =
                unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
            let Ok(mut logger) = registered else {
                tracing::warn!("cannot poll the eBPF log buffer; kernel-side warnings will not be shown");
                return;
            };
            tokio::spawn(async move {
                while let Ok(mut guard) = logger.readable_mut().await {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        // The object only logs on rare failures; a missing log map is not fatal.
        Err(error) => tracing::debug!(%error, "eBPF logger not initialised"),
    }
}

/// Map key for a client address as the kernel records it.
fn sock_key(client: SocketAddr) -> SockKey {
    let addr = match crate::net::canonical(client).ip() {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    SockKey { addr, port: client.port(), _pad: [0; 6] }
}

/// The server a DNS record names, as a plain (not v4-mapped) address.
fn dns_server_of(entry: &DnsOrig) -> SocketAddr {
    crate::net::canonical(SocketAddr::new(IpAddr::V6(entry.addr.into()), entry.port))
}

/// The task as the kernel recorded it: `comm` is the connecting thread's
/// name until [`ProcessNamer`] names the process.
fn workload_of(entry: &OrigDst) -> Workload {
    let end = entry.comm.iter().position(|&b| b == 0).unwrap_or(entry.comm.len());
    Workload {
        pid: entry.tgid,
        tid: entry.pid,
        uid: entry.uid,
        gid: entry.gid,
        comm: crate::process::clean(&entry.comm[..end]),
        cgroup_id: entry.cgroup_id,
        ..Default::default()
    }
}

impl EbpfRedirector {
    /// Brings the plain MCP targets' map in line with `targets.plain`.
    fn set_plain(&mut self, targets: &TargetSet) -> Result<(), RedirectError> {
        let wanted: BTreeSet<SocketAddr> = targets.plain.keys().copied().collect();
        if wanted == self.current_plain {
            return Ok(());
        }
        for addr in wanted.difference(&self.current_plain) {
            self.plain.insert(sock_key(*addr), Target::default(), 0).map_err(map_err(MAP_PLAIN_TARGETS))?;
        }
        for addr in self.current_plain.difference(&wanted) {
            match self.plain.remove(&sock_key(*addr)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_PLAIN_TARGETS)(e)),
            }
        }
        tracing::info!(total = wanted.len(), "plain MCP targets updated");
        self.current_plain = wanted;
        Ok(())
    }
}

impl Redirector for EbpfRedirector {
    fn mode(&self) -> &'static str {
        "ebpf"
    }

    fn attach_point(&self) -> String {
        format!("{} (getsockopt on {})", self.cgroup.display(), self.own_cgroup.display())
    }

    fn set_targets(&mut self, targets: &TargetSet) -> Result<(), RedirectError> {
        let stale: Vec<IpNet> = self.current.difference(&targets.nets).copied().collect();
        let fresh: Vec<IpNet> = targets.nets.difference(&self.current).copied().collect();
        // Insert before removing, so an address that moves between two
        // overlapping entries is never briefly uncovered.
        for net in &fresh {
            self.insert(net).map_err(map_err(MAP_TARGETS_V4))?;
            self.current.insert(*net);
        }
        for net in &stale {
            match self.remove(net) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(MAP_TARGETS_V4)(e)),
            }
            self.current.remove(net);
        }
        if !fresh.is_empty() || !stale.is_empty() {
            tracing::info!(
                added = fresh.len(),
                removed = stale.len(),
                total = self.current.len(),
                "redirect targets updated"
            );
        }
        self.set_plain(targets)
    }

    fn uninstall(&mut self) -> Result<(), RedirectError> {
        if self.ebpf.is_none() {
            return Ok(());
        }
        let others = self.beat.leave();
        if !others {
            // Last one: disable first so no connection is redirected while
            // links go away.
            let mut disabled = self.config_value;
            disabled.flags = 0;
            let _ = self.config.set(0, disabled, 0);
        }
        // Dropping the object closes the link descriptors: the kernel
        // detaches our programs. Our pinned links go with their pins.
        self.ebpf = None;
        let id = self.beat.state.lock().unwrap_or_else(|e| e.into_inner()).0.id;
        if let Some(dir) = &self.pins {
            let _ = liveness::remove_tree(&liveness::links_dir(dir, id));
        }
        self.pinned_links.clear();
        if others {
            tracing::info!(cgroup = %self.cgroup.display(), "eBPF redirect left to the other running instance");
            return Ok(());
        }
        if let Some(dir) = &self.pins
            && let Err(error) = liveness::remove_pins(dir)
        {
            tracing::warn!(%error, dir = %dir.display(), "cannot remove the pinned redirect maps");
        }
        tracing::info!(cgroup = %self.cgroup.display(), "eBPF redirect detached");
        Ok(())
    }

    fn liveness(&self) -> Option<Arc<dyn Liveness>> {
        Some(Arc::clone(&self.beat) as Arc<dyn Liveness>)
    }

    fn resolver(&self) -> Arc<dyn OrigDstResolver> {
        let by_addr = Arc::clone(&self.by_addr);
        let dns_by_addr = Arc::clone(&self.dns_by_addr);
        let namer = Arc::clone(&self.namer);
        Arc::new(
            SockoptResolver::new(Some(Arc::new(move |client: ClientAddr| -> WorkloadLookup {
                let key = sock_key(client.0);
                let entry = {
                    let mut map = by_addr.lock().unwrap_or_else(|e| e.into_inner());
                    let entry = map.get(&key, 0).ok();
                    if entry.is_some() {
                        // The record has served its purpose; keep the map small.
                        let _ = map.remove(&key);
                    }
                    entry
                };
                match entry {
                    Some(entry) => namer.name(workload_of(&entry)),
                    None => Box::pin(std::future::ready(None)),
                }
            })))
            .with_dns(Arc::new(move |client: ClientAddr, _local| {
                // Lookups only (no lock): the kernel keeps the entries fresh.
                let entry = dns_by_addr.get(&sock_key(client.0), 0).ok()?;
                Some(dns_server_of(&entry))
            })),
        )
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let names = [
            (STAT_REDIRECTED_V4, "redirected_v4"),
            (STAT_REDIRECTED_V6, "redirected_v6"),
            (STAT_SKIPPED_MARK, "skipped_own_mark"),
            (STAT_UDP_REFUSED, "udp_refused"),
            (STAT_V6_REFUSED, "ipv6_refused"),
            (STAT_ESTABLISHED, "established"),
            (STAT_ORIGDST_ANSWERED, "original_dst_answered"),
            (STAT_DNS_REDIRECTED, "dns_redirected"),
            (STAT_DNS_NOTED, "dns_server_noted"),
            (STAT_FAIL_OPEN, "fail_open_direct"),
            (STAT_FAIL_CLOSED, "fail_closed_refused"),
        ];
        names.iter().map(|&(i, name)| (name, self.beat.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))).collect()
    }
}

impl Drop for EbpfRedirector {
    fn drop(&mut self) {
        let _ = self.uninstall();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_carries_ports_addresses_and_flags() {
        let proxy = ProxyAddrs { v4: "127.0.0.1:15443".parse().unwrap(), v6: None, mark: 0x1e7 };
        let c = redirect_config(proxy, &[443, 8443], None, FailSafe::default());
        assert_eq!(c.proxy_addr_v4, [127, 0, 0, 1]);
        assert_eq!(c.proxy_port, 15443);
        assert_eq!(c.flags, CONFIG_F_ENABLED);
        assert!(c.has_port(443) && c.has_port(8443) && !c.has_port(80));
        let proxy = ProxyAddrs { v6: Some("[::1]:15443".parse().unwrap()), ..proxy };
        let c = redirect_config(proxy, &[443], Some(15053), FailSafe::default());
        assert_eq!(c.flags, CONFIG_F_ENABLED | CONFIG_F_HAVE_V6);
        assert_eq!(c.dns_port, 15053);
        assert_eq!(c.heartbeat_timeout_ms, 2000);
        let closed = FailSafe { closed: true, timeout: std::time::Duration::from_millis(750) };
        let c = redirect_config(proxy, &[443], None, closed);
        assert_eq!(c.flags, CONFIG_F_ENABLED | CONFIG_F_HAVE_V6 | CONFIG_F_FAIL_CLOSED);
        assert_eq!(c.heartbeat_timeout_ms, 750);
    }

    #[test]
    fn sock_keys_use_v4_mapped_form_and_host_order_port() {
        let k = sock_key("127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.addr, v4_mapped([127, 0, 0, 1]));
        assert_eq!(k.port, 40000);
        assert_eq!(sock_key("[::ffff:127.0.0.1]:40000".parse().unwrap()), k);
    }

    #[test]
    fn dns_records_give_plain_addresses() {
        let e = DnsOrig { addr: v4_mapped([127, 0, 0, 53]), port: 53, _pad: [0; 6] };
        assert_eq!(dns_server_of(&e), "127.0.0.53:53".parse::<SocketAddr>().unwrap());
        let e =
            DnsOrig { addr: "2001:db8::53".parse::<std::net::Ipv6Addr>().unwrap().octets(), port: 53, _pad: [0; 6] };
        assert_eq!(dns_server_of(&e), "[2001:db8::53]:53".parse::<SocketAddr>().unwrap());
    }

    #[test]
    fn comm_is_cut_at_the_first_nul() {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        let e = OrigDst {
            addr: [0; 16],
            port: 443,
            family: 2,
            tgid: 7,
            pid: 8,
            uid: 0,
            gid: 0,
            _pad: 0,
            cgroup_id: 9,
            comm,
        };
        let w = workload_of(&e);
        assert_eq!((w.pid, w.tid, w.comm.as_str(), w.cgroup_id), (7, 8, "curl", 9));
    }
}
