//! One conformance suite, run against every engine.

use super::engine::{Engine, Table, WriteBatch};
use super::{MemoryEngine, RocksEngine};

fn engines() -> Vec<(Box<dyn Engine>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rocks = RocksEngine::open(dir.path(), &Default::default()).expect("open rocksdb");
    vec![
        (Box::new(MemoryEngine::new()), None),
        (Box::new(rocks), Some(dir)),
    ]
}

fn collect(e: &dyn Engine, table: Table, from: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let snap = e.snapshot();
    let mut it = snap.iter(table);
    it.seek(from);
    let mut out = Vec::new();
    while it.valid() {
        out.push((it.key().to_vec(), it.value().to_vec()));
        it.next();
    }
    it.status().expect("iterator status");
    out
}

#[test]
fn batches_put_get_delete_in_order() {
    for (e, _dir) in engines() {
        let mut b = WriteBatch::new();
        b.put(Table::Kv, b"b".to_vec(), b"2".to_vec());
        b.put(Table::Kv, b"a".to_vec(), b"1".to_vec());
        b.put(Table::Kv, b"c".to_vec(), b"3".to_vec());
        b.put(Table::Meta, b"a".to_vec(), b"meta".to_vec());
        b.delete(Table::Kv, b"c".to_vec());
        e.write(b, true).expect("write");
        assert_eq!(
            e.get(Table::Kv, b"a").expect("get"),
            Some(b"1".to_vec()),
            "{}",
            e.name()
        );
        assert_eq!(e.get(Table::Kv, b"c").expect("get"), None, "{}", e.name());
        assert_eq!(
            e.get(Table::Meta, b"a").expect("get"),
            Some(b"meta".to_vec())
        );
        assert_eq!(
            e.get(Table::Rev, b"a").expect("get"),
            None,
            "tables are separate"
        );
        let all = collect(e.as_ref(), Table::Kv, b"");
        assert_eq!(
            all,
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec())
            ],
            "{}",
            e.name()
        );
        assert_eq!(collect(e.as_ref(), Table::Kv, b"aa").len(), 1);
        assert!(collect(e.as_ref(), Table::Kv, b"z").is_empty());
    }
}

#[test]
fn snapshots_do_not_see_later_writes() {
    for (e, _dir) in engines() {
        let mut b = WriteBatch::new();
        b.put(Table::Kv, b"k".to_vec(), b"old".to_vec());
        e.write(b, false).expect("write");
        let snap = e.snapshot();
        let mut b = WriteBatch::new();
        b.put(Table::Kv, b"k".to_vec(), b"new".to_vec());
        b.put(Table::Kv, b"k2".to_vec(), b"x".to_vec());
        e.write(b, false).expect("write");
        assert_eq!(
            snap.get(Table::Kv, b"k").expect("get"),
            Some(b"old".to_vec())
        );
        let mut it = snap.iter(Table::Kv);
        it.seek(b"");
        let mut n = 0;
        while it.valid() {
            n += 1;
            it.next();
        }
        assert_eq!(n, 1, "{}: snapshot saw a later write", e.name());
        assert_eq!(e.get(Table::Kv, b"k").expect("get"), Some(b"new".to_vec()));
        e.sync().expect("sync");
    }
}

#[test]
fn binary_keys_sort_bytewise_and_seek_lands_on_successor() {
    for (e, _dir) in engines() {
        let keys: Vec<Vec<u8>> = vec![vec![0], vec![0, 0], vec![1], vec![0xff], vec![0x7f, 0xff]];
        let mut b = WriteBatch::new();
        for k in &keys {
            b.put(Table::Rev, k.clone(), k.clone());
        }
        e.write(b, true).expect("write");
        let got: Vec<Vec<u8>> = collect(e.as_ref(), Table::Rev, &[])
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(got, want, "{}", e.name());
        let snap = e.snapshot();
        let mut it = snap.iter(Table::Rev);
        it.seek(&[0, 0, 0]);
        assert!(it.valid());
        assert_eq!(it.key(), &[1], "{}", e.name());
    }
}

