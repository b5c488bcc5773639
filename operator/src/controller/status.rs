//! The status written after each reconcile, as a pure function of what was observed and
//! decided. Conditions keep their `lastTransitionTime` while their status does not change.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{
    ClusterCondition, ConditionStatus, ConditionType, MemberRole, MemberStatus, MetaStoreCluster,
    MetaStoreClusterStatus, WorkflowKind,
};
use crate::naming::ClusterNames;
use crate::plan::{quorum, Action, Decision, Observed, WaitReason};

/// The status for `cluster` after deciding `decision` on `observed`.
///
/// `holders` maps pod names to what currently holds their data (see
/// [`MemberStatus::data_holder`]); it is recorded for healthy members and carried over for the
/// others.
pub fn build(
    cluster: &MetaStoreCluster,
    names: &ClusterNames,
    observed: &Observed,
    decision: &Decision,
    holders: &BTreeMap<String, String>,
) -> MetaStoreClusterStatus {
    let previous = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    let mut status = MetaStoreClusterStatus {
        phase: Some(decision.phase()),
        observed_generation: generation,
        workflow: decision.workflow.clone(),
        ..previous.clone()
    };

    if let Some(view) = &observed.cluster {
        status.members = view
            .members
            .iter()
            .map(|m| {
                let name = match m.ordinal(names) {
                    Some(ordinal) if m.name.is_empty() => names.pod_name(ordinal),
                    _ => m.name.clone(),
                };
                let role = if m.is_learner {
                    MemberRole::Learner
                } else if view.leader == Some(m.id) {
                    MemberRole::Leader
                } else {
                    MemberRole::Follower
                };
                let id = format!("{:x}", m.id);
                let data_holder = if m.healthy {
                    holders.get(&name).cloned()
                } else {
                    previous
                        .members
                        .iter()
                        .find(|p| p.name == name && p.id == id)
                        .and_then(|p| p.data_holder.clone())
                };
                MemberStatus {
                    data_holder,
                    name,
                    id,
                    role,
                    version: m.version.as_ref().map(ToString::to_string),
                    format_version: m.format_version,
                    healthy: m.healthy,
                    applied_index: i64::try_from(m.applied_index).ok(),
                }
            })
            .collect();
        status.ready_replicas = i32::try_from(view.healthy_voter_count()).unwrap_or(i32::MAX);
        status.leader = view.leader_member().map(|m| m.name.clone());
        if let Some((lowest, _)) = view.version_range() {
            status.current_version = Some(lowest.to_string());
        }
        // The cluster is at a format once every member writes it with no older record left
        // (while members re-encode, the previous value stays).
        if let Some(format) = view.settled_format_version() {
            if previous.current_format_version.is_some_and(|f| format > f) {
                // The format moved: older binaries cannot go back past this version.
                status.format_version_since = status.current_version.clone();
            }
            status.current_format_version = Some(format);
        }
    } else {
        for m in &mut status.members {
            m.healthy = false;
        }
        status.ready_replicas = 0;
        status.leader = None;
    }
    if status.current_version.is_none() && observed.cluster.is_some() {
        status.current_version = cluster.spec.version.clone();
    }
    if status.current_format_version.is_none() && observed.cluster.is_some() {
        status.current_format_version = Some(cluster.spec.storage.format_version);
    }
    // A cluster restored from a backup says so once it has formed (a leader, past
    // Bootstrapping): the init containers have restored every initial member by then.
    let formed = observed
        .cluster
        .as_ref()
        .is_some_and(|v| v.leader.is_some())
        && status.phase != Some(crate::crd::Phase::Bootstrapping);
    if let Some(r) = cluster
        .spec
        .bootstrap
        .as_ref()
        .and_then(|b| b.restore.as_ref())
    {
        if status.restored_from.is_none() && formed {
            status.restored_from = Some(crate::crd::RestoredFrom {
                backup: r.backup.clone(),
                claim_name: r.claim_name.clone(),
                at: Time(observed.now),
            });
        }
    }

    let now = Time(observed.now);
    let wanted = conditions(observed, decision);
    status.conditions = wanted
        .into_iter()
        .map(|(type_, cond_status, reason, message)| {
            let last = previous
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == cond_status)
                .and_then(|c| c.last_transition_time.clone());
            ClusterCondition {
                type_,
                status: cond_status,
                reason,
                message,
                last_transition_time: Some(last.unwrap_or_else(|| now.clone())),
                observed_generation: generation,
            }
        })
        .collect();
    status
}

