//! The data plane: accept redirected connections, find where they were going
//! and who opened them, and relay them to the original destination from a
//! marked socket (which the redirect never sends back to us).
//!
//! Every connection is recorded exactly once, when it ends, by a drop guard.
//! This module knows nothing of eBPF or iptables: it only sees an
//! [`OrigDstResolver`].

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::{mpsc, watch},
};

use crate::{
    net::{self, ClientAddr, OrigDstAddr},
    redirect::{OrigDstResolver, ProxyAddrs, Workload},
    telemetry,
};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {dst}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {dst} timed out after {timeout:?}")]
    ConnectTimeout { dst: SocketAddr, timeout: Duration },
    #[error("cannot mark the upstream socket (needs CAP_NET_ADMIN)")]
    Mark(#[source] std::io::Error),
}

/// The bound listeners, before serving.
pub struct Listeners {
    v4: TcpListener,
    v6: Option<TcpListener>,
    pub addrs: ProxyAddrs,
}

impl Listeners {
    /// Binds the IPv4 address and, if given, the IPv6 address on the same
    /// port. Port 0 picks a free port (the IPv6 listener then reuses it).
    pub async fn bind(
        v4: Ipv4Addr,
        v6: Option<Ipv6Addr>,
        port: u16,
        mark: u32,
    ) -> Result<Self, ProxyError> {
        let addr = SocketAddr::from((v4, port));
        let l4 = TcpListener::bind(addr)
            .await
            .map_err(|source| ProxyError::Bind { addr, source })?;
        let port = l4
            .local_addr()
            .map_err(|source| ProxyError::Bind { addr, source })?
            .port();
        let l6 = match v6 {
            Some(ip) => {
                let addr = SocketAddr::from((ip, port));
                Some(bind_v6_only(addr).map_err(|source| ProxyError::Bind { addr, source })?)
            }
            None => None,
        };
        let addrs = ProxyAddrs {
            v4: SocketAddrV4::new(v4, port),
            v6: v6.map(|ip| SocketAddrV6::new(ip, port, 0, 0)),
            mark,
        };
        Ok(Self {
            v4: l4,
            v6: l6,
            addrs,
        })
    }
}

fn bind_v6_only(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = TcpSocket::new_v6()?;
    nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(1024)
}

/// Settings of the relay.
#[derive(Clone)]
pub struct ProxySettings {
    pub connect_timeout: Duration,
}

struct Shared {
    resolver: Arc<dyn OrigDstResolver>,
    addrs: ProxyAddrs,
    settings: ProxySettings,
    /// Each connection holds a clone; draining waits for all to drop.
    in_flight: mpsc::Sender<()>,
}

/// A running proxy. `drain` waits for in-flight connections.
pub struct Proxy {
    in_flight: mpsc::Receiver<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    /// Starts accepting on every listener until `shutdown` turns true.
    pub fn serve(
        listeners: Listeners,
        resolver: Arc<dyn OrigDstResolver>,
        settings: ProxySettings,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            resolver,
            addrs: listeners.addrs,
            settings,
            in_flight: tx,
        });
        let mut tasks = vec![tokio::spawn(accept_loop(
            listeners.v4,
            Arc::clone(&shared),
            shutdown.clone(),
        ))];
        if let Some(v6) = listeners.v6 {
            tasks.push(tokio::spawn(accept_loop(v6, Arc::clone(&shared), shutdown)));
        }
        Self {
            in_flight: rx,
            tasks,
        }
    }

    /// Waits until every accepted connection has finished, at most `deadline`.
    /// Returns whether all finished in time.
    pub async fn drain(mut self, deadline: Duration) -> bool {
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        // The accept loops are gone, so only connections hold senders now.
        tokio::time::timeout(deadline, self.in_flight.recv())
            .await
            .is_ok()
    }
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let shared = Arc::clone(&shared);
                    tokio::spawn(async move {
                        let guard = shared.in_flight.clone();
                        handle(stream, ClientAddr(net::canonical(peer)), &shared).await;
                        drop(guard);
                    });
                }
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// What happened to one connection; logged once when dropped.
struct ConnectionRecord {
    client: ClientAddr,
    orig_dst: Option<OrigDstAddr>,
    workload: Option<Workload>,
    outcome: &'static str,
    error: Option<String>,
    bytes_up: u64,
    bytes_down: u64,
    started: Instant,
}

impl ConnectionRecord {
    fn fail(&mut self, outcome: &'static str, error: &dyn std::error::Error) {
        self.outcome = outcome;
        self.error = Some(telemetry::chain(error));
    }
}

