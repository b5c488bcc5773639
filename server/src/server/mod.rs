//! The server: configuration, the write pipeline, the gRPC services and HTTP endpoints.
//!
//! # Layout
//! - [`config`]: flags, environment, config file.
//! - [`proposer`]: the group-commit write pipeline in front of Raft and the apply step.
//! - [`node`]: what the services share (store, pipeline, identity, limits).
//! - [`kv_service`], [`maintenance_service`], [`cluster_service`]: thin tonic handlers;
//!   [`migration_service`]: MetaStore's own online storage-format switch.
//! - [`range_stream`], [`range_body`], [`range_budget`]: Range results produced and sent
//!   incrementally (`RangeStream`, and unary Ranges over a key range) within the
//!   `--max-range-memory-bytes` budget.
//! - [`status`]: the one error → gRPC status table.
//! - [`http`], [`metrics`]: `/health`, `/version`, `/metrics`; per-RPC metrics.
//! - [`member`]: etcd-compatible member and cluster ids.
//! - [`tls_setup`]: the TLS configurations of the listeners and peer clients (see
//!   [`crate::tls`]).
//!
//! [`start`] binds every listener and returns a [`Server`] handle, so tests run a real server
//! in process on `127.0.0.1:0` (the mini-redis pattern).

pub mod auth_service;
pub mod auto_compaction;
pub mod cluster_service;
pub mod coalesce;
pub mod config;
pub mod election_service;
pub mod gateway;
pub mod h2_authority;
pub mod http;
pub mod kv_route;
pub mod kv_service;
pub mod lease_service;
pub mod lock_service;
pub mod maintenance_service;
pub mod member;
pub mod metrics;
pub mod migration_service;
pub mod node;
pub mod proposer;
pub mod range_body;
pub mod range_budget;
pub mod range_stream;
pub mod request_limit;
pub mod status;
pub mod tls_setup;
pub mod watch_service;

use std::net::SocketAddr;
use std::sync::Arc;

use metastore_proto::etcdserverpb::cluster_server::ClusterServer;
use metastore_proto::etcdserverpb::kv_server::KvServer;
use metastore_proto::etcdserverpb::lease_server::LeaseServer;
use metastore_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use url::Url;

use std::collections::BTreeMap;

use crate::mvcc::{Store, StoreOptions};
use crate::raft::MemberNode;
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
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
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
    raft: Option<crate::raft::Raft>,
    /// Where Raft runs in a cluster that started with one member; dropped once Raft stopped.
    raft_thread: Option<crate::raft::thread::RaftThread>,
    /// The engine, to wait for it to close on shutdown.
    engine: std::sync::Weak<dyn Engine>,
    client_addrs: Vec<SocketAddr>,
    peer_addrs: Vec<SocketAddr>,
    metrics_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// Snapshot files of the memory engine.
    _temp_dir: Option<tempfile::TempDir>,
}

/// How long stopping waits for Raft and the store to close.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long shutdown waits for open connections to finish before cutting them.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Server {
    /// The bound client addresses (the real ports when the URLs asked for port 0).
    pub fn client_addrs(&self) -> &[SocketAddr] {
        &self.client_addrs
    }

    /// The bound peer addresses.
    pub fn peer_addrs(&self) -> &[SocketAddr] {
        &self.peer_addrs
    }

    pub fn metrics_addrs(&self) -> &[SocketAddr] {
        &self.metrics_addrs
    }

    /// The node, while the server runs.
    pub fn node(&self) -> Option<&Arc<Node>> {
        self.node.as_ref()
    }

    /// Whether Raft runs on a thread of its own ([`RaftThread`]): in a cluster that started
    /// with one member.
    ///
    /// [`RaftThread`]: crate::raft::thread::RaftThread
    pub fn raft_on_own_thread(&self) -> bool {
        self.raft_thread.is_some()
    }

    /// Whether that thread spins when it runs out of work (`--raft-idle-spin-us`, and this
    /// member alone in the membership); `None` without the thread.
    pub fn raft_idle_spin(&self) -> Option<bool> {
        self.raft_thread.as_ref().map(|t| t.spin_switch().is_on())
    }

    /// Resolves once this member has been removed from the cluster (`member remove`); the
    /// daemon then exits, as etcd does.
    pub fn removed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let raft = self.raft.clone();
        let me = self.node.as_ref().map(|n| n.member.id);
        async move {
            let (Some(raft), Some(me)) = (raft, me) else {
                return std::future::pending().await;
            };
            // Server metrics change with the vote, the role, the leader or the membership
            // only; the full metrics change with every log entry, and this future runs on
            // the main thread: it was woken twice per write (docs/PERFORMANCE.md).
            let mut rx = raft.server_metrics();
            let mut member = false;
            loop {
                {
                    let m = rx.borrow_and_update();
                    let present = m.membership_config.membership().get_node(&me).is_some();
                    if present {
                        member = true;
                    } else if member {
                        tracing::warn!("this member has been permanently removed from the cluster");
                        return;
                    }
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }

    /// Stops accepting, lets in-flight requests finish (up to a grace period), stops Raft,
    /// then releases the node. The returned [`Stopped`] waits for the store to close.
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
        if let Some(raft) = self.raft.take() {
            if tokio::time::timeout(STOP_WAIT, raft.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("raft did not stop within {STOP_WAIT:?}");
            }
        }
        self.node.take();
        self.raft_thread.take();
        Stopped {
            engine: std::mem::replace(&mut self.engine, std::sync::Weak::<MemoryEngine>::new()),
        }
    }
}

