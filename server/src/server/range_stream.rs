//! Large Range results produced and sent incrementally: `KV.RangeStream` (etcd 3.7) and the
//! unary `KV.Range` over a key range ([`super::range_body`]).
//!
//! A blocking thread pins one engine snapshot ([`PinnedRead`]), walks it in key order and
//! hands encoded chunks of about [`CHUNK_BYTES`] to a channel of [`QUEUE_CHUNKS`]; the
//! response body (or the tonic stream) takes them from there. The thread blocks when the
//! client reads slowly and stops when the client goes away, so a response holds a bounded
//! *window* of memory whatever its size: [`window_bytes`], charged to the
//! [`RangeBudget`] before anything is read. Only a result that must be sorted (any order but
//! ascending keys) is held whole, once its size has been estimated and admitted.
//!
//! A unary response is one gRPC message whose length prefix comes first: for it, the thread
//! walks the snapshot twice, once to add up the encoded length (keeping nothing), once to
//! encode. Protobuf fields may come in any order, so the message is written as the header,
//! each key-value as its own field 2, then `more` and `count`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
use metastore_proto::etcdserverpb::{
    RangeRequest, RangeResponse, RangeStreamResponse, ResponseHeader,
};
use metastore_proto::mvccpb::KeyValue;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::node::Node;
use super::range_budget::{RangeBudget, RangePermit};
use super::status::to_status;
use crate::apply::range::{self, Totals};
use crate::apply::ApplyError;
use crate::mvcc::{self, PinnedRead, Store};

/// A chunk is sent once it holds this many encoded bytes (so it holds at most this plus one
/// key-value). Large enough that per-message costs vanish, small enough for any client's
/// receive limit.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks produced ahead of the client.
pub const QUEUE_CHUNKS: usize = 2;

/// The memory one response may hold while it streams: the chunk being filled, the queued
/// ones and the one HTTP/2 is writing, each at most [`CHUNK_BYTES`] plus one key-value of at
/// most `max_kv_bytes` (`--max-request-bytes` bounds every key-value written).
pub fn window_bytes(max_kv_bytes: usize) -> u64 {
    ((QUEUE_CHUNKS + 2) * (CHUNK_BYTES + max_kv_bytes)) as u64
}

/// How the produced key-values are cut into items for the wire.
pub trait Encoder: Send + 'static {
    type Item: Send + 'static;
    /// Whether the encoder needs the totals and the key-values' encoded length before the
    /// first key-value (a unary response's gRPC frame starts with its length).
    const NEEDS_LENGTH: bool;
    /// Whether a compaction of the pinned revision before the end fails the response. etcd
    /// serves `RangeStream` as a series of reads at the pinned revision, which then fail;
    /// a unary Range is one read, which the pinned snapshot still serves.
    const FAILS_ON_COMPACTION: bool;
    /// Starts the response; `sized` is `(totals, encoded length of the kvs)` when
    /// [`NEEDS_LENGTH`](Encoder::NEEDS_LENGTH).
    fn begin(
        &mut self,
        header: &ResponseHeader,
        sized: Option<(Totals, u64)>,
    ) -> Result<(), ApplyError>;
    /// Adds a key-value; returns a chunk once one is full.
    fn kv(&mut self, kv: KeyValue) -> Option<Self::Item>;
    /// The last chunk.
    fn finish(self, header: ResponseHeader, totals: Totals) -> Self::Item;
}

/// Bytes of `kv` as field 2 of a `RangeResponse`.
fn kv_field_len(kv: &KeyValue) -> u64 {
    prost::encoding::message::encoded_len(2, kv) as u64
}

/// `RangeStream` messages: key-values only, then the header, `count` and `more` with the
/// last ones, so that merging them all gives the unary response.
#[derive(Default)]
pub struct StreamEncoder {
    kvs: Vec<KeyValue>,
    bytes: usize,
}

impl StreamEncoder {
    fn message(r: RangeResponse) -> RangeStreamResponse {
        RangeStreamResponse {
            range_response: Some(r),
        }
    }
}

impl Encoder for StreamEncoder {
    type Item = RangeStreamResponse;
    const NEEDS_LENGTH: bool = false;
    const FAILS_ON_COMPACTION: bool = true;

    fn begin(&mut self, _: &ResponseHeader, _: Option<(Totals, u64)>) -> Result<(), ApplyError> {
        Ok(())
    }

    fn kv(&mut self, kv: KeyValue) -> Option<Self::Item> {
        self.bytes += kv_field_len(&kv) as usize;
        self.kvs.push(kv);
        if self.bytes < CHUNK_BYTES {
            return None;
        }
        self.bytes = 0;
        Some(Self::message(RangeResponse {
            kvs: std::mem::take(&mut self.kvs),
            ..Default::default()
        }))
    }

    fn finish(self, header: ResponseHeader, totals: Totals) -> Self::Item {
        Self::message(RangeResponse {
            header: Some(header),
            kvs: self.kvs,
            more: totals.more,
            count: totals.count,
        })
    }
}

