//! The `kv_current` table: kept exact by the apply step, used only when current, rebuilt when
//! stale. Run on both engines.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{marked_rev, rebuild, serves, set_marker, MARKER};
use crate::mvcc::key_codec::{kv_key, kv_prefix};
use crate::mvcc::store::{scan, scan_history};
use crate::mvcc::{Error, KeyRange, Store, StoreOptions};
use crate::storage::rocks::RocksOptions;
use crate::storage::{codec, Engine, MemoryEngine, RocksEngine, Snapshot, Table, WriteBatch};

fn rocks(dir: &std::path::Path, current_table: Option<bool>) -> anyhow::Result<Arc<dyn Engine>> {
    let opts = RocksOptions {
        current_table,
        ..Default::default()
    };
    Ok(Arc::new(RocksEngine::open(dir, &opts)?))
}

/// A deterministic pseudo-random sequence (xorshift).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Keys with a shared prefix and a zero byte, so that escaping and prefix order matter.
fn key(i: u64) -> Vec<u8> {
    match i % 4 {
        0 => format!("k{i:02}").into_bytes(),
        1 => format!("k{i:02}/x").into_bytes(),
        2 => vec![b'k', b'0' + (i % 10) as u8, 0, b'z'],
        _ => vec![b'k'; 1 + (i % 3) as usize],
    }
}

/// The live keys and values after each revision.
type History = BTreeMap<i64, BTreeMap<Vec<u8>, Vec<u8>>>;

/// Applies `ops` random commands (puts, deletes of a key or a range, several puts in one
/// transaction) to `store`; returns the live keys and values after each revision.
fn churn(store: &Store, rng: &mut Rng, ops: usize) -> anyhow::Result<History> {
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut history = BTreeMap::new();
    history.insert(store.current_revision(), model.clone());
    // Several commands per apply group now and then, as the Raft thread applies them.
    let mut group = None;
    let mut index = store.applied_index();
    for op in 0..ops {
        let mut a = match group.take() {
            Some(a) => a,
            None => store.applier()?,
        };
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = match rng.below(10) {
            0..=5 => vec![(key(rng.below(24)), Some(format!("v{op}").into_bytes()))],
            6 => vec![(key(rng.below(24)), None)],
            7 => Vec::new(), // a range deletion, below
            _ => (0..3)
                .map(|i| (key(rng.below(24)), Some(format!("t{op}.{i}").into_bytes())))
                .collect(),
        };
        let deleted = KeyRange::Between(key(rng.below(24)), key(rng.below(24)));
        // A range the transaction reads before its writes, and again after them (then with
        // its own changes), as a txn's range operations do.
        let ranges = ranges();
        let looked_at = ranges[rng.below(ranges.len() as u64) as usize].clone();
        // At the current revision (0) half the time, else at an earlier one.
        let at = match rng.below(2) {
            0 => 0,
            _ => history
                .keys()
                .nth(rng.below(history.len() as u64) as usize)
                .copied()
                .unwrap_or_default(),
        };
        let mut after = model.clone();
        if writes.is_empty() {
            after.retain(|k, _| !deleted.contains(k));
        }
        for (k, v) in &writes {
            match v {
                Some(v) => after.insert(k.clone(), v.clone()),
                None => after.remove(k),
            };
        }
        let txn_read = |t: &crate::mvcc::WriteTxn<'_>,
                        state: &BTreeMap<Vec<u8>, Vec<u8>>|
         -> crate::mvcc::Result<()> {
            let opts = crate::mvcc::RangeOptions {
                rev: at,
                ..Default::default()
            };
            let state = if at == 0 { state } else { &history[&at] };
            let r = t.range(&looked_at, opts)?;
            let got: Vec<(Vec<u8>, Vec<u8>)> = r
                .kvs
                .iter()
                .map(|kv| (kv.key.to_vec(), kv.value.to_vec()))
                .collect();
            assert_eq!(
                got,
                expected(state, &looked_at),
                "op {op} at {at}: {looked_at:?}"
            );
            assert_eq!(r.count, got.len());
            Ok(())
        };
        // As the applier does: a read the group cannot answer writes the group first.
        let t = loop {
            let mut t = a.begin()?;
            let run = |t: &mut crate::mvcc::WriteTxn<'_>| -> crate::mvcc::Result<()> {
                txn_read(t, &model)?;
                if writes.is_empty() {
                    t.delete_range(&deleted)?;
                }
                for (k, v) in &writes {
                    match v {
                        Some(v) => {
                            drop(t.put(Bytes::from(k.clone()), Bytes::from(v.clone()), 0)?)
                        }
                        None => drop(t.delete_range(&KeyRange::Single(k.clone()))?),
                    }
                }
                txn_read(t, &after)
            };
            match run(&mut t) {
                Ok(()) => break t,
                Err(Error::Regroup) => {
                    drop(t);
                    a.flush()?;
                }
                Err(e) => return Err(e.into()),
            }
        };
        model = after;
        index += 1;
        let out = a.commit(t, index)?;
        history.insert(out.rev, model.clone());
        if rng.below(3) == 0 {
            a.publish()?;
        } else {
            group = Some(a);
        }
    }
    if let Some(a) = group {
        a.publish()?;
    }
    Ok(history)
}

