//! The cluster's own etcd API, as the operator uses it: the state comes from MemberList,
//! Status, Alarm and HashKV, never from guessing at pods.
//!
//! [`ClusterApi`] is a trait so the controller can be driven by a fake in tests;
//! [`GrpcClusterApi`] speaks the etcd v3 gRPC API through `metastore-proto`, over TLS with a
//! client certificate ([`ClientTls`]) where the client URLs are `https`.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, cluster_client::ClusterClient,
    maintenance_client::MaintenanceClient, AlarmRequest, AlarmType, DefragmentRequest,
    HashKvRequest, MemberAddRequest, MemberListRequest, MemberPromoteRequest, MemberRemoveRequest,
    MoveLeaderRequest, StatusRequest, StatusResponse,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::debug;

use crate::plan::{ClusterView, HashCheck, MemberView, Version};
use crate::{Error, Result};

/// Membership and maintenance calls on a cluster, addressed by member client URLs.
pub trait ClusterApi: Send + Sync {
    /// Reads the cluster's view through any member in `endpoints`; `None` when none answers
    /// MemberList.
    fn observe<'a>(&'a self, endpoints: &'a [String]) -> BoxFuture<'a, Option<ClusterView>>;
    /// MemberAdd as a learner.
    fn add_learner<'a>(
        &'a self,
        endpoints: &'a [String],
        peer_url: &'a str,
    ) -> BoxFuture<'a, Result<()>>;
    /// MemberPromote.
    fn promote<'a>(&'a self, endpoints: &'a [String], id: u64) -> BoxFuture<'a, Result<()>>;
    /// MemberRemove.
    fn remove<'a>(&'a self, endpoints: &'a [String], id: u64) -> BoxFuture<'a, Result<()>>;
    /// MoveLeader, sent to the leader's client URL.
    fn move_leader<'a>(&'a self, leader: &'a str, to: u64) -> BoxFuture<'a, Result<()>>;
    /// Defragment, sent to one member's client URL; returns once it is done.
    fn defragment<'a>(&'a self, member: &'a str) -> BoxFuture<'a, Result<()>>;
    /// The same API for a cluster whose client URLs are `https`: members verified with
    /// `tls.ca_pem`, `tls.cert_pem` / `tls.key_pem` presented as the client.
    fn with_client_tls(self: Arc<Self>, tls: &ClientTls) -> Arc<dyn ClusterApi>;
}

