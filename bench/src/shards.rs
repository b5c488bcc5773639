//! The tool's threads: one current-thread tokio runtime per thread, each owning some of the
//! connections and the requesters that use them.
//!
//! The tool shares the machine's cores with the server it measures, so every microsecond it
//! spends per request is taken from that server (etcd or MetaStore alike), and a cheaper tool
//! lets the comparison show more of the servers' own difference. On tokio's multi-thread
//! runtime a request hopped between the two workers: a requester on one, its connection's
//! task on the other, each hop a wake-up through the kernel, and work stealing moved both
//! around. At put, 256 clients, the tool made ~9,000 context switches per 30,000 puts
//! (1,000 on one thread) and spent 22–24 µs of CPU per put against 17–19 µs on one thread
//! (docs/PERFORMANCE.md, session 53). Here connection `i` and every requester on it live on
//! thread `i % threads`: a request and its answer stay on one thread, and the threads still
//! use every core.

use std::future::Future;
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// A set of threads, each running a current-thread runtime until the set is dropped. With no
/// threads, everything runs on the caller's runtime.
pub struct Shards {
    shards: Vec<Shard>,
}

/// One thread of a [`Shards`]: its runtime's handle, what stops it, and the thread.
struct Shard {
    handle: Handle,
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Shards {
    /// `n` threads named `bench-N`; `n == 0`: none (see [`Shards::none`]).
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut shards = Self::none();
        for i in 0..n {
            let rt = Builder::new_current_thread().enable_all().build()?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("bench-{i}"))
                .spawn(move || {
                    // Runs the thread's tasks until the set is dropped; the runtime's drop
                    // then drops whatever is left on it.
                    let _ = rt.block_on(stopped);
                })?;
            shards.shards.push(Shard {
                handle,
                stop,
                thread,
            });
        }
        Ok(shards)
    }

    /// No threads of its own: [`handle`](Self::handle) is always the caller's runtime.
    pub fn none() -> Self {
        Self { shards: Vec::new() }
    }

    /// Threads in the set.
    pub fn len(&self) -> usize {
        self.shards.len()
    }

    /// Whether the set has no threads of its own.
    pub fn is_empty(&self) -> bool {
        self.shards.is_empty()
    }

    /// The runtime of shard `i % len` (the caller's runtime when the set has no threads).
    /// Panics outside a tokio runtime when the set has no threads, as `Handle::current` does.
    pub fn handle(&self, i: usize) -> Handle {
        match self.shards.len() {
            0 => Handle::current(),
            n => self.shards[i % n].handle.clone(),
        }
    }

    /// Runs `fut` on shard `i % len` and waits for its output.
    pub async fn run_on<F>(&self, i: usize, fut: F) -> Result<F::Output, tokio::task::JoinError>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle(i).spawn(fut).await
    }
}

impl Drop for Shards {
    fn drop(&mut self) {
        // Every thread is told first, so that they wind down together.
        let threads: Vec<JoinHandle<()>> = self
            .shards
            .drain(..)
            .map(|s| {
                let _ = s.stop.send(());
                s.thread
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Where a connection's requesters should run: the runtime its connection's task runs on.
pub trait Placed {
    /// The runtime to spawn this connection's requesters on. Called from within a runtime.
    fn runtime(&self) -> Handle;
}

impl Placed for tonic::transport::Channel {
    /// tonic's channels run their tasks wherever they were made: the caller's runtime.
    fn runtime(&self) -> Handle {
        Handle::current()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or("").to_string()
    }

    #[tokio::test]
    async fn each_shard_runs_its_tasks_on_its_own_thread() -> anyhow::Result<()> {
        let shards = Shards::start(2)?;
        assert_eq!(shards.len(), 2);
        let mut names = Vec::new();
        for i in 0..4 {
            names.push(shards.run_on(i, async { thread_name() }).await?);
        }
        assert_eq!(names, ["bench-0", "bench-1", "bench-0", "bench-1"]);
        // A task spawned from a shard's task stays on that shard.
        let inner = shards
            .run_on(1, async { tokio::spawn(async { thread_name() }).await })
            .await??;
        assert_eq!(inner, "bench-1");
        Ok(())
    }

    #[tokio::test]
    async fn no_shards_means_the_callers_runtime() -> anyhow::Result<()> {
        let shards = Shards::none();
        assert!(shards.is_empty());
        let here = thread_name();
        assert_eq!(shards.run_on(3, async { thread_name() }).await?, here);
        Ok(())
    }

    #[test]
    fn dropping_the_set_ends_its_threads_and_their_tasks() -> anyhow::Result<()> {
        let shards = Shards::start(2)?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // A task that never ends by itself: the drop must still return, dropping it (and its
        // sender with it).
        shards.handle(0).spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await
        });
        drop(shards);
        assert!(rx.recv().is_err(), "the task's sender was dropped with it");
        Ok(())
    }
}
