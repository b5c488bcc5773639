//! Plain HTTP endpoints on the client port (and on `--listen-metrics-urls`):
//! `/health`, `/version`, `/metrics`, as etcd serves them.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::node::{NodeRef, ETCD_CLUSTER_VERSION, ETCD_VERSION};

pub fn router(node: NodeRef) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/version", get(version))
        .route("/metrics", get(metrics))
        .with_state(node)
}

async fn health(State(node): State<NodeRef>) -> impl IntoResponse {
    // Healthy when the store answers a read at its current revision.
    let ok = node.get().is_ok_and(|node| {
        node.store
            .range(
                &crate::mvcc::KeyRange::Single(b"health".to_vec()),
                crate::mvcc::RangeOptions::default(),
            )
            .is_ok()
    });
    let body = if ok {
        r#"{"health":"true","reason":""}"#.to_string()
    } else {
        r#"{"health":"false","reason":"store unavailable"}"#.to_string()
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn version() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        format!(r#"{{"etcdserver":"{ETCD_VERSION}","etcdcluster":"{ETCD_CLUSTER_VERSION}"}}"#),
    )
}

async fn metrics(State(node): State<NodeRef>) -> impl IntoResponse {
    let Ok(node) = node.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        );
    };
    node.refresh_gauges();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.metrics.render(),
    )
}
