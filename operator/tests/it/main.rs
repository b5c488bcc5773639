//! The operator's integration tests, one binary.
//!
//! - `real_cluster`: the planner, the etcd API client and the controller's observe / act /
//!   status functions driving real `metastore` processes (needs the release binary).

mod real_cluster;