impl Drop for Server {
    /// Without a graceful [`shutdown`](Server::shutdown): stop the listeners and Raft and
    /// wait (bounded) for the engine to close, so a process never exits with it open. On a
    /// current-thread runtime a drop cannot wait for tasks of the runtime it blocks: Raft is
    /// then only told to stop.
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.tasks.abort_all();
        let raft = self.raft.take();
        self.node.take();
        let raft_thread = self.raft_thread.take();
        let engine = std::mem::replace(&mut self.engine, std::sync::Weak::<MemoryEngine>::new());
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                if let Some(raft) = raft {
                    tokio::task::block_in_place(|| {
                        h.block_on(async {
                            let _ = tokio::time::timeout(STOP_WAIT, raft.shutdown()).await;
                        })
                    });
                }
                drop(raft_thread);
                tokio::task::block_in_place(|| Stopped { engine }.wait());
            }
            Ok(h) => {
                if let Some(raft) = raft {
                    h.spawn(async move {
                        let _ = raft.shutdown().await;
                        drop(raft_thread);
                    });
                }
            }
            Err(_) => {
                drop(raft_thread);
                Stopped { engine }.wait()
            }
        }
    }
}

/// A server that stopped serving; see [`Server::shutdown`].
pub struct Stopped {
    engine: std::sync::Weak<dyn Engine>,
}

impl Stopped {
    /// Blocks until the store and the Raft log have released the engine (bounded).
    pub fn wait(self) {
        drop(self);
    }
}

