//! Connections and concurrent requesters.
//!
//! `--conns` connections are opened round-robin over the endpoints (each a separate HTTP/2
//! connection: a [`Conn`], or tonic's `Channel` for `kube`, whose connections must outlive a
//! member's restart); requester `i` of `--clients` uses connection `i % conns`. The
//! requesters share one counter of issued requests, so `--total` is exact however fast each
//! one is, and with `--rate` they share one [`Schedule`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use tonic::transport::{Channel, Endpoint};

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::options::Common;
use crate::rate::Schedule;
use crate::report::{Recorder, Report};

/// A workload driven request by request, on connections of type `C`.
pub trait Workload<C = Conn>: Send + Sync + 'static {
    /// What one requester keeps between requests (gRPC client, stream, random state).
    type Client: Send + 'static;

    /// Prepares requester `id` on `channel`; not measured.
    fn client(&self, channel: C, id: usize) -> impl Future<Output = Result<Self::Client>> + Send;

    /// Sends request `seq` and waits for its answer; returns the kind of operation it was.
    fn call(
        &self,
        client: &mut Self::Client,
        seq: u64,
    ) -> impl Future<Output = Result<&'static str, tonic::Status>> + Send;
}

/// The URL of each of the `--conns` connections, round-robin over `--endpoints`.
fn urls(common: &Common) -> Vec<String> {
    let endpoints: Vec<&str> = common
        .endpoints
        .iter()
        .map(|e| e.trim())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Vec::new();
    }
    (0..common.conns)
        .map(|i| {
            let e = endpoints[i % endpoints.len()];
            if e.contains("://") {
                e.to_string()
            } else {
                format!("http://{e}")
            }
        })
        .collect()
}

/// Opens `--conns` connections, round-robin over `--endpoints`.
pub async fn connect(common: &Common) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(common.conns);
    for url in urls(common) {
        conns.push(Conn::connect(&url).await?);
    }
    Ok(conns)
}

/// Opens `--conns` tonic channels, round-robin over `--endpoints`: `kube`'s, which reconnect
/// when a member comes back.
pub async fn connect_channels(common: &Common) -> Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(common.conns);
    for url in urls(common) {
        let connect_err = |source: tonic::transport::Error| Error::Connect {
            endpoint: url.clone(),
            source: source.into(),
        };
        let channel = Endpoint::from_shared(url.clone())
            .map_err(connect_err)?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(connect_err)?;
        channels.push(channel);
    }
    Ok(channels)
}

/// A progress bar on stderr for `len` steps, hidden for `--json` or when stderr is not a
/// terminal.
pub fn progress(common: &Common, len: u64) -> ProgressBar {
    use std::io::IsTerminal;
    if common.json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} {per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs `--total` requests of `workload` from `--clients` requesters and reports them under
/// the name `name`.
pub async fn run<C: Clone, W: Workload<C>>(
    name: &str,
    common: &Common,
    channels: &[C],
    workload: Arc<W>,
    bar: &ProgressBar,
) -> Result<Report> {
    let rec = drive(common, channels, workload, bar).await?;
    Ok(rec.0.report(name, rec.1))
}

/// The measured part of [`run`]: the merged recorder and the wall time.
pub async fn drive<C: Clone, W: Workload<C>>(
    common: &Common,
    channels: &[C],
    workload: Arc<W>,
    bar: &ProgressBar,
) -> Result<(Recorder, std::time::Duration)> {
    common.validate()?;
    if channels.is_empty() {
        return Err(Error::Options("no connection".into()));
    }
    // Set-up first, so that stream opening or lease grants are not measured.
    let mut clients = Vec::with_capacity(common.clients);
    for id in 0..common.clients {
        let ch = channels[id % channels.len()].clone();
        clients.push(workload.client(ch, id).await?);
    }
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let schedule = Schedule::new(common.rate, start);
    let total = common.total;
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        let (w, next, bar) = (workload.clone(), next.clone(), bar.clone());
        tasks.spawn(async move {
            let mut rec = Recorder::new();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let t0 = schedule.wait(seq).await;
                match w.call(&mut client, seq).await {
                    Ok(kind) => rec.record(kind, t0.elapsed()),
                    Err(status) => rec.error(format!("{:?}: {}", status.code(), status.message())),
                }
                bar.inc(1);
            }
            rec
        });
    }
    let mut all = Recorder::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(rec) => all.merge(rec),
            Err(e) => all.error(format!("requester failed: {e}")),
        }
    }
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    Ok((all, elapsed))
}
