//! The interceptor's kernel side.
//!
//! * `connect4` / `connect6` (cgroup/connect4, cgroup/connect6): TCP connects
//!   to a target address are rewritten to the proxy; the original destination
//!   and the connecting task are recorded by socket cookie. UDP connects to a
//!   target port (QUIC) are refused.
//! * `sendmsg` (cgroup/sendmsg4, cgroup/sendmsg6): unconnected UDP sends to a
//!   target port are refused.
//! * `sock_ops`: when a recorded socket is established, the record is re-keyed
//!   by the client's local address, which the proxy sees as its peer.
//! * `getsockopt` (cgroup/getsockopt): answers `SO_ORIGINAL_DST` /
//!   `IP6T_SO_ORIGINAL_DST` on the proxy's accepted sockets from that record,
//!   so the proxy has one code path for eBPF and iptables redirect.
//! * `dns` (in the connect, sendmsg and cgroup/recvmsg4/6 hooks): DNS to port
//!   53 goes to the forwarder, and replies seem to come from the server the
//!   client asked.
//! * `dns_egress` (cgroup_skb/egress): files that server under the address
//!   the forwarder sees as the client, so it can ask that very server.
//!
//! The programs never touch a socket that is not aimed at a target.
#![no_std]
#![no_main]

mod connect4;
mod connect6;
mod dns;
mod dns_egress;
mod getsockopt;
mod maps;
mod sendmsg;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic; this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
