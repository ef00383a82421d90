//! The passthrough relay: once a connection is relayed untouched, its bytes
//! move socket → pipe → socket inside the kernel with splice(2), one pipe
//! per direction, and never enter the proxy's memory. The proxy only waits
//! for readiness and counts what moved.
//!
//! Each direction fills its pipe from the source only while the pipe is
//! empty, then drains it into the destination: a splice that would block
//! is therefore always the socket's doing, never the pipe's, so tokio's
//! readiness (cleared by `try_io` on `WouldBlock`) stays right and nothing
//! spins. End of stream on one side shuts down writing on the other once
//! the pipe is drained (a half-close is relayed as such); the other
//! direction goes on until its own end. The first error ends both
//! directions, as `tokio::io::copy_bidirectional` does, with the bytes
//! relayed until then still counted.
//!
//! The pipes are closed when the relay is dropped (they are `OwnedFd`s).
//! When they cannot be made (descriptor limits), the caller relays with
//! `copy_bidirectional` instead: [`Pipes::new`] fails before any byte moves.
//!
//! A pipe holds 64 KiB by default; past `fs.pipe-user-pages-soft` a user's
//! new pipes hold one page, which still relays, in smaller steps.
//!
//! Not a sockmap (`sk_skb` redirect) relay: on our kernels it queues without
//! bound when a reader stops reading, and was not much faster
//! (`docs/passthrough-kernel-relay.md`).

use std::{
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
};

use tokio::{io::Interest, net::TcpStream};

/// Most bytes asked of one splice (the pipe's capacity bounds it anyway).
const SPLICE_LEN: usize = 1 << 20;

/// One pipe: what the source spliced into it and the destination has not
/// taken yet.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe.
    held: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(io::Error::from)?;
        Ok(Self { read, write, held: 0 })
    }
}

/// The two pipes of one relayed connection.
pub struct Pipes {
    up: Pipe,
    down: Pipe,
}

impl Pipes {
    /// Both pipes, or the error that leaves the connection to a copying
    /// relay (too many open descriptors, as a rule).
    pub fn new() -> io::Result<Self> {
        Ok(Self { up: Pipe::new()?, down: Pipe::new()? })
    }
}

/// Bytes relayed so far: client to upstream, and back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Relayed {
    pub up: u64,
    pub down: u64,
}

/// Relays `client` and `upstream` through `pipes` until both directions
/// have ended. On error the counts say what was relayed before it.
pub async fn relay(client: &TcpStream, upstream: &TcpStream, pipes: Pipes) -> (Relayed, io::Result<()>) {
    let Pipes { mut up, mut down } = pipes;
    let mut counts = Relayed::default();
    let result = tokio::try_join!(
        pump(client, upstream, &mut up, &mut counts.up),
        pump(upstream, client, &mut down, &mut counts.down),
    );
    (counts, result.map(|_| ()))
}

