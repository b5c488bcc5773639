//! The checker: what kube-apiserver relies on, verified from what one run observed.
//!
//! kube-apiserver keeps a cache per resource type (the reflector/informer pattern): it lists
//! the type at a revision R, applies the events of a watch started at R+1, and serves reads
//! from that cache. Its correctness rests on four guarantees of the store, the
//! [`Invariant`]s. Each watcher of the tool keeps exactly such a cache in a [`WatchCheck`]:
//!
//! - the state, key → `mod_revision`, plus a [`Fingerprint`] of it (a count and an XOR of one
//!   hash per (key, mod_revision) pair), updated in O(1) per event;
//! - the fingerprint after every revision it applied (a bounded history), so that a list
//!   taken at revision R by another task can be compared with this watcher's state at R
//!   whenever both are known, in whichever order they arrive;
//! - its *position*: the revision up to which it knows it has every event (the last event's,
//!   or a later progress notification's);
//! - every change delivered, for the final walk against the writes the server acknowledged
//!   ([`verify_delivery`]).
//!
//! Worked example (one watcher of type `pods`, starting from an empty list at revision 1):
//!
//! ```text
//! reset(1, [])                   state {}           position 1
//! event put a   rev 2, v1        state {a:2}        (a create: a must not be in the state)
//! event put a   rev 4, prev 2    state {a:4}        (prev_kv.mod_revision must equal state[a])
//! end of response                position 4, history (1,{}) (2,{a:2}) (4,{a:4})
//! list at 3 = {a:2}              history says the state at 3 was {a:2}: equal
//! progress 6                     position 6: every event up to 6 was delivered
//! event put b   rev 5            5 <= 6: the progress notification came before this event
//! ```
//!
//! A missed event shows either as a broken `prev_kv` chain (the next event of the key does not
//! continue from the state), as a list that differs, or in the final walk (an acknowledged
//! write inside the watcher's coverage that it never delivered); a duplicate or a reordering
//! shows as a revision that does not increase.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::Hasher;

use bytes::Bytes;
use metastore_proto::mvccpb::{event::EventType, Event};
use serde::Serialize;

/// How many revisions of fingerprints a watcher keeps to compare lists taken in the past.
/// A list is compared with the state at its revision; one older than this is not compared
/// (counted as skipped), which at a few hundred events per second and watcher is ~20 s.
const HISTORY: usize = 8192;

/// The guarantees kube-apiserver relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Invariant {
    /// Every watch sees every change of its range exactly once, in revision order (with
    /// `prev_kv` on every event but a create), across re-watches from the last seen revision.
    WatchExactlyOnceInOrder,
    /// A list at revision R (paginated, keys-only or count-only) equals the state at R.
    ListEqualsStateAtRevision,
    /// A watch from a compacted revision is refused with the compacted error (410 Gone
    /// upstream); one from a revision that was not compacted is not.
    CompactedWatchRefused,
    /// A progress notification at R comes only after every event up to R was delivered on
    /// that stream.
    ProgressAfterEvents,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::WatchExactlyOnceInOrder => "watch-exactly-once-in-order",
            Invariant::ListEqualsStateAtRevision => "list-equals-state-at-revision",
            Invariant::CompactedWatchRefused => "compacted-watch-refused",
            Invariant::ProgressAfterEvents => "progress-after-events",
        })
    }
}

/// One broken guarantee, with what was seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl Violation {
    pub fn new(invariant: Invariant, detail: impl Into<String>) -> Self {
        Self {
            invariant,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// A stable 64-bit hash of a key (SipHash with fixed keys, the same in every run).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    h.write(key);
    h.finish()
}

/// One change to a key, as written or as delivered: its revision and a tag naming the key and
/// whether it was a delete (the key's hash with the lowest bit replaced by the delete flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Change {
    pub rev: i64,
    pub tag: u64,
}

impl Change {
    pub fn new(rev: i64, key: &[u8], delete: bool) -> Self {
        Self {
            rev,
            tag: tag(key, delete),
        }
    }
}

/// The tag of a change of `key`: see [`Change`].
pub fn tag(key: &[u8], delete: bool) -> u64 {
    (key_hash(key) & !1) | u64::from(delete)
}

/// An order-independent digest of a set of (key, mod_revision) pairs: two sets with the same
/// count and XOR are taken as equal (a wrong equality needs a 64-bit hash collision).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Fingerprint {
    pub count: u64,
    pub xor: u64,
}

