//! sock_ops: re-key a redirected socket's record by its local address once
//! the connection is established (at connect time the port is not yet
//! chosen). The proxy sees that address as the peer of the accepted socket.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _, bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, helpers::generated::bpf_get_socket_cookie,
    macros::sock_ops, programs::SockOpsContext,
};
use interceptor_common::{AF_INET, STAT_ESTABLISHED, SockKey, v4_mapped};

use crate::maps::{ORIG_BY_ADDR, ORIG_BY_COOKIE, bump, words_to_bytes};

// Not named `sockops`: that clashes with the section name at link time.
#[sock_ops]
pub fn record_established(ctx: SockOpsContext) -> u32 {
    let _ = try_record_established(&ctx);
    1
}

fn try_record_established(ctx: &SockOpsContext) -> Result<(), i32> {
    // Read every context field up front, with plain loads from the context
    // pointer: the verifier rejects loads through a context pointer that
    // LLVM has offset and carried across a branch ("dereference of modified
    // ctx ptr").
    // SAFETY: valid context for the program's lifetime.
    let (op, family, local_ip4, local_ip6, local_port) = unsafe {
        let ops = ctx.ops;
        (
            read_volatile(&(*ops).op),
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
            read_volatile(&(*ops).local_port),
        )
    };
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return Ok(());
    }
    // SAFETY: helper permitted for sock_ops programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the map value is copied out before any other map operation.
    let Some(entry) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }) else {
        return Ok(());
    };
    let entry = *entry;
    let addr = if family == u32::from(AF_INET) {
        // local_ip4 is in network order.
        v4_mapped(local_ip4.to_ne_bytes())
    } else {
        // Dual-stack sockets already hold v4-mapped addresses here.
        words_to_bytes(local_ip6)
    };
    let key = SockKey {
        addr,
        // local_port is in host order in sock_ops.
        port: local_port as u16,
        _pad: [0; 6],
    };
    ORIG_BY_ADDR.insert(&key, &entry, 0)?;
    let _ = ORIG_BY_COOKIE.remove(&cookie);
    bump(STAT_ESTABLISHED);
    Ok(())
}
