//! Replication: openraft over the existing apply step.
//!
//! Every state change is a [`Command`](crate::apply::Command); the [`proposer`](crate::server::proposer)
//! packs concurrent commands into one Raft entry (a [`Batch`], an encoded
//! `raftpb.CommandBatch`), openraft replicates and commits it, and the
//! [`StateMachine`](state_machine::StateMachine) applies it on every member with
//! [`apply::apply`](crate::apply::apply), the same function a single node always used. A single
//! member is a cluster of one: there is one write path.
//!
//! # Layout
//! - [`codec`]: openraft's types ⇄ `raftpb` protobuf (the log on disk and the peer messages).
//! - [`log_store`]: the durable log and vote; [`wal`]: the log's own segment files, where the
//!   entries are kept on RocksDB (the memory engine keeps them in its `RaftLog` table), with
//!   group fsync.
//! - [`state_machine`]: applying entries, snapshots for lagging followers;
//!   [`snapshot_data`]: what a snapshot is sent from and received into.
//! - [`network`]: the peer client (tonic), [`peer_service`]: the peer server.
//! - [`read_index`]: batched ReadIndex for linearizable reads on any member.
//! - [`waiters`]: results travelling from the apply step back to the waiting client.

// openraft's trait methods return its own (large) `StorageError` and `RPCError`; helpers that
// feed them return the same types rather than converting back and forth.
#![allow(clippy::result_large_err)]

pub mod codec;
pub mod kept_log;
pub mod log_store;
pub mod network;
pub mod peer_service;
pub mod read_index;
pub mod replica;
pub mod snapshot_data;
pub mod state_machine;
pub mod thread;
pub mod waiters;
pub mod wal;

use std::fmt;

use bytes::Bytes;

/// A member id: etcd's member id.
pub type NodeId = u64;

/// A member as the membership records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberNode {
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_urls.join(","))
    }
}

/// The data of a normal entry: an encoded `raftpb.CommandBatch`, kept encoded from proposal
/// to apply (it is written to the log and sent to peers as is).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Batch(pub Bytes);

impl fmt::Debug for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Batch({} bytes)", self.0.len())
    }
}

impl fmt::Display for Batch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

openraft::declare_raft_types!(
    /// MetaStore's openraft configuration.
    pub TypeConfig:
        D = Batch,
        R = (),
        NodeId = NodeId,
        Node = MemberNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = snapshot_data::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type Membership = openraft::Membership<NodeId, MemberNode>;
pub type StoredMembership = openraft::StoredMembership<NodeId, MemberNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, MemberNode>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Bits of the apply position (see [`state_machine`]) that number commands within an entry.
pub const POSITION_BITS: u32 = 20;
/// Most commands in one entry.
pub const MAX_BATCH: usize = (1 << POSITION_BITS) - 2;

/// The apply position of command `i` of the entry at `index`: what the store records as its
/// applied index, so that an entry interrupted half-way is resumed after its last command.
pub fn command_position(index: u64, i: usize) -> u64 {
    (index << POSITION_BITS) | (i as u64 + 1)
}

/// The apply position recorded once the whole entry at `index` is applied.
pub fn entry_done_position(index: u64) -> u64 {
    (index << POSITION_BITS) | ((1 << POSITION_BITS) - 1)
}

/// The Raft index an apply position belongs to.
pub fn position_index(position: u64) -> u64 {
    position >> POSITION_BITS
}
