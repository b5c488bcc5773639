//! The apply step's etcd semantics, on the memory engine.

use std::sync::Arc;

use metastore_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    range_request::{SortOrder, SortTarget},
    request_op::Request,
    response_op::Response,
    CompactionRequest, Compare, DeleteRangeRequest, PutRequest, RangeRequest, RequestOp,
    TxnRequest,
};

use crate::apply::{
    apply, range::range, ApplyError, Command, CommandResult, LeaseLookup, NoLeases,
};
use crate::mvcc::{Store, StoreOptions};
use crate::storage::MemoryEngine;

struct Leases(Vec<i64>);
impl LeaseLookup for Leases {
    fn lease_exists(&self, id: i64) -> bool {
        self.0.contains(&id)
    }
    fn granted(&self, _id: i64, _ttl: i64) {}
    fn revoked(&self, _id: i64) {}
}

fn store() -> Arc<Store> {
    Store::open(Arc::new(MemoryEngine::new()), StoreOptions::default()).expect("open")
}

fn run(s: &Store, cmd: Command) -> Result<CommandResult, ApplyError> {
    run_with(s, cmd, &NoLeases)
}

fn run_with(
    s: &Store,
    cmd: Command,
    leases: &dyn LeaseLookup,
) -> Result<CommandResult, ApplyError> {
    let auth = crate::auth::AuthStore::open_default(s.engine().clone()).expect("auth store");
    let mut a = s.applier().expect("applier");
    let index = s.applied_index() + 1;
    let r = apply(&mut a, index, &cmd, leases, &auth).map(|x| x.result);
    a.publish().expect("publish");
    r
}

fn put(k: &str, v: &str) -> PutRequest {
    PutRequest {
        key: k.as_bytes().to_vec().into(),
        value: v.as_bytes().to_vec().into(),
        ..Default::default()
    }
}

fn get(s: &Store, k: &str) -> Option<String> {
    let r = range(
        s,
        &RangeRequest {
            key: k.as_bytes().to_vec().into(),
            ..Default::default()
        },
    )
    .expect("range");
    r.kvs
        .first()
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
}

fn cmp(k: &str, target: CompareTarget, result: CompareResult, u: TargetUnion) -> Compare {
    Compare {
        result: result as i32,
        target: target as i32,
        key: k.as_bytes().to_vec().into(),
        target_union: Some(u),
        range_end: Default::default(),
    }
}

fn op_put(k: &str, v: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestPut(put(k, v))),
    }
}

fn op_get(k: &str) -> RequestOp {
    RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: k.as_bytes().to_vec().into(),
            ..Default::default()
        })),
    }
}

#[test]
fn put_ignore_value_lease_and_prev_kv() {
    let s = store();
    let mut p = put("k", "");
    p.ignore_value = true;
    assert!(matches!(
        run(&s, Command::Put(p.clone())),
        Err(ApplyError::KeyNotFound)
    ));
    assert_eq!(s.current_revision(), 1, "a failed put writes nothing");
    run(&s, Command::Put(put("k", "v1"))).expect("put");
    p.prev_kv = true;
    let Ok(CommandResult::Put(r)) = run(&s, Command::Put(p)) else {
        panic!("put")
    };
    assert_eq!(r.prev_kv.expect("prev").value, "v1".as_bytes());
    assert_eq!(
        get(&s, "k").as_deref(),
        Some("v1"),
        "ignore_value keeps the value"
    );
    let mut leased = put("k", "v");
    leased.lease = 42;
    assert!(matches!(
        run(&s, Command::Put(leased.clone())),
        Err(ApplyError::LeaseNotFound)
    ));
    assert!(run_with(&s, Command::Put(leased), &Leases(vec![42])).is_ok());
}

