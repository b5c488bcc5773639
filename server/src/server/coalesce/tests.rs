use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Wake;

use super::*;

/// A socket that records every write and can refuse (`Pending`) or take part of a write.
#[derive(Default)]
struct Sock {
    out: Vec<u8>,
    writes: Vec<usize>,
    flushes: usize,
    shut: bool,
    /// Writes still to refuse with `Pending`.
    refuse: usize,
    /// The most one write takes.
    max_write: Option<usize>,
}

impl AsyncWrite for Sock {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.refuse > 0 {
            self.refuse -= 1;
            return Poll::Pending;
        }
        let n = self.max_write.map_or(buf.len(), |m| m.min(buf.len()));
        let taken = buf.get(..n).unwrap_or_default().to_vec();
        self.out.extend_from_slice(&taken);
        self.writes.push(n);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.flushes += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.shut = true;
        Poll::Ready(Ok(()))
    }
}

/// Counts wake-ups.
#[derive(Default)]
struct Wakes(AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

struct Harness {
    c: Coalescer,
    sock: Sock,
    wakes: Arc<Wakes>,
    /// Every byte handed to the coalescer, in order.
    sent: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        Self {
            c: Coalescer::default(),
            sock: Sock::default(),
            wakes: Arc::new(Wakes::default()),
            sent: Vec::new(),
        }
    }

    fn wakes(&self) -> usize {
        self.wakes.0.load(Ordering::Relaxed)
    }

    /// Writes `n` bytes in one or two slices; the result of the write.
    fn write(&mut self, n: usize) -> Poll<io::Result<usize>> {
        let data: Vec<u8> = (0..n).map(|i| (self.sent.len() + i) as u8).collect();
        let (a, b) = data.split_at(n / 3);
        let waker = std::task::Waker::from(self.wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let r = self.c.poll_write_vectored(
            &mut self.sock,
            &mut cx,
            &[IoSlice::new(a), IoSlice::new(b)],
        );
        if let Poll::Ready(Ok(taken)) = r {
            // Buffered writes are taken whole; one passed to the socket may be taken in part,
            // as from any socket.
            self.sent
                .extend_from_slice(data.get(..taken).unwrap_or_default());
        }
        r
    }

    fn flush(&mut self) -> Poll<io::Result<()>> {
        let waker = std::task::Waker::from(self.wakes.clone());
        let mut cx = Context::from_waker(&waker);
        self.c.poll_flush(&mut self.sock, &mut cx)
    }

    fn shutdown(&mut self) -> Poll<io::Result<()>> {
        let waker = std::task::Waker::from(self.wakes.clone());
        let mut cx = Context::from_waker(&waker);
        self.c.poll_shutdown(&mut self.sock, &mut cx)
    }
}

fn ready<T>(p: Poll<io::Result<T>>) -> T {
    match p {
        Poll::Ready(Ok(v)) => v,
        Poll::Ready(Err(e)) => panic!("error: {e}"),
        Poll::Pending => panic!("pending"),
    }
}

#[test]
fn a_small_answer_is_written_at_its_flush() {
    let mut h = Harness::new();
    assert_eq!(ready(h.write(9)), 9);
    assert_eq!(ready(h.write(300)), 300);
    assert_eq!(ready(h.write(13)), 13);
    assert!(
        h.sock.writes.is_empty(),
        "nothing is written before the flush"
    );
    ready(h.flush());
    assert_eq!(h.sock.writes, vec![322], "one write for the whole answer");
    assert_eq!(h.sock.flushes, 1);
    assert_eq!(h.wakes(), 0, "no deferral, no wake-up");
    assert_eq!(h.sock.out, h.sent);
    assert_eq!(h.c.pending(), 0);
}

#[test]
fn a_burst_of_frames_goes_out_in_few_large_writes() {
    let mut h = Harness::new();
    // What h2 does for a 290 KB answer: a frame, a flush, the next frame, a flush, ...
    for _ in 0..18 {
        ready(h.write(9 + 16_384));
        ready(h.flush());
    }
    // The connection's next poll ends with a flush with nothing new: the rest goes out.
    ready(h.flush());
    assert_eq!(h.sock.out, h.sent, "every byte, in order");
    assert_eq!(h.c.pending(), 0);
    assert!(
        h.sock.writes.len() <= 6,
        "18 frames in {} writes: {:?}",
        h.sock.writes.len(),
        h.sock.writes
    );
    assert!(h.sock.writes.iter().all(|&w| w <= COALESCE_UP_TO));
    assert!(h.wakes() >= 1, "a deferred flush wakes the task");
}

#[test]
fn a_deferred_flush_writes_on_the_next_flush_with_nothing_new() {
    let mut h = Harness::new();
    ready(h.write(COALESCE_FROM));
    ready(h.flush());
    assert!(h.sock.writes.is_empty(), "deferred");
    assert_eq!(h.wakes(), 1, "and the task is woken to come back");
    ready(h.flush());
    assert_eq!(h.sock.writes, vec![COALESCE_FROM]);
    assert_eq!(h.sock.flushes, 1);
    // Never deferred twice in a row without new bytes: no busy loop.
    ready(h.write(COALESCE_FROM + 1));
    ready(h.flush());
    ready(h.flush());
    assert_eq!(h.sock.writes, vec![COALESCE_FROM, COALESCE_FROM + 1]);
    assert_eq!(h.wakes(), 2);
}

#[test]
fn the_buffer_never_passes_the_limit_and_large_writes_go_straight_through() {
    let mut h = Harness::new();
    ready(h.write(COALESCE_UP_TO - 10));
    assert!(h.sock.writes.is_empty());
    ready(h.write(11));
    assert_eq!(
        h.sock.writes,
        vec![COALESCE_UP_TO - 10],
        "drained before taking more"
    );
    assert_eq!(h.c.pending(), 11);
    // The socket takes the first slice of a vectored write (tokio's default).
    assert_eq!(ready(h.write(3 * COALESCE_UP_TO)), COALESCE_UP_TO);
    assert_eq!(
        h.sock.writes,
        vec![COALESCE_UP_TO - 10, 11, COALESCE_UP_TO],
        "buffer first, then the large write itself, not copied"
    );
    assert_eq!(h.c.pending(), 0);
    ready(h.flush());
    assert_eq!(h.sock.out, h.sent);
}

#[test]
fn a_busy_socket_keeps_every_byte_in_order() {
    let mut h = Harness::new();
    h.sock.max_write = Some(5_000);
    ready(h.write(COALESCE_UP_TO - 100));
    // The socket refuses: the write that needs room is refused too, and not taken.
    h.sock.refuse = 1;
    assert!(h.write(1_000).is_pending());
    // Part of the buffer goes, then the socket refuses again mid-drain.
    h.sock.refuse = 0;
    h.sock.max_write = Some(7_000);
    assert!(matches!(h.write(2_000), Poll::Ready(Ok(2_000))));
    h.sock.refuse = 1;
    ready(h.write(COALESCE_UP_TO / 2));
    // Keep flushing until everything is out (a deferral or a refusal each time).
    let mut rounds = 0;
    while h.c.pending() > 0 {
        let _ = h.flush();
        rounds += 1;
        assert!(rounds < 100, "the buffer drains");
    }
    assert_eq!(h.sock.out, h.sent, "every byte, once, in order");
}

#[test]
fn shutdown_writes_the_buffer_first() {
    let mut h = Harness::new();
    ready(h.write(COALESCE_FROM + 5));
    ready(h.flush()); // deferred
    ready(h.shutdown());
    assert!(h.sock.shut);
    assert_eq!(h.sock.out, h.sent);
}

#[test]
fn a_socket_that_takes_nothing_is_an_error() {
    let mut h = Harness::new();
    h.sock.max_write = Some(0);
    ready(h.write(100));
    match h.flush() {
        Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
        other => panic!("expected WriteZero, got {other:?}"),
    }
}
