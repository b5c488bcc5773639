//! The reconcile decisions, as pure functions of the spec, the recorded status and the observed
//! state: `plan(cluster, observed) -> Decision`.
//!
//! Nothing here talks to Kubernetes or to the cluster, so every rule is table-tested. The
//! controller observes, calls [`plan`], applies the rendered objects, performs the one
//! [`Action`] and records [`Decision::workflow`] in status.
//!
//! # How a reconcile decides
//! 1. No StatefulSet and never bootstrapped: [`Action::Bootstrap`].
//! 2. The cluster's own view (MemberList, Status, HashKV) comes first: while a new cluster
//!    forms (phase `Bootstrapping`) it waits for a quorum and a leader; after that, no quorum
//!    of healthy voters is [`DegradedReason::QuorumLost`]; no leader waits; diverged HashKV is Degraded.
//! 3. A recorded workflow that failed stays stopped until the spec changes.
//! 4. Otherwise the first piece of work wins, in this order: a member whose pod came back with
//!    an empty volume (`membership::rejoin`), a running migration Job, scaling
//!    (`membership::scale`), a rolling upgrade (`upgrade::upgrade`), a format migration
//!    (`migration::migrate`), scheduled defragmentation (`maintenance::defragment`). If that is the recorded step, on the same member, still
//!    undone past its deadline, the workflow stops with [`DegradedReason::DeadlineExceeded`].
//!
//! Each step is derived again from the observed state on every reconcile; the recorded
//! [`Workflow`] only carries what cannot be observed: when the step started, its deadline and a
//! latched failure. That is what makes every step idempotent and an operator restart resume
//! exactly where it was.

pub mod backup;
mod maintenance;
mod membership;
mod migration;
mod observed;
mod upgrade;
mod version;

#[cfg(test)]
pub(crate) mod fixtures;

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

pub use observed::{
    quorum, ClusterView, HashCheck, JobView, MemberView, Observed, PodView, StatefulSetView,
};
pub use version::{check_change, Version};

use crate::crd::{
    MetaStoreCluster, MetaStoreClusterSpec, MetaStoreClusterStatus, Phase, Workflow, WorkflowKind,
    WorkflowStep,
};
use crate::naming::{image_for_version, version_of_image, ClusterNames};

/// How far (in applied Raft entries) a member may trail the leader and count as caught up.
pub const MAX_CATCH_UP_LAG: u64 = 1000;

/// The one thing the controller does on this reconcile (besides applying the rendered objects).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the objects with `--initial-cluster-state new` and `replicas` pods.
    Bootstrap {
        /// Initial member count.
        replicas: i32,
    },
    /// MemberAdd as a learner.
    AddLearner {
        /// Member (pod) name.
        member: String,
        /// Its peer URL.
        peer_url: String,
    },
    /// MemberPromote.
    PromoteLearner {
        /// Member name.
        member: String,
        /// Member ID.
        id: u64,
    },
    /// MemberRemove.
    RemoveMember {
        /// Member name.
        member: String,
        /// Member ID.
        id: u64,
    },
    /// MoveLeader, sent to the current leader.
    MoveLeader {
        /// The member to hand leadership to.
        to: String,
        /// Its ID.
        to_id: u64,
    },
    /// Delete the member's pod so the StatefulSet (OnDelete) recreates it from the new template.
    DeletePodForUpgrade {
        /// Member (pod) name.
        member: String,
    },
    /// Delete a pod that is stuck starting, so it starts again with the current bootstrap values.
    RestartPod {
        /// Member (pod) name.
        member: String,
    },
    /// Nothing to do until something changes.
    WaitFor(WaitReason),
    /// Set the StatefulSet's replicas.
    ScaleStatefulSet {
        /// New replica count.
        replicas: i32,
    },
    /// Maintenance.Defragment on one member (returns once it is done).
    Defragment {
        /// Member name.
        member: String,
        /// Member ID.
        id: u64,
    },
    /// Create the Job running `metastore-ctl migrate --to N --wait`.
    StartMigrationJob {
        /// Target format.
        to: i32,
    },
    /// Set the Degraded condition (and an Event); a human is needed.
    MarkDegraded(DegradedReason),
    /// Refuse the spec change; set Degraded with the reason and keep what runs.
    RefuseWithCondition(Refusal),
    /// The cluster matches the spec.
    Done,
}

