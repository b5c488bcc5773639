//! Offline storage-format migration: `metastore migrate --data-dir DIR --to N [--dry-run]
//! [--verify]`. The online migration of a running cluster reuses its batches: see [`online`].
//!
//! Converts every record of a stopped server's data directory (every version of every key,
//! tombstones included) to storage format `N`, up (1 → 2) or down (2 → 1) alike. Only record
//! bytes change: keys, revisions, the revision log, leases and meta stay as they are.
//!
//! # Steps
//! 1. Check the stamp (the format must be one this binary reads, `N` one it writes) and open
//!    RocksDB. RocksDB's `LOCK` file refuses a directory a running server holds.
//! 2. Count the records by format, decoding each, so that a record this binary cannot read
//!    stops the run before anything is written.
//! 3. Finish any interrupted physical compaction (as the server would at start), so the data
//!    does not move while it is fingerprinted and converted.
//! 4. With `--verify`, fingerprint the store ([`verify`]).
//! 5. Mark the directory ([`DataDir::begin_migration`]: `migration.json`, and the stamp raised
//!    to the highest format it may now hold). From here the server refuses to start until the
//!    migration is finished.
//! 6. Re-encode in bounded batches ([`mod@rewrite`]); each batch carries the resume cursor in meta
//!    and is synced. The last batch sets meta `storage_format` and clears the cursor.
//! 7. Stamp format `N` and remove the marker ([`DataDir::finish_migration`]).
//! 8. With `--verify`, fingerprint again and fail on any difference.
//!
//! # Crash safety
//! A kill at any point leaves a directory that a rerun finishes: before step 5 nothing has
//! changed; during step 6 every record is readable (both formats decode) and the cursor is
//! exactly as far as the records converted with it; between 6 and 7 the rerun finds every
//! record converted and only restamps. A rerun with another `--to` (for example the format
//! the directory had before, to abandon a migration) starts over from the first record,
//! skipping those already in that format.
//!
//! `--dry-run` does steps 1 and 2 only and reports what would change; it changes no record,
//! meta entry or stamp (RocksDB may still rotate its own log files on open).

pub mod online;
mod progress;
pub mod rewrite;
pub mod verify;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::builder::TypedValueParser;

use crate::mvcc::store::{meta_i64, put_meta_i64, META_COMPACT_FINISHED, META_COMPACT_SCHEDULED};
use crate::storage::data_dir::DataDir;
use crate::storage::rocks::RocksOptions;
use crate::storage::{codec, Engine, RocksEngine, WriteBatch};

pub use rewrite::{count, rewrite, BatchLimits, FormatCounts, RewriteStats};
pub use verify::{fingerprint, Fingerprint};

/// `metastore migrate` flags.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "metastore migrate",
    about = "Convert a stopped server's data directory to another storage format (offline)"
)]
pub struct MigrateArgs {
    /// The data directory (the server must be stopped).
    #[arg(long, env = "METASTORE_DATA_DIR")]
    pub data_dir: PathBuf,

    /// The storage format to convert every record to.
    #[arg(long)]
    pub to: u8,

    /// Only count what would change (decoding every record); write nothing. `--verify` is
    /// not run.
    #[arg(long)]
    pub dry_run: bool,

    /// Fingerprint the store (content digest and HashKV at 16 revisions) before and after,
    /// and fail on any difference.
    #[arg(long)]
    pub verify: bool,

    /// Records per batch.
    #[arg(long, default_value_t = 10_000, hide = true,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub batch_records: usize,

    /// Treat storage formats above this one as unknown, as an older binary would (for tests
    /// of mixed-version upgrades; not for production use).
    #[arg(long, env = "METASTORE_MAX_STORAGE_FORMAT", hide = true)]
    pub max_storage_format: Option<u8>,

