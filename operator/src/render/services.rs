//! Services, the bootstrap ConfigMap and the PodDisruptionBudget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{RenderParams, Renderer};
use crate::naming::{CLIENT_PORT, PEER_PORT};

/// ConfigMap key of `--initial-cluster`.
pub const KEY_INITIAL_CLUSTER: &str = "initial-cluster";
/// ConfigMap key of `--initial-cluster-state`.
pub const KEY_INITIAL_CLUSTER_STATE: &str = "initial-cluster-state";
/// ConfigMap key of `--storage-format`.
pub const KEY_STORAGE_FORMAT: &str = "storage-format";

fn port(name: &str, port: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

impl Renderer<'_> {
    /// Headless Service: stable DNS names for the pods. It publishes not-ready pods, because
    /// members must reach each other before any of them is Ready.
    pub fn peer_service(&self) -> Service {
        Service {
            metadata: self.meta(self.names.peer_service(), "peer"),
            spec: Some(ServiceSpec {
                cluster_ip: Some("None".into()),
                publish_not_ready_addresses: Some(true),
                selector: Some(self.names.selector_labels()),
                ports: Some(vec![port("client", CLIENT_PORT), port("peer", PEER_PORT)]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Service clients connect to (Ready members only).
    pub fn client_service(&self) -> Service {
        Service {
            metadata: self.meta(self.names.client_service(), "client"),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                selector: Some(self.names.selector_labels()),
                ports: Some(vec![port("client", CLIENT_PORT)]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The values a member reads when it starts: the initial cluster, its state and the format
    /// of a new data directory. Changing them restarts nobody.
    pub fn config_map(&self, params: &RenderParams) -> ConfigMap {
        let data = BTreeMap::from([
            (
                KEY_INITIAL_CLUSTER.to_string(),
                self.names
                    .initial_cluster(params.initial_members.iter().copied()),
            ),
            (
                KEY_INITIAL_CLUSTER_STATE.to_string(),
                params.initial_cluster_state.as_str().to_string(),
            ),
            (
                KEY_STORAGE_FORMAT.to_string(),
                params.storage_format.to_string(),
            ),
        ]);
        ConfigMap {
            metadata: self.meta(self.names.config_map(), "config"),
            data: Some(data),
            ..Default::default()
        }
    }

    /// Quorum-aware PodDisruptionBudget: at most `(replicas - 1) / 2` members evicted at once,
    /// so voluntary disruptions never take the quorum. `None` when disabled.
    pub fn pdb(&self) -> Option<PodDisruptionBudget> {
        let settings = self
            .cluster
            .spec
            .pod_disruption_budget
            .clone()
            .unwrap_or_default();
        if !settings.enabled {
            return None;
        }
        let max_unavailable = settings
            .max_unavailable
            .unwrap_or((self.cluster.spec.replicas - 1) / 2);
        Some(PodDisruptionBudget {
            metadata: self.meta(self.names.pdb(), "member"),
            spec: Some(PodDisruptionBudgetSpec {
                max_unavailable: Some(IntOrString::Int(max_unavailable)),
                selector: Some(LabelSelector {
                    match_labels: Some(self.names.selector_labels()),
                    ..Default::default()
                }),
                // A member that is not Ready already costs the cluster its vote: evicting it
                // does not make things worse, and blocking on it would stall node drains.
                unhealthy_pod_eviction_policy: Some("AlwaysAllow".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster, params};
    use super::super::Renderer;
    use super::*;
    use crate::crd::PodDisruptionBudgetSpec as PdbSettings;
    use crate::plan::InitialClusterState;

    #[test]
    fn peer_service_is_headless_and_publishes_not_ready() {
        let c = cluster(3);
        let svc = Renderer::new(&c).expect("renderer").peer_service();
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-peer"));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [2379, 2380]);
        let selector = spec.selector.expect("selector");
        assert_eq!(selector["app.kubernetes.io/instance"], "demo");
        assert!(!selector.contains_key("app.kubernetes.io/component"));
    }

    #[test]
    fn client_service_serves_the_client_port() {
        let c = cluster(3);
        let svc = Renderer::new(&c).expect("renderer").client_service();
        assert_eq!(svc.metadata.name.as_deref(), Some("demo-client"));
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.cluster_ip, None);
        let ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
        assert_eq!(ports, [2379]);
    }

    #[test]
    fn config_map_carries_the_bootstrap_values() {
        let c = cluster(3);
        let r = Renderer::new(&c).expect("renderer");
        let cm = r.config_map(&params(3));
        let data = cm.data.expect("data");
        assert_eq!(
            data[KEY_INITIAL_CLUSTER],
            "demo-0=http://demo-0.demo-peer.db.svc:2380,\
             demo-1=http://demo-1.demo-peer.db.svc:2380,\
             demo-2=http://demo-2.demo-peer.db.svc:2380"
        );
        assert_eq!(data[KEY_INITIAL_CLUSTER_STATE], "new");
        assert_eq!(data[KEY_STORAGE_FORMAT], "1");

        let mut joined = params(3);
        joined.initial_cluster_state = InitialClusterState::Existing;
        joined.initial_members = vec![0, 1, 2, 3];
        joined.storage_format = 2;
        let data = r.config_map(&joined).data.expect("data");
        assert_eq!(data[KEY_INITIAL_CLUSTER_STATE], "existing");
        assert!(data[KEY_INITIAL_CLUSTER].ends_with("demo-3=http://demo-3.demo-peer.db.svc:2380"));
        assert_eq!(data[KEY_STORAGE_FORMAT], "2");
    }

    #[test]
    fn pdb_keeps_a_quorum() {
        // (replicas, override, enabled, expected maxUnavailable)
        let cases = [
            (1, None, true, Some(0)),
            (3, None, true, Some(1)),
            (5, None, true, Some(2)),
            (7, None, true, Some(3)),
            (5, Some(1), true, Some(1)),
            (3, None, false, None),
        ];
        for (replicas, max_unavailable, enabled, want) in cases {
            let mut c = cluster(replicas);
            c.spec.pod_disruption_budget = Some(PdbSettings {
                enabled,
                max_unavailable,
            });
            let pdb = Renderer::new(&c).expect("renderer").pdb();
            let got = pdb
                .as_ref()
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.max_unavailable.clone());
            assert_eq!(
                got,
                want.map(IntOrString::Int),
                "{replicas} {max_unavailable:?}"
            );
            if let Some(pdb) = pdb {
                let selector = pdb
                    .spec
                    .and_then(|s| s.selector)
                    .and_then(|s| s.match_labels);
                assert_eq!(
                    selector,
                    Some(
                        crate::naming::ClusterNames::new("demo", "db", false, false)
                            .selector_labels()
                    )
                );
            }
        }
    }
}
