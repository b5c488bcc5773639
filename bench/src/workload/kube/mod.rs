//! `kube`: kube-apiserver's traffic at scale, checked on the fly against what kube-apiserver
//! relies on.
//!
//! The run replays the request shapes of "How kube-apiserver uses it" in the project's
//! `COMPAT.md`:
//!
//! - `--clients` writers create `--objects` objects over `--types` types, update and delete
//!   some (`--updates-per-object`, `--delete-fraction`), all with kube-apiserver's guarded
//!   transactions ([`objects`]); Events (type 0) share a lease per `--events-per-lease`;
//! - `--watchers` reflectors, `--watchers-per-stream` to a stream, list their type (paginated
//!   at one revision) and watch it from the list's revision + 1 with `prev_kv` and
//!   `progress_notify`, re-watching after failures and timeouts ([`reflector`]); each stream
//!   sends `progress_request`s;
//! - background tasks list (paginated, keys-only, count-only), compact through
//!   `compact_rev_key`, poll Status and check health ([`housekeeping`]).
//!
//! The [`check`] module holds the invariants and the checker. The run ends when the writers
//! are done: a last list of each type, one more object per type (its event tells each watcher
//! it has everything before it), then the final walk of every watcher against the
//! acknowledged writes. Any violation makes the verdict `broken` and the command exit
//! non-zero, naming the invariant.
//!
//! Progress requests: etcd before 3.4.31 / 3.5.13 answers a `progress_request` at once,
//! whether or not its watchers have caught up, and kube-apiserver does not rely on it there
//! (it turns off consistent reads from its cache). The tool does as kube-apiserver does: it
//! always sends them, but checks their answers only when `Status.version` is one
//! kube-apiserver trusts (`progress_requests_checked` in the report). Per-watcher progress
//! notifications are always checked.

pub mod check;
pub mod housekeeping;
pub mod objects;
pub mod reflector;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use metastore_proto::etcdserverpb::{
    kv_client::KvClient, maintenance_client::MaintenanceClient, RangeRequest, StatusRequest,
};
use serde::Serialize;
use tokio::task::JoinSet;
use tonic::transport::Channel;
use tonic::Status;

use crate::error::{Error, Result};
use crate::keys;
use crate::options::Common;
use crate::report::Report;
use crate::runner;
use check::{Change, Fingerprint, Invariant, ListCheck, Violation};
use housekeeping::Housekeeping;
use objects::{Types, Writers};

/// Violations listed in the report (all are counted).
const MAX_LISTED: usize = 50;
/// How often the progress line is printed on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// Flags of `kube`.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeArgs {
    /// Object types (resources), each under `<prefix>/<type>/`; type 0 is `events`.
    #[arg(long, default_value_t = 10)]
    pub types: usize,
    /// Objects created (spread evenly over the types).
    #[arg(long, default_value_t = 10_000)]
    pub objects: u64,
    /// Updates per created object, on average.
    #[arg(long, default_value_t = 1.0)]
    pub updates_per_object: f64,
    /// Fraction of the created objects deleted during the run.
    #[arg(long, default_value_t = 0.1)]
    pub delete_fraction: f64,
    /// Watchers (reflectors), spread evenly over the types.
    #[arg(long, default_value_t = 20)]
    pub watchers: usize,
    /// Watchers multiplexed on one watch stream.
    #[arg(long, default_value_t = 10)]
    pub watchers_per_stream: usize,
    /// Keys per page of a list.
    #[arg(long, default_value_t = 500)]
    pub page_size: i64,
    /// Milliseconds between two lists (a paginated, a keys-only and a count-only one in turn,
    /// over the types).
    #[arg(long, default_value_t = 200)]
    pub list_interval_ms: u64,
    /// Seconds between two compactions (kube-apiserver's `--etcd-compaction-interval`).
    #[arg(long, default_value_t = 10.0)]
    pub compact_interval: f64,
    /// Milliseconds between two progress requests on each watch stream.
    #[arg(long, default_value_t = 1000)]
    pub progress_interval_ms: u64,
    /// Seconds after which a watcher ends its watch and re-watches from its last revision
    /// (random in [T, 2T]).
    #[arg(long, default_value_t = 20.0)]
    pub watch_timeout: f64,
    /// The 1st, (N+1)-th, (2N+1)-th... watch timeout of a watcher first waits until a
    /// compaction has passed its position, so that its re-watch is refused as compacted and
    /// it lists again (0 = never).
    #[arg(long, default_value_t = 2)]
    pub stale_every: u64,
    /// Events created with one lease.
    #[arg(long, default_value_t = 1000)]
    pub events_per_lease: u32,
    /// Prefix of every key (kube-apiserver's `--etcd-prefix`).
    #[arg(long, default_value = "/registry")]
    pub prefix: String,
    /// Seconds between two Status calls (version, database size).
    #[arg(long, default_value_t = 5.0)]
    pub status_interval: f64,
    /// Seconds between two health checks (a Range of `<prefix>/health`, 2-s timeout).
    #[arg(long, default_value_t = 1.0)]
    pub health_interval: f64,
    /// Seconds the watchers get, once the writes are done, to deliver the last of them.
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Self-test of the checker: watcher 0 drops the N-th event it receives before checking
    /// it, so the run must end `broken` (0 = off).
    #[arg(long, default_value_t = 0)]
    pub self_test_drop_event: u64,
}

