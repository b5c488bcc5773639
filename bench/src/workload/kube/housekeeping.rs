//! kube-apiserver's other traffic: lists, counts, compaction, Status and health checks. Each
//! runs as its own task on a timer until the run stops.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::{
    compare, kv_client::KvClient, maintenance_client::MaintenanceClient, request_op, response_op,
    watch_client::WatchClient, watch_request, CompactionRequest, Compare, PutRequest, RangeRequest,
    RequestOp, StatusRequest, TxnRequest, WatchCreateRequest, WatchRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::check::{Invariant, ListCheck, Listed, Violation};
use super::{list, status_text, timed, Conn, Shared};
use crate::keys;
use crate::report::Recorder;

/// kube-apiserver's compaction bookkeeping key (outside `--etcd-prefix`, as upstream).
pub const COMPACT_REV_KEY: &[u8] = b"compact_rev_key";
/// How long the compacted-watch probe waits for the refusal.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// kube-apiserver's health check timeout.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// What the background tasks did.
#[derive(Debug, Default)]
pub struct Housekeeping {
    pub rec: Recorder,
    pub violations: Vec<Violation>,
    pub lists: u64,
    pub lists_compacted: u64,
    pub compactions: u64,
    pub compacted_probes: u64,
    pub version: String,
    pub db_size_max: i64,
}

impl Housekeeping {
    pub fn merge(&mut self, o: Housekeeping) {
        self.rec.merge(o.rec);
        self.violations.extend(o.violations);
        self.lists += o.lists;
        self.lists_compacted += o.lists_compacted;
        self.compactions += o.compactions;
        self.compacted_probes += o.compacted_probes;
        if self.version.is_empty() {
            self.version = o.version;
        }
        self.db_size_max = self.db_size_max.max(o.db_size_max);
    }
}

/// True for the error of a read at a compacted revision.
pub fn is_compacted(e: &Status) -> bool {
    e.code() == tonic::Code::OutOfRange && e.message().contains("compacted")
}

/// Sleeps `every`; false when the run stops first.
async fn tick(shared: &Shared, every: Duration) -> bool {
    let mut stop = shared.stop.clone();
    if *stop.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(every) => true,
        _ = stop.changed() => false,
    }
}

/// Lists the types in turn: a paginated list, a keys-only one, a count, and publishes each
/// as a [`ListCheck`] for the type's watchers.
pub async fn lister(shared: Arc<Shared>, every: Duration) -> Housekeeping {
    let mut h = Housekeeping::default();
    let mut conn = Conn::new(shared.channels.clone(), 1);
    let mut n = 0usize;
    while tick(&shared, every).await {
        let ty = n % shared.types.len();
        let kind = (n / shared.types.len()) % 3;
        n += 1;
        let mut kv = KvClient::new(conn.channel());
        let t0 = Instant::now();
        let res = match kind {
            0 | 1 => list(&mut kv, &shared, ty, kind == 1, 0)
                .await
                .map(|(rev, _, fp)| (rev, Listed::Items(fp))),
            _ => count(&mut kv, &shared, ty).await,
        };
        let what = ["list", "keys-only", "count"][kind];
        match res {
            Ok((rev, listed)) => {
                h.rec.record(what, t0.elapsed());
                h.lists += 1;
                shared.publish(ty, ListCheck { rev, listed, what });
            }
            // A compaction between two pages: kube-apiserver answers 410 and its client lists
            // again; not a failure of the store.
            Err(e) if is_compacted(&e) => h.lists_compacted += 1,
            Err(e) => {
                h.rec.error(format!("{what}: {}", status_text(&e)));
                conn.rotate();
            }
        }
    }
    h
}

async fn count(
    kv: &mut KvClient<tonic::transport::Channel>,
    shared: &Shared,
    ty: usize,
) -> Result<(i64, Listed), Status> {
    let prefix = shared.types.prefix(ty);
    let r = kv
        .range(timed(RangeRequest {
            range_end: keys::prefix_end(&prefix),
            key: prefix,
            count_only: true,
            ..Default::default()
        }))
        .await?
        .into_inner();
    let rev = r.header.map_or(0, |h| h.revision);
    Ok((rev, Listed::Count(r.count.max(0) as u64)))
}