/// Why the plan waits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaitReason {
    /// The first members are starting.
    ClusterForming,
    /// No leader yet (an election is running).
    LeaderElection,
    /// A member is not healthy.
    MemberUnhealthy {
        /// Member name.
        member: String,
    },
    /// A member's pod is being recreated.
    PodRecreating {
        /// Member name.
        member: String,
    },
    /// A member has not become healthy yet.
    MemberStarting {
        /// Member name.
        member: String,
    },
    /// A member trails the leader.
    CatchingUp {
        /// Member name.
        member: String,
        /// Entries behind.
        lag: u64,
    },
    /// Alarms are raised.
    Alarms {
        /// The alarms.
        alarms: Vec<String>,
    },
    /// HashKV has not been compared on every member.
    HashCheckPending,
    /// A learner is still in the cluster.
    LearnerPresent {
        /// Learner name.
        member: String,
    },
    /// The migration Job is running.
    MigrationJob {
        /// Target format.
        to: i32,
    },
    /// A member still re-encodes records of an older format (after a switch whose Job is
    /// gone): the next format waits for it.
    Reencoding {
        /// Member name.
        member: String,
    },
}

/// Why the cluster is Degraded.
///
/// Quorum loss recovery (see `operator/README.md`): bring the missing members' pods back if
/// their volumes survive; otherwise restore from a snapshot into a new cluster (`etcdctl
/// snapshot save`, then `metastore snapshot restore`) and point clients at it. The operator
/// never forces a new cluster out of a minority on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DegradedReason {
    /// Fewer than a majority of voters are healthy: the cluster cannot commit writes.
    QuorumLost {
        /// Healthy voters.
        healthy: usize,
        /// All voters.
        voters: usize,
    },
    /// The cluster was bootstrapped but no member answers.
    ClusterUnreachable,
    /// HashKV differs between members.
    DataInconsistent,
    /// A workflow step overran its deadline.
    DeadlineExceeded {
        /// Workflow kind.
        kind: WorkflowKind,
        /// Step.
        step: WorkflowStep,
        /// Member in hand.
        member: Option<String>,
    },
    /// A member failed during a workflow (crash loop on the new version).
    MemberFailed {
        /// Member name.
        member: String,
    },
    /// The migration Job failed.
    MigrationFailed {
        /// Target format.
        to: i32,
    },
    /// A workflow stopped earlier and waits for a spec change.
    WorkflowStopped {
        /// The recorded failure.
        failure: String,
    },
}

/// Why a spec change is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Neither `version` nor `image` is set.
    NoVersion,
    /// The target version cannot be read from `version` or the image tag.
    VersionUnknown {
        /// The image.
        image: String,
    },
    /// More than one minor version at a time.
    VersionSkip {
        /// Running version.
        from: String,
        /// Target version.
        to: String,
    },
    /// A major version change.
    MajorVersionChange {
        /// Running version.
        from: String,
        /// Target version.
        to: String,
    },
    /// A downgrade below the version the on-disk format moved at.
    DowngradeAfterFormatChange {
        /// Target version.
        to: String,
        /// Version that was running when the format moved.
        since: String,
    },
    /// Removing the member would leave fewer healthy voters than a quorum.
    WouldLoseQuorum {
        /// Member that would be removed.
        member: String,
    },
    /// A member's binary does not support the target format.
    FormatUnsupported {
        /// Member name.
        member: String,
        /// Target format.
        to: i32,
    },
}

/// The value of `--initial-cluster-state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitialClusterState {
    /// The members bootstrap a new cluster together.
    New,
    /// A member with an empty data directory joins the running cluster.
    Existing,
}

