//! `v3lockpb.Lock`: etcd's distributed mutex (`concurrency.Mutex`), run inside the server.
//!
//! etcd implements this service by running its client-side recipe on the server's own KV,
//! Watch and Lease APIs; MetaStore does the same on the store, the write pipeline and the
//! watch hub. A lock on `name` is the key `name/<lease id in hex>`, attached to the caller's
//! lease; the holder is the key under `name/` with the smallest create revision, and a
//! waiter watches the newest key created before its own until it is deleted (etcd's
//! `waitDeletes`), so a release wakes exactly one waiter.
//!
//! The helpers here (`session_lease`, [`wait_deletes`], [`HubWatch`], ...) are shared with the
//! election service, which uses the same recipe.
//!
//! Errors: etcd's lock and election servers return the errors of their in-process client,
//! whose codes are lost on the way (`rpctypes.EtcdError` carries no gRPC status), so every
//! failure reaches the client as `Unknown` with etcd's message (checked against etcd 3.4).

use bytes::Bytes;
use metastore_proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use metastore_proto::etcdserverpb::lease_server::Lease;
use metastore_proto::etcdserverpb::range_request::{SortOrder, SortTarget};
use metastore_proto::etcdserverpb::request_op::Request as Op;
use metastore_proto::etcdserverpb::response_op::Response as OpResponse;
use metastore_proto::etcdserverpb::{
    Compare, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, RangeResponse,
    RequestOp, ResponseHeader, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::{event::EventType, KeyValue};
use metastore_proto::v3lockpb::lock_server::Lock;
use metastore_proto::v3lockpb::{LockRequest, LockResponse, UnlockRequest, UnlockResponse};
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use super::lease_service::LeaseService;
use super::node::{Node, NodeRef};
use super::status::to_status;
use crate::apply::command::CommandResult;
use crate::apply::{self, validate, ApplyError, Command};
use crate::mvcc::KeyRange;
use crate::watch::{Delivery, StreamId, WatchId, WatchSpec};

/// etcd's `concurrency.ErrSessionExpired` (etcd 3.5): the caller's key vanished (its lease
/// was revoked or expired) while it waited.
pub const MSG_SESSION_EXPIRED: &str = "session: session is expired";
/// The TTL of the lease etcd's server grants when a request names lease 0
/// (`concurrency.NewSession` without `WithLease`; the lease is not kept alive).
pub const DEFAULT_SESSION_TTL: i64 = 60;

/// An error as etcd's lock and election servers return it: code `Unknown`, etcd's message.
pub fn client_error(s: Status) -> Status {
    match s.code() {
        // The node is gone: keep the code clients retry on.
        tonic::Code::Unavailable | tonic::Code::Unknown => s,
        _ => Status::unknown(s.message().to_string()),
    }
}

fn apply_error(e: ApplyError) -> Status {
    client_error(to_status(&e))
}

fn unexpected() -> Status {
    Status::internal("etcdserver: unexpected apply result")
}

/// `fmt.Sprintf("%s%x", pfx, lease)` with Go's formatting of a signed id.
pub fn session_key(prefix: &[u8], lease: i64) -> Bytes {
    let hex = if lease < 0 {
        format!("-{:x}", lease.unsigned_abs())
    } else {
        format!("{lease:x}")
    };
    let mut k = prefix.to_vec();
    k.extend_from_slice(hex.as_bytes());
    Bytes::from(k)
}

/// `name + "/"`: the prefix under which the contenders' keys live.
pub fn key_prefix(name: &[u8]) -> Bytes {
    let mut p = name.to_vec();
    p.push(b'/');
    Bytes::from(p)
}

/// The caller's permissions for a lock or an election named by `prefix`, as etcd's
/// in-process client is checked with the caller's token: READ on the whole prefix (the owner
/// query, the wait for earlier keys) and WRITE on `key` (the caller's own key), if given.
pub fn check_access(
    access: &Result<crate::auth::Access, crate::auth::AuthError>,
    prefix: &[u8],
    key: Option<&[u8]>,
) -> Result<(), Status> {
    let deny = |e: crate::auth::AuthError| super::status::auth_status(&e);
    let access = access.as_ref().map_err(|e| deny(e.clone()))?;
    if !prefix.is_empty() {
        access.read(prefix, &prefix_end(prefix)).map_err(deny)?;
    }
    if let Some(key) = key {
        access.write(key, &[]).map_err(deny)?;
    }
    Ok(())
}

/// The `range_end` that makes `key` a prefix (etcd's `GetPrefixRangeEnd`).
pub fn prefix_end(key: &[u8]) -> Bytes {
    let mut end = key.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Bytes::from(end);
        }
    }
    Bytes::from_static(&[0])
}

