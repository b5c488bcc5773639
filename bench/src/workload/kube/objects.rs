//! Object types, keys, the plan of writes and the writers.
//!
//! Object `i` is of type `i % types` and lives at `<prefix>/<type>/ns-NN/obj-<i>`, as
//! kube-apiserver lays out `/registry/pods/<namespace>/<name>`. Type 0 is `events`: its
//! objects are created with a lease shared by a batch of them, as kube-apiserver attaches
//! Events to a lease it reuses.
//!
//! Writes use kube-apiserver's transaction shapes: a create is
//! `Txn(ModRevision(k) == 0 → Put else Range)`, an update or a delete
//! `Txn(ModRevision(k) == rev → Put | Delete else Range)`. An object is held by one writer at a
//! time (checked out of the writers' table of free objects), so a failed compare can only mean
//! that an earlier attempt of the same write took effect. Every write's value is unique
//! (`<object>:<generation>`), which is what resolves an attempt whose outcome is unknown (a
//! leader killed under it): read the key, and if it holds this value the write took effect at
//! the key's `mod_revision`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use metastore_proto::etcdserverpb::{
    compare, kv_client::KvClient, request_op, response_op, Compare, DeleteRangeRequest,
    LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use metastore_proto::mvccpb::KeyValue;
use tonic::transport::Channel;
use tonic::Status;

use super::check::{self, Change};
use super::{timed, Conn};
use crate::error::Result;
use crate::keys::Rng;
use crate::runner::Workload;

/// Names of the first types (kube-apiserver's busiest resources); later ones are CRD-like.
const TYPE_NAMES: [&str; 10] = [
    "events",
    "pods",
    "leases",
    "configmaps",
    "endpointslices",
    "secrets",
    "nodes",
    "services",
    "replicasets",
    "deployments",
];

/// How long a writer keeps retrying one write through leader changes before giving up.
const WRITE_DEADLINE: Duration = Duration::from_secs(30);
/// TTL of the Events' leases: longer than any run, so no Event expires under the checker.
const EVENT_TTL_SECS: i64 = 3600;

/// The object types of a run and their keys.
#[derive(Debug, Clone)]
pub struct Types {
    prefix: String,
    names: Vec<String>,
}

