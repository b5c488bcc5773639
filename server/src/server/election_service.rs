//! `v3electionpb.Election`: etcd's leader election (`concurrency.Election`), run inside the
//! server as etcd does, with the helpers of [`lock_service`](super::lock_service).
//!
//! A candidate's key is `name/<lease id in hex>` holding its value; the leader is the key
//! under `name/` with the smallest create revision. A [`LeaderKey`] names one incarnation of a
//! candidate's key (key + create revision), so Proclaim and Resign act only while that
//! incarnation still exists.

use bytes::Bytes;
use metastore_proto::etcdserverpb::range_request::SortOrder;
use metastore_proto::etcdserverpb::{ResponseHeader, TxnRequest};
use metastore_proto::mvccpb::{event::EventType, KeyValue};
use metastore_proto::v3electionpb::election_server::Election;
use metastore_proto::v3electionpb::{
    CampaignRequest, CampaignResponse, LeaderKey, LeaderRequest, LeaderResponse, ProclaimRequest,
    ProclaimResponse, ResignRequest, ResignResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status};

use super::lock_service::{
    by_create, check_access, compare_create, header_rev, key_prefix, op_delete, op_get, op_put,
    range, range_kvs, session_key, session_lease, txn, wait_deletes, CleanupGuard, HubWatch,
};
use super::node::{Node, NodeRef};

/// etcd's `concurrency.ErrElectionNotLeader`.
pub const MSG_NOT_LEADER: &str = "election: not leader";
/// etcd's `concurrency.ErrElectionNoLeader`.
pub const MSG_NO_LEADER: &str = "election: no leader";
/// etcd's `v3election.ErrMissingLeaderKey`.
pub const MSG_MISSING_LEADER_KEY: &str = "\"leader\" field must be provided";

pub struct ElectionService {
    node: NodeRef,
}

impl ElectionService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

fn filled(node: &Node, mut h: Option<ResponseHeader>) -> Option<ResponseHeader> {
    node.fill(&mut h);
    h
}

/// `Proclaim`: put `value` while the leader key is still the incarnation created at `rev`.
async fn proclaim(
    node: &Node,
    key: &Bytes,
    rev: i64,
    lease: i64,
    value: Bytes,
) -> Result<Option<ResponseHeader>, Status> {
    let resp = txn(
        node,
        TxnRequest {
            compare: vec![compare_create(key, rev)],
            success: vec![op_put(key, value, lease)],
            failure: vec![],
        },
    )
    .await?;
    if !resp.succeeded {
        return Err(Status::unknown(MSG_NOT_LEADER));
    }
    Ok(resp.header)
}

/// `Resign`: delete the leader key if it is still the incarnation created at `rev`.
async fn resign(node: &Node, key: &Bytes, rev: i64) -> Result<Option<ResponseHeader>, Status> {
    let resp = txn(
        node,
        TxnRequest {
            compare: vec![compare_create(key, rev)],
            success: vec![op_delete(key)],
            failure: vec![],
        },
    )
    .await?;
    Ok(resp.header)
}

/// The current leader of the election under `prefix`: `(header revision, key-value)`.
fn leader(node: &Node, prefix: &Bytes) -> Result<(i64, Option<KeyValue>), Status> {
    let resp = range(node, &by_create(prefix, SortOrder::Ascend, 0))?;
    Ok((header_rev(&resp.header), resp.kvs.into_iter().next()))
}

