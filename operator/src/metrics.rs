//! Prometheus metrics of the controller, served on `/metrics` by the operator binary.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `metastore_operator_reconciles_total` | counter | |
//! | `metastore_operator_reconcile_errors_total` | counter | `error` ([`crate::Error::metric_label`]) |
//! | `metastore_operator_reconcile_duration_seconds` | histogram | |
//! | `metastore_operator_actions_total` | counter | `action` (the Event reason of the action) |
//! | `metastore_operator_workflow_steps_total` | counter | `workflow` (`Upgrade`, `ScaleUp`, ...), `action` |
//!
//! | `metastore_operator_defragment_duration_seconds` | histogram | `namespace`, `cluster` (one member's Defragment call) |
//! | `metastore_operator_last_defragment_duration_seconds` | gauge | `namespace`, `cluster`, `member` |
//! | `metastore_operator_backups_total` | counter | `namespace`, `cluster`, `result` (`Succeeded`, `Failed`) |
//! | `metastore_operator_backup_size_bytes` | gauge | `namespace`, `cluster` (the last successful backup) |
//! | `metastore_operator_backup_duration_seconds` | gauge | `namespace`, `cluster` (the last successful backup) |
//! | `metastore_operator_backup_revision` | gauge | `namespace`, `cluster` (the last successful backup) |
//!
//! Upgrade progress is `metastore_operator_workflow_steps_total{workflow="Upgrade"}`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;

/// The controller's metrics, in their own registry.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: IntCounter,
    errors: IntCounterVec,
    duration: Histogram,
    actions: IntCounterVec,
    workflow_steps: IntCounterVec,
    backups: IntCounterVec,
    backup_size: IntGaugeVec,
    backup_duration: GaugeVec,
    backup_revision: IntGaugeVec,
    defragment: HistogramVec,
    last_defragment: GaugeVec,
}