#[test]
fn txn_compares_branches_and_nested_paths() {
    let s = store();
    run(&s, Command::Put(put("a", "1"))).expect("put"); // rev 2
    let t = TxnRequest {
        compare: vec![
            cmp(
                "a",
                CompareTarget::Value,
                CompareResult::Equal,
                TargetUnion::Value("1".into()),
            ),
            cmp(
                "a",
                CompareTarget::Version,
                CompareResult::Greater,
                TargetUnion::Version(0),
            ),
            cmp(
                "a",
                CompareTarget::Mod,
                CompareResult::Less,
                TargetUnion::ModRevision(3),
            ),
            cmp(
                "missing",
                CompareTarget::Create,
                CompareResult::Equal,
                TargetUnion::CreateRevision(0),
            ),
            cmp(
                "a",
                CompareTarget::Lease,
                CompareResult::NotEqual,
                TargetUnion::Lease(9),
            ),
        ],
        success: vec![
            op_put("b", "2"),
            op_get("b"),
            RequestOp {
                request: Some(Request::RequestTxn(TxnRequest {
                    compare: vec![cmp(
                        "b",
                        CompareTarget::Version,
                        CompareResult::Equal,
                        TargetUnion::Version(1),
                    )],
                    success: vec![op_put("inner-then", "x")],
                    failure: vec![op_put("inner-else", "y")],
                })),
            },
        ],
        failure: vec![op_put("failed", "x")],
    };
    let Ok(CommandResult::Txn(r)) = run(&s, Command::Txn(t)) else {
        panic!("txn")
    };
    assert!(r.succeeded);
    assert_eq!(
        r.header.expect("header").revision,
        3,
        "all changes share one revision"
    );
    // The range after the put sees it; the nested compare saw the state before the txn.
    let Some(Response::ResponseRange(rr)) = &r.responses[1].response else {
        panic!("range")
    };
    assert_eq!(rr.kvs.len(), 1);
    let Some(Response::ResponseTxn(inner)) = &r.responses[2].response else {
        panic!("txn")
    };
    assert!(
        !inner.succeeded,
        "nested compares are evaluated before any write"
    );
    assert_eq!(get(&s, "inner-else").as_deref(), Some("y"));
    assert_eq!(get(&s, "failed"), None);

    // A value compare on a missing key always fails.
    let t = TxnRequest {
        compare: vec![cmp(
            "nope",
            CompareTarget::Value,
            CompareResult::NotEqual,
            TargetUnion::Value("x".into()),
        )],
        success: vec![],
        failure: vec![],
    };
    let Ok(CommandResult::Txn(r)) = run(&s, Command::Txn(t)) else {
        panic!("txn")
    };
    assert!(!r.succeeded);
    assert_eq!(
        r.header.expect("header").revision,
        3,
        "read-only txn keeps the revision"
    );
}

#[test]
fn txn_checks_the_chosen_path_before_writing() {
    let s = store();
    let mut leased = put("x", "1");
    leased.lease = 7;
    let t = TxnRequest {
        compare: vec![],
        success: vec![
            op_put("ok", "1"),
            RequestOp {
                request: Some(Request::RequestPut(leased)),
            },
        ],
        failure: vec![],
    };
    assert!(matches!(
        run(&s, Command::Txn(t)),
        Err(ApplyError::LeaseNotFound)
    ));
    assert_eq!(get(&s, "ok"), None, "nothing from a refused txn is written");
    let t = TxnRequest {
        compare: vec![],
        success: vec![RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: "k".into(),
                revision: 99,
                ..Default::default()
            })),
        }],
        failure: vec![],
    };
    assert!(matches!(
        run(&s, Command::Txn(t)),
        Err(ApplyError::Mvcc(crate::mvcc::Error::FutureRev))
    ));
}

