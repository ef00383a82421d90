//! cgroup/sendmsg4 and cgroup/sendmsg6: refuse unconnected UDP datagrams
//! (QUIC) to a target port, so clients fall back to TCP and get intercepted.
//! Connected UDP sockets are refused at connect time instead.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use interceptor_common::{STAT_UDP_REFUSED, as_v4};

use crate::dns::{dns_applies, redirect_dns4, redirect_dns6};
use crate::maps::{ALLOW, DENY, bump, enabled_config, is_target_v4, is_target_v6, words_to_bytes};

#[cgroup_sock_addr(sendmsg4)]
pub fn refuse_quic4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = enabled_config() else {
        return ALLOW;
    };
    // SAFETY: valid context for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if dns_applies(&ctx, cfg, port) {
        redirect_dns4(&ctx, cfg);
        return ALLOW;
    }
    if cfg.has_port(port) && is_target_v4(sa.user_ip4.to_ne_bytes()) {
        bump(STAT_UDP_REFUSED);
        return DENY;
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn refuse_quic6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = enabled_config() else {
        return ALLOW;
    };
    // SAFETY: valid context for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if dns_applies(&ctx, cfg, port) {
        redirect_dns6(&ctx, cfg);
        return ALLOW;
    }
    if !cfg.has_port(port) {
        return ALLOW;
    }
    let addr = words_to_bytes(sa.user_ip6);
    let target = match as_v4(&addr) {
        Some(v4) => is_target_v4(v4),
        None => is_target_v6(addr),
    };
    if target {
        bump(STAT_UDP_REFUSED);
        return DENY;
    }
    ALLOW
}
