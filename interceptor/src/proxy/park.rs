//! Idle HTTP/1.1 connections parked without buffers, as nginx parks its
//! kept-alive connections: between requests hyper's connection (its 8 KiB
//! read and 8 KiB write buffers and its state) is taken apart and dropped,
//! and only the TLS stream waits until the client sends again. Then a fresh
//! hyper connection serves the next request, starting from any bytes the
//! last one had read ahead (a pipelined request).
//!
//! Taking hyper apart is only safe between messages: with a request body
//! half read, what follows would be parsed as a new request. So a
//! connection is parked only after one whole poll of it in which nothing
//! happened: no request was in flight before or after it (the in-flight
//! count covers each request from hyper handing it over until its response
//! body is dropped, and no request body is alive either), none started, hyper
//! asked the socket for bytes and got none, and everything it wrote was
//! flushed. A request body dropped before its end makes hyper drain it or
//! stop reading within that poll, so a half-read body is never left behind.
//! And only after a request was served: a head that dribbles in stays under
//! hyper's header timeout.
//!
//! This module must not know what the requests are: it sees the in-flight
//! count, the request count and the bytes.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use bytes::{Buf as _, Bytes};
use hyper::body::{Body, Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

/// What the IO saw during one poll of the connection, and whether all that
/// was written has been flushed.
#[derive(Default)]
pub struct IoSeen {
    read_data: AtomicBool,
    read_blocked: AtomicBool,
    wrote: AtomicBool,
    unflushed: AtomicBool,
}

impl IoSeen {
    fn begin_poll(&self) {
        self.read_data.store(false, Ordering::Relaxed);
        self.read_blocked.store(false, Ordering::Relaxed);
        self.wrote.store(false, Ordering::Relaxed);
    }

    /// Bytes moved during the poll.
    fn active(&self) -> bool {
        self.read_data.load(Ordering::Relaxed) || self.wrote.load(Ordering::Relaxed)
    }

    /// Hyper waited for the client during the poll and had nothing of its
    /// own left to send.
    fn quiet(&self) -> bool {
        !self.read_data.load(Ordering::Relaxed)
            && self.read_blocked.load(Ordering::Relaxed)
            && !self.wrote.load(Ordering::Relaxed)
            && !self.unflushed.load(Ordering::Relaxed)
    }
}

/// The connection's IO as hyper sees it: first the bytes a previous hyper
/// connection read ahead, then the stream; every call noted in `seen`.
pub struct ParkIo<I> {
    ahead: Bytes,
    inner: I,
    seen: Arc<IoSeen>,
}

impl<I> ParkIo<I> {
    pub fn new(ahead: Bytes, inner: I) -> Self {
        Self { ahead, inner, seen: Arc::default() }
    }

    pub fn seen(&self) -> Arc<IoSeen> {
        Arc::clone(&self.seen)
    }

    /// The stream once hyper's connection is taken apart, and what is left
    /// to read before it: `read_buf` (what hyper read and did not use), then
    /// what hyper did not read yet of the bytes given to it.
    pub fn into_inner(self, read_buf: Bytes) -> (Bytes, I) {
        // Copied: `read_buf` shares hyper's whole read buffer, even empty.
        let ahead = match (read_buf.is_empty(), self.ahead.is_empty()) {
            (true, true) => Bytes::new(),
            (false, true) => Bytes::copy_from_slice(&read_buf),
            (true, false) => self.ahead,
            (false, false) => [read_buf, self.ahead].concat().into(),
        };
        (ahead, self.inner)
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ParkIo<I> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(buf.remaining());
            buf.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            this.seen.read_data.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Pending => this.seen.read_blocked.store(true, Ordering::Relaxed),
            // End of stream counts as data: hyper is not idle, it is closing.
            Poll::Ready(_) => this.seen.read_data.store(true, Ordering::Relaxed),
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ParkIo<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.seen.wrote.store(true, Ordering::Relaxed);
        self.seen.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.seen.wrote.store(true, Ordering::Relaxed);
        self.seen.unflushed.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            self.seen.unflushed.store(false, Ordering::Relaxed);
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.seen.wrote.store(true, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A request body, counted in `count` until dropped. Its size hint and end
/// are the body's own (the request's length is known downstream).
pub struct Receiving<B> {
    inner: B,
    count: Arc<AtomicUsize>,
}

impl<B> Receiving<B> {
    pub fn wrap(inner: B, count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self { inner, count: Arc::clone(count) }
    }
}

impl<B> Drop for Receiving<B> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Body + Unpin> Body for Receiving<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// How driving a hyper connection ended.
pub enum Driven<T> {
    /// The connection is done (closed, failed or upgraded).
    Done(T),
    /// The connection is idle between messages: take it apart.
    Idle,
}

/// Polls `conn` until it is done or idle between messages (see the module
/// doc). `active` counts requests in flight, `requests` those started.
pub async fn drive<F: std::future::Future + Unpin>(
    conn: &mut F,
    seen: &IoSeen,
    active: &mut watch::Receiver<usize>,
    requests: &AtomicU64,
    receiving: &AtomicUsize,
) -> Driven<F::Output> {
    let count = active.clone();
    // Only a connection that has served a request is taken apart: one that
    // has not (a first request head still dribbling in) stays whole, so
    // hyper's header timeout keeps running.
    let at_start = requests.load(Ordering::Relaxed);
    loop {
        let step = std::future::poll_fn(|cx| {
            let quiet_before = *count.borrow() == 0 && receiving.load(Ordering::Relaxed) == 0;
            let started = requests.load(Ordering::Relaxed);
            seen.begin_poll();
            if let Poll::Ready(out) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(Driven::Done(out));
            }
            let none_in_flight = *count.borrow() == 0 && receiving.load(Ordering::Relaxed) == 0;
            if none_in_flight && !seen.unflushed.load(Ordering::Relaxed) {
                let unchanged = quiet_before && requests.load(Ordering::Relaxed) == started;
                if unchanged && seen.quiet() && requests.load(Ordering::Relaxed) != at_start {
                    return Poll::Ready(Driven::Idle);
                }
                if !unchanged || seen.active() {
                    // Something happened in this poll (a request ended or
                    // was served, bytes moved): look again, in a poll of its
                    // own, once hyper is waiting.
                    cx.waker().wake_by_ref();
                }
            }
            Poll::Pending
        });
        tokio::select! {
            biased;
            driven = step => return driven,
            // A request ending elsewhere (its body dropped by another task)
            // wakes nobody here: look again.
            changed = active.changed() => {
                if changed.is_err() {
                    // The count can no longer change: serve to the end.
                    return Driven::Done(conn.await);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt as _, Full};
    use hyper::{Request, Response, server::conn::http1, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream},
        sync::mpsc,
    };

    use super::*;

    /// What the connection's owner keeps: the counts `drive` reads.
    struct Counts {
        active: watch::Sender<usize>,
        requests: Arc<AtomicU64>,
        receiving: Arc<AtomicUsize>,
    }

    type Held = mpsc::UnboundedSender<(String, Option<Receiving<hyper::body::Incoming>>)>;

    /// Serves `server` until it is idle or done: `Some((ahead, stream))`
    /// when idle. Each request's path and body (unless empty) go to `held`;
    /// the response is a plain 200.
    async fn serve_once(
        ahead: Bytes,
        server: DuplexStream,
        counts: &Counts,
        held: &Held,
    ) -> Option<(Bytes, DuplexStream)> {
        let (requests, receiving, held) = (Arc::clone(&counts.requests), Arc::clone(&counts.receiving), held.clone());
        let service = service_fn(move |req: Request<hyper::body::Incoming>| {
            requests.fetch_add(1, Ordering::Relaxed);
            let (parts, body) = req.into_parts();
            let body = (!body.is_end_stream()).then(|| Receiving::wrap(body, &receiving));
            let _ = held.send((parts.uri.path().to_string(), body));
            async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok")))) }
        });
        let io = ParkIo::new(ahead, server);
        let seen = io.seen();
        let mut conn = Box::new(http1::Builder::new().serve_connection(TokioIo::new(io), service).with_upgrades());
        let mut active = counts.active.subscribe();
        match drive(&mut conn, &seen, &mut active, &counts.requests, &counts.receiving).await {
            Driven::Done(result) => {
                result.unwrap();
                None
            }
            Driven::Idle => {
                let parts = conn.into_parts().unwrap();
                Some(parts.io.into_inner().into_inner(parts.read_buf))
            }
        }
    }

    fn counts() -> Counts {
        Counts { active: watch::Sender::new(0), requests: Arc::default(), receiving: Arc::default() }
    }

    /// Reads from `client` until `n` responses have arrived.
    async fn responses(client: &mut DuplexStream, n: usize) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while String::from_utf8_lossy(&got).matches("HTTP/1.1 200").count() < n || !got.ends_with(b"ok") {
            let read = client.read(&mut buf).await.unwrap();
            assert!(read > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..read]);
        }
        String::from_utf8(got).unwrap()
    }

    #[tokio::test]
    async fn taken_apart_between_requests_and_resumed_from_what_was_read_ahead() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let (counts, (held, mut paths)) = (counts(), mpsc::unbounded_channel());
        client.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let (parked, answer) =
            tokio::join!(serve_once(Bytes::new(), server, &counts, &held), responses(&mut client, 1));
        let (ahead, server) = parked.expect("idle after one exchange");
        assert!(ahead.is_empty(), "{ahead:?}");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(paths.recv().await.unwrap().0, "/a");

        // One request and the start of the next arrive together: the second
        // is kept, unparsed, for the connection that serves it.
        client.write_all(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\nGET /c HTTP/1.1\r\nho").await.unwrap();
        let (parked, answer) =
            tokio::join!(serve_once(Bytes::new(), server, &counts, &held), responses(&mut client, 1));
        let (ahead, server) = parked.expect("idle with half a request read");
        assert_eq!(&ahead[..], b"GET /c HTTP/1.1\r\nho");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(paths.recv().await.unwrap().0, "/b");

        client.write_all(b"st: x\r\n\r\n").await.unwrap();
        let (parked, _) = tokio::join!(serve_once(ahead, server, &counts, &held), responses(&mut client, 1));
        assert!(parked.is_some());
        assert_eq!(paths.recv().await.unwrap().0, "/c");
        assert_eq!(counts.requests.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn never_taken_apart_while_a_request_body_is_alive() {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        let (counts, (held, mut bodies)) = (counts(), mpsc::unbounded_channel());
        // Answered before its body has all arrived; the body is still read
        // by its holder (as a request body streamed to the provider is).
        client.write_all(b"POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n0123").await.unwrap();
        let serving = serve_once(Bytes::new(), server, &counts, &held);
        let exchange = async {
            let answer = responses(&mut client, 1).await;
            // The holder reads what has arrived and waits for more: hyper
            // reads the socket for it and finds nothing.
            let (path, body) = bodies.recv().await.unwrap();
            let mut body = body.unwrap();
            let mut got = Vec::new();
            loop {
                match std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                    Poll::Ready(Some(frame)) => got.extend_from_slice(&frame.unwrap().into_data().unwrap()),
                    Poll::Ready(None) => panic!("the body ended early"),
                    Poll::Pending => break,
                }
            }
            // Let the connection be polled meanwhile: taken apart now, the
            // rest of the body would be read as a request of its own.
            tokio::task::yield_now().await;
            client.write_all(b"456789GET /next HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
            got.extend_from_slice(&body.collect().await.unwrap().to_bytes());
            let body = Bytes::from(got);
            let next = responses(&mut client, 1).await;
            (answer, path, body, next)
        };
        let (parked, (answer, path, body, next)) = tokio::join!(serving, exchange);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!((path.as_str(), &body[..]), ("/a", &b"0123456789"[..]));
        assert!(next.starts_with("HTTP/1.1 200"), "{next}");
        assert!(parked.is_some(), "idle after both exchanges");
        assert_eq!(bodies.recv().await.unwrap().0, "/next");
        assert_eq!(counts.requests.load(Ordering::Relaxed), 2);
    }
}
