//! [`WriteTxn`]: the changes of one command, all at one new revision.
//!
//! A transaction reads an apply *group*: one engine snapshot taken when the group began,
//! plus the newest version of every key the group's earlier commands changed (their writes
//! reach the engine together, in one batch, when the group is written). A read the group
//! cannot answer exactly (a range over keys the group changed, an older revision the group
//! wrote, the lease table after the group changed it) fails with [`Error::Regroup`]: the
//! applier then writes the group and runs the command again on a fresh one.

use bytes::Bytes;
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};

use super::key_codec::{kv_key, lease_key, rev_key};
use super::store::{
    lease_keys, range_snapshot, scan, scan_key, Overlay, RangeOptions, RangeResult, Store,
};
use super::{Error, KeyRange, Result};
use crate::storage::engine::KV_SUFFIX;
use crate::storage::{codec, Snapshot, Table, WriteBatch};

/// A write transaction: reads see the state before it plus its own changes; every change gets
/// the revision `begin + 1` with increasing sub-revisions (the order events are delivered in).
pub struct WriteTxn<'a> {
    store: &'a Store,
    group: Group<'a>,
    begin_rev: i64,
    sub: i64,
    batch: WriteBatch,
    changes: Overlay,
    /// Whether this transaction changed the lease table.
    leases_changed: bool,
    events: Vec<Event>,
}

/// What the commands of an apply group changed before the engine has it: see the module
/// documentation.
pub(crate) struct Group<'a> {
    snap: Box<dyn Snapshot + 'a>,
    /// The applied revision when `snap` was taken: the snapshot holds every revision up to it.
    base_rev: i64,
    /// The newest version of each key the group changed since (`None`: deleted).
    changes: Overlay,
    /// Whether the group changed the lease table since.
    leases_changed: bool,
}

impl<'a> Group<'a> {
    /// A group on top of everything the engine holds, which is revision `rev`.
    pub(crate) fn new(store: &'a Store, rev: i64) -> Self {
        Self {
            snap: store.engine().snapshot(),
            base_rev: rev,
            changes: Overlay::new(),
            leases_changed: false,
        }
    }
}

/// Whether `changes` holds a key in `range`.
fn touches(changes: &Overlay, range: &KeyRange) -> bool {
    use std::ops::Bound;
    match range {
        KeyRange::Single(k) => changes.contains_key(k),
        _ => changes
            .range::<[u8], _>((Bound::Included(range.start()), Bound::Unbounded))
            .next()
            .is_some_and(|(k, _)| range.contains(k)),
    }
}

/// What a committed write transaction did.
#[derive(Debug, Clone, Default)]
pub struct WriteOutcome {
    /// The store's revision after the transaction (unchanged if nothing was written).
    pub rev: i64,
    /// The change events, in order, each with its previous key-value when there was one.
    pub events: Vec<Event>,
}

impl<'a> WriteTxn<'a> {
    pub(crate) fn new(store: &'a Store, group: Group<'a>, begin_rev: i64) -> Self {
        Self {
            store,
            group,
            begin_rev,
            sub: 0,
            batch: WriteBatch::new(),
            changes: Overlay::new(),
            leases_changed: false,
            events: Vec::new(),
        }
    }

    fn write_rev(&self) -> i64 {
        self.begin_rev + 1
    }

    /// The revision reads in this transaction observe (etcd's `txn.Rev()` semantics: the new
    /// revision once something changed).
    pub fn rev(&self) -> i64 {
        if self.changes.is_empty() {
            self.begin_rev
        } else {
            self.write_rev()
        }
    }

    /// The revision the store was at when the transaction began.
    pub fn begin_rev(&self) -> i64 {
        self.begin_rev
    }

    /// The store's compacted revision.
    pub fn compact_revision(&self) -> i64 {
        self.store.compact_revision()
    }

