//! Peeking at a connection's TLS ClientHello without consuming it, so the
//! same bytes can be handed to our TLS server (intercept) or relayed
//! unchanged (passthrough). Parsing is rustls's own ClientHello parser.

use std::time::Duration;

use tokio::net::TcpStream;

/// The parts of a ClientHello that decide what to do with a connection.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHelloInfo {
    pub sni: Option<String>,
    pub alpn: Vec<Vec<u8>>,
}

/// What the first bytes of a connection turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    Tls(ClientHelloInfo),
    /// Not a TLS handshake record: another protocol.
    NotTls,
    /// TLS handshake records that rustls cannot parse as a ClientHello.
    Invalid,
    /// A ClientHello still incomplete at [`MAX_HELLO`] bytes.
    TooLarge,
    /// The client closed (or the socket failed) before a whole ClientHello.
    Closed,
    /// The client sent no complete ClientHello in time.
    Timeout,
}

impl Peeked {
    /// Why a connection that is not a parsed ClientHello cannot be
    /// classified by name; `None` for a parsed one.
    pub fn unclassified_reason(&self) -> Option<&'static str> {
        match self {
            Self::Tls(_) => None,
            Self::NotTls => Some("not TLS"),
            Self::Invalid => Some("ClientHello cannot be parsed"),
            Self::TooLarge => Some("ClientHello too large"),
            Self::Closed => Some("closed before a ClientHello"),
            Self::Timeout => Some("no ClientHello in time"),
        }
    }
}

/// Largest ClientHello we wait for (several records are allowed).
const MAX_HELLO: usize = 64 * 1024;
/// TLS record type of handshake messages.
const HANDSHAKE: u8 = 0x16;

/// Waits until a whole ClientHello is buffered in the socket and parses it,
/// leaving every byte in place.
pub async fn peek_client_hello(stream: &TcpStream, timeout: Duration) -> Peeked {
    let mut peeks = 0;
    tokio::time::timeout(timeout, peek_loop(stream, &mut peeks)).await.unwrap_or(Peeked::Timeout)
}

/// Longest wait between two looks at a ClientHello that stopped growing.
const MAX_PEEK_GAP: Duration = Duration::from_millis(64);

async fn peek_loop(stream: &TcpStream, peeks: &mut u32) -> Peeked {
    let mut buf = vec![0u8; 4096];
    let mut last = 0;
    let mut gap = Duration::from_millis(1);
    loop {
        *peeks += 1;
        let n = match stream.peek(&mut buf).await {
            Ok(0) | Err(_) => return Peeked::Closed,
            Ok(n) => n,
        };
        if buf[0] != HANDSHAKE {
            return Peeked::NotTls;
        }
        if n != last {
            last = n;
            gap = Duration::from_millis(1);
            match parse_client_hello(&buf[..n]) {
                Parse::Done(info) => return Peeked::Tls(info),
                Parse::Invalid => return Peeked::Invalid,
                Parse::NeedMore => {}
            }
        }
        if n == buf.len() {
            if buf.len() >= MAX_HELLO {
                return Peeked::TooLarge;
            }
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        // Part of the ClientHello is still in flight. `peek` returns at once
        // while any byte is buffered, so wait before looking again: 1 ms
        // after new bytes, doubling while none come, so a client that
        // stalls mid-hello costs a few wake-ups a second, not a thousand.
        tokio::time::sleep(gap).await;
        gap = (gap * 2).min(MAX_PEEK_GAP);
    }
}

/// What the bytes received so far make of a ClientHello.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    Done(ClientHelloInfo),
    /// A valid start: wait for more bytes.
    NeedMore,
    Invalid,
}

