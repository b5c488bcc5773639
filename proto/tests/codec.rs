//! The generated stubs' codec ([`metastore_proto::codec::Codec`]) writes and reads gRPC's
//! framing exactly as tonic's own does, for messages smaller and larger than its buffers,
//! alone or many to a stream, however the transport cuts the bytes into frames.

use bytes::{BufMut, Bytes, BytesMut};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use metastore_proto::codec::{Codec, BUFFER_SIZE};
use metastore_proto::etcdserverpb::PutRequest;
use prost::Message;
use tonic::codec::{Codec as _, EncodeBody, SingleMessageCompressionOverride, Streaming};

/// Puts whose encodings fall below, at and above the codec's buffer, up to 1 MiB.
fn puts() -> Vec<PutRequest> {
    let sizes = [
        0,
        1,
        BUFFER_SIZE - 20,
        BUFFER_SIZE - 8,
        BUFFER_SIZE,
        BUFFER_SIZE + 1,
        8 << 10,
        70_000,
        1 << 20,
    ];
    sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| PutRequest {
            key: Bytes::from(format!("key-{i}")),
            value: Bytes::from((0..n).map(|b| (b % 251) as u8).collect::<Vec<u8>>()),
            lease: i as i64,
            ..Default::default()
        })
        .collect()
}

/// gRPC's framing of `msgs`: per message a zero compression flag, its length and its bytes.
fn framed(msgs: &[PutRequest]) -> Bytes {
    let mut out = BytesMut::new();
    for m in msgs {
        out.put_u8(0);
        out.put_u32(m.encoded_len() as u32);
        out.put_slice(&m.encode_to_vec());
    }
    out.freeze()
}

async fn encode(msgs: Vec<PutRequest>) -> Bytes {
    let mut codec = Codec::<PutRequest, PutRequest>::default();
    let source = tokio_stream::iter(msgs.into_iter().map(Ok));
    let body = EncodeBody::new_server(
        codec.encoder(),
        source,
        None,
        SingleMessageCompressionOverride::default(),
        None,
    );
    body.collect()
        .await
        .expect("the encoding body fails")
        .to_bytes()
}

/// Decodes `bytes` delivered in frames of `frame` bytes.
async fn decode(bytes: Bytes, frame: usize) -> Vec<PutRequest> {
    let mut codec = Codec::<PutRequest, PutRequest>::default();
    let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = bytes
        .chunks(frame)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(tokio_stream::iter(frames));
    let mut stream = Streaming::new_request(codec.decoder(), body, None, Some(4 << 20));
    let mut out = Vec::new();
    while let Some(m) = stream.message().await.expect("decoding fails") {
        out.push(m);
    }
    out
}

#[tokio::test]
async fn messages_of_every_size_are_framed_as_grpc_frames_them() {
    for m in puts() {
        assert_eq!(
            encode(vec![m.clone()]).await,
            framed(std::slice::from_ref(&m)),
            "value of {} bytes",
            m.value.len()
        );
    }
    let all = puts();
    assert_eq!(encode(all.clone()).await, framed(&all));
}

#[tokio::test]
async fn messages_of_every_size_decode_whatever_the_frames() {
    let all = puts();
    let bytes = framed(&all);
    for frame in [
        1,
        7,
        BUFFER_SIZE - 1,
        BUFFER_SIZE + 3,
        16 << 10,
        bytes.len(),
    ] {
        assert_eq!(
            decode(bytes.clone(), frame).await,
            all,
            "frames of {frame} bytes"
        );
    }
}

#[tokio::test]
async fn a_message_over_the_limit_is_refused_not_read() {
    let mut codec = Codec::<PutRequest, PutRequest>::default();
    let big = PutRequest {
        key: Bytes::from_static(b"k"),
        value: Bytes::from(vec![7u8; 5000]),
        ..Default::default()
    };
    let bytes = framed(&[big]);
    let body = StreamBody::new(tokio_stream::iter([Ok::<_, tonic::Status>(Frame::data(
        bytes,
    ))]));
    let mut stream = Streaming::new_request(codec.decoder(), body, None, Some(4096));
    let err = stream
        .message()
        .await
        .expect_err("a 5,000-byte message passed a 4,096-byte limit");
    assert_eq!(err.code(), tonic::Code::OutOfRange);
}
