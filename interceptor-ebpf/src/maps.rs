//! Maps shared by the programs, and small helpers over them.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use interceptor_common::{
    CONFIG_F_FAIL_CLOSED, DnsOrig, INSTANCES_MAX, ORIG_DST_MAX, OrigDst, PLAIN_TARGETS_MAX, RedirectConfig,
    STAT_FAIL_CLOSED, STAT_FAIL_OPEN, STAT_MAX, SockKey, TARGETS_MAX, Target,
};

/// Program return codes for cgroup sock_addr and sockopt programs.
pub const ALLOW: i32 = 1;
pub const DENY: i32 = 0;

pub const SOCK_STREAM: u32 = 1;
pub const SOCK_DGRAM: u32 = 2;

#[map(name = "CONFIG")]
pub static CONFIG: Array<RedirectConfig> = Array::with_max_entries(1, 0);

#[map(name = "TARGETS_V4")]
pub static TARGETS_V4: LpmTrie<[u8; 4], Target> = LpmTrie::with_max_entries(TARGETS_MAX, 0);

#[map(name = "TARGETS_V6")]
pub static TARGETS_V6: LpmTrie<[u8; 16], Target> = LpmTrie::with_max_entries(TARGETS_MAX, 0);

/// Plain-HTTP MCP servers: only these exact (address, port) pairs, on any
/// port, whatever the configured ports.
#[map(name = "PLAIN_TARGETS")]
pub static PLAIN_TARGETS: HashMap<SockKey, Target> = HashMap::with_max_entries(PLAIN_TARGETS_MAX, 0);

#[map(name = "ORIG_BY_COOKIE")]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(ORIG_DST_MAX, 0);

#[map(name = "ORIG_BY_ADDR")]
pub static ORIG_BY_ADDR: LruHashMap<SockKey, OrigDst> = LruHashMap::with_max_entries(ORIG_DST_MAX, 0);

#[map(name = "DNS_ORIG")]
pub static DNS_ORIG: LruHashMap<u64, DnsOrig> = LruHashMap::with_max_entries(ORIG_DST_MAX, 0);

/// Kept, not deleted on read: one socket sends several queries (A and AAAA
/// at once); the LRU bound keeps it small, and a socket reusing the address
/// overwrites the entry with its first datagram, before the forwarder reads.
#[map(name = "DNS_BY_ADDR")]
pub static DNS_BY_ADDR: LruHashMap<SockKey, DnsOrig> = LruHashMap::with_max_entries(ORIG_DST_MAX, 0);

/// The proxy's last heartbeat (`bpf_ktime_get_ns` clock), written by user space.
#[map(name = "HEARTBEAT")]
pub static HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

/// Instance id -> last heartbeat; only user space reads and writes it.
#[map(name = "INSTANCES")]
pub static INSTANCES: HashMap<u64, u64> = HashMap::with_max_entries(INSTANCES_MAX, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_MAX, 0);

/// The active configuration, if redirect is enabled.
#[inline(always)]
pub fn enabled_config() -> Option<&'static RedirectConfig> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & interceptor_common::CONFIG_F_ENABLED == 0 {
        return None;
    }
    Some(cfg)
}

/// Whether the proxy's heartbeat is fresh enough to send connections to it.
#[inline(always)]
pub fn proxy_alive(cfg: &RedirectConfig) -> bool {
    if cfg.heartbeat_timeout_ms == 0 {
        return true;
    }
    let Some(&beat) = HEARTBEAT.get(0) else {
        return true;
    };
    // SAFETY: helper available to every program type.
    let now = unsafe { bpf_ktime_get_ns() };
    now.saturating_sub(beat) <= u64::from(cfg.heartbeat_timeout_ms) * 1_000_000
}

/// For a TCP connect to a target: `None` while the proxy is alive (redirect
/// it); otherwise the fail-mode verdict: refuse (fail closed) or let it go
/// direct (fail open).
#[inline(always)]
pub fn proxy_down_verdict(cfg: &RedirectConfig) -> Option<i32> {
    if proxy_alive(cfg) {
        return None;
    }
    if cfg.flags & CONFIG_F_FAIL_CLOSED != 0 {
        bump(STAT_FAIL_CLOSED);
        Some(DENY)
    } else {
        bump(STAT_FAIL_OPEN);
        Some(ALLOW)
    }
}

#[inline(always)]
pub fn is_target_v4(addr: [u8; 4]) -> bool {
    TARGETS_V4.get(Key::new(32, addr)).is_some()
}

#[inline(always)]
pub fn is_target_v6(addr: [u8; 16]) -> bool {
    TARGETS_V6.get(Key::new(128, addr)).is_some()
}

/// Whether (`addr`, `port`) is a plain target; `addr` IPv6 or IPv4-mapped,
/// `port` in host order.
#[inline(always)]
pub fn is_plain_target(addr: [u8; 16], port: u16) -> bool {
    let key = SockKey { addr, port, _pad: [0; 6] };
    // SAFETY: the value is only tested for presence, never read.
    unsafe { PLAIN_TARGETS.get(&key).is_some() }
}

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the
        // program runs.
        unsafe { *counter += 1 };
    }
}

/// Converts four network-order words (as the kernel stores IPv6 addresses in
/// context structs) into bytes in network order.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (w[0].to_ne_bytes(), w[1].to_ne_bytes(), w[2].to_ne_bytes(), w[3].to_ne_bytes());
    [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3]]
}

#[inline(always)]
pub fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}
