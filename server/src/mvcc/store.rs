//! [`Store`]: the MVCC key space over an [`Engine`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};

use super::compactor::{CompactTicket, Compactor};
use super::current;
use super::key_codec::{kv_key, kv_prefix, lease_key, rev_key, split_kv_key, split_rev_key};
use super::latest::Latest;
use super::versions::Versions;
use super::write_txn::{Group, WriteOutcome, WriteTxn};
use super::{Error, KeyRange, Result};
use crate::storage::codec::{self, DEFAULT_FORMAT};
use crate::storage::{Engine, Snapshot, Table, WriteBatch};

pub(crate) const META_CURRENT_REV: &[u8] = b"current_rev";
pub(crate) const META_APPLIED_INDEX: &[u8] = b"applied_index";
pub(crate) const META_COMPACT_SCHEDULED: &[u8] = b"compact_scheduled";
pub(crate) const META_COMPACT_FINISHED: &[u8] = b"compact_finished";
/// The highest storage format the `kv` records may be in (all of them, once no migration is
/// pending). A snapshot's header carries it.
pub(crate) const META_STORAGE_FORMAT: &[u8] = b"storage_format";
/// The format new records are written in, once a replicated switch
/// ([`Applying::set_storage_format`]) has set it; absent before (the configured format then).
pub const META_WRITE_FORMAT: &[u8] = b"write_format";
/// The format an unfinished migration (offline or online) converts every record to.
pub const META_MIGRATE_TO: &[u8] = b"migrate/to";
/// The last `kv` table key an unfinished migration has converted.
pub const META_MIGRATE_CURSOR: &[u8] = b"migrate/cursor";

/// Options fixed when a [`Store`] is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The record format new writes use, until a replicated switch recorded in meta
    /// (`write_format`) says otherwise.
    pub write_format: u8,
    /// fsync before a write is acknowledged (`--unsafe-no-fsync` turns it off).
    pub fsync: bool,
    /// Most bytes the apply step keeps of recently written keys' newest versions, so that a
    /// put need not look its key up in the engine ([`DEFAULT_LATEST_CACHE_BYTES`]; 0: off).
    pub latest_cache_bytes: usize,
}

/// The default of [`StoreOptions::latest_cache_bytes`].
pub const DEFAULT_LATEST_CACHE_BYTES: usize = 8 << 20;

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            write_format: DEFAULT_FORMAT,
            fsync: true,
            latest_cache_bytes: DEFAULT_LATEST_CACHE_BYTES,
        }
    }
}

/// What a read asks for, besides the key range.
#[derive(Debug, Clone, Copy, Default)]
pub struct RangeOptions {
    /// At most this many keys (0: no limit). `count` still covers the whole range.
    pub limit: usize,
    /// Read at this revision (0 or less: the current one).
    pub rev: i64,
    /// Only count; return no key-values.
    pub count_only: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    /// The store's current revision when the read was served (as etcd reports it in the
    /// response header), whatever revision the read was at.
    pub rev: i64,
    /// Live keys in the whole range at `rev`.
    pub count: usize,
}

/// The MVCC store.
///
/// Readers and the single writer never block each other. The writer applies commands through
/// [`Applying`] (one at a time: it holds the writer lock), collecting a group of commands'
/// writes in one batch written to the engine without fsync; [`Applying::publish`] then
/// syncs once for the whole group and only then moves `current_rev` forward. Readers read at
/// `current_rev`, so they never observe a revision that is not yet durable, even though its
/// entries may already sit in the engine.
pub struct Store {
    engine: Arc<dyn Engine>,
    opts: StoreOptions,
    /// The format new records are written in: `opts.write_format` unless meta
    /// `write_format` (a replicated switch) says otherwise. Changed only by the apply step.
    write_format: AtomicU8,
    /// Held by every background job that rewrites or deletes existing `kv` records (the
    /// compactor's chunks, the re-encoder's batches, a snapshot install) for one batch, from
    /// its engine snapshot to its write: so a re-encoded record can never bring back one a
    /// compaction removed meanwhile. Requests and the apply step never take it, except a
    /// storage-format switch. Lock order: the writer lock, then this one.
    background: Arc<Mutex<()>>,
    /// The newest durable, readable revision.
    current_rev: AtomicI64,
    /// Reads below this revision fail with `Compacted`.
    compact_rev: AtomicI64,
    applied_index: AtomicU64,
    /// Raised alarms as `(member id, alarm type)`; changed only by the apply step.
    alarms: Mutex<std::collections::BTreeSet<(u64, i32)>>,
    /// Writer-side state. Lock order: this lock, then the engine's internal locks.
    writer: Mutex<WriterState>,
    /// Recently written keys' newest versions; only the apply step (holding the writer lock)
    /// reads or changes it. Lock order: the writer lock, then this one.
    latest: Mutex<Latest>,
    compactor: Compactor,
    /// Whether the engine holds the `kv_current` table, which the apply step then keeps
    /// current (see `mvcc::current`): it is rebuilt, if stale, whenever the store opens or
    /// reloads.
    current_table: bool,
}

