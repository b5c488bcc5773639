//! `metastore-operator`: runs the MetaStoreCluster controller against the cluster it is
//! deployed in (or the current kubeconfig context), or prints what it would apply.
//!
//! - `metastore-operator [run]`: the controller, with leader election over a Lease and
//!   Prometheus metrics on `--metrics-addr` (`/metrics`, `/healthz`).
//! - `metastore-operator render --file cluster.yaml`: the objects the first reconcile of that
//!   cluster applies, as a YAML stream.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use metastore_operator::controller::{self, cluster_api::GrpcClusterApi};
use metastore_operator::metrics::{self, Metrics};
use metastore_operator::{leader, render::manifest};
use tracing_subscriber::EnvFilter;

/// Kubernetes operator for MetaStore clusters.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log filter (tracing-subscriber `EnvFilter` syntax).
    #[arg(
        long,
        env = "METASTORE_OPERATOR_LOG",
        default_value = "info",
        global = true
    )]
    log: String,
    #[command(flatten)]
    run: RunArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the objects the operator would apply for a MetaStoreCluster manifest.
    Render {
        /// The `MetaStoreCluster` manifest.
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Address of the metrics endpoint.
    #[arg(
        long,
        env = "METASTORE_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080",
        global = true
    )]
    metrics_addr: SocketAddr,
    /// Run only while holding the leader Lease, so several replicas can be deployed.
    #[arg(long, env = "METASTORE_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set, global = true)]
    leader_election: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default", global = true)]
    lease_namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME", global = true)]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log)?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file, a pipe or `kubectl logs` gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match args.command {
        Some(Command::Render { file }) => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let cluster = manifest::read_cluster(&text)?;
            print!(
                "{}",
                manifest::yaml_stream(&manifest::first_reconcile(&cluster)?)?
            );
            Ok(())
        }
        Some(Command::Run) | None => run_controller(args.run).await,
    }
}

async fn run_controller(args: RunArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new()?);
    let listener = metrics::bind(args.metrics_addr).await?;
    tracing::info!(addr = %args.metrics_addr, "serving metrics");
    let server = tokio::spawn(metrics::serve(listener, metrics.clone(), async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    let api: Arc<GrpcClusterApi> = Arc::new(GrpcClusterApi::default());
    if args.leader_election {
        let identity = args
            .identity
            .unwrap_or_else(|| format!("metastore-operator-{}", std::process::id()));
        let start = {
            let client = client.clone();
            move || controller::run(client.clone(), api.clone(), metrics.clone())
        };
        leader::run_while_leader(client, &args.lease_namespace, &identity, start, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    } else {
        tracing::info!("starting the MetaStoreCluster controller");
        controller::run(client, api, metrics).await;
    }
    server.abort();
    Ok(())
}
