//! Results travelling from the apply step back to the client that proposed the command.
//!
//! Every member applies every entry; the member a command came from (its `origin`) finds the
//! waiting client by the command's sequence number and hands it the result its own apply
//! step produced. Sequence numbers start at a time-derived value on every start, so an entry
//! replayed after a restart never meets a new request's waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::apply::command::Applied;
use crate::apply::ApplyError;

pub type Reply = Result<Applied, ApplyError>;

pub struct Waiters {
    next: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
}

impl Default for Waiters {
    fn default() -> Self {
        Self::new()
    }
}

impl Waiters {
    pub fn new() -> Self {
        let start = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            next: AtomicU64::new(start),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a new waiter; returns its sequence number and the receiving end.
    pub fn register(&self) -> (u64, oneshot::Receiver<Reply>) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(seq, tx);
        }
        (seq, rx)
    }

    /// Delivers the result of command `seq` (a no-op if nobody waits any more).
    pub fn complete(&self, seq: u64, reply: Reply) {
        let tx = self.waiting.lock().ok().and_then(|mut w| w.remove(&seq));
        if let Some(tx) = tx {
            let _ = tx.send(reply);
        }
    }

    /// Forgets waiter `seq` (its client gave up).
    pub fn cancel(&self, seq: u64) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&seq);
        }
    }

    /// Number of commands waiting for their result.
    pub fn len(&self) -> usize {
        self.waiting.lock().map_or(0, |w| w.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn completes_only_registered_waiters() {
        let w = Waiters::new();
        let (a, rx_a) = w.register();
        let (b, rx_b) = w.register();
        assert_ne!(a, b);
        w.complete(b, Err(ApplyError::LeaseNotFound));
        w.complete(b + 100, Err(ApplyError::LeaseExists));
        assert!(matches!(rx_b.await, Ok(Err(ApplyError::LeaseNotFound))));
        w.cancel(a);
        assert!(rx_a.await.is_err(), "a cancelled waiter's receiver closes");
        assert!(w.is_empty());
    }
}
