//! Auto compaction, as etcd's `--auto-compaction-mode` / `--auto-compaction-retention`.
//!
//! Two policies decide *when* and *to which revision* to compact; the task ([`run`]) asks them
//! on a timer and proposes a `Compact` through Raft, so every member compacts at the same
//! revision. Only the leader proposes (as in etcd, where the compactor is paused on
//! followers); every member samples revisions, so a new leader already knows the history.
//!
//! - [`Periodic`] keeps the history of the last `period`: every `min(period, 1h) / 10` it
//!   samples the current revision; once at least `period` has passed since it started, and at
//!   most every `min(period, 1h)`, it compacts to the newest sample taken `period` ago or
//!   earlier. A retention of `1h` compacts every hour to the revision of an hour ago; `10m`
//!   every 10 minutes to the revision of 10 minutes ago.
//! - [`Revisions`] keeps the last `n` revisions: every check interval (5 minutes, as etcd) it
//!   compacts to `current - n` when that is past the last compaction.
//!
//! Both are pure (time and revisions are passed in) and unit-tested below.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::apply::command::Command;
use crate::apply::ApplyError;
use metastore_proto::etcdserverpb::CompactionRequest;

use super::node::NodeRef;

/// `--auto-compaction-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoCompactionMode {
    /// Keep the history of a period of time (`--auto-compaction-retention` is a duration).
    Periodic,
    /// Keep a number of revisions (`--auto-compaction-retention` is a count).
    Revision,
}

/// A parsed retention: what to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// The history of the last period.
    Period(Duration),
    /// The last `n` revisions.
    Revisions(i64),
}

impl Retention {
    /// Parses `--auto-compaction-retention` for `mode`, as etcd does: periodic takes a
    /// duration (`1h`, `30m`, `90s`) or a bare number of hours; revision takes a count.
    /// `Ok(None)` for zero: auto compaction is off.
    pub fn parse(mode: AutoCompactionMode, text: &str) -> Result<Option<Self>, String> {
        let text = text.trim();
        let retention = match mode {
            AutoCompactionMode::Periodic => {
                let period = match text.parse::<u64>() {
                    Ok(hours) => Duration::from_secs(hours.saturating_mul(3600)),
                    Err(_) => humantime::parse_duration(text).map_err(|e| {
                        format!(
                            "--auto-compaction-retention={text}: not a duration or a number \
                             of hours ({e})"
                        )
                    })?,
                };
                (!period.is_zero()).then_some(Retention::Period(period))
            }
            AutoCompactionMode::Revision => {
                let n = text
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| {
                        format!(
                            "--auto-compaction-retention={text}: revision mode takes a \
                         non-negative number of revisions"
                        )
                    })?;
                (n > 0).then_some(Retention::Revisions(n))
            }
        };
        Ok(retention)
    }
}

/// etcd compacts at most once an hour in periodic mode, whatever the period.
const MAX_PERIODIC_INTERVAL: Duration = Duration::from_secs(3600);
/// Samples per compaction interval in periodic mode (etcd's `retryDivisor`).
const SAMPLES_PER_INTERVAL: u32 = 10;

/// The periodic policy (see the module doc).
#[derive(Debug)]
pub struct Periodic {
    period: Duration,
    started: Instant,
    /// `(when, revision)`, oldest first; only what may still become a target is kept.
    samples: VecDeque<(Instant, i64)>,
    last_compaction: Option<Instant>,
    last_revision: i64,
}

impl Periodic {
    pub fn new(period: Duration, now: Instant) -> Self {
        Periodic {
            period,
            started: now,
            samples: VecDeque::new(),
            last_compaction: None,
            last_revision: 0,
        }
    }

    /// How often to compact at most: the period, capped at an hour.
    pub fn interval(&self) -> Duration {
        self.period.min(MAX_PERIODIC_INTERVAL)
    }

    /// How often [`Periodic::tick`] should be called.
    pub fn sample_every(&self) -> Duration {
        (self.interval() / SAMPLES_PER_INTERVAL).max(Duration::from_millis(1))
    }

    /// Records `revision` as current at `now`; returns the revision to compact to, if it is
    /// time. Call [`Periodic::compacted`] once that compaction went through.
    pub fn tick(&mut self, now: Instant, revision: i64) -> Option<i64> {
        self.samples.push_back((now, revision));
        if now.saturating_duration_since(self.started) < self.period {
            return None;
        }
        if self
            .last_compaction
            .is_some_and(|at| now.saturating_duration_since(at) < self.interval())
        {
            return None;
        }
        // The newest sample at least `period` old; older ones can never be a target again.
        let cutoff = now.checked_sub(self.period)?;
        while self.samples.get(1).is_some_and(|(at, _)| *at <= cutoff) {
            self.samples.pop_front();
        }
        let (at, target) = *self.samples.front()?;
        (at <= cutoff && target > self.last_revision).then_some(target)
    }

    /// A compaction to `revision` succeeded (or the store was already compacted past it).
    pub fn compacted(&mut self, now: Instant, revision: i64) {
        self.last_compaction = Some(now);
        self.last_revision = self.last_revision.max(revision);
    }
}

/// The revision-count policy (see the module doc).
#[derive(Debug)]
pub struct Revisions {
    keep: i64,
    last_revision: i64,
}

impl Revisions {
    pub fn new(keep: i64) -> Self {
        Revisions {
            keep,
            last_revision: 0,
        }
    }

    /// The revision to compact to when `current` is the store's revision, if any.
    pub fn tick(&self, current: i64) -> Option<i64> {
        let target = current - self.keep;
        (target > 0 && target > self.last_revision).then_some(target)
    }

