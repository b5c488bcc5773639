//! `etcdserverpb.KV`: validate, call the store or propose, map errors, fill the header.

use metastore_proto::etcdserverpb::kv_server::Kv;
use metastore_proto::etcdserverpb::{
    CompactionRequest, CompactionResponse, DeleteRangeRequest, DeleteRangeResponse, PutRequest,
    PutResponse, RangeRequest, RangeResponse, RangeStreamResponse, TxnRequest, TxnResponse,
};
use prost::Message;
use tonic::{Request, Response, Status};

use super::node::{Node, NodeRef};
use super::range_stream::{self, StreamEncoder};

/// What `RangeStream` returns (the generated trait's boxed stream).
type RangeStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<RangeStreamResponse, Status>> + Send + 'static>,
>;
use super::status::{auth_status, to_status};
use crate::apply::command::CommandResult;
use crate::apply::{self, validate, ApplyError, Command};
use crate::auth::{Access, AuthError};

pub struct KvService {
    node: NodeRef,
}

impl KvService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }

    /// What every Range does before reading (unary, streamed or sent as produced): etcd's
    /// validation, the requester's READ permission on the range (`access`, from
    /// [`crate::auth::AuthStore::request`]), then, unless serializable, the ReadIndex wait
    /// (once per request).
    pub(super) async fn admit_read(
        node: &Node,
        access: crate::auth::Result<Access>,
        r: &RangeRequest,
    ) -> Result<(), Status> {
        validate::check_range(r).map_err(err)?;
        access
            .and_then(|a| a.read(&r.key, &r.range_end))
            .map_err(denied)?;
        if !r.serializable {
            node.linearizable_read().await.map_err(err)?;
        }
        Ok(())
    }

    /// A txn whose every operation is a Range ([`apply::txn::is_read_only`]), answered like a
    /// Range (etcd's read-only txn path): the ReadIndex wait unless every Range is
    /// serializable, then one snapshot read. It changes nothing, so it needs no log entry.
    async fn read_only_txn(node: &Node, r: TxnRequest) -> Result<TxnResponse, Status> {
        if !apply::txn::is_serializable(&r) {
            node.linearizable_read().await.map_err(err)?;
        }
        let point = apply::txn::is_point_read(&r);
        let mut resp =
            read_store(node, point, move |s| apply::txn::execute_read_only(s, &r)).await?;
        node.fill(&mut resp.header);
        Ok(resp)
    }

    async fn propose(node: &Node, cmd: Command) -> Result<CommandResult, Status> {
        node.propose(cmd)
            .await
            .map(|a| a.result)
            .map_err(|e| to_status(&e))
    }
}

/// Runs `read` on the store: on the async worker when it is `cheap` (single-key lookups), on
/// the blocking pool otherwise, so that a long scan does not hold up other requests.
async fn read_store<T: Send + 'static>(
    node: &Node,
    cheap: bool,
    read: impl FnOnce(&crate::mvcc::Store) -> apply::Result<T> + Send + 'static,
) -> Result<T, Status> {
    let r = if cheap {
        read(node.store.as_ref())
    } else {
        let store = node.store.clone();
        tokio::task::spawn_blocking(move || read(store.as_ref()))
            .await
            .map_err(|e| Status::internal(format!("etcdserver: read task: {e}")))?
    };
    r.map_err(err)
}

fn unexpected() -> Status {
    Status::internal("etcdserver: unexpected apply result")
}

fn err(e: ApplyError) -> Status {
    to_status(&e)
}

fn denied(e: AuthError) -> Status {
    auth_status(&e)
}

/// etcd's `checkLeasePuts`: attaching a key to a lease needs WRITE on every key the lease
/// already holds (whoever may not revoke the lease may not extend it).
pub(crate) fn check_lease_puts(node: &Node, access: &Access, lease: i64) -> Result<(), Status> {
    if lease == 0 || access.is_admin() {
        return Ok(());
    }
    let keys = node.store.lease_keys(lease).map_err(|e| err(e.into()))?;
    for k in keys {
        access.write(&k, &[]).map_err(denied)?;
    }
    Ok(())
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(&self, req: Request<RangeRequest>) -> Result<Response<RangeResponse>, Status> {
        // A range over a key range normally arrives as a body produced while it is sent
        // (`range_body`); this handler serves single keys and the JSON gateway.
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let r = req.into_inner();
        Self::admit_read(&node, access, &r).await?;
        let point = r.range_end.is_empty();
        let mut resp = read_store(&node, point, move |s| apply::range::range(s, &r)).await?;
        node.fill(&mut resp.header);
        Ok(Response::new(resp))
    }

    /// etcd 3.7's streaming Range: the result in messages of about
    /// [`range_stream::CHUNK_BYTES`], header, `count` and `more` in the last one.
    async fn range_stream(
        &self,
        req: Request<RangeRequest>,
    ) -> Result<Response<RangeStream>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let r = req.into_inner();
        Self::admit_read(&node, access, &r).await?;
        let produced = range_stream::start(&node, r, StreamEncoder::default()).await?;
        Ok(Response::new(Box::pin(produced)))
    }

    async fn put(&self, req: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let r = req.into_inner();
        validate::check_put(&r).map_err(err)?;
        node.check_size(r.encoded_len()).map_err(err)?;
        let access = access.map_err(denied)?;
        access.write(&r.key, &[]).map_err(denied)?;
        check_lease_puts(&node, &access, r.lease)?;
        if r.prev_kv {
            access.read(&r.key, &[]).map_err(denied)?;
        }
        node.check_quota(r.encoded_len()).await.map_err(err)?;
        match Self::propose(&node, Command::Put(r)).await? {
            CommandResult::Put(mut resp) => {
                node.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn delete_range(
        &self,
        req: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let r = req.into_inner();
        validate::check_delete(&r).map_err(err)?;
        node.check_size(r.encoded_len()).map_err(err)?;
        let access = access.map_err(denied)?;
        access.write(&r.key, &r.range_end).map_err(denied)?;
        if r.prev_kv {
            access.read(&r.key, &r.range_end).map_err(denied)?;
        }
        match Self::propose(&node, Command::DeleteRange(r)).await? {
            CommandResult::DeleteRange(mut resp) => {
                node.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn txn(&self, req: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req);
        let r = req.into_inner();
        validate::check_txn(&r, node.limits.max_txn_ops).map_err(err)?;
        node.check_size(r.encoded_len()).map_err(err)?;
        access.and_then(|a| a.txn(&r)).map_err(denied)?;
        if apply::txn::is_read_only(&r) {
            return Self::read_only_txn(&node, r).await.map(Response::new);
        }
        if apply::txn::has_put(&r) {
            node.check_quota(r.encoded_len()).await.map_err(err)?;
        }
        match Self::propose(&node, Command::Txn(r)).await? {
            CommandResult::Txn(mut resp) => {
                node.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }

    async fn compact(
        &self,
        req: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let node = self.node.get()?;
        // As etcd 3.4 and 3.5: any authenticated user may compact (no permission check), but
        // the token must be valid.
        node.auth.request(&req).map_err(denied)?;
        let r = req.into_inner();
        let physical = r.physical;
        match Self::propose(&node, Command::Compact(r)).await? {
            CommandResult::Compact(mut resp, ticket) => {
                if physical {
                    node.store.compactor().wait(&ticket).await;
                }
                node.fill(&mut resp.header);
                Ok(Response::new(resp))
            }
            _ => Err(unexpected()),
        }
    }
}