#[test]
fn range_sort_limit_filters_keys_only() {
    let s = store();
    for (k, v) in [("a", "3"), ("b", "1"), ("c", "2")] {
        run(&s, Command::Put(put(k, v))).expect("put");
    }
    run(&s, Command::Put(put("b", "1"))).expect("put"); // b: version 2, mod 5
    let base = RangeRequest {
        key: "a".into(),
        range_end: "z".into(),
        ..Default::default()
    };
    let keys = |r: &RangeRequest| -> (Vec<String>, bool, i64) {
        let resp = range(s.as_ref(), r).expect("range");
        (
            resp.kvs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect(),
            resp.more,
            resp.count,
        )
    };
    let mut r = base.clone();
    r.sort_target = SortTarget::Value as i32;
    assert_eq!(
        keys(&r).0,
        ["b", "c", "a"],
        "target without order sorts ascending"
    );
    r.sort_order = SortOrder::Descend as i32;
    r.limit = 2;
    assert_eq!(keys(&r), (vec!["a".into(), "c".into()], true, 3));
    let mut r = base.clone();
    r.limit = 3;
    assert!(!keys(&r).1, "exactly limit keys: no more");
    r.limit = 2;
    assert_eq!(keys(&r), (vec!["a".into(), "b".into()], true, 3));
    let mut r = base.clone();
    r.min_mod_revision = 4;
    assert_eq!(keys(&r).0, ["b", "c"]);
    r.max_create_revision = 3;
    assert_eq!(keys(&r).0, ["b"]);
    let mut r = base.clone();
    r.keys_only = true;
    let resp = range(s.as_ref(), &r).expect("range");
    assert!(resp.kvs.iter().all(|kv| kv.value.is_empty()));
    let mut r = base;
    r.count_only = true;
    assert_eq!(keys(&r), (vec![], false, 3));
}

#[test]
fn delete_and_compact() {
    let s = store();
    run(&s, Command::Put(put("a", "1"))).expect("put");
    run(&s, Command::Put(put("ab", "1"))).expect("put");
    let Ok(CommandResult::DeleteRange(d)) = run(
        &s,
        Command::DeleteRange(DeleteRangeRequest {
            key: "a".into(),
            range_end: "b".into(),
            prev_kv: true,
        }),
    ) else {
        panic!("delete")
    };
    assert_eq!((d.deleted, d.prev_kvs.len()), (2, 2));
    assert_eq!(d.header.expect("header").revision, 4);
    let compact = |rev| {
        Command::Compact(CompactionRequest {
            revision: rev,
            physical: false,
        })
    };
    assert!(matches!(
        run(&s, compact(9)),
        Err(ApplyError::Mvcc(crate::mvcc::Error::FutureRev))
    ));
    assert!(run(&s, compact(3)).is_ok());
    assert!(matches!(
        run(&s, compact(2)),
        Err(ApplyError::Mvcc(crate::mvcc::Error::Compacted))
    ));
}

/// Leases granted and revoked by the applied commands.
#[derive(Default)]
struct LiveLeases(std::sync::Mutex<std::collections::BTreeSet<i64>>);
impl LeaseLookup for LiveLeases {
    fn lease_exists(&self, id: i64) -> bool {
        self.0.lock().expect("leases").contains(&id)
    }
    fn granted(&self, id: i64, _ttl: i64) {
        self.0.lock().expect("leases").insert(id);
    }
    fn revoked(&self, id: i64) {
        self.0.lock().expect("leases").remove(&id);
    }
}

