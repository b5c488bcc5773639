//! `etcdserverpb.Maintenance`: Status, Alarm, Defragment, Hash, HashKV. Snapshot and MoveLeader
//! come with the snapshot and Raft work and answer `Unimplemented` until then.

use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmMember, AlarmRequest, AlarmResponse, DefragmentRequest,
    DefragmentResponse, HashKvRequest, HashKvResponse, HashRequest, HashResponse, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use super::node::{NodeRef, ETCD_VERSION, SINGLE_NODE_TERM};
use super::status::to_status;
use crate::apply::Command;

pub struct MaintenanceService {
    node: NodeRef,
}

impl MaintenanceService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let n = self.node.get()?;
        let engine = n.store.engine();
        let index = n.store.applied_index();
        Ok(Response::new(StatusResponse {
            header: Some(n.header(n.store.current_revision())),
            version: ETCD_VERSION.to_string(),
            db_size: engine.size_bytes() as i64,
            leader: n.member.id,
            raft_index: index,
            raft_term: SINGLE_NODE_TERM,
            raft_applied_index: index,
            errors: n.alarm_strings(),
            db_size_in_use: engine.size_in_use_bytes() as i64,
            is_learner: false,
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

    async fn hash(&self, _: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let node = self.node.get()?;
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
        _: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        let node = self.node.get()?;
        let store = node.store.clone();
        tokio::task::spawn_blocking(move || store.engine().defragment())
            .await
            .map_err(|e| Status::internal(format!("etcdserver: defragment task: {e}")))?
            .map_err(|e| Status::unavailable(format!("etcdserver: defragment: {e}")))?;
        Ok(Response::new(DefragmentResponse { header: None }))
    }
}
