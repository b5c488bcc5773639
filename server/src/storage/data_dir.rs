//! The data directory's stamp: which layout and storage format it holds, and the ids it was
//! created with. Checked before the engine is opened, so that a directory written by another
//! format or a newer binary is refused with a clear error and never misread.
//!
//! ```text
//! <data-dir>/metastore.json   the stamp (this module)
//! <data-dir>/migration.json   present only while an offline migration is unfinished
//! <data-dir>/db/              the RocksDB database
//! ```
//!
//! # Storage format and migrations
//!
//! The stamp's `storage_format` is the format the directory's records are written in, and the
//! format the server keeps writing: [`DataDir::open_or_create`] refuses to open a directory
//! for a different format (`metastore migrate` converts it offline).
//!
//! While an offline migration (`crate::migrate`) is unfinished, `migration.json` names its
//! target format and the stamp's `storage_format` is the *highest* format the directory may
//! then hold (the records are a mix of the old and the new format), so that a binary that
//! cannot read one of them refuses the directory by the ordinary format check. The server
//! refuses such a directory too, pointing to `metastore migrate`, which resumes it; finishing
//! sets the stamp to the target and removes `migration.json`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::codec;
use super::{Error, Result};

/// The directory layout this binary writes and understands: 3, RocksDB's `kv_current`
/// column family beside the key history (`mvcc::current`, since session 50), which binaries
/// from before cannot open. A directory without it is stamped [`LAYOUT_SEGMENT_LOG`] when
/// the Raft log's entries are in segment files of their own under [`WAL_DIR`], and
/// [`LAYOUT_LOG_IN_ENGINE`] when they are in RocksDB: binaries from before can open those.
/// The server stamps the layout it leaves the directory in ([`layout_for`]).
pub const LAYOUT_VERSION: u32 = 3;
/// The layout with the Raft log in segment files of their own and no `kv_current` table.
pub const LAYOUT_SEGMENT_LOG: u32 = 2;
/// The layout with the Raft log in RocksDB's `raft_log` column family and no `kv_current`
/// table.
pub const LAYOUT_LOG_IN_ENGINE: u32 = 1;

/// The layout a directory is in with (or without) the `kv_current` table and the Raft log in
/// segment files (or in RocksDB).
pub fn layout_for(current_table: bool, segment_log: bool) -> u32 {
    match (current_table, segment_log) {
        (true, _) => LAYOUT_VERSION,
        (false, true) => LAYOUT_SEGMENT_LOG,
        (false, false) => LAYOUT_LOG_IN_ENGINE,
    }
}
/// The Raft log's own segments, under the data directory.
pub const WAL_DIR: &str = "wal";
/// The stamp's file name: a directory holding it is initialized.
pub const STAMP_FILE: &str = "metastore.json";
const MIGRATION_FILE: &str = "migration.json";

/// The marker of an unfinished offline migration (`migration.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationMarker {
    /// The format the migration converts every record to.
    pub to: u8,
    /// The binary that started it, for humans.
    pub started_by: String,
}

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
    migration: Option<MigrationMarker>,
}

/// Reads the stamp of `path` without checking it: `None` if the directory has none (yet).
/// For choosing defaults (the server's `--storage-format`); opening goes through
/// [`DataDir::open_or_create`] or [`DataDir::open_existing`], which check.
pub fn read_stamp(path: &Path) -> Result<Option<Stamp>> {
    let stamp_path = path.join(STAMP_FILE);
    if !stamp_path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&stamp_path).map_err(|source| Error::Io {
        path: stamp_path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::DataDir {
            path: path.to_path_buf(),
            reason: format!("unreadable {STAMP_FILE}: {e}"),
        })
}