/// The lease a request works under: its own, or, for lease 0, a new one of
/// [`DEFAULT_SESSION_TTL`] seconds, as etcd's `NewSession` grants.
pub async fn session_lease(node: &NodeRef, lease: i64) -> Result<i64, Status> {
    if lease != 0 {
        return Ok(lease);
    }
    let resp = LeaseService::new(node.clone())
        .lease_grant(Request::new(LeaseGrantRequest {
            ttl: DEFAULT_SESSION_TTL,
            id: 0,
        }))
        .await
        .map_err(client_error)?;
    Ok(resp.into_inner().id)
}

pub fn compare_create(key: &Bytes, rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Create as i32,
        key: key.clone(),
        range_end: Bytes::new(),
        target_union: Some(TargetUnion::CreateRevision(rev)),
    }
}

pub fn op_put(key: &Bytes, value: Bytes, lease: i64) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestPut(PutRequest {
            key: key.clone(),
            value,
            lease,
            ..Default::default()
        })),
    }
}

pub fn op_get(key: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestRange(RangeRequest {
            key: key.clone(),
            ..Default::default()
        })),
    }
}

pub fn op_delete(key: &Bytes) -> RequestOp {
    RequestOp {
        request: Some(Op::RequestDeleteRange(DeleteRangeRequest {
            key: key.clone(),
            ..Default::default()
        })),
    }
}

/// A Range over `prefix` sorted by create revision, one key: etcd's `WithFirstCreate`
/// (ascending) or `WithLastCreate` (descending), optionally `WithMaxCreateRev`.
pub fn by_create(prefix: &Bytes, order: SortOrder, max_create_rev: i64) -> RangeRequest {
    RangeRequest {
        key: prefix.clone(),
        range_end: prefix_end(prefix),
        limit: 1,
        sort_order: order as i32,
        sort_target: SortTarget::Create as i32,
        max_create_revision: max_create_rev,
        ..Default::default()
    }
}

/// A Txn through the write pipeline.
pub async fn txn(node: &Node, t: TxnRequest) -> Result<TxnResponse, Status> {
    node.check_size(t.encoded_len()).map_err(apply_error)?;
    match node
        .propose(Command::Txn(t))
        .await
        .map_err(apply_error)?
        .result
    {
        CommandResult::Txn(r) => Ok(r),
        _ => Err(unexpected()),
    }
}

/// A linearizable read of the store (the single-member store is always current).
pub fn range(node: &Node, r: &RangeRequest) -> Result<RangeResponse, Status> {
    apply::range::range(node.store.as_ref(), r).map_err(apply_error)
}

pub fn header_rev(h: &Option<ResponseHeader>) -> i64 {
    h.as_ref().map_or(0, |h| h.revision)
}

