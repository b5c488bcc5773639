//! `metastore-ctl backup`: a verified snapshot of a running cluster, with its checksum and a
//! manifest, taken from a healthy member (a follower by preference, so the leader keeps its
//! resources for the cluster's traffic).
//!
//! Files written in `--dir`, for a backup named `NAME`:
//! - `NAME.snapshot`: the `Maintenance.Snapshot` stream, as `etcdctl snapshot save` writes it
//!   (written to `NAME.snapshot.part`, verified end to end, then renamed, so a file with the
//!   final name is always whole);
//! - `NAME.snapshot.sha256`: its SHA-256, in `sha256sum` format (`sha256sum -c` checks it);
//! - `NAME.manifest.json`: cluster id, member, revision, compacted revision, storage format,
//!   size, checksum, start and end times. The same JSON is the command's last line of output.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use metastore::storage::snapshot;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{SnapshotRequest, StatusResponse};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::conn::{statuses, ConnArgs, Dialer, MemberRef};

#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    conn: ConnArgs,

    /// Directory the backup's files are written to (created if missing).
    #[arg(long)]
    dir: PathBuf,

    /// The backup's name: its files are NAME.snapshot, NAME.snapshot.sha256 and
    /// NAME.manifest.json [default: backup-SECONDS, the Unix time].
    #[arg(long)]
    name: Option<String>,

    /// A label for the cluster recorded in the manifest (the operator passes its namespace/name).
    #[arg(long, default_value = "")]
    cluster: String,

    /// Give up (exit status 1) after this long.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// After a successful backup, keep only the newest N backups of this `--cluster` in
    /// `--dir` (older ones' three files are removed); 0 keeps everything.
    #[arg(long, default_value_t = 0)]
    keep: usize,

    /// Also write the manifest (one line of JSON) to this file: a Kubernetes Job passes
    /// `/dev/termination-log`, where the operator reads the result.
    #[arg(long)]
    termination_message_path: Option<PathBuf>,
}

/// What a backup holds, written beside it and printed last.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub cluster: String,
    pub cluster_id: String,
    pub member: String,
    pub member_was_leader: bool,
    pub revision: i64,
    pub compact_revision: i64,
    pub storage_format: u8,
    pub size_bytes: u64,
    pub sha256: String,
    pub file: String,
    pub started_at: String,
    pub finished_at: String,
    pub duration_seconds: f64,
}