impl Metrics {
    /// Creates and registers every metric.
    ///
    /// # Errors
    /// Fails only if two metrics were given the same name, a programming error caught by the
    /// unit tests.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let reconciles =
            IntCounter::new("metastore_operator_reconciles_total", "Reconciles started.")?;
        let errors = IntCounterVec::new(
            Opts::new(
                "metastore_operator_reconcile_errors_total",
                "Reconciles that failed, by error kind.",
            ),
            &["error"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "metastore_operator_reconcile_duration_seconds",
                "Duration of one reconcile.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let actions = IntCounterVec::new(
            Opts::new(
                "metastore_operator_actions_total",
                "Actions performed, by kind.",
            ),
            &["action"],
        )?;
        let workflow_steps = IntCounterVec::new(
            Opts::new(
                "metastore_operator_workflow_steps_total",
                "Steps of multi-step workflows (upgrades, scaling, migrations) performed.",
            ),
            &["workflow", "action"],
        )?;
        let backups = IntCounterVec::new(
            Opts::new(
                "metastore_operator_backups_total",
                "Backups finished, by result.",
            ),
            &["namespace", "cluster", "result"],
        )?;
        let backup_size = IntGaugeVec::new(
            Opts::new(
                "metastore_operator_backup_size_bytes",
                "Size of the last successful backup.",
            ),
            &["namespace", "cluster"],
        )?;
        let backup_duration = GaugeVec::new(
            Opts::new(
                "metastore_operator_backup_duration_seconds",
                "Duration of the last successful backup.",
            ),
            &["namespace", "cluster"],
        )?;
        let backup_revision = IntGaugeVec::new(
            Opts::new(
                "metastore_operator_backup_revision",
                "Revision of the key space in the last successful backup.",
            ),
            &["namespace", "cluster"],
        )?;
        let defragment = HistogramVec::new(
            HistogramOpts::new(
                "metastore_operator_defragment_duration_seconds",
                "Duration of one member's defragmentation.",
            )
            .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1200.0]),
            &["namespace", "cluster"],
        )?;
        let last_defragment = GaugeVec::new(
            Opts::new(
                "metastore_operator_last_defragment_duration_seconds",
                "Duration of a member's last defragmentation.",
            ),
            &["namespace", "cluster", "member"],
        )?;
        registry.register(Box::new(defragment.clone()))?;
        registry.register(Box::new(last_defragment.clone()))?;
        registry.register(Box::new(backups.clone()))?;
        registry.register(Box::new(backup_size.clone()))?;
        registry.register(Box::new(backup_duration.clone()))?;
        registry.register(Box::new(backup_revision.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(actions.clone()))?;
        registry.register(Box::new(workflow_steps.clone()))?;
        Ok(Metrics {
            registry,
            reconciles,
            errors,
            duration,
            actions,
            workflow_steps,
            backups,
            backup_size,
            backup_duration,
            backup_revision,
            defragment,
            last_defragment,
        })
    }

    /// Records one member's defragmentation, which took `elapsed`.
    pub fn defragmented(&self, namespace: &str, cluster: &str, member: &str, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        self.defragment
            .with_label_values(&[namespace, cluster])
            .observe(secs);
        self.last_defragment
            .with_label_values(&[namespace, cluster, member])
            .set(secs);
    }

    /// Records a finished backup of `namespace/cluster`.
    pub fn backup_finished(&self, namespace: &str, cluster: &str, r: &crate::crd::BackupRecord) {
        let result = format!("{:?}", r.phase);
        self.backups
            .with_label_values(&[namespace, cluster, &result])
            .inc();
        if r.phase == crate::crd::BackupPhase::Succeeded {
            let labels = [namespace, cluster];
            if let Some(size) = r.size_bytes {
                self.backup_size.with_label_values(&labels).set(size);
            }
            if let Some(d) = r.duration_seconds {
                self.backup_duration.with_label_values(&labels).set(d);
            }
            if let Some(rev) = r.revision {
                self.backup_revision.with_label_values(&labels).set(rev);
            }
        }
    }

    /// Counts a reconcile that took `elapsed`.
    pub fn reconciled(&self, elapsed: Duration) {
        self.reconciles.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a failed reconcile under its error label.
    pub fn failed(&self, label: &str) {
        self.errors.with_label_values(&[label]).inc();
    }

    /// Counts an action, and a workflow step when it serves a workflow.
    pub fn action(&self, action: &str, workflow: Option<&str>) {
        self.actions.with_label_values(&[action]).inc();
        if let Some(workflow) = workflow {
            self.workflow_steps
                .with_label_values(&[workflow, action])
                .inc();
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec fails only on a malformed metric family, which the registry
        // refuses at registration.
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until `shutdown` resolves.
///
/// # Errors
/// Fails when accepting connections fails.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(metrics);
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Binds `addr` and serves the metrics there (see [`serve`]).
///
/// # Errors
/// Fails when `addr` cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn counters_and_labels_render() {
        let m = Metrics::new().expect("metrics register");
        m.reconciled(Duration::from_millis(20));
        m.failed("kube");
        m.failed("kube");
        m.action("ReplacePod", Some("Upgrade"));
        let text = m.render();
        assert!(
            text.contains("metastore_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"metastore_operator_reconcile_errors_total{error="kube"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"metastore_operator_workflow_steps_total{action="ReplacePod",workflow="Upgrade"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("metastore_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn served_over_http() {
        let m = Arc::new(Metrics::new().expect("metrics register"));
        m.failed("cluster_api");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m, async {
            let _ = stopped.await;
        }));
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response
                .contains(r#"metastore_operator_reconcile_errors_total{error="cluster_api"} 1"#),
            "{response}"
        );
        let _ = stop.send(());
        server.await.expect("join").expect("serve");
    }

    #[test]
    fn finished_backups_are_counted_and_the_last_success_measured() {
        use crate::crd::{BackupPhase, BackupRecord, BackupTrigger};
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let m = Metrics::new().expect("metrics register");
        let mut r = BackupRecord {
            phase: BackupPhase::Succeeded,
            revision: Some(4242),
            size_bytes: Some(1 << 20),
            duration_seconds: Some(1.5),
            ..BackupRecord::running(
                "demo-backup-1",
                BackupTrigger::Scheduled,
                Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
            )
        };
        m.backup_finished("db", "demo", &r);
        r.phase = BackupPhase::Failed;
        r.size_bytes = Some(1);
        m.backup_finished("db", "demo", &r);
        let text = m.render();
        for line in [
            r#"metastore_operator_backups_total{cluster="demo",namespace="db",result="Succeeded"} 1"#,
            r#"metastore_operator_backups_total{cluster="demo",namespace="db",result="Failed"} 1"#,
            r#"metastore_operator_backup_size_bytes{cluster="demo",namespace="db"} 1048576"#,
            r#"metastore_operator_backup_duration_seconds{cluster="demo",namespace="db"} 1.5"#,
            r#"metastore_operator_backup_revision{cluster="demo",namespace="db"} 4242"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn defragmentations_are_timed_per_member() {
        let m = Metrics::new().expect("metrics register");
        m.defragmented("db", "demo", "demo-1", Duration::from_millis(1500));
        let text = m.render();
        for line in [
            r#"metastore_operator_defragment_duration_seconds_count{cluster="demo",namespace="db"} 1"#,
            r#"metastore_operator_last_defragment_duration_seconds{cluster="demo",member="demo-1",namespace="db"} 1.5"#,
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }
}
