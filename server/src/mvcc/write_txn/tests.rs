//! MVCC behaviour, run on both engines.

use std::sync::Arc;

use bytes::Bytes;

use crate::mvcc::{Error, KeyRange, RangeOptions, Store, StoreOptions};
use crate::storage::{Engine, MemoryEngine, RocksEngine};

fn stores() -> Vec<(Arc<Store>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rocks: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(dir.path(), &Default::default()).expect("rocksdb"));
    let mem: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    vec![
        (
            Store::open(mem, StoreOptions::default()).expect("open"),
            None,
        ),
        (
            Store::open(rocks, StoreOptions::default()).expect("open"),
            Some(dir),
        ),
    ]
}

fn put(s: &Store, k: &str, v: &str) -> i64 {
    let mut a = s.applier().expect("applier");
    let mut t = a.begin().expect("begin");
    t.put(Bytes::from(k.to_string()), Bytes::from(v.to_string()), 0)
        .expect("put");
    let index = s.applied_index() + 1;
    let out = a.commit(t, index).expect("commit");
    a.publish().expect("publish");
    out.rev
}

fn del(s: &Store, range: KeyRange) -> usize {
    let mut a = s.applier().expect("applier");
    let mut t = a.begin().expect("begin");
    let n = t.delete_range(&range).expect("delete").len();
    let index = s.applied_index() + 1;
    a.commit(t, index).expect("commit");
    a.publish().expect("publish");
    n
}

fn get_at(s: &Store, k: &str, rev: i64) -> Option<(String, i64, i64, i64)> {
    let r = s
        .range(
            &KeyRange::Single(k.as_bytes().to_vec()),
            RangeOptions {
                rev,
                ..Default::default()
            },
        )
        .expect("range");
    r.kvs.first().map(|kv| {
        (
            String::from_utf8_lossy(&kv.value).into_owned(),
            kv.create_revision,
            kv.mod_revision,
            kv.version,
        )
    })
}

fn keys(s: &Store, range: KeyRange, opts: RangeOptions) -> (Vec<String>, usize) {
    let r = s.range(&range, opts).expect("range");
    (
        r.kvs
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect(),
        r.count,
    )
}

#[test]
fn revisions_versions_and_generations() {
    for (s, _d) in stores() {
        assert_eq!(s.current_revision(), 1, "fresh store is at revision 1");
        assert_eq!(put(&s, "a", "1"), 2);
        assert_eq!(put(&s, "a", "2"), 3);
        assert_eq!(get_at(&s, "a", 0), Some(("2".into(), 2, 3, 2)));
        assert_eq!(del(&s, KeyRange::Single(b"a".to_vec())), 1);
        assert_eq!(s.current_revision(), 4);
        assert_eq!(get_at(&s, "a", 0), None);
        assert_eq!(del(&s, KeyRange::Single(b"a".to_vec())), 0);
        assert_eq!(s.current_revision(), 4, "deleting nothing does not advance");
        assert_eq!(put(&s, "a", "3"), 5);
        assert_eq!(
            get_at(&s, "a", 0),
            Some(("3".into(), 5, 5, 1)),
            "new generation"
        );
        assert_eq!(get_at(&s, "a", 3), Some(("2".into(), 2, 3, 2)));
        assert_eq!(get_at(&s, "a", 2), Some(("1".into(), 2, 2, 1)));
        assert_eq!(get_at(&s, "a", 4), None);
        assert!(matches!(
            s.range(
                &KeyRange::Single(b"a".to_vec()),
                RangeOptions {
                    rev: 6,
                    ..Default::default()
                }
            ),
            Err(Error::FutureRev)
        ));
    }
}

#[test]
fn range_forms_limits_and_counts() {
    for (s, _d) in stores() {
        for k in ["a", "b", "b\0", "ba", "c", "d"] {
            put(&s, k, k);
        }
        put(&s, "b", "again");
        let all = RangeOptions::default();
        assert_eq!(
            keys(&s, KeyRange::new(b"b", b"c"), all).0,
            ["b", "b\0", "ba"]
        );
        assert_eq!(keys(&s, KeyRange::new(b"b", b"\0"), all).0.len(), 5);
        assert_eq!(keys(&s, KeyRange::new(b"\0", b"\0"), all).1, 6);
        assert_eq!(keys(&s, KeyRange::new(b"c", b"a"), all).1, 0, "inverted");
        let limited = RangeOptions {
            limit: 2,
            ..Default::default()
        };
        assert_eq!(
            keys(&s, KeyRange::new(b"a", b"\0"), limited),
            (vec!["a".into(), "b".into()], 6)
        );
        let count_only = RangeOptions {
            count_only: true,
            ..Default::default()
        };
        assert_eq!(keys(&s, KeyRange::new(b"a", b"z"), count_only), (vec![], 6));
        // History: at revision 4 only a, b, b\0 existed.
        let at4 = RangeOptions {
            rev: 4,
            ..Default::default()
        };
        assert_eq!(
            keys(&s, KeyRange::new(b"\0", b"\0"), at4).0,
            ["a", "b", "b\0"]
        );
        del(&s, KeyRange::new(b"b", b"c"));
        assert_eq!(
            keys(&s, KeyRange::new(b"\0", b"\0"), all).0,
            ["a", "c", "d"]
        );
    }
}

