//! Fake servers that report what they saw from their own side. After an eBPF
//! connect rewrite a client reports the rewritten address as its peer, so tests
//! judge interception here: which peer address (and source port) the server saw,
//! compared with the client's own local address.
//!
//! The servers run on the current tokio runtime and stop when dropped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::task::JoinHandle;

use super::{Netns, in_netns};

/// How long a connection may take to send its line.
const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest line the echo server reads.
const MAX_LINE: u64 = 64 * 1024;

/// Accepted peers, in accept order, shared with the server task.
pub type Peers = Arc<Mutex<Vec<SocketAddr>>>;

fn snapshot(peers: &Peers) -> Vec<SocketAddr> {
    peers.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

fn record(peers: &Peers, peer: SocketAddr) {
    peers.lock().unwrap_or_else(PoisonError::into_inner).push(peer);
}

fn require_runtime() -> Result<()> {
    tokio::runtime::Handle::try_current().map(drop).context("fake servers need a tokio runtime (call from within one)")
}

/// A TCP server that reads one line per connection and answers
/// `peer=<ip>:<port> local=<ip>:<port> line=<line>\n`, then closes.
/// Every accepted peer is recorded.
#[derive(Debug)]
pub struct PeerEchoServer {
    local_addr: SocketAddr,
    peers: Peers,
    task: JoinHandle<()>,
}

impl PeerEchoServer {
    /// Serves on an already bound listener (bind it with [`in_netns`] to serve
    /// inside a namespace). Must be called within a tokio runtime.
    pub fn start(listener: std::net::TcpListener) -> Result<PeerEchoServer> {
        require_runtime()?;
        listener.set_nonblocking(true).context("set listener non-blocking")?;
        let local_addr = listener.local_addr().context("listener address")?;
        let listener = tokio::net::TcpListener::from_std(listener).context("register listener")?;
        let peers = Peers::default();
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&peers)));
        Ok(PeerEchoServer { local_addr, peers, task })
    }

    /// Binds `addr` inside `netns` and serves there. Must be called within a
    /// tokio runtime.
    pub fn bind_in(netns: &Netns, addr: SocketAddr) -> Result<PeerEchoServer> {
        let listener = in_netns(netns, || std::net::TcpListener::bind(addr))?
            .with_context(|| format!("bind {addr} in {}", netns.name()))?;
        PeerEchoServer::start(listener)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The peers accepted so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        snapshot(&self.peers)
    }

    /// The shared list the server appends accepted peers to.
    pub fn peers_handle(&self) -> Peers {
        Arc::clone(&self.peers)
    }
}

impl Drop for PeerEchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, peers: Peers) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                record(&peers, peer);
                tokio::spawn(answer(stream, peer));
            }
            // Transient (e.g. out of descriptors): back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn answer(stream: tokio::net::TcpStream, peer: SocketAddr) {
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(MAX_LINE);
    let mut line = String::new();
    let read = reader.read_line(&mut line);
    if !matches!(tokio::time::timeout(LINE_TIMEOUT, read).await, Ok(Ok(_))) {
        return;
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let reply = format!("peer={peer} local={local} line={line}\n");
    let mut stream = reader.into_inner().into_inner();
    if stream.write_all(reply.as_bytes()).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// A parsed [`PeerEchoServer`] answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoReply {
    /// The client address as the server saw it.
    pub peer: SocketAddr,
    /// The server's own address on that connection.
    pub local: SocketAddr,
    /// The line the client sent, without its line ending.
    pub line: String,
}

impl EchoReply {
    /// Parses `peer=<addr> local=<addr> line=<line>` (trailing newline optional).
    pub fn parse(text: &str) -> Result<EchoReply> {
        let text = text.trim_end_matches(['\r', '\n']);
        let parsed = text.strip_prefix("peer=").and_then(|rest| {
            let (peer, rest) = rest.split_once(" local=")?;
            let (local, line) = rest.split_once(" line=")?;
            Some((peer.parse().ok()?, local.parse().ok()?, line))
        });
        let Some((peer, local, line)) = parsed else {
            bail!("not an echo reply: {text:?}");
        };
        Ok(EchoReply { peer, local, line: line.to_owned() })
    }
}

/// Blocking client for [`PeerEchoServer`]: connects from the calling thread's
/// namespace (wrap it in [`in_netns`] to connect from elsewhere), sends `line`,
/// and returns its own local address with the parsed reply.
pub fn echo_client(addr: SocketAddr, line: &str, timeout: Duration) -> Result<(SocketAddr, EchoReply)> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(timeout)).context("set read timeout")?;
    stream.set_write_timeout(Some(timeout)).context("set write timeout")?;
    let local = stream.local_addr().context("client address")?;
    stream.write_all(format!("{line}\n").as_bytes()).context("send line")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).context("read reply")?;
    Ok((local, EchoReply::parse(&reply)?))
}

