//! Reaching a cluster: endpoints, TLS, member list and per-member Status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{MemberListRequest, StatusRequest, StatusResponse};
use tonic::transport::Channel;

/// The endpoints and TLS flags every command takes (etcdctl's names).
#[derive(Debug, clap::Args)]
pub struct ConnArgs {
    /// Client URLs of one or more members (or of a Service in front of them).
    #[arg(long, value_delimiter = ',', required = true)]
    pub endpoints: Vec<String>,

    /// CA bundle (PEM) that verifies https:// endpoints.
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Client certificate (PEM) presented to https:// endpoints (with --key).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl ConnArgs {
    /// The endpoints as URLs (`http://` added where no scheme is given).
    pub fn urls(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| endpoint_url(e)).collect()
    }
}

/// How to reach the endpoints: TLS settings for `https://` ones.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Deadline of one unary call (a Snapshot stream is not bounded by it).
    call_timeout: Option<Duration>,
}

impl Dialer {
    pub fn new(args: &ConnArgs) -> anyhow::Result<Self> {
        let Some(ca) = &args.cacert else {
            if args.cert.is_some() {
                bail!("--cert needs --cacert to verify the server");
            }
            return Ok(Self {
                tls: None,
                call_timeout: Some(Duration::from_secs(30)),
            });
        };
        let policy = metastore::tls::TlsPolicy::default();
        let identity = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some(Arc::new(metastore::tls::ReloadingCert::load(
                cert,
                key,
                policy.provider(),
            )?)),
            _ => None,
        };
        Ok(Self {
            tls: Some(policy.client_config(ca, identity)?),
            call_timeout: Some(Duration::from_secs(30)),
        })
    }

    /// The same dialer without a per-call deadline (for streams that may run long).
    pub fn streaming(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            call_timeout: None,
        }
    }

    pub fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        let call_timeout = self.call_timeout;
        Ok(metastore::tls::lazy_channel(url, self.tls.as_ref(), |e| {
            let e = e.connect_timeout(Duration::from_secs(3));
            match call_timeout {
                Some(t) => e.timeout(t),
                None => e,
            }
        })?)
    }
}

/// `scheme://host:port` for an endpoint given with or without a scheme.
pub fn endpoint_url(e: &str) -> String {
    if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    }
}

/// A member as MemberList names it.
#[derive(Debug, Clone)]
pub struct MemberRef {
    pub id: u64,
    /// Its name, or its id in hex while it has not published one.
    pub name: String,
    /// Its first client URL, once published.
    pub url: Option<String>,
    pub is_learner: bool,
}

/// The members, from the first endpoint that answers.
pub async fn members(dialer: &Dialer, endpoints: &[String]) -> anyhow::Result<Vec<MemberRef>> {
    let mut last = None;
    for url in endpoints {
        let mut c = ClusterClient::new(dialer.channel(url)?);
        match c
            .member_list(MemberListRequest {
                linearizable: false,
            })
            .await
        {
            Ok(r) => {
                return Ok(r
                    .into_inner()
                    .members
                    .into_iter()
                    .map(|m| MemberRef {
                        id: m.id,
                        name: if m.name.is_empty() {
                            format!("{:x}", m.id)
                        } else {
                            m.name
                        },
                        url: m.client_ur_ls.first().map(|u| endpoint_url(u)),
                        is_learner: m.is_learner,
                    })
                    .collect())
            }
            Err(s) => last = Some(anyhow::anyhow!("{url}: {}: {}", s.code(), s.message())),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoint")))
}

/// `Maintenance.Status` of the member at `url`.
pub async fn status(dialer: &Dialer, url: &str) -> anyhow::Result<StatusResponse> {
    let mut c = MaintenanceClient::new(dialer.channel(url)?);
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(Duration::from_secs(5));
    Ok(c.status(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner())
}

/// Every member with its Status (`Err`: why it did not answer).
pub async fn statuses(
    dialer: &Dialer,
    endpoints: &[String],
) -> anyhow::Result<Vec<(MemberRef, anyhow::Result<StatusResponse>)>> {
    let mut out = Vec::new();
    for m in members(dialer, endpoints).await? {
        let s = match &m.url {
            Some(url) => status(dialer, url).await,
            None => Err(anyhow::anyhow!("no client URL published yet")),
        };
        out.push((m, s));
    }
    Ok(out)
}
