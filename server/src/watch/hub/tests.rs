//! Hub behaviour with a real store (memory engine) and the apply step, notifying the hub the
//! way the write pipeline does.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use metastore_proto::etcdserverpb::{CompactionRequest, DeleteRangeRequest, PutRequest};
use metastore_proto::mvccpb::event::EventType;
use tokio::sync::mpsc;

use super::*;
use crate::apply::{apply, Command, NoLeases};
use crate::mvcc::StoreOptions;
use crate::storage::MemoryEngine;

fn setup() -> (Arc<Store>, Arc<WatchHub>) {
    let store = Store::open(Arc::new(MemoryEngine::new()), StoreOptions::default()).expect("open");
    let hub = WatchHub::start(store.clone(), Duration::from_millis(200), usize::MAX).expect("hub");
    (store, hub)
}

/// Applies `cmds` as one group and notifies the hub, like the write pipeline.
fn write(store: &Store, hub: &WatchHub, cmds: Vec<Command>) {
    let auth = crate::auth::AuthStore::open_default(store.engine().clone()).expect("auth store");
    let mut a = store.applier().expect("applier");
    let mut events = Vec::new();
    for cmd in cmds {
        let index = a_index(store);
        let mut r = apply(&mut a, index, &cmd, &NoLeases, &auth).expect("apply");
        events.append(&mut r.events);
    }
    let rev = a.publish().expect("publish");
    hub.notify(events, rev);
}

fn a_index(store: &Store) -> u64 {
    store.applied_index() + 1
}

fn put(k: &str, v: &str) -> Command {
    Command::Put(PutRequest {
        key: Bytes::from(k.to_string()),
        value: Bytes::from(v.to_string()),
        ..Default::default()
    })
}

fn compact(revision: i64) -> Command {
    Command::Compact(CompactionRequest {
        revision,
        physical: false,
    })
}

fn spec(key: &str, end: &str) -> WatchSpec {
    WatchSpec {
        range: KeyRange::new(key.as_bytes(), end.as_bytes()),
        start_rev: 0,
        watch_id: 0,
        no_put: false,
        no_delete: false,
        prev_kv: false,
        progress_notify: false,
        fragment: false,
    }
}

fn open(hub: &WatchHub, cap: usize) -> (StreamId, mpsc::Receiver<Delivery>) {
    let (tx, rx) = mpsc::channel(cap);
    (hub.open_stream(tx), rx)
}

fn watch(hub: &WatchHub, stream: StreamId, s: WatchSpec) -> WatchId {
    let (id, _) = hub.watch(stream, s).expect("watch");
    hub.activate(stream, id);
    id
}

/// `(watch_id, key, mod_revision, is_put, prev value)` of every event received within `wait`.
async fn drain(rx: &mut mpsc::Receiver<Delivery>, wait: Duration) -> Vec<Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(wait, rx.recv()).await {
        out.push(d);
    }
    out
}

fn flat(ds: &[Delivery]) -> Vec<(WatchId, String, i64, bool, Option<String>)> {
    ds.iter()
        .flat_map(|d| match d {
            Delivery::Events {
                watch_id, events, ..
            } => events
                .to_vec()
                .iter()
                .map(|e| {
                    let kv = e.kv.as_ref().expect("kv");
                    (
                        *watch_id,
                        String::from_utf8_lossy(&kv.key).into_owned(),
                        kv.mod_revision,
                        e.r#type == EventType::Put as i32,
                        e.prev_kv
                            .as_ref()
                            .map(|p| String::from_utf8_lossy(&p.value).into_owned()),
                    )
                })
                .collect::<Vec<_>>(),
            _ => Vec::new(),
        })
        .collect()
}

