//! The Raft log's synced append (`raft::wal`): one write of a group's entries and its sync,
//! through the page cache and `fdatasync` against direct I/O with `RWF_DSYNC`, at the sizes
//! of one put, a put-16c group and a put-256c group (criterion; the disk of the temporary
//! directory, so `TMPDIR` chooses it).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use metastore::raft::wal::{Record, Wal, WalOptions};

/// Entries are purged (and their segments deleted) after this many bytes, outside the timing.
const PURGE_BYTES: usize = 32 << 20;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("wal_synced_write");
    g.measurement_time(Duration::from_secs(4));
    for size in [300usize, 2_400, 64 << 10] {
        for (mode, direct_io) in [("fdatasync", false), ("direct", true)] {
            g.throughput(Throughput::Bytes(size as u64));
            g.bench_with_input(BenchmarkId::new(mode, size), &size, |b, &size| {
                let dir = tempfile::tempdir().expect("a temporary directory");
                let opts = WalOptions {
                    segment_bytes: 64 << 20,
                    fsync: true,
                    direct_io,
                };
                let wal = Wal::open(dir.path(), opts).expect("open the log");
                let payload = vec![0x5a; size];
                let mut index = 0u64;
                let mut since_purge = 0usize;
                b.iter_custom(|iters| {
                    let mut took = Duration::ZERO;
                    for _ in 0..iters {
                        index += 1;
                        let record = Record::Entry {
                            index,
                            data: &payload,
                        };
                        let start = Instant::now();
                        wal.write(&[record], true).expect("write");
                        took += start.elapsed();
                        since_purge += size;
                        if since_purge >= PURGE_BYTES {
                            drop(wal.purge(index - 1, b"").expect("purge"));
                            since_purge = 0;
                        }
                    }
                    took
                });
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
