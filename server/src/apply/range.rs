//! Range with etcd's option rules (`applierV3backend.Range`).

use std::cmp::Ordering;

use bytes::Bytes;
use metastore_proto::etcdserverpb::{
    range_request::{SortOrder, SortTarget},
    RangeRequest, RangeResponse, ResponseHeader,
};
use metastore_proto::mvccpb::KeyValue;

use super::Result;
use crate::mvcc::{self, KeyRange, PinnedRead, RangeOptions, RangeResult, Store, WriteTxn};
use crate::storage::codec::KvRef;

/// Something Range can read from: the store at a revision, or a write transaction.
pub trait ReadView {
    fn range(&self, range: &KeyRange, opts: RangeOptions) -> mvcc::Result<RangeResult>;
}

impl ReadView for Store {
    fn range(&self, range: &KeyRange, opts: RangeOptions) -> mvcc::Result<RangeResult> {
        Store::range(self, range, opts)
    }
}

impl ReadView for WriteTxn<'_> {
    fn range(&self, range: &KeyRange, opts: RangeOptions) -> mvcc::Result<RangeResult> {
        WriteTxn::range(self, range, opts)
    }
}

impl ReadView for PinnedRead<'_> {
    fn range(&self, range: &KeyRange, opts: RangeOptions) -> mvcc::Result<RangeResult> {
        PinnedRead::range(self, range, opts)
    }
}

/// Whether `r` filters on mod or create revisions.
fn filtered(r: &RangeRequest) -> bool {
    r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

/// Whether `kv` passes `r`'s revision filters.
fn keep(r: &RangeRequest, kv: &KvRef<'_>) -> bool {
    !(r.max_mod_revision != 0 && kv.mod_revision > r.max_mod_revision
        || r.min_mod_revision != 0 && kv.mod_revision < r.min_mod_revision
        || r.max_create_revision != 0 && kv.create_revision > r.max_create_revision
        || r.min_create_revision != 0 && kv.create_revision < r.min_create_revision)
}

/// The sort `r` asks for, as `(order, target)`; `SortOrder::None` when key-ascending order
/// (the store's own) is what it asks for.
fn sort_of(r: &RangeRequest) -> (SortOrder, SortTarget) {
    let sort_order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let sort_target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    let order = match (sort_target, sort_order) {
        // The store returns keys ascending already.
        (SortTarget::Key, SortOrder::Ascend) => SortOrder::None,
        (t, SortOrder::None) if t != SortTarget::Key => SortOrder::Ascend,
        (_, o) => o,
    };
    (order, sort_target)
}

/// Whether `r`'s result must be held in memory whole to be sorted (any order but ascending
/// keys). Otherwise [`for_each`] produces it incrementally.
pub fn needs_sort(r: &RangeRequest) -> bool {
    !r.count_only && sort_of(r).0 != SortOrder::None
}

/// What a Range reports besides its key-values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Live keys in the whole range (ignoring `limit` and the filters, as etcd).
    pub count: i64,
    /// Whether `limit` left out key-values that would have been returned.
    pub more: bool,
}

/// Produces incrementally what [`range`] returns for a request that needs no sort
/// ([`needs_sort`] is false): calls `emit` with each key-value, in key order, with `limit`,
/// the filters and `keys_only` applied, then returns `count` and `more`. Holds one key-value
/// at a time. Stops early, returning what it counted so far, when `emit` returns `false`
/// (the receiver went away).
pub fn for_each(
    view: &PinnedRead<'_>,
    r: &RangeRequest,
    mut emit: impl FnMut(KvRef<'_>) -> Result<bool>,
) -> Result<Totals> {
    let limit = if r.limit > 0 {
        r.limit as u64
    } else {
        u64::MAX
    };
    let filtered = filtered(r);
    let mut totals = Totals::default();
    let mut sent = 0u64;
    let mut failed = None;
    view.for_each(&KeyRange::new(&r.key, &r.range_end), |record| {
        totals.count += 1;
        // Past the limit, only `count` changes once `more` is known.
        if r.count_only || totals.more {
            return Ok(true);
        }
        if sent == limit && !filtered {
            totals.more = true;
            return Ok(true);
        }
        record.with_ref(|mut kv| {
            if filtered && !keep(r, &kv) {
                return true;
            }
            if sent == limit {
                totals.more = true;
                return true;
            }
            sent += 1;
            if r.keys_only {
                kv.value = &[];
            }
            match emit(kv) {
                Ok(go_on) => go_on,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(totals),
    }
}

/// Executes a Range. The response header carries only the revision; the server fills the rest.
pub fn range(view: &dyn ReadView, r: &RangeRequest) -> Result<RangeResponse> {
    let (order, sort_target) = sort_of(r);
    let filtered = filtered(r);
    // Sorting and filtering need every key; otherwise fetch one extra to learn `more`.
    let limit = if order != SortOrder::None || filtered || r.limit <= 0 {
        0
    } else {
        r.limit as usize + 1
    };
    let rr = view.range(
        &KeyRange::new(&r.key, &r.range_end),
        RangeOptions {
            limit,
            rev: r.revision,
            count_only: r.count_only,
        },
    )?;
    let mut kvs = rr.kvs;
    if filtered {
        kvs.retain(|kv| keep(r, &KvRef::of(kv)));
    }
    if order != SortOrder::None {
        let cmp = |a: &KeyValue, b: &KeyValue| -> Ordering {
            match sort_target {
                SortTarget::Key => a.key.cmp(&b.key),
                SortTarget::Version => a.version.cmp(&b.version),
                SortTarget::Create => a.create_revision.cmp(&b.create_revision),
                SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
                SortTarget::Value => a.value.cmp(&b.value),
            }
        };
        // Stable, like the insertion sort Go uses on the small inputs etcd sorts.
        if order == SortOrder::Descend {
            kvs.sort_by(|a, b| cmp(b, a));
        } else {
            kvs.sort_by(cmp);
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    if r.keys_only {
        for kv in &mut kvs {
            kv.value = Bytes::new();
        }
    }
    Ok(RangeResponse {
        header: Some(ResponseHeader {
            revision: rr.rev,
            ..Default::default()
        }),
        kvs,
        more,
        count: rr.count as i64,
    })
}
