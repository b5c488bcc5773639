//! [`Versions`]: one key's versions in the `Kv` table, newest first, from a revision down.
//!
//! The one reader of a single key's history: a put's lookup of its key (through a single-key
//! [`scan`](super::store::scan)), HashKV's check of what a compaction keeps, and the
//! compactor's walk of a key's old versions. It reads with
//! [`Snapshot::versions_iter`], so that on RocksDB a key with no version is answered by the
//! prefix filters; such a cursor is only correct while it stays on the key's own prefix,
//! which is the one thing this type checks for its callers.

use super::key_codec::{kv_key, split_kv_key};
use super::{Error, Result};
use crate::storage::engine::KV_SUFFIX;
use crate::storage::{EngineIter, Snapshot};

/// One version the cursor is on.
pub struct Version<'a> {
    /// Its main revision.
    pub rev: i64,
    /// Its `Kv` table key.
    pub raw_key: &'a [u8],
    /// Its record.
    pub record: &'a [u8],
}

/// A cursor over `key`'s versions at or below a revision, newest first.
pub struct Versions<'s> {
    it: Box<dyn EngineIter + 's>,
    prefix: Vec<u8>,
}

impl<'s> Versions<'s> {
    /// Positions at `key`'s newest version at or below `rev`.
    pub fn at(snap: &'s dyn Snapshot, key: &[u8], rev: i64) -> Self {
        let mut it = snap.versions_iter();
        let mut prefix = kv_key(key, rev);
        it.seek(&prefix);
        // The seek target without its revision: the prefix every version of `key` shares
        // (`kv_prefix(key)`, without encoding the key a second time).
        prefix.truncate(prefix.len() - KV_SUFFIX);
        Self { it, prefix }
    }

    /// The version the cursor is on; `None` once past the oldest one (or when the key has
    /// none at or below the revision).
    pub fn current(&self) -> Result<Option<Version<'_>>> {
        let on_key = self.it.valid()
            && self.it.key().len() == self.prefix.len() + KV_SUFFIX
            && self.it.key().starts_with(&self.prefix);
        if !on_key {
            self.it.status()?;
            return Ok(None);
        }
        let (_, rev) =
            split_kv_key(self.it.key()).ok_or_else(|| Error::Corrupt("kv key".into()))?;
        Ok(Some(Version {
            rev,
            raw_key: self.it.key(),
            record: self.it.value(),
        }))
    }

    /// Moves to the next older version.
    pub fn next(&mut self) {
        self.it.next();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Engine, MemoryEngine, RocksEngine, Table, WriteBatch};

    fn put(engine: &dyn Engine, versions: &[(&[u8], i64, &[u8])]) -> anyhow::Result<()> {
        let mut b = WriteBatch::new();
        for (key, rev, record) in versions {
            b.put(Table::Kv, kv_key(key, *rev), record.to_vec());
        }
        Ok(engine.write(b, false)?)
    }

    /// A memory engine and a RocksDB engine in `dir`.
    fn both_engines(dir: &std::path::Path) -> anyhow::Result<Vec<Box<dyn Engine>>> {
        Ok(vec![
            Box::new(MemoryEngine::new()),
            Box::new(RocksEngine::open(dir, &Default::default())?),
        ])
    }

    fn walk(snap: &dyn Snapshot, key: &[u8], rev: i64) -> anyhow::Result<Vec<(i64, Vec<u8>)>> {
        let mut v = Versions::at(snap, key, rev);
        assert_eq!(v.prefix, crate::mvcc::key_codec::kv_prefix(key));
        let mut out = Vec::new();
        while let Some(version) = v.current()? {
            assert_eq!(version.raw_key, kv_key(key, version.rev).as_slice());
            out.push((version.rev, version.record.to_vec()));
            v.next();
        }
        Ok(out)
    }

    #[test]
    fn walks_one_keys_versions_newest_first_from_the_revision_down() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        for engine in both_engines(dir.path())? {
            // `a` and `ab` share a byte prefix: neither may show the other's versions. On
            // RocksDB the older half is in table files (with prefix filters), the newer half
            // in the memtable.
            put(
                engine.as_ref(),
                &[(b"a", 2, b"a2"), (b"ab", 3, b"ab3"), (b"", 4, b"empty4")],
            )?;
            engine.defragment()?;
            put(
                engine.as_ref(),
                &[(b"a", 5, b"a5"), (b"a", 9, b"a9"), (b"ab", 7, b"ab7")],
            )?;
            let snap = engine.snapshot();
            let s = snap.as_ref();
            let a = |revs: &[i64]| -> Vec<(i64, Vec<u8>)> {
                revs.iter()
                    .map(|r| (*r, format!("a{r}").into_bytes()))
                    .collect()
            };
            let name = engine.name();
            assert_eq!(walk(s, b"a", 100)?, a(&[9, 5, 2]), "{name}");
            assert_eq!(walk(s, b"a", 9)?, a(&[9, 5, 2]), "{name}");
            assert_eq!(walk(s, b"a", 8)?, a(&[5, 2]), "{name}");
            assert_eq!(walk(s, b"a", 2)?, a(&[2]), "{name}");
            assert_eq!(walk(s, b"a", 1)?, vec![], "{name}");
            assert_eq!(
                walk(s, b"ab", 100)?,
                vec![(7, b"ab7".to_vec()), (3, b"ab3".to_vec())],
                "{name}"
            );
            assert_eq!(walk(s, b"", 100)?, vec![(4, b"empty4".to_vec())], "{name}");
            assert_eq!(walk(s, b"b", 100)?, vec![], "{name}");
            assert_eq!(walk(s, b"aa", 100)?, vec![], "{name}");
        }
        Ok(())
    }

    #[test]
    fn lookups_in_one_snapshot_read_the_snapshot_alone_or_together() -> anyhow::Result<()> {
        // On RocksDB the snapshot lends one cursor to each lookup in turn (a second lookup
        // while the first is held gets its own): every lookup must still see the snapshot
        // and only its own key.
        let dir = tempfile::tempdir()?;
        for engine in both_engines(dir.path())? {
            put(engine.as_ref(), &[(b"a", 2, b"a2"), (b"b", 3, b"b3")])?;
            let snap = engine.snapshot();
            let s = snap.as_ref();
            // After the snapshot: invisible to it, through a new cursor or a kept one.
            put(engine.as_ref(), &[(b"a", 5, b"a5"), (b"c", 6, b"c6")])?;
            let name = engine.name();
            assert_eq!(walk(s, b"c", 100)?, vec![], "{name}");
            {
                let a = Versions::at(s, b"a", 100);
                let b = Versions::at(s, b"b", 100);
                let rev = |v: &Versions| v.current().map(|c| c.map(|c| c.rev));
                assert_eq!(rev(&a)?, Some(2), "{name}");
                assert_eq!(rev(&b)?, Some(3), "{name}");
            }
            for _ in 0..3 {
                assert_eq!(walk(s, b"a", 100)?, vec![(2, b"a2".to_vec())], "{name}");
                assert_eq!(walk(s, b"zz", 100)?, vec![], "{name}");
                assert_eq!(walk(s, b"b", 100)?, vec![(3, b"b3".to_vec())], "{name}");
                assert_eq!(walk(s, b"c", 100)?, vec![], "{name}");
            }
            drop(snap);
            let now = engine.snapshot();
            assert_eq!(
                walk(now.as_ref(), b"c", 100)?,
                vec![(6, b"c6".to_vec())],
                "{name}"
            );
        }
        Ok(())
    }
}
