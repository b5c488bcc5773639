//! The Raft log and vote, in the engine's `RaftLog` and `RaftState` tables.
//!
//! Entries are keyed by `be64(index)` and stored as `raftpb.Entry`. [`append`](LogStore::append)
//! writes and syncs the entries in one step, on the calling task, and only then tells openraft
//! they are flushed, which is when they count toward a commit. openraft's core waits for that
//! before it goes on (`append_to_log`), so an append has nothing to overlap with: a flusher
//! thread that grouped syncs (until 2026-12-03) only added two cross-thread wake-ups to every
//! write, and handing the worker's other tasks away for the sync (`block_in_place`) one more
//! (docs/PERFORMANCE.md). The vote is written with fsync before it is acknowledged.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use metastore_proto::raftpb as pb;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError};
use prost::Message;

use super::codec;
use super::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::storage::{Engine, Table, WriteBatch};

const KEY_VOTE: &[u8] = b"vote";
const KEY_PURGED: &[u8] = b"purged";
const KEY_COMMITTED: &[u8] = b"committed";

fn index_key(index: u64) -> Vec<u8> {
    index.to_be_bytes().to_vec()
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_logs(openraft::AnyError::error(e.to_string())).into()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_logs(openraft::AnyError::error(e.to_string())).into()
}

#[derive(Debug, Default, Clone, Copy)]
struct Bounds {
    last_purged: Option<LogId>,
    last_log: Option<LogId>,
}

struct Inner {
    engine: Arc<dyn Engine>,
    fsync: bool,
    bounds: Mutex<Bounds>,
    /// The last committed id openraft reported, written with the next append rather than on
    /// its own (see [`save_committed`](RaftLogStorage::save_committed)).
    committed: Mutex<Option<Option<LogId>>>,
}

/// The log store; clones share it (openraft uses one as the reader).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl LogStore {
    /// Opens the log kept in `engine`.
    pub fn open(engine: Arc<dyn Engine>, fsync: bool) -> Result<Self, StorageError> {
        let last_purged = read_log_id(engine.as_ref(), KEY_PURGED)?;
        let mut last_log = None;
        {
            let snap = engine.snapshot();
            let mut it = snap.iter(Table::RaftLog);
            it.seek(&[]);
            // The log holds at most a snapshot interval's worth of entries: find its end once.
            let mut last_value = None;
            while it.valid() {
                last_value = Some(it.value().to_vec());
                it.next();
            }
            it.status().map_err(read_err)?;
            if let Some(v) = last_value {
                last_log = Some(codec::decode_entry(&v).map_err(read_err)?.log_id);
            }
        }
        if last_log.is_none() {
            last_log = last_purged;
        }
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                fsync,
                bounds: Mutex::new(Bounds {
                    last_purged,
                    last_log,
                }),
                committed: Mutex::new(None),
            }),
        })
    }

    fn bounds(&self) -> Result<Bounds, StorageError> {
        self.inner
            .bounds
            .lock()
            .map(|b| *b)
            .map_err(|_| read_err("log state lock poisoned"))
    }

    fn set_bounds(&self, f: impl FnOnce(&mut Bounds)) -> Result<(), StorageError> {
        let mut b = self
            .inner
            .bounds
            .lock()
            .map_err(|_| write_err("log state lock poisoned"))?;
        f(&mut b);
        Ok(())
    }

    /// Entries in `[start, end)`, in order.
    fn read_range(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        let snap = self.inner.engine.snapshot();
        let mut it = snap.iter(Table::RaftLog);
        it.seek(&index_key(start));
        while it.valid() {
            let key: [u8; 8] = it.key().try_into().map_err(|_| read_err("bad log key"))?;
            if u64::from_be_bytes(key) >= end {
                break;
            }
            out.push(codec::decode_entry(it.value()).map_err(read_err)?);
            it.next();
        }
        it.status().map_err(read_err)?;
        Ok(out)
    }
}

/// Deletes the entries with index in `[from, to)`: one range deletion, not a delete per
/// entry. openraft's core waits for a purge, and deleting the 95,000 entries a snapshot
/// releases one by one held every put for the iteration and a ~2 MB write
/// (docs/PERFORMANCE.md, session 27).
fn delete_entries(batch: &mut WriteBatch, from: u64, to: u64) {
    batch.delete_range(Table::RaftLog, index_key(from), Some(index_key(to)));
}

