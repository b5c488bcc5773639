use std::path::Path;
use std::sync::Arc;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt};
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

use super::*;
use crate::raft::Batch;
use crate::storage::{EngineHook, HookedEngine, MemoryEngine, RocksEngine};

fn entry(term: u64, index: u64) -> Entry {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
        payload: EntryPayload::Normal(Batch(format!("e{index}").into_bytes().into())),
    }
}

async fn append(s: &mut LogStore, entries: Vec<Entry>) {
    // Returns once the log store reported the entries durable.
    s.blocking_append(entries).await.expect("append");
}

async fn exercise(engine: Arc<dyn Engine>) {
    exercise_with(|| LogStore::open(engine.clone(), true).expect("open")).await
}

async fn exercise_with(open: impl Fn() -> LogStore) {
    let mut s = open();
    let st = s.get_log_state().await.expect("state");
    assert_eq!((st.last_purged_log_id, st.last_log_id), (None, None));
    append(&mut s, (1..=10).map(|i| entry(1, i)).collect()).await;
    let got = s.try_get_log_entries(3..6).await.expect("read");
    assert_eq!(
        got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        [3, 4, 5]
    );
    assert_eq!(
        s.get_log_state().await.expect("state").last_log_id,
        Some(entry(1, 10).log_id)
    );

    // A conflicting suffix is truncated and replaced.
    s.truncate(entry(1, 8).log_id).await.expect("truncate");
    assert_eq!(
        s.get_log_state().await.expect("state").last_log_id,
        Some(entry(1, 7).log_id)
    );
    append(&mut s, vec![entry(2, 8)]).await;
    // Purging keeps the last purged id and drops the entries.
    s.purge(entry(1, 4).log_id).await.expect("purge");
    let st = s.get_log_state().await.expect("state");
    assert_eq!(st.last_purged_log_id, Some(entry(1, 4).log_id));
    assert_eq!(st.last_log_id, Some(entry(2, 8).log_id));
    assert!(s.try_get_log_entries(0..5).await.expect("read").is_empty());

    let vote = Vote::new_committed(2, 3);
    s.save_vote(&vote).await.expect("vote");
    drop(s);

    // Everything survives reopening.
    let mut s = open();
    let st = s.get_log_state().await.expect("state");
    assert_eq!(st.last_purged_log_id, Some(entry(1, 4).log_id));
    assert_eq!(st.last_log_id, Some(entry(2, 8).log_id));
    assert_eq!(s.read_vote().await.expect("vote"), Some(vote));
    let got = s.try_get_log_entries(5..).await.expect("read");
    assert_eq!(
        got.iter().map(|e| e.log_id).collect::<Vec<_>>(),
        [
            entry(1, 5).log_id,
            entry(1, 6).log_id,
            entry(1, 7).log_id,
            entry(2, 8).log_id
        ]
    );
}

#[tokio::test]
async fn log_store_on_memory() {
    exercise(Arc::new(MemoryEngine::new())).await;
}

#[tokio::test]
async fn log_store_on_rocksdb_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(dir.path(), &Default::default()).expect("open"));
    exercise(engine).await;
}

fn rocks(dir: &Path) -> Arc<dyn Engine> {
    Arc::new(RocksEngine::open(&dir.join("db"), &Default::default()).expect("open"))
}

fn in_wal(dir: &Path) -> Placement {
    Placement::Wal {
        dir: dir.join("wal"),
        segment_bytes: 4096,
        direct_io: true,
    }
}

fn in_engine(dir: &Path) -> Placement {
    Placement::Engine {
        wal_dir: Some(dir.join("wal")),
    }
}

#[tokio::test]
async fn log_store_on_its_own_segments_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = rocks(dir.path());
    exercise_with(|| LogStore::open_at(engine.clone(), true, in_wal(dir.path())).expect("open"))
        .await;
    // The entries are in the segments, not in the engine.
    assert!(!engine_holds_log(engine.as_ref()).expect("look"));
    assert!(dir.path().join("wal").is_dir());
}

