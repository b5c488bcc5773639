//! Format-2 record codec: encode and decode throughput (criterion).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::storage::codec;
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

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("format2");
    for (k, v) in [(8usize, 256usize), (64, 1024)] {
        let rec = kv(k, v);
        let mut buf = Vec::new();
        codec::encode_v2(&rec, &mut buf);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(
            BenchmarkId::new("encode", format!("{k}B/{v}B")),
            &rec,
            |b, rec| {
                let mut out = Vec::with_capacity(buf.len());
                b.iter(|| {
                    out.clear();
                    codec::encode_v2(rec, &mut out);
                    std::hint::black_box(&out);
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("decode", format!("{k}B/{v}B")),
            &buf,
            |b, buf| b.iter(|| std::hint::black_box(codec::decode(buf))),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