/// Whether `e` is a connection the member refused, so that the request never reached it.
fn refused_before_sending(e: &Status) -> bool {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// kube-apiserver's compactor: every interval, a Txn on `compact_rev_key` guarded by its
/// version (so that several apiservers compact once), and if it wins, Compact at the revision
/// the previous round saw. After each compaction, a watch from just below it must be refused.
pub async fn compactor(shared: Arc<Shared>, every: Duration) -> Housekeeping {
    let mut h = Housekeeping::default();
    let mut conn = Conn::new(shared.channels.clone(), 2);
    let (mut version, mut prev_rev) = (0i64, 0i64);
    while tick(&shared, every).await {
        let mut kv = KvClient::new(conn.channel());
        let txn = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Version as i32,
                key: COMPACT_REV_KEY.into(),
                target_union: Some(compare::TargetUnion::Version(version)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: COMPACT_REV_KEY.into(),
                    value: prev_rev.to_string().into(),
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: COMPACT_REV_KEY.into(),
                    ..Default::default()
                })),
            }],
        };
        // A member that refused the connection never saw the txn: kube-apiserver's etcd
        // client sends it to another member at once (its balancer picks a live one), so the
        // round goes on there rather than waiting for the next tick. Any other failure may
        // have reached a member, and the round is over, as kube-apiserver's is.
        let mut left = shared.channels.len();
        let r = loop {
            let t0 = Instant::now();
            match kv.txn(timed(txn.clone())).await {
                Ok(r) => {
                    h.rec.record("compact-txn", t0.elapsed());
                    break Some(r.into_inner());
                }
                Err(e) => {
                    h.rec.error(format!("compact txn: {}", status_text(&e)));
                    conn.rotate();
                    left -= 1;
                    if left == 0 || !refused_before_sending(&e) {
                        break None;
                    }
                    kv = KvClient::new(conn.channel());
                }
            }
        };
        let Some(r) = r else { continue };
        let cur_rev = r.header.map_or(0, |h| h.revision);
        if !r.succeeded {
            // Someone else (an earlier attempt of ours whose answer was lost) won this round.
            version = r
                .responses
                .iter()
                .find_map(|op| match &op.response {
                    Some(response_op::Response::ResponseRange(rr)) => {
                        rr.kvs.first().map(|kv| kv.version)
                    }
                    _ => None,
                })
                .unwrap_or(version);
            prev_rev = cur_rev;
            continue;
        }
        version += 1;
        let rev = std::mem::replace(&mut prev_rev, cur_rev);
        if rev == 0 {
            continue; // kube-apiserver does not compact on its first round
        }
        shared.compact_requested.fetch_max(rev, Ordering::SeqCst);
        let t0 = Instant::now();
        match kv
            .compact(timed(CompactionRequest {
                revision: rev,
                physical: false,
            }))
            .await
        {
            Ok(r) => {
                h.rec.record("compact", t0.elapsed());
                h.compactions += 1;
                // `compacted_at` first: a reader of `compacted` then finds an `at` as recent.
                let at = r.into_inner().header.map_or(i64::MAX, |h| h.revision);
                shared.compacted_at.fetch_max(at, Ordering::SeqCst);
                shared.compacted.fetch_max(rev, Ordering::SeqCst);
                probe_compacted(&shared, &mut conn, rev, &mut h).await;
            }
            // Compacting again at a revision already compacted (a retried round) is refused.
            Err(e) if is_compacted(&e) => {
                shared.compacted.fetch_max(rev, Ordering::SeqCst);
            }
            Err(e) => {
                h.rec.error(format!("compact: {}", status_text(&e)));
                conn.rotate();
            }
        }
    }
    h
}

/// How many connections the compacted-watch probe tries before it gives up (a member may die
/// under it, as a leader kill does; the next connection answers).
const PROBE_ATTEMPTS: usize = 3;

