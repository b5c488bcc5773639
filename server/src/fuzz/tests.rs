//! The stable driver CI runs: the saved regressions, then seeded mutations of valid inputs.
//! `METASTORE_FUZZ_ITERATIONS` (per target, default 100000) and `METASTORE_FUZZ_SEED` make a
//! longer or a different run; a failing input is written under the system temp directory and
//! its path printed, ready to be saved in `fuzz/regressions/<target>/`.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use metastore_proto::etcdserverpb::{
    compare, request_op, Compare, RequestOp, ResponseHeader, TxnRequest,
};
use metastore_proto::mvccpb::KeyValue;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::raft::{Batch, Entry, LogId, Vote};
use crate::storage::{Engine, Table, WriteBatch};

fn kv(key: &[u8], value: &[u8], lease: i64) -> KeyValue {
    KeyValue {
        key: key.to_vec().into(),
        value: value.to_vec().into(),
        create_revision: 3,
        mod_revision: 7,
        version: 2,
        lease,
    }
}

fn with_kind(kind: u8, m: &impl Message) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend(m.encode_to_vec());
    v
}

fn txn() -> TxnRequest {
    TxnRequest {
        compare: vec![Compare {
            result: compare::CompareResult::Greater as i32,
            target: compare::CompareTarget::Mod as i32,
            key: b"a".to_vec().into(),
            range_end: b"z".to_vec().into(),
            target_union: Some(compare::TargetUnion::ModRevision(1)),
        }],
        success: vec![
            RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: b"b".to_vec().into(),
                    value: b"x".to_vec().into(),
                    prev_kv: true,
                    ..Default::default()
                })),
            },
            RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: b"a".to_vec().into(),
                    range_end: b"\0".to_vec().into(),
                    sort_order: 2,
                    sort_target: 3,
                    limit: 2,
                    ..Default::default()
                })),
            },
        ],
        failure: vec![RequestOp {
            request: Some(request_op::Request::RequestDeleteRange(
                DeleteRangeRequest {
                    key: b"a".to_vec().into(),
                    range_end: b"c".to_vec().into(),
                    prev_kv: true,
                },
            )),
        }],
    }
}

fn batch() -> Vec<u8> {
    pb::CommandBatch {
        proposals: vec![
            pb::Proposal {
                origin: 1,
                seq: 2,
                command: Some(raft_codec::command_to_pb(Command::Txn(txn()))),
            },
            pb::Proposal {
                origin: 1,
                seq: 3,
                command: Some(raft_codec::command_to_pb(Command::SetStorageFormat(2))),
            },
        ],
    }
    .encode_to_vec()
}

fn entries() -> Vec<Entry> {
    let id = |i| LogId::new(openraft::CommittedLeaderId::new(3, 1), i);
    let nodes: BTreeMap<u64, crate::raft::MemberNode> = [(1, Default::default())].into();
    vec![
        Entry {
            log_id: id(1),
            payload: openraft::EntryPayload::Blank,
        },
        Entry {
            log_id: id(2),
            payload: openraft::EntryPayload::Normal(Batch(batch().into())),
        },
        Entry {
            log_id: id(3),
            payload: openraft::EntryPayload::Membership(openraft::Membership::new(
                vec![[1].into()],
                nodes,
            )),
        },
    ]
}

fn snapshot_seed() -> Vec<u8> {
    let e = crate::storage::MemoryEngine::new();
    let mut b = WriteBatch::new();
    let mut rec = Vec::new();
    codec::encode_v2(&kv(b"k", b"v", 0), &mut rec);
    b.put(Table::Kv, b"k".to_vec(), rec);
    b.put(
        Table::Lease,
        9u64.to_be_bytes().to_vec(),
        60i64.to_le_bytes().to_vec(),
    );
    e.write(b, true).expect("write");
    let mut out = Vec::new();
    crate::storage::snapshot::write_snapshot(e.snapshot().as_ref(), &mut out, &mut |_| {})
        .expect("snapshot");
    out
}

/// Valid inputs of each target, the starting points of the mutations.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "record" => {
            let mut out = Vec::new();
            for kv in [
                kv(b"key", b"value", 0),
                kv(b"", b"", 7),
                kv(&[0xff; 40], &[0; 300], -1),
            ] {
                let mut a = Vec::new();
                codec::encode_v1(&kv, &mut a).expect("v1");
                let mut b = Vec::new();
                codec::encode_v2(&kv, &mut b);
                out.extend([a, b]);
            }
            out
        }
        "raft_entry" => entries().iter().map(raft_codec::encode_entry).collect(),
        "raft_message" => {
            let vote = Some(raft_codec::vote_to_pb(&Vote::new_committed(3, 1)));
            let log_id = Some(raft_codec::log_id_to_pb(&entries()[1].log_id));
            vec![
                with_kind(
                    0,
                    &pb::AppendEntriesRequest {
                        vote,
                        prev_log_id: log_id,
                        entries: entries().iter().map(raft_codec::entry_to_pb).collect(),
                        leader_commit: log_id,
                    },
                ),
                with_kind(
                    1,
                    &pb::VoteRequest {
                        vote,
                        last_log_id: log_id,
                    },
                ),
                with_kind(
                    2,
                    &pb::InstallSnapshotRequest {
                        vote,
                        meta: Some(raft_codec::snapshot_meta_to_pb(&Default::default())),
                        offset: 0,
                        data: vec![1, 2, 3].into(),
                        done: true,
                    },
                ),
            ]
        }
        "request" => vec![
            with_kind(
                0,
                &RangeRequest {
                    key: b"a".to_vec().into(),
                    range_end: b"\0".to_vec().into(),
                    revision: 3,
                    sort_order: 1,
                    sort_target: 4,
                    count_only: false,
                    keys_only: true,
                    min_mod_revision: 2,
                    ..Default::default()
                },
            ),
            with_kind(
                1,
                &PutRequest {
                    key: b"b".to_vec().into(),
                    value: b"v".to_vec().into(),
                    prev_kv: true,
                    ..Default::default()
                },
            ),
            with_kind(
                2,
                &DeleteRangeRequest {
                    key: b"a".to_vec().into(),
                    range_end: b"\0".to_vec().into(),
                    prev_kv: true,
                },
            ),
            with_kind(3, &txn()),
            with_kind(
                4,
                &CompactionRequest {
                    revision: 3,
                    physical: true,
                },
            ),
            with_kind(5, &LeaseGrantRequest { ttl: 60, id: 42 }),
            with_kind(0, &ResponseHeader::default()),
        ],
        "snapshot_file" => vec![snapshot_seed()],
        other => panic!("no seeds for {other}"),
    }
}

