//! The data directory's stamp: which layout and storage format it holds, and the ids it was
//! created with. Checked before the engine is opened, so that a directory written by another
//! format or a newer binary is refused with a clear error and never misread.
//!
//! ```text
//! <data-dir>/metastore.json   the stamp (this module)
//! <data-dir>/db/              the RocksDB database
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec::READABLE_FORMATS;
use super::{Error, Result};

/// The directory layout this binary writes and understands.
pub const LAYOUT_VERSION: u32 = 1;
const STAMP_FILE: &str = "metastore.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// Directory layout version (bumped when files move or change meaning).
    pub layout_version: u32,
    /// The storage format records are written in.
    pub storage_format: u8,
    /// The engine that owns `db/`.
    pub engine: String,
    pub member_name: String,
    /// Hex member and cluster ids, stable across restarts.
    pub member_id: String,
    pub cluster_id: String,
    /// The binary that created the directory, for humans.
    pub created_by: String,
}

/// A data directory, checked and stamped.
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
    stamp: Stamp,
}

impl DataDir {
    /// Opens `path`, stamping it with `fresh` if it holds nothing yet. An existing stamp wins
    /// over `fresh` (ids are kept), but it must be readable by this binary.
    pub fn open_or_create(path: &Path, fresh: Stamp) -> Result<Self> {
        let err = |reason: String| Error::DataDir {
            path: path.to_path_buf(),
            reason,
        };
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(path).map_err(io)?;
        let stamp_path = path.join(STAMP_FILE);
        let stamp = if stamp_path.exists() {
            let text = fs::read_to_string(&stamp_path).map_err(io)?;
            let stamp: Stamp = serde_json::from_str(&text)
                .map_err(|e| err(format!("unreadable {STAMP_FILE}: {e}")))?;
            check(&stamp).map_err(err)?;
            stamp
        } else {
            if path.join("db").exists() || path.join("member").exists() {
                return Err(err(format!(
                    "holds data but no {STAMP_FILE}: not a MetaStore data directory \
                     (an etcd data directory must be converted with `metastore snapshot restore`)"
                )));
            }
            check(&fresh).map_err(err)?;
            write_atomically(&stamp_path, &fresh).map_err(io)?;
            fresh
        };
        Ok(Self {
            path: path.to_path_buf(),
            stamp,
        })
    }

    pub fn stamp(&self) -> &Stamp {
        &self.stamp
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn db_path(&self) -> PathBuf {
        self.path.join("db")
    }
}

fn check(stamp: &Stamp) -> std::result::Result<(), String> {
    if stamp.layout_version > LAYOUT_VERSION {
        return Err(format!(
            "written by a newer MetaStore ({}, layout {}); this binary understands layout {} only",
            stamp.created_by, stamp.layout_version, LAYOUT_VERSION
        ));
    }
    if !READABLE_FORMATS.contains(&stamp.storage_format) {
        return Err(format!(
            "holds storage format {}, which this binary cannot read (it reads formats {:?})",
            stamp.storage_format, READABLE_FORMATS
        ));
    }
    Ok(())
}

fn write_atomically(path: &Path, stamp: &Stamp) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    let text = serde_json::to_string_pretty(stamp).map_err(std::io::Error::other)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(format: u8) -> Stamp {
        Stamp {
            layout_version: LAYOUT_VERSION,
            storage_format: format,
            engine: "rocksdb".into(),
            member_name: "n1".into(),
            member_id: "1".into(),
            cluster_id: "2".into(),
            created_by: "test".into(),
        }
    }

    #[test]
    fn stamps_once_and_keeps_ids() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let a = DataDir::open_or_create(dir.path(), stamp(2))?;
        let mut other = stamp(2);
        other.member_id = "99".into();
        let b = DataDir::open_or_create(dir.path(), other)?;
        assert_eq!(a.stamp(), b.stamp());
        Ok(())
    }

    #[test]
    fn refuses_unknown_format_and_newer_layout() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut s = stamp(2);
        s.storage_format = 9;
        write_atomically(&dir.path().join(STAMP_FILE), &s)?;
        let e = DataDir::open_or_create(dir.path(), stamp(2))
            .map(|_| ())
            .expect_err("must fail");
        assert!(e.to_string().contains("storage format 9"), "{e}");

        let mut s = stamp(2);
        s.layout_version = LAYOUT_VERSION + 1;
        write_atomically(&dir.path().join(STAMP_FILE), &s)?;
        let e = DataDir::open_or_create(dir.path(), stamp(2))
            .map(|_| ())
            .expect_err("must fail");
        assert!(e.to_string().contains("newer MetaStore"), "{e}");
        Ok(())
    }

    #[test]
    fn refuses_foreign_data() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        fs::create_dir_all(dir.path().join("member/snap"))?;
        let e = DataDir::open_or_create(dir.path(), stamp(2))
            .map(|_| ())
            .expect_err("must fail");
        assert!(
            e.to_string().contains("not a MetaStore data directory"),
            "{e}"
        );
        Ok(())
    }
}
