//! The `metastore` daemon.

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use metastore::server::config::{Config, ConfigError};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    if std::env::args_os().nth(1).is_some_and(|a| a == "migrate") {
        return migrate();
    }
    if std::env::args_os().nth(1).is_some_and(|a| a == "snapshot") {
        return Ok(metastore::restore::run_cli(std::env::args_os().skip(1))?);
    }
    let config = match Config::load(std::env::args_os()) {
        Ok(c) => c,
        Err(ConfigError::Args(e)) => e.exit(),
        Err(e) => return Err(e.into()),
    };
    if let Some(max) = config.max_storage_format {
        metastore::storage::codec::limit_formats(max);
    }
    init_logging(EnvFilter::try_new(&config.log_level).context("--log-level")?);
    // Before the runtime's threads start allocating (`metastore::malloc`).
    match metastore::malloc::tune() {
        metastore::malloc::Tuning::Set { mmap, trim } => {
            tracing::debug!(mmap, trim, "glibc malloc thresholds fixed")
        }
        metastore::malloc::Tuning::LeftToEnvironment(name) => {
            tracing::info!(
                setting = name,
                "glibc malloc thresholds left to the environment"
            )
        }
        metastore::malloc::Tuning::Refused(name) => {
            tracing::warn!(setting = name, "glibc refused a malloc threshold")
        }
        metastore::malloc::Tuning::Unsupported => {}
    }
    // One worker per core, less the Raft thread's core in a one-member cluster
    // (`Config::worker_threads_for`).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = config.worker_threads_for(cores)?;
    // Without the LIFO slot, a connection's task woken by a finished handler queues behind
    // the other handlers woken by the same apply group, so their responses leave in one
    // `writev` instead of one each (0.71 -> 0.10 per put at 256 clients; docs/PERFORMANCE.md).
    // An unstable tokio API: `.cargo/config.toml` sets `tokio_unstable`.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("metastore-worker")
        .disable_lifo_slot()
        .build()
        .context("starting the runtime")?;
    tracing::info!(workers, cores, "runtime started");
    let stopped = rt.block_on(async {
        let server = metastore::server::start(&config)
            .await
            .context("starting metastore")?;
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = server.removed() => {}
        }
        tracing::info!("shutting down");
        anyhow::Ok(server.shutdown().await)
    })?;
    // Dropping the runtime's remaining tasks (connections still open) releases the last
    // references to the store; then the write pipeline ends and the engine closes cleanly.
    rt.shutdown_timeout(Duration::from_secs(5));
    stopped.wait();
    tracing::info!("stopped");
    Ok(())
}

/// Logs to stderr, with colours only on a terminal: a log file, a pipe or `kubectl logs` gets
/// plain text.
fn init_logging(filter: EnvFilter) {
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `metastore migrate ...`: the offline storage-format migration (`metastore::migrate`).
fn migrate() -> anyhow::Result<()> {
    use clap::Parser;
    let args = metastore::migrate::MigrateArgs::parse_from(std::env::args_os().skip(1));
    if let Some(max) = args.max_storage_format {
        metastore::storage::codec::limit_formats(max);
    }
    init_logging(EnvFilter::try_from_env("METASTORE_LOG_LEVEL").unwrap_or_else(|_| "info".into()));
    let report = metastore::migrate::run(&args)?;
    println!("{report}");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