impl Types {
    pub fn new(prefix: &str, n: usize) -> Self {
        let names = (0..n)
            .map(|i| match TYPE_NAMES.get(i) {
                Some(name) => name.to_string(),
                None => format!("crd{i:03}.example.com"),
            })
            .collect();
        Self {
            prefix: prefix.trim_end_matches('/').to_string(),
            names,
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    pub fn name(&self, t: usize) -> &str {
        &self.names[t]
    }

    /// `<prefix>/<type>/`: what a list or a watch of the type covers.
    pub fn prefix(&self, t: usize) -> Bytes {
        Bytes::from(format!("{}/{}/", self.prefix, self.names[t]))
    }

    /// The key of object `i`, of type `t`.
    pub fn key(&self, t: usize, i: u64) -> Bytes {
        Bytes::from(format!(
            "{}/{}/ns-{:02}/obj-{i:08}",
            self.prefix,
            self.names[t],
            i % 32
        ))
    }

    /// The key kube-apiserver's health check reads.
    pub fn health_key(&self) -> Bytes {
        Bytes::from(format!("{}/health", self.prefix))
    }
}

/// One kind of write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
}

/// The order of a run's writes: exactly `creates`, `updates` and `deletes` of them, shuffled,
/// an update or delete only while more than `margin` objects exist (so a writer always finds
/// one free to check out while the others hold theirs).
pub fn plan(creates: u64, updates: u64, deletes: u64, margin: u64, seed: u64) -> Vec<Op> {
    let mut rng = Rng::new(seed);
    let (mut c, mut u, mut d, mut live) = (creates, updates, deletes, 0u64);
    let mut out = Vec::with_capacity((creates + updates + deletes) as usize);
    while c + u + d > 0 {
        let (wu, wd) = if live > margin || c == 0 {
            (u, d)
        } else {
            (0, 0)
        };
        let pick = rng.below((c + wu + wd).max(1));
        let op = if pick < c {
            Op::Create
        } else if pick < c + wu {
            Op::Update
        } else {
            Op::Delete
        };
        match op {
            Op::Create => (c, live) = (c - 1, live + 1),
            Op::Update => u -= 1,
            Op::Delete => (d, live) = (d - 1, live.saturating_sub(1)),
        }
        out.push(op);
    }
    out
}

/// One object a writer holds: its key and what it last wrote.
#[derive(Debug, Clone)]
pub struct Obj {
    pub index: u64,
    pub ty: usize,
    pub key: Bytes,
    /// The object's `mod_revision` (0: not created yet).
    pub mod_rev: i64,
    pub generation: u32,
}

/// What the writers learnt: the changes the server acknowledged (with their revisions) and
/// the tags of writes whose outcome stayed unknown.
#[derive(Debug, Default)]
pub struct Truth {
    /// (type, change), in no particular order.
    pub acked: Vec<(usize, Change)>,
    pub maybe: Vec<u64>,
}

/// Counters for the progress line and the report.
#[derive(Debug, Default)]
pub struct Counts {
    pub created: AtomicU64,
    pub updated: AtomicU64,
    pub deleted: AtomicU64,
    pub unknown: AtomicU64,
}

/// The writers: a [`Workload`] whose request `seq` is the `seq`-th write of the [`plan`].
pub struct Writers {
    conns: Arc<[Channel]>,
    types: Types,
    val_size: usize,
    events_per_lease: u32,
    plan: Vec<Op>,
    next_object: AtomicU64,
    /// Objects that exist and no writer holds.
    table: Mutex<Vec<Obj>>,
    lease: tokio::sync::Mutex<(i64, u32)>,
    pub truth: Mutex<Truth>,
    pub counts: Counts,
}

/// A writer: its connection (it moves to the next endpoint on failure) and random state.
pub struct Writer {
    conn: Conn,
    rng: Rng,
}

impl Writers {
    pub fn new(
        conns: Arc<[Channel]>,
        types: Types,
        val_size: usize,
        events_per_lease: u32,
        plan: Vec<Op>,
    ) -> Self {
        Self {
            conns,
            types,
            val_size,
            events_per_lease: events_per_lease.max(1),
            plan,
            next_object: AtomicU64::new(0),
            table: Mutex::new(Vec::new()),
            lease: tokio::sync::Mutex::new((0, 0)),
            truth: Mutex::new(Truth::default()),
            counts: Counts::default(),
        }
    }

    /// A writer of its own, outside the runner (for the sentinel writes at the end).
    pub fn writer(&self, id: usize) -> Writer {
        Writer {
            conn: Conn::new(self.conns.clone(), id),
            rng: Rng::seeded(id as u64),
        }
    }

    /// Number of objects created so far and planned in all.
    pub fn progress(&self) -> (u64, u64) {
        let planned = self.plan.iter().filter(|o| **o == Op::Create).count() as u64;
        (self.counts.created.load(Ordering::Relaxed), planned)
    }

    /// Creates one more object of type `ty` (outside the plan); returns its revision.
    pub async fn create_one(&self, w: &mut Writer, ty: usize) -> Result<i64, Status> {
        let index = self.next_object.fetch_add(1, Ordering::Relaxed);
        let mut obj = Obj {
            index,
            ty,
            key: self.types.key(ty, index),
            mod_rev: 0,
            generation: 0,
        };
        self.write(w, &mut obj, Op::Create).await?;
        Ok(obj.mod_rev)
    }

    fn value(&self, obj: &Obj) -> Bytes {
        let mut v = format!("{}:{}", obj.index, obj.generation).into_bytes();
        v.resize(self.val_size.max(v.len()), b'v');
        Bytes::from(v)
    }

