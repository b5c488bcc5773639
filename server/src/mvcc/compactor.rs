//! Physical compaction: removing history below a revision, in the background.
//!
//! Compacting at `to` (after a previous compaction at `from`) keeps, for every key, the newest
//! version at or below `to` unless it is a tombstone, and removes everything older. Only keys
//! changed in `(from, to]` can have anything to remove (older history went at `from`), so the
//! work walks the revision log over `(from, to]` in chunks, never the whole key space. Each
//! chunk is one atomic batch; `compact_finished` is written last. A crash mid-way is harmless:
//! the rerun from `compact_finished` makes the same decisions and removes what is left.

use std::collections::BTreeSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::key_codec::{rev_key, split_rev_key};
use super::store::{is_tombstone, put_meta_i64, META_COMPACT_FINISHED};
use super::versions::Versions;
use super::{Error, Result};
use crate::storage::{Engine, Table, WriteBatch};
use crate::worker::ChannelWorker;

/// Distinct keys handled per batch.
const CHUNK_KEYS: usize = 1000;

/// A scheduled compaction; [`Compactor::wait`] resolves once it is physically done.
#[derive(Clone, Debug)]
pub struct CompactTicket {
    rev: i64,
}

impl CompactTicket {
    pub(crate) fn new(rev: i64) -> Self {
        Self { rev }
    }

    pub fn revision(&self) -> i64 {
        self.rev
    }
}

/// The background compaction worker.
/// Dropping it stops the thread and waits for it (`worker::ChannelWorker`).
pub struct Compactor {
    worker: ChannelWorker<i64>,
    finished: watch::Receiver<i64>,
}

impl Compactor {
    /// `background` is the store's lock for background rewrites, held per chunk.
    pub(crate) fn start(
        engine: Arc<dyn Engine>,
        finished: i64,
        background: Arc<Mutex<()>>,
    ) -> Result<Self> {
        let (done_tx, done_rx) = watch::channel(finished);
        let worker = ChannelWorker::spawn("compactor", move |rx: mpsc::Receiver<i64>| {
            let mut from = finished;
            while let Ok(to) = rx.recv() {
                if to <= from {
                    continue;
                }
                match compact_locked(engine.as_ref(), from, to, &background) {
                    Ok(removed) => {
                        tracing::info!(from, to, removed, "compaction finished");
                        from = to;
                        done_tx.send_replace(to);
                    }
                    Err(e) => tracing::error!(from, to, error = %e, "compaction failed"),
                }
            }
        })
        .map_err(|e| Error::Corrupt(format!("cannot start compactor: {e}")))?;
        Ok(Self {
            worker,
            finished: done_rx,
        })
    }

    pub(crate) fn schedule(&self, t: CompactTicket) {
        self.worker.send(t.rev);
    }

    /// The revision up to which history is physically removed.
    pub fn finished(&self) -> i64 {
        *self.finished.borrow()
    }

    /// Waits until compaction at `ticket`'s revision (or later) is physically done.
    pub async fn wait(&self, ticket: &CompactTicket) {
        let mut rx = self.finished.clone();
        let _ = rx.wait_for(|done| *done >= ticket.rev).await;
    }
}

/// Removes history in `(from, to]` as described in the module docs. Returns entries removed.
/// The caller must hold the engine exclusively (offline tools).
pub(crate) fn compact(engine: &dyn Engine, from: i64, to: i64) -> Result<usize> {
    compact_locked(engine, from, to, &Mutex::new(()))
}

/// [`compact`], holding `background` for each chunk from its snapshot to its write, so that
/// the online re-encoder never rewrites a record this removes.
fn compact_locked(
    engine: &dyn Engine,
    from: i64,
    to: i64,
    background: &Mutex<()>,
) -> Result<usize> {
    let mut cursor = rev_key(from + 1, 0);
    let end = rev_key(to + 1, 0);
    let mut removed = 0;
    loop {
        let _chunk = background.lock().map_err(|_| Error::Closed)?;
        let snap = engine.snapshot();
        let mut keys = BTreeSet::new();
        let mut it = snap.iter(Table::Rev);
        it.seek(&cursor);
        let mut more = false;
        while it.valid() && it.key() < end.as_slice() {
            if keys.len() == CHUNK_KEYS && !keys.contains(it.value()) {
                more = true;
                cursor = it.key().to_vec();
                break;
            }
            keys.insert(it.value().to_vec());
            it.next();
        }
        it.status()?;
        drop(it);

        let mut batch = WriteBatch::new();
        for key in &keys {
            let mut versions = Versions::at(snap.as_ref(), key, to);
            let mut newest = true;
            while let Some(version) = versions.current()? {
                let remove = !newest || is_tombstone(version.record)?;
                newest = false;
                if remove {
                    batch.delete(Table::Kv, version.raw_key.to_vec());
                    if let Some(rk) = find_rev_entry(snap.as_ref(), version.rev, key)? {
                        batch.delete(Table::Rev, rk);
                    }
                    removed += 1;
                }
                versions.next();
            }
        }
        if !more {
            put_meta_i64(&mut batch, META_COMPACT_FINISHED, to);
            engine.write(batch, true)?;
            return Ok(removed);
        }
        engine.write(batch, false)?;
    }
}

/// The revision-log entry of `key`'s version at main revision `rev`.
fn find_rev_entry(
    snap: &dyn crate::storage::Snapshot,
    rev: i64,
    key: &[u8],
) -> Result<Option<Vec<u8>>> {
    let mut it = snap.iter(Table::Rev);
    it.seek(&rev_key(rev, 0));
    while it.valid() {
        match split_rev_key(it.key()) {
            Some((main, _)) if main == rev => {
                if it.value() == key {
                    return Ok(Some(it.key().to_vec()));
                }
            }
            _ => break,
        }
        it.next();
    }
    it.status()?;
    Ok(None)
}