struct WriterState {
    /// Newest revision written to the engine (may be ahead of `current_rev` until publish).
    applied_rev: i64,
    applied_index: u64,
    pending_compactions: Vec<CompactTicket>,
}

/// A Meta-table `i64` (as [`put_meta_i64`] writes it), if present.
pub(crate) fn meta_i64(engine: &dyn Engine, key: &[u8]) -> Result<Option<i64>> {
    engine
        .get(Table::Meta, key)?
        .map(|v| be_i64(&v, || format!("meta {:?}", String::from_utf8_lossy(key))))
        .transpose()
}

/// An `i64` stored big endian (as [`put_meta_i64`] writes it); `what` names it when it is
/// not 8 bytes long.
pub(crate) fn be_i64(v: &[u8], what: impl FnOnce() -> String) -> Result<i64> {
    let arr: [u8; 8] = v.try_into().map_err(|_| Error::Corrupt(what()))?;
    Ok(i64::from_be_bytes(arr))
}

pub(crate) fn put_meta_i64(batch: &mut WriteBatch, key: &[u8], v: i64) {
    batch.put(Table::Meta, key.to_vec(), v.to_be_bytes().to_vec());
}

impl Store {
    /// Opens the store on `engine`, resuming an interrupted compaction.
    pub fn open(engine: Arc<dyn Engine>, opts: StoreOptions) -> Result<Arc<Self>> {
        codec::encode(opts.write_format, &KeyValue::default(), &mut Vec::new())?;
        let current = meta_i64(engine.as_ref(), META_CURRENT_REV)?.unwrap_or(1);
        let index = meta_i64(engine.as_ref(), META_APPLIED_INDEX)?.unwrap_or(0);
        let scheduled = meta_i64(engine.as_ref(), META_COMPACT_SCHEDULED)?.unwrap_or(0);
        let finished = meta_i64(engine.as_ref(), META_COMPACT_FINISHED)?.unwrap_or(0);
        let write_format = stored_write_format(engine.as_ref())?.unwrap_or(opts.write_format);
        if engine.get(Table::Meta, META_STORAGE_FORMAT)?.is_none() {
            let mut b = WriteBatch::new();
            b.put(
                Table::Meta,
                META_STORAGE_FORMAT.to_vec(),
                vec![opts.write_format],
            );
            put_meta_i64(&mut b, META_CURRENT_REV, current);
            engine.write(b, opts.fsync)?;
        }
        let current_table = current::rebuild(engine.as_ref(), current)?;
        let background = Arc::new(Mutex::new(()));
        let compactor = Compactor::start(engine.clone(), finished, background.clone())?;
        let alarms = load_alarms(engine.as_ref())?;
        let latest = Mutex::new(Latest::new(opts.latest_cache_bytes));
        let store = Arc::new(Self {
            engine,
            opts,
            write_format: AtomicU8::new(write_format),
            background,
            current_rev: AtomicI64::new(current),
            compact_rev: AtomicI64::new(scheduled),
            applied_index: AtomicU64::new(index as u64),
            alarms: Mutex::new(alarms),
            writer: Mutex::new(WriterState {
                applied_rev: current,
                applied_index: index as u64,
                pending_compactions: Vec::new(),
            }),
            latest,
            compactor,
            current_table,
        });
        if scheduled > finished {
            tracing::info!(scheduled, finished, "resuming interrupted compaction");
            store.compactor.schedule(CompactTicket::new(scheduled));
        }
        Ok(store)
    }

    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    pub fn options(&self) -> &StoreOptions {
        &self.opts
    }

    /// Whether the apply step keeps the `kv_current` table (the engine holds it).
    pub(crate) fn current_table(&self) -> bool {
        self.current_table
    }

