//! `etcdserverpb.Watch`: one bidirectional stream carries many watchers.
//!
//! The inbound half runs in its own task and talks to the [`WatchHub`](crate::watch::WatchHub);
//! every message for the client, from the hub or from this task, goes through one bounded
//! channel, so a watcher's `Created` precedes its events and a `Canceled` follows them.
//! [`open`] is that per-stream logic; the JSON gateway's `POST /v3/watch` drives it too.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use metastore_proto::etcdserverpb::watch_request::RequestUnion;
use metastore_proto::etcdserverpb::watch_server::Watch;
use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, WatchCreateRequest, WatchRequest, WatchResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::node::{Node, NodeRef};
use super::status::to_status;
use crate::apply::ApplyError;
use crate::auth::Credentials;
use crate::mvcc::KeyRange;
use crate::watch::{Delivery, StreamId, WatchSpec};

/// Messages buffered per stream before its watchers fall back to history replay.
pub const STREAM_BUFFER: usize = 256;

pub struct WatchService {
    node: NodeRef,
}

impl WatchService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

/// What a watch stream does when its client stops sending requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundEnd {
    /// Close the stream (its watchers are canceled and the outbound half ends).
    Close,
    /// Keep the watchers running until the outbound half is dropped (the client went away)
    /// or the node stops: the JSON gateway sends its requests and then only reads.
    KeepOpen,
}

/// Opens a watch stream driven by `inbound`: the per-stream logic behind both the gRPC
/// `Watch` method and the gateway's `POST /v3/watch`. The stream ends when the inbound half
/// fails, when it ends (with [`InboundEnd::Close`]), or when the node stops; dropping the
/// returned stream releases its watchers.
pub fn open<S>(
    node: &NodeRef,
    inbound: S,
    on_end: InboundEnd,
    creds: Credentials,
) -> Result<impl Stream<Item = WatchResponse> + Send + 'static, Status>
where
    S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
{
    let live = node.get()?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let stream = live.watch.open_stream(tx.clone());
    tokio::spawn(serve_inbound(
        node.clone(),
        stream,
        inbound,
        tx,
        on_end,
        creds,
    ));
    let weak = node.clone();
    let max = live.limits.max_request_bytes;
    Ok(ReceiverStream::new(rx).flat_map(move |d| {
        let responses = match weak.get() {
            Ok(node) => to_responses(&node, d, max),
            Err(_) => Vec::new(),
        };
        futures::stream::iter(responses)
    }))
}

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        // etcd's `hasleader` metadata: such a stream is refused without a leader, and ended
        // with "no leader" once the leader has been gone for three election timeouts.
        let require_leader = req
            .metadata()
            .get(REQUIRE_LEADER_KEY)
            .and_then(|v| v.to_str().ok())
            == Some("true");
        // As etcd, a client that half-closes its side keeps getting events: the stream ends
        // when the client goes away (or the node stops).
        if !require_leader {
            let creds = Credentials::of(&req);
            let out = open(&self.node, req.into_inner(), InboundEnd::KeepOpen, creds)?;
            return Ok(Response::new(Box::pin(out.map(Ok))));
        }
        let node = self.node.get()?;
        if node.replica.leader_id().is_none() {
            return Err(to_status(&ApplyError::NoLeader));
        }
        let election = node.replica.timing.election;
        drop(node);
        let creds = Credentials::of(&req);
        let out = open(&self.node, req.into_inner(), InboundEnd::KeepOpen, creds)?;
        let lost = Arc::new(AtomicBool::new(false));
        let monitor = leader_lost(self.node.clone(), election, lost.clone());
        let ending =
            futures::stream::once(async move { lost.load(Ordering::SeqCst) }).filter_map(|lost| {
                futures::future::ready(lost.then(|| Err(to_status(&ApplyError::NoLeader))))
            });
        Ok(Response::new(Box::pin(
            out.map(Ok).take_until(monitor).chain(ending),
        )))
    }
}

/// The gRPC metadata key etcd clients set (`WithRequireLeader`) on streams that must end
/// when the cluster loses its leader.
pub const REQUIRE_LEADER_KEY: &str = "hasleader";

/// Resolves (setting `lost`) once the node has seen no leader for three election timeouts in
/// a row, as etcd's `monitorLeader` does; never resolves while the node runs with a leader.
async fn leader_lost(node: NodeRef, election: std::time::Duration, lost: Arc<AtomicBool>) {
    let mut missing = 0;
    loop {
        tokio::time::sleep(election).await;
        let Ok(n) = node.get() else { return };
        if n.replica.leader_id().is_none() {
            missing += 1;
        } else {
            missing = 0;
        }
        if missing >= 3 {
            lost.store(true, Ordering::SeqCst);
            return;
        }
    }
}

/// How often a kept-open stream whose client sends nothing more checks that the node runs.
const LIVENESS_TICK: std::time::Duration = std::time::Duration::from_secs(1);

