//! [`WatchHub`]: watchers, fan-out and history replay (see the module docs of `watch`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use metastore_proto::mvccpb::{event::EventType, Event};
use tokio::sync::mpsc;

use super::events::{self, Batch, Events};
use crate::mvcc::{self, KeyRange, RangeOptions, Store};

pub type StreamId = u64;
pub type WatchId = i64;

/// Most events replayed to the unsynced watchers in one round (whole revisions).
const REPLAY_BATCH: usize = 1000;
/// How often the syncer looks for work when nothing wakes it.
const SYNC_TICK: Duration = Duration::from_millis(100);
/// How long the syncer waits when every watcher it could replay to has a full buffer.
const FULL_BACKOFF: Duration = Duration::from_millis(5);

/// What a watcher asks for.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    pub range: KeyRange,
    /// First revision wanted; 0 or less: the next one.
    pub start_rev: i64,
    /// Requested id; 0 or less: the hub assigns one (etcd's `AutoWatchID` behaviour for 0 is
    /// "auto", and explicit ids are accepted when non-zero).
    pub watch_id: WatchId,
    pub no_put: bool,
    pub no_delete: bool,
    pub prev_kv: bool,
    pub progress_notify: bool,
    pub fragment: bool,
}

/// A message for a stream, in the order it must be sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    Created {
        watch_id: WatchId,
        rev: i64,
    },
    /// A create that failed: etcd answers `created` and `canceled` with the reason.
    Refused {
        watch_id: WatchId,
        rev: i64,
        reason: String,
    },
    Events {
        watch_id: WatchId,
        rev: i64,
        events: Events,
        fragment: bool,
    },
    /// The watcher's history is compacted away: it is canceled.
    Compacted {
        watch_id: WatchId,
        compact_rev: i64,
        rev: i64,
    },
    Canceled {
        watch_id: WatchId,
        rev: i64,
    },
    /// Every event up to `rev` was delivered (`watch_id` -1: for the whole stream).
    Progress {
        watch_id: WatchId,
        rev: i64,
    },
}

/// Why a watch could not be created. The messages are etcd's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WatchError {
    #[error("mvcc: duplicate watch ID provided on the WatchStream")]
    DuplicateId,
    #[error("mvcc: watcher range is empty")]
    EmptyRange,
    #[error("watch stream is closed")]
    StreamClosed,
    /// MetaStore's own limit (`--max-watchers-per-stream`); etcd has none.
    #[error("etcdserver: too many watchers on this stream (limit {0}, --max-watchers-per-stream)")]
    TooManyWatchers(usize),
}

struct Watcher {
    spec: WatchSpec,
    /// The first revision not yet delivered.
    next_rev: i64,
    synced: bool,
    /// Created but its `Created` response not yet sent: deliver nothing.
    pending: bool,
    last_sent: Instant,
}

struct StreamState {
    tx: mpsc::Sender<Delivery>,
    watchers: HashMap<WatchId, Watcher>,
    next_auto_id: WatchId,
    progress_pending: bool,
}

impl StreamState {
    fn all_synced(&self) -> bool {
        self.watchers.values().all(|w| w.synced && !w.pending)
    }
}

struct State {
    /// The newest revision handed to synced watchers.
    notified_rev: i64,
    streams: HashMap<StreamId, StreamState>,
    closed: bool,
}

struct Inner {
    store: Arc<Store>,
    state: Mutex<State>,
    wake: Condvar,
    progress_interval: Duration,
    next_stream: AtomicU64,
    /// Watchers one stream may hold at once.
    max_watchers_per_stream: usize,
}