    /// Whether anything was written so far.
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// The newest version of `key` as this transaction sees it.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        if let Some(c) = self
            .changes
            .get(key)
            .or_else(|| self.group.changes.get(key))
        {
            return Ok(c.clone());
        }
        if let Some(kv) = self.store.latest(key) {
            return Ok(Some(kv));
        }
        let mut out = None;
        scan_key(self.group.snap.as_ref(), key, self.begin_rev, |r| {
            out = Some(codec::decode(r)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Reads `range`, including this transaction's own changes when `opts.rev` asks for the
    /// current revision.
    pub fn range(&self, range: &KeyRange, opts: RangeOptions) -> Result<RangeResult> {
        let cur = self.rev();
        let rev = self.store.check_rev(opts.rev, cur)?;
        if rev > self.group.base_rev && touches(&self.group.changes, range) {
            // The group changed a key of the range after the snapshot. The newest version of
            // a single key is known; anything else needs the group written first.
            return match range {
                KeyRange::Single(key) if rev >= self.begin_rev => {
                    // At `begin_rev` (before this transaction's own changes) or after them.
                    let kv = match self.changes.get(key) {
                        Some(own) if rev == cur => own.clone(),
                        _ => self.group.changes.get(key).cloned().flatten(),
                    };
                    Ok(RangeResult {
                        count: usize::from(kv.is_some()),
                        kvs: kv.into_iter().filter(|_| !opts.count_only).collect(),
                        rev: cur,
                    })
                }
                _ => Err(Error::Regroup),
            };
        }
        // From here on the group changed no key of the range after the snapshot, or the read
        // is at or below the snapshot's revision: the snapshot at `rev.min(base_rev)` holds
        // the range as it was at `rev.min(begin_rev)`. Read at the snapshot's own revision
        // where it can, where a range of several keys reads the `kv_current` table rather
        // than the key history (`mvcc::current`).
        let snap_rev = rev.min(self.group.base_rev);
        let touched = touches(&self.changes, range);
        if rev <= self.begin_rev || !touched {
            let snap = self.group.snap.as_ref();
            let mut r = range_snapshot(snap, range, snap_rev, opts)?;
            r.rev = cur;
            return Ok(r);
        }
        // Merge the snapshot (the range at `begin_rev`) with this transaction's changes.
        let mut merged = std::collections::BTreeMap::new();
        scan(self.group.snap.as_ref(), range, snap_rev, |r| {
            let kv = codec::decode(r)?;
            merged.insert(kv.key.to_vec(), kv);
            Ok(true)
        })?;
        for (k, v) in self.changes.iter().filter(|(k, _)| range.contains(k)) {
            match v {
                Some(kv) => merged.insert(k.clone(), kv.clone()),
                None => merged.remove(k),
            };
        }
        let count = merged.len();
        let kvs = if opts.count_only {
            Vec::new()
        } else {
            let take = if opts.limit == 0 { count } else { opts.limit };
            merged.into_values().take(take).collect()
        };
        Ok(RangeResult {
            kvs,
            rev: cur,
            count,
        })
    }

    /// Puts `key`; returns the previous key-value, if any. Moves the key's lease attachment
    /// when its lease changes.
    pub fn put(&mut self, key: Bytes, value: Bytes, lease: i64) -> Result<Option<KeyValue>> {
        let prev = self.get(&key)?;
        let old_lease = prev.as_ref().map_or(0, |p| p.lease);
        if old_lease != lease {
            self.leases_changed = true;
            if old_lease != 0 {
                self.batch.delete(Table::Lease, lease_key(old_lease, &key));
            }
            if lease != 0 {
                self.batch
                    .put(Table::Lease, lease_key(lease, &key), Vec::new());
            }
        }
        let rev = self.write_rev();
        let kv = KeyValue {
            key: key.clone(),
            create_revision: prev.as_ref().map_or(rev, |p| p.create_revision),
            mod_revision: rev,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
            value,
            lease,
        };
        self.record(kv, prev.clone(), EventType::Put)?;
        Ok(prev)
    }

    /// Deletes every live key in `range`; returns their previous key-values in key order.
    pub fn delete_range(&mut self, range: &KeyRange) -> Result<Vec<KeyValue>> {
        let live = self.range(
            range,
            RangeOptions {
                rev: 0,
                ..Default::default()
            },
        )?;
        let rev = self.write_rev();
        for prev in &live.kvs {
            if prev.lease != 0 {
                self.leases_changed = true;
                self.batch
                    .delete(Table::Lease, lease_key(prev.lease, &prev.key));
            }
            let tombstone = KeyValue {
                key: prev.key.clone(),
                mod_revision: rev,
                ..Default::default()
            };
            self.record(tombstone, Some(prev.clone()), EventType::Delete)?;
        }
        Ok(live.kvs)
    }

    /// Records a granted lease.
    pub fn lease_grant(&mut self, id: i64, ttl: i64) {
        self.leases_changed = true;
        self.batch
            .put(Table::Lease, lease_key(id, &[]), ttl.to_le_bytes().to_vec());
    }

    /// Revokes a lease: deletes every key attached to it (all at this transaction's revision)
    /// and the lease itself. Returns the deleted keys' previous values.
    pub fn lease_revoke(&mut self, id: i64) -> Result<Vec<KeyValue>> {
        if self.group.leases_changed {
            return Err(Error::Regroup);
        }
        let keys = lease_keys(self.group.snap.as_ref(), id)?;
        let mut deleted = Vec::new();
        for k in keys {
            deleted.extend(self.delete_range(&KeyRange::Single(k))?);
        }
        self.leases_changed = true;
        self.batch.delete(Table::Lease, lease_key(id, &[]));
        Ok(deleted)
    }

    fn record(&mut self, kv: KeyValue, prev: Option<KeyValue>, ty: EventType) -> Result<()> {
        let rev = self.write_rev();
        let mut value = Vec::new();
        codec::encode(self.store.write_format(), &kv, &mut value)?;
        let key = kv_key(&kv.key, rev);
        if self.store.current_table() {
            // The key's newest version (`mvcc::current`), under the key without its revision.
            let prefix = key[..key.len() - KV_SUFFIX].to_vec();
            match ty {
                EventType::Put => self.batch.put(Table::Current, prefix, value.clone()),
                EventType::Delete => self.batch.delete(Table::Current, prefix),
            }
        }
        self.batch.put(Table::Kv, key, value);
        self.batch
            .put(Table::Rev, rev_key(rev, self.sub), kv.key.to_vec());
        self.sub += 1;
        let live = (ty == EventType::Put).then(|| kv.clone());
        self.changes.insert(kv.key.to_vec(), live);
        self.events.push(Event {
            r#type: ty as i32,
            kv: Some(kv),
            prev_kv: prev,
        });
        Ok(())
    }

    /// Ends the transaction: the batch to write, what it did, and the group with this
    /// transaction's changes added (as if the batch were written).
    pub(crate) fn finish(self) -> (WriteBatch, WriteOutcome, Group<'a>) {
        let rev = self.rev();
        self.store.remember_latest(&self.changes);
        let mut group = self.group;
        group.changes.extend(self.changes);
        group.leases_changed |= self.leases_changed;
        (
            self.batch,
            WriteOutcome {
                rev,
                events: self.events,
            },
            group,
        )
    }
}

#[cfg(test)]
mod tests;
