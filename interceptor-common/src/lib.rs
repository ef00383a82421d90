//! Types shared by the eBPF programs and user space.
//!
//! Every type here is `#[repr(C)]`, built only from fixed-width integers and
//! byte arrays, with explicit padding, so kernel and user space agree on the
//! layout byte for byte. Each has a size assertion. Addresses are always kept
//! as 16 bytes: IPv4 as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), in
//! network byte order. Ports are in host byte order unless a field says
//! otherwise.
#![no_std]

/// Address family values as the kernel uses them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Name of the configuration array (one [`RedirectConfig`] at index 0).
pub const MAP_CONFIG: &str = "CONFIG";
/// Name of the LPM trie of IPv4 targets (`Key<[u8; 4]>` → [`Target`]).
pub const MAP_TARGETS_V4: &str = "TARGETS_V4";
/// Name of the LPM trie of IPv6 targets (`Key<[u8; 16]>` → [`Target`]).
pub const MAP_TARGETS_V6: &str = "TARGETS_V6";
/// Name of the map from socket cookie to [`OrigDst`], filled at connect time.
pub const MAP_BY_COOKIE: &str = "ORIG_BY_COOKIE";
/// Name of the map from the client's address ([`SockKey`]) to [`OrigDst`].
pub const MAP_BY_ADDR: &str = "ORIG_BY_ADDR";
/// Name of the map from socket cookie to the DNS server a UDP socket aimed
/// at ([`DnsOrig`]), to restore the source of the forwarder's replies.
pub const MAP_DNS_ORIG: &str = "DNS_ORIG";
/// Name of the map from a client's address ([`SockKey`]: the source of its
/// redirected DNS datagrams, as the forwarder sees it) to the server the
/// datagram was sent to ([`DnsOrig`]): the forwarder asks that server.
pub const MAP_DNS_BY_ADDR: &str = "DNS_BY_ADDR";
/// Name of the per-CPU counters array (see the `STAT_*` indexes).
pub const MAP_STATS: &str = "STATS";
/// Plain-HTTP MCP targets: exact (address, port) pairs, keyed by a
/// [`SockKey`] (IPv4 as IPv4-mapped), value a [`Target`].
pub const MAP_PLAIN_TARGETS: &str = "PLAIN_TARGETS";
/// Bound on plain (address, port) targets.
pub const PLAIN_TARGETS_MAX: u32 = 4096;
/// Name of the one-slot array holding the proxy's last heartbeat, in
/// `CLOCK_MONOTONIC` nanoseconds (the clock of `bpf_ktime_get_ns`).
pub const MAP_HEARTBEAT: &str = "HEARTBEAT";
/// Name of the map from instance id to that instance's last heartbeat: which
/// interceptor processes share the pinned maps (user space only).
pub const MAP_INSTANCES: &str = "INSTANCES";
/// Capacity of [`MAP_INSTANCES`].
pub const INSTANCES_MAX: u32 = 64;

/// Capacity of each LPM trie of targets.
pub const TARGETS_MAX: u32 = 65_536;
/// Capacity of the LRU maps of original destinations. Entries are deleted as
/// soon as the proxy has read them; the LRU bound protects against clients
/// that connect and never get accepted.
pub const ORIG_DST_MAX: u32 = 65_536;

/// Counter indexes in [`MAP_STATS`].
pub const STAT_REDIRECTED_V4: u32 = 0;
pub const STAT_REDIRECTED_V6: u32 = 1;
pub const STAT_SKIPPED_MARK: u32 = 2;
pub const STAT_UDP_REFUSED: u32 = 3;
pub const STAT_V6_REFUSED: u32 = 4;
pub const STAT_ESTABLISHED: u32 = 5;
pub const STAT_ORIGDST_ANSWERED: u32 = 6;
pub const STAT_DNS_REDIRECTED: u32 = 7;
/// Connects to a target let through directly because the proxy's heartbeat
/// was stale (fail open).
pub const STAT_FAIL_OPEN: u32 = 8;
/// Connects to a target refused because the proxy's heartbeat was stale
/// (fail closed).
pub const STAT_FAIL_CLOSED: u32 = 9;
/// Redirected DNS datagrams whose server was recorded under the client's
/// address for the forwarder ([`MAP_DNS_BY_ADDR`]).
pub const STAT_DNS_NOTED: u32 = 10;
pub const STAT_MAX: u32 = 11;

/// `RedirectConfig::flags`: redirect is active. Cleared, the programs let
/// every connection through untouched.
pub const CONFIG_F_ENABLED: u16 = 1;
/// `RedirectConfig::flags`: `proxy_addr_v6` is valid. Without it, native IPv6
/// connections to a target are refused so that clients fall back to IPv4
/// (and get intercepted) instead of bypassing the proxy.
pub const CONFIG_F_HAVE_V6: u16 = 2;
/// `RedirectConfig::flags`: while the proxy's heartbeat is stale, refuse
/// connects to targets instead of letting them go direct.
pub const CONFIG_F_FAIL_CLOSED: u16 = 4;

