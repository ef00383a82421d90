//! cgroup/getsockopt: answer `SO_ORIGINAL_DST` (SOL_IP) and
//! `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) on the proxy's accepted sockets from the
//! record the connect hooks made, the way conntrack answers it for iptables
//! REDIRECT. Attached to the proxy's own cgroup: an accepted socket belongs to
//! the cgroup of the process that created the listener. Any other option, or
//! a socket without a record, keeps the kernel's own answer.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{macros::cgroup_sockopt, programs::SockoptContext};
use interceptor_common::{AF_INET, AF_INET6, STAT_ORIGDST_ANSWERED, SockKey, as_v4, v4_mapped};

use crate::maps::{ALLOW, ORIG_BY_ADDR, bump, words_to_bytes};

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;
/// `SO_ORIGINAL_DST` and `IP6T_SO_ORIGINAL_DST` share the value 80.
const SO_ORIGINAL_DST: i32 = 80;
const SOCKADDR_IN_LEN: usize = 16;
const SOCKADDR_IN6_LEN: usize = 28;

#[cgroup_sockopt(getsockopt)]
pub fn answer_original_dst(ctx: SockoptContext) -> i32 {
    let _ = try_answer(&ctx);
    ALLOW
}

fn try_answer(ctx: &SockoptContext) -> Result<(), ()> {
    // SAFETY: valid context for the program's lifetime.
    let so = unsafe { &mut *ctx.sockopt };
    if so.optname != SO_ORIGINAL_DST || (so.level != SOL_IP && so.level != SOL_IPV6) {
        return Ok(());
    }
    // SAFETY: union field set by the kernel for this program type.
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Err(());
    }
    // SAFETY: non-null kernel socket pointer readable by this program type.
    // Each field read directly from the socket pointer: the verifier forbids
    // arithmetic on socket pointers, which LLVM may otherwise emit.
    let (family, dst_port, dst_ip4, dst_ip6) = unsafe {
        (
            read_volatile(&(*sk).family),
            read_volatile(&(*sk).dst_port),
            read_volatile(&(*sk).dst_ip4),
            [
                read_volatile(&(*sk).dst_ip6[0]),
                read_volatile(&(*sk).dst_ip6[1]),
                read_volatile(&(*sk).dst_ip6[2]),
                read_volatile(&(*sk).dst_ip6[3]),
            ],
        )
    };
    // The peer of the accepted socket is the client's local address.
    let addr = if family == u32::from(AF_INET) { v4_mapped(dst_ip4.to_ne_bytes()) } else { words_to_bytes(dst_ip6) };
    let key = SockKey {
        addr,
        // bpf_sock.dst_port is in network order.
        port: u16::from_be(dst_port),
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    let entry = *unsafe { ORIG_BY_ADDR.get(&key) }.ok_or(())?;

    // SAFETY: union fields set by the kernel for this program type.
    let (optval, optval_end) =
        unsafe { (so.__bindgen_anon_2.optval as *mut u8, so.__bindgen_anon_3.optval_end as *mut u8) };
    let port = entry.port.to_be_bytes();
    let len = if so.level == SOL_IP {
        let v4 = as_v4(&entry.addr).ok_or(())?;
        // Bounds check the verifier requires before touching optval.
        if optval.wrapping_add(SOCKADDR_IN_LEN) > optval_end {
            return Err(());
        }
        let family = AF_INET.to_ne_bytes();
        let sin: [u8; SOCKADDR_IN_LEN] =
            [family[0], family[1], port[0], port[1], v4[0], v4[1], v4[2], v4[3], 0, 0, 0, 0, 0, 0, 0, 0];
        for (i, b) in sin.iter().enumerate() {
            // SAFETY: i < SOCKADDR_IN_LEN, bounds checked above.
            unsafe { write_volatile(optval.add(i), *b) };
        }
        SOCKADDR_IN_LEN
    } else {
        if optval.wrapping_add(SOCKADDR_IN6_LEN) > optval_end {
            return Err(());
        }
        // IPv4 destinations are already stored v4-mapped, as IPV6 answers want.
        let a = entry.addr;
        let family = AF_INET6.to_ne_bytes();
        let mut sin6 = [0u8; SOCKADDR_IN6_LEN];
        sin6[0] = family[0];
        sin6[1] = family[1];
        sin6[2] = port[0];
        sin6[3] = port[1];
        // bytes 4..8 flowinfo, 8..24 address, 24..28 scope id.
        let mut i = 0;
        while i < 16 {
            sin6[8 + i] = a[i];
            i += 1;
        }
        for (i, b) in sin6.iter().enumerate() {
            // SAFETY: i < SOCKADDR_IN6_LEN, bounds checked above.
            unsafe { write_volatile(optval.add(i), *b) };
        }
        SOCKADDR_IN6_LEN
    };
    // Two separate volatile writes: LLVM otherwise merges optlen and retval
    // into one 8-byte store that the verifier rejects
    // ("invalid bpf_context access off=32 size=8").
    // SAFETY: fields of the valid context, writable in getsockopt programs.
    unsafe {
        write_volatile(&mut so.optlen, len as i32);
        write_volatile(&mut so.retval, 0);
    }
    bump(STAT_ORIGDST_ANSWERED);
    Ok(())
}
