//! [`RocksEngine`]: the durable default engine, one RocksDB column family per [`Table`].

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, BottommostLevelCompaction, Cache, ColumnFamily,
    ColumnFamilyDescriptor, CompactOptions, DBCompressionType, DBRawIteratorWithThreadMode,
    Options, ReadOptions, SliceTransform, WriteOptions, DB,
};

use super::engine::{Engine, EngineIter, Snapshot, Table, WriteBatch, WriteOp, KV_SUFFIX};
use super::{Error, Result};

/// Tuning knobs for [`RocksEngine::open`].
#[derive(Debug, Clone)]
pub struct RocksOptions {
    /// Shared block cache size in bytes.
    pub block_cache_bytes: usize,
    /// Memtable size per column family in bytes.
    pub write_buffer_bytes: usize,
    /// Memtables of all column families together, in bytes: past it RocksDB flushes the
    /// largest (its write buffer manager). Bounds the memory a write burst takes (0: no
    /// bound but each family's own); the write-ahead log a restart replays is bounded by
    /// `total_wal_bytes`.
    pub total_write_buffer_bytes: usize,
    /// Write-ahead log files together, in bytes: past it RocksDB flushes the column families
    /// whose memtables keep the oldest log file alive. Every write touches the small `meta`
    /// and `raft_state` families, whose memtables never fill, so without this bound no log
    /// file would become obsolete before RocksDB's own limit (four times every memtable
    /// together, 4 GiB here), and the logs count toward the backend quota (0: RocksDB's own
    /// limit).
    pub total_wal_bytes: u64,
    /// Obsolete write-ahead log files kept to be written over by the next logs (RocksDB's
    /// `recycle_log_file_num`; 0: every log is a new file). A sync after an append that
    /// stays inside the file's length and its written blocks changes no file metadata, so
    /// the file system commits no journal transaction: on ext4 here, a put's `fdatasync`
    /// went from 0.25 to 0.19 ms, put-16c +10 % and txn-put +18 % (docs/PERFORMANCE.md,
    /// session 31). A process's first log is always a new file. A spare file is not
    /// counted in [`size_bytes`](Engine::size_bytes), nor a reused one's old length.
    pub recycled_wals: usize,
    /// Whether the database holds [`Table::Current`]: `Some(true)` creates it if missing,
    /// `Some(false)` drops it if present (so that a binary without it can open the database),
    /// `None` opens it if present and creates it only in a new database (the offline tools,
    /// which must not change what a server left).
    pub current_table: Option<bool>,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 64 << 20,
            total_write_buffer_bytes: 128 << 20,
            total_wal_bytes: 128 << 20,
            recycled_wals: 1,
            current_table: None,
        }
    }
}

/// The RocksDB engine (`--engine rocksdb`, the default).
pub struct RocksEngine {
    db: DB,
    path: PathBuf,
    /// The last on-disk size measurement.
    disk: Mutex<DiskUsage>,
    /// Writes share this lock; a batch with an open-ended [`WriteOp::DeleteRange`] takes it
    /// exclusively. RocksDB's range deletion needs an end key, so the open end is resolved to
    /// the table's last key at write time, and no other write may add a key beyond it
    /// in between (that would break the batch's atomicity).
    writes: RwLock<()>,
}

/// How long an on-disk size measurement is reused (the quota check runs on every write).
const SIZE_CACHE: Duration = Duration::from_millis(250);

/// The name under which RocksDB records [`kv_filter_prefix`] in the `kv` table's files. A
/// table file whose filters were built by another extractor (or none) is searched without
/// them, so a different prefix function needs a new name.
const KV_PREFIX_EXTRACTOR: &str = "metastore.kv-versions.1";

/// Bits of the `kv` memtable's prefix Bloom filter, as a share of the memtable's bytes: 2 %
/// of 64 MiB is ~10 bits per version at ~300 bytes each (a 1 % false positive rate).
const KV_MEMTABLE_BLOOM_RATIO: f64 = 0.02;

/// The prefix RocksDB filters `kv` keys by: the key without its revision, shared by the
/// versions of one user key. A create looks up a key that has no version yet; the filters
/// answer it without searching the memtable's skip list or a table file's index.
fn kv_filter_prefix(key: &[u8]) -> &[u8] {
    &key[..key.len().saturating_sub(KV_SUFFIX)]
}

/// Whether [`kv_filter_prefix`] applies to `key` (RocksDB only filters keys in its domain).
fn kv_filter_prefix_applies(key: &[u8]) -> bool {
    key.len() > KV_SUFFIX
}

/// Read options for a cursor over a whole table, in key order. The `kv` table has a prefix
/// extractor, under which RocksDB's default is a cursor that only keeps to one prefix.
fn ordered_reads() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.set_total_order_seek(true);
    o
}

