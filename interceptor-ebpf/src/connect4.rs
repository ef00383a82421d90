//! cgroup/connect4: redirect TCP connects to IPv4 targets, refuse UDP (QUIC).

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use aya_log_ebpf::warn;
use interceptor_common::{
    AF_INET, OrigDst, RedirectConfig, STAT_REDIRECTED_V4, STAT_SKIPPED_MARK, STAT_UDP_REFUSED, v4_mapped,
};

use crate::dns::{dns_applies, redirect_dns4};
use crate::maps::{
    ALLOW, DENY, ORIG_BY_COOKIE, SOCK_DGRAM, SOCK_STREAM, bump, enabled_config, is_plain_target, is_target_v4,
    proxy_down_verdict,
};

#[cgroup_sock_addr(connect4)]
pub fn intercept_connect4(ctx: SockAddrContext) -> i32 {
    try_connect4(&ctx).unwrap_or(ALLOW)
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(cfg) = enabled_config() else {
        return Ok(ALLOW);
    };
    // SAFETY: the kernel hands us a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    // user_ip4 is in network order; its in-memory bytes are the address.
    let ip = sa.user_ip4.to_ne_bytes();
    // user_port holds a network-order 16-bit port in the low half of a u32.
    let port = u16::from_be(sa.user_port as u16);
    if dns_applies(ctx, cfg, port) {
        redirect_dns4(ctx, cfg);
        return Ok(ALLOW);
    }
    // A plain MCP target is one exact (address, port), on any port.
    let plain = is_plain_target(v4_mapped(ip), port);
    if !plain && (!cfg.has_port(port) || !is_target_v4(ip)) {
        return Ok(ALLOW);
    }
    if let Some(verdict) = early_verdict(ctx, cfg, sa.type_) {
        return Ok(verdict);
    }
    if record(ctx, v4_mapped(ip), port, AF_INET).is_err() {
        // Without a record the proxy could not tell where to go: refuse
        // rather than redirect blindly or let it bypass the guardrails.
        warn!(ctx, "interceptor: cannot record original destination; connect refused");
        return Ok(DENY);
    }
    sa.user_ip4 = u32::from_ne_bytes(cfg.proxy_addr_v4);
    sa.user_port = u32::from(cfg.proxy_port.to_be());
    bump(STAT_REDIRECTED_V4);
    Ok(ALLOW)
}

/// For a connect to a target: the verdict when the socket must not be
/// redirected (UDP is refused, the proxy's own sockets and other socket
/// types pass, TCP follows the fail mode while the proxy is down), `None`
/// when it must.
#[inline(always)]
pub fn early_verdict(ctx: &SockAddrContext, cfg: &RedirectConfig, sock_type: u32) -> Option<i32> {
    match sock_type {
        SOCK_STREAM if skip_own_socket(ctx, cfg) => Some(ALLOW),
        SOCK_STREAM => proxy_down_verdict(cfg),
        SOCK_DGRAM => {
            // QUIC / HTTP/3 to a provider would bypass the TLS proxy: refuse
            // it (EPERM) so clients fall back to TCP.
            bump(STAT_UDP_REFUSED);
            Some(DENY)
        }
        _ => Some(ALLOW),
    }
}

/// Whether the socket carries the proxy's own mark (its upstream sockets),
/// which must never be redirected back to it.
#[inline(always)]
fn skip_own_socket(ctx: &SockAddrContext, cfg: &RedirectConfig) -> bool {
    if cfg.mark == 0 {
        return false;
    }
    // SAFETY: valid context; `sk` is a non-null socket pointer in connect
    // and sendmsg hooks, checked anyway.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: non-null kernel socket pointer readable by this program type.
    let mark = unsafe { (*sk).mark };
    if mark == cfg.mark {
        bump(STAT_SKIPPED_MARK);
        return true;
    }
    false
}

/// Records the original destination and the connecting task by socket cookie.
#[inline(always)]
pub fn record(ctx: &SockAddrContext, addr: [u8; 16], port: u16, family: u16) -> Result<(), i32> {
    // SAFETY: helper calls permitted for cgroup sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    // SAFETY: as above.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    let entry = OrigDst {
        addr,
        port,
        family,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        _pad: 0,
        cgroup_id,
        comm,
    };
    ORIG_BY_COOKIE.insert(&cookie, &entry, 0)
}