/// A random command over keys `a`..`e` and leases 1..3: puts (some with a lease), deletes of
/// one key or a range, lease grants and revokes, and txns whose compares and reads cover keys
/// just written, ranges and older revisions (what an apply group cannot always answer from
/// its own view).
fn random_command(rng: &mut impl rand::Rng, rev: i64) -> Command {
    use metastore_proto::etcdserverpb::{LeaseGrantRequest, LeaseRevokeRequest};
    let key =
        |rng: &mut dyn rand::RngCore| ["a", "b", "c", "d", "e"][(rng.next_u32() % 5) as usize];
    let read = |rng: &mut dyn rand::RngCore| {
        let (start, end): (&[u8], &[u8]) = match rng.next_u32() % 3 {
            0 => (b"a", b""),
            1 => (b"b", b"d"),
            _ => (b"\0", b"\0"),
        };
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: start.to_vec().into(),
                range_end: end.to_vec().into(),
                revision: if rng.next_u32().is_multiple_of(3) {
                    (rev - i64::from(rng.next_u32() % 4)).max(1)
                } else {
                    0
                },
                ..Default::default()
            })),
        }
    };
    match rng.gen_range(0..10) {
        0..=2 => {
            let mut p = put(key(rng), &rng.gen::<u16>().to_string());
            p.lease = [0, 0, 1, 2][rng.gen_range(0..4)];
            p.prev_kv = rng.gen();
            Command::Put(p)
        }
        3 => Command::DeleteRange(DeleteRangeRequest {
            key: key(rng).as_bytes().to_vec().into(),
            range_end: if rng.gen() {
                b"d".to_vec().into()
            } else {
                Default::default()
            },
            prev_kv: true,
        }),
        4 => Command::LeaseGrant(LeaseGrantRequest {
            id: rng.gen_range(1..3),
            ttl: 60,
        }),
        5 => Command::LeaseRevoke(LeaseRevokeRequest {
            id: rng.gen_range(1..3),
        }),
        _ => Command::Txn(TxnRequest {
            compare: vec![cmp(
                key(rng),
                CompareTarget::Version,
                CompareResult::Greater,
                TargetUnion::Version(rng.gen_range(0..3)),
            )],
            success: vec![op_put(key(rng), "t"), read(rng), op_get(key(rng))],
            failure: vec![read(rng), op_put(key(rng), "f")],
        }),
    }
}

/// Counts engine writes.
#[derive(Default)]
struct Writes(std::sync::atomic::AtomicUsize);
impl crate::storage::EngineHook for Writes {
    fn write(&self, _sync: bool) -> crate::storage::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// A group's pending writes go to the engine once they hold `PENDING_BYTES`, so a group of
/// large values does not hold them all in memory.
#[test]
fn a_group_writes_its_batch_once_it_holds_the_bound() {
    let engine = crate::storage::HookedEngine::new(Writes::default());
    let s = Store::open(engine.clone(), StoreOptions::default()).expect("open");
    let auth = crate::auth::AuthStore::open_default(s.engine().clone()).expect("auth");
    let before = engine.hook.0.load(std::sync::atomic::Ordering::Relaxed);
    let mut a = s.applier().expect("applier");
    // Each put holds its value twice: in the key history and in the `kv_current` table.
    let value = "v".repeat(crate::mvcc::store::PENDING_BYTES / 8);
    for i in 0..10u64 {
        let cmd = Command::Put(put(&format!("k{i}"), &value));
        apply(&mut a, i + 1, &cmd, &NoLeases, &auth).expect("put");
    }
    let during = engine.hook.0.load(std::sync::atomic::Ordering::Relaxed) - before;
    a.publish().expect("publish");
    let all = engine.hook.0.load(std::sync::atomic::Ordering::Relaxed) - before;
    // Written after the 4th and the 8th put, then the last two when published.
    assert_eq!((during, all), (2, 3));
    assert_eq!(s.current_revision(), 11);
    assert_eq!(get(&s, "k9").map(|v| v.len()), Some(value.len()));
}

/// An apply outcome as text, to compare what two stores answered.
fn show(r: &Result<crate::apply::command::Applied, ApplyError>) -> String {
    match r {
        Ok(a) => format!("{:?} {:?} {}", a.result, a.events, a.revision),
        Err(e) => format!("error {e}"),
    }
}

/// Applying commands together in one group (one engine write for all of them) gives exactly
/// what applying each alone gives: the same results, events and final state.
#[test]
fn a_group_applies_as_its_commands_one_by_one() {
    use rand::SeedableRng;
    for seed in 0..40 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut cmds = Vec::new();
        for i in 0..60 {
            cmds.push(random_command(&mut rng, 1 + i / 2));
        }
        let engine = crate::storage::HookedEngine::new(Writes::default());
        let grouped = Store::open(engine.clone(), StoreOptions::default()).expect("open");
        let single = store();
        let auth = crate::auth::AuthStore::open_default(single.engine().clone()).expect("auth");
        let (leases_g, leases_s) = (LiveLeases::default(), LiveLeases::default());
        let before = engine.hook.0.load(std::sync::atomic::Ordering::Relaxed);
        let mut group = grouped.applier().expect("applier");
        for (i, cmd) in cmds.iter().enumerate() {
            let index = i as u64 + 1;
            let g = apply(&mut group, index, cmd, &leases_g, &auth);
            let mut a = single.applier().expect("applier");
            let s = apply(&mut a, index, cmd, &leases_s, &auth);
            a.publish().expect("publish");
            assert_eq!(show(&g), show(&s), "seed {seed}, command {i}: {cmd:?}");
        }
        group.publish().expect("publish");
        let writes = engine.hook.0.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(
            writes < cmds.len() / 2,
            "seed {seed}: {writes} engine writes for {} commands",
            cmds.len()
        );
        assert_eq!(grouped.current_revision(), single.current_revision());
        assert_eq!(grouped.applied_index(), single.applied_index());
        assert_eq!(
            grouped.hash().expect("hash"),
            single.hash().expect("hash"),
            "seed {seed}"
        );
    }
}

