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
    let mut s = LogStore::open(engine.clone(), true).expect("open");
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
    let mut s = LogStore::open(engine, true).expect("reopen");
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