    async fn event_lease(&self, w: &mut Writer) -> Result<i64, Status> {
        let mut lease = self.lease.lock().await;
        if lease.0 == 0 || lease.1 >= self.events_per_lease {
            let mut c =
                metastore_proto::etcdserverpb::lease_client::LeaseClient::new(w.conn.channel());
            let grant = LeaseGrantRequest {
                ttl: EVENT_TTL_SECS,
                id: 0,
            };
            match c.lease_grant(timed(grant)).await {
                Ok(r) => *lease = (r.into_inner().id, 0),
                Err(e) => {
                    w.conn.rotate();
                    return Err(e);
                }
            }
        }
        lease.1 += 1;
        Ok(lease.0)
    }

    fn record(&self, ty: usize, change: Change, maybe: Option<u64>) {
        if let Ok(mut t) = self.truth.lock() {
            if change.rev > 0 {
                t.acked.push((ty, change));
            }
            t.maybe.extend(maybe);
        }
    }

    /// One write of `obj`, retried through failures until its outcome is known (or
    /// [`WRITE_DEADLINE`] passes). On success `obj` holds the new revision and generation.
    async fn write(&self, w: &mut Writer, obj: &mut Obj, op: Op) -> Result<(), Status> {
        obj.generation += 1;
        let value = self.value(obj);
        let lease = if op == Op::Create && obj.ty == 0 {
            self.event_lease(w).await?
        } else {
            0
        };
        let delete = op == Op::Delete;
        let write = if delete {
            request_op::Request::RequestDeleteRange(DeleteRangeRequest {
                key: obj.key.clone(),
                ..Default::default()
            })
        } else {
            request_op::Request::RequestPut(PutRequest {
                key: obj.key.clone(),
                value: value.clone(),
                lease,
                ..Default::default()
            })
        };
        let get = RangeRequest {
            key: obj.key.clone(),
            ..Default::default()
        };
        let txn = TxnRequest {
            compare: vec![Compare {
                result: compare::CompareResult::Equal as i32,
                target: compare::CompareTarget::Mod as i32,
                key: obj.key.clone(),
                target_union: Some(compare::TargetUnion::ModRevision(obj.mod_rev)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(write),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(get.clone())),
            }],
        };
        let tag = check::tag(&obj.key, delete);
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut last = Status::unknown("no attempt");
        let mut backoff = Duration::from_millis(50);
        while Instant::now() < deadline {
            let mut kv = KvClient::new(w.conn.channel());
            let current: Option<KeyValue> = match kv.txn(timed(txn.clone())).await {
                Ok(r) => {
                    let r = r.into_inner();
                    if r.succeeded {
                        let rev = r.header.map(|h| h.revision).unwrap_or_default();
                        obj.mod_rev = rev;
                        self.record(obj.ty, Change { rev, tag }, None);
                        return Ok(());
                    }
                    let range = r.responses.into_iter().find_map(|op| match op.response {
                        Some(response_op::Response::ResponseRange(rr)) => Some(rr),
                        _ => None,
                    });
                    range.and_then(|rr| rr.kvs.into_iter().next())
                }
                Err(e) => {
                    // Unknown outcome: it may apply (or have applied) whatever we read next.
                    self.record(obj.ty, Change { rev: 0, tag }, Some(tag));
                    self.counts.unknown.fetch_add(1, Ordering::Relaxed);
                    last = e;
                    w.conn.rotate();
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    let mut kv = KvClient::new(w.conn.channel());
                    match kv.range(timed(get.clone())).await {
                        Ok(r) => r.into_inner().kvs.into_iter().next(),
                        Err(e) => {
                            last = e;
                            w.conn.rotate();
                            continue;
                        }
                    }
                }
            };
            // Did this write (an earlier attempt of it) take effect?
            match (delete, current) {
                (true, None) => {
                    // Deleted, at a revision nobody told us: the watchers' prev_kv chains and
                    // lists are what check its event.
                    self.record(obj.ty, Change { rev: 0, tag }, Some(tag));
                    return Ok(());
                }
                (false, Some(kv)) if kv.value == value => {
                    obj.mod_rev = kv.mod_revision;
                    self.record(
                        obj.ty,
                        Change {
                            rev: kv.mod_revision,
                            tag,
                        },
                        None,
                    );
                    return Ok(());
                }
                (_, cur) if cur.as_ref().map_or(0, |kv| kv.mod_revision) == obj.mod_rev => {
                    // Not applied: try again.
                }
                (_, cur) => {
                    return Err(Status::internal(format!(
                        "{} changed under its writer: at {:?}, expected {}",
                        String::from_utf8_lossy(&obj.key),
                        cur.map(|kv| kv.mod_revision),
                        obj.mod_rev
                    )));
                }
            }
        }
        Err(last)
    }

