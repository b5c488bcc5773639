//! `etcdserverpb.Watch`: one bidirectional stream carries many watchers.
//!
//! The inbound half runs in its own task and talks to the [`WatchHub`](crate::watch::WatchHub);
//! every message for the client, from the hub or from this task, goes through one bounded
//! channel, so a watcher's `Created` precedes its events and a `Canceled` follows them.
//! [`open`] is that per-stream logic; the JSON gateway's `POST /v3/watch` drives it too.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::convert::Infallible;
use std::future::Future;
use std::task::{Context, Poll};

use bytes::BufMut;
use futures::{Stream, StreamExt};
use metastore_proto::etcdserverpb::watch_request::RequestUnion;
use metastore_proto::etcdserverpb::{
    watch_create_request::FilterType, ResponseHeader, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status, Streaming};

use super::node::{Node, NodeRef};
use super::status::to_status;
use crate::apply::ApplyError;
use crate::auth::Credentials;
use crate::mvcc::KeyRange;
use crate::watch::{Delivery, Events, StreamId, WatchSpec};

/// Messages buffered per stream before its watchers fall back to history replay.
pub const STREAM_BUFFER: usize = 256;

/// The `etcdserverpb.Watch` service: tonic's generated server, except that responses carrying
/// events are written from the events' shared encodings ([`WatchCodec`]) instead of being
/// encoded again for every watcher that gets them.
#[derive(Clone)]
pub struct WatchService {
    node: NodeRef,
    /// The largest request message accepted.
    max_decoding: usize,
}

impl WatchService {
    pub fn new(node: NodeRef, max_decoding: usize) -> Self {
        Self { node, max_decoding }
    }
}

/// The gRPC path of the service's one method.
pub const WATCH_PATH: &str = "/etcdserverpb.Watch/Watch";

impl tonic::server::NamedService for WatchService {
    const NAME: &'static str = "etcdserverpb.Watch";
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl tower::Service<http::Request<tonic::body::Body>> for WatchService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        if req.uri().path() != WATCH_PATH {
            // As tonic's generated servers answer an unknown method of their service.
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = WatchMethod(self.node.clone());
        let max = self.max_decoding;
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(WatchCodec)
                .apply_max_message_size_config(Some(max), Some(usize::MAX));
            Ok(grpc.streaming(method, req).await)
        })
    }
}

/// One message of a watch stream for the client.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchOut {
    /// Any response without events.
    Response(WatchResponse),
    /// A response carrying events, written from their shared encodings.
    Events(EventResponse),
}

/// A `WatchResponse` carrying events, whose encoding copies the events' shared encodings.
#[derive(Debug, Clone, PartialEq)]
pub struct EventResponse {
    pub header: ResponseHeader,
    pub watch_id: i64,
    pub fragment: bool,
    pub events: Events,
}

impl EventResponse {
    fn encoded_len(&self) -> usize {
        use prost::encoding::{bool, int64, message};
        let watch_id = if self.watch_id != 0 {
            int64::encoded_len(2, &self.watch_id)
        } else {
            0
        };
        let fragment = if self.fragment {
            bool::encoded_len(7, &self.fragment)
        } else {
            0
        };
        message::encoded_len(1, &self.header) + watch_id + fragment + self.events.encoded_len()
    }

    /// Fields in prost's order, as it would write them.
    fn encode(&self, buf: &mut impl BufMut) {
        use prost::encoding::{bool, int64, message};
        message::encode(1, &self.header, buf);
        if self.watch_id != 0 {
            int64::encode(2, &self.watch_id, buf);
        }
        if self.fragment {
            bool::encode(7, &self.fragment, buf);
        }
        self.events.encode(buf);
    }
}

