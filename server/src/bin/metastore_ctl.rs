//! `metastore-ctl`: operations on a running MetaStore cluster that etcdctl has no command for.
//!
//! ```text
//! metastore-ctl migrate --endpoints=URL[,URL...] --to=N [--wait] [--timeout=30m]
//! ```
//!
//! `migrate` switches the cluster's storage format online (`metastorepb.Migration`): the
//! member asked checks that every member supports format `N` (refusing with the member's name
//! otherwise), then every member writes format `N` from one Raft index on and re-encodes its
//! older records in the background. With `--wait` it then polls `Maintenance.Status` on every
//! member (their client URLs from `MemberList`), printing progress, and exits 0 only once every
//! member writes `N` and holds no record in another format. The operator's migration Job runs
//! `metastore-ctl migrate --to=N --wait --endpoints=<client Service>`.
//!
//! `https://` endpoints are dialled with TLS: `--cacert` verifies the server, `--cert` and
//! `--key` are presented as the client certificate (etcdctl's flags).

use std::time::{Duration, Instant};

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use metastore_proto::etcdserverpb::cluster_client::ClusterClient;
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{MemberListRequest, StatusRequest, StatusResponse};
use metastore_proto::metastorepb::migration_client::MigrationClient;
use metastore_proto::metastorepb::SetStorageFormatRequest;
use tonic::transport::Channel;
use tonic::Code;

#[derive(Debug, Parser)]
#[command(
    name = "metastore-ctl",
    version,
    about = "Operations on a running MetaStore cluster"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Switch the cluster's storage format online (every member re-encodes in the background).
    Migrate(MigrateArgs),
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// Client URLs of one or more members (or of a Service in front of them).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,

    /// The storage format to switch to.
    #[arg(long)]
    to: u32,

    /// Wait until every member writes the format and has re-encoded every older record.
    #[arg(long)]
    wait: bool,

    /// Give up (exit status 1) after this long, the switch and the waiting together.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// How often to poll the members' status while waiting.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,

    /// CA bundle (PEM) that verifies https:// endpoints.
    #[arg(long)]
    cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) presented to https:// endpoints (with --key).
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
}

/// How to reach the endpoints: TLS settings for `https://` ones.
#[derive(Clone, Default)]
struct Dialer {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Dialer {
    fn new(args: &MigrateArgs) -> anyhow::Result<Self> {
        let Some(ca) = &args.cacert else {
            if args.cert.is_some() {
                bail!("--cert needs --cacert to verify the server");
            }
            return Ok(Self::default());
        };
        let policy = metastore::tls::TlsPolicy::default();
        let identity = match (&args.cert, &args.key) {
            (Some(cert), Some(key)) => Some(Arc::new(metastore::tls::ReloadingCert::load(
                cert,
                key,
                policy.provider(),
            )?)),
            _ => None,
        };
        Ok(Self {
            tls: Some(policy.client_config(ca, identity)?),
        })
    }

