//! Progress of a migration on stderr: an indicatif bar (records/s, ETA) when stderr is a
//! terminal, otherwise one log line every few seconds (for logs and CI).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a line is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    start: Instant,
    last_log: Instant,
}

impl Progress {
    /// Progress over `total` records; draws only if `enabled` and stderr is a terminal.
    pub fn new(total: u64, enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} records \
                 ({per_sec}, ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let now = Instant::now();
        Self {
            bar,
            total,
            start: now,
            last_log: now,
        }
    }

    /// `done` records visited so far, `rewritten` of them re-encoded.
    pub fn update(&mut self, done: u64, rewritten: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            return;
        }
        if self.last_log.elapsed() < LOG_EVERY {
            return;
        }
        self.last_log = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let eta = if rate > 0.0 {
            format!("{:.0}s", self.total.saturating_sub(done) as f64 / rate)
        } else {
            "?".into()
        };
        tracing::info!(
            "migrate: {done}/{} records ({:.0}%), {rewritten} re-encoded, {rate:.0} records/s, ETA {eta}",
            self.total,
            100.0 * done as f64 / self.total.max(1) as f64,
        );
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
