//! Watch: delivering the key space's change events to many watchers.
//!
//! # Layout
//! - [`hub`]: [`WatchHub`], the registry of streams and watchers, the fan-out of every
//!   published group of revisions, and the syncer thread that replays history.
//! - [`events`]: the events a delivery carries, shared by all the watchers that get them and
//!   encoded for the wire once.
//!
//! # How events flow
//! Every watcher is either *synced* (it has received every event up to the hub's notified
//! revision) or *unsynced*. When the apply pipeline publishes a group of revisions, the hub
//! hands the matching events to each synced watcher's stream with a non-blocking send. A
//! stream whose buffer is full never blocks the writer: its watcher simply becomes unsynced at
//! the first revision it missed. The syncer thread replays history for unsynced watchers from
//! the store's revision log — one read shared by all of them — and moves each back to synced
//! once it has caught up, under the same lock the fan-out takes, so no event is lost or
//! delivered twice. New watchers start unsynced unless they start in the future.
//!
//! Memory per stream is bounded by its buffer (messages) and each message by the replay batch
//! size; a slow reader costs history reads later, not memory now.

pub mod events;
pub mod hub;

pub use events::Events;
pub use hub::{Delivery, StreamId, WatchError, WatchHub, WatchId, WatchSpec};
