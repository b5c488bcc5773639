//! The peer server: openraft's RPCs and the requests followers forward to the leader. Thin:
//! it converts messages and calls the Raft instance or the [`Replica`](super::replica::Replica).

use metastore_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use metastore_proto::raftpb as pb;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest};
use tonic::{Request, Response, Status};

use super::codec;
use crate::server::node::NodeRef;
use crate::server::status::{to_status, MSG_STOPPED};

pub struct PeerService {
    node: NodeRef,
}

impl PeerService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

fn bad(e: codec::CodecError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn fatal<E>(e: RaftError<u64, E>) -> Status
where
    E: std::error::Error,
{
    match e {
        RaftError::Fatal(_) => Status::unavailable(MSG_STOPPED),
        RaftError::APIError(e) => Status::failed_precondition(e.to_string()),
    }
}

#[tonic::async_trait]
impl pb::raft_server::Raft for PeerService {
    async fn append_entries(
        &self,
        req: Request<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        let entries = r
            .entries
            .into_iter()
            .map(codec::entry_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let rpc = AppendEntriesRequest {
            vote: codec::req_vote(&r.vote).map_err(bad)?,
            prev_log_id: codec::opt_log_id_from_pb(&r.prev_log_id),
            entries,
            leader_commit: codec::opt_log_id_from_pb(&r.leader_commit),
        };
        let resp = node.replica.raft.append_entries(rpc).await.map_err(fatal)?;
        use pb::append_entries_response::Result as R;
        let result = match resp {
            AppendEntriesResponse::Success => R::Success(pb::Blank {}),
            AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(pb::PartialSuccess {
                matching: codec::opt_log_id_to_pb(&m),
            }),
            AppendEntriesResponse::Conflict => R::Conflict(pb::Blank {}),
            AppendEntriesResponse::HigherVote(v) => R::HigherVote(codec::vote_to_pb(&v)),
        };
        Ok(Response::new(pb::AppendEntriesResponse {
            result: Some(result),
        }))
    }

    async fn vote(
        &self,
        req: Request<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        let rpc = openraft::raft::VoteRequest {
            vote: codec::req_vote(&r.vote).map_err(bad)?,
            last_log_id: codec::opt_log_id_from_pb(&r.last_log_id),
        };
        let resp = node.replica.raft.vote(rpc).await.map_err(fatal)?;
        Ok(Response::new(pb::VoteResponse {
            vote: Some(codec::vote_to_pb(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_to_pb(&resp.last_log_id),
        }))
    }

    async fn install_snapshot(
        &self,
        req: Request<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        let rpc = InstallSnapshotRequest {
            vote: codec::req_vote(&r.vote).map_err(bad)?,
            meta: r
                .meta
                .as_ref()
                .map(codec::snapshot_meta_from_pb)
                .ok_or_else(|| Status::invalid_argument("snapshot meta missing"))?,
            offset: r.offset,
            data: r.data.to_vec(),
            done: r.done,
        };
        match node.replica.raft.install_snapshot(rpc).await {
            Ok(resp) => Ok(Response::new(pb::InstallSnapshotResponse {
                vote: Some(codec::vote_to_pb(&resp.vote)),
                mismatch_expect: None,
                mismatch_got: None,
            })),
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(m))) => {
                let seg = |s: openraft::SnapshotSegmentId| pb::SnapshotSegmentId {
                    id: s.id,
                    offset: s.offset,
                };
                Ok(Response::new(pb::InstallSnapshotResponse {
                    vote: None,
                    mismatch_expect: Some(seg(m.expect)),
                    mismatch_got: Some(seg(m.got)),
                }))
            }
            Err(e) => Err(fatal(e)),
        }
    }

    async fn propose(
        &self,
        req: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let node = self.node.get()?;
        let index = node.replica.propose_local(req.into_inner().batch).await?;
        Ok(Response::new(pb::ProposeResponse { index }))
    }

    async fn read_index(
        &self,
        _req: Request<pb::ReadIndexRequest>,
    ) -> Result<Response<pb::ReadIndexResponse>, Status> {
        let node = self.node.get()?;
        let index = node.replica.local_read_index().await?;
        Ok(Response::new(pb::ReadIndexResponse { index }))
    }

    async fn lease_keep_alive(
        &self,
        req: Request<LeaseKeepAliveRequest>,
    ) -> Result<Response<LeaseKeepAliveResponse>, Status> {
        let node = self.node.get()?;
        let id = req.into_inner().id;
        if !node.replica.is_leader() {
            return Err(Status::failed_precondition(super::replica::MSG_NOT_LEADER));
        }
        let ttl = node.lessor.renew(id).unwrap_or(0);
        Ok(Response::new(LeaseKeepAliveResponse {
            header: Some(node.header(node.store.current_revision())),
            id,
            ttl,
        }))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let node = self.node.get()?;
        if !node.replica.is_leader() {
            return Err(Status::failed_precondition(super::replica::MSG_NOT_LEADER));
        }
        let r = node
            .lease_time_to_live_local(&req.into_inner())
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(r))
    }

    async fn cluster(
        &self,
        _req: Request<pb::ClusterRequest>,
    ) -> Result<Response<pb::ClusterResponse>, Status> {
        let node = self.node.get()?;
        Ok(Response::new(pb::ClusterResponse {
            cluster_id: node.cluster_id,
            leader_id: node.replica.leader_id().unwrap_or(0),
            membership: Some(codec::membership_to_pb(&node.replica.membership())),
        }))
    }

    async fn campaign(
        &self,
        req: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignResponse>, Status> {
        let node = self.node.get()?;
        let from = req.into_inner().from;
        tracing::info!(leader = %format!("{from:x}"), "asked to campaign: leadership transfer");
        node.replica.campaign().await?;
        Ok(Response::new(pb::CampaignResponse {}))
    }

    async fn capabilities(
        &self,
        _req: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        let node = self.node.get()?;
        Ok(Response::new(pb::CapabilitiesResponse {
            member_id: node.member.id,
            name: node.member.name.clone(),
            storage_formats: node
                .supported_storage_formats
                .iter()
                .map(|f| u32::from(*f))
                .collect(),
        }))
    }

    async fn member_change(
        &self,
        req: Request<pb::MemberChangeRequest>,
    ) -> Result<Response<pb::MemberChangeResponse>, Status> {
        let node = self.node.get()?;
        if !node.replica.is_leader() {
            return Err(Status::failed_precondition(super::replica::MSG_NOT_LEADER));
        }
        node.replica
            .member_change_local(req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| to_status(&e))
    }
}
