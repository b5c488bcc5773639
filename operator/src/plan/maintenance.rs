//! Scheduled maintenance: defragmentation (`spec.maintenance.defragmentation`).
//!
//! A member is due once the reclaimable part of its database (`dbSize - dbSizeInUse`, from its
//! Status) reaches the threshold percentage and the database is at least the minimum size.
//! Members are defragmented one per reconcile — the call returns once that member is done, so
//! two never run at once — followers first (by name), the leader last, and only while the
//! cluster passes the health gate (every member healthy, a leader, no alarm, HashKV agreed, no
//! learner). A defragmented member is no longer due (its free space is gone), so the next
//! reconcile picks the next one, and the workflow ends when none is due.
//!
//! Compaction (`spec.maintenance.compaction`) needs no planning: it is rendered into the
//! members' `--auto-compaction-*` flags and the leader runs it.

use super::{health_gate, Action, ClusterView, Ctx, MemberView, Next, Step};
use crate::crd::{DefragmentationSpec, WorkflowKind, WorkflowStep};

/// Whether `m` should be defragmented under `spec`.
pub fn due(spec: &DefragmentationSpec, m: &MemberView) -> bool {
    let free = m.db_size.saturating_sub(m.db_size_in_use);
    m.db_size > 0
        && m.db_size >= spec.min_db_size_bytes
        && free.saturating_mul(100) >= i64::from(spec.free_percent_threshold) * m.db_size
}

pub(super) fn defragment(ctx: &Ctx<'_>, view: &ClusterView) -> Option<Next> {
    let spec = ctx.spec.maintenance.as_ref()?.defragmentation.as_ref()?;
    let member = view
        .members
        .iter()
        .filter(|m| !m.is_learner && due(spec, m))
        .min_by_key(|m| (Some(m.id) == view.leader, ctx.member_name(m)))?;
    let name = ctx.member_name(member);
    let step = |action| {
        Step::new(
            WorkflowKind::Maintenance,
            WorkflowStep::Defragment,
            "defragment",
            action,
        )
        .member(name.clone())
    };
    if let Err(reason) = health_gate(ctx, view) {
        return Some(Next::Step(step(Action::WaitFor(reason))));
    }
    Some(Next::Step(step(Action::Defragment {
        member: name.clone(),
        id: member.id,
    })))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;
    use super::*;

    const MIB: i64 = 1 << 20;

    fn sizes(mut f: Fixture, sizes: &[(i32, i64, i64)]) -> Fixture {
        for (i, size, in_use) in sizes {
            let name = names().pod_name(*i);
            if let Some(view) = f.observed.cluster.as_mut() {
                for m in view.members.iter_mut().filter(|m| m.name == name) {
                    m.db_size = *size;
                    m.db_size_in_use = *in_use;
                }
            }
        }
        f
    }

    fn with_defrag(mut f: Fixture, percent: i32, min: i64) -> Fixture {
        f.cluster.spec.maintenance = Some(crate::crd::MaintenanceSpec {
            compaction: None,
            defragmentation: Some(DefragmentationSpec {
                free_percent_threshold: percent,
                min_db_size_bytes: min,
            }),
        });
        f
    }

    fn defrag(i: i32) -> Action {
        Action::Defragment {
            member: names().pod_name(i),
            id: id(i),
        }
    }

    #[test]
    fn due_members() {
        let spec = DefragmentationSpec {
            free_percent_threshold: 50,
            min_db_size_bytes: 64 * MIB,
        };
        let m = |size, in_use| MemberView {
            db_size: size,
            db_size_in_use: in_use,
            ..Fixture::new(3, "1.2.0")
                .observed
                .cluster
                .map(|v| v.members[0].clone())
                .expect("a member")
        };
        assert!(due(&spec, &m(100 * MIB, 50 * MIB)), "exactly half free");
        assert!(!due(&spec, &m(100 * MIB, 51 * MIB)), "less than half free");
        assert!(!due(&spec, &m(60 * MIB, 0)), "below the minimum size");
        assert!(!due(&spec, &m(0, 0)), "not reported");
        assert!(!due(&spec, &m(100 * MIB, 120 * MIB)), "in use above size");
    }

    #[test]
    fn defragmentation() {
        // Leader is demo-0 in the fixture.
        let all_due = &[
            (0, 200 * MIB, 20 * MIB),
            (1, 200 * MIB, 20 * MIB),
            (2, 200 * MIB, 20 * MIB),
        ];
        let cases: Vec<(&str, Fixture, Action)> = vec![
            (
                "not asked for: nothing",
                sizes(Fixture::new(3, "1.2.0"), all_due),
                Action::Done,
            ),
            (
                "every member due: a follower first",
                with_defrag(sizes(Fixture::new(3, "1.2.0"), all_due), 50, 64 * MIB),
                defrag(1),
            ),
            (
                "followers done: the leader last",
                with_defrag(
                    sizes(
                        Fixture::new(3, "1.2.0"),
                        &[
                            (0, 200 * MIB, 20 * MIB),
                            (1, 30 * MIB, 20 * MIB),
                            (2, 30 * MIB, 20 * MIB),
                        ],
                    ),
                    50,
                    64 * MIB,
                ),
                defrag(0),
            ),
            (
                "the leader elsewhere: the other follower goes before it",
                with_defrag(
                    sizes(Fixture::new(3, "1.2.0").leader(2), all_due),
                    50,
                    64 * MIB,
                ),
                defrag(0),
            ),
            (
                "below the threshold: nothing",
                with_defrag(sizes(Fixture::new(3, "1.2.0"), all_due), 95, 64 * MIB),
                Action::Done,
            ),
            (
                "a member unhealthy: wait",
                with_defrag(
                    sizes(Fixture::new(3, "1.2.0").unhealthy(2), all_due),
                    50,
                    64 * MIB,
                ),
                Action::WaitFor(WaitReason::MemberUnhealthy {
                    member: "demo-2".into(),
                }),
            ),
            (
                "an alarm: wait",
                with_defrag(
                    sizes(Fixture::new(3, "1.2.0").alarm("NOSPACE"), all_due),
                    50,
                    64 * MIB,
                ),
                Action::WaitFor(WaitReason::Alarms {
                    alarms: vec!["NOSPACE".into()],
                }),
            ),
            (
                "an upgrade goes first",
                with_defrag(
                    sizes(Fixture::new(3, "1.2.0").spec_version("1.3.0"), all_due),
                    50,
                    64 * MIB,
                ),
                Action::DeletePodForUpgrade {
                    member: "demo-2".into(),
                },
            ),
        ];
        for (case, fixture, want) in cases {
            let d = fixture.plan();
            assert_eq!(d.action, want, "{case}");
            if matches!(want, Action::Defragment { .. }) {
                let wf = d.workflow.as_ref().expect("recorded");
                assert_eq!(
                    (wf.kind, wf.step),
                    (WorkflowKind::Maintenance, WorkflowStep::Defragment),
                    "{case}"
                );
                assert_eq!(d.phase(), crate::crd::Phase::Maintenance, "{case}");
            }
        }
    }
}
