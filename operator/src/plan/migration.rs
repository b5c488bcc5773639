//! Storage format migration.
//!
//! Raising `spec.storage.formatVersion` moves the cluster one format at a time, and only once
//! every member runs a binary that supports the next format (so an upgrade requested together
//! with it goes first). The move itself is a Job running `metastore-ctl migrate --to N --wait`
//! against the client Service; the format is read back from the members, not assumed from the
//! Job's success: the migration is done once every member writes the new format and reports no
//! record left in an older one ([`ClusterView::settled_format_version`]). A failed Job stops
//! the workflow as Degraded: read its logs, fix the cause and delete the Job to retry.
//!
//! What each member supports and writes comes from its Status (`supported_storage_formats`,
//! `storage_format`, `storage_migration_pending`); a member that reports no supported formats
//! (an older server) supports no migration.

use super::{
    health_gate, Action, ClusterView, Ctx, DegradedReason, Next, Refusal, Step, WaitReason,
};
use crate::crd::{WorkflowKind, WorkflowStep};

fn job_step(to: i32, action: Action) -> Step {
    Step::new(
        WorkflowKind::Migration,
        WorkflowStep::RunMigrationJob,
        to.to_string(),
        action,
    )
}

/// A migration Job that has not finished is waited for before anything else moves.
pub(super) fn running_job(ctx: &Ctx<'_>, view: &ClusterView) -> Option<Next> {
    let job = ctx.observed.migration_job.as_ref()?;
    let to = job.target_format;
    if job.failed {
        // Not latched in the record: the failed Job itself holds the workflow until it is
        // deleted, and deleting it is how the user retries.
        let action = Action::MarkDegraded(DegradedReason::MigrationFailed { to });
        return Some(Next::Step(job_step(to, action)));
    }
    let reached = view.settled_format_version().is_some_and(|f| f >= to);
    if job.succeeded && reached {
        return None;
    }
    // Running, or done but the members do not report the new format yet.
    Some(Next::Step(job_step(
        to,
        Action::WaitFor(WaitReason::MigrationJob { to }),
    )))
}

