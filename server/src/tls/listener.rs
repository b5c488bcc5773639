//! TLS in front of an accept loop: [`incoming`] turns a [`TcpListener`] into a stream of
//! connections that completed a TLS handshake, ready for tonic's
//! `serve_with_incoming_shutdown` (behind the `:authority` adapter on the client port).
//!
//! Handshakes run in their own tasks, bounded by [`HANDSHAKE_TIMEOUT`], so a slow or silent
//! client never holds up the next one; a failed handshake (plain TCP, an untrusted or expired
//! client certificate, no client certificate where one is required) is logged at debug level
//! and the connection closed. Only completed handshakes reach the server, so a failure never
//! becomes an accept error (which would stop tonic's accept loop).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::cert_name;

/// How long a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Completed handshakes waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 128;

/// Who the client is, from the certificate it presented (verified against the trusted CA:
/// there is one only with `--client-cert-auth` / `--peer-client-cert-auth`).
///
/// The connection's [`TlsConnectInfo`] is a request extension of every request on it (gRPC and
/// HTTP alike); [`ClientIdentity::of`] reads it. etcd uses the common name as the user name
/// when auth is on and the request carries no token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The subject common name of the client certificate (empty if it has none).
    pub common_name: String,
}

impl ClientIdentity {
    /// The verified client identity of the connection a request came on, if any.
    pub fn of(extensions: &http::Extensions) -> Option<&ClientIdentity> {
        extensions.get::<TlsConnectInfo>()?.client.as_ref()
    }
}

/// What tonic records of a TLS connection for each request on it (its `ConnectInfo`).
#[derive(Debug, Clone)]
pub struct TlsConnectInfo {
    pub local_addr: Option<SocketAddr>,
    pub remote_addr: Option<SocketAddr>,
    /// The verified client certificate's identity.
    pub client: Option<ClientIdentity>,
}

/// A server-side TLS connection whose handshake is complete.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    info: TlsConnectInfo,
}

impl TlsConn {
    pub fn info(&self) -> &TlsConnectInfo {
        &self.info
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TlsConnectInfo;

    fn connect_info(&self) -> TlsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts on `listener` and hands out connections whose TLS handshake (with `config`)
/// completed. The accept task ends, closing the listener, once the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_BACKLOG);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a TLS connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                // Nagle's algorithm and delayed ACKs would hold small responses ~40 ms.
                let _ = tcp.set_nodelay(true);
                let local = tcp.local_addr().ok();
                let stream =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%remote, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%remote, "TLS handshake timed out");
                            return;
                        }
                    };
                let client = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .map(|leaf| ClientIdentity {
                        common_name: cert_name::common_name(leaf).unwrap_or_default(),
                    });
                let info = TlsConnectInfo {
                    local_addr: local,
                    remote_addr: Some(remote),
                    client,
                };
                let _ = tx.send(Ok(TlsConn { stream, info })).await;
            });
        }
    });
    ReceiverStream::new(rx)
}
