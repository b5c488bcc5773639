//! The server: configuration, the write pipeline, the gRPC services and HTTP endpoints.
//!
//! # Layout
//! - [`config`]: flags, environment, config file.
//! - [`proposer`]: the group-commit write pipeline in front of the apply step.
//! - [`node`]: what the services share (store, pipeline, identity, limits).
//! - [`kv_service`], [`maintenance_service`], [`cluster_service`]: thin tonic handlers.
//! - [`status`]: the one error → gRPC status table.
//! - [`http`], [`metrics`]: `/health`, `/version`, `/metrics`; per-RPC metrics.
//! - [`member`]: etcd-compatible member and cluster ids.
//!
//! [`start`] binds every listener and returns a [`Server`] handle, so tests run a real server
//! in process on `127.0.0.1:0` (the mini-redis pattern).

pub mod cluster_service;
pub mod config;
pub mod election_service;
pub mod gateway;
pub mod http;
pub mod kv_service;
pub mod lease_service;
pub mod lock_service;
pub mod maintenance_service;
pub mod member;
pub mod metrics;
pub mod node;
pub mod proposer;
pub mod status;
pub mod watch_service;

use std::net::SocketAddr;
use std::sync::Arc;

use metastore_proto::etcdserverpb::cluster_server::ClusterServer;
use metastore_proto::etcdserverpb::kv_server::KvServer;
use metastore_proto::etcdserverpb::lease_server::LeaseServer;
use metastore_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use metastore_proto::etcdserverpb::watch_server::WatchServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use url::Url;

use crate::mvcc::{Store, StoreOptions};
use crate::storage::data_dir::{DataDir, Stamp, LAYOUT_VERSION};
use crate::storage::{Engine, MemoryEngine, RocksEngine};
use config::{Config, EngineKind, GRPC_OVERHEAD_BYTES};
use node::{Limits, MemberInfo, Node};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error(transparent)]
    Mvcc(#[from] crate::mvcc::Error),
    #[error("cannot listen on {url}: {source}")]
    Bind {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// A running server.
///
/// The handle holds the only strong reference to the [`Node`] (services hold a [`NodeRef`](node::NodeRef)),
/// so [`shutdown`](Server::shutdown), or dropping the handle, releases the store no matter
/// how many client connections are still open.
pub struct Server {
    node: Option<Arc<Node>>,
    client_addrs: Vec<SocketAddr>,
    metrics_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    apply_thread: Option<proposer::ApplyThread>,
}

/// How long stopping waits for the write pipeline to release the store.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits for open connections to finish before cutting them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Server {
    /// The bound client addresses (the real ports when the URLs asked for port 0).
    pub fn client_addrs(&self) -> &[SocketAddr] {
        &self.client_addrs
    }

    pub fn metrics_addrs(&self) -> &[SocketAddr] {
        &self.metrics_addrs
    }

    /// The node, while the server runs.
    pub fn node(&self) -> Option<&Arc<Node>> {
        self.node.as_ref()
    }

    /// Stops accepting, lets in-flight requests finish (up to a grace period), then releases
    /// the node. The returned [`Stopped`] waits for the store to close.
    pub async fn shutdown(mut self) -> Stopped {
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}; closing them");
            self.tasks.abort_all();
        }
        self.node.take();
        Stopped {
            apply_thread: self.apply_thread.take(),
        }
    }
}

impl Drop for Server {
    /// Without a graceful [`shutdown`](Server::shutdown): stop the listeners and close the
    /// store before returning (blocking briefly), so a process never exits with the engine
    /// open.
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.tasks.abort_all();
        self.node.take();
        Stopped {
            apply_thread: self.apply_thread.take(),
        }
        .wait();
    }
}

/// A server that stopped serving; see [`Server::shutdown`].
pub struct Stopped {
    apply_thread: Option<proposer::ApplyThread>,
}

impl Stopped {
    /// Blocks until the write pipeline has ended and released the store. The last `Node`
    /// reference owns the last `Proposer`; once it is dropped, the apply thread ends and drops
    /// the store, which closes the engine.
    pub fn wait(self) {
        drop(self);
    }
}