/// What a log store holds: its bounds, committed id and every entry's id and payload.
async fn contents(s: &mut LogStore) -> (LogState<TypeConfig>, Option<LogId>, Vec<Entry>) {
    (
        s.get_log_state().await.expect("state"),
        s.read_committed().await.expect("committed"),
        s.try_get_log_entries(..).await.expect("read"),
    )
}

#[tokio::test]
async fn the_log_moves_between_the_engine_and_its_own_segments_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = rocks(dir.path());
    let mut s = LogStore::open_at(engine.clone(), true, in_engine(dir.path())).expect("open");
    append(&mut s, (0..=300).map(|i| entry(1 + i / 100, i)).collect()).await;
    s.purge(entry(1, 20).log_id).await.expect("purge");
    s.save_committed(Some(entry(3, 250).log_id))
        .await
        .expect("committed");
    append(&mut s, vec![entry(4, 301)]).await;
    let before = contents(&mut s).await;
    assert_eq!(before.2.len(), 281);
    drop(s);

    // Into segments of its own: the same log, and nothing left in the engine.
    let mut s = LogStore::open_at(engine.clone(), true, in_wal(dir.path())).expect("to wal");
    assert_eq!(contents(&mut s).await, before);
    assert!(!engine_holds_log(engine.as_ref()).expect("look"));
    assert!(
        std::fs::read_dir(dir.path().join("wal"))
            .expect("wal")
            .count()
            > 1,
        "4 KiB segments"
    );
    append(&mut s, vec![entry(4, 302)]).await;
    let with_302 = contents(&mut s).await;
    drop(s);

    // And back: the same again, and the segments gone.
    let mut s = LogStore::open_at(engine.clone(), true, in_engine(dir.path())).expect("back");
    assert_eq!(contents(&mut s).await, with_302);
    assert!(!dir.path().join("wal").exists());
    drop(s);
    let mut s = LogStore::open_at(engine, true, in_engine(dir.path())).expect("again");
    assert_eq!(contents(&mut s).await, with_302);
}

#[tokio::test]
async fn a_move_a_crash_interrupted_is_finished_at_the_next_start() {
    // Copied into `wal.new` but not renamed yet: the engine's log is still the log.
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = rocks(dir.path());
    let mut s = LogStore::open(engine.clone(), true).expect("open");
    append(&mut s, (1..=5).map(|i| entry(1, i)).collect()).await;
    let before = contents(&mut s).await;
    drop(s);
    std::fs::create_dir_all(dir.path().join("wal.new")).expect("mkdir");
    std::fs::write(dir.path().join("wal.new/0000000000000001.wal"), b"junk").expect("junk");
    let mut s = LogStore::open_at(engine.clone(), true, in_wal(dir.path())).expect("to wal");
    assert_eq!(contents(&mut s).await, before);
    assert!(!dir.path().join("wal.new").exists());
    drop(s);

    // Renamed into place but the engine not cleared yet: the segments are the log, and what
    // the engine still holds (here, other entries) is dropped.
    let mut b = WriteBatch::new();
    for i in 1..=9u64 {
        b.put(
            Table::RaftLog,
            index_key(i),
            codec::encode_entry(&entry(7, i)),
        );
    }
    engine.write(b, true).expect("write");
    let mut s = LogStore::open_at(engine.clone(), true, in_wal(dir.path())).expect("reopen");
    assert_eq!(contents(&mut s).await, before);
    assert!(!engine_holds_log(engine.as_ref()).expect("look"));
    drop(s);

    // Moving back, interrupted after the engine was filled but before the segments were
    // removed: the next start with either placement has the same log.
    std::fs::create_dir_all(dir.path().join("wal.old")).expect("mkdir");
    let mut s = LogStore::open_at(engine.clone(), true, in_engine(dir.path())).expect("back");
    assert_eq!(contents(&mut s).await, before);
    assert!(!dir.path().join("wal.old").exists());
}

