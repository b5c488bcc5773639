//! MetaStore: an etcd v3 compatible metadata store.
//!
//! # Layout
//! The layers, bottom up; each depends only on the ones above it in this list.
//! - [`storage`]: the [`Engine`](storage::Engine) trait, the memory and RocksDB engines, the
//!   record codecs per format version, the data directory stamp.
//! - [`mvcc`]: revisions, reads at a revision, write transactions, compaction.
//! - [`auth`]: users, roles, permissions, tokens; the auth state and its permission checks.
//! - [`apply`]: the deterministic `Command -> result` step with etcd's request semantics.
//! - [`lease`]: the lessor (lease existence and deadlines).
//! - [`watch`]: watchers, the fan-out of published events, history replay.
//! - [`raft`]: replication with openraft: the log, the state machine over the apply step,
//!   the peer protocol, ReadIndex, forwarding to the leader.
//! - [`migrate`]: the offline storage-format migration (`metastore migrate`).
//! - [`server`]: configuration, the write pipeline (group commit), the tonic services, the
//!   error → gRPC status table, HTTP endpoints and metrics.
//! - [`restore`]: `metastore snapshot restore/status`, offline tools over snapshot files.
//! - [`malloc`]: glibc's allocator thresholds, fixed at start for the server's buffers.
//! - [`tls`]: TLS on the client and peer ports (rustls), certificates reread on change, TLS
//!   clients for `https://` peers; used by [`server`] and the peer network in [`raft`].
//!
//! `docs/ARCHITECTURE.md` walks a Put through these layers.

pub mod apply;
pub mod auth;
pub mod fuzz;
pub mod lease;
pub mod malloc;
pub mod migrate;
pub mod mvcc;
pub mod raft;
pub mod restore;
pub mod server;
pub mod storage;
pub mod tls;
pub mod watch;
mod worker;