impl Fingerprint {
    fn item(key: &[u8], mod_rev: i64) -> u64 {
        // SplitMix64's finaliser over the key hash and the revision.
        let mut z = key_hash(key) ^ (mod_rev as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn add(&mut self, key: &[u8], mod_rev: i64) {
        self.count += 1;
        self.xor ^= Self::item(key, mod_rev);
    }

    pub fn remove(&mut self, key: &[u8], mod_rev: i64) {
        self.count = self.count.saturating_sub(1);
        self.xor ^= Self::item(key, mod_rev);
    }
}

/// What a list at a revision returned, to compare with the watchers' state at that revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// Every (key, mod_revision) of the range (a full or keys-only list).
    Items(Fingerprint),
    /// Only the number of keys (`count_only`).
    Count(u64),
}

/// A list of one object type at one revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListCheck {
    pub rev: i64,
    pub listed: Listed,
    /// What kind of list it was (`list`, `keys-only`, `count`, `relist`), for the report.
    pub what: &'static str,
}

/// What a watcher saw, for the final walk and the report.
#[derive(Debug, Clone, Default)]
pub struct WatchSummary {
    pub name: String,
    /// The closed revision intervals in which the watcher claims every change: from the
    /// revision after a list to its final position; a re-watch from the last seen revision
    /// continues an interval, a re-list after a compacted start begins a new one.
    pub intervals: Vec<(i64, i64)>,
    /// Every change delivered and applied, in order.
    pub delivered: Vec<Change>,
    pub violations: Vec<Violation>,
    pub events: u64,
    pub lists_checked: u64,
    pub lists_skipped: u64,
    pub progress_checked: u64,
    /// Updates and deletes received without `prev_kv` (each followed by a re-list).
    pub no_prev_kv: u64,
}

/// What [`WatchCheck::event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Checked, and applied unless it broke an invariant (then recorded).
    Checked,
    /// An update or delete without `prev_kv`: not applied. kube-apiserver refuses such an
    /// event ("etcd event received with PrevKv=nil") and its reflector lists again; the caller
    /// must do the same. etcd sends one when the previous revision was compacted meanwhile.
    NoPrevKv,
}

/// The cache of one watcher (one reflector): see the module doc.
#[derive(Debug)]
pub struct WatchCheck {
    sum: WatchSummary,
    state: HashMap<Bytes, i64>,
    fp: Fingerprint,
    /// Revision of the list the current interval started from.
    base: i64,
    /// Revision of the last event applied, and the tags applied at that revision.
    cur_rev: i64,
    cur_tags: Vec<u64>,
    /// Every event up to here has been delivered (last event or progress notification).
    position: i64,
    /// (revision, state after it), oldest first, one entry per revision applied.
    history: VecDeque<(i64, Fingerprint)>,
    pending: Vec<ListCheck>,
    started: bool,
}

