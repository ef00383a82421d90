//! Address newtypes and the socket options the proxy needs.
//!
//! `ClientAddr` (the peer of an accepted connection) and `OrigDstAddr` (where
//! that connection was going before it was redirected) are distinct types so
//! they cannot be mixed up. [`ProxyAddrs`] is where the proxy listens, and
//! [`OrigDstResolver`] the data plane's port to the redirect (see
//! [`orig_dst`]).
//!
//! This module is below the data and the control plane alike: it imports
//! nothing above `workload`.

pub mod orig_dst;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsFd,
};

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use serde::Serialize;

#[cfg(any(test, feature = "testing"))]
pub use self::orig_dst::MockOrigDst;
pub use self::orig_dst::{NoOriginalDst, OrigDstResolver, WorkloadLookup};

/// The peer address of an accepted, redirected connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// The destination a redirected connection was originally aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// As its text (`10.0.0.2:41000`, `[::1]:443`), written where it goes.
impl Serialize for ClientAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_addr(self.0, s)
    }
}

/// As its text, written where it goes.
impl Serialize for OrigDstAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serialize_addr(self.0, s)
    }
}

/// `addr` as its `Display` text. Every audit event writes two: an IPv4
/// address is put together from its numbers (`itoa`), at a tenth of the
/// formatting machinery's cost; IPv6 goes through `Display`.
fn serialize_addr<S: serde::Serializer>(addr: SocketAddr, s: S) -> Result<S::Ok, S::Error> {
    let SocketAddr::V4(v4) = addr else { return s.collect_str(&addr) };
    // The longest: `255.255.255.255:65535`.
    let mut text = [0u8; 21];
    match ipv4_text(v4, &mut text).ok().and_then(|len| std::str::from_utf8(text.get(..len)?).ok()) {
        Some(text) => s.serialize_str(text),
        // Cannot happen: the longest address fits.
        None => s.collect_str(&addr),
    }
}

/// Writes `addr` as `Display` does into `out`; returns its length.
fn ipv4_text(addr: SocketAddrV4, out: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Write as _;
    let total = out.len();
    let mut rest = out;
    let mut number = itoa::Buffer::new();
    for (i, octet) in addr.ip().octets().into_iter().enumerate() {
        if i > 0 {
            rest.write_all(b".")?;
        }
        rest.write_all(number.format(octet).as_bytes())?;
    }
    rest.write_all(b":")?;
    rest.write_all(number.format(addr.port()).as_bytes())?;
    Ok(total - rest.len())
}

/// Where the proxy listens: the addresses connections are rewritten to.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ProxyAddrs {
    pub v4: std::net::SocketAddrV4,
    pub v6: Option<std::net::SocketAddrV6>,
    pub mark: u32,
}

impl ProxyAddrs {
    /// Whether `addr` is one of the proxy's own listening addresses.
    pub fn is_proxy(&self, addr: SocketAddr) -> bool {
        match canonical(addr) {
            SocketAddr::V4(a) => a == self.v4,
            SocketAddr::V6(a) => self.v6.is_some_and(|v6| v6.ip() == a.ip() && v6.port() == a.port()),
        }
    }
}

/// Turns `::ffff:a.b.c.d` into `a.b.c.d`; other addresses are unchanged.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Reads `SO_ORIGINAL_DST` (IPv4) or `IP6T_SO_ORIGINAL_DST` (IPv6) from an
/// accepted socket. Conntrack answers it after an iptables REDIRECT; our
/// cgroup/getsockopt program answers it after an eBPF redirect.
pub fn original_dst<F: AsFd>(sock: &F, local: SocketAddr) -> std::io::Result<SocketAddr> {
    match local {
        SocketAddr::V4(_) => {
            let sin = getsockopt(sock, sockopt::OriginalDst)?;
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        SocketAddr::V6(_) => {
            let sin6 = getsockopt(sock, sockopt::Ip6tOriginalDst)?;
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(canonical(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sin6.sin6_port), 0, 0))))
        }
    }
}

/// Sets `SO_MARK`, which needs CAP_NET_ADMIN.
pub fn set_mark<F: AsFd>(sock: &F, mark: u32) -> std::io::Result<()> {
    setsockopt(sock, sockopt::Mark, &mark)?;
    Ok(())
}

/// Binds a TCP listener that another interceptor process of the same user
/// may bind too (`SO_REUSEPORT`): a new instance takes over the port before
/// the old one stops, so no connection is refused during an upgrade.
pub fn shared_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => {
            let sock = tokio::net::TcpSocket::new_v6()?;
            setsockopt(&sock, sockopt::Ipv6V6Only, &true)?;
            sock
        }
    };
    sock.set_reuseaddr(true)?;
    sock.set_reuseport(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// The UDP counterpart of [`shared_listener`].
pub fn shared_udp(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, socket};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrStorage::from(addr))?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both peers are written as `Display` writes them.
    fn assert_written_as_displayed(addr: SocketAddr) {
        let text = serde_json::Value::String(addr.to_string());
        assert_eq!(serde_json::to_value(ClientAddr(addr)).unwrap(), text);
        assert_eq!(serde_json::to_value(OrigDstAddr(addr)).unwrap(), text);
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for addr in ["0.0.0.0:0", "255.255.255.255:65535", "10.0.0.2:41000", "[::1]:443", "[fe80::1%7]:8443"] {
            assert_written_as_displayed(addr.parse().unwrap());
        }
    }

    proptest::proptest! {
        #[test]
        fn any_ipv4_peer_is_written_as_display_writes_it(ip: u32, port: u16) {
            assert_written_as_displayed(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)));
        }
    }

    #[test]
    fn canonical_unmaps_v4_mapped_addresses() {
        let mapped: SocketAddr = "[::ffff:198.18.0.10]:443".parse().unwrap();
        assert_eq!(canonical(mapped), "198.18.0.10:443".parse::<SocketAddr>().unwrap());
        let native: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(canonical(native), native);
    }

    #[test]
    fn original_dst_fails_on_a_socket_that_was_not_redirected() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let local = server.local_addr().unwrap();
        assert!(original_dst(&server, local).is_err());
        drop(client);
    }

    #[test]
    fn proxy_address_check_handles_v4_mapped_form() {
        let p = ProxyAddrs { v4: "127.0.0.1:15443".parse().unwrap(), v6: None, mark: 1 };
        assert!(p.is_proxy("[::ffff:127.0.0.1]:15443".parse().unwrap()));
        assert!(p.is_proxy("127.0.0.1:15443".parse().unwrap()));
        assert!(!p.is_proxy("127.0.0.1:443".parse().unwrap()));
        assert!(!p.is_proxy("[::1]:15443".parse().unwrap()));
    }
}
