use std::time::{Duration, Instant};

use etcd_client::{EventType, LeaseGrantOptions, PutOptions};
use tonic::Code;

use crate::common::{status, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grant_attach_ttl_keepalive_revoke() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let g = c.lease_grant(30, None).await?;
    assert!(g.id() > 0);
    assert_eq!(g.ttl(), 30);
    let short = c.lease_grant(1, None).await?;
    assert_eq!(short.ttl(), 2, "raised to the minimum TTL");
    c.put("a", "1", Some(PutOptions::new().with_lease(g.id())))
        .await?;
    c.put("b", "2", Some(PutOptions::new().with_lease(g.id())))
        .await?;
    c.put("b", "3", None).await?; // detaches b
    let ttl = c
        .lease_time_to_live(
            g.id(),
            Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
        )
        .await?;
    assert_eq!(ttl.granted_ttl(), 30);
    assert!(ttl.ttl() > 0 && ttl.ttl() <= 30);
    assert_eq!(ttl.keys(), [b"a".to_vec()]);
    let (mut keeper, mut responses) = c.lease_keep_alive(g.id()).await?;
    keeper.keep_alive().await?;
    let ka = responses.message().await?.expect("keepalive answer");
    assert_eq!((ka.id(), ka.ttl()), (g.id(), 30));
    let leases = c.leases().await?;
    assert_eq!(leases.leases().len(), 2);
    let before = c
        .get("a", None)
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or_default();
    let r = c.lease_revoke(g.id()).await?;
    assert_eq!(
        r.header().map(|h| h.revision()),
        Some(before + 1),
        "one revision for all keys"
    );
    assert_eq!(c.get("a", None).await?.count(), 0);
    assert_eq!(c.get("b", None).await?.count(), 1, "a detached key stays");
    let e = c.lease_revoke(g.id()).await.expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    let gone = c.lease_time_to_live(g.id(), None).await?;
    assert_eq!(gone.ttl(), -1);
    let e = c
        .lease_grant(10, Some(LeaseGrantOptions::new().with_id(short.id())))
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::FailedPrecondition,
            "etcdserver: lease already exists".into()
        )
    );
    let e = c
        .lease_grant(9_000_000_001, None)
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (Code::OutOfRange, "etcdserver: too large lease TTL".into())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_on_time_under_ten_thousand_live_leases() -> anyhow::Result<()> {
    let s = TestServer::start(&["--unsafe-no-fsync"]).await?;
    let c = s.client().await?;
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                c.lease_grant(600, None).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let mut c = c.clone();
    assert_eq!(c.leases().await?.leases().len(), 10_000);
    let mut watch = c.watch("expiring", None).await?;
    assert!(watch.message().await?.expect("created").created());
    let g = c.lease_grant(2, None).await?;
    let granted = Instant::now();
    c.put("expiring", "x", Some(PutOptions::new().with_lease(g.id())))
        .await?;
    let deleted_after = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), watch.message())
            .await??
            .expect("event");
        if r.events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            break granted.elapsed();
        }
    };
    println!("TTL 2 s lease expired after {deleted_after:?} with 10,000 other leases live");
    assert!(
        deleted_after >= Duration::from_secs(2),
        "expired early: {deleted_after:?}"
    );
    assert!(
        deleted_after <= Duration::from_secs(3),
        "expired late: {deleted_after:?}"
    );
    Ok(())
}
