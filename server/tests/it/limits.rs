use std::time::Duration;

use etcd_client::{Txn, TxnOp};
use metastore_proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, RangeRequest,
    WatchCancelRequest, WatchCreateRequest, WatchRequest, WatchResponse,
};
use tonic::transport::Channel;
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

/// A raw watch stream on `channel`: the request sender and the response stream.
async fn watch_stream(
    channel: tonic::transport::Channel,
) -> anyhow::Result<(
    tokio::sync::mpsc::Sender<WatchRequest>,
    tonic::Streaming<WatchResponse>,
)> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let s = WatchClient::new(channel)
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, s))
}

fn create(key: &str) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: key.as_bytes().to_vec().into(),
                ..Default::default()
            },
        )),
    }
}

async fn next(s: &mut tonic::Streaming<WatchResponse>) -> anyhow::Result<WatchResponse> {
    tokio::time::timeout(Duration::from_secs(10), s.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("watch stream ended"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_per_stream_are_limited_and_the_stream_goes_on() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-watchers-per-stream", "3"]).await?;
    let channel = Channel::from_shared(format!("http://{}", s.addr()))?
        .connect()
        .await?;
    let (tx, mut rx) = watch_stream(channel.clone()).await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        tx.send(create(&format!("k{i}"))).await?;
        let r = next(&mut rx).await?;
        assert!(r.created && !r.canceled, "{r:?}");
        ids.push(r.watch_id);
    }
    tx.send(create("k3")).await?;
    let refused = next(&mut rx).await?;
    assert!(refused.created && refused.canceled, "{refused:?}");
    assert!(
        refused.cancel_reason.contains("too many watchers"),
        "{}",
        refused.cancel_reason
    );
    // The stream's own watchers still deliver events.
    let mut c = s.client().await?;
    c.put("k1", "v", None).await?;
    let ev = next(&mut rx).await?;
    assert_eq!((ev.watch_id, ev.events.len()), (ids[1], 1));
    // A cancel frees a slot; another stream has its own limit.
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CancelRequest(
            WatchCancelRequest { watch_id: ids[0] },
        )),
    })
    .await?;
    assert!(next(&mut rx).await?.canceled);
    tx.send(create("k4")).await?;
    let r = next(&mut rx).await?;
    assert!(r.created && !r.canceled, "{r:?}");
    let (tx2, mut rx2) = watch_stream(channel).await?;
    tx2.send(create("k5")).await?;
    assert!(!next(&mut rx2).await?.canceled);
    Ok(())
}

/// `--max-concurrent-streams` (etcd's flag) caps one connection's open calls: a further call
/// waits until one ends; another connection is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_connection_are_limited() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-concurrent-streams", "2"]).await?;
    let url = format!("http://{}", s.addr());
    let channel = Channel::from_shared(url.clone())?.connect().await?;
    let mut open = Vec::new();
    for i in 0..2 {
        let (tx, mut rx) = watch_stream(channel.clone()).await?;
        tx.send(create(&format!("k{i}"))).await?;
        assert!(next(&mut rx).await?.created);
        open.push((tx, rx));
    }
    // The third call on this connection cannot start...
    let mut kv = KvClient::new(channel.clone());
    let range = RangeRequest {
        key: b"k0".to_vec().into(),
        ..Default::default()
    };
    let waiting = tokio::time::timeout(Duration::from_millis(500), kv.range(range.clone())).await;
    assert!(waiting.is_err(), "a third stream must wait: {waiting:?}");
    // ...while a new connection is served at once.
    let other = Channel::from_shared(url)?.connect().await?;
    KvClient::new(other).range(range.clone()).await?;
    // One stream ends: the call goes through.
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(10), kv.range(range)).await??;
    Ok(())
}

/// With `--max-concurrent-requests 1`, a burst of concurrent calls gets some refused with
/// etcd's `too many requests` (ResourceExhausted); the server stays up and serves after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_beyond_the_limit_are_refused() -> anyhow::Result<()> {
    let s = TestServer::start(&["--max-concurrent-requests", "1"]).await?;
    let mut c = s.client().await?;
    for i in 0..200 {
        c.put(format!("k/{i:03}"), vec![b'v'; 2048], None).await?;
    }
    let url = format!("http://{}", s.addr());
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(KvClient::new(
            Channel::from_shared(url.clone())?.connect().await?,
        ));
    }
    let (mut ok, mut refused) = (0, 0);
    for _round in 0..20 {
        let calls = clients.iter().map(|kv| {
            let mut kv = kv.clone();
            async move {
                kv.range(RangeRequest {
                    key: b"k/".to_vec().into(),
                    range_end: b"k0".to_vec().into(),
                    ..Default::default()
                })
                .await
            }
        });
        for r in futures::future::join_all(calls).await {
            match r {
                Ok(r) => {
                    assert_eq!(r.into_inner().kvs.len(), 200);
                    ok += 1;
                }
                Err(e) => {
                    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                    assert_eq!(e.message(), "etcdserver: too many requests");
                    refused += 1;
                }
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    // One at a time, every call is served.
    for _ in 0..20 {
        assert_eq!(c.get("k/000", None).await?.count(), 1);
    }
    Ok(())
}
