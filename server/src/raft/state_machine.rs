//! The replicated state machine: the MVCC store, driven by committed entries.
//!
//! # Applying
//! A normal entry carries a batch of commands; each is applied with [`apply::apply`] as
//! before, under its *apply position* `index << 20 | i + 1` (see [`command_position`]), which
//! the store records atomically with the command's writes. After the whole entry, the
//! position `index << 20 | 0xfffff` is recorded together with the entry's log id (and, for a
//! membership entry, the membership) in the Meta table. So after a crash in the middle of an
//! entry, openraft re-delivers it and the commands already applied are skipped: none is lost
//! or applied twice. The store is not fsynced per group: the Raft log is, and it shares the
//! engine's write-ahead log, so a durable log entry implies every earlier apply write.
//!
//! # Snapshots
//! A snapshot is the backup snapshot format ([`crate::storage::snapshot`]) of the
//! state-machine tables, in a file under the snapshot directory; the Meta table inside it
//! says which entry it ends at. A member alone in the membership records its snapshots
//! without the file and builds one only when a member that joined needs it
//! ([`RaftStateMachine::get_current_snapshot`]). Installing one replaces the tables, after
//! marking the install in the `RaftState` table, so a crash half-way redoes it at start-up
//! ([`recover_install`]).

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use metastore_proto::raftpb as pb;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot, StorageIOError};
use prost::Message;
use tokio::sync::watch;

use super::codec;
use super::waiters::Waiters;
use super::{
    command_position, entry_done_position, Entry, LogId, SnapshotMeta, StorageError,
    StoredMembership, TypeConfig,
};
use crate::apply::{self, ApplyError};
use crate::auth::AuthStore;
use crate::lease::Lessor;
use crate::migrate::online::Reencoder;
use crate::mvcc::{self, Store};
use crate::server::proposer::ApplyObserver;
use crate::storage::{snapshot as snapfile, Engine, Table, WriteBatch};
use crate::watch::WatchHub;

/// Meta-table keys (the `raft/` prefix is dropped by `metastore snapshot restore`).
pub const META_APPLIED: &[u8] = b"raft/applied";
pub const META_MEMBERSHIP: &[u8] = b"raft/membership";
/// RaftState keys.
const STATE_SNAPSHOT: &[u8] = b"snapshot";
const STATE_INSTALLING: &[u8] = b"installing";

fn sm_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::write_state_machine(openraft::AnyError::error(e.to_string())).into()
}

fn snap_err(e: impl std::fmt::Display) -> StorageError {
    StorageIOError::read_snapshot(None, openraft::AnyError::error(e.to_string())).into()
}

