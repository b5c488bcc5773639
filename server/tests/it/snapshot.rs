//! Backups: Maintenance.Snapshot → file → `metastore snapshot restore` → a server on the
//! restored directory serves the same keys, revisions, leases and HashKV.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, GetOptions, PutOptions};

use crate::common::everything;
use metastore::restore::{restore, NoProgress, RestoreOptions};
use metastore::server::{config::Config, Server};
use metastore::storage::data_dir::read_stamp;
use metastore::storage::snapshot::{self, ALIGN, CHECKSUM_LEN};
use metastore_proto::etcdserverpb::{maintenance_client::MaintenanceClient, StatusRequest};
use metastore_proto::metastorepb::{migration_client::MigrationClient, SetStorageFormatRequest};

const PEER: &str = "http://127.0.0.1:2380";

/// A server on `data_dir`, with the peer URL the restores below use (so ids line up).
async fn start_on(data_dir: &Path) -> anyhow::Result<(Server, Client)> {
    start_with(data_dir, &[]).await
}

/// [`start_on`] with `extra` flags.
async fn start_with(data_dir: &Path, extra: &[&str]) -> anyhow::Result<(Server, Client)> {
    let dir = data_dir.display().to_string();
    let mut args = vec![
        "metastore",
        "--listen-client-urls",
        "http://127.0.0.1:0",
        // One member: its peer port is never dialled, but tests run in parallel.
        "--listen-peer-urls",
        "http://127.0.0.1:0",
        "--initial-advertise-peer-urls",
        PEER,
        "--data-dir",
        &dir,
    ];
    args.extend_from_slice(extra);
    let config = Config::load(args)?;
    let server = metastore::server::start(&config).await?;
    let client = Client::connect([format!("http://{}", server.client_addrs()[0])], None).await?;
    Ok((server, client))
}

/// Streams a snapshot into `path`, checking each message as etcd would send it.
async fn save(client: &mut Client, path: &Path) -> anyhow::Result<snapshot::SnapshotInfo> {
    let mut stream = client.snapshot().await?;
    let mut file = Vec::new();
    let mut messages = Vec::new();
    while let Some(m) = stream.message().await? {
        assert!(m.header().is_none(), "etcd 3.4/3.5 send no header");
        messages.push((m.remaining_bytes(), m.blob().len()));
        file.extend_from_slice(m.blob());
    }
    let (last, body) = messages.split_last().expect("at least the checksum");
    assert_eq!(*last, (0, CHECKSUM_LEN), "the checksum comes alone, last");
    let body_len = (file.len() - CHECKSUM_LEN) as u64;
    let mut sent = 0;
    for (remaining, len) in body {
        assert!(*len <= 32 << 10);
        sent += *len as u64;
        assert_eq!(*remaining, body_len - sent);
    }
    assert_eq!(
        file.len() as u64 % ALIGN,
        CHECKSUM_LEN as u64,
        "etcdctl's size rule"
    );
    std::fs::write(path, &file)?;
    Ok(snapshot::verify(file.as_slice())?)
}

fn restore_to(file: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join("restored");
    let opts = RestoreOptions {
        snapshot: file.to_path_buf(),
        data_dir: Some(target.clone()),
        name: "default".into(),
        initial_cluster: format!("default={PEER}"),
        initial_cluster_token: "etcd-cluster".into(),
        initial_advertise_peer_urls: vec![PEER.parse()?],
        sha256_file: None,
        skip_if_initialized: false,
        initial_cluster_state: "new".into(),
    };
    restore(&opts, &mut NoProgress)?;
    Ok(target)
}

