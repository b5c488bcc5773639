//! Latency statistics, the text report and the `--json` object.
//!
//! Latencies are recorded in microseconds into one `hdrhistogram` per operation kind (3
//! significant digits, 1 µs to 1 h), per requester, and merged at the end, so recording never
//! takes a lock.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Buckets of the text (and JSON) histogram.
pub const BUCKETS: usize = 10;

/// Collects the outcome of requests; one per requester, merged into one per run.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    ops: BTreeMap<&'static str, Histogram<u64>>,
    errors: BTreeMap<String, u64>,
}

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one successful operation of `kind` that took `latency`.
    pub fn record(&mut self, kind: &'static str, latency: Duration) {
        record_in(self.histogram(kind), latency);
    }

    /// The histogram of `kind`, to record many operations of it in a row (with
    /// [`record_in`]) without looking it up for each.
    pub fn histogram(&mut self, kind: &'static str) -> &mut Histogram<u64> {
        self.ops.entry(kind).or_insert_with(new_histogram)
    }

    /// Records one failed request, grouped by its message.
    pub fn error(&mut self, message: impl Into<String>) {
        *self.errors.entry(message.into()).or_default() += 1;
    }

    /// Records `n` failed requests with the same message (nothing when `n` is 0).
    pub fn error_n(&mut self, message: impl Into<String>, n: u64) {
        if n > 0 {
            *self.errors.entry(message.into()).or_default() += n;
        }
    }

    /// Adds everything `other` recorded.
    pub fn merge(&mut self, other: Recorder) {
        for (kind, h) in other.ops {
            match self.ops.get_mut(kind) {
                // Same bounds on both sides, so `add` cannot fail; saturate rather than panic.
                Some(mine) => {
                    if mine.add(&h).is_err() {
                        for v in h.iter_recorded() {
                            mine.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                        }
                    }
                }
                None => {
                    self.ops.insert(kind, h);
                }
            }
        }
        for (msg, n) in other.errors {
            *self.errors.entry(msg).or_default() += n;
        }
    }

    /// The report of a run of `workload` that took `elapsed`.
    pub fn report(&self, workload: &str, elapsed: Duration) -> Report {
        let secs = elapsed.as_secs_f64();
        let ops: BTreeMap<String, OpStats> = self
            .ops
            .iter()
            // A histogram taken with `histogram` may have stayed empty.
            .filter(|(_, h)| !h.is_empty())
            .map(|(k, h)| (k.to_string(), OpStats::new(h, secs)))
            .collect();
        Report {
            workload: workload.to_string(),
            elapsed_secs: secs,
            requests: ops.values().map(|o| o.count).sum(),
            errors: self.errors.values().sum(),
            error_messages: self.errors.clone(),
            ops,
        }
    }
}

/// Records one operation that took `latency` in a histogram of [`Recorder::histogram`].
pub fn record_in(h: &mut Histogram<u64>, latency: Duration) {
    h.saturating_record((latency.as_micros() as u64).max(1));
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h at 3 significant digits: constant bounds that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// The result of one run; printed as text or, with `--json`, as this object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub workload: String,
    /// Wall time of the measured phase.
    pub elapsed_secs: f64,
    /// Successful operations, all kinds together.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Failed requests by message.
    pub error_messages: BTreeMap<String, u64>,
    /// Per operation kind (`put`, `range`, `read`/`write` for `txn-mixed`, `put`/`event` for
    /// `watch-latency`, ...).
    pub ops: BTreeMap<String, OpStats>,
}

/// Throughput and latency of one operation kind.
#[derive(Debug, Clone, Serialize)]
pub struct OpStats {
    pub count: u64,
    /// Operations per second of wall time (for `watch-latency`'s `event`: over the time from
    /// the first put to the last event received).
    pub per_sec: f64,
    pub latency_ms: Latency,
    /// `BUCKETS` equal-width buckets from the fastest to the slowest operation.
    pub histogram: Vec<Bucket>,
}

/// Latency summary in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub stddev: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Operations whose latency is in `[from_ms, to_ms)` (the last bucket includes `to_ms`).
#[derive(Debug, Clone, Serialize)]
pub struct Bucket {
    pub from_ms: f64,
    pub to_ms: f64,
    pub count: u64,
}

