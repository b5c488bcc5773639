//! `metastore migrate` with the real binary: SIGKILLed at random points and rerun, then
//! verified; and the server's refusals (unknown directory or record format, a format other
//! than the directory's, an unfinished migration).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{CompactionOptions, DeleteOptions, LeaseGrantOptions, PutOptions, Txn, TxnOp};
use metastore::migrate::{count, fingerprint, Fingerprint};
use metastore::mvcc::{Store, StoreOptions};
use metastore::storage::data_dir::read_stamp;
use metastore::storage::{Engine, RocksEngine, Table, WriteBatch};

use crate::common::{free_port, status, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_metastore");

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// A stopped server's data directory at `format`, written by the real server: `keys` keys
/// in txns of 500, a fifth of them overwritten, 100 deleted, a leased key and a compaction
/// (about `1.2 * keys` records).
pub(crate) fn build_dir(path: &Path, format: u8, keys: usize) -> anyhow::Result<()> {
    let format = format.to_string();
    let mut p = Proc::spawn(
        path,
        free_port()?,
        &[
            ("METASTORE_STORAGE_FORMAT", format.as_str()),
            ("METASTORE_MAX_TXN_OPS", "500"),
            ("METASTORE_UNSAFE_NO_FSYNC", "true"),
        ],
    )?;
    runtime()?.block_on(async {
        let mut c = p.client().await?;
        c.lease_grant(3600, Some(LeaseGrantOptions::new().with_id(42)))
            .await?;
        let txn = |range: std::ops::Range<usize>, round: usize| {
            Txn::new().and_then(
                range
                    .map(|i| {
                        TxnOp::put(
                            format!("key/{i:08}"),
                            format!("value {i} round {round} {}", "x".repeat(i % 100)),
                            None,
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        };
        for start in (0..keys).step_by(500) {
            c.txn(txn(start..(start + 500).min(keys), 0)).await?;
        }
        let mid = c.get("key/", None).await?.header().map(|h| h.revision());
        for start in (0..keys / 5).step_by(500) {
            c.txn(txn(start..(start + 500).min(keys / 5), 1)).await?;
        }
        c.delete(
            "key/00000100",
            Some(DeleteOptions::new().with_range("key/00000200")),
        )
        .await?;
        c.put("leased", "l", Some(PutOptions::new().with_lease(42)))
            .await?;
        c.compact(
            mid.unwrap_or_default(),
            Some(CompactionOptions::new().with_physical()),
        )
        .await?;
        anyhow::Ok(())
    })?;
    p.signal("TERM")?;
    Ok(())
}

pub(crate) fn open_engine(path: &Path) -> anyhow::Result<Arc<dyn Engine>> {
    Ok(Arc::new(RocksEngine::open(
        &path.join("db"),
        &Default::default(),
    )?))
}

pub(crate) fn fingerprint_dir(path: &Path) -> anyhow::Result<Fingerprint> {
    let format = read_stamp(path)?.map(|s| s.storage_format).unwrap_or(2);
    Ok(fingerprint(open_engine(path)?, format)?)
}

fn migrate_cmd(path: &Path, to: u8) -> Command {
    let mut c = Command::new(BIN);
    c.arg("migrate")
        .arg("--data-dir")
        .arg(path)
        .arg("--to")
        .arg(to.to_string())
        .env("METASTORE_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Runs the server binary expecting it to refuse to start; returns its stderr.
fn server_refuses(path: &Path, env: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut c = Command::new(BIN);
    c.arg("--data-dir")
        .arg(path)
        .env(
            "METASTORE_LISTEN_CLIENT_URLS",
            format!("http://127.0.0.1:{}", free_port()?),
        )
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let start = Instant::now();
    while child.try_wait()?.is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            anyhow::bail!("the server started on {}", path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(!out.status.success(), "the server exited successfully");
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A small xorshift generator; the seed is printed so that a failure can be replayed with
/// `METASTORE_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::env::var("METASTORE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        eprintln!("METASTORE_TEST_SEED={seed}");
        Self(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn migration_survives_sigkill_at_random_points() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path();
    build_dir(path, 1, 50_000)?;
    let before = fingerprint_dir(path)?;
    let records = count(open_engine(path)?.as_ref(), None, false)?.total();
    assert!(records > 60_000, "{records} records");

    // How long an uninterrupted run takes on this machine, on a copy: start-up (open, count)
    // and the conversion itself. Small batches make the conversion long enough to hit.
    let copy = tempfile::tempdir()?;
    copy_dir(path, copy.path())?;
    let t = Instant::now();
    let mut child = migrate_cmd(copy.path(), 2)
        .args(["--batch-records", "50"])
        .env("METASTORE_LOG_LEVEL", "info")
        .spawn()?;
    when_converting(&mut child).recv_timeout(Duration::from_secs(60))?;
    let startup = t.elapsed();
    anyhow::ensure!(child.wait()?.success(), "the uninterrupted run failed");
    let conversion = t.elapsed() - startup;
    eprintln!(
        "an uninterrupted migration of {records} records: start-up {startup:?}, \
         conversion {conversion:?}"
    );

    // Each run is killed at most a sixteenth of the conversion time into its conversion (so
    // twelve runs cannot finish it at the measured speed, and the last run, with `--verify`,
    // has work left): two in three a random time after
    // they start converting, one in three at a random point from its start (start-up,
    // stamping and the first batches included).
    let slice = conversion.as_micros() as u64 / 16;
    let mut rng = Rng::new();
    let (mut kills, mut mid_way, mut refusal_checked) = (0, 0, false);
    for i in 0..12 {
        let mut child = migrate_cmd(path, 2)
            .args(["--batch-records", "50"])
            .env("METASTORE_LOG_LEVEL", "info")
            .spawn()?;
        let converting = when_converting(&mut child);
        let delay = if i % 3 == 2 {
            Duration::from_micros(rng.below(startup.as_micros() as u64 + slice))
        } else {
            // Ends early if the run ends before converting (it has nothing left to do).
            let _ = converting.recv_timeout(Duration::from_secs(20));
            Duration::from_micros(rng.below(slice))
        };
        std::thread::sleep(delay);
        child.kill()?; // SIGKILL
        let status = child.wait()?;
        if status.success() {
            break; // finished before the kill
        }
        kills += 1;
        let counts = count(open_engine(path)?.as_ref(), None, false)?;
        let marked = path.join("migration.json").exists();
        if marked && counts.by_format.len() == 2 {
            mid_way += 1;
            if !refusal_checked {
                // A directory mid-migration: readable record by record, refused by the
                // server until the migration is finished.
                assert_eq!(fingerprint_dir(path)?, before, "readable mid-way");
                let err = server_refuses(path, &[])?;
                assert!(
                    err.contains("metastore migrate --data-dir") && err.contains("--to 2"),
                    "{err}"
                );
                refusal_checked = true;
            }
        }
        eprintln!("kill {kills} after {delay:?}: {counts}, marker {marked}");
    }
    assert!(
        kills >= 10,
        "only {kills} runs were killed before finishing"
    );
    assert!(mid_way >= 5, "only {mid_way} kills landed mid-way");

    let out = migrate_cmd(path, 2).arg("--verify").output()?;
    eprintln!("{kills} kills, {mid_way} mid-way");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (Unless the machine sped up so much that a killed run finished it.)
    assert!(
        stdout.contains("verified:") || stdout.contains("nothing to do"),
        "{stdout}"
    );
    assert!(!path.join("migration.json").exists());
    assert_eq!(read_stamp(path)?.map(|s| s.storage_format), Some(2));
    let counts = count(open_engine(path)?.as_ref(), None, false)?;
    assert_eq!(counts.not_in(2), 0, "{counts}");
    assert_eq!(
        fingerprint_dir(path)?,
        before,
        "identical after the migration"
    );

    // The server runs on it, at format 2, with the data intact.
    let port = free_port()?;
    let mut p = Proc::spawn(path, port, &[])?;
    let rt = runtime()?;
    rt.block_on(async {
        let mut c = p.client().await?;
        let r = c.get("key/00049999", None).await?;
        assert_eq!(
            r.kvs()
                .first()
                .and_then(|kv| kv.value_str().ok().map(str::to_owned)),
            Some(format!("value 49999 round 0 {}", "x".repeat(99)))
        );
        assert_eq!(c.get("key/00000150", None).await?.count(), 0, "deleted");
        c.put("new", "v", None).await?;
        anyhow::Ok(())
    })?;
    drop(rt); // closes the client's connections, so the server stops at once
    p.signal("TERM")?;
    let counts = count(open_engine(path)?.as_ref(), None, false)?;
    assert_eq!(
        counts.not_in(2),
        0,
        "the server writes the directory's format: {counts}"
    );
    Ok(())
}

/// A channel that receives once `child` (logging at info) starts converting records.
fn when_converting(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<()> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stderr) = child.stderr.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("converting records") {
                    let _ = tx.send(());
                }
            }
        });
    }
    rx
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), target)?;
        }
    }
    Ok(())
}

