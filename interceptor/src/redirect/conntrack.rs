//! The original destination of a NATed UDP datagram, from conntrack.
//!
//! `SO_ORIGINAL_DST` answers for TCP only, and `IP_RECVORIGDSTADDR` reports
//! the address after NAT (it is meant for TPROXY), so for a DNS datagram that
//! an iptables `REDIRECT`/`DNAT` sent to the forwarder, the server it was
//! sent to is only known to conntrack: this module asks it over ctnetlink
//! (`IPCTNL_MSG_CT_GET` by the reply tuple, which is what the forwarder sees:
//! from its own address to the client). Needs CAP_NET_ADMIN in the
//! forwarder's network namespace, which iptables mode keeps.
//!
//! The messages are built and read by hand (a few fixed attributes, see
//! `linux/netfilter/nfnetlink_conntrack.h`); [`encode_get`] and
//! [`decode_orig_dst`] are pure and tested here.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, setsockopt, socket, sockopt,
};

/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET`.
const MSG_CT_GET: u16 = (1 << 8) | 1;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW`: how an entry comes back.
const MSG_CT_NEW: u16 = 1 << 8;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_UDP: u8 = 17;

/// The kernel answers a GET while handling the request; this only bounds a
/// kernel that does not.
const REPLY_TIMEOUT: Duration = Duration::from_millis(200);

/// Where the UDP datagram from `client` to `local` (the forwarder's
/// address) was going before NAT; `None` when conntrack has no such entry
/// or cannot be asked. An entry that was not NATed names `local` itself.
pub fn udp_original_dst(local: SocketAddr, client: SocketAddr) -> Option<SocketAddr> {
    match query(local, client) {
        Ok(found) => found,
        Err(error) => {
            tracing::debug!(%client, %error, "cannot ask conntrack for a dns datagram's destination");
            None
        }
    }
}

fn query(local: SocketAddr, client: SocketAddr) -> io::Result<Option<SocketAddr>> {
    let request = encode_get(local, client, 1).ok_or_else(|| io::Error::other("mixed address families"))?;
    let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkNetFilter)?;
    let timeout = nix::sys::time::TimeVal::new(0, REPLY_TIMEOUT.as_micros() as libc::suseconds_t);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout)?;
    sendto(std::os::fd::AsRawFd::as_raw_fd(&fd), &request, &NetlinkAddr::new(0, 0), MsgFlags::empty())?;
    let mut buf = vec![0u8; 8192];
    let len = recv(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut buf, MsgFlags::empty())?;
    Ok(decode_orig_dst(buf.get(..len).unwrap_or_default()))
}

fn push_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A `CT_GET` request for the entry whose reply tuple is UDP from `local`
/// to `client`. `None` when the two are of different families.
pub fn encode_get(local: SocketAddr, client: SocketAddr, seq: u32) -> Option<Vec<u8>> {
    let local = crate::net::canonical(local);
    let client = crate::net::canonical(client);
    let mut ip = Vec::new();
    let family = match (local.ip(), client.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            push_attr(&mut ip, CTA_IP_V4_SRC, &src.octets());
            push_attr(&mut ip, CTA_IP_V4_DST, &dst.octets());
            libc::AF_INET as u8
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            push_attr(&mut ip, CTA_IP_V6_SRC, &src.octets());
            push_attr(&mut ip, CTA_IP_V6_DST, &dst.octets());
            libc::AF_INET6 as u8
        }
        _ => return None,
    };
    let mut proto = Vec::new();
    push_attr(&mut proto, CTA_PROTO_NUM, &[IPPROTO_UDP]);
    push_attr(&mut proto, CTA_PROTO_SRC_PORT, &local.port().to_be_bytes());
    push_attr(&mut proto, CTA_PROTO_DST_PORT, &client.port().to_be_bytes());
    let mut tuple = Vec::new();
    push_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
    let mut body = vec![family, 0, 0, 0]; // nfgenmsg: family, NFNETLINK_V0, res_id 0
    push_attr(&mut body, CTA_TUPLE_REPLY | NLA_F_NESTED, &tuple);

    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    msg.extend_from_slice(&((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&MSG_CT_GET.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    Some(msg)
}

/// The attributes in `bytes`, as (type without flags, payload).
fn attrs(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]));
        let kind = u16::from_ne_bytes([*bytes.get(2)?, *bytes.get(3)?]) & NLA_TYPE_MASK;
        let payload = bytes.get(4..len)?;
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, payload))
    })
}

fn find(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(bytes).find(|(k, _)| *k == kind).map(|(_, payload)| payload)
}

