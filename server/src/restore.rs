//! `metastore snapshot restore` and `metastore snapshot status`: offline tools over the
//! snapshot files the Snapshot RPC streams (see [`crate::storage::snapshot`]).
//!
//! Restore has the shape and defaults of `etcdctl snapshot restore`: it builds a *new* data
//! directory for one member of a new cluster whose member and cluster ids are computed from
//! `--name`, `--initial-cluster`, `--initial-cluster-token` and
//! `--initial-advertise-peer-urls` exactly as etcd computes them. The steps:
//!
//! 1. check the flags (etcd's bootstrap checks) and that `--data-dir` is absent or empty
//!    (with `--skip-if-initialized`, a data directory holding data ends the restore there);
//! 2. verify the whole file before anything is written: against the SHA-256 recorded beside
//!    it (`--sha256-file`, or `SNAPSHOT.sha256` when present), then its structure and trailer;
//! 3. load it into `.<dir>.restoring` next to the data directory, reset the applied index to 0
//!    and drop the Raft state (`raft/` keys in the meta table: the restored member starts a
//!    fresh log), stamp the directory, sync;
//! 4. rename the temporary directory to the data directory. A data directory that already
//!    exists (a volume's mount point, empty but for `lost+found`) is filled in place instead:
//!    built in `<dir>/.restoring`, its entries moved up, the stamp last.
//!
//! A crash at any point leaves either no data directory or a complete one; a leftover
//! temporary directory is removed by the next restore.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use url::Url;

use crate::server::member;
use crate::storage::codec::{self, DEFAULT_FORMAT};
use crate::storage::data_dir::{sync_dir, DataDir, Stamp, LAYOUT_VERSION, STAMP_FILE};
use crate::storage::snapshot::{self, SnapshotInfo};
use crate::storage::{Engine, RocksEngine, Table, WriteBatch};

/// Why a restore (or status) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// Bad flags (etcd's bootstrap checks).
    #[error("{0}")]
    Config(String),
    /// `--data-dir` holds something (etcd's message).
    #[error("data-dir {0:?} not empty or could not be read")]
    DataDirNotEmpty(PathBuf),
    /// The file's SHA-256 is not the one recorded beside it.
    #[error("snapshot {path}: SHA-256 {actual} does not match {expected} recorded in {recorded}; the backup is damaged or not the one recorded")]
    ChecksumMismatch {
        path: PathBuf,
        recorded: PathBuf,
        expected: String,
        actual: String,
    },
    /// The snapshot file is damaged, of another format, or unreadable.
    #[error("snapshot {path}: {error}")]
    Snapshot {
        path: PathBuf,
        error: crate::storage::Error,
    },
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RestoreError>;

/// What to restore where (the flags of `metastore snapshot restore`).
#[derive(Debug, Clone, clap::Args)]
pub struct RestoreOptions {
    /// The snapshot file (from `etcdctl snapshot save` against MetaStore, or the Snapshot RPC).
    pub snapshot: PathBuf,
    /// Path to the data directory to create [default: ${name}.metastore].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Human-readable name for this member.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Initial cluster configuration for restore bootstrap: `name=peerURL,...`.
    #[arg(long, default_value = "default=http://localhost:2380")]
    pub initial_cluster: String,
    /// Initial cluster token for the cluster during restore bootstrap.
    #[arg(long, default_value = "etcd-cluster")]
    pub initial_cluster_token: String,
    /// List of this member's peer URLs to advertise to the rest of the cluster.
    #[arg(long, value_delimiter = ',', default_value = "http://localhost:2380")]
    pub initial_advertise_peer_urls: Vec<Url>,
    /// A `sha256sum` line (or a bare hex digest) the whole file must match, checked before
    /// anything else [default: SNAPSHOT.sha256 when it exists, as `metastore-ctl backup`
    /// writes it].
    #[arg(long)]
    pub sha256_file: Option<PathBuf>,
    /// Do nothing (exit 0) when `--data-dir` already holds data: a member's init container
    /// restores once, then its later starts keep what the member wrote since (MetaStore's own).
    #[arg(long)]
    pub skip_if_initialized: bool,
    /// `existing`: the member joins a cluster that already runs, so nothing is restored (it
    /// gets its data from the cluster); with the same value the server gets, an init container
    /// restores only while the cluster is new (MetaStore's own).
    #[arg(long, default_value = "new", value_parser = ["new", "existing"])]
    pub initial_cluster_state: String,
}

