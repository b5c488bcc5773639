//! The open-loop schedule behind `--rate`.
//!
//! A closed loop (send, wait for the answer, send again) slows down with the server and so hides
//! the very latency it should measure. Here request `n` (counted over all clients) is due at
//! `start + n / rate` whatever happened before. A requester still busy with its previous
//! request when the next one falls due sends at once, and that request's latency is measured
//! from its due time: the time it waited for the server counts. A requester that is free
//! sleeps until the due time and is timed from when it wakes: tokio's timer fires on a
//! 1 ms tick, so a sleep ends up to 1–2 ms after the instant asked for, and timing those
//! requests from their due time put the tool's own timer into every figure (a lone put here
//! takes ~0.1 ms, yet every server's put-rate p99 read ~2 ms; docs/PERFORMANCE.md, session
//! 52). With `--rate 0` there is no schedule and each request is timed from when it is sent.

use std::time::{Duration, Instant};

/// When each request of a run is due.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    /// Nanoseconds between two requests; `None` = unlimited.
    interval_ns: Option<f64>,
}

impl Schedule {
    /// A schedule of `rate` requests per second from `start` (`rate <= 0`: unlimited).
    pub fn new(rate: f64, start: Instant) -> Self {
        let interval_ns = (rate > 0.0).then(|| 1e9 / rate);
        Self { start, interval_ns }
    }

    /// The instant request `seq` is due, or `None` when the rate is unlimited.
    pub fn due(&self, seq: u64) -> Option<Instant> {
        self.interval_ns
            .map(|ns| self.start + Duration::from_nanos((ns * seq as f64) as u64))
    }

    /// Waits until request `seq` may be sent and returns the instant its latency counts
    /// from: its due time when that has already passed (the requester was kept busy), else
    /// the end of the sleep (the timer's lateness is the tool's, not the server's); now, when
    /// the rate is unlimited.
    pub async fn wait(&self, seq: u64) -> Instant {
        let Some(due) = self.due(seq) else {
            return Instant::now();
        };
        if Instant::now() >= due {
            return due;
        }
        tokio::time::sleep_until(due.into()).await;
        Instant::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_has_no_due_times() {
        let s = Schedule::new(0.0, Instant::now());
        assert_eq!(s.due(0), None);
        assert_eq!(s.due(1_000_000), None);
    }

    #[test]
    fn due_times_are_evenly_spaced_from_start() {
        let start = Instant::now();
        let s = Schedule::new(100.0, start);
        assert_eq!(s.due(0), Some(start));
        assert_eq!(s.due(1), Some(start + Duration::from_millis(10)));
        assert_eq!(s.due(250), Some(start + Duration::from_millis(2500)));
    }

    #[tokio::test]
    async fn a_late_request_counts_from_its_due_time() {
        // Started a second ago at 100/s: request 5 was due 950 ms ago.
        let start = Instant::now() - Duration::from_secs(1);
        let s = Schedule::new(100.0, start);
        assert_eq!(s.wait(5).await, start + Duration::from_millis(50));
    }

    #[tokio::test]
    async fn an_early_request_counts_from_when_it_is_sent() {
        let start = Instant::now();
        let s = Schedule::new(100.0, start);
        let due = start + Duration::from_millis(30);
        let t0 = s.wait(3).await;
        let after = Instant::now();
        // Not before its due time, and not from it either: from the end of the sleep.
        assert!(t0 > due, "{t0:?} is not after {due:?}");
        assert!(t0 <= after);
    }

    #[tokio::test]
    async fn without_a_rate_a_request_counts_from_now() {
        let before = Instant::now();
        let t0 = Schedule::new(0.0, before).wait(7).await;
        assert!(t0 >= before && t0 <= Instant::now());
    }

    #[test]
    fn fractional_rates_do_not_drift() {
        let start = Instant::now();
        let s = Schedule::new(3.0, start);
        // 3 per second: request 3_000 is due at exactly 1_000 s, not 3_000 × 333 ms.
        let due = s.due(3_000).map(|d| d - start);
        let due = due.map(|d| d.as_secs_f64()).unwrap_or_default();
        assert!((due - 1000.0).abs() < 1e-3, "{due}");
    }
}
