//! The StatefulSet running the members.
//!
//! Known StatefulSet traps and how this handles them:
//! - `updateStrategy: OnDelete`: the controller never replaces pods on its own; the operator
//!   picks the order (followers first, leader last, one at a time).
//! - `podManagementPolicy: Parallel`: all bootstrap members start together (with `OrderedReady`
//!   member 0 would wait forever for a quorum it cannot have alone).
//! - Bootstrap flags come from the ConfigMap through environment variables, so a pod that comes
//!   back with an empty volume starts with the current membership, not the one it was born with.
//! - Claim templates are immutable: they are sent back as they are, and volume growth patches
//!   the claims; `whenScaled: Delete` drops a removed member's volume so a later scale up starts
//!   clean instead of finding another member's data.

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapKeySelector, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount, VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::job::BACKUP_DIR;
use super::services::{KEY_INITIAL_CLUSTER, KEY_INITIAL_CLUSTER_STATE, KEY_STORAGE_FORMAT};
use super::{pod_labels, RenderParams, Renderer, DEFAULT_VOLUME_SIZE};
use crate::crd::{Engine, OPERATOR_OWNED_FLAGS};
use crate::naming::{CLIENT_PORT, DATA_DIR, PEER_PORT};

/// Name of the server container.
pub const CONTAINER: &str = "metastore";
/// HTTP port for `/health` and `/metrics` when the client port requires TLS client certificates
/// (the kubelet cannot present one).
pub const METRICS_PORT: i32 = 2381;
/// Where the client TLS Secret is mounted.
pub const CLIENT_TLS_DIR: &str = "/etc/metastore/tls/client";
/// Where the peer TLS Secret is mounted.
pub const PEER_TLS_DIR: &str = "/etc/metastore/tls/peer";
/// UID and GID the server runs as (distroless `nonroot`).
pub const RUN_AS: i64 = 65532;
/// Name of the data volume (and of its claim template).
pub const DATA_VOLUME: &str = "data";