#[test]
fn sizes_grow_with_data_and_defragment_works() {
    for (e, _dir) in engines() {
        let mut b = WriteBatch::new();
        for i in 0..1000u32 {
            b.put(Table::Kv, i.to_be_bytes().to_vec(), vec![7u8; 100]);
        }
        e.write(b, true).expect("write");
        assert!(e.size_bytes() > 0, "{}", e.name());
        e.defragment().expect("defragment");
        assert_eq!(collect(e.as_ref(), Table::Kv, b"").len(), 1000);
    }
}

#[test]
fn rocksdb_data_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let e = RocksEngine::open(dir.path(), &Default::default()).expect("open");
        let mut b = WriteBatch::new();
        b.put(Table::Kv, b"durable".to_vec(), b"yes".to_vec());
        e.write(b, true).expect("write");
    }
    let e = RocksEngine::open(dir.path(), &Default::default()).expect("reopen");
    assert_eq!(
        e.get(Table::Kv, b"durable").expect("get"),
        Some(b"yes".to_vec())
    );
}

fn keys(e: &dyn Engine, table: Table) -> Vec<Vec<u8>> {
    collect(e, table, b"").into_iter().map(|(k, _)| k).collect()
}

fn put_all(e: &dyn Engine, table: Table, ks: &[&[u8]]) {
    let mut b = WriteBatch::new();
    for k in ks {
        b.put(table, k.to_vec(), b"v".to_vec());
    }
    e.write(b, false).expect("write");
}

#[test]
fn delete_range_removes_exactly_the_half_open_range() {
    for (e, _dir) in engines() {
        let e = e.as_ref();
        put_all(e, Table::Kv, &[b"a", b"b", b"b\0", b"c", b"d"]);
        put_all(e, Table::Rev, &[b"b"]);
        let mut b = WriteBatch::new();
        b.delete_range(Table::Kv, b"b".to_vec(), Some(b"d".to_vec()));
        e.write(b, true).expect("write");
        assert_eq!(
            keys(e, Table::Kv),
            vec![b"a".to_vec(), b"d".to_vec()],
            "{}",
            e.name()
        );
        assert_eq!(
            keys(e, Table::Rev),
            vec![b"b".to_vec()],
            "other tables untouched"
        );

        // An empty or inverted range deletes nothing.
        let mut b = WriteBatch::new();
        b.delete_range(Table::Kv, b"d".to_vec(), Some(b"d".to_vec()));
        b.delete_range(Table::Kv, b"z".to_vec(), Some(b"a".to_vec()));
        e.write(b, true).expect("write");
        assert_eq!(keys(e, Table::Kv).len(), 2, "{}", e.name());
    }
}

#[test]
fn open_ended_delete_range_reaches_the_last_key() {
    for (e, _dir) in engines() {
        let e = e.as_ref();
        put_all(
            e,
            Table::Meta,
            &[b"a", b"raft/x", b"z", &[0xff, 0xff, 0xff]],
        );
        let mut b = WriteBatch::new();
        b.delete_range(Table::Meta, b"raft/".to_vec(), None);
        e.write(b, true).expect("write");
        assert_eq!(keys(e, Table::Meta), vec![b"a".to_vec()], "{}", e.name());

        // Past the last key: nothing to do.
        let mut b = WriteBatch::new();
        b.delete_range(Table::Meta, b"b".to_vec(), None);
        e.write(b, true).expect("write");
        assert_eq!(keys(e, Table::Meta), vec![b"a".to_vec()], "{}", e.name());
    }
}