#[tokio::test]
async fn live_events_filters_and_prev_kv() {
    let (store, hub) = setup();
    let (sid, mut rx) = open(&hub, 64);
    let all = watch(&hub, sid, spec("k", "l"));
    let mut no_put = spec("k", "l");
    no_put.no_put = true;
    no_put.prev_kv = true;
    let deletes = watch(&hub, sid, no_put);
    let single = watch(&hub, sid, spec("k1", ""));
    write(&store, &hub, vec![put("k1", "a")]); // 2
    write(&store, &hub, vec![put("k2", "b"), put("x", "c")]); // 3, 4
    write(
        &store,
        &hub,
        vec![Command::DeleteRange(DeleteRangeRequest {
            key: "k1".into(),
            ..Default::default()
        })],
    ); // 5
    let got = flat(&drain(&mut rx, Duration::from_millis(300)).await);
    let of = |id| {
        got.iter()
            .filter(|e| e.0 == id)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        of(all),
        vec![
            (all, "k1".into(), 2, true, None),
            (all, "k2".into(), 3, true, None),
            (all, "k1".into(), 5, false, None),
        ]
    );
    assert_eq!(
        of(deletes),
        vec![(deletes, "k1".into(), 5, false, Some("a".into()))]
    );
    assert_eq!(of(single).len(), 2);
}

/// Watchers with the same selection share the one the first of them made, but only those
/// that want every revision of the group: a watcher starting in the middle of the group, or
/// with other filters or `prev_kv`, gets its own, on any stream and in any order.
#[tokio::test]
async fn watchers_of_one_range_share_a_selection_only_when_they_want_the_same_events() {
    let (store, hub) = setup();
    write(&store, &hub, vec![put("k0", "z")]); // 2
    let (s1, mut rx1) = open(&hub, 256);
    let (s2, mut rx2) = open(&hub, 256);
    let later = |from: i64| {
        let mut s = spec("k", "l");
        s.start_rev = from;
        s
    };
    let mut no_put = spec("k", "l");
    no_put.no_put = true;
    let mut prev = spec("k", "l");
    prev.prev_kv = true;
    let mut ids = Vec::new();
    for sid in [s1, s2] {
        for _ in 0..3 {
            ids.push((sid, "all", watch(&hub, sid, spec("k", "l"))));
            ids.push((sid, "from 5", watch(&hub, sid, later(5))));
            ids.push((sid, "no put", watch(&hub, sid, no_put.clone())));
            ids.push((sid, "prev", watch(&hub, sid, prev.clone())));
            ids.push((sid, "narrow", watch(&hub, sid, spec("k1", "k2"))));
        }
    }
    let del = Command::DeleteRange(DeleteRangeRequest {
        key: "k0".into(),
        ..Default::default()
    });
    // One group: revisions 3 (k1), 4 (k2), 5 (x: no watcher's), 6 (k1 again), 7 (k0 deleted).
    let cmds = vec![
        put("k1", "a"),
        put("k2", "b"),
        put("x", "c"),
        put("k1", "d"),
        del,
    ];
    write(&store, &hub, cmds);
    let mut got = flat(&drain(&mut rx1, Duration::from_millis(300)).await);
    let from_s1 = got.len();
    got.extend(flat(&drain(&mut rx2, Duration::from_millis(50)).await));
    let expect = |kind: &str| -> Vec<(String, i64, bool, Option<String>)> {
        let all = vec![
            ("k1".to_string(), 3, true, None),
            ("k2".into(), 4, true, None),
            ("k1".into(), 6, true, None),
            ("k0".into(), 7, false, None),
        ];
        match kind {
            "all" => all,
            "from 5" => all.into_iter().filter(|e| e.1 >= 5).collect(),
            "no put" => all.into_iter().filter(|e| !e.2).collect(),
            "narrow" => all.into_iter().filter(|e| e.0 == "k1").collect(),
            _ => vec![
                ("k1".to_string(), 3, true, None),
                ("k2".into(), 4, true, None),
                ("k1".into(), 6, true, Some("a".into())),
                ("k0".into(), 7, false, Some("z".into())),
            ],
        }
    };
    for (sid, kind, id) in ids {
        let range = if sid == s1 {
            0..from_s1
        } else {
            from_s1..got.len()
        };
        let mine: Vec<_> = got[range]
            .iter()
            .filter(|e| e.0 == id)
            .map(|e| (e.1.clone(), e.2, e.3, e.4.clone()))
            .collect();
        assert_eq!(mine, expect(kind), "watcher {id} ({kind}) on stream {sid}");
    }
}