type Wanted = (ConditionType, ConditionStatus, String, String);

fn conditions(observed: &Observed, decision: &Decision) -> Vec<Wanted> {
    use ConditionStatus::{False, True, Unknown};
    let text = decision.action.to_string();
    let mut out = Vec::new();

    let available = match &observed.cluster {
        None => (
            Unknown,
            "ClusterUnreachable",
            "no member answers MemberList".to_string(),
        ),
        Some(view) => {
            let (healthy, voters) = (view.healthy_voter_count(), view.voter_count());
            if healthy < quorum(voters) {
                (
                    False,
                    "QuorumLost",
                    format!("{healthy} of {voters} voters healthy"),
                )
            } else if view.leader_member().is_none() {
                (False, "NoLeader", "no leader elected".to_string())
            } else {
                (
                    True,
                    "QuorumHealthy",
                    format!("{healthy} of {voters} voters healthy"),
                )
            }
        }
    };
    out.push((
        ConditionType::Available,
        available.0,
        available.1.into(),
        available.2,
    ));

    let degraded = match &decision.action {
        Action::MarkDegraded(reason) => (True, reason.reason(), text.clone()),
        Action::RefuseWithCondition(refusal) => (True, refusal.reason(), text.clone()),
        _ => (False, "AsExpected", String::new()),
    };
    out.push((
        ConditionType::Degraded,
        degraded.0,
        degraded.1.into(),
        degraded.2,
    ));

    let stopped = matches!(
        decision.action,
        Action::MarkDegraded(_) | Action::RefuseWithCondition(_)
    );
    let kind = decision.workflow.as_ref().map(|w| w.kind);
    let progressing = match (&decision.action, kind) {
        (_, _) if stopped => (False, "Stopped", text.clone()),
        (Action::Bootstrap { .. } | Action::WaitFor(WaitReason::ClusterForming), _) => {
            (True, "Bootstrapping", text.clone())
        }
        (_, Some(kind)) => (True, workflow_reason(kind), text.clone()),
        (Action::Done, None) => (False, "Reconciled", text.clone()),
        (_, None) => (False, "Waiting", text.clone()),
    };
    out.push((
        ConditionType::Progressing,
        progressing.0,
        progressing.1.into(),
        progressing.2,
    ));

    for (type_, wanted_kind) in [
        (ConditionType::Upgrading, WorkflowKind::Upgrade),
        (ConditionType::Migrating, WorkflowKind::Migration),
    ] {
        let cond = if kind == Some(wanted_kind) && !stopped {
            (True, workflow_reason(wanted_kind), text.clone())
        } else {
            (False, "Idle", String::new())
        };
        out.push((type_, cond.0, cond.1.into(), cond.2));
    }
    out
}

