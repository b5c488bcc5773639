//! What the operator observed on one reconcile: the cluster as its own etcd API reports it
//! (MemberList, Status of each member, Alarm list, HashKV) and the Kubernetes objects
//! (StatefulSet, pods, migration Job).
//!
//! These are plain values so that the plan can be tested without a cluster; the controller
//! fills them in.

use k8s_openapi::jiff::Timestamp;

use super::Version;
use crate::naming::ClusterNames;

/// Everything the plan looks at besides the spec and the recorded status.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// The time of this reconcile (deadlines compare against it).
    pub now: Timestamp,
    /// The cluster as its etcd API reports it; `None` when no member answered MemberList.
    pub cluster: Option<ClusterView>,
    /// The StatefulSet, if it exists.
    pub statefulset: Option<StatefulSetView>,
    /// The member pods that exist.
    pub pods: Vec<PodView>,
    /// The migration Job, if one exists.
    pub migration_job: Option<JobView>,
}

/// Whether HashKV agreed on every member at one revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashCheck {
    /// Every member returned the same hash.
    Agree,
    /// Two members disagree: their data has diverged.
    Disagree,
    /// Not every member could be asked.
    Unknown,
}

/// The cluster as its etcd API reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterView {
    /// MemberList, joined with each member's Status.
    pub members: Vec<MemberView>,
    /// The leader's member ID, if there is a leader.
    pub leader: Option<u64>,
    /// Raised alarms (`NOSPACE`, `CORRUPT`).
    pub alarms: Vec<String>,
    /// HashKV agreement.
    pub hash: HashCheck,
}

/// One member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberView {
    /// Member ID.
    pub id: u64,
    /// Member name; empty for a member added but never started.
    pub name: String,
    /// Peer URLs.
    pub peer_urls: Vec<String>,
    /// Whether the member is a non-voting learner.
    pub is_learner: bool,
    /// Whether the member answered Status without errors.
    pub healthy: bool,
    /// Its applied Raft index.
    pub applied_index: u64,
    /// The MetaStore version its binary reports (Status `server_version`); the controller
    /// falls back to its pod's image tag when the server does not report one.
    pub version: Option<Version>,
    /// The storage format it writes (Status `storage_format`); `None` when not reported.
    pub format_version: Option<i32>,
    /// Whether records in an older format remain on it (Status `storage_migration_pending`:
    /// the background re-encoding after a switch is not done).
    pub format_migration_pending: bool,
    /// The storage formats its binary supports (Status `supported_storage_formats`); empty
    /// when not reported, which supports no migration.
    pub supported_formats: Vec<i32>,
    /// Its database size on disk (Status `dbSize`), 0 when not reported.
    pub db_size: i64,
    /// The live part of it (Status `dbSizeInUse`); the rest is reclaimable by defragmenting.
    pub db_size_in_use: i64,
}

/// The StatefulSet.
#[derive(Clone, Debug, PartialEq)]
pub struct StatefulSetView {
    /// `spec.replicas`.
    pub replicas: i32,
    /// Image of the `metastore` container in the pod template.
    pub image: String,
}

/// One member pod.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    /// Pod name (`<cluster>-<ordinal>`).
    pub name: String,
    /// The pod's Ready condition.
    pub ready: bool,
    /// Image of its `metastore` container.
    pub image: String,
    /// Whether the pod was created from the StatefulSet's current template revision.
    pub up_to_date: bool,
    /// Whether the pod has a deletion timestamp.
    pub terminating: bool,
    /// Whether its container keeps crashing (CrashLoopBackOff or repeated errors).
    pub crash_looping: bool,
    /// Whether its volume holds no data of the member registered under this name (a new PVC,
    /// or any restart with the memory engine).
    pub empty_volume: bool,
}

/// The migration Job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobView {
    /// The format it migrates to.
    pub target_format: i32,
    /// Whether it completed.
    pub succeeded: bool,
    /// Whether it failed for good (backoff limit reached).
    pub failed: bool,
}

impl ClusterView {
    /// The member with this ID.
    pub fn member(&self, id: u64) -> Option<&MemberView> {
        self.members.iter().find(|m| m.id == id)
    }

    /// The leader.
    pub fn leader_member(&self) -> Option<&MemberView> {
        self.leader.and_then(|id| self.member(id))
    }

    /// Voting members.
    pub fn voters(&self) -> impl Iterator<Item = &MemberView> {
        self.members.iter().filter(|m| !m.is_learner)
    }

    /// Number of voting members.
    pub fn voter_count(&self) -> usize {
        self.voters().count()
    }

