//! Client channels that speak TLS to `https://` URLs: the peer clients (openraft's RPCs,
//! forwarding, joining) and `metastore-ctl`.
//!
//! tonic's own `ClientTlsConfig` takes a fixed certificate; the connector here takes a rustls
//! [`ClientConfig`] whose client certificate comes from a
//! [`ReloadingCert`](super::ReloadingCert), so a rotated peer certificate is presented on the
//! next connection. Each connection resolves the host again (peers may name hosts whose DNS
//! records do not exist yet), connects, and verifies the server's certificate against the
//! trusted CA and the URL's host name or IP address, as etcd (Go) does.
//!
//! tonic refuses an `https://` endpoint it has no TLS settings of its own for, so the channel
//! is built for the same authority with `http://`; only `:scheme` differs on the wire, and the
//! server ignores it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};
use url::{Host, Url};

use super::TlsError;

/// A lazily connecting channel to `url` (`http://` plain, `https://` with `tls`), with
/// `configure` applied to its endpoint (timeouts, keep-alive).
pub fn lazy_channel(
    url: &str,
    tls: Option<&Arc<ClientConfig>>,
    configure: impl FnOnce(Endpoint) -> Endpoint,
) -> Result<Channel, TlsError> {
    let bad = |reason: String| TlsError::Url {
        url: url.to_string(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| bad(e.to_string()))?;
    match parsed.scheme() {
        "http" => {
            let endpoint =
                Endpoint::from_shared(url.to_string()).map_err(|e| bad(e.to_string()))?;
            Ok(configure(endpoint).connect_lazy())
        }
        "https" => {
            let config = tls.ok_or_else(|| TlsError::NoClientTls {
                url: url.to_string(),
            })?;
            let host = parsed
                .host()
                .ok_or_else(|| bad("no host".into()))?
                .to_owned();
            let port = parsed
                .port_or_known_default()
                .ok_or_else(|| bad("no port".into()))?;
            let server_name = match &host {
                Host::Domain(d) => ServerName::try_from(d.clone()),
                Host::Ipv4(ip) => Ok(ServerName::from(std::net::IpAddr::V4(*ip))),
                Host::Ipv6(ip) => Ok(ServerName::from(std::net::IpAddr::V6(*ip))),
            }
            .map_err(|e| bad(e.to_string()))?;
            let plain = format!("http://{host}:{port}");
            let endpoint = Endpoint::from_shared(plain).map_err(|e| bad(e.to_string()))?;
            let connector = TlsConnector {
                connector: tokio_rustls::TlsConnector::from(config.clone()),
                host: Arc::new(host),
                port,
                server_name,
            };
            Ok(configure(endpoint).connect_with_connector_lazy(connector))
        }
        other => Err(bad(format!("unsupported scheme {other:?}"))),
    }
}

/// Connects to one fixed host and port with TLS, whatever URI tonic asks for.
#[derive(Clone)]
struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
    host: Arc<Host<String>>,
    port: u16,
    server_name: ServerName<'static>,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TlsStream<TcpStream>>>> + Send>>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = match this.host.as_ref() {
                Host::Domain(d) => TcpStream::connect((d.as_str(), this.port)).await?,
                Host::Ipv4(ip) => TcpStream::connect((*ip, this.port)).await?,
                Host::Ipv6(ip) => TcpStream::connect((*ip, this.port)).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = this.connector.connect(this.server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