impl InitialClusterState {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            InitialClusterState::New => "new",
            InitialClusterState::Existing => "existing",
        }
    }
}

/// What one reconcile decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The action to take.
    pub action: Action,
    /// The workflow record to write to status (`None` clears it).
    pub workflow: Option<Workflow>,
    /// The image the StatefulSet's pod template carries (the running one while a version
    /// change is refused).
    pub image: String,
    /// `--initial-cluster-state` for pods that start with an empty data directory.
    pub initial_cluster_state: InitialClusterState,
    /// Ordinals listed in `--initial-cluster`.
    pub initial_members: Vec<i32>,
}

impl Decision {
    /// The phase this decision shows.
    pub fn phase(&self) -> Phase {
        match &self.action {
            Action::MarkDegraded(DegradedReason::QuorumLost { .. }) => return Phase::QuorumLost,
            Action::MarkDegraded(_) | Action::RefuseWithCondition(_) => return Phase::Degraded,
            Action::Bootstrap { .. } | Action::WaitFor(WaitReason::ClusterForming) => {
                return Phase::Bootstrapping
            }
            _ => {}
        }
        match self.workflow.as_ref().map(|w| w.kind) {
            Some(WorkflowKind::ScaleUp | WorkflowKind::ScaleDown) => Phase::Scaling,
            Some(WorkflowKind::Upgrade) => Phase::Upgrading,
            Some(WorkflowKind::Migration) => Phase::Migrating,
            Some(WorkflowKind::Rejoin) => Phase::Repairing,
            Some(WorkflowKind::Maintenance) => Phase::Maintenance,
            None => Phase::Running,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Bootstrap { replicas } => write!(f, "bootstrapping {replicas} members"),
            Action::AddLearner { member, .. } => write!(f, "adding {member} as a learner"),
            Action::PromoteLearner { member, .. } => write!(f, "promoting learner {member}"),
            Action::RemoveMember { member, .. } => write!(f, "removing member {member}"),
            Action::MoveLeader { to, .. } => write!(f, "moving leadership to {to}"),
            Action::DeletePodForUpgrade { member } => write!(f, "replacing the pod of {member}"),
            Action::RestartPod { member } => write!(f, "restarting the pod of {member}"),
            Action::WaitFor(reason) => write!(f, "{reason}"),
            Action::ScaleStatefulSet { replicas } => {
                write!(f, "setting the StatefulSet to {replicas} replicas")
            }
            Action::StartMigrationJob { to } => write!(f, "starting the migration to format {to}"),
            Action::Defragment { member, .. } => write!(f, "defragmenting {member}"),
            Action::MarkDegraded(reason) => write!(f, "{reason}"),
            Action::RefuseWithCondition(refusal) => write!(f, "{refusal}"),
            Action::Done => write!(f, "the cluster matches the spec"),
        }
    }
}

impl fmt::Display for WaitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitReason::ClusterForming => {
                write!(f, "waiting for the first members to form the cluster")
            }
            WaitReason::LeaderElection => write!(f, "waiting for a leader to be elected"),
            WaitReason::MemberUnhealthy { member } => write!(f, "member {member} is not healthy"),
            WaitReason::PodRecreating { member } => write!(f, "pod {member} is being recreated"),
            WaitReason::MemberStarting { member } => {
                write!(f, "waiting for member {member} to become healthy")
            }
            WaitReason::CatchingUp { member, lag } => {
                write!(f, "member {member} is {lag} entries behind the leader")
            }
            WaitReason::Alarms { alarms } => write!(f, "alarms raised: {}", alarms.join(", ")),
            WaitReason::HashCheckPending => write!(f, "HashKV not yet compared on every member"),
            WaitReason::LearnerPresent { member } => {
                write!(f, "learner {member} is still catching up")
            }
            WaitReason::MigrationJob { to } => write!(f, "migration Job to format {to} is running"),
            WaitReason::Reencoding { member } => {
                write!(
                    f,
                    "member {member} is still re-encoding records of an older format"
                )
            }
        }
    }
}

