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
//! When it runs out of work, the thread keeps its core for a while (`--raft-idle-spin-us`,
//! yielding it to any other thread that wants it) before it sleeps: a command handed to it
//! in that time, which rings its [`Doorbell`], starts at once instead of after a wake-up,
//! which on a virtual machine with a busy neighbour can take longer than the log's sync
//! (docs/PERFORMANCE.md, session 37: a put at one client 0.43 -> 0.33 ms). Other wake-ups
//! (timers, openraft calls that are not proposals) wait at most the rest of a spin. The spin
//! stops while the cluster has more than one member, whose replies the bell does not
//! announce.
//!
//! Only for a cluster that starts with one member: with peers, the leader's core, apply
//! and replication on one thread cost 3-member clusters ~5 % of their put rate, so there
//! openraft shares the server's workers as before. A one-member cluster that grows by
//! `member add` keeps the thread; its peer connections then run on the server's workers
//! ([`Peers::spawning_on`](super::network::Peers::spawning_on)).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// Rung by whoever hands the Raft thread work from another thread; ends its idle spin.
#[derive(Clone, Default)]
pub struct Doorbell(Arc<AtomicU64>);

impl Doorbell {
    /// Announces work (call it after the work is queued).
    pub fn ring(&self) {
        self.0.fetch_add(1, Ordering::Release);
    }

    /// Waits, yielding the core on every turn, until the bell rings or `max` has passed;
    /// returns whether it rang.
    pub fn spin(&self, max: Duration) -> bool {
        let seen = self.0.load(Ordering::Acquire);
        let start = Instant::now();
        loop {
            if self.0.load(Ordering::Acquire) != seen {
                return true;
            }
            if start.elapsed() >= max {
                return false;
            }
            std::thread::yield_now();
        }
    }
}

/// A thread running a current-thread tokio runtime until the value is dropped. Dropping it
/// drops the tasks still on it (after Raft has shut down, none should be) on that thread.
pub struct RaftThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
    doorbell: Doorbell,
    spin: SpinSwitch,
}

/// Turns a [`RaftThread`]'s idle spin off and back on (if it was configured), by whether this
/// member is alone in the cluster; the write handlers' answer spin
/// ([`Proposer`](crate::server::proposer::Proposer)) follows the same switch.
#[derive(Clone)]
pub struct SpinSwitch {
    alone: Arc<AtomicBool>,
    configured: bool,
}

impl SpinSwitch {
    /// `false` while the cluster has other members, whose replies reach the thread without
    /// its bell; `true` again when this member is alone.
    pub fn set(&self, alone: bool) {
        self.alone.store(alone, Ordering::Relaxed);
    }

    /// Whether the thread spins when it runs out of work.
    pub fn is_on(&self) -> bool {
        self.configured && self.is_alone()
    }

    /// Whether the membership holds this member alone (as last [`set`](Self::set)).
    pub fn is_alone(&self) -> bool {
        self.alone.load(Ordering::Relaxed)
    }
}

impl RaftThread {
    /// Starts the thread. With `idle_spin` above zero, the thread spins that long for its
    /// [`Doorbell`] each time it runs out of work, before it sleeps.
    pub fn start(idle_spin: Duration) -> std::io::Result<Self> {
        let doorbell = Doorbell::default();
        let spin = SpinSwitch {
            alone: Arc::new(AtomicBool::new(true)),
            configured: !idle_spin.is_zero(),
        };
        let (bell, switch) = (doorbell.clone(), spin.clone());
        // Called each time the runtime finds no task to run, before it sleeps; a wake-up
        // that came meanwhile makes the sleep return at once.
        let rt = Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || {
                if switch.is_on() {
                    bell.spin(idle_spin);
                }
            })
            .build()?;
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
            doorbell,
            spin,
        })
    }

    /// The bell to ring after handing the thread work.
    pub fn doorbell(&self) -> Doorbell {
        self.doorbell.clone()
    }

    /// The switch of the idle spin.
    pub fn spin_switch(&self) -> SpinSwitch {
        self.spin.clone()
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
        let thread = RaftThread::start(Duration::from_micros(200))?;
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

    #[test]
    fn a_spin_ends_when_the_bell_rings_and_not_before() -> anyhow::Result<()> {
        let bell = Doorbell::default();
        // Not rung: the spin lasts its whole length and reports that.
        let start = Instant::now();
        assert!(!bell.spin(Duration::from_millis(20)));
        assert!(start.elapsed() >= Duration::from_millis(20));

        // Rung by another thread 50 ms in: the spin ends there, long before its 60 s.
        let ringer = bell.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            ringer.ring();
        });
        let start = Instant::now();
        assert!(bell.spin(Duration::from_secs(60)));
        let took = start.elapsed();
        t.join().map_err(|_| anyhow::anyhow!("ringer panicked"))?;
        assert!(
            took >= Duration::from_millis(50),
            "ended before the ring: {took:?}"
        );
        assert!(took < Duration::from_secs(30), "missed the ring: {took:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_spinning_thread_still_runs_work_that_does_not_ring() -> anyhow::Result<()> {
        // A spin far longer than the test: a task woken from another thread without the bell
        // (a timer here, a peer's reply in a grown cluster) runs once the spin is turned off.
        let thread = RaftThread::start(Duration::from_secs(3600))?;
        let (tx, rx) = oneshot::channel::<()>();
        let done = thread.handle().spawn(async move {
            let _ = rx.await;
        });
        // Let the thread go idle and start spinning.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = tx.send(());
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !done.is_finished(),
            "the spin should hold the woken task back"
        );
        thread.spin_switch().set(false);
        // The spin in progress still has to end: the bell does that.
        thread.doorbell().ring();
        tokio::time::timeout(Duration::from_secs(10), done).await??;
        Ok(())
    }

    #[test]
    fn the_switch_tells_alone_apart_from_spinning() -> anyhow::Result<()> {
        // No idle spin configured: the thread never spins, but whether the member is alone
        // is still known (the write handlers' answer spin follows it).
        let quiet = RaftThread::start(Duration::ZERO)?;
        let switch = quiet.spin_switch();
        assert!(switch.is_alone() && !switch.is_on());
        switch.set(false);
        assert!(!switch.is_alone() && !switch.is_on());

        let spinning = RaftThread::start(Duration::from_micros(200))?;
        let switch = spinning.spin_switch();
        assert!(switch.is_alone() && switch.is_on());
        switch.set(false);
        assert!(!switch.is_alone() && !switch.is_on());
        switch.set(true);
        assert!(switch.is_on());
        Ok(())
    }
}