/// Every range shape over the test keys.
fn ranges() -> Vec<KeyRange> {
    let mut out = vec![
        KeyRange::From(vec![0]),
        KeyRange::From(Vec::new()),
        KeyRange::From(b"k1".to_vec()),
        KeyRange::Between(b"k".to_vec(), b"l".to_vec()),
        KeyRange::Between(b"k0".to_vec(), b"k1".to_vec()),
        KeyRange::Between(b"z".to_vec(), b"a".to_vec()),
    ];
    for i in 0..6 {
        out.push(KeyRange::Between(key(i), key(i + 7)));
    }
    out
}

fn read(
    snap: &dyn Snapshot,
    range: &KeyRange,
    rev: i64,
    history: bool,
) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut visit = |record: &[u8]| {
        let kv = codec::decode(record)?;
        out.push((kv.key.to_vec(), kv.value.to_vec()));
        Ok(true)
    };
    if history {
        scan_history(snap, range, rev, &mut visit)?;
    } else {
        scan(snap, range, rev, &mut visit)?;
    }
    Ok(out)
}

fn expected(model: &BTreeMap<Vec<u8>, Vec<u8>>, range: &KeyRange) -> Vec<(Vec<u8>, Vec<u8>)> {
    model
        .iter()
        .filter(|(k, _)| range.contains(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The whole table, marker aside.
fn table(engine: &dyn Engine) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let snap = engine.snapshot();
    let mut it = snap.iter(Table::Current);
    it.seek(&[]);
    let mut out = Vec::new();
    while it.valid() {
        if it.key() != MARKER {
            out.push((it.key().to_vec(), it.value().to_vec()));
        }
        it.next();
    }
    it.status()?;
    Ok(out)
}

/// What the table must hold at the store's revision: each live key's newest record.
fn table_from_history(store: &Store) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let snap = store.engine().snapshot();
    let mut out = Vec::new();
    scan_history(
        snap.as_ref(),
        &KeyRange::From(Vec::new()),
        store.current_revision(),
        |record| {
            let kv = codec::decode(record)?;
            out.push((kv_prefix(&kv.key), record.to_vec()));
            Ok(true)
        },
    )?;
    Ok(out)
}

#[test]
fn ranges_at_every_revision_match_the_history_and_a_model() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engines: Vec<Arc<dyn Engine>> = vec![
        Arc::new(MemoryEngine::new()),
        rocks(dir.path(), Some(true))?,
    ];
    for engine in engines {
        let store = Store::open(engine.clone(), StoreOptions::default())?;
        let history = churn(&store, &mut Rng(0x9e37_79b9_7f4a_7c15), 400)?;
        let current = store.current_revision();
        let snap = engine.snapshot();
        assert!(serves(snap.as_ref(), current)?, "{}", engine.name());
        assert_eq!(table(engine.as_ref())?, table_from_history(&store)?);
        for (rev, model) in &history {
            // Only the current revision reads the table; older ones read the history.
            assert_eq!(serves(snap.as_ref(), *rev)?, *rev == current);
            for range in ranges() {
                let want = expected(model, &range);
                let got = read(snap.as_ref(), &range, *rev, false)?;
                assert_eq!(got, want, "{} at {rev}: {range:?}", engine.name());
                assert_eq!(read(snap.as_ref(), &range, *rev, true)?, want);
            }
        }
    }
    Ok(())
}

