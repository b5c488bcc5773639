//! Online migration: re-encoding a running member's records in the background after the
//! cluster switched storage format.
//!
//! The switch itself is a replicated command (`Command::SetStorageFormat`): every member
//! applies it at the same Raft index ([`Applying::set_storage_format`]), which records the new
//! write format and the migration target (`migrate/to`) in meta atomically with the apply
//! position, and from then on writes new records in the new format. The [`Reencoder`] then
//! converts the existing records with the offline migration's batches
//! ([`rewrite_batch`]): each batch carries its cursor in meta,
//! so a restart resumes after the last batch written, and a snapshot from the leader brings
//! the leader's cursor along with the leader's records (the re-encoder continues from it, see
//! `raft::state_machine`).
//!
//! # Concurrency
//! - Requests never wait for it: readers use engine snapshots, and the apply step only adds
//!   records under new revisions, never rewriting an existing key, so a re-encoded record
//!   (same key, same content) cannot hide a newer version.
//! - Compaction deletes records: each re-encoder batch holds the store's background lock from
//!   its snapshot to its write, as every compaction chunk does, so a record a compaction
//!   removed is never written back. Snapshot installs take the lock too.
//! - A new switch while a migration runs takes the lock as well and replaces `migrate/to`:
//!   the next batch starts over towards the new target.
//!
//! # Throttling
//! Batches of [`ReencoderOptions::batch_records`]; after each, the thread pauses so as to stay
//! under [`ReencoderOptions::rate`] records per second, and never less than the batch took, so
//! the engine is at most half busy with it.
//!
//! [`Applying::set_storage_format`]: crate::mvcc::store::Applying::set_storage_format

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::rewrite::{rewrite_batch, BatchLimits, RewriteStats, META_MIGRATE_TO};
use super::{MigrateError, Result};
use crate::storage::data_dir;
use crate::storage::{Engine, Table};
use crate::worker::ChannelWorker;

/// How the re-encoder runs.
#[derive(Debug, Clone)]
pub struct ReencoderOptions {
    /// Records visited per second at most (0: no limit beyond the half duty cycle).
    pub rate: u64,
    /// Records per batch (one engine write, one hold of the background lock).
    pub batch_records: usize,
    /// The data directory whose stamp follows the migration (`None` for the memory engine).
    pub data_dir: Option<PathBuf>,
}

impl Default for ReencoderOptions {
    fn default() -> Self {
        Self {
            rate: 50_000,
            batch_records: 1000,
            data_dir: None,
        }
    }
}

/// A member's migration progress, as Status and the metrics report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationProgress {
    /// Records remain in another format than the write format (re-encoding runs or will
    /// resume).
    pub pending: bool,
    /// The target of the migration running or last finished (0: none since start).
    pub target: u8,
    /// Records visited and re-encoded towards `target` since this process started it.
    pub visited: u64,
    pub rewritten: u64,
}

struct Shared {
    engine: Arc<dyn Engine>,
    background: Arc<Mutex<()>>,
    opts: ReencoderOptions,
    target: AtomicU64,
    visited: AtomicU64,
    rewritten: AtomicU64,
}

/// The background re-encoder of one member (module docs).
///
/// Dropping it stops the thread after its current batch and waits for it
/// (`worker::ChannelWorker`).
pub struct Reencoder {
    shared: Arc<Shared>,
    worker: ChannelWorker<()>,
}

impl Reencoder {
    /// Starts the thread; it resumes a pending migration at once. `background` is the
    /// store's background lock ([`crate::mvcc::Store::background_lock`]).
    pub fn start(
        engine: Arc<dyn Engine>,
        background: Arc<Mutex<()>>,
        opts: ReencoderOptions,
    ) -> Result<Arc<Self>> {
        let shared = Arc::new(Shared {
            engine,
            background,
            opts,
            target: AtomicU64::new(0),
            visited: AtomicU64::new(0),
            rewritten: AtomicU64::new(0),
        });
        let running = shared.clone();
        let worker = ChannelWorker::spawn("reencoder", move |rx| running.run(rx)).map_err(|e| {
            MigrateError::Mvcc(crate::mvcc::Error::Corrupt(format!(
                "cannot start the re-encoder: {e}"
            )))
        })?;
        let r = Arc::new(Self { shared, worker });
        r.kick();
        Ok(r)
    }

