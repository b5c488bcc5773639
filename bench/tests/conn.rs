//! `Conn`, the load tool's gRPC connection, against a MetaStore in this process: unary calls
//! and their status, answers larger than both receive windows, a streaming call, and the
//! endpoints it refuses.

mod common;

use std::error::Error as StdError;

use bytes::Bytes;
use metastore_bench::conn::Conn;
use metastore_bench::error::Error;
use metastore_proto::etcdserverpb::{
    kv_client::KvClient, watch_request, PutRequest, RangeRequest, WatchCreateRequest, WatchRequest,
};
use tokio_stream::StreamExt;

type TestResult = std::result::Result<(), Box<dyn StdError>>;

fn url(server: &metastore::server::Server) -> String {
    format!("http://{}", server.client_addrs()[0])
}

/// A watch request creating a watcher on `key` (up to `range_end`, when not empty).
fn create(key: &'static [u8], range_end: &'static [u8]) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: Bytes::from_static(key),
                range_end: Bytes::from_static(range_end),
                ..Default::default()
            },
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_and_their_errors_go_through() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = common::metastore(&dir).await?;
    let conn = Conn::connect(&url(&server)).await?;
    let mut kv = KvClient::new(conn.clone());
    let put = kv
        .put(PutRequest {
            key: Bytes::from_static(b"k"),
            value: Bytes::from_static(b"v1"),
            ..Default::default()
        })
        .await?
        .into_inner();
    // A second stub on a clone shares the connection and sees the write.
    let got = KvClient::new(conn)
        .range(RangeRequest {
            key: Bytes::from_static(b"k"),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
    assert_eq!(&got.kvs[0].value[..], b"v1");
    assert_eq!(
        got.kvs[0].mod_revision,
        put.header.map(|h| h.revision).unwrap_or(0)
    );
    // The server's gRPC status arrives whole: etcd's code and message.
    let future = kv
        .range(RangeRequest {
            key: Bytes::from_static(b"k"),
            revision: 1_000,
            ..Default::default()
        })
        .await;
    let status = future.err().ok_or("a future revision was served")?;
    assert_eq!(status.code(), tonic::Code::OutOfRange);
    assert_eq!(
        status.message(),
        "etcdserver: mvcc: required revision is a future revision"
    );
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_larger_than_the_receive_windows_are_read_whole() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = common::metastore(&dir).await?;
    let mut kv = KvClient::new(Conn::connect(&url(&server)).await?);
    // 384 values of 8 KiB: a 3 MiB answer, over the stream's 2 MiB window; read twice,
    // over the connection's 5 MiB. Without the window given back, the second would stall.
    let value = Bytes::from(vec![b'x'; 8 << 10]);
    for i in 0..384u32 {
        kv.put(PutRequest {
            key: Bytes::from(format!("big/{i:04}")),
            value: value.clone(),
            ..Default::default()
        })
        .await?;
    }
    for _ in 0..2 {
        let all = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            kv.range(RangeRequest {
                key: Bytes::from_static(b"big/"),
                range_end: Bytes::from_static(b"big0"),
                ..Default::default()
            }),
        )
        .await??
        .into_inner();
        assert_eq!(all.kvs.len(), 384);
        assert!(all.kvs.iter().all(|kv| kv.value == value));
    }
    server.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_call_keeps_sending_after_its_first_message() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = common::metastore(&dir).await?;
    let conn = Conn::connect(&url(&server)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(create(b"a", b"")).await?;
    let mut watch = metastore_proto::etcdserverpb::watch_client::WatchClient::new(conn.clone())
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = watch.next().await.ok_or("stream ended")??;
    assert!(first.created);
    // The second watcher is asked for after the call started: the body goes on streaming.
    tx.send(create(b"b", b"")).await?;
    let second = watch.next().await.ok_or("stream ended")??;
    assert!(second.created);
    assert_ne!(second.watch_id, first.watch_id);
    KvClient::new(conn)
        .put(PutRequest {
            key: Bytes::from_static(b"b"),
            value: Bytes::from_static(b"1"),
            ..Default::default()
        })
        .await?;
    let event = watch.next().await.ok_or("stream ended")??;
    assert_eq!(event.watch_id, second.watch_id);
    assert_eq!(event.events.len(), 1);
    drop((watch, tx));
    server.shutdown().await;
    Ok(())
}

/// The watch workloads' reader (`lean::watch`): events larger than an HTTP/2 DATA frame, so
/// that most messages are split between frames, come out whole and in order, with their
/// stamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lean_watch_reader_reads_events_split_between_frames() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = common::metastore(&dir).await?;
    let conn = Conn::connect(&url(&server)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(create(b"k", b"l")).await?;
    let mut watch = metastore_bench::lean::watch(conn.clone(), rx).await?;
    let created = watch.message().await?.ok_or("stream ended")?;
    assert!(created.created);
    // 7 KiB values: a 16 KiB frame ends inside every second or third event.
    let mut kv = KvClient::new(conn);
    for i in 0..40u64 {
        let mut value = i.to_be_bytes().to_vec();
        value.resize(7 << 10, b'v');
        kv.put(PutRequest {
            key: Bytes::from(format!("k{i}")),
            value: Bytes::from(value),
            ..Default::default()
        })
        .await?;
    }
    let mut stamps = Vec::new();
    while stamps.len() < 40 {
        let r = watch.message().await?.ok_or("stream ended")?;
        assert_eq!(r.watch_id, created.watch_id);
        stamps.extend(
            r.events
                .iter()
                .map(|e| e.kv.as_ref().and_then(|kv| kv.stamp)),
        );
    }
    assert_eq!(stamps, (0..40u64).map(Some).collect::<Vec<_>>());
    drop((watch, tx));
    server.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn endpoints_it_cannot_use_are_refused_with_their_reason() -> TestResult {
    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    let refused = Conn::connect(&format!("http://{addr}")).await;
    assert!(matches!(refused, Err(Error::Connect { .. })), "{refused:?}");
    // An IPv6 literal: a refusal from that address, not a failed lookup of "[::1]".
    let v6 = Conn::connect(&format!("http://[::1]:{}", addr.port())).await;
    let message = v6.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!message.contains("lookup"), "{message}");
    let tls = Conn::connect("https://127.0.0.1:2379").await;
    let message = tls.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("only http://"), "{message}");
    Ok(())
}