impl RocksEngine {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path, opts: &RocksOptions) -> Result<Self> {
        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        // The `kv` table filters by prefix alone: its point reads look up versions by prefix
        // (`Snapshot::versions_iter`), and whole keys would double its filters' size.
        let table_format = |whole_keys: bool| {
            let mut block = BlockBasedOptions::default();
            block.set_block_cache(&cache);
            block.set_bloom_filter(10.0, false);
            block.set_whole_key_filtering(whole_keys);
            block.set_cache_index_and_filter_blocks(true);
            // Partitioned index and filters: a table's index is cut into ~4 KiB partitions
            // under a small top-level index (kept pinned), so a point lookup or a seek loads
            // one partition. With one index block per table, a large table's index (megabytes
            // once it holds ~500,000 keys) outgrew a block-cache shard (capacity / 64), was
            // dropped after every use and read and decompressed again on every seek: loading
            // 1,000,000 keys of 1 KiB took 318 s instead of ~20 (docs/PERFORMANCE.md).
            block.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
            block.set_partition_filters(true);
            block.set_metadata_block_size(4096);
            block.set_pin_top_level_index_and_filter(true);
            block
        };
        let (block, kv_block) = (table_format(true), table_format(false));

        let cf_opts = |table: Table| {
            let mut o = Options::default();
            if table == Table::Kv {
                o.set_block_based_table_factory(&kv_block);
                o.set_prefix_extractor(SliceTransform::create(
                    KV_PREFIX_EXTRACTOR,
                    kv_filter_prefix,
                    Some(kv_filter_prefix_applies),
                ));
                o.set_memtable_prefix_bloom_ratio(KV_MEMTABLE_BLOOM_RATIO);
            } else {
                o.set_block_based_table_factory(&block);
            }
            o.set_write_buffer_size(opts.write_buffer_bytes);
            o.set_compression_type(match table {
                Table::Meta | Table::Lease | Table::Auth => DBCompressionType::None,
                _ => DBCompressionType::Lz4,
            });
            ColumnFamilyDescriptor::new(table.name(), o)
        };
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(4);
        db_opts.set_db_write_buffer_size(opts.total_write_buffer_bytes);
        db_opts.set_max_total_wal_size(opts.total_wal_bytes);
        // With the default `kPointInTimeRecovery`: a recycled file's old records past the
        // new log's end carry the old log's number and are not replayed.
        db_opts.set_recycle_log_file_num(opts.recycled_wals);
        // Whether an existing database has the table (`None`: no database yet). One that
        // cannot be listed is not opened either, rather than given a table it may not want.
        let found = if path.join("CURRENT").exists() {
            let names = DB::list_cf(&db_opts, path)?;
            Some(names.iter().any(|n| n == Table::Current.name()))
        } else {
            None
        };
        let want_current = opts.current_table.or(found).unwrap_or(true);
        // RocksDB opens a database only with every family it has: one to drop is opened first.
        let open_current = want_current || found == Some(true);
        let cfs: Vec<_> = Table::ALL
            .iter()
            .filter(|t| **t != Table::Current || open_current)
            .map(|t| cf_opts(*t))
            .collect();
        let mut db = DB::open_cf_descriptors(&db_opts, path, cfs)?;
        if open_current && !want_current {
            tracing::info!(path = %path.display(), "dropping the kv_current table");
            db.drop_cf(Table::Current.name())?;
        }
        Ok(Self {
            db,
            path: path.to_path_buf(),
            disk: Mutex::new(DiskUsage::default()),
            writes: RwLock::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn cf(&self, table: Table) -> Result<&ColumnFamily> {
        self.db
            .cf_handle(table.name())
            .ok_or_else(|| Error::Engine(format!("column family {} missing", table.name())))
    }

    /// A numeric RocksDB property of `cf` (`rocksdb.cur-size-all-mem-tables`, ...); 0 when
    /// RocksDB does not report it.
    fn int_property(&self, cf: &ColumnFamily, name: &str) -> u64 {
        self.db
            .property_int_value_cf(cf, name)
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// The number of the oldest write-ahead log RocksDB still needs; a lower-numbered log
    /// file is a spare kept for reuse or one about to be deleted.
    fn oldest_live_wal(&self) -> Option<u64> {
        self.db
            .property_int_value("rocksdb.min-log-number-to-keep")
            .ok()
            .flatten()
    }

    /// What the memtables of every table hold (RocksDB's allocations, active and not yet
    /// flushed).
    fn memtable_bytes(&self) -> u64 {
        Table::ALL
            .iter()
            .filter_map(|t| self.cf(*t).ok())
            .map(|cf| self.int_property(cf, "rocksdb.cur-size-all-mem-tables"))
            .sum()
    }

    /// The directory's usage, measured again when the last measurement is older than
    /// [`SIZE_CACHE`].
    ///
    /// The write-ahead log counts for the data it holds that no table file holds yet: the
    /// lesser of its live files' length and the memtables' size. A log file's length is
    /// not its data once logs are recycled ([`RocksOptions::recycled_wals`]): a reused file
    /// keeps its old length, and RocksDB reports no live log's written size, so after a
    /// defragmentation the length alone would hide the space given back. A log numbered
    /// below the oldest one RocksDB still needs is a spare kept for reuse (or one about to
    /// be deleted) and holds no data: reserved space, like etcd's preallocated log
    /// segments, which etcd's `dbSize` leaves out too.
    fn disk_usage(&self) -> DiskUsage {
        let Ok(mut disk) = self.disk.lock() else {
            return DiskUsage::default();
        };
        if disk.measured.is_none_or(|t| t.elapsed() > SIZE_CACHE) {
            let oldest_live_wal = self.oldest_live_wal().unwrap_or(0);
            if let Ok(dir) = std::fs::read_dir(&self.path) {
                let (mut tables, mut logs, mut other) = (0, 0, 0);
                for entry in dir.filter_map(|e| e.ok()) {
                    let Ok(meta) = entry.metadata() else { continue };
                    if !meta.is_file() {
                        continue;
                    }
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    match wal_number(&name) {
                        Some(n) if n < oldest_live_wal => {}
                        Some(_) => logs += meta.len(),
                        None if name.ends_with(".sst") => tables += meta.len(),
                        None => other += meta.len(),
                    }
                }
                disk.total = tables + other + logs.min(self.memtable_bytes());
                disk.other = other;
            }
            disk.measured = Some(Instant::now());
        }
        *disk
    }
}

impl Drop for RocksEngine {
    /// Stops flushes and compactions before the database closes, so none is still running
    /// when the process exits (RocksDB's background threads outlive a close otherwise, and
    /// can trip over its static state being torn down).
    fn drop(&mut self) {
        self.db.cancel_all_background_work(true);
    }
}

impl Engine for RocksEngine {
    fn name(&self) -> &'static str {
        "rocksdb"
    }

    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get_cf(self.cf(table)?, key)?)
    }