/// Microseconds to milliseconds, rounded to the microsecond (no `0.30000000000000004`).
fn ms(us: f64) -> f64 {
    us.round() / 1000.0
}

impl OpStats {
    fn new(h: &Histogram<u64>, secs: f64) -> Self {
        let q = |q: f64| ms(h.value_at_quantile(q) as f64);
        Self {
            count: h.len(),
            per_sec: if secs > 0.0 {
                h.len() as f64 / secs
            } else {
                0.0
            },
            latency_ms: Latency {
                min: ms(h.min() as f64),
                // Mean and deviation keep their fraction of a microsecond.
                mean: h.mean() / 1000.0,
                stddev: h.stdev() / 1000.0,
                p50: q(0.5),
                p90: q(0.9),
                p99: q(0.99),
                p999: q(0.999),
                max: ms(h.max() as f64),
            },
            histogram: buckets(h, BUCKETS),
        }
    }
}

/// `n` equal-width buckets between the smallest and the largest recorded value. Every recorded
/// value lands in exactly one bucket, so the counts add up to `h.len()`.
pub fn buckets(h: &Histogram<u64>, n: usize) -> Vec<Bucket> {
    if h.is_empty() || n == 0 {
        return Vec::new();
    }
    let (lo, hi) = (h.min(), h.max());
    let width = (hi - lo) as f64 / n as f64;
    let mut out: Vec<Bucket> = (0..n)
        .map(|i| Bucket {
            from_ms: ms(lo as f64 + width * i as f64),
            to_ms: ms(lo as f64 + width * (i + 1) as f64),
            count: 0,
        })
        .collect();
    for v in h.iter_recorded() {
        // hdrhistogram reports a value as the top of its equivalence range; clamp into [lo, hi].
        let x = h.lowest_equivalent(v.value_iterated_to()).clamp(lo, hi);
        let i = if hi == lo {
            0
        } else {
            (((x - lo) as f64 / width) as usize).min(n - 1)
        };
        out[i].count += v.count_at_value();
    }
    out
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} operations, {} errors in {:.3} s",
            self.workload, self.requests, self.errors, self.elapsed_secs
        )?;
        for (msg, n) in &self.error_messages {
            writeln!(f, "  error ×{n}: {msg}")?;
        }
        for (kind, op) in &self.ops {
            let l = &op.latency_ms;
            writeln!(f, "\n{kind}: {} ops, {:.1} ops/s", op.count, op.per_sec)?;
            writeln!(
                f,
                "  latency ms: mean {:.3}  p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                l.mean, l.p50, l.p90, l.p99, l.p999, l.max
            )?;
            let top = op
                .histogram
                .iter()
                .map(|b| b.count)
                .max()
                .unwrap_or(0)
                .max(1);
            writeln!(f, "  histogram (ms):")?;
            for b in &op.histogram {
                let bar = "∎".repeat((b.count * 40).div_ceil(top) as usize);
                writeln!(
                    f,
                    "  {:>10.3} .. {:>10.3} [{:>8}] |{bar}",
                    b.from_ms, b.to_ms, b.count
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(kind: &'static str, us: impl IntoIterator<Item = u64>) -> Recorder {
        let mut r = Recorder::new();
        for v in us {
            r.record(kind, Duration::from_micros(v));
        }
        r
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        // 1..=10_000 µs: p50 = 5 ms, p90 = 9 ms, p99 = 9.9 ms, within hdr's 0.1 % precision.
        let rep = recorder("put", 1..=10_000).report("put", Duration::from_secs(2));
        let op = &rep.ops["put"];
        assert_eq!(op.count, 10_000);
        assert!((op.per_sec - 5_000.0).abs() < 1e-9);
        let l = &op.latency_ms;
        let near = |a: f64, b: f64| (a - b).abs() <= b * 0.002;
        assert!(near(l.p50, 5.0), "{l:?}");
        assert!(near(l.p90, 9.0), "{l:?}");
        assert!(near(l.p99, 9.9), "{l:?}");
        assert!(near(l.p999, 9.99), "{l:?}");
        assert!(near(l.max, 10.0), "{l:?}");
        assert!(near(l.mean, 5.0005), "{l:?}");
        assert_eq!(l.min, 0.001);
    }

    #[test]
    fn a_histogram_filled_in_a_row_counts_as_recorded_ones_and_an_empty_one_is_left_out() {
        let mut r = recorder("put", [10, 20]);
        let h = r.histogram("event");
        for us in [5, 7, 9] {
            record_in(h, Duration::from_micros(us));
        }
        r.histogram("never");
        r.error_n("event without a time stamp", 2);
        let rep = r.report("x", Duration::from_secs(1));
        assert_eq!(rep.ops.keys().collect::<Vec<_>>(), ["event", "put"]);
        assert_eq!(rep.ops["event"].count, 3);
        assert_eq!(rep.ops["event"].latency_ms.max, 0.009);
        assert_eq!((rep.requests, rep.errors), (5, 2));
    }

    #[test]
    fn buckets_partition_every_value() {
        let rep = recorder("x", (0..1000).map(|i| 100 + i * 7)).report("x", Duration::from_secs(1));
        let hist = &rep.ops["x"].histogram;
        assert_eq!(hist.len(), BUCKETS);
        assert_eq!(hist.iter().map(|b| b.count).sum::<u64>(), 1000);
        // Uniform input: each of the 10 buckets holds about 100.
        assert!(
            hist.iter().all(|b| (90..=110).contains(&b.count)),
            "{hist:?}"
        );
        assert_eq!(hist[0].from_ms, 0.1);
        assert!(hist.windows(2).all(|w| w[0].to_ms == w[1].from_ms));
    }

    #[test]
    fn one_value_lands_in_the_first_bucket() {
        let rep = recorder("x", [500, 500, 500]).report("x", Duration::from_secs(1));
        let hist = &rep.ops["x"].histogram;
        assert_eq!(hist[0].count, 3);
        assert_eq!(hist.iter().map(|b| b.count).sum::<u64>(), 3);
    }

    #[test]
    fn merge_adds_ops_and_errors() {
        let mut a = recorder("read", [10, 20]);
        a.error("Unavailable: x");
        let mut b = recorder("read", [30]);
        b.merge(recorder("write", [40]));
        b.error("Unavailable: x");
        a.merge(b);
        let rep = a.report("txn-mixed", Duration::from_secs(1));
        assert_eq!(rep.ops["read"].count, 3);
        assert_eq!(rep.ops["write"].count, 1);
        assert_eq!(rep.requests, 4);
        assert_eq!(rep.errors, 2);
        assert_eq!(rep.error_messages["Unavailable: x"], 2);
    }

    #[test]
    fn json_shape() -> serde_json::Result<()> {
        let rep = recorder("put", [100, 200, 300]).report("put", Duration::from_millis(500));
        let v = serde_json::to_value(&rep)?;
        assert_eq!(v["workload"], "put");
        assert_eq!(v["requests"], 3);
        assert_eq!(v["errors"], 0);
        assert_eq!(v["elapsed_secs"], 0.5);
        assert!(v["error_messages"]
            .as_object()
            .is_some_and(|m| m.is_empty()));
        let op = &v["ops"]["put"];
        assert_eq!(op["count"], 3);
        assert_eq!(op["per_sec"], 6.0);
        for k in ["min", "mean", "stddev", "p50", "p90", "p99", "p999", "max"] {
            assert!(op["latency_ms"][k].is_f64(), "{k}");
        }
        let hist = op["histogram"].as_array().map(Vec::len);
        assert_eq!(hist, Some(BUCKETS));
        assert!(op["histogram"][0]["from_ms"].is_f64());
        Ok(())
    }

    #[test]
    fn text_report_names_every_figure() {
        let text = recorder("range", 1..=100)
            .report("range", Duration::from_secs(1))
            .to_string();
        for s in [
            "range: 100 operations, 0 errors",
            "p99.9",
            "histogram (ms)",
            "∎",
        ] {
            assert!(text.contains(s), "{s} missing in\n{text}");
        }
    }
}
