//! `etcdserverpb.Cluster`: MemberList, MemberAdd, MemberRemove, MemberUpdate, MemberPromote.
//! Changes run on the leader (a follower forwards them) as Raft membership changes.

use metastore_proto::etcdserverpb::cluster_server::Cluster;
use metastore_proto::etcdserverpb::{
    Member, MemberAddRequest, MemberAddResponse, MemberListRequest, MemberListResponse,
    MemberPromoteRequest, MemberPromoteResponse, MemberRemoveRequest, MemberRemoveResponse,
    MemberUpdateRequest, MemberUpdateResponse,
};
use metastore_proto::raftpb::{member_change_request::Change, MemberChangeRequest};
use tonic::{Request, Response, Status};

use super::node::{Node, NodeRef};
use super::status::to_status;

pub struct ClusterService {
    node: NodeRef,
}

impl ClusterService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

/// Runs a membership change on the leader; returns the id it concerned (the new id for an
/// add) and the members after it, as the leader committed them (this member may not have
/// applied the change yet).
async fn change(node: &Node, change: Change) -> Result<(u64, Vec<Member>), Status> {
    let r = node
        .replica
        .member_change(MemberChangeRequest {
            change: Some(change),
        })
        .await
        .map_err(|e| to_status(&e))?;
    let members = match &r.membership {
        Some(m) => members_of(&crate::raft::codec::membership_from_pb(m)),
        None => node.members(),
    };
    Ok((r.id, members))
}

pub fn members_of(m: &crate::raft::Membership) -> Vec<Member> {
    let learners: std::collections::BTreeSet<u64> = m.learner_ids().collect();
    m.nodes()
        .map(|(id, n)| Member {
            id: *id,
            name: n.name.clone(),
            peer_ur_ls: n.peer_urls.clone(),
            client_ur_ls: n.client_urls.clone(),
            is_learner: learners.contains(id),
        })
        .collect()
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        req: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let node = self.node.get()?;
        if req.into_inner().linearizable {
            node.linearizable_read().await.map_err(|e| to_status(&e))?;
        }
        Ok(Response::new(MemberListResponse {
            header: Some(node.header(node.store.current_revision())),
            members: node.members(),
        }))
    }

    async fn member_add(
        &self,
        req: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let r = req.into_inner();
        for u in &r.peer_ur_ls {
            if url::Url::parse(u).is_err() {
                return Err(Status::invalid_argument(format!(
                    "etcdserver: invalid peer URL {u:?}"
                )));
            }
        }
        let (id, members) = change(&node, Change::Add(r)).await?;
        let member = members.iter().find(|m| m.id == id).cloned();
        Ok(Response::new(MemberAddResponse {
            header: Some(node.header(node.store.current_revision())),
            member,
            members,
        }))
    }

    async fn member_remove(
        &self,
        req: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let (_, members) = change(&node, Change::Remove(req.into_inner())).await?;
        Ok(Response::new(MemberRemoveResponse {
            header: Some(node.header(node.store.current_revision())),
            members,
        }))
    }

    async fn member_update(
        &self,
        req: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let (_, members) = change(&node, Change::Update(req.into_inner())).await?;
        Ok(Response::new(MemberUpdateResponse {
            header: Some(node.header(node.store.current_revision())),
            members,
        }))
    }

    async fn member_promote(
        &self,
        req: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let node = self.node.get()?;
        node.require_admin(&req)?;
        let (_, members) = change(&node, Change::Promote(req.into_inner())).await?;
        Ok(Response::new(MemberPromoteResponse {
            header: Some(node.header(node.store.current_revision())),
            members,
        }))
    }
}
