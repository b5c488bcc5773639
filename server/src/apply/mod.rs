//! The deterministic apply step: `Command -> result`, the only way the key space changes.
//!
//! This is etcd's applier: it executes the KV requests with etcd's exact semantics on an MVCC
//! [`WriteTxn`](crate::mvcc::WriteTxn). The same function runs for the single-node server
//! today and inside the Raft state machine later (one write path, not two), so it must be
//! deterministic: its result depends only on the store and the command.
//!
//! # Layout
//! - [`validate`]: checks done before a request is proposed (etcd's `v3rpc` checks):
//!   empty keys, op counts, duplicate keys in a txn, sizes.
//! - [`range`]: Range with etcd's limit/sort/filter/keys_only rules, over any [`ReadView`].
//! - [`txn`]: compares, branch selection, nested txns.
//! - [`command`]: the [`Command`] enum and [`apply`].

pub mod command;
mod error;
pub mod range;
pub mod txn;
pub mod validate;

pub use command::{apply, Command, CommandResult};
pub use error::{ApplyError, Result};
pub use range::ReadView;

/// The apply step's view of the lessor: which leases exist, and the hooks that keep it in
/// step with applied grants and revokes.
pub trait LeaseLookup {
    fn lease_exists(&self, id: i64) -> bool;
    /// A grant of `id` with `ttl` seconds was applied.
    fn granted(&self, id: i64, ttl: i64);
    /// A revoke of `id` was applied.
    fn revoked(&self, id: i64);
}

/// A [`LeaseLookup`] for which no lease exists (tests of the KV semantics).
pub struct NoLeases;

impl LeaseLookup for NoLeases {
    fn lease_exists(&self, _id: i64) -> bool {
        false
    }
    fn granted(&self, _id: i64, _ttl: i64) {}
    fn revoked(&self, _id: i64) {}
}