/// Holds the `watch-sync` thread's history reads (cursors over the revision log) while
/// `held` is set, and tells when one is waiting.
#[derive(Default)]
struct HoldReplay {
    held: std::sync::Mutex<bool>,
    waiting: std::sync::atomic::AtomicBool,
    released: std::sync::Condvar,
}

impl crate::storage::EngineHook for HoldReplay {
    fn snapshot_iter(&self, table: crate::storage::Table) {
        if table != crate::storage::Table::Rev
            || std::thread::current().name() != Some("watch-sync")
        {
            return;
        }
        let mut held = self.held.lock().expect("lock");
        while *held {
            self.waiting
                .store(true, std::sync::atomic::Ordering::SeqCst);
            held = self.released.wait(held).expect("wait");
        }
    }
}

/// A watcher asking for `prev_kv` that is created while a replay round reads history for
/// watchers that did not ask for it waits for a round of its own: the round's events carry
/// no `prev_kv`, and etcd fills it in replayed events (seen in the differential e2e test).
#[tokio::test]
async fn a_prev_kv_watcher_created_during_a_replay_round_gets_prev_kv() {
    let engine = crate::storage::HookedEngine::new(HoldReplay::default());
    let store = Store::open(engine.clone(), StoreOptions::default()).expect("open");
    let hub = WatchHub::start(store.clone(), Duration::from_millis(200), usize::MAX).expect("hub");
    write(&store, &hub, vec![put("a", "1")]); // revision 2
    write(&store, &hub, vec![put("a", "3")]); // revision 3
    *engine.hook.held.lock().expect("lock") = true;
    let (sid, mut rx) = open(&hub, 64);
    let mut plain = spec("a", "");
    plain.start_rev = 2;
    let plain_id = watch(&hub, sid, plain);
    // The round for `plain` (no prev_kv wanted) is now reading history.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !engine
        .hook
        .waiting
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no replay round started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut with_prev = spec("a", "");
    with_prev.start_rev = 2;
    with_prev.prev_kv = true;
    let prev_id = watch(&hub, sid, with_prev);
    *engine.hook.held.lock().expect("lock") = false;
    engine.hook.released.notify_all();
    let got = flat(&drain(&mut rx, Duration::from_millis(500)).await);
    let of = |id| -> Vec<(i64, Option<String>)> {
        got.iter()
            .filter(|e| e.0 == id)
            .map(|e| (e.2, e.4.clone()))
            .collect()
    };
    assert_eq!(of(plain_id), vec![(2, None), (3, None)]);
    assert_eq!(of(prev_id), vec![(2, None), (3, Some("1".to_string()))]);
    assert_eq!(hub.unsynced_count(), 0);
}

#[tokio::test]
async fn history_replay_then_live_without_gaps_or_duplicates() {
    let (store, hub) = setup();
    for i in 0..20 {
        write(&store, &hub, vec![put("h", &i.to_string())]); // revisions 2..=21
    }
    let (sid, mut rx) = open(&hub, 64);
    let mut s = spec("h", "");
    s.start_rev = 5;
    s.prev_kv = true;
    let id = watch(&hub, sid, s);
    for i in 20..25 {
        write(&store, &hub, vec![put("h", &i.to_string())]); // 22..=26
    }
    let got = flat(&drain(&mut rx, Duration::from_millis(500)).await);
    let revs: Vec<i64> = got.iter().map(|e| e.2).collect();
    assert_eq!(
        revs,
        (5..=26).collect::<Vec<_>>(),
        "every revision once, in order"
    );
    assert_eq!(
        got[0].4.as_deref(),
        Some("2"),
        "replayed events carry prev_kv"
    );
    assert!(got.iter().all(|e| e.0 == id));
    assert_eq!(hub.unsynced_count(), 0);
}

