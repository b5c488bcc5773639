//! `etcdserverpb.Maintenance`: Status, Alarm, Defragment, Hash, HashKV, Snapshot, MoveLeader.

use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, DefragmentRequest,
    DefragmentResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse,
    MoveLeaderRequest, MoveLeaderResponse, SnapshotRequest, SnapshotResponse, StatusRequest,
    StatusResponse,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::node::{NodeRef, ETCD_VERSION};
use super::status::to_status;
use crate::apply::Command;
use crate::storage::snapshot::{write_chunks, Chunk, SnapshotError};
use crate::storage::Error as StorageError;

/// The MetaStore release this binary reports in Status (`server_version`): the crate version,
/// or `METASTORE_VERSION` when set at build time (release images are built with their tag's
/// version, which the operator compares against `spec.version`).
pub const RELEASE: &str = match option_env!("METASTORE_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Snapshot chunk size, as etcd's `snapshotSendBufferSize`.
const SNAPSHOT_CHUNK_BYTES: usize = 32 * 1024;
/// Chunks queued between the producing thread and the stream: memory stays bounded whatever
/// the database size, and a slow client slows the producer down.
const SNAPSHOT_QUEUE: usize = 8;

pub struct MaintenanceService {
    node: NodeRef,
}

impl MaintenanceService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

/// MetaStore's own Status fields: the storage format this member writes and its background
/// re-encoding (`metastore-ctl migrate --wait` polls them).
fn storage_migration_status(n: &super::node::Node) -> StatusResponse {
    let progress = n.reencoder.progress();
    StatusResponse {
        storage_format: u32::from(n.store.write_format()),
        storage_migration_pending: progress.pending,
        storage_migration_visited: progress.visited,
        storage_migration_rewritten: progress.rewritten,
        supported_storage_formats: n
            .supported_storage_formats
            .iter()
            .map(|f| u32::from(*f))
            .collect(),
        server_version: RELEASE.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let n = self.node.get()?;
        let engine = n.store.engine();
        let (raft_index, raft_applied_index) = n.replica.indexes();
        Ok(Response::new(StatusResponse {
            header: Some(n.header(n.store.current_revision())),
            version: ETCD_VERSION.to_string(),
            db_size: engine.size_bytes() as i64,
            leader: n.replica.leader_id().unwrap_or(0),
            raft_index,
            raft_term: n.replica.term(),
            raft_applied_index,
            errors: n.alarm_strings(),
            db_size_in_use: engine.size_in_use_bytes() as i64,
            is_learner: n.replica.is_learner(),
            ..storage_migration_status(&n)
        }))
    }

    /// etcd: only the leader serves it (etcdctl sends it there); the transferee must be a
    /// voting member; it ends once this member follows the transferee.
    async fn move_leader(
        &self,
        req: Request<MoveLeaderRequest>,
    ) -> Result<Response<MoveLeaderResponse>, Status> {
        let n = self.node.get()?;
        n.require_admin(&req)?;
        let target = req.into_inner().target_id;
        n.replica
            .move_leader(target)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(MoveLeaderResponse {
            header: Some(n.header(n.store.current_revision())),
        }))
    }

    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        let member = |(member_id, alarm): (u64, i32)| AlarmMember { member_id, alarm };
        let alarms = match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => node.store.alarms().into_iter().map(member).collect(),
            // Activate and deactivate answer with the alarm they changed, as etcd does.
            Ok(action @ (AlarmAction::Activate | AlarmAction::Deactivate)) => {
                let target = (r.member_id, r.alarm);
                let existed = node.store.alarms().contains(&target);
                node.propose(Command::Alarm(r))
                    .await
                    .map_err(|e| to_status(&e))?;
                let changed = (action == AlarmAction::Activate) != existed;
                if changed {
                    vec![member(target)]
                } else {
                    Vec::new()
                }
            }
            Err(_) => return Err(Status::invalid_argument("etcdserver: unknown alarm action")),
        };
        // etcd answers Alarm and Defragment without a header.
        Ok(Response::new(AlarmResponse {
            header: None,
            alarms,
        }))
    }

    async fn hash(&self, req: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let store = node.store.clone();
        let hash = tokio::task::spawn_blocking(move || store.hash())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: hash task: {e}")))?
            .map_err(|e| super::status::mvcc_status(&e))?;
        Ok(Response::new(HashResponse {
            header: Some(node.header(node.store.current_revision())),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let rev = req.into_inner().revision;
        let store = node.store.clone();
        let (hash, compact_revision, hash_revision) =
            tokio::task::spawn_blocking(move || store.hash_kv(rev))
                .await
                .map_err(|e| Status::internal(format!("etcdserver: hash task: {e}")))?
                .map_err(|e| super::status::mvcc_status(&e))?;
        Ok(Response::new(HashKvResponse {
            header: Some(node.header(node.store.current_revision())),
            hash,
            compact_revision,
            hash_revision,
        }))
    }

    async fn defragment(
        &self,
        req: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let store = node.store.clone();
        tokio::task::spawn_blocking(move || store.engine().defragment())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: defragment task: {e}")))?
            .map_err(|e| Status::unavailable(format!("etcdserver: defragment: {e}")))?;
        Ok(Response::new(DefragmentResponse { header: None }))
    }

    /// A consistent copy of the state machine, streamed as etcd streams its bbolt file: one
    /// engine snapshot, written on a blocking thread into a bounded channel, 32 KiB per
    /// message with the bytes remaining after it, then the SHA-256 alone (remaining 0). No
    /// header, as etcd 3.4 and 3.5 send none. The file format is `storage::snapshot`'s.
    ///
    /// The producing thread holds the engine open until the stream ends; a client that goes
    /// away (or a server shutdown, which drops the connections) ends it at the next chunk.
    async fn snapshot(
        &self,
        req: Request<SnapshotRequest>,
    ) -> Result<Response<BoxStream<SnapshotResponse>>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let engine = node.store.engine().clone();
        drop(node);
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_QUEUE);
        tokio::task::spawn_blocking(move || {
            let start = std::time::Instant::now();
            let snap = engine.snapshot();
            let mut send = |c: Chunk| {
                let resp = SnapshotResponse {
                    header: None,
                    remaining_bytes: c.remaining,
                    blob: c.data.into(),
                    version: String::new(),
                };
                tx.blocking_send(Ok(resp)).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
                })
            };
            match write_chunks(snap.as_ref(), SNAPSHOT_CHUNK_BYTES, &mut send) {
                Ok(info) => tracing::info!(
                    bytes = info.header.file_len(),
                    revision = info.header.revision,
                    took = ?start.elapsed(),
                    "sent a database snapshot"
                ),
                Err(StorageError::Snapshot(SnapshotError::Io(e)))
                    if e.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    tracing::info!("snapshot stream closed before the end");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "snapshot failed");
                    let _ = tx
                        .blocking_send(Err(Status::unknown(format!("etcdserver: snapshot: {e}"))));
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