    /// No progress bar even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

/// Why a migration failed. Nothing is left half-done: a rerun continues (module docs).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error(transparent)]
    Mvcc(#[from] crate::mvcc::Error),
    #[error(
        "data directory {0} is in use by another process (is a metastore server running on \
         it?): stop it before migrating"
    )]
    InUse(PathBuf),
    #[error("data directory {0} holds no database (db/): nothing to migrate")]
    NoDatabase(PathBuf),
    #[error("storage format {format} is not supported by this binary (it supports {supported:?})")]
    UnsupportedFormat { format: u8, supported: Vec<u8> },
    #[error("record of key {key:?} at revision {rev}: {source}; nothing after it was converted")]
    Record {
        key: String,
        rev: i64,
        #[source]
        source: codec::CodecError,
    },
    #[error(
        "VERIFICATION FAILED: the store differs after the migration to format {to}:\n  {}",
        .differences.join("\n  ")
    )]
    Verify { to: u8, differences: Vec<String> },
}

impl From<codec::CodecError> for MigrateError {
    fn from(e: codec::CodecError) -> Self {
        MigrateError::Storage(e.into())
    }
}

pub type Result<T> = std::result::Result<T, MigrateError>;

/// What a run did (or, with `--dry-run`, would do).
#[derive(Debug, Clone)]
pub struct Report {
    pub data_dir: PathBuf,
    pub to: u8,
    pub dry_run: bool,
    /// The records by format before the run.
    pub before: FormatCounts,
    /// An unfinished migration to the same format was resumed.
    pub resumed: bool,
    pub stats: RewriteStats,
    pub elapsed: Duration,
    /// `(before, after)` fingerprints with `--verify` (equal, or the run failed).
    pub verified: Option<(Fingerprint, Fingerprint)>,
}

impl Report {
    /// Records visited per second.
    pub fn records_per_sec(&self) -> f64 {
        self.stats.visited as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = self.data_dir.display();
        if self.dry_run {
            return write!(
                f,
                "dry run: {dir} holds {} records ({}); {} would be re-encoded to format {}",
                self.before.total(),
                self.before,
                self.before.not_in(self.to),
                self.to
            );
        }
        if self.stats.batches == 0 {
            return write!(
                f,
                "{dir} is at storage format {} already ({} records): nothing to do",
                self.to,
                self.before.total()
            );
        }
        write!(
            f,
            "{dir}: storage format {} ({} records, {} re-encoded{} in {:.1}s, {:.0} records/s)",
            self.to,
            self.before.total(),
            self.stats.rewritten,
            if self.resumed { ", resumed" } else { "" },
            self.elapsed.as_secs_f64(),
            self.records_per_sec()
        )?;
        if let Some((_, after)) = &self.verified {
            write!(
                f,
                "\nverified: {} versions, {} leases, revisions {}..={}, content {}, HashKV equal at {} revisions",
                after.versions,
                after.leases,
                after.compact_rev,
                after.current_rev,
                &after.content[..12],
                after.hash_kv.len()
            )?;
        }
        Ok(())
    }
}

