//! [`PinnedRead`]: one engine snapshot at one revision, read as many times as needed.

use metastore_proto::mvccpb::KeyValue;

use super::store::{range_snapshot, scan};
use super::{KeyRange, RangeOptions, RangeResult, Result, Store};
use crate::storage::{codec, Snapshot};

/// A read pinned to an engine snapshot and a revision, for results produced in several
/// passes or over a long time (a large Range sent incrementally, `RangeStream`): every pass
/// sees exactly the same keys, whatever is written or compacted meanwhile.
///
/// Holding one keeps the engine from reclaiming the versions it sees (a RocksDB snapshot), so
/// callers that stream to a client bound its life by the client's pace and stop when the
/// revision gets compacted (see [`PinnedRead::compacted`]).
pub struct PinnedRead<'a> {
    store: &'a Store,
    snap: Box<dyn Snapshot + 'a>,
    /// The revision read.
    rev: i64,
    /// The store's current revision when pinned (what a response header reports).
    current: i64,
}

impl<'a> PinnedRead<'a> {
    /// Pins `requested` (0 or less: the current revision).
    ///
    /// Errors: `FutureRev` above the current revision, `Compacted` below the compacted one,
    /// exactly as [`Store::range`].
    pub(crate) fn new(store: &'a Store, requested: i64) -> Result<Self> {
        // As in `Store::range`: the revision before the snapshot, the compaction check after.
        let current = store.current_revision();
        let snap = store.engine().snapshot();
        let rev = store.check_rev(requested, current)?;
        Ok(Self {
            store,
            snap,
            rev,
            current,
        })
    }

    /// The revision read.
    pub fn rev(&self) -> i64 {
        self.rev
    }

    /// The store's current revision when the read was pinned.
    pub fn current(&self) -> i64 {
        self.current
    }

    /// Whether history at the pinned revision has been compacted since: a reader that must
    /// behave like a series of reads at that revision (etcd's `RangeStream`) then fails with
    /// `Compacted`, even though the snapshot could still serve it.
    pub fn compacted(&self) -> bool {
        self.rev < self.store.compact_revision()
    }

    /// Calls `visit` with the record of every key live at the pinned revision in `range`, in
    /// key order, until it returns `false`. A record is decoded only when the visitor asks
    /// ([`Record::decode`]), so counting copies nothing.
    pub fn for_each(
        &self,
        range: &KeyRange,
        mut visit: impl FnMut(Record<'_>) -> Result<bool>,
    ) -> Result<()> {
        scan(self.snap.as_ref(), range, self.rev, |record| {
            visit(Record(record))
        })
    }

    /// Reads `range` like [`Store::range`], every key-value in memory at once, from the
    /// snapshot: at the pinned revision when `opts.rev` is 0 or that revision, otherwise at
    /// `opts.rev`, with `Store::range`'s errors (`FutureRev` above the revision current when
    /// pinned, `Compacted` below the compacted one).
    pub fn range(&self, range: &KeyRange, opts: RangeOptions) -> Result<RangeResult> {
        let rev = if opts.rev <= 0 || opts.rev == self.rev {
            self.rev
        } else {
            self.store.check_rev(opts.rev, self.current)?
        };
        let mut r = range_snapshot(self.snap.as_ref(), range, rev, opts)?;
        r.rev = self.current;
        Ok(r)
    }
}

/// One stored version of a key, as [`PinnedRead::for_each`] visits it.
pub struct Record<'r>(&'r [u8]);

impl Record<'_> {
    /// The key-value, decoded from whichever storage format wrote it.
    pub fn decode(&self) -> Result<KeyValue> {
        Ok(codec::decode(self.0)?)
    }

    /// Calls `f` with the key-value borrowed from the record ([`codec::with_ref`]): no copy
    /// of key and value where the format allows.
    pub fn with_ref<T>(&self, f: impl FnOnce(codec::KvRef<'_>) -> T) -> Result<T> {
        Ok(codec::with_ref(self.0, f)?)
    }
}

impl Store {
    /// Pins the current engine snapshot at revision `requested` (0 or less: the current one);
    /// see [`PinnedRead`].
    pub fn pin(&self, requested: i64) -> Result<PinnedRead<'_>> {
        PinnedRead::new(self, requested)
    }
}