impl WatchCheck {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            sum: WatchSummary {
                name: name.into(),
                ..Default::default()
            },
            state: HashMap::new(),
            fp: Fingerprint::default(),
            base: 0,
            cur_rev: 0,
            cur_tags: Vec::new(),
            position: 0,
            history: VecDeque::new(),
            pending: Vec::new(),
            started: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.sum.name
    }

    /// The revision a watch of this cache starts from: one after its position (kube's
    /// reflector re-watches from its last resource version, events and bookmarks alike).
    pub fn resume_from(&self) -> i64 {
        self.position + 1
    }

    /// Violations found so far.
    pub fn violations(&self) -> &[Violation] {
        &self.sum.violations
    }

    fn violate(&mut self, invariant: Invariant, detail: String) {
        let detail = format!("{}: {detail}", self.sum.name);
        self.sum.violations.push(Violation::new(invariant, detail));
    }

    /// Replaces the state by a list taken at `rev` (the reflector's initial list, or its
    /// re-list after a compacted start). Closes the current coverage interval.
    pub fn reset(&mut self, rev: i64, items: impl IntoIterator<Item = (Bytes, i64)>) {
        self.close_interval();
        self.state.clear();
        self.fp = Fingerprint::default();
        for (k, m) in items {
            self.fp.add(&k, m);
            self.state.insert(k, m);
        }
        self.base = rev;
        self.cur_rev = rev;
        self.cur_tags.clear();
        self.position = rev;
        self.history.clear();
        self.history.push_back((rev, self.fp));
        self.started = true;
        self.resolve_pending();
    }

    fn close_interval(&mut self) {
        if self.started && self.position > self.base {
            self.sum.intervals.push((self.base + 1, self.position));
        }
    }

    /// Checks and applies one event.
    pub fn event(&mut self, ev: &Event) -> Outcome {
        self.sum.events += 1;
        let Some(kv) = ev.kv.as_ref() else {
            self.violate(
                Invariant::WatchExactlyOnceInOrder,
                "event without kv".into(),
            );
            return Outcome::Checked;
        };
        let (rev, key) = (kv.mod_revision, &kv.key);
        let delete = ev.r#type == EventType::Delete as i32;
        let tag = tag(key, delete);
        let name = String::from_utf8_lossy(key);
        if rev < self.cur_rev {
            let d = format!(
                "out of order: event at {rev} ({name}) after one at {}",
                self.cur_rev
            );
            self.violate(Invariant::WatchExactlyOnceInOrder, d);
            return Outcome::Checked;
        }
        if rev == self.cur_rev && self.cur_tags.contains(&tag) {
            let d = format!("duplicate: event at {rev} ({name}) delivered twice");
            self.violate(Invariant::WatchExactlyOnceInOrder, d);
            return Outcome::Checked;
        }
        if rev <= self.base {
            let d = format!(
                "duplicate: event at {rev} ({name}) is in the list at {}",
                self.base
            );
            self.violate(Invariant::WatchExactlyOnceInOrder, d);
            return Outcome::Checked;
        }
        if rev <= self.position && rev > self.cur_rev {
            let d = format!(
                "progress notification at {} came before the event at {rev} ({name})",
                self.position
            );
            self.violate(Invariant::ProgressAfterEvents, d);
        }
        // The prev_kv chain: every event but a create continues from this cache's state.
        let known = self.state.get(key).copied();
        let is_create = !delete && kv.version == 1;
        match (is_create, &ev.prev_kv, known) {
            (true, _, Some(m)) => {
                let d = format!("missed the delete of {name} (at {m} in this watch's state) before its re-create at {rev}");
                self.violate(Invariant::WatchExactlyOnceInOrder, d);
            }
            (false, None, _) => {
                self.sum.events -= 1;
                self.sum.no_prev_kv += 1;
                return Outcome::NoPrevKv;
            }
            (false, Some(p), known) if Some(p.mod_revision) != known => {
                let seen = known.map_or("absent".to_string(), |m| format!("at {m}"));
                let d = format!(
                    "missed an event of {name}: the event at {rev} follows {} but this watch has it {seen}",
                    p.mod_revision
                );
                self.violate(Invariant::WatchExactlyOnceInOrder, d);
            }
            _ => {}
        }
        if rev > self.cur_rev {
            self.push_history(self.cur_rev);
            self.cur_rev = rev;
            self.cur_tags.clear();
        }
        if let Some(m) = known {
            self.fp.remove(key, m);
        }
        if delete {
            self.state.remove(key);
        } else {
            self.fp.add(key, rev);
            self.state.insert(key.clone(), rev);
        }
        self.cur_tags.push(tag);
        self.sum.delivered.push(Change { rev, tag });
        Outcome::Checked
    }

    fn push_history(&mut self, rev: i64) {
        match self.history.back_mut() {
            Some(last) if last.0 == rev => last.1 = self.fp,
            _ => {
                self.history.push_back((rev, self.fp));
                if self.history.len() > HISTORY {
                    self.history.pop_front();
                }
            }
        }
    }

    /// The end of one watch response: its revisions are complete (a revision's events come
    /// in one response), so the position moves to its last event.
    pub fn end_response(&mut self) {
        if self.cur_rev > self.position {
            self.position = self.cur_rev;
        }
        self.push_history(self.cur_rev);
        self.resolve_pending();
    }

    /// A progress notification at `rev`: every event up to `rev` has been delivered.
    pub fn progress(&mut self, rev: i64) {
        self.sum.progress_checked += 1;
        self.end_response();
        if rev > self.position {
            self.position = rev;
            self.push_history(rev);
            self.resolve_pending();
        }
    }

    /// A list of this watcher's type at some revision: compared now if this watcher is
    /// already past it, else when it gets there.
    pub fn list(&mut self, check: ListCheck) {
        self.pending.push(check);
        self.resolve_pending();
    }

    fn resolve_pending(&mut self) {
        if !self.started || self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        for c in pending {
            if c.rev > self.position {
                self.pending.push(c);
                continue;
            }
            // The state at c.rev: the last history entry at or before it.
            let at = self.history.iter().rev().find(|(r, _)| *r <= c.rev);
            let Some(&(_, fp)) = at.filter(|_| c.rev >= self.base) else {
                self.sum.lists_skipped += 1;
                continue;
            };
            self.sum.lists_checked += 1;
            let (ok, listed) = match c.listed {
                Listed::Items(l) => (
                    l == fp,
                    format!("{} objects (digest {:016x})", l.count, l.xor),
                ),
                Listed::Count(n) => (n == fp.count, format!("a count of {n}")),
            };
            if !ok {
                let d = format!(
                    "{} at revision {} returned {listed}, the watch's state at {} has {} objects (digest {:016x})",
                    c.what, c.rev, c.rev, fp.count, fp.xor
                );
                self.violate(Invariant::ListEqualsStateAtRevision, d);
            }
        }
    }

    /// The watcher's position: every event up to it has been delivered.
    pub fn position(&self) -> i64 {
        self.position
    }

    /// Ends the watcher: closes its coverage and returns what it saw. Lists it never reached
    /// count as skipped (a watcher that fell behind is reported by the caller).
    pub fn finish(mut self) -> WatchSummary {
        self.close_interval();
        self.sum.lists_skipped += self.pending.len() as u64;
        self.sum
    }
}

