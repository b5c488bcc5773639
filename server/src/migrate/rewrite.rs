//! The engine-level half of a migration: counting records by format and re-encoding them in
//! bounded, resumable batches. Works on any [`Engine`]; the directory and stamp handling is in
//! the parent module.

use std::collections::BTreeMap;

use super::{MigrateError, Result};
use crate::mvcc::key_codec::{decode_key, split_kv_key};
use crate::mvcc::store::{META_STORAGE_FORMAT, META_WRITE_FORMAT};
use crate::storage::{codec, Engine, Table, WriteBatch};

/// Meta keys: the format an unfinished migration converts to (one byte), and the last `kv`
/// table key it has converted.
pub use crate::mvcc::store::{META_MIGRATE_CURSOR, META_MIGRATE_TO};

/// Batch bounds: a batch ends at whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Records visited per batch (converted or not).
    pub records: usize,
    /// Bytes of re-encoded keys and values per batch.
    pub bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            records: 10_000,
            bytes: 8 << 20,
        }
    }
}

/// Records of the `kv` table by the format that wrote them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FormatCounts {
    pub by_format: BTreeMap<u8, u64>,
}

impl FormatCounts {
    pub fn total(&self) -> u64 {
        self.by_format.values().sum()
    }

    /// Records not yet in format `to`.
    pub fn not_in(&self, to: u8) -> u64 {
        self.total() - self.by_format.get(&to).copied().unwrap_or(0)
    }
}