/// One to four random edits of `input` (bit flips, bytes set to edge values, insertions,
/// deletions, truncation, duplication, a splice from another seed).
fn mutate(rng: &mut StdRng, input: &[u8], others: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        let len = v.len();
        match rng.gen_range(0..8) {
            0 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] ^= 1 << rng.gen_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.gen_range(0..len);
                v[i] = [0, 1, 0x7f, 0x80, 0xff][rng.gen_range(0..5)];
            }
            2 => {
                let i = rng.gen_range(0..=len);
                let n = rng.gen_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.gen_range(0..len);
                let j = rng.gen_range(i..=len.min(i + 16));
                v.drain(i..j);
            }
            4 if len > 0 => v.truncate(rng.gen_range(0..len)),
            5 if len > 0 => {
                let i = rng.gen_range(0..len);
                let j = rng.gen_range(i..=len);
                let chunk = v[i..j].to_vec();
                let at = rng.gen_range(0..=v.len());
                v.splice(at..at, chunk);
            }
            6 if !others.is_empty() => {
                let o = &others[rng.gen_range(0..others.len())];
                let cut = rng.gen_range(0..=len);
                let from = rng.gen_range(0..=o.len());
                v.truncate(cut);
                v.extend_from_slice(&o[from..]);
            }
            _ if len >= 8 => {
                // A little-endian length field made huge or negative.
                let i = rng.gen_range(0..len - 7);
                let x = [u64::MAX, i64::MAX as u64, 1 << 31, 0][rng.gen_range(0..4)];
                v[i..i + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => v.push(rng.gen()),
        }
    }
    v
}

fn run_one(name: &str, f: Target, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| f(input))).is_err() {
        let path = std::env::temp_dir().join(format!(
            "metastore-fuzz-{name}-{:016x}",
            crc32c::crc32c(input)
        ));
        let _ = std::fs::write(&path, input);
        panic!(
            "fuzz target {name} panicked on {} bytes, saved to {} (hex {})",
            input.len(),
            path.display(),
            hex::encode(&input[..input.len().min(256)])
        );
    }
}

fn regressions(name: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    files
}

fn fuzz(name: &str) {
    let f = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, f)| *f)
        .expect("target");
    for path in regressions(name) {
        let input = std::fs::read(&path).expect("regression input");
        run_one(name, f, &input);
    }
    let seeds = seeds(name);
    for s in &seeds {
        run_one(name, f, s);
    }
    let iterations: usize = std::env::var("METASTORE_FUZZ_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed: u64 = std::env::var("METASTORE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x6d65_7461);
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(crc32c::crc32c(name.as_bytes())));
    // Mutants that decode as well as their parent are bred further.
    let mut pool = seeds.clone();
    for i in 0..iterations {
        let parent = pool[rng.gen_range(0..pool.len())].clone();
        let child = mutate(&mut rng, &parent, &seeds);
        run_one(name, f, &child);
        if i % 7 == 0 && pool.len() < 256 {
            pool.push(child);
        }
    }
}

#[test]
fn every_target_has_seeds_and_a_cargo_fuzz_target() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for (name, f) in TARGETS {
        for s in seeds(name) {
            f(&s);
        }
        assert!(
            dir.join(format!("{name}.rs")).exists(),
            "fuzz/fuzz_targets/{name}.rs is missing"
        );
    }
}

#[test]
fn seeds_are_valid_inputs() {
    for s in seeds("record") {
        assert!(codec::decode(&s).is_ok());
    }
    for s in seeds("raft_entry") {
        assert!(raft_codec::decode_entry(&s).is_ok());
    }
    assert!(crate::storage::snapshot::verify(snapshot_seed().as_slice()).is_ok());
}

#[test]
fn fuzz_record() {
    fuzz("record");
}

#[test]
fn fuzz_raft_entry() {
    fuzz("raft_entry");
}

#[test]
fn fuzz_raft_message() {
    fuzz("raft_message");
}

#[test]
fn fuzz_request() {
    fuzz("request");
}

#[test]
fn fuzz_snapshot_file() {
    fuzz("snapshot_file");
}