impl Drop for ConnectionRecord {
    fn drop(&mut self) {
        let w = self.workload.as_ref();
        tracing::info!(
            event = "connection",
            outcome = self.outcome,
            client = %self.client,
            orig_dst = self.orig_dst.map(|d| d.to_string()),
            pid = w.map(|w| w.pid),
            tid = w.map(|w| w.tid),
            uid = w.map(|w| w.uid),
            comm = w.map(|w| w.comm.as_str()),
            cgroup_id = w.map(|w| w.cgroup_id),
            bytes_up = self.bytes_up,
            bytes_down = self.bytes_down,
            duration_ms = self.started.elapsed().as_millis() as u64,
            error = self.error.as_deref(),
            "connection closed"
        );
    }
}

async fn handle(mut client_stream: TcpStream, client: ClientAddr, shared: &Shared) {
    let mut record = ConnectionRecord {
        client,
        orig_dst: None,
        workload: None,
        outcome: "relayed",
        error: None,
        bytes_up: 0,
        bytes_down: 0,
        started: Instant::now(),
    };
    let orig = match shared.resolver.original_dst(&client_stream, client) {
        Ok(orig) => OrigDstAddr(net::canonical(orig.0)),
        Err(error) => {
            // Not redirected to us (or the record was lost): refuse. The
            // proxy is never an open relay.
            record.fail("no_original_dst", &error);
            return;
        }
    };
    record.orig_dst = Some(orig);
    record.workload = shared.resolver.workload(client);
    if shared.addrs.is_proxy(orig.0) {
        record.outcome = "refused_loop";
        return;
    }
    let _ = client_stream.set_nodelay(true);
    let mut upstream =
        match connect_upstream(orig.0, shared.addrs.mark, shared.settings.connect_timeout).await {
            Ok(s) => s,
            Err(error) => {
                record.fail("upstream_connect_failed", &error);
                return;
            }
        };
    match tokio::io::copy_bidirectional(&mut client_stream, &mut upstream).await {
        Ok((up, down)) => {
            record.bytes_up = up;
            record.bytes_down = down;
        }
        Err(error) => record.fail("relay_error", &error),
    }
}

/// Connects to the original destination from a socket carrying `mark`.
pub async fn connect_upstream(
    dst: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> Result<TcpStream, ProxyError> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|source| ProxyError::Connect { dst, source })?;
    if mark != 0 {
        net::set_mark(&sock, mark).map_err(ProxyError::Mark)?;
    }
    let stream = tokio::time::timeout(timeout, sock.connect(dst))
        .await
        .map_err(|_| ProxyError::ConnectTimeout { dst, timeout })?
        .map_err(|source| ProxyError::Connect { dst, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::redirect::MockOrigDst;

    async fn start(default: Option<SocketAddr>) -> (Proxy, ProxyAddrs, watch::Sender<bool>) {
        let listeners = Listeners::bind(Ipv4Addr::LOCALHOST, None, 0, 0)
            .await
            .unwrap();
        let addrs = listeners.addrs;
        let resolver = Arc::new(MockOrigDst {
            dst: std::sync::Mutex::new(HashMap::new()),
            default,
        });
        let (tx, rx) = watch::channel(false);
        let settings = ProxySettings {
            connect_timeout: Duration::from_secs(2),
        };
        (Proxy::serve(listeners, resolver, settings, rx), addrs, tx)
    }

    #[tokio::test]
    async fn relays_bytes_both_ways_to_the_original_destination() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = upstream.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&[&buf[..], b"-back"].concat()).await.unwrap();
        });
        let (proxy, addrs, stop) = start(Some(up_addr)).await;
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello-back");
        drop(c);
        stop.send(true).unwrap();
        assert!(proxy.drain(Duration::from_secs(2)).await);
    }

    #[tokio::test]
    async fn connection_without_original_destination_is_closed() {
        let (_proxy, addrs, _stop) = start(None).await;
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn connection_aimed_at_the_proxy_itself_is_refused() {
        let listeners = Listeners::bind(Ipv4Addr::LOCALHOST, None, 0, 0)
            .await
            .unwrap();
        let addrs = listeners.addrs;
        let resolver = Arc::new(MockOrigDst {
            dst: std::sync::Mutex::new(HashMap::new()),
            default: Some(SocketAddr::V4(addrs.v4)),
        });
        let (_tx, rx) = watch::channel(false);
        let _proxy = Proxy::serve(
            listeners,
            resolver,
            ProxySettings {
                connect_timeout: Duration::from_secs(1),
            },
            rx,
        );
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        let mut got = Vec::new();
        // Closed at once rather than looping into itself.
        tokio::time::timeout(Duration::from_secs(2), c.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn unreachable_upstream_closes_the_client() {
        // A port nobody listens on.
        let dead = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let (_proxy, addrs, _stop) = start(Some(dead)).await;
        let mut c = TcpStream::connect(SocketAddr::V4(addrs.v4)).await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(3), c.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert!(got.is_empty());
    }
}
