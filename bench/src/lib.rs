//! `metastore-bench`: a load tool for any etcd v3 endpoint, MetaStore or etcd.
//!
//! It offers the workloads etcd's own `benchmark` tool is known for (`put`, `range`, `txn-put`,
//! `txn-mixed`, `watch`, `watch-latency`, `lease-keepalive`) with the same flags, plus `kube`
//! (kube-apiserver's traffic, checked against what kube-apiserver relies on), and speaks
//! gRPC through the tonic stubs of `metastore-proto`, so every request on the wire is exactly
//! the one written here (no client library retries, caches or batches in between).
//!
//! # Layout
//! - [`options`]: the flags every workload shares (`--endpoints`, `--conns`, `--clients`,
//!   `--total`, `--rate`, key and value shapes, `--json`).
//! - [`keys`]: the key generator (sequential or uniformly random over a key space) and the small
//!   PRNG behind it.
//! - [`rate`]: the open-loop schedule: request *n* is due at `start + n / rate`, and its latency
//!   is measured from that due time, so a server that falls behind shows the queueing it causes
//!   (no coordinated omission).
//! - [`conn`]: the gRPC connection the workloads use: tonic's stubs straight on an `h2`
//!   connection, without the task hops of tonic's own channel.
//! - [`frames`]: gRPC messages cut out of a response's DATA frames in place (the watch
//!   workloads' responses).
//! - [`runner`]: opens `--conns` gRPC connections and drives `--clients` concurrent requesters
//!   over them until `--total` requests are done.
//! - [`shards`]: the tool's threads, one current-thread runtime each; a connection and its
//!   requesters share one.
//! - [`workload`]: one file per workload; each builds its requests and says what it measured
//!   (`kube` is a directory: its writers, reflectors, background traffic and checker).
//! - [`report`]: latency histograms (`hdrhistogram`), percentiles, the text histogram and the
//!   `--json` object.
//! - `main.rs`: the command line.

pub mod conn;
pub mod error;
pub mod frames;
pub mod keys;
pub mod lean;
pub mod options;
pub mod rate;
pub mod report;
pub mod runner;
pub mod shards;
pub mod workload;

pub use error::{Error, Result};
pub use options::Common;
pub use report::Report;