#[tokio::test]
async fn compacted_start_is_canceled_with_the_compact_revision() {
    let (store, hub) = setup();
    for i in 0..5 {
        write(&store, &hub, vec![put("c", &i.to_string())]);
    }
    write(&store, &hub, vec![compact(4)]);
    let (sid, mut rx) = open(&hub, 8);
    let mut s = spec("c", "");
    s.start_rev = 2;
    let id = watch(&hub, sid, s);
    let got = drain(&mut rx, Duration::from_millis(400)).await;
    assert!(
        matches!(got.as_slice(), [Delivery::Compacted { watch_id, compact_rev: 4, .. }] if *watch_id == id),
        "{got:?}"
    );
    assert_eq!(hub.watcher_count(), 0, "the compacted watcher is gone");
}

#[tokio::test]
async fn ids_ranges_and_cancel() {
    let (_store, hub) = setup();
    let (sid, _rx) = open(&hub, 8);
    let mut s = spec("a", "");
    s.watch_id = 7;
    assert_eq!(hub.watch(sid, s.clone()).map(|r| r.0), Ok(7));
    assert_eq!(hub.watch(sid, s), Err(WatchError::DuplicateId));
    assert_eq!(hub.watch(sid, spec("b", "a")), Err(WatchError::EmptyRange));
    assert_eq!(
        hub.watch(sid, spec("a", "")).map(|r| r.0),
        Ok(0),
        "auto ids start at 0"
    );
    assert!(hub.cancel(sid, 7).is_some());
    assert!(hub.cancel(sid, 7).is_none(), "unknown ids are ignored");
}

#[tokio::test]
async fn progress_waits_until_every_watcher_caught_up() {
    let (store, hub) = setup();
    let (sid, mut rx) = open(&hub, 1);
    watch(&hub, sid, spec("p", "q"));
    assert_eq!(
        hub.request_progress(sid),
        Some(1),
        "all synced: answered at once"
    );
    // Fill the one-slot buffer so the watcher falls behind.
    write(&store, &hub, vec![put("p1", "x")]);
    write(&store, &hub, vec![put("p2", "x")]);
    assert_eq!(hub.unsynced_count(), 1);
    assert_eq!(hub.request_progress(sid), None, "deferred while behind");
    let mut seen = Vec::new();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
        seen.push(d);
    }
    let progress_at = seen
        .iter()
        .position(|d| {
            matches!(
                d,
                Delivery::Progress {
                    watch_id: -1,
                    rev: 3
                }
            )
        })
        .expect("a progress response once caught up");
    assert_eq!(
        flat(&seen[..progress_at]).len(),
        2,
        "after every event up to its revision"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_watchers_get_every_event_once_and_a_stuck_one_blocks_nobody() {
    const STREAMS: usize = 100;
    const PER_STREAM: usize = 100;
    const WRITES: usize = 1000;
    let (store, hub) = setup();
    let mut consumers = Vec::new();
    for _ in 0..STREAMS {
        let (sid, mut rx) = open(&hub, 256);
        for _ in 0..PER_STREAM {
            watch(&hub, sid, spec("w/", "w0"));
        }
        consumers.push(tokio::spawn(async move {
            let mut per: HashMap<WatchId, Vec<i64>> = HashMap::new();
            let mut total = 0;
            while total < PER_STREAM * WRITES {
                match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                    Ok(Some(Delivery::Events {
                        watch_id, events, ..
                    })) => {
                        total += events.len();
                        per.entry(watch_id)
                            .or_default()
                            .extend(events.iter().map(|e| event_rev(e.event())));
                    }
                    Ok(Some(_)) => {}
                    _ => break,
                }
            }
            per
        }));
    }
    // One stream nobody reads.
    let (stuck, _stuck_rx) = open(&hub, 4);
    watch(&hub, stuck, spec("w/", "w0"));

    let started = std::time::Instant::now();
    let writer = {
        let (store, hub) = (store.clone(), hub.clone());
        tokio::task::spawn_blocking(move || {
            for i in 0..WRITES {
                write(&store, &hub, vec![put(&format!("w/{}", i % 50), "v")]);
            }
        })
    };
    writer.await.expect("writer");
    let write_time = started.elapsed();
    let want: Vec<i64> = (2..2 + WRITES as i64).collect();
    for c in consumers {
        let per = c.await.expect("consumer");
        assert_eq!(per.len(), PER_STREAM);
        for revs in per.values() {
            assert_eq!(revs, &want, "every event exactly once, in revision order");
        }
    }
    assert_eq!(hub.watcher_count(), STREAMS * PER_STREAM + 1);
    println!(
        "{} watchers x {WRITES} writes: writes took {write_time:?}, all delivered after {:?}",
        STREAMS * PER_STREAM,
        started.elapsed()
    );
}

