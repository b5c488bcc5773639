//! Txn: compares, the branch path, nested transactions (etcd's `applyTxn`).
//!
//! All compares, nested ones included, are evaluated against the state before the
//! transaction writes anything (etcd's `compareToPath`); so are the put and range checks of
//! the chosen path. Only then are the chosen operations executed, in order, so that a Range
//! after a Put in the same branch sees the Put.

use metastore_proto::etcdserverpb::{
    compare::{CompareResult, CompareTarget, TargetUnion},
    request_op::Request,
    response_op::Response,
    Compare, DeleteRangeResponse, PutResponse, RangeRequest, ResponseHeader, ResponseOp,
    TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::KeyValue;

use super::range::{range, ReadView};
use super::{ApplyError, LeaseLookup, Result};
use crate::mvcc::{self, KeyRange, RangeOptions, Store, WriteTxn};

/// Whether every key in the compare's range satisfies it. A range with no keys compares as
/// one key with zero fields, except on VALUE, which then always fails (etcd's rule).
pub fn compare(view: &dyn ReadView, c: &Compare) -> Result<bool> {
    let rr = view.range(
        &KeyRange::new(&c.key, &c.range_end),
        RangeOptions::default(),
    );
    let kvs = match rr {
        Ok(r) => r.kvs,
        // etcd treats a failed read as a failed compare.
        Err(mvcc::Error::Compacted | mvcc::Error::FutureRev) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    let target = CompareTarget::try_from(c.target).unwrap_or(CompareTarget::Version);
    if kvs.is_empty() {
        if target == CompareTarget::Value {
            return Ok(false);
        }
        return Ok(compare_kv(c, target, &KeyValue::default()));
    }
    Ok(kvs.iter().all(|kv| compare_kv(c, target, kv)))
}

fn compare_kv(c: &Compare, target: CompareTarget, kv: &KeyValue) -> bool {
    let ord = match (target, &c.target_union) {
        (CompareTarget::Value, Some(TargetUnion::Value(v))) => kv.value[..].cmp(&v[..]),
        (CompareTarget::Value, _) => kv.value[..].cmp(&[][..]),
        (CompareTarget::Create, u) => kv.create_revision.cmp(&match u {
            Some(TargetUnion::CreateRevision(r)) => *r,
            _ => 0,
        }),
        (CompareTarget::Mod, u) => kv.mod_revision.cmp(&match u {
            Some(TargetUnion::ModRevision(r)) => *r,
            _ => 0,
        }),
        (CompareTarget::Version, u) => kv.version.cmp(&match u {
            Some(TargetUnion::Version(r)) => *r,
            _ => 0,
        }),
        (CompareTarget::Lease, u) => kv.lease.cmp(&match u {
            Some(TargetUnion::Lease(r)) => *r,
            _ => 0,
        }),
    };
    match CompareResult::try_from(c.result) {
        Ok(CompareResult::Equal) => ord.is_eq(),
        Ok(CompareResult::NotEqual) => ord.is_ne(),
        Ok(CompareResult::Greater) => ord.is_gt(),
        Ok(CompareResult::Less) => ord.is_lt(),
        Err(_) => true,
    }
}

/// The branch taken by `t` and, depth first, by every nested txn on the taken path.
pub fn path(view: &dyn ReadView, t: &TxnRequest) -> Result<Vec<bool>> {
    let mut out = Vec::new();
    walk_path(view, t, &mut out)?;
    Ok(out)
}

/// Whether every compare of `t` (not of its nested txns) holds; stops at the first that fails.
fn compares_hold(view: &dyn ReadView, t: &TxnRequest) -> Result<bool> {
    for c in &t.compare {
        if !compare(view, c)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn walk_path(view: &dyn ReadView, t: &TxnRequest, out: &mut Vec<bool>) -> Result<()> {
    let ok = compares_hold(view, t)?;
    out.push(ok);
    for op in if ok { &t.success } else { &t.failure } {
        if let Some(Request::RequestTxn(inner)) = &op.request {
            walk_path(view, inner, out)?;
        }
    }
    Ok(())
}

/// Every operation of `t`, both branches.
fn ops(t: &TxnRequest) -> impl Iterator<Item = Option<&Request>> {
    t.success
        .iter()
        .chain(&t.failure)
        .map(|op| op.request.as_ref())
}

/// Whether every operation of `t`, in both branches, is a Range (etcd's `isTxnReadonly`; a
/// nested txn counts as a write there too). Such a txn changes nothing, so it is answered
/// without the log ([`execute_read_only`]).
pub fn is_read_only(t: &TxnRequest) -> bool {
    ops(t).all(|op| matches!(op, Some(Request::RequestRange(_))))
}

/// Whether a txn may write a value anywhere in it, nested txns included (etcd charges the
/// quota for those only).
pub fn has_put(t: &TxnRequest) -> bool {
    ops(t).any(|op| match op {
        Some(Request::RequestPut(_)) => true,
        Some(Request::RequestTxn(inner)) => has_put(inner),
        _ => false,
    })
}

/// Whether `t` is read-only and every Range in it is serializable (etcd's
/// `isTxnSerializable`): it may then be answered without the ReadIndex wait.
pub fn is_serializable(t: &TxnRequest) -> bool {
    ops(t).all(|op| matches!(op, Some(Request::RequestRange(r)) if r.serializable))
}

/// Whether `t` reads single keys only, in its compares and its ranges: cheap enough to
/// answer on an async worker.
pub fn is_point_read(t: &TxnRequest) -> bool {
    t.compare.iter().all(|c| c.range_end.is_empty())
        && ops(t).all(|op| matches!(op, Some(Request::RequestRange(r)) if r.range_end.is_empty()))
}

/// Answers a read-only txn ([`is_read_only`]) from one snapshot of `store`: its compares and
/// ranges all see the same state, and the header carries that state's revision, exactly what
/// the txn would have answered through the log at that point (etcd's read-only txn path).
pub fn execute_read_only(store: &Store, t: &TxnRequest) -> Result<TxnResponse> {
    let view = store.pin(0)?;
    let ok = compares_hold(&view, t)?;
    let mut ranges = Vec::new();
    for op in if ok { &t.success } else { &t.failure } {
        let Some(Request::RequestRange(r)) = &op.request else {
            return Err(ApplyError::NotReadOnly);
        };
        // As on the log path: every Range is checked before any is read.
        check_range(r, view.current(), store.compact_revision())?;
        ranges.push(r);
    }
    let mut responses = Vec::with_capacity(ranges.len());
    for r in ranges {
        responses.push(ResponseOp {
            response: Some(Response::ResponseRange(range(&view, r)?)),
        });
    }
    Ok(TxnResponse {
        header: Some(header(view.current())),
        succeeded: ok,
        responses,
    })
}

/// Checks the puts and ranges on the chosen path against the pre-transaction state.
pub fn check_path(
    view: &WriteTxn<'_>,
    t: &TxnRequest,
    path: &[bool],
    leases: &dyn LeaseLookup,
) -> Result<()> {
    let mut i = 0;
    check_walk(view, t, path, &mut i, leases)
}

fn check_walk(
    view: &WriteTxn<'_>,
    t: &TxnRequest,
    path: &[bool],
    i: &mut usize,
    leases: &dyn LeaseLookup,
) -> Result<()> {
    let ok = path.get(*i).copied().unwrap_or(false);
    *i += 1;
    for op in if ok { &t.success } else { &t.failure } {
        match &op.request {
            Some(Request::RequestPut(p)) => check_put(view, p, leases)?,
            Some(Request::RequestRange(r)) => check_range(r, view.rev(), view.compact_revision())?,
            Some(Request::RequestTxn(inner)) => check_walk(view, inner, path, i, leases)?,
            _ => {}
        }
    }
    Ok(())
}

/// etcd's `checkRequestRange`: a Range at a revision above `rev` fails with `FutureRev`,
/// one below `compacted` with `Compacted`; revision 0 always passes.
fn check_range(r: &RangeRequest, rev: i64, compacted: i64) -> Result<()> {
    if r.revision == 0 {
        return Ok(());
    }
    if r.revision > rev {
        return Err(mvcc::Error::FutureRev.into());
    }
    if r.revision < compacted {
        return Err(mvcc::Error::Compacted.into());
    }
    Ok(())
}

/// etcd's put checks at apply time: the lease must exist; ignore_value/ignore_lease need the key.
pub fn check_put(
    view: &WriteTxn<'_>,
    p: &metastore_proto::etcdserverpb::PutRequest,
    leases: &dyn LeaseLookup,
) -> Result<()> {
    if p.lease != 0 && !leases.lease_exists(p.lease) {
        return Err(ApplyError::LeaseNotFound);
    }
    if (p.ignore_value || p.ignore_lease) && view.get(&p.key)?.is_none() {
        return Err(ApplyError::KeyNotFound);
    }
    Ok(())
}

/// Executes the chosen path of `t` on `txn`.
pub fn execute(txn: &mut WriteTxn<'_>, t: &TxnRequest, path: &[bool]) -> Result<TxnResponse> {
    let mut i = 0;
    execute_walk(txn, t, path, &mut i)
}

fn execute_walk(
    txn: &mut WriteTxn<'_>,
    t: &TxnRequest,
    path: &[bool],
    i: &mut usize,
) -> Result<TxnResponse> {
    let ok = path.get(*i).copied().unwrap_or(false);
    *i += 1;
    let mut responses = Vec::new();
    for op in if ok { &t.success } else { &t.failure } {
        let response = match &op.request {
            Some(Request::RequestRange(r)) => Response::ResponseRange(range(txn, r)?),
            Some(Request::RequestPut(p)) => Response::ResponsePut(put(txn, p)?),
            Some(Request::RequestDeleteRange(d)) => {
                Response::ResponseDeleteRange(delete_range(txn, d)?)
            }
            Some(Request::RequestTxn(inner)) => {
                let mut r = execute_walk(txn, inner, path, i)?;
                // etcd's newTxnResp leaves a nested txn's header empty (its ops' headers carry
                // revisions); clients see `"header":{}`.
                r.header = Some(ResponseHeader::default());
                Response::ResponseTxn(r)
            }
            None => return Err(ApplyError::KeyNotFound),
        };
        responses.push(ResponseOp {
            response: Some(response),
        });
    }
    Ok(TxnResponse {
        header: Some(header(txn.rev())),
        succeeded: ok,
        responses,
    })
}

pub(crate) fn header(revision: i64) -> ResponseHeader {
    ResponseHeader {
        revision,
        ..Default::default()
    }
}

/// Put (already checked). Previous value and lease are kept with ignore_value/ignore_lease.
pub fn put(
    txn: &mut WriteTxn<'_>,
    p: &metastore_proto::etcdserverpb::PutRequest,
) -> Result<PutResponse> {
    let (mut value, mut lease) = (p.value.clone(), p.lease);
    let need_prev = p.prev_kv || p.ignore_value || p.ignore_lease;
    let prev = if need_prev { txn.get(&p.key)? } else { None };
    if let Some(prev) = &prev {
        if p.ignore_value {
            value = prev.value.clone();
        }
        if p.ignore_lease {
            lease = prev.lease;
        }
    } else if p.ignore_value || p.ignore_lease {
        return Err(ApplyError::KeyNotFound);
    }
    txn.put(p.key.clone(), value, lease)?;
    Ok(PutResponse {
        header: Some(header(txn.rev())),
        prev_kv: if p.prev_kv { prev } else { None },
    })
}

pub fn delete_range(
    txn: &mut WriteTxn<'_>,
    d: &metastore_proto::etcdserverpb::DeleteRangeRequest,
) -> Result<DeleteRangeResponse> {
    let prev = txn.delete_range(&KeyRange::new(&d.key, &d.range_end))?;
    Ok(DeleteRangeResponse {
        header: Some(header(txn.rev())),
        deleted: prev.len() as i64,
        prev_kvs: if d.prev_kv { prev } else { Vec::new() },
    })
}
