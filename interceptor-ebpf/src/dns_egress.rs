//! cgroup_skb/egress: for each redirected DNS datagram leaving a covered
//! socket, record the server it was sent to under the datagram's source
//! address and port, which is what the forwarder sees as its client.
//!
//! The connect and sendmsg hooks remember that server by socket cookie, but
//! the forwarder only sees addresses, and at those hooks a connected UDP
//! socket (glibc, systemd-resolved, Go) has no local port yet. The packet on
//! its way out has both its final source and the sending socket. Attached
//! only while DNS is redirected; every other packet costs one 44-byte load
//! and a few compares (about 100 ns per packet measured with
//! `kernel.bpf_stats_enabled`, which adds its own clock reads).

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_skb, programs::SkBuffContext,
};
use interceptor_common::{CONFIG_F_HAVE_V6, STAT_DNS_NOTED, SockKey, v4_mapped};

use crate::maps::{DNS_BY_ADDR, DNS_ORIG, bump, enabled_config};

/// Program return code for cgroup skb programs: let the packet pass.
const PASS: i32 = 1;
const IPPROTO_UDP: u8 = 17;
/// The bytes read from every packet, with one helper call: an IPv6 header
/// and the UDP ports after it, or an IPv4 header without options and the
/// ports after it. Every DNS query is longer (a 12-byte header and a
/// question follow the UDP header); shorter packets are not looked at.
const HEAD: usize = 44;

#[cgroup_skb(egress)]
pub fn note_dns_source(ctx: SkBuffContext) -> i32 {
    let _ = try_note(&ctx);
    // Never drops anything: this program only records.
    PASS
}

/// `N` bytes of `head` from `at` (constant indexes: no slice comparison,
/// which would need memcmp).
#[inline(always)]
fn bytes<const N: usize>(head: &[u8; HEAD], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = head[at + i];
        i += 1;
    }
    out
}

fn try_note(ctx: &SkBuffContext) -> Result<(), i64> {
    let Some(cfg) = enabled_config() else {
        return Ok(());
    };
    if cfg.dns_port == 0 {
        return Ok(());
    }
    // The packet starts at its IP header in cgroup skb programs.
    let head: [u8; HEAD] = ctx.load(0)?;
    let (src, ports) = match head[0] >> 4 {
        4 => {
            if head[9] != IPPROTO_UDP || bytes::<4>(&head, 16) != cfg.proxy_addr_v4 {
                return Ok(());
            }
            let header_len = usize::from(head[0] & 0x0f) * 4;
            let ports = if header_len == 20 { bytes::<4>(&head, 20) } else { ctx.load::<[u8; 4]>(header_len)? };
            (v4_mapped(bytes::<4>(&head, 12)), ports)
        }
        6 => {
            // Extension headers are not followed: DNS queries carry none.
            if cfg.flags & CONFIG_F_HAVE_V6 == 0
                || head[6] != IPPROTO_UDP
                || bytes::<16>(&head, 24) != cfg.proxy_addr_v6
            {
                return Ok(());
            }
            (bytes::<16>(&head, 8), bytes::<4>(&head, 40))
        }
        _ => return Ok(()),
    };
    // Source and destination ports, network order.
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