    fn has_table(&self, table: Table) -> bool {
        self.db.cf_handle(table.name()).is_some()
    }

    fn snapshot(&self) -> Box<dyn Snapshot + '_> {
        Box::new(RocksSnapshot {
            versions: RefCell::new(None),
            engine: self,
            snap: self.db.snapshot(),
        })
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<()> {
        let open_ended = batch
            .ops()
            .iter()
            .any(|op| matches!(op, WriteOp::DeleteRange { end: None, .. }));
        let poisoned = || Error::Engine("rocksdb write lock poisoned".into());
        // Exactly one of the two guards is taken; it is held until the write returns.
        let _exclusive;
        let _shared;
        if open_ended {
            _exclusive = self.writes.write().map_err(|_| poisoned())?;
        } else {
            _shared = self.writes.read().map_err(|_| poisoned())?;
        }
        let mut wb = rocksdb::WriteBatch::default();
        // Per table, the greatest key put so far in this batch: an open-ended range deletion
        // must cover those too.
        let mut batch_max: [Option<&[u8]>; Table::ALL.len()] = Default::default();
        for op in batch.ops() {
            match op {
                WriteOp::Put { table, key, value } => {
                    let max = &mut batch_max[table.index()];
                    if max.is_none_or(|m| m < key.as_slice()) {
                        *max = Some(key);
                    }
                    wb.put_cf(self.cf(*table)?, key, value)
                }
                WriteOp::Delete { table, key } => wb.delete_cf(self.cf(*table)?, key),
                WriteOp::DeleteRange {
                    table,
                    start,
                    end: Some(end),
                } => {
                    // RocksDB refuses an inverted range; an empty one deletes nothing.
                    if start < end {
                        wb.delete_range_cf(self.cf(*table)?, start, end)
                    }
                }
                WriteOp::DeleteRange {
                    table,
                    start,
                    end: None,
                } => {
                    let cf = self.cf(*table)?;
                    let mut it = self.db.raw_iterator_cf_opt(cf, ordered_reads());
                    it.seek_to_last();
                    it.status()?;
                    let last = match (it.key(), batch_max[table.index()]) {
                        (Some(db), Some(b)) => Some(db.max(b).to_vec()),
                        (db, b) => db.or(b).map(<[u8]>::to_vec),
                    };
                    if let Some(last) = last.filter(|last| last.as_slice() >= start.as_slice()) {
                        // [start, last) by range, then `last` itself.
                        wb.delete_range_cf(cf, start, &last);
                        wb.delete_cf(cf, &last);
                    }
                }
            }
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        Ok(self.db.write_opt(wb, &wo)?)
    }

    fn sync(&self) -> Result<()> {
        Ok(self.db.flush_wal(true)?)
    }

    /// The database directory's size on disk (tables, manifest, and the write-ahead log as
    /// far as it holds data no table does), like etcd's bolt file size; measured at most
    /// every 250 ms.
    fn size_bytes(&self) -> u64 {
        self.disk_usage().total
    }

    /// Each table's bytes (SST files and memtables) times the share of its entries that are
    /// live: a deletion is taken to hide one older entry, so `2 × deletions` of the table's
    /// entries (tombstones and what they shadow) are garbage until a compaction drops them;
    /// plus the files that are neither tables nor write-ahead log (RocksDB's manifest, options
    /// and info log), which no defragmentation gives back. Like etcd's `dbSizeInUse`, it falls
    /// as soon as an MVCC compaction deletes revisions, and `size_bytes()` follows after
    /// [`defragment`](Engine::defragment). Range deletions (the Raft log's purge) are not
    /// counted: their garbage shows as in use.
    fn size_in_use_bytes(&self) -> u64 {
        let disk = self.disk_usage();
        let in_use: u64 = Table::ALL
            .iter()
            .filter_map(|t| self.cf(*t).ok())
            .map(|cf| {
                let int = |name: &str| self.int_property(cf, name);
                let tables = self
                    .db
                    .property_value_cf(cf, "rocksdb.aggregated-table-properties")
                    .ok()
                    .flatten()
                    .map(|p| TableCounts::parse(&p))
                    .unwrap_or_default();
                let entries = tables.entries
                    + int("rocksdb.num-entries-active-mem-table")
                    + int("rocksdb.num-entries-imm-mem-tables");
                let deletions = tables.deletions
                    + int("rocksdb.num-deletes-active-mem-table")
                    + int("rocksdb.num-deletes-imm-mem-tables");
                let bytes =
                    int("rocksdb.total-sst-files-size") + int("rocksdb.cur-size-all-mem-tables");
                live_share(bytes, entries, deletions)
            })
            .sum();
        in_use.saturating_add(disk.other).min(disk.total)
    }

    /// Flushes each table and rewrites it whole: the bottommost level is compacted too (not
    /// moved as it is), so tombstones and what they shadow are gone afterwards.
    fn defragment(&self) -> Result<()> {
        let mut opts = CompactOptions::default();
        opts.set_bottommost_level_compaction(BottommostLevelCompaction::Force);
        for cf in Table::ALL.iter().filter_map(|t| self.cf(*t).ok()) {
            self.db
                .compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
        }
        // Flushed memtables let RocksDB drop the old write-ahead log files.
        self.db.flush_wal(true)?;
        if let Ok(mut disk) = self.disk.lock() {
            disk.measured = None;
        }
        Ok(())
    }
}

/// The number of a write-ahead log file (`000012.log`).
fn wal_number(file_name: &str) -> Option<u64> {
    file_name.strip_suffix(".log")?.parse().ok()
}

/// The database directory's files, by kind.
#[derive(Clone, Copy, Debug, Default)]
struct DiskUsage {
    measured: Option<Instant>,
    /// Every file.
    total: u64,
    /// Neither a table (`*.sst`) nor a write-ahead log (`*.log`): the manifest, the options,
    /// RocksDB's info log (`LOG`, `LOG.old.*`).
    other: u64,
}

/// Entry counts from RocksDB's `aggregated-table-properties` (its SST files together).
#[derive(Debug, Default, PartialEq, Eq)]
struct TableCounts {
    entries: u64,
    deletions: u64,
}

impl TableCounts {
    /// Parses `# entries=N; # deletions=N; ...`; missing fields count as 0.
    fn parse(props: &str) -> Self {
        let mut c = Self::default();
        for field in props.split(';') {
            let Some((name, value)) = field.split_once('=') else {
                continue;
            };
            let value = value.trim().parse().unwrap_or(0);
            match name.trim() {
                "# entries" => c.entries = value,
                "# deletions" => c.deletions = value,
                _ => {}
            }
        }
        c
    }
}

/// The live part of `bytes` when `deletions` of `entries` are tombstones, each hiding one
/// older entry.
fn live_share(bytes: u64, entries: u64, deletions: u64) -> u64 {
    if entries == 0 {
        return bytes;
    }
    let dead = deletions.saturating_mul(2).min(entries);
    (bytes as u128 * u128::from(entries - dead) / u128::from(entries)) as u64
}

struct RocksSnapshot<'a> {
    /// The prefix-mode cursor of the last [`Snapshot::versions_iter`] caller, kept for the
    /// next one: a put's lookup of its key then costs a seek, not a cursor made and dropped
    /// (RocksDB pins the memtables and files of its view for each, about half of the lookup's
    /// instructions; docs/PERFORMANCE.md, session 40). It reads `snap`, and is declared
    /// before it so that it is dropped first: RocksDB requires a snapshot to outlive the
    /// cursors reading it.
    versions: RefCell<Option<DBRawIteratorWithThreadMode<'a, DB>>>,
    engine: &'a RocksEngine,
    snap: rocksdb::Snapshot<'a>,
}