/// The final walk of one object type: each watcher of the type must have delivered every
/// acknowledged write inside its coverage (and for the same key and kind), and every change
/// some watcher delivered that no acknowledged write explains must be one of the writes with
/// an unknown outcome (`maybe`) and be delivered by every other watcher covering it too.
///
/// `acked` is sorted by revision.
pub fn verify_delivery(
    acked: &[Change],
    maybe: &HashSet<u64>,
    watchers: &[WatchSummary],
) -> Vec<Violation> {
    let mut out = Vec::new();
    let by_rev: HashMap<i64, u64> = acked.iter().map(|c| (c.rev, c.tag)).collect();
    let mut extra: BTreeMap<i64, u64> = BTreeMap::new();
    for w in watchers {
        for c in &w.delivered {
            match by_rev.get(&c.rev) {
                Some(&t) if t != c.tag => out.push(Violation::new(
                    Invariant::WatchExactlyOnceInOrder,
                    format!(
                        "{}: the event at {} is not the change written at that revision",
                        w.name, c.rev
                    ),
                )),
                Some(_) => {}
                None if !maybe.contains(&c.tag) => out.push(Violation::new(
                    Invariant::WatchExactlyOnceInOrder,
                    format!("{}: an event at {} that no write explains", w.name, c.rev),
                )),
                None => {
                    extra.insert(c.rev, c.tag);
                }
            }
        }
    }
    for w in watchers {
        let delivered: HashSet<(i64, u64)> = w.delivered.iter().map(|c| (c.rev, c.tag)).collect();
        for &(a, b) in &w.intervals {
            let from = acked.partition_point(|c| c.rev < a);
            let written = acked[from..].iter().take_while(|c| c.rev <= b).copied();
            let unknown = extra.range(a..=b).map(|(&rev, &tag)| Change { rev, tag });
            for c in written.chain(unknown) {
                if !delivered.contains(&(c.rev, c.tag)) {
                    out.push(Violation::new(
                        Invariant::WatchExactlyOnceInOrder,
                        format!(
                            "{}: missed the change at {} (its coverage {a}..={b} includes it)",
                            w.name, c.rev
                        ),
                    ));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::mvccpb::KeyValue;

    fn kv(key: &str, rev: i64, version: i64) -> KeyValue {
        KeyValue {
            key: Bytes::from(key.to_string()),
            create_revision: rev - version + 1,
            mod_revision: rev,
            version,
            value: Bytes::from_static(b"v"),
            lease: 0,
        }
    }

    fn put(key: &str, rev: i64, prev: Option<i64>) -> Event {
        let version = if prev.is_some() { 2 } else { 1 };
        Event {
            r#type: EventType::Put as i32,
            kv: Some(kv(key, rev, version)),
            prev_kv: prev.map(|p| kv(key, p, 1)),
        }
    }

    fn del(key: &str, rev: i64, prev: i64) -> Event {
        Event {
            r#type: EventType::Delete as i32,
            kv: Some(KeyValue {
                key: Bytes::from(key.to_string()),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: Some(kv(key, prev, 1)),
        }
    }

    /// The history every test starts from: an empty list at 1, then a@2, b@3, a@4 (update),
    /// b@5 (delete), each in its own response.
    fn history() -> Vec<Event> {
        vec![
            put("a", 2, None),
            put("b", 3, None),
            put("a", 4, Some(2)),
            del("b", 5, 3),
        ]
    }

    fn acked() -> Vec<Change> {
        history()
            .iter()
            .filter_map(|e| e.kv.as_ref().map(|kv| (e.r#type, kv)))
            .map(|(t, kv)| Change::new(kv.mod_revision, &kv.key, t == EventType::Delete as i32))
            .collect()
    }

    fn watcher(events: &[Event]) -> WatchCheck {
        let mut w = WatchCheck::new("w");
        w.reset(1, []);
        for e in events {
            w.event(e);
            w.end_response();
        }
        w
    }

    fn state_at(w: &[Event], rev: i64) -> Fingerprint {
        let mut m: HashMap<String, i64> = HashMap::new();
        for e in w
            .iter()
            .filter(|e| e.kv.as_ref().is_some_and(|k| k.mod_revision <= rev))
        {
            let Some(kv) = &e.kv else { continue };
            let k = String::from_utf8_lossy(&kv.key).to_string();
            if e.r#type == EventType::Delete as i32 {
                m.remove(&k);
            } else {
                m.insert(k, kv.mod_revision);
            }
        }
        let mut fp = Fingerprint::default();
        for (k, r) in m {
            fp.add(k.as_bytes(), r);
        }
        fp
    }

    fn all_violations(w: WatchCheck) -> Vec<Violation> {
        let s = w.finish();
        let mut v = s.violations.clone();
        v.extend(verify_delivery(&acked(), &HashSet::new(), &[s]));
        v
    }

    fn invariants(v: &[Violation]) -> Vec<Invariant> {
        let mut i: Vec<Invariant> = v.iter().map(|v| v.invariant).collect();
        i.dedup();
        i
    }

    #[test]
    fn a_correct_history_passes_every_check() {
        let h = history();
        let mut w = watcher(&h);
        for rev in 1..=5 {
            w.list(ListCheck {
                rev,
                listed: Listed::Items(state_at(&h, rev)),
                what: "list",
            });
            w.list(ListCheck {
                rev,
                listed: Listed::Count(state_at(&h, rev).count),
                what: "count",
            });
        }
        w.progress(5);
        let s = w.finish();
        assert_eq!(s.lists_checked, 10);
        assert_eq!(s.events, 4);
        assert_eq!(s.intervals, vec![(2, 5)]);
        assert!(s.violations.is_empty(), "{:?}", s.violations);
        assert!(verify_delivery(&acked(), &HashSet::new(), &[s]).is_empty());
    }

    #[test]
    fn catches_a_missed_event() {
        // The update of a at 4 never arrives: the delete of b still follows its own chain, but
        // the final walk finds the acknowledged write at 4 missing.
        let mut h = history();
        h.remove(2);
        let v = all_violations(watcher(&h));
        assert_eq!(invariants(&v), [Invariant::WatchExactlyOnceInOrder]);
        assert!(
            v.iter()
                .any(|v| v.detail.contains("missed the change at 4")),
            "{v:?}"
        );

        // A missed create shows in the prev_kv chain as soon as the key changes again.
        let mut h = history();
        h.remove(0);
        let v = all_violations(watcher(&h));
        assert!(
            v.iter().any(|v| v.detail.contains("missed an event of a")),
            "{v:?}"
        );
    }

    #[test]
    fn catches_a_duplicate() {
        let mut h = history();
        h.insert(2, h[1].clone());
        let v = all_violations(watcher(&h));
        assert_eq!(invariants(&v), [Invariant::WatchExactlyOnceInOrder]);
        assert!(v[0].detail.contains("duplicate: event at 3"), "{v:?}");
        // An event already contained in the list the watch started from is one too.
        let mut w = WatchCheck::new("w");
        w.reset(
            3,
            [(Bytes::from_static(b"a"), 2), (Bytes::from_static(b"b"), 3)],
        );
        w.event(&put("b", 3, None));
        assert!(w.violations()[0].detail.contains("is in the list at 3"));
    }

    #[test]
    fn catches_events_out_of_order() {
        let mut h = history();
        h.swap(2, 3);
        let v = all_violations(watcher(&h));
        assert_eq!(invariants(&v), [Invariant::WatchExactlyOnceInOrder]);
        assert!(v[0].detail.contains("out of order: event at 4"), "{v:?}");
    }

    #[test]
    fn catches_a_list_that_differs() {
        let h = history();
        let mut w = watcher(&h);
        // The list at 4 misses b (which was only deleted at 5).
        let mut wrong = Fingerprint::default();
        wrong.add(b"a", 4);
        w.list(ListCheck {
            rev: 4,
            listed: Listed::Items(wrong),
            what: "list",
        });
        // A count at 3 of 1 (there were 2).
        w.list(ListCheck {
            rev: 3,
            listed: Listed::Count(1),
            what: "count",
        });
        // A list ahead of the watcher is compared once the watcher gets there.
        w.list(ListCheck {
            rev: 7,
            listed: Listed::Count(5),
            what: "count",
        });
        assert_eq!(w.violations().len(), 2);
        w.progress(7);
        let v = all_violations(w);
        assert_eq!(invariants(&v), [Invariant::ListEqualsStateAtRevision]);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(
            v[0].detail
                .contains("list at revision 4 returned 1 objects"),
            "{v:?}"
        );
    }

    #[test]
    fn catches_an_early_progress_notification() {
        let h = history();
        let mut w = watcher(&h[..2]);
        // Progress at 4 while the event at 4 is still to come.
        w.progress(4);
        w.event(&h[2]);
        w.end_response();
        w.event(&h[3]);
        w.end_response();
        let v = all_violations(w);
        assert_eq!(invariants(&v), [Invariant::ProgressAfterEvents]);
        assert!(v[0]
            .detail
            .contains("progress notification at 4 came before the event at 4"));
        // Progress that never gets its event: the final walk finds the change missed.
        let mut w = watcher(&h[..2]);
        w.progress(5);
        let v = all_violations(w);
        assert!(
            v.iter()
                .filter(|v| v.detail.contains("missed the change"))
                .count()
                == 2
        );
    }

    #[test]
    fn an_update_without_prev_kv_is_refused_not_applied() {
        let h = history();
        let mut w = watcher(&h[..2]);
        let mut bare = h[2].clone();
        bare.prev_kv = None;
        assert_eq!(w.event(&bare), Outcome::NoPrevKv);
        // The caller lists again, as kube-apiserver's reflector does.
        w.reset(5, [(Bytes::from_static(b"a"), 4)]);
        let s = w.finish();
        assert_eq!((s.no_prev_kv, s.events), (1, 2));
        assert!(s.violations.is_empty());
        assert_eq!(s.intervals, vec![(2, 3)]);
    }

    #[test]
    fn a_rewatch_continues_and_a_relist_starts_a_new_interval() {
        let h = history();
        let mut w = watcher(&h[..2]);
        // Re-watch from the position: the remaining events continue the same interval.
        assert_eq!(w.resume_from(), 4);
        for e in &h[2..] {
            w.event(e);
            w.end_response();
        }
        // A re-list at 9 (the changes at 6..=9 were of other types) starts a new interval.
        w.reset(9, [(Bytes::from_static(b"a"), 4)]);
        w.progress(10);
        let s = w.finish();
        assert_eq!(s.intervals, vec![(2, 5), (10, 10)]);
        assert!(s.violations.is_empty());
        assert!(verify_delivery(&acked(), &HashSet::new(), &[s]).is_empty());
    }

    #[test]
    fn unacknowledged_changes_must_be_explained_and_seen_by_all() {
        let mut h = history();
        h.push(put("c", 6, None));
        let s1 = watcher(&h).finish();
        let s2 = watcher(&h[..4]);
        let mut s2 = s2;
        s2.progress(6);
        let s2 = s2.finish();
        let none = HashSet::new();
        let v = verify_delivery(&acked(), &none, std::slice::from_ref(&s1));
        assert!(v[0].detail.contains("no write explains"), "{v:?}");
        let maybe: HashSet<u64> = [tag(b"c", false)].into();
        assert!(verify_delivery(&acked(), &maybe, std::slice::from_ref(&s1)).is_empty());
        let v = verify_delivery(&acked(), &maybe, &[s1, s2]);
        assert_eq!(v.len(), 1);
        assert!(v[0].detail.contains("missed the change at 6"));
    }
}
