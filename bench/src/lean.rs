//! Lean decodings of the two responses the tool receives in bulk: a `RangeResponse` of many
//! key-values and a `WatchResponse` of many events.
//!
//! The load tool shares the machine's cores with the server it measures, so every microsecond
//! it spends decoding is taken from the server. Decoded in full (the `metastore-proto` types),
//! each key-value of a range becomes a struct with two reference-counted `Bytes` and four
//! integers that the tool then drops unread. These types read only what the workloads use and
//! skip the rest of the wire bytes in place (protobuf lets a reader skip any field by its wire
//! type). They decode the same bytes as the full types, so any server's answer, MetaStore's or
//! etcd's, costs the tool the same: the comparison stays side by side.

use bytes::{Buf, BufMut, Bytes};
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
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)?;
                encoding::skip_field(wire_type, tag, buf, ctx)?;
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
#[derive(Clone, PartialEq, prost::Message)]
pub struct WatchResponse {
    #[prost(int64, tag = "2")]
    pub watch_id: i64,
    #[prost(bool, tag = "3")]
    pub created: bool,
    #[prost(bool, tag = "4")]
    pub canceled: bool,
    #[prost(string, tag = "6")]
    pub cancel_reason: String,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
}

/// An event: only its key-value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

/// A key-value: only its value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(bytes = "bytes", tag = "5")]
    pub value: Bytes,
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

/// `Watch/Watch`, its responses decoded as [`WatchResponse`].
pub async fn watch(
    channel: Conn,
    requests: impl tokio_stream::Stream<Item = WatchRequest> + Send + 'static,
) -> Result<tonic::Streaming<WatchResponse>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(not_ready)?;
    let codec = tonic_prost::ProstCodec::<WatchRequest, WatchResponse>::default();
    let path = PathAndQuery::from_static("/etcdserverpb.Watch/Watch");
    Ok(grpc
        .streaming(tonic::Request::new(requests), path, codec)
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb as pb;
    use metastore_proto::mvccpb;
    use prost::Message;

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
        let values: Vec<_> = lean
            .events
            .iter()
            .map(|e| e.kv.as_ref().map(|kv| kv.value.clone()))
            .collect();
        assert_eq!(
            values,
            vec![Some(Bytes::from_static(b"stamp-one")), Some(Bytes::new())]
        );
    }
}
