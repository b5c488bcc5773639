use etcd_client::GetOptions;

use crate::common::{everything, free_port, Kv, Proc};

/// Every key, with its revisions, version and lease.
async fn snapshot(p: &Proc) -> anyhow::Result<Vec<Kv>> {
    Ok(everything(&mut p.client().await?, 0).await?.1)
}

async fn write_some(p: &Proc, prefix: &str) -> anyhow::Result<i64> {
    let mut c = p.client().await?;
    let mut rev = 0;
    for i in 0..20 {
        let r = c
            .put(format!("{prefix}/{}", i % 7), format!("v{i}"), None)
            .await?;
        rev = r.header().map(|h| h.revision()).unwrap_or_default();
    }
    c.delete(format!("{prefix}/3"), None).await?;
    Ok(rev + 1)
}

/// The layout the data directory's stamp says, whether it has segment logs, and whether its
/// RocksDB database has the `kv_current` table (its newest options file names every table).
fn layout(dir: &std::path::Path) -> anyhow::Result<(u64, bool, bool)> {
    let stamp: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("metastore.json"))?)?;
    let version = stamp["layout_version"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no layout_version in {stamp}"))?;
    let db = dir.join("db");
    let options = std::fs::read_dir(&db)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("OPTIONS-"))
        .max_by_key(|n| n.trim_start_matches("OPTIONS-").parse::<u64>().unwrap_or(0))
        .ok_or_else(|| anyhow::anyhow!("no OPTIONS file in {}", db.display()))?;
    let current_table = std::fs::read_to_string(db.join(options))?.contains("\"kv_current\"");
    Ok((version, dir.join("wal").exists(), current_table))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_log_and_the_current_table_come_and_go_across_crashes_without_losing_a_write(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    // Small segments and snapshots every 50 entries: segments roll and are deleted.
    let small = [
        ("METASTORE_RAFT_LOG_SEGMENT_BYTES", "8192"),
        ("METASTORE_SNAPSHOT_COUNT", "50"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut env = small.to_vec();
        env.extend_from_slice(extra);
        env
    };
    let mut p = Proc::spawn(dir.path(), port, &small)?;
    for round in 0..8 {
        write_some(&p, &format!("w{round}")).await?;
    }
    assert_eq!(
        layout(dir.path())?,
        (3, true, true),
        "segments and the current table by default"
    );
    let segments = std::fs::read_dir(dir.path().join("wal"))?.count();
    assert!(segments >= 2, "{segments} segment files");
    let before = snapshot(&p).await?;
    p.signal("KILL")?;

    // Back into RocksDB, without the current table: a binary from before segment logs could
    // open it now.
    let to_layout_1 = with(&[
        ("METASTORE_RAFT_LOG_STORE", "engine"),
        ("METASTORE_KV_CURRENT_TABLE", "false"),
    ]);
    let mut p = Proc::spawn(dir.path(), port, &to_layout_1)?;
    assert_eq!(
        snapshot(&p).await?,
        before,
        "after the move into the engine"
    );
    assert_eq!(layout(dir.path())?, (1, false, false));
    write_some(&p, "e").await?;
    let before = snapshot(&p).await?;
    p.signal("KILL")?;

    // Into segments again, still without the table: what binaries of sessions 32 to 49 open.
    let mut p = Proc::spawn(
        dir.path(),
        port,
        &with(&[("METASTORE_KV_CURRENT_TABLE", "false")]),
    )?;
    assert_eq!(snapshot(&p).await?, before, "after the move into segments");
    assert_eq!(layout(dir.path())?, (2, true, false));
    write_some(&p, "s").await?;
    let before = snapshot(&p).await?;
    p.signal("KILL")?;

    // With the table again: rebuilt from the history, and read from.
    let mut p = Proc::spawn(dir.path(), port, &small)?;
    assert_eq!(snapshot(&p).await?, before, "after the table is rebuilt");
    assert_eq!(layout(dir.path())?, (3, true, true));
    write_some(&p, "c").await?;
    let before = snapshot(&p).await?;
    p.signal("KILL")?;
    let p = Proc::spawn(dir.path(), port, &small)?;
    assert_eq!(snapshot(&p).await?, before, "after a crash with the table");
    Ok(())
}

/// Puts `per_client` keys `k<t>/<i>` from each of 256 concurrent clients (so that they travel
/// in a few large entries), then waits up to 10 s until `until` holds of the Raft metrics and
/// returns what it returned; the last log index is in the error otherwise.
async fn puts_from_256_clients<T>(
    s: &crate::common::TestServer,
    per_client: usize,
    until: impl Fn(
        &openraft::RaftMetrics<metastore::raft::NodeId, metastore::raft::MemberNode>,
    ) -> Option<T>,
) -> anyhow::Result<T> {
    let c = s.client().await?;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..256 {
        let mut c = c.clone();
        tasks.spawn(async move {
            for i in 0..per_client {
                c.put(format!("k{t:03}/{i}"), format!("v{t}/{i}"), None)
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let raft = &s
        .server
        .node()
        .ok_or_else(|| anyhow::anyhow!("stopped"))?
        .replica
        .raft;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = raft.metrics().borrow().clone();
        if let Some(found) = until(&m) {
            return Ok(found);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "not there after {} puts in {:?} entries: {m:?}",
            256 * per_client,
            m.last_log_index
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// `--snapshot-count` counts requests, as etcd's does, not log entries: 256 clients' puts
/// travel in a few large entries, and still a snapshot follows every 500 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_follow_the_count_of_requests_not_of_entries() -> anyhow::Result<()> {
    let s = crate::common::TestServer::start(&["--snapshot-count", "500"]).await?;
    let (snapshot, last) = puts_from_256_clients(&s, 4, |m| {
        let last = m.last_log_index.unwrap_or_default();
        m.snapshot
            .filter(|_| last > 0)
            .map(|snap| (snap.index, last))
    })
    .await?;
    assert!(
        last < 500,
        "the puts took {last} entries: too few per entry to tell the counts apart"
    );
    assert!(snapshot > 0 && snapshot <= last, "{snapshot} of {last}");
    Ok(())
}

/// What is kept of the log after a snapshot is counted in requests too: with
/// `--snapshot-count 300`, the newest 300 puts, not the newest 300 entries, which here hold
/// every put. Puts go on being applied while the snapshot is recorded, and the log is purged
/// all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_kept_after_a_snapshot_is_counted_in_requests() -> anyhow::Result<()> {
    let s = crate::common::TestServer::start(&["--snapshot-count", "300"]).await?;
    let (purged, snapshot, last) = puts_from_256_clients(&s, 8, |m| {
        let (p, snap) = (m.purged?, m.snapshot?);
        Some((p.index, snap.index, m.last_log_index.unwrap_or_default()))
    })
    .await?;
    assert!(
        last < 300,
        "the puts took {last} entries: too few per entry to tell the counts apart"
    );
    // openraft alone would keep the newest 300 entries, that is everything.
    assert!(
        purged <= snapshot && purged + 300 > snapshot,
        "purged up to {purged} with a snapshot at {snapshot} of {last}"
    );
    // Nothing was lost, and the log goes on from there.
    let mut c = s.client().await?;
    let all = c.get("k", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(all.count(), 2048);
    c.put("after", "purge", None).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_sigterm_and_sigkill() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut p = Proc::spawn(dir.path(), port, &[])?;
    let rev = write_some(&p, "a").await?;
    let before = snapshot(&p).await?;
    p.signal("TERM")?;

    let mut p = Proc::spawn(dir.path(), port, &[])?;
    assert_eq!(snapshot(&p).await?, before, "after SIGTERM");
    let mut c = p.client().await?;
    assert_eq!(
        c.get("a/1", None).await?.header().map(|h| h.revision()),
        Some(rev)
    );
    // a/1 was first written at revision 3 (the second put).
    let old = c
        .get("a/1", Some(GetOptions::new().with_revision(3)))
        .await?;
    assert_eq!(
        old.kvs().first().map(|kv| kv.value()),
        Some(&b"v1"[..]),
        "history survives too"
    );

    let rev2 = write_some(&p, "b").await?;
    let before = snapshot(&p).await?;
    // Every acknowledged write must be there after a crash.
    p.signal("KILL")?;
    let p = Proc::spawn(dir.path(), port, &[])?;
    assert_eq!(snapshot(&p).await?, before, "after SIGKILL");
    let mut c = p.client().await?;
    assert_eq!(
        c.get("b/1", None).await?.header().map(|h| h.revision()),
        Some(rev2)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_engine_starts_empty_and_ids_are_stable() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let mut p = Proc::spawn(dir.path(), port, &[])?;
    let id1 = p
        .client()
        .await?
        .status()
        .await?
        .header()
        .map(|h| h.member_id());
    p.signal("TERM")?;
    let mut p = Proc::spawn(dir.path(), port, &[("METASTORE_NAME", "renamed")])?;
    let id2 = p
        .client()
        .await?
        .status()
        .await?
        .header()
        .map(|h| h.member_id());
    assert_eq!(id1, id2, "ids come from the data directory once it exists");
    p.signal("TERM")?;

    let mdir = tempfile::tempdir()?;
    let mut p = Proc::spawn(mdir.path(), port, &[("METASTORE_ENGINE", "memory")])?;
    p.client().await?.put("k", "v", None).await?;
    p.signal("TERM")?;
    let p = Proc::spawn(mdir.path(), port, &[("METASTORE_ENGINE", "memory")])?;
    assert_eq!(p.client().await?.get("k", None).await?.count(), 0);
    assert!(
        !mdir.path().join("db").exists(),
        "the memory engine writes nothing"
    );
    Ok(())
}

#[test]
fn refuses_a_data_dir_of_an_unknown_format() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("metastore.json"),
        r#"{"layout_version":1,"storage_format":7,"engine":"rocksdb","member_name":"x",
            "member_id":"1","cluster_id":"2","created_by":"future"}"#,
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metastore"))
        .arg("--data-dir")
        .arg(dir.path())
        .env(
            "METASTORE_LISTEN_CLIENT_URLS",
            format!("http://127.0.0.1:{}", free_port()?),
        )
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage format 7"), "{err}");
    assert!(!dir.path().join("db").exists(), "nothing written");
    Ok(())
}