#[test]
fn server_keeps_the_directory_format_and_refuses_another() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path();
    build_dir(path, 1, 1000)?;
    let port = free_port()?;
    // No flag: the directory's format is kept (a binary upgrade changes nothing on disk).
    let mut p = Proc::spawn(path, port, &[])?;
    let rt = runtime()?;
    rt.block_on(async {
        p.client().await?.put("added", "v", None).await?;
        anyhow::Ok(())
    })?;
    drop(rt); // closes the client's connections, so the server stops at once
    p.signal("TERM")?;
    let counts = count(open_engine(path)?.as_ref(), None, false)?;
    assert_eq!(counts.not_in(1), 0, "{counts}");

    let stamp = std::fs::read(path.join("metastore.json"))?;
    let err = server_refuses(path, &[("METASTORE_STORAGE_FORMAT", "2")])?;
    assert!(err.contains("holds storage format 1 but format 2"), "{err}");
    assert!(err.contains("metastore migrate --data-dir"), "{err}");

    // A binary that reads format 1 only, on a format-2 directory.
    let out = migrate_cmd(path, 2).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stamp2 = std::fs::read(path.join("metastore.json"))?;
    assert_ne!(stamp, stamp2);
    let err = server_refuses(path, &[("METASTORE_MAX_STORAGE_FORMAT", "1")])?;
    assert!(
        err.contains("holds storage format 2, which this binary cannot read"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(path.join("metastore.json"))?,
        stamp2,
        "nothing written"
    );
    let out = migrate_cmd(path, 1)
        .env("METASTORE_MAX_STORAGE_FORMAT", "1")
        .output()?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("storage format 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A dry run, and the way back down.
    let out = migrate_cmd(path, 1).arg("--dry-run").output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("would be re-encoded to format 1"),
        "{stdout}"
    );
    let out = migrate_cmd(path, 1).arg("--verify").output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(read_stamp(path)?.map(|s| s.storage_format), Some(1));
    Ok(())
}

