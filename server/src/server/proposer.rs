//! The write pipeline: commands queue here, are packed into Raft entries and replicated; each
//! client waits for the result its own member's apply step produces.
//!
//! Group commit: the batching task takes every command waiting (up to [`MAX_GROUP`]) and
//! proposes them as one entry; commands that arrive while an entry is in flight form the
//! next one. One entry costs one log fsync on each member, whatever the number of commands
//! in it.
//!
//! One entry in flight: the batching task submits an entry and waits until it is applied,
//! while the next one collects everything that arrived meanwhile. (It used to hand each entry
//! to a task of its own under a semaphore of one; submitting in place spared a spawn and a
//! wake-up per entry, ~0.04 ms of a lone put, docs/PERFORMANCE.md.) With eight in flight,
//! three apply rounds in four carried a single command and 16 clients got 6,500 puts/s
//! against 10,700 with one (docs/PERFORMANCE.md, 2026-12-02). The larger groups first
//! exposed a watch-hub bug (a replay round that also cancelled a compacted watcher marked a
//! lagging one caught up, skipping a whole group's events), fixed in `watch/hub.rs` with a
//! regression test.
//!
//! A lone write's answer, spun for: in a cluster that starts with one member, a handler whose
//! write is the only one in flight, after a group of one, polls for its answer for up to
//! `--write-answer-spin-us` (`spin_for_answer`), yielding its worker to the runtime's other
//! tasks and its core to other threads on every turn, instead of letting the worker sleep
//! until the Raft thread wakes it. The wake-up it saves waits for a core on a virtual machine
//! whose server runs in a scheduling group of its own (docs/PERFORMANCE.md, sessions 35 and
//! 38). Under load (another write in flight, or groups of several) nothing spins.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_proto::raftpb as pb;
use prost::Message;
use tokio::sync::{mpsc, oneshot};

use crate::apply::command::Applied;
use crate::apply::{ApplyError, Command};
use crate::mvcc;
use crate::raft::replica::Replica;
use crate::raft::thread::{Doorbell, RaftThread, SpinSwitch};
use crate::raft::waiters::Waiters;
use crate::storage::disk_guard::DiskGuard;

/// Most commands in one entry.
pub const MAX_GROUP: usize = 1024;
const QUEUE: usize = 8192;

/// Metrics hooks the apply step reports to.
pub trait ApplyObserver: Send + Sync {
    /// A group of `n` commands was applied.
    fn group_applied(&self, n: usize);
}

/// A handle to the write pipeline; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<(u64, Command)>,
    waiters: Arc<Waiters>,
    timeout: std::time::Duration,
    disk: Arc<DiskGuard>,
    /// The batching task's thread's bell, when it runs on a [`RaftThread`].
    doorbell: Option<Doorbell>,
    /// How a lone write waits for its answer (with a [`RaftThread`] only).
    answer_spin: Option<AnswerSpin>,
}

/// How long a lone write's handler polls for its answer (0: never), and where it counts the
/// polls by outcome (`answered`, `gave_up`; see the module docs).
pub struct AnswerSpinSettings {
    pub max: Duration,
    pub outcomes: prometheus::IntCounterVec,
}

/// When and how long a lone write's handler spins for its answer (see the module docs).
#[derive(Clone)]
struct AnswerSpin {
    max: Duration,
    /// Whether this member is alone in the cluster (the Raft thread's switch).
    alone: SpinSwitch,
    /// Commands in the group the batching task submitted last.
    last_group: Arc<AtomicUsize>,
    answered: prometheus::IntCounter,
    gave_up: prometheus::IntCounter,
}

impl AnswerSpin {
    /// Whether a write may spin (its caller also checks that it is the only one in flight):
    /// the member is alone and the last group was a single write, so writes are arriving
    /// one at a time.
    fn applies(&self) -> bool {
        self.alone.is_alone() && self.last_group.load(Ordering::Relaxed) == 1
    }
}

