//! cgroup/connect6: the same policy for IPv6 sockets. A dual-stack socket
//! connecting to `::ffff:a.b.c.d` only passes through this hook, so v4-mapped
//! destinations get the IPv4 policy; native IPv6 targets go to the proxy's
//! IPv6 address, or are refused when the proxy has none.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use aya_log_ebpf::warn;
use interceptor_common::{
    AF_INET, AF_INET6, CONFIG_F_HAVE_V6, STAT_REDIRECTED_V4, STAT_REDIRECTED_V6, STAT_V6_REFUSED, as_v4, v4_mapped,
};

use crate::{
    connect4::{early_verdict, record},
    dns::{dns_applies, redirect_dns6},
    maps::{
        ALLOW, DENY, bump, bytes_to_words, enabled_config, is_plain_target, is_target_v4, is_target_v6, words_to_bytes,
    },
};

#[cgroup_sock_addr(connect6)]
pub fn intercept_connect6(ctx: SockAddrContext) -> i32 {
    try_connect6(&ctx).unwrap_or(ALLOW)
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let Some(cfg) = enabled_config() else {
        return Ok(ALLOW);
    };
    // SAFETY: the kernel hands us a valid context for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let addr = words_to_bytes(sa.user_ip6);
    let port = u16::from_be(sa.user_port as u16);
    if dns_applies(ctx, cfg, port) {
        redirect_dns6(ctx, cfg);
        return Ok(ALLOW);
    }
    let mapped = as_v4(&addr);
    // A plain MCP target is one exact (address, port), on any port; its key
    // holds IPv4 as IPv4-mapped, as `addr` already is.
    let target = is_plain_target(addr, port)
        || cfg.has_port(port)
            && match mapped {
                Some(v4) => is_target_v4(v4),
                None => is_target_v6(addr),
            };
    if !target {
        return Ok(ALLOW);
    }
    if let Some(verdict) = early_verdict(ctx, cfg, sa.type_) {
        return Ok(verdict);
    }
    let (family, proxy) = if mapped.is_some() {
        (AF_INET, v4_mapped(cfg.proxy_addr_v4))
    } else if cfg.flags & CONFIG_F_HAVE_V6 != 0 {
        (AF_INET6, cfg.proxy_addr_v6)
    } else {
        // No IPv6 listener: refusing makes clients fall back to IPv4, which
        // is intercepted; letting it through would bypass the guardrails.
        bump(STAT_V6_REFUSED);
        return Ok(DENY);
    };
    if record(ctx, addr, port, family).is_err() {
        warn!(ctx, "interceptor: cannot record original destination; connect refused");
        return Ok(DENY);
    }
    sa.user_ip6 = bytes_to_words(proxy);
    sa.user_port = u32::from(cfg.proxy_port.to_be());
    bump(if family == AF_INET { STAT_REDIRECTED_V4 } else { STAT_REDIRECTED_V6 });
    Ok(ALLOW)
}