// rocksdb::Snapshot is Send + Sync because DB is, and so is its cursor; the kept cursor is used
// by one thread at a time (`Snapshot` is not `Sync`).
impl Snapshot for RocksSnapshot<'_> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.snap.get_cf(self.engine.cf(table)?, key)?)
    }

    fn has_table(&self, table: Table) -> bool {
        self.engine.has_table(table)
    }

    fn iter(&self, table: Table) -> Box<dyn EngineIter + '_> {
        self.iter_opt(table, ordered_reads())
    }

    /// A cursor in RocksDB's prefix mode: a seek checks the memtables' and table files' prefix
    /// Bloom filters first, and the cursor turns invalid when it leaves the prefix.
    ///
    /// A seek sets the prefix the cursor keeps to, so one cursor serves every key: the
    /// snapshot keeps the cursor of the last caller and hands it to the next one (a second
    /// caller while one holds it gets a cursor of its own).
    fn versions_iter(&self) -> Box<dyn EngineIter + '_> {
        let kept = self
            .versions
            .try_borrow_mut()
            .ok()
            .and_then(|mut k| k.take());
        let it = kept.map(Ok).unwrap_or_else(|| {
            let mut o = ReadOptions::default();
            o.set_prefix_same_as_start(true);
            self.cursor(Table::Kv, o)
        });
        Box::new(RocksIter {
            it,
            home: Some(&self.versions),
        })
    }
}

