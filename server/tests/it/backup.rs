//! `metastore-ctl backup` and `metastore-ctl defrag` against a 3-member cluster under write
//! load; the backup restored (`metastore snapshot restore`) into new clusters of one and of
//! three members, whose HashKV at the backup's revision equals the source's; a corrupted backup
//! refused at restore.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use metastore::server::config::Config;
use sha2::{Digest, Sha256};

use crate::cluster::{Cluster, Member};
use crate::common::free_port;

const CTL: &str = env!("CARGO_BIN_EXE_metastore-ctl");
const METASTORE: &str = env!("CARGO_BIN_EXE_metastore");

async fn run(program: &str, args: Vec<String>) -> anyhow::Result<Output> {
    let mut c = Command::new(program);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(tokio::task::spawn_blocking(move || c.output()).await??)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Puts through every member until stopped; counts acknowledged writes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(urls: &[String]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let mut c = Client::connect([url.clone()], None).await?;
            let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match c
                        .put(format!("load/{i}/{}", n % 500), vec![b'x'; 256], None)
                        .await
                    {
                        Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    n += 1;
                }
            }));
        }
        Ok(Load {
            stop,
            acked,
            failed,
            tasks,
        })
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.acked.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Restores `snapshot` as the members `names` of a new cluster (token `token`) under `dir`,
/// through the real binary; returns the members, not started.
async fn restore_members(
    snapshot: &Path,
    dir: &Path,
    names: &[&str],
    token: &str,
) -> anyhow::Result<(Vec<Member>, String)> {
    let mut members = Vec::new();
    for name in names {
        members.push(Member {
            name: name.to_string(),
            peer: free_port()?,
            client: free_port()?,
            dir: dir.join(name),
            server: None,
        });
    }
    let initial_cluster = members
        .iter()
        .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    for m in &members {
        let out = run(
            METASTORE,
            vec![
                "snapshot".into(),
                "restore".into(),
                snapshot.display().to_string(),
                format!("--data-dir={}", m.dir.display()),
                format!("--name={}", m.name),
                format!("--initial-cluster={initial_cluster}"),
                format!("--initial-cluster-token={token}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", m.peer),
            ],
        )
        .await?;
        anyhow::ensure!(
            out.status.success(),
            "restore {}: {}{}",
            m.name,
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    Ok((members, initial_cluster))
}

/// Starts restored members in process and returns HashKV at `rev` and the cluster id of each.
async fn start_and_hash(
    members: &mut [Member],
    initial_cluster: &str,
    token: &str,
    rev: i64,
) -> anyhow::Result<Vec<(u32, u64)>> {
    let mut starts = Vec::new();
    // The same bootstrap flags as the restore, as the operations guide says.
    let extra = vec![format!("--initial-cluster-token={token}")];
    for m in members.iter() {
        let config = Config::load(m.args(initial_cluster, "new", &extra))?;
        starts.push(tokio::spawn(async move {
            metastore::server::start(&config).await
        }));
    }
    for (m, s) in members.iter_mut().zip(starts) {
        m.server = Some(s.await??);
    }
    let mut out = Vec::new();
    for m in members.iter() {
        let c = Client::connect([m.url()], None).await?;
        let mut attempt = 0;
        let r = loop {
            match c.maintenance_client().hash_kv(rev).await {
                Ok(r) => break r,
                Err(e) if attempt < 100 => {
                    attempt += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        out.push((r.hash(), r.header().map_or(0, |h| h.cluster_id())));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_under_load_restores_into_one_and_three_members_and_defrag_rolls(
) -> anyhow::Result<()> {
    let c = Cluster::start(3, &[]).await?;
    let leader = c.wait_leader().await?;
    let urls: Vec<String> = c.members.iter().map(|m| m.url()).collect();
    let mut source = c.client(0).await?;
    let source_cluster = source
        .status()
        .await?
        .header()
        .map_or(0, |h| h.cluster_id());
    let load = Load::start(&urls).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The backup, taken while the load runs.
    let dir = tempfile::tempdir()?;
    let backups = dir.path().join("backups");
    let out = run(
        CTL,
        vec![
            "backup".into(),
            format!("--endpoints={}", urls.join(",")),
            format!("--dir={}", backups.display()),
            "--name=b1".into(),
            "--cluster=db/demo".into(),
        ],
    )
    .await?;
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let manifest: serde_json::Value = serde_json::from_str(
        text(&out.stdout)
            .lines()
            .last()
            .ok_or_else(|| anyhow::anyhow!("no output"))?,
    )?;

    // Defragmentation, one member at a time, the leader last, the load still running.
    let out = run(
        CTL,
        vec!["defrag".into(), format!("--endpoints={}", urls.join(","))],
    )
    .await?;
    let defrag_out = text(&out.stdout);
    assert!(out.status.success(), "{defrag_out}{}", text(&out.stderr));
    let leader_name = c.members[leader].name.clone();
    let order_line = defrag_out
        .lines()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no output"))?;
    assert!(
        order_line.ends_with(&format!(", {leader_name}")),
        "leader {leader_name} last: {order_line}"
    );
    assert_eq!(
        defrag_out.matches(": defragmented in").count(),
        3,
        "{defrag_out}"
    );
    let (acked, failed) = load.stop().await;
    assert!(acked > 100, "the load ran: {acked} writes");
    assert_eq!(failed, 0, "requests were served throughout");

    // The manifest: a follower's backup, the files it names, their checksum.
    assert_eq!(manifest["cluster"], "db/demo");
    assert_eq!(manifest["cluster_id"], format!("{source_cluster:x}"));
    assert_eq!(manifest["member_was_leader"], false, "{manifest}");
    assert_ne!(manifest["member"], leader_name.as_str());
    assert_eq!(manifest["storage_format"], 2);
    let rev = manifest["revision"].as_i64().unwrap_or(0);
    assert!(rev > 1, "{manifest}");
    let snapshot = backups.join("b1.snapshot");
    let bytes = std::fs::read(&snapshot)?;
    assert_eq!(manifest["size_bytes"].as_u64(), Some(bytes.len() as u64));
    let sha = hex::encode(Sha256::digest(&bytes));
    assert_eq!(manifest["sha256"], sha.as_str());
    assert_eq!(
        std::fs::read_to_string(backups.join("b1.snapshot.sha256"))?,
        format!("{sha}  b1.snapshot\n")
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backups.join("b1.manifest.json"))?)?;
    assert_eq!(on_disk, manifest);
    assert!(!backups.join("b1.snapshot.part").exists());

    // The source's HashKV at the backup's revision, on every member.
    let mut source_hashes = Vec::new();
    for i in 0..3 {
        let cl = c.client(i).await?;
        source_hashes.push(cl.maintenance_client().hash_kv(rev).await?.hash());
    }
    assert!(source_hashes.iter().all(|h| *h == source_hashes[0]));

    // Restored into one member, and into three: the same data at the same revision, in a
    // cluster of its own.
    for names in [&["r0"][..], &["s0", "s1", "s2"][..]] {
        let token = format!("restored-{}", names.len());
        let (mut members, ic) =
            restore_members(&snapshot, &dir.path().join(&token), names, &token).await?;
        let restored = start_and_hash(&mut members, &ic, &token, rev).await?;
        for (hash, cluster_id) in &restored {
            assert_eq!(*hash, source_hashes[0], "{names:?}: HashKV at {rev}");
            assert_ne!(*cluster_id, source_cluster, "a new cluster id");
        }
        let mut cl = Client::connect([members[0].url()], None).await?;
        let header_rev = cl
            .get("load/", None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        assert_eq!(header_rev, rev, "{names:?}: the backup's revision");
        for m in &mut members {
            if let Some(s) = m.server.take() {
                let stopped = s.shutdown().await;
                tokio::task::spawn_blocking(move || stopped.wait()).await?;
            }
        }
    }

    // A corrupted copy is refused at restore, saying why.
    let mut damaged = bytes.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x55;
    let bad = dir.path().join("damaged.snapshot");
    std::fs::write(&bad, &damaged)?;
    let out = run(
        METASTORE,
        vec![
            "snapshot".into(),
            "restore".into(),
            bad.display().to_string(),
            format!("--data-dir={}", dir.path().join("never").display()),
        ],
    )
    .await?;
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(
        error.contains("corrupted") || error.contains("malformed"),
        "{error}"
    );
    assert!(!dir.path().join("never").exists(), "nothing left behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_and_defrag_fail_clearly_without_a_cluster() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let url = format!("http://127.0.0.1:{}", free_port()?);
    let out = run(
        CTL,
        vec![
            "backup".into(),
            format!("--endpoints={url}"),
            format!("--dir={}", dir.path().display()),
            "--timeout=2s".into(),
        ],
    )
    .await?;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no backup was taken"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0, "no file left");
    let out = run(
        CTL,
        vec![
            "backup".into(),
            format!("--endpoints={url}"),
            format!("--dir={}", dir.path().display()),
            "--name=../escape".into(),
        ],
    )
    .await?;
    assert!(text(&out.stderr).contains("plain file name"));
    let out = run(CTL, vec!["defrag".into(), format!("--endpoints={url}")]).await?;
    assert!(!out.status.success());
    Ok(())
}
