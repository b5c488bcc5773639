//! openraft's types ⇄ `raftpb` protobuf messages: the Raft log on disk and every peer message
//! use these, never JSON. Decoding checks what protobuf cannot (required fields), so a
//! corrupt or foreign message is a [`CodecError`], never a panic.

use std::collections::{BTreeMap, BTreeSet};

use metastore_proto::raftpb as pb;
use openraft::{CommittedLeaderId, EntryPayload};
use prost::Message;

use super::{Batch, Entry, LogId, MemberNode, Membership, SnapshotMeta, StoredMembership, Vote};
use crate::apply::Command;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("malformed raft message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("raft message lacks {0}")]
    Missing(&'static str),
}

pub type Result<T> = std::result::Result<T, CodecError>;

pub fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        node_id: id.leader_id.node_id,
        index: id.index,
    }
}

pub fn log_id_from_pb(id: &pb::LogId) -> LogId {
    LogId::new(CommittedLeaderId::new(id.term, id.node_id), id.index)
}

pub fn opt_log_id_to_pb(id: &Option<LogId>) -> Option<pb::LogId> {
    id.as_ref().map(log_id_to_pb)
}

pub fn opt_log_id_from_pb(id: &Option<pb::LogId>) -> Option<LogId> {
    id.as_ref().map(log_id_from_pb)
}

pub fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node_id: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub fn vote_from_pb(v: &pb::Vote) -> Vote {
    if v.committed {
        Vote::new_committed(v.term, v.node_id)
    } else {
        Vote::new(v.term, v.node_id)
    }
}

pub fn req_vote(v: &Option<pb::Vote>) -> Result<Vote> {
    v.as_ref()
        .map(vote_from_pb)
        .ok_or(CodecError::Missing("vote"))
}

pub fn node_to_pb(n: &MemberNode) -> pb::MemberNode {
    pb::MemberNode {
        name: n.name.clone(),
        peer_urls: n.peer_urls.clone(),
        client_urls: n.client_urls.clone(),
    }
}

pub fn node_from_pb(n: &pb::MemberNode) -> MemberNode {
    MemberNode {
        name: n.name.clone(),
        peer_urls: n.peer_urls.clone(),
        client_urls: n.client_urls.clone(),
    }
}

pub fn membership_to_pb(m: &Membership) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::VoterSet {
                voters: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, node_to_pb(n))).collect(),
    }
}

pub fn membership_from_pb(m: &pb::Membership) -> Membership {
    let configs: Vec<BTreeSet<u64>> = m
        .configs
        .iter()
        .map(|c| c.voters.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<u64, MemberNode> = m
        .nodes
        .iter()
        .map(|(id, n)| (*id, node_from_pb(n)))
        .collect();
    Membership::new(configs, nodes)
}

pub fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: opt_log_id_to_pb(m.log_id()),
        membership: Some(membership_to_pb(m.membership())),
    }
}

pub fn stored_membership_from_pb(m: &pb::StoredMembership) -> StoredMembership {
    StoredMembership::new(
        opt_log_id_from_pb(&m.log_id),
        m.membership
            .as_ref()
            .map(membership_from_pb)
            .unwrap_or_default(),
    )
}

pub fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: opt_log_id_to_pb(&m.last_log_id),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub fn snapshot_meta_from_pb(m: &pb::SnapshotMeta) -> SnapshotMeta {
    SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&m.last_log_id),
        last_membership: m
            .last_membership
            .as_ref()
            .map(stored_membership_from_pb)
            .unwrap_or_default(),
        snapshot_id: m.snapshot_id.clone(),
    }
}