impl Proposer {
    /// Starts the batching task, on `raft_thread` when given (the [`RaftThread`] that runs
    /// openraft's core, so that handing it an entry is no hop between threads; each command
    /// rings its [`Doorbell`], and a lone write's handler polls for its answer as
    /// `answer_spin` says while the member is alone). It ends once every `Proposer` clone is dropped.
    /// Every command is refused while `disk` finds the data directory's disk (nearly) full.
    pub fn start(
        replica: Arc<Replica>,
        waiters: Arc<Waiters>,
        disk: Arc<DiskGuard>,
        raft_thread: Option<&RaftThread>,
        answer_spin: AnswerSpinSettings,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let timeout = replica.timing.request_timeout();
        let last_group = Arc::new(AtomicUsize::new(0));
        let batching = run(replica, waiters.clone(), rx, last_group.clone());
        match raft_thread {
            Some(t) => drop(t.handle().spawn(batching)),
            None => drop(tokio::spawn(batching)),
        }
        Self {
            tx,
            waiters,
            timeout,
            disk,
            doorbell: raft_thread.map(RaftThread::doorbell),
            answer_spin: raft_thread
                .filter(|_| !answer_spin.max.is_zero())
                .map(|t| AnswerSpin {
                    max: answer_spin.max,
                    alone: t.spin_switch(),
                    last_group,
                    answered: answer_spin.outcomes.with_label_values(&["answered"]),
                    gave_up: answer_spin.outcomes.with_label_values(&["gave_up"]),
                }),
        }
    }

    /// Commands proposed and not yet answered.
    pub fn pending(&self) -> usize {
        self.waiters.len()
    }

    /// Proposes `cmd` and waits until this member has applied it.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ApplyError> {
        self.disk.check()?;
        let (seq, mut rx) = self.waiters.register();
        if self.tx.send((seq, cmd)).await.is_err() {
            self.waiters.cancel(seq);
            return Err(ApplyError::Mvcc(mvcc::Error::Closed));
        }
        if let Some(bell) = &self.doorbell {
            bell.ring();
        }
        if let Some(spin) = &self.answer_spin {
            let lone = || self.pending() <= 1;
            if spin.applies() && lone() {
                match spin_for_answer(&mut rx, spin.max, lone).await {
                    Spun::Answered(r) => {
                        spin.answered.inc();
                        return r;
                    }
                    Spun::SenderGone => return Err(ApplyError::Mvcc(mvcc::Error::Closed)),
                    Spun::GaveUp => spin.gave_up.inc(),
                }
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(ApplyError::Mvcc(mvcc::Error::Closed)),
            Err(_) => {
                self.waiters.cancel(seq);
                Err(ApplyError::Timeout)
            }
        }
    }
}

/// How [`spin_for_answer`] ended.
#[derive(Debug, PartialEq)]
enum Spun<T> {
    /// The answer came (and was taken: the receiver must not be awaited again).
    Answered(T),
    /// The sender was dropped without an answer (the receiver is done too).
    SenderGone,
    /// The time ran out or another write came; the receiver still waits for the answer.
    GaveUp,
}

/// Polls `rx` for up to `max` while `lone()` holds, yielding the core to other threads
/// (`sched_yield`) and the worker to the runtime's other tasks and its I/O (`yield_now`) on
/// every turn.
async fn spin_for_answer<T>(
    rx: &mut oneshot::Receiver<T>,
    max: Duration,
    mut lone: impl FnMut() -> bool,
) -> Spun<T> {
    use oneshot::error::TryRecvError;
    let end = Instant::now() + max;
    loop {
        match rx.try_recv() {
            Ok(v) => return Spun::Answered(v),
            Err(TryRecvError::Closed) => return Spun::SenderGone,
            Err(TryRecvError::Empty) => {}
        }
        if Instant::now() >= end || !lone() {
            return Spun::GaveUp;
        }
        std::thread::yield_now();
        tokio::task::yield_now().await;
    }
}