    /// The storage format new records are written in.
    pub fn write_format(&self) -> u8 {
        self.write_format.load(Ordering::SeqCst)
    }

    /// The lock background rewrites of existing records hold per batch (see the field).
    pub fn background_lock(&self) -> &Arc<Mutex<()>> {
        &self.background
    }

    /// The newest readable revision.
    pub fn current_revision(&self) -> i64 {
        self.current_rev.load(Ordering::SeqCst)
    }

    /// The revision below which history is gone.
    pub fn compact_revision(&self) -> i64 {
        self.compact_rev.load(Ordering::SeqCst)
    }

    /// Re-reads everything the store caches from the engine, after the engine's content was
    /// replaced underneath it (a Raft snapshot was installed). Holds the writer lock, so no
    /// command is applied meanwhile.
    pub fn reload(&self) -> Result<()> {
        let mut w = self.writer.lock().map_err(|_| Error::Closed)?;
        let engine = self.engine.as_ref();
        let current = meta_i64(engine, META_CURRENT_REV)?.unwrap_or(1);
        let index = meta_i64(engine, META_APPLIED_INDEX)?.unwrap_or(0) as u64;
        let scheduled = meta_i64(engine, META_COMPACT_SCHEDULED)?.unwrap_or(0);
        let finished = meta_i64(engine, META_COMPACT_FINISHED)?.unwrap_or(0);
        if let Some(f) = stored_write_format(engine)? {
            self.write_format.store(f, Ordering::SeqCst);
        }
        *self.alarms.lock().map_err(|_| Error::Closed)? = load_alarms(engine)?;
        current::rebuild(engine, current)?;
        w.applied_rev = current;
        w.applied_index = index;
        self.forget_latest();
        self.current_rev.store(current, Ordering::SeqCst);
        self.compact_rev.store(scheduled, Ordering::SeqCst);
        self.applied_index.store(index, Ordering::SeqCst);
        if scheduled > finished {
            self.compactor.schedule(CompactTicket::new(scheduled));
        }
        Ok(())
    }

    /// The newest version of `key`, if the apply step kept it.
    pub(crate) fn latest(&self, key: &[u8]) -> Option<KeyValue> {
        self.latest.lock().ok()?.get(key)
    }

    /// Records a committed transaction's changes as their keys' newest versions.
    pub(crate) fn remember_latest(&self, changes: &Overlay) {
        if let Ok(mut l) = self.latest.lock() {
            for (k, kv) in changes {
                l.set(k, kv.as_ref());
            }
        }
    }

    /// Forgets every key's newest version (the engine no longer holds what was recorded).
    fn forget_latest(&self) {
        if let Ok(mut l) = self.latest.lock() {
            l.clear();
        }
    }