/// Parses the first bytes of a connection as TLS records carrying a
/// ClientHello. Pure; [`peek_client_hello`] calls it on peeked bytes.
pub fn parse_client_hello(bytes: &[u8]) -> Parse {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut reader = bytes;
    while !reader.is_empty() {
        if acceptor.read_tls(&mut reader).is_err() {
            return Parse::Invalid;
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Parse::Done(ClientHelloInfo {
                sni: hello.server_name().map(str::to_owned),
                alpn: hello.alpn().map(|protos| protos.map(<[u8]>::to_vec).collect()).unwrap_or_default(),
            })
        }
        Ok(None) => Parse::NeedMore,
        Err(_) => Parse::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{io::AsyncWriteExt, net::TcpListener};

    use super::*;

    /// A real ClientHello as rustls sends it.
    fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let roots = rustls::RootCertStore::empty();
        let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls_pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    async fn peek_bytes(chunks: Vec<Vec<u8>>, gap: Duration) -> Peeked {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            for chunk in chunks {
                c.write_all(&chunk).await.unwrap();
                tokio::time::sleep(gap).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        let peeked = peek_client_hello(&server, Duration::from_secs(2)).await;
        // The bytes are still there for whoever reads next.
        let mut first = [0u8; 1];
        assert_eq!(server.peek(&mut first).await.unwrap(), 1, "{peeked:?}");
        writer.abort();
        peeked
    }

    #[tokio::test]
    async fn reads_sni_and_alpn_without_consuming() {
        let hello = client_hello("api.openai.com", &[b"h2", b"http/1.1"]);
        let Peeked::Tls(info) = peek_bytes(vec![hello], Duration::ZERO).await else { panic!() };
        assert_eq!(info.sni.as_deref(), Some("api.openai.com"));
        assert_eq!(info.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    }

    #[tokio::test]
    async fn waits_for_a_client_hello_split_across_segments() {
        let hello = client_hello("api.anthropic.com", &[]);
        let (a, b) = hello.split_at(40);
        let Peeked::Tls(info) = peek_bytes(vec![a.to_vec(), b.to_vec()], Duration::from_millis(50)).await else {
            panic!()
        };
        assert_eq!(info.sni.as_deref(), Some("api.anthropic.com"));
    }

    #[tokio::test]
    async fn non_tls_junk_and_oversized_hellos_are_told_apart() {
        assert_eq!(peek_bytes(vec![b"GET / HTTP/1.1\r\n\r\n".to_vec()], Duration::ZERO).await, Peeked::NotTls);
        let junk = vec![0x16, 3, 1, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(peek_bytes(vec![junk], Duration::ZERO).await, Peeked::Invalid);
        // A ClientHello announcing 65,520 bytes, in 16 KiB records. rustls's
        // acceptor gives up on a hello past about 16 KiB (Invalid); a peek
        // buffer that reaches 64 KiB first is TooLarge. Either way it is not
        // a ClientHello the proxy can classify.
        let mut big = vec![0x16, 3, 1, 0x40, 0x00, 1, 0x00, 0xff, 0xf0];
        big.resize(5 + 0x4000, 0);
        for _ in 0..3 {
            big.extend([0x16, 3, 1, 0x40, 0x00]);
            big.resize(big.len() + 0x4000, 0);
        }
        assert!(big.len() > MAX_HELLO);
        let peeked = peek_bytes(vec![big], Duration::ZERO).await;
        assert!(matches!(peeked, Peeked::Invalid | Peeked::TooLarge), "{peeked:?}");
    }

    #[tokio::test]
    async fn a_client_that_closes_before_a_hello_is_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        drop(c);
        assert_eq!(peek_client_hello(&server, Duration::from_secs(2)).await, Peeked::Closed);
    }

    #[tokio::test]
    async fn an_incomplete_hello_times_out() {
        let hello = client_hello("api.openai.com", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(&hello[..20]).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        assert_eq!(peek_client_hello(&server, Duration::from_millis(200)).await, Peeked::Timeout);
    }

    #[tokio::test]
    async fn a_stalled_hello_is_looked_at_a_few_times_a_second_not_a_thousand() {
        let hello = client_hello("api.openai.com", &[]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        c.write_all(&hello[..20]).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut peeks = 0;
        let stalled = tokio::time::timeout(Duration::from_secs(1), peek_loop(&server, &mut peeks)).await;
        assert!(stalled.is_err(), "an incomplete hello is not a result");
        assert!((5..=40).contains(&peeks), "{peeks} looks in one second");
        // The rest still completes it at once.
        c.write_all(&hello[20..]).await.unwrap();
        let started = std::time::Instant::now();
        let Peeked::Tls(info) = peek_client_hello(&server, Duration::from_secs(2)).await else { panic!() };
        assert_eq!(info.sni.as_deref(), Some("api.openai.com"));
        assert!(started.elapsed() < Duration::from_millis(500));
    }

    #[test]
    fn a_hello_without_sni_parses_with_none() {
        let roots = rustls::RootCertStore::empty();
        let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        let ip = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::new(198, 18, 0, 10).into());
        let mut conn = rustls::ClientConnection::new(Arc::new(config), ip).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        let Parse::Done(info) = parse_client_hello(&out) else { panic!() };
        assert_eq!(info.sni, None);
    }
}
