//! `metastore-operator`: runs the MetaStoreCluster controller against the cluster it is
//! deployed in (or the current kubeconfig context).

use std::sync::Arc;

use clap::Parser;
use metastore_operator::controller::{self, cluster_api::GrpcClusterApi};
use tracing_subscriber::EnvFilter;

/// Kubernetes operator for MetaStore clusters.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Log filter (tracing-subscriber `EnvFilter` syntax).
    #[arg(long, env = "METASTORE_OPERATOR_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log)?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let client = kube::Client::try_default().await?;
    tracing::info!("starting the MetaStoreCluster controller");
    controller::run(client, Arc::new(GrpcClusterApi::default())).await;
    Ok(())
}
