//! Authentication and authorization as etcd has them: users with bcrypt-hashed passwords,
//! roles, READ/WRITE/READWRITE permissions on keys and key ranges, the `root` user and role,
//! the auth switch, tokens (simple or JWT) and client-certificate common names as users.
//!
//! # Layout
//! - [`store`]: [`AuthStore`], the state (persisted in the engine's `auth` table, so Raft and
//!   backup snapshots carry it) and etcd's rules for every change, applied through Raft as
//!   `Command::Auth`.
//! - [`perms`]: range permissions merged per user, as etcd computes them.
//! - [`access`]: [`Access`], the requester of one request and its permission checks.
//! - [`token`]: the token providers (`--auth-token simple|jwt,...`).
//!
//! Where checks happen: each gRPC handler resolves its request's [`Access`] and checks it
//! before proposing or reading (see `docs/COMPATIBILITY.md` for how this differs from etcd,
//! which checks writes again while applying them).

pub mod access;
mod error;
pub mod perms;
pub mod store;
pub mod token;

pub use access::{Access, Credentials};
pub use error::{AuthError, Result};
pub use store::AuthStore;

/// The user and role that may do everything.
pub const ROOT: &str = "root";

/// etcd's default bcrypt cost (`--bcrypt-cost`).
pub const DEFAULT_BCRYPT_COST: u32 = 10;