impl DataDir {
    /// Opens `path` for the server, stamping it with `fresh` if it holds nothing yet. An
    /// existing stamp wins over `fresh` (ids are kept), but it must be readable by this
    /// binary, be at `fresh.storage_format` (the format the server will write), and have no
    /// unfinished offline migration.
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
        let stamp = if let Some(stamp) = read_stamp(path)? {
            check(&stamp).map_err(err)?;
            if let Some(m) = read_marker(path)? {
                return Err(err(format!(
                    "an offline storage-format migration to format {} is unfinished; finish it \
                     with `metastore migrate --data-dir {} --to {}` (or go back with `--to` the \
                     previous format) before starting the server",
                    m.to,
                    path.display(),
                    m.to
                )));
            }
            if stamp.storage_format != fresh.storage_format {
                return Err(err(format!(
                    "holds storage format {} but format {} was asked for (--storage-format); \
                     convert the directory with `metastore migrate --data-dir {} --to {}` while \
                     the server is stopped, or start without --storage-format to keep format {}",
                    stamp.storage_format,
                    fresh.storage_format,
                    path.display(),
                    fresh.storage_format,
                    stamp.storage_format
                )));
            }
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
            migration: None,
        })
    }

    /// Opens an existing, stamped directory for an offline tool (`metastore migrate`): the
    /// stamp must be readable by this binary; an unfinished migration is reported by
    /// [`migration`](Self::migration), not refused.
    pub fn open_existing(path: &Path) -> Result<Self> {
        let err = |reason: String| Error::DataDir {
            path: path.to_path_buf(),
            reason,
        };
        let stamp = read_stamp(path)?
            .ok_or_else(|| err(format!("no {STAMP_FILE}: not a MetaStore data directory")))?;
        check(&stamp).map_err(err)?;
        let migration = read_marker(path)?;
        if let Some(m) = &migration {
            if !codec::is_supported(m.to) {
                return Err(err(format!(
                    "an unfinished migration to storage format {} that this binary cannot \
                     write (it supports formats {:?})",
                    m.to,
                    codec::supported_formats()
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            stamp,
            migration,
        })
    }

    /// The unfinished offline migration, if any (only [`open_existing`](Self::open_existing)
    /// opens such a directory).
    pub fn migration(&self) -> Option<&MigrationMarker> {
        self.migration.as_ref()
    }

    /// Records that a migration to `to` has begun: writes the marker, then raises the stamp's
    /// format to the highest format the directory may hold from now on (module docs). Both
    /// are durable when this returns.
    pub fn begin_migration(&mut self, to: u8) -> Result<()> {
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let marker = MigrationMarker {
            to,
            started_by: format!("metastore {}", env!("CARGO_PKG_VERSION")),
        };
        write_atomically(&self.path.join(MIGRATION_FILE), &marker).map_err(io)?;
        self.restamp(|s| s.storage_format = s.storage_format.max(to))?;
        self.migration = Some(marker);
        Ok(())
    }

    /// Records that every record is in format `to`: stamps it, then removes the marker.
    pub fn finish_migration(&mut self, to: u8) -> Result<()> {
        self.restamp(|s| s.storage_format = to)?;
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let marker = self.path.join(MIGRATION_FILE);
        if marker.exists() {
            fs::remove_file(&marker).map_err(io)?;
            sync_dir(&self.path).map_err(io)?;
        }
        self.migration = None;
        Ok(())
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

    /// Where the Raft log's own segments are.
    pub fn wal_path(&self) -> PathBuf {
        self.path.join(WAL_DIR)
    }

    /// Stamps the directory with layout `version` (if it has another).
    pub fn set_layout_version(&mut self, version: u32) -> Result<()> {
        if self.stamp.layout_version == version {
            return Ok(());
        }
        self.restamp(|s| s.layout_version = version)
    }

    /// Writes the stamp changed by `change` (durably, replacing the file whole), then keeps it.
    fn restamp(&mut self, change: impl FnOnce(&mut Stamp)) -> Result<()> {
        let mut stamp = self.stamp.clone();
        change(&mut stamp);
        write_atomically(&self.path.join(STAMP_FILE), &stamp).map_err(|source| Error::Io {
            path: self.path.clone(),
            source,
        })?;
        self.stamp = stamp;
        Ok(())
    }
}

/// Sets the stamp's storage format of the directory at `path` (which must have a stamp) to
/// `format`, durably. For the online migration, which raises it when the cluster switches
/// (before any record in the new format is written) and sets it to the target once every
/// record is converted (module docs: the stamp holds the highest format records may be in).
pub fn set_stamp_format(path: &Path, format: u8) -> Result<()> {
    let mut stamp = read_stamp(path)?.ok_or_else(|| Error::DataDir {
        path: path.to_path_buf(),
        reason: format!("no {STAMP_FILE}"),
    })?;
    if stamp.storage_format == format {
        return Ok(());
    }
    stamp.storage_format = format;
    write_atomically(&path.join(STAMP_FILE), &stamp).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn read_marker(path: &Path) -> Result<Option<MigrationMarker>> {
    let marker_path = path.join(MIGRATION_FILE);
    if !marker_path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&marker_path).map_err(|source| Error::Io {
        path: marker_path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::DataDir {
            path: path.to_path_buf(),
            reason: format!("unreadable {MIGRATION_FILE}: {e}"),
        })
}

fn check(stamp: &Stamp) -> std::result::Result<(), String> {
    if stamp.layout_version > LAYOUT_VERSION {
        return Err(format!(
            "written by a newer MetaStore ({}, layout {}); this binary understands layout {} only",
            stamp.created_by, stamp.layout_version, LAYOUT_VERSION
        ));
    }
    if !codec::is_supported(stamp.storage_format) {
        return Err(format!(
            "holds storage format {}, which this binary cannot read (it reads formats {:?})",
            stamp.storage_format,
            codec::supported_formats()
        ));
    }
    Ok(())
}

fn write_atomically(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp)?;
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Syncs the directory `dir` itself: the names made, renamed or removed in it.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
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
    fn the_layout_stamp_follows_where_the_log_is() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut d = DataDir::open_or_create(dir.path(), stamp(2))?;
        d.set_layout_version(LAYOUT_LOG_IN_ENGINE)?;
        assert_eq!(read_stamp(dir.path())?.map(|s| s.layout_version), Some(1));
        d.set_layout_version(LAYOUT_VERSION)?;
        let again = DataDir::open_or_create(dir.path(), stamp(2))?;
        assert_eq!(again.stamp().layout_version, LAYOUT_VERSION);
        assert_eq!(again.stamp().member_id, d.stamp().member_id);
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
    fn refuses_a_different_format_than_the_directory_holds() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        DataDir::open_or_create(dir.path(), stamp(1))?;
        let e = DataDir::open_or_create(dir.path(), stamp(2))
            .map(|_| ())
            .expect_err("must fail");
        let msg = e.to_string();
        assert!(msg.contains("holds storage format 1 but format 2"), "{msg}");
        assert!(msg.contains("metastore migrate"), "{msg}");
        assert_eq!(read_stamp(dir.path())?.map(|s| s.storage_format), Some(1));
        Ok(())
    }

    #[test]
    fn an_unfinished_migration_blocks_the_server_until_finished() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        DataDir::open_or_create(dir.path(), stamp(2))?;
        let mut d = DataDir::open_existing(dir.path())?;
        assert_eq!(d.migration(), None);
        d.begin_migration(1)?;
        // The stamp shows the highest format the directory may hold.
        assert_eq!(read_stamp(dir.path())?.map(|s| s.storage_format), Some(2));
        for format in [1, 2] {
            let e = DataDir::open_or_create(dir.path(), stamp(format))
                .map(|_| ())
                .expect_err("must fail");
            assert!(
                e.to_string().contains("metastore migrate --data-dir"),
                "{e}"
            );
        }
        let mut d = DataDir::open_existing(dir.path())?;
        assert_eq!(d.migration().map(|m| m.to), Some(1));
        d.finish_migration(1)?;
        assert!(!dir.path().join(MIGRATION_FILE).exists());
        assert_eq!(
            DataDir::open_or_create(dir.path(), stamp(1))?
                .stamp()
                .storage_format,
            1
        );
        Ok(())
    }

    #[test]
    fn open_existing_needs_a_stamp() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let e = DataDir::open_existing(dir.path())
            .map(|_| ())
            .expect_err("must fail");
        assert!(
            e.to_string().contains("not a MetaStore data directory"),
            "{e}"
        );
        assert_eq!(read_stamp(dir.path())?, None);
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
