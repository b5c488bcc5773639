//! Storage format 1 (CBOR) against format 2 (fixed binary): record encode/decode, and a range
//! scan over a RocksDB store written entirely in one format (criterion).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::apply::{apply, Command, NoLeases};
use metastore::auth::AuthStore;
use metastore::mvcc::{KeyRange, RangeOptions, Store, StoreOptions};
use metastore::storage::{codec, Engine, RocksEngine};
use metastore_proto::etcdserverpb::{request_op::Request, PutRequest, RequestOp, TxnRequest};
use metastore_proto::mvccpb::KeyValue;

fn kv(key_len: usize, val_len: usize) -> KeyValue {
    KeyValue {
        key: Bytes::from(vec![b'k'; key_len]),
        create_revision: 12345,
        mod_revision: 67890,
        version: 3,
        value: Bytes::from(vec![b'v'; val_len]),
        lease: 0,
    }
}

fn codec_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for (k, v) in [(8usize, 256usize), (64, 1024)] {
        let rec = kv(k, v);
        g.throughput(Throughput::Elements(1));
        for format in [codec::FORMAT_V1, codec::FORMAT_V2] {
            let mut buf = Vec::new();
            codec::encode(format, &rec, &mut buf).expect("encode");
            let size = format!("{k}B-{v}B");
            g.bench_with_input(
                BenchmarkId::new(format!("encode/format{format}"), &size),
                &rec,
                |b, rec| {
                    let mut out = Vec::with_capacity(buf.len());
                    b.iter(|| {
                        out.clear();
                        codec::encode(format, rec, &mut out).expect("encode");
                        std::hint::black_box(&out);
                    })
                },
            );
            g.bench_with_input(
                BenchmarkId::new(format!("decode/format{format}"), &size),
                &buf,
                |b, buf| b.iter(|| std::hint::black_box(codec::decode(buf))),
            );
            g.bench_with_input(
                BenchmarkId::new(format!("peek/format{format}"), &size),
                &buf,
                |b, buf| b.iter(|| std::hint::black_box(codec::peek_mod_version(buf))),
            );
        }
    }
    g.finish();
}

const SCAN_KEYS: usize = 10_000;

/// A RocksDB store of [`SCAN_KEYS`] keys, each written twice (so a scan also skips an older
/// version), every record in `format`.
fn store(dir: &std::path::Path, format: u8) -> Arc<Store> {
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(dir, &Default::default()).expect("rocksdb"));
    let store = Store::open(
        engine,
        StoreOptions {
            write_format: format,
            fsync: false,
            ..Default::default()
        },
    )
    .expect("store");
    let auth = AuthStore::open_default(store.engine().clone()).expect("auth store");
    let mut a = store.applier().expect("applier");
    let mut index = 0;
    for round in 0..2 {
        for start in (0..SCAN_KEYS).step_by(1000) {
            index += 1;
            let ops = (start..start + 1000)
                .map(|i| RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: format!("/registry/pods/ns/pod-{i:06}").into_bytes().into(),
                        value: vec![b'x'; 200 + round].into(),
                        ..Default::default()
                    })),
                })
                .collect();
            let cmd = Command::Txn(TxnRequest {
                success: ops,
                ..Default::default()
            });
            apply(&mut a, index, &cmd, &NoLeases, &auth).expect("apply");
        }
    }
    a.publish().expect("publish");
    store
}

fn scan_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_scan");
    g.throughput(Throughput::Elements(SCAN_KEYS as u64));
    g.sample_size(20);
    for format in [codec::FORMAT_V1, codec::FORMAT_V2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = store(dir.path(), format);
        let all = KeyRange::From(b"/registry/".to_vec());
        g.bench_function(BenchmarkId::new("all", format!("format{format}")), |b| {
            b.iter(|| {
                let r = s.range(&all, RangeOptions::default()).expect("range");
                assert_eq!(r.kvs.len(), SCAN_KEYS);
                std::hint::black_box(r)
            })
        });
        g.bench_function(
            BenchmarkId::new("count_only", format!("format{format}")),
            |b| {
                b.iter(|| {
                    let opts = RangeOptions {
                        count_only: true,
                        ..Default::default()
                    };
                    std::hint::black_box(s.range(&all, opts).expect("range"))
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, codec_bench, scan_bench);
criterion_main!(benches);