#[tonic::async_trait]
impl Election for ElectionService {
    /// etcd's `Election.Campaign`: create `name/<lease>` with `value` (or take over the key
    /// this lease already has, proclaiming `value`), then wait for every earlier candidate's
    /// key to go.
    async fn campaign(
        &self,
        req: Request<CampaignRequest>,
    ) -> Result<Response<CampaignResponse>, Status> {
        let access = self.node.get()?.auth.request(&req);
        let r = req.into_inner();
        let pfx = key_prefix(&r.name);
        check_access(&access, &pfx, None)?;
        let lease = session_lease(&self.node, r.lease).await?;
        let key = session_key(&pfx, lease);
        check_access(&access, &[], Some(&key[..]))?;
        let (header, rev) = {
            let node = self.node.get()?;
            let resp = txn(
                &node,
                TxnRequest {
                    compare: vec![compare_create(&key, 0)],
                    success: vec![op_put(&key, r.value.clone(), lease)],
                    failure: vec![op_get(&key)],
                },
            )
            .await?;
            let mut rev = header_rev(&resp.header);
            if !resp.succeeded {
                let current = range_kvs(&resp, 0).first().cloned().unwrap_or_default();
                rev = current.create_revision;
                if current.value != r.value {
                    if let Err(e) = proclaim(&node, &key, rev, lease, r.value.clone()).await {
                        // etcd resigns and ignores the outcome.
                        let _ = resign(&node, &key, rev).await;
                        return Err(e);
                    }
                }
            }
            (resp.header, rev)
        };
        let guard = CleanupGuard::new(&self.node, key.clone(), Some(rev));
        let waited = wait_deletes(&self.node, &pfx, rev - 1, &key).await;
        guard.disarm();
        waited?;
        let node = self.node.get()?;
        Ok(Response::new(CampaignResponse {
            header: filled(&node, header),
            leader: Some(LeaderKey {
                name: r.name,
                key,
                rev,
                lease,
            }),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<ProclaimRequest>,
    ) -> Result<Response<ProclaimResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let r = req.into_inner();
        let l = r
            .leader
            .ok_or_else(|| Status::unknown(MSG_MISSING_LEADER_KEY))?;
        check_access(&access, &[], Some(&l.key[..]))?;
        let header = proclaim(&node, &l.key, l.rev, l.lease, r.value).await?;
        Ok(Response::new(ProclaimResponse {
            header: filled(&node, header),
        }))
    }

    async fn leader(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<LeaderResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let pfx = key_prefix(&req.into_inner().name);
        check_access(&access, &pfx, None)?;
        let (rev, kv) = leader(&node, &pfx)?;
        let kv = kv.ok_or_else(|| Status::unknown(MSG_NO_LEADER))?;
        Ok(Response::new(LeaderResponse {
            header: Some(node.header(rev)),
            kv: Some(kv),
        }))
    }

    /// etcd's `Election.Observe`: the leader now (or the first candidate once there is one),
    /// then every change of its value, then the next leader once it resigns, and so on.
    async fn observe(
        &self,
        req: Request<LeaderRequest>,
    ) -> Result<Response<BoxStream<LeaderResponse>>, Status> {
        let access = self.node.get()?.auth.request(&req);
        let pfx = key_prefix(&req.into_inner().name);
        check_access(&access, &pfx, None)?;
        let (tx, rx) = mpsc::channel(16);
        let node = self.node.clone();
        tokio::spawn(async move {
            let closed = tx.clone();
            tokio::select! {
                r = observe(node, pfx, tx.clone()) => {
                    if let Err(e) = r {
                        let _ = tx.send(Err(e)).await;
                    }
                }
                _ = closed.closed() => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn resign(
        &self,
        req: Request<ResignRequest>,
    ) -> Result<Response<ResignResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let l = req
            .into_inner()
            .leader
            .ok_or_else(|| Status::unknown(MSG_MISSING_LEADER_KEY))?;
        check_access(&access, &[], Some(&l.key[..]))?;
        let header = resign(&node, &l.key, l.rev).await?;
        Ok(Response::new(ResignResponse {
            header: filled(&node, header),
        }))
    }
}

type Sender = mpsc::Sender<Result<LeaderResponse, Status>>;

/// The loop of etcd's `Election.observe`. Ends with `Ok` when the client is gone.
async fn observe(node: NodeRef, pfx: Bytes, tx: Sender) -> Result<(), Status> {
    loop {
        let (rev, current) = leader(&*node.get()?, &pfx)?;
        let (rev, kv) = match current {
            Some(kv) => (rev, kv),
            None => {
                // Wait for the first candidate's put.
                let mut w = HubWatch::open(&node)?;
                w.watch(&pfx, &super::lock_service::prefix_end(&pfx), rev)?;
                loop {
                    let (_, _, events) = w.next().await?;
                    let put = events
                        .into_iter()
                        .find(|e| e.r#type == EventType::Put as i32)
                        .and_then(|e| e.kv);
                    if let Some(kv) = put {
                        break (kv.mod_revision, kv);
                    }
                }
            }
        };
        if !send(&node, &tx, rev, kv.clone()).await? {
            return Ok(());
        }
        // Follow this leader's key until it is deleted.
        let mut w = HubWatch::open(&node)?;
        w.watch(&kv.key, &[], rev + 1)?;
        'leader: loop {
            let (_, rev, events) = w.next().await?;
            for e in events {
                if super::lock_service::is_delete(&e) {
                    break 'leader;
                }
                if let Some(kv) = e.kv {
                    if !send(&node, &tx, rev, kv).await? {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Sends one observation; `false` once the client is gone.
async fn send(node: &NodeRef, tx: &Sender, rev: i64, kv: KeyValue) -> Result<bool, Status> {
    let header = Some(node.get()?.header(rev));
    Ok(tx
        .send(Ok(LeaderResponse {
            header,
            kv: Some(kv),
        }))
        .await
        .is_ok())
}