/// What the state machine shares with the rest of the node.
pub struct Context {
    pub store: Arc<Store>,
    pub lessor: Arc<Lessor>,
    pub watch: Arc<WatchHub>,
    pub waiters: Arc<Waiters>,
    pub member_id: u64,
    /// Where snapshot files live.
    pub snap_dir: PathBuf,
    /// The last applied Raft index, for linearizable reads waiting on it.
    pub applied: watch::Sender<u64>,
    pub observer: Arc<dyn ApplyObserver>,
    /// Re-encodes records in the background after a storage-format switch.
    pub reencoder: Arc<Reencoder>,
    /// Users, roles and permissions (the `auth` table's mirror).
    pub auth: Arc<AuthStore>,
    /// The file a snapshot is being received into.
    receiving: Mutex<Option<PathBuf>>,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        lessor: Arc<Lessor>,
        watch: Arc<WatchHub>,
        waiters: Arc<Waiters>,
        member_id: u64,
        snap_dir: PathBuf,
        observer: Arc<dyn ApplyObserver>,
        reencoder: Arc<Reencoder>,
        auth: Arc<AuthStore>,
    ) -> Result<Arc<Self>, StorageError> {
        std::fs::create_dir_all(&snap_dir).map_err(sm_err)?;
        remove_unfinished(&snap_dir)?;
        let applied = read_applied(&store)?.map_or(0, |l| l.index);
        Ok(Arc::new(Self {
            store,
            lessor,
            watch,
            waiters,
            member_id,
            snap_dir,
            applied: watch::channel(applied).0,
            observer,
            reencoder,
            auth,
            receiving: Mutex::new(None),
        }))
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let resume = self.store.applied_index();
        let mut applying = self.store.applier().map_err(sm_err)?;
        let mut events = Vec::new();
        let mut replies = Vec::new();
        let mut last = None;
        let mut commands = 0;
        let mut switched = false;
        for e in entries {
            let index = e.log_id.index;
            let mut meta = vec![(
                META_APPLIED.to_vec(),
                codec::log_id_to_pb(&e.log_id).encode_to_vec(),
            )];
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    let batch = pb::CommandBatch::decode(batch.0).map_err(sm_err)?;
                    for (i, p) in batch.proposals.into_iter().enumerate() {
                        let pos = command_position(index, i);
                        if pos <= resume {
                            continue;
                        }
                        commands += 1;
                        let Some(cmd) = p.command.and_then(codec::command_from_pb) else {
                            applying.skip(pos).map_err(sm_err)?;
                            continue;
                        };
                        if let apply::Command::SetStorageFormat(to) = cmd {
                            // The switch was checked against every member before it was
                            // proposed; a member that cannot write the format anyway (its
                            // binary was replaced since) stops here rather than go on in
                            // another format than the cluster believes it writes.
                            if !crate::storage::codec::is_supported(to) {
                                tracing::error!(
                                    index,
                                    format = to,
                                    supported = ?crate::storage::codec::supported_formats(),
                                    "the cluster switched to a storage format this binary \
                                     cannot write; stopping: upgrade this member's binary"
                                );
                                return Err(sm_err(mvcc::Error::UnsupportedFormat(to)));
                            }
                        }
                        let mut r = apply::apply(
                            &mut applying,
                            pos,
                            &cmd,
                            self.lessor.as_ref(),
                            &self.auth,
                        );
                        if let (apply::Command::SetStorageFormat(to), Ok(_)) = (&cmd, &r) {
                            // Before any record in the new format is written.
                            self.reencoder.switched(*to).map_err(sm_err)?;
                            switched = true;
                        }
                        match &mut r {
                            Err(ApplyError::Mvcc(mvcc::Error::Storage(s))) => {
                                return Err(sm_err(s));
                            }
                            Err(ApplyError::Mvcc(mvcc::Error::Closed)) => {
                                return Err(sm_err("store closed"));
                            }
                            Ok(a) => events.append(&mut a.events),
                            Err(_) => {}
                        }
                        if p.origin == self.member_id {
                            replies.push((p.seq, r));
                        }
                    }
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(e.log_id), m);
                    meta.push((
                        META_MEMBERSHIP.to_vec(),
                        codec::stored_membership_to_pb(&stored).encode_to_vec(),
                    ));
                }
            }
            let done = entry_done_position(index);
            if done > resume {
                applying.record(done, meta).map_err(sm_err)?;
            }
            last = Some(index);
        }
        let rev = applying.publish().map_err(sm_err)?;
        if !events.is_empty() {
            self.watch.notify(events, rev);
        }
        // Publish the applied index before answering, so a client that got its answer and
        // asks a linearizable read or Status next sees at least its own entry.
        if let Some(i) = last {
            self.applied.send_replace(i);
        }
        if switched {
            self.reencoder.kick();
        }
        for (seq, r) in replies {
            self.waiters.complete(seq, r);
        }
        self.observer.group_applied(commands);
        Ok(())
    }

    /// Records a snapshot of everything applied so far and returns its meta, with its file.
    /// The file is written only when another member could need it (`shared_only`), or
    /// always: a member alone in the membership records the meta only, which is all the log
    /// purge that follows needs, and no follower will ever ask it for the data. A member that
    /// joins later gets a file built then ([`RaftStateMachine::get_current_snapshot`]).
    fn build_snapshot(
        &self,
        shared_only: bool,
    ) -> Result<(SnapshotMeta, Option<PathBuf>), StorageError> {
        let engine = self.store.engine();
        // Make the applied state durable: the log up to the snapshot may be purged after this.
        engine.sync().map_err(sm_err)?;
        let snap = engine.snapshot();
        let last_log_id = match snap.get(Table::Meta, META_APPLIED).map_err(sm_err)? {
            Some(v) => Some(codec::log_id_from_pb(
                &pb::LogId::decode(v.as_slice()).map_err(sm_err)?,
            )),
            None => None,
        };
        let last_membership = match snap.get(Table::Meta, META_MEMBERSHIP).map_err(sm_err)? {
            Some(v) => codec::stored_membership_from_pb(
                &pb::StoredMembership::decode(v.as_slice()).map_err(sm_err)?,
            ),
            None => StoredMembership::default(),
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let snapshot_id = match &last_log_id {
            Some(l) => format!(
                "{}-{}-{}-{nanos}",
                l.leader_id.term, l.leader_id.node_id, l.index
            ),
            None => format!("0-0-0-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        if shared_only && alone(&meta.last_membership, self.member_id) {
            drop(snap);
            // Also removes the files of earlier snapshots: the current one has none.
            self.set_current(&meta)?;
            tracing::info!(snapshot = %meta.snapshot_id, "recorded a Raft snapshot (no file: no other member)");
            return Ok((meta, None));
        }
        let tmp = self.snap_dir.join(format!("{}.tmp", meta.snapshot_id));
        let path = self.snapshot_path(&meta);
        {
            let mut f = SyncEvery::new(std::fs::File::create(&tmp).map_err(sm_err)?);
            snapfile::write_snapshot(snap.as_ref(), &mut f, &mut |_| {}).map_err(sm_err)?;
            f.file.sync_all().map_err(sm_err)?;
        }
        drop(snap);
        std::fs::rename(&tmp, &path).map_err(sm_err)?;
        self.set_current(&meta)?;
        tracing::info!(snapshot = %meta.snapshot_id, "built a Raft snapshot");
        Ok((meta, Some(path)))
    }

    fn snapshot_path(&self, meta: &SnapshotMeta) -> PathBuf {
        snapshot_file(&self.snap_dir, meta)
    }

    /// Records `meta` as the current snapshot and removes older snapshot files.
    fn set_current(&self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        let mut b = WriteBatch::new();
        b.put(
            Table::RaftState,
            STATE_SNAPSHOT.to_vec(),
            codec::snapshot_meta_to_pb(meta).encode_to_vec(),
        );
        b.delete(Table::RaftState, STATE_INSTALLING.to_vec());
        self.store.engine().write(b, true).map_err(sm_err)?;
        let keep = self.snapshot_path(meta);
        if let Ok(dir) = std::fs::read_dir(&self.snap_dir) {
            for f in dir.flatten() {
                let p = f.path();
                let is_snap = p.extension().is_some_and(|e| e == "snap");
                if is_snap && p != keep {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        Ok(())
    }

    fn current(&self) -> Result<Option<SnapshotMeta>, StorageError> {
        read_state_meta(self.store.engine().as_ref(), STATE_SNAPSHOT)
    }

    /// Replaces the state machine with the snapshot in `received`.
    fn install(&self, meta: &SnapshotMeta, received: &Path) -> Result<(), StorageError> {
        let info =
            snapfile::verify(std::fs::File::open(received).map_err(snap_err)?).map_err(snap_err)?;
        let path = self.snapshot_path(meta);
        std::fs::rename(received, &path).map_err(sm_err)?;
        let engine = self.store.engine();
        let mut b = WriteBatch::new();
        b.put(
            Table::RaftState,
            STATE_INSTALLING.to_vec(),
            codec::snapshot_meta_to_pb(meta).encode_to_vec(),
        );
        engine.write(b, true).map_err(sm_err)?;
        {
            // No background rewrite may write a record of the old content into the new.
            let _background = self.store.background_lock().lock().map_err(sm_err)?;
            load_file(engine.as_ref(), &path)?;
        }
        self.store.reload().map_err(sm_err)?;
        self.auth.reload().map_err(sm_err)?;
        self.lessor.restore(&self.store.leases().map_err(sm_err)?);
        self.watch.resync(self.store.current_revision());
        self.set_current(meta)?;
        // The snapshot holds the leader's records as the leader had them, possibly in another
        // format than the cluster now writes, with the leader's migration cursor and target
        // (meta): the re-encoder picks the migration up from there, and the stamp must allow
        // every format the records may now be in.
        if let Some(f) = self
            .store
            .meta(mvcc::store::META_STORAGE_FORMAT)
            .map_err(sm_err)?
        {
            if let Some(f) = f.first() {
                self.reencoder.switched(*f).map_err(sm_err)?;
            }
        }
        self.reencoder.kick();
        if let Some(l) = &meta.last_log_id {
            self.applied.send_replace(l.index);
        }
        tracing::info!(
            snapshot = %meta.snapshot_id,
            revision = self.store.current_revision(),
            snapshot_revision = info.header.revision,
            "installed a Raft snapshot from the leader"
        );
        Ok(())
    }
}

/// Gives the calling thread the lowest CPU priority (nice 19; on Linux a thread's own). A
/// failure is logged and otherwise ignored: the work only runs at the normal priority.
fn lower_thread_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), 19) {
        tracing::debug!(error = %e, "could not lower the snapshot thread's priority");
    }
}

/// How many bytes of a snapshot being built may be written before they are synced.
const SYNC_STEP: u64 = 1 << 20;

/// A file made durable every [`SYNC_STEP`] bytes as it is written, so that building a
/// snapshot never leaves more than that for the kernel to write back at once. With one sync
/// at the end, the whole snapshot (125 MB after 360,000 puts) went to the disk in one burst,
/// and the Raft log's fsyncs queued behind it: puts saw 90–110 ms at p99 in that second
/// (docs/PERFORMANCE.md, session 27).
struct SyncEvery {
    file: std::fs::File,
    unsynced: u64,
}

impl SyncEvery {
    fn new(file: std::fs::File) -> Self {
        Self { file, unsynced: 0 }
    }
}

impl std::io::Write for SyncEvery {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_STEP {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Removes the `.tmp` files in `snap_dir`: snapshots a build or a receive did not finish
/// (a crash, or an exit while a build was still writing: the build's thread is not waited
/// for beyond the shutdown's bound). Nothing reads them; a finished file is renamed first.
fn remove_unfinished(snap_dir: &Path) -> Result<(), StorageError> {
    for entry in std::fs::read_dir(snap_dir).map_err(sm_err)?.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            tracing::info!(path = %path.display(), "removing an unfinished snapshot file");
            std::fs::remove_file(&path).map_err(sm_err)?;
        }
    }
    Ok(())
}

/// The file of snapshot `meta` in `snap_dir` (ids come from peers: only safe characters).
fn snapshot_file(snap_dir: &Path, meta: &SnapshotMeta) -> PathBuf {
    let safe: String = meta
        .snapshot_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    snap_dir.join(format!("{safe}.snap"))
}

fn load_file(engine: &dyn Engine, path: &Path) -> Result<(), StorageError> {
    let mut f = std::fs::File::open(path).map_err(snap_err)?;
    f.seek(SeekFrom::Start(0)).map_err(snap_err)?;
    snapfile::load(std::io::BufReader::new(f), engine, &mut |_| {}).map_err(sm_err)?;
    Ok(())
}

fn read_state_meta(engine: &dyn Engine, key: &[u8]) -> Result<Option<SnapshotMeta>, StorageError> {
    match engine.get(Table::RaftState, key).map_err(sm_err)? {
        None => Ok(None),
        Some(v) => Ok(Some(codec::snapshot_meta_from_pb(
            &pb::SnapshotMeta::decode(v.as_slice()).map_err(sm_err)?,
        ))),
    }
}

fn read_applied(store: &Store) -> Result<Option<LogId>, StorageError> {
    match store.meta(META_APPLIED).map_err(sm_err)? {
        None => Ok(None),
        Some(v) => Ok(Some(codec::log_id_from_pb(
            &pb::LogId::decode(v.as_slice()).map_err(sm_err)?,
        ))),
    }
}

/// Finishes a snapshot install a crash interrupted. Call before opening the store.
pub fn recover_install(engine: &dyn Engine, snap_dir: &Path) -> Result<(), StorageError> {
    let Some(meta) = read_state_meta(engine, STATE_INSTALLING)? else {
        return Ok(());
    };
    tracing::warn!(snapshot = %meta.snapshot_id, "finishing an interrupted snapshot install");
    load_file(engine, &snapshot_file(snap_dir, &meta))?;
    let mut b = WriteBatch::new();
    b.put(
        Table::RaftState,
        STATE_SNAPSHOT.to_vec(),
        codec::snapshot_meta_to_pb(&meta).encode_to_vec(),
    );
    b.delete(Table::RaftState, STATE_INSTALLING.to_vec());
    engine.write(b, true).map_err(sm_err)
}

/// The state machine openraft drives.
pub struct StateMachine {
    ctx: Arc<Context>,
    /// Whether openraft asked for the current snapshot before (see
    /// [`get_current_snapshot`](RaftStateMachine::get_current_snapshot)).
    asked_before: bool,
}

impl StateMachine {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self {
            ctx,
            asked_before: false,
        }
    }
}

