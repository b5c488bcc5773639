//! The storage format migration Job: `metastore-ctl migrate --to N --wait` against the client
//! Service, with the same image as the members (so the tool knows the formats they know).

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec,
    PodTemplateSpec, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::statefulset::{CLIENT_TLS_DIR, RUN_AS};
use super::Renderer;

impl Renderer<'_> {
    /// The Job migrating the cluster to format `to`, run with `image`.
    pub fn migration_job(&self, to: i32, image: &str) -> Job {
        let args = vec![
            "migrate".to_string(),
            format!("--to={to}"),
            "--wait".to_string(),
        ];
        let mut labels = self.names.labels("migration");
        labels.insert("metastore.io/target-format".into(), to.to_string());
        self.ctl_job(CtlJob {
            name: self.names.migration_job(to),
            component: "migration",
            container: "migrate",
            labels,
            args,
            volumes: Vec::new(),
            mounts: Vec::new(),
            backoff_limit: 2,
            ttl_seconds_after_finished: None,
            image: image.to_string(),
        })
    }

    /// The Job taking backup `name` into `spec.backup.claimName` with `image`: followers
    /// first, verified, then only the newest `keep` backups kept; the manifest is the
    /// container's termination message, where the operator reads the result.
    pub fn backup_job(&self, name: &str, image: &str) -> Option<Job> {
        let spec = self.cluster.spec.backup.as_ref()?;
        let args = vec![
            "backup".to_string(),
            format!("--dir={BACKUP_DIR}"),
            format!("--name={name}"),
            format!("--cluster={}/{}", self.names.namespace(), self.names.name()),
            format!("--keep={}", spec.keep),
            "--termination-message-path=/dev/termination-log".to_string(),
        ];
        let mut labels = self.names.labels("backup");
        labels.insert("metastore.io/backup".into(), name.to_string());
        Some(self.ctl_job(CtlJob {
            name: name.to_string(),
            component: "backup",
            container: "backup",
            labels,
            args,
            volumes: vec![Volume {
                name: "backups".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: spec.claim_name.clone(),
                    read_only: Some(false),
                }),
                ..Default::default()
            }],
            mounts: vec![VolumeMount {
                name: "backups".into(),
                mount_path: BACKUP_DIR.into(),
                ..Default::default()
            }],
            backoff_limit: 1,
            ttl_seconds_after_finished: Some(BACKUP_JOB_TTL_SECONDS),
            image: image.to_string(),
        }))
    }

    /// A Job running `metastore-ctl <args> --endpoints=<client Service>` (plus the client
    /// certificate with TLS) as the members' user, read-only root, no privileges.
    fn ctl_job(&self, j: CtlJob) -> Job {
        let mut args = j.args;
        args.push(format!("--endpoints={}", self.names.service_url()));
        let mut volumes = j.volumes;
        let mut mounts = j.mounts;
        if let Some(secret) = self.client_tls_secret() {
            args.extend([
                format!("--cacert={CLIENT_TLS_DIR}/ca.crt"),
                format!("--cert={CLIENT_TLS_DIR}/tls.crt"),
                format!("--key={CLIENT_TLS_DIR}/tls.key"),
            ]);
            volumes.push(Volume {
                name: "client-tls".into(),
                secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
                    secret_name: Some(secret.into()),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "client-tls".into(),
                mount_path: CLIENT_TLS_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            });
        }
        Job {
            metadata: ObjectMeta {
                labels: Some(j.labels.clone()),
                ..self.meta(j.name, j.component)
            },
            spec: Some(JobSpec {
                backoff_limit: Some(j.backoff_limit),
                ttl_seconds_after_finished: j.ttl_seconds_after_finished,
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some(j.labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        containers: vec![Container {
                            name: j.container.into(),
                            image: Some(j.image),
                            command: Some(vec!["metastore-ctl".into()]),
                            args: Some(args),
                            volume_mounts: (!mounts.is_empty()).then_some(mounts),
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
                        volumes: (!volumes.is_empty()).then_some(volumes),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(RUN_AS),
                            run_as_group: Some(RUN_AS),
                            fs_group: Some(RUN_AS),
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

/// Where a backup Job mounts the backup volume (and a restoring member the backup's).
pub const BACKUP_DIR: &str = "/backups";
/// A finished backup Job is deleted after a day (its result stays in `status.backups`).
pub const BACKUP_JOB_TTL_SECONDS: i32 = 86_400;

struct CtlJob {
    name: String,
    component: &'static str,
    container: &'static str,
    labels: std::collections::BTreeMap<String, String>,
    args: Vec<String>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
    backoff_limit: i32,
    ttl_seconds_after_finished: Option<i32>,
    image: String,
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

    #[test]
    fn backup_job_writes_to_the_claim_and_reports_through_its_termination_message() {
        let mut c = cluster(3);
        assert!(Renderer::new(&c)
            .expect("renderer")
            .backup_job("demo-backup-1", "img")
            .is_none());
        c.spec.backup = Some(crate::crd::BackupSpec {
            claim_name: "backups".into(),
            schedule: None,
            keep: 3,
            request: None,
        });
        let job = Renderer::new(&c)
            .expect("renderer")
            .backup_job("demo-backup-1", "img")
            .expect("job");
        assert_eq!(job.metadata.name.as_deref(), Some("demo-backup-1"));
        let labels = job.metadata.labels.as_ref().expect("labels");
        assert_eq!(labels["app.kubernetes.io/component"], "backup");
        assert_eq!(labels["metastore.io/backup"], "demo-backup-1");
        let spec = job.spec.as_ref().expect("spec");
        assert_eq!(
            spec.ttl_seconds_after_finished,
            Some(BACKUP_JOB_TTL_SECONDS)
        );
        let pod = spec.template.spec.as_ref().expect("pod");
        let container = &pod.containers[0];
        assert_eq!(
            container.args.clone().unwrap_or_default(),
            [
                "backup",
                "--dir=/backups",
                "--name=demo-backup-1",
                "--cluster=db/demo",
                "--keep=3",
                "--termination-message-path=/dev/termination-log",
                "--endpoints=http://demo-client.db.svc:2379"
            ]
        );
        let volume = &pod.volumes.as_ref().expect("volumes")[0];
        assert_eq!(
            volume
                .persistent_volume_claim
                .as_ref()
                .map(|p| p.claim_name.as_str()),
            Some("backups")
        );
        assert_eq!(
            container.volume_mounts.as_ref().expect("mounts")[0].mount_path,
            BACKUP_DIR
        );
        // The volume is writable by the members' user.
        assert_eq!(
            pod.security_context.as_ref().and_then(|s| s.fs_group),
            Some(RUN_AS)
        );
    }
}