async fn serve_inbound<S>(
    node: NodeRef,
    stream: StreamId,
    mut inbound: S,
    tx: mpsc::Sender<Delivery>,
    on_end: InboundEnd,
    creds: Credentials,
) where
    S: Stream<Item = Result<WatchRequest, Status>> + Send + Unpin + 'static,
{
    let mut ended = false;
    while let Some(item) = inbound.next().await {
        let (Ok(req), Ok(node)) = (item, node.get()) else {
            ended = true;
            break;
        };
        let reply = match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => create(&node, stream, c, &tx, &creds).await,
            Some(RequestUnion::CancelRequest(c)) => match node.watch.cancel(stream, c.watch_id) {
                Some(rev) => tx
                    .send(Delivery::Canceled {
                        watch_id: c.watch_id,
                        rev,
                    })
                    .await
                    .is_ok(),
                None => true, // etcd ignores cancels of unknown ids
            },
            Some(RequestUnion::ProgressRequest(_)) => match node.watch.request_progress(stream) {
                Some(rev) => tx
                    .send(Delivery::Progress { watch_id: -1, rev })
                    .await
                    .is_ok(),
                None => true,
            },
            None => true,
        };
        if !reply {
            ended = true;
            break;
        }
    }
    if on_end == InboundEnd::KeepOpen && !ended {
        // The client only reads from now on: wait until it goes away (the receiver is
        // dropped) or the node stops, whichever comes first.
        let mut tick = tokio::time::interval(LIVENESS_TICK);
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                _ = tick.tick() => {
                    if node.get().is_err() {
                        break;
                    }
                }
            }
        }
    }
    if let Ok(node) = node.get() {
        node.watch.close_stream(stream);
    }
}

async fn create(
    node: &Node,
    stream: StreamId,
    c: WatchCreateRequest,
    tx: &mpsc::Sender<Delivery>,
    creds: &Credentials,
) -> bool {
    // READ on the watched range, checked at each create with the stream's credentials (the
    // user's permissions as they are now), as etcd's `isWatchPermitted`.
    if let Err(e) = node
        .auth
        .access(creds)
        .and_then(|a| a.read(&c.key, &c.range_end))
    {
        return tx
            .send(Delivery::Refused {
                watch_id: -1,
                rev: node.store.current_revision(),
                reason: super::status::auth_cancel_reason(&e),
            })
            .await
            .is_ok();
    }
    let spec = WatchSpec {
        range: KeyRange::new(&c.key, &c.range_end),
        start_rev: c.start_revision,
        watch_id: c.watch_id,
        no_put: c.filters.contains(&(FilterType::Noput as i32)),
        no_delete: c.filters.contains(&(FilterType::Nodelete as i32)),
        prev_kv: c.prev_kv,
        progress_notify: c.progress_notify,
        fragment: c.fragment,
    };
    match node.watch.watch(stream, spec) {
        Ok((id, rev)) => {
            if tx
                .send(Delivery::Created { watch_id: id, rev })
                .await
                .is_err()
            {
                return false;
            }
            node.watch.activate(stream, id);
            true
        }
        Err(e) => tx
            .send(Delivery::Refused {
                watch_id: -1,
                rev: node.store.current_revision(),
                reason: e.to_string(),
            })
            .await
            .is_ok(),
    }
}

/// The wire responses for one delivery: one, or several fragments when the watcher asked for
/// `fragment` and the events exceed `--max-request-bytes`.
fn to_responses(node: &Node, d: Delivery, max_bytes: usize) -> Vec<WatchResponse> {
    let base = |watch_id, rev| WatchResponse {
        header: Some(node.header(rev)),
        watch_id,
        ..Default::default()
    };
    match d {
        Delivery::Created { watch_id, rev } => vec![WatchResponse {
            created: true,
            ..base(watch_id, rev)
        }],
        Delivery::Refused {
            watch_id,
            rev,
            reason,
        } => vec![WatchResponse {
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..base(watch_id, rev)
        }],
        Delivery::Canceled { watch_id, rev } => vec![WatchResponse {
            canceled: true,
            ..base(watch_id, rev)
        }],
        Delivery::Compacted {
            watch_id,
            compact_rev,
            rev,
        } => vec![WatchResponse {
            canceled: true,
            compact_revision: compact_rev,
            ..base(watch_id, rev)
        }],
        Delivery::Progress { watch_id, rev } => vec![base(watch_id, rev)],
        Delivery::Events {
            watch_id,
            rev,
            events,
            fragment,
        } => {
            let whole = WatchResponse {
                events,
                ..base(watch_id, rev)
            };
            if !fragment || whole.encoded_len() <= max_bytes {
                return vec![whole];
            }
            let mut out: Vec<WatchResponse> = Vec::new();
            let mut cur = base(watch_id, rev);
            let mut size = 0;
            for e in whole.events {
                let n = e.encoded_len();
                if !cur.events.is_empty() && size + n > max_bytes {
                    cur.fragment = true;
                    out.push(std::mem::replace(&mut cur, base(watch_id, rev)));
                    size = 0;
                }
                size += n;
                cur.events.push(e);
            }
            out.push(cur);
            out
        }
    }
}