impl<'a> RocksSnapshot<'a> {
    /// A cursor over `table` that reads the snapshot. It borrows the engine, not the
    /// snapshot, so that the snapshot can keep one; whoever holds it must drop it before
    /// the snapshot (RocksDB's rule for a snapshot named in read options).
    fn cursor(
        &self,
        table: Table,
        mut opts: ReadOptions,
    ) -> std::result::Result<DBRawIteratorWithThreadMode<'a, DB>, String> {
        let cf = self.engine.cf(table).map_err(|e| e.to_string())?;
        opts.set_snapshot(&self.snap);
        Ok(self.engine.db.raw_iterator_cf_opt(cf, opts))
    }

    fn iter_opt(&self, table: Table, opts: ReadOptions) -> Box<dyn EngineIter + '_> {
        Box::new(RocksIter {
            it: self.cursor(table, opts),
            home: None,
        })
    }
}

/// A cursor of a [`RocksSnapshot`] (or why it could not be made). One lent by
/// [`Snapshot::versions_iter`] goes back to its snapshot (`home`) when dropped, unless it
/// failed.
struct RocksIter<'s, 'a> {
    it: std::result::Result<DBRawIteratorWithThreadMode<'a, DB>, String>,
    home: Option<&'s RefCell<Option<DBRawIteratorWithThreadMode<'a, DB>>>>,
}

impl Drop for RocksIter<'_, '_> {
    fn drop(&mut self) {
        let Some(home) = self.home else {
            return;
        };
        let it = std::mem::replace(&mut self.it, Err(String::new()));
        if let (Ok(it), Ok(mut home)) = (it, home.try_borrow_mut()) {
            if it.status().is_ok() && home.is_none() {
                *home = Some(it);
            }
        }
    }
}

impl EngineIter for RocksIter<'_, '_> {
    fn seek(&mut self, key: &[u8]) {
        if let Ok(it) = &mut self.it {
            it.seek(key);
        }
    }

    fn valid(&self) -> bool {
        self.it.as_ref().map(|it| it.valid()).unwrap_or(false)
    }

    fn key(&self) -> &[u8] {
        self.it
            .as_ref()
            .ok()
            .and_then(|it| it.key())
            .unwrap_or_default()
    }

    fn value(&self) -> &[u8] {
        self.it
            .as_ref()
            .ok()
            .and_then(|it| it.value())
            .unwrap_or_default()
    }

    fn next(&mut self) {
        if let Ok(it) = &mut self.it {
            it.next();
        }
    }

