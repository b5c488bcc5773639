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
