//! Prometheus metrics: per-RPC request counts and latencies (a tower layer around every gRPC
//! service), and store gauges refreshed at scrape time.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{ready, Context, Poll};
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use super::proposer::ApplyObserver;

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    /// The methods called so far, by label.
    methods: RwLock<HashMap<Box<str>, Arc<MethodMetrics>>>,
    apply_group: Histogram,
    /// How long each sync of the Raft log took (etcd: `etcd_disk_wal_fsync_duration_seconds`).
    pub wal_fsync: Histogram,
    pub db_size: IntGauge,
    pub db_size_in_use: IntGauge,
    pub current_revision: IntGauge,
    pub compact_revision: IntGauge,
    pub applied_index: IntGauge,
    pub raft_term: IntGauge,
    pub is_leader: IntGauge,
    pub has_leader: IntGauge,
    pub raft_committed_index: IntGauge,
    pub raft_applied_index: IntGauge,
    pub proposals_pending: IntGauge,
    /// Leader changes this member has seen.
    pub leader_changes: prometheus::IntCounter,
    /// Compactions this member proposed as auto compactor (while leader).
    pub auto_compactions: prometheus::IntCounter,
    /// Client proposals that failed (no leader, timeout, stopped), by reason.
    pub proposals_failed: IntCounterVec,
    /// Lone writes whose handler polled for its answer (`--write-answer-spin-us`), by
    /// outcome: `answered` within the poll, or `gave_up` (time out, or another write came).
    pub write_answer_spins: IntCounterVec,
    /// Per member (on the leader): log entries the member is behind the leader.
    pub apply_lag: prometheus::IntGaugeVec,
    /// The storage format this member writes, and its background re-encoding.
    pub storage_format: IntGauge,
    pub storage_migration_pending: IntGauge,
    pub storage_migration_visited: IntGauge,
    pub storage_migration_rewritten: IntGauge,
    /// Threads of the runtime serving requests (`--worker-threads`).
    pub worker_threads: IntGauge,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "metastore_grpc_requests_total",
                "gRPC requests handled, by method and status code",
            ),
            &["method", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "metastore_grpc_request_duration_seconds",
                "gRPC request latency, by method",
            )
            .buckets(prometheus::exponential_buckets(0.0001, 2.0, 18)?),
            &["method"],
        )?;
        let histogram = |name: &str, help: &str, buckets| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
        };
        let apply_group = histogram(
            "metastore_apply_group_size",
            "Commands applied per fsync (group commit)",
            prometheus::exponential_buckets(1.0, 2.0, 11)?,
        )?;
        // etcd's buckets for its WAL fsync: 1 ms to 8 s. Ours start lower, since a sync here
        // usually takes 0.1-0.3 ms.
        let wal_fsync = histogram(
            "metastore_disk_wal_fsync_duration_seconds",
            "Duration of the Raft log's syncs (fdatasync of a segment; with direct I/O \
             or --raft-log-store engine, the whole synced write)",
            prometheus::exponential_buckets(0.0000625, 2.0, 18)?,
        )?;
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let m = Self {
            db_size: gauge(
                "metastore_mvcc_db_total_size_in_bytes",
                "Bytes the storage engine occupies",
            )?,
            db_size_in_use: gauge(
                "metastore_mvcc_db_total_size_in_use_in_bytes",
                "Bytes of live data",
            )?,
            current_revision: gauge(
                "metastore_mvcc_current_revision",
                "Current revision of the key space",
            )?,
            compact_revision: gauge(
                "metastore_mvcc_compact_revision",
                "Revision history is compacted to",
            )?,
            applied_index: gauge(
                "metastore_server_applied_index",
                "Apply position of the last applied command (Raft index << 20 | command)",
            )?,
            raft_term: gauge("metastore_server_raft_term", "Current Raft term")?,
            is_leader: gauge(
                "metastore_server_is_leader",
                "1 if this member is the leader",
            )?,
            has_leader: gauge("metastore_server_has_leader", "1 if a leader is known")?,
            raft_committed_index: gauge(
                "metastore_server_raft_last_log_index",
                "Index of the last entry in this member's Raft log",
            )?,
            raft_applied_index: gauge(
                "metastore_server_raft_applied_index",
                "Index of the last Raft entry applied by this member",
            )?,
            proposals_pending: gauge(
                "metastore_server_proposals_pending",
                "Client commands proposed and waiting to be applied",
            )?,
            leader_changes: prometheus::IntCounter::new(
                "metastore_server_leader_changes_seen_total",
                "Leader changes this member has seen",
            )?,
            auto_compactions: prometheus::IntCounter::new(
                "metastore_server_auto_compactions_total",
                "Compactions this member proposed as the auto compactor (--auto-compaction-*)",
            )?,
            proposals_failed: IntCounterVec::new(
                Opts::new(
                    "metastore_server_proposals_failed_total",
                    "Client commands that failed before being applied, by reason",
                ),
                &["reason"],
            )?,
            write_answer_spins: IntCounterVec::new(
                Opts::new(
                    "metastore_server_write_answer_spins_total",
                    "Lone writes whose handler polled for its answer, by outcome (answered, gave_up)",
                ),
                &["outcome"],
            )?,
            apply_lag: prometheus::IntGaugeVec::new(
                Opts::new(
                    "metastore_server_member_replication_lag_entries",
                    "On the leader: Raft entries each member is behind the leader's log",
                ),
                &["member"],
            )?,
            storage_format: gauge(
                "metastore_storage_format",
                "Storage format this member writes new records in",
            )?,
            storage_migration_pending: gauge(
                "metastore_storage_migration_pending",
                "1 while records in another storage format remain to re-encode",
            )?,
            storage_migration_visited: gauge(
                "metastore_storage_migration_records_visited",
                "Records the background re-encoder visited for the current migration",
            )?,
            storage_migration_rewritten: gauge(
                "metastore_storage_migration_records_rewritten",
                "Records the background re-encoder re-encoded for the current migration",
            )?,
            worker_threads: gauge(
                "metastore_server_worker_threads",
                "Threads of the runtime serving requests (--worker-threads)",
            )?,
            registry,
            requests,
            latency,
            methods: RwLock::new(HashMap::new()),
            apply_group,
            wal_fsync,
        };
        m.registry.register(Box::new(m.requests.clone()))?;
        m.registry.register(Box::new(m.latency.clone()))?;
        m.registry.register(Box::new(m.apply_group.clone()))?;
        m.registry.register(Box::new(m.wal_fsync.clone()))?;
        m.registry.register(Box::new(m.leader_changes.clone()))?;
        m.registry.register(Box::new(m.auto_compactions.clone()))?;
        m.registry.register(Box::new(m.proposals_failed.clone()))?;
        m.registry
            .register(Box::new(m.write_answer_spins.clone()))?;
        m.registry.register(Box::new(m.apply_lag.clone()))?;
        for g in [
            &m.db_size,
            &m.db_size_in_use,
            &m.current_revision,
            &m.compact_revision,
            &m.applied_index,
            &m.raft_term,
            &m.is_leader,
            &m.has_leader,
            &m.raft_committed_index,
            &m.raft_applied_index,
            &m.proposals_pending,
            &m.storage_format,
            &m.storage_migration_pending,
            &m.storage_migration_visited,
            &m.storage_migration_rewritten,
            &m.worker_threads,
        ] {
            m.registry.register(Box::new(g.clone()))?;
        }
        Ok(m)
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }

    /// The metrics of the method at `path`, resolved once per method (see [`MethodMetrics`]),
    /// and whether they were kept already; `None` for a path outside the known packages.
    fn method(&self, path: &str) -> Option<(Arc<MethodMetrics>, bool)> {
        let label = method_label(path)?;
        if let Some(m) = self.methods.read().ok().and_then(|m| m.get(label).cloned()) {
            return Some((m, true));
        }
        let m = MethodMetrics {
            label: label.into(),
            ok: self.requests.with_label_values(&[label, "0"]),
            latency: self.latency.with_label_values(&[label]),
        };
        Some((Arc::new(m), false))
    }

    /// Counts a call of `m` that ended with `code` (`None`: a transport error) after
    /// `seconds`; keeps `m` unless it is `kept` already.
    fn observe(&self, m: Arc<MethodMetrics>, kept: bool, code: Option<&str>, seconds: f64) {
        m.latency.observe(seconds);
        match code {
            Some("0") => m.ok.inc(),
            Some(c) => self.requests.with_label_values(&[&m.label, c]).inc(),
            None => self
                .requests
                .with_label_values(&[&m.label, "transport"])
                .inc(),
        }
        // Kept once the method proved to exist: a client can name any path, and a path that
        // is no method gets its labels, as before, but no entry.
        if !kept && code != Some(UNIMPLEMENTED) {
            if let Ok(mut methods) = self.methods.write() {
                methods.entry(m.label.clone()).or_insert(m);
            }
        }
    }
}

