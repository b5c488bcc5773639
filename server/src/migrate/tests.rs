//! Migrations of a store with history (puts, deletes, txns, leases, a compaction), checked
//! read by read: every key at every retained revision, every lease, the current and
//! compacted revisions and HashKV at every revision are the same before and after.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use metastore_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, RequestOp, TxnRequest,
};
use metastore_proto::mvccpb::KeyValue;

use super::rewrite::{META_MIGRATE_CURSOR, META_MIGRATE_TO};
use super::*;
use crate::apply::{apply, Command, CommandResult, LeaseLookup};
use crate::mvcc::store::META_STORAGE_FORMAT;
use crate::mvcc::{KeyRange, RangeOptions, Store, StoreOptions};
use crate::storage::data_dir::{read_stamp, Stamp, LAYOUT_VERSION};
use crate::storage::{EngineHook, HookedEngine, MemoryEngine, Table};

/// Leases the apply step sees as existing: those granted and not revoked.
#[derive(Default)]
pub(super) struct Leases(Mutex<Vec<i64>>);

impl LeaseLookup for Leases {
    fn lease_exists(&self, id: i64) -> bool {
        self.0.lock().map(|l| l.contains(&id)).unwrap_or(false)
    }
    fn granted(&self, id: i64, _ttl: i64) {
        if let Ok(mut l) = self.0.lock() {
            l.push(id);
        }
    }
    fn revoked(&self, id: i64) {
        if let Ok(mut l) = self.0.lock() {
            l.retain(|x| *x != id);
        }
    }
}

pub(super) fn exec(s: &Store, leases: &Leases, cmd: Command) -> CommandResult {
    let auth = crate::auth::AuthStore::open_default(s.engine().clone()).expect("auth store");
    let mut a = s.applier().expect("applier");
    let index = s.applied_index() + 1;
    let r = apply(&mut a, index, &cmd, leases, &auth).expect("apply");
    a.publish().expect("publish");
    r.result
}

pub(super) fn put(key: &str, value: &str, lease: i64) -> Command {
    Command::Put(PutRequest {
        key: key.as_bytes().to_vec().into(),
        value: value.as_bytes().to_vec().into(),
        lease,
        ..Default::default()
    })
}

fn put_op(key: &str, value: &str) -> RequestOp {
    let Command::Put(p) = put(key, value, 0) else {
        unreachable!("put() builds a Put")
    };
    RequestOp {
        request: Some(Request::RequestPut(p)),
    }
}

/// Writes a history with every kind of change into `s`: ~200 revisions, a compaction at
/// about a third, binary keys and values, a leased key, a revoked lease.
pub(super) fn write_history(s: &Store) {
    let leases = Leases::default();
    for i in 0..60 {
        exec(
            s,
            &leases,
            put(&format!("k/{:02}", i % 17), &format!("v{i}"), 0),
        );
    }
    exec(
        s,
        &leases,
        Command::Put(PutRequest {
            key: vec![0, 1, 0, 0xff].into(),
            value: vec![0xff; 3000].into(),
            ..Default::default()
        }),
    );
    exec(
        s,
        &leases,
        Command::DeleteRange(DeleteRangeRequest {
            key: b"k/03".to_vec().into(),
            range_end: b"k/06".to_vec().into(),
            ..Default::default()
        }),
    );
    exec(
        s,
        &leases,
        Command::LeaseGrant(LeaseGrantRequest { ttl: 60, id: 77 }),
    );
    exec(
        s,
        &leases,
        Command::LeaseGrant(LeaseGrantRequest { ttl: 30, id: 78 }),
    );
    exec(s, &leases, put("leased/a", "x", 77));
    exec(s, &leases, put("leased/b", "y", 78));
    exec(
        s,
        &leases,
        Command::LeaseRevoke(LeaseRevokeRequest { id: 78 }),
    );
    let rev = s.current_revision();
    let r = exec(
        s,
        &leases,
        Command::Compact(CompactionRequest {
            revision: rev - 20,
            physical: true,
        }),
    );
    let ticket = match r {
        CommandResult::Compact(_, ticket) => ticket,
        other => panic!("compaction result expected, got {other:?}"),
    };
    while s.compactor().finished() < ticket.revision() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    for i in 0..40 {
        exec(
            s,
            &leases,
            Command::Txn(TxnRequest {
                compare: vec![Compare {
                    result: CompareResult::Greater as i32,
                    target: CompareTarget::Version as i32,
                    key: format!("k/{:02}", i % 17).into_bytes().into(),
                    target_union: Some(TargetUnion::Version(0)),
                    ..Default::default()
                }],
                success: vec![put_op(&format!("k/{:02}", i % 17), &format!("t{i}"))],
                failure: vec![put_op(&format!("created/{i}"), "f")],
            }),
        );
    }
    exec(
        s,
        &leases,
        Command::DeleteRange(DeleteRangeRequest {
            key: b"created/".to_vec().into(),
            range_end: b"created0".to_vec().into(),
            ..Default::default()
        }),
    );
    exec(s, &leases, put("k/01", "last", 0));
}