fn env_from_config_map(name: &str, config_map: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: config_map.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn non_empty_vec<T>(v: Vec<T>) -> Option<Vec<T>> {
    (!v.is_empty()).then_some(v)
}

fn non_empty_map(
    m: std::collections::BTreeMap<String, String>,
) -> Option<std::collections::BTreeMap<String, String>> {
    (!m.is_empty()).then_some(m)
}

impl Renderer<'_> {
    /// The server's command line: etcd-style flags built from the stable pod DNS names.
    /// `$(VAR)` is expanded by the kubelet from the container's environment.
    pub fn args(&self) -> Vec<String> {
        let n = &self.names;
        let client = if self.client_tls_secret().is_some() {
            "https"
        } else {
            "http"
        };
        let peer = if self.peer_tls_secret().is_some() {
            "https"
        } else {
            "http"
        };
        let host = format!("$(POD_NAME).{}.{}.svc", n.peer_service(), n.namespace());
        let mut args = vec![
            "--name=$(POD_NAME)".to_string(),
            "--initial-cluster=$(INITIAL_CLUSTER)".to_string(),
            "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)".to_string(),
            format!("--initial-cluster-token={}", n.cluster_token()),
            format!("--data-dir={DATA_DIR}"),
            format!("--listen-client-urls={client}://0.0.0.0:{CLIENT_PORT}"),
            format!("--advertise-client-urls={client}://{host}:{CLIENT_PORT}"),
            format!("--listen-peer-urls={peer}://0.0.0.0:{PEER_PORT}"),
            format!("--initial-advertise-peer-urls={peer}://{host}:{PEER_PORT}"),
            format!("--engine={}", self.cluster.spec.storage.engine.as_flag()),
            "--storage-format=$(STORAGE_FORMAT)".to_string(),
        ];
        if self.client_tls_secret().is_some() {
            args.extend([
                format!("--cert-file={CLIENT_TLS_DIR}/tls.crt"),
                format!("--key-file={CLIENT_TLS_DIR}/tls.key"),
                format!("--trusted-ca-file={CLIENT_TLS_DIR}/ca.crt"),
                "--client-cert-auth".to_string(),
                format!("--listen-metrics-urls=http://0.0.0.0:{METRICS_PORT}"),
            ]);
        }
        if self.peer_tls_secret().is_some() {
            args.extend([
                format!("--peer-cert-file={PEER_TLS_DIR}/tls.crt"),
                format!("--peer-key-file={PEER_TLS_DIR}/tls.key"),
                format!("--peer-trusted-ca-file={PEER_TLS_DIR}/ca.crt"),
                "--peer-client-cert-auth".to_string(),
            ]);
        }
        if let Some(c) = self
            .cluster
            .spec
            .maintenance
            .as_ref()
            .and_then(|m| m.compaction.as_ref())
        {
            args.extend([
                format!("--auto-compaction-mode={}", c.mode.as_flag()),
                format!("--auto-compaction-retention={}", c.retention),
            ]);
        }
        // The CEL rule already refuses owned flags; skipping them here keeps an object written
        // before the rule existed from overriding the bootstrap flags.
        args.extend(
            self.cluster
                .spec
                .config
                .iter()
                .filter(|(k, _)| !OPERATOR_OWNED_FLAGS.contains(&k.as_str()))
                .map(|(k, v)| format!("--{k}={v}")),
        );
        args
    }

    fn container(&self, image: &str) -> Container {
        let config_map = self.names.config_map();
        let mut mounts = vec![
            mount(DATA_VOLUME, DATA_DIR, false),
            mount("tmp", "/tmp", false),
        ];
        if self.client_tls_secret().is_some() {
            mounts.push(mount("client-tls", CLIENT_TLS_DIR, true));
        }
        if self.peer_tls_secret().is_some() {
            mounts.push(mount("peer-tls", PEER_TLS_DIR, true));
        }
        let mut ports = vec![
            ContainerPort {
                name: Some("client".into()),
                container_port: CLIENT_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("peer".into()),
                container_port: PEER_PORT,
                ..Default::default()
            },
        ];
        let health_port = if self.client_tls_secret().is_some() {
            ports.push(ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                ..Default::default()
            });
            METRICS_PORT
        } else {
            CLIENT_PORT
        };
        Container {
            name: CONTAINER.into(),
            image: Some(image.into()),
            command: Some(vec!["metastore".into()]),
            args: Some(self.args()),
            env: Some(vec![
                env_from_field("POD_NAME", "metadata.name"),
                env_from_field("POD_NAMESPACE", "metadata.namespace"),
                env_from_config_map("INITIAL_CLUSTER", &config_map, KEY_INITIAL_CLUSTER),
                env_from_config_map(
                    "INITIAL_CLUSTER_STATE",
                    &config_map,
                    KEY_INITIAL_CLUSTER_STATE,
                ),
                env_from_config_map("STORAGE_FORMAT", &config_map, KEY_STORAGE_FORMAT),
            ]),
            ports: Some(ports),
            readiness_probe: Some(Probe {
                http_get: Some(HTTPGetAction {
                    path: Some("/health".into()),
                    port: IntOrString::Int(health_port),
                    scheme: Some("HTTP".into()),
                    ..Default::default()
                }),
                period_seconds: Some(5),
                timeout_seconds: Some(3),
                failure_threshold: Some(3),
                ..Default::default()
            }),
            resources: self.cluster.spec.resources.clone(),
            security_context: Some(SecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                read_only_root_filesystem: Some(true),
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            volume_mounts: Some(mounts),
            ..Default::default()
        }
    }

    /// With `spec.bootstrap.restore`: the init container restoring the backup into the
    /// member's empty volume (`metastore snapshot restore`, the SHA-256 recorded beside the
    /// backup checked first, the ids computed from the same flags the server gets). It restores
    /// only while the cluster is new (`--initial-cluster-state` from the ConfigMap, as the
    /// server's): a member whose volume already holds data (a restarted pod) is left as it is,
    /// and members added later (`existing`) join empty, as learners, and catch up by Raft. The
    /// container stays in the template, so the bootstrap's end changes no pod.
    fn restore_container(&self, params: &RenderParams) -> Option<(Container, Volume)> {
        let restore = self
            .cluster
            .spec
            .bootstrap
            .as_ref()
            .and_then(|b| b.restore.as_ref())?;
        if self.cluster.spec.storage.engine == Engine::Memory {
            return None;
        }
        let n = &self.names;
        let peer = if self.peer_tls_secret().is_some() {
            "https"
        } else {
            "http"
        };
        let host = format!("$(POD_NAME).{}.{}.svc", n.peer_service(), n.namespace());
        let source = "backup-source";
        let container = Container {
            name: "restore".into(),
            image: Some(params.image.clone()),
            command: Some(vec!["metastore".into()]),
            args: Some(vec![
                "snapshot".into(),
                "restore".into(),
                format!("{BACKUP_DIR}/{}.snapshot", restore.backup),
                "--skip-if-initialized".into(),
                "--name=$(POD_NAME)".into(),
                "--initial-cluster=$(INITIAL_CLUSTER)".into(),
                "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)".into(),
                format!("--initial-cluster-token={}", n.cluster_token()),
                format!("--initial-advertise-peer-urls={peer}://{host}:{PEER_PORT}"),
                format!("--data-dir={DATA_DIR}"),
            ]),
            env: Some(vec![
                env_from_field("POD_NAME", "metadata.name"),
                env_from_config_map(
                    "INITIAL_CLUSTER",
                    &self.names.config_map(),
                    KEY_INITIAL_CLUSTER,
                ),
                env_from_config_map(
                    "INITIAL_CLUSTER_STATE",
                    &self.names.config_map(),
                    KEY_INITIAL_CLUSTER_STATE,
                ),
            ]),
            volume_mounts: Some(vec![
                mount(DATA_VOLUME, DATA_DIR, false),
                mount(source, BACKUP_DIR, true),
            ]),
            security_context: self.container(&params.image).security_context,
            ..Default::default()
        };
        let volume = Volume {
            name: source.into(),
            persistent_volume_claim: Some(
                k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource {
                    claim_name: restore.claim_name.clone(),
                    read_only: Some(true),
                },
            ),
            ..Default::default()
        };
        Some((container, volume))
    }

    /// Soft anti-affinity spreading members over nodes, when the spec sets no affinity.
    fn default_affinity(&self) -> Affinity {
        Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_labels: Some(self.names.selector_labels()),
                                ..Default::default()
                            }),
                            topology_key: "kubernetes.io/hostname".into(),
                            ..Default::default()
                        },
                    },
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn claim_template(&self) -> PersistentVolumeClaim {
        let storage = &self.cluster.spec.storage;
        let size = storage
            .size
            .clone()
            .unwrap_or_else(|| Quantity(DEFAULT_VOLUME_SIZE.into()));
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(DATA_VOLUME.into()),
                labels: Some(self.names.labels("member")),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some([("storage".to_string(), size)].into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The StatefulSet.
    pub fn statefulset(&self, params: &RenderParams) -> StatefulSet {
        let spec = &self.cluster.spec;
        let overrides = spec.pod.clone().unwrap_or_default();
        let memory = spec.storage.engine == Engine::Memory;

        let mut volumes = vec![Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        }];
        if memory {
            volumes.push(Volume {
                name: DATA_VOLUME.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            });
        }
        if let Some(secret) = self.client_tls_secret() {
            volumes.push(secret_volume("client-tls", secret));
        }
        if let Some(secret) = self.peer_tls_secret() {
            volumes.push(secret_volume("peer-tls", secret));
        }
        let claim_templates = if memory {
            None
        } else {
            Some(
                params
                    .existing_claim_templates
                    .clone()
                    .unwrap_or_else(|| vec![self.claim_template()]),
            )
        };

        let restore = self.restore_container(params).map(|(c, v)| {
            volumes.push(v);
            vec![c]
        });
        let pod = PodSpec {
            init_containers: restore,
            containers: vec![self.container(&params.image)],
            volumes: Some(volumes),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                fs_group_change_policy: Some("OnRootMismatch".into()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            affinity: Some(
                overrides
                    .affinity
                    .clone()
                    .unwrap_or_else(|| self.default_affinity()),
            ),
            tolerations: non_empty_vec(overrides.tolerations.clone()),
            node_selector: non_empty_map(overrides.node_selector.clone()),
            topology_spread_constraints: non_empty_vec(
                overrides.topology_spread_constraints.clone(),
            ),
            priority_class_name: overrides.priority_class_name.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(30),
            ..Default::default()
        };

        StatefulSet {
            metadata: self.meta(self.names.statefulset(), "member"),
            spec: Some(StatefulSetSpec {
                replicas: Some(params.replicas),
                service_name: Some(self.names.peer_service()),
                pod_management_policy: Some("Parallel".into()),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("OnDelete".into()),
                    ..Default::default()
                }),
                persistent_volume_claim_retention_policy: (!memory).then(|| {
                    StatefulSetPersistentVolumeClaimRetentionPolicy {
                        when_scaled: Some("Delete".into()),
                        when_deleted: Some("Retain".into()),
                    }
                }),
                selector: LabelSelector {
                    match_labels: Some(self.names.selector_labels()),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(pod_labels(&self.names, Some(&overrides.labels))),
                        annotations: non_empty_map(overrides.annotations.clone()),
                        ..Default::default()
                    }),
                    spec: Some(pod),
                },
                volume_claim_templates: claim_templates,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Toleration;

    use super::super::tests::{cluster, params, with_tls};
    use super::*;
    use crate::crd::PodOverrides;

    fn render(c: &crate::crd::MetaStoreCluster) -> StatefulSet {
        Renderer::new(c)
            .expect("renderer")
            .statefulset(&params(c.spec.replicas))
    }

    fn pod_spec(sts: &StatefulSet) -> &PodSpec {
        sts.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("pod spec")
    }

    fn container(sts: &StatefulSet) -> &Container {
        &pod_spec(sts).containers[0]
    }

    #[test]
    fn statefulset_shape() {
        let sts = render(&cluster(3));
        assert_eq!(sts.metadata.name.as_deref(), Some("demo"));
        let spec = sts.spec.as_ref().expect("spec");
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("demo-peer"));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(
            spec.update_strategy
                .as_ref()
                .and_then(|u| u.type_.as_deref()),
            Some("OnDelete")
        );
        let retention = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .expect("retention policy");
        assert_eq!(retention.when_scaled.as_deref(), Some("Delete"));
        assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
        let selector = spec.selector.match_labels.as_ref().expect("selector");
        let labels = spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .expect("labels");
        for (k, v) in selector {
            assert_eq!(labels.get(k), Some(v), "pod labels must match the selector");
        }
        assert_eq!(
            container(&sts).image.as_deref(),
            Some("ghcr.io/metastore/metastore:v1.2.0")
        );
        assert_eq!(container(&sts).command, Some(vec!["metastore".to_string()]));
    }

    #[test]
    fn args_are_etcd_style_bootstrap_flags() {
        let c = cluster(3);
        let args = Renderer::new(&c).expect("renderer").args();
        assert_eq!(
            args,
            [
                "--name=$(POD_NAME)",
                "--initial-cluster=$(INITIAL_CLUSTER)",
                "--initial-cluster-state=$(INITIAL_CLUSTER_STATE)",
                "--initial-cluster-token=db-demo",
                "--data-dir=/var/lib/metastore",
                "--listen-client-urls=http://0.0.0.0:2379",
                "--advertise-client-urls=http://$(POD_NAME).demo-peer.db.svc:2379",
                "--listen-peer-urls=http://0.0.0.0:2380",
                "--initial-advertise-peer-urls=http://$(POD_NAME).demo-peer.db.svc:2380",
                "--engine=rocksdb",
                "--storage-format=$(STORAGE_FORMAT)",
            ]
        );
    }

    #[test]
    fn env_comes_from_the_downward_api_and_the_config_map() {
        let sts = render(&cluster(3));
        let env = container(&sts).env.as_ref().expect("env");
        let source = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.clone())
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(
            source("POD_NAME")
                .field_ref
                .map(|f| f.field_path)
                .as_deref(),
            Some("metadata.name")
        );
        for (var, key) in [
            ("INITIAL_CLUSTER", "initial-cluster"),
            ("INITIAL_CLUSTER_STATE", "initial-cluster-state"),
            ("STORAGE_FORMAT", "storage-format"),
        ] {
            let cm = source(var).config_map_key_ref.expect("configMapKeyRef");
            assert_eq!((cm.name.as_str(), cm.key.as_str()), ("demo-config", key));
        }
    }

    #[test]
    fn readiness_probe_and_security_context() {
        let sts = render(&cluster(3));
        let c = container(&sts);
        let probe = c
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("probe");
        assert_eq!(probe.path.as_deref(), Some("/health"));
        assert_eq!(probe.port, IntOrString::Int(2379));
        assert_eq!(probe.scheme.as_deref(), Some("HTTP"));
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let pod_sc = pod_spec(&sts)
            .security_context
            .as_ref()
            .expect("pod security context");
        assert_eq!(pod_sc.run_as_non_root, Some(true));
        assert_eq!(pod_sc.fs_group, Some(RUN_AS));
        let mounts: Vec<&str> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| m.mount_path.as_str())
            .collect();
        assert_eq!(
            mounts,
            ["/var/lib/metastore", "/tmp"],
            "writable paths under a read-only root"
        );
    }

    #[test]
    fn tls_secrets_are_mounted_and_urls_switch_to_https() {
        let c = with_tls(cluster(3));
        let sts = render(&c);
        let args = container(&sts).args.clone().unwrap_or_default();
        for flag in [
            "--listen-client-urls=https://0.0.0.0:2379",
            "--advertise-client-urls=https://$(POD_NAME).demo-peer.db.svc:2379",
            "--initial-advertise-peer-urls=https://$(POD_NAME).demo-peer.db.svc:2380",
            "--cert-file=/etc/metastore/tls/client/tls.crt",
            "--trusted-ca-file=/etc/metastore/tls/client/ca.crt",
            "--client-cert-auth",
            "--peer-key-file=/etc/metastore/tls/peer/tls.key",
            "--peer-client-cert-auth",
            "--listen-metrics-urls=http://0.0.0.0:2381",
        ] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        let secrets: Vec<(String, Option<String>)> = pod_spec(&sts)
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| Some((v.name.clone(), v.secret.as_ref()?.secret_name.clone())))
            .collect();
        assert_eq!(
            secrets,
            [
                (
                    "client-tls".to_string(),
                    Some("demo-client-tls".to_string())
                ),
                ("peer-tls".to_string(), Some("demo-peer-tls".to_string())),
            ]
        );
        let probe = container(&sts)
            .readiness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("probe");
        assert_eq!(
            probe.port,
            IntOrString::Int(METRICS_PORT),
            "kubelet has no client cert"
        );
    }

    #[test]
    fn storage_engine_and_volumes() {
        let mut c = cluster(3);
        c.spec.storage.size = Some(Quantity("50Gi".into()));
        c.spec.storage.storage_class_name = Some("fast".into());
        let sts = render(&c);
        let claims = sts
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .expect("claims");
        assert_eq!(claims.len(), 1);
        let claim = claims[0].spec.as_ref().expect("claim spec");
        assert_eq!(claim.storage_class_name.as_deref(), Some("fast"));
        let requests = claim
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(requests["storage"], Quantity("50Gi".into()));

        // Existing claim templates are sent back unchanged (they are immutable).
        let mut p = params(3);
        let mut old = claims[0].clone();
        old.metadata.labels = None;
        p.existing_claim_templates = Some(vec![old.clone()]);
        let again = Renderer::new(&c).expect("renderer").statefulset(&p);
        assert_eq!(
            again.spec.and_then(|s| s.volume_claim_templates),
            Some(vec![old])
        );

        // The memory engine keeps its data in an emptyDir and has no claims.
        let mut m = cluster(3);
        m.spec.storage.engine = Engine::Memory;
        let sts = render(&m);
        let spec = sts.spec.as_ref().expect("spec");
        assert_eq!(spec.volume_claim_templates, None);
        assert_eq!(spec.persistent_volume_claim_retention_policy, None);
        assert!(pod_spec(&sts)
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == DATA_VOLUME && v.empty_dir.is_some()));
        assert!(container(&sts)
            .args
            .iter()
            .flatten()
            .any(|a| a == "--engine=memory"));
    }

    #[test]
    fn pod_overrides_apply_and_our_labels_win() {
        let mut c = cluster(3);
        c.spec.pod = Some(PodOverrides {
            labels: BTreeMap::from([
                ("team".to_string(), "storage".to_string()),
                (
                    "app.kubernetes.io/instance".to_string(),
                    "hijack".to_string(),
                ),
            ]),
            annotations: BTreeMap::from([("a".to_string(), "b".to_string())]),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Exists".into()),
                ..Default::default()
            }],
            node_selector: BTreeMap::from([("disk".to_string(), "ssd".to_string())]),
            priority_class_name: Some("critical".into()),
            ..Default::default()
        });
        let sts = render(&c);
        let meta = sts
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .expect("meta");
        let labels = meta.labels.as_ref().expect("labels");
        assert_eq!(labels["team"], "storage");
        assert_eq!(labels["app.kubernetes.io/instance"], "demo");
        assert_eq!(
            meta.annotations.as_ref().map(|a| a["a"].as_str()),
            Some("b")
        );
        let pod = pod_spec(&sts);
        assert_eq!(pod.tolerations.as_ref().map(Vec::len), Some(1));
        assert_eq!(
            pod.node_selector.as_ref().map(|n| n["disk"].as_str()),
            Some("ssd")
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("critical"));
        // No affinity in the spec: members prefer distinct nodes.
        let anti = pod
            .affinity
            .as_ref()
            .and_then(|a| a.pod_anti_affinity.as_ref())
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .expect("default anti-affinity");
        assert_eq!(
            anti[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
    }

    #[test]
    fn extra_config_flags_are_appended_but_never_override_ours() {
        let mut c = cluster(3);
        c.spec.config = BTreeMap::from([
            ("quota-backend-bytes".to_string(), "8589934592".to_string()),
            ("snapshot-count".to_string(), "50000".to_string()),
            ("initial-cluster-state".to_string(), "new".to_string()),
            // Owned since spec.maintenance.compaction renders it.
            ("auto-compaction-retention".to_string(), "1h".to_string()),
        ]);
        let args = Renderer::new(&c).expect("renderer").args();
        let tail = &args[args.len() - 2..];
        assert_eq!(
            tail,
            ["--quota-backend-bytes=8589934592", "--snapshot-count=50000"]
        );
        assert!(!args.iter().any(|a| a.starts_with("--auto-compaction")));
        // From spec.maintenance.compaction instead.
        c.spec.maintenance = Some(crate::crd::MaintenanceSpec {
            compaction: Some(crate::crd::CompactionSpec {
                mode: crate::crd::CompactionMode::Revision,
                retention: "10000".into(),
            }),
            defragmentation: None,
        });
        let args = Renderer::new(&c).expect("renderer").args();
        assert!(args.contains(&"--auto-compaction-mode=revision".to_string()));
        assert!(args.contains(&"--auto-compaction-retention=10000".to_string()));
        assert_eq!(
            args.iter()
                .filter(|a| a.starts_with("--initial-cluster-state"))
                .count(),
            1
        );
    }

    #[test]
    fn a_new_cluster_restored_from_a_backup_gets_the_restore_init_container() {
        let mut c = cluster(3);
        c.spec.bootstrap = Some(crate::crd::BootstrapSpec {
            restore: Some(crate::crd::RestoreSpec {
                claim_name: "backups".into(),
                backup: "old-backup-1700000000".into(),
            }),
        });
        let new = params(3);
        let sts = Renderer::new(&c).expect("renderer").statefulset(&new);
        let pod = pod_spec(&sts);
        let init = &pod.init_containers.as_ref().expect("init containers")[0];
        assert_eq!(init.command, Some(vec!["metastore".to_string()]));
        let args = init.args.clone().unwrap_or_default();
        assert_eq!(
            &args[..4],
            [
                "snapshot",
                "restore",
                "/backups/old-backup-1700000000.snapshot",
                "--skip-if-initialized"
            ]
        );
        // The same identity flags as the server's, so the restored ids are the members' ids.
        let server = container(&sts).args.clone().unwrap_or_default();
        for flag in [
            "--name=",
            "--initial-cluster-state=",
            "--initial-cluster=",
            "--initial-cluster-token=",
            "--initial-advertise-peer-urls=",
            "--data-dir=",
        ] {
            let ours = args.iter().find(|a| a.starts_with(flag));
            let theirs = server.iter().find(|a| a.starts_with(flag));
            assert_eq!(ours, theirs, "{flag}");
        }
        let source = pod
            .volumes
            .as_ref()
            .and_then(|v| v.iter().find(|v| v.name == "backup-source"))
            .and_then(|v| v.persistent_volume_claim.as_ref())
            .expect("backup volume");
        assert_eq!(
            (source.claim_name.as_str(), source.read_only),
            ("backups", Some(true))
        );

        // Once the cluster exists the template is the same (no pod rolls); the ConfigMap's
        // `existing` makes the container restore nothing.
        let mut joined = params(3);
        joined.initial_cluster_state = crate::plan::InitialClusterState::Existing;
        let later = Renderer::new(&c).expect("renderer").statefulset(&joined);
        assert_eq!(pod_spec(&later), pod);
        // Without bootstrap.restore: none either.
        let sts = Renderer::new(&cluster(3))
            .expect("renderer")
            .statefulset(&new);
        assert!(pod_spec(&sts).init_containers.is_none());
    }
}