/// A store on the memory engine holding `keys`, each with the value `1`, written in one
/// transaction and published.
fn memory_store_with(keys: &[&'static [u8]]) -> anyhow::Result<(Arc<dyn Engine>, Arc<Store>)> {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let store = Store::open(engine.clone(), StoreOptions::default())?;
    let mut a = store.applier()?;
    let mut t = a.begin()?;
    for k in keys {
        t.put(Bytes::from_static(k), Bytes::from_static(b"1"), 0)?;
    }
    a.commit(t, store.applied_index() + 1)?;
    a.publish()?;
    Ok((engine, store))
}

#[test]
fn a_write_txn_in_a_group_reads_a_range_the_group_did_not_change_from_the_table(
) -> anyhow::Result<()> {
    let (engine, store) = memory_store_with(&[b"a", b"m"])?;
    // A key only the table holds (the marker stays current): a read that finds it read the
    // table, one that does not read the history.
    let mut planted = store
        .range(&KeyRange::Single(b"m".to_vec()), Default::default())?
        .kvs
        .remove(0);
    planted.key = Bytes::from_static(b"n");
    let mut record = Vec::new();
    codec::encode_v2(&planted, &mut record);
    let mut b = WriteBatch::new();
    b.put(Table::Current, kv_prefix(b"n"), record);
    engine.write(b, false)?;
    // The group's first command changes `a`; the second reads [m, z) and [a, z).
    let mut a = store.applier()?;
    let mut t = a.begin()?;
    t.put(Bytes::from_static(b"a"), Bytes::from_static(b"2"), 0)?;
    a.commit(t, store.applied_index() + 1)?;
    let mut t = a.begin()?;
    let keys = |r: crate::mvcc::RangeResult| -> Vec<Vec<u8>> {
        r.kvs.iter().map(|kv| kv.key.to_vec()).collect()
    };
    let untouched = KeyRange::Between(b"m".to_vec(), b"z".to_vec());
    let got = keys(t.range(&untouched, Default::default())?);
    assert_eq!(
        got,
        vec![b"m".to_vec(), b"n".to_vec()],
        "read from the table"
    );
    // With the transaction's own change merged in, still from the table.
    t.put(Bytes::from_static(b"p"), Bytes::from_static(b"1"), 0)?;
    let got = keys(t.range(&untouched, Default::default())?);
    assert_eq!(got, vec![b"m".to_vec(), b"n".to_vec(), b"p".to_vec()]);
    // A range over the key the group changed is not the snapshot's to answer.
    let touched = KeyRange::Between(b"a".to_vec(), b"z".to_vec());
    assert!(matches!(
        t.range(&touched, Default::default()),
        Err(Error::Regroup)
    ));
    Ok(())
}

#[test]
fn a_snapshot_ahead_of_the_read_uses_the_history() -> anyhow::Result<()> {
    let (engine, store) = memory_store_with(&[b"a", b"b"])?;
    let published = store.current_revision();
    // The next command reaches the engine before it is published.
    let mut a = store.applier()?;
    let mut t = a.begin()?;
    t.delete_range(&KeyRange::Single(b"a".to_vec()))?;
    a.commit(t, store.applied_index() + 1)?;
    a.flush()?;
    let snap = engine.snapshot();
    assert_eq!(marked_rev(snap.as_ref())?, Some(published + 1));
    assert!(!serves(snap.as_ref(), published)?);
    // Reads at the published revision still see `a`.
    let all = KeyRange::From(vec![0]);
    let got = read(snap.as_ref(), &all, published, false)?;
    assert_eq!(got.len(), 2);
    let r = store.range(&all, Default::default())?;
    assert_eq!(r.count, 2);
    a.publish()?;
    assert_eq!(store.range(&all, Default::default())?.count, 1);
    Ok(())
}

#[test]
fn a_stale_or_missing_table_is_rebuilt_when_the_store_opens() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let engine = rocks(dir.path(), Some(true))?;
    let store = Store::open(engine.clone(), StoreOptions::default())?;
    churn(&store, &mut Rng(7), 200)?;
    let want = table_from_history(&store)?;
    let rev = store.current_revision();
    drop(store);
    // Left behind by something that rewrote the history without it: a wrong record, a
    // missing one, and a marker of another revision.
    let mut b = WriteBatch::new();
    b.put(Table::Current, kv_prefix(b"gone"), b"stale".to_vec());
    b.delete(Table::Current, want[0].0.clone());
    set_marker(&mut b, rev - 3);
    engine.write(b, false)?;
    let store = Store::open(engine.clone(), StoreOptions::default())?;
    assert_eq!(table(engine.as_ref())?, want);
    assert_eq!(marked_rev(engine.snapshot().as_ref())?, Some(rev));
    drop(store);

    // Without a marker (an offline migration removes it), the same.
    let mut b = WriteBatch::new();
    b.put(Table::Current, kv_prefix(b"gone"), b"stale".to_vec());
    b.delete(Table::Current, MARKER.to_vec());
    engine.write(b, false)?;
    let store = Store::open(engine.clone(), StoreOptions::default())?;
    assert_eq!(table(engine.as_ref())?, want);
    assert!(serves(engine.snapshot().as_ref(), rev)?);

    // A reload (after a Raft snapshot is installed) checks it too.
    let mut b = WriteBatch::new();
    b.delete(Table::Current, want[1].0.clone());
    set_marker(&mut b, rev - 1);
    engine.write(b, false)?;
    store.reload()?;
    assert_eq!(table(engine.as_ref())?, want);
    assert!(serves(engine.snapshot().as_ref(), rev)?);
    Ok(())
}