impl fmt::Display for DegradedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DegradedReason::QuorumLost { healthy, voters } => write!(
                f,
                "quorum lost: {healthy} of {voters} voting members healthy, {} needed; see the operator README, \"Quorum loss\"",
                quorum(*voters)
            ),
            DegradedReason::ClusterUnreachable => write!(f, "no member answers on its client URL"),
            DegradedReason::DataInconsistent => write!(f, "HashKV differs between members"),
            DegradedReason::DeadlineExceeded { kind, step, member } => {
                write!(f, "{kind:?} step {step:?}")?;
                if let Some(member) = member {
                    write!(f, " on {member}")?;
                }
                write!(f, " overran its deadline; the workflow stopped, edit the spec to re-plan")
            }
            DegradedReason::MemberFailed { member } => {
                write!(f, "member {member} keeps crashing; the workflow stopped, edit the spec to re-plan")
            }
            DegradedReason::MigrationFailed { to } => write!(f, "migration Job to format {to} failed"),
            DegradedReason::WorkflowStopped { failure } => write!(f, "{failure}"),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoVersion => write!(f, "set spec.version or spec.image"),
            Refusal::VersionUnknown { image } => {
                write!(
                    f,
                    "cannot read a version from image {image}; set spec.version"
                )
            }
            Refusal::VersionSkip { from, to } => {
                write!(
                    f,
                    "{from} -> {to} moves more than one minor version; go one minor at a time"
                )
            }
            Refusal::MajorVersionChange { from, to } => {
                write!(f, "{from} -> {to} changes the major version")
            }
            Refusal::DowngradeAfterFormatChange { to, since } => write!(
                f,
                "cannot go back to {to}: the on-disk format moved while {since} was running"
            ),
            Refusal::WouldLoseQuorum { member } => {
                write!(
                    f,
                    "removing {member} now would leave no quorum of healthy voters"
                )
            }
            Refusal::FormatUnsupported { member, to } => {
                write!(
                    f,
                    "member {member} runs a binary that does not support storage format {to}; \
                     upgrade it first (the migration starts once every member supports it)"
                )
            }
        }
    }
}

impl DegradedReason {
    /// The condition reason (one CamelCase word).
    pub fn reason(&self) -> &'static str {
        match self {
            DegradedReason::QuorumLost { .. } => "QuorumLost",
            DegradedReason::ClusterUnreachable => "ClusterUnreachable",
            DegradedReason::DataInconsistent => "DataInconsistent",
            DegradedReason::DeadlineExceeded { .. } => "DeadlineExceeded",
            DegradedReason::MemberFailed { .. } => "MemberFailed",
            DegradedReason::MigrationFailed { .. } => "MigrationFailed",
            DegradedReason::WorkflowStopped { .. } => "WorkflowStopped",
        }
    }
}

impl Refusal {
    /// The condition reason (one CamelCase word).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NoVersion => "NoVersion",
            Refusal::VersionUnknown { .. } => "VersionUnknown",
            Refusal::VersionSkip { .. } => "VersionSkip",
            Refusal::MajorVersionChange { .. } => "MajorVersionChange",
            Refusal::DowngradeAfterFormatChange { .. } => "DowngradeAfterFormatChange",
            Refusal::WouldLoseQuorum { .. } => "WouldLoseQuorum",
            Refusal::FormatUnsupported { .. } => "FormatUnsupported",
        }
    }
}

/// One step of a workflow, as the sub-planners return it.
#[derive(Clone, Debug, PartialEq)]
struct Step {
    kind: WorkflowKind,
    step: WorkflowStep,
    target: String,
    from: Option<String>,
    member: Option<String>,
    action: Action,
    failure: Option<String>,
}

impl Step {
    fn new(
        kind: WorkflowKind,
        step: WorkflowStep,
        target: impl Into<String>,
        action: Action,
    ) -> Self {
        Step {
            kind,
            step,
            target: target.into(),
            from: None,
            member: None,
            action,
            failure: None,
        }
    }

