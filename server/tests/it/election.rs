//! `v3electionpb.Election`: campaign, leader, proclaim, observe, resign, errors.
//! Expected codes, messages and observe sequences were checked against etcd 3.4.23.

use std::time::Duration;

use etcd_client::{Client, LeaderKey, ObserveStream, ProclaimOptions, ResignOptions};
use tonic::Code;

use crate::common::{status, TestServer};

async fn next(obs: &mut ObserveStream) -> anyhow::Result<(String, i64, i64)> {
    let m = tokio::time::timeout(Duration::from_secs(5), obs.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("observe ended"))?;
    let kv = m.kv().ok_or_else(|| anyhow::anyhow!("no kv"))?;
    let rev = m.header().map(|h| h.revision()).unwrap_or_default();
    Ok((kv.value_str()?.to_string(), kv.create_revision(), rev))
}

fn leader_opts(l: &LeaderKey) -> Option<ProclaimOptions> {
    Some(ProclaimOptions::new().with_leader(l.clone()))
}

fn resign_opts(l: &LeaderKey) -> Option<ResignOptions> {
    Some(ResignOptions::new().with_leader(l.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_leader_proclaim_observe_resign() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let e = c.leader("e").await.expect_err("no leader yet");
    assert_eq!(status(e), (Code::Unknown, "election: no leader".into()));

    let l1 = c.lease_grant(60, None).await?.id();
    let l2 = c.lease_grant(60, None).await?.id();
    let won = c.campaign("e", "a", l1).await?;
    let lk = won
        .leader()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no leader key"))?;
    assert_eq!(lk.name(), b"e");
    assert_eq!(lk.key(), format!("e/{l1:x}").as_bytes());
    assert_eq!(lk.lease(), l1);
    assert_eq!(Some(lk.rev()), won.header().map(|h| h.revision()));

    let mut obs = c.observe("e").await?;
    assert_eq!(next(&mut obs).await?, ("a".into(), lk.rev(), lk.rev()));
    let leader = c.leader("e").await?;
    assert_eq!(leader.kv().map(|kv| kv.value()), Some(&b"a"[..]));

    let p = c.proclaim("b", leader_opts(&lk)).await?;
    let prev = p.header().map(|h| h.revision()).unwrap_or_default();
    assert_eq!(next(&mut obs).await?, ("b".into(), lk.rev(), prev));

    // A second candidate waits until the leader resigns.
    let mut c2 = c.clone();
    let second = tokio::spawn(async move { c2.campaign("e", "c", l2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "two leaders");
    let r = c.resign(resign_opts(&lk)).await?;
    let resigned = r.header().map(|h| h.revision()).unwrap_or_default();
    let won2 = tokio::time::timeout(Duration::from_secs(5), second).await???;
    let lk2 = won2
        .leader()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no leader key"))?;
    assert_eq!(lk2.key(), format!("e/{l2:x}").as_bytes());
    let (v, create, _) = next(&mut obs).await?;
    assert_eq!((v.as_str(), create), ("c", lk2.rev()));
    assert!(lk2.rev() < resigned);

    // The old leader key no longer proclaims; resigning it again is a no-op.
    let e = c
        .proclaim("x", leader_opts(&lk))
        .await
        .expect_err("not leader");
    assert_eq!(status(e), (Code::Unknown, "election: not leader".into()));
    c.resign(resign_opts(&lk)).await?;
    assert_eq!(
        c.leader("e").await?.kv().map(|kv| kv.value().to_vec()),
        Some(b"c".to_vec())
    );

    // Campaigning again with the same lease and a new value proclaims it.
    let again = c.campaign("e", "d", l2).await?;
    assert_eq!(again.leader().map(|l| l.rev()), Some(lk2.rev()));
    let (v, create, _) = next(&mut obs).await?;
    assert_eq!((v.as_str(), create), ("d", lk2.rev()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_waits_for_a_first_leader() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let c = s.client().await?;
    let mut c1 = c.clone();
    let campaign = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let l = c1.lease_grant(60, None).await?.id();
        c1.campaign("w", "first", l).await
    });
    // etcd-client's observe returns once the first message arrives.
    let mut c2 = c.clone();
    let mut obs = c2.observe("w").await?;
    let (v, create, rev) = next(&mut obs).await?;
    let won = campaign.await??;
    assert_eq!(
        (v.as_str(), create, rev),
        (
            "first",
            won.leader().map(|l| l.rev()).unwrap_or_default(),
            create
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_leaders_lease_elects_the_next() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c: Client = s.client().await?;
    let l1 = c.lease_grant(60, None).await?.id();
    let l2 = c.lease_grant(60, None).await?.id();
    c.campaign("r", "one", l1).await?;
    let mut c2 = c.clone();
    let second = tokio::spawn(async move { c2.campaign("r", "two", l2).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished());
    c.lease_revoke(l1).await?;
    tokio::time::timeout(Duration::from_secs(5), second).await???;
    assert_eq!(
        c.leader("r").await?.kv().map(|kv| kv.value().to_vec()),
        Some(b"two".to_vec())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let e = c
        .campaign("x", "v", 0x999)
        .await
        .expect_err("unknown lease");
    assert_eq!(
        status(e),
        (
            Code::Unknown,
            "etcdserver: requested lease not found".into()
        )
    );
    let missing = (
        Code::Unknown,
        "\"leader\" field must be provided".to_string(),
    );
    let e = c.proclaim("v", None).await.expect_err("no leader key");
    assert_eq!(status(e), missing);
    let e = c.resign(None).await.expect_err("no leader key");
    assert_eq!(status(e), missing);
    // Lease 0: the server grants a 60 s lease, as etcd does.
    let won = c.campaign("x", "v", 0).await?;
    let lease = won.leader().map(|l| l.lease()).unwrap_or_default();
    assert_ne!(lease, 0);
    assert_eq!(c.lease_time_to_live(lease, None).await?.granted_ttl(), 60);
    Ok(())
}