impl Drop for Stopped {
    /// Dropping waits too (bounded), so that no caller can let the process exit with the
    /// engine still open.
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + STOP_WAIT;
        while self.engine.strong_count() > 0 {
            if std::time::Instant::now() > deadline {
                tracing::warn!(
                    "the store is still in use {STOP_WAIT:?} after shutdown; not waiting longer"
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
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

/// This member's identity: from the flags for a new cluster, from the cluster itself when
/// joining one, from the data directory's stamp on a restart.
struct Identity {
    member_id: u64,
    cluster_id: u64,
    /// The members of `--initial-cluster` (bootstrapping a new cluster only).
    initial: BTreeMap<u64, MemberNode>,
}

fn initial_identity(config: &Config) -> Result<Identity, ServerError> {
    let token = &config.initial_cluster_token;
    let mut by_name: BTreeMap<String, Vec<Url>> = BTreeMap::new();
    for (name, url) in config.initial_cluster_members()? {
        by_name.entry(name).or_default().push(url);
    }
    let mut initial = BTreeMap::new();
    let mut member_id = member::member_id(&config.initial_advertise_peer_urls, token);
    for (name, urls) in &by_name {
        let id = member::member_id(urls, token);
        let mine = name == &config.name;
        if mine {
            member_id = id;
        }
        initial.insert(
            id,
            MemberNode {
                name: name.clone(),
                peer_urls: urls.iter().map(member::url_string).collect(),
                // Every founding member must initialize Raft with the very same membership:
                // client URLs are published by each member once it runs.
                client_urls: Vec::new(),
            },
        );
    }
    let ids: Vec<u64> = initial.keys().copied().collect();
    Ok(Identity {
        member_id,
        cluster_id: member::cluster_id(&ids),
        initial,
    })
}

/// Joining an existing cluster (`--initial-cluster-state existing`): asks the other members
/// of `--initial-cluster` for the membership and finds this member (added beforehand with
/// `member add`) by its peer URLs, as etcd does.
async fn discover(
    config: &Config,
    id: &mut Identity,
    peer_tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<(), ServerError> {
    let mine: Vec<String> = config
        .initial_advertise_peer_urls
        .iter()
        .map(member::url_string)
        .collect();
    let peers = crate::raft::network::Peers::new(crate::raft::network::CONNECT_TIMEOUT, peer_tls);
    let deadline = std::time::Instant::now() + JOIN_TIMEOUT;
    let mut last_error = "no member of --initial-cluster answered".to_string();
    loop {
        for node in id.initial.values() {
            if node.peer_urls.iter().any(|u| mine.contains(u)) {
                continue;
            }
            for url in &node.peer_urls {
                let Ok(mut c) = peers.get_url(url) else {
                    continue;
                };
                let Ok(r) = c.cluster(metastore_proto::raftpb::ClusterRequest {}).await else {
                    continue;
                };
                let r = r.into_inner();
                let membership = r.membership.unwrap_or_default();
                let found = membership
                    .nodes
                    .iter()
                    .find(|(_, n)| n.peer_urls.iter().any(|u| mine.contains(u)));
                match found {
                    // It ran before (it published its client URLs), and this data directory
                    // is empty: joining again under its id with no log and no vote could
                    // break Raft's one-vote-per-term rule. etcd refuses the same way; the
                    // member must be removed and added again.
                    Some((member_id, n)) if !n.client_urls.is_empty() => {
                        return Err(ServerError::Other(format!(
                            "member {member_id:x} has already been bootstrapped \
                             (its data directory is empty: remove the member and add it \
                             again, etcdctl member remove {member_id:x} && etcdctl member add)"
                        )));
                    }
                    Some((member_id, _)) => {
                        id.member_id = *member_id;
                        id.cluster_id = r.cluster_id;
                        return Ok(());
                    }
                    // This member may not have applied the `member add` yet: ask again.
                    None => {
                        last_error = format!(
                            "the cluster at {url} has no member with peer URLs {mine:?}: \
                         add it first (etcdctl member add {} --peer-urls={})",
                            config.name,
                            mine.join(",")
                        )
                    }
                }
            }
        }
        if std::time::Instant::now() > deadline {
            return Err(ServerError::Other(format!(
                "--initial-cluster-state existing: {last_error}"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Triggers a Raft snapshot whenever `--snapshot-count` commands have been applied since the
/// last one ([`Context::snapshot_every`](crate::raft::state_machine::Context::snapshot_every)),
/// until the server stops.
async fn trigger_snapshots(
    due: Arc<crate::raft::state_machine::SnapshotDue>,
    raft: crate::raft::Raft,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = due.wait() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        // One at a time: openraft ignores a trigger while it builds one.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// How many of the newest commands the Raft log keeps after a snapshot, for slow followers
/// to catch up from (etcd's `--snapshot-catchup-entries`, 5,000 requests), or
/// `--snapshot-count` when that is smaller.
const KEPT_COMMANDS: u64 = 5000;

/// After each snapshot, purges the Raft log up to where its newest [`KEPT_COMMANDS`]
/// commands begin ([`crate::raft::kept_log`]). openraft keeps as many *entries*
/// (`max_in_snapshot_log_to_keep`), each up to 1,024 commands, so under load it would keep up
/// to a thousand times more; its count stays the bound on what is kept. openraft does not
/// purge what a follower's replication still reads.
async fn purge_kept_log(
    hint: Arc<crate::raft::kept_log::PurgeHint>,
    raft: crate::raft::Raft,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let upto = tokio::select! {
            upto = hint.next() => upto,
            _ = stop.wait_for(|s| *s) => return,
        };
        // The snapshot is recorded before openraft takes it in, and openraft purges only
        // what a snapshot holds.
        let wait = raft.wait(Some(std::time::Duration::from_secs(10)));
        let taken_in = wait.metrics(
            |m| m.snapshot.is_some_and(|s| s.index >= upto),
            "the snapshot to purge up to",
        );
        let taken_in = tokio::select! {
            r = taken_in => r.is_ok(),
            _ = stop.wait_for(|s| *s) => return,
        };
        let purged = raft.metrics().borrow().purged.map(|p| p.index);
        if taken_in
            && purged.is_none_or(|p| p < upto)
            && raft.trigger().purge_log(upto).await.is_err()
        {
            return;
        }
    }
}

/// Opens the Raft log where `--raft-log-store` says (in memory with the memory engine),
/// stamping the data directory with the layout it is left in: the newer layout before the log
/// moves into segments of its own, the older one only after it has moved back into RocksDB,
/// so that a binary that knows no segment log never opens a directory whose log is in them.
fn open_log_store(
    config: &Config,
    dir: Option<DataDir>,
    engine: Arc<dyn Engine>,
    fsync: bool,
) -> Result<crate::raft::log_store::LogStore, ServerError> {
    use crate::raft::log_store::{LogStore, Placement};
    let raft_err = |e: crate::raft::StorageError| ServerError::Other(format!("raft storage: {e}"));
    let Some(mut dir) = dir else {
        return LogStore::open(engine, fsync).map_err(raft_err);
    };
    use crate::storage::data_dir::layout_for;
    match config.raft_log_store {
        config::RaftLogStore::Wal => {
            dir.set_layout_version(layout_for(config.kv_current_table, true))?;
            let placement = Placement::Wal {
                dir: dir.wal_path(),
                segment_bytes: config.raft_log_segment_bytes,
                direct_io: config.raft_log_direct_io,
            };
            LogStore::open_at(engine, fsync, placement).map_err(raft_err)
        }
        config::RaftLogStore::Engine => {
            let placement = Placement::Engine {
                wal_dir: Some(dir.wal_path()),
            };
            let store = LogStore::open_at(engine, fsync, placement).map_err(raft_err)?;
            dir.set_layout_version(layout_for(config.kv_current_table, false))?;
            Ok(store)
        }
    }
}

/// How long a joining member looks for the cluster.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens the store and starts serving as `config` says.
pub async fn start(config: &Config) -> Result<Server, ServerError> {
    let mut id = initial_identity(config)?;
    let tls = tls_setup::TlsSetup::new(config)?;
    let data_dir = config.data_dir();
    let fresh = config.engine == EngineKind::Memory || !data_dir.join("metastore.json").exists();
    if fresh && config.initial_cluster_state == config::ClusterState::Existing {
        discover(config, &mut id, tls.peer_client.clone()).await?;
    }
    let mut member_id = id.member_id;
    let mut cluster_id = id.cluster_id;

    let mut temp_dir = None;
    let mut opened_dir = None;
    let (engine, snap_dir): (Arc<dyn Engine>, std::path::PathBuf) = match config.engine {
        EngineKind::Memory => {
            let t = tempfile::Builder::new()
                .prefix("metastore-snap")
                .tempdir()
                .map_err(|e| ServerError::Other(format!("snapshot directory: {e}")))?;
            let p = t.path().to_path_buf();
            temp_dir = Some(t);
            (Arc::new(MemoryEngine::new()), p)
        }
        EngineKind::Rocksdb => {
            let mut dir = DataDir::open_or_create(
                &data_dir,
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
            // A binary that cannot open the `kv_current` table must never find it: the stamp
            // says so before the table is made, and is lowered (`open_log_store`) only after
            // a start without it has dropped it.
            if config.kv_current_table {
                dir.set_layout_version(LAYOUT_VERSION)?;
            }
            let rocks_opts = crate::storage::rocks::RocksOptions {
                current_table: Some(config.kv_current_table),
                ..Default::default()
            };
            let opened: (Arc<dyn Engine>, std::path::PathBuf) = (
                Arc::new(RocksEngine::open(&dir.db_path(), &rocks_opts)?),
                dir.path().join("snap"),
            );
            opened_dir = Some(dir);
            opened
        }
    };
    let raft_err = |e: crate::raft::StorageError| ServerError::Other(format!("raft storage: {e}"));
    crate::raft::state_machine::recover_install(engine.as_ref(), &snap_dir).map_err(raft_err)?;
    let fsync = !config.unsafe_no_fsync;
    // The Raft log is fsynced and the store's writes are replayed from it after a crash (see
    // raft::state_machine), so the store itself does not sync.
    let store = Store::open(
        engine.clone(),
        StoreOptions {
            write_format: config.storage_format,
            fsync: false,
            latest_cache_bytes: usize::try_from(config.apply_cache_bytes).unwrap_or(usize::MAX),
        },
    )?;
    if config.unsafe_no_fsync {
        tracing::warn!("--unsafe-no-fsync: acknowledged writes may be lost on a crash");
    }
    let metrics =
        Arc::new(metrics::Metrics::new().map_err(|e| ServerError::Other(format!("metrics: {e}")))?);
    metrics
        .worker_threads
        .set(i64::try_from(tokio::runtime::Handle::current().metrics().num_workers()).unwrap_or(0));
    let watch = crate::watch::WatchHub::start(
        store.clone(),
        config.watch_progress_notify_interval,
        config.max_watchers_per_stream,
    )
    .map_err(|e| ServerError::Other(format!("cannot start the watch syncer: {e}")))?;
    // etcd's minimum TTL: 1.5 election timeouts, rounded up to seconds.
    let min_ttl = (config.election_timeout * 3 / 2).div_ceil(1000).max(1) as i64;
    let lessor = Arc::new(crate::lease::Lessor::new(min_ttl));
    lessor.restore(&store.leases()?);
    let waiters = Arc::new(crate::raft::waiters::Waiters::new());
    let reencoder = crate::migrate::online::Reencoder::start(
        engine.clone(),
        store.background_lock().clone(),
        crate::migrate::online::ReencoderOptions {
            rate: config.storage_migration_rate,
            data_dir: (config.engine == EngineKind::Rocksdb).then(|| data_dir.clone()),
            ..Default::default()
        },
    )
    .map_err(|e| ServerError::Other(format!("storage format re-encoder: {e}")))?;
    let auth = Arc::new(crate::auth::AuthStore::open(
        engine.clone(),
        crate::auth::token::from_flag(
            &config.auth_token,
            std::time::Duration::from_secs(config.auth_token_ttl),
        )?,
        config.client_cert_auth,
        config.bcrypt_cost,
    )?);
    let ctx = crate::raft::state_machine::Context::new(
        store.clone(),
        lessor.clone(),
        watch.clone(),
        waiters.clone(),
        member_id,
        snap_dir,
        metrics.clone(),
        reencoder.clone(),
        auth.clone(),
    )
    .map_err(raft_err)?;
    let applied = ctx.applied.subscribe();
    let log_store = open_log_store(config, opened_dir, engine.clone(), fsync)?;
    let fsync_metric = metrics.wal_fsync.clone();
    log_store.on_sync(Arc::new(move |took| {
        fsync_metric.observe(took.as_secs_f64())
    }));
    let timing = crate::raft::replica::Timing {
        heartbeat: std::time::Duration::from_millis(config.heartbeat_interval),
        election: std::time::Duration::from_millis(config.election_timeout),
    };
    let raft_config = openraft::Config {
        cluster_name: config.initial_cluster_token.clone(),
        heartbeat_interval: config.heartbeat_interval,
        election_timeout_min: config.election_timeout,
        // openraft's leader lease (how long followers refuse votes after the last
        // heartbeat) is the maximum: 1.5x keeps failover after a partition short.
        election_timeout_max: timing.leader_lease().as_millis() as u64,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(config.snapshot_count),
        // etcd keeps 5000 entries after a snapshot for slow followers to catch up from.
        max_in_snapshot_log_to_keep: config.snapshot_count.min(5000),
        install_snapshot_timeout: (config.election_timeout * 10).max(2000),
        ..Default::default()
    }
    .validate()
    .map_err(|e| ServerError::Other(format!("raft configuration: {e}")))?;
    let mut peers = crate::raft::network::Peers::new(
        timing.election.clamp(
            std::time::Duration::from_millis(200),
            crate::raft::network::CONNECT_TIMEOUT,
        ),
        tls.peer_client.clone(),
    );
    // A cluster that starts with one member runs Raft on a thread of its own (raft::thread);
    // `Config::worker_threads_for` left a core to it when it built the runtime.
    let raft_thread = if config.starts_alone()? {
        peers = peers.spawning_on(tokio::runtime::Handle::current());
        Some(
            crate::raft::thread::RaftThread::start(std::time::Duration::from_micros(
                config.raft_idle_spin_us,
            ))
            .map_err(|e| ServerError::Other(format!("cannot start the raft thread: {e}")))?,
        )
    } else {
        None
    };
    let new_raft = crate::raft::Raft::new(
        member_id,
        Arc::new(raft_config),
        crate::raft::network::Network {
            peers: peers.clone(),
        },
        log_store,
        crate::raft::state_machine::StateMachine::new(ctx.clone()),
    );
    let raft = match &raft_thread {
        // openraft spawns its core, state-machine worker and replication tasks where it
        // is created.
        Some(thread) => thread
            .run(new_raft)
            .await
            .map_err(|e| ServerError::Other(format!("cannot start raft: {e}")))?,
        None => new_raft.await,
    }
    .map_err(|e| ServerError::Other(format!("cannot start raft: {e}")))?;
    ctx.snapshot_every(config.snapshot_count);
    ctx.keep_commands(config.snapshot_count.min(KEPT_COMMANDS))
        .map_err(|e| ServerError::Other(format!("raft: {e}")))?;
    let snapshot_due = ctx.snapshot_due_signal();
    let purge_hint = ctx.purge_hint();
    drop(ctx);
    let replica =
        crate::raft::replica::Replica::new(raft.clone(), peers, member_id, timing, applied);
    let disk = match config.engine {
        EngineKind::Rocksdb if config.disk_free_reserve_bytes > 0 => {
            crate::storage::disk_guard::DiskGuard::new(
                Box::new(crate::storage::disk_guard::FileSystem(config.data_dir())),
                config.disk_free_reserve_bytes,
            )
        }
        _ => crate::storage::disk_guard::DiskGuard::disabled(),
    };
    let proposer = proposer::Proposer::start(
        replica.clone(),
        waiters,
        disk,
        raft_thread.as_ref(),
        proposer::AnswerSpinSettings {
            max: std::time::Duration::from_micros(config.write_answer_spin_us),
            outcomes: metrics.write_answer_spins.clone(),
        },
    );
    let node = Arc::new(Node {
        store,
        watch,
        lessor,
        lease_ids: lease_service::LeaseIds::new(member_id),
        proposer,
        replica,
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
        range_budget: range_budget::RangeBudget::new(config.max_range_memory_bytes),
        reencoder,
        supported_storage_formats: config.supported_storage_formats(),
        auth,
    });

    let max_msg = config.max_request_bytes + GRPC_OVERHEAD_BYTES;
    let weak = node::NodeRef::new(&node);
    let kv = KvServer::new(kv_service::KvService::new(weak.clone()))
        .max_decoding_message_size(max_msg)
        .max_encoding_message_size(usize::MAX);
    let routes = tonic::service::Routes::from(
        http::router(weak.clone()).merge(gateway::router(weak.clone(), node.limits)),
    )
    .add_service(kv.clone())
    .add_service(
        MaintenanceServer::new(maintenance_service::MaintenanceService::new(weak.clone()))
            .max_decoding_message_size(max_msg),
    )
    .add_service(
        ClusterServer::new(cluster_service::ClusterService::new(weak.clone()))
            .max_decoding_message_size(max_msg),
    )
    .add_service(
        metastore_proto::metastorepb::migration_server::MigrationServer::new(
            migration_service::MigrationService::new(weak.clone()),
        )
        .max_decoding_message_size(max_msg),
    )
    .add_service(
        metastore_proto::etcdserverpb::auth_server::AuthServer::new(
            auth_service::AuthService::new(weak.clone()),
        )
        .max_decoding_message_size(max_msg),
    )
    .add_service(
        LeaseServer::new(lease_service::LeaseService::new(weak.clone()))
            .max_decoding_message_size(max_msg),
    )
    .add_service(watch_service::WatchService::new(weak.clone(), max_msg))
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
    let request_limit = request_limit::RequestLimitLayer::new(config.max_concurrent_requests);
    for url in &config.listen_client_urls {
        let (listener, addr) = bind(url).await?;
        client_addrs.push(addr);
        let mut rx = shutdown.subscribe();
        let server = tonic::transport::Server::builder()
            .accept_http1(true)
            .tcp_nodelay(true)
            .max_concurrent_streams(config.max_concurrent_streams)
            .layer(metrics::MetricsLayer(metrics.clone()))
            .layer(request_limit.clone())
            .layer(range_body::RangeBodyLayer::new(weak.clone(), max_msg))
            .layer(kv_route::KvRouteLayer::new(kv.clone()))
            .add_routes(routes.clone());
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // etcdctl 3.4 sends `:authority: http://host:port`, which hyper refuses: fix it (inside
        // TLS on an https URL).
        match (url.scheme(), &tls.client) {
            ("https", Some(tls)) => {
                let incoming = crate::tls::incoming(listener, tls.clone())
                    .map(|conn| conn.map(h2_authority::H2AuthorityStream::new));
                tasks.spawn(async move {
                    if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                        tracing::error!(%addr, error = %e, "client listener failed");
                    }
                });
                tracing::info!(%addr, "ready to serve client requests over TLS (gRPC and HTTP)");
            }
            ("https", None) => {
                return Err(ServerError::Other(format!(
                    "{url}: no client TLS configuration (--cert-file, --key-file)"
                )))
            }
            _ => {
                // tonic ignores its `tcp_nodelay` setting for an incoming stream: set it per
                // connection, or Nagle's algorithm and delayed ACKs hold small responses ~40 ms.
                let incoming = TcpListenerStream::new(listener).map(|conn| {
                    conn.and_then(|s| {
                        s.set_nodelay(true)?;
                        Ok(h2_authority::H2AuthorityStream::new(s))
                    })
                });
                tasks.spawn(async move {
                    if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                        tracing::error!(%addr, error = %e, "client listener failed");
                    }
                });
                tracing::info!(%addr, "ready to serve client requests (gRPC and HTTP)");
            }
        }
    }
    let mut peer_addrs = Vec::new();
    let peer_routes = tonic::service::Routes::new(
        metastore_proto::raftpb::raft_server::RaftServer::new(
            crate::raft::peer_service::PeerService::new(weak.clone()),
        )
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX),
    );
    for url in &config.listen_peer_urls {
        let (listener, addr) = bind(url).await?;
        peer_addrs.push(addr);
        let mut rx = shutdown.subscribe();
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_routes(peer_routes.clone());
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        match (url.scheme(), &tls.peer) {
            ("https", Some(tls)) => {
                let incoming = crate::tls::incoming(listener, tls.clone());
                tasks.spawn(async move {
                    if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                        tracing::error!(%addr, error = %e, "peer listener failed");
                    }
                });
                tracing::info!(%addr, "ready to serve peer traffic over TLS");
            }
            ("https", None) => {
                return Err(ServerError::Other(format!(
                    "{url}: no peer TLS configuration (--peer-cert-file, --peer-key-file)"
                )))
            }
            _ => {
                let incoming = TcpListenerStream::new(listener).map(|conn| {
                    conn.and_then(|s| {
                        s.set_nodelay(true)?;
                        Ok(s)
                    })
                });
                tasks.spawn(async move {
                    if let Err(e) = server.serve_with_incoming_shutdown(incoming, stop).await {
                        tracing::error!(%addr, error = %e, "peer listener failed");
                    }
                });
                tracing::info!(%addr, "ready to serve peer traffic");
            }
        }
    }
    bootstrap(&raft, config, &id, member_id, fresh).await?;
    tasks.spawn(count_leader_changes(
        raft.clone(),
        metrics.clone(),
        shutdown.subscribe(),
    ));
    tasks.spawn(publish(weak.clone(), shutdown.subscribe()));
    if let Some(thread) = &raft_thread {
        tasks.spawn(spin_while_alone(
            raft.clone(),
            thread.spin_switch(),
            shutdown.subscribe(),
        ));
    }
    tasks.spawn(trigger_snapshots(
        snapshot_due,
        raft.clone(),
        shutdown.subscribe(),
    ));
    tasks.spawn(purge_kept_log(
        purge_hint,
        raft.clone(),
        shutdown.subscribe(),
    ));
    let mut stop = shutdown.subscribe();
    let expiry = lease_service::expire_leases(weak.clone());
    tasks.spawn(async move {
        tokio::select! {
            _ = expiry => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
    if let Some(retention) = config.auto_compaction()? {
        let compactor = auto_compaction::run(
            weak.clone(),
            retention,
            config.auto_compaction_check_interval,
        );
        let mut stop = shutdown.subscribe();
        tasks.spawn(async move {
            tokio::select! {
                _ = compactor => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        });
    }
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
        engine: Arc::downgrade(&engine),
        raft: Some(raft),
        raft_thread,
        node: Some(node),
        client_addrs,
        peer_addrs,
        metrics_addrs,
        shutdown,
        tasks,
        _temp_dir: temp_dir,
    })
}

/// Starts the Raft group: a new cluster is initialized with `--initial-cluster` (every
/// founding member does it, with the same membership); a member joining an existing cluster
/// waits for the leader to reach it; a restarted single member elects itself at once.
async fn bootstrap(
    raft: &crate::raft::Raft,
    config: &Config,
    id: &Identity,
    member_id: u64,
    fresh: bool,
) -> Result<(), ServerError> {
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| ServerError::Other(format!("raft: {e}")))?;
    if !initialized {
        if config.initial_cluster_state == config::ClusterState::Existing {
            tracing::info!("joining the existing cluster; waiting for its leader");
            return Ok(());
        }
        if !fresh {
            tracing::info!("data directory without Raft state: bootstrapping it as a new cluster");
        }
        match raft.initialize(id.initial.clone()).await {
            Ok(()) => {}
            Err(openraft::error::RaftError::APIError(
                openraft::error::InitializeError::NotAllowed(_),
            )) => {}
            Err(e) => return Err(ServerError::Other(format!("raft initialize: {e}"))),
        }
        return Ok(());
    }
    let m = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .clone();
    let voters: Vec<u64> = m.voter_ids().collect();
    if voters == [member_id] {
        let _ = raft.trigger().elect().await;
    }
    Ok(())
}

/// Calls `f` with openraft's server metrics now and after each change, until `stop` or
/// until Raft ends. They change only with the vote, the role, the leader or the membership;
/// the full metrics change with every log entry.
async fn follow_server_metrics(
    raft: &crate::raft::Raft,
    mut stop: watch::Receiver<bool>,
    mut f: impl FnMut(&openraft::metrics::RaftServerMetrics<crate::raft::NodeId, MemberNode>),
) {
    let mut rx = raft.server_metrics();
    loop {
        f(&rx.borrow_and_update());
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Counts the leader changes this member sees (`metastore_server_leader_changes_seen_total`).
async fn count_leader_changes(
    raft: crate::raft::Raft,
    metrics: Arc<metrics::Metrics>,
    stop: watch::Receiver<bool>,
) {
    // As etcd counts: each time the leader this member knows becomes one it did not know
    // just before (none at start, or none while an election runs). So the first leader it
    // sees counts, whether it was elected before this task first looked or after; taking the
    // leader seen first as no change made the count depend on that race.
    let mut known = None;
    follow_server_metrics(&raft, stop, |m| {
        let now = m.current_leader;
        if now.is_some() && now != known {
            metrics.leader_changes.inc();
        }
        known = now;
    })
    .await;
}

/// Keeps the Raft thread's idle spin on only while the membership holds this member alone
/// (voters and learners): other members' replies reach the thread without its doorbell, and
/// a spin would hold them back.
async fn spin_while_alone(
    raft: crate::raft::Raft,
    switch: crate::raft::thread::SpinSwitch,
    stop: watch::Receiver<bool>,
) {
    follow_server_metrics(&raft, stop, |m| {
        switch.set(m.membership_config.membership().nodes().count() <= 1);
    })
    .await;
}

/// Publishes this member's name and client URLs into the membership once a leader exists
/// (etcd's publish), so `member list` shows them; members added by `member add` start
/// without.
async fn publish(node: node::NodeRef, mut stop: watch::Receiver<bool>) {
    let attempt = async {
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            let Ok(n) = node.get() else { return };
            let req = metastore_proto::raftpb::MemberChangeRequest {
                change: Some(
                    metastore_proto::raftpb::member_change_request::Change::Publish(
                        metastore_proto::raftpb::PublishRequest {
                            id: n.member.id,
                            name: n.member.name.clone(),
                            client_urls: n.member.client_urls.clone(),
                        },
                    ),
                ),
            };
            let current = n.replica.membership();
            let published = current
                .get_node(&n.member.id)
                .is_some_and(|m| m.name == n.member.name && m.client_urls == n.member.client_urls);
            if published {
                return;
            }
            let in_membership = current.get_node(&n.member.id).is_some();
            if in_membership {
                match n.replica.member_change(req).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::debug!(error = %e, "publishing member attributes; will retry")
                    }
                }
            }
            drop(n);
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(2));
        }
    };
    tokio::select! {
        _ = attempt => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}