/// Everything a client could read back.
#[derive(Debug, PartialEq)]
pub(super) struct Dump {
    current: i64,
    compact: i64,
    /// Every key-value at every revision from the compacted one to the current one.
    at_rev: Vec<(i64, Vec<KeyValue>)>,
    hash_kv: Vec<(i64, u32)>,
    leases: Vec<(i64, i64, Vec<Vec<u8>>)>,
}

pub(super) fn dump(s: &Store) -> Dump {
    let current = s.current_revision();
    let compact = s.compact_revision();
    let mut at_rev = Vec::new();
    let mut hash_kv = Vec::new();
    for rev in compact.max(1)..=current {
        let r = s
            .range(
                &KeyRange::From(vec![0]),
                RangeOptions {
                    rev,
                    ..Default::default()
                },
            )
            .expect("range");
        at_rev.push((rev, r.kvs));
        // HashKV refuses the compacted revision itself, as etcd's does.
        if rev > compact || compact == 0 {
            hash_kv.push((rev, s.hash_kv(rev).expect("hash_kv").0));
        }
    }
    let leases = s
        .leases()
        .expect("leases")
        .into_iter()
        .map(|(id, ttl)| (id, ttl, s.lease_keys(id).expect("lease keys")))
        .collect();
    Dump {
        current,
        compact,
        at_rev,
        hash_kv,
        leases,
    }
}

pub(super) fn open_store(engine: Arc<dyn Engine>, format: u8) -> Arc<Store> {
    Store::open(
        engine,
        StoreOptions {
            write_format: format,
            fsync: true,
            ..Default::default()
        },
    )
    .expect("open store")
}

pub(super) fn formats(engine: &dyn Engine) -> FormatCounts {
    count(engine, None, true).expect("count")
}

fn stamp(format: u8) -> Stamp {
    Stamp {
        layout_version: LAYOUT_VERSION,
        storage_format: format,
        engine: "rocksdb".into(),
        member_name: "n1".into(),
        member_id: "1".into(),
        cluster_id: "2".into(),
        created_by: "test".into(),
    }
}

/// A data directory at `format` holding [`write_history`].
fn data_dir_with_history(path: &Path, format: u8) -> Dump {
    let dir = DataDir::open_or_create(path, stamp(format)).expect("data dir");
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(&dir.db_path(), &Default::default()).expect("rocksdb"));
    let store = open_store(engine, format);
    write_history(&store);
    dump(&store)
}

fn dump_dir(path: &Path) -> (Dump, FormatCounts) {
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(&path.join("db"), &Default::default()).expect("rocksdb"));
    let format = read_stamp(path)
        .expect("stamp")
        .expect("stamped")
        .storage_format;
    let d = dump(&open_store(engine.clone(), format));
    (d, formats(engine.as_ref()))
}

fn args(path: &Path, to: u8) -> MigrateArgs {
    MigrateArgs {
        data_dir: path.to_path_buf(),
        to,
        dry_run: false,
        verify: true,
        batch_records: 7,
        max_storage_format: None,
        no_progress: true,
    }
}

#[test]
fn up_and_down_keep_every_read_identical() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path();
    let want = data_dir_with_history(path, 1);
    assert!(want.compact > 1, "the history includes a compaction");
    assert!(want.at_rev.len() > 50, "{} revisions", want.at_rev.len());
    let (got, counts) = dump_dir(path);
    assert_eq!(got, want);
    assert_eq!(counts.not_in(1), 0, "written in format 1: {counts}");

    let report = run(&args(path, 2))?;
    assert_eq!(report.stats.rewritten, counts.total());
    assert!(report.verified.is_some());
    assert!(
        report.stats.batches > 10,
        "small batches: {:?}",
        report.stats
    );
    let (got, counts) = dump_dir(path);
    assert_eq!(got, want, "after 1 -> 2");
    assert_eq!(counts.not_in(2), 0, "{counts}");
    assert_eq!(read_stamp(path)?.map(|s| s.storage_format), Some(2));

    let report = run(&args(path, 1))?;
    assert_eq!(report.stats.rewritten, counts.total());
    let (got, counts) = dump_dir(path);
    assert_eq!(got, want, "after 2 -> 1");
    assert_eq!(counts.not_in(1), 0, "{counts}");
    assert_eq!(read_stamp(path)?.map(|s| s.storage_format), Some(1));

    // The server opens it at format 1, and keeps writing format 1.
    let dir = DataDir::open_or_create(path, stamp(1))?;
    let engine: Arc<dyn Engine> = Arc::new(RocksEngine::open(&dir.db_path(), &Default::default())?);
    assert_eq!(engine.get(Table::Meta, META_STORAGE_FORMAT)?, Some(vec![1]));
    assert_eq!(engine.get(Table::Meta, META_MIGRATE_TO)?, None);
    assert_eq!(engine.get(Table::Meta, META_MIGRATE_CURSOR)?, None);

    // Nothing to do the second time.
    drop(engine);
    let again = run(&args(path, 1))?;
    assert_eq!(again.stats, RewriteStats::default());
    Ok(())
}