/// One direction: `src` to `dst` through `pipe`, counting into `moved`,
/// until `src` ends (then `dst` is shut down for writing) or fails.
async fn pump(src: &TcpStream, dst: &TcpStream, pipe: &mut Pipe, moved: &mut u64) -> io::Result<()> {
    loop {
        // Fill the (empty) pipe from the source.
        let n = loop {
            src.readable().await?;
            match src.try_io(Interest::READABLE, || splice(src.as_fd(), pipe.write.as_fd(), SPLICE_LEN)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return nix::sys::socket::shutdown(dst.as_raw_fd(), nix::sys::socket::Shutdown::Write)
                .or_else(|e| if e == nix::errno::Errno::ENOTCONN { Ok(()) } else { Err(e) })
                .map_err(io::Error::from);
        }
        pipe.held = n;
        // Drain it into the destination.
        while pipe.held > 0 {
            dst.writable().await?;
            match dst.try_io(Interest::WRITABLE, || splice(pipe.read.as_fd(), dst.as_fd(), pipe.held)) {
                Ok(n) => {
                    pipe.held -= n;
                    *moved += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// One non-blocking splice(2) of at most `len` bytes from `from` to `to`
/// (one of them a pipe), at their current positions.
fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: both descriptors are borrowed, so open for the whole call; null
    // offsets are what pipes and sockets require (no offset is written back).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets: (the end handed to the relay,
    /// the peer the test drives).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (accepted.unwrap().0, connected.unwrap())
    }

    /// The relay between two pairs: (client peer, upstream peer, relay task).
    async fn relayed() -> (TcpStream, TcpStream, tokio::task::JoinHandle<(Relayed, io::Result<()>)>) {
        let (client_end, client) = pair().await;
        let (upstream_end, upstream) = pair().await;
        let task = tokio::spawn(async move { relay(&client_end, &upstream_end, Pipes::new().unwrap()).await });
        (client, upstream, task)
    }

    /// Deterministic, position-dependent bytes, so a lost, repeated or
    /// reordered chunk shows.
    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ seed).collect()
    }

    async fn send_then_read(mut s: TcpStream, data: Vec<u8>, expect: usize) -> Vec<u8> {
        let (mut r, mut w) = s.split();
        let write = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async {
            let mut got = Vec::with_capacity(expect);
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(write, read).1
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relays_32_mib_each_way_at_once_byte_for_byte_and_counts_them() {
        const LEN: usize = 32 << 20;
        let (client, upstream, task) = relayed().await;
        let (up_data, down_data) = (pattern(1, LEN), pattern(2, LEN));
        let (at_upstream, at_client) = tokio::join!(
            tokio::spawn(send_then_read(upstream, down_data.clone(), LEN)),
            tokio::spawn(send_then_read(client, up_data.clone(), LEN)),
        );
        let (at_upstream, at_client) = (at_upstream.unwrap(), at_client.unwrap());
        assert!(at_upstream == up_data, "upstream got {} bytes, not the client's {LEN}", at_upstream.len());
        assert!(at_client == down_data, "client got {} bytes, not the upstream's {LEN}", at_client.len());
        let (counts, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(counts, Relayed { up: LEN as u64, down: LEN as u64 });
    }

    #[tokio::test]
    async fn a_client_half_close_still_gets_the_rest_of_the_answer() {
        let (mut client, mut upstream, task) = relayed().await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        // The upstream sees the request, then the end of it.
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // It answers after the client stopped writing.
        let answer = pattern(3, 1 << 20);
        upstream.write_all(&answer).await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(back == answer, "client got {} of {} bytes", back.len(), answer.len());
        let (counts, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(counts, Relayed { up: 7, down: 1 << 20 });
    }

    #[tokio::test]
    async fn an_upstream_half_close_still_takes_the_rest_of_the_request() {
        let (mut client, mut upstream, task) = relayed().await;
        upstream.write_all(b"banner").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"banner");
        let request = pattern(4, 1 << 20);
        client.write_all(&request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut at_upstream = Vec::new();
        upstream.read_to_end(&mut at_upstream).await.unwrap();
        assert!(at_upstream == request, "upstream got {} of {} bytes", at_upstream.len(), request.len());
        let (counts, result) = task.await.unwrap();
        result.unwrap();
        assert_eq!(counts, Relayed { up: 1 << 20, down: 6 });
    }

    #[tokio::test]
    async fn a_reset_peer_ends_the_relay_with_an_error_and_the_counts_so_far() {
        let (mut client, mut upstream, task) = relayed().await;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        upstream.read_exact(&mut buf).await.unwrap();
        // Abortive close: linger 0 sends a reset instead of a FIN.
        upstream.set_zero_linger().unwrap();
        drop(upstream);
        let (counts, result) = task.await.unwrap();
        let error = result.expect_err("a reset is an error");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset, "{error}");
        assert_eq!(counts.up, 5);
        // The client's side is closed too.
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        assert!(rest.is_empty());
    }

    #[test]
    fn pipes_are_closed_on_drop() {
        let pipes = Pipes::new().unwrap();
        let fds = [&pipes.up.read, &pipes.up.write, &pipes.down.read, &pipes.down.write].map(|fd| fd.as_raw_fd());
        let link = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        let before = fds.map(link);
        assert!(before.iter().all(|l| l.as_ref().is_some_and(|l| l.to_string_lossy().starts_with("pipe:"))));
        drop(pipes);
        // A number may be reused by another test's descriptor meanwhile, but
        // never for the same pipe (each has its own inode).
        for (fd, before) in fds.into_iter().zip(before) {
            assert_ne!(link(fd), before, "descriptor {fd} still open");
        }
    }
}
