//! The Raft log and vote.
//!
//! The vote (and, with the log in the engine, the purged and committed ids) is in the engine's
//! `RaftState` table. The entries are in one of two places ([`Placement`]):
//! - **the log's own segments** ([`wal`](super::wal)), the default on RocksDB: written in place
//!   in preallocated files, which syncs without a file-system journal commit, and kept out of
//!   RocksDB's memtables and compactions. The most recent entries are also kept decoded in
//!   memory (up to [`RECENT_BYTES`]), since openraft reads each entry back to apply it (and to
//!   send it to followers) right after writing it.
//! - **the engine's `RaftLog` table**, keyed by `be64(index)`: with the memory engine, and on
//!   RocksDB with `--raft-log-store engine` (how the log was kept before session 32).
//!
//! Either way [`append`](LogStore::append) writes and syncs the entries in one step, on the
//! calling task, and only then tells openraft they are flushed, which is when they count toward
//! a commit. openraft's core waits for that before it goes on (`append_to_log`), so an append
//! has nothing to overlap with: a flusher thread that grouped syncs (until 2026-12-03) only
//! added two cross-thread wake-ups to every write, and handing the worker's other tasks away
//! for the sync (`block_in_place`) one more (docs/PERFORMANCE.md). The vote is written with
//! fsync before it is acknowledged.
//!
//! Opening a log in one place moves whatever the other place holds into it first
//! ([`LogStore::open_at`]), so that the choice can change between restarts, both ways.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use metastore_proto::raftpb as pb;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{LogState, RaftLogReader, StorageIOError};
use prost::Message;

use super::codec;
use super::wal::{Record, SyncObserver, Wal, WalOptions};
use super::{Entry, LogId, StorageError, TypeConfig, Vote};
use crate::storage::{Engine, Table, WriteBatch};
use crate::worker::Reaper;

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

/// Where the entries are kept.
#[derive(Debug, Clone)]
pub enum Placement {
    /// In the engine's `RaftLog` table; a log of its own left in `wal_dir` (by an earlier
    /// start) is moved in first.
    Engine { wal_dir: Option<PathBuf> },
    /// In segments of the log's own in `dir`; entries in the engine's table are moved out
    /// first. `direct_io`: see [`WalOptions::direct_io`].
    Wal {
        dir: PathBuf,
        segment_bytes: u64,
        direct_io: bool,
    },
}

/// How many bytes of recent entries a log of its own keeps decoded in memory.
pub const RECENT_BYTES: usize = 16 << 20;

/// The log's own segments, with the newest entries decoded.
struct WalLog {
    wal: Wal,
    recent: Mutex<Recent>,
    /// Frees what a purge let go of (the deleted segments, the entries no longer kept). Done
    /// on the Raft thread, that stalled every write for 30–40 ms once per snapshot
    /// (docs/PERFORMANCE.md, session 43).
    reaper: Reaper,
}

/// The newest entries, contiguous, within [`RECENT_BYTES`] (the last append's always).
#[derive(Default)]
struct Recent {
    entries: VecDeque<Entry>,
    bytes: usize,
}

fn entry_bytes(e: &Entry) -> usize {
    match &e.payload {
        openraft::EntryPayload::Normal(b) => b.0.len() + 64,
        _ => 256,
    }
}

impl WalLog {
    fn recent(&self) -> Result<std::sync::MutexGuard<'_, Recent>, StorageError> {
        self.recent
            .lock()
            .map_err(|_| read_err("log cache lock poisoned"))
    }
}

impl Recent {
    fn first(&self) -> Option<u64> {
        self.entries.front().map(|e| e.log_id.index)
    }

