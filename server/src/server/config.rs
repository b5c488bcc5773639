//! Server configuration: etcd's flag names and meanings, plus MetaStore's own.
//!
//! Every option can be given as a flag (`--data-dir`), an environment variable
//! (`METASTORE_DATA_DIR`) or a key of the YAML file named by `--config-file` (`data-dir:`),
//! with that precedence: flag, then environment, then file, then the default. (etcd ignores
//! flags and environment when a config file is given; MetaStore layers them instead, so a
//! file can hold the defaults and a flag can override one of them.)

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::TypedValueParser;
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};
use url::Url;

/// Default `--max-request-bytes`, as etcd: 1.5 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1536 * 1024;
/// `--max-watchers-per-stream` by default: far above what kube-apiserver opens on one stream.
pub const DEFAULT_MAX_WATCHERS_PER_STREAM: usize = 10_000;
/// `--disk-free-reserve-bytes` by default: room for RocksDB to flush a full memtable.
pub const DEFAULT_DISK_FREE_RESERVE_BYTES: u64 = 64 << 20;
/// `--max-concurrent-requests` by default.
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 10_000;
/// The backend quota when `--quota-backend-bytes` is 0, as etcd: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
/// Default `--max-range-memory-bytes`: 256 MiB.
pub const DEFAULT_MAX_RANGE_MEMORY_BYTES: u64 = 256 << 20;
/// gRPC's own receive limit sits this much above `--max-request-bytes`, as in etcd.
pub const GRPC_OVERHEAD_BYTES: usize = 512 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// Embedded RocksDB: durable (the default).
    Rocksdb,
    /// In memory: fast, nothing on disk, gone on restart.
    Memory,
}

/// Where a RocksDB member keeps its Raft log's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftLogStore {
    /// Segment files of its own in `<data-dir>/wal`, preallocated and written in place (the
    /// default).
    Wal,
    /// RocksDB's `raft_log` column family (how MetaStore kept it before), sharing RocksDB's
    /// write-ahead log. Starting with it moves a `wal` log back into RocksDB, after which a
    /// binary without segment logs can open the directory.
    Engine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    New,
    Existing,
}

/// `metastore` flags.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "metastore",
    version,
    about = "MetaStore: an etcd v3 compatible metadata store"
)]
pub struct Config {
    /// Human-readable name for this member.
    #[arg(long, env = "METASTORE_NAME", default_value = "default")]
    pub name: String,

    /// Path to the data directory [default: ${name}.metastore].
    #[arg(long, env = "METASTORE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// URLs to listen on for client traffic (gRPC and HTTP on the same port).
    #[arg(
        long,
        env = "METASTORE_LISTEN_CLIENT_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub listen_client_urls: Vec<Url>,

    /// This member's client URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "METASTORE_ADVERTISE_CLIENT_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub advertise_client_urls: Vec<Url>,