/// What the operator needs to call a cluster whose client port serves TLS and requires client
/// certificates (`spec.tls.clientSecretName`): PEM from that Secret, as the members mount it
/// (`ca.crt` to verify the members, `tls.crt` / `tls.key` presented as the client).
#[derive(Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA the members' certificates are verified with (`ca.crt`).
    pub ca_pem: Vec<u8>,
    /// The client certificate (`tls.crt`), signed by a CA the members trust.
    pub cert_pem: Vec<u8>,
    /// Its private key (`tls.key`).
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca_pem", &format_args!("{} bytes", self.ca_pem.len()))
            .field("cert_pem", &format_args!("{} bytes", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ClientTls {
    /// From a Secret of type `kubernetes.io/tls` with a `ca.crt` key (the client TLS Secret).
    pub fn from_secret(secret: &Secret) -> Result<Self> {
        let data = secret.data.as_ref();
        let key = |name: &str, missing: &'static str| {
            data.and_then(|d| d.get(name))
                .map(|b| b.0.clone())
                .filter(|b| !b.is_empty())
                .ok_or(Error::MissingObjectKey(missing))
        };
        Ok(ClientTls {
            ca_pem: key("ca.crt", "data[\"ca.crt\"] (client TLS Secret)")?,
            cert_pem: key("tls.crt", "data[\"tls.crt\"] (client TLS Secret)")?,
            key_pem: key("tls.key", "data[\"tls.key\"] (client TLS Secret)")?,
        })
    }

    fn config(&self) -> ClientTlsConfig {
        // The server name checked is the URL's host (the member's stable DNS name), as etcd
        // clients do.
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
    }
}

/// [`ClusterApi`] over gRPC: plain HTTP/2 for `http` URLs; TLS for `https` URLs, which needs
/// [`GrpcClusterApi::with_tls`].
#[derive(Clone, Debug)]
pub struct GrpcClusterApi {
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
}

impl Default for GrpcClusterApi {
    fn default() -> Self {
        GrpcClusterApi {
            timeout: Duration::from_secs(5),
            tls: None,
        }
    }
}

fn api_error(endpoint: &str, e: impl std::fmt::Display) -> Error {
    Error::ClusterApi {
        endpoint: endpoint.to_string(),
        message: e.to_string(),
    }
}

impl GrpcClusterApi {
    /// A client for a cluster whose client URLs are `https`: verifies the members with
    /// `tls.ca_pem` and presents `tls.cert_pem` / `tls.key_pem` (`http` URLs stay plain).
    pub fn with_tls(tls: &ClientTls) -> Self {
        GrpcClusterApi {
            tls: Some(tls.config()),
            ..GrpcClusterApi::default()
        }
    }

    async fn channel(&self, url: &str) -> Result<Channel> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| api_error(url, e))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        if url.starts_with("https://") {
            let Some(tls) = &self.tls else {
                return Err(api_error(
                    url,
                    "https client URL but no client TLS configured (the CA and client \
                     certificate of the cluster's client TLS Secret are needed)",
                ));
            };
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| api_error(url, e))?;
        }
        endpoint.connect().await.map_err(|e| {
            // tonic's own Display is only "transport error": the cause (a certificate
            // rejected, a refused connection) is in the source chain.
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            api_error(url, message)
        })
    }

    /// The first endpoint that connects.
    async fn any_channel(&self, endpoints: &[String]) -> Result<(String, Channel)> {
        let mut last = api_error("(none)", "no endpoints");
        for url in endpoints {
            match self.channel(url).await {
                Ok(channel) => return Ok((url.clone(), channel)),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn observe_inner(&self, endpoints: &[String]) -> Option<ClusterView> {
        let mut list = None;
        for url in endpoints {
            let channel = match self.channel(url).await {
                Ok(channel) => channel,
                Err(error) => {
                    debug!(%error, "member not reachable");
                    continue;
                }
            };
            let request = MemberListRequest { linearizable: true };
            if let Ok(response) = ClusterClient::new(channel).member_list(request).await {
                list = Some(response.into_inner());
                break;
            }
        }
        let list = list?;
        let revision = list.header.as_ref().map_or(0, |h| h.revision);

        let mut members = Vec::new();
        let mut leader = None;
        let mut alarms = Vec::new();
        let mut hashes = Vec::new();
        for m in list.members {
            let mut view = MemberView {
                id: m.id,
                name: m.name.clone(),
                peer_urls: m.peer_ur_ls.clone(),
                is_learner: m.is_learner,
                healthy: false,
                applied_index: 0,
                version: None,
                format_version: None,
                format_migration_pending: false,
                supported_formats: Vec::new(),
                db_size: 0,
                db_size_in_use: 0,
            };
            let Some(url) = m.client_ur_ls.first() else {
                hashes.push(None); // never started: no hash to compare
                members.push(view);
                continue;
            };
            let Ok(channel) = self.channel(url).await else {
                hashes.push(None);
                members.push(view);
                continue;
            };
            let mut maintenance = MaintenanceClient::new(channel);
            if let Ok(status) = maintenance.status(StatusRequest {}).await {
                let status = status.into_inner();
                view.healthy = status.errors.is_empty();
                view.applied_index = status.raft_applied_index;
                view.db_size = status.db_size;
                view.db_size_in_use = status.db_size_in_use;
                if status.leader != 0 && leader.is_none() {
                    leader = Some(status.leader);
                }
                read_metastore_status(&mut view, &status);
            }
            if alarms.is_empty() {
                let request = AlarmRequest {
                    action: AlarmAction::Get as i32,
                    member_id: 0,
                    alarm: AlarmType::None as i32,
                };
                if let Ok(response) = maintenance.alarm(request).await {
                    alarms = response
                        .into_inner()
                        .alarms
                        .iter()
                        .filter_map(|a| AlarmType::try_from(a.alarm).ok())
                        .filter(|a| *a != AlarmType::None)
                        .map(|a| a.as_str_name().to_string())
                        .collect();
                }
            }
            let hash = if m.is_learner {
                None
            } else {
                hash_kv(&mut maintenance, revision).await
            };
            if !m.is_learner {
                hashes.push(hash);
            }
            members.push(view);
        }
        let hash = hash_check(&same_revision(&hashes));
        let leader = leader.filter(|id| members.iter().any(|m| m.id == *id));
        Some(ClusterView {
            members,
            leader,
            alarms,
            hash,
        })
    }
}

/// MetaStore's own Status fields (numbers 1000 and up, which etcd leaves out): the binary's
/// release (`server_version`; etcd's `version` is the etcd API version), the storage format
/// the member writes, whether older records remain, and the formats its binary supports. A
/// server that predates them leaves them empty (`""`, format 0, no formats): the version then
/// comes from the pod image and no migration is started.
pub fn read_metastore_status(view: &mut MemberView, status: &StatusResponse) {
    view.version = Version::parse(&status.server_version);
    view.format_version = (status.storage_format != 0)
        .then(|| i32::try_from(status.storage_format).ok())
        .flatten();
    view.format_migration_pending = status.storage_migration_pending;
    view.supported_formats = status
        .supported_storage_formats
        .iter()
        .filter_map(|f| i32::try_from(*f).ok())
        .collect();
}

/// A member's HashKV at `revision` as `(hash revision, hash)`. When `revision` is the
/// compacted one (nothing was written since a compaction: etcd refuses a hash at the
/// compacted revision itself), the member's hash at its current revision instead, which
/// [`same_revision`] compares only with hashes of that same revision.
async fn hash_kv(
    maintenance: &mut MaintenanceClient<Channel>,
    revision: i64,
) -> Option<(i64, u32)> {
    let answer = match maintenance.hash_kv(HashKvRequest { revision }).await {
        Err(status) if status.message().ends_with(COMPACTED) => {
            maintenance.hash_kv(HashKvRequest { revision: 0 }).await
        }
        answer => answer,
    };
    let answer = answer.ok()?.into_inner();
    Some((answer.hash_revision, answer.hash))
}

/// How etcd's error for a revision at or below the compacted one ends (`etcdserver: mvcc: ...`).
const COMPACTED: &str = "required revision has been compacted";

/// The hashes of the revision most answers were taken at; the others count as unknown.
fn same_revision(hashes: &[Option<(i64, u32)>]) -> Vec<Option<u32>> {
    let mut counts = std::collections::BTreeMap::new();
    for (rev, _) in hashes.iter().flatten() {
        *counts.entry(*rev).or_insert(0) += 1;
    }
    let common = counts
        .into_iter()
        .max_by_key(|(rev, n)| (*n, *rev))
        .map(|(rev, _)| rev);
    hashes
        .iter()
        .map(|h| h.filter(|(rev, _)| Some(*rev) == common).map(|(_, h)| h))
        .collect()
}

/// Agreement of the voters' HashKV answers at one revision.
pub fn hash_check(hashes: &[Option<u32>]) -> HashCheck {
    let mut known = hashes.iter();
    let Some(Some(first)) = known.next() else {
        return HashCheck::Unknown;
    };
    let mut unknown = false;
    for h in known {
        match h {
            Some(h) if h != first => return HashCheck::Disagree,
            Some(_) => {}
            None => unknown = true,
        }
    }
    if unknown {
        HashCheck::Unknown
    } else {
        HashCheck::Agree
    }
}

impl ClusterApi for GrpcClusterApi {
    fn with_client_tls(self: Arc<Self>, tls: &ClientTls) -> Arc<dyn ClusterApi> {
        Arc::new(GrpcClusterApi {
            tls: Some(tls.config()),
            ..(*self).clone()
        })
    }

    fn observe<'a>(&'a self, endpoints: &'a [String]) -> BoxFuture<'a, Option<ClusterView>> {
        Box::pin(self.observe_inner(endpoints))
    }

    fn add_learner<'a>(
        &'a self,
        endpoints: &'a [String],
        peer_url: &'a str,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (url, channel) = self.any_channel(endpoints).await?;
            let request = MemberAddRequest {
                peer_ur_ls: vec![peer_url.to_string()],
                is_learner: true,
            };
            ClusterClient::new(channel)
                .member_add(request)
                .await
                .map_err(|e| api_error(&url, e))?;
            Ok(())
        })
    }

    fn promote<'a>(&'a self, endpoints: &'a [String], id: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (url, channel) = self.any_channel(endpoints).await?;
            ClusterClient::new(channel)
                .member_promote(MemberPromoteRequest { id })
                .await
                .map_err(|e| api_error(&url, e))?;
            Ok(())
        })
    }

    fn remove<'a>(&'a self, endpoints: &'a [String], id: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let (url, channel) = self.any_channel(endpoints).await?;
            ClusterClient::new(channel)
                .member_remove(MemberRemoveRequest { id })
                .await
                .map_err(|e| api_error(&url, e))?;
            Ok(())
        })
    }

    fn move_leader<'a>(&'a self, leader: &'a str, to: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let channel = self.channel(leader).await?;
            MaintenanceClient::new(channel)
                .move_leader(MoveLeaderRequest { target_id: to })
                .await
                .map_err(|e| api_error(leader, e))?;
            Ok(())
        })
    }

    fn defragment<'a>(&'a self, member: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let channel = self.channel(member).await?;
            // Defragmenting a large database takes longer than an ordinary call.
            let mut request = tonic::Request::new(DefragmentRequest {});
            request.set_timeout(DEFRAGMENT_TIMEOUT);
            MaintenanceClient::new(channel)
                .defragment(request)
                .await
                .map_err(|e| api_error(member, e))?;
            Ok(())
        })
    }
}

