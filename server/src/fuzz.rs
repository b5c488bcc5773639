//! Fuzz targets: each takes arbitrary bytes, as a hostile peer, client or file would give them,
//! and must return without panicking, whatever the bytes. Where the bytes decode, each also
//! checks a property (a decoded record re-encodes to the same record, a valid request applies
//! or fails with an error).
//!
//! The same functions serve two drivers:
//! - `fuzz/` (cargo-fuzz, libFuzzer, nightly): coverage-guided, for long runs
//!   (`cargo +nightly fuzz run record`, see `fuzz/README.md`);
//! - the unit tests below (stable, run by CI): every input saved under `fuzz/regressions/`,
//!   then a fixed number of seeded mutations of valid inputs per target.

use metastore_proto::etcdserverpb::{
    CompactionRequest, DeleteRangeRequest, LeaseGrantRequest, PutRequest, RangeRequest, TxnRequest,
};
use metastore_proto::raftpb as pb;
use prost::Message;

use crate::apply::{apply, validate, Command};
use crate::raft::codec as raft_codec;
use crate::storage::codec;

/// A fuzz target: arbitrary bytes in, a panic on a bug.
pub type Target = fn(&[u8]);

/// The targets by name, as `fuzz/fuzz_targets/` and `fuzz/regressions/` name them.
pub const TARGETS: &[(&str, Target)] = &[
    ("record", record),
    ("raft_entry", raft_entry),
    ("raft_message", raft_message),
    ("request", request),
    ("snapshot_file", snapshot_file),
];

/// A stored `KeyValue` record in any format (the dual-format reader).
pub fn record(data: &[u8]) {
    let Ok(kv) = codec::decode(data) else {
        return;
    };
    let format = codec::format_of(data).expect("a record that decodes has a format");
    let (m, v) = codec::peek_mod_version(data).expect("a record that decodes can be peeked");
    assert_eq!(
        (m, v),
        (kv.mod_revision, kv.version),
        "peek agrees with decode"
    );
    let mut again = Vec::new();
    codec::encode(format, &kv, &mut again).expect("a decoded record re-encodes");
    assert_eq!(
        codec::decode(&again).ok(),
        Some(kv),
        "re-encoded record differs"
    );
}

/// A Raft log entry as stored in the log table, and the commands inside a normal entry.
pub fn raft_entry(data: &[u8]) {
    let Ok(entry) = raft_codec::decode_entry(data) else {
        return;
    };
    let bytes = raft_codec::encode_entry(&entry);
    let back = raft_codec::decode_entry(&bytes).expect("an encoded entry decodes");
    assert_eq!(back.log_id, entry.log_id);
    if let openraft::EntryPayload::Normal(batch) = &entry.payload {
        commands(&batch.0);
    }
}

fn commands(batch: &[u8]) {
    if let Ok(b) = pb::CommandBatch::decode(batch) {
        for p in b.proposals {
            if let Some(c) = p.command {
                let _ = raft_codec::command_from_pb(c);
            }
        }
    }
}

/// A peer RPC (the first byte picks which), decoded and converted as the peer service does.
pub fn raft_message(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 3 {
        0 => {
            let Ok(r) = pb::AppendEntriesRequest::decode(body) else {
                return;
            };
            let _ = raft_codec::req_vote(&r.vote);
            let _ = raft_codec::opt_log_id_from_pb(&r.prev_log_id);
            let _ = raft_codec::opt_log_id_from_pb(&r.leader_commit);
            for e in r.entries {
                if let Ok(e) = raft_codec::entry_from_pb(e) {
                    if let openraft::EntryPayload::Normal(b) = &e.payload {
                        commands(&b.0);
                    }
                }
            }
        }
        1 => {
            let Ok(r) = pb::VoteRequest::decode(body) else {
                return;
            };
            let _ = raft_codec::req_vote(&r.vote);
            let _ = raft_codec::opt_log_id_from_pb(&r.last_log_id);
        }
        _ => {
            let Ok(r) = pb::InstallSnapshotRequest::decode(body) else {
                return;
            };
            let _ = raft_codec::req_vote(&r.vote);
            if let Some(m) = &r.meta {
                let meta = raft_codec::snapshot_meta_from_pb(m);
                let _ = raft_codec::snapshot_meta_to_pb(&meta);
            }
        }
    }
}