impl WatchOut {
    /// The message as prost's type (the JSON gateway writes it).
    pub fn into_response(self) -> WatchResponse {
        match self {
            WatchOut::Response(r) => r,
            WatchOut::Events(e) => WatchResponse {
                header: Some(e.header),
                watch_id: e.watch_id,
                fragment: e.fragment,
                events: e.events.to_vec(),
                ..Default::default()
            },
        }
    }

    /// Bytes of the encoded message.
    pub fn encoded_len(&self) -> usize {
        match self {
            WatchOut::Response(r) => r.encoded_len(),
            WatchOut::Events(e) => e.encoded_len(),
        }
    }

    /// Writes the message as a `WatchResponse`.
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            WatchOut::Response(r) => r.encode_raw(buf),
            WatchOut::Events(e) => e.encode(buf),
        }
    }
}

/// The Watch method's codec: requests decoded by prost, responses written by [`WatchOut`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCodec;

impl Codec for WatchCodec {
    type Encode = WatchOut;
    type Decode = WatchRequest;
    type Encoder = WatchCodec;
    type Decoder = WatchCodec;

    fn encoder(&mut self) -> Self::Encoder {
        WatchCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        WatchCodec
    }
}

impl Encoder for WatchCodec {
    type Item = WatchOut;
    type Error = Status;

    fn encode(&mut self, item: WatchOut, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(room(item.encoded_len(), buffered(dst)));
        item.encode(dst);
        Ok(())
    }

    /// tonic's defaults, written out because the burst room (`room`) is sized by them.
    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(ENCODE_BUFFER, ENCODE_YIELD)
    }
}

/// A watch stream's encode buffer when it opens (tonic's default): a stream that gets only
/// small answers keeps no more.
const ENCODE_BUFFER: usize = 8 * 1024;
/// tonic hands the buffered bytes on once they reach this (its default).
const ENCODE_YIELD: usize = 32 * 1024;
/// With this much buffered, a burst is under way (a delivery to many watchers of one stream).
const BURST_FROM: usize = 4 * 1024;
/// What a buffer grows to in a burst: the rest of the burst's chunk, up to [`ENCODE_YIELD`],
/// and a few answers more.
const BURST_ROOM: usize = ENCODE_YIELD + 8 * 1024;

/// The room to reserve for an answer of `need` bytes with `buffered` bytes buffered.
///
/// Growing by what each answer needs doubles the buffer from 8 to 64 KiB on the way to
/// every 32 KiB chunk of a burst, copying the bytes buffered at each step: two thirds of a
/// byte copied per byte sent (the unit test below), about what copying the answers' events
/// in costs (docs/PERFORMANCE.md, session 47). In a burst the buffer grows once, to
/// [`BURST_ROOM`].
fn room(need: usize, buffered: usize) -> usize {
    if buffered >= BURST_FROM {
        need.max(BURST_ROOM.saturating_sub(buffered))
    } else {
        need
    }
}

/// Bytes in tonic's encode buffer (a `BytesMut`, whose room to write is `isize::MAX` less its
/// length). Were that ever to change, this reads 0 and [`room`] grows as tonic would.
fn buffered(dst: &impl BufMut) -> usize {
    (isize::MAX as usize).saturating_sub(dst.remaining_mut())
}