/// A UDP server that sends every datagram back to its sender unchanged and
/// records the senders.
#[derive(Debug)]
pub struct UdpEcho {
    local_addr: SocketAddr,
    peers: Peers,
    task: JoinHandle<()>,
}

impl UdpEcho {
    /// Serves on an already bound socket. Must be called within a tokio runtime.
    pub fn start(socket: std::net::UdpSocket) -> Result<UdpEcho> {
        require_runtime()?;
        socket.set_nonblocking(true).context("set socket non-blocking")?;
        let local_addr = socket.local_addr().context("socket address")?;
        let socket = tokio::net::UdpSocket::from_std(socket).context("register socket")?;
        let peers = Peers::default();
        let task = tokio::spawn(echo_datagrams(socket, Arc::clone(&peers)));
        Ok(UdpEcho { local_addr, peers, task })
    }

    /// Binds `addr` inside `netns` and serves there. Must be called within a
    /// tokio runtime.
    pub fn bind_in(netns: &Netns, addr: SocketAddr) -> Result<UdpEcho> {
        let socket = in_netns(netns, || std::net::UdpSocket::bind(addr))?
            .with_context(|| format!("bind udp {addr} in {}", netns.name()))?;
        UdpEcho::start(socket)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Senders of the datagrams received so far, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        snapshot(&self.peers)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_datagrams(socket: tokio::net::UdpSocket, peers: Peers) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match socket.recv_from(&mut buf).await {
            Ok((n, peer)) => {
                record(&peers, peer);
                let _ = socket.send_to(&buf[..n], peer).await;
            }
            // ICMP errors from earlier replies surface here; keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::require_privileges;
    use super::*;

    #[test]
    fn parses_replies() {
        let reply = EchoReply::parse("peer=10.0.0.2:40000 local=198.18.0.10:443 line=a b=c\n").expect("parse");
        assert_eq!(reply.peer, "10.0.0.2:40000".parse().expect("addr"));
        assert_eq!(reply.local, "198.18.0.10:443".parse().expect("addr"));
        assert_eq!(reply.line, "a b=c");
        let v6 = EchoReply::parse("peer=[::1]:5 local=[::1]:6 line=").expect("parse v6");
        assert_eq!(v6.line, "");
        assert!(EchoReply::parse("garbage").is_err());
    }

    #[test]
    fn start_outside_a_runtime_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert!(PeerEchoServer::start(listener).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn peer_echo_on_loopback() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = PeerEchoServer::start(listener).expect("start");
        let addr = server.local_addr();
        let (local, reply) = tokio::task::spawn_blocking(move || echo_client(addr, "hello", Duration::from_secs(5)))
            .await
            .expect("join")
            .expect("echo");
        assert_eq!(reply, EchoReply { peer: local, local: addr, line: "hello".into() });
        assert_eq!(server.peers(), vec![local]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn servers_inside_a_namespace() {
        if !require_privileges("servers_inside_a_namespace") {
            return;
        }
        let ns = Netns::new("fake").expect("create netns");
        ns.add_addr("lo", "198.18.0.10/32").expect("add addr");
        let tcp = PeerEchoServer::bind_in(&ns, "198.18.0.10:443".parse().expect("addr")).expect("tcp");
        let udp = UdpEcho::bind_in(&ns, "198.18.0.10:5353".parse().expect("addr")).expect("udp");

        let (tcp_addr, udp_addr) = (tcp.local_addr(), udp.local_addr());
        let ns_ref = &ns;
        let (tcp_result, udp_result) = tokio::task::block_in_place(|| {
            let tcp_result = in_netns(ns_ref, || echo_client(tcp_addr, "ping", Duration::from_secs(5)));
            let udp_result = in_netns(ns_ref, || -> Result<(SocketAddr, Vec<u8>)> {
                let socket = std::net::UdpSocket::bind("198.18.0.10:0")?;
                socket.set_read_timeout(Some(Duration::from_secs(5)))?;
                socket.send_to(b"dgram", udp_addr)?;
                let mut buf = [0u8; 64];
                let (n, _) = socket.recv_from(&mut buf)?;
                Ok((socket.local_addr()?, buf[..n].to_vec()))
            });
            (tcp_result, udp_result)
        });
        let (client, reply) = tcp_result.expect("enter netns").expect("tcp echo");
        assert_eq!(reply.peer, client);
        assert_eq!(reply.local, tcp_addr);
        assert_eq!(tcp.peers(), vec![client]);
        let (udp_client, echoed) = udp_result.expect("enter netns").expect("udp echo");
        assert_eq!(echoed, b"dgram");
        assert_eq!(udp.peers(), vec![udp_client]);
    }
}
