//! Unary `KV.Range` over a key range, answered with a body produced while it is sent
//! ([`super::range_stream`]) rather than with one buffer holding the whole encoded response,
//! as tonic's generated handler would: server memory stays within the Range budget
//! whatever the result size.
//!
//! [`RangeBodyLayer`] sits in front of tonic's router. It takes `/etcdserverpb.KV/Range`
//! calls, reads the request message and, for a range (a non-empty `range_end`), answers
//! itself: one gRPC message, streamed in chunks, then the `grpc-status` trailers. Anything
//! else (a single key, a compressed or malformed request) goes on to tonic with the bytes
//! read, so errors and single-key reads are exactly tonic's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::future::Either;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use metastore_proto::etcdserverpb::RangeRequest;
use prost::Message;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::Status;

use super::kv_service::KvService;
use super::node::NodeRef;
use super::range_stream::{self, FrameEncoder, Produced};

/// The unary Range method's path.
pub const RANGE_PATH: &str = "/etcdserverpb.KV/Range";

/// Installs [`RangeBodyService`] in front of a service (tonic's router).
#[derive(Clone)]
pub struct RangeBodyLayer {
    node: NodeRef,
    /// The largest request message accepted (tonic's decoding limit on the KV service).
    max_message: usize,
}

impl RangeBodyLayer {
    pub fn new(node: NodeRef, max_message: usize) -> Self {
        Self { node, max_message }
    }
}

impl<S> tower::Layer<S> for RangeBodyLayer {
    type Service = RangeBodyService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RangeBodyService {
            inner,
            layer: self.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct RangeBodyService<S> {
    inner: S,
    layer: RangeBodyLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for RangeBodyService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    /// Other calls take the inner service's future as it is; a Range's is boxed.
    type Future = Either<S::Future, BoxFuture<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != RANGE_PATH || req.method() != http::Method::POST {
            return Either::Left(self.inner.call(req));
        }
        // The service polled ready is the one to call (tower's clone-and-swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Either::Right(Box::pin(async move {
            let (parts, body) = req.into_parts();
            let bytes = match read_message(body, layer.max_message).await {
                Ok(b) => b,
                Err(status) => return Ok(status.into_http()),
            };
            match decode(&bytes) {
                Some(r) if !r.range_end.is_empty() => {
                    let creds = crate::auth::Credentials::of_http(&parts);
                    Ok(serve(&layer.node, &creds, r)
                        .await
                        .unwrap_or_else(Status::into_http))
                }
                _ => {
                    let req = http::Request::from_parts(parts, Body::new(Full::new(bytes)));
                    inner.call(req).await
                }
            }
        }))
    }
}

/// Reads the request body, refusing a message over `limit` as tonic does (same status).
async fn read_message(mut body: Body, limit: usize) -> Result<Bytes, Status> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::internal(format!("reading the request: {e}")))?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
        if let Some(len) = declared_len(&buf) {
            if len > limit {
                return Err(Status::out_of_range(format!(
                    "Error, decoded message length too large: found {len} bytes, \
                     the limit is: {limit} bytes"
                )));
            }
        }
    }
    Ok(buf.freeze())
}

/// The message length a gRPC frame's prefix declares.
fn declared_len(frame: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = frame.get(1..5)?.try_into().ok()?;
    Some(u32::from_be_bytes(prefix) as usize)
}

/// The request, if `frame` is exactly one uncompressed, well-formed message.
fn decode(frame: &[u8]) -> Option<RangeRequest> {
    let len = declared_len(frame)?;
    if frame[0] != 0 || frame.len() != 5 + len {
        return None;
    }
    RangeRequest::decode(&frame[5..]).ok()
}

/// Validates, waits for a linearizable read, and starts the response.
async fn serve(
    node: &NodeRef,
    creds: &crate::auth::Credentials,
    r: RangeRequest,
) -> Result<http::Response<Body>, Status> {
    let node = node.get()?;
    let access = node.auth.access(creds);
    KvService::admit_read(&node, access, &r).await?;
    let produced = range_stream::start(&node, r, FrameEncoder::default()).await?;
    let mut resp = http::Response::new(Body::new(FrameBody {
        produced,
        done: false,
    }));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(resp)
}

/// The produced chunks as HTTP/2 data, then the `grpc-status` trailers (an error found
/// mid-way ends the body with its status instead).
struct FrameBody {
    produced: Produced<Bytes>,
    done: bool,
}

fn trailers(status: &Status) -> Frame<Bytes> {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    Frame::trailers(map)
}

impl http_body::Body for FrameBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut self.produced).poll_next(cx)) {
            Some(Ok(data)) => Frame::data(data),
            Some(Err(status)) => {
                self.done = true;
                trailers(&status)
            }
            None => {
                self.done = true;
                trailers(&Status::ok(""))
            }
        };
        Poll::Ready(Some(Ok(frame)))
    }
}
