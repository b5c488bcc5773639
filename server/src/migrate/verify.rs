//! `--verify`: a format-independent fingerprint of a store, taken before and after a migration.
//!
//! Two parts:
//! - a content digest (SHA-1) over *every* retained version, in table order: each `kv` table
//!   key with the protobuf encoding of its decoded record, then the raw `rev` and `lease`
//!   tables and the meta entries a migration does not own. Any read at any retained revision
//!   is a function of these, so equal digests mean every key at every revision, every lease
//!   and the current and compacted revisions are unchanged. One pass, O(versions).
//! - etcd's HashKV ([`Store::hash_kv`]) at [`HASH_REVISIONS`] revisions: the one after the
//!   compacted one (or 1), the current one, and evenly spaced ones between, as a cluster member would
//!   compare them. Each is a pass over the revision log, so this is the slower part.

use std::sync::Arc;

use sha1::{Digest, Sha1};

use super::rewrite::{META_MIGRATE_CURSOR, META_MIGRATE_TO};
use super::Result;
use crate::mvcc::store::{META_STORAGE_FORMAT, META_WRITE_FORMAT};
use crate::mvcc::{Store, StoreOptions};
use crate::storage::{codec, Engine, Table};

/// How many revisions HashKV is compared at (fewer if the store has fewer).
pub const HASH_REVISIONS: usize = 16;

/// What `--verify` compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub current_rev: i64,
    pub compact_rev: i64,
    /// Versions in the `kv` table (tombstones included).
    pub versions: u64,
    pub leases: usize,
    /// Hex SHA-1 over the content (module docs).
    pub content: String,
    /// `(revision, HashKV)`.
    pub hash_kv: Vec<(i64, u32)>,
}

/// The revisions HashKV is taken at: `first`, `last`, and evenly spaced ones between.
pub fn sample_revisions(first: i64, last: i64, n: usize) -> Vec<i64> {
    if last <= first || n < 2 {
        return vec![last];
    }
    let span = (last - first) as i128;
    let mut out: Vec<i64> = (0..n)
        .map(|i| first + (span * i as i128 / (n as i128 - 1)) as i64)
        .collect();
    out.dedup();
    out
}

/// Fingerprints the store on `engine`. Opens a [`Store`] on it (writing nothing but a rebuild
/// of the `kv_current` table if it is stale, which the digest leaves out: the store's
/// format mark exists in every directory the server has opened); physical compaction must not
/// be in progress (the caller finishes it first), or the content would move under the digest.
pub fn fingerprint(engine: Arc<dyn Engine>, format: u8) -> Result<Fingerprint> {
    let store = Store::open(
        engine.clone(),
        StoreOptions {
            write_format: format,
            fsync: true,
            ..Default::default()
        },
    )?;
    let current_rev = store.current_revision();
    let compact_rev = store.compact_revision();
    // HashKV refuses the compacted revision itself (as etcd's does): start one above it.
    let first = if compact_rev > 0 { compact_rev + 1 } else { 1 };
    let revs: Vec<i64> = sample_revisions(first.min(current_rev), current_rev, HASH_REVISIONS)
        .into_iter()
        .filter(|r| *r > 0)
        .collect();
    // All of them in one pass over the revision log.
    let hashes = store.hash_kv_many(&revs)?;
    let hash_kv: Vec<(i64, u32)> = revs.into_iter().zip(hashes).collect();
    let leases = store.leases()?.len();
    drop(store);

    let mut sha = Sha1::new();
    let snap = engine.snapshot();
    let mut versions = 0u64;
    let mut buf = Vec::new();
    for table in [Table::Kv, Table::Rev, Table::Lease, Table::Meta] {
        sha.update(table.name().as_bytes());
        let mut it = snap.iter(table);
        it.seek(&[]);
        while it.valid() {
            let (key, value) = (it.key(), it.value());
            let skip = table == Table::Meta
                && [
                    META_MIGRATE_TO,
                    META_MIGRATE_CURSOR,
                    META_STORAGE_FORMAT,
                    META_WRITE_FORMAT,
                ]
                .contains(&key);
            if !skip {
                sha.update((key.len() as u64).to_be_bytes());
                sha.update(key);
                if table == Table::Kv {
                    versions += 1;
                    let kv = codec::decode(value)?;
                    buf.clear();
                    prost::Message::encode(&kv, &mut buf).map_err(|e| {
                        crate::mvcc::Error::Corrupt(format!("protobuf encoding: {e}"))
                    })?;
                    sha.update((buf.len() as u64).to_be_bytes());
                    sha.update(&buf);
                } else {
                    sha.update((value.len() as u64).to_be_bytes());
                    sha.update(value);
                }
            }
            it.next();
        }
        it.status()?;
    }
    Ok(Fingerprint {
        current_rev,
        compact_rev,
        versions,
        leases,
        content: hex::encode(sha.finalize()),
        hash_kv,
    })
}

/// The differences between two fingerprints, one line each (empty: identical).
pub fn differences(before: &Fingerprint, after: &Fingerprint) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, a: String, b: String| {
        if a != b {
            out.push(format!("{name}: {a} before, {b} after"));
        }
    };
    field(
        "current revision",
        before.current_rev.to_string(),
        after.current_rev.to_string(),
    );
    field(
        "compacted revision",
        before.compact_rev.to_string(),
        after.compact_rev.to_string(),
    );
    field(
        "versions",
        before.versions.to_string(),
        after.versions.to_string(),
    );
    field(
        "leases",
        before.leases.to_string(),
        after.leases.to_string(),
    );
    field(
        "content digest",
        before.content.clone(),
        after.content.clone(),
    );
    for (a, b) in before.hash_kv.iter().zip(&after.hash_kv) {
        field(
            &format!("HashKV at revision {}", a.0),
            format!("{:08x}", a.1),
            format!("{:08x}", b.1),
        );
    }
    if before.hash_kv.len() != after.hash_kv.len() {
        out.push("HashKV sampled at different revisions".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_span_first_to_last() {
        assert_eq!(sample_revisions(1, 1, 16), vec![1]);
        assert_eq!(sample_revisions(1, 3, 16), vec![1, 2, 3]);
        let s = sample_revisions(10, 1000, 16);
        assert_eq!(s.len(), 16);
        assert_eq!((s[0], s[15]), (10, 1000));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }
}
