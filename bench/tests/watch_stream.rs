//! The watch workloads' reader (`lean::watch`) against a bare HTTP/2 server in this process
//! that answers with exactly the frames each test gives: how a stream's end and its gRPC
//! status are read (trailers, a trailers-only answer, a stream cut mid-message).

use std::error::Error as StdError;

use bytes::Bytes;
use metastore_bench::conn::Conn;
use metastore_proto::etcdserverpb::{watch_request, WatchCreateRequest, WatchRequest};
use metastore_proto::{etcdserverpb as pb, mvccpb};
use prost::Message;

type TestResult = std::result::Result<(), Box<dyn StdError>>;

/// What the server answers to the one call it takes.
enum Answer {
    /// Headers carrying the status and ending the stream.
    TrailersOnly(i32),
    /// These DATA frames, then trailers with this status.
    Frames(Vec<Vec<u8>>, i32),
}

/// Serves one connection's one call with `answer`; returns its `http://` URL.
async fn serve(answer: Answer) -> Result<String, Box<dyn StdError>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let Ok(mut conn) = h2::server::handshake(tcp).await else {
            return;
        };
        if let Some(Ok((_req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let head = |status: Option<i32>| {
                    let mut b = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/grpc");
                    if let Some(s) = status {
                        b = b.header("grpc-status", s.to_string());
                        b = b.header("grpc-message", "refused%20here");
                    }
                    b.body(()).unwrap_or_default()
                };
                match answer {
                    Answer::TrailersOnly(status) => {
                        let _ = respond.send_response(head(Some(status)), true);
                    }
                    Answer::Frames(frames, status) => {
                        let Ok(mut out) = respond.send_response(head(None), false) else {
                            return;
                        };
                        for f in frames {
                            let _ = out.send_data(Bytes::from(f), false);
                        }
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", status.into());
                        let _ = out.send_trailers(trailers);
                    }
                }
            });
        }
        // Drives the connection until the client goes.
        while let Some(Ok(_)) = conn.accept().await {}
    });
    Ok(url)
}

/// `messages` framed as gRPC frames them, all in one run of bytes.
fn framed(messages: &[pb::WatchResponse]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        let bytes = m.encode_to_vec();
        out.push(0);
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(&bytes);
    }
    out
}

fn two_responses() -> Vec<pb::WatchResponse> {
    let mut value = 77u64.to_be_bytes().to_vec();
    value.extend_from_slice(b"value");
    vec![
        pb::WatchResponse {
            watch_id: 3,
            created: true,
            ..Default::default()
        },
        pb::WatchResponse {
            watch_id: 3,
            events: vec![mvccpb::Event {
                kv: Some(mvccpb::KeyValue {
                    key: Bytes::from_static(b"k"),
                    mod_revision: 300,
                    value: Bytes::from(value),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
    ]
}

async fn open(url: &str) -> Result<metastore_bench::lean::WatchResponses, Box<dyn StdError>> {
    let conn = Conn::connect(url).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: Bytes::from_static(b"k"),
                ..Default::default()
            },
        )),
    })
    .await?;
    Ok(metastore_bench::lean::watch(conn, rx).await?)
}

#[tokio::test]
async fn a_call_refused_in_its_headers_is_an_error_with_that_status() -> TestResult {
    let url = serve(Answer::TrailersOnly(12)).await?;
    let err = open(&url).await.err().ok_or("a refused call opened")?;
    let status = err
        .downcast_ref::<tonic::Status>()
        .ok_or("not a gRPC status")?;
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert_eq!(status.message(), "refused here");
    Ok(())
}

#[tokio::test]
async fn responses_come_before_the_status_in_the_trailers() -> TestResult {
    let wire = framed(&two_responses());
    // Split inside the second message's prefix.
    let cut = wire.len() - 20;
    for (status, ok) in [(0, true), (14, false)] {
        let url = serve(Answer::Frames(
            vec![wire[..cut].to_vec(), wire[cut..].to_vec()],
            status,
        ))
        .await?;
        let mut watch = open(&url).await?;
        let first = watch.message().await?.ok_or("ended")?;
        assert!(first.created);
        let second = watch.message().await?.ok_or("ended")?;
        let stamps: Vec<_> = second
            .events
            .iter()
            .map(|e| e.kv.as_ref().and_then(|kv| kv.stamp))
            .collect();
        assert_eq!(stamps, vec![Some(77)]);
        let end = watch.message().await;
        if ok {
            assert_eq!(end.map_err(|s| s.code()), Ok(None));
        } else {
            assert_eq!(end.err().map(|s| s.code()), Some(tonic::Code::Unavailable));
        }
        // And the stream stays ended.
        assert_eq!(watch.message().await.map_err(|s| s.code()), Ok(None));
    }
    Ok(())
}

#[tokio::test]
async fn a_stream_that_ends_mid_message_is_an_error() -> TestResult {
    let wire = framed(&two_responses());
    let url = serve(Answer::Frames(vec![wire[..wire.len() - 3].to_vec()], 0)).await?;
    let mut watch = open(&url).await?;
    assert!(watch.message().await?.is_some_and(|r| r.created));
    let err = watch
        .message()
        .await
        .err()
        .ok_or("a cut message was read")?;
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(err.message().contains("middle of a message"), "{err:?}");
    Ok(())
}
