//! `etcdserverpb.Cluster`: MemberList for this one member. Membership changes need Raft and
//! answer `Unimplemented` until it lands.

use metastore_proto::etcdserverpb::cluster_server::Cluster;
use metastore_proto::etcdserverpb::{MemberListRequest, MemberListResponse};
use tonic::{Request, Response, Status};

use super::node::NodeRef;

pub struct ClusterService {
    node: NodeRef,
}

impl ClusterService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn member_list(
        &self,
        _: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        let node = self.node.get()?;
        Ok(Response::new(MemberListResponse {
            header: Some(node.header(node.store.current_revision())),
            members: vec![node.member.to_proto()],
        }))
    }
}