/// A revision published between `watch` (the watcher is registered, synced, still pending)
/// and `activate` (its `Created` response was sent) must still reach it: the list-then-watch
/// of a kube-apiserver that lists at R and watches from R+1 while R+1 is being applied.
#[tokio::test]
async fn a_revision_published_while_the_created_response_is_in_flight_is_not_lost() {
    let (store, hub) = setup();
    write(&store, &hub, vec![put("p/a", "0")]); // 2
    let listed = store.current_revision();
    let (sid, mut rx) = open(&hub, 64);

    // Start at the listed revision + 1 (with prev_kv, like the apiserver).
    let mut from_next = spec("p/", "p0");
    from_next.start_rev = listed + 1;
    from_next.prev_kv = true;
    let (a, _) = hub.watch(sid, from_next).expect("watch");
    // Start "now" (start_revision 0).
    let (b, _) = hub.watch(sid, spec("p/", "p0")).expect("watch");
    // A watcher whose start revision is a later one, published in the same window.
    let mut later = spec("p/", "p0");
    later.start_rev = listed + 2;
    let (c, _) = hub.watch(sid, later).expect("watch");
    // An unrelated write in the window keeps nothing back either.
    write(&store, &hub, vec![put("q", "x")]); // listed + 1, no match
    write(&store, &hub, vec![put("p/b", "1")]); // listed + 2
    hub.activate(sid, a);
    hub.activate(sid, b);
    hub.activate(sid, c);
    write(&store, &hub, vec![put("p/c", "2")]); // listed + 3

    let got = flat(&drain(&mut rx, Duration::from_millis(500)).await);
    for id in [a, b, c] {
        let revs: Vec<i64> = got.iter().filter(|e| e.0 == id).map(|e| e.2).collect();
        assert_eq!(
            revs,
            vec![listed + 2, listed + 3],
            "watcher {id}: every event once, in order"
        );
    }
    assert_eq!(hub.unsynced_count(), 0);
}

/// Many rounds of writers racing watchers that start at the current revision + 1 with a
/// delayed activation (the `Created` send), as the watch service does: none misses its first event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_starting_at_current_plus_one_race_writers_without_losing_events() {
    let (store, hub) = setup();
    let writer = {
        let (store, hub) = (store.clone(), hub.clone());
        std::thread::spawn(move || {
            for i in 0..400 {
                write(&store, &hub, vec![put(&format!("r/{i}"), "v")]);
                if i % 4 == 0 {
                    std::thread::yield_now();
                }
            }
        })
    };
    let mut checks = Vec::new();
    while !writer.is_finished() {
        let (sid, rx) = open(&hub, 1024);
        let listed = store.current_revision();
        let mut s = spec("r/", "r0");
        s.start_rev = listed + 1;
        let (id, _) = hub.watch(sid, s).expect("watch");
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(200));
        hub.activate(sid, id);
        checks.push((listed, rx));
    }
    writer.join().expect("writer");
    let last = store.current_revision();
    for (listed, mut rx) in checks {
        if listed >= last {
            continue;
        }
        let mut revs: Vec<i64> = Vec::new();
        while revs.last().is_none_or(|r| *r < last) {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(d)) => revs.extend(flat(&[d]).iter().map(|e| e.2)),
                _ => break,
            }
        }
        assert_eq!(
            revs,
            ((listed + 1)..=last).collect::<Vec<_>>(),
            "watcher listed at {listed}"
        );
    }
}

