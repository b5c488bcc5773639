//! Lean decodings of the two responses the tool receives in bulk: a `RangeResponse` of many
//! key-values and a `WatchResponse` of many events.
//!
//! The load tool shares the machine's cores with the server it measures, so every microsecond
//! it spends decoding is taken from the server. Decoded in full (the `metastore-proto` types),
//! each key-value of a range becomes a struct with two reference-counted `Bytes` and four
//! integers that the tool then drops unread. These types read only what the workloads use and
//! skip the rest of the wire bytes in place (protobuf lets a reader skip any field by its wire
//! type). They decode the same bytes as the full types, so any server's answer, MetaStore's or
//! etcd's, costs the tool the same: the comparison stays side by side. A watch stream's
//! responses are walked as slices ([`WatchResponse::walk`]) straight from the frames they
//! arrive in ([`watch`], [`crate::frames`]).

use bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::DecodeError;
use tonic::codegen::http::uri::PathAndQuery;

use metastore_proto::etcdserverpb::{RangeRequest, WatchRequest};

use crate::conn::Conn;

/// What the tool checks of a `RangeResponse`: its counts, not its key-values.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RangeSummary {
    /// `count`: keys in the range.
    pub count: i64,
    /// `more`: keys left out by the request's limit.
    pub more: bool,
    /// Key-values in the response (field `kvs`, each skipped unread).
    pub kvs: u64,
}

impl RangeSummary {
    /// Whether the counts agree the way etcd's do: a response never holds more key-values than
    /// its `count`; without `count_only` it holds them all unless `more` says some were left out.
    pub fn check(&self, count_only: bool) -> Result<(), String> {
        let kvs = i64::try_from(self.kvs).unwrap_or(i64::MAX);
        if count_only && kvs != 0 {
            return Err(format!("count-only range returned {kvs} key-values"));
        }
        if kvs > self.count {
            return Err(format!(
                "range returned {kvs} key-values but counts {}",
                self.count
            ));
        }
        if !count_only && self.more != (kvs < self.count) {
            return Err(format!(
                "range returned {kvs} of {} keys with more={}",
                self.count, self.more
            ));
        }
        Ok(())
    }
}

