//! The objects the operator owns for a cluster, rendered as pure functions.
//!
//! Every object carries a controller owner reference to the `MetaStoreCluster` (so deleting the
//! cluster deletes them) and the standard `app.kubernetes.io/*` labels, and is sent with
//! server-side apply under the field manager [`crate::naming::FIELD_MANAGER`].
//!
//! | object | name | module |
//! |---|---|---|
//! | headless peer Service | `<name>-peer` | [`services`] |
//! | client Service | `<name>-client` | [`services`] |
//! | ConfigMap with the bootstrap values | `<name>-config` | [`services`] |
//! | StatefulSet | `<name>` | [`statefulset`] |
//! | PodDisruptionBudget | `<name>` | [`services`] |
//! | migration Job | `<name>-migrate-v<N>` | [`job`] |
//!
//! What changes from one reconcile to the next without restarting pods (the initial cluster, its
//! state, the storage format for new data directories) lives in the ConfigMap and reaches the
//! container through environment variables read at container start; the pod template changes
//! only for the image, resources, TLS and extra flags, and each such change is rolled out one
//! member at a time by the plan (the StatefulSet is `OnDelete`).

pub mod job;
pub mod manifest;
pub mod services;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::MetaStoreCluster;
use crate::naming::ClusterNames;
use crate::plan::{Decision, InitialClusterState};
use crate::{Error, Result};

/// Default volume size when `spec.storage.size` is not set.
pub const DEFAULT_VOLUME_SIZE: &str = "10Gi";

/// What rendering needs besides the cluster: the plan's choices for this reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderParams {
    /// Image of the pod template.
    pub image: String,
    /// StatefulSet replicas.
    pub replicas: i32,
    /// `--initial-cluster-state`.
    pub initial_cluster_state: InitialClusterState,
    /// Ordinals listed in `--initial-cluster`.
    pub initial_members: Vec<i32>,
    /// Format a new data directory is created in (the cluster's current format).
    pub storage_format: i32,
    /// The claim templates of the existing StatefulSet: they are immutable, so they are sent
    /// back unchanged (volume growth patches the claims instead).
    pub existing_claim_templates: Option<Vec<PersistentVolumeClaim>>,
}

impl RenderParams {
    /// Parameters from a plan decision, with the StatefulSet's replicas.
    pub fn from_decision(decision: &Decision, replicas: i32, storage_format: i32) -> Self {
        RenderParams {
            image: decision.image.clone(),
            replicas,
            initial_cluster_state: decision.initial_cluster_state,
            initial_members: decision.initial_members.clone(),
            storage_format,
            existing_claim_templates: None,
        }
    }
}

/// The objects applied on every reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedObjects {
    /// Headless Service giving pods stable DNS names.
    pub peer_service: Service,
    /// Service for clients.
    pub client_service: Service,
    /// Bootstrap values.
    pub config_map: ConfigMap,
    /// The members.
    pub statefulset: StatefulSet,
    /// `None` when disabled in the spec (an existing one is then deleted).
    pub pdb: Option<PodDisruptionBudget>,
}

/// Renders a cluster's objects.
#[derive(Clone, Debug)]
pub struct Renderer<'a> {
    cluster: &'a MetaStoreCluster,
    names: ClusterNames,
    owner: OwnerReference,
}

impl<'a> Renderer<'a> {
    /// A renderer for `cluster`, which must have been read from the API (it needs a name,
    /// a namespace and a uid for the owner references).
    pub fn new(cluster: &'a MetaStoreCluster) -> Result<Self> {
        let owner = cluster
            .controller_owner_ref(&())
            .ok_or(Error::MissingObjectKey("metadata.uid"))?;
        let namespace = cluster
            .namespace()
            .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
        let tls = cluster.spec.tls.as_ref();
        let names = ClusterNames::new(
            &cluster.name_any(),
            &namespace,
            tls.is_some_and(|t| t.client_secret_name.is_some()),
            tls.is_some_and(|t| t.peer_secret_name.is_some()),
        );
        Ok(Renderer {
            cluster,
            names,
            owner,
        })
    }

    /// The names used.
    pub fn names(&self) -> &ClusterNames {
        &self.names
    }

    /// Every object applied on each reconcile.
    pub fn render(&self, params: &RenderParams) -> OwnedObjects {
        OwnedObjects {
            peer_service: self.peer_service(),
            client_service: self.client_service(),
            config_map: self.config_map(params),
            statefulset: self.statefulset(params),
            pdb: self.pdb(),
        }
    }

    /// Metadata of an owned object: name, namespace, labels, owner reference.
    fn meta(&self, name: String, component: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.names.namespace().to_string()),
            labels: Some(self.names.labels(component)),
            owner_references: Some(vec![self.owner.clone()]),
            ..Default::default()
        }
    }

    fn client_tls_secret(&self) -> Option<&str> {
        self.cluster
            .spec
            .tls
            .as_ref()
            .and_then(|t| t.client_secret_name.as_deref())
    }

    fn peer_tls_secret(&self) -> Option<&str> {
        self.cluster
            .spec
            .tls
            .as_ref()
            .and_then(|t| t.peer_secret_name.as_deref())
    }
}