    fn member(mut self, member: impl Into<String>) -> Self {
        self.member = Some(member.into());
        self
    }

    fn from(mut self, from: Option<String>) -> Self {
        self.from = from;
        self
    }

    /// The workflow stops here: Degraded now, and latched until the spec changes.
    fn fail(mut self, reason: DegradedReason) -> Self {
        self.failure = Some(reason.to_string());
        self.action = Action::MarkDegraded(reason);
        self
    }
}

/// What a sub-planner found to do.
#[derive(Clone, Debug, PartialEq)]
enum Next {
    Step(Step),
    Refuse(Refusal),
}

/// Decides the next action for `cluster` given what was observed.
pub fn plan(cluster: &MetaStoreCluster, observed: &Observed) -> Decision {
    Ctx::new(cluster, observed).plan()
}

/// Everything one planning pass reads.
struct Ctx<'a> {
    names: ClusterNames,
    spec: &'a MetaStoreClusterSpec,
    status: Option<&'a MetaStoreClusterStatus>,
    generation: i64,
    observed: &'a Observed,
    desired_image: Option<String>,
    target_version: Option<Version>,
    /// Whether moving to the target version is allowed (checked once, used by every planner).
    version_check: Result<(), Refusal>,
}

impl<'a> Ctx<'a> {
    fn new(cluster: &'a MetaStoreCluster, observed: &'a Observed) -> Self {
        let spec = &cluster.spec;
        let tls = spec.tls.as_ref();
        let names = ClusterNames::new(
            &cluster.name_any(),
            cluster.namespace().as_deref().unwrap_or("default"),
            tls.is_some_and(|t| t.client_secret_name.is_some()),
            tls.is_some_and(|t| t.peer_secret_name.is_some()),
        );
        let desired_image = spec
            .image
            .clone()
            .or_else(|| spec.version.as_deref().map(image_for_version));
        let target_version = spec
            .version
            .as_deref()
            .and_then(Version::parse)
            .or_else(|| {
                spec.image
                    .as_deref()
                    .and_then(version_of_image)
                    .and_then(|v| Version::parse(&v))
            });
        let status = cluster.status.as_ref();
        let mut ctx = Ctx {
            names,
            spec,
            status,
            generation: cluster.metadata.generation.unwrap_or(0),
            observed,
            desired_image,
            target_version,
            version_check: Ok(()),
        };
        ctx.version_check = ctx.check_version();
        ctx
    }

    fn check_version(&self) -> Result<(), Refusal> {
        let running = self
            .observed
            .cluster
            .as_ref()
            .and_then(ClusterView::version_range)
            .or_else(|| {
                let v = Version::parse(self.status?.current_version.as_deref()?)?;
                Some((v.clone(), v))
            });
        let Some((lowest, highest)) = running else {
            return Ok(()); // nothing runs yet: any version may bootstrap
        };
        let Some(target) = &self.target_version else {
            return Err(Refusal::VersionUnknown {
                image: self.desired_image.clone().unwrap_or_default(),
            });
        };
        let since = self
            .status
            .and_then(|s| s.format_version_since.as_deref())
            .and_then(Version::parse);
        check_change(&lowest, &highest, target, since.as_ref())
    }

    fn bootstrapped(&self) -> bool {
        self.status
            .is_some_and(|s| !s.members.is_empty() || s.current_version.is_some())
    }

    /// The image for the pod template: the target, unless the version change is refused.
    fn template_image(&self, desired: &str) -> String {
        match (&self.version_check, &self.observed.statefulset) {
            (Err(_), Some(sts)) => sts.image.clone(),
            _ => desired.to_string(),
        }
    }