/// A random read-only txn over keys `a`..`e`: compares on one key or a range, and ranges in
/// both branches at the current, an older, a compacted, a negative or a future revision, with
/// limits, sorts, counts and filters.
fn random_read_only_txn(rng: &mut impl rand::Rng, rev: i64) -> TxnRequest {
    let key =
        |rng: &mut dyn rand::RngCore| ["a", "b", "c", "d", "e"][(rng.next_u32() % 5) as usize];
    let range = |rng: &mut dyn rand::RngCore| {
        let n = rng.next_u32();
        RequestOp {
            request: Some(Request::RequestRange(RangeRequest {
                key: key(rng).as_bytes().to_vec().into(),
                range_end: if n.is_multiple_of(2) {
                    b"e".to_vec().into()
                } else {
                    Default::default()
                },
                revision: match n % 7 {
                    0 => rev - i64::from(rng.next_u32() % 6),
                    1 => rev + 1,
                    2 => -1,
                    _ => 0,
                },
                limit: i64::from(n % 3),
                sort_order: (n / 7 % 3) as i32,
                sort_target: (n / 21 % 5) as i32,
                count_only: n.is_multiple_of(11),
                keys_only: n.is_multiple_of(13),
                min_mod_revision: if n.is_multiple_of(17) { rev / 2 } else { 0 },
                serializable: n.is_multiple_of(5),
                ..Default::default()
            })),
        }
    };
    let compare = |rng: &mut dyn rand::RngCore| {
        let mut c = cmp(
            key(rng),
            [
                CompareTarget::Version,
                CompareTarget::Mod,
                CompareTarget::Value,
            ][(rng.next_u32() % 3) as usize],
            [
                CompareResult::Greater,
                CompareResult::Less,
                CompareResult::Equal,
            ][(rng.next_u32() % 3) as usize],
            TargetUnion::Version(i64::from(rng.next_u32() % 3)),
        );
        if c.target == CompareTarget::Mod as i32 {
            c.target_union = Some(TargetUnion::ModRevision(
                rev - i64::from(rng.next_u32() % 4),
            ));
        } else if c.target == CompareTarget::Value as i32 {
            c.target_union = Some(TargetUnion::Value(
                ["t", "f", "1"][(rng.next_u32() % 3) as usize]
                    .as_bytes()
                    .to_vec()
                    .into(),
            ));
        }
        if rng.next_u32().is_multiple_of(4) {
            c.range_end = b"d".to_vec().into();
        }
        c
    };
    TxnRequest {
        compare: (0..rng.gen_range(0..3)).map(|_| compare(rng)).collect(),
        success: (0..rng.gen_range(0..4)).map(|_| range(rng)).collect(),
        failure: (0..rng.gen_range(0..4)).map(|_| range(rng)).collect(),
    }
}