/// Labels of the pods: the user's extra labels, then ours (ours win).
fn pod_labels(
    names: &ClusterNames,
    extra: Option<&BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let mut labels = extra.cloned().unwrap_or_default();
    labels.extend(names.labels("member"));
    labels
}

/// Bytes in a Kubernetes quantity (`10Gi`, `500M`, `1e9`), for comparing volume sizes.
pub fn quantity_bytes(q: &Quantity) -> Option<u128> {
    let text = q.0.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1000,
        "M" => 1000u128.pow(2),
        "G" => 1000u128.pow(3),
        "T" => 1000u128.pow(4),
        "P" => 1000u128.pow(5),
        "E" => 1000u128.pow(6),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        s if s.starts_with(['e', 'E']) => 10u128.checked_pow(s[1..].parse().ok()?)?,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let mut bytes = whole.checked_mul(multiplier)?;
    if !fraction.is_empty() {
        let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
        let frac: u128 = fraction.parse().ok()?;
        bytes = bytes.checked_add(frac.checked_mul(multiplier)? / scale)?;
    }
    Some(bytes)
}

/// The size to patch a claim to when the spec asks for more than it has; `None` when it is
/// big enough, or when the spec asks for less (volumes never shrink).
pub fn volume_growth(desired: &Quantity, current: &Quantity) -> Option<Quantity> {
    let (want, have) = (quantity_bytes(desired)?, quantity_bytes(current)?);
    (want > have).then(|| desired.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{MetaStoreClusterSpec, StorageSpec, TlsSpec};

    /// A cluster as read from the API: `demo` in `db`, with a uid.
    pub fn cluster(replicas: i32) -> MetaStoreCluster {
        let spec = MetaStoreClusterSpec {
            replicas,
            version: Some("1.2.0".into()),
            image: None,
            storage: StorageSpec::default(),
            resources: None,
            tls: None,
            pod: None,
            config: BTreeMap::new(),
            pod_disruption_budget: None,
            maintenance: None,
            backup: None,
            bootstrap: None,
            step_timeout_seconds: None,
        };
        let mut c = MetaStoreCluster::new("demo", spec);
        c.metadata.namespace = Some("db".into());
        c.metadata.uid = Some("0b1c2d3e".into());
        c
    }

    pub fn with_tls(mut c: MetaStoreCluster) -> MetaStoreCluster {
        c.spec.tls = Some(TlsSpec {
            client_secret_name: Some("demo-client-tls".into()),
            peer_secret_name: Some("demo-peer-tls".into()),
        });
        c
    }

    pub fn params(replicas: i32) -> RenderParams {
        RenderParams {
            image: "ghcr.io/metastore/metastore:v1.2.0".into(),
            replicas,
            initial_cluster_state: InitialClusterState::New,
            initial_members: (0..replicas).collect(),
            storage_format: 1,
            existing_claim_templates: None,
        }
    }

    #[test]
    fn every_object_is_owned_and_labelled() {
        let c = cluster(3);
        let r = Renderer::new(&c).expect("renderer");
        let objects = r.render(&params(3));
        let metas = [
            &objects.peer_service.metadata,
            &objects.client_service.metadata,
            &objects.config_map.metadata,
            &objects.statefulset.metadata,
            &objects.pdb.as_ref().expect("pdb on by default").metadata,
        ];
        for meta in metas {
            let owner = &meta.owner_references.as_ref().expect("owner refs")[0];
            assert_eq!(owner.kind, "MetaStoreCluster");
            assert_eq!(owner.api_version, "metastore.io/v1alpha1");
            assert_eq!(owner.name, "demo");
            assert_eq!(owner.uid, "0b1c2d3e");
            assert_eq!(owner.controller, Some(true));
            assert_eq!(meta.namespace.as_deref(), Some("db"));
            let labels = meta.labels.as_ref().expect("labels");
            assert_eq!(labels["app.kubernetes.io/name"], "metastore");
            assert_eq!(labels["app.kubernetes.io/instance"], "demo");
            assert_eq!(labels["app.kubernetes.io/managed-by"], "metastore-operator");
            assert!(labels.contains_key("app.kubernetes.io/component"));
        }
    }

    #[test]
    fn renderer_needs_an_object_from_the_api() {
        let mut c = cluster(3);
        c.metadata.uid = None;
        assert!(matches!(
            Renderer::new(&c),
            Err(Error::MissingObjectKey("metadata.uid"))
        ));
    }

    #[test]
    fn quantities() {
        let cases = [
            ("10Gi", Some(10u128 << 30)),
            ("1.5Gi", Some(3u128 << 29)),
            ("500M", Some(500_000_000)),
            ("1e3", Some(1000)),
            ("1024", Some(1024)),
            ("", None),
            ("Gi", None),
            ("10Zi", None),
        ];
        for (text, want) in cases {
            assert_eq!(quantity_bytes(&Quantity(text.into())), want, "{text}");
        }
        let q = |s: &str| Quantity(s.into());
        assert_eq!(volume_growth(&q("20Gi"), &q("10Gi")), Some(q("20Gi")));
        assert_eq!(volume_growth(&q("10Gi"), &q("10737418240")), None);
        assert_eq!(volume_growth(&q("5Gi"), &q("10Gi")), None);
    }
}