/// gRPC's `Unimplemented` status code, as `grpc-status` carries it.
const UNIMPLEMENTED: &str = "12";

/// One gRPC method's request counter for status `0` and its latency histogram, taken from
/// the labelled families once: a call then counts itself without hashing its labels or
/// allocating them (each `with_label_values` hashes and looks up the labels under a lock).
struct MethodMetrics {
    label: Box<str>,
    ok: IntCounter,
    latency: Histogram,
}

impl ApplyObserver for Metrics {
    fn group_applied(&self, n: usize) {
        self.apply_group.observe(n as f64);
    }
}

/// The method label for a request path; unknown paths share one label so that clients cannot
/// blow up the label set.
fn method_label(path: &str) -> Option<&str> {
    let m = path.strip_prefix('/')?;
    let known = ["etcdserverpb.", "v3lockpb.", "v3electionpb."];
    known.iter().any(|p| m.starts_with(p)).then_some(m)
}

/// A tower layer recording [`Metrics`] for every gRPC call.
#[derive(Clone)]
pub struct MetricsLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        MetricsFuture {
            method: self.metrics.method(req.uri().path()),
            start: Instant::now(),
            metrics: self.metrics.clone(),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    /// A call's response future, counted when it completes.
    pub struct MetricsFuture<F> {
        // The method's metrics and whether `Metrics` keeps them already.
        method: Option<(Arc<MethodMetrics>, bool)>,
        start: Instant,
        metrics: Arc<Metrics>,
        #[pin]
        inner: F,
    }
}