#[tokio::test]
async fn entries_older_than_the_ones_kept_in_memory_come_from_the_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = rocks(dir.path());
    let mut s = LogStore::open_at(engine, true, in_wal(dir.path())).expect("open");
    let big = |i: u64| Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), i),
        payload: EntryPayload::Normal(Batch(vec![i as u8; 1 << 20].into())),
    };
    for i in 1..=24 {
        append(&mut s, vec![big(i)]).await;
    }
    let held = s.inner.wal.as_ref().map(|w| {
        let r = w.recent.lock().expect("lock");
        (r.entries.len(), r.bytes)
    });
    assert!(
        held.is_some_and(|(n, bytes)| n < 24 && bytes <= RECENT_BYTES),
        "{held:?}"
    );
    let got = s.try_get_log_entries(1..=24).await.expect("read");
    assert_eq!(got, (1..=24).map(big).collect::<Vec<_>>());
    // A range that starts in the segments and ends in memory, and a truncation of both.
    s.truncate(big(20).log_id).await.expect("truncate");
    let got = s.try_get_log_entries(3..30).await.expect("read");
    assert_eq!(got, (3..20).map(big).collect::<Vec<_>>());
    append(&mut s, vec![entry(2, 20)]).await;
    assert_eq!(
        s.try_get_log_entries(19..).await.expect("read"),
        vec![big(19), entry(2, 20)]
    );
}

#[tokio::test]
async fn purging_everything_leaves_the_purged_id_as_last() {
    let mut s = LogStore::open(Arc::new(MemoryEngine::new()), false).expect("open");
    append(&mut s, (1..=3).map(|i| entry(1, i)).collect()).await;
    s.purge(entry(1, 3).log_id).await.expect("purge");
    let st = s.get_log_state().await.expect("state");
    assert_eq!(st.last_purged_log_id, Some(entry(1, 3).log_id));
    assert_eq!(st.last_log_id, Some(entry(1, 3).log_id));
}

/// Records the writes and syncs the log store asks of the engine.
#[derive(Default)]
struct Recording {
    calls: std::sync::Mutex<Vec<&'static str>>,
    /// The operations of each write, in order.
    ops: std::sync::Mutex<Vec<Vec<crate::storage::engine::WriteOp>>>,
}

impl Recording {
    fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.lock().expect("lock"))
    }
}

impl EngineHook for Recording {
    fn write(&self, sync: bool) -> crate::storage::Result<()> {
        let call = if sync { "synced write" } else { "write" };
        self.calls.lock().expect("lock").push(call);
        Ok(())
    }
    fn sync(&self) -> crate::storage::Result<()> {
        self.calls.lock().expect("lock").push("sync");
        Ok(())
    }
    fn batch(&self, batch: &WriteBatch) {
        self.ops.lock().expect("lock").push(batch.ops().to_vec());
    }
}

/// A log store over a recording engine, holding entries 1..=3 of term 1.
async fn recorded(fsync: bool) -> (Arc<HookedEngine<Recording>>, LogStore) {
    let engine = HookedEngine::new(Recording::default());
    let mut s = LogStore::open(engine.clone(), fsync).expect("open");
    append(&mut s, (1..=3).map(|i| entry(1, i)).collect()).await;
    (engine, s)
}

#[tokio::test]
async fn entries_are_written_and_synced_in_one_step_before_they_count() {
    let (engine, mut s) = recorded(true).await;
    assert_eq!(engine.hook.take(), ["synced write"]);
    // An append of nothing still makes what was written before it durable.
    append(&mut s, Vec::new()).await;
    assert_eq!(engine.hook.take(), ["sync"]);
}

#[tokio::test]
async fn without_fsync_nothing_is_synced() {
    let (engine, _s) = recorded(false).await;
    assert_eq!(engine.hook.take(), ["write"]);
}