#[test]
fn dry_run_counts_and_changes_nothing() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path();
    data_dir_with_history(path, 1);
    let stamp_before = std::fs::read(path.join("metastore.json"))?;
    let report = run(&MigrateArgs {
        dry_run: true,
        ..args(path, 2)
    })?;
    assert!(report.dry_run);
    assert_eq!(report.before.not_in(2), report.before.total());
    assert!(
        report
            .to_string()
            .contains("would be re-encoded to format 2"),
        "{report}"
    );
    assert_eq!(std::fs::read(path.join("metastore.json"))?, stamp_before);
    assert!(!path.join("migration.json").exists());
    let (_, counts) = dump_dir(path);
    assert_eq!(counts, report.before, "no record changed");
    Ok(())
}

#[test]
fn refuses_unknown_target_locked_dir_and_unreadable_records() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path();
    data_dir_with_history(path, 2);

    let e = run(&args(path, 9)).map(|_| ()).expect_err("format 9");
    assert!(
        matches!(e, MigrateError::UnsupportedFormat { format: 9, .. }),
        "{e}"
    );

    let held = RocksEngine::open(&path.join("db"), &Default::default())?;
    let e = run(&args(path, 1)).map(|_| ()).expect_err("locked");
    assert!(matches!(e, MigrateError::InUse(_)), "{e}");
    assert!(e.to_string().contains("stop it before migrating"), "{e}");

    // A record of a format this binary does not know, in the middle of the table.
    let mut it_key = None;
    {
        let snap = held.snapshot();
        let mut it = snap.iter(Table::Kv);
        it.seek(&[]);
        for _ in 0..20 {
            it.next();
        }
        if it.valid() {
            it_key = Some(it.key().to_vec());
        }
    }
    let key = it_key.expect("a 21st record");
    let mut b = WriteBatch::new();
    b.put(Table::Kv, key.clone(), vec![9, 1, 2, 3]);
    held.write(b, true)?;
    drop(held);
    let stamp_before = std::fs::read(path.join("metastore.json"))?;
    let e = run(&args(path, 1)).map(|_| ()).expect_err("unknown record");
    let msg = e.to_string();
    assert!(msg.contains("storage format 9"), "{msg}");
    assert!(matches!(e, MigrateError::Record { .. }), "{e:?}");
    assert_eq!(std::fs::read(path.join("metastore.json"))?, stamp_before);
    assert!(!path.join("migration.json").exists());
    let engine = RocksEngine::open(&path.join("db"), &Default::default())?;
    assert_eq!(engine.get(Table::Kv, &key)?, Some(vec![9, 1, 2, 3]));
    let counts = {
        let mut by_format = std::collections::BTreeMap::new();
        let snap = engine.snapshot();
        let mut it = snap.iter(Table::Kv);
        it.seek(&[]);
        while it.valid() {
            *by_format.entry(it.value()[0]).or_insert(0u64) += 1;
            it.next();
        }
        by_format
    };
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![2, 9],
        "nothing converted"
    );
    Ok(())
}