pub fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Blank {}),
        EntryPayload::Normal(b) => pb::entry::Payload::Normal(b.0.clone()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

pub fn entry_from_pb(e: pb::Entry) -> Result<Entry> {
    let log_id = e
        .log_id
        .as_ref()
        .map(log_id_from_pb)
        .ok_or(CodecError::Missing("entry log id"))?;
    let payload = match e.payload {
        None | Some(pb::entry::Payload::Blank(_)) => EntryPayload::Blank,
        Some(pb::entry::Payload::Normal(b)) => EntryPayload::Normal(Batch(b)),
        Some(pb::entry::Payload::Membership(m)) => EntryPayload::Membership(membership_from_pb(&m)),
    };
    Ok(Entry { log_id, payload })
}

/// An entry as stored in the log table.
pub fn encode_entry(e: &Entry) -> Vec<u8> {
    entry_to_pb(e).encode_to_vec()
}

pub fn decode_entry(bytes: &[u8]) -> Result<Entry> {
    entry_from_pb(pb::Entry::decode(bytes)?)
}

/// A command as carried in a proposal.
pub fn command_to_pb(cmd: Command) -> pb::proposal::Command {
    use pb::proposal::Command as P;
    match cmd {
        Command::Put(r) => P::Put(r),
        Command::DeleteRange(r) => P::DeleteRange(r),
        Command::Txn(r) => P::Txn(r),
        Command::Compact(r) => P::Compact(r),
        Command::LeaseGrant(r) => P::LeaseGrant(r),
        Command::LeaseRevoke(r) => P::LeaseRevoke(r),
        Command::Alarm(r) => P::Alarm(r),
        Command::SetStorageFormat(to) => {
            P::SetStorageFormat(pb::SetStorageFormat { to: u32::from(to) })
        }
        Command::Auth(a) => P::Auth(pb::AuthCommand { request: Some(a) }),
    }
}

/// A proposal's command; `None` for one this binary cannot apply (an auth command without
/// its request), which is skipped like a proposal without a command.
pub fn command_from_pb(cmd: pb::proposal::Command) -> Option<Command> {
    use pb::proposal::Command as P;
    Some(match cmd {
        P::Put(r) => Command::Put(r),
        P::DeleteRange(r) => Command::DeleteRange(r),
        P::Txn(r) => Command::Txn(r),
        P::Compact(r) => Command::Compact(r),
        P::LeaseGrant(r) => Command::LeaseGrant(r),
        P::LeaseRevoke(r) => Command::LeaseRevoke(r),
        P::Alarm(r) => Command::Alarm(r),
        // A format number beyond u8 is no format: 0, which no binary supports.
        P::SetStorageFormat(r) => Command::SetStorageFormat(u8::try_from(r.to).unwrap_or(0)),
        P::Auth(a) => Command::Auth(a.request?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::PutRequest;

    fn lid(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    #[test]
    fn entries_round_trip() {
        let nodes: BTreeMap<u64, MemberNode> = [
            (
                1,
                MemberNode {
                    name: "a".into(),
                    peer_urls: vec!["http://a:2380".into()],
                    client_urls: vec![],
                },
            ),
            (2, MemberNode::default()),
        ]
        .into();
        let m = Membership::new(vec![[1u64].into(), [1u64, 2].into()], nodes);
        let batch = pb::CommandBatch {
            proposals: vec![pb::Proposal {
                origin: 7,
                seq: 9,
                command: Some(command_to_pb(Command::Put(PutRequest {
                    key: "k".into(),
                    value: "v".into(),
                    ..Default::default()
                }))),
            }],
        };
        for payload in [
            EntryPayload::Blank,
            EntryPayload::Normal(Batch(batch.encode_to_vec().into())),
            EntryPayload::Membership(m),
        ] {
            let e = Entry {
                log_id: lid(3, 1, 42),
                payload,
            };
            let back = decode_entry(&encode_entry(&e)).expect("decodes");
            assert_eq!(back.log_id, e.log_id);
            assert_eq!(format!("{:?}", back.payload), format!("{:?}", e.payload));
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(decode_entry(&[0xff, 0xff, 0xff]).is_err());
        // A valid message without a log id.
        let e = pb::Entry::default().encode_to_vec();
        assert_eq!(
            decode_entry(&e).expect_err("no log id"),
            CodecError::Missing("entry log id")
        );
    }

    #[test]
    fn votes_round_trip() {
        for v in [Vote::new(3, 9), Vote::new_committed(4, 2)] {
            assert_eq!(vote_from_pb(&vote_to_pb(&v)), v);
        }
    }
}
