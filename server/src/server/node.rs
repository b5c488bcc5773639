//! [`Node`]: what every service shares: the store, the write pipeline, identity and limits.

use std::sync::Arc;

use metastore_proto::etcdserverpb::{Member, ResponseHeader};

use super::metrics::Metrics;
use super::proposer::Proposer;
use crate::apply::{ApplyError, Command};
use crate::mvcc::Store;

/// The etcd version MetaStore reports (Status.version, /version). kube-apiserver enables
/// consistent reads from its watch cache and WatchList from 3.5.13 on; MetaStore implements
/// what those rely on (see docs/COMPATIBILITY.md).
pub const ETCD_VERSION: &str = "3.5.16";
/// The cluster version reported by /version.
pub const ETCD_CLUSTER_VERSION: &str = "3.5.0";

/// Request limits, all configurable.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_txn_ops: usize,
    /// The backend quota: writes beyond it raise the NOSPACE alarm.
    pub quota_bytes: u64,
}

/// This member as the Cluster API reports it.
#[derive(Debug, Clone)]
pub struct MemberInfo {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

impl MemberInfo {
    pub fn to_proto(&self) -> Member {
        Member {
            id: self.id,
            name: self.name.clone(),
            peer_ur_ls: self.peer_urls.clone(),
            client_ur_ls: self.client_urls.clone(),
            is_learner: false,
        }
    }
}

/// How services reach the [`Node`]: weakly, so that only the [`Server`](super::Server) handle
/// keeps it alive and shutting down releases the store at once, however many connections are
/// still open. A request arriving after shutdown gets etcd's "server stopped".
#[derive(Clone)]
pub struct NodeRef(std::sync::Weak<Node>);

impl NodeRef {
    pub fn new(node: &Arc<Node>) -> Self {
        Self(Arc::downgrade(node))
    }

    pub fn get(&self) -> Result<Arc<Node>, tonic::Status> {
        self.0
            .upgrade()
            .ok_or_else(|| tonic::Status::unavailable(super::status::MSG_STOPPED))
    }
}

pub struct Node {
    pub store: Arc<Store>,
    pub watch: Arc<crate::watch::WatchHub>,
    pub lessor: Arc<crate::lease::Lessor>,
    pub lease_ids: super::lease_service::LeaseIds,
    pub proposer: Proposer,
    pub replica: Arc<crate::raft::replica::Replica>,
    pub member: MemberInfo,
    pub cluster_id: u64,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// The memory Range responses may hold at once (`--max-range-memory-bytes`).
    pub range_budget: super::range_budget::RangeBudget,
    /// Background re-encoding after a storage-format switch, and its progress.
    pub reencoder: Arc<crate::migrate::online::Reencoder>,
    /// Storage formats this binary supports (`--max-storage-format` lowers it), as this
    /// member answers the capability check before a switch.
    pub supported_storage_formats: Vec<u8>,
    /// Users, roles, permissions and tokens; every handler asks it who its caller is.
    pub auth: Arc<crate::auth::AuthStore>,
}

impl Node {
    /// A full response header at `revision`.
    pub fn header(&self, revision: i64) -> ResponseHeader {
        ResponseHeader {
            cluster_id: self.cluster_id,
            member_id: self.member.id,
            revision,
            raft_term: self.replica.term(),
        }
    }

    /// Fills the identity fields of a header the apply step produced (it sets the revision).
    pub fn fill(&self, h: &mut Option<ResponseHeader>) {
        let revision = h
            .as_ref()
            .map_or_else(|| self.store.current_revision(), |h| h.revision);
        *h = Some(self.header(revision));
    }

    /// Refuses a caller without the root role while auth is on (etcd's `IsAdminPermitted`:
    /// membership changes, defragment, hashes, snapshots, leader transfer).
    pub fn require_admin<T>(&self, req: &tonic::Request<T>) -> Result<(), tonic::Status> {
        self.auth
            .request(req)
            .and_then(|a| a.admin())
            .map_err(|e| super::status::auth_status(&e))
    }

    /// Rejects a write request over `--max-request-bytes`.
    pub fn check_size(&self, encoded_len: usize) -> Result<(), ApplyError> {
        if encoded_len > self.limits.max_request_bytes {
            return Err(ApplyError::RequestTooLarge);
        }
        Ok(())
    }

    /// etcd's backend quota: a write of `cost` bytes is refused with "database space exceeded"
    /// while the NOSPACE alarm is raised, and raises it when it would take the backend past
    /// the quota. Reads, deletes and compactions are never refused.
    pub async fn check_quota(&self, cost: usize) -> Result<(), ApplyError> {
        use metastore_proto::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
        if self.store.has_alarm(AlarmType::Nospace as i32) {
            return Err(ApplyError::NoSpace);
        }
        if self.store.engine().size_bytes() + cost as u64 <= self.limits.quota_bytes {
            return Ok(());
        }
        tracing::warn!(
            quota = self.limits.quota_bytes,
            size = self.store.engine().size_bytes(),
            "backend quota exceeded; raising the NOSPACE alarm"
        );
        self.propose(Command::Alarm(AlarmRequest {
            action: AlarmAction::Activate as i32,
            member_id: self.member.id,
            alarm: AlarmType::Nospace as i32,
        }))
        .await?;
        Err(ApplyError::NoSpace)
    }