/// Members that can serve the backup, best first: followers before the leader, then the one
/// that applied the most. A learner, a member that did not answer, reports no leader, or has
/// an alarm raised is skipped (the reason is printed).
fn candidates(members: Vec<(MemberRef, anyhow::Result<StatusResponse>)>) -> Vec<Candidate> {
    let mut out = Vec::new();
    for (m, s) in members {
        if m.is_learner {
            eprintln!("skipping {}: a learner (it may trail the voters)", m.name);
            continue;
        }
        let Some(url) = m.url.clone() else {
            eprintln!("skipping {}: no client URL published yet", m.name);
            continue;
        };
        let s = match s {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipping {}: unreachable ({e:#})", m.name);
                continue;
            }
        };
        if s.leader == 0 {
            eprintln!("skipping {}: it has no leader", m.name);
            continue;
        }
        if !s.errors.is_empty() {
            eprintln!("skipping {}: {}", m.name, s.errors.join("; "));
            continue;
        }
        let cluster_id = s.header.as_ref().map_or(0, |h| h.cluster_id);
        out.push(Candidate {
            is_leader: s.leader == m.id,
            applied: s.raft_applied_index,
            cluster_id,
            member: m,
            url,
        });
    }
    out.sort_by_key(|c| (c.is_leader, std::cmp::Reverse(c.applied)));
    out
}

struct Candidate {
    member: MemberRef,
    url: String,
    is_leader: bool,
    applied: u64,
    cluster_id: u64,
}

pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    let dialer = Dialer::new(&args.conn).context("client TLS")?;
    let endpoints = args.conn.urls();
    let name = args.name.clone().unwrap_or_else(|| {
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("backup-{secs}")
    });
    if name.is_empty() || name.contains('/') {
        bail!("--name {name:?}: a backup name is a plain file name");
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let mut last_error = None;
    while Instant::now() < deadline {
        let candidates = match statuses(&dialer, &endpoints).await {
            Ok(members) => candidates(members),
            Err(e) => {
                eprintln!("cannot list the members: {e:#}");
                last_error = Some(e);
                Vec::new()
            }
        };
        if candidates.is_empty() && last_error.is_none() {
            last_error = Some(anyhow::anyhow!("no healthy member to take the backup from"));
        }
        for c in candidates {
            let role = if c.is_leader { "leader" } else { "follower" };
            eprintln!(
                "taking the backup from {} ({role}, {})",
                c.member.name, c.url
            );
            match take(&dialer, &c, &args, &name, deadline).await {
                Ok(manifest) => {
                    let line = serde_json::to_string(&manifest)?;
                    if args.keep > 0 {
                        for old in prune(&args.dir, &args.cluster, args.keep)? {
                            eprintln!("removed backup {old} (--keep {})", args.keep);
                        }
                    }
                    if let Some(path) = &args.termination_message_path {
                        std::fs::write(path, &line)
                            .with_context(|| format!("writing {}", path.display()))?;
                    }
                    println!("{line}");
                    return Ok(());
                }
                Err(e) => {
                    eprintln!("backup from {} failed: {e:#}", c.member.name);
                    last_error = Some(e);
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(last_error
        .unwrap_or_else(|| anyhow::anyhow!("timed out"))
        .context("no backup was taken"))
}

/// Streams, verifies and records one backup from `c`.
async fn take(
    dialer: &Dialer,
    c: &Candidate,
    args: &BackupArgs,
    name: &str,
    deadline: Instant,
) -> anyhow::Result<Manifest> {
    let started = SystemTime::now();
    let clock = Instant::now();
    let file_name = format!("{name}.snapshot");
    let path = args.dir.join(&file_name);
    let part = args.dir.join(format!("{file_name}.part"));
    let result = stream_to(dialer, &c.url, &part, deadline).await;
    let (size, sha256) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    // The file's own trailer is checked too: a stream cut short or damaged never gets the
    // final name.
    let info = match verify(&part) {
        Ok(info) => info,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::rename(&part, &path).with_context(|| format!("renaming {}", part.display()))?;
    let sha_path = args.dir.join(format!("{file_name}.sha256"));
    write_synced(&sha_path, format!("{sha256}  {file_name}\n").as_bytes())?;
    let finished = SystemTime::now();
    let manifest = Manifest {
        name: name.to_string(),
        cluster: args.cluster.clone(),
        cluster_id: format!("{:x}", c.cluster_id),
        member: c.member.name.clone(),
        member_was_leader: c.is_leader,
        revision: info.header.revision,
        compact_revision: info.header.compact_revision,
        storage_format: info.header.storage_format,
        size_bytes: size,
        sha256,
        file: file_name,
        started_at: humantime::format_rfc3339_seconds(started).to_string(),
        finished_at: humantime::format_rfc3339_seconds(finished).to_string(),
        duration_seconds: clock.elapsed().as_secs_f64(),
    };
    let manifest_path = args.dir.join(format!("{name}.manifest.json"));
    write_synced(
        &manifest_path,
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
    )?;
    eprintln!(
        "backup {name}: {size} bytes at revision {} from {} in {:.1} s",
        manifest.revision, manifest.member, manifest.duration_seconds
    );
    Ok(manifest)
}

/// Streams the member's snapshot into `part`, fsynced; returns its size and SHA-256 (hex).
async fn stream_to(
    dialer: &Dialer,
    url: &str,
    part: &Path,
    deadline: Instant,
) -> anyhow::Result<(u64, String)> {
    let mut client = MaintenanceClient::new(dialer.streaming().channel(url)?)
        .max_decoding_message_size(64 << 20);
    let mut stream = client
        .snapshot(SnapshotRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let mut file =
        std::fs::File::create(part).with_context(|| format!("creating {}", part.display()))?;
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    let mut shown = Instant::now();
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(remaining, stream.message())
            .await
            .map_err(|_| anyhow::anyhow!("timed out after {written} bytes"))?
            .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?;
        let Some(message) = message else { break };
        file.write_all(&message.blob)?;
        hasher.update(&message.blob);
        written += message.blob.len() as u64;
        if shown.elapsed() >= Duration::from_secs(1) || message.remaining_bytes == 0 {
            let total = written + message.remaining_bytes;
            eprintln!(
                "  {written} / {total} bytes ({:.0} %)",
                100.0 * written as f64 / total.max(1) as f64
            );
            shown = Instant::now();
        }
    }
    if written == 0 {
        bail!("the member sent an empty snapshot");
    }
    file.sync_all()?;
    Ok((written, hex::encode(hasher.finalize())))
}

fn verify(path: &Path) -> anyhow::Result<snapshot::SnapshotInfo> {
    let file = std::fs::File::open(path)?;
    snapshot::verify(std::io::BufReader::new(file))
        .with_context(|| format!("verifying {}", path.display()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// Removes all but the `keep` newest backups of `cluster` in `dir` (by their manifests' finish
/// time); returns the names removed, oldest first. Files of other clusters, and anything
/// without a readable manifest, are left alone.
pub fn prune(dir: &Path, cluster: &str, keep: usize) -> anyhow::Result<Vec<String>> {
    let mut found: Vec<Manifest> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let is_manifest = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".manifest.json"));
        if !is_manifest {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        match serde_json::from_str::<Manifest>(&text) {
            Ok(m) if m.cluster == cluster => found.push(m),
            _ => {}
        }
    }
    found.sort_by(|a, b| (&a.finished_at, &a.name).cmp(&(&b.finished_at, &b.name)));
    let excess = found.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for m in found.into_iter().take(excess) {
        for file in [
            m.file.clone(),
            format!("{}.sha256", m.file),
            format!("{}.manifest.json", m.name),
        ] {
            if file.contains('/') {
                continue; // a manifest naming a path elsewhere is not followed
            }
            match std::fs::remove_file(dir.join(&file)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {file}")),
            }
        }
        removed.push(m.name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(dir: &Path, name: &str, cluster: &str, finished: &str) {
        let m = Manifest {
            name: name.into(),
            cluster: cluster.into(),
            cluster_id: "1".into(),
            member: "m0".into(),
            member_was_leader: false,
            revision: 1,
            compact_revision: 0,
            storage_format: 2,
            size_bytes: 3,
            sha256: "00".into(),
            file: format!("{name}.snapshot"),
            started_at: finished.into(),
            finished_at: finished.into(),
            duration_seconds: 0.1,
        };
        std::fs::write(dir.join(&m.file), b"abc").expect("snapshot");
        std::fs::write(dir.join(format!("{}.sha256", m.file)), b"00").expect("sha");
        std::fs::write(
            dir.join(format!("{name}.manifest.json")),
            serde_json::to_string(&m).expect("json"),
        )
        .expect("manifest");
    }

    #[test]
    fn prune_keeps_the_newest_of_one_cluster() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        backup(dir.path(), "b3", "db/a", "2026-01-03T00:00:00Z");
        backup(dir.path(), "b1", "db/a", "2026-01-01T00:00:00Z");
        backup(dir.path(), "b2", "db/a", "2026-01-02T00:00:00Z");
        backup(dir.path(), "other", "db/b", "2025-01-01T00:00:00Z");
        std::fs::write(dir.path().join("notes.txt"), b"kept")?;
        assert_eq!(prune(dir.path(), "db/a", 2)?, vec!["b1".to_string()]);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        left.sort();
        assert_eq!(
            left,
            [
                "b2.manifest.json",
                "b2.snapshot",
                "b2.snapshot.sha256",
                "b3.manifest.json",
                "b3.snapshot",
                "b3.snapshot.sha256",
                "notes.txt",
                "other.manifest.json",
                "other.snapshot",
                "other.snapshot.sha256"
            ]
        );
        assert!(prune(dir.path(), "db/a", 2)?.is_empty());
        assert_eq!(prune(dir.path(), "db/a", 1)?, vec!["b2".to_string()]);
        Ok(())
    }
}
