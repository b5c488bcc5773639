//! The operator's integration tests, one binary.
//!
//! - `real_cluster`: the planner, the etcd API client and the controller's observe / act /
//!   status functions driving real `metastore` processes (needs the release binary).
//! - `tls`: the etcd API client over TLS with a client certificate, against a real `metastore`
//!   serving `https` client URLs (certificates generated with rcgen).

mod real_cluster;
mod tls;
