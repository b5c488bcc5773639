//! Membership changes: scaling up and down, and rejoining a member whose volume came back empty.
//!
//! Scale up, one member at a time: MemberAdd as a learner → grow the StatefulSet so its pod
//! starts (the ConfigMap already lists it, state `existing`) → wait until it is healthy and
//! caught up → MemberPromote.
//!
//! Scale down, highest ordinal first: move leadership away if it is the leader → MemberRemove
//! (refused if the remaining healthy voters would be fewer than a quorum) → shrink the
//! StatefulSet (its claim retention policy deletes the removed member's volume, so a later scale
//! up never finds stale data).
//!
//! Membership is compared with the spec, never with the pods: a pod that is merely gone for a
//! while (node drain, eviction) is not a scale-in; the StatefulSet brings it back.
//!
//! Rejoin: a pod whose volume is empty while its name is still registered under the old member
//! ID would crash-loop on the old bootstrap flags. The stale member is removed and the pod is
//! added again as a learner, which then catches up and is promoted like any new member.

use super::{quorum, ClusterView};
use super::{Action, Ctx, MemberView, Next, Refusal, Step, WaitReason, MAX_CATCH_UP_LAG};
use crate::crd::{WorkflowKind, WorkflowStep};

/// A member whose pod came back with an empty volume: remove the stale entry, add it back as a
/// learner, and see it through to promotion.
pub(super) fn rejoin(ctx: &Ctx<'_>, view: &ClusterView) -> Option<Next> {
    let mut empty: Vec<(i32, &super::PodView)> = ctx
        .observed
        .pods
        .iter()
        .filter(|p| p.empty_volume && !p.terminating)
        .filter_map(|p| Some((ctx.names.ordinal_of(&p.name)?, p)))
        .collect();
    empty.sort_by_key(|(ordinal, _)| *ordinal);

    for (ordinal, pod) in empty {
        let name = pod.name.clone();
        let step = |s, action| {
            Step::new(WorkflowKind::Rejoin, s, name.clone(), action).member(name.clone())
        };
        match member_at(ctx, view, ordinal) {
            // A healthy voter has its data: the indication is stale, leave it alone.
            Some(m) if !m.is_learner && m.healthy => continue,
            Some(m) if !m.is_learner => {
                if let Err(refusal) = removal_keeps_quorum(ctx, view, m) {
                    return Some(Next::Refuse(refusal));
                }
                let action = Action::RemoveMember {
                    member: name.clone(),
                    id: m.id,
                };
                return Some(Next::Step(step(WorkflowStep::RemoveMember, action)));
            }
            Some(m) => {
                return Some(learner_progress(
                    ctx,
                    view,
                    m,
                    ordinal,
                    WorkflowKind::Rejoin,
                    name.clone(),
                ));
            }
            None if ordinal < ctx.spec.replicas => {
                let action = Action::AddLearner {
                    member: name.clone(),
                    peer_url: ctx.names.peer_url(ordinal),
                };
                return Some(Next::Step(step(WorkflowStep::AddLearner, action)));
            }
            // Beyond the spec's size: scaling down removes the pod.
            None => continue,
        }
    }
    None
}