    fn channel(&self, url: &str) -> anyhow::Result<Channel> {
        Ok(metastore::tls::lazy_channel(url, self.tls.as_ref(), |e| {
            e.connect_timeout(Duration::from_secs(3))
                .timeout(Duration::from_secs(30))
        })?)
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("metastore-ctl: cannot start a runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Migrate(args) => rt.block_on(migrate(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metastore-ctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `scheme://host:port` for an endpoint given with or without a scheme.
fn endpoint_url(e: &str) -> anyhow::Result<String> {
    let url = if e.contains("://") {
        e.to_string()
    } else {
        format!("http://{e}")
    };
    Ok(url)
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    let dialer = Dialer::new(&args).context("client TLS")?;
    let endpoints = args
        .endpoints
        .iter()
        .map(|e| endpoint_url(e))
        .collect::<anyhow::Result<Vec<_>>>()?;
    switch(&dialer, &endpoints, args.to, deadline).await?;
    println!("the cluster writes storage format {} from now on", args.to);
    if !args.wait {
        println!("members re-encode their older records in the background (--wait follows them)");
        return Ok(());
    }
    wait_done(&dialer, &endpoints, args.to, deadline, args.poll_interval).await
}

/// Asks the endpoints in turn to switch, retrying while none can (no leader yet, a member
/// restarting) until the deadline. A refusal (a member without the format) ends it at once.
async fn switch(
    dialer: &Dialer,
    endpoints: &[String],
    to: u32,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut last = String::new();
    loop {
        for url in endpoints {
            let mut client = MigrationClient::new(dialer.channel(url)?);
            match client
                .set_storage_format(SetStorageFormatRequest { to })
                .await
            {
                Ok(_) => return Ok(()),
                Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::InvalidArgument) => {
                    bail!(
                        "the switch to storage format {to} was refused: {}",
                        s.message()
                    )
                }
                Err(s) if s.code() == Code::Unimplemented => {
                    bail!("{url} does not support online migration (an older MetaStore)")
                }
                Err(s) => last = format!("{url}: {}: {}", s.code(), s.message()),
            }
        }
        if Instant::now() >= deadline {
            bail!("could not switch the storage format before the timeout: {last}");
        }
        eprintln!("retrying the switch: {last}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One member's state while waiting.
enum MemberState {
    Done,
    Busy(String),
}

fn describe(s: &StatusResponse, to: u32) -> MemberState {
    if s.storage_format != to {
        return MemberState::Busy(format!(
            "writes format {} (switch not applied yet)",
            s.storage_format
        ));
    }
    if s.storage_migration_pending {
        return MemberState::Busy(format!(
            "re-encoding: {} records visited, {} re-encoded",
            s.storage_migration_visited, s.storage_migration_rewritten
        ));
    }
    MemberState::Done
}

async fn wait_done(
    dialer: &Dialer,
    endpoints: &[String],
    to: u32,
    deadline: Instant,
    poll: Duration,
) -> anyhow::Result<()> {
    loop {
        let mut lines = Vec::new();
        let mut all_done = false;
        match members(dialer, endpoints).await {
            Err(e) => lines.push(format!("cannot list the members: {e:#}")),
            Ok(members) => {
                all_done = !members.is_empty();
                for (name, url) in members {
                    let state = match url {
                        None => MemberState::Busy("no client URL published yet".into()),
                        Some(url) => match status(dialer, &url).await {
                            Ok(s) => describe(&s, to),
                            Err(e) => MemberState::Busy(format!("unreachable ({e:#})")),
                        },
                    };
                    match state {
                        MemberState::Done => lines.push(format!("{name}: format {to}, done")),
                        MemberState::Busy(what) => {
                            all_done = false;
                            lines.push(format!("{name}: {what}"));
                        }
                    }
                }
            }
        }
        for l in &lines {
            println!("  {l}");
        }
        if all_done {
            println!("every member writes storage format {to} and holds no record in another");
            return Ok(());
        }
        if Instant::now() + poll > deadline {
            bail!(
                "not every member finished the migration to storage format {to} before the \
                 timeout: {}",
                lines.join("; ")
            );
        }
        tokio::time::sleep(poll).await;
    }
}

/// The members as `(name, first client URL)`, from the first endpoint that answers.
async fn members(
    dialer: &Dialer,
    endpoints: &[String],
) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let mut last = None;
    for url in endpoints {
        let mut c = ClusterClient::new(dialer.channel(url)?);
        match c
            .member_list(MemberListRequest {
                linearizable: false,
            })
            .await
        {
            Ok(r) => {
                return r
                    .into_inner()
                    .members
                    .into_iter()
                    .map(|m| {
                        let name = if m.name.is_empty() {
                            format!("{:x}", m.id)
                        } else {
                            m.name
                        };
                        let url = m
                            .client_ur_ls
                            .first()
                            .map(|u| endpoint_url(u))
                            .transpose()?;
                        Ok((name, url))
                    })
                    .collect()
            }
            Err(s) => last = Some(anyhow::anyhow!("{url}: {}: {}", s.code(), s.message())),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no endpoint")))
}

async fn status(dialer: &Dialer, url: &str) -> anyhow::Result<StatusResponse> {
    let mut c = MaintenanceClient::new(dialer.channel(url)?);
    let mut req = tonic::Request::new(StatusRequest {});
    req.set_timeout(Duration::from_secs(5));
    Ok(c.status(req)
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner())
}
