//! DNS towards the interceptor's forwarder: UDP and TCP to port 53 from the
//! attached cgroup go to the forwarder (which learns AI providers' addresses
//! from the answers before the client sees them). For UDP the real server is
//! remembered per socket, and `cgroup/recvmsg4`/`recvmsg6` give the replies
//! that server's address back as their source: resolvers such as glibc drop
//! answers from an unexpected address. The forwarder asks the server the
//! client asked: for UDP, `dns_egress` files that server under the client's
//! address; for TCP, the connection is recorded like a redirected target
//! connection, and the forwarder reads it with `SO_ORIGINAL_DST`.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
};
use interceptor_common::{
    AF_INET, AF_INET6, CONFIG_F_HAVE_V6, DnsOrig, RedirectConfig, STAT_DNS_REDIRECTED, as_v4, v4_mapped,
};

use crate::{
    connect4::record,
    maps::{
        ALLOW, DNS_ORIG, SOCK_DGRAM, SOCK_STREAM, bump, bytes_to_words, enabled_config, proxy_alive, words_to_bytes,
    },
};

pub const DNS_PORT: u16 = 53;

/// Whether DNS redirection applies to this socket: enabled, port 53, and not
/// one of the proxy's own sockets (the forwarder's upstream queries carry
/// its mark).
#[inline(always)]
pub fn dns_applies(ctx: &SockAddrContext, cfg: &RedirectConfig, port: u16) -> bool {
    // A dead forwarder must never take DNS down with it: whatever the fail
    // mode, queries go to their own server while the proxy is down.
    if port != DNS_PORT || cfg.dns_port == 0 || !proxy_alive(cfg) {
        return false;
    }
    if cfg.mark != 0 {
        // SAFETY: valid context; `sk` is non-null in these hooks, checked anyway.
        let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
        // SAFETY: non-null kernel socket pointer readable by this program type.
        if !sk.is_null() && unsafe { (*sk).mark } == cfg.mark {
            return false;
        }
    }
    true
}

/// Remembers the server a UDP socket aims at, by socket cookie.
#[inline(always)]
fn remember_server(ctx: &SockAddrContext, addr: [u8; 16], port: u16) {
    // SAFETY: helper permitted for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = DNS_ORIG.insert(&cookie, &DnsOrig { addr, port, _pad: [0; 6] }, 0);
}

/// Rewrites an IPv4 DNS destination to the forwarder.
#[inline(always)]
pub fn redirect_dns4(ctx: &SockAddrContext, cfg: &RedirectConfig) {
    // SAFETY: valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let server = v4_mapped(sa.user_ip4.to_ne_bytes());
    if sa.type_ == SOCK_DGRAM {
        remember_server(ctx, server, DNS_PORT);
    } else if sa.type_ == SOCK_STREAM {
        // Without a record the forwarder falls back to its other upstreams:
        // DNS keeps working, so a full map is no reason to refuse.
        let _ = record(ctx, server, DNS_PORT, AF_INET);
    }
    sa.user_ip4 = u32::from_ne_bytes(cfg.proxy_addr_v4);
    sa.user_port = u32::from(cfg.dns_port.to_be());
    bump(STAT_DNS_REDIRECTED);
}

/// Rewrites an IPv6 (or v4-mapped) DNS destination to the forwarder; a
/// native IPv6 server is left alone when the forwarder has no IPv6 address.
#[inline(always)]
pub fn redirect_dns6(ctx: &SockAddrContext, cfg: &RedirectConfig) {
    // SAFETY: valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr = words_to_bytes(sa.user_ip6);
    let forwarder = if as_v4(&addr).is_some() {
        v4_mapped(cfg.proxy_addr_v4)
    } else if cfg.flags & CONFIG_F_HAVE_V6 != 0 {
        cfg.proxy_addr_v6
    } else {
        return;
    };
    if sa.type_ == SOCK_DGRAM {
        remember_server(ctx, addr, DNS_PORT);
    } else if sa.type_ == SOCK_STREAM {
        let family = if as_v4(&addr).is_some() { AF_INET } else { AF_INET6 };
        let _ = record(ctx, addr, DNS_PORT, family);
    }
    sa.user_ip6 = bytes_to_words(forwarder);
    sa.user_port = u32::from(cfg.dns_port.to_be());
    bump(STAT_DNS_REDIRECTED);
}

#[cgroup_sock_addr(recvmsg4)]
pub fn restore_dns4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = enabled_config() else {
        return ALLOW;
    };
    // SAFETY: valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if cfg.dns_port == 0
        || sa.user_ip4 != u32::from_ne_bytes(cfg.proxy_addr_v4)
        || sa.user_port != u32::from(cfg.dns_port.to_be())
    {
        return ALLOW;
    }
    // SAFETY: helper permitted for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    if let Some(orig) = unsafe { DNS_ORIG.get(&cookie) }.copied()
        && let Some(v4) = as_v4(&orig.addr)
    {
        sa.user_ip4 = u32::from_ne_bytes(v4);
        sa.user_port = u32::from(orig.port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn restore_dns6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = enabled_config() else {
        return ALLOW;
    };
    // SAFETY: valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    if cfg.dns_port == 0 || sa.user_port != u32::from(cfg.dns_port.to_be()) {
        return ALLOW;
    }
    let from = words_to_bytes(sa.user_ip6);
    if from != v4_mapped(cfg.proxy_addr_v4) && from != cfg.proxy_addr_v6 {
        return ALLOW;
    }
    // SAFETY: helper permitted for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    if let Some(orig) = unsafe { DNS_ORIG.get(&cookie) }.copied() {
        sa.user_ip6 = bytes_to_words(orig.addr);
        sa.user_port = u32::from(orig.port.to_be());
    }
    ALLOW
}