    /// The recorded workflow, unless it failed under an older spec (an edit re-plans).
    fn recorded(&self) -> Option<&'a Workflow> {
        self.status
            .and_then(|s| s.workflow.as_ref())
            .filter(|w| w.generation == self.generation)
    }

    fn plan(&self) -> Decision {
        let Some(desired) = self.desired_image.clone() else {
            return self.decide(
                Action::RefuseWithCondition(Refusal::NoVersion),
                None,
                String::new(),
            );
        };
        let image = self.template_image(&desired);
        let keep = self.recorded().cloned();

        if self.observed.statefulset.is_none() && !self.bootstrapped() {
            let replicas = self.spec.replicas;
            return self.decide(Action::Bootstrap { replicas }, None, image);
        }
        // Members of a new cluster start at different times: until it first forms (a quorum
        // and a leader), what looks like quorum loss is the cluster forming.
        let forming = self.status.and_then(|s| s.phase) == Some(Phase::Bootstrapping);
        let Some(view) = &self.observed.cluster else {
            let action = if self.bootstrapped() && !forming {
                Action::MarkDegraded(DegradedReason::ClusterUnreachable)
            } else {
                Action::WaitFor(WaitReason::ClusterForming)
            };
            return self.decide(action, keep, image);
        };

        let (healthy, voters) = (view.healthy_voter_count(), view.voter_count());
        if forming && (healthy < quorum(voters) || view.leader_member().is_none()) {
            return self.decide(Action::WaitFor(WaitReason::ClusterForming), keep, image);
        }
        if healthy < quorum(voters) {
            let action = Action::MarkDegraded(DegradedReason::QuorumLost { healthy, voters });
            return self.decide(action, keep, image);
        }
        if view.leader_member().is_none() {
            return self.decide(Action::WaitFor(WaitReason::LeaderElection), keep, image);
        }
        if view.hash == HashCheck::Disagree {
            let action = Action::MarkDegraded(DegradedReason::DataInconsistent);
            return self.decide(action, keep, image);
        }

        if let Some(failure) = self.recorded().and_then(|w| w.failure.as_ref()) {
            let action = Action::MarkDegraded(DegradedReason::WorkflowStopped {
                failure: failure.clone(),
            });
            return self.decide(action, keep, image);
        }

        let planners: [fn(&Ctx<'_>, &ClusterView) -> Option<Next>; 6] = [
            membership::rejoin,
            migration::running_job,
            membership::scale,
            upgrade::upgrade,
            migration::migrate,
            maintenance::defragment,
        ];
        for planner in planners {
            match planner(self, view) {
                Some(Next::Step(step)) => {
                    if let Some(wf) = self.overran(&step) {
                        // The same step on the same member is still not done past its
                        // deadline (a step that moved on while the operator was down is not).
                        let reason = DegradedReason::DeadlineExceeded {
                            kind: wf.kind,
                            step: wf.step,
                            member: wf.member.clone(),
                        };
                        let mut stopped = wf.clone();
                        stopped.failure = Some(reason.to_string());
                        return self.decide(Action::MarkDegraded(reason), Some(stopped), image);
                    }
                    let record = self.record(&step);
                    return self.decide(step.action, Some(record), image);
                }
                Some(Next::Refuse(refusal)) => {
                    return self.decide(Action::RefuseWithCondition(refusal), None, image);
                }
                None => {}
            }
        }

        if let Some(m) = view.members.iter().find(|m| !m.healthy) {
            // A member whose pod is merely gone is not a scale-in: wait for it to come back.
            let member = self.member_name(m);
            return self.decide(
                Action::WaitFor(WaitReason::MemberUnhealthy { member }),
                None,
                image,
            );
        }
        self.decide(Action::Done, None, image)
    }

    fn decide(&self, action: Action, workflow: Option<Workflow>, image: String) -> Decision {
        let (initial_cluster_state, initial_members) = self.initial_cluster();
        Decision {
            action,
            workflow,
            image,
            initial_cluster_state,
            initial_members,
        }
    }

    /// `--initial-cluster` and its state: all pods together while bootstrapping, the current
    /// members (learners included) once the cluster exists.
    fn initial_cluster(&self) -> (InitialClusterState, Vec<i32>) {
        let mut ordinals: Vec<i32> = match &self.observed.cluster {
            Some(view) => view
                .members
                .iter()
                .filter_map(|m| m.ordinal(&self.names))
                .collect(),
            None if self.bootstrapped() => self
                .status
                .map(|s| {
                    s.members
                        .iter()
                        .filter_map(|m| self.names.ordinal_of(&m.name))
                        .collect()
                })
                .unwrap_or_default(),
            None => {
                let replicas = self
                    .observed
                    .statefulset
                    .as_ref()
                    .map_or(self.spec.replicas, |s| s.replicas);
                return (InitialClusterState::New, (0..replicas).collect());
            }
        };
        ordinals.sort_unstable();
        ordinals.dedup();
        (InitialClusterState::Existing, ordinals)
    }

    /// The recorded workflow, if `step` repeats its step past the deadline.
    fn overran(&self, step: &Step) -> Option<&'a Workflow> {
        self.recorded().filter(|w| {
            w.kind == step.kind
                && w.step == step.step
                && w.member == step.member
                && w.target == step.target
                && self.observed.now > w.deadline.0
        })
    }

    /// The workflow record for `step`, keeping start times and the deadline while the same
    /// step on the same member continues.
    fn record(&self, step: &Step) -> Workflow {
        let now = self.observed.now;
        let prev = self
            .recorded()
            .filter(|w| w.kind == step.kind && w.target == step.target);
        let same_step = prev.filter(|w| w.step == step.step && w.member == step.member);
        let timeout = SignedDuration::from_secs(self.spec.step_timeout_seconds());
        let deadline = now.checked_add(timeout).unwrap_or(Timestamp::MAX);
        Workflow {
            kind: step.kind,
            step: step.step,
            target: step.target.clone(),
            from: prev
                .and_then(|w| w.from.clone())
                .or_else(|| step.from.clone()),
            member: step.member.clone(),
            started_at: prev.map_or(Time(now), |w| w.started_at.clone()),
            step_started_at: same_step.map_or(Time(now), |w| w.step_started_at.clone()),
            deadline: same_step.map_or(Time(deadline), |w| w.deadline.clone()),
            generation: self.generation,
            failure: step.failure.clone(),
        }
    }

    fn member_name(&self, m: &MemberView) -> String {
        match m.ordinal(&self.names) {
            Some(ordinal) if m.name.is_empty() => self.names.pod_name(ordinal),
            _ if m.name.is_empty() => format!("{:x}", m.id),
            _ => m.name.clone(),
        }
    }
}

