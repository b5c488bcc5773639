//! `KV.RangeStream` against the unary `KV.Range` (which, over a key range, is itself sent
//! as it is produced): merging the stream's messages must give exactly the Range response,
//! for every option, on both engines; errors are Range's; compaction of the pinned revision
//! mid-stream ends the stream with etcd's compacted error; concurrent large ranges are
//! admitted against `--max-range-memory-bytes`.

use metastore_proto::etcdserverpb::kv_client::KvClient;
use metastore_proto::etcdserverpb::{RangeRequest, RangeResponse};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::TestServer;

pub async fn kv_client(addr: std::net::SocketAddr) -> anyhow::Result<KvClient<Channel>> {
    Ok(KvClient::connect(format!("http://{addr}"))
        .await?
        .max_decoding_message_size(usize::MAX))
}

/// Every message of a RangeStream merged (protobuf Merge), and how many there were.
pub async fn range_stream(
    kv: &mut KvClient<Channel>,
    r: RangeRequest,
) -> Result<(RangeResponse, usize), Status> {
    let mut stream = kv.range_stream(r).await?.into_inner();
    let mut merged = RangeResponse::default();
    let mut n = 0;
    while let Some(msg) = stream.message().await? {
        let part = msg.range_response.unwrap_or_default();
        merged
            .merge(part.encode_to_vec().as_slice())
            .map_err(|e| Status::internal(e.to_string()))?;
        n += 1;
    }
    Ok((merged, n))
}

async fn range(kv: &mut KvClient<Channel>, r: RangeRequest) -> Result<RangeResponse, Status> {
    Ok(kv.range(r).await?.into_inner())
}