/// A unary `RangeResponse` as the bytes of one gRPC message (length-prefixed), in chunks.
#[derive(Default)]
pub struct FrameEncoder {
    buf: BytesMut,
}

impl Encoder for FrameEncoder {
    type Item = Bytes;
    const NEEDS_LENGTH: bool = true;
    const FAILS_ON_COMPACTION: bool = false;

    fn begin(
        &mut self,
        header: &ResponseHeader,
        sized: Option<(Totals, u64)>,
    ) -> Result<(), ApplyError> {
        let (totals, kvs_len) = sized.unwrap_or_default();
        let head = RangeResponse {
            header: Some(*header),
            ..Default::default()
        };
        let len = head.encoded_len() as u64 + kvs_len + tail(totals).encoded_len() as u64;
        let len = u32::try_from(len).map_err(|_| ApplyError::ResponseTooLarge(len))?;
        self.buf.reserve(CHUNK_BYTES + 5);
        self.buf.put_u8(0); // not compressed
        self.buf.put_u32(len);
        head.encode_raw(&mut self.buf);
        Ok(())
    }

    fn kv(&mut self, kv: KeyValue) -> Option<Self::Item> {
        prost::encoding::message::encode(2, &kv, &mut self.buf);
        (self.buf.len() >= CHUNK_BYTES).then(|| self.buf.split().freeze())
    }

    fn finish(mut self, _: ResponseHeader, totals: Totals) -> Self::Item {
        tail(totals).encode_raw(&mut self.buf);
        self.buf.freeze()
    }
}

/// The fields of a `RangeResponse` after its key-values.
fn tail(t: Totals) -> RangeResponse {
    RangeResponse {
        more: t.more,
        count: t.count,
        ..Default::default()
    }
}

/// A response being produced: its first item (already there, so that a request that fails
/// at once fails before anything is sent) and the rest. Holds the response's share of the
/// budget until dropped (the producing thread holds it too, until it is done).
pub struct Produced<T> {
    first: Option<T>,
    rx: mpsc::Receiver<Result<T, Status>>,
    _share: Share,
}

/// A response's share of the budget: taken before the thread starts (a window), or by the
/// thread once it knows what a sorted result needs.
type Share = Arc<Mutex<Option<RangePermit>>>;

impl<T: Unpin> Stream for Produced<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        self.rx.poll_recv(cx)
    }
}

/// Starts producing the result of `r` (validated, its linearizable wait done) with `enc`:
/// admits the response's window, pins the snapshot on a blocking thread and waits for the
/// first item.
///
/// A sorted result is admitted by the thread instead, in one step for its window and the
/// estimated result together: a response never waits for budget while it holds some, so
/// concurrent responses cannot wait for each other's shares in a cycle.
///
/// Errors (before anything is sent): the budget's, and the read's (a future or compacted
/// revision), as Range returns them.
pub async fn start<E: Encoder>(
    node: &Node,
    r: RangeRequest,
    enc: E,
) -> Result<Produced<E::Item>, Status> {
    let window = window_bytes(node.limits.max_request_bytes);
    let share: Share = Arc::default();
    if !range::needs_sort(&r) {
        let permit = node
            .range_budget
            .admit_window(window)
            .await
            .map_err(|e| to_status(&e))?;
        *lock(&share) = Some(permit);
    }
    let (tx, mut rx) = mpsc::channel(QUEUE_CHUNKS);
    let store = node.store.clone();
    let budget = node.range_budget.clone();
    // Identity and term as of now; the revision is the pinned read's.
    let identity = node.header(0);
    let handle = tokio::runtime::Handle::current();
    let thread_share = share.clone();
    tokio::task::spawn_blocking(move || {
        let job = Job {
            store: &store,
            budget: &budget,
            tx: &tx,
            handle: &handle,
            window,
            share: &thread_share,
        };
        if let Err(e) = job.produce(&r, identity, enc) {
            // The client may be gone already: nobody to tell then.
            let _ = tx.blocking_send(Err(to_status(&e)));
        }
    });
    match rx.recv().await {
        Some(Ok(first)) => Ok(Produced {
            first: Some(first),
            rx,
            _share: share,
        }),
        Some(Err(status)) => Err(status),
        None => Err(Status::internal("etcdserver: range producer stopped")),
    }
}

/// The share's lock. Nothing panics while holding it, but a poisoned one is still usable.
fn lock(share: &Share) -> MutexGuard<'_, Option<RangePermit>> {
    share.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the producing thread works with.
struct Job<'a, T> {
    store: &'a Store,
    budget: &'a RangeBudget,
    tx: &'a mpsc::Sender<Result<T, Status>>,
    handle: &'a tokio::runtime::Handle,
    /// Bytes of a response's window.
    window: u64,
    share: &'a Share,
}

/// Why production stopped before the end without an error to report.
const GONE: bool = false;