/// The server's reads and writes refuse a record they cannot decode, and write nothing.
#[test]
fn a_store_refuses_a_record_of_an_unknown_format() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let store = open_store(engine.clone(), 2);
    let leases = Leases::default();
    exec(&store, &leases, put("a", "1", 0));
    let rev = store.current_revision();
    let mut b = WriteBatch::new();
    b.put(
        Table::Kv,
        crate::mvcc::key_codec::kv_key(b"a", rev),
        vec![7, 0],
    );
    engine.write(b, true).expect("write");

    let e = store
        .range(&KeyRange::Single(b"a".to_vec()), RangeOptions::default())
        .map(|_| ())
        .expect_err("read");
    assert!(e.to_string().contains("storage format 7"), "{e}");
    let auth = crate::auth::AuthStore::open_default(store.engine().clone()).expect("auth store");
    let mut a = store.applier().expect("applier");
    let index = store.applied_index() + 1;
    let r = apply(&mut a, index, &put("a", "2", 0), &leases, &auth);
    a.publish().expect("publish");
    let e = r.map(|_| ()).expect_err("write over it");
    assert!(e.to_string().contains("storage format 7"), "{e}");
    assert_eq!(store.current_revision(), rev, "nothing written");
}

/// Writes fail after a number of them, like a process killed mid-run.
struct FailAfter {
    writes_left: AtomicUsize,
}

impl EngineHook for FailAfter {
    fn write(&self, _sync: bool) -> crate::storage::Result<()> {
        let left = self.writes_left.load(Ordering::SeqCst);
        if left == 0 {
            return Err(crate::storage::Error::Engine("killed".into()));
        }
        self.writes_left.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn an_interrupted_rewrite_is_readable_and_resumes() {
    let engine = HookedEngine::new(FailAfter {
        writes_left: AtomicUsize::new(usize::MAX),
    });
    let want = {
        let store = open_store(engine.clone(), 1);
        write_history(&store);
        dump(&store)
    };
    let total = formats(engine.as_ref()).total();
    let limits = BatchLimits {
        records: 5,
        bytes: 1 << 20,
    };
    for crash_after in [3usize, 1, 4, 2] {
        engine.hook.writes_left.store(crash_after, Ordering::SeqCst);
        let e = rewrite(engine.as_ref(), 2, limits, &mut |_, _| {})
            .map(|_| ())
            .expect_err("killed");
        assert!(e.to_string().contains("killed"), "{e}");
        // Mixed formats, every read the same.
        let counts = formats(engine.as_ref());
        assert!(counts.by_format.len() == 2, "{counts}");
        engine.hook.writes_left.store(usize::MAX, Ordering::SeqCst);
        assert_eq!(dump(&open_store(engine.clone(), 1)), want);
        assert_eq!(
            engine.get(Table::Meta, META_MIGRATE_TO).expect("meta"),
            Some(vec![2])
        );
    }
    let converted = formats(engine.as_ref())
        .by_format
        .get(&2)
        .copied()
        .unwrap_or(0);
    assert_eq!(
        converted,
        (3 + 1 + 4 + 2) * 5,
        "each run resumed where the last stopped"
    );
    let stats = rewrite(engine.as_ref(), 2, limits, &mut |_, _| {}).expect("finish");
    assert_eq!(stats.rewritten, total - converted);
    assert_eq!(formats(engine.as_ref()).not_in(2), 0);
    assert_eq!(dump(&open_store(engine.clone(), 2)), want);
    assert_eq!(
        engine.get(Table::Meta, META_STORAGE_FORMAT).expect("meta"),
        Some(vec![2])
    );
    assert_eq!(
        engine.get(Table::Meta, META_MIGRATE_CURSOR).expect("meta"),
        None
    );
}

#[test]
fn verify_notices_a_changed_record() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    write_history(&open_store(engine.clone(), 1));
    let before = fingerprint(engine.clone(), 1).expect("fingerprint");
    // Same bytes in the other format: the fingerprint is format-independent.
    rewrite(engine.as_ref(), 2, BatchLimits::default(), &mut |_, _| {}).expect("rewrite");
    let same = fingerprint(engine.clone(), 2).expect("fingerprint");
    assert!(verify::differences(&before, &same).is_empty());
    // One value changed in an old, retained version.
    let snap = engine.snapshot();
    let mut it = snap.iter(Table::Kv);
    it.seek(b"k/10");
    let key = it.key().to_vec();
    let mut kv = codec::decode(it.value()).expect("decode");
    drop(it);
    drop(snap);
    kv.value = b"tampered".to_vec().into();
    let mut rec = Vec::new();
    codec::encode(2, &kv, &mut rec).expect("encode");
    let mut b = WriteBatch::new();
    b.put(Table::Kv, key, rec);
    engine.write(b, true).expect("write");
    let after = fingerprint(engine.clone(), 2).expect("fingerprint");
    let diff = verify::differences(&before, &after);
    assert!(
        diff.iter().any(|d| d.starts_with("content digest")),
        "{diff:?}"
    );
    assert!(diff.iter().any(|d| d.starts_with("HashKV")), "{diff:?}");
}
