//! Connections and concurrent requesters.
//!
//! `--conns` connections are opened round-robin over the endpoints (each a separate HTTP/2
//! connection: a [`Conn`], or tonic's `Channel` for `kube`, whose connections must outlive a
//! member's restart); requester `i` of `--clients` uses connection `i % conns`. Connection `i`
//! runs on the tool's thread `i % threads` ([`Shards`]), and its requesters are set up and run
//! there too. The requesters share one counter of issued requests, so `--total` is exact
//! however fast each one is, and with `--rate` they share one [`Schedule`].

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
use crate::shards::{Placed, Shards};

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

/// Opens `--conns` connections, round-robin over `--endpoints`, connection `i` on thread
/// `i % threads` of `shards`.
pub async fn connect(common: &Common, shards: &Shards) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(common.conns);
    for (i, url) in urls(common).into_iter().enumerate() {
        let opened = shards
            .run_on(i, {
                let url = url.clone();
                async move { Conn::connect(&url).await }
            })
            .await
            .map_err(|e| Error::Connect {
                endpoint: url,
                source: e.into(),
            })?;
        conns.push(opened?);
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

/// Waits until every task that reports on one of `set_ups` is set up; the first failure in
/// their order is the error (`who` names a task that ended without a word).
pub(crate) async fn all_set_up(
    set_ups: Vec<tokio::sync::oneshot::Receiver<Result<()>>>,
    who: &str,
) -> Result<()> {
    for r in set_ups {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(Error::Stream(format!("{who} ended during its set-up"))),
        }
    }
    Ok(())
}

/// Runs `--total` requests of `workload` from `--clients` requesters and reports them under
/// the name `name`.
pub async fn run<C: Clone + Placed + Send + 'static, W: Workload<C>>(
    name: &str,
    common: &Common,
    channels: &[C],
    workload: Arc<W>,
    bar: &ProgressBar,
) -> Result<Report> {
    let rec = drive(common, channels, workload, bar).await?;
    Ok(rec.0.report(name, rec.1))
}

/// The measured part of [`run`]: the merged recorder and the wall time. Each requester is set
/// up (not measured) and then run on its connection's runtime ([`Placed`]); the clock starts
/// once every one of them is set up.
pub async fn drive<C: Clone + Placed + Send + 'static, W: Workload<C>>(
    common: &Common,
    channels: &[C],
    workload: Arc<W>,
    bar: &ProgressBar,
) -> Result<(Recorder, std::time::Duration)> {
    common.validate()?;
    if channels.is_empty() {
        return Err(Error::Options("no connection".into()));
    }
    let next = Arc::new(AtomicU64::new(0));
    let total = common.total;
    // The start: `None` until every requester is set up; dropped unsent when one fails.
    let (go, started) = tokio::sync::watch::channel::<Option<Schedule>>(None);
    let mut ready = Vec::with_capacity(common.clients);
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..common.clients {
        let ch = channels[id % channels.len()].clone();
        let runtime = ch.runtime();
        let (w, next, bar) = (workload.clone(), next.clone(), bar.clone());
        let (set_up, set_up_rx) = tokio::sync::oneshot::channel::<Result<()>>();
        let mut started = started.clone();
        let requester = async move {
            let mut rec = Recorder::new();
            let mut client = match w.client(ch, id).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = set_up.send(Err(e));
                    return rec;
                }
            };
            let _ = set_up.send(Ok(()));
            let Some(schedule) = started
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|s| *s)
            else {
                return rec; // another requester's set-up failed: no run
            };
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
        };
        tasks.spawn_on(requester, &runtime);
        ready.push(set_up_rx);
    }
    // Set-up first, so that stream opening or lease grants are not measured; the first
    // failure (in requester order) ends the run, and dropping `tasks` ends the rest.
    all_set_up(ready, "a requester").await?;
    let start = Instant::now();
    let _ = go.send(Some(Schedule::new(common.rate, start)));
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::runtime::Handle;

    use super::*;

    /// A connection that only says which shard it belongs to.
    #[derive(Clone)]
    struct FakeConn {
        shard: String,
        runtime: Handle,
    }

    impl Placed for FakeConn {
        fn runtime(&self) -> Handle {
            self.runtime.clone()
        }
    }

    /// Records, for every set-up and call, the thread it was expected on and the one it ran on;
    /// requester `fail_client`'s set-up fails.
    #[derive(Default)]
    struct Where {
        seen: Mutex<Vec<(String, String)>>,
        calls: AtomicU64,
        fail_client: Option<usize>,
    }

    impl Where {
        fn note(&self, expected: &str) {
            let here = std::thread::current().name().unwrap_or("").to_string();
            if let Ok(mut seen) = self.seen.lock() {
                seen.push((expected.to_string(), here));
            }
        }
    }

    impl Workload<FakeConn> for Where {
        type Client = String;

        async fn client(&self, channel: FakeConn, id: usize) -> Result<String> {
            self.note(&channel.shard);
            if self.fail_client == Some(id) {
                return Err(Error::Stream(format!("client {id} refused")));
            }
            Ok(channel.shard)
        }

        async fn call(&self, shard: &mut String, _seq: u64) -> Result<&'static str, tonic::Status> {
            self.note(shard);
            self.calls.fetch_add(1, Ordering::Relaxed);
            tokio::task::yield_now().await;
            Ok("op")
        }
    }

    fn common(conns: usize, clients: usize, total: u64) -> Common {
        Common {
            endpoints: vec!["127.0.0.1:2379".into()],
            conns,
            clients,
            total,
            rate: 0.0,
            key_size: 8,
            val_size: 8,
            key_space_size: 1,
            sequential_keys: false,
            json: true,
            threads: 2,
        }
    }

    fn conns(shards: &Shards, n: usize) -> Vec<FakeConn> {
        (0..n)
            .map(|i| FakeConn {
                shard: format!("bench-{}", i % shards.len()),
                runtime: shards.handle(i),
            })
            .collect()
    }

    #[tokio::test]
    async fn requesters_run_on_their_connections_threads() -> anyhow::Result<()> {
        let shards = Shards::start(2)?;
        let w = Arc::new(Where::default());
        let (rec, _) = drive(
            &common(4, 10, 200),
            &conns(&shards, 4),
            w.clone(),
            &ProgressBar::hidden(),
        )
        .await?;
        let report = rec.report("op", std::time::Duration::from_secs(1));
        assert_eq!(report.requests, 200);
        assert_eq!(report.errors, 0);
        let seen = w.seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        assert_eq!(seen.len(), 10 + 200, "every set-up and call noted");
        let misplaced: Vec<_> = seen.iter().filter(|(want, got)| want != got).collect();
        assert!(misplaced.is_empty(), "{misplaced:?}");
        // Both threads did work.
        assert!(seen.iter().any(|(_, got)| got == "bench-0"));
        assert!(seen.iter().any(|(_, got)| got == "bench-1"));
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_set_up_ends_the_run_before_any_request() -> anyhow::Result<()> {
        let shards = Shards::start(2)?;
        let w = Arc::new(Where {
            fail_client: Some(3),
            ..Default::default()
        });
        let got = drive(
            &common(2, 6, 100),
            &conns(&shards, 2),
            w.clone(),
            &ProgressBar::hidden(),
        )
        .await;
        match got {
            Err(Error::Stream(m)) => assert_eq!(m, "client 3 refused"),
            Err(e) => anyhow::bail!("unexpected error: {e}"),
            Ok(_) => anyhow::bail!("the run went on after a failed set-up"),
        }
        assert_eq!(w.calls.load(Ordering::Relaxed), 0);
        Ok(())
    }
}