/// The original tuple's destination in a `CT_NEW` reply; `None` for an
/// error reply (no such entry) or anything that does not parse.
pub fn decode_orig_dst(reply: &[u8]) -> Option<SocketAddr> {
    let kind = u16::from_ne_bytes([*reply.get(4)?, *reply.get(5)?]);
    if kind == NLMSG_ERROR || kind != MSG_CT_NEW {
        return None;
    }
    let len = usize::try_from(u32::from_ne_bytes(reply.get(..4)?.try_into().ok()?)).ok()?;
    let body = reply.get(NLMSG_HDRLEN + NFGENMSG_LEN..len.min(reply.len()))?;
    let orig = find(body, CTA_TUPLE_ORIG)?;
    let ip = find(orig, CTA_TUPLE_IP)?;
    let addr = if let Some(v4) = find(ip, CTA_IP_V4_DST) {
        IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v4).ok()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(find(ip, CTA_IP_V6_DST)?).ok()?))
    };
    let port = find(find(orig, CTA_TUPLE_PROTO)?, CTA_PROTO_DST_PORT)?;
    Some(SocketAddr::new(addr, u16::from_be_bytes(port.try_into().ok()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// What the kernel sends back for an entry: the request's layout with
    /// an original tuple added (and the reply tuple, and a status we skip).
    fn entry(orig_src: SocketAddr, orig_dst: SocketAddr, reply: &[u8]) -> Vec<u8> {
        let mut ip = Vec::new();
        match (orig_src.ip(), orig_dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                push_attr(&mut ip, CTA_IP_V4_SRC, &s.octets());
                push_attr(&mut ip, CTA_IP_V4_DST, &d.octets());
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                push_attr(&mut ip, CTA_IP_V6_SRC, &s.octets());
                push_attr(&mut ip, CTA_IP_V6_DST, &d.octets());
            }
            _ => unreachable!(),
        }
        let mut proto = Vec::new();
        push_attr(&mut proto, CTA_PROTO_NUM, &[IPPROTO_UDP]);
        push_attr(&mut proto, CTA_PROTO_SRC_PORT, &orig_src.port().to_be_bytes());
        push_attr(&mut proto, CTA_PROTO_DST_PORT, &orig_dst.port().to_be_bytes());
        let mut tuple = Vec::new();
        push_attr(&mut tuple, CTA_TUPLE_IP | NLA_F_NESTED, &ip);
        push_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &proto);
        let mut body = reply[NLMSG_HDRLEN..NLMSG_HDRLEN + NFGENMSG_LEN].to_vec();
        push_attr(&mut body, CTA_TUPLE_ORIG | NLA_F_NESTED, &tuple);
        // The request's reply tuple, as the kernel also sends it.
        body.extend_from_slice(&reply[NLMSG_HDRLEN + NFGENMSG_LEN..]);
        push_attr(&mut body, 3, &0x188u32.to_be_bytes()); // CTA_STATUS
        let mut msg = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        msg.extend_from_slice(&MSG_CT_NEW.to_ne_bytes());
        msg.extend_from_slice(&[0; 10]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn a_get_request_names_the_reply_tuple() {
        let msg = encode_get(sa("127.0.0.1:15053"), sa("198.18.0.54:40000"), 7).unwrap();
        assert_eq!(msg.len() % 4, 0);
        assert_eq!(u32::from_ne_bytes(msg[..4].try_into().unwrap()) as usize, msg.len());
        assert_eq!(u16::from_ne_bytes([msg[4], msg[5]]), 0x0101);
        assert_eq!(msg[16], libc::AF_INET as u8);
        let reply = find(&msg[20..], CTA_TUPLE_REPLY).unwrap();
        let ip = find(reply, CTA_TUPLE_IP).unwrap();
        assert_eq!(find(ip, CTA_IP_V4_SRC).unwrap(), &[127, 0, 0, 1]);
        assert_eq!(find(ip, CTA_IP_V4_DST).unwrap(), &[198, 18, 0, 54]);
        let proto = find(reply, CTA_TUPLE_PROTO).unwrap();
        assert_eq!(find(proto, CTA_PROTO_NUM).unwrap(), &[17]);
        assert_eq!(find(proto, CTA_PROTO_SRC_PORT).unwrap(), &15053u16.to_be_bytes());
        assert_eq!(find(proto, CTA_PROTO_DST_PORT).unwrap(), &40000u16.to_be_bytes());
        // v4-mapped addresses are IPv4; mixed families are refused.
        assert_eq!(encode_get(sa("[::ffff:127.0.0.1]:15053"), sa("198.18.0.54:40000"), 7), Some(msg));
        assert!(encode_get(sa("127.0.0.1:15053"), sa("[2001:db8::1]:40000"), 7).is_none());
        let v6 = encode_get(sa("[::1]:15053"), sa("[2001:db8::1]:40000"), 7).unwrap();
        assert_eq!(v6[16], libc::AF_INET6 as u8);
    }

    #[test]
    fn an_entry_gives_the_original_destination() {
        let request = encode_get(sa("127.0.0.1:15053"), sa("198.18.0.54:40000"), 7).unwrap();
        let reply = entry(sa("198.18.0.54:40000"), sa("127.0.0.53:53"), &request);
        assert_eq!(decode_orig_dst(&reply), Some(sa("127.0.0.53:53")));
        let request = encode_get(sa("[::1]:15053"), sa("[2001:db8::1]:40000"), 7).unwrap();
        let reply = entry(sa("[2001:db8::1]:40000"), sa("[2001:db8::53]:53"), &request);
        assert_eq!(decode_orig_dst(&reply), Some(sa("[2001:db8::53]:53")));
    }

    #[test]
    fn errors_and_garbage_give_nothing() {
        let mut error = vec![0u8; 36];
        error[..4].copy_from_slice(&36u32.to_ne_bytes());
        error[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error[16..20].copy_from_slice(&(-libc::ENOENT).to_ne_bytes());
        assert_eq!(decode_orig_dst(&error), None);
        assert_eq!(decode_orig_dst(&[]), None);
        assert_eq!(decode_orig_dst(&[0xff; 40]), None);
        let request = encode_get(sa("127.0.0.1:15053"), sa("198.18.0.54:40000"), 7).unwrap();
        let reply = entry(sa("198.18.0.54:40000"), sa("127.0.0.53:53"), &request);
        for cut in 0..reply.len() {
            // Never panics on a short read; a cut before the port gives nothing.
            let _ = decode_orig_dst(&reply[..cut]);
        }
    }
}
