//! The engine interface: a few ordered byte-string tables with snapshots and atomic batches.

use super::Result;

/// The tables (RocksDB column families) MetaStore keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// Versions of user keys: `enc(key) ++ !rev` → record (see `mvcc::key_codec`). Every key
    /// ends in an 8-byte suffix ([`KV_SUFFIX`]); what comes before it is shared by the versions
    /// of one user key and by no other key (see [`Snapshot::versions_iter`]).
    Kv,
    /// Revision log: `main ++ sub` (big endian) → user key. Drives watch replay, compaction
    /// and HashKV in revision order.
    Rev,
    /// Store metadata: current revision, compaction marks, format, applied index.
    Meta,
    /// Leases: `be64(id)` → granted TTL (i64 LE); `be64(id) ++ key` → empty (an attached key).
    Lease,
    /// The Raft log: `be64(index)` → entry (see `raft::codec`). Not part of the state machine.
    RaftLog,
    /// Raft's own durable state: the vote, the last purged log id. Not part of the state machine.
    RaftState,
    /// Users, roles, permissions, the auth switch and the auth revision (see `auth::store`).
    Auth,
    /// Each live key's newest version, beside [`Table::Kv`]'s history: `enc(key)` (the `Kv`
    /// key without its revision) → the same record, plus one marker under the empty key (no
    /// encoded key is empty) holding the revision the table is current at (see
    /// `mvcc::current`). A derived table: rebuilt from `Kv` whenever its marker is not the
    /// store's revision, never in a snapshot. Optional on RocksDB (`--kv-current-table`).
    Current,
}

/// Bytes at the end of every [`Table::Kv`] key that tell its versions apart (the revision).
pub const KV_SUFFIX: usize = 8;

impl Table {
    pub const ALL: [Table; 8] = [
        Table::Kv,
        Table::Rev,
        Table::Meta,
        Table::Lease,
        Table::RaftLog,
        Table::RaftState,
        Table::Auth,
        Table::Current,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Kv => "kv",
            Table::Rev => "rev",
            Table::Meta => "meta",
            Table::Lease => "lease",
            Table::RaftLog => "raft_log",
            Table::RaftState => "raft_state",
            Table::Auth => "auth",
            Table::Current => "kv_current",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// One write in a [`WriteBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put {
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        table: Table,
        key: Vec<u8>,
    },
    /// Deletes every key `k` of `table` with `start <= k < end`; `end: None` means to the end
    /// of the table (`start: vec![], end: None` empties it). Ordered with the batch's other
    /// writes like a delete of each key in the range.
    DeleteRange {
        table: Table,
        start: Vec<u8>,
        end: Option<Vec<u8>>,
    },
}

/// Writes applied atomically by [`Engine::write`]: all or none are visible, in order.
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    ops: Vec<WriteOp>,
    bytes: usize,
}

impl WriteBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, table: Table, key: Vec<u8>, value: Vec<u8>) {
        self.bytes += key.len() + value.len();
        self.ops.push(WriteOp::Put { table, key, value });
    }

    pub fn delete(&mut self, table: Table, key: Vec<u8>) {
        self.bytes += key.len();
        self.ops.push(WriteOp::Delete { table, key });
    }

    /// Deletes `[start, end)` of `table` (`end: None`: to the end); see [`WriteOp::DeleteRange`].
    pub fn delete_range(&mut self, table: Table, start: Vec<u8>, end: Option<Vec<u8>>) {
        self.bytes += start.len() + end.as_ref().map_or(0, Vec::len);
        self.ops.push(WriteOp::DeleteRange { table, start, end });
    }

    /// Empties `table`.
    pub fn clear_table(&mut self, table: Table) {
        self.delete_range(table, Vec::new(), None);
    }

    /// Appends `other`'s operations after this batch's, in order.
    pub fn append(&mut self, mut other: WriteBatch) {
        self.bytes += other.bytes;
        self.ops.append(&mut other.ops);
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Bytes of keys and values in the batch.
    pub fn size_bytes(&self) -> usize {
        self.bytes
    }

    pub fn ops(&self) -> &[WriteOp] {
        &self.ops
    }

    pub fn into_ops(self) -> Vec<WriteOp> {
        self.ops
    }
}

/// A seekable cursor over one table of a snapshot, in ascending key order.
///
/// Modelled on RocksDB's raw iterator: position with [`seek`](EngineIter::seek), check
/// [`valid`](EngineIter::valid), read [`key`](EngineIter::key)/[`value`](EngineIter::value),
/// advance with [`next`](EngineIter::next). When `valid()` turns false, [`status`](EngineIter::status)
/// tells an exhausted cursor (`Ok`) from a failed one (`Err`).
pub trait EngineIter {
    /// Positions at the first entry whose key is `>= key`.
    fn seek(&mut self, key: &[u8]);
    fn valid(&self) -> bool;
    /// The current key. Only meaningful while `valid()`.
    fn key(&self) -> &[u8];
    /// The current value. Only meaningful while `valid()`.
    fn value(&self) -> &[u8];
    fn next(&mut self);
    fn status(&self) -> Result<()>;
}

/// A consistent point-in-time view of every table.
pub trait Snapshot: Send {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// A cursor over `table`. It starts unpositioned: call `seek` first.
    fn iter(&self, table: Table) -> Box<dyn EngineIter + '_>;
    /// A cursor over the versions of one user key in [`Table::Kv`]: after a seek it is only
    /// guaranteed correct while it stays on keys with the seek target's prefix (the key without
    /// its [`KV_SUFFIX`]). It may turn invalid instead of moving to another prefix, and it may
    /// answer a seek for a prefix the table does not hold without searching (RocksDB checks
    /// its prefix Bloom filters). Callers compare the prefix of what it lands on, as they would
    /// with [`iter`](Snapshot::iter), which is what engines without filters return.
    fn versions_iter(&self) -> Box<dyn EngineIter + '_> {
        self.iter(Table::Kv)
    }
    /// Whether the engine holds `table` (see [`Engine::has_table`]).
    fn has_table(&self, table: Table) -> bool {
        let _ = table;
        true
    }
}

/// An ordered key-value engine.
///
/// Correctness requirements, checked by the conformance suite for every implementation:
/// - a [`WriteBatch`] is atomic: after a crash either all of it or none of it is present;
/// - writes are visible to snapshots taken after `write` returns, never to earlier snapshots;
/// - `write(batch, true)` and [`sync`](Engine::sync) return only once the data (and every write
///   before it) is durable; `write(batch, false)` may lose the batch on a crash, but never
///   reorders it after a later synced write.
pub trait Engine: Send + Sync + 'static {
    /// The engine's name as used by `--engine`.
    fn name(&self) -> &'static str;
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn snapshot(&self) -> Box<dyn Snapshot + '_>;
    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()>;
    /// Makes every write so far durable.
    fn sync(&self) -> Result<()>;
    /// Bytes the engine occupies (on disk, or in memory for the memory engine).
    fn size_bytes(&self) -> u64;
    /// Bytes of live data, an estimate (`size_bytes() - size_in_use_bytes()` is reclaimable).
    fn size_in_use_bytes(&self) -> u64;
    /// Reclaims space left by deleted entries (etcd's defragment).
    fn defragment(&self) -> Result<()>;
    /// Whether the engine holds `table`: every table but an optional one
    /// ([`Table::Current`] on RocksDB) always. Reading or writing a table it does not hold
    /// fails.
    fn has_table(&self, table: Table) -> bool {
        let _ = table;
        true
    }
}