async fn run(
    replica: Arc<Replica>,
    waiters: Arc<Waiters>,
    mut rx: mpsc::Receiver<(u64, Command)>,
    last_group: Arc<AtomicUsize>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        // Take what queued up while the previous entry was in flight.
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let seqs: Vec<u64> = group.iter().map(|(s, _)| *s).collect();
        last_group.store(seqs.len(), Ordering::Relaxed);
        let batch = pb::CommandBatch {
            proposals: group
                .drain(..)
                .map(|(seq, cmd)| pb::Proposal {
                    origin: replica.member_id,
                    seq,
                    command: Some(crate::raft::codec::command_to_pb(cmd)),
                })
                .collect(),
        };
        // One entry in flight: submitted here, and the next group is collected once it is
        // applied.
        if let Err(e) = replica.submit(batch.encode_to_vec().into()).await {
            let msg = e.to_string();
            for seq in seqs {
                let err = match &e {
                    ApplyError::NoLeader => ApplyError::NoLeader,
                    ApplyError::Mvcc(mvcc::Error::Closed) => ApplyError::Mvcc(mvcc::Error::Closed),
                    _ => ApplyError::Raft(msg.trim_start_matches("etcdserver: ").to_string()),
                };
                waiters.complete(seq, Err(err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_from_another_thread_is_taken_by_the_spin() -> anyhow::Result<()> {
        let (tx, mut rx) = oneshot::channel::<u32>();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let _ = tx.send(7);
        });
        let start = Instant::now();
        let got = spin_for_answer(&mut rx, Duration::from_secs(60), || true).await;
        let took = start.elapsed();
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))?;
        assert_eq!(got, Spun::Answered(7));
        assert!(took >= Duration::from_millis(20), "{took:?}");
        assert!(took < Duration::from_secs(30), "{took:?}");
        Ok(())
    }

    #[tokio::test]
    async fn the_spin_lets_the_runtimes_other_tasks_run() {
        // One thread: the answer comes from a task that runs only if the spin yields to the
        // runtime (as a worker's sockets are polled only then).
        let (tx, mut rx) = oneshot::channel::<u32>();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            let _ = tx.send(9);
        });
        let got = spin_for_answer(&mut rx, Duration::from_secs(60), || true).await;
        assert_eq!(got, Spun::Answered(9));
    }

    #[tokio::test]
    async fn the_spin_gives_up_when_its_time_is_out_or_another_write_comes() {
        let (tx, mut rx) = oneshot::channel::<u32>();
        let start = Instant::now();
        assert_eq!(
            spin_for_answer(&mut rx, Duration::from_millis(20), || true).await,
            Spun::GaveUp
        );
        assert!(start.elapsed() >= Duration::from_millis(20));

        // Another write in flight from the third look on: the spin stops there, long before
        // its minute.
        let mut looks = 0;
        let start = Instant::now();
        let got = spin_for_answer(&mut rx, Duration::from_secs(60), || {
            looks += 1;
            looks < 3
        })
        .await;
        assert_eq!(got, Spun::GaveUp);
        assert_eq!(looks, 3);
        assert!(start.elapsed() < Duration::from_secs(30));

        // Nothing was lost: the answer still comes the usual way.
        let _ = tx.send(5);
        assert_eq!(rx.await.ok(), Some(5));
    }

    #[test]
    fn only_a_member_alone_writing_one_at_a_time_spins() -> anyhow::Result<()> {
        let thread = RaftThread::start(Duration::ZERO)?;
        let spin = AnswerSpin {
            max: Duration::from_micros(400),
            alone: thread.spin_switch(),
            last_group: Arc::new(AtomicUsize::new(0)),
            answered: prometheus::IntCounter::new("answered", "test")?,
            gave_up: prometheus::IntCounter::new("gave_up", "test")?,
        };
        assert!(!spin.applies(), "nothing submitted yet");
        spin.last_group.store(1, Ordering::Relaxed);
        assert!(spin.applies());
        spin.last_group.store(5, Ordering::Relaxed);
        assert!(!spin.applies(), "groups of several: under load");
        spin.last_group.store(1, Ordering::Relaxed);
        spin.alone.set(false);
        assert!(!spin.applies(), "other members answer without the bell");
        Ok(())
    }

    #[tokio::test]
    async fn a_dropped_sender_ends_the_spin_with_an_error() {
        let (tx, mut rx) = oneshot::channel::<u32>();
        drop(tx);
        let got = spin_for_answer(&mut rx, Duration::from_secs(60), || true).await;
        assert_eq!(got, Spun::SenderGone);
    }
}
