//! The revisioned (MVCC) key space, independent of the engine.
//!
//! # Layout
//! - [`key_codec`]: engine key layout (`enc(key) ++ !rev`, revision log).
//! - [`key_range`]: etcd's `(key, range_end)` forms as one type.
//! - [`store`]: [`Store`]: reads at a revision, the current and compacted revisions.
//! - [`pinned_read`]: [`PinnedRead`]: one snapshot at one revision, read in several passes.
//! - [`write_txn`]: [`WriteTxn`]: one write transaction = one new revision.
//! - [`compactor`]: history removal below a revision, in the background, resumable.
//! - `current`: each live key's newest version in a table beside the history
//!   (`kv_current`), so that a range at the current revision reads one entry per key.
//! - `latest`: the newest versions of recently written keys, kept by the apply step (bounded
//!   by `--apply-cache-bytes`) so that a put need not seek its key in the engine.
//!
//! Nothing here holds the history in memory (`latest` holds only recent keys' newest versions,
//! within its budget): a read at an old revision seeks straight to the
//! version it needs, a range scans only its keys, and compaction walks only the revisions it
//! removes.
//!
//! # Revisions, by example
//! A fresh store is at revision 1. `put a=1` creates revision 2 (`a`: create 2, mod 2,
//! version 1); `put a=2` creates 3 (create 2, mod 3, version 2); `del a` creates 4 and leaves a
//! tombstone; `put a=3` creates 5 (a new generation: create 5, version 1). A read at revision 3
//! sees `a=2`, at 4 sees nothing. `compact 4` drops every version of `a` below 4 and the
//! tombstone itself (nothing is live at 4); `compact 5` would keep `a=3`.

pub mod compactor;
pub(crate) mod current;
mod error;
pub mod key_codec;
pub mod key_range;
mod latest;
pub mod pinned_read;
pub mod store;
mod versions;
pub mod write_txn;

pub use error::{Error, Result};
pub use key_range::KeyRange;
pub use pinned_read::{PinnedRead, Record};
pub use store::{RangeOptions, RangeResult, Store, StoreOptions};
pub use write_txn::{WriteOutcome, WriteTxn};
