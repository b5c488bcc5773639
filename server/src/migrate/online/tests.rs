//! The online switch and the background re-encoder on a store with history, compared with a
//! store that was written in the target format from the start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::CompactionRequest;

use super::{Reencoder, ReencoderOptions};
use crate::apply::{Command, CommandResult};
use crate::migrate::rewrite::{rewrite_batch, BatchLimits, RewriteStats, META_MIGRATE_TO};
use crate::migrate::tests::{dump, exec, formats, open_store, put, write_history, Leases};
use crate::mvcc::{self, Store};
use crate::storage::{snapshot as snapfile, Engine, MemoryEngine, Table};

fn reencoder(store: &Store, rate: u64, batch_records: usize) -> Arc<Reencoder> {
    Reencoder::start(
        store.engine().clone(),
        store.background_lock().clone(),
        ReencoderOptions {
            rate,
            batch_records,
            data_dir: None,
        },
    )
    .expect("start the re-encoder")
}

fn switch(s: &Store, to: u8) -> bool {
    match exec(s, &Leases::default(), Command::SetStorageFormat(to)) {
        CommandResult::SetStorageFormat { to: got, pending } => {
            assert_eq!(got, to);
            pending
        }
        other => panic!("switch result expected, got {other:?}"),
    }
}

fn wait_done(r: &Reencoder) {
    let start = Instant::now();
    while r.progress().pending {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "re-encoding not done: {:?}",
            r.progress()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Schedules a physical compaction at `rev`; returns the revision to wait for.
fn compact(s: &Store, rev: i64) -> i64 {
    let r = exec(
        s,
        &Leases::default(),
        Command::Compact(CompactionRequest {
            revision: rev,
            physical: true,
        }),
    );
    let CommandResult::Compact(_, ticket) = r else {
        panic!("compaction result expected, got {r:?}");
    };
    ticket.revision()
}

fn wait_compacted(s: &Store, rev: i64) {
    let start = Instant::now();
    while s.compactor().finished() < rev {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "compaction hangs"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn switch_reencodes_in_the_background_while_writes_and_a_compaction_go_on() {
    let migrated = open_store(Arc::new(MemoryEngine::new()), 1);
    let reference = open_store(Arc::new(MemoryEngine::new()), 2);
    write_history(&migrated);
    write_history(&reference);
    let before = dump(&migrated);
    assert_eq!(before, dump(&reference));
    assert_eq!(formats(migrated.engine().as_ref()).not_in(1), 0);

    // 5 records per batch: the writes and the compaction below overlap the re-encoding.
    let r = reencoder(&migrated, 0, 5);
    assert!(switch(&migrated, 2), "format-1 records remain to re-encode");
    assert!(
        !switch(&reference, 2),
        "nothing to re-encode in a format-2 store"
    );
    assert_eq!(migrated.write_format(), 2);
    r.kick();
    // Pause the re-encoder (after at most a batch) while the writes are applied and the
    // compaction is scheduled; then both run interleaved, batch by batch.
    let paused = migrated.background_lock().lock().expect("lock");
    assert!(r.progress().pending);
    // Mid-way every read is the same as before.
    assert_eq!(dump(&migrated), before);
    let mut compactions = Vec::new();
    for s in [&migrated, &reference] {
        let leases = Leases::default();
        for k in 0..30 {
            exec(s, &leases, put(&format!("after/{k}"), &format!("v{k}"), 0));
            exec(
                s,
                &leases,
                put(&format!("k/{:02}", k % 17), "overwritten", 0),
            );
        }
        compactions.push(compact(s, s.current_revision() - 10));
    }
    drop(paused);
    wait_compacted(&migrated, compactions[0]);
    wait_compacted(&reference, compactions[1]);
    wait_done(&r);

    assert_eq!(dump(&migrated), dump(&reference));
    let counts = formats(migrated.engine().as_ref());
    assert_eq!(counts.not_in(2), 0, "{counts}");
    // Byte for byte the same tables: nothing compacted came back, and every record is in
    // format 2 exactly as a format-2 store writes it.
    assert_eq!(
        migrated.hash().expect("hash"),
        reference.hash().expect("hash")
    );
    assert_eq!(
        migrated.meta(META_MIGRATE_TO).expect("meta"),
        None,
        "no migration pending"
    );
    let p = r.progress();
    assert_eq!(p.target, 2);
    assert!(p.rewritten > 0 && p.visited >= p.rewritten, "{p:?}");
}

#[test]
fn a_snapshot_taken_mid_migration_is_finished_by_the_receivers_reencoder() {
    // The "leader": format 1, switched to 2, a few batches re-encoded, then snapshotted.
    let leader = open_store(Arc::new(MemoryEngine::new()), 1);
    write_history(&leader);
    assert!(switch(&leader, 2));
    let mut stats = RewriteStats::default();
    let limits = BatchLimits {
        records: 40,
        ..BatchLimits::default()
    };
    assert!(!rewrite_batch(leader.engine().as_ref(), 2, limits, false, &mut stats).expect("batch"));
    let mid = formats(leader.engine().as_ref());
    assert!(
        mid.not_in(2) > 0 && mid.not_in(1) > 0,
        "both formats: {mid}"
    );
    let mut file = Vec::new();
    let info =
        snapfile::write_snapshot(leader.engine().snapshot().as_ref(), &mut file, &mut |_| {})
            .expect("snapshot");
    assert_eq!(
        info.header.storage_format, 2,
        "the highest format records may be in"
    );

    // The "follower" wrote format 1 and knows nothing of the switch; it installs the file the
    // way the state machine does (load, then reload the store).
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let follower = open_store(engine.clone(), 1);
    let r = reencoder(&follower, 0, 16);
    {
        let _background = follower.background_lock().lock().expect("lock");
        snapfile::load(file.as_slice(), engine.as_ref(), &mut |_| {}).expect("load");
    }
    follower.reload().expect("reload");
    assert_eq!(
        follower.write_format(),
        2,
        "the cluster's write format came along"
    );
    r.kick();
    wait_done(&r);

    assert_eq!(formats(engine.as_ref()).not_in(2), 0);
    assert_eq!(dump(&follower), dump(&leader));
    // New writes are in format 2 too.
    exec(&follower, &Leases::default(), put("new", "x", 0));
    assert_eq!(formats(engine.as_ref()).not_in(2), 0);
}

#[test]
fn switch_to_an_unsupported_format_changes_nothing() {
    let s = open_store(Arc::new(MemoryEngine::new()), 2);
    write_history(&s);
    let before = dump(&s);
    let index = s.applied_index() + 1;
    let mut a = s.applier().expect("applier");
    let e = a
        .set_storage_format(9, index)
        .expect_err("format 9 is unknown");
    assert!(matches!(e, mvcc::Error::UnsupportedFormat(9)), "{e}");
    a.publish().expect("publish");
    assert_eq!(s.write_format(), 2);
    assert_eq!(s.meta(META_MIGRATE_TO).expect("meta"), None);
    assert_eq!(
        s.engine()
            .get(Table::Meta, crate::mvcc::store::META_WRITE_FORMAT)
            .expect("meta"),
        None
    );
    assert_eq!(dump(&s), before);
}

#[test]
fn a_switch_survives_a_reopen_and_the_reencoder_resumes() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let s = open_store(engine.clone(), 1);
    write_history(&s);
    assert!(switch(&s, 2));
    let total = formats(engine.as_ref()).total();
    let mut stats = RewriteStats::default();
    let limits = BatchLimits {
        records: 30,
        ..BatchLimits::default()
    };
    assert!(!rewrite_batch(engine.as_ref(), 2, limits, false, &mut stats).expect("batch"));
    let before = dump(&s);
    drop(s);
    // Reopened with the configured format 1 (a restart): the replicated switch wins.
    let s = open_store(engine.clone(), 1);
    assert_eq!(s.write_format(), 2);
    let r = reencoder(&s, 0, 25);
    wait_done(&r);
    let p = r.progress();
    assert_eq!(
        p.visited,
        total - 30,
        "resumed after the first batch, not from the start: {p:?}"
    );
    assert_eq!(formats(engine.as_ref()).not_in(2), 0);
    assert_eq!(dump(&s), before);
}
