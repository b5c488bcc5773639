//! [`RaftThread`]: a thread of its own for Raft in a cluster that starts with one member.
//!
//! A put passes through four tasks between its request and its answer: the write pipeline's
//! batching task, openraft's core (which writes and syncs the log), openraft's state-machine
//! worker (the apply), and the handler. On the server's multi-threaded runtime each hand-off
//! may move the next task to the other worker and wake it: ~10 context switches per put at
//! one client, and about as much CPU in the scheduler and the kernel as in the put itself.
//! On a current-thread runtime of its own, the batching task, the core and the worker run one
//! after the other on one thread; only the request and the answer cross to the server's
//! workers (docs/PERFORMANCE.md, session 30: put at 16 clients +18 % and txn-put +16 %,
//! each with 15 % less server CPU, medians of 8 side-by-side rounds).
//!
//! Only for a cluster that starts with one member: with peers, the leader's core, apply
//! and replication on one thread cost 3-member clusters ~5 % of their put rate, so there
//! openraft shares the server's workers as before. A one-member cluster that grows by
//! `member add` keeps the thread; its peer connections then run on the server's workers
//! ([`Peers::spawning_on`](super::network::Peers::spawning_on)).

use std::future::Future;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A thread running a current-thread tokio runtime until the value is dropped. Dropping it
/// drops the tasks still on it (after Raft has shut down, none should be) on that thread.
pub struct RaftThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl RaftThread {
    /// Starts the thread.
    pub fn start() -> std::io::Result<Self> {
        let rt = Builder::new_current_thread().enable_all().build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("metastore-raft".into())
            .spawn(move || {
                // Ends when the sender is sent on or dropped; the runtime, and every task
                // left on it, is then dropped here, outside any runtime.
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    /// Runs `fut` on the thread (tasks it spawns run there too) and returns its output.
    pub async fn run<F>(&self, fut: F) -> Result<F::Output, tokio::task::JoinError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(fut).await
    }

    /// The thread's runtime, to spawn tasks on.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for RaftThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tasks_run_on_the_thread_and_are_dropped_with_it() -> anyhow::Result<()> {
        let thread = RaftThread::start()?;
        let name = thread
            .run(async { std::thread::current().name().map(str::to_string) })
            .await?;
        assert_eq!(name.as_deref(), Some("metastore-raft"));
        // A task spawned from there stays there.
        let inner = thread
            .run(async {
                tokio::spawn(async { std::thread::current().name().map(str::to_string) }).await
            })
            .await??;
        assert_eq!(inner.as_deref(), Some("metastore-raft"));

        // A task that never ends holds a reference until the thread drops it.
        let held = Arc::new(());
        let copy = held.clone();
        thread.handle().spawn(async move {
            let _copy = copy;
            std::future::pending::<()>().await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(Arc::strong_count(&held), 2);
        drop(thread);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&held) > 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the task was not dropped"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }
}