#[tokio::test]
async fn the_committed_id_is_written_with_the_next_append_and_may_trail_after_a_restart() {
    let (engine, mut s) = recorded(true).await;
    s.save_committed(Some(entry(1, 3).log_id))
        .await
        .expect("save");
    // No write of its own: it waits for the next append.
    assert_eq!(engine.hook.take(), ["synced write"]);
    assert_eq!(
        s.read_committed().await.expect("read"),
        Some(entry(1, 3).log_id)
    );
    append(&mut s, vec![entry(1, 4)]).await;
    assert_eq!(engine.hook.take(), ["synced write"]);
    s.save_committed(Some(entry(1, 4).log_id))
        .await
        .expect("save");
    drop(s);

    // Reopened: the id that went with the last append, one behind what was reported last.
    let mut s = LogStore::open(engine.clone(), true).expect("reopen");
    assert_eq!(
        s.read_committed().await.expect("read"),
        Some(entry(1, 3).log_id)
    );
}

#[tokio::test]
async fn a_purge_is_one_range_deletion_however_many_entries_it_drops() {
    let engine = HookedEngine::new(Recording::default());
    let mut s = LogStore::open(engine.clone(), true).expect("open");
    append(&mut s, (1..=1000).map(|i| entry(1, i)).collect()).await;
    engine.hook.ops.lock().expect("lock").clear();
    s.purge(entry(1, 900).log_id).await.expect("purge");
    let writes = std::mem::take(&mut *engine.hook.ops.lock().expect("lock"));
    assert_eq!(writes.len(), 1, "one write");
    let deletions: Vec<_> = writes[0]
        .iter()
        .filter(|op| !matches!(op, crate::storage::engine::WriteOp::Put { .. }))
        .collect();
    assert_eq!(deletions.len(), 1, "{deletions:?}");
    assert!(
        matches!(
            deletions[0],
            crate::storage::engine::WriteOp::DeleteRange { table: Table::RaftLog, start, end: Some(end) }
                if start == &index_key(0) && end == &index_key(901)
        ),
        "{deletions:?}"
    );
    // What it covers is gone and the rest is still there.
    assert!(s
        .try_get_log_entries(1..=900)
        .await
        .expect("read")
        .is_empty());
    let rest = s.try_get_log_entries(..).await.expect("read");
    assert_eq!(
        rest.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (901..=1000).collect::<Vec<_>>()
    );
}

#[test]
fn the_entries_kept_in_memory_count_their_bytes_through_every_change() {
    let total = |r: &Recent| r.entries.iter().map(entry_bytes).sum::<usize>();
    let indexes = |r: &Recent| r.entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>();
    let mut r = Recent::default();
    r.push(&(1..=10).map(|i| entry(1, i)).collect::<Vec<_>>());
    assert_eq!((r.first(), r.bytes), (Some(1), total(&r)));
    r.truncate(8);
    assert_eq!(indexes(&r), (1..=7).collect::<Vec<_>>());
    assert_eq!(r.bytes, total(&r));
    let gone: Vec<u64> = r.purge(3).iter().map(|e| e.log_id.index).collect();
    assert_eq!(gone, vec![1, 2, 3]);
    assert_eq!(indexes(&r), (4..=7).collect::<Vec<_>>());
    assert_eq!(r.bytes, total(&r));
    // Purging below what is held, or truncating above it, changes nothing.
    assert!(r.purge(1).is_empty());
    r.truncate(100);
    assert_eq!(indexes(&r), (4..=7).collect::<Vec<_>>());
    // A gap starts over.
    r.push(&[entry(2, 20)]);
    assert_eq!(indexes(&r), vec![20]);
    let big = |i: u64| Entry {
        log_id: LogId::new(CommittedLeaderId::new(2, 1), i),
        payload: EntryPayload::Normal(Batch(vec![0; RECENT_BYTES / 2 - 64].into())),
    };
    r.push(&[big(21), big(22)]);
    assert_eq!(indexes(&r), vec![21, 22]);
    assert_eq!(r.bytes, total(&r));
    r.push(&[big(23)]);
    assert_eq!(indexes(&r), vec![22, 23]);
    assert_eq!(r.bytes, total(&r));
    // An append larger than the budget is kept whole, alone.
    r.push(&[big(24), big(25), big(26)]);
    assert_eq!(indexes(&r), vec![24, 25, 26]);
    assert_eq!(r.bytes, total(&r));
    assert_eq!(r.purge(u64::MAX).len(), 3);
    assert_eq!((r.first(), r.bytes), (None, 0));
}