/// The gate before touching a member in an upgrade or starting a migration: every member
/// healthy, a leader, no alarms, HashKV agreeing, no learner in flight.
fn health_gate(ctx: &Ctx<'_>, view: &ClusterView) -> Result<(), WaitReason> {
    if let Some(m) = view.members.iter().find(|m| !m.healthy) {
        return Err(WaitReason::MemberUnhealthy {
            member: ctx.member_name(m),
        });
    }
    if view.leader_member().is_none() {
        return Err(WaitReason::LeaderElection);
    }
    if !view.alarms.is_empty() {
        return Err(WaitReason::Alarms {
            alarms: view.alarms.clone(),
        });
    }
    if view.hash != HashCheck::Agree {
        return Err(WaitReason::HashCheckPending);
    }
    if let Some(m) = view.learners().next() {
        return Err(WaitReason::LearnerPresent {
            member: ctx.member_name(m),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn bootstrap_and_cluster_health() {
        // (case, fixture, expected action)
        let cases: Vec<(&str, Fixture, Action)> = vec![
            (
                "nothing exists: bootstrap",
                Fixture::new(3, "1.2.0").nothing_exists(),
                Action::Bootstrap { replicas: 3 },
            ),
            (
                "pods starting, no cluster answer yet",
                Fixture::new(3, "1.2.0").never_formed().cluster_down(),
                Action::WaitFor(WaitReason::ClusterForming),
            ),
            (
                "bootstrapping, the first member answers before the others: still forming",
                Fixture::new(3, "1.2.0")
                    .still_bootstrapping()
                    .unhealthy(1)
                    .unhealthy(2)
                    .no_leader(),
                Action::WaitFor(WaitReason::ClusterForming),
            ),
            (
                "bootstrapping, no member answers yet",
                Fixture::new(3, "1.2.0")
                    .still_bootstrapping()
                    .cluster_down(),
                Action::WaitFor(WaitReason::ClusterForming),
            ),
            (
                "formed once: the same view is quorum loss",
                Fixture::new(3, "1.2.0")
                    .unhealthy(1)
                    .unhealthy(2)
                    .no_leader(),
                Action::MarkDegraded(DegradedReason::QuorumLost {
                    healthy: 1,
                    voters: 3,
                }),
            ),
            (
                "bootstrapped cluster stops answering",
                Fixture::new(3, "1.2.0").cluster_down(),
                Action::MarkDegraded(DegradedReason::ClusterUnreachable),
            ),
            ("healthy: done", Fixture::new(3, "1.2.0"), Action::Done),
            (
                "single member: done",
                Fixture::new(1, "1.2.0"),
                Action::Done,
            ),
            (
                "two of three down: quorum lost",
                Fixture::new(3, "1.2.0")
                    .unhealthy(1)
                    .unhealthy(2)
                    .no_leader(),
                Action::MarkDegraded(DegradedReason::QuorumLost {
                    healthy: 1,
                    voters: 3,
                }),
            ),
            (
                "three of five down: quorum lost even with a stale leader",
                Fixture::new(5, "1.2.0")
                    .unhealthy(2)
                    .unhealthy(3)
                    .unhealthy(4),
                Action::MarkDegraded(DegradedReason::QuorumLost {
                    healthy: 2,
                    voters: 5,
                }),
            ),
            (
                "one of three down: wait, no removal",
                Fixture::new(3, "1.2.0").unhealthy(2).no_pod(2),
                Action::WaitFor(WaitReason::MemberUnhealthy {
                    member: "demo-2".into(),
                }),
            ),
            (
                "election in progress",
                Fixture::new(3, "1.2.0").no_leader(),
                Action::WaitFor(WaitReason::LeaderElection),
            ),
            (
                "hashes diverged",
                Fixture::new(3, "1.2.0").hash(HashCheck::Disagree),
                Action::MarkDegraded(DegradedReason::DataInconsistent),
            ),
        ];
        for (case, fixture, want) in cases {
            assert_eq!(fixture.plan().action, want, "{case}");
        }
    }

    #[test]
    fn bootstrap_flags() {
        let d = Fixture::new(3, "1.2.0").nothing_exists().plan();
        assert_eq!(d.initial_cluster_state, InitialClusterState::New);
        assert_eq!(d.initial_members, vec![0, 1, 2]);
        assert_eq!(d.image, "ghcr.io/metastore/metastore:v1.2.0");
        assert_eq!(d.phase(), Phase::Bootstrapping);

        let d = Fixture::new(3, "1.2.0").plan();
        assert_eq!(d.initial_cluster_state, InitialClusterState::Existing);
        assert_eq!(d.initial_members, vec![0, 1, 2]);
        assert_eq!(d.phase(), Phase::Running);
        assert_eq!(d.workflow, None);
    }

    #[test]
    fn quorum_loss_shows_in_phase_and_message() {
        let d = Fixture::new(3, "1.2.0").unhealthy(0).unhealthy(1).plan();
        assert_eq!(d.phase(), Phase::QuorumLost);
        let Action::MarkDegraded(reason) = d.action else {
            panic!("expected MarkDegraded, got {:?}", d.action);
        };
        assert_eq!(reason.reason(), "QuorumLost");
        assert!(reason.to_string().contains("1 of 3"), "{reason}");
    }

    #[test]
    fn no_version_is_refused() {
        let mut f = Fixture::new(3, "1.2.0");
        f.cluster.spec.version = None;
        assert_eq!(
            f.plan().action,
            Action::RefuseWithCondition(Refusal::NoVersion)
        );
    }
}
