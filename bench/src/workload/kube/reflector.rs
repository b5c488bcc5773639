//! The watchers: kube-apiserver's reflectors, several multiplexed on one watch stream.
//!
//! Each reflector lists its type (paginated, at one revision R), then watches the type's
//! prefix from R+1 with `prev_kv` and `progress_notify`, and feeds everything to its
//! [`WatchCheck`]. As kube-apiserver's does, it:
//!
//! - re-watches from its last seen revision (events and progress notifications alike) when
//!   the stream breaks (a member killed) or the server cancels the watch (`hasleader`), on the
//!   next endpoint;
//! - ends its watch after a random timeout in `[T, 2T]` (`--watch-timeout`) and re-watches;
//!   the first time and every `--stale-every`-th time after, it first waits until a
//!   compaction has passed its position, like a kube-apiserver cut off for longer than the
//!   compaction interval, so that its re-watch *must* be refused as compacted;
//! - on a compacted refusal, lists again at the current revision and watches from there.
//!
//! A stream sends a `progress_request` every `--progress-interval`; the answer (watch id -1)
//! says every watcher of the stream has seen every event up to its revision, which is checked
//! only when the server reports a version kube-apiserver trusts with it (see the module doc
//! of `kube`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metastore_proto::etcdserverpb::{
    kv_client::KvClient, watch_client::WatchClient, watch_request, WatchCancelRequest,
    WatchCreateRequest, WatchProgressRequest, WatchRequest, WatchResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::check::{Invariant, ListCheck, Listed, Outcome, Violation, WatchCheck, WatchSummary};
use super::{list, status_text, Conn, Shared};
use crate::keys::{self, Rng};
use crate::report::Recorder;

/// How often a stream looks at timeouts, parked reflectors and new lists.
const TICK: Duration = Duration::from_millis(100);
/// A progress request not answered within this is sent again.
const PROGRESS_RESEND: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Needs a (re-)list before it can watch.
    List,
    /// Needs a watch from its position on the current stream.
    Watch,
    /// A create was sent with this id. `refuse`: it starts below a finished compaction, which
    /// took effect after revision `refuse` (the Compact answer's header): a member past that
    /// revision must refuse the watch; one not yet there (a follower catching up) still has
    /// the history and may serve it.
    Watching { id: i64, refuse: Option<i64> },
    /// A cancel was sent; `stale` = wait for a compaction past the position afterwards.
    Canceling { id: i64, stale: bool },
    /// Waits until a compaction has passed its position, then watches (and must be refused).
    Parked,
}

struct Reflector {
    /// The watcher's number in the run.
    no: usize,
    ty: usize,
    check: WatchCheck,
    phase: Phase,
    /// Index into the type's board of lists: every list before it was handed over.
    seen_lists: usize,
    timeout_at: Instant,
    timeouts: u64,
    /// The server confirmed the current watch.
    created: bool,
}

/// Counters of one stream, summed into the report.
#[derive(Debug, Default, Clone)]
pub struct StreamStats {
    pub rewatches: u64,
    pub relists: u64,
    pub timeouts: u64,
    pub compacted_refusals: u64,
    pub progress_requests: u64,
    pub progress_answers: u64,
    pub stream_restarts: u64,
}

/// What one stream's reflectors saw, once the run stops.
pub struct StreamResult {
    pub watchers: Vec<(usize, WatchSummary)>,
    pub stats: StreamStats,
    pub rec: Recorder,
    pub violations: Vec<Violation>,
}

fn create_req(r: &Reflector, shared: &Shared, id: i64) -> WatchRequest {
    let prefix = shared.types.prefix(r.ty);
    WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                range_end: keys::prefix_end(&prefix),
                key: prefix,
                start_revision: r.check.resume_from(),
                progress_notify: true,
                prev_kv: true,
                watch_id: id,
                ..Default::default()
            },
        )),
    }
}

/// The state of one stream's task between two responses.
struct Stream {
    shared: Arc<Shared>,
    refl: Vec<Reflector>,
    /// Watch id → reflector, for the watches of the current gRPC stream.
    ids: HashMap<i64, usize>,
    next_id: i64,
    /// The outstanding progress request: when it was sent and the watches it covers.
    progress: Option<(Instant, Vec<(usize, i64)>)>,
    rng: Rng,
    out: StreamResult,
    /// Events watcher 0 received (for `--self-test-drop-event`).
    watcher0_events: u64,
}