/// A read-only txn answered from a snapshot, without the log, gives exactly what it gives
/// through the log (results and errors), and changes nothing.
#[test]
fn a_read_only_txn_reads_as_the_applied_one() {
    use rand::SeedableRng;
    let mut checked = (0, 0, 0);
    for seed in 0..20 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let s = store();
        let leases = LiveLeases::default();
        for step in 0..30 {
            for _ in 0..3 {
                let cmd = random_command(&mut rng, s.current_revision());
                let _ = run_with(&s, cmd, &leases);
            }
            if step == 20 {
                let to = s.current_revision() - 3;
                let compact = Command::Compact(CompactionRequest {
                    revision: to,
                    physical: true,
                });
                let Ok(CommandResult::Compact(_, ticket)) = run(&s, compact) else {
                    panic!("compact")
                };
                // Physically done, so that the store's hash only changes if a read writes.
                futures::executor::block_on(s.compactor().wait(&ticket));
            }
            let t = random_read_only_txn(&mut rng, s.current_revision());
            assert!(crate::apply::txn::is_read_only(&t));
            let (rev, hash) = (s.current_revision(), s.hash().expect("hash"));
            let snapshot = crate::apply::txn::execute_read_only(&s, &t);
            assert_eq!((s.current_revision(), s.hash().expect("hash")), (rev, hash));
            let logged = run_with(&s, Command::Txn(t.clone()), &leases);
            let show_s = match &snapshot {
                Ok(r) => format!("{r:?}"),
                Err(e) => format!("error {e}"),
            };
            let show_l = match &logged {
                Ok(CommandResult::Txn(r)) => format!("{r:?}"),
                Ok(other) => format!("{other:?}"),
                Err(e) => format!("error {e}"),
            };
            assert_eq!(show_s, show_l, "seed {seed}, step {step}: {t:?}");
            assert_eq!(s.current_revision(), rev, "a read-only txn writes nothing");
            match &snapshot {
                Ok(r) if r.succeeded => checked.0 += 1,
                Ok(_) => checked.1 += 1,
                Err(_) => checked.2 += 1,
            }
        }
    }
    // Every outcome was exercised: success branch, failure branch, error.
    assert!(
        checked.0 > 30 && checked.1 > 30 && checked.2 > 30,
        "{checked:?}"
    );
}

#[test]
fn which_txns_are_read_only_serializable_or_point_reads() {
    use crate::apply::txn::{is_point_read, is_read_only, is_serializable};
    let ranged = |serializable: bool, end: &str| RequestOp {
        request: Some(Request::RequestRange(RangeRequest {
            key: b"a".to_vec().into(),
            range_end: end.as_bytes().to_vec().into(),
            serializable,
            ..Default::default()
        })),
    };
    let empty = TxnRequest::default();
    assert!(is_read_only(&empty) && is_serializable(&empty) && is_point_read(&empty));
    let gets = TxnRequest {
        compare: vec![cmp(
            "a",
            CompareTarget::Version,
            CompareResult::Equal,
            TargetUnion::Version(1),
        )],
        success: vec![op_get("a")],
        failure: vec![ranged(true, "")],
    };
    assert!(is_read_only(&gets) && is_point_read(&gets));
    assert!(
        !is_serializable(&gets),
        "one linearizable Range makes it linearizable"
    );
    let all_serializable = TxnRequest {
        success: vec![ranged(true, "")],
        failure: vec![ranged(true, "z")],
        ..Default::default()
    };
    assert!(is_serializable(&all_serializable) && !is_point_read(&all_serializable));
    let mut range_compare = gets.clone();
    range_compare.compare[0].range_end = b"z".to_vec().into();
    assert!(is_read_only(&range_compare) && !is_point_read(&range_compare));
    let with_put = TxnRequest {
        failure: vec![op_put("a", "v")],
        ..gets.clone()
    };
    assert!(!is_read_only(&with_put) && !is_serializable(&with_put));
    let nested = TxnRequest {
        success: vec![RequestOp {
            request: Some(Request::RequestTxn(all_serializable)),
        }],
        ..Default::default()
    };
    assert!(
        !is_read_only(&nested),
        "a nested txn counts as a write, as in etcd"
    );
    let no_op = TxnRequest {
        success: vec![RequestOp { request: None }],
        ..Default::default()
    };
    assert!(!is_read_only(&no_op));
}

