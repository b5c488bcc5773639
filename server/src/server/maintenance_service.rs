//! `etcdserverpb.Maintenance`: Status, Alarm (list), Defragment. Hash, HashKV, Snapshot and
//! MoveLeader come with the maintenance and Raft work and answer `Unimplemented` until then.

use metastore_proto::etcdserverpb::maintenance_server::Maintenance;
use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, AlarmResponse, DefragmentRequest, DefragmentResponse,
    StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use super::node::{NodeRef, ETCD_VERSION, SINGLE_NODE_TERM};

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
            errors: Vec::new(),
            db_size_in_use: engine.size_in_use_bytes() as i64,
            is_learner: false,
        }))
    }

    async fn alarm(&self, req: Request<AlarmRequest>) -> Result<Response<AlarmResponse>, Status> {
        let node = self.node.get()?;
        match AlarmAction::try_from(req.into_inner().action) {
            // No alarm can be raised yet (the backend quota comes with the NOSPACE alarm), so
            // listing answers an empty list and disarming has nothing to do.
            Ok(AlarmAction::Get | AlarmAction::Deactivate) => Ok(Response::new(AlarmResponse {
                header: Some(node.header(node.store.current_revision())),
                alarms: Vec::new(),
            })),
            Ok(AlarmAction::Activate) => Err(Status::invalid_argument(
                "etcdserver: activating alarms by hand is not supported",
            )),
            Err(_) => Err(Status::invalid_argument("etcdserver: unknown alarm action")),
        }
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
        Ok(Response::new(DefragmentResponse {
            header: Some(node.header(node.store.current_revision())),
        }))
    }
}
