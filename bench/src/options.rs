//! The flags every workload shares.

use crate::error::{Error, Result};

/// Connection, concurrency, load and key-shape flags, as etcd's `benchmark` names them.
#[derive(Debug, Clone, clap::Args)]
pub struct Common {
    /// gRPC endpoints, comma separated (`host:port` or `http://host:port`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    pub endpoints: Vec<String>,
    /// Number of gRPC connections (HTTP/2), spread round-robin over the endpoints.
    #[arg(long, default_value_t = 1, global = true)]
    pub conns: usize,
    /// Number of concurrent requesters, spread round-robin over the connections.
    #[arg(long, default_value_t = 1, global = true)]
    pub clients: usize,
    /// Total number of requests (for `watch-latency`: puts; for `watch`: watchers created).
    #[arg(long, default_value_t = 10_000, global = true)]
    pub total: u64,
    /// Offered load in requests per second over all clients; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0, global = true)]
    pub rate: f64,
    /// Key size in bytes (keys are zero-padded decimal indexes).
    #[arg(long, default_value_t = 8, global = true)]
    pub key_size: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 8, global = true)]
    pub val_size: usize,
    /// Number of distinct keys requests are spread over.
    #[arg(long, default_value_t = 1, global = true)]
    pub key_space_size: u64,
    /// Use keys 0, 1, 2, ... (modulo the key space) instead of uniformly random ones.
    #[arg(long, global = true)]
    pub sequential_keys: bool,
    /// Print one JSON object instead of the text report (and no progress bar).
    #[arg(long, global = true)]
    pub json: bool,
    /// Threads the tool runs its connections and requesters on (one runtime each, a
    /// connection and its requesters on one); 0 = one per core.
    #[arg(long, default_value_t = 0, global = true)]
    pub threads: usize,
}

impl Common {
    /// Checks the combinations no workload can run with.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: &str| Err(Error::Options(m.to_string()));
        if self.endpoints.iter().all(|e| e.trim().is_empty()) {
            return fail("--endpoints is empty");
        }
        if self.conns == 0 || self.clients == 0 {
            return fail("--conns and --clients must be at least 1");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return fail("--rate must be a non-negative number");
        }
        if self.key_space_size == 0 {
            return fail("--key-space-size must be at least 1");
        }
        Ok(())
    }
}