#[test]
fn txn_reads_see_own_writes_and_share_one_revision() {
    for (s, _d) in stores() {
        put(&s, "x", "0");
        let mut a = s.applier().expect("applier");
        let mut t = a.begin().expect("begin");
        assert_eq!(t.rev(), 2);
        t.put(Bytes::from("y"), Bytes::from("1"), 0).expect("put");
        t.delete_range(&KeyRange::Single(b"x".to_vec()))
            .expect("del");
        assert_eq!(t.rev(), 3);
        let inside = t
            .range(&KeyRange::new(b"\0", b"\0"), RangeOptions::default())
            .expect("range");
        assert_eq!(inside.kvs.len(), 1);
        assert_eq!(&inside.kvs[0].key[..], b"y");
        // Not visible outside before commit and publish.
        assert_eq!(get_at(&s, "y", 0), None);
        let out = a.commit(t, 10).expect("commit");
        assert_eq!(out.rev, 3);
        assert_eq!(out.events.len(), 2);
        assert_eq!(s.current_revision(), 2, "not published yet");
        a.publish().expect("publish");
        assert_eq!(s.current_revision(), 3);
        assert_eq!(s.applied_index(), 10);
        assert_eq!(get_at(&s, "y", 0), Some(("1".into(), 3, 3, 1)));
        assert_eq!(get_at(&s, "x", 0), None);
    }
}

#[tokio::test]
async fn compaction_keeps_latest_and_drops_history() {
    for (s, _d) in stores() {
        put(&s, "a", "1"); // 2
        put(&s, "a", "2"); // 3
        put(&s, "b", "1"); // 4
        del(&s, KeyRange::Single(b"b".to_vec())); // 5
        put(&s, "c", "1"); // 6
        let ticket = {
            let mut a = s.applier().expect("applier");
            let t = a.compact(5, 100).expect("compact");
            a.publish().expect("publish");
            t
        };
        s.compactor().wait(&ticket).await;
        assert_eq!(s.compactor().finished(), 5);
        assert_eq!(get_at(&s, "a", 5), Some(("2".into(), 2, 3, 2)));
        assert_eq!(get_at(&s, "a", 0), Some(("2".into(), 2, 3, 2)));
        assert!(matches!(
            s.range(
                &KeyRange::Single(b"a".to_vec()),
                RangeOptions {
                    rev: 4,
                    ..Default::default()
                }
            ),
            Err(Error::Compacted)
        ));
        let mut a = s.applier().expect("applier");
        assert!(matches!(a.compact(5, 101), Err(Error::Compacted)));
        assert!(matches!(a.compact(3, 101), Err(Error::Compacted)));
        assert!(matches!(a.compact(7, 101), Err(Error::FutureRev)));
        drop(a);
        // Physically: only a@3 and c@6 remain (b's tombstone and history are gone).
        let snap = s.engine().snapshot();
        let mut it = snap.iter(crate::storage::Table::Kv);
        it.seek(b"");
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        assert_eq!(n, 2, "{}", s.engine().name());
        let mut it = snap.iter(crate::storage::Table::Rev);
        it.seek(b"");
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        assert_eq!(n, 2, "revision log follows the kv table");
    }
}

#[test]
fn reopen_keeps_revisions_and_resumes() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let e: Arc<dyn Engine> =
            Arc::new(RocksEngine::open(dir.path(), &Default::default()).expect("rocksdb"));
        let s = Store::open(e, StoreOptions::default()).expect("open");
        put(&s, "k", "v1");
        put(&s, "k", "v2");
    }
    let e: Arc<dyn Engine> =
        Arc::new(RocksEngine::open(dir.path(), &Default::default()).expect("rocksdb"));
    let s = Store::open(e, StoreOptions::default()).expect("open");
    assert_eq!(s.current_revision(), 3);
    assert_eq!(s.applied_index(), 2);
    assert_eq!(get_at(&s, "k", 0), Some(("v2".into(), 2, 3, 2)));
    assert_eq!(get_at(&s, "k", 2), Some(("v1".into(), 2, 2, 1)));
}

