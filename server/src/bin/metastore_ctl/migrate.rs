//! `metastore-ctl migrate`: the online storage-format switch and the wait for every member.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use metastore_proto::etcdserverpb::StatusResponse;
use metastore_proto::metastorepb::migration_client::MigrationClient;
use metastore_proto::metastorepb::SetStorageFormatRequest;
use tonic::Code;

use crate::conn::{members, status, ConnArgs, Dialer};

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    conn: ConnArgs,

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
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    let dialer = Dialer::new(&args.conn).context("client TLS")?;
    let endpoints = args.conn.urls();
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
                for m in members {
                    let name = m.name;
                    let state = match m.url {
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