    /// A compaction to `revision` succeeded (or the store was already compacted past it).
    pub fn compacted(&mut self, revision: i64) {
        self.last_revision = self.last_revision.max(revision);
    }
}

/// The auto compactor of one member: samples on every member, proposes on the leader.
pub async fn run(node: NodeRef, retention: Retention, revision_check_interval: Duration) {
    enum Policy {
        Periodic(Periodic),
        Revisions(Revisions),
    }
    let (mut policy, every) = match retention {
        Retention::Period(period) => {
            let p = Periodic::new(period, Instant::now());
            let every = p.sample_every();
            (Policy::Periodic(p), every)
        }
        Retention::Revisions(n) => (
            Policy::Revisions(Revisions::new(n)),
            revision_check_interval,
        ),
    };
    tracing::info!(?retention, ?every, "auto compaction on");
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(node) = node.get() else { return };
        let now = Instant::now();
        let current = node.store.current_revision();
        let target = match &mut policy {
            Policy::Periodic(p) => p.tick(now, current),
            Policy::Revisions(r) => r.tick(current),
        };
        let Some(target) = target else { continue };
        if !node.replica.is_leader() {
            continue;
        }
        let request = CompactionRequest {
            revision: target,
            physical: false,
        };
        let ok = match node.propose(Command::Compact(request)).await {
            Ok(_) => {
                tracing::info!(revision = target, "auto compaction: compacted");
                node.metrics.auto_compactions.inc();
                true
            }
            // Someone compacted past it already: as good as done.
            Err(ApplyError::Mvcc(crate::mvcc::Error::Compacted)) => true,
            Err(error) => {
                tracing::warn!(revision = target, %error, "auto compaction failed; will retry");
                false
            }
        };
        if ok {
            match &mut policy {
                Policy::Periodic(p) => p.compacted(now, target),
                Policy::Revisions(r) => r.compacted(target),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn retention_parses_as_etcd() {
        use AutoCompactionMode::*;
        let p = |m, t| Retention::parse(m, t);
        assert_eq!(p(Periodic, "0"), Ok(None));
        assert_eq!(p(Periodic, "1"), Ok(Some(Retention::Period(3600 * SEC))));
        assert_eq!(p(Periodic, "30m"), Ok(Some(Retention::Period(1800 * SEC))));
        assert_eq!(
            p(Periodic, "1h30m"),
            Ok(Some(Retention::Period(5400 * SEC)))
        );
        assert_eq!(p(Periodic, "2s"), Ok(Some(Retention::Period(2 * SEC))));
        assert!(p(Periodic, "soon")
            .expect_err("not a duration")
            .contains("soon"));
        assert_eq!(p(Revision, "0"), Ok(None));
        assert_eq!(p(Revision, "1000"), Ok(Some(Retention::Revisions(1000))));
        assert!(p(Revision, "-1").is_err());
        assert!(p(Revision, "1h").is_err());
    }

    #[test]
    fn periodic_intervals_follow_etcd() {
        let t0 = Instant::now();
        let p = Periodic::new(600 * SEC, t0);
        assert_eq!((p.interval(), p.sample_every()), (600 * SEC, 60 * SEC));
        let p = Periodic::new(5 * 3600 * SEC, t0);
        assert_eq!((p.interval(), p.sample_every()), (3600 * SEC, 360 * SEC));
    }

    /// Revision grows by 10 a second; period 10 s, sampled every second.
    #[test]
    fn periodic_compacts_to_the_revision_of_one_period_ago() {
        let t0 = Instant::now();
        let mut p = Periodic::new(10 * SEC, t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        let rev = |s: u64| 1 + 10 * s as i64;
        // Nothing before a whole period has passed.
        for s in 0..10 {
            assert_eq!(p.tick(at(s), rev(s)), None, "at {s} s");
        }
        // At 10 s: the revision of 0 s.
        assert_eq!(p.tick(at(10), rev(10)), Some(rev(0)));
        p.compacted(at(10), rev(0));
        // Not again before an interval (10 s) has passed.
        for s in 11..20 {
            assert_eq!(p.tick(at(s), rev(s)), None, "at {s} s");
        }
        // At 20 s: the revision of 10 s.
        assert_eq!(p.tick(at(20), rev(20)), Some(rev(10)));
        // Not compacted (the proposal failed): asked again on the next tick, one period back.
        assert_eq!(p.tick(at(21), rev(21)), Some(rev(11)));
        p.compacted(at(21), rev(11));
        // Only the samples that can still be targets are kept.
        assert!(p.samples.len() <= 11, "{}", p.samples.len());
    }

    #[test]
    fn periodic_does_not_compact_an_idle_store_twice() {
        let t0 = Instant::now();
        let mut p = Periodic::new(2 * SEC, t0);
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut target = None;
        for m in (0..=2000).step_by(200) {
            target = p.tick(ms(m), 5);
        }
        assert_eq!(target, Some(5));
        p.compacted(ms(2000), 5);
        for m in (2200..=6000).step_by(200) {
            assert_eq!(p.tick(ms(m), 5), None, "at {m} ms: nothing new to compact");
        }
        assert_eq!(p.tick(ms(6200), 9), None, "9 is not two seconds old yet");
        assert_eq!(p.tick(ms(8200), 9), Some(9));
    }

    #[test]
    fn revisions_keeps_the_last_n() {
        let mut r = Revisions::new(100);
        assert_eq!(r.tick(50), None);
        assert_eq!(r.tick(100), None);
        assert_eq!(r.tick(101), Some(1));
        assert_eq!(r.tick(350), Some(250));
        r.compacted(250);
        assert_eq!(r.tick(350), None);
        assert_eq!(r.tick(351), Some(251));
    }
}