impl RestoreOptions {
    /// The data directory, defaulting to `${name}.metastore` like the server (etcd: `${name}.etcd`).
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.metastore", self.name)))
    }
}

/// What a restore did.
#[derive(Debug, Clone)]
pub enum Restored {
    /// A new data directory was built.
    Done(RestoreSummary),
    /// `--skip-if-initialized` and the data directory already held data, or
    /// `--initial-cluster-state existing`.
    Skipped(PathBuf),
}

/// A finished restore.
#[derive(Debug, Clone)]
pub struct RestoreSummary {
    pub info: SnapshotInfo,
    pub data_dir: PathBuf,
    pub member_id: u64,
    pub cluster_id: u64,
}

/// Progress of a long step, shown to a person.
pub trait Progress {
    /// A step over `total` bytes begins.
    fn start(&mut self, step: &str, total: u64);
    /// `done` bytes of the current step are done.
    fn update(&mut self, done: u64);
    fn finish(&mut self);
}

/// Shows nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _: &str, _: u64) {}
    fn update(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

/// A progress bar on a terminal; otherwise a line on stderr every few seconds.
pub struct ConsoleProgress {
    bar: Option<indicatif::ProgressBar>,
    step: String,
    total: u64,
    last_line: Instant,
}

const LOG_EVERY: Duration = Duration::from_secs(5);

impl ConsoleProgress {
    pub fn new() -> Self {
        Self {
            bar: None,
            step: String::new(),
            total: 0,
            last_line: Instant::now(),
        }
    }
}

impl Default for ConsoleProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for ConsoleProgress {
    fn start(&mut self, step: &str, total: u64) {
        self.step = step.to_string();
        self.total = total;
        self.last_line = Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(step.to_string());
            self.bar = Some(bar);
        } else {
            eprintln!("{step}: {} bytes", total);
        }
    }

    fn update(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= LOG_EVERY => {
                self.last_line = Instant::now();
                let pct = (done as f64 * 100.0 / self.total.max(1) as f64).min(100.0);
                eprintln!("{}: {done}/{} bytes ({pct:.0}%)", self.step, self.total);
            }
            None => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// `--initial-cluster` as etcd's URLs map: each name with its peer URLs (a name may repeat).
fn parse_initial_cluster(spec: &str) -> Result<Vec<(String, Vec<Url>)>> {
    let mut members: Vec<(String, Vec<Url>)> = Vec::new();
    for item in spec.split(',').filter(|s| !s.trim().is_empty()) {
        let (name, url) = item.split_once('=').ok_or_else(|| {
            RestoreError::Config(format!("--initial-cluster entry {item:?} is not name=URL"))
        })?;
        let url = Url::parse(url.trim())
            .map_err(|e| RestoreError::Config(format!("--initial-cluster URL {url:?}: {e}")))?;
        let name = name.trim().to_string();
        match members.iter_mut().find(|(n, _)| *n == name) {
            Some((_, urls)) => urls.push(url),
            None => members.push((name, vec![url])),
        }
    }
    Ok(members)
}

/// etcd's `VerifyBootstrap` checks, then the ids: `(this member's id, cluster id)`.
pub fn member_and_cluster_ids(opts: &RestoreOptions) -> Result<(u64, u64)> {
    let members = parse_initial_cluster(&opts.initial_cluster)?;
    if members.is_empty() {
        return Err(RestoreError::Config("initial cluster unset".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for url in members.iter().flat_map(|(_, urls)| urls) {
        if !seen.insert(member::url_string(url)) {
            return Err(RestoreError::Config(format!(
                "initial cluster {} has duplicate url {}",
                opts.initial_cluster,
                member::url_string(url)
            )));
        }
    }
    let Some((_, mine)) = members.iter().find(|(n, _)| *n == opts.name) else {
        return Err(RestoreError::Config(format!(
            "couldn't find local name {:?} in the initial cluster configuration",
            opts.name
        )));
    };
    let sorted = |urls: &[Url]| {
        let mut v: Vec<String> = urls.iter().map(member::url_string).collect();
        v.sort();
        v
    };
    if sorted(mine) != sorted(&opts.initial_advertise_peer_urls) {
        return Err(RestoreError::Config(format!(
            "--initial-cluster has {}={} but missing from --initial-advertise-peer-urls={}",
            opts.name,
            sorted(mine).join(","),
            sorted(&opts.initial_advertise_peer_urls).join(",")
        )));
    }
    let token = &opts.initial_cluster_token;
    let ids: Vec<(String, u64)> = members
        .iter()
        .map(|(name, urls)| (name.clone(), member::member_id(urls, token)))
        .collect();
    let my_id = member::member_id(mine, token);
    let all: Vec<u64> = ids.iter().map(|(_, id)| *id).collect();
    Ok((my_id, member::cluster_id(&all)))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreError + '_ {
    move |error| RestoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What a fresh file system holds at its root (a data directory that is a volume mount).
const IGNORED: &[&str] = &["lost+found"];
/// Where an in-place restore builds the directory (inside it).
const IN_PLACE_TMP: &str = ".restoring";

/// Refuses a data directory that exists and holds anything but `IGNORED` and `also` (or
/// cannot be read).
fn check_empty_but(dir: &Path, also: &[&str]) -> Result<()> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let name = e.map_err(io_err(dir))?.file_name();
                let name = name.to_string_lossy();
                if !IGNORED.contains(&name.as_ref()) && !also.contains(&name.as_ref()) {
                    return Err(RestoreError::DataDirNotEmpty(dir.to_path_buf()));
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(_) => Err(RestoreError::DataDirNotEmpty(dir.to_path_buf())),
    }
}

fn check_empty(dir: &Path) -> Result<()> {
    check_empty_but(dir, &[])
}

/// Checks a snapshot file end to end.
pub fn status(path: &Path, progress: &mut dyn Progress) -> Result<SnapshotInfo> {
    let snap_err = |error| RestoreError::Snapshot {
        path: path.to_path_buf(),
        error,
    };
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    progress.start("verifying", len);
    let info = snapshot::verify_with_progress(file, &mut |n| progress.update(n)).map_err(snap_err);
    progress.finish();
    info
}

/// The SHA-256 recorded for `opts.snapshot`: `--sha256-file`, else `SNAPSHOT.sha256` when it
/// exists. `None` when nothing is recorded.
fn recorded_sha256(opts: &RestoreOptions) -> Result<Option<(PathBuf, String)>> {
    let path = match &opts.sha256_file {
        Some(p) => p.clone(),
        None => {
            let mut p = opts.snapshot.clone().into_os_string();
            p.push(".sha256");
            let p = PathBuf::from(p);
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let digest = text
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(RestoreError::Config(format!(
            "{}: no SHA-256 digest (expected `sha256sum` output)",
            path.display()
        )));
    }
    Ok(Some((path, digest)))
}

/// Checks the whole file against the recorded SHA-256, if one is recorded.
fn check_recorded_sha256(opts: &RestoreOptions, progress: &mut dyn Progress) -> Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let Some((recorded, expected)) = recorded_sha256(opts)? else {
        return Ok(());
    };
    let path = &opts.snapshot;
    let mut file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    progress.start("checksum", len);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress.update(done);
    }
    progress.finish();
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(RestoreError::ChecksumMismatch {
            path: path.clone(),
            recorded,
            expected,
            actual,
        });
    }
    Ok(())
}

/// [`restore`], or, with `--skip-if-initialized`, nothing when the data directory is already
/// initialized (holds a stamp). Without a stamp, what an interrupted in-place restore left
/// (its temporary directory, a database moved before the stamp) is cleared first.
pub fn restore_or_skip(opts: &RestoreOptions, progress: &mut dyn Progress) -> Result<Restored> {
    let dir = opts.data_dir();
    if opts.initial_cluster_state == "existing" {
        return Ok(Restored::Skipped(dir));
    }
    if opts.skip_if_initialized {
        if dir.join(STAMP_FILE).exists() {
            return Ok(Restored::Skipped(dir));
        }
        for leftover in [IN_PLACE_TMP, "db"] {
            let p = dir.join(leftover);
            if p.exists() {
                fs::remove_dir_all(&p).map_err(io_err(&p))?;
            }
        }
    }
    restore(opts, progress).map(Restored::Done)
}

/// Restores `opts.snapshot` into a new data directory (see the module docs).
pub fn restore(opts: &RestoreOptions, progress: &mut dyn Progress) -> Result<RestoreSummary> {
    let (member_id, cluster_id) = member_and_cluster_ids(opts)?;
    let data_dir = opts.data_dir();
    check_empty(&data_dir)?;
    check_recorded_sha256(opts, progress)?;
    let name = data_dir
        .file_name()
        .ok_or_else(|| RestoreError::Config(format!("--data-dir {data_dir:?} has no name")))?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(io_err(&parent))?;

    // 1. The whole file must be sound before anything is written.
    let info = status(&opts.snapshot, progress)?;
    let format = match info.header.storage_format {
        0 => DEFAULT_FORMAT,
        f => f,
    };
    if !codec::is_supported(format) {
        return Err(RestoreError::Config(format!(
            "the snapshot holds storage format {format}, which this binary cannot read \
             (it reads formats {:?})",
            codec::supported_formats()
        )));
    }

    // A directory that exists (a volume's mount point) is filled in place: built inside it,
    // then its entries moved up, the stamp last.
    if data_dir.is_dir() {
        let tmp = data_dir.join(IN_PLACE_TMP);
        build_fresh(opts, &tmp, format, (member_id, cluster_id), progress)?;
        check_empty_but(&data_dir, &[IN_PLACE_TMP])?;
        let mut entries: Vec<OsString> = fs::read_dir(&tmp)
            .map_err(io_err(&tmp))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err(&tmp))?;
        entries.sort_by_key(|n| n == STAMP_FILE);
        for name in entries {
            let to = data_dir.join(&name);
            fs::rename(tmp.join(&name), &to).map_err(io_err(&to))?;
        }
        fs::remove_dir(&tmp).map_err(io_err(&tmp))?;
        sync_dir(&data_dir).map_err(io_err(&data_dir))?;
        return Ok(RestoreSummary {
            info,
            data_dir,
            member_id,
            cluster_id,
        });
    }

    // 2. Build the directory under a temporary name next to it.
    let mut tmp_name = OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".restoring");
    let tmp = parent.join(tmp_name);
    build_fresh(opts, &tmp, format, (member_id, cluster_id), progress)?;

    // 3. Move it into place, durably.
    check_empty(&data_dir)?;
    fs::rename(&tmp, &data_dir).map_err(io_err(&data_dir))?;
    sync_dir(&parent).map_err(io_err(&parent))?;
    Ok(RestoreSummary {
        info,
        data_dir,
        member_id,
        cluster_id,
    })
}

/// [`build`] into `tmp`, removing what a previous attempt left there first and what this one
/// wrote if it fails.
fn build_fresh(
    opts: &RestoreOptions,
    tmp: &Path,
    format: u8,
    (member_id, cluster_id): (u64, u64),
    progress: &mut dyn Progress,
) -> Result<()> {
    if tmp.exists() {
        fs::remove_dir_all(tmp).map_err(io_err(tmp))?;
    }
    let built = build(opts, tmp, format, member_id, cluster_id, progress);
    if built.is_err() {
        let _ = fs::remove_dir_all(tmp);
    }
    built
}

fn build(
    opts: &RestoreOptions,
    dir: &Path,
    format: u8,
    member_id: u64,
    cluster_id: u64,
    progress: &mut dyn Progress,
) -> Result<()> {
    let data_dir = DataDir::open_or_create(
        dir,
        Stamp {
            layout_version: LAYOUT_VERSION,
            storage_format: format,
            engine: "rocksdb".into(),
            member_name: opts.name.clone(),
            member_id: format!("{member_id:x}"),
            cluster_id: format!("{cluster_id:x}"),
            created_by: format!("metastore {} (snapshot restore)", env!("CARGO_PKG_VERSION")),
        },
    )?;
    let engine = RocksEngine::open(&data_dir.db_path(), &Default::default())?;
    let path = &opts.snapshot;
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    progress.start("restoring", len);
    let loaded = snapshot::load(file, &engine, &mut |n| progress.update(n));
    progress.finish();
    loaded.map_err(|error| RestoreError::Snapshot {
        path: path.clone(),
        error,
    })?;
    // A fresh Raft log: nothing applied from it yet, no Raft state carried over.
    let mut b = WriteBatch::new();
    b.put(
        Table::Meta,
        crate::mvcc::store::META_APPLIED_INDEX.to_vec(),
        0i64.to_be_bytes().to_vec(),
    );
    b.delete_range(Table::Meta, b"raft/".to_vec(), Some(b"raft0".to_vec()));
    engine.write(b, true)?;
    engine.sync()?;
    Ok(())
}

/// `metastore snapshot ...`.
#[derive(Debug, Parser)]
#[command(
    name = "metastore snapshot",
    version,
    about = "MetaStore snapshot files, offline"
)]
pub struct SnapshotCli {
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Restores a snapshot into a new data directory (the flags of `etcdctl snapshot restore`).
    Restore(RestoreOptions),
    /// Checks a snapshot file (structure and SHA-256) and prints what it holds.
    Status {
        /// The snapshot file.
        snapshot: PathBuf,
    },
}

