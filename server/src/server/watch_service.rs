//! `etcdserverpb.Watch`: one bidirectional stream carries many watchers.
//!
//! The inbound half runs in its own task and talks to the [`WatchHub`](crate::watch::WatchHub);
//! every message for the client, from the hub or from this task, goes through one bounded
//! channel, so a watcher's `Created` precedes its events and a `Canceled` follows them.

use std::pin::Pin;

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

#[tonic::async_trait]
impl Watch for WatchService {
    async fn watch(
        &self,
        req: Request<Streaming<WatchRequest>>,
    ) -> Result<Response<WatchStream>, Status> {
        let node = self.node.get()?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let stream = node.watch.open_stream(tx.clone());
        let inbound = req.into_inner();
        tokio::spawn(serve_inbound(self.node.clone(), stream, inbound, tx));
        let weak = self.node.clone();
        let max = node.limits.max_request_bytes;
        let out = ReceiverStream::new(rx).flat_map(move |d| {
            let responses = match weak.get() {
                Ok(node) => to_responses(&node, d, max),
                Err(_) => Vec::new(),
            };
            futures::stream::iter(responses.into_iter().map(Ok))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

async fn serve_inbound(
    node: NodeRef,
    stream: StreamId,
    mut inbound: Streaming<WatchRequest>,
    tx: mpsc::Sender<Delivery>,
) {
    while let Some(Ok(req)) = inbound.next().await {
        let Ok(node) = node.get() else { break };
        let reply = match req.request_union {
            Some(RequestUnion::CreateRequest(c)) => create(&node, stream, c, &tx).await,
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
            break;
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
) -> bool {
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
