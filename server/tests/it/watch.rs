use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchResponse, WatchStream};

use crate::common::TestServer;

async fn next(s: &mut WatchStream) -> anyhow::Result<WatchResponse> {
    tokio::time::timeout(Duration::from_secs(5), s.message())
        .await??
        .ok_or_else(|| anyhow::anyhow!("watch stream ended"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_history_live_prev_kv_cancel() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    c.put("w/a", "1", None).await?; // 2
    c.put("w/a", "2", None).await?; // 3
    let opts = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_start_revision(2);
    let mut stream = c.watch("w/", Some(opts)).await?;
    let created = next(&mut stream).await?;
    assert!(created.created());
    let mut events = Vec::new();
    c.delete("w/a", None).await?; // 4
    c.put("w/b", "x", None).await?; // 5
    while events.len() < 4 {
        let r = next(&mut stream).await?;
        assert_eq!(r.watch_id(), created.watch_id());
        events.extend(r.events().iter().map(|e| {
            let kv = e.kv().expect("kv");
            (
                e.event_type(),
                kv.key_str().unwrap_or_default().to_string(),
                kv.mod_revision(),
                e.prev_kv()
                    .map(|p| p.value_str().unwrap_or_default().to_string()),
            )
        }));
    }
    assert_eq!(
        events,
        vec![
            (EventType::Put, "w/a".into(), 2, None),
            (EventType::Put, "w/a".into(), 3, Some("1".into())),
            (EventType::Delete, "w/a".into(), 4, Some("2".into())),
            (EventType::Put, "w/b".into(), 5, None),
        ]
    );
    stream.request_progress().await?;
    let progress = next(&mut stream).await?;
    assert_eq!(progress.watch_id(), -1, "stream-wide progress (etcd 3.5)");
    assert_eq!(progress.header().map(|h| h.revision()), Some(5));
    stream.cancel(created.watch_id()).await?;
    let canceled = next(&mut stream).await?;
    assert!(canceled.canceled());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_canceled() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    for i in 0..5 {
        c.put("k", format!("{i}"), None).await?;
    }
    c.compact(4, None).await?;
    let mut stream = c
        .watch("k", Some(WatchOptions::new().with_start_revision(2)))
        .await?;
    assert!(next(&mut stream).await?.created());
    let r = next(&mut stream).await?;
    assert!(r.canceled());
    assert_eq!(r.compact_revision(), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inverted_range_is_refused() -> anyhow::Result<()> {
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let mut stream = c
        .watch("b", Some(WatchOptions::new().with_range("a")))
        .await?;
    let r = next(&mut stream).await?;
    assert!(r.created() && r.canceled());
    assert_eq!(r.cancel_reason(), "mvcc: watcher range is empty");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_stream_keeps_delivering_events() -> anyhow::Result<()> {
    use metastore_proto::etcdserverpb::watch_client::WatchClient;
    use metastore_proto::etcdserverpb::{watch_request::RequestUnion, WatchCreateRequest};
    let s = TestServer::start(&[]).await?;
    let mut c = s.client().await?;
    let mut raw = WatchClient::connect(format!("http://{}", s.addr())).await?;
    let create = metastore_proto::etcdserverpb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: "half".into(),
            ..Default::default()
        })),
    };
    // The request stream ends after its one request: the client half-closes, as etcd's
    // clients may, and still expects the events (etcd keeps such a stream open).
    let mut stream = raw
        .watch(futures::stream::iter([create]))
        .await?
        .into_inner();
    let created = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("created");
    assert!(created.created);
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.put("half", "v", None).await?;
    let ev = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("the stream stays open after the half-close");
    assert_eq!(ev.events.len(), 1);
    Ok(())
}

/// `fragment`: events over `--max-request-bytes` come in several responses, each but the last
/// marked `fragment`, each within the limit; a watcher that did not ask gets them in one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_watchers_get_large_deliveries_in_pieces() -> anyhow::Result<()> {
    use metastore_proto::etcdserverpb::watch_client::WatchClient;
    use metastore_proto::etcdserverpb::{watch_request::RequestUnion, WatchCreateRequest};
    use prost::Message;
    const LIMIT: usize = 4096;
    let s = TestServer::start(&["--max-request-bytes", &LIMIT.to_string()]).await?;
    let mut c = s.client().await?;
    for i in 0..20 {
        c.put(format!("f/{i:02}"), "a".repeat(1000), None).await?; // 2..=21
    }
    c.put("f/00", "b".repeat(1000), None).await?; // 22, prev_kv "a..."
    let mut raw = WatchClient::connect(format!("http://{}", s.addr())).await?;
    let create = |watch_id, fragment| metastore_proto::etcdserverpb::WatchRequest {
        request_union: Some(RequestUnion::CreateRequest(WatchCreateRequest {
            key: "f/".into(),
            range_end: "f0".into(),
            start_revision: 2,
            watch_id,
            fragment,
            prev_kv: fragment,
            ..Default::default()
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(create(1, true)).await?;
    tx.send(create(2, false)).await?;
    let mut stream = raw
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut pieces: std::collections::HashMap<i64, Vec<_>> = Default::default();
    let done =
        |p: &std::collections::HashMap<i64, Vec<metastore_proto::etcdserverpb::WatchResponse>>| {
            [1, 2].iter().all(|id| {
                p.get(id)
                    .is_some_and(|v| v.iter().map(|r| r.events.len()).sum::<usize>() == 21)
            })
        };
    while !done(&pieces) {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await??
            .expect("stream open");
        if !r.events.is_empty() {
            pieces.entry(r.watch_id).or_default().push(r);
        }
    }
    let fragmented = &pieces[&1];
    assert!(fragmented.len() >= 5, "{} pieces", fragmented.len());
    for (i, r) in fragmented.iter().enumerate() {
        assert_eq!(r.fragment, i + 1 < fragmented.len(), "piece {i}");
        let events: usize = r.events.iter().map(|e| e.encoded_len() + 3).sum();
        assert!(events <= LIMIT, "piece {i}: {events} bytes");
    }
    let revs = |rs: &[metastore_proto::etcdserverpb::WatchResponse]| -> Vec<i64> {
        rs.iter()
            .flat_map(|r| &r.events)
            .map(|e| e.kv.as_ref().map_or(0, |kv| kv.mod_revision))
            .collect()
    };
    assert_eq!(revs(fragmented), (2..=22).collect::<Vec<_>>());
    let last = fragmented
        .last()
        .and_then(|r| r.events.last())
        .expect("event");
    assert_eq!(
        last.prev_kv.as_ref().map(|p| p.value.len()),
        Some(1000),
        "prev_kv where asked"
    );
    let whole = &pieces[&2];
    assert_eq!(whole.len(), 1, "no fragments unless asked");
    assert!(!whole[0].fragment);
    assert_eq!(revs(whole), (2..=22).collect::<Vec<_>>());
    assert!(whole[0].events.iter().all(|e| e.prev_kv.is_none()));
    Ok(())
}