#[test]
fn clear_table_is_ordered_with_the_rest_of_its_batch() {
    for (e, _dir) in engines() {
        let e = e.as_ref();
        put_all(e, Table::Kv, &[b"old1", b"old2"]);
        put_all(e, Table::Lease, &[b"lease"]);
        let before = e.snapshot();
        let mut b = WriteBatch::new();
        // Written earlier in the batch, and beyond every key already stored: still cleared.
        b.put(Table::Kv, vec![0xff; 8], b"doomed".to_vec());
        b.clear_table(Table::Kv);
        b.put(Table::Kv, b"new".to_vec(), b"kept".to_vec());
        b.clear_table(Table::Rev); // an empty table
        e.write(b, true).expect("write");
        assert_eq!(keys(e, Table::Kv), vec![b"new".to_vec()], "{}", e.name());
        assert!(keys(e, Table::Rev).is_empty());
        assert_eq!(keys(e, Table::Lease), vec![b"lease".to_vec()]);
        // An earlier snapshot still sees everything.
        let mut it = before.iter(Table::Kv);
        it.seek(b"");
        let mut seen = Vec::new();
        while it.valid() {
            seen.push(it.key().to_vec());
            it.next();
        }
        assert_eq!(
            seen,
            vec![b"old1".to_vec(), b"old2".to_vec()],
            "{}",
            e.name()
        );
    }
}

#[test]
fn memory_engine_size_follows_range_deletes() {
    let e = MemoryEngine::new();
    put_all(&e, Table::Kv, &[b"a", b"b", b"c"]);
    put_all(&e, Table::Meta, &[b"m"]);
    assert_eq!(e.size_bytes(), 8);
    let mut b = WriteBatch::new();
    b.delete_range(Table::Kv, b"b".to_vec(), None);
    e.write(b, false).expect("write");
    assert_eq!(e.size_bytes(), 4);
    let mut b = WriteBatch::new();
    b.clear_table(Table::Kv);
    b.clear_table(Table::Meta);
    e.write(b, false).expect("write");
    assert_eq!(e.size_bytes(), 0);
}

#[test]
fn in_use_falls_with_deletions_and_the_size_follows_after_defragment() {
    for (e, _dir) in engines() {
        let name = e.name();
        let mut b = WriteBatch::new();
        for i in 0..4000u32 {
            b.put(
                Table::Kv,
                i.to_be_bytes().to_vec(),
                metastore_testkit::noise(u64::from(i), 1024),
            );
        }
        e.write(b, true).expect("write");
        e.defragment().expect("defragment"); // RocksDB: everything in table files
        let (size0, used0) = (e.size_bytes(), e.size_in_use_bytes());
        assert!(size0 >= 4000 * 1024, "{name}: {size0}");
        assert!(used0 * 10 >= size0 * 6, "{name}: {used0} in use of {size0}");

        // Three quarters deleted: in use falls at once (etcd's dbSizeInUse after a compaction).
        let mut b = WriteBatch::new();
        for i in (0..4000u32).filter(|i| i % 4 != 0) {
            b.delete(Table::Kv, i.to_be_bytes().to_vec());
        }
        e.write(b, true).expect("write");
        let used1 = e.size_in_use_bytes();
        assert!(
            used1 * 2 <= used0,
            "{name}: {used1} in use after deletes, {used0} before"
        );

        // Defragmenting gives the space back, and leaves little to reclaim.
        e.defragment().expect("defragment");
        let (size2, used2) = (e.size_bytes(), e.size_in_use_bytes());
        assert!(
            size2 * 2 <= size0,
            "{name}: {size2} after defragment, {size0} before"
        );
        assert!(
            used2 * 100 >= size2 * 95,
            "{name}: {used2} in use of {size2}"
        );
        assert_eq!(collect(e.as_ref(), Table::Kv, b"").len(), 1000, "{name}");
    }
}

#[test]
fn nothing_is_reclaimable_after_defragmenting_deletions_never_flushed() {
    // Puts and the deletions of most of them, all still in the memtable: a defragmentation
    // flushes them into one table file, which must be rewritten, not moved down as it is
    // (the tombstones would stay, and count as garbage).
    for (e, _dir) in engines() {
        let name = e.name();
        let mut b = WriteBatch::new();
        for i in 0..2000u32 {
            b.put(
                Table::Kv,
                i.to_be_bytes().to_vec(),
                metastore_testkit::noise(u64::from(i), 1024),
            );
        }
        e.write(b, false).expect("write");
        let mut b = WriteBatch::new();
        for i in (0..2000u32).filter(|i| i % 4 != 0) {
            b.delete(Table::Kv, i.to_be_bytes().to_vec());
        }
        e.write(b, false).expect("write");
        e.defragment().expect("defragment");
        let (size, used) = (e.size_bytes(), e.size_in_use_bytes());
        assert!(used * 100 >= size * 95, "{name}: {used} in use of {size}");
        assert!(size >= 500 * 1024, "{name}: {size}");
        assert_eq!(collect(e.as_ref(), Table::Kv, b"").len(), 500, "{name}");
    }
}