impl<T: Send + 'static> Job<'_, T> {
    /// Sends one item; `Ok(false)` once the receiver is gone.
    fn send<E: Encoder<Item = T>>(
        &self,
        pinned: &PinnedRead<'_>,
        item: T,
    ) -> Result<bool, ApplyError> {
        if E::FAILS_ON_COMPACTION && pinned.compacted() {
            return Err(ApplyError::Mvcc(mvcc::Error::Compacted));
        }
        Ok(self.tx.blocking_send(Ok(item)).is_ok())
    }

    fn produce<E: Encoder<Item = T>>(
        &self,
        r: &RangeRequest,
        mut header: ResponseHeader,
        mut enc: E,
    ) -> Result<bool, ApplyError> {
        let pinned = self.store.pin(r.revision)?;
        header.revision = pinned.current();
        if range::needs_sort(r) {
            return self.produce_sorted(&pinned, r, header, enc);
        }
        if !E::NEEDS_LENGTH {
            enc.begin(&header, None)?;
            return self.encode_all(&pinned, r, header, enc);
        }
        // Sizing pass. A result that fits one chunk is kept and sent from memory (one pass,
        // as a small Range always was); past a chunk only the length is added up, and the
        // key-values are read again from the same snapshot to be encoded.
        let (mut len, mut small, mut fits) = (0u64, Vec::new(), true);
        let totals = range::for_each(&pinned, r, |kv| {
            len += kv_field_len(&kv);
            if fits {
                small.push(kv);
                if len > CHUNK_BYTES as u64 {
                    fits = false;
                    small = Vec::new();
                }
            }
            Ok(true)
        })?;
        enc.begin(&header, Some((totals, len)))?;
        if !fits {
            return self.encode_all(&pinned, r, header, enc);
        }
        self.send_kvs(&pinned, small, header, totals, enc)
    }

    /// Adds one key-value, sending the chunk it completes; `Ok(false)` once the receiver
    /// is gone.
    fn add<E: Encoder<Item = T>>(
        &self,
        pinned: &PinnedRead<'_>,
        enc: &mut E,
        kv: KeyValue,
    ) -> Result<bool, ApplyError> {
        match enc.kv(kv) {
            Some(item) => self.send::<E>(pinned, item),
            None => Ok(true),
        }
    }

    /// Sends key-values already in memory, chunk by chunk.
    fn send_kvs<E: Encoder<Item = T>>(
        &self,
        pinned: &PinnedRead<'_>,
        kvs: Vec<KeyValue>,
        header: ResponseHeader,
        totals: Totals,
        mut enc: E,
    ) -> Result<bool, ApplyError> {
        for kv in kvs {
            if !self.add(pinned, &mut enc, kv)? {
                return Ok(GONE);
            }
        }
        self.send::<E>(pinned, enc.finish(header, totals))
    }

    /// Reads the result from the snapshot and sends it chunk by chunk.
    fn encode_all<E: Encoder<Item = T>>(
        &self,
        pinned: &PinnedRead<'_>,
        r: &RangeRequest,
        header: ResponseHeader,
        mut enc: E,
    ) -> Result<bool, ApplyError> {
        let mut live = true;
        let totals = range::for_each(pinned, r, |kv| {
            live = self.add(pinned, &mut enc, kv)?;
            Ok(live)
        })?;
        if !live {
            return Ok(GONE);
        }
        self.send::<E>(pinned, enc.finish(header, totals))
    }

    /// A sorted result: estimated in a first pass (everything the sort needs, values
    /// included), admitted against the budget, then read whole and sorted like Range.
    fn produce_sorted<E: Encoder<Item = T>>(
        &self,
        pinned: &PinnedRead<'_>,
        r: &RangeRequest,
        header: ResponseHeader,
        mut enc: E,
    ) -> Result<bool, ApplyError> {
        let everything = RangeRequest {
            limit: 0,
            keys_only: false,
            ..r.clone()
        };
        let mut need = 0u64;
        range::for_each(pinned, &everything, |kv| {
            need += (kv.encoded_len() + std::mem::size_of::<KeyValue>()) as u64;
            Ok(true)
        })?;
        // Wait for the budget (window and result at once), unless the client leaves first.
        // The blocking thread waits too; sorted ranges are rare (kube-apiserver sends none),
        // and this way the snapshot stays pinned and is read once for the estimate.
        let permit = self.handle.block_on(async {
            tokio::select! {
                p = self.budget.admit(need.saturating_add(self.window)) => p.map(Some),
                _ = self.tx.closed() => Ok(None),
            }
        })?;
        let Some(permit) = permit else {
            return Ok(GONE);
        };
        *lock(self.share) = Some(permit);
        let resp = range::range(pinned, r)?;
        let totals = Totals {
            count: resp.count,
            more: resp.more,
        };
        let kvs_len = resp.kvs.iter().map(kv_field_len).sum();
        enc.begin(&header, Some((totals, kvs_len)))?;
        self.send_kvs(pinned, resp.kvs, header, totals, enc)
    }
}
