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
use crate::storage::codec::KvRef;

/// A chunk is sent once it holds this many encoded bytes (so it holds at most this plus one
/// key-value). Large enough that per-message costs vanish, small enough for any client's
/// receive limit.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks produced ahead of the client.
pub const QUEUE_CHUNKS: usize = 2;
/// A unary result of at most this many encoded bytes is encoded during the sizing pass and
/// sent from memory, so the snapshot is read once; a larger one is read twice (see the module
/// documentation). Twice a chunk, so that a kube-apiserver page (500 objects of a few hundred
/// bytes) or a 1,000-key list of small values is read once; the result is held encoded
/// within the window charged for it, and sent as it was kept.
pub const KEEP_BYTES: usize = 2 * CHUNK_BYTES;
/// A kept result's buffer grows by doubling up to this many bytes, then at once to
/// [`KEEP_BYTES`] (see [`keep_encoded`]).
pub const KEEP_GROW_AT_ONCE_FROM: usize = 64 * 1024;

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
    fn kv(&mut self, kv: KvRef<'_>) -> Option<Self::Item>;
    /// Adds key-values already encoded (each as [`encode_kv_field`] writes it); returns a
    /// chunk once one is full.
    fn encoded(&mut self, kvs: BytesMut) -> Result<Option<Self::Item>, ApplyError>;
    /// The last chunk.
    fn finish(self, header: ResponseHeader, totals: Totals) -> Self::Item;
}

/// The encoded length of `kv` as a `mvccpb.KeyValue` message (what prost's `encoded_len`
/// gives for the owned one).
pub fn kv_message_len(kv: &KvRef<'_>) -> usize {
    use prost::encoding::{encoded_len_varint, int64};
    let bytes = |tag: u32, b: &[u8]| {
        if b.is_empty() {
            0
        } else {
            prost::encoding::key_len(tag) + encoded_len_varint(b.len() as u64) + b.len()
        }
    };
    let int = |tag: u32, v: i64| {
        if v == 0 {
            0
        } else {
            int64::encoded_len(tag, &v)
        }
    };
    bytes(1, kv.key)
        + int(2, kv.create_revision)
        + int(3, kv.mod_revision)
        + int(4, kv.version)
        + bytes(5, kv.value)
        + int(6, kv.lease)
}

/// Bytes of a key-value of [`kv_message_len`] `message_len` as field 2 of a `RangeResponse`.
pub fn kv_field_len_of(message_len: usize) -> u64 {
    (1 + prost::encoding::encoded_len_varint(message_len as u64) + message_len) as u64
}

/// Bytes of `kv` as field 2 of a `RangeResponse`.
pub fn kv_field_len(kv: &KvRef<'_>) -> u64 {
    kv_field_len_of(kv_message_len(kv))
}

/// Writes `kv` as field 2 of a `RangeResponse`, straight from the borrowed record: the bytes
/// prost writes for the owned key-value, without building it.
pub fn encode_kv_field(kv: &KvRef<'_>, buf: &mut impl BufMut) {
    encode_kv_field_of_len(kv, kv_message_len(kv), buf);
}

/// Tags and varints gathered on the stack and copied to the buffer at once: prost's
/// `encode_varint` writes a `BufMut` a byte at a time, each byte a capacity check (a
/// 1,000-key Range writes ~7,000 varints).
struct Scratch {
    bytes: [u8; Self::CAPACITY],
    len: usize,
}

impl Scratch {
    /// The most written between two copies: three `int64` fields (a one-byte key and up to
    /// ten bytes each) and the value's key and length.
    const CAPACITY: usize = 3 * 11 + 11;