impl KubeArgs {
    fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Options(m.to_string()));
        if self.types == 0 || self.watchers == 0 || self.watchers_per_stream == 0 {
            return fail("--types, --watchers and --watchers-per-stream must be at least 1");
        }
        if self.page_size <= 0 {
            return fail("--page-size must be at least 1");
        }
        if !(0.0..=0.9).contains(&self.delete_fraction) {
            return fail("--delete-fraction must be between 0 and 0.9");
        }
        let secs = [
            self.updates_per_object,
            self.compact_interval,
            self.watch_timeout,
            self.status_interval,
            self.health_interval,
            self.drain_timeout,
        ];
        if secs.iter().any(|s| !(s.is_finite() && *s >= 0.0)) {
            return fail("intervals, timeouts and --updates-per-object must be non-negative");
        }
        if self.objects < self.types as u64 {
            return fail("--objects must be at least --types");
        }
        Ok(())
    }
}

/// A connection that moves to the next endpoint when a request through it fails.
#[derive(Clone)]
pub struct Conn {
    channels: Arc<[Channel]>,
    at: usize,
}

impl Conn {
    pub fn new(channels: Arc<[Channel]>, start: usize) -> Self {
        let at = start % channels.len().max(1);
        Self { channels, at }
    }

    pub fn channel(&self) -> Channel {
        self.channels[self.at].clone()
    }

    /// The channel at the same position in `channels` (a set that mirrors this one's
    /// endpoints, such as the watch connections).
    pub fn channel_in(&self, channels: &[Channel]) -> Channel {
        channels[self.at].clone()
    }

    pub fn rotate(&mut self) {
        self.at = (self.at + 1) % self.channels.len();
    }
}

/// The deadline of every unary request (kube-apiserver's client bounds each call by its own
/// context): a member that never answers (a linearizable read on a member catching up after
/// a restart can wait indefinitely) must not hang a writer or a list; the request is then
/// treated as failed and retried elsewhere.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// `msg` as a request with [`REQUEST_TIMEOUT`].
fn timed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(REQUEST_TIMEOUT);
    req
}