/// Runs one stream of `types.len()` reflectors (`types[i]` is the type of reflector `i`)
/// until `shared.stop` is set; `first` is the reflectors' global number, for their names.
pub async fn run_stream(
    shared: Arc<Shared>,
    stream_no: usize,
    first: usize,
    types: Vec<usize>,
) -> StreamResult {
    let mut rng = Rng::seeded(0x5eed ^ stream_no as u64);
    let refl: Vec<Reflector> = types
        .iter()
        .enumerate()
        .map(|(i, &ty)| Reflector {
            no: first + i,
            ty,
            check: WatchCheck::new(format!("watcher {} ({})", first + i, shared.types.name(ty))),
            phase: Phase::List,
            seen_lists: 0,
            timeout_at: Instant::now() + shared.watch_timeout(&mut rng),
            timeouts: 0,
            created: false,
        })
        .collect();
    let mut st = Stream {
        shared: shared.clone(),
        refl,
        ids: HashMap::new(),
        next_id: 1,
        progress: None,
        watcher0_events: 0,
        rng,
        out: StreamResult {
            watchers: Vec::new(),
            stats: StreamStats::default(),
            rec: Recorder::new(),
            violations: Vec::new(),
        },
    };
    // Lists on a request connection, the stream on the watch connection to the same member.
    let mut conn = Conn::new(shared.channels.clone(), stream_no);
    let mut stop = shared.stop.clone();
    'streams: while !*stop.borrow() {
        // (Re-)list whoever needs it, then open the stream with every watch queued.
        let mut kv = KvClient::new(conn.channel());
        for i in 0..st.refl.len() {
            if st.refl[i].phase == Phase::List && !st.relist(&mut kv, i).await {
                conn.rotate();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'streams;
            }
        }
        let (tx, rx) = mpsc::channel::<WatchRequest>(st.refl.len() * 4 + 64);
        st.ids.clear();
        st.progress = None;
        for i in 0..st.refl.len() {
            if st.refl[i].phase == Phase::Watch {
                st.start_watch(i, &tx);
            }
        }
        // etcd (grpc-go) sends a stream's response headers with its first message, and
        // `watch` below waits for them: a stream whose watchers are all parked would get no
        // answer and never reach the loop that unparks them. A progress request is always
        // answered.
        st.request_progress(&tx);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        // kube-apiserver's watches require a leader (clientv3.WithRequireLeader).
        req.metadata_mut().insert(
            "hasleader",
            tonic::metadata::MetadataValue::from_static("true"),
        );
        let mut client = WatchClient::new(conn.channel_in(&shared.watch_channels));
        let open = client.watch(req);
        let opened = tokio::select! {
            r = tokio::time::timeout(super::REQUEST_TIMEOUT, open) => r,
            _ = stop.changed() => break 'streams,
        };
        let outcome = match opened {
            Ok(Ok(s)) => Ok(s.into_inner()),
            Ok(Err(e)) => Err(status_text(&e)),
            Err(_) => Err(format!(
                "no response headers in {} s",
                super::REQUEST_TIMEOUT.as_secs()
            )),
        };
        let mut stream = match outcome {
            Ok(s) => s,
            Err(e) => {
                st.out.rec.error(format!("watch stream: {e}"));
                st.rewatch_all();
                conn.rotate();
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(TICK);
        let mut progress_tick = tokio::time::interval(shared.progress_interval);
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => st.handle(resp, &tx, &mut kv).await,
                    Ok(None) | Err(_) => {
                        if let Err(e) = msg {
                            st.out.rec.error(format!("watch stream: {}", status_text(&e)));
                        }
                        st.rewatch_all();
                        st.out.stats.stream_restarts += 1;
                        conn.rotate();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue 'streams;
                    }
                },
                _ = tick.tick() => st.tick(&tx, &mut kv).await,
                _ = progress_tick.tick() => st.request_progress(&tx),
                _ = stop.changed() => break 'streams,
            }
        }
    }
    st.out.watchers = st
        .refl
        .into_iter()
        .map(|r| (r.ty, r.check.finish()))
        .collect();
    st.out
}