impl std::fmt::Display for FormatCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.by_format.is_empty() {
            return f.write_str("no records");
        }
        let parts: Vec<String> = self
            .by_format
            .iter()
            .map(|(format, n)| format!("{n} in format {format}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Where a migration to `to` resumes: after the cursor if the unfinished migration recorded
/// in meta has the same target, else from the start.
pub fn resume_point(engine: &dyn Engine, to: u8) -> Result<Option<Vec<u8>>> {
    if engine.get(Table::Meta, META_MIGRATE_TO)?.as_deref() != Some(&[to][..]) {
        return Ok(None);
    }
    Ok(engine.get(Table::Meta, META_MIGRATE_CURSOR)?)
}

/// Counts the records after `after` (all if `None`) by format. With `decode`, also decodes
/// each one, so that a corrupt record is found before anything is written.
pub fn count(engine: &dyn Engine, after: Option<&[u8]>, decode: bool) -> Result<FormatCounts> {
    let snap = engine.snapshot();
    let mut it = snap.iter(Table::Kv);
    seek_after(it.as_mut(), after);
    let mut counts = FormatCounts::default();
    while it.valid() {
        let record = it.value();
        let format = codec::format_of(record).map_err(|e| record_error(it.key(), e))?;
        if decode {
            codec::decode(record).map_err(|e| record_error(it.key(), e))?;
        }
        *counts.by_format.entry(format).or_default() += 1;
        it.next();
    }
    it.status()?;
    Ok(counts)
}

/// What [`rewrite`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewriteStats {
    /// Records visited (from the resume point on).
    pub visited: u64,
    /// Records re-encoded (the others were in the target format already).
    pub rewritten: u64,
    /// Batches written.
    pub batches: u64,
}

/// Re-encodes every `kv` record not in format `to`, from the resume point on, in batches
/// bounded by `limits`. Each batch carries the cursor (`migrate/to`, `migrate/cursor` in
/// meta) with the records it converts and is synced, so an interrupted run loses nothing and
/// the next one continues after the last batch written. The last batch also sets meta
/// `storage_format` to `to` and removes the cursor. `progress(visited, rewritten)` is called
/// after each batch.
///
/// Only the records change (a record's bytes, never its key), so readers of the table see the
/// same key-values throughout. The caller must hold the engine exclusively.
pub fn rewrite(
    engine: &dyn Engine,
    to: u8,
    limits: BatchLimits,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RewriteStats> {
    let mut stats = RewriteStats::default();
    loop {
        let done = rewrite_batch(engine, to, limits, true, &mut stats)?;
        progress(stats.visited, stats.rewritten);
        if done {
            return Ok(stats);
        }
    }
}

/// One batch of [`rewrite`]: re-encodes the records after the resume point (meta
/// `migrate/cursor` when meta `migrate/to` is `to`, else the first record) up to `limits`,
/// and writes them with the new cursor in one atomic batch (synced if `sync`). The batch
/// that reaches the end also sets meta `storage_format` and `write_format` to `to` and
/// removes the cursor. Adds to `stats`; returns whether every record is now in `to`.
///
/// A record's key never changes and records are keyed by revision, so re-encoding one is
/// idempotent and never hides a newer version. The caller must make sure nothing deletes
/// records between this batch's snapshot and its write (offline: it owns the engine; online:
/// it holds the store's background lock, which the compactor takes too).
pub fn rewrite_batch(
    engine: &dyn Engine,
    to: u8,
    limits: BatchLimits,
    sync: bool,
    stats: &mut RewriteStats,
) -> Result<bool> {
    if !codec::is_supported(to) {
        return Err(MigrateError::UnsupportedFormat {
            format: to,
            supported: codec::supported_formats(),
        });
    }
    let cursor = resume_point(engine, to)?;
    let mut buf = Vec::new();
    {
        // A snapshot per batch: a long-lived one would pin every replaced version on disk.
        let snap = engine.snapshot();
        let mut it = snap.iter(Table::Kv);
        seek_after(it.as_mut(), cursor.as_deref());
        let mut batch = WriteBatch::new();
        let mut visited = 0usize;
        let mut last = None;
        while it.valid() && visited < limits.records && batch.size_bytes() < limits.bytes {
            let record = it.value();
            if codec::format_of(record).map_err(|e| record_error(it.key(), e))? != to {
                let kv = codec::decode(record).map_err(|e| record_error(it.key(), e))?;
                buf.clear();
                codec::encode(to, &kv, &mut buf)?;
                batch.put(Table::Kv, it.key().to_vec(), buf.clone());
                stats.rewritten += 1;
            }
            visited += 1;
            last = Some(it.key().to_vec());
            it.next();
        }
        it.status()?;
        let done = !it.valid();
        drop(it);
        drop(snap);
        if let Some(last) = &last {
            batch.put(Table::Meta, META_MIGRATE_TO.to_vec(), vec![to]);
            batch.put(Table::Meta, META_MIGRATE_CURSOR.to_vec(), last.clone());
        }
        if done {
            batch.put(Table::Meta, META_STORAGE_FORMAT.to_vec(), vec![to]);
            batch.put(Table::Meta, META_WRITE_FORMAT.to_vec(), vec![to]);
            batch.delete(Table::Meta, META_MIGRATE_TO.to_vec());
            batch.delete(Table::Meta, META_MIGRATE_CURSOR.to_vec());
        }
        engine.write(batch, sync)?;
        stats.visited += visited as u64;
        stats.batches += 1;
        Ok(done)
    }
}

fn seek_after(it: &mut dyn crate::storage::EngineIter, after: Option<&[u8]>) {
    match after {
        None => it.seek(&[]),
        Some(key) => {
            it.seek(key);
            if it.valid() && it.key() == key {
                it.next();
            }
        }
    }
}

/// A record that cannot be read, named by its user key and revision.
fn record_error(raw_key: &[u8], source: codec::CodecError) -> MigrateError {
    let (key, rev) = match split_kv_key(raw_key) {
        Some((plen, rev)) => (
            decode_key(&raw_key[..plen])
                .map(|k| String::from_utf8_lossy(&k).into_owned())
                .unwrap_or_else(|| hex::encode(raw_key)),
            rev,
        ),
        None => (hex::encode(raw_key), 0),
    };
    MigrateError::Record { key, rev, source }
}