    fn new() -> Self {
        Self {
            bytes: [0; Self::CAPACITY],
            len: 0,
        }
    }

    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
        }
        self.len += 1;
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.byte(v as u8 | 0x80);
            v >>= 7;
        }
        self.byte(v as u8);
    }

    /// A length-delimited field's key and length (field numbers 1 to 15: one-byte keys).
    fn bytes_head(&mut self, field: u8, len: usize) {
        self.byte(field << 3 | 2);
        self.varint(len as u64);
    }

    /// An `int64` field, left out when 0 (proto3's default).
    fn int64(&mut self, field: u8, v: i64) {
        if v != 0 {
            self.byte(field << 3);
            self.varint(v as u64);
        }
    }

    /// Copies what was gathered to `buf` and starts again.
    fn put(&mut self, buf: &mut impl BufMut) {
        debug_assert!(self.len <= Self::CAPACITY);
        buf.put_slice(self.bytes.get(..self.len).unwrap_or_default());
        self.len = 0;
    }
}

/// [`encode_kv_field`] for a key-value whose [`kv_message_len`] is known.
fn encode_kv_field_of_len(kv: &KvRef<'_>, message_len: usize, buf: &mut impl BufMut) {
    let mut s = Scratch::new();
    s.bytes_head(2, message_len);
    if !kv.key.is_empty() {
        s.bytes_head(1, kv.key.len());
    }
    s.put(buf);
    buf.put_slice(kv.key);
    s.int64(2, kv.create_revision);
    s.int64(3, kv.mod_revision);
    s.int64(4, kv.version);
    if !kv.value.is_empty() {
        s.bytes_head(5, kv.value.len());
    }
    s.put(buf);
    buf.put_slice(kv.value);
    s.int64(6, kv.lease);
    s.put(buf);
}

/// Appends `kv` (as [`encode_kv_field`] writes it; `message_len` is its [`kv_message_len`])
/// to a result kept during the sizing pass, which must stay within [`KEEP_BYTES`] with it. The
/// buffer doubles while small; once it must grow past [`KEEP_GROW_AT_ONCE_FROM`] it takes its
/// final size in one step instead of being copied through buffers of 128, 256 and 512 KiB.
/// What that saves depends on the allocator's `realloc`: a 1,000-key answer of 256 B values
/// (~290 KB) encoded in 46 µs instead of 62 µs on one machine and in about the same time on
/// another (`cargo bench --bench codec -- range_keep`, docs/PERFORMANCE.md). The whole
/// buffer lies within the window charged for the response.
pub fn keep_encoded(kept: &mut BytesMut, kv: &KvRef<'_>, message_len: usize) {
    let need = kept.len() + kv_field_len_of(message_len) as usize;
    if need > kept.capacity() && need > KEEP_GROW_AT_ONCE_FROM {
        kept.reserve(KEEP_BYTES.max(need) - kept.len());
    }
    encode_kv_field_of_len(kv, message_len, kept);
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

    /// The key-values so far as a message once they fill a chunk.
    fn full(&mut self) -> Option<RangeStreamResponse> {
        if self.bytes < CHUNK_BYTES {
            return None;
        }
        self.bytes = 0;
        Some(Self::message(RangeResponse {
            kvs: std::mem::take(&mut self.kvs),
            ..Default::default()
        }))
    }
}

impl Encoder for StreamEncoder {
    type Item = RangeStreamResponse;
    const NEEDS_LENGTH: bool = false;
    const FAILS_ON_COMPACTION: bool = true;

    fn begin(&mut self, _: &ResponseHeader, _: Option<(Totals, u64)>) -> Result<(), ApplyError> {
        Ok(())
    }

    fn kv(&mut self, kv: KvRef<'_>) -> Option<Self::Item> {
        self.bytes += kv_field_len(&kv) as usize;
        self.kvs.push(kv.to_owned());
        self.full()
    }

