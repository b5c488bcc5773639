//! Request checks done before a request is applied (etcd's API-layer checks), in etcd's order,
//! so that the first error reported is the one etcd reports.

use metastore_proto::etcdserverpb::{
    range_request::SortOrder, range_request::SortTarget, request_op::Request, DeleteRangeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};

use super::{ApplyError, Result};
use crate::mvcc::KeyRange;

pub fn check_range(r: &RangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(ApplyError::EmptyKey);
    }
    if SortOrder::try_from(r.sort_order).is_err() || SortTarget::try_from(r.sort_target).is_err() {
        return Err(ApplyError::InvalidSortOption);
    }
    Ok(())
}

pub fn check_put(r: &PutRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(ApplyError::EmptyKey);
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(ApplyError::ValueProvided);
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(ApplyError::LeaseProvided);
    }
    Ok(())
}

pub fn check_delete(r: &DeleteRangeRequest) -> Result<()> {
    if r.key.is_empty() {
        return Err(ApplyError::EmptyKey);
    }
    Ok(())
}

/// etcd's `checkTxnRequest` followed by `checkIntervals` on both branches.
pub fn check_txn(r: &TxnRequest, max_txn_ops: usize) -> Result<()> {
    check_txn_ops(r, max_txn_ops)?;
    check_intervals(&r.success)?;
    check_intervals(&r.failure)?;
    Ok(())
}

fn check_txn_ops(r: &TxnRequest, max_txn_ops: usize) -> Result<()> {
    let opc = r.compare.len().max(r.success.len()).max(r.failure.len());
    if opc > max_txn_ops {
        return Err(ApplyError::TooManyOps);
    }
    if r.compare.iter().any(|c| c.key.is_empty()) {
        return Err(ApplyError::EmptyKey);
    }
    for op in r.success.iter().chain(&r.failure) {
        check_op(op, max_txn_ops - opc)?;
    }
    Ok(())
}

fn check_op(op: &RequestOp, max_txn_ops: usize) -> Result<()> {
    match &op.request {
        Some(Request::RequestRange(r)) => check_range(r),
        Some(Request::RequestPut(r)) => check_put(r),
        Some(Request::RequestDeleteRange(r)) => check_delete(r),
        Some(Request::RequestTxn(t)) => check_txn_ops(t, max_txn_ops),
        // etcd answers an empty op with ErrGRPCKeyNotFound.
        None => Err(ApplyError::KeyNotFound),
    }
}

/// Puts and deletes of one branch (with its nested txns) may not touch the same key twice:
/// etcd's `checkIntervals`. A key put in both branches of a nested txn is fine (only one runs).
/// Returns the keys put and the ranges deleted by `ops`.
fn check_intervals(ops: &[RequestOp]) -> Result<(Vec<Vec<u8>>, Vec<KeyRange>)> {
    // Deletes on this level first, so puts below can be checked against them.
    let mut dels: Vec<KeyRange> = ops
        .iter()
        .filter_map(|op| match &op.request {
            Some(Request::RequestDeleteRange(d)) => Some(interval(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let mut puts: Vec<Vec<u8>> = Vec::new();
    let hits = |dels: &[KeyRange], k: &[u8]| dels.iter().any(|d| d.contains(k));
    for op in ops {
        let Some(Request::RequestTxn(t)) = &op.request else {
            continue;
        };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || hits(&dels, k) {
                return Err(ApplyError::DuplicateKey);
            }
            puts.push(k.clone());
        }
        for k in &puts_else {
            if (puts.contains(k) && !puts_then.contains(k)) || hits(&dels, k) {
                return Err(ApplyError::DuplicateKey);
            }
            puts.push(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let Some(Request::RequestPut(p)) = &op.request else {
            continue;
        };
        let k = p.key.to_vec();
        if puts.contains(&k) || hits(&dels, &k) {
            return Err(ApplyError::DuplicateKey);
        }
        puts.push(k);
    }
    Ok((puts, dels))
}

/// etcd compares delete intervals as plain byte strings, so a `"\0"` range end (from-key)
/// makes an empty interval here, exactly as in etcd's `checkIntervals`.
fn interval(key: &[u8], end: &[u8]) -> KeyRange {
    if end.is_empty() {
        KeyRange::Single(key.to_vec())
    } else {
        KeyRange::Between(key.to_vec(), end.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::Compare;

    fn put(k: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestPut(PutRequest {
                key: k.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn del(k: &str, end: &str) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: k.as_bytes().to_vec().into(),
                range_end: end.as_bytes().to_vec().into(),
                ..Default::default()
            })),
        }
    }
    fn txn(success: Vec<RequestOp>, failure: Vec<RequestOp>) -> TxnRequest {
        TxnRequest {
            compare: vec![],
            success,
            failure,
        }
    }
    fn nested(t: TxnRequest) -> RequestOp {
        RequestOp {
            request: Some(Request::RequestTxn(t)),
        }
    }

    #[test]
    fn duplicate_keys() {
        let ok = |t: TxnRequest| check_txn(&t, 128).is_ok();
        assert!(!ok(txn(vec![put("a"), put("a")], vec![])));
        assert!(
            ok(txn(vec![put("a")], vec![put("a")])),
            "branches are exclusive"
        );
        assert!(!ok(txn(vec![del("a", "c"), put("b")], vec![])));
        assert!(ok(txn(vec![del("a", "c"), put("c")], vec![])));
        assert!(
            ok(txn(vec![del("a", "c"), del("b", "d")], vec![])),
            "deletes may overlap"
        );
        assert!(
            ok(txn(vec![del("a", "\0"), put("b")], vec![])),
            "etcd's from-key quirk"
        );
        assert!(!ok(txn(
            vec![put("a"), nested(txn(vec![put("a")], vec![]))],
            vec![]
        )));
        assert!(ok(txn(
            vec![nested(txn(vec![put("a")], vec![put("a")]))],
            vec![]
        )));
        assert!(!ok(txn(
            vec![del("a", ""), nested(txn(vec![], vec![put("a")]))],
            vec![]
        )));
    }

    #[test]
    fn op_counts_and_empty_keys() {
        let many = txn((0..129).map(|i| put(&format!("k{i}"))).collect(), vec![]);
        assert!(matches!(check_txn(&many, 128), Err(ApplyError::TooManyOps)));
        assert!(check_txn(&many, 129).is_ok());
        let mut t = txn(vec![], vec![]);
        t.compare.push(Compare::default());
        assert!(matches!(check_txn(&t, 128), Err(ApplyError::EmptyKey)));
        let t = txn(vec![RequestOp { request: None }], vec![]);
        assert!(matches!(check_txn(&t, 128), Err(ApplyError::KeyNotFound)));
        assert!(matches!(
            check_put(&PutRequest {
                key: "k".into(),
                value: "v".into(),
                ignore_value: true,
                ..Default::default()
            }),
            Err(ApplyError::ValueProvided)
        ));
        assert!(matches!(
            check_put(&PutRequest {
                key: "k".into(),
                lease: 5,
                ignore_lease: true,
                ..Default::default()
            }),
            Err(ApplyError::LeaseProvided)
        ));
    }
}
