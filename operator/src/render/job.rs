//! The storage format migration Job: `metastore-ctl migrate --to N --wait` against the client
//! Service, with the same image as the members (so the tool knows the formats they know).

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, PodSecurityContext, PodSpec, PodTemplateSpec, SeccompProfile,
    SecurityContext, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::statefulset::{CLIENT_TLS_DIR, RUN_AS};
use super::Renderer;

impl Renderer<'_> {
    /// The Job migrating the cluster to format `to`, run with `image`.
    pub fn migration_job(&self, to: i32, image: &str) -> Job {
        let mut args = vec![
            "migrate".to_string(),
            format!("--to={to}"),
            "--wait".to_string(),
            format!("--endpoints={}", self.names.service_url()),
        ];
        let mut volumes = None;
        let mut mounts = None;
        if let Some(secret) = self.client_tls_secret() {
            args.extend([
                format!("--cacert={CLIENT_TLS_DIR}/ca.crt"),
                format!("--cert={CLIENT_TLS_DIR}/tls.crt"),
                format!("--key={CLIENT_TLS_DIR}/tls.key"),
            ]);
            volumes = Some(vec![Volume {
                name: "client-tls".into(),
                secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
                    secret_name: Some(secret.into()),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
            mounts = Some(vec![k8s_openapi::api::core::v1::VolumeMount {
                name: "client-tls".into(),
                mount_path: CLIENT_TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            }]);
        }
        let mut labels = self.names.labels("migration");
        labels.insert("metastore.io/target-format".into(), to.to_string());
        Job {
            metadata: ObjectMeta {
                labels: Some(labels.clone()),
                ..self.meta(self.names.migration_job(to), "migration")
            },
            spec: Some(JobSpec {
                backoff_limit: Some(2),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        containers: vec![Container {
                            name: "migrate".into(),
                            image: Some(image.into()),
                            command: Some(vec!["metastore-ctl".into()]),
                            args: Some(args),
                            volume_mounts: mounts,
                            security_context: Some(SecurityContext {
                                run_as_non_root: Some(true),
                                read_only_root_filesystem: Some(true),
                                allow_privilege_escalation: Some(false),
                                capabilities: Some(Capabilities {
                                    drop: Some(vec!["ALL".into()]),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        volumes,
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(RUN_AS),
                            run_as_group: Some(RUN_AS),
                            seccomp_profile: Some(SeccompProfile {
                                type_: "RuntimeDefault".into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        automount_service_account_token: Some(false),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{cluster, with_tls};
    use super::*;

    #[test]
    fn migration_job_runs_metastore_ctl() {
        let c = cluster(3);
        let job = Renderer::new(&c)
            .expect("renderer")
            .migration_job(2, "ghcr.io/metastore/metastore:v1.3.0");
        assert_eq!(job.metadata.name.as_deref(), Some("demo-migrate-v2"));
        assert!(job.metadata.owner_references.is_some());
        let labels = job.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["metastore.io/target-format"], "2");
        assert_eq!(labels["app.kubernetes.io/component"], "migration");
        let spec = job.spec.as_ref().expect("spec");
        let pod = spec.template.spec.as_ref().expect("pod");
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let c = &pod.containers[0];
        assert_eq!(
            c.image.as_deref(),
            Some("ghcr.io/metastore/metastore:v1.3.0")
        );
        assert_eq!(c.command, Some(vec!["metastore-ctl".to_string()]));
        assert_eq!(
            c.args.clone().unwrap_or_default(),
            [
                "migrate",
                "--to=2",
                "--wait",
                "--endpoints=http://demo-client.db.svc:2379"
            ]
        );
    }

    #[test]
    fn migration_job_uses_the_client_certificate() {
        let c = with_tls(cluster(3));
        let job = Renderer::new(&c).expect("renderer").migration_job(2, "img");
        let pod = job.spec.and_then(|s| s.template.spec).expect("pod");
        let args = pod.containers[0].args.clone().unwrap_or_default();
        assert!(args.contains(&"--endpoints=https://demo-client.db.svc:2379".to_string()));
        assert!(args.contains(&"--cert=/etc/metastore/tls/client/tls.crt".to_string()));
        assert_eq!(
            pod.volumes
                .as_ref()
                .and_then(|v| v[0].secret.as_ref())
                .and_then(|s| s.secret_name.as_deref()),
            Some("demo-client-tls")
        );
    }
}
