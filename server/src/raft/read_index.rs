//! Batched ReadIndex: concurrent linearizable reads share one confirmation round.
//!
//! A read may only use a read index obtained *after* it arrived. So reads arriving while a
//! round is in flight wait for the next round, which starts as soon as the current one ends
//! and serves all of them: under a burst of reads, one round of heartbeats per round trip,
//! whatever the number of readers.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// Why a read index could not be obtained (cheap to clone to every reader of a round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    NoLeader,
    Timeout,
    Stopped,
}

pub type Fetch =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<u64, ReadError>> + Send>> + Send + Sync>;

#[derive(Default)]
struct State {
    running: bool,
    waiting: Vec<oneshot::Sender<Result<u64, ReadError>>>,
}

/// The batcher; `fetch` performs one round (ReadIndex on the leader, or asking it).
pub struct ReadBatcher {
    fetch: Fetch,
    state: Mutex<State>,
}

impl ReadBatcher {
    pub fn new(fetch: Fetch) -> Arc<Self> {
        Arc::new(Self {
            fetch,
            state: Mutex::new(State::default()),
        })
    }

    /// A read index obtained after this call began.
    pub async fn read_index(self: &Arc<Self>) -> Result<u64, ReadError> {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut st = self.state.lock().map_err(|_| ReadError::Stopped)?;
            st.waiting.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.drive().await });
        }
        rx.await.map_err(|_| ReadError::Stopped)?
    }

    async fn drive(self: Arc<Self>) {
        loop {
            let batch = match self.state.lock() {
                Ok(mut st) => {
                    if st.waiting.is_empty() {
                        st.running = false;
                        return;
                    }
                    std::mem::take(&mut st.waiting)
                }
                Err(_) => return,
            };
            let r = (self.fetch)().await;
            for w in batch {
                let _ = w.send(r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_reads_shares_rounds() {
        let rounds = Arc::new(AtomicU64::new(0));
        let r2 = rounds.clone();
        let fetch: Fetch = Arc::new(move || {
            let r = r2.clone();
            Box::pin(async move {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                Ok(r.fetch_add(1, Ordering::SeqCst) + 1)
            })
        });
        let b = ReadBatcher::new(fetch);
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { b.read_index().await }));
        }
        for t in tasks {
            let idx = t.await.expect("task").expect("index");
            assert!(idx >= 1);
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!(n <= 3, "200 concurrent reads took {n} rounds");
    }

    #[tokio::test]
    async fn a_read_never_uses_a_round_that_started_before_it() {
        // The round in flight when the second read arrives must not serve it.
        let rounds = Arc::new(AtomicU64::new(0));
        let r2 = rounds.clone();
        let fetch: Fetch = Arc::new(move || {
            let r = r2.clone();
            Box::pin(async move {
                let n = r.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                Ok(n)
            })
        });
        let b = ReadBatcher::new(fetch);
        let b1 = b.clone();
        let first = tokio::spawn(async move { b1.read_index().await });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        let second = b.read_index().await.expect("index");
        assert_eq!(first.await.expect("task").expect("index"), 1);
        assert_eq!(second, 2);
    }

    #[tokio::test]
    async fn errors_reach_every_reader() {
        let fetch: Fetch = Arc::new(|| Box::pin(async { Err(ReadError::NoLeader) }));
        let b = ReadBatcher::new(fetch);
        assert_eq!(b.read_index().await, Err(ReadError::NoLeader));
    }
}
