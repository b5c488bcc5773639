//! Offline migration throughput: a data directory of 1M keys (one version each, ~120-byte
//! values) converted 1 → 2 and back 2 → 1 with `metastore::migrate::run` as `metastore
//! migrate` runs it (10,000-record synced batches, no `--verify`), reported in records/s.
//!
//! A plain `main` rather than criterion: one run is seconds long and its setup far longer, so
//! repeated samples add nothing but time. `cargo bench --bench migrate -- --test` (CI's smoke
//! test) runs it on 20,000 keys; `METASTORE_BENCH_KEYS` sets the size, and
//! `METASTORE_BENCH_VERIFY=1` adds `--verify` (reported as the wall-clock time of the run).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use metastore::apply::{apply, Command, NoLeases};
use metastore::auth::AuthStore;
use metastore::migrate::{run, MigrateArgs};
use metastore::mvcc::{Store, StoreOptions};
use metastore::storage::data_dir::{DataDir, Stamp, LAYOUT_VERSION};
use metastore::storage::{Engine, RocksEngine};
use metastore_proto::etcdserverpb::{request_op::Request, PutRequest, RequestOp, TxnRequest};

fn build(path: &Path, keys: usize) -> anyhow::Result<()> {
    let dir = DataDir::open_or_create(
        path,
        Stamp {
            layout_version: LAYOUT_VERSION,
            storage_format: 1,
            engine: "rocksdb".into(),
            member_name: "bench".into(),
            member_id: "1".into(),
            cluster_id: "2".into(),
            created_by: "bench".into(),
        },
    )?;
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(&dir.db_path(), &Default::default())?);
    let store = Store::open(
        engine,
        StoreOptions {
            write_format: 1,
            fsync: false,
            ..Default::default()
        },
    )?;
    let auth = AuthStore::open_default(store.engine().clone())?;
    let mut a = store.applier()?;
    for (index, start) in (0..keys).step_by(1000).enumerate() {
        let ops = (start..(start + 1000).min(keys))
            .map(|i| RequestOp {
                request: Some(Request::RequestPut(PutRequest {
                    key: format!("/registry/configmaps/ns-{}/cm-{i:08}", i % 100)
                        .into_bytes()
                        .into(),
                    value: vec![b'v'; 120].into(),
                    ..Default::default()
                })),
            })
            .collect();
        let cmd = Command::Txn(TxnRequest {
            success: ops,
            ..Default::default()
        });
        apply(&mut a, index as u64 + 1, &cmd, &NoLeases, &auth)?;
    }
    a.publish()?;
    store.engine().sync()?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let smoke = std::env::args().any(|a| a == "--test");
    let keys: usize = match std::env::var("METASTORE_BENCH_KEYS") {
        Ok(v) => v.parse()?,
        Err(_) if smoke => 20_000,
        Err(_) => 1_000_000,
    };
    let tmp = tempfile::tempdir()?;
    let t = Instant::now();
    build(tmp.path(), keys)?;
    eprintln!(
        "built {keys} keys in format 1 in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let verify = std::env::var_os("METASTORE_BENCH_VERIFY").is_some();
    for to in [2u8, 1] {
        let wall = Instant::now();
        let report = run(&MigrateArgs {
            data_dir: tmp.path().to_path_buf(),
            to,
            dry_run: false,
            verify,
            batch_records: 10_000,
            max_storage_format: None,
            no_progress: true,
        })?;
        anyhow::ensure!(report.stats.rewritten == keys as u64, "{report}");
        println!(
            "migrate/{}-to-{to}: {keys} records in {:.2}s = {:.0} records/s (whole run{}: {:.2}s)",
            3 - to,
            report.elapsed.as_secs_f64(),
            report.records_per_sec(),
            if verify { " with --verify" } else { "" },
            wall.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
