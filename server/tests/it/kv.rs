use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, SortOrder, SortTarget, Txn, TxnOp,
    TxnOpResponse,
};
use tonic::Code;

use crate::common::{status, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_delete_with_revisions() -> anyhow::Result<()> {
    for engine in ["rocksdb", "memory"] {
        let s = TestServer::start(&["--engine", engine]).await?;
        let mut c = s.client().await?;
        let r = c.put("foo", "bar", None).await?;
        assert_eq!(r.header().map(|h| h.revision()), Some(2));
        let r = c
            .put("foo", "baz", Some(PutOptions::new().with_prev_key()))
            .await?;
        assert_eq!(r.prev_key().map(|kv| kv.value()), Some(&b"bar"[..]));
        let g = c.get("foo", None).await?;
        let kv = &g.kvs()[0];
        assert_eq!(
            (kv.create_revision(), kv.mod_revision(), kv.version()),
            (2, 3, 2)
        );
        let old = c
            .get("foo", Some(GetOptions::new().with_revision(2)))
            .await?;
        assert_eq!(old.kvs()[0].value(), b"bar");
        let d = c
            .delete("foo", Some(DeleteOptions::new().with_prev_key()))
            .await?;
        assert_eq!(d.deleted(), 1);
        assert_eq!(d.prev_kvs()[0].value(), b"baz");
        assert_eq!(c.get("foo", None).await?.count(), 0);
        let h = c.get("foo", None).await?;
        assert_eq!(h.header().map(|h| h.revision()), Some(4));
        let header = h.header().expect("header");
        assert_ne!(header.cluster_id(), 0);
        assert_ne!(header.member_id(), 0);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_prefix_sort_limit_count() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    for (k, v) in [("p/a", "3"), ("p/b", "1"), ("p/c", "2"), ("q", "0")] {
        c.put(k, v, None).await?;
    }
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_limit(2)))
        .await?;
    assert_eq!((r.kvs().len(), r.more(), r.count()), (2, true, 3));
    let r = c
        .get(
            "p/",
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Value, SortOrder::Descend),
            ),
        )
        .await?;
    let keys: Vec<_> = r
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(keys, ["p/a", "p/c", "p/b"]);
    let r = c
        .get("p/b", Some(GetOptions::new().with_from_key()))
        .await?;
    assert_eq!(r.count(), 3);
    let r = c
        .get(
            "\0",
            Some(GetOptions::new().with_from_key().with_count_only()),
        )
        .await?;
    assert_eq!((r.count(), r.kvs().len()), (4, 0));
    let r = c
        .get("p/", Some(GetOptions::new().with_prefix().with_keys_only()))
        .await?;
    assert!(r.kvs().iter().all(|kv| kv.value().is_empty()));
    let r = c.get("q", Some(GetOptions::new().with_range("p"))).await?;
    assert_eq!(r.count(), 0, "inverted range is empty, not an error");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txn_compare_and_swap() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    // kube-apiserver's create: ModRevision == 0 then Put.
    let create = Txn::new()
        .when([Compare::mod_revision("obj", CompareOp::Equal, 0)])
        .and_then([TxnOp::put("obj", "v1", None)])
        .or_else([TxnOp::get("obj", None)]);
    assert!(c.txn(create.clone()).await?.succeeded());
    let again = c.txn(create).await?;
    assert!(!again.succeeded());
    let TxnOpResponse::Get(g) = &again.op_responses()[0] else {
        panic!("get")
    };
    let rev = g.kvs()[0].mod_revision();
    let update = Txn::new()
        .when([Compare::mod_revision("obj", CompareOp::Equal, rev)])
        .and_then([TxnOp::put("obj", "v2", None)]);
    let r = c.txn(update).await?;
    assert!(r.succeeded());
    assert_eq!(r.header().map(|h| h.revision()), Some(rev + 1));
    Ok(())
}