/// Scale up or down one member at a time until membership and the StatefulSet match the spec.
pub(super) fn scale(ctx: &Ctx<'_>, view: &ClusterView) -> Option<Next> {
    let target = ctx.spec.replicas;
    let target_text = target.to_string();

    // A learner in flight (a scale up, possibly left by an operator restart) is finished first.
    let mut learners: Vec<(i32, &MemberView)> = view
        .learners()
        .filter_map(|m| Some((m.ordinal(&ctx.names)?, m)))
        .collect();
    learners.sort_by_key(|(ordinal, _)| *ordinal);
    if let Some(&(ordinal, m)) = learners.first() {
        if ordinal >= target {
            // The spec shrank while this learner was being added.
            let action = Action::RemoveMember {
                member: ctx.names.pod_name(ordinal),
                id: m.id,
            };
            let step = Step::new(
                WorkflowKind::ScaleDown,
                WorkflowStep::RemoveMember,
                target_text,
                action,
            )
            .member(ctx.names.pod_name(ordinal));
            return Some(Next::Step(step));
        }
        return Some(learner_progress(
            ctx,
            view,
            m,
            ordinal,
            WorkflowKind::ScaleUp,
            target_text,
        ));
    }

    let ordinals: Vec<i32> = view
        .members
        .iter()
        .filter_map(|m| m.ordinal(&ctx.names))
        .collect();
    let count = i32::try_from(view.members.len()).unwrap_or(i32::MAX);

    if count < target {
        let next = (0..target).find(|i| !ordinals.contains(i))?;
        let member = ctx.names.pod_name(next);
        let action = Action::AddLearner {
            member: member.clone(),
            peer_url: ctx.names.peer_url(next),
        };
        let step = Step::new(
            WorkflowKind::ScaleUp,
            WorkflowStep::AddLearner,
            target_text,
            action,
        )
        .member(member);
        return Some(Next::Step(step));
    }

    if count > target {
        let (ordinal, m) = view
            .members
            .iter()
            .filter_map(|m| Some((m.ordinal(&ctx.names)?, m)))
            .max_by_key(|(ordinal, _)| *ordinal)?;
        let member = ctx.names.pod_name(ordinal);
        let step = |s, action| {
            Step::new(WorkflowKind::ScaleDown, s, target_text.clone(), action)
                .member(member.clone())
        };
        if let Err(refusal) = removal_keeps_quorum(ctx, view, m) {
            return Some(Next::Refuse(refusal));
        }
        if view.leader == Some(m.id) {
            let Some(to) = transferee(ctx, view, m.id, None) else {
                return Some(Next::Refuse(Refusal::WouldLoseQuorum { member }));
            };
            let action = Action::MoveLeader {
                to: ctx.member_name(to),
                to_id: to.id,
            };
            return Some(Next::Step(step(WorkflowStep::MoveLeader, action)));
        }
        let action = Action::RemoveMember {
            member: member.clone(),
            id: m.id,
        };
        return Some(Next::Step(step(WorkflowStep::RemoveMember, action)));
    }

    // Membership matches the spec: the StatefulSet follows it (after a removal, or after an
    // operator restart between two steps).
    let sts = ctx.observed.statefulset.as_ref()?;
    let want = ordinals.iter().max().map_or(0, |max| max + 1);
    if sts.replicas > want {
        let step = Step::new(
            WorkflowKind::ScaleDown,
            WorkflowStep::ShrinkStatefulSet,
            target_text,
            Action::ScaleStatefulSet { replicas: want },
        );
        return Some(Next::Step(step));
    }
    if sts.replicas < want {
        let step = Step::new(
            WorkflowKind::ScaleUp,
            WorkflowStep::StartPod,
            target_text,
            Action::ScaleStatefulSet { replicas: want },
        );
        return Some(Next::Step(step));
    }
    None
}

/// The learner at `ordinal`: start its pod, wait for it to catch up, promote it.
fn learner_progress(
    ctx: &Ctx<'_>,
    view: &ClusterView,
    m: &MemberView,
    ordinal: i32,
    kind: WorkflowKind,
    target: String,
) -> Next {
    let member = ctx.names.pod_name(ordinal);
    let step =
        |s, action| Next::Step(Step::new(kind, s, target.clone(), action).member(member.clone()));
    let sts_replicas = ctx.observed.statefulset.as_ref().map_or(0, |s| s.replicas);
    let Some(pod) = ctx.observed.pod(&ctx.names, ordinal) else {
        if sts_replicas <= ordinal {
            return step(
                WorkflowStep::StartPod,
                Action::ScaleStatefulSet {
                    replicas: ordinal + 1,
                },
            );
        }
        return step(
            WorkflowStep::StartPod,
            Action::WaitFor(WaitReason::PodRecreating {
                member: member.clone(),
            }),
        );
    };
    if !m.healthy {
        if pod.crash_looping && !pod.terminating {
            // Started before the learner was registered: start it again with the current flags.
            return step(
                WorkflowStep::StartPod,
                Action::RestartPod {
                    member: member.clone(),
                },
            );
        }
        return step(
            WorkflowStep::CatchUp,
            Action::WaitFor(WaitReason::MemberStarting {
                member: member.clone(),
            }),
        );
    }
    let lag = view.lag(m);
    if lag > MAX_CATCH_UP_LAG {
        return step(
            WorkflowStep::CatchUp,
            Action::WaitFor(WaitReason::CatchingUp {
                member: member.clone(),
                lag,
            }),
        );
    }
    step(
        WorkflowStep::Promote,
        Action::PromoteLearner {
            member: member.clone(),
            id: m.id,
        },
    )
}