/// Runs `metastore migrate` as `args` say. The caller applies `--max-storage-format`
/// ([`codec::limit_formats`]) first, since it holds for the whole process.
pub fn run(args: &MigrateArgs) -> Result<Report> {
    let start = Instant::now();
    let path = args.data_dir.as_path();
    if !codec::is_supported(args.to) {
        return Err(MigrateError::UnsupportedFormat {
            format: args.to,
            supported: codec::supported_formats(),
        });
    }
    let mut dir = DataDir::open_existing(path)?;
    if !dir.db_path().exists() {
        return Err(MigrateError::NoDatabase(path.to_path_buf()));
    }
    let engine: Arc<dyn Engine> = Arc::new(open_engine(&dir.db_path(), path)?);

    let resume = rewrite::resume_point(engine.as_ref(), args.to)?;
    let resumed = dir.migration().is_some_and(|m| m.to == args.to) && resume.is_some();
    let before = count(engine.as_ref(), None, true)?;
    let mut report = Report {
        data_dir: path.to_path_buf(),
        to: args.to,
        dry_run: args.dry_run,
        before: before.clone(),
        resumed,
        stats: RewriteStats::default(),
        elapsed: Duration::ZERO,
        verified: None,
    };
    if args.dry_run {
        report.elapsed = start.elapsed();
        return Ok(report);
    }
    if dir.migration().is_none()
        && dir.stamp().storage_format == args.to
        && before.not_in(args.to) == 0
    {
        tracing::info!(format = args.to, "already at the requested storage format");
        report.elapsed = start.elapsed();
        return Ok(report);
    }

    finish_compaction(engine.as_ref())?;
    let format_now = dir.stamp().storage_format;
    let fp_before = if args.verify {
        tracing::info!("fingerprinting the store before the migration");
        Some(fingerprint(engine.clone(), format_now)?)
    } else {
        None
    };

    dir.begin_migration(args.to)?;
    let remaining = match &resume {
        Some(cursor) => count(engine.as_ref(), Some(cursor), false)?.total(),
        None => before.total(),
    };
    tracing::info!(
        from = %before, to = args.to, remaining, resumed,
        "converting records"
    );
    let mut bar = progress::Progress::new(remaining, !args.no_progress);
    let limits = BatchLimits {
        records: args.batch_records,
        ..BatchLimits::default()
    };
    let convert_start = Instant::now();
    // The `kv_current` table keeps each live key's newest record as it was written: without
    // its marker the next open rebuilds it from the converted history, in `to`.
    crate::mvcc::current::invalidate(engine.as_ref())?;
    report.stats = rewrite(engine.as_ref(), args.to, limits, &mut |done, rewritten| {
        bar.update(done, rewritten)
    })?;
    bar.finish();
    let convert_elapsed = convert_start.elapsed();
    engine.sync()?;
    dir.finish_migration(args.to)?;

    if let Some(fp_before) = fp_before {
        tracing::info!("fingerprinting the store after the migration");
        let after_counts = count(engine.as_ref(), None, false)?;
        let mut differences = Vec::new();
        if after_counts.not_in(args.to) != 0 {
            differences.push(format!(
                "records not in format {}: {}",
                args.to,
                after_counts.not_in(args.to)
            ));
        }
        let fp_after = fingerprint(engine.clone(), args.to)?;
        differences.extend(verify::differences(&fp_before, &fp_after));
        if !differences.is_empty() {
            return Err(MigrateError::Verify {
                to: args.to,
                differences,
            });
        }
        report.verified = Some((fp_before, fp_after));
    }
    // The rate is that of the conversion itself, not of verification.
    report.elapsed = convert_elapsed;
    Ok(report)
}

/// Opens RocksDB, telling a directory held by a running server from other failures.
fn open_engine(db: &Path, dir: &Path) -> Result<RocksEngine> {
    RocksEngine::open(db, &RocksOptions::default()).map_err(|e| match e {
        crate::storage::Error::Engine(msg) if msg.contains("LOCK") => {
            MigrateError::InUse(dir.to_path_buf())
        }
        other => other.into(),
    })
}

/// Finishes a physical compaction a stopped server left unfinished (the server resumes it at
/// start in the background; here it runs before anything is fingerprinted or converted).
fn finish_compaction(engine: &dyn Engine) -> Result<()> {
    let read = |key: &[u8]| -> Result<i64> { Ok(meta_i64(engine, key)?.unwrap_or(0)) };
    let (scheduled, finished) = (read(META_COMPACT_SCHEDULED)?, read(META_COMPACT_FINISHED)?);
    if scheduled > finished {
        tracing::info!(
            scheduled,
            finished,
            "finishing an interrupted compaction first"
        );
        crate::mvcc::compactor::compact(engine, finished, scheduled)?;
        let mut b = WriteBatch::new();
        put_meta_i64(&mut b, META_COMPACT_FINISHED, scheduled);
        engine.write(b, true)?;
    }
    Ok(())
}
