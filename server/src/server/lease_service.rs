//! `etcdserverpb.Lease`: Grant, Revoke, KeepAlive, TimeToLive, Leases, and the expiry loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use metastore_proto::etcdserverpb::lease_server::Lease;
use metastore_proto::etcdserverpb::{
    LeaseGrantRequest, LeaseGrantResponse, LeaseKeepAliveRequest, LeaseKeepAliveResponse,
    LeaseLeasesRequest, LeaseLeasesResponse, LeaseRevokeRequest, LeaseRevokeResponse, LeaseStatus,
    LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use super::node::{Node, NodeRef};
use super::status::to_status;
use crate::apply::command::CommandResult;
use crate::apply::{ApplyError, Command, LeaseLookup};
use crate::lease::MAX_LEASE_TTL;

/// Lease ids chosen by the server: etcd's scheme, the member id's low 16 bits, then a
/// millisecond timestamp and a counter, so ids from different members and runs do not collide.
pub struct LeaseIds(AtomicU64);

impl LeaseIds {
    pub fn new(member_id: u64) -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self(AtomicU64::new(
            ((member_id & 0xffff) << 48) | ((ms & 0xff_ffff_ffff) << 8),
        ))
    }

    fn next(&self) -> i64 {
        (self.0.fetch_add(1, Ordering::Relaxed) & (i64::MAX as u64)) as i64
    }
}

pub struct LeaseService {
    node: NodeRef,
}

impl LeaseService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

fn err(e: ApplyError) -> Status {
    to_status(&e)
}

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let node = self.node.get()?;
        let mut r = req.into_inner();
        if r.ttl > MAX_LEASE_TTL {
            return Err(err(ApplyError::LeaseTtlTooLarge));
        }
        r.ttl = node.lessor.effective_ttl(r.ttl);
        node.check_quota(16).await.map_err(err)?;
        if r.id == 0 {
            r.id = loop {
                let id = node.lease_ids.next();
                if id > 0 && !node.lessor.lease_exists(id) {
                    break id;
                }
            };
        }
        match node
            .propose(Command::LeaseGrant(r))
            .await
            .map_err(err)?
            .result
        {
            CommandResult::LeaseGrant(mut resp) => {
                node.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    async fn lease_revoke(
        &self,
        req: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        match node
            .propose(Command::LeaseRevoke(r))
            .await
            .map_err(err)?
            .result
        {
            CommandResult::LeaseRevoke(mut resp) => {
                node.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(Status::internal("etcdserver: unexpected apply result")),
        }
    }

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<BoxStream<LeaseKeepAliveResponse>>, Status> {
        self.node.get()?;
        let mut inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let weak = self.node.clone();
        tokio::spawn(async move {
            while let Some(Ok(r)) = inbound.next().await {
                let Ok(node) = weak.get() else { break };
                // An unknown lease answers TTL 0, as etcd does.
                let ttl = node.lessor.renew(r.id).unwrap_or(0);
                let resp = LeaseKeepAliveResponse {
                    header: Some(node.header(node.store.current_revision())),
                    id: r.id,
                    ttl,
                };
                if tx.send(Ok(resp)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        let header = Some(node.header(node.store.current_revision()));
        let Some((granted, remaining)) = node.lessor.time_to_live(r.id) else {
            return Ok(Response::new(LeaseTimeToLiveResponse {
                header,
                id: r.id,
                ttl: -1,
                ..Default::default()
            }));
        };
        let keys = if r.keys {
            node.store
                .lease_keys(r.id)
                .map_err(|e| super::status::mvcc_status(&e))?
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(LeaseTimeToLiveResponse {
            header,
            id: r.id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        _: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let node = self.node.get()?;
        Ok(Response::new(LeaseLeasesResponse {
            header: Some(node.header(node.store.current_revision())),
            leases: node
                .lessor
                .ids()
                .into_iter()
                .map(|id| LeaseStatus { id })
                .collect(),
        }))
    }
}

/// How often the expiry loop looks at the earliest deadline (the bound on lateness).
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Leases revoked per tick at most (etcd's default revoke rate is 1000/s).
const REVOKE_BATCH: usize = 100;

/// Revokes expired leases through the write pipeline until the node is gone.
pub async fn expire_leases(node: NodeRef) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(node) = node.get() else { return };
        let expired = node.lessor.expired(Instant::now(), REVOKE_BATCH);
        for id in expired {
            revoke_expired(&node, id).await;
        }
    }
}

async fn revoke_expired(node: &Node, id: i64) {
    match node
        .propose(Command::LeaseRevoke(LeaseRevokeRequest { id }))
        .await
    {
        Ok(_) | Err(ApplyError::LeaseNotFound) => {}
        Err(e) => {
            tracing::warn!(lease = %format!("{id:x}"), error = %e, "revoking an expired lease failed; will retry")
        }
    }
}