/// The watch registry. Dropping it stops its syncer thread.
pub struct WatchHub {
    inner: Arc<Inner>,
    syncer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for WatchHub {
    fn drop(&mut self) {
        if let Ok(mut s) = self.inner.state.lock() {
            s.closed = true;
        }
        self.inner.wake.notify_all();
        if let Some(h) = self.syncer.lock().ok().and_then(|mut t| t.take()) {
            let _ = h.join();
        }
    }
}

fn matches(spec: &WatchSpec, ev: &Event) -> bool {
    let Some(kv) = &ev.kv else { return false };
    let is_put = ev.r#type == EventType::Put as i32;
    if (is_put && spec.no_put) || (!is_put && spec.no_delete) {
        return false;
    }
    spec.range.contains(&kv.key)
}

fn event_rev(ev: &Event) -> i64 {
    ev.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

/// Whether a watcher whose next revision is `from` should get `ev`.
fn wants(spec: &WatchSpec, ev: &Event, from: i64) -> bool {
    event_rev(ev) >= from && matches(spec, ev)
}

/// Whether two watchers get the same events of a batch from the same revision on.
fn same_selection(a: &WatchSpec, b: &WatchSpec) -> bool {
    a.no_put == b.no_put
        && a.no_delete == b.no_delete
        && a.prev_kv == b.prev_kv
        && a.range == b.range
}

/// The events of `batch` a watcher should get, from revision `from` on.
fn select(spec: &WatchSpec, batch: &Batch, from: i64) -> Events {
    Events::select(batch, spec.prev_kv, |e| wants(spec, e, from))
}

impl WatchHub {
    /// A hub over `store`, starting at its current revision; a stream holds at most
    /// `max_watchers_per_stream` watchers at once.
    pub fn start(
        store: Arc<Store>,
        progress_interval: Duration,
        max_watchers_per_stream: usize,
    ) -> std::io::Result<Arc<Self>> {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                notified_rev: store.current_revision(),
                streams: HashMap::new(),
                closed: false,
            }),
            store,
            wake: Condvar::new(),
            progress_interval,
            next_stream: AtomicU64::new(1),
            max_watchers_per_stream,
        });
        let worker = inner.clone();
        let handle = std::thread::Builder::new()
            .name("watch-sync".into())
            .spawn(move || worker.run_syncer())?;
        Ok(Arc::new(Self {
            inner,
            syncer: Mutex::new(Some(handle)),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Registers a stream whose messages go to `tx`.
    pub fn open_stream(&self, tx: mpsc::Sender<Delivery>) -> StreamId {
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        self.lock().streams.insert(
            id,
            StreamState {
                tx,
                watchers: HashMap::new(),
                next_auto_id: 0,
                progress_pending: false,
            },
        );
        id
    }

    /// Forgets a stream and its watchers.
    pub fn close_stream(&self, stream: StreamId) {
        self.lock().streams.remove(&stream);
    }

    /// Creates a watcher; it receives nothing until [`activate`](Self::activate), so that the
    /// caller can send its `Created` response first. Returns the id and the revision to put in
    /// that response.
    pub fn watch(&self, stream: StreamId, spec: WatchSpec) -> Result<(WatchId, i64), WatchError> {
        if let KeyRange::Between(s, e) = &spec.range {
            if e <= s {
                return Err(WatchError::EmptyRange);
            }
        }
        let mut st = self.lock();
        let rev = st.notified_rev;
        let max = self.inner.max_watchers_per_stream;
        let s = st
            .streams
            .get_mut(&stream)
            .ok_or(WatchError::StreamClosed)?;
        if s.watchers.len() >= max {
            return Err(WatchError::TooManyWatchers(max));
        }
        let id = if spec.watch_id > 0 {
            if s.watchers.contains_key(&spec.watch_id) {
                return Err(WatchError::DuplicateId);
            }
            spec.watch_id
        } else {
            while s.watchers.contains_key(&s.next_auto_id) {
                s.next_auto_id += 1;
            }
            s.next_auto_id
        };
        let next_rev = if spec.start_rev > 0 {
            spec.start_rev
        } else {
            rev + 1
        };
        s.watchers.insert(
            id,
            Watcher {
                spec,
                next_rev,
                synced: next_rev > rev,
                pending: true,
                last_sent: Instant::now(),
            },
        );
        Ok((id, rev))
    }

    /// Starts delivering to a watcher created by [`watch`](Self::watch).
    pub fn activate(&self, stream: StreamId, id: WatchId) {
        let mut st = self.lock();
        if let Some(w) = st
            .streams
            .get_mut(&stream)
            .and_then(|s| s.watchers.get_mut(&id))
        {
            w.pending = false;
            if !w.synced {
                drop(st);
                self.inner.wake.notify_all();
            }
        }
    }

    /// Cancels a watcher. Returns the revision for the `Canceled` response, or `None` when the
    /// stream has no such watcher (etcd then answers nothing).
    pub fn cancel(&self, stream: StreamId, id: WatchId) -> Option<i64> {
        let mut st = self.lock();
        let rev = st.notified_rev;
        let s = st.streams.get_mut(&stream)?;
        s.watchers.remove(&id)?;
        Some(rev)
    }

    /// A stream-wide progress request (etcd 3.5): `Some(rev)` when every watcher of the stream
    /// has been sent every event up to `rev`, to be answered now; otherwise the answer is sent
    /// by the hub once they have caught up.
    pub fn request_progress(&self, stream: StreamId) -> Option<i64> {
        let mut st = self.lock();
        let rev = st.notified_rev;
        let s = st.streams.get_mut(&stream)?;
        if s.all_synced() {
            Some(rev)
        } else {
            s.progress_pending = true;
            None
        }
    }

    /// Hands the events of newly published revisions (up to `rev`) to synced watchers.
    /// Called by the apply pipeline after each durable group, with the events in order.
    pub fn notify(&self, events: Vec<Event>, rev: i64) {
        let batch = events::batch(events);
        // Watchers whose next revision is at most the batch's first get every event their
        // spec matches, so such watchers with the same selection (often many: every client
        // of a prefix) share one selection, made by the first of them.
        let first_rev = batch
            .iter()
            .filter_map(|e| e.event().kv.as_ref().map(|kv| kv.mod_revision))
            .min()
            .unwrap_or(rev);
        let now = Instant::now();
        let mut st = self.lock();
        let mut lagging = false;
        let mut closed = Vec::new();
        let mut shared: Option<(&WatchSpec, Events)> = None;
        for (sid, s) in st.streams.iter_mut() {
            let mut stream_closed = false;
            let StreamState { tx, watchers, .. } = s;
            for (id, w) in watchers.iter_mut() {
                let Watcher {
                    spec,
                    next_rev,
                    synced,
                    pending,
                    last_sent,
                } = w;
                if *pending {
                    // Its `Created` response is still being sent, so nothing may go to the
                    // stream yet; but `notified_rev` moves past these revisions, so a synced
                    // watcher skipped here would never get them. Leave it to the syncer,
                    // which replays them once `activate` wakes it.
                    if *synced && batch.iter().any(|e| wants(spec, e.event(), *next_rev)) {
                        *synced = false;
                    } else if *synced {
                        *next_rev = (*next_rev).max(rev + 1);
                    }
                    continue;
                }
                if !*synced {
                    continue;
                }
                if stream_closed {
                    break;
                }
                let evs = if *next_rev > first_rev {
                    select(spec, &batch, *next_rev)
                } else {
                    match &shared {
                        Some((other, evs)) if same_selection(other, spec) => evs.clone(),
                        _ => {
                            let evs = select(spec, &batch, *next_rev);
                            shared = Some((spec, evs.clone()));
                            evs
                        }
                    }
                };
                if evs.is_empty() {
                    *next_rev = (*next_rev).max(rev + 1);
                    continue;
                }
                let first = evs.first().map_or(rev, |e| event_rev(e.event()));
                match tx.try_send(Delivery::Events {
                    watch_id: *id,
                    rev,
                    events: evs,
                    fragment: spec.fragment,
                }) {
                    Ok(()) => {
                        *next_rev = rev + 1;
                        *last_sent = now;
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        // Off the fast path: the syncer replays from `first` later.
                        *synced = false;
                        *next_rev = first;
                        lagging = true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => stream_closed = true,
                }
            }
            if stream_closed {
                closed.push(*sid);
            }
        }
        drop(shared);
        for sid in closed {
            st.streams.remove(&sid);
        }
        st.notified_rev = st.notified_rev.max(rev);
        drop(st);
        if lagging {
            self.inner.wake.notify_all();
        }
    }

    /// The key space jumped to `rev` without events (a Raft snapshot replaced it): every
    /// watcher leaves the fast path and catches up from history, as a slow one does.
    pub fn resync(&self, rev: i64) {
        let mut st = self.lock();
        for s in st.streams.values_mut() {
            for w in s.watchers.values_mut() {
                w.synced = false;
            }
        }
        st.notified_rev = st.notified_rev.max(rev);
        drop(st);
        self.inner.wake.notify_all();
    }

    /// Watchers not yet caught up (for tests and metrics).
    pub fn unsynced_count(&self) -> usize {
        self.lock()
            .streams
            .values()
            .flat_map(|s| s.watchers.values())
            .filter(|w| !w.synced)
            .count()
    }

    /// All watchers.
    pub fn watcher_count(&self) -> usize {
        self.lock().streams.values().map(|s| s.watchers.len()).sum()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(g) => g,
            // A panic while holding the lock leaves plain data behind; keep serving.
            Err(p) => p.into_inner(),
        }
    }

    fn run_syncer(&self) {
        let mut last_progress = Instant::now();
        loop {
            {
                let st = self.lock();
                if st.closed {
                    return;
                }
                let idle = st
                    .streams
                    .values()
                    .all(|s| s.watchers.values().all(|w| w.synced || w.pending));
                if idle {
                    let (st, _) = self
                        .wake
                        .wait_timeout(st, SYNC_TICK)
                        .unwrap_or_else(|p| p.into_inner());
                    if st.closed {
                        return;
                    }
                }
            }
            match self.sync_round() {
                Ok(true) => {}
                // Every unsynced watcher's client is slow to read: rather than read the same
                // history again at once, give them a moment (another watcher falling behind wakes
                // us sooner).
                Ok(false) => {
                    let st = self.lock();
                    if !st.closed {
                        let _ = self.wake.wait_timeout(st, FULL_BACKOFF);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch history replay failed; retrying");
                    std::thread::sleep(SYNC_TICK);
                }
            }
            if last_progress.elapsed() >= self.progress_interval.min(SYNC_TICK * 10) {
                self.progress_notify();
                last_progress = Instant::now();
            }
        }
    }

    /// One replay round: read the history the unsynced watchers need once, hand each its part.
    /// Returns whether it handed anything over (or had nothing to do); `false` means every
    /// unsynced watcher's buffer was full, and the caller should give the clients time.
    fn sync_round(&self) -> mvcc::Result<bool> {
        // Watchers whose next revision is compacted away are canceled; the others are
        // replayed from the oldest next revision among them. Reading from below the
        // compaction would fail, and must not be taken for "nothing to replay".
        let compact = self.store.compact_revision();
        let (target, from, want_prev, any) = {
            let st = self.lock();
            let mut from = i64::MAX;
            let mut want_prev = false;
            let mut any = false;
            for w in st.streams.values().flat_map(|s| s.watchers.values()) {
                if !w.synced && !w.pending {
                    any = true;
                    if w.next_rev >= compact {
                        from = from.min(w.next_rev);
                        want_prev |= w.spec.prev_kv;
                    }
                }
            }
            (st.notified_rev, from, want_prev, any)
        };
        if !any {
            self.answer_pending_progress(&mut self.lock());
            return Ok(true);
        }
        // `(events, upto)`: every event of revisions `from..=upto`, or `None` when this round
        // replays nothing (a compaction raced the read; the next round sees it).
        let replay = if from > target {
            // Nothing published yet that these watchers want: they are caught up.
            Some((events::batch(Vec::new()), target))
        } else {
            match self.store.history(from, target, REPLAY_BATCH) {
                Ok(mut events) => {
                    if want_prev {
                        for e in &mut events {
                            self.fill_prev(e);
                        }
                    }
                    // Whole revisions: a cut batch covers up to its last event's revision.
                    let upto = if events.len() >= REPLAY_BATCH {
                        events.last().map(event_rev).unwrap_or(target)
                    } else {
                        target
                    };
                    Some((events::batch(events), upto))
                }
                Err(mvcc::Error::Compacted) => None,
                Err(e) => return Err(e),
            }
        };
        let compact = self.store.compact_revision();
        let mut st = self.lock();
        let notified = st.notified_rev;
        let mut closed = Vec::new();
        let mut progressed = false;
        for (sid, s) in st.streams.iter_mut() {
            let mut remove = Vec::new();
            for (id, w) in s.watchers.iter_mut() {
                if w.synced || w.pending {
                    continue;
                }
                if w.next_rev < compact {
                    // etcd's compaction response carries no revision in its header.
                    match s.tx.try_send(Delivery::Compacted {
                        watch_id: *id,
                        compact_rev: compact,
                        rev: 0,
                    }) {
                        Ok(()) => {
                            remove.push(*id);
                            progressed = true;
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {}
                        Err(mpsc::error::TrySendError::Closed(_)) => closed.push(*sid),
                    }
                    continue;
                }
                let Some((events, upto)) = &replay else {
                    continue;
                };
                if w.next_rev < from || w.next_rev > upto + 1 {
                    continue; // not covered by this round's read
                }
                if w.spec.prev_kv && !want_prev {
                    // Created after this round chose what to read: its events lack `prev_kv`.
                    continue;
                }
                let evs = select(&w.spec, events, w.next_rev);
                if !evs.is_empty() {
                    match s.tx.try_send(Delivery::Events {
                        watch_id: *id,
                        rev: notified,
                        events: evs,
                        fragment: w.spec.fragment,
                    }) {
                        Ok(()) => w.last_sent = Instant::now(),
                        Err(mpsc::error::TrySendError::Full(_)) => continue,
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            closed.push(*sid);
                            continue;
                        }
                    }
                }
                progressed = true;
                w.next_rev = upto + 1;
                if w.next_rev > notified {
                    w.synced = true;
                }
            }
            for id in remove {
                s.watchers.remove(&id);
            }
        }
        for sid in closed {
            st.streams.remove(&sid);
            progressed = true;
        }
        self.answer_pending_progress(&mut st);
        Ok(progressed || replay.is_none())
    }

    /// Answers deferred stream-wide progress requests of streams now fully caught up; one whose
    /// buffer is full is retried on the next round.
    fn answer_pending_progress(&self, st: &mut State) {
        let rev = st.notified_rev;
        st.streams.retain(|_, s| {
            if !(s.progress_pending && s.all_synced()) {
                return true;
            }
            match s.tx.try_send(Delivery::Progress { watch_id: -1, rev }) {
                Ok(()) => {
                    s.progress_pending = false;
                    true
                }
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            }
        });
    }

    /// etcd fills `prev_kv` of replayed events with a read one revision earlier.
    fn fill_prev(&self, e: &mut Event) {
        if e.prev_kv.is_some() {
            return;
        }
        let Some(kv) = &e.kv else { return };
        if e.r#type == EventType::Put as i32 && kv.version == 1 {
            return; // a create has no previous value
        }
        let r = self.store.range(
            &KeyRange::Single(kv.key.to_vec()),
            RangeOptions {
                rev: kv.mod_revision - 1,
                ..Default::default()
            },
        );
        if let Ok(mut r) = r {
            e.prev_kv = r.kvs.pop();
        }
    }

    /// Idle synced watchers that asked for progress notifications get one per interval.
    fn progress_notify(&self) {
        let mut st = self.lock();
        let rev = st.notified_rev;
        let interval = self.progress_interval;
        for s in st.streams.values_mut() {
            for (id, w) in s.watchers.iter_mut() {
                if w.spec.progress_notify
                    && w.synced
                    && !w.pending
                    && w.last_sent.elapsed() >= interval
                    && s.tx
                        .try_send(Delivery::Progress { watch_id: *id, rev })
                        .is_ok()
                {
                    w.last_sent = Instant::now();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