#[test]
fn a_stream_holds_at_most_its_watcher_limit_and_a_cancel_frees_a_slot() {
    let store = Store::open(Arc::new(MemoryEngine::new()), StoreOptions::default()).expect("open");
    let hub = WatchHub::start(store, Duration::from_millis(200), 3).expect("hub");
    let (a, _rx_a) = open(&hub, 16);
    let (b, _rx_b) = open(&hub, 16);
    let ids: Vec<WatchId> = (0..3).map(|_| watch(&hub, a, spec("k", ""))).collect();
    assert_eq!(
        hub.watch(a, spec("k", "")),
        Err(WatchError::TooManyWatchers(3))
    );
    let msg = WatchError::TooManyWatchers(3).to_string();
    assert!(
        msg.contains("limit 3") && msg.contains("--max-watchers-per-stream"),
        "{msg}"
    );
    // The limit is per stream: another stream is not affected.
    watch(&hub, b, spec("k", ""));
    assert!(hub.cancel(a, ids[1]).is_some());
    watch(&hub, a, spec("k", ""));
    assert_eq!(hub.watcher_count(), 4);
}

/// A watcher that fell off the fast path must be replayed its missed revisions even when the
/// same replay round cancels another watcher whose start was compacted away (the round's read
/// then starts below the compaction and fails; that must not count as "caught up").
#[tokio::test]
async fn a_compacted_watcher_does_not_make_a_lagging_one_skip_revisions() {
    let (store, hub) = setup();
    for i in 0..5 {
        write(&store, &hub, vec![put("c", &i.to_string())]); // 2..=6
    }
    write(&store, &hub, vec![compact(4)]);
    // The lagging watcher: a buffer of one, filled by the first live event, so the second
    // revision leaves it unsynced (and it stays so while the buffer is full).
    let (slow_stream, mut slow_rx) = open(&hub, 1);
    let slow = watch(&hub, slow_stream, spec("k", ""));
    write(&store, &hub, vec![put("k", "a")]); // 7, delivered live
    write(&store, &hub, vec![put("k", "b")]); // 8, buffer full: left to the syncer
    assert_eq!(hub.unsynced_count(), 1);
    // Now a watcher from a compacted revision joins; the next replay round cancels it.
    let (old_stream, mut old_rx) = open(&hub, 8);
    let mut s = spec("c", "");
    s.start_rev = 2;
    let old = watch(&hub, old_stream, s);
    let got = drain(&mut old_rx, Duration::from_millis(400)).await;
    assert!(
        matches!(got.as_slice(), [Delivery::Compacted { watch_id, compact_rev: 4, .. }] if *watch_id == old),
        "{got:?}"
    );
    write(&store, &hub, vec![put("k", "c")]); // 9

    // The slow client reads again: it gets 7, then 8 from history, then 9, nothing skipped.
    let mut revs = Vec::new();
    let wait = Duration::from_secs(5);
    while revs.len() < 3 {
        match tokio::time::timeout(wait, slow_rx.recv()).await {
            Ok(Some(d)) => revs.extend(flat(&[d]).iter().map(|e| (e.0, e.2))),
            _ => break,
        }
    }
    assert_eq!(revs, vec![(slow, 7), (slow, 8), (slow, 9)]);
}
