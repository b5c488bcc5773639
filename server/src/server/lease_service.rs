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
        let access = node
            .auth
            .request(&req)
            .map_err(|e| super::status::auth_status(&e))?;
        let r = req.into_inner();
        // etcd: revoking deletes the lease's keys, so it needs WRITE on each of them.
        super::kv_service::check_lease_puts(&node, &access, r.id)?;
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
        // An inbound error ends the stream quietly, as it always has here.
        let inbound = req
            .into_inner()
            .take_while(|r| futures::future::ready(r.is_ok()));
        let out = keep_alive(&self.node, Box::pin(inbound))?;
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        node.lease_time_to_live(&r)
            .await
            .map(Response::new)
            .map_err(err)
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

/// The per-stream logic of `LeaseKeepAlive`, shared with the JSON gateway's
/// `POST /v3/lease/keepalive`: one answer per request, in order. An unknown lease answers
/// TTL 0, as etcd does. The stream ends after the last answer when `inbound` ends or the node
/// stops; an inbound error is passed on as the stream's last item.
pub fn keep_alive<S>(node: &NodeRef, mut inbound: S) -> Result<KeepAliveStream, Status>
where
    S: futures::Stream<Item = Result<LeaseKeepAliveRequest, Status>> + Send + Unpin + 'static,
{
    node.get()?;
    let (tx, rx) = mpsc::channel(64);
    let weak = node.clone();
    tokio::spawn(async move {
        while let Some(item) = inbound.next().await {
            let Ok(node) = weak.get() else { break };
            let reply = match item {
                Ok(r) => match node.renew_lease(r.id).await {
                    Ok(ttl) => Ok(LeaseKeepAliveResponse {
                        ttl,
                        header: Some(node.header(node.store.current_revision())),
                        id: r.id,
                    }),
                    // An unknown lease answers TTL 0, as etcd does.
                    Err(ApplyError::LeaseNotFound) => Ok(LeaseKeepAliveResponse {
                        ttl: 0,
                        header: Some(node.header(node.store.current_revision())),
                        id: r.id,
                    }),
                    Err(e) => Err(to_status(&e)),
                },
                Err(e) => Err(e),
            };
            let last = reply.is_err();
            if tx.send(reply).await.is_err() || last {
                break;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// The answers of [`keep_alive`].
pub type KeepAliveStream = ReceiverStream<Result<LeaseKeepAliveResponse, Status>>;

/// How often the expiry loop looks at the earliest deadline (the bound on lateness).
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Leases revoked per tick at most (etcd's default revoke rate is 1000/s).
const REVOKE_BATCH: usize = 100;

/// Revokes expired leases through the write pipeline until the node is gone.
pub async fn expire_leases(node: NodeRef) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_leader = false;
    loop {
        tick.tick().await;
        let Ok(node) = node.get() else { return };
        // Only the leader expires leases. A new leader first gives every lease its full TTL
        // again, as etcd does: the old leader's deadlines died with its leadership.
        let leader = node.replica.is_leader();
        if leader && !was_leader {
            match node.store.leases() {
                Ok(leases) => node.lessor.restore(&leases),
                Err(e) => tracing::warn!(error = %e, "cannot refresh lease deadlines"),
            }
        }
        was_leader = leader;
        if !leader {
            continue;
        }
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