    /// URLs to listen on for peer traffic.
    #[arg(
        long,
        env = "METASTORE_LISTEN_PEER_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2380"
    )]
    pub listen_peer_urls: Vec<Url>,

    /// This member's peer URLs to advertise to the rest of the cluster.
    #[arg(
        long,
        env = "METASTORE_INITIAL_ADVERTISE_PEER_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2380"
    )]
    pub initial_advertise_peer_urls: Vec<Url>,

    /// Initial cluster configuration for bootstrapping: `name=peerURL,...`
    /// [default: ${name}=${initial-advertise-peer-urls}].
    #[arg(long, env = "METASTORE_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,

    /// Initial cluster state.
    #[arg(
        long,
        env = "METASTORE_INITIAL_CLUSTER_STATE",
        value_enum,
        default_value = "new"
    )]
    pub initial_cluster_state: ClusterState,

    /// Initial cluster token, mixed into member and cluster ids.
    #[arg(
        long,
        env = "METASTORE_INITIAL_CLUSTER_TOKEN",
        default_value = "etcd-cluster"
    )]
    pub initial_cluster_token: String,

    /// Time (in milliseconds) of a heartbeat interval.
    #[arg(long, env = "METASTORE_HEARTBEAT_INTERVAL", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_interval: u64,

    /// Time (in milliseconds) for an election to timeout.
    #[arg(long, env = "METASTORE_ELECTION_TIMEOUT", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub election_timeout: u64,

    /// Number of committed requests between Raft snapshots (the log before a snapshot is
    /// then compacted, keeping its newest 5,000 requests). Counted per request, as etcd does,
    /// although one log entry carries a group of requests.
    #[arg(long, env = "METASTORE_SNAPSHOT_COUNT", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_count: u64,

    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "METASTORE_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_request_bytes: usize,

    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "METASTORE_MAX_TXN_OPS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_txn_ops: usize,

    /// Watchers one watch stream may hold at once (MetaStore's own; etcd has no limit): a
    /// create beyond it is answered created + canceled with the reason.
    #[arg(long, env = "METASTORE_MAX_WATCHERS_PER_STREAM", default_value_t = DEFAULT_MAX_WATCHERS_PER_STREAM,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_watchers_per_stream: usize,

    /// Maximum concurrent streams (gRPC calls) one client connection may have open, as etcd's
    /// flag (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS): a client waits for a free one.
    #[arg(long, env = "METASTORE_MAX_CONCURRENT_STREAMS", default_value_t = u32::MAX,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// gRPC calls the server works on at once, over all connections (MetaStore's own; watch,
    /// keep-alive, snapshot, lock and election streams are not counted). A call beyond it fails
    /// at once with etcd's `etcdserver: too many requests` (ResourceExhausted).
    #[arg(long, env = "METASTORE_MAX_CONCURRENT_REQUESTS", default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_concurrent_requests: usize,

    /// Refuse writes while the data directory's file system has fewer free bytes than this
    /// (MetaStore's own; 0: never). Reads go on; writes are accepted again once space is freed.
    #[arg(long, env = "METASTORE_DISK_FREE_RESERVE_BYTES", default_value_t = DEFAULT_DISK_FREE_RESERVE_BYTES)]
    pub disk_free_reserve_bytes: u64,

    /// Raise an alarm when the backend size exceeds this many bytes (0: the default, 2 GiB).
    #[arg(long, env = "METASTORE_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,

    /// Memory, in bytes, that Range responses may hold at once (MetaStore's own). Ranges are
    /// sent as they are read, each holding a window of about 4 x (256 KiB +
    /// --max-request-bytes); a sorted result (any order but ascending keys) is held whole and
    /// charged its size. Requests wait for their share; one that needs more than the whole
    /// budget fails with ResourceExhausted.
    #[arg(long, env = "METASTORE_MAX_RANGE_MEMORY_BYTES", default_value_t = DEFAULT_MAX_RANGE_MEMORY_BYTES,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_range_memory_bytes: u64,

    /// Memory, in bytes, the apply step keeps of recently written keys' newest versions, so
    /// that a put or a txn's put need not look its key up in the storage engine (MetaStore's
    /// own; 0: off). Values larger than an eighth of it are not kept.
    #[arg(long, env = "METASTORE_APPLY_CACHE_BYTES", default_value_t = crate::mvcc::store::DEFAULT_LATEST_CACHE_BYTES as u64)]
    pub apply_cache_bytes: u64,

    /// Where the Raft log's entries are kept on RocksDB (MetaStore's own; the memory engine
    /// keeps them in memory). A restart with the other choice moves the log over.
    #[arg(
        long,
        env = "METASTORE_RAFT_LOG_STORE",
        value_enum,
        default_value = "wal"
    )]
    pub raft_log_store: RaftLogStore,

    /// The length, in bytes, each Raft log segment file is made with (etcd's WAL: 64 MiB).
    /// A larger entry gets a segment of its own that grows to hold it.
    #[arg(long, env = "METASTORE_RAFT_LOG_SEGMENT_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub raft_log_segment_bytes: u64,

    /// Write the Raft log with direct I/O, each synced write synced in the same system call
    /// (`O_DIRECT` and `RWF_DSYNC`), where the file system takes it; `false`: through the page
    /// cache and `fdatasync`, as etcd does (MetaStore's own).
    #[arg(long, env = "METASTORE_RAFT_LOG_DIRECT_IO", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = true, default_missing_value = "true")]
    pub raft_log_direct_io: bool,

    /// Keep each live key's newest version in a table of its own beside the key history
    /// (RocksDB's `kv_current`), so that a range at the current revision reads one entry per
    /// key however many older versions it has (MetaStore's own). `false` drops the table, as
    /// binaries before it need before they can open the data directory again; `true` builds
    /// it from the history at start when it is missing or stale.
    #[arg(long, env = "METASTORE_KV_CURRENT_TABLE", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = true, default_missing_value = "true")]
    pub kv_current_table: bool,

    /// Threads serving requests (MetaStore's own; 0: chosen from the cores, see
    /// [`Config::worker_threads_for`]).
    #[arg(long, env = "METASTORE_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Microseconds the Raft thread of a cluster that starts with one member keeps its core
    /// when it runs out of work, yielding it to any thread that wants it, before it sleeps:
    /// a write arriving meanwhile starts without a wake-up (MetaStore's own; 0: off; no
    /// effect while the cluster has other members).
    #[arg(long, env = "METASTORE_RAFT_IDLE_SPIN_US", default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub raft_idle_spin_us: u64,

    /// Microseconds a write's handler, in a cluster that starts with one member, keeps its
    /// worker polling for the answer (yielding the core on every turn) instead of sleeping,
    /// while it is the only write in flight and the previous group was one write (MetaStore's
    /// own; 0: off; no effect while the cluster has other members).
    #[arg(long, env = "METASTORE_WRITE_ANSWER_SPIN_US", default_value_t = 400,
          value_parser = clap::value_parser!(u64).range(0..=100_000))]
    pub write_answer_spin_us: u64,

    /// Extra URLs to serve /metrics and /health on (plain HTTP).
    #[arg(long, env = "METASTORE_LISTEN_METRICS_URLS", value_delimiter = ',')]
    pub listen_metrics_urls: Vec<Url>,

    /// Client TLS certificate file (PEM, the chain leaf first); served on https:// client
    /// URLs and reread when it changes.
    #[arg(long, env = "METASTORE_CERT_FILE")]
    pub cert_file: Option<PathBuf>,

    /// Client TLS private key file (PEM); reread when it changes.
    #[arg(long, env = "METASTORE_KEY_FILE")]
    pub key_file: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to, with --client-cert-auth.
    #[arg(long, env = "METASTORE_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,

    /// Require a client certificate signed by --trusted-ca-file on https:// client URLs.
    #[arg(long, env = "METASTORE_CLIENT_CERT_AUTH", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub client_cert_auth: bool,

    /// Token provider for Authenticate: `simple` (etcd's simple tokens, valid on the member
    /// that issued them) or `jwt,pub-key=FILE,priv-key=FILE,sign-method=RS256|ES256|...,ttl=5m`.
    #[arg(long, env = "METASTORE_AUTH_TOKEN", default_value = "simple")]
    pub auth_token: String,

    /// Seconds a simple token stays valid after its last use.
    #[arg(long, env = "METASTORE_AUTH_TOKEN_TTL", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_token_ttl: u64,

    /// bcrypt cost of the password hashes (4 to 31; each step doubles the work).
    #[arg(long, env = "METASTORE_BCRYPT_COST", default_value_t = crate::auth::DEFAULT_BCRYPT_COST,
          value_parser = clap::value_parser!(u32).range(4..=31))]
    pub bcrypt_cost: u32,

    /// Peer TLS certificate file (PEM): served on https:// peer URLs and presented to other
    /// members; reread when it changes.
    #[arg(long, env = "METASTORE_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,

    /// Peer TLS private key file (PEM); reread when it changes.
    #[arg(long, env = "METASTORE_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,

    /// CA certificates (PEM) that other members' peer certificates must chain to.
    #[arg(long, env = "METASTORE_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Require a peer certificate signed by --peer-trusted-ca-file on https:// peer URLs.
    #[arg(long, env = "METASTORE_PEER_CLIENT_CERT_AUTH", action = ArgAction::Set,
          num_args = 0..=1, default_value_t = false, default_missing_value = "true")]
    pub peer_client_cert_auth: bool,

    /// TLS 1.2 cipher suites allowed on client and peer TLS, by Go's names as etcd takes them
    /// (e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256) [default: every suite rustls implements].
    /// TLS 1.3 suites are always enabled.
    #[arg(long, env = "METASTORE_CIPHER_SUITES", value_delimiter = ',')]
    pub cipher_suites: Vec<String>,

    /// Minimum TLS version for client and peer TLS: TLS1.2 or TLS1.3.
    #[arg(long, env = "METASTORE_TLS_MIN_VERSION", default_value = "TLS1.2")]
    pub tls_min_version: String,

    /// Maximum TLS version for client and peer TLS: TLS1.2 or TLS1.3 [default: TLS1.3].
    #[arg(long, env = "METASTORE_TLS_MAX_VERSION")]
    pub tls_max_version: Option<String>,

    /// Auto compaction: `periodic` keeps the history of a period of time, `revision` a number
    /// of revisions (see --auto-compaction-retention).
    #[arg(
        long,
        env = "METASTORE_AUTO_COMPACTION_MODE",
        value_enum,
        default_value = "periodic"
    )]
    pub auto_compaction_mode: super::auto_compaction::AutoCompactionMode,

    /// What auto compaction keeps: periodic mode, a duration (`1h`, `30m`) or a bare number of
    /// hours; revision mode, a number of revisions. 0 turns auto compaction off.
    #[arg(long, env = "METASTORE_AUTO_COMPACTION_RETENTION", default_value = "0")]
    pub auto_compaction_retention: String,

    /// How often revision-mode auto compaction checks the revision (etcd: every 5 minutes).
    #[arg(long, env = "METASTORE_AUTO_COMPACTION_CHECK_INTERVAL", default_value = "5m",
          value_parser = humantime::parse_duration)]
    pub auto_compaction_check_interval: std::time::Duration,

    /// Storage engine.
    #[arg(long, env = "METASTORE_ENGINE", value_enum, default_value = "rocksdb")]
    pub engine: EngineKind,

    /// On-disk record format [default: the data directory's format; 2 for a new directory].
    /// A directory at another format is refused: convert it first, with the server stopped,
    /// by `metastore migrate --data-dir DIR --to N`.
    #[arg(long, env = "METASTORE_STORAGE_FORMAT", hide_default_value = true,
          default_value_t = crate::storage::codec::DEFAULT_FORMAT)]
    pub storage_format: u8,

    /// Highest storage format this process reads or writes: newer ones are refused as unknown,
    /// as an older binary would. For upgrade tests, not for production (hidden).
    #[arg(long, env = "METASTORE_MAX_STORAGE_FORMAT", hide = true)]
    pub max_storage_format: Option<u8>,

    /// Records per second at most that the background re-encoder converts after an online
    /// storage-format switch (`metastore-ctl migrate`); 0: no limit but a half duty cycle.
    #[arg(
        long = "experimental-storage-migration-rate",
        env = "METASTORE_EXPERIMENTAL_STORAGE_MIGRATION_RATE",
        default_value_t = 50_000
    )]
    pub storage_migration_rate: u64,

    /// Disable fsync: acknowledged writes may be lost on a crash. Unsafe; for tests.
    #[arg(long, env = "METASTORE_UNSAFE_NO_FSYNC", action = ArgAction::Set, num_args = 0..=1,
          default_value_t = false, default_missing_value = "true")]
    pub unsafe_no_fsync: bool,

    /// How often idle watchers that asked for progress notifications get one (etcd's
    /// `--experimental-watch-progress-notify-interval`).
    #[arg(long = "experimental-watch-progress-notify-interval",
          env = "METASTORE_EXPERIMENTAL_WATCH_PROGRESS_NOTIFY_INTERVAL",
          default_value = "10m", value_parser = humantime::parse_duration)]
    pub watch_progress_notify_interval: std::time::Duration,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `metastore=debug`).
    #[arg(
        long,
        env = "METASTORE_LOG_LEVEL",
        default_value = "info,openraft=warn"
    )]
    pub log_level: String,

    /// YAML file with any of the options above (keys are the flag names without `--`).
    #[arg(long, env = "METASTORE_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error(transparent)]
    Args(#[from] clap::Error),
    #[error("config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid TLS configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

impl Config {
    /// Parses `args` (the program name first), layering the config file under flags and
    /// environment variables.
    pub fn load<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        let matches = Self::command().try_get_matches_from(&args)?;
        let mut first = Self::from_arg_matches(&matches)?;
        let format_given = matches!(
            matches.value_source("storage_format"),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        let Some(path) = first.config_file.clone() else {
            first.resolve_storage_format(format_given);
            first.validate()?;
            return Ok(first);
        };
        let file_err = |reason: String| ConfigError::File {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
        let map: serde_yaml_ng::Mapping =
            serde_yaml_ng::from_str(&text).map_err(|e| file_err(e.to_string()))?;
        let cmd = Self::command();
        let mut extra: Vec<OsString> = Vec::new();
        for (k, v) in map {
            let key = k
                .as_str()
                .ok_or_else(|| file_err(format!("key {k:?} is not a string")))?
                .to_string();
            // Keys are flag names; find the argument by its long name (its id may differ).
            let Some(arg) = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(key.as_str()) && a.get_id() != "config_file")
            else {
                return Err(file_err(format!("unknown option '{key}'")));
            };
            let id = arg.get_id().to_string();
            if matches!(
                matches.value_source(&id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let value = yaml_scalar(&v)
                .or_else(|| match &v {
                    serde_yaml_ng::Value::Sequence(items) => items
                        .iter()
                        .map(yaml_scalar)
                        .collect::<Option<Vec<_>>>()
                        .map(|v| v.join(",")),
                    _ => None,
                })
                .ok_or_else(|| file_err(format!("option '{key}' must be a scalar or a list")))?;
            extra.push(format!("--{key}={value}").into());
        }
        let format_given = format_given
            || extra
                .iter()
                .any(|a| a.to_string_lossy().starts_with("--storage-format="));
        let mut merged = Vec::with_capacity(args.len() + extra.len());
        merged.extend(args.first().cloned());
        merged.extend(extra);
        merged.extend(args.iter().skip(1).cloned());
        let mut cfg = Self::try_parse_from(merged)?;
        cfg.resolve_storage_format(format_given);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the cluster starts with this member alone: `--initial-cluster` names one
    /// member (a member joining an existing cluster names at least one other). Raft then runs
    /// on a thread of its own ([`RaftThread`](crate::raft::thread::RaftThread)), which
    /// [`server::start`](crate::server::start) decides by this too.
    pub fn starts_alone(&self) -> Result<bool, ConfigError> {
        let members = self.initial_cluster_members()?;
        Ok(members.iter().all(|(name, _)| name == &members[0].0))
    }

    /// How many threads serve requests on a machine with `cores` cores: `--worker-threads`
    /// when given; otherwise one per core, less the core the Raft thread keeps busy when
    /// the cluster [starts alone](Self::starts_alone), and at least one.
    ///
    /// On two cores, one worker beside the Raft thread put 12,766 puts/s against 10,496 with
    /// two (16 clients), and served 1-key ranges 16-18 % faster, with 15-30 % less CPU per
    /// request: a third busy thread on two cores only added wake-ups, each of which waits
    /// for a core while the server's scheduling group has used its share
    /// (docs/PERFORMANCE.md, session 35).
    pub fn worker_threads_for(&self, cores: usize) -> Result<usize, ConfigError> {
        if self.worker_threads > 0 {
            return Ok(self.worker_threads);
        }
        let raft = usize::from(self.starts_alone()?);
        Ok(cores.saturating_sub(raft).max(1))
    }

    /// Storage formats this process supports (all known ones up to `--max-storage-format`).
    pub fn supported_storage_formats(&self) -> Vec<u8> {
        crate::storage::codec::READABLE_FORMATS
            .iter()
            .copied()
            .filter(|f| self.max_storage_format.is_none_or(|max| *f <= max))
            .collect()
    }

    /// Without an explicit `--storage-format`, takes the data directory's format from its
    /// stamp, so that upgrading the binary alone never changes the format on disk; a new
    /// directory gets the default (or the newest format under `--max-storage-format`). An
    /// explicit format other than the directory's is refused when the directory is opened.
    fn resolve_storage_format(&mut self, given: bool) {
        if given {
            return;
        }
        let supported = self.supported_storage_formats();
        if self.engine == EngineKind::Rocksdb {
            if let Ok(Some(stamp)) = crate::storage::data_dir::read_stamp(&self.data_dir()) {
                // An unreadable stamp or format is reported by the open, with its reason.
                if supported.contains(&stamp.storage_format) {
                    self.storage_format = stamp.storage_format;
                    return;
                }
            }
        }
        if !supported.contains(&self.storage_format) {
            if let Some(newest) = supported.last() {
                self.storage_format = *newest;
            }
        }
    }

    /// What auto compaction keeps, from `--auto-compaction-mode` and `-retention`; `None`
    /// when it is off (retention 0, the default).
    pub fn auto_compaction(
        &self,
    ) -> Result<Option<super::auto_compaction::Retention>, ConfigError> {
        super::auto_compaction::Retention::parse(
            self.auto_compaction_mode,
            &self.auto_compaction_retention,
        )
        .map_err(ConfigError::Invalid)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self
            .supported_storage_formats()
            .contains(&self.storage_format)
        {
            return Err(ConfigError::Invalid(format!(
                "--storage-format {} is not supported (supported: {:?})",
                self.storage_format,
                self.supported_storage_formats()
            )));
        }
        if self.listen_client_urls.is_empty() {
            return Err(ConfigError::Invalid("--listen-client-urls is empty".into()));
        }
        for u in &self.listen_metrics_urls {
            if u.scheme() != "http" {
                return Err(ConfigError::Invalid(format!(
                    "--listen-metrics-urls {u}: only http:// is supported"
                )));
            }
        }
        self.auto_compaction()?;
        let members = self.initial_cluster_members()?;
        self.validate_tls(&members)?;
        if !members.iter().any(|(n, _)| n == &self.name) {
            return Err(ConfigError::Invalid(format!(
                "--initial-cluster has no member named {:?} (this member's --name)",
                self.name
            )));
        }
        // etcd's rule: the election timeout must be at least five heartbeats.
        if self.election_timeout < 5 * self.heartbeat_interval {
            return Err(ConfigError::Invalid(format!(
                "--election-timeout[{}ms] should be at least 5 times as --heartbeat-interval[{}ms]",
                self.election_timeout, self.heartbeat_interval
            )));
        }
        if self.election_timeout > 50_000 {
            return Err(ConfigError::Invalid(format!(
                "--election-timeout[{}ms] is too long, and should be set less than 50 seconds",
                self.election_timeout
            )));
        }
        Ok(())
    }

    /// The scheme of each URL decides whether it uses TLS (as in etcd); an https:// URL needs
    /// the files to serve or verify it.
    fn validate_tls(&self, members: &[(String, Url)]) -> Result<(), ConfigError> {
        let scheme_ok = |flag: &str, u: &Url| match u.scheme() {
            "http" | "https" => Ok(()),
            other => Err(ConfigError::Invalid(format!(
                "{flag} {u}: unsupported scheme {other:?} (expected http or https)"
            ))),
        };
        let missing = |what: &str| ConfigError::Invalid(what.to_string());
        for u in &self.listen_client_urls {
            scheme_ok("--listen-client-urls", u)?;
            if u.scheme() == "https" {
                if self.cert_file.is_none() || self.key_file.is_none() {
                    return Err(missing(&format!(
                        "TLS key/cert (--cert-file, --key-file) must be provided for client url {u}"
                    )));
                }
                if self.client_cert_auth && self.trusted_ca_file.is_none() {
                    return Err(missing(
                        "--client-cert-auth needs --trusted-ca-file to verify client certificates",
                    ));
                }
            }
        }
        for u in &self.listen_peer_urls {
            scheme_ok("--listen-peer-urls", u)?;
            if u.scheme() == "https" {
                if self.peer_cert_file.is_none() || self.peer_key_file.is_none() {
                    return Err(missing(&format!(
                        "TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for \
                         peer url {u}"
                    )));
                }
                if self.peer_client_cert_auth && self.peer_trusted_ca_file.is_none() {
                    return Err(missing(
                        "--peer-client-cert-auth needs --peer-trusted-ca-file to verify peer \
                         certificates",
                    ));
                }
            }
        }
        let peer_urls = self
            .initial_advertise_peer_urls
            .iter()
            .map(|u| ("--initial-advertise-peer-urls", u))
            .chain(members.iter().map(|(_, u)| ("--initial-cluster", u)));
        for (flag, u) in peer_urls {
            scheme_ok(flag, u)?;
            if u.scheme() == "https" && self.peer_trusted_ca_file.is_none() {
                return Err(missing(&format!(
                    "{flag} {u}: https peer URLs need --peer-trusted-ca-file to verify the other \
                     members"
                )));
            }
        }
        self.tls_policy()?;
        Ok(())
    }

    /// `--cipher-suites`, `--tls-min-version`, `--tls-max-version`.
    pub fn tls_policy(&self) -> Result<crate::tls::TlsPolicy, crate::tls::TlsError> {
        crate::tls::TlsPolicy::parse(
            &self.cipher_suites,
            &self.tls_min_version,
            self.tls_max_version.as_deref().unwrap_or_default(),
        )
    }

    /// The backend quota in bytes (`--quota-backend-bytes`, 0: the 2 GiB default).
    pub fn quota_bytes(&self) -> u64 {
        if self.quota_backend_bytes == 0 {
            DEFAULT_QUOTA_BYTES
        } else {
            self.quota_backend_bytes
        }
    }

    /// The data directory, defaulting to `${name}.metastore` like etcd's `${name}.etcd`.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}.metastore", self.name)))
    }

    /// `--initial-cluster` as `(name, peer URL)` pairs.
    pub fn initial_cluster_members(&self) -> Result<Vec<(String, Url)>, ConfigError> {
        let spec = match &self.initial_cluster {
            Some(s) => s.clone(),
            None => self
                .initial_advertise_peer_urls
                .iter()
                .map(|u| format!("{}={}", self.name, u))
                .collect::<Vec<_>>()
                .join(","),
        };
        spec.split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|item| {
                let (name, url) = item.split_once('=').ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "--initial-cluster entry {item:?} is not name=URL"
                    ))
                })?;
                let url = Url::parse(url.trim()).map_err(|e| {
                    ConfigError::Invalid(format!("--initial-cluster URL {url:?}: {e}"))
                })?;
                Ok((name.trim().to_string(), url))
            })
            .collect()
    }
}