/// The member registered for `ordinal`.
fn member_at<'v>(ctx: &Ctx<'_>, view: &'v ClusterView, ordinal: i32) -> Option<&'v MemberView> {
    view.members
        .iter()
        .find(|m| m.ordinal(&ctx.names) == Some(ordinal))
}

/// Removing voter `m` must leave a quorum of healthy voters among the rest.
fn removal_keeps_quorum(ctx: &Ctx<'_>, view: &ClusterView, m: &MemberView) -> Result<(), Refusal> {
    if m.is_learner {
        return Ok(());
    }
    let voters_after = view.voter_count().saturating_sub(1);
    let healthy_after = view.healthy_voter_count() - usize::from(m.healthy);
    if voters_after == 0 || healthy_after < quorum(voters_after) {
        return Err(Refusal::WouldLoseQuorum {
            member: ctx.member_name(m),
        });
    }
    Ok(())
}

/// The member to hand leadership to: a healthy voter other than `from`, preferring one on
/// `image`, then the most caught-up, then the lowest ordinal.
pub(super) fn transferee<'v>(
    ctx: &Ctx<'_>,
    view: &'v ClusterView,
    from: u64,
    image: Option<&str>,
) -> Option<&'v MemberView> {
    view.voters()
        .filter(|m| m.id != from && m.healthy)
        .min_by_key(|m| {
            let ordinal = m.ordinal(&ctx.names);
            let on_image = image.is_some_and(|image| {
                ordinal
                    .and_then(|o| ctx.observed.pod(&ctx.names, o))
                    .is_some_and(|p| p.image == image && p.ready)
            });
            (!on_image, std::cmp::Reverse(m.applied_index), ordinal)
        })
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;

    fn remove(i: i32) -> Action {
        Action::RemoveMember {
            member: format!("demo-{i}"),
            id: id(i),
        }
    }

    fn add(i: i32) -> Action {
        Action::AddLearner {
            member: format!("demo-{i}"),
            peer_url: names().peer_url(i),
        }
    }

    #[test]
    fn scale_up() {
        // (case, fixture, expected action, expected workflow step)
        let cases: Vec<(&str, Fixture, Action, Option<WorkflowStep>)> = vec![
            (
                "3 -> 5: add demo-3 as a learner first",
                Fixture::new(3, "1.2.0").spec_replicas(5),
                add(3),
                Some(WorkflowStep::AddLearner),
            ),
            (
                "learner registered, no pod: grow the StatefulSet by one",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .unstarted_learner(3),
                Action::ScaleStatefulSet { replicas: 4 },
                Some(WorkflowStep::StartPod),
            ),
            (
                "StatefulSet grown, pod not created yet",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .unstarted_learner(3)
                    .sts_replicas(4),
                Action::WaitFor(WaitReason::PodRecreating {
                    member: "demo-3".into(),
                }),
                Some(WorkflowStep::StartPod),
            ),
            (
                "pod started, learner not healthy yet",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .unstarted_learner(3)
                    .sts_replicas(4)
                    .add_pod(3),
                Action::WaitFor(WaitReason::MemberStarting {
                    member: "demo-3".into(),
                }),
                Some(WorkflowStep::CatchUp),
            ),
            (
                "learner behind the leader",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .learner(3)
                    .sts_replicas(4)
                    .add_pod(3)
                    .lag(3, 4000),
                Action::WaitFor(WaitReason::CatchingUp {
                    member: "demo-3".into(),
                    lag: 4000,
                }),
                Some(WorkflowStep::CatchUp),
            ),
            (
                "learner caught up: promote",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .learner(3)
                    .sts_replicas(4)
                    .add_pod(3)
                    .lag(3, 10),
                Action::PromoteLearner {
                    member: "demo-3".into(),
                    id: id(3),
                },
                Some(WorkflowStep::Promote),
            ),
            (
                "demo-3 promoted: add demo-4",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .learner(3)
                    .promote(3)
                    .sts_replicas(4)
                    .add_pod(3),
                add(4),
                Some(WorkflowStep::AddLearner),
            ),
            (
                "five voters: done",
                Fixture::new(5, "1.2.0"),
                Action::Done,
                None,
            ),
            (
                "learner crash-looping (started before MemberAdd): restart its pod",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(5)
                    .unstarted_learner(3)
                    .sts_replicas(4)
                    .add_pod(3)
                    .crash(3),
                Action::RestartPod {
                    member: "demo-3".into(),
                },
                Some(WorkflowStep::StartPod),
            ),
            (
                "StatefulSet shrunk by hand below the members: grow it back",
                Fixture::new(3, "1.2.0").sts_replicas(2),
                Action::ScaleStatefulSet { replicas: 3 },
                Some(WorkflowStep::StartPod),
            ),
            (
                "scale up proceeds with a voter down (a learner does not vote)",
                Fixture::new(3, "1.2.0").spec_replicas(5).unhealthy(2),
                add(3),
                Some(WorkflowStep::AddLearner),
            ),
        ];
        for (case, fixture, want, step) in cases {
            let d = fixture.plan();
            assert_eq!(d.action, want, "{case}");
            assert_eq!(d.workflow.as_ref().map(|w| w.step), step, "{case}");
            if let Some(wf) = &d.workflow {
                assert_eq!(wf.kind, WorkflowKind::ScaleUp, "{case}");
                assert_eq!(
                    wf.target,
                    fixture.cluster.spec.replicas.to_string(),
                    "{case}"
                );
                assert_eq!(d.phase(), Phase::Scaling, "{case}");
            }
        }
    }

    #[test]
    fn scale_up_lists_the_learner_in_initial_cluster() {
        let d = Fixture::new(3, "1.2.0")
            .spec_replicas(5)
            .unstarted_learner(3)
            .plan();
        assert_eq!(d.initial_cluster_state, InitialClusterState::Existing);
        assert_eq!(d.initial_members, vec![0, 1, 2, 3]);
    }

    #[test]
    fn scale_down() {
        let cases: Vec<(&str, Fixture, Action, Option<WorkflowStep>)> = vec![
            (
                "5 -> 3: remove the highest ordinal first",
                Fixture::new(5, "1.2.0").spec_replicas(3),
                remove(4),
                Some(WorkflowStep::RemoveMember),
            ),
            (
                "the member to remove leads: move leadership first",
                Fixture::new(5, "1.2.0").spec_replicas(3).leader(4),
                Action::MoveLeader {
                    to: "demo-0".into(),
                    to_id: id(0),
                },
                Some(WorkflowStep::MoveLeader),
            ),
            (
                "leadership goes to the most caught-up voter",
                Fixture::new(5, "1.2.0")
                    .spec_replicas(3)
                    .leader(4)
                    .lag(0, 50)
                    .lag(1, 50),
                Action::MoveLeader {
                    to: "demo-2".into(),
                    to_id: id(2),
                },
                Some(WorkflowStep::MoveLeader),
            ),
            (
                "member removed: shrink the StatefulSet",
                Fixture::new(5, "1.2.0")
                    .spec_replicas(3)
                    .remove_member(4)
                    .remove_member(3),
                Action::ScaleStatefulSet { replicas: 3 },
                Some(WorkflowStep::ShrinkStatefulSet),
            ),
            (
                "removal would lose quorum: refuse",
                Fixture::new(3, "1.2.0").spec_replicas(1).unhealthy(0),
                Action::RefuseWithCondition(Refusal::WouldLoseQuorum {
                    member: "demo-2".into(),
                }),
                None,
            ),
            (
                "removing an unhealthy member keeps quorum",
                Fixture::new(5, "1.2.0")
                    .spec_replicas(3)
                    .unhealthy(4)
                    .unhealthy(3),
                remove(4),
                Some(WorkflowStep::RemoveMember),
            ),
            (
                "spec shrank while a learner was being added: remove the learner",
                Fixture::new(3, "1.2.0").unstarted_learner(3),
                remove(3),
                Some(WorkflowStep::RemoveMember),
            ),
            (
                "3 -> 1 second step",
                Fixture::new(3, "1.2.0")
                    .spec_replicas(1)
                    .remove_member(2)
                    .sts_replicas(2)
                    .no_pod(2),
                remove(1),
                Some(WorkflowStep::RemoveMember),
            ),
        ];
        for (case, fixture, want, step) in cases {
            let d = fixture.plan();
            assert_eq!(d.action, want, "{case}");
            assert_eq!(d.workflow.as_ref().map(|w| w.step), step, "{case}");
            if let Some(wf) = &d.workflow {
                assert_eq!(wf.kind, WorkflowKind::ScaleDown, "{case}");
            }
        }
    }

    #[test]
    fn pod_gone_for_a_while_is_not_a_scale_in() {
        for fixture in [
            Fixture::new(3, "1.2.0").no_pod(1).unhealthy(1),
            Fixture::new(3, "1.2.0")
                .no_pod(1)
                .unhealthy(1)
                .sts_replicas(3),
            Fixture::new(5, "1.2.0")
                .no_pod(3)
                .no_pod(4)
                .unhealthy(3)
                .unhealthy(4),
        ] {
            let d = fixture.plan();
            assert!(
                matches!(
                    d.action,
                    Action::WaitFor(WaitReason::MemberUnhealthy { .. })
                ),
                "{:?}",
                d.action
            );
        }
    }

    #[test]
    fn rejoin_after_empty_volume() {
        let cases: Vec<(&str, Fixture, Action, Option<WorkflowStep>)> = vec![
            (
                "pod back with an empty volume: remove the stale member",
                Fixture::new(3, "1.2.0").unhealthy(2).crash(2).empty(2),
                remove(2),
                Some(WorkflowStep::RemoveMember),
            ),
            (
                "stale member removed: add it back as a learner",
                Fixture::new(3, "1.2.0").remove_member(2).crash(2).empty(2),
                add(2),
                Some(WorkflowStep::AddLearner),
            ),
            (
                "learner added while the pod crash-loops: restart the pod",
                Fixture::new(3, "1.2.0")
                    .remove_member(2)
                    .unstarted_learner(2)
                    .crash(2)
                    .empty(2),
                Action::RestartPod {
                    member: "demo-2".into(),
                },
                Some(WorkflowStep::StartPod),
            ),
            (
                "new learner catching up",
                Fixture::new(3, "1.2.0")
                    .remove_member(2)
                    .learner(2)
                    .new_id(2, 777)
                    .lag(2, 3000)
                    .empty(2),
                Action::WaitFor(WaitReason::CatchingUp {
                    member: "demo-2".into(),
                    lag: 3000,
                }),
                Some(WorkflowStep::CatchUp),
            ),
            (
                "new learner caught up: promote",
                Fixture::new(3, "1.2.0")
                    .remove_member(2)
                    .learner(2)
                    .new_id(2, 777)
                    .empty(2),
                Action::PromoteLearner {
                    member: "demo-2".into(),
                    id: 777,
                },
                Some(WorkflowStep::Promote),
            ),
            (
                "a healthy voter is never removed for an empty-volume hint",
                Fixture::new(3, "1.2.0").empty(2),
                Action::Done,
                None,
            ),
        ];
        for (case, fixture, want, step) in cases {
            let d = fixture.plan();
            assert_eq!(d.action, want, "{case}");
            assert_eq!(d.workflow.as_ref().map(|w| w.step), step, "{case}");
            if let Some(wf) = &d.workflow {
                assert_eq!(wf.kind, WorkflowKind::Rejoin, "{case}");
                assert_eq!(wf.member.as_deref(), Some("demo-2"), "{case}");
                assert_eq!(d.phase(), Phase::Repairing, "{case}");
            }
        }
    }

    #[test]
    fn a_step_done_while_the_operator_was_down_is_not_an_overrun() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        // The record says "demo-3 catching up", due an hour ago.
        let catch_up = Workflow {
            kind: WorkflowKind::ScaleUp,
            step: WorkflowStep::CatchUp,
            target: "5".into(),
            from: None,
            member: Some("demo-3".into()),
            started_at: Time(t0()),
            step_started_at: Time(t0()),
            deadline: Time(t0()),
            generation: 2,
            failure: None,
        };
        let base = Fixture::new(3, "1.2.0")
            .spec_replicas(5)
            .learner(3)
            .sts_replicas(4)
            .add_pod(3)
            .workflow(catch_up)
            .later(3600);
        // It caught up, or was even promoted, while the operator was down: carry on.
        assert!(matches!(
            base.clone().plan().action,
            Action::PromoteLearner { .. }
        ));
        assert_eq!(base.clone().promote(3).plan().action, add(4));
        // Still behind: that step overran.
        let stuck = base.lag(3, 9000).plan();
        assert!(
            matches!(
                stuck.action,
                Action::MarkDegraded(DegradedReason::DeadlineExceeded { .. })
            ),
            "{:?}",
            stuck.action
        );
    }
}