impl prost::Message for RangeSummary {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        // The tool never sends a `RangeResponse`; this writes the two scalar fields only.
        if self.more {
            encoding::bool::encode(3, &self.more, buf);
        }
        if self.count != 0 {
            encoding::int64::encode(4, &self.count, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            2 => {
                let len = field_len(wire_type, buf)?;
                buf.advance(len);
                self.kvs += 1;
                Ok(())
            }
            3 => encoding::bool::merge(wire_type, &mut self.more, buf, ctx),
            4 => encoding::int64::merge(wire_type, &mut self.count, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        (if self.more {
            encoding::bool::encoded_len(3, &self.more)
        } else {
            0
        }) + (if self.count != 0 {
            encoding::int64::encoded_len(4, &self.count)
        } else {
            0
        })
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The fields of a `WatchResponse` the watch workloads read (tags as in etcd's `rpc.proto`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WatchResponse {
    pub watch_id: i64,
    pub created: bool,
    pub canceled: bool,
    pub cancel_reason: String,
    pub events: Vec<Event>,
}

impl WatchResponse {
    /// Decodes a response from one slice, as [`prost::Message::decode`] would: a plain loop
    /// over the wire bytes with one-byte keys and lengths read in line (see [`Event::walk`]).
    pub fn walk(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Self::default();
        r.walk_into(bytes)?;
        Ok(r)
    }

    /// [`WatchResponse::walk`] into `self`, which it first empties; its event vector keeps
    /// its room. On an error `self` holds what was read before it.
    pub fn walk_into(&mut self, mut bytes: &[u8]) -> Result<(), DecodeError> {
        self.clear_keeping_room();
        // Room for the events at one per 64 bytes (a watch workload's are ~300), so that a
        // response's events are collected without growing the vector several times.
        self.events.reserve(bytes.len() / 64);
        while !bytes.is_empty() {
            let (tag, wire_type) = key(&mut bytes)?;
            match tag {
                2..=4 => {
                    encoding::check_wire_type(WireType::Varint, wire_type)?;
                    let v = varint(&mut bytes)?;
                    match tag {
                        2 => self.watch_id = v as i64,
                        3 => self.created = v != 0,
                        _ => self.canceled = v != 0,
                    }
                }
                6 => {
                    let len = slice_len(wire_type, &mut bytes)?;
                    let (reason, rest) = bytes.split_at(len);
                    self.cancel_reason = std::str::from_utf8(reason)
                        .map_err(|_| {
                            #[allow(deprecated)]
                            DecodeError::new("invalid string value: data is not UTF-8 encoded")
                        })?
                        .to_owned();
                    bytes = rest;
                }
                11 => {
                    let len = slice_len(wire_type, &mut bytes)?;
                    let (event, rest) = bytes.split_at(len);
                    self.events.push(Event::walk(event)?);
                    bytes = rest;
                }
                _ => skip(tag, wire_type, &mut bytes)?,
            }
        }
        Ok(())
    }

    /// Empties the response, keeping its event vector's room.
    fn clear_keeping_room(&mut self) {
        self.watch_id = 0;
        self.created = false;
        self.canceled = false;
        self.cancel_reason.clear();
        self.events.clear();
    }
}

impl prost::Message for WatchResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        // The tool never sends a `WatchResponse`; this is the fields it reads, for tests.
        if self.watch_id != 0 {
            encoding::int64::encode(2, &self.watch_id, buf);
        }
        if self.created {
            encoding::bool::encode(3, &self.created, buf);
        }
        if self.canceled {
            encoding::bool::encode(4, &self.canceled, buf);
        }
        if !self.cancel_reason.is_empty() {
            encoding::string::encode(6, &self.cancel_reason, buf);
        }
        encoding::message::encode_repeated(11, &self.events, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            2 => encoding::int64::merge(wire_type, &mut self.watch_id, buf, ctx),
            3 => encoding::bool::merge(wire_type, &mut self.created, buf, ctx),
            4 => encoding::bool::merge(wire_type, &mut self.canceled, buf, ctx),
            6 => encoding::string::merge(wire_type, &mut self.cancel_reason, buf, ctx),
            11 => {
                // prost's own merge of the event: this impl is the reference the walk is
                // tested against, not how a stream is read.
                encoding::message::merge_repeated(wire_type, &mut self.events, buf, ctx)
            }
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        (if self.watch_id != 0 {
            encoding::int64::encoded_len(2, &self.watch_id)
        } else {
            0
        }) + (if self.created {
            encoding::bool::encoded_len(3, &self.created)
        } else {
            0
        }) + (if self.canceled {
            encoding::bool::encoded_len(4, &self.canceled)
        } else {
            0
        }) + (if self.cancel_reason.is_empty() {
            0
        } else {
            encoding::string::encoded_len(6, &self.cancel_reason)
        }) + encoding::message::encoded_len_repeated(11, &self.events)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The length of a length-delimited field whose key was just read, checked against what
/// `buf` holds ([`underflow`] when it runs past).
fn field_len(wire_type: WireType, buf: &mut impl Buf) -> Result<usize, DecodeError> {
    encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = encoding::decode_varint(buf)?;
    if len > buf.remaining() as u64 {
        return Err(underflow());
    }
    Ok(len as usize)
}

/// prost's error for a field that runs past the end of its message (`skip_field` and
/// `bytes::merge` say the same).
fn underflow() -> DecodeError {
    // `DecodeError::new` is prost's only way to make one outside the crate.
    #[allow(deprecated)]
    DecodeError::new("buffer underflow")
}

/// An event: only its key-value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

impl Event {
    /// Decodes an event from one slice, as [`prost::Message::decode`] would, reading only
    /// the key-value's value: a plain loop over the wire bytes. prost's generic merge loops
    /// (the event's, then its key-value's, each field through `skip_field` or a
    /// `merge_field` call) were ~20 % of the tool's samples at watch-events, one event per
    /// response.
    pub fn walk(mut bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut event = Event::default();
        while !bytes.is_empty() {
            let (tag, wire_type) = key(&mut bytes)?;
            if tag == 2 {
                let len = slice_len(wire_type, &mut bytes)?;
                let (kv, rest) = bytes.split_at(len);
                // Repeated, an embedded message merges into the earlier one.
                event.kv.get_or_insert_with(KeyValue::default).walk(kv)?;
                bytes = rest;
            } else {
                skip(tag, wire_type, &mut bytes)?;
            }
        }
        Ok(event)
    }
}

/// A varint read from a slice: a one-byte one (every tag and nearly every length in a watch
/// response) and a two-byte one (revisions up to 16,383, values' lengths up to 16 KiB) in
/// line, a longer one by prost.
#[inline(always)]
fn varint(bytes: &mut &[u8]) -> Result<u64, DecodeError> {
    let slice: &[u8] = bytes;
    match slice {
        [b, rest @ ..] if *b < 0x80 => {
            *bytes = rest;
            Ok(u64::from(*b))
        }
        [b0, b1, rest @ ..] if *b1 < 0x80 => {
            *bytes = rest;
            Ok(u64::from(b0 & 0x7f) | u64::from(*b1) << 7)
        }
        _ => encoding::decode_varint(bytes),
    }
}

/// A field's key read from a slice: a one-byte one in line, anything else (and every error)
/// by prost.
#[inline(always)]
fn key(bytes: &mut &[u8]) -> Result<(u32, WireType), DecodeError> {
    if let Some((&b, rest)) = bytes.split_first() {
        if (8..0x80).contains(&b) {
            if let Ok(wire_type) = WireType::try_from(u64::from(b & 7)) {
                *bytes = rest;
                return Ok((u32::from(b >> 3), wire_type));
            }
        }
    }
    encoding::decode_key(bytes)
}

/// The length of a length-delimited field read from a slice, checked against what is left
/// ([`field_len`] for a slice), the length's varint taken off.
#[inline(always)]
fn slice_len(wire_type: WireType, bytes: &mut &[u8]) -> Result<usize, DecodeError> {
    encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
    let len = varint(bytes)?;
    if len > bytes.len() as u64 {
        return Err(underflow());
    }
    Ok(len as usize)
}

/// Skips one field whose key was just read.
#[inline(always)]
fn skip(tag: u32, wire_type: WireType, bytes: &mut &[u8]) -> Result<(), DecodeError> {
    match wire_type {
        WireType::Varint => varint(bytes).map(|_| ()),
        WireType::LengthDelimited => {
            let len = slice_len(wire_type, bytes)?;
            *bytes = &bytes[len..];
            Ok(())
        }
        // Fixed-width and group fields: rare enough for prost's own skipping.
        _ => skip_other(tag, wire_type, bytes),
    }
}

#[cold]
fn skip_other(tag: u32, wire_type: WireType, bytes: &mut &[u8]) -> Result<(), DecodeError> {
    encoding::skip_field(wire_type, tag, bytes, DecodeContext::default())
}

/// A key-value: only the first 8 bytes of its value, where the watch workloads put the time a
/// put was sent. The rest of the value is skipped in place, like every other field: taking
/// the value as `Bytes` cost a reference count taken and dropped per event and ~10 % of the
/// tool's samples at 3 M events (docs/PERFORMANCE.md, session 45).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct KeyValue {
    /// The value's first 8 bytes, big-endian; `None` when the value is shorter.
    pub stamp: Option<u64>,
}

impl KeyValue {
    /// Merges a key-value's wire bytes into this one, reading only its value (as
    /// [`prost::Message::merge`] would; see [`Event::walk`]).
    fn walk(&mut self, mut bytes: &[u8]) -> Result<(), DecodeError> {
        while !bytes.is_empty() {
            let (tag, wire_type) = key(&mut bytes)?;
            if tag == 5 {
                let len = slice_len(wire_type, &mut bytes)?;
                let (value, rest) = bytes.split_at(len);
                // A repeated field replaces the earlier one, as protobuf's last-one-wins rule
                // says.
                self.stamp = value
                    .first_chunk::<8>()
                    .map(|stamp| u64::from_be_bytes(*stamp));
                bytes = rest;
            } else {
                skip(tag, wire_type, &mut bytes)?;
            }
        }
        Ok(())
    }
}

impl prost::Message for KeyValue {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        // The tool never sends a key-value; this writes the stamp as the whole value.
        if let Some(stamp) = self.stamp {
            encoding::encode_key(5, WireType::LengthDelimited, buf);
            encoding::encode_varint(8, buf);
            buf.put_u64(stamp);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if tag != 5 {
            return encoding::skip_field(wire_type, tag, buf, ctx);
        }
        let len = field_len(wire_type, buf)?;
        // A repeated field replaces the earlier one, as protobuf's last-one-wins rule says.
        self.stamp = (len >= 8).then(|| buf.get_u64());
        buf.advance(len - if len >= 8 { 8 } else { 0 });
        Ok(())
    }

    fn encoded_len(&self) -> usize {
        self.stamp.map_or(0, |_| 1 + 1 + 8)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

fn not_ready(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::unknown(format!("service was not ready: {e}"))
}

/// `KV/Range`, answered as a [`RangeSummary`].
pub async fn range(
    grpc: &mut tonic::client::Grpc<Conn>,
    req: RangeRequest,
) -> Result<RangeSummary, tonic::Status> {
    grpc.ready().await.map_err(not_ready)?;
    let codec = tonic_prost::ProstCodec::<RangeRequest, RangeSummary>::default();
    let path = PathAndQuery::from_static("/etcdserverpb.KV/Range");
    Ok(grpc
        .unary(tonic::Request::new(req), path, codec)
        .await?
        .into_inner())
}

/// `Watch/Watch`: sends `requests` and reads the responses as [`WatchResponse`]s, cut out of
/// the answer's DATA frames in place ([`crate::frames`]) rather than through tonic's
/// `Streaming`. The request is the one tonic's stub sends: the same path, headers and
/// message framing.
pub async fn watch(
    channel: Conn,
    requests: tokio::sync::mpsc::Receiver<WatchRequest>,
) -> Result<WatchResponses, tonic::Status> {
    let req = http::Request::builder()
        .method(http::Method::POST)
        .uri("/etcdserverpb.Watch/Watch")
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        .body(tonic::body::Body::new(RequestFrames(requests)))
        .map_err(|e| tonic::Status::internal(format!("watch request: {e}")))?;
    let answer = channel
        .send(req)
        .await
        .map_err(|e| tonic::Status::unavailable(format!("watch stream: {e}")))?;
    if answer.status() != http::StatusCode::OK {
        return Err(tonic::Status::unknown(format!(
            "watch stream: HTTP status {}",
            answer.status()
        )));
    }
    // A call refused at once answers with its status in the headers ("trailers only").
    if let Some(status) = tonic::Status::from_header_map(answer.headers()) {
        if status.code() != tonic::Code::Ok {
            return Err(status);
        }
    }
    Ok(WatchResponses {
        body: answer.into_body(),
        deframer: crate::frames::Deframer::new(crate::frames::DEFAULT_MAX_MESSAGE),
        ready: std::collections::VecDeque::new(),
        done: false,
    })
}

/// A watch stream's requests, each framed as gRPC frames a message.
struct RequestFrames(tokio::sync::mpsc::Receiver<WatchRequest>);

impl http_body::Body for RequestFrames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|req| {
            req.map(|req| {
                let len = prost::Message::encoded_len(&req);
                let mut out = bytes::BytesMut::with_capacity(5 + len);
                out.put_u8(0);
                out.put_u32(len as u32);
                prost::Message::encode_raw(&req, &mut out);
                Ok(http_body::Frame::data(out.freeze()))
            })
        })
    }
}

/// The responses of a watch stream opened by [`watch`].
pub struct WatchResponses {
    body: crate::conn::RecvBody,
    deframer: crate::frames::Deframer,
    /// Messages cut out of the frames read so far (slices of them), not yet taken; each is
    /// decoded when it is taken, into the caller's response where it gives one
    /// ([`WatchResponses::next_into`]).
    ready: std::collections::VecDeque<bytes::Bytes>,
    done: bool,
}

impl WatchResponses {
    /// The next response; `None` once the server ended the stream with an OK status, the
    /// status as the error when it ended it with another.
    pub async fn message(&mut self) -> Result<Option<WatchResponse>, tonic::Status> {
        let mut r = WatchResponse::default();
        Ok(self.next_into(&mut r).await?.then_some(r))
    }

    /// Reads the next response into `out`, as [`WatchResponses::message`] but keeping `out`'s
    /// event vector (and its room): a reader that takes responses one after another this way
    /// allocates nothing per response (a vector per response was ~10 % of the tool's
    /// instructions at watch-events, docs/PERFORMANCE.md, session 56). `false`, with `out`
    /// left empty, once the stream ended with an OK status.
    pub async fn next_into(&mut self, out: &mut WatchResponse) -> Result<bool, tonic::Status> {
        let Some(message) = self.next_message().await? else {
            out.clear_keeping_room();
            return Ok(false);
        };
        out.walk_into(&message)
            .map_err(|e| tonic::Status::internal(format!("watch response: {e}")))?;
        Ok(true)
    }

    /// The next message's bytes; `None` once the stream ended with an OK status.
    async fn next_message(&mut self) -> Result<Option<bytes::Bytes>, tonic::Status> {
        use http_body_util::BodyExt;
        loop {
            if let Some(m) = self.ready.pop_front() {
                return Ok(Some(m));
            }
            if self.done {
                return Ok(None);
            }
            let frame = match self.body.frame().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    self.done = true;
                    return Err(tonic::Status::unavailable(format!("watch stream: {e}")));
                }
                None => {
                    self.done = true;
                    return Err(tonic::Status::internal(
                        "watch stream ended without a gRPC status",
                    ));
                }
            };
            match frame.into_data() {
                Ok(data) => {
                    let ready = &mut self.ready;
                    self.deframer.feed(&data, |m| {
                        ready.push_back(m);
                        Ok(())
                    })?;
                }
                Err(frame) => {
                    self.done = true;
                    if !self.deframer.is_between_messages() {
                        return Err(tonic::Status::internal(
                            "watch stream ended in the middle of a message",
                        ));
                    }
                    let status = frame
                        .trailers_ref()
                        .and_then(tonic::Status::from_header_map)
                        .unwrap_or_else(|| {
                            tonic::Status::internal("watch stream ended without a gRPC status")
                        });
                    if status.code() != tonic::Code::Ok {
                        return Err(status);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use metastore_proto::etcdserverpb as pb;
    use metastore_proto::mvccpb;
    use prost::Message;

    #[test]
    fn varints_of_every_length_read_as_prost_reads_them() {
        let mut cases: Vec<Vec<u8>> = [0u64, 1, 127, 128, 300, 16_383, 16_384, 1 << 35, u64::MAX]
            .iter()
            .map(|v| {
                let mut b = Vec::new();
                encoding::encode_varint(*v, &mut b);
                b.extend_from_slice(b"tail");
                b
            })
            .collect();
        // Not the shortest form, cut short, and too long.
        cases.extend([
            vec![0x80, 0x00, 1],
            vec![0xff, 0x80, 0x00],
            vec![0x80],
            vec![0xff, 0xff],
            vec![],
            vec![0xff; 11],
        ]);
        for case in cases {
            let (mut ours, mut theirs) = (&case[..], &case[..]);
            let got = varint(&mut ours).map_err(|e| e.to_string());
            let want = encoding::decode_varint(&mut theirs).map_err(|e| e.to_string());
            assert_eq!(got, want, "{case:02x?}");
            if want.is_ok() {
                assert_eq!(ours, theirs, "what is left of {case:02x?}");
            }
        }
    }

    fn kv(key: &str, value: &[u8]) -> mvccpb::KeyValue {
        mvccpb::KeyValue {
            key: Bytes::copy_from_slice(key.as_bytes()),
            create_revision: 3,
            mod_revision: 7,
            version: 2,
            value: Bytes::copy_from_slice(value),
            lease: 9,
        }
    }

    #[test]
    fn range_summary_counts_what_the_full_type_holds() {
        let full = pb::RangeResponse {
            header: Some(pb::ResponseHeader {
                cluster_id: 1,
                member_id: 2,
                revision: 30,
                raft_term: 4,
            }),
            kvs: vec![kv("a", b"one"), kv("b", &[7u8; 300]), kv("c", b"")],
            more: true,
            count: 5,
        };
        let bytes = full.encode_to_vec();
        let lean = RangeSummary::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(lean.kvs, 3);
        assert_eq!(lean.count, 5);
        assert!(lean.more);
        assert_eq!(lean.check(false), Ok(()));
        assert!(lean.check(true).is_err(), "count-only with key-values");
    }

    #[test]
    fn range_summary_rejects_counts_that_disagree() {
        let all = RangeSummary {
            count: 3,
            more: false,
            kvs: 3,
        };
        assert_eq!(all.check(false), Ok(()));
        let missing = RangeSummary {
            kvs: 2,
            ..all.clone()
        };
        assert!(missing.check(false).is_err(), "keys left out without more");
        let limited = RangeSummary {
            kvs: 2,
            more: true,
            ..all.clone()
        };
        assert_eq!(limited.check(false), Ok(()));
        let too_many = RangeSummary { kvs: 4, ..all };
        assert!(too_many.check(false).is_err());
        let count_only = RangeSummary {
            count: 3,
            ..Default::default()
        };
        assert_eq!(count_only.check(true), Ok(()));
    }

    #[test]
    fn range_summary_rejects_a_truncated_response() {
        let full = pb::RangeResponse {
            kvs: vec![kv("a", &[1u8; 100])],
            count: 1,
            ..Default::default()
        };
        let bytes = full.encode_to_vec();
        assert!(RangeSummary::decode(&bytes[..bytes.len() - 10]).is_err());
    }

    #[test]
    fn lean_watch_response_reads_the_fields_the_workloads_use() {
        let full = pb::WatchResponse {
            header: Some(pb::ResponseHeader {
                revision: 12,
                ..Default::default()
            }),
            watch_id: 41,
            created: true,
            canceled: true,
            compact_revision: 3,
            cancel_reason: "because".into(),
            fragment: false,
            events: vec![
                mvccpb::Event {
                    r#type: 0,
                    kv: Some(kv("k1", b"stamp-one")),
                    prev_kv: Some(kv("k1", b"old")),
                },
                mvccpb::Event {
                    r#type: 1,
                    kv: Some(kv("k2", b"")),
                    prev_kv: None,
                },
            ],
        };
        let lean = WatchResponse::decode(full.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(lean.watch_id, 41);
        assert!(lean.created && lean.canceled);
        assert_eq!(lean.cancel_reason, "because");
        let stamps: Vec<_> = lean
            .events
            .iter()
            .map(|e| e.kv.as_ref().map(|kv| kv.stamp))
            .collect();
        let one = u64::from_be_bytes(*b"stamp-on");
        assert_eq!(stamps, vec![Some(Some(one)), Some(None)]);
    }

    /// `Event::walk` reads what prost's generic decoding of the same lean type reads, on
    /// events as servers write them and on unusual but valid wire bytes; both refuse the
    /// same broken ones.
    #[test]
    fn walking_an_event_reads_what_prost_decoding_reads() {
        let mut stamped = 41u64.to_be_bytes().to_vec();
        stamped.extend_from_slice(b"rest");
        let full = |kv: Option<mvccpb::KeyValue>, prev: Option<mvccpb::KeyValue>| {
            mvccpb::Event {
                r#type: 1,
                kv,
                prev_kv: prev,
            }
            .encode_to_vec()
        };
        let mut cases = vec![
            full(Some(kv("k", &stamped)), None),
            full(Some(kv("k", b"short")), Some(kv("k", &stamped))),
            full(None, Some(kv("k", &stamped))),
            full(Some(kv("", b"")), None),
            Vec::new(),
        ];
        // Unknown fields of every wire type, a key-value given twice (merged: the second
        // one's value wins), a value given twice within one key-value.
        let mut odd = Vec::new();
        encoding::uint64::encode(9, &5, &mut odd);
        encoding::fixed32::encode(10, &5, &mut odd);
        encoding::fixed64::encode(11, &5, &mut odd);
        encoding::bytes::encode(12, &b"unknown".to_vec(), &mut odd);
        encoding::message::encode(2, &kv("k", &stamped), &mut odd);
        let mut second = Vec::new();
        encoding::bytes::encode(5, &99u64.to_be_bytes().to_vec(), &mut second);
        encoding::bytes::encode(5, &7u64.to_be_bytes().to_vec(), &mut second);
        encoding::bytes::encode(2, &second, &mut odd);
        cases.push(odd);
        for bytes in &cases {
            let walked = Event::walk(bytes).expect("walks");
            assert_eq!(Ok(&walked), Event::decode(bytes.as_slice()).as_ref());
        }
        assert_eq!(
            Event::walk(&cases[5]).map(|e| e.kv.and_then(|kv| kv.stamp)),
            Ok(Some(7))
        );
        // Cut short anywhere, or a key-value sent as a number: both refuse it.
        let whole = &cases[1];
        for cut in 1..whole.len() {
            let (walked, decoded) = (Event::walk(&whole[..cut]), Event::decode(&whole[..cut]));
            assert_eq!(walked.is_err(), decoded.is_err(), "cut at {cut}");
        }
        let mut wrong = Vec::new();
        encoding::uint64::encode(2, &5, &mut wrong);
        assert!(Event::walk(&wrong).is_err());
        assert!(Event::decode(wrong.as_slice()).is_err());
        // A value sent as a number, and a value's key written in two bytes (a longer form
        // of the same key): read as prost reads them.
        let mut number = Vec::new();
        encoding::uint64::encode(5, &5, &mut number);
        let mut wrong = Vec::new();
        encoding::bytes::encode(2, &number, &mut wrong);
        assert!(Event::walk(&wrong).is_err());
        assert!(Event::decode(wrong.as_slice()).is_err());
        let mut long_key = vec![0x2a | 0x80, 0x00, 8];
        long_key.extend_from_slice(&3u64.to_be_bytes());
        let mut event = Vec::new();
        encoding::bytes::encode(2, &long_key, &mut event);
        let walked = Event::walk(&event).map(|e| e.kv.and_then(|kv| kv.stamp));
        assert_eq!(walked, Ok(Some(3)));
        assert_eq!(
            Event::decode(event.as_slice()).map(|e| e.kv.and_then(|kv| kv.stamp)),
            walked
        );
    }

    /// `WatchResponse::walk` reads what prost's generic decoding of the same lean type reads.
    #[test]
    fn walking_a_watch_response_reads_what_prost_decoding_reads() {
        let mut stamped = 5u64.to_be_bytes().to_vec();
        stamped.extend_from_slice(&[b'v'; 300]);
        let event = |value: &[u8]| mvccpb::Event {
            r#type: 0,
            kv: Some(kv("key", value)),
            prev_kv: None,
        };
        let cases = [
            pb::WatchResponse {
                header: Some(pb::ResponseHeader {
                    cluster_id: u64::MAX,
                    member_id: 2,
                    revision: 300,
                    raft_term: 4,
                }),
                watch_id: 7,
                events: vec![event(&stamped), event(b"x"), event(&stamped)],
                fragment: true,
                ..Default::default()
            },
            pb::WatchResponse {
                watch_id: -1,
                created: true,
                ..Default::default()
            },
            pb::WatchResponse {
                watch_id: 1 << 40,
                canceled: true,
                compact_revision: 12,
                cancel_reason: "mvcc: required revision has been compacted".into(),
                ..Default::default()
            },
            pb::WatchResponse::default(),
        ];
        for full in &cases {
            let bytes = full.encode_to_vec();
            let walked = WatchResponse::walk(&bytes).expect("walks");
            assert_eq!(
                Ok(&walked),
                WatchResponse::decode(bytes.as_slice()).as_ref()
            );
            assert_eq!(walked.watch_id, full.watch_id);
            assert_eq!(walked.events.len(), full.events.len());
            // Cut short anywhere: both refuse it, or both read a shorter message.
            for cut in 1..bytes.len() {
                let (walked, decoded) = (
                    WatchResponse::walk(&bytes[..cut]),
                    WatchResponse::decode(&bytes[..cut]),
                );
                assert_eq!(walked.ok(), decoded.ok(), "cut at {cut}");
            }
        }
        // Walked into a response that held another one, each reads as when walked alone: a
        // reader that reuses one response sees nothing of the one before.
        for earlier in &cases {
            for full in &cases {
                let mut reused = WatchResponse::walk(&earlier.encode_to_vec()).expect("walks");
                reused.walk_into(&full.encode_to_vec()).expect("walks");
                assert_eq!(
                    Ok(&reused),
                    WatchResponse::decode(full.encode_to_vec().as_slice()).as_ref()
                );
            }
        }
        let mut bad = Vec::new();
        encoding::bytes::encode(6, &vec![0xff, 0xfe], &mut bad);
        assert!(
            WatchResponse::walk(&bad).is_err(),
            "a reason that is not UTF-8"
        );
        assert!(WatchResponse::decode(bad.as_slice()).is_err());
    }

    #[test]
    fn events_split_across_buffer_chunks_decode_as_whole_ones() {
        let stamped = |n: u64| {
            let mut v = n.to_be_bytes().to_vec();
            v.extend_from_slice(&[b'v'; 100]);
            v
        };
        let full = pb::WatchResponse {
            watch_id: 5,
            events: (1..=3)
                .map(|n| mvccpb::Event {
                    kv: Some(kv("key", &stamped(n))),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let bytes = full.encode_to_vec();
        let whole = WatchResponse::decode(bytes.as_slice()).expect("decodes");
        let want: Vec<_> = (1..=3).map(|n| Some(Some(n))).collect();
        let stamps = |r: &WatchResponse| -> Vec<_> {
            r.events
                .iter()
                .map(|e| e.kv.as_ref().map(|kv| kv.stamp))
                .collect()
        };
        assert_eq!(stamps(&whole), want);
        // Every cut point: an event that straddles two chunks reads the same.
        for cut in 1..bytes.len() {
            let (a, b) = bytes.split_at(cut);
            let split = WatchResponse::decode(a.chain(b)).expect("decodes in two chunks");
            assert_eq!(split, whole, "cut at {cut}");
        }
        // Encoded back (for tests only), the lean response is what it read.
        assert_eq!(
            WatchResponse::decode(whole.encode_to_vec().as_slice()),
            Ok(whole.clone())
        );
        assert_eq!(whole.encoded_len(), whole.encode_to_vec().len());
    }

    #[test]
    fn a_key_value_keeps_the_first_eight_bytes_of_its_value() {
        let decode = |value: &[u8]| {
            KeyValue::decode(kv("key", value).encode_to_vec().as_slice()).map(|kv| kv.stamp)
        };
        let stamp = 0x0102_0304_0506_0708u64;
        let mut long = stamp.to_be_bytes().to_vec();
        long.extend_from_slice(&[b'v'; 300]);
        assert_eq!(decode(&long), Ok(Some(stamp)));
        assert_eq!(decode(&stamp.to_be_bytes()), Ok(Some(stamp)));
        assert_eq!(decode(b"short"), Ok(None));
        assert_eq!(decode(b""), Ok(None));
        // Fields after the value are still read past correctly, and the last value wins.
        let mut twice = kv("key", &long).encode_to_vec();
        twice.extend(kv("key", b"seven").encode_to_vec());
        assert_eq!(
            KeyValue::decode(twice.as_slice()).map(|kv| kv.stamp),
            Ok(None)
        );
        // Encoded back, the stamp is the whole value.
        let lean = KeyValue { stamp: Some(stamp) };
        let full = mvccpb::KeyValue::decode(lean.encode_to_vec().as_slice()).expect("decodes");
        assert_eq!(&full.value[..], &stamp.to_be_bytes());
        assert_eq!(lean.encoded_len(), lean.encode_to_vec().len());
    }

    #[test]
    fn a_key_value_whose_value_runs_past_the_message_is_an_error() {
        let bytes = kv("key", &[7u8; 100]).encode_to_vec();
        let at = bytes.len() - 20;
        assert!(KeyValue::decode(&bytes[..at]).is_err());
        let truncated_event = pb::WatchResponse {
            events: vec![mvccpb::Event {
                kv: Some(kv("key", &[7u8; 100])),
                ..Default::default()
            }],
            ..Default::default()
        }
        .encode_to_vec();
        let cut = truncated_event.len() - 30;
        assert!(WatchResponse::decode(&truncated_event[..cut]).is_err());
    }
}