    fn check_out(&self, rng: &mut Rng) -> Option<Obj> {
        let mut t = self.table.lock().ok()?;
        if t.is_empty() {
            return None;
        }
        let i = rng.below(t.len() as u64) as usize;
        Some(t.swap_remove(i))
    }

    fn check_in(&self, obj: Obj) {
        if let Ok(mut t) = self.table.lock() {
            t.push(obj);
        }
    }
}

impl Workload<Channel> for Writers {
    type Client = Writer;

    async fn client(&self, _channel: Channel, id: usize) -> Result<Self::Client> {
        Ok(self.writer(id))
    }

    async fn call(&self, w: &mut Writer, seq: u64) -> Result<&'static str, Status> {
        let op = self.plan.get(seq as usize).copied().unwrap_or(Op::Update);
        let mut obj = match op {
            Op::Create => {
                let index = self.next_object.fetch_add(1, Ordering::Relaxed);
                let ty = (index % self.types.len() as u64) as usize;
                Obj {
                    index,
                    ty,
                    key: self.types.key(ty, index),
                    mod_rev: 0,
                    generation: 0,
                }
            }
            Op::Update | Op::Delete => self
                .check_out(&mut w.rng)
                .ok_or_else(|| Status::unavailable("no object free to write"))?,
        };
        // An object whose write failed for good is in an unknown state: it is not written again.
        self.write(w, &mut obj, op).await?;
        let (counter, kind) = match op {
            Op::Create => (&self.counts.created, "create"),
            Op::Update => (&self.counts.updated, "update"),
            Op::Delete => (&self.counts.deleted, "delete"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if op != Op::Delete {
            self.check_in(obj);
        }
        Ok(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_has_exact_counts_and_never_writes_a_missing_object() {
        let p = plan(1000, 500, 200, 16, 7);
        let n = |op| p.iter().filter(|o| **o == op).count();
        assert_eq!(
            (n(Op::Create), n(Op::Update), n(Op::Delete)),
            (1000, 500, 200)
        );
        let mut live = 0i64;
        for (i, op) in p.iter().enumerate() {
            match op {
                Op::Create => live += 1,
                Op::Delete => live -= 1,
                Op::Update => {}
            }
            if *op != Op::Create {
                assert!(live >= 16, "op {i} with {live} objects");
            }
        }
    }

    #[test]
    fn keys_follow_kube_apiservers_layout() {
        let t = Types::new("/registry/", 12);
        assert_eq!(t.prefix(1), Bytes::from_static(b"/registry/pods/"));
        assert_eq!(
            t.key(0, 33),
            Bytes::from_static(b"/registry/events/ns-01/obj-00000033")
        );
        assert_eq!(t.name(11), "crd011.example.com");
        assert_eq!(t.health_key(), Bytes::from_static(b"/registry/health"));
        // No type's prefix is a prefix of another's.
        for a in 0..t.len() {
            for b in 0..t.len() {
                assert!(a == b || !t.prefix(b).starts_with(&t.prefix(a)));
            }
        }
    }
}