fn status_text(e: &Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

/// The lists of one type, published for its watchers (append-only).
#[derive(Default)]
pub struct Board {
    lists: Mutex<Vec<ListCheck>>,
    len: AtomicUsize,
}

/// What every task of a run shares.
pub struct Shared {
    /// Unary requests (writes, lists, Status, Compact) and the compacted-watch probe.
    channels: Arc<[Channel]>,
    /// The reflectors' watch streams: connections of their own, to the same endpoints in the
    /// same order as `channels`. A stream's task stops reading its stream while it re-lists;
    /// on one HTTP/2 connection the unread events would use up the connection's flow-control
    /// window and stall every response on it, the re-list's included, for good (h2 returns
    /// connection window only as data is read). kube-apiserver's gRPC client (grpc-go)
    /// returns it on receipt, so it cannot stall this way; separate connections give the
    /// tool the same property.
    watch_channels: Arc<[Channel]>,
    types: Types,
    page_size: i64,
    boards: Vec<Board>,
    /// The highest revision a compaction was asked for / done at.
    compact_requested: AtomicI64,
    compacted: AtomicI64,
    /// The header revision of the latest Compact's answer: the compaction took effect on
    /// every member that is past it.
    compacted_at: AtomicI64,
    stop: tokio::sync::watch::Receiver<bool>,
    /// The writes are done: parked watchers come back now.
    draining: AtomicBool,
    check_progress_requests: bool,
    progress_interval: Duration,
    watch_timeout: f64,
    stale_every: u64,
    /// Each watcher's position (every event up to it delivered).
    positions: Vec<AtomicI64>,
    events: AtomicU64,
    /// `--self-test-drop-event`.
    drop_event: u64,
}

impl Shared {
    fn watch_timeout(&self, rng: &mut keys::Rng) -> Duration {
        if self.watch_timeout <= 0.0 {
            return Duration::from_secs(86_400 * 365);
        }
        Duration::from_secs_f64(self.watch_timeout * (1.0 + rng.unit()))
    }

    fn publish(&self, ty: usize, check: ListCheck) {
        if let Ok(mut l) = self.boards[ty].lists.lock() {
            l.push(check);
            self.boards[ty].len.store(l.len(), Ordering::Release);
        }
    }
}

/// Lists type `ty` page by page at one revision (`rev`, or the current one when 0), keys
/// only or not; returns the revision, the (key, mod_revision) pairs and their fingerprint.
async fn list(
    kv: &mut KvClient<Channel>,
    shared: &Shared,
    ty: usize,
    keys_only: bool,
    rev: i64,
) -> Result<(i64, Vec<(Bytes, i64)>, Fingerprint), Status> {
    let prefix = shared.types.prefix(ty);
    let end = keys::prefix_end(&prefix);
    let (mut key, mut rev) = (prefix, rev);
    let mut items = Vec::new();
    let mut fp = Fingerprint::default();
    loop {
        let r = kv
            .range(timed(RangeRequest {
                key: key.clone(),
                range_end: end.clone(),
                limit: shared.page_size,
                revision: rev,
                keys_only,
                ..Default::default()
            }))
            .await?
            .into_inner();
        if rev == 0 {
            rev = r.header.map_or(0, |h| h.revision);
        }
        for kv in &r.kvs {
            fp.add(&kv.key, kv.mod_revision);
        }
        let last = r.kvs.last().map(|kv| kv.key.clone());
        items.extend(r.kvs.into_iter().map(|kv| (kv.key, kv.mod_revision)));
        match last {
            // The continue key: just after the last key returned.
            Some(k) if r.more => {
                let mut next = k.to_vec();
                next.push(0);
                key = Bytes::from(next);
            }
            _ => return Ok((rev, items, fp)),
        }
    }
}

/// Whether kube-apiserver relies on `progress_request` answers of this etcd version
/// (3.4.31+, 3.5.13+, 3.6+).
pub fn trusts_progress_requests(version: &str) -> bool {
    let mut v = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (
        v.next().unwrap_or(0),
        v.next().unwrap_or(0),
        v.next().unwrap_or(0),
    );
    match (major, minor) {
        (3, 4) => patch >= 31,
        (3, 5) => patch >= 13,
        (3, m) => m >= 6,
        (m, _) => m > 3,
    }
}

/// Counts of objects written.
#[derive(Debug, Clone, Serialize)]
pub struct Objects {
    pub types: usize,
    pub created: u64,
    pub updated: u64,
    pub deleted: u64,
    /// Objects at the end (created minus deleted, plus one per type written at the end).
    pub live: u64,
    /// Write attempts whose outcome was unknown when they failed (resolved by a read).
    pub unknown_outcomes: u64,
}

/// What was checked.
#[derive(Debug, Clone, Serialize)]
pub struct Checks {
    pub watchers: usize,
    /// Events checked (one per event per watcher).
    pub events_checked: u64,
    /// Lists (paginated, keys-only, count-only, re-lists) compared with a watcher's state,
    /// one per list per watcher.
    pub lists_checked: u64,
    /// Lists published by the lister (each compared by every watcher of its type).
    pub lists_taken: u64,
    /// Comparisons not made: the watcher had started after the list, or the list was older
    /// than its history.
    pub lists_skipped: u64,
    /// Lists abandoned because a compaction overtook their revision between two pages.
    pub lists_compacted: u64,
    pub progress_notifications: u64,
    /// Updates and deletes that came without `prev_kv`: like kube-apiserver, the watcher
    /// dropped its watch and listed again. etcd sends them when the previous revision was
    /// compacted while the watcher replayed history.
    pub no_prev_kv: u64,
    pub progress_requests: u64,
    pub progress_answers: u64,
    /// Whether progress-request answers were relied on (the server's version, see above).
    pub progress_requests_checked: bool,
    pub rewatches: u64,
    pub watch_timeouts: u64,
    /// Watches refused as compacted (each followed by a re-list).
    pub compacted_refusals: u64,
    pub relists: u64,
    pub stream_restarts: u64,
    pub compactions: u64,
    /// Watches from just below a compaction, refused as they must be.
    pub compacted_probes: u64,
    /// Acknowledged writes checked against every watcher covering them.
    pub acked_writes: u64,
}

/// The report of `kube`: the usual per-operation figures plus the verdict.
#[derive(Debug, Clone, Serialize)]
pub struct KubeReport {
    #[serde(flatten)]
    pub report: Report,
    /// `ok`, or `broken` when any invariant was violated.
    pub verdict: &'static str,
    /// The invariants broken (each named once).
    pub broken: Vec<Invariant>,
    pub violation_count: usize,
    /// The first violations.
    pub violations: Vec<Violation>,
    pub objects: Objects,
    pub checks: Checks,
    pub server_version: String,
    pub db_size_max: i64,
}

impl KubeReport {
    pub fn ok(&self) -> bool {
        self.violation_count == 0
    }
}

impl fmt::Display for KubeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.report)?;
        let o = &self.objects;
        let c = &self.checks;
        writeln!(
            f,
            "\nserver {} (largest db size {} B)",
            self.server_version, self.db_size_max
        )?;
        writeln!(
            f,
            "objects: {} types, {} created, {} updated, {} deleted, {} at the end, {} unknown outcomes",
            o.types, o.created, o.updated, o.deleted, o.live, o.unknown_outcomes
        )?;
        writeln!(
            f,
            "checked: {} events on {} watchers, {} acknowledged writes, {} list comparisons ({} lists, {} skipped, {} overtaken by compaction)",
            c.events_checked, c.watchers, c.acked_writes, c.lists_checked, c.lists_taken, c.lists_skipped, c.lists_compacted
        )?;
        writeln!(
            f,
            "watches: {} re-watches, {} timeouts, {} refused as compacted, {} events without prev_kv, {} re-lists, {} stream restarts; {} progress notifications, {}/{} progress requests answered ({})",
            c.rewatches, c.watch_timeouts, c.compacted_refusals, c.no_prev_kv, c.relists, c.stream_restarts,
            c.progress_notifications, c.progress_answers, c.progress_requests,
            if c.progress_requests_checked { "checked" } else { "not relied on at this version" }
        )?;
        writeln!(
            f,
            "compactions: {}, compacted-watch probes refused: {}",
            c.compactions, c.compacted_probes
        )?;
        writeln!(f, "verdict: {}", self.verdict)?;
        for v in &self.violations {
            writeln!(f, "  {v}")?;
        }
        if self.violation_count > self.violations.len() {
            writeln!(
                f,
                "  ... {} more",
                self.violation_count - self.violations.len()
            )?;
        }
        Ok(())
    }
}

