//! `metastore-bench`: the command line of the load tool (see the library doc for the layout).

use anyhow::Context;
use clap::{Parser, Subcommand};
use metastore_bench::shards::Shards;
use metastore_bench::workload::{
    kube, kube::KubeArgs, lease_keepalive, put, range, range::RangeArgs, txn_mixed,
    txn_mixed::TxnMixedArgs, txn_put, txn_put::TxnPutArgs, watch, watch_latency,
    watch_latency::WatchLatencyArgs,
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
    /// kube-apiserver's traffic (guarded writes, paginated lists, watches, compaction),
    /// checked against what kube-apiserver relies on; exits non-zero when an invariant breaks.
    Kube(KubeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The tool logs nothing through `tracing`. Without a dispatcher set, `tracing`'s `log`
    // feature (on in workspace builds, for other crates) makes every span of h2's hot path
    // ask the `log` crate whether it is enabled: ~100 span calls and ~8 % of the tool's
    // instructions per put (callgrind, docs/PERFORMANCE.md session 42). A no-op dispatcher
    // turns the spans off outright.
    let _ = tracing::dispatcher::set_global_default(tracing::Dispatch::none());
    keep_freed_memory();
    if let Command::Kube(_) = &cli.command {
        // `kube` runs on tonic's channels, which spread their tasks over a multi-thread
        // runtime's workers.
        let rt = match cli.common.threads {
            1 => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if n > 0 {
                    b.worker_threads(n);
                }
                b.enable_all().build()?
            }
        };
        return rt.block_on(run(cli, &Shards::none()));
    }
    // The others run their connections and requesters on threads of their own, one
    // current-thread runtime each (`shards`); this thread only starts them and collects the
    // report. With `--threads 1` everything runs on this thread.
    let threads = match cli.common.threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let shards = if threads == 1 {
        Shards::none()
    } else {
        Shards::start(threads)?
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(cli, &shards))
}

/// Keeps the memory the tool frees for its next allocations instead of handing it back to the
/// kernel. glibc's defaults give back a freed block of 128 KiB or more (more, once it has seen
/// such frees) and the top of a thread's heap above 128 KiB at once, so every large answer (a
/// 1,000-key Range is ~290 KB, read into buffers that grow to it frame by frame) was read
/// into fresh pages that the kernel had to fault in and zero: ~22 % of the tool's samples
/// and 20–40 % of its CPU per range (docs/PERFORMANCE.md, session 45). The tool is
/// short-lived and its peak is small, so nothing needs to go back early.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // Blocks up to 32 MiB (glibc's largest setting) come from the heap, and a heap keeps up
    // to 128 MiB free at its top.
    const MMAP_THRESHOLD: libc::c_int = 32 << 20;
    const TRIM_THRESHOLD: libc::c_int = 128 << 20;
    // SAFETY: `mallopt` only sets two of malloc's parameters; it is called before the runtime
    // starts any thread, and an unaccepted value is refused (returns 0) with nothing changed.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

async fn run(mut cli: Cli, shards: &Shards) -> anyhow::Result<()> {
    if let Command::Kube(_) = &cli.command {
        // One connection per endpoint at least: the kube workload moves to the next endpoint
        // when one fails.
        let endpoints = cli
            .common
            .endpoints
            .iter()
            .filter(|e| !e.trim().is_empty())
            .count();
        cli.common.conns = cli.common.conns.max(endpoints);
    }
    let common = &cli.common;
    common.validate()?;
    let bar = runner::progress(common, common.total);
    // `kube` runs on tonic channels of its own (they reconnect); the others on `Conn`s.
    let conns = || runner::connect(common, shards);
    let report = match &cli.command {
        Command::Kube(args) => {
            let channels = runner::connect_channels(common).await?;
            return kube_command(common, args, &channels, &bar).await;
        }
        Command::Put => put::run(common, &conns().await?, &bar).await,
        Command::Range(a) => range::run(common, a, &conns().await?, &bar).await,
        Command::TxnPut(a) => txn_put::run(common, a, &conns().await?, &bar).await,
        Command::TxnMixed(a) => txn_mixed::run(common, a, &conns().await?, &bar).await,
        Command::Watch => watch::run(common, &conns().await?, &bar).await,
        Command::WatchLatency(a) => watch_latency::run(common, a, &conns().await?, &bar).await,
        Command::LeaseKeepalive => lease_keepalive::run(common, &conns().await?, &bar).await,
    }?;
    print_report(common.json, &report)
}

/// `kube`: the report, then a non-zero exit naming the broken invariants if any.
async fn kube_command(
    common: &Common,
    args: &KubeArgs,
    channels: &[tonic::transport::Channel],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<()> {
    let report = kube::run(common, args, channels, bar).await?;
    print_report(common.json, &report)?;
    if !report.ok() {
        let names: Vec<String> = report.broken.iter().map(|i| i.to_string()).collect();
        anyhow::bail!(
            "invariant broken: {} ({} violations; first: {})",
            names.join(", "),
            report.violation_count,
            report
                .violations
                .first()
                .map(|v| v.to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// The report on stdout: one JSON object with `--json`, else the text.
fn print_report<R: serde::Serialize + std::fmt::Display>(
    json: bool,
    report: &R,
) -> anyhow::Result<()> {
    if json {
        println!(
            "{}",
            serde_json::to_string(report).context("encoding the report")?
        );
    } else {
        print!("{report}");
    }
    Ok(())
}