    fn encoded(&mut self, kvs: BytesMut) -> Result<Option<Self::Item>, ApplyError> {
        // Not a path `RangeStream` takes (it needs no length); decoded back, to be complete.
        let kvs = RangeResponse::decode(kvs.freeze())
            .map_err(|e| ApplyError::Mvcc(mvcc::Error::Corrupt(e.to_string())))?
            .kvs;
        for kv in kvs {
            self.bytes += kv_field_len(&KvRef::of(&kv)) as usize;
            self.kvs.push(kv);
        }
        Ok(self.full())
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

impl FrameEncoder {
    /// The bytes so far once they fill a chunk.
    fn full(&mut self) -> Option<Bytes> {
        (self.buf.len() >= CHUNK_BYTES).then(|| self.buf.split().freeze())
    }
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

    fn kv(&mut self, kv: KvRef<'_>) -> Option<Self::Item> {
        encode_kv_field(&kv, &mut self.buf);
        self.full()
    }

    fn encoded(&mut self, kvs: BytesMut) -> Result<Option<Self::Item>, ApplyError> {
        // The key-values become the buffer instead of being copied into it (a 1,000-key
        // answer is ~290 KB): what precedes them, the frame prefix and the header, goes out
        // as a chunk of its own.
        if self.buf.is_empty() {
            self.buf = kvs;
            return Ok(self.full());
        }
        Ok(Some(std::mem::replace(&mut self.buf, kvs).freeze()))
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
        // Sizing pass. A result of at most `KEEP_BYTES` is encoded as it is read and sent
        // from memory (one pass); past that only the length is added up, and the key-values
        // are read again from the same snapshot to be encoded.
        let (mut len, mut kept, mut fits) = (0u64, BytesMut::new(), true);
        let totals = range::for_each(&pinned, r, |kv| {
            let message_len = kv_message_len(&kv);
            len += kv_field_len_of(message_len);
            if fits {
                if len > KEEP_BYTES as u64 {
                    fits = false;
                    kept = BytesMut::new();
                } else {
                    keep_encoded(&mut kept, &kv, message_len);
                }
            }
            Ok(true)
        })?;
        enc.begin(&header, Some((totals, len)))?;
        if !fits {
            return self.encode_all(&pinned, r, header, enc);
        }
        if let Some(item) = enc.encoded(kept)? {
            if !self.send::<E>(&pinned, item)? {
                return Ok(GONE);
            }
        }
        self.send::<E>(&pinned, enc.finish(header, totals))
    }

    /// Adds one key-value, sending the chunk it completes; `Ok(false)` once the receiver
    /// is gone.
    fn add<E: Encoder<Item = T>>(
        &self,
        pinned: &PinnedRead<'_>,
        enc: &mut E,
        kv: KvRef<'_>,
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
        for kv in &kvs {
            if !self.add(pinned, &mut enc, KvRef::of(kv))? {
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
            need += (kv_message_len(&kv) + std::mem::size_of::<KeyValue>()) as u64;
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
        let kvs_len = resp.kvs.iter().map(|kv| kv_field_len(&KvRef::of(kv))).sum();
        enc.begin(&header, Some((totals, kvs_len)))?;
        self.send_kvs(pinned, resp.kvs, header, totals, enc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_kv() -> impl Strategy<Value = KeyValue> {
        let int = prop_oneof![Just(0i64), any::<i64>(), 1..1000i64];
        (
            proptest::collection::vec(any::<u8>(), 0..40),
            proptest::collection::vec(any::<u8>(), 0..300),
            int.clone(),
            int.clone(),
            int.clone(),
            int,
        )
            .prop_map(|(k, v, c, m, ver, l)| KeyValue {
                key: k.into(),
                create_revision: c,
                mod_revision: m,
                version: ver,
                value: v.into(),
                lease: l,
            })
    }

    proptest! {
        /// The borrowed encoding is byte for byte prost's, so a response built from it
        /// decodes to the same key-values.
        #[test]
        fn a_borrowed_key_value_encodes_as_prost_encodes_the_owned_one(kv in arb_kv()) {
            let mut ours = BytesMut::new();
            encode_kv_field(&KvRef::of(&kv), &mut ours);
            let mut theirs = BytesMut::new();
            prost::encoding::message::encode(2, &kv, &mut theirs);
            prop_assert_eq!(&ours[..], &theirs[..]);
            prop_assert_eq!(kv_field_len(&KvRef::of(&kv)), theirs.len() as u64);
            prop_assert_eq!(kv_message_len(&KvRef::of(&kv)), kv.encoded_len());
        }
    }

    #[test]
    fn a_kept_result_doubles_while_small_then_grows_once_to_its_limit() {
        let kv = KeyValue {
            key: b"00000001".to_vec().into(),
            create_revision: 2,
            mod_revision: 3,
            version: 1,
            value: vec![7u8; 256].into(),
            lease: 0,
        };
        let one = kv_field_len(&KvRef::of(&kv)) as usize;
        let message_len = kv_message_len(&KvRef::of(&kv));
        let (mut kept, mut plain) = (BytesMut::new(), BytesMut::new());
        let (mut grown, mut last_cap) = (0, 0);
        while kept.len() + one <= KEEP_BYTES {
            keep_encoded(&mut kept, &KvRef::of(&kv), message_len);
            encode_kv_field(&KvRef::of(&kv), &mut plain);
            if kept.capacity() != last_cap {
                grown += 1;
                last_cap = kept.capacity();
                if kept.len() <= KEEP_GROW_AT_ONCE_FROM {
                    // Doubling: at most twice what the result needs.
                    assert!(
                        last_cap <= 2 * KEEP_GROW_AT_ONCE_FROM,
                        "small results stay small: {last_cap} bytes for {}",
                        kept.len()
                    );
                } else {
                    assert!(last_cap >= KEEP_BYTES, "past the threshold, one step");
                }
            }
        }
        assert_eq!(kept, plain, "the same bytes as encoding one by one");
        assert!(kept.capacity() >= KEEP_BYTES);
        // Doubling from one key-value to about 64 KiB, then one step.
        assert!(grown <= 12, "{grown} reallocations");
    }

    #[test]
    fn a_frame_of_kept_key_values_decodes_to_the_response() {
        let kvs: Vec<KeyValue> = (0..3)
            .map(|i| KeyValue {
                key: format!("k{i}").into_bytes().into(),
                create_revision: 2,
                mod_revision: i + 2,
                version: 1,
                value: vec![i as u8; 10].into(),
                lease: 0,
            })
            .collect();
        let mut kept = BytesMut::new();
        for kv in &kvs {
            encode_kv_field(&KvRef::of(kv), &mut kept);
        }
        let totals = Totals {
            count: 3,
            more: false,
        };
        let header = ResponseHeader {
            revision: 9,
            ..Default::default()
        };
        let mut enc = FrameEncoder::default();
        enc.begin(&header, Some((totals, kept.len() as u64)))
            .expect("begin");
        let kept_at = kept.as_ptr();
        let head = enc
            .encoded(kept)
            .expect("encoded")
            .expect("the head, on its own");
        let last = enc.finish(header, totals);
        assert_eq!(
            last.as_ptr(),
            kept_at,
            "the kept bytes are sent, not copied"
        );
        let frame = [head, last].concat();
        assert_eq!(frame[0], 0);
        let len = u32::from_be_bytes(frame[1..5].try_into().expect("prefix")) as usize;
        assert_eq!(len, frame.len() - 5);
        let resp = RangeResponse::decode(&frame[5..]).expect("decode");
        assert_eq!(resp.kvs, kvs);
        assert_eq!((resp.count, resp.header.map(|h| h.revision)), (3, Some(9)));

        // RangeStream's encoder takes the same bytes and gives the same key-values.
        let mut kept = BytesMut::new();
        for kv in &kvs {
            encode_kv_field(&KvRef::of(kv), &mut kept);
        }
        let mut stream = StreamEncoder::default();
        assert!(stream.encoded(kept).expect("encoded").is_none());
        let msg = stream.finish(header, totals);
        assert_eq!(msg.range_response.expect("response").kvs, kvs);
    }
}