/// Maximum number of redirected destination ports.
pub const MAX_PORTS: usize = 8;

/// Global settings of the redirect programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Proxy IPv4 address, network byte order.
    pub proxy_addr_v4: [u8; 4],
    /// Proxy IPv6 address, network byte order.
    pub proxy_addr_v6: [u8; 16],
    /// Proxy port, host byte order.
    pub proxy_port: u16,
    /// `CONFIG_F_*` bits.
    pub flags: u16,
    /// SO_MARK carried by the proxy's own sockets; such sockets are never
    /// redirected. Zero disables the check.
    pub mark: u32,
    /// Destination ports that are redirected (TCP) or refused (UDP), host
    /// byte order; zero entries are unused.
    pub ports: [u16; MAX_PORTS],
    /// Port of the DNS forwarder on the proxy addresses, host byte order.
    /// Non-zero: UDP and TCP port 53 go to it. Zero: DNS is left alone.
    pub dns_port: u16,
    pub _pad: u16,
    /// The proxy counts as alive while its heartbeat is at most this old, in
    /// milliseconds. Zero: always alive (no heartbeat check).
    pub heartbeat_timeout_ms: u32,
}

/// Where a UDP socket's DNS query was going before it was redirected.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsOrig {
    /// IPv6 or IPv4-mapped, network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

impl RedirectConfig {
    /// Whether `port` (host byte order) is one of the redirected ports.
    #[inline(always)]
    pub fn has_port(&self, port: u16) -> bool {
        let mut i = 0;
        while i < MAX_PORTS {
            if self.ports[i] != 0 && self.ports[i] == port {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Value of the target tries. Reserved for per-target options.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Target {
    pub flags: u32,
}

/// The client's side of a redirected connection: its local address and port
/// as the proxy sees them as the peer of the accepted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Where a redirected connection was going, and who opened it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// IPv6 or IPv4-mapped address, network byte order.
    pub addr: [u8; 16],
    /// Host byte order.
    pub port: u16,
    /// `AF_INET` for an IPv4 destination (also when the client used a
    /// dual-stack socket with a v4-mapped address), `AF_INET6` otherwise.
    pub family: u16,
    /// Process id (the kernel's tgid).
    pub tgid: u32,
    /// Thread id (the kernel's pid).
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub _pad: u32,
    /// cgroup v2 id (the inode number of the cgroup directory).
    pub cgroup_id: u64,
    /// Task command name, NUL padded.
    pub comm: [u8; 16],
}

/// Builds a v4-mapped IPv6 address from IPv4 bytes.
#[inline(always)]
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// Returns the IPv4 bytes of a v4-mapped IPv6 address.
#[inline(always)]
pub const fn as_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    if addr[0] == 0
        && addr[1] == 0
        && addr[2] == 0
        && addr[3] == 0
        && addr[4] == 0
        && addr[5] == 0
        && addr[6] == 0
        && addr[7] == 0
        && addr[8] == 0
        && addr[9] == 0
        && addr[10] == 0xff
        && addr[11] == 0xff
    {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

const _: () = assert!(core::mem::size_of::<RedirectConfig>() == 52);
const _: () = assert!(core::mem::size_of::<DnsOrig>() == 24);
const _: () = assert!(core::mem::size_of::<Target>() == 4);
const _: () = assert!(core::mem::size_of::<SockKey>() == 24);
const _: () = assert!(core::mem::size_of::<OrigDst>() == 64);
const _: () = assert!(core::mem::align_of::<OrigDst>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data: repr(C), integers and byte arrays only, every
    // padding byte is an explicit field, so any bit pattern is valid.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Target {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DnsOrig {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_round_trips() {
        let m = v4_mapped([198, 18, 0, 10]);
        assert_eq!(as_v4(&m), Some([198, 18, 0, 10]));
        let mut native = m;
        native[10] = 0;
        assert_eq!(as_v4(&native), None);
    }

    #[test]
    fn ports_match_only_configured_values() {
        let mut c = RedirectConfig {
            proxy_addr_v4: [127, 0, 0, 1],
            proxy_addr_v6: [0; 16],
            proxy_port: 15443,
            flags: CONFIG_F_ENABLED,
            mark: 0x1e7,
            ports: [0; MAX_PORTS],
            dns_port: 0,
            _pad: 0,
            heartbeat_timeout_ms: 0,
        };
        assert!(!c.has_port(0), "unused slots must not match port 0");
        c.ports[0] = 443;
        assert!(c.has_port(443));
        assert!(!c.has_port(80));
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::offset_of!(OrigDst, cgroup_id), 40);
        assert_eq!(core::mem::offset_of!(OrigDst, comm), 48);
        assert_eq!(core::mem::offset_of!(SockKey, port), 16);
        assert_eq!(core::mem::offset_of!(RedirectConfig, mark), 24);
        assert_eq!(core::mem::offset_of!(RedirectConfig, ports), 28);
        assert_eq!(core::mem::offset_of!(RedirectConfig, dns_port), 44);
        assert_eq!(core::mem::offset_of!(RedirectConfig, heartbeat_timeout_ms), 48);
    }
}