impl Decoder for WatchCodec {
    type Item = WatchRequest;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<WatchRequest>, Status> {
        // tonic's prost codec answers a malformed message the same way.
        WatchRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// Requests are small and a stream keeps its buffer while it lives: the generated
    /// stubs' small buffer, not tonic's 8 KiB. Responses keep tonic's buffer, which a
    /// delivery to many watchers fills.
    fn buffer_settings(&self) -> BufferSettings {
        metastore_proto::codec::buffer_settings()
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOut, Status>> + Send>>;

/// The method behind [`WatchService`], as tonic's generated code has one per method.
struct WatchMethod(NodeRef);

impl tonic::server::StreamingService<WatchRequest> for WatchMethod {
    type Response = WatchOut;
    type ResponseStream = WatchStream;
    type Future = BoxFuture<Result<Response<WatchStream>, Status>>;

    fn call(&mut self, req: Request<Streaming<WatchRequest>>) -> Self::Future {
        let node = self.0.clone();
        Box::pin(async move { watch(node, req).await })
    }
}

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
) -> Result<impl Stream<Item = WatchOut> + Send + 'static, Status>
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

async fn watch(
    node_ref: NodeRef,
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
        let out = open(&node_ref, req.into_inner(), InboundEnd::KeepOpen, creds)?;
        return Ok(Response::new(Box::pin(out.map(Ok))));
    }
    let node = node_ref.get()?;
    if node.replica.leader_id().is_none() {
        return Err(to_status(&ApplyError::NoLeader));
    }
    let election = node.replica.timing.election;
    drop(node);
    let creds = Credentials::of(&req);
    let out = open(&node_ref, req.into_inner(), InboundEnd::KeepOpen, creds)?;
    let lost = Arc::new(AtomicBool::new(false));
    let monitor = leader_lost(node_ref.clone(), election, lost.clone());
    let ending =
        futures::stream::once(async move { lost.load(Ordering::SeqCst) }).filter_map(|lost| {
            futures::future::ready(lost.then(|| Err(to_status(&ApplyError::NoLeader))))
        });
    Ok(Response::new(Box::pin(
        out.map(Ok).take_until(monitor).chain(ending),
    )))
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
fn to_responses(node: &Node, d: Delivery, max_bytes: usize) -> Vec<WatchOut> {
    let base = |watch_id, rev| WatchResponse {
        header: Some(node.header(rev)),
        watch_id,
        ..Default::default()
    };
    let one = |r| vec![WatchOut::Response(r)];
    match d {
        Delivery::Created { watch_id, rev } => one(WatchResponse {
            created: true,
            ..base(watch_id, rev)
        }),
        Delivery::Refused {
            watch_id,
            rev,
            reason,
        } => one(WatchResponse {
            created: true,
            canceled: true,
            cancel_reason: reason,
            ..base(watch_id, rev)
        }),
        Delivery::Canceled { watch_id, rev } => one(WatchResponse {
            canceled: true,
            ..base(watch_id, rev)
        }),
        Delivery::Compacted {
            watch_id,
            compact_rev,
            rev,
        } => one(WatchResponse {
            canceled: true,
            compact_revision: compact_rev,
            ..base(watch_id, rev)
        }),
        Delivery::Progress { watch_id, rev } => one(base(watch_id, rev)),
        Delivery::Events {
            watch_id,
            rev,
            events,
            fragment,
        } => {
            let header = node.header(rev);
            let whole = |events| {
                WatchOut::Events(EventResponse {
                    header,
                    watch_id,
                    fragment: false,
                    events,
                })
            };
            if !fragment {
                return vec![whole(events)];
            }
            let unsplit = whole(events.clone());
            if unsplit.encoded_len() <= max_bytes {
                return vec![unsplit];
            }
            let parts = events.split(max_bytes);
            let last = parts.len() - 1;
            parts
                .into_iter()
                .enumerate()
                .map(|(i, events)| {
                    WatchOut::Events(EventResponse {
                        header,
                        watch_id,
                        fragment: i < last,
                        events,
                    })
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use metastore_proto::mvccpb::{Event, KeyValue};

    fn kv(key: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: Bytes::from(key.to_string()),
            value: Bytes::from(format!("value of {key} at {rev}")),
            create_revision: 2,
            mod_revision: rev,
            version: 1,
            lease: 9,
        }
    }

    /// tonic's encode loop over a burst of `answers` answers of `size` bytes (its header,
    /// then the answer, a chunk handed on at [`ENCODE_YIELD`] and kept, as h2 keeps it until
    /// written), reserving `grow(need, buffered)` for each answer. Returns the bytes copied
    /// when the buffer moved, and the chunks.
    fn burst(
        answers: usize,
        size: usize,
        grow: impl Fn(usize, usize) -> usize,
    ) -> (usize, Vec<bytes::Bytes>) {
        let mut buf = bytes::BytesMut::with_capacity(ENCODE_BUFFER);
        let mut chunks = Vec::new();
        let mut copied = 0;
        let mut reserve = |buf: &mut bytes::BytesMut, n: usize| {
            let (at, len) = (buf.as_ptr(), buf.len());
            buf.reserve(n);
            if buf.as_ptr() != at {
                copied += len;
            }
        };
        for i in 0..answers {
            reserve(&mut buf, 5);
            buf.put_slice(&[0; 5]);
            let room = grow(size, buffered(&buf));
            reserve(&mut buf, room);
            buf.put_bytes(i as u8, size);
            if buf.len() >= ENCODE_YIELD {
                chunks.push(buf.split().freeze());
            }
        }
        chunks.push(buf.split().freeze());
        (copied, chunks)
    }

    #[test]
    fn a_burst_grows_its_buffer_once_per_chunk() {
        let mut buf = bytes::BytesMut::with_capacity(64);
        buf.put_bytes(1, 40);
        assert_eq!(buffered(&buf), 40);
        // Small answers grow the buffer by what they need; large ones get what they need.
        assert_eq!(room(300, 5), 300);
        assert_eq!(room(300, BURST_FROM - 1), 300);
        assert_eq!(room(300, BURST_FROM), BURST_ROOM - BURST_FROM);
        assert_eq!(room(100_000, BURST_FROM), 100_000);
        assert_eq!(room(300, BURST_ROOM + 1), 300);

        // 1,000 answers of 350 bytes, as a delivery to 1,000 watchers of one stream.
        let (answers, size) = (1_000, 350);
        let (plain, plain_chunks) = burst(answers, size, |need, _| need);
        let (ours, chunks) = burst(answers, size, room);
        let sent = answers * (size + 5);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), sent);
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let plain_joined: Vec<u8> = plain_chunks
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        assert_eq!(joined, plain_joined);
        assert!(
            plain * 2 > sent,
            "growing by need copies {plain} bytes of {sent}"
        );
        assert!(ours * 5 < sent, "a burst copies {ours} bytes of {sent}");
        assert!(ours * 5 < plain, "{ours} against {plain}");
    }

    #[test]
    fn event_responses_are_the_bytes_prost_writes() {
        let batch = crate::watch::events::batch(
            (0..5)
                .map(|i| Event {
                    r#type: i % 2,
                    kv: Some(kv(&format!("k{i}"), 10 + i as i64)),
                    prev_kv: Some(kv(&format!("k{i}"), 5)),
                })
                .collect(),
        );
        let header = ResponseHeader {
            cluster_id: 11,
            member_id: 12,
            revision: 14,
            raft_term: 3,
        };
        for (watch_id, fragment, prev_kv) in [(0, false, false), (7, true, true), (-1, false, true)]
        {
            let out = WatchOut::Events(EventResponse {
                header,
                watch_id,
                fragment,
                events: Events::all(&batch, prev_kv),
            });
            let mut buf = Vec::new();
            out.encode(&mut buf);
            let expect = out.clone().into_response();
            assert_eq!(expect.events.len(), 5);
            assert_eq!(expect.events[0].prev_kv.is_some(), prev_kv);
            assert_eq!(
                buf,
                expect.encode_to_vec(),
                "{watch_id} {fragment} {prev_kv}"
            );
            assert_eq!(out.encoded_len(), buf.len());
        }
        let plain = WatchOut::Response(WatchResponse {
            header: Some(header),
            created: true,
            cancel_reason: "x".into(),
            ..Default::default()
        });
        let mut buf = Vec::new();
        plain.encode(&mut buf);
        assert_eq!(buf, plain.clone().into_response().encode_to_vec());
        assert_eq!(plain.encoded_len(), buf.len());
    }
}
