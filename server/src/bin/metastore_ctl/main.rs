//! `metastore-ctl`: operations on a running MetaStore cluster that etcdctl has no command for.
//!
//! ```text
//! metastore-ctl migrate --endpoints=URL[,URL...] --to=N [--wait] [--timeout=30m]
//! metastore-ctl backup  --endpoints=URL[,URL...] --dir=DIR [--name=NAME] [--cluster=LABEL]
//! metastore-ctl defrag  --endpoints=URL[,URL...] [--timeout=30m]
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
//! `backup` streams a snapshot from a healthy member, a follower by preference, verifies it,
//! and writes it with its SHA-256 and a manifest ([`backup`]); `defrag` defragments the
//! members one at a time, followers first, the leader last, only while the cluster is healthy
//! ([`defrag`]).
//!
//! `https://` endpoints are dialled with TLS: `--cacert` verifies the server, `--cert` and
//! `--key` are presented as the client certificate (etcdctl's flags).

mod backup;
mod conn;
mod defrag;
mod migrate;

use clap::{Parser, Subcommand};

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
    Migrate(migrate::MigrateArgs),
    /// Take a verified backup (snapshot, SHA-256, manifest) from a healthy member.
    Backup(backup::BackupArgs),
    /// Defragment every member, one at a time, followers first, the leader last.
    Defrag(defrag::DefragArgs),
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
        Cmd::Migrate(args) => rt.block_on(migrate::migrate(args)),
        Cmd::Backup(args) => rt.block_on(backup::backup(args)),
        Cmd::Defrag(args) => rt.block_on(defrag::defrag(args)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metastore-ctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
