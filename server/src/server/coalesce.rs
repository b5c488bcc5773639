//! [`Coalescer`]: fewer, larger socket writes for an HTTP/2 connection's bursts of DATA frames.
//!
//! h2 (under hyper and tonic) keeps a DATA frame's payload beside its 16 KiB write buffer
//! instead of copying it, and must write both out before it takes the next frame. A peer that
//! accepts frames of at most 16 KiB (HTTP/2's default, every gRPC client's) therefore costs one
//! `writev` per 16 KiB: 18 for a 1,000-key Range answer, where etcd (grpc-go, a 32 KiB write
//! buffer) makes 9, and each send on loopback also costs the receiver a wake-up
//! (docs/PERFORMANCE.md).
//!
//! The coalescer takes the connection's writes into its own buffer and writes the buffer out
//! when a flush asks for it, with one exception that does the work: a flush that finds between
//! [`COALESCE_FROM`] and [`COALESCE_UP_TO`] bytes buffered, with bytes added since the last
//! deferred flush, is *deferred*: it returns at once and wakes the connection's task, which
//! comes back to it on its next poll (h2 ends every poll of a connection with a flush). More
//! frames of the same burst join the buffer in between; a flush with nothing new since the
//! deferral writes everything. So:
//! - what h2 buffers itself (small frames, up to its 16 KiB buffer: every unary KV answer but a
//!   large Range, and many of them at once under load) is written at its flush, as without the
//!   coalescer: no added hop, no added latency;
//! - a burst goes out in writes of up to [`COALESCE_UP_TO`] bytes plus one write;
//! - the buffer never holds more than [`COALESCE_UP_TO`] bytes: a write that would pass it
//!   first writes the buffer out (and waits for the socket, as a direct write would), and a
//!   write of that size or more goes straight to the socket.
//!
//! Shutdown writes the buffer out first. Bytes are never reordered, dropped or duplicated.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

/// A flush with fewer bytes buffered writes them at once (no deferral). One more than h2's own
/// write buffer holds: h2's flush of small frames (many small answers at once, at any load)
/// is never deferred, and only a flush with a DATA frame's chained payload beside that buffer
/// (a burst of large frames) can be.
pub const COALESCE_FROM: usize = 16 * 1024 + 1;
/// The most the buffer holds; a flush with this much buffered writes at once.
pub const COALESCE_UP_TO: usize = 64 * 1024;

/// The write side of one connection (see the module docs). The caller passes its socket to
/// every call.
#[derive(Debug, Default)]
pub struct Coalescer {
    buf: Vec<u8>,
    /// Bytes of `buf` already written to the socket.
    written: usize,
    /// A flush was deferred and nothing has been added since.
    deferred: bool,
}

impl Coalescer {
    /// Bytes taken but not yet written to the socket.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.written
    }

    /// Takes `bufs` (all of them, or none while the socket is not ready for the buffer).
    pub fn poll_write_vectored<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if self.pending() + total > COALESCE_UP_TO {
            ready!(self.poll_drain(io, cx))?;
            if total >= COALESCE_UP_TO {
                return Pin::new(io).poll_write_vectored(cx, bufs);
            }
        }
        for b in bufs {
            self.buf.extend_from_slice(b);
        }
        self.deferred = false;
        Poll::Ready(Ok(total))
    }

    /// Writes the buffer out and flushes the socket, unless the flush is deferred (see the
    /// module docs).
    pub fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let pending = self.pending();
        if (COALESCE_FROM..COALESCE_UP_TO).contains(&pending) && !self.deferred {
            self.deferred = true;
            cx.waker().wake_by_ref();
            return Poll::Ready(Ok(()));
        }
        ready!(self.poll_drain(io, cx))?;
        Pin::new(io).poll_flush(cx)
    }

    /// Writes the buffer out, then shuts the socket's write side.
    pub fn poll_shutdown<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(io, cx))?;
        Pin::new(io).poll_shutdown(cx)
    }

    /// Writes every buffered byte to the socket.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let rest = self.buf.get(self.written..).unwrap_or_default();
            let n = ready!(Pin::new(&mut *io).poll_write(cx, rest))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buf.clear();
        self.written = 0;
        self.deferred = false;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