    /// The raised alarms as etcd prints them in `Status.errors`.
    pub fn alarm_strings(&self) -> Vec<String> {
        use metastore_proto::etcdserverpb::AlarmType;
        self.store
            .alarms()
            .into_iter()
            .map(|(member, alarm)| {
                let name = AlarmType::try_from(alarm).map_or("UNKNOWN", |a| a.as_str_name());
                format!("memberID:{member} alarm:{name} ")
            })
            .collect()
    }

    pub async fn propose(
        &self,
        cmd: Command,
    ) -> Result<crate::apply::command::Applied, ApplyError> {
        let r = self.proposer.propose(cmd).await;
        let reason = match &r {
            Err(ApplyError::NoLeader) => Some("no_leader"),
            Err(ApplyError::Timeout) => Some("timeout"),
            Err(ApplyError::DiskFull(_)) => Some("disk_full"),
            Err(ApplyError::Raft(_)) => Some("raft"),
            Err(ApplyError::Mvcc(crate::mvcc::Error::Closed)) => Some("stopped"),
            _ => None,
        };
        if let Some(reason) = reason {
            self.metrics
                .proposals_failed
                .with_label_values(&[reason])
                .inc();
        }
        r
    }

    /// Waits until a read served now is linearizable (ReadIndex, batched).
    pub async fn linearizable_read(&self) -> Result<(), ApplyError> {
        self.replica.linearizable_read().await
    }

    /// Renews lease `id` on the leader (which alone tracks deadlines); returns the TTL.
    pub async fn renew_lease(&self, id: i64) -> Result<i64, ApplyError> {
        let lessor = self.lessor.clone();
        self.replica
            .lease_keep_alive(id, move |id| lessor.renew(id))
            .await
    }

    /// TimeToLive as the leader answers it (a follower asks the leader).
    pub async fn lease_time_to_live(
        &self,
        req: &metastore_proto::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<metastore_proto::etcdserverpb::LeaseTimeToLiveResponse, ApplyError> {
        if let Some(mut r) = self.replica.lease_time_to_live_remote(*req).await? {
            r.header = Some(self.header(self.store.current_revision()));
            return Ok(r);
        }
        self.lease_time_to_live_local(req)
    }

    /// TimeToLive from this member's lessor (meaningful on the leader).
    pub fn lease_time_to_live_local(
        &self,
        req: &metastore_proto::etcdserverpb::LeaseTimeToLiveRequest,
    ) -> Result<metastore_proto::etcdserverpb::LeaseTimeToLiveResponse, ApplyError> {
        use metastore_proto::etcdserverpb::LeaseTimeToLiveResponse;
        let header = Some(self.header(self.store.current_revision()));
        let Some((granted, remaining)) = self.lessor.time_to_live(req.id) else {
            return Ok(LeaseTimeToLiveResponse {
                header,
                id: req.id,
                ttl: -1,
                ..Default::default()
            });
        };
        let keys = if req.keys {
            self.store
                .lease_keys(req.id)?
                .into_iter()
                .map(Into::into)
                .collect()
        } else {
            Vec::new()
        };
        Ok(LeaseTimeToLiveResponse {
            header,
            id: req.id,
            ttl: remaining,
            granted_ttl: granted,
            keys,
        })
    }

    /// The members, as the Cluster API lists them.
    pub fn members(&self) -> Vec<Member> {
        super::cluster_service::members_of(&self.replica.membership())
    }

    /// Refreshes the store gauges (called at scrape time).
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.db_size.set(self.store.engine().size_bytes() as i64);
        m.db_size_in_use
            .set(self.store.engine().size_in_use_bytes() as i64);
        m.current_revision.set(self.store.current_revision());
        m.compact_revision.set(self.store.compact_revision());
        m.applied_index.set(self.store.applied_index() as i64);
        let r = &self.replica;
        let (last, applied) = r.indexes();
        m.raft_term.set(r.term() as i64);
        m.is_leader.set(i64::from(r.is_leader()));
        m.has_leader.set(i64::from(r.leader_id().is_some()));
        m.raft_committed_index.set(last as i64);
        m.raft_applied_index.set(applied as i64);
        m.proposals_pending.set(self.proposer.pending() as i64);
        let progress = self.reencoder.progress();
        m.storage_format.set(i64::from(self.store.write_format()));
        m.storage_migration_pending.set(i64::from(progress.pending));
        m.storage_migration_visited.set(progress.visited as i64);
        m.storage_migration_rewritten.set(progress.rewritten as i64);
        m.apply_lag.reset();
        for (member, matched) in r.replication() {
            m.apply_lag
                .with_label_values(&[&format!("{member:x}")])
                .set(last.saturating_sub(matched) as i64);
        }
    }
}