/// Whether `member` is the only member of `membership`, voter or learner: then no other
/// member can ask it for a snapshot.
fn alone(membership: &StoredMembership, member: u64) -> bool {
    let m = membership.membership();
    m.voter_ids().all(|id| id == member) && m.learner_ids().next().is_none()
}

/// Runs `build` on a thread of its own at the lowest CPU priority: building reads and
/// hashes the whole store, and on a busy machine it must take the cores' idle time, not the
/// request path's (docs/PERFORMANCE.md, session 27).
async fn build_in_background(
    ctx: Arc<Context>,
    shared_only: bool,
) -> Result<(SnapshotMeta, Option<PathBuf>), StorageError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("snapshot-build".into())
        .spawn(move || {
            lower_thread_priority();
            let _ = tx.send(ctx.build_snapshot(shared_only));
        })
        .map_err(sm_err)?;
    rx.await.map_err(sm_err)?
}

/// Builds snapshots off the apply path.
pub struct SnapshotBuilder {
    ctx: Arc<Context>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (meta, path) = build_in_background(self.ctx.clone(), true).await?;
        let file = match path {
            Some(path) => tokio::fs::File::open(&path).await.map_err(snap_err)?,
            // openraft 0.9 keeps only the meta of a snapshot it had built (its state-machine
            // worker and its start-up); what it sends a follower always comes from
            // `get_current_snapshot`, which never returns this. An empty file, so that even
            // sent it would fail the follower's verification rather than install anything.
            None => tokio::fs::File::from_std(
                tempfile::tempfile_in(&self.ctx.snap_dir).map_err(sm_err)?,
            ),
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = read_applied(&self.ctx.store)?;
        let membership = match self.ctx.store.meta(META_MEMBERSHIP).map_err(sm_err)? {
            Some(v) => codec::stored_membership_from_pb(
                &pb::StoredMembership::decode(v.as_slice()).map_err(sm_err)?,
            ),
            None => StoredMembership::default(),
        };
        Ok((applied, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let n = entries.len();
        // Applied right here, on openraft's state-machine task: the apply is CPU work (tens of
        // microseconds for a small group, milliseconds for a full one) that nothing else may
        // run beside, and a hop to a blocking thread (`spawn_blocking`) or handing this
        // worker's other tasks away (`block_in_place`) cost more in thread wake-ups than it
        // spared (docs/PERFORMANCE.md).
        self.ctx.apply_entries(entries)?;
        Ok(vec![(); n])
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            ctx: self.ctx.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = self.ctx.snap_dir.join(format!("recv-{nanos}.tmp"));
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .await
            .map_err(sm_err)?;
        if let Ok(mut r) = self.ctx.receiving.lock() {
            if let Some(old) = r.replace(path) {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        snapshot.sync_all().await.map_err(sm_err)?;
        drop(snapshot);
        let path = self
            .ctx
            .receiving
            .lock()
            .ok()
            .and_then(|mut r| r.take())
            .ok_or_else(|| sm_err("no snapshot is being received"))?;
        let ctx = self.ctx.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || ctx.install(&meta, &path))
            .await
            .map_err(sm_err)?
    }

    /// The current snapshot with its file. openraft asks at start-up, for the meta alone,
    /// and then whenever a follower needs the data. A snapshot recorded while this member was
    /// alone has no file: at start-up that is answered with none (openraft then records one
    /// again, cheaply, if the log was purged), afterwards by building the file now, from
    /// what is applied now. The apply waits for that build (openraft runs this between
    /// applies), once, when a member joined after the last snapshot; openraft accepts a
    /// snapshot newer than the one it picked.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let at_start = !std::mem::replace(&mut self.asked_before, true);
        let Some(meta) = self.ctx.current()? else {
            return Ok(None);
        };
        let (meta, path) = match tokio::fs::File::open(self.ctx.snapshot_path(&meta)).await {
            Ok(file) => {
                return Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(file),
                }))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(snap_err(e)),
            Err(_) if at_start => return Ok(None),
            Err(_) => {
                tracing::info!(snapshot = %meta.snapshot_id, "a follower needs a snapshot: building its file");
                build_in_background(self.ctx.clone(), false).await?
            }
        };
        let path = path.ok_or_else(|| snap_err("a snapshot was built without its file"))?;
        let file = tokio::fs::File::open(&path).await.map_err(snap_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn a_snapshot_file_is_synced_every_step_and_holds_every_byte() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s");
        let mut f = SyncEvery::new(std::fs::File::create(&path).expect("create"));
        let chunk: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        let mut steps = 0;
        let mut written = 0u64;
        for _ in 0..12 {
            let before = f.unsynced;
            f.write_all(&chunk).expect("write");
            written += chunk.len() as u64;
            // Never more than one step's worth written since the last sync.
            assert!(f.unsynced < SYNC_STEP, "{} unsynced", f.unsynced);
            if f.unsynced < before + chunk.len() as u64 {
                steps += 1;
            }
        }
        assert!(steps >= 3, "3.6 MB written in 1 MiB steps: {steps}");
        f.flush().expect("flush");
        drop(f);
        let back = std::fs::read(&path).expect("read");
        assert_eq!(back.len() as u64, written);
        assert!(back.chunks(chunk.len()).all(|c| c == chunk.as_slice()));
    }

    #[test]
    fn the_snapshot_thread_runs_at_the_lowest_priority_and_no_other_does() {
        let own =
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("priority");
        let lowered = std::thread::spawn(|| {
            lower_thread_priority();
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("priority")
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, 19);
        assert_eq!(
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("priority"),
            own
        );
    }
}
