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

use std::sync::Arc;

use metastore_proto::raftpb as pb;
use prost::Message;
use tokio::sync::mpsc;

use crate::apply::command::Applied;
use crate::apply::{ApplyError, Command};
use crate::mvcc;
use crate::raft::replica::Replica;
use crate::raft::thread::{Doorbell, RaftThread};
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
}

impl Proposer {
    /// Starts the batching task, on `raft_thread` when given (the [`RaftThread`] that runs
    /// openraft's core, so that handing it an entry is no hop between threads; each command
    /// rings its [`Doorbell`]). It ends once every `Proposer` clone is dropped. Every command
    /// is refused while `disk` finds the data directory's disk (nearly) full.
    pub fn start(
        replica: Arc<Replica>,
        waiters: Arc<Waiters>,
        disk: Arc<DiskGuard>,
        raft_thread: Option<&RaftThread>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let timeout = replica.timing.request_timeout();
        let batching = run(replica, waiters.clone(), rx);
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
        }
    }

    /// Commands proposed and not yet answered.
    pub fn pending(&self) -> usize {
        self.waiters.len()
    }

    /// Proposes `cmd` and waits until this member has applied it.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ApplyError> {
        self.disk.check()?;
        let (seq, rx) = self.waiters.register();
        if self.tx.send((seq, cmd)).await.is_err() {
            self.waiters.cancel(seq);
            return Err(ApplyError::Mvcc(mvcc::Error::Closed));
        }
        if let Some(bell) = &self.doorbell {
            bell.ring();
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

async fn run(replica: Arc<Replica>, waiters: Arc<Waiters>, mut rx: mpsc::Receiver<(u64, Command)>) {
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