fn workflow_reason(kind: WorkflowKind) -> &'static str {
    match kind {
        WorkflowKind::ScaleUp => "ScalingUp",
        WorkflowKind::ScaleDown => "ScalingDown",
        WorkflowKind::Upgrade => "Upgrading",
        WorkflowKind::Migration => "Migrating",
        WorkflowKind::Rejoin => "Rejoining",
        WorkflowKind::Maintenance => "Defragmenting",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::Phase;
    use crate::plan::plan;

    fn fixture() -> (MetaStoreCluster, Observed) {
        let f = crate::plan::fixtures::Fixture::new(3, "1.2.0");
        (f.cluster, f.observed)
    }

    fn condition(status: &MetaStoreClusterStatus, t: ConditionType) -> &ClusterCondition {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == t)
            .unwrap_or_else(|| panic!("{t:?} missing"))
    }

    #[test]
    fn healthy_cluster_status() {
        let (cluster, observed) = fixture();
        let names = ClusterNames::new("demo", "db", false, false);
        let d = plan(&cluster, &observed);
        let s = build(&cluster, &names, &observed, &d, &BTreeMap::new());
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.ready_replicas, 3);
        assert_eq!(s.leader.as_deref(), Some("demo-0"));
        assert_eq!(s.members.len(), 3);
        assert_eq!(s.members[0].role, MemberRole::Leader);
        assert_eq!(s.members[0].id, "64");
        assert_eq!(s.current_version.as_deref(), Some("1.2.0"));
        assert_eq!(
            condition(&s, ConditionType::Available).status,
            ConditionStatus::True
        );
        assert_eq!(
            condition(&s, ConditionType::Degraded).status,
            ConditionStatus::False
        );
        assert_eq!(
            condition(&s, ConditionType::Progressing).reason,
            "Reconciled"
        );
        assert_eq!(s.conditions.len(), 5);
    }

    #[test]
    fn transition_times_hold_while_status_holds() {
        let (mut cluster, mut observed) = fixture();
        let names = ClusterNames::new("demo", "db", false, false);
        let first = build(
            &cluster,
            &names,
            &observed,
            &plan(&cluster, &observed),
            &BTreeMap::new(),
        );
        cluster.status = Some(first.clone());
        observed.now = observed
            .now
            .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(60))
            .unwrap_or(observed.now);
        // Quorum lost a minute later: Available flips (new time), Upgrading does not.
        if let Some(view) = observed.cluster.as_mut() {
            view.members[1].healthy = false;
            view.members[2].healthy = false;
        }
        let second = build(
            &cluster,
            &names,
            &observed,
            &plan(&cluster, &observed),
            &BTreeMap::new(),
        );
        let t = |s: &MetaStoreClusterStatus, c| condition(s, c).last_transition_time.clone();
        assert_ne!(
            t(&first, ConditionType::Available),
            t(&second, ConditionType::Available)
        );
        assert_eq!(
            t(&first, ConditionType::Upgrading),
            t(&second, ConditionType::Upgrading)
        );
        assert_eq!(second.phase, Some(Phase::QuorumLost));
        assert_eq!(
            condition(&second, ConditionType::Degraded).reason,
            "QuorumLost"
        );
        assert_eq!(
            condition(&second, ConditionType::Available).reason,
            "QuorumLost"
        );
    }

    #[test]
    fn format_move_records_the_version() {
        let (cluster, mut observed) = fixture();
        let names = ClusterNames::new("demo", "db", false, false);
        if let Some(view) = observed.cluster.as_mut() {
            for m in &mut view.members {
                m.format_version = Some(2);
            }
        }
        let s = build(
            &cluster,
            &names,
            &observed,
            &plan(&cluster, &observed),
            &BTreeMap::new(),
        );
        assert_eq!(s.current_format_version, Some(2));
        assert_eq!(s.format_version_since.as_deref(), Some("1.2.0"));
    }

    #[test]
    fn current_format_moves_only_once_no_member_reencodes() {
        let (cluster, mut observed) = fixture();
        let names = ClusterNames::new("demo", "db", false, false);
        if let Some(view) = observed.cluster.as_mut() {
            for m in &mut view.members {
                m.format_version = Some(2);
            }
            view.members[1].format_migration_pending = true;
        }
        let s = build(
            &cluster,
            &names,
            &observed,
            &plan(&cluster, &observed),
            &BTreeMap::new(),
        );
        assert_eq!(s.current_format_version, Some(1), "demo-1 still re-encodes");
        assert_eq!(s.format_version_since, None);
        assert!(s.members.iter().all(|m| m.format_version == Some(2)));
        assert_eq!(s.members[1].version.as_deref(), Some("1.2.0"));
    }

    #[test]
    fn data_holder_is_recorded_while_healthy_and_kept_after() {
        let (mut cluster, mut observed) = fixture();
        let names = ClusterNames::new("demo", "db", false, false);
        let holders = BTreeMap::from([("demo-2".to_string(), "pvc-uid-1".to_string())]);
        let first = build(
            &cluster,
            &names,
            &observed,
            &plan(&cluster, &observed),
            &holders,
        );
        assert_eq!(first.members[2].data_holder.as_deref(), Some("pvc-uid-1"));
        cluster.status = Some(first);
        if let Some(view) = observed.cluster.as_mut() {
            view.members[2].healthy = false;
        }
        let new_holder = BTreeMap::from([("demo-2".to_string(), "pvc-uid-2".to_string())]);
        let second = build(
            &cluster,
            &names,
            &observed,
            &plan(&cluster, &observed),
            &new_holder,
        );
        assert_eq!(second.members[2].data_holder.as_deref(), Some("pvc-uid-1"));
    }
}
