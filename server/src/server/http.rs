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
    let reason = match node.get() {
        Err(_) => Some("server stopped"),
        Ok(node) => health_problem(&node),
    };
    let (code, body) = match reason {
        None => (
            StatusCode::OK,
            r#"{"health":"true","reason":""}"#.to_string(),
        ),
        Some(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(r#"{{"health":"false","reason":"{r}"}}"#),
        ),
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

/// Why this member is not healthy, as etcd's `/health` reports it: no leader, a raised alarm,
/// an unreadable store; and, before it has published its name and client URLs into the
/// membership, not ready yet (etcd serves clients only after publishing).
fn health_problem(node: &super::node::Node) -> Option<&'static str> {
    if node.replica.leader_id().is_none() {
        return Some("RAFT NO LEADER");
    }
    if !node.store.alarms().is_empty() {
        return Some("ALARM NOSPACE");
    }
    let published = node
        .replica
        .membership()
        .get_node(&node.member.id)
        .is_some_and(|m| m.name == node.member.name && m.client_urls == node.member.client_urls);
    if !published {
        return Some("member not yet published");
    }
    let readable = node
        .store
        .range(
            &crate::mvcc::KeyRange::Single(b"health".to_vec()),
            crate::mvcc::RangeOptions::default(),
        )
        .is_ok();
    (!readable).then_some("store unavailable")
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