/// The apply step's cache of keys' newest versions (`mvcc::latest`) never changes an answer:
/// the same random commands, with compactions between them, give the same results, events
/// (with their previous key-values) and final state with the cache off, with one so small it
/// evicts on almost every write, and with the default one; the grouped store reads it too.
#[test]
fn the_latest_version_cache_answers_as_the_engine_would() {
    use metastore_proto::etcdserverpb::CompactionRequest;
    use rand::SeedableRng;
    let with_cache = |bytes: usize| {
        let opts = StoreOptions {
            latest_cache_bytes: bytes,
            ..StoreOptions::default()
        };
        Store::open(Arc::new(MemoryEngine::new()), opts).expect("open")
    };
    for seed in 0..30 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + seed);
        let stores = [with_cache(0), with_cache(4 << 10), with_cache(16 << 20)];
        let grouped = with_cache(16 << 20);
        let auth = crate::auth::AuthStore::open_default(stores[0].engine().clone()).expect("auth");
        let leases: Vec<LiveLeases> = (0..4).map(|_| LiveLeases::default()).collect();
        let mut group = grouped.applier().expect("applier");
        for i in 0..80u64 {
            let cmd = if i % 25 == 24 {
                Command::Compact(CompactionRequest {
                    revision: stores[0].current_revision() - 3,
                    physical: false,
                })
            } else {
                random_command(&mut rng, 1 + i as i64 / 2)
            };
            let mut answers = Vec::new();
            for (s, live) in stores.iter().zip(&leases) {
                let mut a = s.applier().expect("applier");
                answers.push(show(&apply(&mut a, i + 1, &cmd, live, &auth)));
                a.publish().expect("publish");
            }
            answers.push(show(&apply(&mut group, i + 1, &cmd, &leases[3], &auth)));
            for (n, answer) in answers.iter().enumerate().skip(1) {
                assert_eq!(
                    answer, &answers[0],
                    "seed {seed}, command {i}, store {n}: {cmd:?}"
                );
            }
        }
        group.publish().expect("publish");
        // Every live key as each store has it (the hash would depend on how far each
        // store's background compaction has got).
        let all = |s: &Store| {
            s.range(
                &crate::mvcc::KeyRange::new(b"\0", b"\0"),
                Default::default(),
            )
            .expect("range")
        };
        for s in stores.iter().skip(1).chain([&grouped]) {
            assert_eq!(all(s), all(&stores[0]), "seed {seed}");
        }
    }
}

/// An installed snapshot replaces the engine's content under the store; the apply step then
/// forgets the newest versions it kept, so the next put counts on from the snapshot's
/// version of the key, not from the one it wrote before.
#[test]
fn an_installed_snapshot_replaces_what_the_apply_step_kept() {
    use crate::storage::snapshot as snapfile;
    let donor = store();
    run(&donor, Command::Put(put("k", "from-snapshot"))).expect("put");
    let mut file = Vec::new();
    snapfile::write_snapshot(donor.engine().snapshot().as_ref(), &mut file, &mut |_| {})
        .expect("snapshot");

    let s = store();
    for v in ["1", "2", "3"] {
        run(&s, Command::Put(put("k", v))).expect("put");
    }
    {
        let _background = s.background_lock().lock().expect("lock");
        snapfile::load(file.as_slice(), s.engine().as_ref(), &mut |_| {}).expect("load");
    }
    s.reload().expect("reload");
    let Ok(CommandResult::Put(r)) = run(
        &s,
        Command::Put(PutRequest {
            prev_kv: true,
            ..put("k", "after")
        }),
    ) else {
        panic!("put failed");
    };
    let prev = r.prev_kv.expect("prev_kv");
    assert_eq!(&prev.value[..], b"from-snapshot");
    assert_eq!((prev.version, prev.mod_revision), (1, 2));
    let now = s.range(
        &crate::mvcc::KeyRange::Single(b"k".to_vec()),
        Default::default(),
    );
    let kv = &now.expect("range").kvs[0];
    assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 2, 3));
}