/// Start the migration to the next format when the spec asks for a higher one.
pub(super) fn migrate(ctx: &Ctx<'_>, view: &ClusterView) -> Option<Next> {
    let target = ctx.spec.storage.format_version;
    let current = view.format_version()?;
    if current >= target {
        return None;
    }
    let to = current + 1;
    if let Some(m) = view
        .members
        .iter()
        .find(|m| !m.supported_formats.contains(&to))
    {
        return Some(Next::Refuse(Refusal::FormatUnsupported {
            member: ctx.member_name(m),
            to,
        }));
    }
    if let Err(reason) = health_gate(ctx, view) {
        return Some(Next::Step(job_step(to, Action::WaitFor(reason))));
    }
    if let Some(m) = view.reencoding_member() {
        let reason = WaitReason::Reencoding {
            member: ctx.member_name(m),
        };
        return Some(Next::Step(job_step(to, Action::WaitFor(reason))));
    }
    let step = job_step(to, Action::StartMigrationJob { to }).from(Some(current.to_string()));
    Some(Next::Step(step))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;

    #[test]
    fn format_migration() {
        // (case, fixture, expected action)
        let cases: Vec<(&str, Fixture, Action)> = vec![
            (
                "format 1 -> 2, every binary supports it: start the Job",
                Fixture::new(3, "1.3.0").spec_format(2),
                Action::StartMigrationJob { to: 2 },
            ),
            (
                "a member's binary lacks format 2: refuse",
                Fixture::new(3, "1.3.0").spec_format(2).supported(1, &[1]),
                Action::RefuseWithCondition(Refusal::FormatUnsupported {
                    member: "demo-1".into(),
                    to: 2,
                }),
            ),
            (
                "upgrade requested with it: the upgrade goes first",
                Fixture::new(3, "1.2.0")
                    .spec_version("1.3.0")
                    .spec_format(2),
                Action::DeletePodForUpgrade {
                    member: "demo-2".into(),
                },
            ),
            (
                "cluster unhealthy: wait",
                Fixture::new(3, "1.3.0").spec_format(2).unhealthy(1),
                Action::WaitFor(WaitReason::MemberUnhealthy {
                    member: "demo-1".into(),
                }),
            ),
            (
                "Job running: wait",
                Fixture::new(3, "1.3.0").spec_format(2).job(2, false, false),
                Action::WaitFor(WaitReason::MigrationJob { to: 2 }),
            ),
            (
                "Job running holds back a scale",
                Fixture::new(3, "1.3.0")
                    .spec_format(2)
                    .spec_replicas(5)
                    .job(2, false, false),
                Action::WaitFor(WaitReason::MigrationJob { to: 2 }),
            ),
            (
                "Job done, members not reporting format 2 yet",
                Fixture::new(3, "1.3.0").spec_format(2).job(2, true, false),
                Action::WaitFor(WaitReason::MigrationJob { to: 2 }),
            ),
            (
                "Job done, members write format 2 but one still re-encodes",
                Fixture::new(3, "1.3.0")
                    .spec_format(2)
                    .job(2, true, false)
                    .format(2)
                    .reencoding(2),
                Action::WaitFor(WaitReason::MigrationJob { to: 2 }),
            ),
            (
                "Job done and format 2 reported: done",
                Fixture::new(3, "1.3.0")
                    .spec_format(2)
                    .job(2, true, false)
                    .format(2),
                Action::Done,
            ),
            (
                "a member does not report its formats (an older server): refuse",
                Fixture::new(3, "1.3.0").spec_format(2).supported(2, &[]),
                Action::RefuseWithCondition(Refusal::FormatUnsupported {
                    member: "demo-2".into(),
                    to: 2,
                }),
            ),
            (
                "Job failed: Degraded",
                Fixture::new(3, "1.3.0").spec_format(2).job(2, false, true),
                Action::MarkDegraded(DegradedReason::MigrationFailed { to: 2 }),
            ),
            (
                "already at the target format",
                Fixture::new(3, "1.3.0").spec_format(2).format(2),
                Action::Done,
            ),
        ];
        for (case, fixture, want) in cases {
            let d = fixture.plan();
            assert_eq!(d.action, want, "{case}");
            if let Some(wf) = d
                .workflow
                .as_ref()
                .filter(|w| w.kind != WorkflowKind::Upgrade)
            {
                assert_eq!(wf.kind, WorkflowKind::Migration, "{case}");
                assert_eq!(wf.step, WorkflowStep::RunMigrationJob, "{case}");
                assert_eq!(wf.target, "2", "{case}");
                if !matches!(d.action, Action::MarkDegraded(_)) {
                    assert_eq!(d.phase(), Phase::Migrating, "{case}");
                }
            }
        }
    }

    #[test]
    fn failed_job_holds_until_deleted() {
        let mut f = Fixture::new(3, "1.3.0").spec_format(2).job(2, false, true);
        let d = f.plan_and_record();
        assert_eq!(d.phase(), Phase::Degraded);
        assert_eq!(
            f.plan().action,
            Action::MarkDegraded(DegradedReason::MigrationFailed { to: 2 })
        );
        f.observed.migration_job = None;
        assert_eq!(f.plan().action, Action::StartMigrationJob { to: 2 });
    }

    #[test]
    fn next_format_waits_for_reencoding_without_a_job() {
        // Format 2 written everywhere, demo-1 still converting, the spec asks for 3 (a future
        // format every binary here supports): the switch to 3 waits for demo-1.
        let mut f = Fixture::new(3, "1.3.0").format(2).reencoding(1);
        for i in 0..3 {
            f = f.supported(i, &[1, 2, 3]);
        }
        f.cluster.spec.storage.format_version = 3;
        assert_eq!(
            f.plan().action,
            Action::WaitFor(WaitReason::Reencoding {
                member: "demo-1".into()
            })
        );
        // At the target already: nothing to do while the member finishes on its own.
        let f = Fixture::new(3, "1.3.0")
            .spec_format(2)
            .format(2)
            .reencoding(1);
        assert_eq!(f.plan().action, Action::Done);
    }
}
