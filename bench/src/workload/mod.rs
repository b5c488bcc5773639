//! The workloads, one per file. Each exposes its flags (a `clap::Args` struct) and a `run`
//! that returns the [`Report`](crate::Report) of the measured phase.

pub mod lease_keepalive;
pub mod put;
pub mod range;
pub mod txn_mixed;
pub mod txn_put;
pub mod watch;
pub mod watch_latency;

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
