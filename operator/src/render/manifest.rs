//! What `metastore-operator render --file cluster.yaml` prints: the objects the first
//! reconcile of a new cluster applies, as a YAML stream, for review and offline validation.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::{RenderParams, Renderer};
use crate::crd::MetaStoreCluster;
use crate::plan::{plan, Action, Observed};
use crate::{Error, Result};

/// The uid given to a manifest read from a file (the owner references need one).
pub const PREVIEW_UID: &str = "00000000-0000-0000-0000-000000000000";

/// Reads a `MetaStoreCluster` manifest, filling what the API server would: the namespace
/// (`default` when absent), a placeholder uid and generation 1.
///
/// # Errors
/// [`Error::Manifest`] when the text is not a `MetaStoreCluster`.
pub fn read_cluster(text: &str) -> Result<MetaStoreCluster> {
    let mut cluster: MetaStoreCluster =
        serde_yaml_ng::from_str(text).map_err(|e| Error::Manifest(e.to_string()))?;
    if cluster.namespace().is_none() {
        cluster.metadata.namespace = Some("default".into());
    }
    if cluster.metadata.uid.is_none() {
        cluster.metadata.uid = Some(PREVIEW_UID.into());
    }
    cluster.metadata.generation.get_or_insert(1);
    Ok(cluster)
}

/// The objects the first reconcile of `cluster` applies (nothing exists yet): Services,
/// ConfigMap, StatefulSet and, when enabled, the PodDisruptionBudget.
///
/// # Errors
/// When the cluster lacks a name, namespace or uid, or an object does not serialize.
pub fn first_reconcile(cluster: &MetaStoreCluster) -> Result<Vec<serde_json::Value>> {
    let renderer = Renderer::new(cluster)?;
    let observed = Observed {
        now: Timestamp::now(),
        cluster: None,
        statefulset: None,
        pods: Vec::new(),
        migration_job: None,
    };
    let decision = plan(cluster, &observed);
    let replicas = match decision.action {
        Action::Bootstrap { replicas } | Action::ScaleStatefulSet { replicas } => replicas,
        _ => cluster.spec.replicas,
    };
    let params =
        RenderParams::from_decision(&decision, replicas, cluster.spec.storage.format_version);
    let objects = renderer.render(&params);
    let mut out = vec![
        serde_json::to_value(&objects.peer_service)?,
        serde_json::to_value(&objects.client_service)?,
        serde_json::to_value(&objects.config_map)?,
        serde_json::to_value(&objects.statefulset)?,
    ];
    if let Some(pdb) = &objects.pdb {
        out.push(serde_json::to_value(pdb)?);
    }
    Ok(out)
}

/// `objects` as a YAML stream (`---` before each document).
///
/// # Errors
/// When an object does not serialize.
pub fn yaml_stream(objects: &[serde_json::Value]) -> Result<String> {
    let mut out = String::new();
    for object in objects {
        out.push_str("---\n");
        out.push_str(
            &serde_yaml_ng::to_string(object).map_err(|e| Error::Manifest(e.to_string()))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: &str = include_str!("../../../config/cluster-dev.yaml");
    const PRODUCTION: &str = include_str!("../../../config/cluster-production.yaml");

    fn kinds(objects: &[serde_json::Value]) -> Vec<String> {
        objects
            .iter()
            .map(|o| o["kind"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    #[test]
    fn samples_render_every_owned_object() {
        let dev = first_reconcile(&read_cluster(DEV).expect("dev parses")).expect("renders");
        assert_eq!(
            kinds(&dev),
            [
                "Service",
                "Service",
                "ConfigMap",
                "StatefulSet",
                "PodDisruptionBudget"
            ]
        );
        assert_eq!(dev[3]["spec"]["replicas"], 1);
        let production = first_reconcile(&read_cluster(PRODUCTION).expect("production parses"))
            .expect("renders");
        assert_eq!(production[3]["spec"]["replicas"], 3);
        assert_eq!(production[4]["spec"]["maxUnavailable"], 1);
        let pod = &production[3]["spec"]["template"]["spec"];
        assert!(
            pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                .is_array(),
            "{pod}"
        );
        for object in &production {
            assert_eq!(object["metadata"]["namespace"], "metastore");
            assert_eq!(object["metadata"]["ownerReferences"][0]["uid"], PREVIEW_UID);
        }
    }

    #[test]
    fn stream_has_one_document_per_object() {
        let objects = first_reconcile(&read_cluster(DEV).expect("parses")).expect("renders");
        let text = yaml_stream(&objects).expect("yaml");
        assert_eq!(text.matches("---\n").count(), objects.len());
    }

    #[test]
    fn not_a_cluster_is_an_error() {
        assert!(matches!(
            read_cluster("kind: [").map(|_| ()),
            Err(Error::Manifest(_))
        ));
    }
}
