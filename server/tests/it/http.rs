use crate::common::{http_get, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_version_metrics() -> anyhow::Result<()> {
    let s = TestServer::start(&["--listen-metrics-urls", "http://127.0.0.1:0"]).await?;
    let mut c = s.client().await?;
    c.put("k", "v", None).await?;
    c.get("k", None).await?;
    let addr = s.addr();
    let got = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        Ok((
            http_get(addr, "/health")?,
            http_get(addr, "/version")?,
            http_get(addr, "/metrics")?,
        ))
    })
    .await??;
    assert_eq!(got.0, (200, r#"{"health":"true","reason":""}"#.to_string()));
    assert_eq!(got.1 .0, 200);
    assert!(got.1 .1.contains(r#""etcdserver":"3.5."#), "{}", got.1 .1);
    let metrics = got.2 .1;
    assert!(
        metrics
            .contains(r#"metastore_grpc_requests_total{code="0",method="etcdserverpb.KV/Put"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(
        "metastore_grpc_request_duration_seconds_bucket{method=\"etcdserverpb.KV/Range\""
    ));
    assert!(
        metrics.contains("metastore_mvcc_current_revision 2"),
        "{metrics}"
    );
    assert!(metrics.contains("metastore_mvcc_db_total_size_in_bytes"));
    // The put's log append was synced, and timed.
    let syncs = metrics
        .lines()
        .find_map(|l| l.strip_prefix("metastore_disk_wal_fsync_duration_seconds_count "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(syncs.is_some_and(|n| n >= 1), "{metrics}");
    assert!(
        metrics.contains(
            "# HELP metastore_disk_wal_fsync_duration_seconds Duration of the Raft log's syncs \
             (fdatasync of a segment; with direct I/O or --raft-log-store engine, the whole \
             synced write)\n"
        ),
        "{metrics}"
    );
    // Raft: a single member leads, has a leader, saw one leader change, applied the put.
    assert!(
        metrics.contains("metastore_server_is_leader 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metastore_server_has_leader 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metastore_server_raft_term 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metastore_server_proposals_pending 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("metastore_server_raft_applied_index"),
        "{metrics}"
    );
    let maddr = s.server.metrics_addrs()[0];
    let (code, body) = tokio::task::spawn_blocking(move || http_get(maddr, "/metrics")).await??;
    assert_eq!(code, 200);
    assert!(body.contains("metastore_apply_group_size"));
    Ok(())
}
