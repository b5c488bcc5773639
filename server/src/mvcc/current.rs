//! The `kv_current` table ([`Table::Current`]): each live key's newest version, beside the
//! history in [`Table::Kv`].
//!
//! The `Kv` table keeps every version of a key under `enc(key) ++ !rev`, newest first, so a
//! range at the current revision steps over every older version of each key it returns
//! (~85–120 ns each on RocksDB; docs/PERFORMANCE.md, sessions 45 and 46). etcd answers the
//! same read from its in-memory key index. This table holds, under `enc(key)` (the `Kv` key
//! without its revision), the record of each live key's newest version, so that such a range
//! reads one entry per key.
//!
//! # Always exact or not used
//! - The apply step writes it in the same engine batch as the history: a put puts the key's
//!   record, a delete removes it ([`WriteTxn`](super::WriteTxn)). Every batch that carries
//!   new revisions also sets the *marker*, the entry under the empty key (no encoded key is
//!   empty), to the revision the batch brings the store to.
//! - A read uses the table only when the marker in its engine snapshot is exactly the revision
//!   it reads at ([`serves`]); otherwise it reads the history as before. So a snapshot that
//!   holds a revision not yet published, a table left behind by something that rewrote the
//!   history without it (a Raft snapshot installed, a directory restored, a binary that does
//!   not know the table), or a table being rebuilt is never read.
//! - The store rebuilds it from the history ([`rebuild`]) when it opens or reloads and the
//!   marker is not its revision.
//!
//! Nothing else changes a key's newest version: compaction keeps a live newest version and
//! removes tombstones (which this table never holds). A storage-format migration re-encodes
//! the history's records and leaves this table's as they are (every binary reads both
//! formats); an offline migration removes the marker, so the next start rebuilds the table
//! in the new format.

use std::time::{Duration, Instant};

use super::key_codec::{kv_prefix, split_kv_key};
use super::store::{be_i64, is_tombstone};
use super::{Error, KeyRange, Result};
use crate::storage::{Engine, Snapshot, Table, WriteBatch};

/// The marker's key: no `enc(key)` is empty.
pub(crate) const MARKER: &[u8] = b"";

/// A rebuild writes in batches of about this many bytes.
const REBUILD_BATCH_BYTES: usize = 4 << 20;

/// Sets the marker to `rev` in `batch`: the table is current at `rev` once the batch is
/// written.
pub(crate) fn set_marker(batch: &mut WriteBatch, rev: i64) {
    batch.put(Table::Current, MARKER.to_vec(), rev.to_be_bytes().to_vec());
}

/// The revision the table in `snap` is current at; `None` without a table or a marker.
pub(crate) fn marked_rev(snap: &dyn Snapshot) -> Result<Option<i64>> {
    if !snap.has_table(Table::Current) {
        return Ok(None);
    }
    snap.get(Table::Current, MARKER)?
        .map(|v| be_i64(&v, || "kv_current marker".into()))
        .transpose()
}

/// Whether the table in `snap` holds exactly the live keys at `rev`.
pub(crate) fn serves(snap: &dyn Snapshot, rev: i64) -> Result<bool> {
    Ok(marked_rev(snap)? == Some(rev))
}

/// Removes the marker, so that the next open rebuilds the table from the history (after an
/// offline migration has re-encoded the history's records). Synced.
pub(crate) fn invalidate(engine: &dyn Engine) -> Result<()> {
    if engine.has_table(Table::Current) {
        let mut b = WriteBatch::new();
        b.delete(Table::Current, MARKER.to_vec());
        engine.write(b, true)?;
    }
    Ok(())
}

/// Calls `visit` with the record of every live key in `range` (not a single key), in key
/// order, until it returns `false`. Only when [`serves`] says the table is current.
pub(crate) fn scan(
    snap: &dyn Snapshot,
    range: &KeyRange,
    mut visit: impl FnMut(&[u8]) -> Result<bool>,
) -> Result<()> {
    let end = range.end().map(kv_prefix);
    let mut it = snap.iter(Table::Current);
    // Every encoded key is at least two bytes: the seek never lands on the marker.
    it.seek(&kv_prefix(range.start()));
    while it.valid() {
        if end.as_ref().is_some_and(|end| it.key() >= end.as_slice()) {
            break;
        }
        if !visit(it.value())? {
            return Ok(());
        }
        it.next();
    }
    it.status().map_err(Error::from)
}

/// Rebuilds the table from the history at `rev` (the store's revision; nothing may write
/// the engine meanwhile) unless its marker already says `rev`. Returns whether the engine
/// holds the table (it is then current at `rev`).
pub(crate) fn rebuild(engine: &dyn Engine, rev: i64) -> Result<bool> {
    if !engine.has_table(Table::Current) {
        return Ok(false);
    }
    let snap = engine.snapshot();
    let marked = marked_rev(snap.as_ref())?;
    if marked == Some(rev) {
        return Ok(true);
    }
    let started = Instant::now();
    let mut reported = started;
    let mut batch = WriteBatch::new();
    // The first batch empties the table, marker included, and the last one sets the marker:
    // a crash in between leaves a table without one, rebuilt at the next open.
    batch.clear_table(Table::Current);
    let mut it = snap.iter(Table::Kv);
    it.seek(&[]);
    let (mut versions, mut keys) = (0u64, 0u64);
    // The key (without revision) whose newest version at `rev` was taken.
    let mut taken: Vec<u8> = Vec::new();
    let mut have_taken = false;
    while it.valid() {
        let key = it.key();
        let (plen, r) = split_kv_key(key).ok_or_else(|| Error::Corrupt("kv key".into()))?;
        versions += 1;
        let prefix = &key[..plen];
        if r <= rev && !(have_taken && prefix == taken.as_slice()) {
            taken.clear();
            taken.extend_from_slice(prefix);
            have_taken = true;
            let record = it.value();
            if !is_tombstone(record)? {
                batch.put(Table::Current, prefix.to_vec(), record.to_vec());
                keys += 1;
            }
            if batch.size_bytes() >= REBUILD_BATCH_BYTES {
                engine.write(std::mem::take(&mut batch), false)?;
                if reported.elapsed() >= Duration::from_secs(5) {
                    reported = Instant::now();
                    tracing::info!(keys, versions, "rebuilding the kv_current table");
                }
            }
        }
        it.next();
    }
    it.status()?;
    drop(it);
    drop(snap);
    set_marker(&mut batch, rev);
    engine.write(batch, false)?;
    if versions > 0 {
        tracing::info!(
            keys,
            versions,
            rev,
            previous = marked,
            took_ms = started.elapsed().as_millis() as u64,
            "rebuilt the kv_current table from the key history"
        );
    }
    Ok(true)
}

#[cfg(test)]
mod tests;