/// Runs `metastore snapshot ...`; `args` start with `snapshot`. Invalid flags print usage and
/// exit with status 2, as clap does.
pub fn run_cli(args: impl IntoIterator<Item = OsString>) -> Result<()> {
    let cli = SnapshotCli::parse_from(args);
    let mut progress = ConsoleProgress::new();
    match cli.command {
        SnapshotCommand::Restore(opts) => {
            let s = match restore_or_skip(&opts, &mut progress)? {
                Restored::Done(s) => s,
                Restored::Skipped(dir) if opts.initial_cluster_state == "existing" => {
                    println!(
                        "{}: the member joins an existing cluster: nothing restored",
                        dir.display()
                    );
                    return Ok(());
                }
                Restored::Skipped(dir) => {
                    println!(
                        "{} already holds data: nothing restored (--skip-if-initialized)",
                        dir.display()
                    );
                    return Ok(());
                }
            };
            println!(
                "restored snapshot {} into {}: revision {}, compacted {}, {}; \
                 member {:x} in cluster {:x}",
                opts.snapshot.display(),
                s.data_dir.display(),
                s.info.header.revision,
                s.info.header.compact_revision,
                describe(&s.info),
                s.member_id,
                s.cluster_id,
            );
        }
        SnapshotCommand::Status { snapshot } => {
            let info = status(&snapshot, &mut progress)?;
            println!(
                "{}: format {}, storage format {}, revision {}, compacted {}, {}, sha256 {}",
                snapshot.display(),
                info.header.format_version,
                info.header.storage_format,
                info.header.revision,
                info.header.compact_revision,
                describe(&info),
                info.sha256_hex(),
            );
        }
    }
    Ok(())
}