    /// Number of healthy voting members.
    pub fn healthy_voter_count(&self) -> usize {
        self.voters().filter(|m| m.healthy).count()
    }

    /// Learners.
    pub fn learners(&self) -> impl Iterator<Item = &MemberView> {
        self.members.iter().filter(|m| m.is_learner)
    }

    /// How far `member` is behind the leader's applied index (0 when there is no leader).
    pub fn lag(&self, member: &MemberView) -> u64 {
        self.leader_member()
            .map(|l| l.applied_index.saturating_sub(member.applied_index))
            .unwrap_or(0)
    }

    /// The lowest and highest versions the members report, if any does.
    pub fn version_range(&self) -> Option<(Version, Version)> {
        let mut versions = self.members.iter().filter_map(|m| m.version.clone());
        let first = versions.next()?;
        Some(versions.fold((first.clone(), first), |(lo, hi), v| {
            (lo.min(v.clone()), hi.max(v))
        }))
    }

    /// The storage format the cluster writes: the lowest any member reports.
    pub fn format_version(&self) -> Option<i32> {
        self.members.iter().filter_map(|m| m.format_version).min()
    }

    /// The format every record of the cluster is in: [`Self::format_version`] once no member
    /// has records in an older format left (`None` while one re-encodes, or when no member
    /// reports a format).
    ///
    /// Worked example: at format 1 every member reports (1, not pending): settled at 1. The
    /// switch to 2 applies: (2, pending) on each, settled `None`; each member finishes its
    /// re-encoding on its own; once the last reports (2, not pending), settled at 2.
    pub fn settled_format_version(&self) -> Option<i32> {
        if self.members.iter().any(|m| m.format_migration_pending) {
            return None;
        }
        self.format_version()
    }

    /// A member still re-encoding records of an older format.
    pub fn reencoding_member(&self) -> Option<&MemberView> {
        self.members.iter().find(|m| m.format_migration_pending)
    }
}

impl MemberView {
    /// The ordinal of this member's pod: from its name, or from its peer URL when it has not
    /// started yet (MemberAdd registers only the URL).
    pub fn ordinal(&self, names: &ClusterNames) -> Option<i32> {
        names.ordinal_of(&self.name).or_else(|| {
            self.peer_urls
                .iter()
                .find_map(|u| names.ordinal_of_peer_url(u))
        })
    }
}

impl Observed {
    /// The pod of an ordinal.
    pub fn pod(&self, names: &ClusterNames, ordinal: i32) -> Option<&PodView> {
        let name = names.pod_name(ordinal);
        self.pods.iter().find(|p| p.name == name)
    }
}

/// Votes needed for a majority of `voters`.
pub fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_sizes() {
        assert_eq!([1, 2, 3, 4, 5, 7].map(quorum), [1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn unstarted_member_maps_by_peer_url() {
        let names = ClusterNames::new("demo", "db", false, false);
        let m = MemberView {
            id: 9,
            name: String::new(),
            peer_urls: vec![names.peer_url(3)],
            is_learner: true,
            healthy: false,
            applied_index: 0,
            version: None,
            format_version: None,
            format_migration_pending: false,
            supported_formats: vec![],
            db_size: 0,
            db_size_in_use: 0,
        };
        assert_eq!(m.ordinal(&names), Some(3));
    }

    #[test]
    fn settled_format_waits_for_every_member_to_finish() {
        let member = |id, format, pending| MemberView {
            id,
            name: format!("demo-{id}"),
            peer_urls: vec![],
            is_learner: false,
            healthy: true,
            applied_index: 1,
            version: None,
            format_version: format,
            format_migration_pending: pending,
            supported_formats: vec![1, 2],
            db_size: 0,
            db_size_in_use: 0,
        };
        let view = |members| ClusterView {
            members,
            leader: Some(0),
            alarms: vec![],
            hash: HashCheck::Agree,
        };
        let at_1 = view(vec![member(0, Some(1), false), member(1, Some(1), false)]);
        assert_eq!(
            (at_1.format_version(), at_1.settled_format_version()),
            (Some(1), Some(1))
        );
        let switched = view(vec![member(0, Some(2), false), member(1, Some(2), true)]);
        assert_eq!(switched.format_version(), Some(2));
        assert_eq!(switched.settled_format_version(), None);
        assert_eq!(switched.reencoding_member().map(|m| m.id), Some(1));
        let done = view(vec![member(0, Some(2), false), member(1, Some(2), false)]);
        assert_eq!(done.settled_format_version(), Some(2));
        let unreported = view(vec![member(0, None, false)]);
        assert_eq!(unreported.settled_format_version(), None);
    }
}
