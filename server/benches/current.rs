//! A range at the current revision over keys with several versions each, read from the
//! `kv_current` table against the key history alone, with the versions in the memtable and in
//! table files (criterion; docs/PERFORMANCE.md, session 50).

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::mvcc::{KeyRange, RangeOptions, Store, StoreOptions};
use metastore::storage::rocks::RocksOptions;
use metastore::storage::{Engine, RocksEngine};

const KEYS: usize = 1_000;

/// A RocksDB store of [`KEYS`] keys of 256-byte values, each written `versions` times, with or
/// without the `kv_current` table.
fn store(dir: &std::path::Path, versions: usize, current_table: bool) -> Arc<Store> {
    let opts = RocksOptions {
        current_table: Some(current_table),
        ..Default::default()
    };
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(dir, &opts).expect("rocksdb"));
    let store = Store::open(
        engine,
        StoreOptions {
            fsync: false,
            ..Default::default()
        },
    )
    .expect("store");
    let mut index = 0;
    for round in 0..versions {
        let mut a = store.applier().expect("applier");
        for i in 0..KEYS {
            index += 1;
            let mut t = a.begin().expect("begin");
            let value = vec![b'a' + round as u8; 256];
            t.put(Bytes::from(format!("{i:08}")), Bytes::from(value), 0)
                .expect("put");
            a.commit(t, index).expect("commit");
        }
        a.publish().expect("publish");
    }
    store
}

fn ranges(c: &mut Criterion) {
    let mut g = c.benchmark_group("range_current");
    g.throughput(Throughput::Elements(KEYS as u64));
    g.sample_size(20);
    let all = KeyRange::Between(b"00000000".to_vec(), b"00001000".to_vec());
    // Versions in the memtable, where the table's overwritten entries are still there (RocksDB's
    // cursor steps over them), and in table files after a flush and compaction, which keep
    // only the newest of each key in the table and every version in the history.
    for (versions, flushed) in [(1, false), (4, false), (16, false), (16, true)] {
        for current_table in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let s = store(dir.path(), versions, current_table);
            if flushed {
                s.engine().defragment().expect("flush and compact");
            }
            let table = if current_table { "table" } else { "history" };
            let place = if flushed { "-flushed" } else { "" };
            let id = format!("{versions}-versions{place}/{table}");
            g.bench_function(BenchmarkId::new("1000-keys", &id), |b| {
                b.iter(|| {
                    let r = s.range(&all, RangeOptions::default()).expect("range");
                    assert_eq!(r.kvs.len(), KEYS);
                    std::hint::black_box(r)
                })
            });
            g.bench_function(BenchmarkId::new("count-only", &id), |b| {
                let opts = RangeOptions {
                    count_only: true,
                    ..Default::default()
                };
                b.iter(|| std::hint::black_box(s.range(&all, opts).expect("range")))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, ranges);
criterion_main!(benches);
