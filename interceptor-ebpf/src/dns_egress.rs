//! cgroup_skb/egress: for each redirected DNS datagram leaving a covered
//! socket, record the server it was sent to under the datagram's source
//! address and port, which is what the forwarder sees as its client.
//!
//! The connect and sendmsg hooks remember that server by socket cookie, but
//! the forwarder only sees addresses, and at those hooks a connected UDP
//! socket (glibc, systemd-resolved, Go) has no local port yet. The packet on
//! its way out has both its final source and the sending socket. Attached
//! only while DNS is redirected; every other packet costs a few loads.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use interceptor_common::{CONFIG_F_HAVE_V6, STAT_DNS_NOTED, SockKey, v4_mapped};

use crate::maps::{DNS_BY_ADDR, DNS_ORIG, bump, enabled_config};

/// Program return code for cgroup skb programs: let the packet pass.
const PASS: i32 = 1;
const IPPROTO_UDP: u8 = 17;
const IPV6_HEADER_LEN: usize = 40;

#[cgroup_skb(egress)]
pub fn note_dns_source(ctx: SkBuffContext) -> i32 {
    let _ = try_note(&ctx);
    // Never drops anything: this program only records.
    PASS
}

fn try_note(ctx: &SkBuffContext) -> Result<(), i64> {
    let Some(cfg) = enabled_config() else {
        return Ok(());
    };
    if cfg.dns_port == 0 {
        return Ok(());
    }
    // The packet starts at its IP header in cgroup skb programs.
    let first: u8 = ctx.load(0)?;
    let (src, udp_offset) = match first >> 4 {
        4 => {
            if ctx.load::<u8>(9)? != IPPROTO_UDP || ctx.load::<[u8; 4]>(16)? != cfg.proxy_addr_v4 {
                return Ok(());
            }
            (v4_mapped(ctx.load::<[u8; 4]>(12)?), usize::from(first & 0x0f) * 4)
        }
        6 => {
            // Extension headers are not followed: DNS queries carry none.
            if cfg.flags & CONFIG_F_HAVE_V6 == 0
                || ctx.load::<u8>(6)? != IPPROTO_UDP
                || ctx.load::<[u8; 16]>(24)? != cfg.proxy_addr_v6
            {
                return Ok(());
            }
            (ctx.load::<[u8; 16]>(8)?, IPV6_HEADER_LEN)
        }
        _ => return Ok(()),
    };
    // Source and destination ports, network order, at the start of the UDP
    // header.
    let ports: [u8; 4] = ctx.load(udp_offset)?;
    if u16::from_be_bytes([ports[2], ports[3]]) != cfg.dns_port {
        return Ok(());
    }
    let key = SockKey { addr: src, port: u16::from_be_bytes([ports[0], ports[1]]), _pad: [0; 6] };
    // SAFETY: helper permitted for cgroup skb programs; the packet's socket
    // is the one the connect and sendmsg hooks saw.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    match unsafe { DNS_ORIG.get(&cookie) }.copied() {
        Some(orig) => {
            DNS_BY_ADDR.insert(&key, &orig, 0)?;
            bump(STAT_DNS_NOTED);
        }
        // Sent to the forwarder directly, not redirected: an entry a former
        // socket left under this address must not apply to it.
        None => {
            let _ = DNS_BY_ADDR.remove(&key);
        }
    }
    Ok(())
}
