//! `--auto-compaction-mode` / `--auto-compaction-retention`: the server compacts its own
//! history, through Raft, keeping what the retention says.

use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};

use crate::common::TestServer;

const COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";

/// The compaction revision the server reports, polled until it reaches `at_least`.
async fn wait_compacted(s: &TestServer, at_least: i64) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let node = s.server.node().ok_or_else(|| anyhow::anyhow!("stopped"))?;
        let compacted = node.store.compact_revision();
        if compacted >= at_least {
            return Ok(compacted);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no auto compaction to {at_least} within 10 s (compacted: {compacted})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn get_at(c: &mut Client, rev: i64) -> Result<(), String> {
    c.get("k", Some(GetOptions::new().with_revision(rev)))
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revision_mode_keeps_the_last_n_revisions() -> anyhow::Result<()> {
    let s = TestServer::start(&[
        "--auto-compaction-mode=revision",
        "--auto-compaction-retention=10",
        "--auto-compaction-check-interval=50ms",
    ])
    .await?;
    let mut c = s.client().await?;
    let mut rev = 1;
    for i in 0..30 {
        rev = c
            .put("k", format!("v{i}"), None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
    }
    assert_eq!(rev, 31);
    let compacted = wait_compacted(&s, rev - 10).await?;
    assert_eq!(compacted, rev - 10, "exactly the last 10 revisions kept");
    get_at(&mut c, rev - 10).await.map_err(anyhow::Error::msg)?;
    let error = get_at(&mut c, rev - 11).await.expect_err("compacted");
    assert!(error.contains(COMPACTED), "{error}");
    // Counted: at least this one (others may have run while the writes went on).
    let metrics = s
        .server
        .node()
        .map(|n| n.metrics.render())
        .unwrap_or_default();
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("metastore_server_auto_compactions_total "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(counted.is_some_and(|n| n >= 1), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_mode_keeps_the_history_of_the_period() -> anyhow::Result<()> {
    let s = TestServer::start(&[
        "--auto-compaction-mode=periodic",
        "--auto-compaction-retention=1s",
    ])
    .await?;
    let mut c = s.client().await?;
    // Writes for 1.6 s: a compaction happens once a period has passed, to a revision from
    // (at least) a period before it.
    let start = Instant::now();
    let mut written = Vec::new();
    while start.elapsed() < Duration::from_millis(1600) {
        let r = c.put("k", "v", None).await?;
        written.push((start.elapsed(), r.header().map_or(0, |h| h.revision())));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let compacted = wait_compacted(&s, 2).await?;
    let compacted_at = start.elapsed();
    // The compacted revision was written at least a period before the compaction was seen.
    let (written_at, _) = written
        .iter()
        .find(|(_, rev)| *rev == compacted)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("compacted to {compacted}, never written"))?;
    assert!(
        compacted_at >= written_at + Duration::from_secs(1),
        "compacted to a revision written at {written_at:?}, seen at {compacted_at:?}"
    );
    // History newer than the compaction is still there; older is not.
    let last = written.last().map_or(0, |w| w.1);
    get_at(&mut c, last).await.map_err(anyhow::Error::msg)?;
    get_at(&mut c, compacted)
        .await
        .map_err(anyhow::Error::msg)?;
    let error = get_at(&mut c, compacted - 1).await.expect_err("compacted");
    assert!(error.contains(COMPACTED), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default_and_bad_retentions_are_refused() -> anyhow::Result<()> {
    let s = TestServer::start(&["--auto-compaction-check-interval=10ms"]).await?;
    let mut c = s.client().await?;
    for _ in 0..5 {
        c.put("k", "v", None).await?;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    get_at(&mut c, 1).await.map_err(anyhow::Error::msg)?;
    for (mode, retention) in [("periodic", "soon"), ("revision", "1h"), ("revision", "-3")] {
        let error = TestServer::start(&[
            &format!("--auto-compaction-mode={mode}"),
            &format!("--auto-compaction-retention={retention}"),
        ])
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            error.contains(&format!("--auto-compaction-retention={retention}")),
            "{mode} {retention}: {error}"
        );
    }
    Ok(())
}