#[test]
fn rebuild_takes_each_keys_newest_live_version_at_the_revision() -> anyhow::Result<()> {
    let engine = MemoryEngine::new();
    let record = |key: &[u8], rev: i64, value: &[u8]| -> anyhow::Result<Vec<u8>> {
        let kv = metastore_proto::mvccpb::KeyValue {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            mod_revision: rev,
            create_revision: 2,
            version: if value.is_empty() { 0 } else { 1 },
            lease: 0,
        };
        let mut out = Vec::new();
        codec::encode(codec::DEFAULT_FORMAT, &kv, &mut out)?;
        Ok(out)
    };
    let mut b = WriteBatch::new();
    for (key, rev, value) in [
        (&b"a"[..], 2, &b"a2"[..]),
        (b"a", 5, b"a5"),
        (b"a", 9, b"a9"), // above the revision rebuilt at
        (b"b", 3, b"b3"),
        (b"b", 6, b""), // deleted at 6
        (b"c", 9, b"c9"),
        (b"d\0", 4, b"d4"),
    ] {
        b.put(Table::Kv, kv_key(key, rev), record(key, rev, value)?);
    }
    engine.write(b, false)?;
    assert!(rebuild(&engine, 8)?);
    let got = table(&engine)?;
    let want = vec![
        (kv_prefix(b"a"), record(b"a", 5, b"a5")?),
        (kv_prefix(b"d\0"), record(b"d\0", 4, b"d4")?),
    ];
    assert_eq!(got, want);
    assert_eq!(marked_rev(engine.snapshot().as_ref())?, Some(8));
    // Current: nothing written again.
    let before = engine.size_bytes();
    assert!(rebuild(&engine, 8)?);
    assert_eq!(engine.size_bytes(), before);
    Ok(())
}

#[test]
fn a_start_without_the_table_drops_it_and_a_later_one_rebuilds_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let rev;
    let want;
    {
        let engine = rocks(dir.path(), Some(true))?;
        let store = Store::open(engine.clone(), StoreOptions::default())?;
        churn(&store, &mut Rng(11), 100)?;
        want = table_from_history(&store)?;
        rev = store.current_revision();
    }
    {
        // Dropped: the store keeps and reads the history alone, and writes go on.
        let engine = rocks(dir.path(), Some(false))?;
        assert!(!engine.has_table(Table::Current));
        let store = Store::open(engine.clone(), StoreOptions::default())?;
        assert!(!serves(engine.snapshot().as_ref(), rev)?);
        let r = store.range(&KeyRange::From(vec![0]), Default::default())?;
        assert_eq!(r.count, want.len());
        let mut a = store.applier()?;
        let mut t = a.begin()?;
        t.put(Bytes::from_static(b"new"), Bytes::from_static(b"v"), 0)?;
        a.commit(t, store.applied_index() + 1)?;
        a.publish()?;
    }
    {
        // What the offline tools see: the database as it is, without the table.
        let engine = rocks(dir.path(), None)?;
        assert!(!engine.has_table(Table::Current));
    }
    let engine = rocks(dir.path(), Some(true))?;
    let store = Store::open(engine.clone(), StoreOptions::default())?;
    let rev = store.current_revision();
    assert!(serves(engine.snapshot().as_ref(), rev)?);
    let table = table(engine.as_ref())?;
    assert_eq!(table.len(), want.len() + 1);
    assert_eq!(table, table_from_history(&store)?);
    let r = store.range(&KeyRange::From(vec![0]), Default::default())?;
    assert!(r.kvs.iter().any(|kv| kv.key.as_ref() == b"new"));
    drop(store);
    drop(engine);
    let engine = rocks(dir.path(), None)?;
    assert!(engine.has_table(Table::Current));
    Ok(())
}
