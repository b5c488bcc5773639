//! Integration tests: a real server (in process, or the real binary) driven through the gRPC API
//! by the `etcd-client` crate, and over plain HTTP.

mod auth;
mod auto_compaction;
mod backup;
mod cluster;
mod common;
mod election;
mod etcdctl;
mod full_disk;
mod gateway;
mod http;
mod kv;
mod lease;
mod limits;
mod lock;
mod malloc;
mod migrate;
mod online_migrate;
mod range_memory;
mod range_stream;
mod restart;
mod snapshot;
mod tls;
mod watch;
