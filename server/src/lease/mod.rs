//! Leases: TTLs that delete their keys when they run out.
//!
//! # Layout
//! - [`lessor`]: [`Lessor`], which leases exist (replicated state, changed only by the apply
//!   step) and when each expires (local state, kept in a deadline heap).
//!
//! Which leases exist and which keys they hold is part of the key space's durable state (the
//! `lease` table, written in the same batch as the keys). Deadlines are not: after a restart
//! every lease gets its full TTL again, as etcd does when a member becomes leader, so a lease
//! never expires early because the server was down. Expiry is decided here and carried out as
//! an ordinary `LeaseRevoke` command through the write pipeline, so with replication every
//! member deletes the keys at the same revision.

pub mod lessor;

pub use lessor::{Lessor, MAX_LEASE_TTL};