#[test]
fn migrate_refuses_a_directory_the_server_holds() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    build_dir(tmp.path(), 2, 100)?;
    let p = Proc::spawn(tmp.path(), free_port()?, &[])?;
    let out = migrate_cmd(tmp.path(), 1).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    drop(p);
    Ok(())
}

#[test]
fn server_refuses_a_record_of_an_unknown_format() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path();
    build_dir(path, 1, 100)?;
    // A format-2 record in a format-1 directory, read by a binary that knows format 1 only.
    let engine = open_engine(path)?;
    let kv = Store::open(
        engine.clone(),
        StoreOptions {
            write_format: 1,
            fsync: true,
            ..Default::default()
        },
    )?
    .range(
        &metastore::mvcc::KeyRange::Single(b"key/00000007".to_vec()),
        Default::default(),
    )?
    .kvs;
    let mut rec = Vec::new();
    metastore::storage::codec::encode_v2(&kv[0], &mut rec);
    let key = metastore::mvcc::key_codec::kv_key(&kv[0].key, kv[0].mod_revision);
    let mut b = WriteBatch::new();
    b.put(Table::Kv, key.clone(), rec.clone());
    engine.write(b, true)?;
    drop(engine);

    let port = free_port()?;
    let p = Proc::spawn(path, port, &[("METASTORE_MAX_STORAGE_FORMAT", "1")])?;
    let rt = runtime()?;
    let rev = rt.block_on(async {
        let mut c = p.client().await?;
        let rev = c
            .get("key/00000008", None)
            .await?
            .header()
            .map(|h| h.revision());
        let (_, msg) = status(
            c.get("key/00000007", None)
                .await
                .map(|_| ())
                .expect_err("read"),
        );
        assert!(
            msg.contains("storage format 2, which this binary cannot read"),
            "{msg}"
        );
        // A write over it fails too (the member stops rather than apply it differently).
        assert!(c.put("key/00000007", "over", None).await.is_err(), "write");
        anyhow::Ok(rev)
    })?;
    drop(p);
    let engine = open_engine(path)?;
    assert_eq!(
        engine.get(Table::Kv, &key)?,
        Some(rec),
        "the record is untouched"
    );
    let store = Store::open(engine, StoreOptions::default())?;
    assert_eq!(Some(store.current_revision()), rev, "nothing written");
    Ok(())
}