/// Transaction ops allowed by the `request` target (the server's default).
const MAX_TXN_OPS: usize = 128;

/// A client request (the first byte picks which): validated as the gRPC handlers do, and when
/// valid, applied to a fresh in-memory store seeded with a few keys (reads executed).
pub fn request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let cmd = match kind % 6 {
        0 => {
            let Ok(r) = RangeRequest::decode(body) else {
                return;
            };
            if validate::check_range(&r).is_ok() {
                let store = seeded_store();
                let _ = crate::apply::range::range(store.as_ref(), &r);
            }
            return;
        }
        1 => match PutRequest::decode(body) {
            Ok(r) if validate::check_put(&r).is_ok() => Command::Put(r),
            _ => return,
        },
        2 => match DeleteRangeRequest::decode(body) {
            Ok(r) if validate::check_delete(&r).is_ok() => Command::DeleteRange(r),
            _ => return,
        },
        3 => match TxnRequest::decode(body) {
            Ok(r) if validate::check_txn(&r, MAX_TXN_OPS).is_ok() => Command::Txn(r),
            _ => return,
        },
        4 => match CompactionRequest::decode(body) {
            Ok(r) => Command::Compact(r),
            _ => return,
        },
        _ => match LeaseGrantRequest::decode(body) {
            Ok(r) => Command::LeaseGrant(r),
            _ => return,
        },
    };
    let store = seeded_store();
    let auth = crate::auth::AuthStore::open_default(store.engine().clone())
        .expect("auth store on a memory engine");
    let mut a = store.applier().expect("applier");
    let index = store.applied_index() + 1;
    let _ = apply(&mut a, index, &cmd, &crate::apply::NoLeases, &auth);
    a.publish().expect("publish");
}

/// A memory store holding `a`, `b`, `c` (two versions of `b`), compacted at 2.
fn seeded_store() -> std::sync::Arc<crate::mvcc::Store> {
    use crate::mvcc::{Store, StoreOptions};
    let store = Store::open(
        std::sync::Arc::new(crate::storage::MemoryEngine::new()),
        StoreOptions::default(),
    )
    .expect("memory store");
    let auth = crate::auth::AuthStore::open_default(store.engine().clone()).expect("auth store");
    let mut a = store.applier().expect("applier");
    for (i, k) in ["a", "b", "b", "c"].iter().enumerate() {
        let put = Command::Put(PutRequest {
            key: k.as_bytes().to_vec().into(),
            value: vec![b'v'; i + 1].into(),
            ..Default::default()
        });
        let index = store.applied_index() + 1 + i as u64;
        apply(&mut a, index, &put, &crate::apply::NoLeases, &auth).expect("seed put");
    }
    let compact = Command::Compact(CompactionRequest {
        revision: 2,
        physical: false,
    });
    let index = store.applied_index() + 5;
    apply(&mut a, index, &compact, &crate::apply::NoLeases, &auth).expect("seed compact");
    a.publish().expect("publish");
    store
}

/// A backup snapshot file (`metastore snapshot restore`, `etcdctl snapshot status`): verified,
/// then loaded into a memory engine, as it is and with its checksum made right (so that
/// mutations reach the parser behind the checksum).
pub fn snapshot_file(data: &[u8]) {
    use crate::storage::snapshot::{self, CHECKSUM_LEN};
    use sha2::{Digest, Sha256};
    let _ = snapshot::verify(data);
    let _ = snapshot::load(data, &crate::storage::MemoryEngine::new(), &mut |_| {});
    if data.len() >= CHECKSUM_LEN {
        let body = &data[..data.len() - CHECKSUM_LEN];
        let mut fixed = body.to_vec();
        fixed.extend_from_slice(&Sha256::digest(body));
        let verified = snapshot::verify(fixed.as_slice());
        let loaded = snapshot::load(
            fixed.as_slice(),
            &crate::storage::MemoryEngine::new(),
            &mut |_| {},
        );
        assert_eq!(
            verified.is_ok(),
            loaded.is_ok(),
            "verify and load disagree: {verified:?} / {loaded:?}"
        );
    }
}

#[cfg(test)]
mod tests;
