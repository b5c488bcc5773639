//! The MetaStore operator: runs MetaStore clusters on Kubernetes.
//!
//! # Layout
//! - [`crd`]: the `MetaStoreCluster` resource (spec, status, workflow record, CEL rules).
//! - [`naming`]: object names, labels, peer and client URLs derived from a cluster's name.
//! - [`plan`]: the reconcile decisions as pure functions of the spec, the recorded status and
//!   the observed state; table-tested.
//! - [`render`]: the owned objects (Services, ConfigMap, StatefulSet, PodDisruptionBudget,
//!   migration Job) as pure functions of the cluster and the plan's choices.
//! - [`controller`]: the kube-runtime controller: observe, plan, apply, act, write status;
//!   the finalizer; [`controller::permissions`], the RBAC rules it needs.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`leader`]: leader election over a Lease, so several replicas can run.
//!
//! The binaries are `metastore-operator` (the controller; `metastore-operator render --file
//! cluster.yaml` prints the objects it would apply) and `crdgen` (prints the CRD that is
//! checked in under `crds/`).

pub mod controller;
pub mod crd;
pub mod leader;
pub mod metrics;
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
    /// Adding or removing the finalizer failed (the reconcile's own errors are unwrapped).
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// A cluster manifest given on the command line could not be read.
    #[error("reading the cluster manifest: {0}")]
    Manifest(String),
}

impl Error {
    /// A short label for metrics and Events.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::MissingObjectKey(_) => "missing_object_key",
            Error::Serialize(_) => "serialize",
            Error::ClusterApi { .. } => "cluster_api",
            Error::Finalizer(_) => "finalizer",
            Error::Manifest(_) => "manifest",
        }
    }
}

impl From<kube::runtime::finalizer::Error<Error>> for Error {
    /// The reconcile's own errors come out as themselves, so they keep their metric label.
    fn from(error: kube::runtime::finalizer::Error<Error>) -> Self {
        use kube::runtime::finalizer::Error as F;
        match error {
            F::ApplyFailed(e) | F::CleanupFailed(e) => e,
            other => Error::Finalizer(Box::new(other)),
        }
    }
}

/// Result with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
