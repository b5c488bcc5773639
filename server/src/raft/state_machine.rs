//! The replicated state machine: the MVCC store, driven by committed entries.
//!
//! # Applying
//! A normal entry carries a batch of commands; each is applied with [`apply::apply`] as
//! before, under its *apply position* `index << 20 | i + 1` (see [`command_position`]), which
//! the store records atomically with the command's writes. After the whole entry, the
//! position `index << 20 | 0xfffff` is recorded together with the entry's log id (and, for a
//! membership entry, the membership) in the Meta table. So after a crash in the middle of an
//! entry, openraft re-delivers it and the commands already applied are skipped: none is lost
//! or applied twice. The store is not fsynced per group: the Raft log is. A crash (of the
//! machine) may lose the last apply writes, and openraft applies their entries again from the
//! log, which keeps everything after the last snapshot: a snapshot syncs the engine before the
//! log before it may be purged. (With `--raft-log-store engine` the log shares the engine's
//! write-ahead log, so a durable entry also implies every earlier apply write.)
//!
//! # Snapshots
//! A snapshot is the backup snapshot format ([`crate::storage::snapshot`]) of the
//! state-machine tables, in a file under the snapshot directory; the Meta table inside it
//! says which entry it ends at. The snapshots taken every `--snapshot-count` commands, which
//! let the log be purged (up to where its newest 5,000 commands begin, [`super::kept_log`]),
//! are recorded without a file: the engine is synced and the snapshot's log id and membership
//! are written down. A file is built only when a
//! follower needs one (it is behind the purged log), from what is applied then, on a thread
//! of its own while applies go on ([`RaftStateMachine::get_current_snapshot`],
//! [`snapshot_data`](super::snapshot_data)); as etcd sends its live database only to a
//! follower that needs it. Installing one replaces the tables, after marking the install in
//! the `RaftState` table, so a crash half-way redoes it at start-up ([`recover_install`]).

use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use metastore_proto::raftpb as pb;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, RaftSnapshotBuilder, Snapshot, StorageIOError};
use prost::Message;
use tokio::sync::watch;

use super::codec;
use super::kept_log::{KeptLog, PurgeHint};
use super::snapshot_data::{Build, Finisher, SnapshotData};
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
use crate::storage::{snapshot as snapfile, Engine, Snapshot as EngineSnapshot, Table, WriteBatch};
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
    /// Held while the current snapshot changes (recorded, built, installed), so that one
    /// change never removes the file another is about to record.
    snapshot_lock: Mutex<()>,
    /// The last snapshot built for a follower, finished or not, shared by the followers
    /// that need one while it is recent enough.
    for_followers: Mutex<Option<(SnapshotMeta, Arc<Build>)>>,
    /// Commands applied since the last snapshot, against `--snapshot-count`.
    snapshot_due: Arc<SnapshotDue>,
    /// The newest entries' commands, for what to keep of the log after a snapshot.
    kept: Mutex<KeptLog>,
    /// Where the last snapshot lets the log be purged to, counted in commands.
    purge: Arc<PurgeHint>,
}

/// Whether a snapshot is due: the commands applied since the last one, against
/// `--snapshot-count` (0: never by this count, only by openraft's policy).
#[derive(Debug, Default)]
pub struct SnapshotDue {
    every: AtomicU64,
    since: AtomicU64,
    /// Woken by each apply while a snapshot is due, so a trigger that was ignored (one was
    /// already being taken) is made again.
    wake: tokio::sync::Notify,
}

impl SnapshotDue {
    fn count(&self, commands: u64) {
        let every = self.every.load(Ordering::Relaxed);
        if every > 0 && self.since.fetch_add(commands, Ordering::Relaxed) + commands >= every {
            self.wake.notify_one();
        }
    }

    /// A snapshot was taken: the count starts again.
    fn restart(&self) {
        self.since.store(0, Ordering::Relaxed);
    }

    fn is_due(&self) -> bool {
        let every = self.every.load(Ordering::Relaxed);
        every > 0 && self.since.load(Ordering::Relaxed) >= every
    }