    /// A value of the Meta table (where the apply step may keep its own records).
    pub fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.engine.get(Table::Meta, key)?)
    }

    /// Index of the last applied command.
    pub fn applied_index(&self) -> u64 {
        self.applied_index.load(Ordering::SeqCst)
    }

    /// Waits until physical compaction up to the newest scheduled revision is finished.
    pub fn compactor(&self) -> &Compactor {
        &self.compactor
    }

    /// Reads `range` as of `opts.rev`.
    pub fn range(&self, range: &KeyRange, opts: RangeOptions) -> Result<RangeResult> {
        // Load the revision before taking the snapshot, so the snapshot contains it; check
        // compaction after, so a passing check means the snapshot predates the deletion.
        let current = self.current_revision();
        let snap = self.engine.snapshot();
        let rev = self.check_rev(opts.rev, current)?;
        let mut r = range_snapshot(snap.as_ref(), range, rev, opts)?;
        r.rev = current;
        Ok(r)
    }

    /// Validates a requested revision against the current and compacted ones.
    pub(crate) fn check_rev(&self, requested: i64, current: i64) -> Result<i64> {
        if requested > current {
            return Err(Error::FutureRev);
        }
        let rev = if requested <= 0 { current } else { requested };
        if rev < self.compact_revision() {
            return Err(Error::Compacted);
        }
        Ok(rev)
    }

    /// The change events of revisions `from..=to`, in revision and sub-revision order, at most
    /// `max_events` of them but never part of a revision: a revision's events come whole (so
    /// slightly more than `max_events` can be returned). Events carry no `prev_kv`.
    ///
    /// Errors: `Compacted` if `from` is below the compacted revision (the history is gone),
    /// `FutureRev` if `to` is beyond the current revision.
    pub fn history(&self, from: i64, to: i64, max_events: usize) -> Result<Vec<Event>> {
        let current = self.current_revision();
        let snap = self.engine.snapshot();
        if to > current {
            return Err(Error::FutureRev);
        }
        if from < self.compact_revision() {
            return Err(Error::Compacted);
        }
        let mut out = Vec::new();
        let mut it = snap.iter(Table::Rev);
        it.seek(&rev_key(from.max(1), 0));
        let mut last_main = None;
        while it.valid() {
            let (main, _) =
                split_rev_key(it.key()).ok_or_else(|| Error::Corrupt("rev key".into()))?;
            if main > to || (out.len() >= max_events && last_main != Some(main)) {
                break;
            }
            let record = snap
                .get(Table::Kv, &kv_key(it.value(), main))?
                .ok_or_else(|| Error::Corrupt(format!("revision {main} has no record")))?;
            let kv = codec::decode(&record)?;
            let kind = if kv.version == 0 {
                EventType::Delete
            } else {
                EventType::Put
            };
            out.push(Event {
                r#type: kind as i32,
                kv: Some(kv),
                prev_kv: None,
            });
            last_main = Some(main);
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// etcd's HashKV: a CRC-32C over every key-value version at or below `rev` that survives
    /// compaction, in revision order, each as its revision (`be64(main) ++ be64(sub)`) and its
    /// protobuf `KeyValue` encoding. Returns `(hash, compact revision, hashed revision)`.
    ///
    /// Deterministic: versions at or below the compacted revision are hashed only if compaction
    /// keeps them, so the result does not depend on how far physical compaction has progressed,
    /// and the protobuf encoding makes it independent of the storage format records are in. The
    /// same data gives the same hash on every member and after a restart.
    pub fn hash_kv(&self, rev: i64) -> Result<(u32, i64, i64)> {
        let current = self.current_revision();
        let compact = self.compact_revision();
        // etcd's HashByRev: a positive revision at or below the compacted one is compacted
        // (even the compacted revision itself, unlike a Range); 0 means current; a negative
        // one hashes nothing. The compacted revision is -1 before any compaction.
        if rev > 0 && compact > 0 && rev <= compact {
            return Err(Error::Compacted);
        }
        if rev > current {
            return Err(Error::FutureRev);
        }
        let rev = if rev == 0 { current } else { rev };
        let hash = self.hash_kv_many(&[rev])?[0];
        Ok((hash, if compact > 0 { compact } else { -1 }, rev))
    }

    /// etcd's HashKV at each of `revs` (positive, at most the current revision, above the
    /// compacted one; the caller checks), in one pass over the revision log: the hash at
    /// revision R is the running CRC over every surviving version up to R, so the hashes at
    /// several revisions are that CRC sampled as the pass crosses each. Returns them in the
    /// order of `revs`.
    pub fn hash_kv_many(&self, revs: &[i64]) -> Result<Vec<u32>> {
        let snap = self.engine.snapshot();
        let compact = self.compact_revision();
        let mut order: Vec<usize> = (0..revs.len()).collect();
        order.sort_by_key(|&i| revs[i]);
        let mut out = vec![0u32; revs.len()];
        let mut next = 0; // index into `order` of the next revision to sample
        let mut hash = crc32c::crc32c(b"key");
        let mut it = snap.iter(Table::Rev);
        it.seek(&[]);
        let mut buf = Vec::new();
        while it.valid() && next < order.len() {
            let (main, _) =
                split_rev_key(it.key()).ok_or_else(|| Error::Corrupt("rev key".into()))?;
            while next < order.len() && main > revs[order[next]] {
                out[order[next]] = hash;
                next += 1;
            }
            if next == order.len() {
                break;
            }
            let key = it.value();
            let Some(record) = snap.get(Table::Kv, &kv_key(key, main))? else {
                it.next();
                continue; // removed by a compaction in progress
            };
            let kv = codec::decode(&record)?;
            if main <= compact && !survives(snap.as_ref(), key, main, compact)? {
                it.next();
                continue;
            }
            buf.clear();
            prost::Message::encode(&kv, &mut buf)
                .map_err(|e| Error::Corrupt(format!("encode: {e}")))?;
            hash = crc32c::crc32c_append(hash, it.key());
            hash = crc32c::crc32c_append(hash, &buf);
            it.next();
        }
        it.status()?;
        for &i in &order[next..] {
            out[i] = hash;
        }
        Ok(out)
    }

    /// A CRC-32C over every table but `meta` (etcd's Hash of the whole backend).
    pub fn hash(&self) -> Result<u32> {
        let snap = self.engine.snapshot();
        let mut hash = 0;
        for t in [Table::Kv, Table::Rev, Table::Lease] {
            hash = crc32c::crc32c_append(hash, t.name().as_bytes());
            let mut it = snap.iter(t);
            it.seek(&[]);
            while it.valid() {
                hash = crc32c::crc32c_append(hash, it.key());
                hash = crc32c::crc32c_append(hash, it.value());
                it.next();
            }
            it.status()?;
        }
        Ok(hash)
    }

    /// Every granted lease as `(id, granted TTL)`, from durable state.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        let snap = self.engine.snapshot();
        let mut it = snap.iter(Table::Lease);
        it.seek(&[]);
        let mut out = Vec::new();
        let corrupt = || Error::Corrupt("lease table".into());
        while it.valid() {
            if it.key().len() == 8 {
                let id = i64::from_be_bytes(it.key().try_into().map_err(|_| corrupt())?);
                let ttl = i64::from_le_bytes(it.value().try_into().map_err(|_| corrupt())?);
                out.push((id, ttl));
            }
            it.next();
        }
        it.status()?;
        Ok(out)
    }

    /// The keys attached to lease `id`.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        lease_keys(self.engine.snapshot().as_ref(), id)
    }

    /// Raised alarms, as `(member id, alarm type)`.
    pub fn alarms(&self) -> Vec<(u64, i32)> {
        self.alarms
            .lock()
            .map(|a| a.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether an alarm of `alarm` type is raised by any member.
    pub fn has_alarm(&self, alarm: i32) -> bool {
        self.alarms
            .lock()
            .map(|a| a.iter().any(|(_, t)| *t == alarm))
            .unwrap_or(false)
    }

    /// Takes the writer lock. Only one [`Applying`] exists at a time.
    pub fn applier(&self) -> Result<Applying<'_>> {
        let state = self.writer.lock().map_err(|_| Error::Closed)?;
        Ok(Applying {
            store: self,
            state,
            pending: WriteBatch::new(),
            group: None,
            dirty: false,
        })
    }
}

