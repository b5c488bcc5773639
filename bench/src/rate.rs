//! The open-loop schedule behind `--rate`.
//!
//! A closed loop (send, wait for the answer, send again) slows down with the server and so hides
//! the very latency it should measure. Here request `n` (counted over all clients) is due at
//! `start + n / rate` whatever happened before; a requester that is late sends at once, and the
//! latency is measured from the due time. With `--rate 0` there is no schedule and each request
//! is timed from when it is sent.

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
