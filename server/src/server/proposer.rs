//! The write pipeline: commands queue here and one thread applies them in groups.
//!
//! Group commit: the apply thread takes every command waiting (up to [`MAX_GROUP`]), applies
//! them one after another (each its own revision), then fsyncs once and answers them all. With
//! one client that is one fsync per write; with many, the fsync is shared, which is where
//! throughput under concurrency comes from. Raft will sit in front of the same apply step.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::apply::command::Applied;
use crate::apply::{self, ApplyError, Command, LeaseLookup};
use crate::mvcc::{self, Store};
use crate::watch::WatchHub;

/// Most commands applied before one fsync.
pub const MAX_GROUP: usize = 1024;
const QUEUE: usize = 8192;

type Reply = oneshot::Sender<Result<Applied, ApplyError>>;

/// A handle to the write pipeline; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<(Command, Reply)>,
}

/// The apply thread, to wait for when the server stops.
pub struct ApplyThread {
    handle: std::thread::JoinHandle<()>,
    done: std::sync::mpsc::Receiver<()>,
}

impl ApplyThread {
    /// Waits up to `timeout` for the thread to end (it ends, releasing the store, once every
    /// `Proposer` is dropped). Returns whether it ended. Bounded, so that a task somewhere still
    /// holding the node cannot hang a shutdown.
    pub fn join_timeout(self, timeout: std::time::Duration) -> bool {
        match self.done.recv_timeout(timeout) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = self.handle.join();
                true
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => false,
        }
    }
}

/// Metrics hooks the pipeline reports to.
pub trait ApplyObserver: Send + Sync {
    /// A group of `n` commands was applied and made durable.
    fn group_applied(&self, n: usize);
}

impl Proposer {
    /// Starts the apply thread over `store`. The thread ends once every `Proposer` clone is
    /// dropped; join the returned handle to know the store is released.
    pub fn start(
        store: Arc<Store>,
        leases: Arc<dyn LeaseLookup + Send + Sync>,
        observer: Arc<dyn ApplyObserver>,
        watch: Arc<WatchHub>,
    ) -> std::io::Result<(Self, ApplyThread)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (done_tx, done) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("apply".into())
            .spawn(move || {
                // `run` owns the store; it is released when `run` returns, then we signal.
                run(store, leases, observer, watch, rx);
                let _ = done_tx.send(());
            })?;
        Ok((Self { tx }, ApplyThread { handle, done }))
    }

    /// Proposes `cmd` and waits until it is applied and durable.
    pub async fn propose(&self, cmd: Command) -> Result<Applied, ApplyError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((cmd, reply))
            .await
            .map_err(|_| ApplyError::Mvcc(mvcc::Error::Closed))?;
        rx.await
            .map_err(|_| ApplyError::Mvcc(mvcc::Error::Closed))?
    }
}

fn run(
    store: Arc<Store>,
    leases: Arc<dyn LeaseLookup + Send + Sync>,
    observer: Arc<dyn ApplyObserver>,
    watch: Arc<WatchHub>,
    mut rx: mpsc::Receiver<(Command, Reply)>,
) {
    let mut events = Vec::new();
    let mut group: Vec<(Command, Reply)> = Vec::with_capacity(MAX_GROUP);
    let mut results: Vec<(Reply, Result<Applied, ApplyError>)> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.blocking_recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let n = group.len();
        match store.applier() {
            Err(e) => {
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(ApplyError::Mvcc(mvcc::Error::Closed)));
                }
                tracing::error!(error = %e, "store closed; apply thread stops");
                return;
            }
            Ok(mut applying) => {
                let mut index = store.applied_index();
                for (cmd, reply) in group.drain(..) {
                    index += 1;
                    let r = apply::apply(&mut applying, index, &cmd, leases.as_ref());
                    results.push((reply, r));
                }
                match applying.publish() {
                    Ok(rev) => {
                        // Watchers see a revision only once it is durable, like readers.
                        for (_, r) in results.iter_mut() {
                            if let Ok(applied) = r {
                                events.append(&mut applied.events);
                            }
                        }
                        if !events.is_empty() {
                            watch.notify(&events, rev);
                            events.clear();
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "making writes durable failed");
                        let msg = e.to_string();
                        for (_, r) in results.iter_mut() {
                            if r.is_ok() {
                                *r = Err(ApplyError::Mvcc(mvcc::Error::Storage(
                                    crate::storage::Error::Engine(msg.clone()),
                                )));
                            }
                        }
                    }
                }
            }
        }
        for (reply, r) in results.drain(..) {
            let _ = reply.send(r);
        }
        observer.group_applied(n);
    }
}