    /// Returns once a snapshot is due. A wake-up left from applies that came before the last
    /// snapshot was taken (they go on while it is recorded) is let pass: acting on it took a
    /// second snapshot right after the first, for next to nothing.
    pub async fn wait(&self) {
        loop {
            self.wake.notified().await;
            if self.is_due() {
                return;
            }
        }
    }
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
            snapshot_lock: Mutex::new(()),
            for_followers: Mutex::new(None),
            snapshot_due: Arc::new(SnapshotDue::default()),
            kept: Mutex::new(KeptLog::new(0)),
            purge: Arc::new(PurgeHint::default()),
        }))
    }

    /// Asks for a snapshot every `commands` applied commands, as etcd's `--snapshot-count`
    /// counts requests: an entry carries a whole group of commands (up to 1,024), so
    /// openraft's policy, which counts entries, would let the log grow a thousand times
    /// longer under load. [`SnapshotDue::wait`] tells when one is due.
    pub fn snapshot_every(&self, commands: u64) {
        self.snapshot_due.every.store(commands, Ordering::Relaxed);
    }

    /// What tells when `--snapshot-count` commands have been applied since the last snapshot
    /// (the server then triggers one), for a task that must not keep the state machine alive.
    pub fn snapshot_due_signal(&self) -> Arc<SnapshotDue> {
        self.snapshot_due.clone()
    }

    /// After a snapshot, offers to purge the log up to where the newest `commands` applied
    /// commands begin (etcd keeps its last 5,000 requests; see [`super::kept_log`]).
    /// [`purge_hint`](Self::purge_hint) tells the point.
    pub fn keep_commands(&self, commands: u64) -> Result<(), StorageError> {
        *self.kept.lock().map_err(sm_err)? = KeptLog::new(commands);
        Ok(())
    }

    /// Where snapshots let the log be purged to, for the task that asks openraft to.
    pub fn purge_hint(&self) -> Arc<PurgeHint> {
        self.purge.clone()
    }

    fn apply_entries(&self, entries: Vec<Entry>) -> Result<(), StorageError> {
        let resume = self.store.applied_index();
        let mut applying = self.store.applier().map_err(sm_err)?;
        let mut events = Vec::new();
        let mut replies = Vec::new();
        let mut last = None;
        let mut commands = 0;
        let mut switched = false;
        let mut kept = self.kept.lock().map_err(sm_err)?;
        for e in entries {
            let index = e.log_id.index;
            let mut carried = 0;
            let mut meta = vec![(
                META_APPLIED.to_vec(),
                codec::log_id_to_pb(&e.log_id).encode_to_vec(),
            )];
            match e.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    let batch = pb::CommandBatch::decode(batch.0).map_err(sm_err)?;
                    carried = batch.proposals.len() as u64;
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
            kept.applied(index, carried);
            last = Some(index);
        }
        drop(kept);
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
        self.snapshot_due.count(commands as u64);
        Ok(())
    }

    /// Records a snapshot of everything applied so far, without a file, and returns its
    /// meta: the engine is made durable (the log up to the snapshot may be purged after
    /// this) and the snapshot's log id and membership are written down. A follower that
    /// needs the data gets a file built then ([`Context::build_for_followers`]).
    fn record_snapshot(&self) -> Result<SnapshotMeta, StorageError> {
        let engine = self.store.engine();
        self.snapshot_due.restart();
        // The meta first: the sync then covers everything it names (applies go on meanwhile).
        let meta = meta_of(engine.snapshot().as_ref())?;
        engine.sync().map_err(sm_err)?;
        if let Some(upto) = meta
            .last_log_id
            .and_then(|id| self.kept.lock().ok().and_then(|k| k.purge_upto(id.index)))
        {
            self.purge.offer(upto);
        }
        let _changing = self.snapshot_lock.lock().map_err(sm_err)?;
        // A file built for a follower meanwhile may be newer: then it stays the current one.
        if self
            .current()?
            .is_none_or(|c| meta.last_log_id > c.last_log_id)
        {
            self.set_current(&meta)?;
        }
        tracing::info!(snapshot = %meta.snapshot_id, "recorded a Raft snapshot");
        Ok(meta)
    }

    /// Starts building a snapshot file of what is applied now, on a thread of its own at the
    /// lowest CPU priority, and returns as soon as the engine snapshot it is built from is
    /// taken: with its meta and the build, which readers wait for. Building reads, encodes
    /// and hashes the whole store; openraft asks for a snapshot between applies, which would
    /// otherwise wait for all of it.
    async fn build_for_followers(
        self: &Arc<Self>,
    ) -> Result<(SnapshotMeta, Arc<Build>), StorageError> {
        let build = Build::new();
        let (taken, meta) = tokio::sync::oneshot::channel();
        let (ctx, finisher) = (self.clone(), Finisher(build.clone()));
        std::thread::Builder::new()
            .name("snapshot-build".into())
            .spawn(move || {
                lower_thread_priority();
                ctx.write_for_followers(taken, finisher);
            })
            .map_err(sm_err)?;
        let meta = meta.await.map_err(sm_err)??;
        Ok((meta, build))
    }

    /// The build thread of [`build_for_followers`](Self::build_for_followers).
    fn write_for_followers(
        &self,
        taken: tokio::sync::oneshot::Sender<Result<SnapshotMeta, StorageError>>,
        build: Finisher,
    ) {
        let engine = self.store.engine();
        // The snapshot first, as in `record_snapshot`: the sync then covers all it holds.
        let snap = engine.snapshot();
        let snap_and_meta = meta_of(snap.as_ref())
            .and_then(|meta| engine.sync().map_err(sm_err).map(|()| (meta, snap)));
        let (meta, snap) = match snap_and_meta {
            Ok(taken_now) => taken_now,
            Err(e) => {
                let _ = taken.send(Err(e));
                return;
            }
        };
        let _ = taken.send(Ok(meta.clone()));
        let result = self.write_file(snap.as_ref(), &meta);
        drop(snap);
        build.0.finish(result.map_err(|e| e.to_string()));
    }

    /// Writes the snapshot file of `snap` (whose meta is `meta`), synced as it grows, and
    /// records it as the current snapshot unless a newer one was recorded meanwhile (then the
    /// file is removed; readers hold it open). Returns the file, open for reading.
    fn write_file(
        &self,
        snap: &dyn EngineSnapshot,
        meta: &SnapshotMeta,
    ) -> Result<std::fs::File, StorageError> {
        let tmp = self.snap_dir.join(format!("{}.tmp", meta.snapshot_id));
        let path = self.snapshot_path(meta);
        {
            let mut f = SyncEvery::new(std::fs::File::create(&tmp).map_err(sm_err)?);
            snapfile::write_snapshot(snap, &mut f, &mut |_| {}).map_err(sm_err)?;
            f.file.sync_all().map_err(sm_err)?;
        }
        let file = std::fs::File::open(&tmp).map_err(sm_err)?;
        let _changing = self.snapshot_lock.lock().map_err(sm_err)?;
        std::fs::rename(&tmp, &path).map_err(sm_err)?;
        if self
            .current()?
            .is_none_or(|c| meta.last_log_id >= c.last_log_id)
        {
            self.set_current(meta)?;
            tracing::info!(snapshot = %meta.snapshot_id, "built a Raft snapshot file for a follower");
        } else {
            let _ = std::fs::remove_file(&path);
            // Nothing shares it any more: its open file must not outlive the readers it has.
            self.forget_build_if(|m| m.snapshot_id == meta.snapshot_id);
            tracing::info!(snapshot = %meta.snapshot_id, "built a Raft snapshot file for a follower (a newer snapshot was recorded meanwhile)");
        }
        Ok(file)
    }

    /// Stops sharing the build for followers if `stale` says so of its meta.
    fn forget_build_if(&self, stale: impl FnOnce(&SnapshotMeta) -> bool) {
        if let Ok(mut shared) = self.for_followers.lock() {
            shared.take_if(|(m, _)| stale(m));
        }
    }

    fn snapshot_path(&self, meta: &SnapshotMeta) -> PathBuf {
        snapshot_file(&self.snap_dir, meta)
    }

    /// Records `meta` as the current snapshot and removes older snapshot files, and forgets an
    /// older build for followers (whose open file would otherwise keep its disk space).
    fn set_current(&self, meta: &SnapshotMeta) -> Result<(), StorageError> {
        self.forget_build_if(|m| m.last_log_id < meta.last_log_id);
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
        let _changing = self.snapshot_lock.lock().map_err(sm_err)?;
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

/// The meta of a snapshot of `snap`: the log id and membership of the last entry applied
/// in it (recorded with that entry's writes), and a new id.
fn meta_of(snap: &dyn EngineSnapshot) -> Result<SnapshotMeta, StorageError> {
    let last_log_id = decode_applied(snap.get(Table::Meta, META_APPLIED).map_err(sm_err)?)?;
    let last_membership =
        decode_membership(snap.get(Table::Meta, META_MEMBERSHIP).map_err(sm_err)?)?;
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
    Ok(SnapshotMeta {
        last_log_id,
        last_membership,
        snapshot_id,
    })
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
    decode_applied(store.meta(META_APPLIED).map_err(sm_err)?)
}

/// The log id recorded under [`META_APPLIED`], if any.
fn decode_applied(v: Option<Vec<u8>>) -> Result<Option<LogId>, StorageError> {
    v.map(|v| {
        pb::LogId::decode(v.as_slice())
            .map(|l| codec::log_id_from_pb(&l))
            .map_err(sm_err)
    })
    .transpose()
}

/// The membership recorded under [`META_MEMBERSHIP`] (the default one if none).
fn decode_membership(v: Option<Vec<u8>>) -> Result<StoredMembership, StorageError> {
    match v {
        Some(v) => Ok(codec::stored_membership_from_pb(
            &pb::StoredMembership::decode(v.as_slice()).map_err(sm_err)?,
        )),
        None => Ok(StoredMembership::default()),
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

/// Builds snapshots off the apply path.
pub struct SnapshotBuilder {
    ctx: Arc<Context>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let ctx = self.ctx.clone();
        let meta = tokio::task::spawn_blocking(move || ctx.record_snapshot())
            .await
            .map_err(sm_err)??;
        // openraft 0.9 keeps only the meta of a snapshot it had built (its state-machine
        // worker and its start-up); what it sends a follower always comes from
        // `get_current_snapshot`, which never returns this. An empty file, so that even sent
        // it would fail the follower's verification rather than install anything.
        let placeholder = tempfile::tempfile_in(&self.ctx.snap_dir).map_err(sm_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::file(tokio::fs::File::from_std(placeholder))),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let applied = read_applied(&self.ctx.store)?;
        let membership = decode_membership(self.ctx.store.meta(META_MEMBERSHIP).map_err(sm_err)?)?;
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
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
        Ok(Box::new(SnapshotData::file(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let file = snapshot
            .into_file()
            .ok_or_else(|| sm_err("a snapshot can only be installed from a received file"))?;
        file.sync_all().await.map_err(sm_err)?;
        drop(file);
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

    /// The current snapshot with its data. openraft asks at start-up, for the meta alone,
    /// and then whenever a follower needs the data. The snapshots openraft records have no
    /// file: at start-up that is answered with none (openraft then records one again,
    /// cheaply, if the log was purged). For a follower, the current snapshot's file if it has
    /// one (one built for another follower, or received), otherwise the build of a file of
    /// what is applied now: one already started if it is at least as new as the current
    /// snapshot, or a new one. This returns once the build's engine snapshot is taken, and
    /// the follower's sender waits for the file; openraft accepts a snapshot newer than the
    /// one it picked.
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let at_start = !std::mem::replace(&mut self.asked_before, true);
        let Some(current) = self.ctx.current()? else {
            return Ok(None);
        };
        match tokio::fs::File::open(self.ctx.snapshot_path(&current)).await {
            Ok(file) => {
                return Ok(Some(Snapshot {
                    meta: current,
                    snapshot: Box::new(SnapshotData::file(file)),
                }))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(snap_err(e)),
            Err(_) if at_start => return Ok(None),
            Err(_) => {}
        }
        let shared = self.ctx.for_followers.lock().map_err(sm_err)?.clone();
        let (meta, build) = match shared {
            Some((meta, build)) if meta.last_log_id >= current.last_log_id && !build.failed() => {
                (meta, build)
            }
            _ => {
                tracing::info!(snapshot = %current.snapshot_id, "a follower needs a snapshot: building a file of what is applied now");
                let (meta, build) = self.ctx.build_for_followers().await?;
                *self.ctx.for_followers.lock().map_err(sm_err)? =
                    Some((meta.clone(), build.clone()));
                (meta, build)
            }
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(build.reader()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::Condvar;
    use std::time::Duration;

    use bytes::Bytes;
    use metastore_proto::etcdserverpb::PutRequest;
    use tokio::io::{AsyncReadExt, AsyncSeekExt};

    use super::*;
    use crate::apply::{Command, NoLeases};
    use crate::storage::{EngineHook, HookedEngine, MemoryEngine};

    /// Holds the snapshot cursors of the build thread up while `held` is set: a build cannot
    /// get past its first table. (Applies read through snapshot cursors too: they go on.)
    #[derive(Default)]
    struct HoldCursors {
        held: Mutex<bool>,
        released: Condvar,
    }

    impl HoldCursors {
        fn hold(&self, held: bool) {
            *self.held.lock().expect("lock") = held;
            self.released.notify_all();
        }
    }

    impl EngineHook for HoldCursors {
        fn snapshot_iter(&self, _table: Table) {
            if std::thread::current().name() != Some("snapshot-build") {
                return;
            }
            let mut held = self.held.lock().expect("lock");
            while *held {
                held = self.released.wait(held).expect("wait");
            }
        }
    }

    struct NoObserver;

    impl ApplyObserver for NoObserver {
        fn group_applied(&self, _n: usize) {}
    }

    /// A state machine over an engine with a test hook (one whose snapshot cursors can be held
    /// up, say).
    fn machine<H: EngineHook>(
        engine: Arc<HookedEngine<H>>,
        snap_dir: &Path,
    ) -> anyhow::Result<StateMachine> {
        let store = Store::open(engine.clone(), mvcc::StoreOptions::default())?;
        let auth = Arc::new(AuthStore::open_default(engine.clone())?);
        let watch = WatchHub::start(store.clone(), Duration::from_millis(200), usize::MAX)?;
        let reencoder = Reencoder::start(
            engine.clone(),
            store.background_lock().clone(),
            Default::default(),
        )?;
        let ctx = Context::new(
            store,
            Arc::new(Lessor::new(1)),
            watch,
            Arc::new(Waiters::new()),
            1,
            snap_dir.to_path_buf(),
            Arc::new(NoObserver),
            reencoder,
            auth,
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(StateMachine::new(ctx))
    }

    /// Puts `key` as the entry at `index` would (its writes, then the entry's log id in the
    /// Meta table); returns the revision.
    fn put(ctx: &Context, key: &str, index: u64) -> anyhow::Result<i64> {
        let mut a = ctx.store.applier()?;
        let cmd = Command::Put(PutRequest {
            key: Bytes::from(key.to_string()),
            value: Bytes::from_static(b"v"),
            ..Default::default()
        });
        apply::apply(&mut a, index << 20 | 1, &cmd, &NoLeases, &ctx.auth)?;
        let rev = a.publish()?;
        let id = LogId::new(openraft::CommittedLeaderId::new(1, 1), index);
        let mut b = WriteBatch::new();
        b.put(
            Table::Meta,
            META_APPLIED.to_vec(),
            codec::log_id_to_pb(&id).encode_to_vec(),
        );
        ctx.store.engine().write(b, false)?;
        Ok(rev)
    }

    /// A state machine over a holdable engine, with entries 1..=`entries` applied and
    /// openraft's snapshot of them recorded (without a file), and openraft's start-up call for
    /// the current snapshot made: none, as there is no file. Returns the recorded meta too.
    async fn recorded_machine(
        snap_dir: &Path,
        entries: u64,
    ) -> anyhow::Result<(Arc<HookedEngine<HoldCursors>>, StateMachine, SnapshotMeta)> {
        let engine = HookedEngine::new(HoldCursors::default());
        let mut sm = machine(engine.clone(), snap_dir)?;
        for i in 1..=entries {
            put(&sm.ctx, &format!("k{i:02}"), i)?;
        }
        let recorded = sm.get_snapshot_builder().await.build_snapshot().await?.meta;
        anyhow::ensure!(
            sm.get_current_snapshot().await?.is_none(),
            "start-up: a snapshot without a file"
        );
        Ok((engine, sm, recorded))
    }

    /// Follows the applied index the Meta table is given, takes what it is at each
    /// [`Engine::sync`] as made durable (the memory engine's sync does nothing), and once
    /// armed runs `late` from inside a sync, after that point: an apply that lands while the
    /// sync runs, as on the Raft thread while a snapshot is recorded on another.
    #[derive(Default)]
    struct LateApply {
        applied: Mutex<Option<u64>>,
        synced: Mutex<Option<u64>>,
        late: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    }

    impl EngineHook for LateApply {
        fn batch(&self, batch: &WriteBatch) {
            for op in batch.ops() {
                if let crate::storage::engine::WriteOp::Put {
                    table: Table::Meta,
                    key,
                    value,
                } = op
                {
                    if key.as_slice() == META_APPLIED {
                        let id = pb::LogId::decode(value.as_slice()).expect("a log id");
                        *self.applied.lock().expect("lock") =
                            Some(codec::log_id_from_pb(&id).index);
                    }
                }
            }
        }

        fn sync(&self) -> crate::storage::Result<()> {
            *self.synced.lock().expect("lock") = *self.applied.lock().expect("lock");
            let late = self.late.lock().expect("lock").take();
            if let Some(late) = late {
                late();
            }
            Ok(())
        }
    }

    /// A recorded snapshot lets the log be purged up to it, so it may name only entries whose
    /// applies the engine's sync covered: its meta is read before the sync, not after, when
    /// an apply that landed meanwhile would be named without being durable.
    #[tokio::test]
    async fn a_recorded_snapshot_names_only_what_its_sync_made_durable() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let engine = HookedEngine::new(LateApply::default());
        let mut sm = machine(engine.clone(), dir.path())?;
        for i in 1..=3 {
            put(&sm.ctx, &format!("k{i}"), i)?;
        }
        let ctx = sm.ctx.clone();
        *engine.hook.late.lock().expect("lock") = Some(Box::new(move || {
            put(&ctx, "late", 4).expect("the late apply");
        }));
        let recorded = sm.get_snapshot_builder().await.build_snapshot().await?.meta;
        let hook = &engine.hook;
        assert_eq!(
            *hook.applied.lock().expect("lock"),
            Some(4),
            "the late apply ran"
        );
        let synced = *hook.synced.lock().expect("lock");
        assert_eq!(synced, Some(3));
        assert_eq!(recorded.last_log_id.map(|id| id.index), synced);
        Ok(())
    }

    /// `--snapshot-count` counts commands, however many an entry carries, and a snapshot
    /// starts the count again; 0 leaves it to openraft's policy alone.
    #[tokio::test]
    async fn a_snapshot_is_due_after_snapshot_count_commands_however_grouped() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let mut sm = machine(HookedEngine::new(HoldCursors::default()), dir.path())?;
        let ctx = sm.ctx.clone();
        let due = || async {
            tokio::time::timeout(Duration::from_millis(50), ctx.snapshot_due.wait())
                .await
                .is_ok()
        };
        ctx.snapshot_due.count(1_000_000);
        assert!(!due().await, "off until set");
        ctx.snapshot_every(10);
        ctx.snapshot_due.count(4);
        ctx.snapshot_due.count(4);
        assert!(!due().await, "8 of 10");
        ctx.snapshot_due.count(4);
        assert!(due().await, "12 of 10, in three groups");
        // An apply while the snapshot is taken wakes the waiter again; once the snapshot is
        // taken that wake-up is stale.
        ctx.snapshot_due.count(1);
        sm.get_snapshot_builder().await.build_snapshot().await?;
        assert!(
            !due().await,
            "0 since the snapshot, a wake-up from before it"
        );
        ctx.snapshot_due.count(9);
        assert!(!due().await, "9 since the snapshot");
        ctx.snapshot_due.count(1);
        assert!(due().await, "10 since the snapshot");
        Ok(())
    }

    /// The snapshot openraft takes is recorded without a file; a follower that needs one gets
    /// the build of a file of what is applied then, which is started and returned while the
    /// build is still held up, and applies go on meanwhile; a second follower shares it, the
    /// file is whole once the build ends, and it becomes the current snapshot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_follower_gets_a_file_built_while_applies_go_on() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (engine, mut sm, recorded) = recorded_machine(dir.path(), 20).await?;
        let ctx = sm.ctx.clone();
        assert_eq!(recorded.last_log_id.map(|l| l.index), Some(20));
        let files = |d: &Path| -> anyhow::Result<usize> {
            Ok(std::fs::read_dir(d)?
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "snap"))
                .count())
        };
        assert_eq!(files(dir.path())?, 0, "recorded without a file");
        let at_build = put(&ctx, "k21", 21)?;

        engine.hook.hold(true);
        let first = tokio::time::timeout(Duration::from_secs(5), sm.get_current_snapshot())
            .await
            .map_err(|_| anyhow::anyhow!("waited for the build"))??
            .ok_or_else(|| anyhow::anyhow!("no snapshot for a follower"))?;
        assert_eq!(first.meta.last_log_id.map(|l| l.index), Some(21));
        // Applies go on while the file is being written.
        let later = put(&ctx, "k22", 22)?;
        let second = sm
            .get_current_snapshot()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;
        assert_eq!(second.meta.snapshot_id, first.meta.snapshot_id, "shared");
        let mut data = first.snapshot;
        let reading = tokio::spawn(async move {
            let end = data.seek(SeekFrom::End(0)).await?;
            let mut all = Vec::new();
            data.seek(SeekFrom::Start(0)).await?;
            data.read_to_end(&mut all).await?;
            anyhow::ensure!(all.len() as u64 == end, "{} of {end} bytes", all.len());
            Ok(all)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reading.is_finished(), "read before the build ended");
        engine.hook.hold(false);
        let bytes = reading.await??;
        let info = snapfile::verify(std::io::Cursor::new(&bytes))?;
        assert_eq!(info.header.revision, at_build);
        assert!(later > at_build);
        // The whole file loads into a store that has every key up to the snapshot.
        let copy = Arc::new(MemoryEngine::new());
        snapfile::load(std::io::Cursor::new(&bytes), copy.as_ref(), &mut |_| {})?;
        let copy = Store::open(copy, mvcc::StoreOptions::default())?;
        assert_eq!(copy.current_revision(), at_build);

        assert_eq!(
            ctx.current()?.map(|m| m.snapshot_id),
            Some(first.meta.snapshot_id)
        );
        assert_eq!(files(dir.path())?, 1);
        // The next snapshot openraft records is newer: it replaces the file.
        put(&ctx, "k23", 23)?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
        assert_eq!(files(dir.path())?, 0);
        Ok(())
    }

    /// A build that a newer recorded snapshot overtakes still gives its reader the whole file,
    /// then leaves no file behind, and is not shared any more.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_overtaken_by_a_newer_snapshot_is_sent_and_then_dropped() -> anyhow::Result<()>
    {
        let dir = tempfile::tempdir()?;
        let (engine, mut sm, _) = recorded_machine(dir.path(), 5).await?;
        let ctx = sm.ctx.clone();
        engine.hook.hold(true);
        let sent = sm
            .get_current_snapshot()
            .await?
            .ok_or_else(|| anyhow::anyhow!("no snapshot for a follower"))?;
        put(&ctx, "k6", 6)?;
        let newer = sm.get_snapshot_builder().await.build_snapshot().await?.meta;
        assert!(
            ctx.for_followers.lock().expect("lock").is_none(),
            "forgotten"
        );
        let mut data = sent.snapshot;
        let reading = tokio::spawn(async move {
            let mut all = Vec::new();
            data.read_to_end(&mut all).await?;
            anyhow::Ok(all)
        });
        engine.hook.hold(false);
        let bytes = reading.await??;
        let info = snapfile::verify(std::io::Cursor::new(&bytes))?;
        assert!(info.header.revision < ctx.store.current_revision());
        assert_eq!(
            ctx.current()?.map(|m| m.snapshot_id),
            Some(newer.snapshot_id)
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())?
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "{left:?}");
        Ok(())
    }

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
