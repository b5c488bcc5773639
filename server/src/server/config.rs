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
/// The backend quota when `--quota-backend-bytes` is 0, as etcd: 2 GiB.
pub const DEFAULT_QUOTA_BYTES: u64 = 2 << 30;
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

    /// Maximum client request size in bytes the server will accept.
    #[arg(long, env = "METASTORE_MAX_REQUEST_BYTES", default_value_t = DEFAULT_MAX_REQUEST_BYTES,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_request_bytes: usize,

    /// Maximum number of operations permitted in a transaction.
    #[arg(long, env = "METASTORE_MAX_TXN_OPS", default_value_t = 128,
          value_parser = clap::value_parser!(u32).range(1..).map(|v| v as usize))]
    pub max_txn_ops: usize,

    /// Raise an alarm when the backend size exceeds this many bytes (0: the default, 2 GiB).
    #[arg(long, env = "METASTORE_QUOTA_BACKEND_BYTES", default_value_t = 0)]
    pub quota_backend_bytes: u64,

    /// Extra URLs to serve /metrics and /health on (plain HTTP).
    #[arg(long, env = "METASTORE_LISTEN_METRICS_URLS", value_delimiter = ',')]
    pub listen_metrics_urls: Vec<Url>,

    /// Storage engine.
    #[arg(long, env = "METASTORE_ENGINE", value_enum, default_value = "rocksdb")]
    pub engine: EngineKind,

    /// On-disk record format to write.
    #[arg(long, env = "METASTORE_STORAGE_FORMAT", default_value_t = crate::storage::codec::DEFAULT_FORMAT)]
    pub storage_format: u8,

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
    #[arg(long, env = "METASTORE_LOG_LEVEL", default_value = "info")]
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
        let first = Self::from_arg_matches(&matches)?;
        let Some(path) = first.config_file.clone() else {
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
            let id = key.replace('-', "_");
            if id == "config_file" || !cmd.get_arguments().any(|a| a.get_id() == id.as_str()) {
                return Err(file_err(format!("unknown option '{key}'")));
            }
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
        let mut merged = Vec::with_capacity(args.len() + extra.len());
        merged.extend(args.first().cloned());
        merged.extend(extra);
        merged.extend(args.iter().skip(1).cloned());
        let cfg = Self::try_parse_from(merged)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !crate::storage::codec::READABLE_FORMATS.contains(&self.storage_format) {
            return Err(ConfigError::Invalid(format!(
                "--storage-format {} is not supported (supported: {:?})",
                self.storage_format,
                crate::storage::codec::READABLE_FORMATS
            )));
        }
        if self.listen_client_urls.is_empty() {
            return Err(ConfigError::Invalid("--listen-client-urls is empty".into()));
        }
        for u in self
            .listen_client_urls
            .iter()
            .chain(&self.listen_metrics_urls)
        {
            if u.scheme() != "http" {
                return Err(ConfigError::Invalid(format!(
                    "{u}: only http:// URLs are supported until TLS lands"
                )));
            }
        }
        let members = self.initial_cluster_members()?;
        if !members.iter().any(|(n, _)| n == &self.name) {
            return Err(ConfigError::Invalid(format!(
                "--initial-cluster has no member named {:?} (this member's --name)",
                self.name
            )));
        }
        if members.len() > 1 {
            return Err(ConfigError::Invalid(
                "--initial-cluster names several members: multi-member clusters need Raft \
                 replication, which this build does not have yet"
                    .into(),
            ));
        }
        Ok(())
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
        assert!(Config::load(["metastore", "--storage-format", "9"]).is_err());
        assert!(Config::load(["metastore", "--engine", "bolt"]).is_err());
        let e = Config::load([
            "metastore",
            "--initial-cluster",
            "other=http://127.0.0.1:2380",
        ])
        .map(|_| ())
        .expect_err("must fail");
        assert!(e.to_string().contains("no member named"), "{e}");
        Ok(())
    }
}