impl Drop for Stopped {
    /// Dropping waits too (bounded), so that no caller can let the process exit with the
    /// engine still open.
    fn drop(&mut self) {
        if let Some(t) = self.apply_thread.take() {
            if !t.join_timeout(STOP_WAIT) {
                tracing::warn!(
                    "the store is still in use {STOP_WAIT:?} after shutdown; not waiting longer"
                );
            }
        }
    }
}

/// Binds `url`; returns the listener and the address it got (the real port for port 0).
async fn bind(url: &Url) -> Result<(TcpListener, SocketAddr), ServerError> {
    let err = |source| ServerError::Bind {
        url: url.to_string(),
        source,
    };
    let host = url
        .host_str()
        .ok_or_else(|| err(std::io::Error::other("URL has no host")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url
        .port_or_known_default()
        .ok_or_else(|| err(std::io::Error::other("URL has no port")))?;
    let listener = TcpListener::bind((host, port)).await.map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    Ok((listener, addr))
}

/// Opens the store and starts serving as `config` says.
pub async fn start(config: &Config) -> Result<Server, ServerError> {
    let members = config.initial_cluster_members()?;
    let token = &config.initial_cluster_token;
    let my_id = member::member_id(&config.initial_advertise_peer_urls, token);
    let ids: Vec<u64> = members
        .iter()
        .map(|(name, url)| {
            if name == &config.name {
                my_id
            } else {
                member::member_id(std::slice::from_ref(url), token)
            }
        })
        .collect();
    let mut member_id = my_id;
    let mut cluster_id = member::cluster_id(&ids);

    let engine: Arc<dyn Engine> = match config.engine {
        EngineKind::Memory => Arc::new(MemoryEngine::new()),
        EngineKind::Rocksdb => {
            let dir = DataDir::open_or_create(
                &config.data_dir(),
                Stamp {
                    layout_version: LAYOUT_VERSION,
                    storage_format: config.storage_format,
                    engine: "rocksdb".into(),
                    member_name: config.name.clone(),
                    member_id: format!("{member_id:x}"),
                    cluster_id: format!("{cluster_id:x}"),
                    created_by: format!("metastore {}", env!("CARGO_PKG_VERSION")),
                },
            )?;
            // Ids are fixed when the directory is created: a restart keeps them.
            let parse = |s: &str| u64::from_str_radix(s, 16).ok();
            member_id = parse(&dir.stamp().member_id).unwrap_or(member_id);
            cluster_id = parse(&dir.stamp().cluster_id).unwrap_or(cluster_id);
            tracing::info!(path = %dir.path().display(), format = dir.stamp().storage_format, "opening data directory");
            Arc::new(RocksEngine::open(&dir.db_path(), &Default::default())?)
        }
    };
    let store_ref = Store::open(
        engine,
        StoreOptions {
            write_format: config.storage_format,
            fsync: !config.unsafe_no_fsync,
        },
    )?;
    let store = store_ref.clone();
    if config.unsafe_no_fsync {
        tracing::warn!("--unsafe-no-fsync: acknowledged writes may be lost on a crash");
    }
    let metrics =
        Arc::new(metrics::Metrics::new().map_err(|e| ServerError::Other(format!("metrics: {e}")))?);
    let watch = crate::watch::WatchHub::start(store.clone(), config.watch_progress_notify_interval)
        .map_err(|e| ServerError::Other(format!("cannot start the watch syncer: {e}")))?;
    // etcd's minimum TTL: 1.5 election timeouts (1 s by default), rounded up to seconds.
    let lessor = Arc::new(crate::lease::Lessor::new(2));
    lessor.restore(&store.leases()?);
    let (proposer, apply_thread) =
        proposer::Proposer::start(store, lessor.clone(), metrics.clone(), watch.clone())
            .map_err(|e| ServerError::Other(format!("cannot start the apply thread: {e}")))?;
    let node = Arc::new(Node {
        store: store_ref,
        watch,
        lessor,
        lease_ids: lease_service::LeaseIds::new(member_id),
        proposer,
        member: MemberInfo {
            id: member_id,
            name: config.name.clone(),
            peer_urls: config
                .initial_advertise_peer_urls
                .iter()
                .map(member::url_string)
                .collect(),
            client_urls: config
                .advertise_client_urls
                .iter()
                .map(member::url_string)
                .collect(),
        },
        cluster_id,
        limits: Limits {
            max_request_bytes: config.max_request_bytes,
            max_txn_ops: config.max_txn_ops,
            quota_bytes: config.quota_bytes(),
        },
        metrics: metrics.clone(),
    });

    let max_msg = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let weak = node::NodeRef::new(&node);
    let routes = tonic::service::Routes::from(
        http::router(weak.clone()).merge(gateway::router(weak.clone(), node.limits)),
    )
    .add_service(
        KvServer::new(kv_service::KvService::new(weak.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        MaintenanceServer::new(maintenance_service::MaintenanceService::new(weak.clone()))
            .max_decoding_message_size(max_msg),
    )
    .add_service(
        ClusterServer::new(cluster_service::ClusterService::new(weak.clone()))
            .max_decoding_message_size(max_msg),
    )
    .add_service(
        LeaseServer::new(lease_service::LeaseService::new(weak.clone()))
            .max_decoding_message_size(max_msg),
    )
    .add_service(
        WatchServer::new(watch_service::WatchService::new(weak.clone()))
            .max_decoding_message_size(max_msg)
            .max_encoding_message_size(usize::MAX),
    )
    .add_service(
        metastore_proto::v3lockpb::lock_server::LockServer::new(lock_service::LockService::new(
            weak.clone(),
        ))
        .max_decoding_message_size(max_msg),
    )
    .add_service(
        metastore_proto::v3electionpb::election_server::ElectionServer::new(
            election_service::ElectionService::new(weak.clone()),
        )
        .max_decoding_message_size(max_msg),
    );

    let (shutdown, _) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut client_addrs = Vec::new();
    for url in &config.listen_client_urls {
        let (listener, addr) = bind(url).await?;
        client_addrs.push(addr);
        let mut rx = shutdown.subscribe();
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .tcp_nodelay(true)
            .layer(metrics::MetricsLayer(metrics.clone()))
            .add_routes(routes.clone());
        tasks.spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            // tonic ignores its `tcp_nodelay` setting for an incoming stream: set it per
            // connection, or Nagle's algorithm and delayed ACKs hold small responses ~40 ms.
            let incoming = TcpListenerStream::new(listener).map(|conn| {
                conn.and_then(|s| {
                    s.set_nodelay(true)?;
                    Ok(s)
                })
            });
            if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::error!(%addr, error = %e, "client listener failed");
            }
        });
        tracing::info!(%addr, "ready to serve client requests (gRPC and HTTP)");
    }
    let mut stop = shutdown.subscribe();
    let expiry = lease_service::expire_leases(weak.clone());
    tasks.spawn(async move {
        tokio::select! {
            _ = expiry => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
    let mut metrics_addrs = Vec::new();
    for url in &config.listen_metrics_urls {
        let (listener, addr) = bind(url).await?;
        metrics_addrs.push(addr);
        let mut rx = shutdown.subscribe();
        let app = http::router(weak.clone());
        tasks.spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(%addr, error = %e, "metrics listener failed");
            }
        });
        tracing::info!(%addr, "serving /metrics and /health");
    }
    tracing::info!(
        name = %config.name,
        member_id = %format!("{member_id:x}"),
        cluster_id = %format!("{cluster_id:x}"),
        engine = node.store.engine().name(),
        revision = node.store.current_revision(),
        "metastore started"
    );
    Ok(Server {
        node: Some(node),
        client_addrs,
        metrics_addrs,
        shutdown,
        tasks,
        apply_thread: Some(apply_thread),
    })
}
