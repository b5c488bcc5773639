//! The workloads, one per file. Each exposes its flags (a `clap::Args` struct) and a `run`
//! that returns the [`Report`](crate::Report) of the measured phase.

pub mod kube;
pub mod lease_keepalive;
pub mod put;
pub mod range;
pub mod txn_mixed;
pub mod txn_put;
pub mod watch;
pub mod watch_latency;

use metastore_proto::etcdserverpb::kv_client::KvClient;

use crate::conn::Conn;
use crate::keys::Rng;

/// The client of the KV workloads that pick keys at random: a KV stub and a per-client
/// random generator seeded by the client's number (so runs are repeatable).
pub(crate) fn kv_client_with_rng(channel: Conn, id: usize) -> (KvClient<Conn>, Rng) {
    (KvClient::new(channel), Rng::seeded(id as u64))
}

/// `--consistency`: how reads are served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Consistency {
    /// Linearizable: the read goes through the leader's consensus (etcd's default).
    #[value(name = "l")]
    Linearizable,
    /// Serializable: any member answers from its local state.
    #[value(name = "s")]
    Serializable,
}

impl Consistency {
    pub fn serializable(self) -> bool {
        self == Consistency::Serializable
    }
}
