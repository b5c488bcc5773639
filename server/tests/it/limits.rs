use etcd_client::{Txn, TxnOp};
use tonic::Code;

use crate::common::{status, TestServer};

#[tokio::test]
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

#[tokio::test]
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

#[tokio::test]
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
