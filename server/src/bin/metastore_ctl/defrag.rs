//! `metastore-ctl defrag`: defragments every member, one at a time, followers first and the
//! leader last, and only while the cluster is healthy: before each member, every member must
//! answer Status and agree on a leader, and no CORRUPT alarm may be raised (a NOSPACE alarm
//! does not stop it: compaction and defragmentation are how a cluster leaves that state).
//! After each member, it waits until that member answers again before going on.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use metastore_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use metastore_proto::etcdserverpb::{DefragmentRequest, StatusResponse};

use crate::conn::{status, statuses, ConnArgs, Dialer, MemberRef};

#[derive(Debug, clap::Args)]
pub struct DefragArgs {
    #[command(flatten)]
    conn: ConnArgs,

    /// Give up (exit status 1) after this long, all members together.
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// How long to wait for the cluster to become healthy before each member.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
}

/// Why the cluster is not healthy enough to defragment a member, if it is not.
pub fn unhealthy(members: &[(MemberRef, anyhow::Result<StatusResponse>)]) -> Option<String> {
    if members.is_empty() {
        return Some("no members".into());
    }
    let mut leaders = Vec::new();
    for (m, s) in members {
        match s {
            Err(e) => return Some(format!("{} does not answer ({e:#})", m.name)),
            Ok(s) if s.leader == 0 => return Some(format!("{} has no leader", m.name)),
            Ok(s) => {
                if let Some(corrupt) = s.errors.iter().find(|e| e.contains("CORRUPT")) {
                    return Some(format!("{}: {corrupt}", m.name));
                }
                leaders.push(s.leader);
            }
        }
    }
    leaders.sort_unstable();
    leaders.dedup();
    (leaders.len() > 1).then(|| format!("members disagree on the leader: {leaders:x?}"))
}

/// The order to defragment in: followers (by name), then the leader.
pub fn order(members: &[(MemberRef, anyhow::Result<StatusResponse>)]) -> Vec<MemberRef> {
    let leader = members
        .iter()
        .find_map(|(_, s)| s.as_ref().ok().map(|s| s.leader));
    let mut out: Vec<MemberRef> = members.iter().map(|(m, _)| m.clone()).collect();
    out.sort_by(|a, b| (Some(a.id) == leader, &a.name).cmp(&(Some(b.id) == leader, &b.name)));
    out
}

pub async fn defrag(args: DefragArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + args.timeout;
    let dialer = Dialer::new(&args.conn).context("client TLS")?;
    let endpoints = args.conn.urls();
    let first = statuses(&dialer, &endpoints).await?;
    let plan = order(&first);
    println!(
        "defragmenting {} members in this order: {}",
        plan.len(),
        plan.iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for m in plan {
        wait_healthy(
            &dialer,
            &endpoints,
            args.health_timeout.min(remaining(deadline)),
        )
        .await
        .with_context(|| format!("not defragmenting {}", m.name))?;
        let Some(url) = m.url.clone() else {
            bail!("{} has no client URL", m.name);
        };
        let before = status(&dialer, &url).await?;
        let clock = Instant::now();
        let mut client = MaintenanceClient::new(dialer.streaming().channel(&url)?);
        let mut request = tonic::Request::new(DefragmentRequest {});
        request.set_timeout(remaining(deadline));
        client
            .defragment(request)
            .await
            .map_err(|s| anyhow::anyhow!("defragmenting {}: {}", m.name, s.message()))?;
        // Back and answering before the next one starts.
        let after = wait_answers(&dialer, &url, remaining(deadline)).await?;
        println!(
            "  {}: defragmented in {:.2} s, db size {} -> {} bytes (in use {} -> {})",
            m.name,
            clock.elapsed().as_secs_f64(),
            before.db_size,
            after.db_size,
            before.db_size_in_use,
            after.db_size_in_use
        );
    }
    println!("every member defragmented");
    Ok(())
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

async fn wait_healthy(
    dialer: &Dialer,
    endpoints: &[String],
    within: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let why = match statuses(dialer, endpoints).await {
            Ok(members) => match unhealthy(&members) {
                None => return Ok(()),
                Some(why) => why,
            },
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("the cluster is not healthy: {why}");
        }
        eprintln!("waiting for a healthy cluster: {why}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_answers(
    dialer: &Dialer,
    url: &str,
    within: Duration,
) -> anyhow::Result<StatusResponse> {
    let deadline = Instant::now() + within;
    loop {
        match status(dialer, url).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metastore_proto::etcdserverpb::ResponseHeader;

    fn member(id: u64, name: &str) -> MemberRef {
        MemberRef {
            id,
            name: name.into(),
            url: Some(format!("http://{name}:2379")),
            is_learner: false,
        }
    }

    fn ok(id: u64, leader: u64, errors: &[&str]) -> anyhow::Result<StatusResponse> {
        Ok(StatusResponse {
            header: Some(ResponseHeader {
                member_id: id,
                ..Default::default()
            }),
            leader,
            errors: errors.iter().map(|e| e.to_string()).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn followers_first_leader_last() {
        let members = vec![
            (member(1, "m0"), ok(1, 2, &[])),
            (member(2, "m1"), ok(2, 2, &[])),
            (member(3, "m2"), ok(3, 2, &[])),
        ];
        let names: Vec<_> = order(&members).into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["m0", "m2", "m1"]);
        assert_eq!(unhealthy(&members), None);
    }

    #[test]
    fn unhealthy_clusters_are_named() {
        let down = vec![
            (member(1, "m0"), ok(1, 1, &[])),
            (member(2, "m1"), Err(anyhow::anyhow!("connection refused"))),
        ];
        assert!(unhealthy(&down).is_some_and(|w| w.contains("m1 does not answer")));
        let leaderless = vec![(member(1, "m0"), ok(1, 0, &[]))];
        assert!(unhealthy(&leaderless).is_some_and(|w| w.contains("no leader")));
        let split = vec![
            (member(1, "m0"), ok(1, 1, &[])),
            (member(2, "m1"), ok(2, 2, &[])),
        ];
        assert!(unhealthy(&split).is_some_and(|w| w.contains("disagree")));
        let corrupt = vec![(member(1, "m0"), ok(1, 1, &["memberID:1 alarm:CORRUPT "]))];
        assert!(unhealthy(&corrupt).is_some_and(|w| w.contains("CORRUPT")));
        // NOSPACE does not stop a defragmentation: it is part of the way out.
        let nospace = vec![(member(1, "m0"), ok(1, 1, &["memberID:1 alarm:NOSPACE "]))];
        assert_eq!(unhealthy(&nospace), None);
    }
}