/// A `Kv` key: `name`, then the 8-byte suffix (the revision, newest first as in
/// `mvcc::key_codec`).
fn versioned(name: &[u8], rev: u64) -> Vec<u8> {
    [name, &(!rev).to_be_bytes()].concat()
}

/// Writes versions 1..=3 of every even-numbered key of 0..200 (`k000`, `k002`, ...) to `Kv`,
/// the first half in a table file and the second half in the memtable (for RocksDB).
fn versioned_table(e: &dyn Engine) {
    for half in [0..100u32, 100..200] {
        let mut b = WriteBatch::new();
        for i in half.clone().step_by(2) {
            for rev in 1..=3 {
                b.put(
                    Table::Kv,
                    versioned(format!("k{i:03}").as_bytes(), rev),
                    vec![rev as u8],
                );
            }
        }
        e.write(b, true).expect("write");
        if half.start == 0 {
            e.defragment().expect("into a table file");
        }
    }
}

#[test]
fn the_kv_table_keeps_key_order_across_prefixes() {
    for (e, _dir) in engines() {
        versioned_table(e.as_ref());
        assert_eq!(keys(e.as_ref(), Table::Kv).len(), 300, "{}", e.name());
        // Seeks to prefixes the table does not hold, in the table file's half and in the
        // memtable's: a cursor over the table lands on the next key, whatever filters say.
        for (target, next) in [(1u32, 2u32), (51, 52), (99, 100), (151, 152)] {
            let snap = e.snapshot();
            let mut it = snap.iter(Table::Kv);
            it.seek(&versioned(format!("k{target:03}").as_bytes(), 9));
            assert!(it.valid(), "{} seek k{target:03}", e.name());
            assert_eq!(
                it.key(),
                versioned(format!("k{next:03}").as_bytes(), 3),
                "{}",
                e.name()
            );
            // ... and goes on in order, across prefixes.
            it.next();
            it.next();
            it.next();
            assert!(it.valid());
            assert_eq!(
                it.key(),
                versioned(format!("k{:03}", next + 2).as_bytes(), 3),
                "{}",
                e.name()
            );
        }
    }
}

#[test]
fn versions_iter_finds_a_keys_versions_and_nothing_for_an_absent_key() {
    for (e, _dir) in engines() {
        versioned_table(e.as_ref());
        let snap = e.snapshot();
        for i in [0u32, 50, 98, 100, 150, 198] {
            let name = format!("k{i:03}");
            let mut it = snap.versions_iter();
            // The newest version at or below revision 2, then the older one.
            it.seek(&versioned(name.as_bytes(), 2));
            assert!(it.valid(), "{} {name}", e.name());
            assert_eq!(it.key(), versioned(name.as_bytes(), 2), "{}", e.name());
            assert_eq!(it.value(), [2], "{}", e.name());
            it.next();
            assert_eq!(it.key(), versioned(name.as_bytes(), 1), "{}", e.name());
            it.status().expect("status");
        }
        for i in [1u32, 51, 99, 101, 151, 199, 500] {
            let name = format!("k{i:03}");
            let mut it = snap.versions_iter();
            it.seek(&versioned(name.as_bytes(), 9));
            // Invalid, or on another key's version: never on a version of `name`.
            assert!(
                !it.valid() || !it.key().starts_with(name.as_bytes()),
                "{} {name}",
                e.name()
            );
            it.status().expect("status");
        }
    }
}
