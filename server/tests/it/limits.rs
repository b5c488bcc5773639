use etcd_client::{Txn, TxnOp};
use tonic::Code;

use crate::common::{status, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_size_limit_is_configurable_and_exact() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-request-bytes", "4096"]).await?;
    let mut c = s.client().await?;
    c.put("small", vec![b'x'; 3000], None).await?;
    let e = c
        .put("big", vec![b'x'; 5000], None)
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::InvalidArgument,
            "etcdserver: request is too large".into()
        )
    );
    // Far above the limit, gRPC's own receive limit refuses it before decoding.
    let e = c
        .put("huge", vec![b'x'; 2 << 20], None)
        .await
        .expect_err("must fail");
    assert_ne!(status(e).0, Code::Ok);
    assert_eq!(c.get("big", None).await?.count(), 0);
    assert_eq!(
        c.get("small", None).await?.count(),
        1,
        "server still serves"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_request_limit_is_etcds() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    c.put("ok", vec![b'x'; 1024 * 1024], None).await?;
    let e = c
        .put("too-big", vec![b'x'; 1536 * 1024 + 1], None)
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::InvalidArgument,
            "etcdserver: request is too large".into()
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_ops_limit_is_configurable() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-txn-ops", "3"]).await?;
    let mut c = s.client().await?;
    let ops = |n: usize| {
        (0..n)
            .map(|i| TxnOp::put(format!("k{i}"), "v", None))
            .collect::<Vec<_>>()
    };
    assert!(c.txn(Txn::new().and_then(ops(3))).await?.succeeded());
    let e = c
        .txn(Txn::new().and_then(ops(4)))
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request".into()
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_quota_raises_nospace_and_recovers() -> anyhow::Result<()> {
    for engine in ["memory", "rocksdb"] {
        let s = TestServer::start(&["--engine", engine, "--quota-backend-bytes", "400000"]).await?;
        let mut c = s.client().await?;
        let value = vec![b'x'; 20_000];
        let mut refused = None;
        for i in 0..100 {
            if let Err(e) = c.put(format!("k{}", i % 5), value.clone(), None).await {
                refused = Some(status(e));
                break;
            }
            // Let the on-disk size measurement (refreshed every 250 ms) catch up.
            if engine == "rocksdb" {
                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
            }
        }
        assert_eq!(
            refused,
            Some((
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded".into()
            )),
            "{engine}"
        );
        let alarms = c
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None,
            )
            .await?;
        assert_eq!(alarms.alarms().len(), 1);
        assert!(c
            .status()
            .await?
            .errors()
            .iter()
            .any(|e| e.contains("alarm:NOSPACE")));
        // Writes stay refused; reads and deletes are served.
        let e = c.put("more", "x", None).await.expect_err("must fail");
        assert_eq!(status(e).0, Code::ResourceExhausted);
        assert_eq!(
            c.get("k", Some(etcd_client::GetOptions::new().with_prefix()))
                .await?
                .count(),
            5
        );
        let d = c
            .delete("k", Some(etcd_client::DeleteOptions::new().with_prefix()))
            .await?;
        let rev = d.header().map(|h| h.revision()).unwrap_or_default();
        // Compact, defragment, disarm: writes are accepted again.
        c.compact(
            rev,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        )
        .await?;
        c.defragment().await?;
        let member = alarms.alarms()[0].member_id();
        let mut target = etcd_client::AlarmOptions::new();
        target.with_member(member);
        c.alarm(
            etcd_client::AlarmAction::Deactivate,
            etcd_client::AlarmType::Nospace,
            Some(target),
        )
        .await?;
        assert!(c
            .alarm(
                etcd_client::AlarmAction::Get,
                etcd_client::AlarmType::None,
                None
            )
            .await?
            .alarms()
            .is_empty());
        c.put("after", "ok", None).await?;
    }
    Ok(())
}
