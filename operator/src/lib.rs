//! The MetaStore operator: runs MetaStore clusters on Kubernetes.
//!
//! # Layout
//! - [`crd`]: the `MetaStoreCluster` resource (spec, status, workflow record, CEL rules).
//! - [`naming`]: object names, labels, peer and client URLs derived from a cluster's name.
//! - [`plan`]: the reconcile decisions as pure functions of the spec, the recorded status and
//!   the observed state; table-tested.
//! - [`render`]: the owned objects (Services, ConfigMap, StatefulSet, PodDisruptionBudget,
//!   migration Job) as pure functions of the cluster and the plan's choices.
//! - [`controller`]: the kube-runtime controller: observe, plan, apply, act, write status.
//!
//! The binaries are `metastore-operator` (the controller) and `crdgen` (prints the CRD that is
//! checked in under `crds/`).

pub mod controller;
pub mod crd;
pub mod naming;
pub mod plan;
pub mod render;

/// Errors of the operator. The variant names double as the `error` label of metrics and as
/// the reason of Events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object read from the API lacks a field it always has there.
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// Serializing an object failed.
    #[error("serializing: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The cluster's etcd API answered with an error or could not be reached.
    #[error("cluster API at {endpoint}: {message}")]
    ClusterApi {
        /// The endpoint called.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// A short label for metrics and Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Serialize(_) => "serialize",
            Error::ClusterApi { .. } => "cluster_api",
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