/// A txn of Ranges only is answered without a log entry (as etcd's read-only txns), yet
/// always sees the latest acknowledged write, and keeps a Range's revision rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_txns_skip_the_log() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    for i in 0..5 {
        c.put("k", format!("v{i}"), None).await?;
    }
    let before = c.status().await?.raft_index();
    let mut last = 0;
    for i in 5..25 {
        last = c
            .put("k", format!("v{i}"), None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        let get = if i % 2 == 0 {
            GetOptions::new().with_serializable()
        } else {
            GetOptions::new()
        };
        let r = c
            .txn(
                Txn::new()
                    .when([Compare::version("k", CompareOp::Greater, 0)])
                    .and_then([
                        TxnOp::get("k", Some(get)),
                        TxnOp::get("k", Some(GetOptions::new().with_revision(last - 5))),
                    ])
                    .or_else([TxnOp::get("other", None)]),
            )
            .await?;
        assert!(r.succeeded());
        assert_eq!(r.header().map(|h| h.revision()), Some(last));
        let values: Vec<_> = r
            .op_responses()
            .iter()
            .map(|op| match op {
                TxnOpResponse::Get(g) => g.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            })
            .collect();
        let (now, older) = (format!("v{i}"), format!("v{}", i - 5));
        assert_eq!(values, [Some(now.into_bytes()), Some(older.into_bytes())]);
    }
    let after = c.status().await?.raft_index();
    // The 20 puts; the member may publish its client URLs once meanwhile.
    assert!((20..=21).contains(&(after - before)), "{before} -> {after}");
    let future = Txn::new().and_then([TxnOp::get(
        "k",
        Some(GetOptions::new().with_revision(last + 1)),
    )]);
    let e = c.txn(future).await.expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_use_etcd_codes_and_messages() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    c.put("k", "v", None).await?;
    c.put("k", "v2", None).await?;
    c.put("k", "v3", None).await?;
    let e = c
        .get("k", Some(GetOptions::new().with_revision(100)))
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision".into()
        )
    );
    c.compact(3, None).await?;
    let e = c
        .get("k", Some(GetOptions::new().with_revision(2)))
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted".into()
        )
    );
    let e = c.compact(2, None).await.expect_err("must fail");
    assert_eq!(status(e).0, Code::OutOfRange);
    let e = c.put("", "v", None).await.expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::InvalidArgument,
            "etcdserver: key is not provided".into()
        )
    );
    let e = c
        .put("k", "v", Some(PutOptions::new().with_lease(12345)))
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::NotFound,
            "etcdserver: requested lease not found".into()
        )
    );
    let e = c
        .put("missing", "", Some(PutOptions::new().with_ignore_value()))
        .await
        .expect_err("must fail");
    assert_eq!(
        status(e),
        (Code::InvalidArgument, "etcdserver: key not found".into())
    );
    let dup = Txn::new().and_then([TxnOp::put("a", "1", None), TxnOp::put("a", "2", None)]);
    let e = c.txn(dup).await.expect_err("must fail");
    assert_eq!(
        status(e),
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request".into()
        )
    );
    // The server keeps serving, and none of the refused writes landed.
    let r = c.get("k", None).await?;
    assert_eq!(r.header().map(|h| h.revision()), Some(4));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn physical_compaction_waits_and_keeps_latest() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    for i in 0..50 {
        c.put(format!("k{}", i % 5), format!("v{i}"), None).await?;
    }
    c.delete("k0", None).await?;
    let rev = c
        .get("k1", None)
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or_default();
    c.compact(
        rev,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await?;
    assert_eq!(
        s.server
            .node()
            .expect("running")
            .store
            .compactor()
            .finished(),
        rev
    );
    let r = c.get("k", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(r.count(), 4);
    let r = c
        .get(
            "k",
            Some(GetOptions::new().with_prefix().with_revision(rev)),
        )
        .await?;
    assert_eq!(
        r.count(),
        4,
        "reading at the compacted revision still works"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_fsyncs_and_get_unique_revisions() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let c = s.client().await?;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.put(format!("c/{i}"), "x", None)
                .await
                .map(|r| r.header().map(|h| h.revision()))
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await??.unwrap_or_default());
    }
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 200);
    assert_eq!(revs, (2..202).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_member_list() -> anyhow::Result<()> {
    let s = TestServer::start(&["--name", "solo"]).await?;
    let mut c = s.client().await?;
    c.put("a", "b", None).await?;
    let st = c.status().await?;
    assert!(st.version().starts_with("3.5."));
    let minor: u32 = st
        .version()
        .split('.')
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    assert!(minor >= 13, "kube-apiserver needs >= 3.5.13");
    assert!(st.db_size() > 0);
    // Raft: the initial membership, the leader's first (blank) entry, then the put.
    assert!(st.raft_index() >= 2, "{}", st.raft_index());
    // Applied includes the put; the log may hold one more entry (the member publishing its
    // client URLs) not yet applied.
    assert!(st.raft_applied_index() >= 2 && st.raft_applied_index() <= st.raft_index());
    assert!(st.raft_term() >= 1);
    let members = c.member_list().await?;
    assert_eq!(members.members().len(), 1);
    assert_eq!(members.members()[0].name(), "solo");
    assert_eq!(st.leader(), members.members()[0].id());
    c.defragment().await?;
    assert_eq!(c.get("a", None).await?.count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_kv_is_stable_and_checks_revisions() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    for i in 0..10 {
        c.put(format!("h{}", i % 3), format!("{i}"), None).await?;
    }
    let a = c.hash_kv(0).await?;
    let b = c.hash_kv(11).await?;
    assert_eq!(a.hash(), b.hash(), "revision 0 means the current one (11)");
    assert_ne!(c.hash_kv(5).await?.hash(), a.hash());
    c.compact(
        6,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await?;
    let after = c.hash_kv(0).await?;
    assert_ne!(
        after.hash(),
        a.hash(),
        "the compacted history is no longer hashed"
    );
    assert_eq!(after.compact_version(), 6);
    assert_eq!(c.hash_kv(0).await?.hash(), after.hash(), "stable");
    let e = c.hash_kv(5).await.expect_err("must fail");
    assert_eq!(status(e).0, Code::OutOfRange);
    let e = c.hash_kv(99).await.expect_err("must fail");
    assert_eq!(status(e).0, Code::OutOfRange);
    Ok(())
}

/// etcd's sizes: `dbSizeInUse` falls when a compaction drops old revisions; `dbSize` follows
/// once the member is defragmented (what the operator's defragmentation workflow keys on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_use_falls_after_a_compaction_and_the_size_after_defragment() -> anyhow::Result<()> {
    // A short Raft log, so that the values' history lives in the key space, not in the log.
    let s = TestServer::start(&["--snapshot-count", "100"]).await?;
    let mut c = s.client().await?;
    // 200 keys of 8 KiB written 5 times over (LZ4-resistant values): 8 MB of history.
    let mut last = 0;
    for round in 0..5u64 {
        for k in 0..200u64 {
            last = c
                .put(
                    format!("k{k:03}"),
                    metastore_testkit::noise(round * 200 + k, 8192),
                    None,
                )
                .await?
                .header()
                .map_or(0, |h| h.revision());
        }
    }
    c.defragment().await?; // everything in table files: a clean starting point
    let before = c.status().await?;
    assert!(
        before.raft_used_db_size() * 10 >= before.db_size() * 6,
        "in use {} of {}",
        before.raft_used_db_size(),
        before.db_size()
    );
    c.compact(
        last,
        Some(etcd_client::CompactionOptions::new().with_physical()),
    )
    .await?;
    let compacted = c.status().await?;
    assert!(
        compacted.raft_used_db_size() * 2 <= before.raft_used_db_size(),
        "in use {} after the compaction, {} before",
        compacted.raft_used_db_size(),
        before.raft_used_db_size()
    );
    c.defragment().await?;
    let after = c.status().await?;
    assert!(
        after.db_size() * 2 <= before.db_size(),
        "size {} after defragment, {} before",
        after.db_size(),
        before.db_size()
    );
    let got = c
        .get("k", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    assert_eq!(got.count(), 200);
    Ok(())
}