async fn server_version(channels: &[Channel]) -> Result<String> {
    let mut last = None;
    for ch in channels {
        match MaintenanceClient::new(ch.clone())
            .status(timed(StatusRequest {}))
            .await
        {
            Ok(r) => return Ok(r.into_inner().version),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Setup(
        last.unwrap_or_else(|| Status::unavailable("no endpoint")),
    ))
}

/// Runs the profile; see the module doc.
pub async fn run(
    common: &Common,
    args: &KubeArgs,
    channels: &[Channel],
    bar: &ProgressBar,
) -> Result<KubeReport> {
    common.validate()?;
    args.validate()?;
    if channels.is_empty() {
        return Err(Error::Options("no connection".into()));
    }
    let version = server_version(channels).await?;
    let watch_channels = runner::connect_channels(common).await?;
    if watch_channels.len() != channels.len() {
        return Err(Error::Options(
            "the watch connections must mirror the request connections".into(),
        ));
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let types = Types::new(&args.prefix, args.types);
    let shared = Arc::new(Shared {
        channels: channels.to_vec().into(),
        watch_channels: watch_channels.into(),
        types: types.clone(),
        page_size: args.page_size,
        boards: (0..args.types).map(|_| Board::default()).collect(),
        compact_requested: AtomicI64::new(0),
        compacted: AtomicI64::new(0),
        compacted_at: AtomicI64::new(0),
        stop: stop_rx,
        draining: AtomicBool::new(false),
        check_progress_requests: trusts_progress_requests(&version),
        progress_interval: Duration::from_millis(args.progress_interval_ms.max(1)),
        watch_timeout: args.watch_timeout,
        stale_every: if args.compact_interval > 0.0 {
            args.stale_every
        } else {
            0
        },
        positions: (0..args.watchers).map(|_| AtomicI64::new(0)).collect(),
        events: AtomicU64::new(0),
        drop_event: args.self_test_drop_event,
    });

    // The reflectors: watcher w watches type w % types.
    let mut streams = JoinSet::new();
    for (s, first) in (0..args.watchers)
        .step_by(args.watchers_per_stream)
        .enumerate()
    {
        let last = (first + args.watchers_per_stream).min(args.watchers);
        let tys = (first..last).map(|w| w % args.types).collect();
        streams.spawn(reflector::run_stream(shared.clone(), s, first, tys));
    }
    let started = Instant::now();
    while shared
        .positions
        .iter()
        .any(|p| p.load(Ordering::Relaxed) == 0)
    {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(Error::Stream(
                "the watchers did not start within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let secs = |s: f64| Duration::from_secs_f64(s.max(0.001));
    let mut tasks = JoinSet::new();
    tasks.spawn(housekeeping::lister(
        shared.clone(),
        Duration::from_millis(args.list_interval_ms.max(1)),
    ));
    if args.compact_interval > 0.0 {
        tasks.spawn(housekeeping::compactor(
            shared.clone(),
            secs(args.compact_interval),
        ));
    }
    tasks.spawn(housekeeping::status(
        shared.clone(),
        secs(args.status_interval),
    ));
    tasks.spawn(housekeeping::health(
        shared.clone(),
        secs(args.health_interval),
    ));

    let creates = args.objects;
    let updates = (creates as f64 * args.updates_per_object).round() as u64;
    let deletes = (creates as f64 * args.delete_fraction).round() as u64;
    let plan = objects::plan(
        creates,
        updates,
        deletes,
        4 * common.clients as u64 + 16,
        0x6b75_6265,
    );
    let writers = Arc::new(Writers::new(
        shared.channels.clone(),
        types.clone(),
        common.val_size,
        args.events_per_lease,
        plan,
    ));
    let printer = tokio::spawn(print_progress(shared.clone(), writers.clone()));
    let mut wcommon = common.clone();
    wcommon.total = creates + updates + deletes;
    bar.set_length(wcommon.total);
    let (mut rec, elapsed) = runner::drive(&wcommon, channels, writers.clone(), bar).await?;

    // The end: a last list of each type, then one more object per type, whose event tells
    // every watcher of the type that it has all before it.
    let mut violations = Vec::new();
    let mut kv = KvClient::new(shared.channels[0].clone());
    for ty in 0..args.types {
        if let Ok((rev, _, fp)) = list(&mut kv, &shared, ty, false, 0).await {
            shared.publish(
                ty,
                ListCheck {
                    rev,
                    listed: check::Listed::Items(fp),
                    what: "final list",
                },
            );
        }
    }
    shared.draining.store(true, Ordering::SeqCst);
    let mut w = writers.writer(usize::MAX / 2);
    let mut last_rev = Vec::with_capacity(args.types);
    for ty in 0..args.types {
        match writers.create_one(&mut w, ty).await {
            Ok(rev) => last_rev.push(rev),
            Err(e) => return Err(Error::Stream(format!("final write: {}", status_text(&e)))),
        }
    }
    // Watcher `no` watches type `no % types`: it is done once past its type's last write.
    let behind = |no: usize, p: &AtomicI64| p.load(Ordering::Relaxed) < last_rev[no % args.types];
    let drain = Instant::now();
    while shared
        .positions
        .iter()
        .enumerate()
        .any(|(no, p)| behind(no, p))
        && drain.elapsed() < secs(args.drain_timeout)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (no, p) in shared.positions.iter().enumerate() {
        if behind(no, p) {
            violations.push(Violation::new(
                Invariant::WatchExactlyOnceInOrder,
                format!(
                    "watcher {no} is at {}, {:.0} s after its type's last write at {}",
                    p.load(Ordering::Relaxed),
                    args.drain_timeout,
                    last_rev[no % args.types]
                ),
            ));
        }
    }
    let _ = stop_tx.send(true);
    printer.abort();

    let mut hk = Housekeeping::default();
    while let Some(h) = tasks.join_next().await {
        match h {
            Ok(h) => hk.merge(h),
            Err(e) => rec.error(format!("task failed: {e}")),
        }
    }
    let mut results = Vec::new();
    while let Some(r) = streams.join_next().await {
        match r {
            Ok(r) => results.push(r),
            Err(e) => rec.error(format!("watch stream task failed: {e}")),
        }
    }
    let (watchers, stats, wrec, wviolations) = reflector::merge(results);
    rec.merge(wrec);
    rec.merge(std::mem::take(&mut hk.rec));
    violations.extend(wviolations);
    violations.extend(std::mem::take(&mut hk.violations));

    // The final walk, type by type.
    let truth = std::mem::take(
        &mut *writers
            .truth
            .lock()
            .map_err(|_| Error::Stream("poisoned".into()))?,
    );
    let maybe: HashSet<u64> = truth.maybe.iter().copied().collect();
    let mut acked: BTreeMap<usize, Vec<Change>> = BTreeMap::new();
    for (ty, c) in &truth.acked {
        acked.entry(*ty).or_default().push(*c);
    }
    let mut summaries: BTreeMap<usize, Vec<check::WatchSummary>> = BTreeMap::new();
    for (ty, s) in watchers {
        summaries.entry(ty).or_default().push(s);
    }
    let (mut events, mut lists_checked, mut lists_skipped, mut progress) = (0, 0, 0, 0);
    let mut no_prev_kv = 0;
    for (ty, sums) in &summaries {
        let mut a = acked.remove(ty).unwrap_or_default();
        a.sort_unstable();
        violations.extend(sums.iter().flat_map(|s| s.violations.iter().cloned()));
        violations.extend(check::verify_delivery(&a, &maybe, sums));
        for s in sums {
            events += s.events;
            lists_checked += s.lists_checked;
            lists_skipped += s.lists_skipped;
            progress += s.progress_checked;
            no_prev_kv += s.no_prev_kv;
        }
    }
    let counts = &writers.counts;
    let created = counts.created.load(Ordering::Relaxed);
    let deleted = counts.deleted.load(Ordering::Relaxed);
    let broken: BTreeSet<Invariant> = violations.iter().map(|v| v.invariant).collect();
    Ok(KubeReport {
        report: rec.report("kube", elapsed),
        verdict: if violations.is_empty() {
            "ok"
        } else {
            "broken"
        },
        broken: broken.into_iter().collect(),
        violation_count: violations.len(),
        violations: violations.into_iter().take(MAX_LISTED).collect(),
        objects: Objects {
            types: args.types,
            created,
            updated: counts.updated.load(Ordering::Relaxed),
            deleted,
            live: created + args.types as u64 - deleted,
            unknown_outcomes: counts.unknown.load(Ordering::Relaxed),
        },
        checks: Checks {
            watchers: args.watchers,
            events_checked: events,
            lists_checked,
            lists_taken: hk.lists,
            lists_skipped,
            lists_compacted: hk.lists_compacted,
            progress_notifications: progress,
            no_prev_kv,
            progress_requests: stats.progress_requests,
            progress_answers: stats.progress_answers,
            progress_requests_checked: shared.check_progress_requests,
            rewatches: stats.rewatches,
            watch_timeouts: stats.timeouts,
            compacted_refusals: stats.compacted_refusals,
            relists: stats.relists,
            stream_restarts: stats.stream_restarts,
            compactions: hk.compactions,
            compacted_probes: hk.compacted_probes,
            acked_writes: truth.acked.len() as u64,
        },
        server_version: version,
        db_size_max: hk.db_size_max,
    })
}

/// One line on stderr every [`PROGRESS_EVERY`] (also with `--json`: stdout stays the report).
async fn print_progress(shared: Arc<Shared>, writers: Arc<Writers>) {
    let t0 = Instant::now();
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let (created, planned) = writers.progress();
        let c = &writers.counts;
        let lists: usize = shared
            .boards
            .iter()
            .map(|b| b.len.load(Ordering::Relaxed))
            .sum();
        eprintln!(
            "kube {:6.1} s: created {created}/{planned}, {} updates, {} deletes, {} unknown outcomes; {} events, {} lists; compacted at {}",
            t0.elapsed().as_secs_f64(),
            c.updated.load(Ordering::Relaxed),
            c.deleted.load(Ordering::Relaxed),
            c.unknown.load(Ordering::Relaxed),
            shared.events.load(Ordering::Relaxed),
            lists,
            shared.compacted.load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_requests_are_trusted_from_kube_apiservers_versions() {
        for (v, ok) in [
            ("3.4.23", false),
            ("3.4.31", true),
            ("3.5.12", false),
            ("3.5.13", true),
            ("3.5.16", true),
            ("3.6.0", true),
            ("4.0.0", true),
            ("", false),
        ] {
            assert_eq!(trusts_progress_requests(v), ok, "{v}");
        }
    }
}