/// A history with several versions, deletions, keys outside the prefix and values large
/// enough that a full range takes several stream messages and is read twice by a unary Range
/// (past `KEEP_BYTES`, 512 KiB), while the narrower ranges are read once. Returns a revision
/// in the middle.
async fn load(c: &mut etcd_client::Client) -> anyhow::Result<i64> {
    for i in 0..60u32 {
        let size = if i % 5 == 0 {
            48 * 1024
        } else {
            (i as usize * 37) % 300
        };
        let value: Vec<u8> = (0..size).map(|j| (i as usize * 31 + j) as u8).collect();
        c.put(format!("k/{i:03}"), value, None).await?;
    }
    c.put("other/a", "x", None).await?;
    let mid = c
        .get("k/000", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    for i in (0..60u32).step_by(3) {
        c.put(format!("k/{i:03}"), format!("second-{}", 60 - i), None)
            .await?;
    }
    for i in (0..60u32).step_by(7) {
        c.delete(format!("k/{i:03}"), None).await?;
    }
    for i in (0..60u32).step_by(14) {
        c.put(format!("k/{i:03}"), "reborn", None).await?;
    }
    Ok(mid)
}

/// A deterministic spread over every option: each key range × limit × order × target,
/// with the other options varied by a small generator.
fn cases(mid: i64) -> Vec<RangeRequest> {
    let ranges: [(&[u8], &[u8]); 5] = [
        (b"k/", b"k0"),
        (b"\0", b"\0"),
        (b"k/010", b"k/030"),
        (b"k/005", b""),
        (b"zz", b"\0"),
    ];
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let mut out = Vec::new();
    for (key, end) in ranges {
        for limit in [0, 1, 7, 1000] {
            for order in 0..3 {
                for target in 0..5 {
                    let filter = next(5);
                    out.push(RangeRequest {
                        key: key.to_vec().into(),
                        range_end: end.to_vec().into(),
                        limit,
                        sort_order: order,
                        sort_target: target,
                        keys_only: next(3) == 0,
                        count_only: next(6) == 0,
                        serializable: next(2) == 0,
                        revision: if next(3) == 0 { mid } else { 0 },
                        min_mod_revision: if filter == 1 { mid } else { 0 },
                        max_mod_revision: if filter == 2 { mid + 10 } else { 0 },
                        min_create_revision: if filter == 3 { mid - 30 } else { 0 },
                        max_create_revision: if filter == 4 { mid - 20 } else { 0 },
                    });
                }
            }
        }
    }
    out
}

async fn stream_equals_range(engine: &str) -> anyhow::Result<()> {
    let s = TestServer::start(&["--engine", engine]).await?;
    let mut c = s.client().await?;
    let mid = load(&mut c).await?;
    let mut kv = kv_client(s.addr()).await?;
    let mut most_messages = 0;
    let cases = cases(mid);
    for r in &cases {
        let unary = range(&mut kv, r.clone()).await?;
        let (merged, n) = range_stream(&mut kv, r.clone()).await?;
        assert_eq!(merged, unary, "{engine}: {r:?}");
        most_messages = most_messages.max(n);
    }
    // The full range took several messages, so merging was really exercised.
    assert!(most_messages >= 2, "at most {most_messages} message(s)");
    println!(
        "{engine}: {} cases, up to {most_messages} messages",
        cases.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn range_stream_equals_range_memory() -> anyhow::Result<()> {
    stream_equals_range("memory").await
}

#[tokio::test(flavor = "multi_thread")]
async fn range_stream_equals_range_rocksdb() -> anyhow::Result<()> {
    stream_equals_range("rocksdb").await
}

#[tokio::test(flavor = "multi_thread")]
async fn range_stream_errors_are_range_errors() -> anyhow::Result<()> {
    let s = TestServer::start(&["--engine", "memory"]).await?;
    let mut c = s.client().await?;
    for i in 0..5 {
        c.put(format!("e/{i}"), "v", None).await?;
    }
    c.compact(4, None).await?;
    let bad = [
        RangeRequest::default(), // no key
        RangeRequest {
            key: "e/".into(),
            range_end: "e0".into(),
            revision: 1000,
            ..Default::default()
        },
        RangeRequest {
            key: "e/".into(),
            range_end: "e0".into(),
            revision: 2,
            ..Default::default()
        },
        RangeRequest {
            key: "e/".into(),
            range_end: "e0".into(),
            sort_order: 9,
            ..Default::default()
        },
        RangeRequest {
            key: "e/".into(),
            range_end: "e0".into(),
            sort_target: 9,
            serializable: true,
            ..Default::default()
        },
    ];
    let mut kv = kv_client(s.addr()).await?;
    for r in bad {
        let a = range(&mut kv, r.clone())
            .await
            .expect_err("range must fail");
        let b = range_stream(&mut kv, r.clone())
            .await
            .expect_err("stream must fail");
        assert_eq!((a.code(), a.message()), (b.code(), b.message()), "{r:?}");
        assert_ne!(a.code(), Code::Ok);
    }
    Ok(())
}

/// Puts `n` keys `prefix/NNNNN` of `size` bytes, 100 per transaction.
pub async fn load_many(
    c: &mut etcd_client::Client,
    prefix: &str,
    n: usize,
    size: usize,
) -> anyhow::Result<()> {
    use etcd_client::{Txn, TxnOp};
    let value = vec![b'v'; size];
    for start in (0..n).step_by(100) {
        let ops: Vec<TxnOp> = (start..(start + 100).min(n))
            .map(|i| TxnOp::put(format!("{prefix}/{i:07}"), value.clone(), None))
            .collect();
        c.txn(Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_mid_stream_ends_it_with_compacted() -> anyhow::Result<()> {
    let s = TestServer::start(&["--engine", "memory"]).await?;
    let mut c = s.client().await?;
    // 12 MB: far more than the stream's queue and HTTP/2's flow-control windows hold.
    load_many(&mut c, "c", 1500, 8 * 1024).await?;
    let mut kv = kv_client(s.addr()).await?;
    let mut stream = kv
        .range_stream(RangeRequest {
            key: "c/".into(),
            range_end: "c0".into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first message");
    let mut received = first.range_response.map_or(0, |r| r.kvs.len());
    let rev = c
        .put("later", "x", None)
        .await?
        .header()
        .map_or(0, |h| h.revision());
    c.compact(rev, None).await?;
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => received += m.range_response.map_or(0, |r| r.kvs.len()),
            Ok(None) => anyhow::bail!("the stream ended normally after {received} keys"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::OutOfRange);
    assert_eq!(
        err.message(),
        "etcdserver: mvcc: required revision has been compacted"
    );
    assert!(received < 1500, "{received}");
    // A new stream, at the current revision, is whole.
    let (merged, _) = range_stream(
        &mut kv,
        RangeRequest {
            key: "c/".into(),
            range_end: "c0".into(),
            keys_only: true,
            ..Default::default()
        },
    )
    .await?;
    assert_eq!(merged.kvs.len(), 1500);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_large_ranges_are_admitted_against_the_budget() -> anyhow::Result<()> {
    // 8 MiB: one response window (4 x (256 KiB + 1.5 MiB)) at a time.
    let budget: u64 = 8 << 20;
    let s = TestServer::start(&[
        "--engine",
        "memory",
        "--max-range-memory-bytes",
        &budget.to_string(),
    ])
    .await?;
    let mut c = s.client().await?;
    load_many(&mut c, "b", 2500, 4 * 1024).await?; // 10 MB
    let all = RangeRequest {
        key: "b/".into(),
        range_end: "b0".into(),
        ..Default::default()
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..8 {
        let mut kv = kv_client(s.addr()).await?;
        let r = all.clone();
        tasks.spawn(async move {
            let n = if i % 2 == 0 {
                range(&mut kv, r).await?.kvs.len()
            } else {
                range_stream(&mut kv, r).await?.0.kvs.len()
            };
            Ok::<_, Status>(n)
        });
    }
    while let Some(done) = tasks.join_next().await {
        assert_eq!(done??, 2500, "every queued range completes");
    }
    // A sorted result larger than the whole budget: refused at once, clearly.
    let mut kv = kv_client(s.addr()).await?;
    let sorted = RangeRequest {
        sort_order: 2,
        sort_target: 4,
        ..all.clone()
    };
    for e in [
        range(&mut kv, sorted.clone()).await.expect_err("too large"),
        range_stream(&mut kv, sorted).await.expect_err("too large"),
    ] {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("--max-range-memory-bytes"),
            "{}",
            e.message()
        );
    }
    // The server is still up and the whole budget is free again.
    assert_eq!(range(&mut kv, all).await?.count, 2500);
    let node = s.server.node().expect("running");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while node.range_budget.available() != node.range_budget.total() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "budget not released");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}
