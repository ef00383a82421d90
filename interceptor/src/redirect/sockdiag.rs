//! Finding the client's own socket of a redirected connection with
//! `sock_diag` (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY`): the kernel's
//! answer names the socket's owner uid, its inode (which leads to the
//! process, see [`super::owner`]) and, from Linux 5.7, the cgroup that
//! created it (`INET_DIAG_CGROUP_ID`, sent with every reply when the kernel
//! has socket cgroup data).
//!
//! After an iptables `REDIRECT`/`DNAT` the client's socket still has the
//! original destination as its peer: the query is for the exact tuple
//! client address → original destination, which only that socket has.
//!
//! The query runs in the proxy's network namespace: a client in another
//! namespace (a pod whose traffic reaches the proxy through routing) is not
//! found, and its connection is simply not attributed. This module does no
//! process lookup and keeps no state; one netlink socket per query.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsFd as _,
    time::Duration,
};

use netlink_packet_core::{
    DecodeError, ErrorBuffer, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer, NetlinkHeader, NetlinkMessage,
    NlasIterator, Parseable as _,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, SOCK_DIAG_BY_FAMILY, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};

/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h, Linux 5.7): the
/// crate predates it, so it arrives as an unknown attribute.
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Size of `struct inet_diag_msg`, after which the attributes start.
const INET_DIAG_MSG_LEN: usize = 72;
/// How long the kernel may take to answer.
const TIMEOUT: Duration = Duration::from_millis(200);
/// A reply to an exact-tuple query is one message (and a few attributes).
const RECV_BUFFER: usize = 8192;

#[derive(Debug, thiserror::Error)]
pub enum SockDiagError {
    #[error("cannot open a sock_diag netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("sock_diag request failed")]
    Io(#[source] std::io::Error),
    #[error("sock_diag answered with error {0}")]
    Kernel(i32),
    #[error("unreadable sock_diag reply: {0}")]
    Decode(String),
    #[error("client {client} and destination {dst} are not of one address family")]
    Family { client: SocketAddr, dst: SocketAddr },
}

impl From<DecodeError> for SockDiagError {
    fn from(e: DecodeError) -> Self {
        Self::Decode(e.to_string())
    }
}

/// What the kernel says about one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub inode: u32,
    /// The creating process's cgroup (v2 id: the directory's inode), when
    /// the kernel reports it.
    pub cgroup_id: Option<u64>,
}

/// The TCP socket whose local address is `local` and whose peer is
/// `remote`, in this network namespace. `Ok(None)`: no such socket (closed
/// meanwhile, or in another namespace).
pub fn find(local: SocketAddr, remote: SocketAddr) -> Result<Option<SocketOwner>, SockDiagError> {
    let request = request(local, remote)?;
    let socket = Socket::new(NETLINK_SOCK_DIAG).map_err(SockDiagError::Socket)?;
    nix::sys::socket::setsockopt(
        &socket.as_fd(),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, TIMEOUT.as_micros() as nix::libc::suseconds_t),
    )
    .map_err(|e| SockDiagError::Socket(e.into()))?;
    socket.send(&request, 0).map_err(SockDiagError::Io)?;
    let mut buf = vec![0u8; RECV_BUFFER];
    let n = socket.recv(&mut &mut buf[..], 0).map_err(SockDiagError::Io)?;
    parse_reply(buf.get(..n).unwrap_or_default())
}

/// The serialized exact-tuple query (no `NLM_F_DUMP`: the kernel looks the
/// socket up as an incoming packet would, and checks no cookie when it is
/// all ones).
fn request(local: SocketAddr, remote: SocketAddr) -> Result<Vec<u8>, SockDiagError> {
    let family = match (local.ip(), remote.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return Err(SockDiagError::Family { client: local, dst: remote }),
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0u8; packet.buffer_len()];
    packet.serialize(&mut buf);
    Ok(buf)
}

/// Reads the kernel's reply: one `SOCK_DIAG_BY_FAMILY` message, or an
/// error (`ENOENT` when no socket has the tuple).
pub fn parse_reply(mut bytes: &[u8]) -> Result<Option<SocketOwner>, SockDiagError> {
    while !bytes.is_empty() {
        let message = NetlinkBuffer::new_checked(bytes)?;
        let len = (message.length() as usize).max(1);
        match message.message_type() {
            NLMSG_ERROR => {
                let code = ErrorBuffer::new_checked(message.payload())?.code().map_or(0, |c| c.get());
                return match -code {
                    0 => Ok(None),
                    libc::ENOENT => Ok(None),
                    errno => Err(SockDiagError::Kernel(errno)),
                };
            }
            NLMSG_DONE => return Ok(None),
            SOCK_DIAG_BY_FAMILY => return parse_response(message.payload()).map(Some),
            _ => {}
        }
        // Messages are 4-byte aligned.
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
    }
    Ok(None)
}