impl Stream {
    /// Watch timeouts, parked reflectors coming back, failed re-lists retried, new lists.
    async fn tick(&mut self, tx: &mpsc::Sender<WatchRequest>, kv: &mut KvClient<Channel>) {
        let now = Instant::now();
        let shared = self.shared.clone();
        let compacted = shared.compacted.load(Ordering::SeqCst);
        let draining = shared.draining.load(Ordering::SeqCst);
        for i in 0..self.refl.len() {
            let r = &mut self.refl[i];
            pull_lists(&shared, r);
            match r.phase {
                Phase::Watching { id, .. } if now >= r.timeout_at => {
                    r.timeouts += 1;
                    self.out.stats.timeouts += 1;
                    let stale = shared.stale_every > 0
                        && (r.timeouts - 1).is_multiple_of(shared.stale_every);
                    r.phase = Phase::Canceling { id, stale };
                    r.timeout_at = now + shared.watch_timeout(&mut self.rng);
                    let cancel = WatchCancelRequest { watch_id: id };
                    let req = watch_request::RequestUnion::CancelRequest(cancel);
                    let _ = tx.try_send(WatchRequest {
                        request_union: Some(req),
                    });
                }
                Phase::Parked if compacted > r.check.resume_from() || draining => {
                    self.start_watch(i, tx);
                }
                Phase::List => {
                    let listed = self.relist(kv, i).await;
                    if listed {
                        self.start_watch(i, tx);
                    }
                }
                _ => {}
            }
        }
    }

    /// Sends a progress request unless one is outstanding (re-sent after a while).
    fn request_progress(&mut self, tx: &mpsc::Sender<WatchRequest>) {
        if self
            .progress
            .as_ref()
            .is_some_and(|(t, _)| t.elapsed() < PROGRESS_RESEND)
        {
            return;
        }
        // The answer covers the watches the server has confirmed before the request.
        let covered = self
            .refl
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.phase {
                Phase::Watching { id, refuse: None } if r.created => Some((i, id)),
                _ => None,
            })
            .collect();
        self.progress = Some((Instant::now(), covered));
        self.out.stats.progress_requests += 1;
        let p = watch_request::RequestUnion::ProgressRequest(WatchProgressRequest {});
        let _ = tx.try_send(WatchRequest {
            request_union: Some(p),
        });
    }

    fn rewatch_all(&mut self) {
        for r in self.refl.iter_mut() {
            if matches!(r.phase, Phase::Watching { .. } | Phase::Canceling { .. }) {
                r.phase = Phase::Watch;
                self.out.stats.rewatches += 1;
            }
        }
    }

    fn start_watch(&mut self, i: usize, tx: &mpsc::Sender<WatchRequest>) {
        let id = self.next_id;
        self.next_id += 1;
        let r = &mut self.refl[i];
        // A start below a finished compaction must be refused (read in the order the
        // compactor stores them, so `at` is at least the one of the compaction read).
        let compacted = self.shared.compacted.load(Ordering::SeqCst);
        let at = self.shared.compacted_at.load(Ordering::SeqCst);
        let refuse = (r.check.resume_from() < compacted).then_some(at);
        self.ids.insert(id, i);
        r.phase = Phase::Watching { id, refuse };
        r.created = false;
        let _ = tx.try_send(create_req(r, &self.shared, id));
    }

    /// Lists reflector `i`'s type at the current revision and resets its cache to it; false
    /// when the list failed (it is tried again).
    async fn relist(&mut self, kv: &mut KvClient<Channel>, i: usize) -> bool {
        let shared = &self.shared;
        let r = &mut self.refl[i];
        let t0 = Instant::now();
        match list(kv, shared, r.ty, false, 0).await {
            Ok((rev, items, fp)) => {
                let initial = r.check.position() == 0;
                let kind = if initial { "initial-list" } else { "relist" };
                self.out.rec.record(kind, t0.elapsed());
                if !initial {
                    self.out.stats.relists += 1;
                }
                r.check.reset(rev, items);
                shared.positions[r.no].store(rev, Ordering::Relaxed);
                // Every other watcher of the type compares this list with its own state.
                let what = "relist";
                shared.publish(
                    r.ty,
                    ListCheck {
                        rev,
                        listed: Listed::Items(fp),
                        what,
                    },
                );
                r.seen_lists = shared.boards[r.ty].len.load(Ordering::Acquire);
                r.phase = Phase::Watch;
                true
            }
            Err(e) => {
                self.out.rec.error(format!("list: {}", status_text(&e)));
                r.phase = Phase::List;
                false
            }
        }
    }

    async fn handle(
        &mut self,
        resp: WatchResponse,
        tx: &mpsc::Sender<WatchRequest>,
        kv: &mut KvClient<Channel>,
    ) {
        let shared = self.shared.clone();
        let rev = resp.header.as_ref().map_or(0, |h| h.revision);
        if resp.watch_id == -1 && !resp.created && !resp.canceled && resp.events.is_empty() {
            // The answer to this stream's progress request.
            if let Some((sent, covered)) = self.progress.take() {
                self.out.rec.record("progress-request", sent.elapsed());
                self.out.stats.progress_answers += 1;
                if shared.check_progress_requests {
                    for (i, id) in covered {
                        let r = &mut self.refl[i];
                        if matches!(r.phase, Phase::Watching { id: now, .. } if now == id) {
                            r.check.progress(rev);
                        }
                    }
                }
            }
            return;
        }
        let Some(&i) = self.ids.get(&resp.watch_id) else {
            if resp.canceled && resp.created {
                let reason = &resp.cancel_reason;
                self.out
                    .rec
                    .error(format!("watch create refused: {reason}"));
            }
            return;
        };
        let r = &mut self.refl[i];
        let (id, refuse) = match r.phase {
            Phase::Watching { id, refuse } => (id, refuse),
            Phase::Canceling { id, .. } => (id, None),
            _ => return,
        };
        if resp.canceled {
            self.ids.remove(&id);
            if resp.compact_revision != 0 {
                self.out.stats.compacted_refusals += 1;
                let from = r.check.resume_from();
                let requested = shared.compact_requested.load(Ordering::SeqCst);
                if from >= requested {
                    self.out.violations.push(Violation::new(
                        Invariant::CompactedWatchRefused,
                        format!(
                            "{}: a watch from {from} was refused as compacted at {}, but no compaction past {from} was asked for (latest {requested})",
                            r.check.name(),
                            resp.compact_revision
                        ),
                    ));
                }
                // kube-apiserver's reflector: 410 Gone → list again, watch from there.
                if self.relist(kv, i).await {
                    self.start_watch(i, tx);
                }
            } else if matches!(r.phase, Phase::Canceling { stale: true, .. }) {
                r.phase = Phase::Parked;
            } else {
                self.out.stats.rewatches += 1;
                self.start_watch(i, tx);
            }
            return;
        }
        if resp.created {
            r.created = true;
            if refuse.is_some_and(|at| rev <= at) {
                // This member has not applied the compaction yet.
                r.phase = Phase::Watching { id, refuse: None };
            }
            return;
        }
        if refuse.is_some() {
            self.out.violations.push(Violation::new(
                Invariant::CompactedWatchRefused,
                format!(
                    "{}: a watch from {}, below the finished compaction, was not refused",
                    r.check.name(),
                    r.check.resume_from()
                ),
            ));
            r.phase = Phase::Watching { id, refuse: None };
        }
        if resp.events.is_empty() {
            r.check.progress(rev);
        } else {
            for ev in &resp.events {
                if r.no == 0 && shared.drop_event > 0 {
                    self.watcher0_events += 1;
                    if self.watcher0_events == shared.drop_event {
                        continue;
                    }
                }
                if r.check.event(ev) == Outcome::NoPrevKv {
                    // kube-apiserver ends such a watch with an error and lists again.
                    self.ids.remove(&id);
                    let cancel = WatchCancelRequest { watch_id: id };
                    let req = watch_request::RequestUnion::CancelRequest(cancel);
                    let _ = tx.try_send(WatchRequest {
                        request_union: Some(req),
                    });
                    if self.relist(kv, i).await {
                        self.start_watch(i, tx);
                    }
                    return;
                }
            }
            r.check.end_response();
            shared
                .events
                .fetch_add(resp.events.len() as u64, Ordering::Relaxed);
        }
        pull_lists(&shared, r);
        shared.positions[r.no].store(r.check.position(), Ordering::Relaxed);
    }
}