    /// Looks for a pending migration (after a switch was applied or a snapshot installed).
    pub fn kick(&self) {
        self.worker.send(());
    }

    /// Called by the apply step right after a switch to `to`, before any record in `to` is
    /// written: raises the data directory's stamp to the highest format it may now hold, so
    /// that a binary that cannot read `to` refuses the directory.
    pub fn switched(&self, to: u8) -> Result<()> {
        let Some(dir) = &self.shared.opts.data_dir else {
            return Ok(());
        };
        let _guard = self.shared.background.lock().map_err(|_| closed())?;
        let current = data_dir::read_stamp(dir)?.map_or(to, |s| s.storage_format);
        data_dir::set_stamp_format(dir, current.max(to))?;
        Ok(())
    }

    /// This member's progress.
    pub fn progress(&self) -> MigrationProgress {
        let s = &self.shared;
        let pending = s
            .engine
            .get(Table::Meta, META_MIGRATE_TO)
            .map(|v| v.is_some())
            .unwrap_or(false);
        MigrationProgress {
            pending,
            target: s.target.load(Ordering::Relaxed) as u8,
            visited: s.visited.load(Ordering::Relaxed),
            rewritten: s.rewritten.load(Ordering::Relaxed),
        }
    }
}

fn closed() -> MigrateError {
    MigrateError::Mvcc(crate::mvcc::Error::Closed)
}

impl Shared {
    fn run(&self, rx: mpsc::Receiver<()>) {
        while rx.recv().is_ok() {
            while rx.try_recv().is_ok() {}
            loop {
                let start = Instant::now();
                let step = self.step();
                let visited = match step {
                    Ok(Step::Idle) => break,
                    Ok(Step::Done) => break,
                    Ok(Step::Batch(visited)) => visited,
                    Err(e) => {
                        // Retried at the next kick (a switch, a snapshot install, a restart).
                        tracing::error!(error = %e, "storage format re-encoding failed");
                        break;
                    }
                };
                let took = start.elapsed();
                let budget = match self.opts.rate {
                    0 => Duration::ZERO,
                    rate => Duration::from_secs_f64(visited as f64 / rate as f64),
                };
                let pause = budget.saturating_sub(took).max(took);
                match rx.recv_timeout(pause) {
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
        }
    }

    /// One batch, under the background lock.
    fn step(&self) -> Result<Step> {
        let _guard = self.background.lock().map_err(|_| closed())?;
        let engine = self.engine.as_ref();
        let Some(to) = engine
            .get(Table::Meta, META_MIGRATE_TO)?
            .and_then(|v| v.first().copied())
        else {
            return Ok(Step::Idle);
        };
        if self.target.swap(u64::from(to), Ordering::Relaxed) != u64::from(to) {
            self.visited.store(0, Ordering::Relaxed);
            self.rewritten.store(0, Ordering::Relaxed);
            tracing::info!(to, "re-encoding records in the background");
        }
        let limits = BatchLimits {
            records: self.opts.batch_records.max(1),
            ..BatchLimits::default()
        };
        let mut stats = RewriteStats::default();
        let done = rewrite_batch(engine, to, limits, false, &mut stats)?;
        self.visited.fetch_add(stats.visited, Ordering::Relaxed);
        self.rewritten.fetch_add(stats.rewritten, Ordering::Relaxed);
        if !done {
            return Ok(Step::Batch(stats.visited));
        }
        // Every record is in `to`: make that durable before the stamp may be lowered.
        engine.sync()?;
        if let Some(dir) = &self.opts.data_dir {
            data_dir::set_stamp_format(dir, to)?;
        }
        tracing::info!(
            to,
            visited = self.visited.load(Ordering::Relaxed),
            rewritten = self.rewritten.load(Ordering::Relaxed),
            "every record is in the new storage format"
        );
        Ok(Step::Done)
    }
}

enum Step {
    /// No migration pending.
    Idle,
    /// A batch of this many records was written; more remain.
    Batch(u64),
    /// The migration finished with this batch.
    Done,
}

#[cfg(test)]
mod tests;
