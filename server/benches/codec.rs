//! Format-2 record codec: encode and decode throughput; the encoding of a kept Range result
//! (criterion).

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::server::range_stream::{
    encode_kv_field, keep_encoded, kv_field_len_of, kv_message_len,
};
use metastore::storage::codec::{self, KvRef};
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

/// Encodes `kvs` into a fresh buffer as the sizing pass of a unary Range keeps them:
/// each key-value's field length is summed and `append` writes it (given its message length).
fn kept_answer(kvs: &[KeyValue], append: impl Fn(&mut BytesMut, &KvRef<'_>, usize)) -> Bytes {
    let mut kept = BytesMut::new();
    let mut len = 0;
    for kv in kvs {
        let kv = KvRef::of(kv);
        let message_len = kv_message_len(&kv);
        len += kv_field_len_of(message_len);
        append(&mut kept, &kv, message_len);
    }
    std::hint::black_box(len);
    kept.freeze()
}

/// A 1,000-key answer of 8 B keys and 256 B values (~290 KB) encoded into a fresh buffer, as
/// the sizing pass of a unary Range keeps it: doubling all the way against `keep_encoded`.
fn range_keep(c: &mut Criterion) {
    let kvs: Vec<KeyValue> = (0..1000)
        .map(|i| KeyValue {
            key: Bytes::from(format!("{i:08}")),
            ..kv(8, 256)
        })
        .collect();
    let mut g = c.benchmark_group("range_keep");
    g.throughput(Throughput::Elements(kvs.len() as u64));
    g.bench_function("doubling/1000x256B", |b| {
        b.iter(|| kept_answer(&kvs, |kept, kv, _| encode_kv_field(kv, kept)))
    });
    g.bench_function("keep_encoded/1000x256B", |b| {
        b.iter(|| {
            kept_answer(&kvs, |kept, kv, message_len| {
                keep_encoded(kept, kv, message_len)
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench, range_keep);
criterion_main!(benches);