/// HashKV at `rev`, waiting while `rev` is not yet readable (applied but not yet published).
async fn hash_kv(c: &mut Client, rev: i64) -> anyhow::Result<(u32, i64)> {
    for _ in 0..100 {
        match c.hash_kv(rev).await {
            Ok(r) => return Ok((r.hash(), r.compact_version())),
            Err(e) if e.to_string().contains("future revision") => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("revision {rev} never became readable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_snapshot_serves_the_same_data_history_and_hash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (source, mut c) = start_on(&dir.path().join("source")).await?;
    for i in 0..30 {
        c.put(format!("k/{}", i % 8), format!("v{i}"), None).await?;
    }
    c.delete("k/3", None).await?;
    let lease = c.lease_grant(600, None).await?.id();
    c.put("leased", "x", Some(PutOptions::new().with_lease(lease)))
        .await?;
    let compact_at = c
        .put("k/0", "before-compact", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    c.compact(compact_at, Some(CompactionOptions::new().with_physical()))
        .await?;
    c.put("k/1", "after", None).await?;
    c.put("k/\0binary\u{ff}", vec![0u8, 255, 7], None).await?;
    c.delete("k/4", None).await?;

    let file = dir.path().join("backup.db");
    let info = save(&mut c, &file).await?;
    let (rev, kvs) = everything(&mut c, 0).await?;
    assert_eq!(info.header.revision, rev);
    assert_eq!(info.header.compact_revision, compact_at);
    let (_, history) = everything(&mut c, compact_at + 1).await?;
    let hash = hash_kv(&mut c, 0).await?;
    let hash_at_compact = hash_kv(&mut c, compact_at + 1).await?;
    let member = c.status().await?.header().map(|h| h.member_id());
    drop(c);
    drop(source);

    let restored = restore_to(&file, dir.path())?;
    let (_server, mut r) = start_on(&restored).await?;
    assert_eq!(everything(&mut r, 0).await?, (rev, kvs));
    assert_eq!(everything(&mut r, compact_at + 1).await?.1, history);
    assert_eq!(hash_kv(&mut r, 0).await?, hash);
    assert_eq!(hash_kv(&mut r, compact_at + 1).await?, hash_at_compact);
    let compacted = r
        .get("k/0", Some(GetOptions::new().with_revision(compact_at - 1)))
        .await
        .expect_err("below the compaction");
    assert!(compacted.to_string().contains("compacted"), "{compacted}");
    let leases: Vec<i64> = r.leases().await?.leases().iter().map(|l| l.id()).collect();
    assert_eq!(leases, vec![lease]);
    assert_eq!(
        r.status().await?.header().map(|h| h.member_id()),
        member,
        "the same flags give the same member id"
    );
    // The restored store goes on from the snapshot's revision.
    let next = r.put("new", "1", None).await?;
    assert_eq!(next.header().map(|h| h.revision()), Some(rev + 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_taken_during_writes_is_consistent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_source, mut c) = start_on(&dir.path().join("source")).await?;
    // Enough data that the stream takes many messages while the writer keeps going.
    let value = vec![b'x'; 1024];
    for i in 0..3000 {
        c.put(format!("bulk/{i:05}"), value.clone(), None).await?;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let mut w = c.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                w.put(format!("bulk/{:05}", n % 3000), format!("w{n}"), None)
                    .await?;
                n += 1;
            }
            anyhow::Ok(n)
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let file = dir.path().join("backup.db");
    let mut reader = c.clone();
    let info = save(&mut reader, &file).await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await??;
    assert!(writes > 0, "the writer ran");
    let (after, _) = everything(&mut c, 0).await?;
    assert!(
        after > info.header.revision,
        "writes went on after the snapshot"
    );

    let rev = info.header.revision;
    let source_hash = hash_kv(&mut c, rev).await?;
    let source_state = everything(&mut c, rev).await?.1;
    let restored = restore_to(&file, dir.path())?;
    let (_server, mut r) = start_on(&restored).await?;
    assert_eq!(hash_kv(&mut r, rev).await?, source_hash);
    assert_eq!(everything(&mut r, 0).await?, (rev, source_state));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_mid_stream_does_not_hurt() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_server, mut c) = start_on(&dir.path().join("source")).await?;
    for i in 0..500 {
        c.put(format!("k{i}"), vec![b'v'; 1024], None).await?;
    }
    let mut stream = c.snapshot().await?;
    assert!(stream.message().await?.is_some());
    drop(stream);
    // The server still answers, and a full snapshot still works.
    c.put("after", "1", None).await?;
    let info = save(&mut c, &dir.path().join("b.db")).await?;
    assert_eq!(info.entries(metastore::storage::Table::Kv), 501);
    Ok(())
}

/// An old-format backup (a server writing storage format 1) restores into today's binary, which
/// serves it unchanged in format 1 (a restore changes nothing on disk) and can then migrate it
/// online to format 2, still unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_backup_restores_into_a_new_binary_and_migrates() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (source, mut c) = start_with(&dir.path().join("old"), &["--storage-format", "1"]).await?;
    let lease = c.lease_grant(600, None).await?.id();
    for i in 0..200 {
        let opts = (i % 10 == 0).then(|| PutOptions::new().with_lease(lease));
        c.put(format!("k/{:03}", i % 50), format!("v{i}"), opts)
            .await?;
    }
    c.delete("k/007", None).await?;
    let compact_at = c
        .put("k/000", "c", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    c.compact(compact_at, None).await?;
    c.put("k/001", "after", None).await?;

    let file = dir.path().join("old.db");
    let info = save(&mut c, &file).await?;
    assert_eq!(
        info.header.storage_format, 1,
        "the backup says which format it holds"
    );
    let (rev, kvs) = everything(&mut c, 0).await?;
    let (_, history) = everything(&mut c, compact_at + 1).await?;
    let hash = hash_kv(&mut c, 0).await?;
    drop(c);
    drop(source);

    let restored = restore_to(&file, dir.path())?;
    assert_eq!(read_stamp(&restored)?.map(|s| s.storage_format), Some(1));
    let (server, mut r) = start_on(&restored).await?;
    let url = format!("http://{}", server.client_addrs()[0]);
    let mut maintenance = MaintenanceClient::connect(url.clone()).await?;
    let status = maintenance.status(StatusRequest {}).await?.into_inner();
    assert_eq!(status.storage_format, 1, "no flag: the data's own format");
    assert!(status.supported_storage_formats.contains(&2));
    assert_eq!(everything(&mut r, 0).await?, (rev, kvs.clone()));
    assert_eq!(everything(&mut r, compact_at + 1).await?.1, history);
    assert_eq!(hash_kv(&mut r, 0).await?, hash);

    MigrationClient::connect(url)
        .await?
        .set_storage_format(SetStorageFormatRequest { to: 2 })
        .await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = maintenance.status(StatusRequest {}).await?.into_inner();
        if s.storage_format == 2 && !s.storage_migration_pending {
            assert!(s.storage_migration_rewritten > 0, "{s:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "migration not done: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The switch is a Raft entry of its own: the key space and its revision are unchanged.
    assert_eq!(everything(&mut r, 0).await?, (rev, kvs));
    assert_eq!(everything(&mut r, compact_at + 1).await?.1, history);
    assert_eq!(hash_kv(&mut r, rev).await?, hash);
    let leases: Vec<i64> = r.leases().await?.leases().iter().map(|l| l.id()).collect();
    assert_eq!(leases, vec![lease]);
    drop(r);
    drop(server);
    assert_eq!(read_stamp(&restored)?.map(|s| s.storage_format), Some(2));
    Ok(())
}