/// A watch from `rev - 1` right after a compaction at `rev` must be refused as compacted. A probe
/// whose connection fails is tried again on the next connection, as a client would.
async fn probe_compacted(shared: &Shared, conn: &mut Conn, rev: i64, h: &mut Housekeeping) {
    for _ in 0..PROBE_ATTEMPTS {
        let t0 = Instant::now();
        match probe_once(shared, conn, rev).await {
            Ok(Ok(Some(c))) if c > 0 => {
                h.rec.record("compacted-watch", t0.elapsed());
                h.compacted_probes += 1;
                return;
            }
            Ok(Ok(_)) | Err(_) => {
                h.violations.push(Violation::new(
                    Invariant::CompactedWatchRefused,
                    format!(
                        "a watch from {} after a compaction at {rev} was not refused as compacted",
                        rev - 1
                    ),
                ));
                return;
            }
            Ok(Err(e)) => {
                h.rec
                    .error(format!("compacted-watch probe: {}", status_text(&e)));
                conn.rotate();
            }
        }
    }
}

/// One probe on the current connection: `Ok(Ok(Some(compact_revision)))` when refused.
async fn probe_once(
    shared: &Shared,
    conn: &Conn,
    rev: i64,
) -> Result<Result<Option<i64>, Status>, tokio::time::error::Elapsed> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let create = WatchCreateRequest {
        key: shared.types.health_key(),
        start_revision: rev - 1,
        ..Default::default()
    };
    let req = WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(create)),
    };
    if tx.send(req).await.is_err() {
        return Ok(Err(Status::internal("probe request channel closed")));
    }
    let outcome = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut s = WatchClient::new(conn.channel())
            .watch(ReceiverStream::new(rx))
            .await?
            .into_inner();
        loop {
            match s.message().await? {
                Some(r) if r.canceled => return Ok(Some(r.compact_revision)),
                Some(r) if r.created => continue,
                Some(_) => return Ok(None),
                None => return Err(Status::unavailable("watch stream ended")),
            }
        }
    })
    .await;
    drop(tx);
    outcome
}

/// `Status` on every connection in turn: the version and the database size kube-apiserver
/// polls (`--etcd-db-metric-poll-interval`).
pub async fn status(shared: Arc<Shared>, every: Duration) -> Housekeeping {
    let mut h = Housekeeping::default();
    let mut n = 0;
    loop {
        let ch = shared.channels[n % shared.channels.len()].clone();
        n += 1;
        let t0 = Instant::now();
        match MaintenanceClient::new(ch)
            .status(timed(StatusRequest {}))
            .await
        {
            Ok(r) => {
                let r = r.into_inner();
                h.rec.record("status", t0.elapsed());
                h.db_size_max = h.db_size_max.max(r.db_size);
                h.version = r.version;
            }
            Err(e) => h.rec.error(format!("status: {}", status_text(&e))),
        }
        if !tick(&shared, every).await {
            return h;
        }
    }
}

/// kube-apiserver's `/livez/etcd`: a Range of `<prefix>/health` with a short timeout.
pub async fn health(shared: Arc<Shared>, every: Duration) -> Housekeeping {
    let mut h = Housekeeping::default();
    let mut conn = Conn::new(shared.channels.clone(), 0);
    while tick(&shared, every).await {
        let mut req = tonic::Request::new(RangeRequest {
            key: shared.types.health_key(),
            ..Default::default()
        });
        req.set_timeout(HEALTH_TIMEOUT);
        let t0 = Instant::now();
        match KvClient::new(conn.channel()).range(req).await {
            Ok(_) => h.rec.record("health", t0.elapsed()),
            Err(e) => {
                h.rec.error(format!("health: {}", status_text(&e)));
                conn.rotate();
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_connection_is_told_from_a_failure_after_sending() {
        // A port nothing listens on any more: the connection is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .expect("endpoint")
            .connect_lazy();
        let refused = KvClient::new(channel)
            .txn(TxnRequest::default())
            .await
            .expect_err("nothing listens");
        assert!(refused_before_sending(&refused), "{refused:?}");
        // Statuses a member sent, or a deadline that passed, may follow a request it got.
        assert!(!refused_before_sending(&Status::unavailable(
            "etcdserver: leader changed"
        )));
        assert!(!refused_before_sending(&Status::deadline_exceeded(
            "timeout expired"
        )));
    }
}
