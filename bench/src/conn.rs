//! The tool's gRPC connection: tonic's stubs over one HTTP/2 connection of the `h2` crate,
//! with nothing in between.
//!
//! tonic's `Channel` puts a `tower` buffer in front of hyper's client: a request goes to the
//! buffer's worker task, which hands it to hyper's connection task, which spawns a task per
//! request to wait for the answer and send it back on a one-shot channel. The tool shares the
//! machine's two cores with the server it measures, so each of those hops is CPU taken from
//! the server (etcd or MetaStore alike). [`Conn`] is the same HTTP/2 stream per request, sent by
//! the requester's own task: the request's frames go into the connection's shared state, the
//! connection's one task writes and reads the socket, and the answer wakes the requester.
//! The bytes on the wire are the ones tonic writes: the stubs, the codec and the gRPC status
//! handling are tonic's.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::FutureExt;
use http::uri::{Authority, Scheme, Uri};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use crate::error::{Error, Result};

type BoxError = Box<dyn StdError + Send + Sync>;

/// One HTTP/2 connection to an etcd v3 endpoint; clones share it, as tonic's `Channel` does.
#[derive(Clone, Debug)]
pub struct Conn {
    send: h2::client::SendRequest<Bytes>,
    authority: Authority,
    /// The runtime the connection's task runs on, where its requesters run best
    /// ([`crate::shards`]).
    runtime: tokio::runtime::Handle,
}

impl Conn {
    /// Connects to `url` (`http://host:port`; TLS is not spoken) with `TCP_NODELAY` on. The
    /// connection's task runs on the runtime this is called on.
    pub async fn connect(url: &str) -> Result<Self> {
        let err = |source: BoxError| Error::Connect {
            endpoint: url.to_string(),
            source,
        };
        let uri: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| err(e.into()))?;
        if uri.scheme() != Some(&Scheme::HTTP) {
            return Err(err(
                format!("only http:// endpoints are spoken, not {url}").into()
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| err(format!("no host in {url}").into()))?;
        let port = authority.port_u16().unwrap_or(80);
        // An IPv6 literal is written in brackets in a URL, not in an address.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| err(e.into()))?;
        tcp.set_nodelay(true).map_err(|e| err(e.into()))?;
        // hyper's client settings, which tonic's channel uses: 2 MiB per stream and 5 MiB per
        // connection of receive window, a 1 MiB send buffer, no server push.
        let (send, connection) = h2::client::Builder::new()
            .initial_window_size(2 << 20)
            .initial_connection_window_size(5 << 20)
            .max_header_list_size(16 << 10)
            .max_send_buffer_size(1 << 20)
            .enable_push(false)
            .handshake(tcp)
            .await
            .map_err(|e| err(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
        Ok(Self {
            send,
            authority,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Sends `req` as one HTTP/2 stream and waits for the answer's headers.
    pub(crate) async fn send(
        self,
        req: http::Request<tonic::body::Body>,
    ) -> Result<http::Response<RecvBody>, BoxError> {
        let (mut parts, mut body) = req.into_parts();
        // tonic's stubs write only the path: the origin is the connection's, as tonic's own
        // channel adds it.
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        parts.uri = Uri::from_parts(uri)?;
        let mut send = self.send.ready().await?;
        let (answer, mut out) = send.send_request(http::Request::from_parts(parts, ()), false)?;
        // A unary request's body is one message, ready at once, and ends the stream with it;
        // a streaming one goes on from a task of its own for as long as its stream yields.
        let mut held: Option<Bytes> = None;
        loop {
            match body.frame().now_or_never() {
                Some(Some(frame)) => {
                    if let Ok(data) = frame?.into_data() {
                        if let Some(prev) = held.replace(data) {
                            out.send_data(prev, false)?;
                        }
                    }
                }
                Some(None) => {
                    out.send_data(held.take().unwrap_or_default(), true)?;
                    break;
                }
                None => {
                    if let Some(prev) = held.take() {
                        out.send_data(prev, false)?;
                    }
                    tokio::spawn(pipe(body, out));
                    break;
                }
            }
        }
        let answer = answer.await?;
        Ok(answer.map(RecvBody::new))
    }
}

/// Sends the rest of a streaming request's body, then ends the stream.
async fn pipe(mut body: tonic::body::Body, mut out: h2::SendStream<Bytes>) {
    while let Some(frame) = body.frame().await {
        let sent = match frame.map(Frame::into_data) {
            Ok(Ok(data)) => out.send_data(data, false),
            Ok(Err(_)) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "request stream failed");
                out.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        if sent.is_err() {
            return; // the stream was reset or the connection ended: nothing left to send to
        }
    }
    let _ = out.send_data(Bytes::new(), true);
}

impl crate::shards::Placed for Conn {
    fn runtime(&self) -> tokio::runtime::Handle {
        self.runtime.clone()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Conn {
    type Response = http::Response<RecvBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    /// Always ready: each call waits for a free stream on the connection itself.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// An answer's body: its DATA frames, each given back to the flow-control window as soon as
/// it is read, then its trailers (where gRPC puts the status).
pub struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
    done: bool,
}

impl RecvBody {
    fn new(recv: h2::RecvStream) -> Self {
        Self {
            recv,
            data_done: false,
            done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if !self.data_done {
            match std::task::ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Returning capacity fails only when the stream is already gone, which the
                    // next poll reports.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    self.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => self.data_done = true,
            }
        }
        let trailers = std::task::ready!(self.recv.poll_trailers(cx));
        self.done = true;
        Poll::Ready(match trailers {
            Ok(Some(t)) => Some(Ok(Frame::trailers(t))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }
}