fn yaml_scalar(v: &serde_yaml_ng::Value) -> Option<String> {
    match v {
        serde_yaml_ng::Value::String(s) => Some(s.clone()),
        serde_yaml_ng::Value::Bool(b) => Some(b.to_string()),
        serde_yaml_ng::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_one_local_node() -> anyhow::Result<()> {
        let c = Config::load(["metastore"])?;
        assert_eq!(c.listen_client_urls[0].as_str(), "http://127.0.0.1:2379/");
        assert_eq!(c.data_dir(), PathBuf::from("default.metastore"));
        assert_eq!(c.engine, EngineKind::Rocksdb);
        assert_eq!(c.max_request_bytes, 1536 * 1024);
        assert_eq!(c.max_txn_ops, 128);
        assert_eq!(c.max_range_memory_bytes, 256 << 20);
        assert_eq!(c.apply_cache_bytes, 8 << 20);
        assert_eq!(c.raft_log_store, RaftLogStore::Wal);
        assert_eq!(c.raft_log_segment_bytes, 64 << 20);
        assert!(c.raft_log_direct_io);
        assert!(!Config::load(["metastore", "--raft-log-direct-io", "false"])?.raft_log_direct_io);
        assert!(c.kv_current_table);
        assert!(!Config::load(["metastore", "--kv-current-table=false"])?.kv_current_table);
        assert_eq!(c.max_watchers_per_stream, DEFAULT_MAX_WATCHERS_PER_STREAM);
        assert_eq!(c.max_concurrent_streams, u32::MAX, "etcd's default");
        assert_eq!(c.max_concurrent_requests, DEFAULT_MAX_CONCURRENT_REQUESTS);
        assert!(!c.unsafe_no_fsync);
        assert_eq!(c.initial_cluster_members()?.len(), 1);
        Ok(())
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "name: fromfile\nmax-txn-ops: 7\nengine: memory\nunsafe-no-fsync: true\n\
             max-range-memory-bytes: 1048576\napply-cache-bytes: 0\n\
             listen-client-urls: [http://127.0.0.1:1, http://127.0.0.1:2]\n\
             initial-cluster: fromfile=http://127.0.0.1:2380\n",
        )?;
        let c = Config::load([
            "metastore",
            "--config-file",
            file.to_str().unwrap_or_default(),
            "--max-txn-ops",
            "9",
        ])?;
        assert_eq!(c.name, "fromfile");
        assert_eq!(c.max_txn_ops, 9, "flag wins over file");
        assert_eq!(c.engine, EngineKind::Memory);
        assert!(c.unsafe_no_fsync);
        assert_eq!(c.max_range_memory_bytes, 1 << 20);
        assert_eq!(c.apply_cache_bytes, 0, "the cache can be switched off");
        assert_eq!(c.listen_client_urls.len(), 2);
        Ok(())
    }

    #[test]
    fn bad_input_is_a_clear_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "no-such-option: 1\n")?;
        let e = Config::load([
            "metastore",
            "--config-file",
            file.to_str().unwrap_or_default(),
        ])
        .map(|_| ())
        .expect_err("must fail");
        assert!(
            e.to_string().contains("unknown option 'no-such-option'"),
            "{e}"
        );
        assert!(Config::load(["metastore", "--max-txn-ops", "0"]).is_err());
        for flag in [
            "--max-watchers-per-stream",
            "--max-concurrent-streams",
            "--max-concurrent-requests",
        ] {
            assert!(Config::load(["metastore", flag, "0"]).is_err(), "{flag} 0");
        }
        assert!(Config::load(["metastore", "--storage-format", "9"]).is_err());
        assert!(Config::load([
            "metastore",
            "--max-storage-format",
            "1",
            "--storage-format",
            "2"
        ])
        .is_err());
        assert!(Config::load(["metastore", "--engine", "bolt"]).is_err());
        let e = Config::load([
            "metastore",
            "--initial-cluster",
            "other=http://127.0.0.1:2380",
        ])
        .map(|_| ())
        .expect_err("must fail");
        assert!(e.to_string().contains("no member named"), "{e}");
        let e = Config::load([
            "metastore",
            "--heartbeat-interval",
            "300",
            "--election-timeout",
            "1000",
        ])
        .map(|_| ())
        .expect_err("must fail");
        assert!(e.to_string().contains("at least 5 times"), "{e}");
        // Several members are accepted (replication by Raft).
        let c = Config::load([
            "metastore",
            "--name",
            "a",
            "--initial-cluster",
            "a=http://127.0.0.1:2380,b=http://127.0.0.1:2381",
        ])?;
        assert_eq!(c.initial_cluster_members()?.len(), 2);
        Ok(())
    }

    /// A spin flag (µs): `default` when not given, 0 (off) and 100,000 accepted, 100,001
    /// refused with an error naming the flag.
    fn check_spin_flag(flag: &str, default: u64, get: fn(&Config) -> u64) -> anyhow::Result<()> {
        assert_eq!(get(&Config::load(["metastore"])?), default, "{flag}");
        for ok in [0, 100_000] {
            let c = Config::load(["metastore", flag, &ok.to_string()])?;
            assert_eq!(get(&c), ok, "{flag}");
        }
        let err = Config::load(["metastore", flag, "100001"])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains(flag.trim_start_matches('-')), "{flag}: {err}");
        Ok(())
    }

    #[test]
    fn the_write_answer_spin_is_bounded_and_can_be_off() -> anyhow::Result<()> {
        check_spin_flag("--write-answer-spin-us", 400, |c| c.write_answer_spin_us)
    }

    #[test]
    fn the_raft_threads_idle_spin_is_bounded_and_can_be_off() -> anyhow::Result<()> {
        check_spin_flag("--raft-idle-spin-us", 200, |c| c.raft_idle_spin_us)
    }

    #[test]
    fn worker_threads_leave_the_raft_threads_core_to_it() -> anyhow::Result<()> {
        // One member: the Raft thread keeps a core, the workers get the rest.
        let alone = Config::load(["metastore"])?;
        assert!(alone.starts_alone()?);
        assert_eq!(alone.worker_threads_for(2)?, 1);
        assert_eq!(alone.worker_threads_for(8)?, 7);
        assert_eq!(alone.worker_threads_for(1)?, 1);
        // One member named twice (two peer URLs) is still one member.
        let two_urls = Config::load([
            "metastore",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380,http://127.0.0.2:2380",
            "--initial-cluster",
            "default=http://127.0.0.1:2380,default=http://127.0.0.2:2380",
        ])?;
        assert!(two_urls.starts_alone()?);
        // Peers, or joining an existing cluster: openraft runs on the workers, one per core.
        let three = Config::load([
            "metastore",
            "--name",
            "a",
            "--initial-cluster",
            "a=http://127.0.0.1:2380,b=http://127.0.0.1:2381,c=http://127.0.0.1:2382",
        ])?;
        assert!(!three.starts_alone()?);
        assert_eq!(three.worker_threads_for(2)?, 2);
        let joining = Config::load([
            "metastore",
            "--initial-cluster-state",
            "existing",
            "--initial-cluster",
            "default=http://127.0.0.1:2380,old=http://127.0.0.1:2381",
        ])?;
        assert!(!joining.starts_alone()?);
        assert_eq!(joining.worker_threads_for(4)?, 4);
        // An explicit count wins either way.
        let set = Config::load(["metastore", "--worker-threads", "3"])?;
        assert_eq!(set.worker_threads_for(2)?, 3);
        assert!(Config::load(["metastore", "--worker-threads", "many"]).is_err());
        Ok(())
    }

    #[test]
    fn tls_flags_as_etcd_takes_them() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("c.yaml");
        std::fs::write(
            &file,
            "listen-client-urls: https://127.0.0.1:2379\n\
             cert-file: /tls/server.crt\nkey-file: /tls/server.key\n\
             trusted-ca-file: /tls/ca.crt\nclient-cert-auth: true\n\
             cipher-suites: [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, \
             TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256]\ntls-min-version: TLS1.2\n",
        )?;
        let c = Config::load([
            "metastore",
            "--config-file",
            file.to_str().unwrap_or_default(),
        ])?;
        assert_eq!(c.cert_file, Some(PathBuf::from("/tls/server.crt")));
        assert!(c.client_cert_auth);
        assert_eq!(c.cipher_suites.len(), 2);
        assert!(!c.peer_client_cert_auth);
        // Bare boolean flags, as the operator passes them.
        let c = Config::load([
            "metastore",
            "--listen-peer-urls",
            "https://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "https://127.0.0.1:2380",
            "--peer-cert-file",
            "/p.crt",
            "--peer-key-file",
            "/p.key",
            "--peer-trusted-ca-file",
            "/ca.crt",
            "--peer-client-cert-auth",
        ])?;
        assert!(c.peer_client_cert_auth);
        let e = Config::load([
            "metastore",
            "--initial-advertise-peer-urls",
            "https://127.0.0.1:2380",
        ])
        .map(|_| ())
        .expect_err("must fail");
        assert!(e.to_string().contains("--peer-trusted-ca-file"), "{e}");
        let e = Config::load([
            "metastore",
            "--listen-metrics-urls",
            "https://127.0.0.1:2381",
        ])
        .map(|_| ())
        .expect_err("must fail");
        assert!(e.to_string().contains("only http://"), "{e}");
        Ok(())
    }

    #[test]
    fn storage_format_defaults_to_the_data_directory() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("d");
        let data_arg = data.to_str().unwrap_or_default();
        let load = |extra: &[&str]| {
            let mut args = vec!["metastore", "--data-dir", data_arg];
            args.extend_from_slice(extra);
            Config::load(args)
        };
        assert_eq!(load(&[])?.storage_format, 2, "a new directory");
        assert_eq!(load(&["--storage-format", "1"])?.storage_format, 1);
        assert_eq!(load(&["--max-storage-format", "1"])?.storage_format, 1);
        std::fs::create_dir_all(&data)?;
        std::fs::write(
            data.join("metastore.json"),
            r#"{"layout_version":1,"storage_format":1,"engine":"rocksdb","member_name":"x",
                "member_id":"1","cluster_id":"2","created_by":"old"}"#,
        )?;
        assert_eq!(load(&[])?.storage_format, 1, "the directory's format");
        // Explicit wins here; the open refuses the mismatch (storage::data_dir).
        assert_eq!(load(&["--storage-format", "2"])?.storage_format, 2);
        let file = dir.path().join("c.yaml");
        std::fs::write(&file, "storage-format: 2\n")?;
        let from_file = load(&["--config-file", file.to_str().unwrap_or_default()])?;
        assert_eq!(
            from_file.storage_format, 2,
            "a config file's value is explicit too"
        );
        Ok(())
    }
}
