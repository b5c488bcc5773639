//! Storage: the engine interface, its two implementations and the on-disk record codecs.
//!
//! # Layout
//! - [`engine`]: the [`Engine`] trait (ordered byte tables, snapshots, atomic write batches).
//!   It knows nothing about RocksDB; the MVCC layer is written against it only.
//! - [`memory`]: [`MemoryEngine`], persistent ordered maps (structural sharing makes a snapshot
//!   an O(1) clone); nothing on disk.
//! - [`rocks`]: [`RocksEngine`], one RocksDB column family per [`Table`].
//! - [`codec`]: the record encodings, one per storage format version.
//! - [`disk_guard`]: refuses writes while the data directory's disk is (nearly) full.
//! - [`data_dir`]: the data directory's stamp (format, ids), checked before anything is opened.
//! - [`snapshot`]: the backup snapshot file (Maintenance.Snapshot, `metastore snapshot restore`).
//!
//! Every engine passes the same conformance suite (`conformance` in the tests below).

pub mod codec;
pub mod data_dir;
pub mod disk_guard;
pub mod engine;
mod error;
pub mod memory;
pub mod rocks;
pub mod snapshot;

pub use engine::{Engine, EngineIter, Snapshot, Table, WriteBatch};
pub use error::{Error, Result};
pub use memory::MemoryEngine;
#[cfg(test)]
pub(crate) use memory::{EngineHook, HookedEngine};
pub use rocks::RocksEngine;

#[cfg(test)]
mod conformance;