fn read_log_id(engine: &dyn Engine, key: &[u8]) -> Result<Option<LogId>, StorageError> {
    match engine.get(Table::RaftState, key).map_err(read_err)? {
        None => Ok(None),
        Some(v) => Ok(Some(codec::log_id_from_pb(
            &pb::LogId::decode(v.as_slice()).map_err(read_err)?,
        ))),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.read_range(start, end)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let b = self.bounds()?;
        Ok(LogState {
            last_purged_log_id: b.last_purged,
            last_log_id: b.last_log,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let mut b = WriteBatch::new();
        b.put(
            Table::RaftState,
            KEY_VOTE.to_vec(),
            codec::vote_to_pb(vote).encode_to_vec(),
        );
        self.inner
            .engine
            .write(b, self.inner.fsync)
            .map_err(|e| StorageIOError::write_vote(openraft::AnyError::error(e.to_string())))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        match self
            .inner
            .engine
            .get(Table::RaftState, KEY_VOTE)
            .map_err(read_err)?
        {
            None => Ok(None),
            Some(v) => Ok(Some(codec::vote_from_pb(
                &pb::Vote::decode(v.as_slice()).map_err(read_err)?,
            ))),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Kept in memory and written with the next append: a write of its own sat between
        // every log fsync and the apply that followed. The stored id is a hint that may
        // trail (openraft re-applies from the last applied entry up to it on a restart), never
        // one ahead of what was committed.
        *self
            .inner
            .committed
            .lock()
            .map_err(|_| write_err("log state lock poisoned"))? = Some(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let pending = *self
            .inner
            .committed
            .lock()
            .map_err(|_| read_err("log state lock poisoned"))?;
        match pending {
            Some(c) => Ok(c),
            None => read_log_id(self.inner.engine.as_ref(), KEY_COMMITTED),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut b = WriteBatch::new();
        let mut last = None;
        for e in entries {
            b.put(
                Table::RaftLog,
                index_key(e.log_id.index),
                codec::encode_entry(&e),
            );
            last = Some(e.log_id);
        }
        if last.is_some() {
            let committed = self
                .inner
                .committed
                .lock()
                .map_err(|_| write_err("log state lock poisoned"))?
                .take();
            match committed {
                Some(Some(c)) => b.put(
                    Table::RaftState,
                    KEY_COMMITTED.to_vec(),
                    codec::log_id_to_pb(&c).encode_to_vec(),
                ),
                Some(None) => b.delete(Table::RaftState, KEY_COMMITTED.to_vec()),
                None => {}
            }
        }
        let engine = &self.inner.engine;
        let written = if b.is_empty() {
            // Nothing new; still make what was written before durable, as promised.
            if self.inner.fsync {
                engine.sync()
            } else {
                Ok(())
            }
        } else {
            engine.write(b, self.inner.fsync)
        };
        if let Some(last) = last.filter(|_| written.is_ok()) {
            self.set_bounds(|bounds| bounds.last_log = Some(last))?;
        }
        callback.log_io_completed(
            written
                .as_ref()
                .map(|_| ())
                .map_err(|e| std::io::Error::other(e.to_string())),
        );
        written.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut b = WriteBatch::new();
        delete_entries(&mut b, log_id.index, u64::MAX);
        self.inner
            .engine
            .write(b, self.inner.fsync)
            .map_err(write_err)?;
        let prev = if log_id.index == 0 {
            None
        } else {
            self.read_range(log_id.index - 1, log_id.index)?
                .pop()
                .map(|e| e.log_id)
        };
        let purged = self.bounds()?.last_purged;
        self.set_bounds(|bounds| bounds.last_log = prev.or(purged))
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = self.bounds()?.last_purged.map_or(0, |p| p.index + 1);
        let mut b = WriteBatch::new();
        b.put(
            Table::RaftState,
            KEY_PURGED.to_vec(),
            codec::log_id_to_pb(&log_id).encode_to_vec(),
        );
        delete_entries(&mut b, from, log_id.index + 1);
        self.inner.engine.write(b, false).map_err(write_err)?;
        self.set_bounds(|bounds| {
            bounds.last_purged = Some(log_id);
            if bounds.last_log.is_none_or(|l| l.index < log_id.index) {
                bounds.last_log = Some(log_id);
            }
        })
    }
}

#[cfg(test)]
mod tests;