/// Hands the reflector every list of its type published since it last looked.
fn pull_lists(shared: &Shared, r: &mut Reflector) {
    let board = &shared.boards[r.ty];
    if board.len.load(Ordering::Acquire) <= r.seen_lists {
        return;
    }
    let new: Vec<ListCheck> = match board.lists.lock() {
        Ok(l) => l[r.seen_lists..].to_vec(),
        Err(_) => return,
    };
    r.seen_lists += new.len();
    for c in new {
        r.check.list(c);
    }
}

/// The (type, summary) pairs and violations of all streams, with their stats summed.
pub fn merge(
    results: Vec<StreamResult>,
) -> (
    Vec<(usize, WatchSummary)>,
    StreamStats,
    Recorder,
    Vec<Violation>,
) {
    let mut stats = StreamStats::default();
    let mut rec = Recorder::new();
    let mut watchers = Vec::new();
    let mut violations = Vec::new();
    for r in results {
        watchers.extend(r.watchers);
        rec.merge(r.rec);
        violations.extend(r.violations);
        let s = r.stats;
        stats.rewatches += s.rewatches;
        stats.relists += s.relists;
        stats.timeouts += s.timeouts;
        stats.compacted_refusals += s.compacted_refusals;
        stats.progress_requests += s.progress_requests;
        stats.progress_answers += s.progress_answers;
        stats.stream_restarts += s.stream_restarts;
    }
    (watchers, stats, rec, violations)
}
