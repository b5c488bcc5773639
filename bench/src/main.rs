//! `metastore-bench`: the command line of the load tool (see the library doc for the layout).

use anyhow::Context;
use clap::{Parser, Subcommand};
use metastore_bench::workload::{
    lease_keepalive, put, range, range::RangeArgs, txn_mixed, txn_mixed::TxnMixedArgs, txn_put,
    txn_put::TxnPutArgs, watch, watch_latency, watch_latency::WatchLatencyArgs,
};
use metastore_bench::{runner, Common};

/// Load generator for etcd v3 endpoints (MetaStore or etcd), after etcd's `benchmark` tool.
#[derive(Debug, Parser)]
#[command(name = "metastore-bench", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Put requests on keys of the key space.
    Put,
    /// The same range request repeatedly (a single key by default).
    Range(RangeArgs),
    /// Transactions of puts.
    TxnPut(TxnPutArgs),
    /// Transactions of one read or one write, mixed at --rw-ratio.
    TxnMixed(TxnMixedArgs),
    /// Watcher creation on watch streams (one stream per client).
    Watch,
    /// Time from a put to its event at every watcher.
    WatchLatency(WatchLatencyArgs),
    /// Lease keep-alive round trips (one lease and stream per client).
    LeaseKeepalive,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = &cli.common;
    common.validate()?;
    let channels = runner::connect(common).await?;
    let bar = runner::progress(common, common.total);
    let report = match &cli.command {
        Command::Put => put::run(common, &channels, &bar).await,
        Command::Range(a) => range::run(common, a, &channels, &bar).await,
        Command::TxnPut(a) => txn_put::run(common, a, &channels, &bar).await,
        Command::TxnMixed(a) => txn_mixed::run(common, a, &channels, &bar).await,
        Command::Watch => watch::run(common, &channels, &bar).await,
        Command::WatchLatency(a) => watch_latency::run(common, a, &channels, &bar).await,
        Command::LeaseKeepalive => lease_keepalive::run(common, &channels, &bar).await,
    }?;
    if common.json {
        println!(
            "{}",
            serde_json::to_string(&report).context("encoding the report")?
        );
    } else {
        print!("{report}");
    }
    Ok(())
}
