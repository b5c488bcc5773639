//! `watch`: watcher creation. Each requester opens one watch stream (with one first watcher,
//! not measured) and then creates one watcher per request on a key of the key space, timing
//! the create request until its `created` answer. Watchers stay open until the run ends.

use std::sync::Arc;

use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use tokio::sync::mpsc;

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::keys::{KeySpace, Rng};
use crate::lean::{self, WatchResponse};
use crate::options::Common;
use crate::report::Report;
use crate::runner::{self, Workload};

/// One bidirectional watch stream; its responses are decoded as [`lean::WatchResponse`] (the
/// fields the workloads read).
pub struct WatchStream {
    tx: mpsc::Sender<WatchRequest>,
    rx: lean::WatchResponses,
}

fn create(req: WatchCreateRequest) -> WatchRequest {
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(req)),
    }
}

impl WatchStream {
    /// Opens a stream with `first` as its first watcher. The first request is queued before the
    /// call, because a gRPC server may send no response headers until it has something to say.
    pub async fn open(channel: Conn, first: WatchCreateRequest) -> Result<Self> {
        let (tx, rx) = mpsc::channel(64);
        tx.send(create(first))
            .await
            .map_err(|_| Error::Stream("watch request queue closed".into()))?;
        let rx = lean::watch(channel, rx).await?;
        let mut stream = Self { tx, rx };
        stream.created().await?;
        Ok(stream)
    }

    /// Creates one more watcher and waits until the server confirms it; returns its id.
    pub async fn watch(&mut self, req: WatchCreateRequest) -> Result<i64, tonic::Status> {
        self.tx
            .send(create(req))
            .await
            .map_err(|_| tonic::Status::cancelled("watch request queue closed"))?;
        self.created().await
    }

    /// Skips events until the next `created` answer.
    async fn created(&mut self) -> Result<i64, tonic::Status> {
        loop {
            match self.rx.message().await? {
                Some(r) if r.canceled => {
                    return Err(tonic::Status::aborted(format!(
                        "watch canceled: {}",
                        r.cancel_reason
                    )))
                }
                Some(r) if r.created => return Ok(r.watch_id),
                Some(_) => continue,
                None => return Err(tonic::Status::unavailable("watch stream ended")),
            }
        }
    }

    /// The next response (events of any watcher) into `out`, keeping its event vector's
    /// room ([`lean::WatchResponses::next_into`]); `false` when the stream ended.
    pub async fn next_into(&mut self, out: &mut WatchResponse) -> Result<bool, tonic::Status> {
        self.rx.next_into(out).await
    }
}

pub struct Watch {
    keys: KeySpace,
}

impl Workload for Watch {
    type Client = (WatchStream, Rng);

    async fn client(&self, channel: Conn, id: usize) -> Result<Self::Client> {
        let first = WatchCreateRequest {
            key: self.keys.key(0),
            ..Default::default()
        };
        Ok((
            WatchStream::open(channel, first).await?,
            Rng::seeded(id as u64),
        ))
    }

    async fn call(
        &self,
        (stream, rng): &mut Self::Client,
        seq: u64,
    ) -> Result<&'static str, tonic::Status> {
        let key = self.keys.key(self.keys.index(seq, rng));
        stream
            .watch(WatchCreateRequest {
                key,
                ..Default::default()
            })
            .await?;
        Ok("create")
    }
}

pub async fn run(common: &Common, channels: &[Conn], bar: &ProgressBar) -> Result<Report> {
    let keys = KeySpace::new(
        common.key_size,
        common.key_space_size,
        common.sequential_keys,
    )?;
    runner::run("watch", common, channels, Arc::new(Watch { keys }), bar).await
}
