//! Backups: when to start one, and what the status records of them, as a pure function of the
//! spec, the recorded status, the backup Jobs that exist and the time.
//!
//! Backups run beside the workflows (`plan`'s one action per reconcile): a backup only reads
//! from the cluster, and `metastore-ctl backup` picks a healthy member itself (a follower by
//! preference). At most one backup Job runs at a time. A schedule that was missed (operator
//! down, cluster unhealthy) runs once when it can, not once per missed slot.

use std::str::FromStr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use crate::crd::{BackupPhase, BackupRecord, BackupTrigger, MetaStoreCluster};

/// Backups kept in `status.backups`.
pub const MAX_RECORDS: usize = 10;

/// A backup Job as observed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackupJobView {
    /// The Job's (and the backup's) name.
    pub name: String,
    /// It completed.
    pub succeeded: bool,
    /// It failed for good.
    pub failed: bool,
    /// The manifest its container left as termination message, once it succeeded.
    pub manifest: Option<Manifest>,
    /// Why it failed, when known.
    pub message: Option<String>,
}

impl BackupJobView {
    /// Takes what the Job's container left as termination message: the manifest (one line of
    /// JSON) of a backup that succeeded, the reason of one that failed.
    pub fn read_termination_message(&mut self, message: Option<String>) {
        if self.succeeded {
            self.manifest = message.and_then(|m| serde_json::from_str(m.trim()).ok());
        } else if self.failed {
            self.message = message;
        }
    }
}

/// Whether a backup may start: the cluster answers and has a leader with a healthy voter.
pub fn cluster_ready(view: Option<&crate::plan::ClusterView>) -> bool {
    view.is_some_and(|v| v.leader.is_some() && v.healthy_voter_count() > 0)
}

/// The fields of `metastore-ctl backup`'s manifest the status records.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct Manifest {
    pub revision: i64,
    pub size_bytes: i64,
    pub sha256: String,
    pub member: String,
    pub storage_format: i32,
    pub duration_seconds: f64,
}

/// A backup to start now.
#[derive(Clone, Debug, PartialEq)]
pub struct BackupStart {
    /// Its name (Job and files).
    pub name: String,
    /// Why.
    pub trigger: BackupTrigger,
}

/// What the reconcile does about backups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BackupPlan {
    /// The Job to create, if any.
    pub start: Option<BackupStart>,
    /// `status.backups` after this reconcile.
    pub records: Vec<BackupRecord>,
    /// Records that finished on this reconcile (for Events and metrics).
    pub finished: Vec<BackupRecord>,
    /// `status.lastScheduledBackup` after this reconcile.
    pub last_scheduled: Option<Time>,
    /// `status.lastBackupRequest` after this reconcile.
    pub last_request: Option<String>,
    /// When the schedule next fires (to requeue for it).
    pub next_scheduled: Option<Timestamp>,
    /// `spec.backup.schedule` could not be parsed.
    pub schedule_error: Option<String>,
}

impl BackupPlan {
    /// Writes the backup fields of `status` (`backups`, `lastScheduledBackup`,
    /// `lastBackupRequest`) as this plan leaves them.
    pub fn record_in(&self, status: &mut crate::crd::MetaStoreClusterStatus) {
        status.backups = self.records.clone();
        status.last_scheduled_backup = self.last_scheduled.clone();
        status.last_backup_request = self.last_request.clone();
    }
}

/// The next time `schedule` (5-field cron, UTC) fires strictly after `after`.
pub fn next_after(schedule: &str, after: Timestamp) -> Result<Timestamp, String> {
    let fields = schedule.split_whitespace().count();
    if fields != 5 {
        return Err(format!(
            "schedule {schedule:?}: 5 fields expected (minute hour day-of-month month day-of-week), got {fields}"
        ));
    }
    let cron =
        croner::Cron::from_str(schedule).map_err(|e| format!("schedule {schedule:?}: {e}"))?;
    let at = chrono::DateTime::<chrono::Utc>::from_timestamp(after.as_second(), 0)
        .ok_or_else(|| format!("time {after} out of range"))?;
    let next = cron
        .find_next_occurrence(&at, false)
        .map_err(|e| format!("schedule {schedule:?}: {e}"))?;
    Timestamp::from_second(next.timestamp()).map_err(|e| e.to_string())
}