/// How long one member's defragmentation may take.
const DEFRAGMENT_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    fn blank() -> MemberView {
        MemberView {
            id: 1,
            name: "demo-0".into(),
            peer_urls: vec![],
            is_learner: false,
            healthy: true,
            applied_index: 1,
            version: None,
            format_version: None,
            format_migration_pending: false,
            supported_formats: vec![],
            db_size: 0,
            db_size_in_use: 0,
        }
    }

    #[test]
    fn metastore_status_fields() {
        let mut m = blank();
        let status = StatusResponse {
            version: "3.5.16".into(),
            server_version: "1.3.0".into(),
            storage_format: 2,
            storage_migration_pending: true,
            supported_storage_formats: vec![1, 2],
            ..Default::default()
        };
        read_metastore_status(&mut m, &status);
        assert_eq!(m.version, Version::parse("1.3.0"), "not etcd's version");
        assert_eq!(m.format_version, Some(2));
        assert!(m.format_migration_pending);
        assert_eq!(m.supported_formats, [1, 2]);

        // A server that predates the fields: nothing is made up.
        let mut m = blank();
        read_metastore_status(
            &mut m,
            &StatusResponse {
                version: "3.5.16".into(),
                ..Default::default()
            },
        );
        assert_eq!(m, blank());
    }

    #[test]
    fn hashes_of_other_revisions_are_unknown() {
        let cases = [
            (
                vec![Some((5, 1)), Some((5, 1)), Some((5, 1))],
                vec![Some(1), Some(1), Some(1)],
            ),
            (
                vec![Some((5, 1)), Some((6, 2)), Some((5, 1))],
                vec![Some(1), None, Some(1)],
            ),
            (vec![Some((5, 1)), None], vec![Some(1), None]),
            (vec![None, None], vec![None, None]),
        ];
        for (hashes, want) in cases {
            assert_eq!(same_revision(&hashes), want, "{hashes:?}");
        }
        // Different revisions never make a disagreement.
        assert_eq!(
            hash_check(&same_revision(&[Some((5, 1)), Some((6, 2))])),
            HashCheck::Unknown
        );
    }

    #[test]
    fn hash_agreement() {
        let cases = [
            (vec![Some(1), Some(1), Some(1)], HashCheck::Agree),
            (vec![Some(1), Some(2), Some(1)], HashCheck::Disagree),
            (vec![Some(1), None, Some(1)], HashCheck::Unknown),
            (vec![Some(1), None, Some(2)], HashCheck::Disagree),
            (vec![None, Some(1)], HashCheck::Unknown),
            (vec![], HashCheck::Unknown),
        ];
        for (hashes, want) in cases {
            assert_eq!(hash_check(&hashes), want, "{hashes:?}");
        }
    }
}