    fn status(&self) -> Result<()> {
        match &self.it {
            Ok(it) => Ok(it.status()?),
            Err(e) => Err(Error::Engine(e.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_properties_are_parsed_and_deletions_count_twice() {
        let p = "# data blocks=3; # entries=1000; # deletions=300; # merge operands=0; \
                 # range deletions=0; raw key size=8000";
        assert_eq!(
            TableCounts::parse(p),
            TableCounts {
                entries: 1000,
                deletions: 300
            }
        );
        assert_eq!(TableCounts::parse("garbage"), TableCounts::default());
        assert_eq!(live_share(1000, 1000, 300), 400);
        assert_eq!(live_share(1000, 1000, 0), 1000);
        assert_eq!(live_share(1000, 1000, 900), 0);
        assert_eq!(live_share(1000, 0, 0), 1000);
    }

    /// A `Kv`-like table key: 20 digits, then 8 bytes where the revision goes.
    fn large_table_key(k: u32) -> Vec<u8> {
        let mut key = format!("{k:020}").into_bytes();
        key.extend_from_slice(&(!1u64).to_be_bytes());
        key
    }

    /// Bytes RocksDB read from table files for a seek, on average over seeks spread across
    /// one large table.
    fn bytes_read_per_seek(e: &RocksEngine, keys: u32) -> u64 {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        const SEEKS: u32 = 2000;
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut ctx = PerfContext::default();
        ctx.reset();
        for i in 0..SEEKS {
            let key = large_table_key(i.wrapping_mul(7919) % keys);
            let snap = e.snapshot();
            let mut it = snap.iter(Table::Kv);
            it.seek(&key);
            assert!(it.valid() && it.key() == key, "seek {i}");
        }
        let read = ctx.metric(PerfMetric::BlockReadByte);
        set_perf_stats(PerfStatsLevel::Disable);
        read / u64::from(SEEKS)
    }

    #[test]
    fn a_seek_in_a_large_table_reads_an_index_partition_not_the_whole_index() {
        // 120,000 keys of 1 KiB that compress well: one table of ~30,000 data blocks, whose
        // index is larger than a shard of this 8 MiB block cache (512 KiB). A single index
        // block that size was dropped after each use and read again by every seek (351,047
        // bytes per seek when measured); a partitioned index loads a 4 KiB partition (81).
        const KEYS: u32 = 120_000;
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = RocksOptions {
            block_cache_bytes: 8 << 20,
            ..RocksOptions::default()
        };
        let e = RocksEngine::open(dir.path(), &opts).expect("open");
        for start in (0..KEYS).step_by(1000) {
            let mut b = WriteBatch::new();
            for k in start..start + 1000 {
                b.put(Table::Kv, large_table_key(k), vec![b'v'; 1024]);
            }
            e.write(b, false).expect("write");
        }
        e.defragment().expect("compact into one table");
        let per_seek = bytes_read_per_seek(&e, KEYS);
        assert!(per_seek < 16 << 10, "{per_seek} bytes read per seek");
    }

    /// `(memtable, table file)` prefix filter misses over `lookups` version lookups of absent
    /// keys: each miss is a lookup answered without searching.
    fn filter_misses(e: &RocksEngine, lookups: u32) -> (u64, u64) {
        use rocksdb::perf::{set_perf_stats, PerfContext, PerfMetric, PerfStatsLevel};
        set_perf_stats(PerfStatsLevel::EnableCount);
        let mut ctx = PerfContext::default();
        ctx.reset();
        let snap = e.snapshot();
        for i in 0..lookups {
            // Odd numbers: never written.
            let key = large_table_key(2 * i + 1);
            let mut it = snap.versions_iter();
            it.seek(&key);
            assert!(!it.valid() || it.key()[..20] != key[..20], "lookup {i}");
        }
        let misses = (
            ctx.metric(PerfMetric::BloomMemtableMissCount),
            ctx.metric(PerfMetric::BloomSstMissCount),
        );
        set_perf_stats(PerfStatsLevel::Disable);
        misses
    }

    #[test]
    fn a_lookup_of_an_absent_key_is_answered_by_the_prefix_filters() {
        // A create looks up a key with no version yet: the filters answer, in the memtable
        // and in a table file, without searching either.
        let dir = tempfile::tempdir().expect("tempdir");
        let e = RocksEngine::open(dir.path(), &RocksOptions::default()).expect("open");
        let write_even = |from: u32| {
            let mut b = WriteBatch::new();
            for k in (from..from + 2000).step_by(2) {
                b.put(Table::Kv, large_table_key(k), vec![b'v'; 100]);
            }
            e.write(b, false).expect("write");
        };
        write_even(0);
        let (memtable, _) = filter_misses(&e, 1000);
        // A Bloom filter has false positives: ~1 % at this size.
        assert!(
            memtable >= 950,
            "{memtable} of 1000 answered by the memtable's filter"
        );
        e.defragment().expect("into a table file");
        let (_, table) = filter_misses(&e, 1000);
        assert!(
            table >= 950,
            "{table} of 1000 answered by the table file's filter"
        );
    }

    /// Opens `path` as builds before the prefix filters did: whole-key filters in every
    /// table, no prefix extractor.
    fn open_without_prefix_filters(path: &Path) -> DB {
        let mut block = BlockBasedOptions::default();
        block.set_bloom_filter(10.0, false);
        block.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
        block.set_partition_filters(true);
        let cfs = Table::ALL.iter().map(|t| {
            let mut o = Options::default();
            o.set_block_based_table_factory(&block);
            ColumnFamilyDescriptor::new(t.name(), o)
        });
        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        DB::open_cf_descriptors(&db_opts, path, cfs).expect("open without prefix filters")
    }

    #[test]
    fn table_files_with_and_without_prefix_filters_read_both_ways() {
        // Upgrade: table files written without prefix filters, read with them.
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = open_without_prefix_filters(dir.path());
            let cf = db.cf_handle(Table::Kv.name()).expect("kv");
            for k in 0..100 {
                db.put_cf(cf, large_table_key(k), b"before").expect("put");
            }
            db.flush_cf(cf).expect("flush");
        }
        {
            let e = RocksEngine::open(dir.path(), &RocksOptions::default()).expect("open");
            let snap = e.snapshot();
            for k in 0..100 {
                let key = large_table_key(k);
                let mut it = snap.versions_iter();
                it.seek(&key);
                assert!(it.valid() && it.key() == key, "version of {k} lost");
            }
            drop(snap);
            let mut b = WriteBatch::new();
            for k in 100..200 {
                b.put(Table::Kv, large_table_key(k), b"after".to_vec());
            }
            e.write(b, true).expect("write");
            e.defragment().expect("one table file with prefix filters");
        }
        // Downgrade: a table file with prefix filters only (no whole keys), read by a build
        // that checks whole-key filters: RocksDB records which filters a file has.
        let db = open_without_prefix_filters(dir.path());
        let cf = db.cf_handle(Table::Kv.name()).expect("kv");
        for k in 0..200 {
            let want: &[u8] = if k < 100 { b"before" } else { b"after" };
            assert_eq!(
                db.get_cf(cf, large_table_key(k)).expect("get").as_deref(),
                Some(want),
                "key {k}"
            );
        }
    }

    /// Waits, up to 60 s, until `held()` is at most `limit`; returns its last value. RocksDB
    /// checks its bounds when a write arrives and flushes in the background, so a flush a
    /// bound calls for after the test's last write waits for the next one: each wait writes
    /// one small key.
    fn settle(e: &RocksEngine, limit: u64, held: impl Fn() -> u64) -> u64 {
        let mut now = held();
        for i in 0..600u32 {
            if now <= limit {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            let mut b = WriteBatch::new();
            b.put(
                Table::Kv,
                [b"tick".as_slice(), &i.to_be_bytes()].concat(),
                vec![0],
            );
            e.write(b, false).expect("write");
            now = held();
        }
        now
    }

    #[test]
    fn memtables_together_stay_within_the_total_bound() {
        const MIB: usize = 1 << 20;
        let write = |e: &RocksEngine| {
            // 48 MiB over two tables, in 1 MiB batches.
            for batch in 0..48u32 {
                let mut b = WriteBatch::new();
                for i in 0..64u32 {
                    let table = if i % 2 == 0 {
                        Table::Kv
                    } else {
                        Table::RaftLog
                    };
                    let key = (batch * 64 + i).to_be_bytes().to_vec();
                    b.put(table, key, vec![(i % 251) as u8; 16 << 10]);
                }
                e.write(b, false).expect("write");
            }
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let bounded = RocksOptions {
            total_write_buffer_bytes: 8 * MIB,
            ..RocksOptions::default()
        };
        let e = RocksEngine::open(dir.path(), &bounded).expect("open");
        write(&e);
        // Flushes the bound triggered run in the background; what it governs is what is held
        // once they are done. They queue behind one another (one flush thread) and each ends
        // in an fsync, so on a busy disk they can take seconds: wait on what is held itself
        // (unbounded, it stays at 48 MiB: nothing ever flushes it). The limit: the bound,
        // plus the memtable being filled when a flush was decided and arena slack.
        let limit = 16 * MIB as u64;
        let held = settle(&e, limit, || e.memtable_bytes());
        let pending: Vec<_> = [
            "rocksdb.num-immutable-mem-table",
            "rocksdb.num-running-flushes",
        ]
        .iter()
        .map(|p| (*p, e.int_property(e.cf(Table::Kv).expect("cf"), p)))
        .collect();
        assert!(
            held <= limit,
            "{held} bytes in memtables after 60 s; {pending:?}"
        );
        drop(e);

        // Without the total bound, each family's own 64 MiB lets it all stay in memory.
        let dir = tempfile::tempdir().expect("tempdir");
        let per_family_only = RocksOptions {
            total_write_buffer_bytes: 0,
            ..RocksOptions::default()
        };
        let e = RocksEngine::open(dir.path(), &per_family_only).expect("open");
        write(&e);
        let held = e.memtable_bytes();
        assert!(held >= 40 * MIB as u64, "{held} bytes in memtables");
    }

    /// The directory's write-ahead log files: (number, length), in number order.
    fn log_files(dir: &Path) -> Vec<(u64, u64)> {
        let mut logs: Vec<_> = std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let number = wal_number(&e.file_name().to_string_lossy())?;
                Some((number, e.metadata().ok()?.len()))
            })
            .collect();
        logs.sort_unstable();
        logs
    }

    /// 1 MiB batches into `Kv`, each with one small key in `Meta` as every apply writes
    /// when `with_meta` (without it, each flush of `Kv` makes the previous log obsolete).
    fn write_kv(e: &RocksEngine, batches: u32, with_meta: bool) {
        for batch in 0..batches {
            let mut b = WriteBatch::new();
            for i in 0..64u32 {
                let key = (batch * 64 + i).to_be_bytes().to_vec();
                b.put(Table::Kv, key, vec![(i % 251) as u8; 16 << 10]);
            }
            if with_meta {
                b.put(
                    Table::Meta,
                    b"applied".to_vec(),
                    batch.to_be_bytes().to_vec(),
                );
            }
            e.write(b, false).expect("write");
        }
    }

    #[test]
    fn write_ahead_logs_stay_within_their_bound_though_a_small_table_is_never_full() {
        const MIB: u64 = 1 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        // `Kv` flushes each time its 1 MiB memtable fills (with no total bound, as in the
        // server once the memtables of the large tables fill on their own).
        let bounded = RocksOptions {
            write_buffer_bytes: 1 << 20,
            total_write_buffer_bytes: 0,
            total_wal_bytes: 8 * MIB,
            ..RocksOptions::default()
        };
        let e = RocksEngine::open(dir.path(), &bounded).expect("open");
        write_kv(&e, 48, true);
        // The limit: the bound and the log being written.
        let limit = 24 * MIB;
        let logs = |dir: &Path| log_files(dir).iter().map(|(_, len)| len).sum::<u64>();
        let held = settle(&e, limit, || logs(dir.path()));
        let files = log_files(dir.path());
        assert!(
            held <= limit,
            "{held} bytes of logs after 60 s, in {} files from log {:?}",
            files.len(),
            files.first()
        );
        drop(e);

        // Without the bound, `Meta`'s memtable keeps every log alive (RocksDB's own limit is
        // 64 MiB here).
        let dir = tempfile::tempdir().expect("tempdir");
        let unbounded = RocksOptions {
            total_wal_bytes: 0,
            ..bounded
        };
        let e = RocksEngine::open(dir.path(), &unbounded).expect("open");
        write_kv(&e, 48, true);
        let held = logs(dir.path());
        assert!(held >= 40 * MIB, "{held} bytes of logs");
    }

    #[test]
    fn logs_are_written_over_and_a_reopen_replays_only_the_new_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = RocksOptions {
            write_buffer_bytes: 1 << 20,
            total_write_buffer_bytes: 0,
            ..RocksOptions::default()
        };
        assert_eq!(opts.recycled_wals, 1);
        let e = RocksEngine::open(dir.path(), &opts).expect("open");
        // Log files roll with each flush; once one is obsolete it is kept, and the next log
        // is that file renamed: right after the roll, before anything is written to it, it
        // still has the old log's length (a new file would be empty).
        let mut reused = Vec::new();
        for _ in 0..12 {
            write_kv(&e, 2, false);
            e.db.flush_cf(e.cf(Table::Kv).expect("cf")).expect("flush");
            let newest = log_files(dir.path()).last().copied().expect("a log");
            reused.push(newest.1 >= 1 << 20);
        }
        assert!(
            reused.iter().filter(|r| **r).count() >= 10,
            "logs written over, by roll: {reused:?}"
        );

        // Neither the spare file nor the reused log's old length counts toward the size:
        // right after a flush the memtables are all but empty, and so is the live log.
        let live = e.oldest_live_wal().expect("reported");
        let (mut spare, mut live_logs, mut rest) = (0, 0, 0);
        for entry in std::fs::read_dir(dir.path()).expect("read dir") {
            let entry = entry.expect("entry");
            let len = entry.metadata().expect("metadata").len();
            match wal_number(&entry.file_name().to_string_lossy()) {
                Some(n) if n < live => spare += len,
                Some(_) => live_logs += len,
                None => rest += len,
            }
        }
        assert!(
            spare > 0,
            "no spare log below {live}: {:?}",
            log_files(dir.path())
        );
        assert!(live_logs >= 1 << 20, "live logs {live_logs} bytes long");
        e.disk.lock().expect("lock").measured = None;
        let size = e.size_bytes();
        assert!(
            size >= rest && size < rest + (1 << 20),
            "size {size}: other files {rest}, live logs {live_logs}, spare {spare}"
        );

        // New records go into a reused file that still holds older ones past them; closing
        // does not flush, so the reopen replays the log and must stop at the new records.
        let mut b = WriteBatch::new();
        b.put(Table::Kv, 0u32.to_be_bytes().to_vec(), b"new".to_vec());
        b.delete(Table::Kv, 1u32.to_be_bytes().to_vec());
        e.write(b, true).expect("write");
        drop(e);
        let e = RocksEngine::open(dir.path(), &opts).expect("reopen");
        let snap = e.snapshot();
        let get = |k: u32| snap.get(Table::Kv, &k.to_be_bytes()).expect("get");
        assert_eq!(get(0).as_deref(), Some(&b"new"[..]));
        assert_eq!(get(1), None);
        assert_eq!(get(2).as_deref(), Some(&[2u8; 16 << 10][..]));
        assert_eq!(get(127).as_deref(), Some(&[63u8; 16 << 10][..]));
        assert_eq!(get(128), None);
    }
}