/// Plans the backups of `cluster`. `cluster_ready`: the cluster has a leader and a quorum (a
/// backup is not started otherwise; a due one waits).
pub fn plan(
    cluster: &MetaStoreCluster,
    jobs: &[BackupJobView],
    now: Timestamp,
    cluster_ready: bool,
) -> BackupPlan {
    let status = cluster.status.clone().unwrap_or_default();
    let mut out = BackupPlan {
        records: status.backups.clone(),
        last_scheduled: status.last_scheduled_backup.clone(),
        last_request: status.last_backup_request.clone(),
        ..Default::default()
    };
    // 1. What the Jobs say about the recorded backups.
    for job in jobs {
        let Some(r) = out.records.iter_mut().find(|r| r.name == job.name) else {
            continue;
        };
        if r.phase != BackupPhase::Running {
            continue;
        }
        if job.succeeded {
            r.phase = BackupPhase::Succeeded;
            r.completed_at = Some(Time(now));
            if let Some(m) = &job.manifest {
                r.revision = Some(m.revision);
                r.size_bytes = Some(m.size_bytes);
                r.sha256 = Some(m.sha256.clone());
                r.member = Some(m.member.clone());
                r.storage_format = Some(m.storage_format);
                r.duration_seconds = Some(m.duration_seconds);
            }
            out.finished.push(r.clone());
        } else if job.failed {
            r.phase = BackupPhase::Failed;
            r.completed_at = Some(Time(now));
            r.message = Some(
                job.message
                    .clone()
                    .unwrap_or_else(|| "the backup Job failed".into()),
            );
            out.finished.push(r.clone());
        }
    }
    // A running record whose Job is gone (deleted by hand) failed.
    for r in out.records.iter_mut() {
        if r.phase == BackupPhase::Running && !jobs.iter().any(|j| j.name == r.name) {
            r.phase = BackupPhase::Failed;
            r.completed_at = Some(Time(now));
            r.message = Some("its Job is gone".into());
            out.finished.push(r.clone());
        }
    }

    let Some(spec) = cluster.spec.backup.as_ref() else {
        return out;
    };
    // 2. The schedule's next slot, from the last scheduled run (or the cluster's creation).
    let since = out
        .last_scheduled
        .as_ref()
        .map(|t| t.0)
        .or_else(|| cluster.metadata.creation_timestamp.as_ref().map(|t| t.0))
        .unwrap_or(now);
    let due = match spec.schedule.as_deref() {
        Some(s) => match next_after(s, since) {
            Ok(next) if next <= now => {
                out.next_scheduled = next_after(s, now).ok();
                true
            }
            Ok(next) => {
                out.next_scheduled = Some(next);
                false
            }
            Err(e) => {
                out.schedule_error = Some(e);
                false
            }
        },
        None => false,
    };
    let requested = spec
        .request
        .as_ref()
        .filter(|r| out.last_request.as_ref() != Some(r));

    // 3. Start one if asked or due, the cluster can serve it, and none runs.
    let running = out.records.iter().any(|r| r.phase == BackupPhase::Running)
        || jobs.iter().any(|j| !j.succeeded && !j.failed);
    if running || !cluster_ready || (requested.is_none() && !due) {
        return out;
    }
    let name = crate::naming::ClusterNames::new(
        &cluster.metadata.name.clone().unwrap_or_default(),
        "",
        false,
        false,
    )
    .backup(now.as_second());
    if out.records.iter().any(|r| r.name == name) {
        return out; // one per second at most
    }
    let trigger = if let Some(r) = requested {
        out.last_request = Some(r.clone());
        BackupTrigger::Requested
    } else {
        BackupTrigger::Scheduled
    };
    if due {
        // A request served while the schedule is due counts for both.
        out.last_scheduled = Some(Time(now));
    }
    out.records
        .push(BackupRecord::running(name.clone(), trigger, Time(now)));
    let excess = out.records.len().saturating_sub(MAX_RECORDS);
    out.records.drain(..excess);
    out.start = Some(BackupStart { name, trigger });
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;
    use crate::crd::{BackupSpec, MetaStoreClusterStatus};
    use crate::plan::fixtures::Fixture;

    /// 2023-11-14T22:13:20Z.
    fn t0() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn at(t: Timestamp, secs: i64) -> Timestamp {
        t.checked_add(SignedDuration::from_secs(secs))
            .unwrap_or(Timestamp::MAX)
    }

    fn cluster(schedule: Option<&str>, request: Option<&str>) -> MetaStoreCluster {
        let mut c = Fixture::new(3, "1.3.0").cluster;
        c.metadata.name = Some("demo".into());
        c.metadata.creation_timestamp = Some(Time(t0()));
        c.spec.backup = Some(BackupSpec {
            claim_name: "backups".into(),
            schedule: schedule.map(Into::into),
            keep: 7,
            request: request.map(Into::into),
        });
        c
    }

    fn with_status(
        mut c: MetaStoreCluster,
        f: impl FnOnce(&mut MetaStoreClusterStatus),
    ) -> MetaStoreCluster {
        let mut s = c.status.clone().unwrap_or_default();
        f(&mut s);
        c.status = Some(s);
        c
    }

    fn running(name: &str, started: Timestamp) -> BackupRecord {
        BackupRecord::running(name, BackupTrigger::Scheduled, Time(started))
    }

    #[test]
    fn cron_next_is_strictly_after_and_bad_schedules_are_named() {
        // t0 is 22:13:20 UTC: the next 03:00 is the following day.
        let next = next_after("0 3 * * *", t0()).expect("valid");
        assert_eq!(next.to_string(), "2023-11-15T03:00:00Z");
        assert_eq!(
            next_after("0 3 * * *", next).expect("valid").to_string(),
            "2023-11-16T03:00:00Z"
        );
        assert_eq!(
            next_after("*/15 * * * *", t0()).expect("valid").to_string(),
            "2023-11-14T22:15:00Z"
        );
        let e = next_after("0 3 * *", t0()).expect_err("4 fields");
        assert!(e.contains("5 fields expected"), "{e}");
        assert!(next_after("0 25 * * *", t0()).is_err());
        assert!(next_after("61 * * * *", t0()).is_err());
    }

    #[test]
    fn a_due_schedule_starts_one_backup_and_requeues_for_the_next_slot() {
        let c = cluster(Some("0 3 * * *"), None);
        // Before the first 03:00: nothing, requeue at 03:00.
        let p = plan(&c, &[], at(t0(), 3600), true);
        assert_eq!(p.start, None);
        assert_eq!(
            p.next_scheduled.map(|t| t.to_string()).as_deref(),
            Some("2023-11-15T03:00:00Z")
        );
        // At 03:00:30: started, recorded Running, next slot the day after.
        let now = Timestamp::from_second(1_700_017_230).expect("time");
        let p = plan(&c, &[], now, true);
        let start = p.start.clone().expect("due");
        assert_eq!(start.trigger, BackupTrigger::Scheduled);
        assert_eq!(start.name, format!("demo-backup-{}", now.as_second()));
        assert_eq!(p.records.len(), 1);
        assert_eq!(p.records[0].phase, BackupPhase::Running);
        assert_eq!(p.last_scheduled, Some(Time(now)));
        assert_eq!(
            p.next_scheduled.map(|t| t.to_string()).as_deref(),
            Some("2023-11-16T03:00:00Z")
        );
        // Three days of missed slots: one backup, not three.
        let late = at(now, 3 * 86_400);
        let c2 = with_status(cluster(Some("0 3 * * *"), None), |s| {
            s.last_scheduled_backup = Some(Time(now));
        });
        let p = plan(&c2, &[], late, true);
        assert!(p.start.is_some());
        assert_eq!(p.last_scheduled, Some(Time(late)));
    }

    #[test]
    fn nothing_starts_while_one_runs_or_the_cluster_is_not_ready() {
        let now = Timestamp::from_second(1_700_017_230).expect("time");
        let c = cluster(Some("0 3 * * *"), None);
        assert_eq!(plan(&c, &[], now, false).start, None, "cluster not ready");
        let c = with_status(c, |s| s.backups = vec![running("demo-backup-1", t0())]);
        let job = BackupJobView {
            name: "demo-backup-1".into(),
            ..Default::default()
        };
        let p = plan(&c, &[job], now, true);
        assert_eq!(p.start, None, "one at a time");
        assert!(p.finished.is_empty());
    }

    #[test]
    fn a_new_request_value_starts_one_backup_once() {
        let c = cluster(None, Some("2026-12-02"));
        let p = plan(&c, &[], t0(), true);
        assert_eq!(
            p.start.as_ref().map(|s| s.trigger),
            Some(BackupTrigger::Requested)
        );
        assert_eq!(p.last_request.as_deref(), Some("2026-12-02"));
        assert_eq!(p.next_scheduled, None);
        // Recorded: the same value again does nothing.
        let c = with_status(c, |s| s.last_backup_request = Some("2026-12-02".into()));
        assert_eq!(plan(&c, &[], at(t0(), 60), true).start, None);
        // No spec.backup at all: nothing, records kept.
        let mut c = with_status(c, |s| s.backups = vec![running("x", t0())]);
        c.spec.backup = None;
        let p = plan(
            &c,
            &[BackupJobView {
                name: "x".into(),
                ..Default::default()
            }],
            t0(),
            true,
        );
        assert_eq!(p.start, None);
        assert_eq!(p.records.len(), 1);
    }

    #[test]
    fn finished_jobs_complete_their_records() {
        let c = with_status(cluster(None, None), |s| {
            s.backups = vec![
                running("demo-backup-1", t0()),
                running("demo-backup-2", t0()),
                running("demo-backup-3", t0()),
            ];
        });
        let manifest = Manifest {
            revision: 4242,
            size_bytes: 1 << 20,
            sha256: "ab".repeat(32),
            member: "demo-1".into(),
            storage_format: 2,
            duration_seconds: 1.5,
        };
        let jobs = [
            BackupJobView {
                name: "demo-backup-1".into(),
                succeeded: true,
                manifest: Some(manifest.clone()),
                ..Default::default()
            },
            BackupJobView {
                name: "demo-backup-2".into(),
                failed: true,
                message: Some("no healthy member".into()),
                ..Default::default()
            },
        ];
        let now = at(t0(), 90);
        let p = plan(&c, &jobs, now, true);
        let [ok, failed, gone] = &p.records[..] else {
            panic!("{:?}", p.records)
        };
        assert_eq!(ok.phase, BackupPhase::Succeeded);
        assert_eq!((ok.revision, ok.size_bytes), (Some(4242), Some(1 << 20)));
        assert_eq!(ok.member.as_deref(), Some("demo-1"));
        assert_eq!(ok.completed_at, Some(Time(now)));
        assert_eq!(failed.phase, BackupPhase::Failed);
        assert_eq!(failed.message.as_deref(), Some("no healthy member"));
        assert_eq!(gone.phase, BackupPhase::Failed, "its Job was deleted");
        assert_eq!(p.finished.len(), 3);
        // Once recorded, a finished record is not reported again.
        let c = with_status(c, |s| s.backups = p.records.clone());
        assert!(plan(&c, &jobs, at(now, 10), true).finished.is_empty());
    }

    #[test]
    fn at_most_ten_records_are_kept() {
        let c = with_status(cluster(None, Some("now")), |s| {
            s.backups = (0..10)
                .map(|i| BackupRecord {
                    phase: BackupPhase::Succeeded,
                    ..running(&format!("demo-backup-{i}"), t0())
                })
                .collect();
        });
        let p = plan(&c, &[], at(t0(), 5), true);
        assert!(p.start.is_some());
        assert_eq!(p.records.len(), MAX_RECORDS);
        assert_eq!(p.records[0].name, "demo-backup-1", "the oldest dropped");
    }

    #[test]
    fn a_bad_schedule_is_reported_and_starts_nothing() {
        let c = cluster(Some("every day"), None);
        let p = plan(&c, &[], at(t0(), 86_400), true);
        assert_eq!(p.start, None);
        assert!(p.schedule_error.is_some());
    }
}