/// The write format a replicated switch recorded, checked against what this binary writes.
fn stored_write_format(engine: &dyn Engine) -> Result<Option<u8>> {
    let Some(v) = engine.get(Table::Meta, META_WRITE_FORMAT)? else {
        return Ok(None);
    };
    let format = *v
        .first()
        .ok_or_else(|| Error::Corrupt("meta write_format".into()))?;
    if !codec::is_supported(format) {
        return Err(Error::UnsupportedFormat(format));
    }
    Ok(Some(format))
}

/// The keys attached to lease `id`, in key order.
pub(crate) fn lease_keys(snap: &dyn Snapshot, id: i64) -> Result<Vec<Vec<u8>>> {
    let prefix = lease_key(id, &[]);
    let mut it = snap.iter(Table::Lease);
    it.seek(&prefix);
    let mut out = Vec::new();
    while it.valid() && it.key().starts_with(&prefix) {
        if it.key().len() > prefix.len() {
            out.push(it.key()[prefix.len()..].to_vec());
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// Reads `range` at `rev` from a snapshot.
pub(crate) fn range_snapshot(
    snap: &dyn Snapshot,
    range: &KeyRange,
    rev: i64,
    opts: RangeOptions,
) -> Result<RangeResult> {
    let mut kvs = Vec::new();
    let mut count = 0usize;
    scan(snap, range, rev, |record| {
        count += 1;
        if !opts.count_only && (opts.limit == 0 || kvs.len() < opts.limit) {
            kvs.push(codec::decode(record)?);
        }
        Ok(true)
    })?;
    Ok(RangeResult { kvs, rev, count })
}

/// Visits `key`'s newest record at or below `rev`, unless it has none or it is a tombstone
/// ([`scan`] of a single key, without the key copied into a [`KeyRange`]).
pub(crate) fn scan_key(
    snap: &dyn Snapshot,
    key: &[u8],
    rev: i64,
    visit: impl FnOnce(&[u8]) -> Result<()>,
) -> Result<()> {
    if let Some(newest) = Versions::at(snap, key, rev).current()? {
        if !is_tombstone(newest.record)? {
            visit(newest.record)?;
        }
    }
    Ok(())
}

/// Calls `visit` with the record of every key live at `rev` in `range`, in key order, until it
/// returns `false`. A range of several keys reads the `kv_current` table when the snapshot's
/// is current at `rev` (`mvcc::current`), the key history otherwise.
pub(crate) fn scan(
    snap: &dyn Snapshot,
    range: &KeyRange,
    rev: i64,
    mut visit: impl FnMut(&[u8]) -> Result<bool>,
) -> Result<()> {
    if let KeyRange::Single(key) = range {
        return scan_key(snap, key, rev, |r| visit(r).map(drop));
    }
    if let KeyRange::Between(s, e) = range {
        if e <= s {
            return Ok(());
        }
    }
    if current::serves(snap, rev)? {
        return current::scan(snap, range, visit);
    }
    scan_history(snap, range, rev, visit)
}

/// [`scan`] of a range (not a single key) in the key history, [`Table::Kv`]: each key's
/// newest version at or below `rev`, stepping over its other versions.
pub(crate) fn scan_history(
    snap: &dyn Snapshot,
    range: &KeyRange,
    rev: i64,
    mut visit: impl FnMut(&[u8]) -> Result<bool>,
) -> Result<()> {
    let end = range.end().map(kv_prefix);
    let mut it = snap.iter(Table::Kv);
    it.seek(&kv_prefix(range.start()));
    let mut target = Vec::new();
    // The cursor's key and value are read once per position (on RocksDB each read is a
    // validity check and a lookup across the C API).
    while it.valid() {
        let key = it.key();
        let (plen, r) = split_kv_key(key).ok_or_else(|| Error::Corrupt("kv key".into()))?;
        if let Some(end) = &end {
            if key[..plen] >= end[..] {
                break;
            }
        }
        // The key's prefix, while the cursor is on its versions.
        target.clear();
        target.extend_from_slice(&key[..plen]);
        if r > rev {
            // Newer than the read: jump to the newest version at or below `rev`.
            target.extend_from_slice(&(!(rev as u64)).to_be_bytes());
            it.seek(&target);
            if !it.valid() {
                break;
            }
            let key = it.key();
            if key.len() != plen + 8 || key[..plen] != target[..plen] {
                continue; // no version at or below `rev`: we are on the next key already
            }
            target.truncate(plen);
        }
        let value = it.value();
        if !is_tombstone(value)? && !visit(value)? {
            return Ok(());
        }
        // Skip the older versions of this key: a few steps, then a seek past them.
        let mut steps = 0;
        loop {
            it.next();
            if !it.valid() {
                break;
            }
            let key = it.key();
            if key.len() != plen + 8 || key[..plen] != target[..] {
                break;
            }
            steps += 1;
            if steps == 4 {
                target.extend_from_slice(&[0xff; 9]);
                it.seek(&target);
                break;
            }
        }
    }
    it.status().map_err(Error::from)
}

const ALARM_PREFIX: &[u8] = b"alarm/";

fn alarm_key(member: u64, alarm: i32) -> Vec<u8> {
    let mut k = ALARM_PREFIX.to_vec();
    k.extend_from_slice(&member.to_be_bytes());
    k.extend_from_slice(&alarm.to_be_bytes());
    k
}

fn load_alarms(engine: &dyn Engine) -> Result<std::collections::BTreeSet<(u64, i32)>> {
    let snap = engine.snapshot();
    let mut it = snap.iter(Table::Meta);
    it.seek(ALARM_PREFIX);
    let mut out = std::collections::BTreeSet::new();
    while it.valid() && it.key().starts_with(ALARM_PREFIX) {
        let rest = &it.key()[ALARM_PREFIX.len()..];
        let (m, t) = rest
            .split_at_checked(8)
            .ok_or_else(|| Error::Corrupt("alarm key".into()))?;
        let member = u64::from_be_bytes(m.try_into().map_err(|_| Error::Corrupt("alarm".into()))?);
        let alarm = i32::from_be_bytes(t.try_into().map_err(|_| Error::Corrupt("alarm".into()))?);
        out.insert((member, alarm));
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// Whether compaction at `compact` keeps `key`'s version at `main` (`main <= compact`): only the
/// newest version at or below `compact`, and only if it is not a tombstone.
fn survives(snap: &dyn Snapshot, key: &[u8], main: i64, compact: i64) -> Result<bool> {
    match Versions::at(snap, key, compact).current()? {
        Some(newest) => Ok(newest.rev == main && !is_tombstone(newest.record)?),
        None => Ok(false),
    }
}

pub(crate) fn is_tombstone(record: &[u8]) -> Result<bool> {
    Ok(codec::peek_mod_version(record)?.1 == 0)
}

/// Pending writes of an apply group are written once they hold this many bytes of keys and
/// values (or when the group is published).
pub(crate) const PENDING_BYTES: usize = 4 << 20;

/// The writer's handle: applies commands one after another, then publishes them together.
///
/// The key-space writes of consecutive commands (and their apply positions) collect in one
/// batch, written to the engine in one write when [`publish`](Self::publish) is called (or
/// once the batch holds 4 MiB, or before a command that reads or writes the engine
/// directly); meanwhile write transactions read the group's changes on top of one engine
/// snapshot (a `Group`). The writes are atomic with the apply position either way: a crash
/// leaves the engine at the end of a command.
pub struct Applying<'a> {
    store: &'a Store,
    state: MutexGuard<'a, WriterState>,
    /// Writes of the commands applied since the last engine write.
    pending: WriteBatch,
    /// The view of the engine plus `pending` that write transactions read; `None` after a
    /// transaction was dropped without a commit (the view went with it) or once `pending` is
    /// written.
    group: Option<Group<'a>>,
    dirty: bool,
}

impl<'a> Applying<'a> {
    /// Begins a write transaction on top of everything applied so far.
    pub fn begin(&mut self) -> Result<WriteTxn<'a>> {
        let group = match self.group.take() {
            Some(g) => g,
            None => {
                self.flush()?;
                Group::new(self.store, self.state.applied_rev)
            }
        };
        Ok(WriteTxn::new(self.store, group, self.state.applied_rev))
    }

    /// Writes the pending batch to the engine (not yet durable) and drops the group's view.
    pub fn flush(&mut self) -> Result<()> {
        self.group = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.pending);
        put_meta_i64(&mut batch, META_CURRENT_REV, self.state.applied_rev);
        if self.store.current_table() {
            current::set_marker(&mut batch, self.state.applied_rev);
        }
        put_meta_i64(
            &mut batch,
            META_APPLIED_INDEX,
            self.state.applied_index as i64,
        );
        if let Err(e) = self.store.engine.write(batch, false) {
            // What was remembered of the lost batch's writes is not in the engine.
            self.store.forget_latest();
            return Err(e.into());
        }
        Ok(())
    }

    /// The newest applied (not necessarily published) revision.
    pub fn applied_rev(&self) -> i64 {
        self.state.applied_rev
    }

    /// Writes the transaction as command number `index` (the apply index). Not yet durable.
    pub fn commit(&mut self, txn: WriteTxn<'a>, index: u64) -> Result<WriteOutcome> {
        let (batch, outcome, group) = txn.finish();
        self.state.applied_rev = outcome.rev;
        self.group = Some(group);
        self.write(batch, index)?;
        Ok(outcome)
    }

    /// Schedules compaction of history below `rev` as command `index`.
    ///
    /// Errors: `Compacted` if `rev` is not above the compacted revision, `FutureRev` if it is
    /// above the applied revision. Reads below `rev` fail from now on; the physical removal
    /// starts after [`publish`](Self::publish) and the returned ticket completes when it ends.
    pub fn compact(&mut self, rev: i64, index: u64) -> Result<CompactTicket> {
        if rev <= self.store.compact_revision() {
            return Err(Error::Compacted);
        }
        if rev > self.state.applied_rev {
            return Err(Error::FutureRev);
        }
        let mut batch = WriteBatch::new();
        put_meta_i64(&mut batch, META_COMPACT_SCHEDULED, rev);
        self.write(batch, index)?;
        self.store.compact_rev.store(rev, Ordering::SeqCst);
        let ticket = CompactTicket::new(rev);
        self.state.pending_compactions.push(ticket.clone());
        Ok(ticket)
    }

    /// Raises (`active`) or clears an alarm as command `index`. Returns the alarms after.
    pub fn set_alarm(
        &mut self,
        member: u64,
        alarm: i32,
        active: bool,
        index: u64,
    ) -> Result<Vec<(u64, i32)>> {
        let mut batch = WriteBatch::new();
        let key = alarm_key(member, alarm);
        if active {
            batch.put(Table::Meta, key, Vec::new());
        } else {
            batch.delete(Table::Meta, key);
        }
        self.write(batch, index)?;
        let mut alarms = self.store.alarms.lock().map_err(|_| Error::Closed)?;
        if active {
            alarms.insert((member, alarm));
        } else {
            alarms.remove(&(member, alarm));
        }
        Ok(alarms.iter().copied().collect())
    }

    /// Switches the format new records are written in to `to` as command `index` (a
    /// replicated switch: every member runs it at the same position). Records `to` in meta
    /// (`write_format`) and, unless every record is in `to` already, a migration to it
    /// (`migrate/to`, a cursor from the start unless that migration was under way) for the
    /// background re-encoder, and raises meta `storage_format` to the highest format records
    /// may now be in. Returns whether records remain to re-encode.
    ///
    /// Errors: `UnsupportedFormat` if this binary cannot write `to`; nothing is written then.
    pub fn set_storage_format(&mut self, to: u8, index: u64) -> Result<bool> {
        if !codec::is_supported(to) {
            return Err(Error::UnsupportedFormat(to));
        }
        // Reads meta below, and records in the old format go out before the switch.
        self.flush()?;
        // Excludes a re-encoder batch: it must not finish a migration to another target
        // after this switch (its last batch rewrites `migrate/to` and `storage_format`).
        let _background = self.store.background.lock().map_err(|_| Error::Closed)?;
        let engine = self.store.engine.as_ref();
        let stored = engine
            .get(Table::Meta, META_STORAGE_FORMAT)?
            .and_then(|v| v.first().copied())
            .unwrap_or(self.store.write_format());
        let migrating = engine
            .get(Table::Meta, META_MIGRATE_TO)?
            .and_then(|v| v.first().copied());
        let mut batch = WriteBatch::new();
        batch.put(Table::Meta, META_WRITE_FORMAT.to_vec(), vec![to]);
        let pending = !(stored == to && migrating.is_none());
        if pending {
            if migrating != Some(to) {
                batch.put(Table::Meta, META_MIGRATE_TO.to_vec(), vec![to]);
                batch.delete(Table::Meta, META_MIGRATE_CURSOR.to_vec());
            }
            let highest = stored.max(to).max(migrating.unwrap_or(0));
            batch.put(Table::Meta, META_STORAGE_FORMAT.to_vec(), vec![highest]);
        }
        // Written at once, under the background lock.
        self.write(batch, index)?;
        self.flush()?;
        self.store.write_format.store(to, Ordering::SeqCst);
        Ok(pending)
    }

    /// Records position `index` as applied, together with `meta` (extra Meta-table entries,
    /// e.g. Raft's last applied log id) in the same atomic write.
    pub fn record(&mut self, index: u64, meta: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let mut batch = WriteBatch::new();
        for (k, v) in meta {
            batch.put(Table::Meta, k, v);
        }
        self.write(batch, index)
    }

    /// Records that command `index` was applied without changing the key space.
    pub fn skip(&mut self, index: u64) -> Result<()> {
        self.write(WriteBatch::new(), index)
    }

    /// Adds `batch` (e.g. auth-table writes) to the group's pending writes as command
    /// `index`: it reaches the engine with that apply position, at the next flush. Not yet
    /// durable.
    pub fn write(&mut self, batch: WriteBatch, index: u64) -> Result<()> {
        self.pending.append(batch);
        self.state.applied_index = index;
        self.dirty = true;
        if self.pending.size_bytes() >= PENDING_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Makes everything applied durable (one fsync for the whole group), then lets readers see
    /// it and starts scheduled compactions.
    pub fn publish(mut self) -> Result<i64> {
        self.flush()?;
        if self.dirty && self.store.opts.fsync {
            self.store.engine.sync()?;
        }
        let rev = self.state.applied_rev;
        self.store.current_rev.store(rev, Ordering::SeqCst);
        self.store
            .applied_index
            .store(self.state.applied_index, Ordering::SeqCst);
        for t in self.state.pending_compactions.drain(..) {
            self.store.compactor.schedule(t);
        }
        Ok(rev)
    }
}

/// The changes of a write transaction, keyed by user key (`None`: deleted).
pub(crate) type Overlay = BTreeMap<Vec<u8>, Option<KeyValue>>;