/// The key-values of the `i`-th response of a txn branch, when it is a Range.
pub fn range_kvs(t: &TxnResponse, i: usize) -> &[KeyValue] {
    match t.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(OpResponse::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

/// Watchers on the node's [`WatchHub`](crate::watch::WatchHub), closed when dropped (also
/// when the request future is dropped because the client went away). It holds the node
/// weakly: when the node stops, the hub closes the channel and [`next`](Self::next) ends.
pub struct HubWatch {
    node: NodeRef,
    stream: StreamId,
    rx: mpsc::Receiver<Delivery>,
}

/// Deliveries buffered before the hub falls back to replaying history for these watchers.
const HUB_BUFFER: usize = 16;

impl HubWatch {
    pub fn open(node: &NodeRef) -> Result<Self, Status> {
        let n = node.get()?;
        let (tx, rx) = mpsc::channel(HUB_BUFFER);
        let stream = n.watch.open_stream(tx);
        Ok(Self {
            node: node.clone(),
            stream,
            rx,
        })
    }

    /// Watches `key` (with `range_end`) from revision `start_rev` on.
    pub fn watch(&self, key: &[u8], range_end: &[u8], start_rev: i64) -> Result<WatchId, Status> {
        let n = self.node.get()?;
        let spec = WatchSpec {
            range: KeyRange::new(key, range_end),
            start_rev,
            watch_id: 0,
            no_put: false,
            no_delete: false,
            prev_kv: false,
            progress_notify: false,
            fragment: false,
        };
        let (id, _) = n
            .watch
            .watch(self.stream, spec)
            .map_err(|e| Status::unknown(e.to_string()))?;
        n.watch.activate(self.stream, id);
        Ok(id)
    }

    /// The next batch of events: `(watch id, revision, events)`. Errors when the history a
    /// watcher needs is compacted or the node stopped.
    pub async fn next(
        &mut self,
    ) -> Result<(WatchId, i64, Vec<metastore_proto::mvccpb::Event>), Status> {
        loop {
            match self.rx.recv().await {
                Some(Delivery::Events {
                    watch_id,
                    rev,
                    events,
                    ..
                }) => return Ok((watch_id, rev, events.to_vec())),
                Some(Delivery::Compacted { .. }) => {
                    return Err(Status::unknown(super::status::MSG_COMPACTED))
                }
                Some(Delivery::Refused { reason, .. }) => return Err(Status::unknown(reason)),
                Some(_) => {}
                None => return Err(Status::unavailable(super::status::MSG_STOPPED)),
            }
        }
    }
}

impl Drop for HubWatch {
    fn drop(&mut self) {
        if let Ok(n) = self.node.get() {
            n.watch.close_stream(self.stream);
        }
    }
}

pub fn is_delete(e: &metastore_proto::mvccpb::Event) -> bool {
    e.r#type == EventType::Delete as i32
}

/// etcd's `waitDeletes`: waits until no key under `prefix` has a create revision at or below
/// `max_create_rev`, watching the newest such key until it is deleted, again and again.
///
/// Unlike etcd, it also watches `own_key` and fails with [`MSG_SESSION_EXPIRED`] as soon as
/// that key is deleted (its lease was revoked or expired): etcd notices only after every
/// earlier key is gone. Returns the revision at which no earlier key remained.
pub async fn wait_deletes(
    node: &NodeRef,
    prefix: &Bytes,
    max_create_rev: i64,
    own_key: &Bytes,
) -> Result<i64, Status> {
    loop {
        let (rev, last) = {
            let n = node.get()?;
            let own = range(&n, &op_range(own_key))?;
            let rev = header_rev(&own.header);
            if own.kvs.is_empty() {
                return Err(Status::unknown(MSG_SESSION_EXPIRED));
            }
            let mut r = by_create(prefix, SortOrder::Descend, max_create_rev);
            r.revision = rev;
            let resp = range(&n, &r)?;
            match resp.kvs.into_iter().next() {
                None => return Ok(rev),
                Some(kv) => (rev, kv.key),
            }
        };
        let mut w = HubWatch::open(node)?;
        let target = w.watch(&last, &[], rev + 1)?;
        let own = w.watch(own_key, &[], rev + 1)?;
        'wait: loop {
            let (id, _, events) = w.next().await?;
            if events.iter().any(is_delete) {
                if id == own {
                    return Err(Status::unknown(MSG_SESSION_EXPIRED));
                }
                if id == target {
                    break 'wait;
                }
            }
        }
    }
}

fn op_range(key: &Bytes) -> RangeRequest {
    RangeRequest {
        key: key.clone(),
        ..Default::default()
    }
}

/// Deletes a contender's key if the request ends before it is done (an error, or the
/// client going away, which drops the request future): etcd's `m.Unlock` / `e.Resign` on a
/// canceled context. With `create_rev`, only while the key is still that incarnation.
pub struct CleanupGuard {
    node: NodeRef,
    key: Bytes,
    create_rev: Option<i64>,
    armed: bool,
}

impl CleanupGuard {
    pub fn new(node: &NodeRef, key: Bytes, create_rev: Option<i64>) -> Self {
        Self {
            node: node.clone(),
            key,
            create_rev,
            armed: true,
        }
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let node = self.node.clone();
        let key = self.key.clone();
        let compare = self
            .create_rev
            .map(|rev| vec![compare_create(&key, rev)])
            .unwrap_or_default();
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        handle.spawn(async move {
            let Ok(n) = node.get() else { return };
            let t = TxnRequest {
                compare,
                success: vec![op_delete(&key)],
                failure: vec![],
            };
            if let Err(e) = txn(&n, t).await {
                tracing::warn!(key = %String::from_utf8_lossy(&key), error = %e, "releasing an abandoned lock or election key failed");
            }
        });
    }
}

pub struct LockService {
    node: NodeRef,
}

impl LockService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    /// etcd's `concurrency.Mutex.Lock` (3.5): create `name/<lease>` if absent, then wait for
    /// every key created before it to go.
    async fn lock(&self, req: Request<LockRequest>) -> Result<Response<LockResponse>, Status> {
        let access = self.node.get()?.auth.request(&req);
        let r = req.into_inner();
        let pfx = key_prefix(&r.name);
        check_access(&access, &pfx, None)?;
        let lease = session_lease(&self.node, r.lease).await?;
        let key = session_key(&pfx, lease);
        check_access(&access, &[], Some(&key[..]))?;
        let resp = {
            let node = self.node.get()?;
            let owner = RequestOp {
                request: Some(Op::RequestRange(by_create(&pfx, SortOrder::Ascend, 0))),
            };
            txn(
                &node,
                TxnRequest {
                    compare: vec![compare_create(&key, 0)],
                    success: vec![op_put(&key, Bytes::new(), lease), owner.clone()],
                    failure: vec![op_get(&key), owner],
                },
            )
            .await?
        };
        let my_rev = if resp.succeeded {
            header_rev(&resp.header)
        } else {
            range_kvs(&resp, 0)
                .first()
                .map_or(0, |kv| kv.create_revision)
        };
        let owner = range_kvs(&resp, 1).first().map(|kv| kv.create_revision);
        let node = self.node.get()?;
        if owner.is_none() || owner == Some(my_rev) {
            let mut header = resp.header;
            node.fill(&mut header);
            return Ok(Response::new(LockResponse {
                header,
                key: key.clone(),
            }));
        }
        drop(node);
        let guard = CleanupGuard::new(&self.node, key.clone(), None);
        let waited = wait_deletes(&self.node, &pfx, my_rev - 1, &key).await;
        // etcd deletes the key when the wait fails, except when it is already gone.
        if !matches!(&waited, Err(e) if e.message() != MSG_SESSION_EXPIRED) {
            guard.disarm();
        }
        let rev = waited?;
        let node = self.node.get()?;
        Ok(Response::new(LockResponse {
            header: Some(node.header(rev)),
            key,
        }))
    }

    /// Deletes the lock key (whoever holds it, as etcd does).
    async fn unlock(
        &self,
        req: Request<UnlockRequest>,
    ) -> Result<Response<UnlockResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let d = DeleteRangeRequest {
            key: req.into_inner().key,
            ..Default::default()
        };
        check_access(&access, &[], Some(&d.key[..]))?;
        validate::check_delete(&d).map_err(apply_error)?;
        node.check_size(d.encoded_len()).map_err(apply_error)?;
        match node
            .propose(Command::DeleteRange(d))
            .await
            .map_err(apply_error)?
            .result
        {
            CommandResult::DeleteRange(mut resp) => {
                node.fill(&mut resp.header);
                Ok(Response::new(UnlockResponse {
                    header: resp.header,
                }))
            }
            _ => Err(unexpected()),
        }
    }
}
