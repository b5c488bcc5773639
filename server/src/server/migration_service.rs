//! `metastorepb.Migration`: the online storage-format switch (MetaStore's own API, not
//! etcd's). Checks that every member supports the target, then proposes the replicated
//! switch; each member's re-encoding progress is in `Maintenance.Status`.

use metastore_proto::metastorepb::migration_server::Migration;
use metastore_proto::metastorepb::{SetStorageFormatRequest, SetStorageFormatResponse};
use metastore_proto::raftpb as pb;
use tonic::{Request, Response, Status};

use super::node::{Node, NodeRef};
use super::status::to_status;
use crate::apply::{Command, CommandResult};
use crate::storage::codec;

pub struct MigrationService {
    node: NodeRef,
}

impl MigrationService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Migration for MigrationService {
    async fn set_storage_format(
        &self,
        req: Request<SetStorageFormatRequest>,
    ) -> Result<Response<SetStorageFormatResponse>, Status> {
        let node = self.node.get()?;
        let to = req.into_inner().to;
        let format = u8::try_from(to)
            .ok()
            .filter(|f| codec::READABLE_FORMATS.contains(f))
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "etcdserver: unknown storage format {to} (known: {:?})",
                    codec::READABLE_FORMATS
                ))
            })?;
        check_members_support(&node, format).await?;
        let applied = node
            .propose(Command::SetStorageFormat(format))
            .await
            .map_err(|e| to_status(&e))?;
        let CommandResult::SetStorageFormat { to, pending } = applied.result else {
            return Err(Status::internal(
                "etcdserver: unexpected result of a format switch",
            ));
        };
        tracing::info!(format = to, pending, "the cluster switched storage format");
        Ok(Response::new(SetStorageFormatResponse {
            header: Some(node.header(applied.revision)),
            storage_format: u32::from(to),
        }))
    }
}

/// Asks every member of the membership (voters and learners: all of them apply the switch)
/// which storage formats its binary supports. A member that does not support `format`, or
/// that cannot be asked, refuses the switch: FailedPrecondition naming it.
async fn check_members_support(node: &Node, format: u8) -> Result<(), Status> {
    let membership = node.replica.membership();
    let timeout = node.replica.timing.request_timeout();
    let mut asks = Vec::new();
    for (id, member) in membership.nodes() {
        let (id, member) = (*id, member.clone());
        let name = if member.name.is_empty() {
            format!("{id:x}")
        } else {
            format!("{} ({id:x})", member.name)
        };
        if id == node.member.id {
            asks.push(futures::future::Either::Left(std::future::ready((
                name,
                Ok(node.supported_storage_formats.clone()),
            ))));
            continue;
        }
        let peers = node.replica.peers.clone();
        asks.push(futures::future::Either::Right(async move {
            let formats = async {
                let mut client = peers.get(&member)?;
                let mut req = tonic::Request::new(pb::CapabilitiesRequest {});
                req.set_timeout(timeout);
                let r = client
                    .capabilities(req)
                    .await
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
                Ok::<_, String>(
                    r.into_inner()
                        .storage_formats
                        .into_iter()
                        .filter_map(|f| u8::try_from(f).ok())
                        .collect::<Vec<u8>>(),
                )
            }
            .await;
            (name, formats)
        }));
    }
    for (name, formats) in futures::future::join_all(asks).await {
        match formats {
            Ok(f) if f.contains(&format) => {}
            Ok(f) => {
                return Err(Status::failed_precondition(format!(
                    "etcdserver: member {name} does not support storage format {format} (its \
                     binary supports {f:?}): upgrade it before switching the cluster"
                )))
            }
            Err(e) => {
                return Err(Status::failed_precondition(format!(
                    "etcdserver: cannot ask member {name} which storage formats it supports \
                     ({e}): every member must be up to switch the cluster's storage format"
                )))
            }
        }
    }
    Ok(())
}