#[tokio::test]
async fn history_replays_events_in_order_and_respects_compaction() {
    for (s, _d) in stores() {
        put(&s, "a", "1"); // 2
        {
            let mut a = s.applier().expect("applier");
            let mut t = a.begin().expect("begin");
            t.put(Bytes::from("c"), Bytes::from("x"), 0).expect("put");
            t.put(Bytes::from("b"), Bytes::from("y"), 0).expect("put");
            a.commit(t, 2).expect("commit"); // 3: c then b
            a.publish().expect("publish");
        }
        del(&s, KeyRange::Single(b"a".to_vec())); // 4
        let h = s.history(2, 4, 100).expect("history");
        let got: Vec<(String, i64, i32)> = h
            .iter()
            .map(|e| {
                let kv = e.kv.as_ref().expect("kv");
                (
                    String::from_utf8_lossy(&kv.key).into_owned(),
                    kv.mod_revision,
                    e.r#type,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), 2, 0),
                ("c".into(), 3, 0),
                ("b".into(), 3, 0),
                ("a".into(), 4, 1)
            ],
            "revision then sub-revision order; the delete is a DELETE event"
        );
        let h = s.history(2, 4, 2).expect("history");
        assert_eq!(h.len(), 3, "a revision's events are never split");
        assert!(matches!(s.history(2, 9, 10), Err(Error::FutureRev)));
        let ticket = {
            let mut a = s.applier().expect("applier");
            let t = a.compact(3, 10).expect("compact");
            a.publish().expect("publish");
            t
        };
        s.compactor().wait(&ticket).await;
        assert!(matches!(s.history(2, 4, 10), Err(Error::Compacted)));
        assert_eq!(s.history(3, 4, 10).expect("history").len(), 3);
    }
}

#[tokio::test]
async fn hash_kv_is_deterministic_and_ignores_compaction_progress() {
    let mut hashes = Vec::new();
    for (s, _d) in stores() {
        put(&s, "a", "1"); // 2
        put(&s, "b", "1"); // 3
        put(&s, "a", "2"); // 4
        del(&s, KeyRange::Single(b"b".to_vec())); // 5
        put(&s, "c", "1"); // 6
        let before = s.hash_kv(0).expect("hash");
        assert_eq!(before.2, 6);
        assert_eq!(before.1, -1, "never compacted: -1, as etcd reports it");
        assert_ne!(
            s.hash_kv(-1).expect("hash").0,
            before.0,
            "negative: nothing hashed"
        );
        assert_eq!(s.hash_kv(6).expect("hash"), before, "0 means current");
        assert_ne!(
            s.hash_kv(4).expect("hash").0,
            before.0,
            "history up to 4 differs"
        );
        assert!(matches!(s.hash_kv(7), Err(Error::FutureRev)));
        // Several revisions in one pass, in any order, equal one pass each.
        let revs = [6, 2, 4, 3, 4, 5];
        let many = s.hash_kv_many(&revs).expect("hash many");
        let single: Vec<u32> = revs
            .iter()
            .map(|r| s.hash_kv(*r).expect("hash").0)
            .collect();
        assert_eq!(many, single);
        assert_eq!(
            many.iter().collect::<std::collections::BTreeSet<_>>().len(),
            5,
            "each distinct revision hashes differently"
        );
        // Compaction at 5 drops a@2, b@3 and b's tombstone: the hash at 6 of what survives.
        let (ticket, logical) = {
            let mut a = s.applier().expect("applier");
            let t = a.compact(5, 10).expect("compact");
            // Logically compacted, physically not yet removed.
            let logical = s.hash_kv(6).expect("hash");
            a.publish().expect("publish");
            (t, logical)
        };
        s.compactor().wait(&ticket).await;
        let physical = s.hash_kv(6).expect("hash");
        assert_eq!(logical, physical, "independent of compaction progress");
        assert_ne!(physical.0, before.0);
        assert_eq!(physical.1, 5);
        assert!(matches!(s.hash_kv(4), Err(Error::Compacted)));
        assert!(
            matches!(s.hash_kv(5), Err(Error::Compacted)),
            "etcd refuses HashKV at the compacted revision itself"
        );
        hashes.push((before.0, physical.0, s.hash().expect("hash")));
    }
    assert_eq!(
        hashes[0], hashes[1],
        "both engines hash the same data the same way"
    );
}
