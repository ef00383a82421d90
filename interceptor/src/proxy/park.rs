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
    loop {
        let step = std::future::poll_fn(|cx| {
            let quiet_before = *count.borrow() == 0 && receiving.load(Ordering::Relaxed) == 0;
            let started = requests.load(Ordering::Relaxed);
            seen.begin_poll();
            if let Poll::Ready(out) = Pin::new(&mut *conn).poll(cx) {
                return Poll::Ready(Driven::Done(out));
            }
            let quiet_after = *count.borrow() == 0
                && receiving.load(Ordering::Relaxed) == 0
                && requests.load(Ordering::Relaxed) == started;
            if quiet_after && seen.quiet() {
                if quiet_before {
                    return Poll::Ready(Driven::Idle);
                }
                // The last request ended during this poll: look again once
                // hyper has seen its end, in a poll of its own.
                cx.waker().wake_by_ref();
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