impl<F, RB, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.inner.poll(cx));
        if let Some((method, kept)) = this.method.take() {
            let code = match &res {
                Ok(r) => Some(
                    r.headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("0"),
                ),
                Err(_) => None,
            };
            let seconds = this.start.elapsed().as_secs_f64();
            this.metrics.observe(method, kept, code, seconds);
        }
        Poll::Ready(res)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Ready;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// Answers every call with the `grpc-status` its path ends in (`/x.Y/Z/<code>`), none
    /// for `0`.
    #[derive(Clone)]
    struct StatusFromPath;

    impl Service<http::Request<()>> for StatusFromPath {
        type Response = http::Response<()>;
        type Error = Infallible;
        type Future = Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let code = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or("0")
                .to_string();
            let mut res = http::Response::new(());
            if code != "0" {
                if let Ok(v) = http::HeaderValue::from_str(&code) {
                    res.headers_mut().insert("grpc-status", v);
                }
            }
            std::future::ready(Ok(res))
        }
    }

    async fn call(metrics: &Arc<Metrics>, path: &str) -> anyhow::Result<()> {
        let mut svc = MetricsLayer(metrics.clone()).layer(StatusFromPath);
        let req = http::Request::post(path).body(())?;
        svc.ready().await?.call(req).await?;
        Ok(())
    }

    fn kept(metrics: &Metrics) -> Vec<String> {
        let mut k: Vec<String> = metrics
            .methods
            .read()
            .map(|m| m.keys().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        k.sort();
        k
    }

    #[tokio::test]
    async fn calls_are_counted_by_method_and_code_and_only_real_methods_are_kept(
    ) -> anyhow::Result<()> {
        let metrics = Arc::new(Metrics::new()?);
        for _ in 0..3 {
            call(&metrics, "/etcdserverpb.KV/Put/0").await?;
        }
        call(&metrics, "/etcdserverpb.KV/Put/9").await?;
        call(&metrics, "/etcdserverpb.Nope/Nope/12").await?;
        call(&metrics, "/elsewhere.Svc/Call/0").await?;
        let text = metrics.render();
        for line in [
            r#"metastore_grpc_requests_total{code="0",method="etcdserverpb.KV/Put/0"} 3"#,
            r#"metastore_grpc_requests_total{code="9",method="etcdserverpb.KV/Put/9"} 1"#,
            r#"metastore_grpc_requests_total{code="12",method="etcdserverpb.Nope/Nope/12"} 1"#,
            r#"metastore_grpc_request_duration_seconds_count{method="etcdserverpb.KV/Put/0"} 3"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(!text.contains("elsewhere"), "{text}");
        // The path that answered Unimplemented got its labels but is not kept.
        assert_eq!(
            kept(&metrics),
            ["etcdserverpb.KV/Put/0", "etcdserverpb.KV/Put/9"]
        );
        Ok(())
    }
}
