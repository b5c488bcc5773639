//! Rolling upgrades (and rollbacks, and pod template changes).
//!
//! The StatefulSet uses `OnDelete`, so a new template reaches a pod only when the operator
//! deletes it. One member at a time, while the cluster is healthy (every member up, a leader, no
//! alarms, HashKV agreeing, no learner in flight):
//!
//! 1. followers first, highest ordinal first: delete the pod (`DeletePod`);
//! 2. wait until it is back on the new template, Ready, healthy and caught up with the leader
//!    (`WaitMemberReady`); a crash loop stops the workflow as Degraded;
//! 3. the leader last: MoveLeader to a follower already on the new version, then delete it.
//!
//! Reverting the spec rolls back the same way as long as the version rules allow it
//! ([`super::check_change`]): no skipping a minor version, no downgrade once the format moved.

use super::membership::transferee;
use super::{health_gate, Action, ClusterView, Ctx, DegradedReason, MemberView, Next, PodView};
use super::{Step, WaitReason, MAX_CATCH_UP_LAG};
use crate::crd::{WorkflowKind, WorkflowStep};

/// The next step of a rolling replacement of members not on the target template.
pub(super) fn upgrade(ctx: &Ctx<'_>, view: &ClusterView) -> Option<Next> {
    let target_image = ctx.desired_image.as_deref()?;
    let target = ctx
        .target_version
        .as_ref()
        .map_or_else(|| target_image.to_string(), ToString::to_string);
    let from = view.version_range().map(|(lowest, _)| lowest.to_string());
    let step = |s, action, member: Option<&str>| {
        let step = Step::new(WorkflowKind::Upgrade, s, target.clone(), action).from(from.clone());
        Next::Step(match member {
            Some(m) => step.member(m),
            None => step,
        })
    };
    let on_target = |pod: &PodView| pod.image == target_image && pod.up_to_date;

    let mut voters: Vec<(i32, &MemberView)> = view
        .voters()
        .filter_map(|m| Some((m.ordinal(&ctx.names)?, m)))
        .collect();
    voters.sort_by_key(|(ordinal, _)| *ordinal);

    // The member replaced last must be back before anything else moves.
    let in_flight = ctx
        .recorded()
        .filter(|w| w.kind == WorkflowKind::Upgrade)
        .and_then(|w| w.member.as_deref());
    if let Some(name) = in_flight {
        if let Some(&(ordinal, m)) = voters
            .iter()
            .find(|(ordinal, _)| ctx.names.pod_name(*ordinal) == name)
        {
            let waiting = |reason| {
                Some(step(
                    WorkflowStep::WaitMemberReady,
                    Action::WaitFor(reason),
                    Some(name),
                ))
            };
            match ctx.observed.pod(&ctx.names, ordinal) {
                None => {
                    return waiting(WaitReason::PodRecreating {
                        member: name.into(),
                    })
                }
                Some(p) if p.terminating => {
                    return waiting(WaitReason::PodRecreating {
                        member: name.into(),
                    })
                }
                Some(p) if on_target(p) => {
                    if p.crash_looping {
                        let failed = Step::new(
                            WorkflowKind::Upgrade,
                            WorkflowStep::WaitMemberReady,
                            target.clone(),
                            Action::Done,
                        )
                        .from(from.clone())
                        .member(name)
                        .fail(DegradedReason::MemberFailed {
                            member: name.into(),
                        });
                        return Some(Next::Step(failed));
                    }
                    if !p.ready || !m.healthy {
                        return waiting(WaitReason::MemberStarting {
                            member: name.into(),
                        });
                    }
                    let lag = view.lag(m);
                    if lag > MAX_CATCH_UP_LAG {
                        return waiting(WaitReason::CatchingUp {
                            member: name.into(),
                            lag,
                        });
                    }
                }
                // Not replaced yet: the DeletePod step below is repeated (idempotent).
                Some(_) => {}
            }
        }
    }

    let stale: Vec<(i32, &MemberView, &PodView)> = voters
        .iter()
        .filter_map(|&(ordinal, m)| {
            let pod = ctx.observed.pod(&ctx.names, ordinal)?;
            (!on_target(pod)).then_some((ordinal, m, pod))
        })
        .collect();
    if stale.is_empty() {
        return None;
    }
    if let Err(refusal) = &ctx.version_check {
        return Some(Next::Refuse(refusal.clone()));
    }

    // A member already crash-looping on the old template adds no vote: replacing it first
    // costs no availability (this is how a failed member is rolled back).
    if let Some(&(ordinal, _, pod)) = stale.iter().find(|(_, m, p)| p.crash_looping && !m.healthy) {
        let name = ctx.names.pod_name(ordinal);
        if pod.terminating {
            let wait = Action::WaitFor(WaitReason::PodRecreating {
                member: name.clone(),
            });
            return Some(step(WorkflowStep::WaitMemberReady, wait, Some(&name)));
        }
        let action = Action::DeletePodForUpgrade {
            member: name.clone(),
        };
        return Some(step(WorkflowStep::DeletePod, action, Some(&name)));
    }

    if let Err(reason) = health_gate(ctx, view) {
        return Some(step(WorkflowStep::DeletePod, Action::WaitFor(reason), None));
    }

    // Followers first, highest ordinal first; the leader last.
    let next = stale
        .iter()
        .filter(|(_, m, _)| view.leader != Some(m.id))
        .max_by_key(|(ordinal, _, _)| *ordinal);
    if let Some(&(ordinal, _, pod)) = next {
        let name = ctx.names.pod_name(ordinal);
        if pod.terminating {
            let wait = Action::WaitFor(WaitReason::PodRecreating {
                member: name.clone(),
            });
            return Some(step(WorkflowStep::WaitMemberReady, wait, Some(&name)));
        }
        let action = Action::DeletePodForUpgrade {
            member: name.clone(),
        };
        return Some(step(WorkflowStep::DeletePod, action, Some(&name)));
    }

    let &(ordinal, leader, _) = stale.first()?;
    let name = ctx.names.pod_name(ordinal);
    if view.voter_count() > 1 {
        if let Some(to) = transferee(ctx, view, leader.id, Some(target_image)) {
            let action = Action::MoveLeader {
                to: ctx.member_name(to),
                to_id: to.id,
            };
            return Some(step(WorkflowStep::MoveLeader, action, Some(&name)));
        }
    }
    // A single member: no one to hand leadership to; the upgrade costs a short outage.
    let action = Action::DeletePodForUpgrade {
        member: name.clone(),
    };
    Some(step(WorkflowStep::DeletePod, action, Some(&name)))
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::SignedDuration;

    use super::super::fixtures::*;
    use super::super::*;
    use crate::crd::Workflow;

    fn delete(i: i32) -> Action {
        Action::DeletePodForUpgrade {
            member: format!("demo-{i}"),
        }
    }

    /// The record an upgrade to 1.3.0 leaves while working on `member`.
    fn upgrading(member: i32, step: WorkflowStep) -> Workflow {
        Workflow {
            kind: WorkflowKind::Upgrade,
            step,
            target: "1.3.0".into(),
            from: Some("1.2.0".into()),
            member: Some(format!("demo-{member}")),
            started_at: Time(t0()),
            step_started_at: Time(t0()),
            deadline: Time(
                t0().checked_add(SignedDuration::from_secs(600))
                    .unwrap_or(t0()),
            ),
            generation: 2,
            failure: None,
        }
    }

    /// (case, fixture, expected action, expected step, expected member)
    type StepCase = (
        &'static str,
        Fixture,
        Action,
        Option<WorkflowStep>,
        Option<&'static str>,
    );

    fn to_130() -> Fixture {
        Fixture::new(3, "1.2.0").spec_version("1.3.0")
    }

    #[test]
    fn rolling_upgrade_steps() {
        let wf = |m| upgrading(m, WorkflowStep::DeletePod);
        // (case, fixture, expected action, expected step, expected member)
        let cases: Vec<StepCase> = vec![
            (
                "start: a follower first, the highest ordinal",
                to_130(),
                delete(2),
                Some(WorkflowStep::DeletePod),
                Some("demo-2"),
            ),
            (
                "deleted pod still terminating",
                to_130().terminating(2).workflow(wf(2)),
                Action::WaitFor(WaitReason::PodRecreating {
                    member: "demo-2".into(),
                }),
                Some(WorkflowStep::WaitMemberReady),
                Some("demo-2"),
            ),
            (
                "deleted pod not recreated yet",
                to_130().no_pod(2).unhealthy(2).workflow(wf(2)),
                Action::WaitFor(WaitReason::PodRecreating {
                    member: "demo-2".into(),
                }),
                Some(WorkflowStep::WaitMemberReady),
                Some("demo-2"),
            ),
            (
                "back on 1.3.0, not Ready yet",
                to_130()
                    .on_version(2, "1.3.0")
                    .not_ready(2)
                    .unhealthy(2)
                    .workflow(wf(2)),
                Action::WaitFor(WaitReason::MemberStarting {
                    member: "demo-2".into(),
                }),
                Some(WorkflowStep::WaitMemberReady),
                Some("demo-2"),
            ),
            (
                "Ready but behind the leader",
                to_130().on_version(2, "1.3.0").lag(2, 5000).workflow(wf(2)),
                Action::WaitFor(WaitReason::CatchingUp {
                    member: "demo-2".into(),
                    lag: 5000,
                }),
                Some(WorkflowStep::WaitMemberReady),
                Some("demo-2"),
            ),
            (
                "caught up: the next follower",
                to_130().on_version(2, "1.3.0").workflow(wf(2)),
                delete(1),
                Some(WorkflowStep::DeletePod),
                Some("demo-1"),
            ),
            (
                "only the leader left: hand leadership to an upgraded follower",
                to_130()
                    .on_version(2, "1.3.0")
                    .on_version(1, "1.3.0")
                    .workflow(wf(1)),
                Action::MoveLeader {
                    to: "demo-1".into(),
                    to_id: id(1),
                },
                Some(WorkflowStep::MoveLeader),
                Some("demo-0"),
            ),
            (
                "leadership moved: replace the old leader",
                to_130()
                    .on_version(2, "1.3.0")
                    .on_version(1, "1.3.0")
                    .leader(1)
                    .workflow(upgrading(0, WorkflowStep::MoveLeader)),
                delete(0),
                Some(WorkflowStep::DeletePod),
                Some("demo-0"),
            ),
            (
                "everyone on 1.3.0: done",
                to_130().all_on("1.3.0", 3).workflow(wf(0)),
                Action::Done,
                None,
                None,
            ),
            (
                "a member unhealthy: touch nobody",
                to_130().unhealthy(1),
                Action::WaitFor(WaitReason::MemberUnhealthy {
                    member: "demo-1".into(),
                }),
                Some(WorkflowStep::DeletePod),
                None,
            ),
            (
                "an alarm raised: wait",
                to_130().alarm("NOSPACE"),
                Action::WaitFor(WaitReason::Alarms {
                    alarms: vec!["NOSPACE".into()],
                }),
                Some(WorkflowStep::DeletePod),
                None,
            ),
            (
                "HashKV not compared yet: wait",
                to_130().hash(HashCheck::Unknown),
                Action::WaitFor(WaitReason::HashCheckPending),
                Some(WorkflowStep::DeletePod),
                None,
            ),
            (
                "single member: replaced in place",
                Fixture::new(1, "1.2.0").spec_version("1.3.0"),
                delete(0),
                Some(WorkflowStep::DeletePod),
                Some("demo-0"),
            ),
            (
                "pod template change (config) rolls members the same way",
                Fixture::new(3, "1.2.0")
                    .stale_template(0)
                    .stale_template(1)
                    .stale_template(2),
                delete(2),
                Some(WorkflowStep::DeletePod),
                Some("demo-2"),
            ),
            (
                "patch upgrade",
                Fixture::new(3, "1.2.0").spec_version("1.2.7"),
                delete(2),
                Some(WorkflowStep::DeletePod),
                Some("demo-2"),
            ),
        ];
        for (case, fixture, want, step, member) in cases {
            let d = fixture.plan();
            assert_eq!(d.action, want, "{case}");
            assert_eq!(d.workflow.as_ref().map(|w| w.step), step, "{case}");
            assert_eq!(
                d.workflow.as_ref().and_then(|w| w.member.as_deref()),
                member,
                "{case}"
            );
            if let Some(wf) = &d.workflow {
                assert_eq!(wf.kind, WorkflowKind::Upgrade, "{case}");
                assert_eq!(d.phase(), Phase::Upgrading, "{case}");
            }
        }
    }

    #[test]
    fn version_rules() {
        // (case, fixture, expected action)
        let cases: Vec<(&str, Fixture, Action)> = vec![
            (
                "skipping a minor version is refused",
                Fixture::new(3, "1.2.0").spec_version("1.4.0"),
                Action::RefuseWithCondition(Refusal::VersionSkip {
                    from: "1.2.0".into(),
                    to: "1.4.0".into(),
                }),
            ),
            (
                "a skip is measured from the lowest member",
                Fixture::new(3, "1.3.0")
                    .member_version(0, "1.2.0")
                    .spec_version("1.4.0"),
                Action::RefuseWithCondition(Refusal::VersionSkip {
                    from: "1.2.0".into(),
                    to: "1.4.0".into(),
                }),
            ),
            (
                "a major version change is refused",
                Fixture::new(3, "1.2.0").spec_version("2.0.0"),
                Action::RefuseWithCondition(Refusal::MajorVersionChange {
                    from: "1.2.0".into(),
                    to: "2.0.0".into(),
                }),
            ),
            (
                "reverting mid-upgrade rolls the upgraded member back",
                Fixture::new(3, "1.2.0").on_version(2, "1.3.0"),
                delete(2),
            ),
            (
                "rollback after the format moved is refused",
                Fixture::new(3, "1.3.0")
                    .all_on("1.3.0", 3)
                    .format(2)
                    .format_since("1.3.0")
                    .spec_version("1.2.0"),
                Action::RefuseWithCondition(Refusal::DowngradeAfterFormatChange {
                    to: "1.2.0".into(),
                    since: "1.3.0".into(),
                }),
            ),
            (
                "rollback allowed when the format moved on an older version",
                Fixture::new(3, "1.3.0")
                    .all_on("1.3.0", 3)
                    .format_since("1.1.0")
                    .spec_version("1.2.0"),
                delete(2),
            ),
            (
                "a crash-looping member is rolled back first",
                Fixture::new(3, "1.2.0")
                    .on_version(2, "1.3.0")
                    .crash(2)
                    .unhealthy(2),
                delete(2),
            ),
        ];
        for (case, fixture, want) in cases {
            assert_eq!(fixture.plan().action, want, "{case}");
        }
    }

    #[test]
    fn refused_version_keeps_the_running_image() {
        let d = Fixture::new(3, "1.2.0").spec_version("1.4.0").plan();
        assert_eq!(d.image, image("1.2.0"));
        assert_eq!(d.workflow, None);
        assert_eq!(d.phase(), Phase::Degraded);
        // A scale requested together with the refused version still uses the running image.
        let d = Fixture::new(3, "1.2.0")
            .spec_version("1.4.0")
            .spec_replicas(5)
            .plan();
        assert!(
            matches!(d.action, Action::AddLearner { .. }),
            "{:?}",
            d.action
        );
        assert_eq!(d.image, image("1.2.0"));
    }

    #[test]
    fn failure_mid_upgrade_stops_and_waits_for_the_user() {
        // demo-2 crash-loops on 1.3.0: Degraded, failure latched in the record.
        let mut f = to_130()
            .on_version(2, "1.3.0")
            .crash(2)
            .unhealthy(2)
            .workflow(upgrading(2, WorkflowStep::WaitMemberReady));
        let d = f.plan_and_record();
        assert_eq!(
            d.action,
            Action::MarkDegraded(DegradedReason::MemberFailed {
                member: "demo-2".into()
            })
        );
        let failure = d.workflow.as_ref().and_then(|w| w.failure.clone());
        assert!(failure.is_some());
        assert_eq!(d.phase(), Phase::Degraded);

        // The pod recovering later does not restart the workflow on its own.
        let f2 = Fixture {
            observed: to_130().on_version(2, "1.3.0").observed,
            cluster: f.cluster.clone(),
        };
        let d = f2.plan();
        assert_eq!(
            d.action,
            Action::MarkDegraded(DegradedReason::WorkflowStopped {
                failure: failure.unwrap_or_default()
            })
        );

        // Editing the spec (a revert here) re-plans: the upgraded member is rolled back.
        let mut f3 = f.clone();
        f3.cluster.spec.version = Some("1.2.0".into());
        f3.cluster.metadata.generation = Some(3);
        assert_eq!(f3.plan().action, delete(2));
    }

    #[test]
    fn deadline_overrun_stops_the_workflow() {
        let f = to_130()
            .on_version(2, "1.3.0")
            .not_ready(2)
            .unhealthy(2)
            .workflow(upgrading(2, WorkflowStep::WaitMemberReady))
            .later(601);
        let d = f.plan();
        assert_eq!(
            d.action,
            Action::MarkDegraded(DegradedReason::DeadlineExceeded {
                kind: WorkflowKind::Upgrade,
                step: WorkflowStep::WaitMemberReady,
                member: Some("demo-2".into()),
            })
        );
        assert!(d.workflow.as_ref().is_some_and(|w| w.failure.is_some()));
    }

    #[test]
    fn restart_resumes_with_the_same_step_and_deadline() {
        // First reconcile starts the upgrade and records the step.
        let mut f = to_130();
        let first = f.plan_and_record();
        assert_eq!(first.action, delete(2));

        // The operator restarts before the pod was deleted: same action, same deadline.
        let later = Fixture {
            cluster: f.cluster.clone(),
            observed: f.observed.clone(),
        }
        .later(120);
        let again = later.plan();
        assert_eq!(again.action, first.action);
        assert_eq!(
            again.workflow.as_ref().map(|w| w.deadline.clone()),
            first.workflow.as_ref().map(|w| w.deadline.clone())
        );

        // The pod is gone: the step moves on with a fresh deadline.
        let moved = Fixture {
            cluster: f.cluster.clone(),
            observed: to_130().no_pod(2).unhealthy(2).observed,
        }
        .later(180)
        .plan();
        assert_eq!(
            moved.workflow.as_ref().map(|w| w.step),
            Some(WorkflowStep::WaitMemberReady)
        );
        assert_eq!(
            moved.workflow.as_ref().map(|w| w.started_at.clone()),
            first.workflow.as_ref().map(|w| w.started_at.clone())
        );
        assert_ne!(
            moved.workflow.as_ref().map(|w| w.deadline.clone()),
            first.workflow.as_ref().map(|w| w.deadline.clone())
        );
    }
}
