//! [`WriteTxn`]: the changes of one command, all at one new revision.

use bytes::Bytes;
use metastore_proto::mvccpb::{event::EventType, Event, KeyValue};

use super::key_codec::{kv_key, lease_key, rev_key};
use super::store::{
    lease_keys, put_meta_i64, range_snapshot, scan, Overlay, RangeOptions, RangeResult, Store,
    META_CURRENT_REV,
};
use super::{KeyRange, Result};
use crate::storage::{codec, Snapshot, Table, WriteBatch};

/// A write transaction: reads see the state before it plus its own changes; every change gets
/// the revision `begin + 1` with increasing sub-revisions (the order events are delivered in).
pub struct WriteTxn<'a> {
    store: &'a Store,
    snap: Box<dyn Snapshot + 'a>,
    begin_rev: i64,
    sub: i64,
    batch: WriteBatch,
    changes: Overlay,
    events: Vec<Event>,
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
    pub(crate) fn new(store: &'a Store, begin_rev: i64) -> Self {
        Self {
            store,
            snap: store.engine().snapshot(),
            begin_rev,
            sub: 0,
            batch: WriteBatch::new(),
            changes: Overlay::new(),
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
        if let Some(c) = self.changes.get(key) {
            return Ok(c.clone());
        }
        let mut out = None;
        scan(
            self.snap.as_ref(),
            &KeyRange::Single(key.to_vec()),
            self.begin_rev,
            |r| {
                out = Some(codec::decode(r)?);
                Ok(false)
            },
        )?;
        Ok(out)
    }

    /// Reads `range`, including this transaction's own changes when `opts.rev` asks for the
    /// current revision.
    pub fn range(&self, range: &KeyRange, opts: RangeOptions) -> Result<RangeResult> {
        let cur = self.rev();
        let rev = self.store.check_rev(opts.rev, cur)?;
        let touched = self.changes.keys().any(|k| range.contains(k));
        if rev <= self.begin_rev || !touched {
            let mut r = range_snapshot(self.snap.as_ref(), range, rev.min(self.begin_rev), opts)?;
            r.rev = cur;
            return Ok(r);
        }
        // Merge the snapshot at `begin_rev` with this transaction's changes.
        let mut merged = std::collections::BTreeMap::new();
        scan(self.snap.as_ref(), range, self.begin_rev, |r| {
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
        self.batch
            .put(Table::Lease, lease_key(id, &[]), ttl.to_le_bytes().to_vec());
    }

    /// Revokes a lease: deletes every key attached to it (all at this transaction's revision)
    /// and the lease itself. Returns the deleted keys' previous values.
    pub fn lease_revoke(&mut self, id: i64) -> Result<Vec<KeyValue>> {
        let keys = lease_keys(self.snap.as_ref(), id)?;
        let mut deleted = Vec::new();
        for k in keys {
            deleted.extend(self.delete_range(&KeyRange::Single(k))?);
        }
        self.batch.delete(Table::Lease, lease_key(id, &[]));
        Ok(deleted)
    }

    fn record(&mut self, kv: KeyValue, prev: Option<KeyValue>, ty: EventType) -> Result<()> {
        let rev = self.write_rev();
        let mut value = Vec::new();
        codec::encode(self.store.write_format(), &kv, &mut value)?;
        self.batch.put(Table::Kv, kv_key(&kv.key, rev), value);
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

    /// Ends the transaction: the batch to write and what it did.
    pub(crate) fn finish(mut self) -> Result<(WriteBatch, WriteOutcome)> {
        let rev = self.rev();
        if self.has_changes() {
            put_meta_i64(&mut self.batch, META_CURRENT_REV, rev);
        }
        Ok((
            self.batch,
            WriteOutcome {
                rev,
                events: self.events,
            },
        ))
    }
}

#[cfg(test)]
mod tests;