fn describe(info: &SnapshotInfo) -> String {
    let tables: Vec<String> = info
        .tables
        .iter()
        .map(|t| format!("{} {}", t.table.name(), t.entries))
        .collect();
    format!(
        "{} entries ({}), {} bytes",
        info.header.entries,
        tables.join(", "),
        info.header.file_len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryEngine;

    fn opts(args: &[&str]) -> RestoreOptions {
        let mut all = vec!["metastore snapshot", "restore", "snap.db"];
        all.extend_from_slice(args);
        match SnapshotCli::parse_from(all).command {
            SnapshotCommand::Restore(o) => o,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn defaults_give_etcds_default_ids() {
        // `etcdctl snapshot restore` with default flags: member 8e9e05c52164694d in cluster
        // cdf818194e3a8c32, the ids of `etcd` started with default flags.
        let o = opts(&[]);
        assert_eq!(o.data_dir(), PathBuf::from("default.metastore"));
        let (m, c) = member_and_cluster_ids(&o).expect("ids");
        assert_eq!(format!("{m:x}"), "8e9e05c52164694d");
        assert_eq!(format!("{c:x}"), "cdf818194e3a8c32");
    }

    #[test]
    fn three_members_get_the_ids_etcd_gives_them() {
        let cluster = "a=http://10.0.0.1:2380,b=http://10.0.0.2:2380,c=http://10.0.0.3:2380";
        let o = opts(&[
            "--name",
            "b",
            "--initial-cluster",
            cluster,
            "--initial-advertise-peer-urls",
            "http://10.0.0.2:2380",
            "--initial-cluster-token",
            "tok",
        ]);
        let (m, c) = member_and_cluster_ids(&o).expect("ids");
        let url = |s: &str| Url::parse(s).expect("url");
        let ids: Vec<u64> = [
            "http://10.0.0.1:2380",
            "http://10.0.0.2:2380",
            "http://10.0.0.3:2380",
        ]
        .iter()
        .map(|u| member::member_id(&[url(u)], "tok"))
        .collect();
        assert_eq!(m, ids[1]);
        assert_eq!(c, member::cluster_id(&ids));
    }

    #[test]
    fn bootstrap_checks_match_etcds() {
        let e = member_and_cluster_ids(&opts(&["--name", "x"])).expect_err("no such member");
        assert!(
            e.to_string().contains("couldn't find local name \"x\""),
            "{e}"
        );
        let e = member_and_cluster_ids(&opts(&["--initial-advertise-peer-urls", "http://h:1"]))
            .expect_err("advertise mismatch");
        assert!(
            e.to_string()
                .contains("missing from --initial-advertise-peer-urls"),
            "{e}"
        );
        let e = member_and_cluster_ids(&opts(&[
            "--initial-cluster",
            "default=http://localhost:2380,b=http://localhost:2380",
        ]))
        .expect_err("duplicate");
        assert!(e.to_string().contains("duplicate url"), "{e}");
    }

    /// A snapshot file (`dir/snap.db`) holding one key, `k` = `v`.
    fn one_key_file(dir: &Path) -> PathBuf {
        let src = MemoryEngine::new();
        let mut b = WriteBatch::new();
        b.put(Table::Kv, b"k".to_vec(), b"v".to_vec());
        src.write(b, true).expect("write");
        write_file(dir, &src)
    }

    fn write_file(dir: &Path, e: &dyn Engine) -> PathBuf {
        let path = dir.join("snap.db");
        let mut f = File::create(&path).expect("create");
        let snap = e.snapshot();
        snapshot::write_snapshot(snap.as_ref(), &mut f, &mut |_| {}).expect("write");
        path
    }

    #[test]
    fn restores_into_a_fresh_directory_and_resets_raft_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = MemoryEngine::new();
        let mut b = WriteBatch::new();
        b.put(Table::Kv, b"k".to_vec(), b"v".to_vec());
        b.put(
            Table::Meta,
            b"current_rev".to_vec(),
            9i64.to_be_bytes().to_vec(),
        );
        b.put(
            Table::Meta,
            b"applied_index".to_vec(),
            77i64.to_be_bytes().to_vec(),
        );
        b.put(Table::Meta, b"raft/vote".to_vec(), b"x".to_vec());
        b.put(Table::Meta, b"raftx".to_vec(), b"kept".to_vec());
        src.write(b, true).expect("write");
        let file = write_file(dir.path(), &src);
        let target = dir.path().join("nested/restored");
        let mut o = opts(&["--data-dir", &target.display().to_string()]);
        o.snapshot = file;
        let s = restore(&o, &mut NoProgress).expect("restore");
        assert_eq!(s.info.header.revision, 9);
        assert!(!dir.path().join("nested/.restored.restoring").exists());

        let d = DataDir::open_existing(&target).expect("stamped");
        assert_eq!(d.stamp().member_id, "8e9e05c52164694d");
        assert_eq!(d.stamp().cluster_id, "cdf818194e3a8c32");
        assert_eq!(d.stamp().storage_format, DEFAULT_FORMAT);
        let e = RocksEngine::open(&d.db_path(), &Default::default()).expect("open");
        assert_eq!(e.get(Table::Kv, b"k").expect("get"), Some(b"v".to_vec()));
        assert_eq!(
            e.get(Table::Meta, b"applied_index").expect("get"),
            Some(0i64.to_be_bytes().to_vec())
        );
        assert_eq!(e.get(Table::Meta, b"raft/vote").expect("get"), None);
        assert_eq!(
            e.get(Table::Meta, b"raftx").expect("get"),
            Some(b"kept".to_vec())
        );
        drop(e);

        // Again into the same, now non-empty, directory: refused.
        let err = restore(&o, &mut NoProgress).expect_err("not empty");
        assert!(matches!(err, RestoreError::DataDirNotEmpty(_)), "{err}");
    }

    #[test]
    fn a_damaged_file_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = one_key_file(dir.path());
        let mut bytes = fs::read(&file).expect("read");
        bytes[100] ^= 1;
        fs::write(&file, &bytes).expect("write");
        let target = dir.path().join("out");
        fs::create_dir(&target).expect("mkdir"); // an existing empty directory is fine
        let mut o = opts(&["--data-dir", &target.display().to_string()]);
        o.snapshot = file;
        let err = restore(&o, &mut NoProgress).expect_err("corrupted");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(fs::read_dir(&target).expect("ls").count(), 0);
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            2,
            "no temporary left"
        );
    }

    #[test]
    fn the_recorded_sha256_is_checked_first_and_skip_if_initialized_keeps_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = one_key_file(dir.path());
        let target = dir.path().join("out");
        let mut o = opts(&["--data-dir", &target.display().to_string()]);
        o.snapshot = file.clone();
        let sidecar = dir.path().join("snap.db.sha256");
        assert_eq!(file.file_name().and_then(|n| n.to_str()), Some("snap.db"));

        // A sidecar naming another digest: refused before anything is written.
        fs::write(&sidecar, format!("{}  snap.db\n", "ab".repeat(32))).expect("sidecar");
        let err = restore(&o, &mut NoProgress).expect_err("mismatch");
        assert!(
            matches!(err, RestoreError::ChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!target.exists());
        // Not a digest at all: a clear error too.
        fs::write(&sidecar, "nonsense\n").expect("sidecar");
        let err = restore(&o, &mut NoProgress).expect_err("no digest");
        assert!(err.to_string().contains("no SHA-256 digest"), "{err}");

        // The right digest (sha256sum's format): restored.
        use sha2::{Digest, Sha256};
        let digest = hex::encode(Sha256::digest(fs::read(&file).expect("read")));
        fs::write(&sidecar, format!("{digest}  snap.db\n")).expect("sidecar");
        assert!(matches!(
            restore_or_skip(&o, &mut NoProgress).expect("restore"),
            Restored::Done(_)
        ));
        // Again: refused without the flag, skipped (data untouched) with it.
        assert!(restore_or_skip(&o, &mut NoProgress).is_err());
        o.skip_if_initialized = true;
        assert!(matches!(
            restore_or_skip(&o, &mut NoProgress).expect("skip"),
            Restored::Skipped(_)
        ));
        let d = DataDir::open_existing(&target).expect("still stamped");
        let e = RocksEngine::open(&d.db_path(), &Default::default()).expect("open");
        assert_eq!(e.get(Table::Kv, b"k").expect("get"), Some(b"v".to_vec()));
    }

    #[test]
    fn a_mount_point_is_restored_in_place_and_an_interrupted_restore_is_redone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = one_key_file(dir.path());
        // A volume: the directory exists and holds lost+found, plus what a restore killed
        // before its stamp was moved left behind.
        let mount = dir.path().join("volume");
        fs::create_dir_all(mount.join("lost+found")).expect("lost+found");
        fs::create_dir_all(mount.join("db")).expect("leftover db");
        fs::create_dir_all(mount.join(".restoring/db")).expect("leftover tmp");
        let mut o = opts(&["--data-dir", &mount.display().to_string()]);
        o.snapshot = file;
        assert!(
            restore(&o, &mut NoProgress).is_err(),
            "without --skip-if-initialized a leftover is not touched"
        );
        o.skip_if_initialized = true;
        assert!(matches!(
            restore_or_skip(&o, &mut NoProgress).expect("restore"),
            Restored::Done(_)
        ));
        let mut left: Vec<String> = fs::read_dir(&mount)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["db", "lost+found", "metastore.json"]);
        let d = DataDir::open_existing(&mount).expect("stamped");
        let e = RocksEngine::open(&d.db_path(), &Default::default()).expect("open");
        assert_eq!(e.get(Table::Kv, b"k").expect("get"), Some(b"v".to_vec()));
        drop(e);
        assert!(matches!(
            restore_or_skip(&o, &mut NoProgress).expect("skip"),
            Restored::Skipped(_)
        ));
        // A member joining an existing cluster restores nothing, even into an empty volume.
        let empty = dir.path().join("joining");
        fs::create_dir(&empty).expect("mkdir");
        let mut o = opts(&[
            "--data-dir",
            &empty.display().to_string(),
            "--initial-cluster-state",
            "existing",
        ]);
        o.snapshot = dir.path().join("snap.db");
        assert!(matches!(
            restore_or_skip(&o, &mut NoProgress).expect("skip"),
            Restored::Skipped(_)
        ));
        assert_eq!(fs::read_dir(&empty).expect("ls").count(), 0);
    }
}
