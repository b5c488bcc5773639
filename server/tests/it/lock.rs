//! `v3lockpb.Lock`: mutual exclusion, release by Unlock and by lease revoke, errors.
//! Expected codes and messages were checked against etcd 3.4.23.

use std::time::Duration;

use etcd_client::LockOptions;
use tokio::sync::oneshot;
use tonic::Code;

use crate::common::{status, TestServer};

/// How long a contender that must wait is given to (wrongly) get the lock.
const STILL_WAITING: Duration = Duration::from_millis(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_contender_waits_for_unlock() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let l1 = c.lease_grant(60, None).await?.id();
    let l2 = c.lease_grant(60, None).await?.id();
    let first = c
        .lock("mylock", Some(LockOptions::new().with_lease(l1)))
        .await?;
    assert_eq!(first.key(), format!("mylock/{l1:x}").as_bytes());
    let held = c.get(first.key(), None).await?;
    assert_eq!(held.kvs()[0].lease(), l1);
    assert_eq!(held.kvs()[0].value(), b"");

    // Locking again with the same lease returns the same key at once (etcd reuses it).
    let again = c
        .lock("mylock", Some(LockOptions::new().with_lease(l1)))
        .await?;
    assert_eq!(again.key(), first.key());

    let (done_tx, mut done_rx) = oneshot::channel();
    let mut c2 = c.clone();
    let waiter = tokio::spawn(async move {
        let r = c2
            .lock("mylock", Some(LockOptions::new().with_lease(l2)))
            .await;
        let _ = done_tx.send(());
        r
    });
    assert!(
        tokio::time::timeout(STILL_WAITING, &mut done_rx)
            .await
            .is_err(),
        "the second contender got the lock while the first held it"
    );
    let unlocked = c.unlock(first.key()).await?;
    let unlock_rev = unlocked.header().map(|h| h.revision()).unwrap_or_default();
    let second = tokio::time::timeout(Duration::from_secs(5), waiter).await???;
    assert_eq!(second.key(), format!("mylock/{l2:x}").as_bytes());
    assert!(second.header().map(|h| h.revision()).unwrap_or_default() >= unlock_rev);
    // Unlocking a key that is gone succeeds, as in etcd.
    c.unlock(first.key()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_contenders_get_the_lock_in_order() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let l0 = c.lease_grant(60, None).await?.id();
    let holder = c.lock("q", Some(LockOptions::new().with_lease(l0))).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        let mut ci = c.clone();
        let lease = c.lease_grant(60, None).await?.id();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Ok(r) = ci
                .lock("q", Some(LockOptions::new().with_lease(lease)))
                .await
            {
                let _ = tx.send((i, r.key().to_vec()));
            }
        });
        // The order of arrival is the order of the keys' create revisions.
        wait_for_keys(&mut c, "q/", i + 2).await?;
    }
    c.unlock(holder.key()).await?;
    for want in 0..3 {
        let (i, key) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("contender failed"))?;
        assert_eq!(i, want);
        assert!(
            tokio::time::timeout(Duration::from_millis(100), rx.recv())
                .await
                .is_err(),
            "two contenders hold the lock"
        );
        c.unlock(key).await?;
    }
    Ok(())
}

async fn wait_for_keys(c: &mut etcd_client::Client, prefix: &str, n: usize) -> anyhow::Result<()> {
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    for _ in 0..200 {
        if c.get(prefix, Some(opts.clone())).await?.count() as usize >= n {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("{n} keys never appeared under {prefix}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_holders_lease_releases_the_lock() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let l1 = c.lease_grant(60, None).await?.id();
    let l2 = c.lease_grant(60, None).await?.id();
    c.lock("rl", Some(LockOptions::new().with_lease(l1)))
        .await?;
    let mut c2 = c.clone();
    let waiter =
        tokio::spawn(async move { c2.lock("rl", Some(LockOptions::new().with_lease(l2))).await });
    wait_for_keys(&mut c, "rl/", 2).await?;
    assert!(!waiter.is_finished());
    c.lease_revoke(l1).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), waiter).await???;
    assert_eq!(got.key(), format!("rl/{l2:x}").as_bytes());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_lease_is_revoked_fails() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let l1 = c.lease_grant(60, None).await?.id();
    let l2 = c.lease_grant(60, None).await?.id();
    c.lock("wl", Some(LockOptions::new().with_lease(l1)))
        .await?;
    let mut c2 = c.clone();
    let waiter =
        tokio::spawn(async move { c2.lock("wl", Some(LockOptions::new().with_lease(l2))).await });
    wait_for_keys(&mut c, "wl/", 2).await?;
    c.lease_revoke(l2).await?;
    let e = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await??
        .expect_err("the waiter's key is gone");
    assert_eq!(
        status(e),
        (Code::Unknown, "session: session is expired".into())
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_goes_away_leaves_the_queue() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let l1 = c.lease_grant(60, None).await?.id();
    let l2 = c.lease_grant(60, None).await?.id();
    c.lock("gl", Some(LockOptions::new().with_lease(l1)))
        .await?;
    let mut c2 = s.client().await?;
    let waiter =
        tokio::spawn(async move { c2.lock("gl", Some(LockOptions::new().with_lease(l2))).await });
    wait_for_keys(&mut c, "gl/", 2).await?;
    waiter.abort();
    // The server notices the canceled call and deletes the waiter's key.
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    for _ in 0..200 {
        if c.get("gl/", Some(opts.clone())).await?.count() == 1 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("the abandoned waiter's key stayed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_lease_zero() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let e = c
        .lock("el", Some(LockOptions::new().with_lease(0x1234)))
        .await
        .expect_err("unknown lease");
    assert_eq!(
        status(e),
        (
            Code::Unknown,
            "etcdserver: requested lease not found".into()
        )
    );
    // Lease 0: the server grants a 60 s lease for the key, as etcd does.
    let r = c.lock("el", None).await?;
    let kv = c.get(r.key(), None).await?.kvs()[0].clone();
    assert_ne!(kv.lease(), 0);
    assert_eq!(r.key(), format!("el/{:x}", kv.lease()).as_bytes());
    let ttl = c.lease_time_to_live(kv.lease(), None).await?;
    assert_eq!(ttl.granted_ttl(), 60);
    let e = c.unlock("").await.expect_err("empty key");
    assert_eq!(
        status(e),
        (Code::Unknown, "etcdserver: key is not provided".into())
    );
    Ok(())
}