fn parse_response(payload: &[u8]) -> Result<SocketOwner, SockDiagError> {
    let header = InetResponseHeader::parse(payload)?;
    let mut cgroup_id = None;
    // Attributes are read one by one, so one the crate does not know (or
    // parses strictly) cannot spoil the rest.
    for nla in NlasIterator::new(payload.get(INET_DIAG_MSG_LEN..).unwrap_or_default()) {
        let nla = nla?;
        if nla.kind() == INET_DIAG_CGROUP_ID
            && let Ok(id) = <[u8; 8]>::try_from(nla.value())
        {
            cgroup_id = Some(u64::from_ne_bytes(id)).filter(|&id| id != 0);
        }
    }
    Ok(SocketOwner { uid: header.uid, inode: header.inode, cgroup_id })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn inode_of(fd: &impl std::os::fd::AsRawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap().ino()
    }

    #[test]
    fn finds_a_connected_socket_by_its_tuple() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let owner = find(client.local_addr().unwrap(), client.peer_addr().unwrap()).unwrap().expect("found");
        assert_eq!(u64::from(owner.inode), inode_of(&client));
        assert_eq!(owner.uid, nix::unistd::geteuid().as_raw());
        // The other end of the same connection is another socket.
        let other = find(server.local_addr().unwrap(), server.peer_addr().unwrap()).unwrap().expect("found");
        assert_eq!(u64::from(other.inode), inode_of(&server));
        // The kernel names the cgroup where it can (Linux 5.7 and later).
        if let (Some(id), Ok(root)) = (owner.cgroup_id, crate::cgroup::cgroup2_root()) {
            let own = crate::cgroup::own_cgroup(&root).unwrap();
            assert_eq!(id, std::fs::metadata(own).unwrap().ino());
        }
        // No socket has this tuple.
        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert_eq!(find(client.local_addr().unwrap(), unused).unwrap(), None);
    }

    #[test]
    fn finds_ipv6_sockets_and_refuses_mixed_families() {
        let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else { return };
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let owner = find(client.local_addr().unwrap(), client.peer_addr().unwrap()).unwrap().expect("found");
        assert_eq!(u64::from(owner.inode), inode_of(&client));
        let err = find("127.0.0.1:1".parse().unwrap(), "[::1]:2".parse().unwrap()).unwrap_err();
        assert!(matches!(err, SockDiagError::Family { .. }), "{err}");
    }

    /// A reply as the kernel sends it, built with the crate's own types.
    fn reply(uid: u32, inode: u32, cgroup: Option<u64>) -> Vec<u8> {
        let mut payload = vec![0u8; INET_DIAG_MSG_LEN];
        payload[0] = AF_INET;
        payload[1] = 1; // TCP_ESTABLISHED
        payload[64..68].copy_from_slice(&uid.to_ne_bytes());
        payload[68..72].copy_from_slice(&inode.to_ne_bytes());
        // An attribute this module ignores, then the cgroup id.
        payload.extend_from_slice(&5u16.to_ne_bytes());
        payload.extend_from_slice(&8u16.to_ne_bytes()); // INET_DIAG_SHUTDOWN
        payload.extend_from_slice(&[0, 0, 0, 0]);
        if let Some(id) = cgroup {
            payload.extend_from_slice(&12u16.to_ne_bytes());
            payload.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
            payload.extend_from_slice(&id.to_ne_bytes());
        }
        let mut msg = vec![0u8; 16];
        let mut nl = NetlinkBuffer::new(&mut msg[..]);
        nl.set_length((16 + payload.len()) as u32);
        nl.set_message_type(SOCK_DIAG_BY_FAMILY);
        msg.extend_from_slice(&payload);
        msg
    }

    #[test]
    fn reads_uid_inode_and_cgroup_from_a_reply() {
        let owner = parse_reply(&reply(1000, 4242, Some(77))).unwrap().unwrap();
        assert_eq!(owner, SocketOwner { uid: 1000, inode: 4242, cgroup_id: Some(77) });
        // An older kernel sends no cgroup id.
        let owner = parse_reply(&reply(0, 9, None)).unwrap().unwrap();
        assert_eq!(owner.cgroup_id, None);
        // ENOENT: no such socket.
        let mut err = vec![0u8; 16];
        let mut nl = NetlinkBuffer::new(&mut err[..]);
        nl.set_length(36);
        nl.set_message_type(NLMSG_ERROR);
        err.extend_from_slice(&(-libc::ENOENT).to_ne_bytes());
        err.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_reply(&err).unwrap(), None);
        // A truncated reply is an error, not a panic.
        let short = reply(1, 2, Some(3));
        for cut in 0..short.len() {
            let _ = parse_reply(&short[..cut]);
        }
    }
}