    fn push(&mut self, entries: &[Entry]) {
        if self
            .entries
            .back()
            .zip(entries.first())
            .is_some_and(|(b, f)| b.log_id.index + 1 != f.log_id.index)
        {
            self.clear();
        }
        for e in entries {
            self.bytes += entry_bytes(e);
            self.entries.push_back(e.clone());
        }
        while self.bytes > RECENT_BYTES && self.entries.len() > entries.len() {
            self.remove(..1);
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Where the entry at `index` is, or would go (the entries are contiguous).
    fn position(&self, index: u64) -> usize {
        self.entries.partition_point(|e| e.log_id.index < index)
    }

    fn remove(&mut self, range: impl std::ops::RangeBounds<usize>) {
        for e in self.entries.drain(range) {
            self.bytes -= entry_bytes(&e);
        }
    }

    /// Drops the entries from `from` on.
    fn truncate(&mut self, from: u64) {
        self.remove(self.position(from)..);
    }

    /// Takes out the entries up to `upto` and returns them.
    fn purge(&mut self, upto: u64) -> Vec<Entry> {
        let gone: Vec<Entry> = self
            .entries
            .drain(..self.position(upto.saturating_add(1)))
            .collect();
        self.bytes -= gone.iter().map(entry_bytes).sum::<usize>();
        gone
    }
}

struct Inner {
    engine: Arc<dyn Engine>,
    fsync: bool,
    /// The log's own segments, if the entries are kept there rather than in the engine.
    wal: Option<WalLog>,
    /// Told how long each synced append to the engine took (the segments time their own).
    engine_on_sync: OnceLock<SyncObserver>,
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
    /// Opens the log kept in `engine`'s tables.
    pub fn open(engine: Arc<dyn Engine>, fsync: bool) -> Result<Self, StorageError> {
        Self::open_at(engine, fsync, Placement::Engine { wal_dir: None })
    }

    /// Opens the log kept where `placement` says, moving the entries the other place holds
    /// there first. A move is safe to interrupt: the new copy is made complete before the old
    /// one is removed, and a start after a crash finishes it.
    pub fn open_at(
        engine: Arc<dyn Engine>,
        fsync: bool,
        placement: Placement,
    ) -> Result<Self, StorageError> {
        let wal = match placement {
            Placement::Engine { wal_dir } => {
                if let Some(dir) = wal_dir {
                    move_wal_into_engine(engine.as_ref(), &dir)?;
                }
                None
            }
            Placement::Wal {
                dir,
                segment_bytes,
                direct_io,
            } => {
                let opts = WalOptions {
                    segment_bytes,
                    fsync,
                    direct_io,
                };
                Some(WalLog {
                    wal: open_wal_moving_engine_log(engine.as_ref(), &dir, opts)?,
                    recent: Mutex::new(Recent::default()),
                    reaper: Reaper::spawn("raft-log-reaper").map_err(read_err)?,
                })
            }
        };
        let (last_purged, last_log) = match &wal {
            None => engine_bounds(engine.as_ref())?,
            Some(w) => {
                let st = w.wal.state();
                let last_purged = st
                    .purged
                    .as_ref()
                    .map(|(_, m)| decode_log_id(m))
                    .transpose()?;
                let last_log = match st.entries {
                    Some((_, last)) => w
                        .wal
                        .read(last, last + 1)
                        .map_err(read_err)?
                        .first()
                        .map(|(_, b)| codec::decode_entry(b).map(|e| e.log_id))
                        .transpose()
                        .map_err(read_err)?,
                    None => None,
                };
                (last_purged, last_log)
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                fsync,
                wal,
                engine_on_sync: OnceLock::new(),
                bounds: Mutex::new(Bounds {
                    last_purged,
                    last_log: last_log.or(last_purged),
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

    /// Sets what is told how long each sync of an append takes: the `fdatasync` of a segment,
    /// or with the log in the engine, the whole synced write.
    pub fn on_sync(&self, observer: SyncObserver) {
        match &self.inner.wal {
            Some(w) => w.wal.on_sync(observer),
            None => {
                let _ = self.inner.engine_on_sync.set(observer);
            }
        }
    }

    /// Writes `entries` (and the committed id waiting for an append) to the log's own
    /// segments, synced; with no entries, syncs what was written before.
    fn append_to_wal(&self, w: &WalLog, entries: &[Entry]) -> Result<(), StorageError> {
        let committed = if entries.is_empty() {
            None
        } else {
            self.inner
                .committed
                .lock()
                .map_err(|_| write_err("log state lock poisoned"))?
                .take()
        };
        let committed_meta = committed.map(|c| {
            c.map(|id| codec::log_id_to_pb(&id).encode_to_vec())
                .unwrap_or_default()
        });
        let bodies: Vec<PbEntry> = entries
            .iter()
            .map(|e| PbEntry(codec::entry_to_pb(e)))
            .collect();
        let mut records = Vec::with_capacity(entries.len() + 1);
        if let Some(meta) = &committed_meta {
            records.push(Record::Committed { meta });
        }
        for (e, data) in entries.iter().zip(&bodies) {
            records.push(Record::Entry {
                index: e.log_id.index,
                data,
            });
        }
        w.wal.write(&records, true).map_err(write_err)
    }

    /// Entries in `[start, end)`, in order.
    fn read_range(&self, start: u64, end: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        if start >= end {
            return Ok(out);
        }
        if let Some(w) = &self.inner.wal {
            // The newest entries from memory, anything older from the segments.
            let (cached_from, cached) = {
                let recent = w.recent()?;
                match recent.first() {
                    Some(first) => {
                        let from = first.max(start);
                        let skip = usize::try_from(from - first).unwrap_or(usize::MAX);
                        let cached: Vec<Entry> = recent
                            .entries
                            .iter()
                            .skip(skip)
                            .take_while(|e| e.log_id.index < end)
                            .cloned()
                            .collect();
                        (from, cached)
                    }
                    None => (end, Vec::new()),
                }
            };
            if start < cached_from {
                for (_, b) in w.wal.read(start, cached_from.min(end)).map_err(read_err)? {
                    out.push(codec::decode_entry(&b).map_err(read_err)?);
                }
            }
            out.extend(cached);
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

/// Tells openraft how the append it is waiting for ended.
fn report_flush<E: std::fmt::Display>(callback: LogFlushed<TypeConfig>, written: &Result<(), E>) {
    callback.log_io_completed(
        written
            .as_ref()
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string())),
    );
}

fn decode_log_id(b: &[u8]) -> Result<LogId, StorageError> {
    Ok(codec::log_id_from_pb(
        &pb::LogId::decode(b).map_err(read_err)?,
    ))
}

/// The last purged and the last entry's ids of a log in the engine's tables.
fn engine_bounds(engine: &dyn Engine) -> Result<(Option<LogId>, Option<LogId>), StorageError> {
    let last_purged = read_log_id(engine, KEY_PURGED)?;
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
    let last_log = match last_value {
        Some(v) => Some(codec::decode_entry(&v).map_err(read_err)?.log_id),
        None => None,
    };
    Ok((last_purged, last_log))
}

/// Whether the engine's tables hold a log (entries or a purged id).
fn engine_holds_log(engine: &dyn Engine) -> Result<bool, StorageError> {
    if engine
        .get(Table::RaftState, KEY_PURGED)
        .map_err(read_err)?
        .is_some()
    {
        return Ok(true);
    }
    let snap = engine.snapshot();
    let mut it = snap.iter(Table::RaftLog);
    it.seek(&[]);
    let found = it.valid();
    it.status().map_err(read_err)?;
    Ok(found)
}

/// A batch that removes the log from the engine's tables (entries, purged and committed ids).
fn clearing_engine_log() -> WriteBatch {
    let mut b = WriteBatch::new();
    delete_entries(&mut b, 0, u64::MAX);
    b.delete(Table::RaftState, KEY_PURGED.to_vec());
    b.delete(Table::RaftState, KEY_COMMITTED.to_vec());
    b
}

/// Removes the log from the engine's tables, synced.
fn clear_engine_log(engine: &dyn Engine) -> Result<(), StorageError> {
    engine.write(clearing_engine_log(), true).map_err(write_err)
}

/// A sibling of `dir` named with `suffix` (`wal` → `wal.new`).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

fn remove_dir_if_there(dir: &Path) -> Result<(), StorageError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(write_err(format!("{}: {e}", dir.display()))),
    }
}

/// An entry encoded straight into the log's write buffer, as [`codec::encode_entry`] would.
#[derive(Debug)]
struct PbEntry(pb::Entry);

impl super::wal::EntryBody for PbEntry {
    fn encode_into(&self, buf: &mut Vec<u8>) {
        buf.reserve(self.0.encoded_len());
        self.0.encode_raw(buf);
    }
}

fn sync_parent(dir: &Path) -> Result<(), StorageError> {
    super::wal::sync_dir(dir.parent().unwrap_or(Path::new("."))).map_err(write_err)
}

/// How many bytes of entries one step of a move between the two places carries.
const MOVE_CHUNK_BYTES: usize = 16 << 20;

/// Opens the log's own segments in `dir`. Without `dir`, the log is made there from the
/// engine's tables (possibly empty): copied into `dir.new`, synced, renamed to `dir`, and only
/// then removed from the engine. With `dir`, what the engine still holds is the rest of such a
/// move that a crash interrupted, and is removed.
fn open_wal_moving_engine_log(
    engine: &dyn Engine,
    dir: &Path,
    opts: WalOptions,
) -> Result<Wal, StorageError> {
    remove_dir_if_there(&sibling(dir, ".old"))?;
    if !dir.exists() {
        let new = sibling(dir, ".new");
        remove_dir_if_there(&new)?;
        let (purged, last) = engine_bounds(engine)?;
        let wal = Wal::open(&new, opts.clone()).map_err(write_err)?;
        if let Some(p) = purged {
            let meta = codec::log_id_to_pb(&p).encode_to_vec();
            wal.write(
                &[Record::Purge {
                    upto: p.index,
                    meta: &meta,
                }],
                false,
            )
            .map_err(write_err)?;
        }
        if let Some(c) = read_log_id(engine, KEY_COMMITTED)? {
            let meta = codec::log_id_to_pb(&c).encode_to_vec();
            wal.write(&[Record::Committed { meta: &meta }], false)
                .map_err(write_err)?;
        }
        let mut moved = 0u64;
        if last.is_some() {
            let snap = engine.snapshot();
            let mut it = snap.iter(Table::RaftLog);
            it.seek(&[]);
            let mut chunk: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut bytes = 0usize;
            loop {
                let valid = it.valid();
                if valid {
                    let key: [u8; 8] = it.key().try_into().map_err(|_| read_err("bad log key"))?;
                    bytes += it.value().len();
                    chunk.push((u64::from_be_bytes(key), it.value().to_vec()));
                }
                if !chunk.is_empty() && (!valid || bytes >= MOVE_CHUNK_BYTES) {
                    let records: Vec<Record<'_>> = chunk
                        .iter()
                        .map(|(index, data)| Record::Entry {
                            index: *index,
                            data,
                        })
                        .collect();
                    wal.write(&records, false).map_err(write_err)?;
                    moved += chunk.len() as u64;
                    chunk.clear();
                    bytes = 0;
                }
                if !valid {
                    break;
                }
                it.next();
            }
            it.status().map_err(read_err)?;
        }
        wal.write(&[], true).map_err(write_err)?;
        drop(wal);
        std::fs::rename(&new, dir)
            .map_err(|e| write_err(format!("{} -> {}: {e}", new.display(), dir.display())))?;
        sync_parent(dir)?;
        if moved > 0 || purged.is_some() {
            tracing::info!(entries = moved, dir = %dir.display(),
                "moved the raft log out of the engine into segments of its own");
        }
        clear_engine_log(engine)?;
    } else {
        remove_dir_if_there(&sibling(dir, ".new"))?;
        if engine_holds_log(engine)? {
            tracing::info!("removing the rest of an interrupted raft log move from the engine");
            clear_engine_log(engine)?;
        }
    }
    Wal::open(dir, opts).map_err(read_err)
}

/// Moves a log of its own in `dir`, if there is one, into the engine's tables: the tables are
/// cleared, filled and synced, and only then is `dir` removed (renamed to `dir.old` first, so
/// that a crash never leaves a half-removed log that looks whole).
fn move_wal_into_engine(engine: &dyn Engine, dir: &Path) -> Result<(), StorageError> {
    remove_dir_if_there(&sibling(dir, ".new"))?;
    remove_dir_if_there(&sibling(dir, ".old"))?;
    if !dir.exists() {
        return Ok(());
    }
    let wal = Wal::open(
        dir,
        WalOptions {
            fsync: true,
            ..WalOptions::default()
        },
    )
    .map_err(read_err)?;
    let st = wal.state();
    let mut b = clearing_engine_log();
    if let Some((_, meta)) = &st.purged {
        b.put(Table::RaftState, KEY_PURGED.to_vec(), meta.to_vec());
    }
    if let Some(meta) = &st.committed {
        b.put(Table::RaftState, KEY_COMMITTED.to_vec(), meta.to_vec());
    }
    engine.write(b, false).map_err(write_err)?;
    let mut moved = 0u64;
    if let Some((first, last)) = st.entries {
        let mut from = first;
        while from <= last {
            let mut b = WriteBatch::new();
            let mut bytes = 0usize;
            let mut to = from;
            while to <= last && bytes < MOVE_CHUNK_BYTES {
                // Read in steps of 256 entries until the chunk is full.
                let step = wal.read(to, (to + 256).min(last + 1)).map_err(read_err)?;
                if step.is_empty() {
                    return Err(read_err(format!("raft log entry {to} is missing")));
                }
                for (index, data) in step {
                    bytes += data.len();
                    b.put(Table::RaftLog, index_key(index), data.to_vec());
                    to = index + 1;
                }
            }
            engine.write(b, false).map_err(write_err)?;
            moved += to - from;
            from = to;
        }
    }
    engine.sync().map_err(write_err)?;
    drop(wal);
    let old = sibling(dir, ".old");
    std::fs::rename(dir, &old)
        .map_err(|e| write_err(format!("{} -> {}: {e}", dir.display(), old.display())))?;
    sync_parent(dir)?;
    remove_dir_if_there(&old)?;
    tracing::info!(entries = moved, dir = %dir.display(),
        "moved the raft log from segments of its own into the engine");
    Ok(())
}

/// Deletes the entries with index in `[from, to)`: one range deletion, not a delete per
/// entry. openraft's core waits for a purge, and deleting the 95,000 entries a snapshot
/// releases one by one held every put for the iteration and a ~2 MB write
/// (docs/PERFORMANCE.md, session 27).
fn delete_entries(batch: &mut WriteBatch, from: u64, to: u64) {
    batch.delete_range(Table::RaftLog, index_key(from), Some(index_key(to)));
}

fn read_log_id(engine: &dyn Engine, key: &[u8]) -> Result<Option<LogId>, StorageError> {
    engine
        .get(Table::RaftState, key)
        .map_err(read_err)?
        .map(|v| decode_log_id(&v))
        .transpose()
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
        match (pending, &self.inner.wal) {
            (Some(c), _) => Ok(c),
            (None, Some(w)) => w
                .wal
                .state()
                .committed
                .map(|m| decode_log_id(&m))
                .transpose(),
            (None, None) => read_log_id(self.inner.engine.as_ref(), KEY_COMMITTED),
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
        if let Some(w) = &self.inner.wal {
            let entries: Vec<Entry> = entries.into_iter().collect();
            let written = self.append_to_wal(w, &entries);
            if written.is_ok() {
                if let Some(last) = entries.last() {
                    let last = last.log_id;
                    w.recent()?.push(&entries);
                    self.set_bounds(|bounds| bounds.last_log = Some(last))?;
                }
            }
            report_flush(callback, &written);
            return written;
        }
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
        let start = std::time::Instant::now();
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
        if let Some(observe) = self.inner.engine_on_sync.get().filter(|_| self.inner.fsync) {
            observe(start.elapsed());
        }
        if let Some(last) = last.filter(|_| written.is_ok()) {
            self.set_bounds(|bounds| bounds.last_log = Some(last))?;
        }
        report_flush(callback, &written);
        written.map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        if let Some(w) = &self.inner.wal {
            w.wal.truncate(log_id.index).map_err(write_err)?;
            w.recent()?.truncate(log_id.index);
        } else {
            let mut b = WriteBatch::new();
            delete_entries(&mut b, log_id.index, u64::MAX);
            self.inner
                .engine
                .write(b, self.inner.fsync)
                .map_err(write_err)?;
        }
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
        let meta = codec::log_id_to_pb(&log_id).encode_to_vec();
        if let Some(w) = &self.inner.wal {
            let segments = w.wal.purge(log_id.index, &meta).map_err(write_err)?;
            let entries = w.recent()?.purge(log_id.index);
            w.reaper.run(move || {
                drop(entries);
                segments.close_gradually();
            });
        } else {
            let from = self.bounds()?.last_purged.map_or(0, |p| p.index + 1);
            let mut b = WriteBatch::new();
            b.put(Table::RaftState, KEY_PURGED.to_vec(), meta);
            delete_entries(&mut b, from, log_id.index + 1);
            self.inner.engine.write(b, false).map_err(write_err)?;
        }
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
