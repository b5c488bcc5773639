//! The `MetaStoreCluster` custom resource (`metastore.io/v1alpha1`).
//!
//! The Rust types are the source of truth: `crdgen` prints the CRD from them and a test fails
//! when `crds/metastoreclusters.metastore.io.yaml` differs. Validation lives in the schema itself
//! as CEL rules (`x-kubernetes-validations`), so the apiserver rejects a bad spec before the
//! operator ever sees it:
//!
//! | rule | where |
//! |---|---|
//! | `replicas` is 1, 3, 5 or 7 | `spec.replicas` |
//! | `version` or `image` is set | `spec` |
//! | `storage.engine` never changes | `spec.storage.engine` (`self == oldSelf`) |
//! | `storage.formatVersion` never goes down | `spec.storage.formatVersion` (`self >= oldSelf`) |
//! | `config` does not override flags the operator owns | `spec.config` |
//! | `podDisruptionBudget.maxUnavailable` is at least 1 | schema minimum |
//! | `bootstrap` never changes | `spec.bootstrap` (`self == oldSelf`) |
//! | `backup.keep` is 1..1000 | schema range |
//!
//! The status is written only by the operator (server-side apply on the status subresource) and
//! is read back on every reconcile: [`Workflow`] is what lets an operator restart resume a
//! multi-step upgrade, scale or migration at exactly the step it was in.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Server flags the operator derives itself; `spec.config` may not set them.
///
/// Kept in one list because the CEL rule on `spec.config` and [`crate::render`] both use it.
pub const OPERATOR_OWNED_FLAGS: &[&str] = &[
    "name",
    "data-dir",
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "listen-client-urls",
    "advertise-client-urls",
    "listen-peer-urls",
    "initial-advertise-peer-urls",
    "engine",
    "storage-format",
    "cert-file",
    "key-file",
    "trusted-ca-file",
    "peer-cert-file",
    "peer-key-file",
    "peer-trusted-ca-file",
    "auto-compaction-mode",
    "auto-compaction-retention",
];

/// Default per-step deadline of a workflow, in seconds.
pub const DEFAULT_STEP_TIMEOUT_SECONDS: i64 = 600;

/// Desired state of a MetaStore cluster.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "metastore.io",
    version = "v1alpha1",
    kind = "MetaStoreCluster",
    plural = "metastoreclusters",
    shortname = "msc",
    namespaced,
    status = "MetaStoreClusterStatus",
    derive = "PartialEq",
    doc = "A MetaStore cluster: an etcd v3 compatible metadata store run as a StatefulSet",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Version","type":"string","jsonPath":".status.currentVersion"}"#,
    printcolumn = r#"{"name":"Format","type":"integer","jsonPath":".status.currentFormatVersion"}"#,
    printcolumn = r#"{"name":"Leader","type":"string","jsonPath":".status.leader"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(validation = Rule::new("has(self.version) || has(self.image)").message("set spec.version or spec.image"))]
#[serde(rename_all = "camelCase")]
pub struct MetaStoreClusterSpec {
    /// Number of voting members: 1, 3, 5 or 7 (an odd count keeps a strict majority).
    #[serde(default = "default_replicas")]
    #[x_kube(validation = Rule::new("self in [1, 3, 5, 7]").message("replicas must be 1, 3, 5 or 7"))]
    pub replicas: i32,

    /// MetaStore version to run (`1.4.2` or `v1.4.2`); the image is
    /// `ghcr.io/metastore/metastore:v<version>` unless `image` is set.
    /// Changing it starts a rolling upgrade (at most one minor version at a time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^v?[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$"))]
    pub version: Option<String>,

    /// Full image reference; overrides the image derived from `version`. When `version` is not
    /// set the version is read from the image tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Storage engine, on-disk format and volume.
    #[serde(default)]
    pub storage: StorageSpec,

    /// Compute resources of the `metastore` container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// TLS for client and peer traffic, from Secrets of type `kubernetes.io/tls` (with `ca.crt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    /// Scheduling and metadata overrides for the member pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodOverrides>,

    /// Extra server flags, without the leading `--` (`quota-backend-bytes: "8589934592"`).
    /// Flags the operator derives (name, URLs, cluster bootstrap, engine, TLS files) are refused.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new(
        "self.all(k, !(k in ['name', 'data-dir', 'initial-cluster', 'initial-cluster-state', \
         'initial-cluster-token', 'listen-client-urls', 'advertise-client-urls', 'listen-peer-urls', \
         'initial-advertise-peer-urls', 'engine', 'storage-format', 'cert-file', 'key-file', \
         'trusted-ca-file', 'peer-cert-file', 'peer-key-file', 'peer-trusted-ca-file', \
         'auto-compaction-mode', 'auto-compaction-retention']))"
    ).message("config may not set flags the operator manages"))]
    pub config: BTreeMap<String, String>,

    /// The quorum-aware PodDisruptionBudget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_disruption_budget: Option<PodDisruptionBudgetSpec>,

    /// Scheduled maintenance: the servers' own compaction, and defragmentation run by the
    /// operator member by member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceSpec>,

    /// Backups (`metastore-ctl backup` run as a Job) to a PersistentVolumeClaim: on a cron
    /// schedule, and on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupSpec>,

    /// How a new cluster starts: empty (the default) or restored from a backup. Read only
    /// while the cluster is first created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("bootstrap is immutable"))]
    pub bootstrap: Option<BootstrapSpec>,

    /// Deadline of one workflow step (one member upgraded, one learner caught up, the migration
    /// Job). A step that overruns it stops the workflow with a Degraded condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30))]
    pub step_timeout_seconds: Option<i64>,
}

fn default_replicas() -> i32 {
    3
}

impl MetaStoreClusterSpec {
    /// The per-step workflow deadline, in seconds.
    pub fn step_timeout_seconds(&self) -> i64 {
        self.step_timeout_seconds
            .unwrap_or(DEFAULT_STEP_TIMEOUT_SECONDS)
    }
}

/// Scheduled maintenance.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceSpec {
    /// History compaction, done by the members themselves (the leader proposes it through
    /// Raft): etcd's `--auto-compaction-mode` and `--auto-compaction-retention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction: Option<CompactionSpec>,
    /// Defragmentation by the operator, one member at a time, followers first, the leader last,
    /// only while the cluster is healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defragmentation: Option<DefragmentationSpec>,
}

/// What history the members keep.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(
    "self.mode == 'Periodic' ? self.retention.matches('^([0-9]+|([0-9]+(h|m|s))+)$') \
     : self.retention.matches('^[0-9]+$')"
).message("retention: a duration (1h, 30m) or a number of hours for Periodic, a number of revisions for Revision"))]
pub struct CompactionSpec {
    /// `Periodic` keeps the history of the last `retention` (a duration); `Revision` keeps the
    /// last `retention` revisions.
    pub mode: CompactionMode,
    /// `1h`, `30m`, or a number of hours (`Periodic`); a number of revisions (`Revision`).
    pub retention: String,
}

/// `--auto-compaction-mode`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CompactionMode {
    /// Keep a period of history.
    Periodic,
    /// Keep a number of revisions.
    Revision,
}

impl CompactionMode {
    /// The value of the server's `--auto-compaction-mode` flag.
    pub fn as_flag(self) -> &'static str {
        match self {
            CompactionMode::Periodic => "periodic",
            CompactionMode::Revision => "revision",
        }
    }
}

/// When a member is defragmented.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DefragmentationSpec {
    /// Defragment a member once this percentage of its database is reclaimable
    /// (`(dbSize - dbSizeInUse) / dbSize`, from its Status).
    #[serde(default = "default_free_percent")]
    #[schemars(range(min = 1, max = 99))]
    pub free_percent_threshold: i32,
    /// Never defragment a member whose database is smaller than this (bytes).
    #[serde(default = "default_min_db_size")]
    #[schemars(range(min = 0))]
    pub min_db_size_bytes: i64,
}

fn default_free_percent() -> i32 {
    50
}

fn default_min_db_size() -> i64 {
    64 << 20
}

impl Default for DefragmentationSpec {
    fn default() -> Self {
        DefragmentationSpec {
            free_percent_threshold: default_free_percent(),
            min_db_size_bytes: default_min_db_size(),
        }
    }
}

/// Backups to a volume.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupSpec {
    /// PersistentVolumeClaim (in the cluster's namespace) the backups are written to: for each
    /// backup `NAME`, `NAME.snapshot`, `NAME.snapshot.sha256` and `NAME.manifest.json`.
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// Cron schedule, 5 fields, UTC (`0 3 * * *`: daily at 03:00). Unset: on request only.
    /// Missed runs (operator down, cluster unhealthy) are caught up once, not one by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// Backups of this cluster kept in the volume; each successful backup removes older ones.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep: i32,
    /// Set or change this (any value, e.g. a timestamp) to take one backup now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

fn default_keep() -> i32 {
    7
}

/// How a new cluster starts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootstrapSpec {
    /// Restore every initial member from a backup (its SHA-256 checked first). The cluster
    /// gets the backup's keys and revision and a new cluster id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,
}

/// The backup a new cluster starts from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// PersistentVolumeClaim holding the backup, mounted read-only by every initial member
    /// (so with more than one member it must allow ReadOnlyMany, or the pods share a node).
    #[schemars(length(min = 1))]
    pub claim_name: String,
    /// The backup's name (`NAME.snapshot` and `NAME.snapshot.sha256` in the volume), as
    /// `status.backups[].name` of the cluster that took it reports.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub backup: String,
}

/// The storage engine a member runs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// RocksDB on a PersistentVolume.
    #[default]
    Rocksdb,
    /// In memory: every restart of a member loses its data, which then rejoins as a new member.
    Memory,
}

impl Engine {
    /// The value of the server's `--engine` flag.
    pub fn as_flag(self) -> &'static str {
        match self {
            Engine::Rocksdb => "rocksdb",
            Engine::Memory => "memory",
        }
    }
}

/// Storage engine, on-disk format and volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// `rocksdb` (default) or `memory`; immutable after creation.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage.engine is immutable"))]
    pub engine: Engine,

    /// On-disk record format (1 or 2). Raising it runs `metastore-ctl migrate` once every member
    /// runs a binary that supports it; it can never go down.
    #[serde(default = "default_format_version")]
    #[schemars(range(min = 1, max = 2))]
    #[x_kube(validation = Rule::new("self >= oldSelf").message("storage.formatVersion cannot go down"))]
    pub format_version: i32,

    /// Size of each member's volume (default 10Gi). Growing it patches the existing claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,

    /// StorageClass of the volumes; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,

    /// Delete the members' PersistentVolumeClaims when the cluster is deleted. By default
    /// (false) the claims, and so the data, outlive the cluster, ready for a restore.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub delete_claims_on_delete: bool,
}

fn default_format_version() -> i32 {
    1
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            engine: Engine::default(),
            format_version: default_format_version(),
            size: None,
            storage_class_name: None,
            delete_claims_on_delete: false,
        }
    }
}

/// TLS Secrets (type `kubernetes.io/tls`, with a `ca.crt` key).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret serving the client port (2379); clients must present a certificate signed by its CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_name: Option<String>,
    /// Secret for member-to-member traffic on the peer port (2380).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_secret_name: Option<String>,
}

/// Scheduling and metadata overrides for member pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Extra pod labels (the operator's own `app.kubernetes.io/*` labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Pod affinity; by default members prefer distinct nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Pod tolerations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node selector.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Topology spread constraints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// PriorityClass of the member pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// The PodDisruptionBudget the operator keeps for the members.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// Whether to create the PodDisruptionBudget (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Override of `maxUnavailable`; by default `(replicas - 1) / 2`, the most members that can be
    /// down with the cluster still holding a quorum.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_unavailable: Option<i32>,
}

fn default_true() -> bool {
    true
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec {
            enabled: true,
            max_unavailable: None,
        }
    }
}

/// Observed state, written by the operator from what the cluster reports through its etcd API.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MetaStoreClusterStatus {
    /// Summary of the cluster's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Available, Progressing, Degraded, Upgrading, Migrating.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<ClusterCondition>,

    /// Members as MemberList and Status report them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub members: Vec<MemberStatus>,

    /// Members that are healthy voters.
    #[serde(default)]
    pub ready_replicas: i32,

    /// The lowest MetaStore version any member runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,

    /// The on-disk format the cluster is at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_format_version: Option<i32>,

    /// The MetaStore version that was running when the format last moved: no downgrade below it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_version_since: Option<String>,

    /// Name of the leader member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,

    /// The `metadata.generation` this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Progress of the multi-step workflow in flight, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<Workflow>,

    /// The latest backups (at most 10, oldest first), running ones included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    pub backups: Vec<BackupRecord>,

    /// When the schedule last started a backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scheduled_backup: Option<Time>,

    /// The `spec.backup.request` value last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_request: Option<String>,

    /// The backup the cluster was restored from (`spec.bootstrap.restore`), once it formed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<RestoredFrom>,
}

/// Where a restored cluster's data came from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredFrom {
    /// The backup's name.
    pub backup: String,
    /// The claim it was read from.
    pub claim_name: String,
    /// When the restored cluster first formed.
    pub at: Time,
}

/// One backup, as its Job reported it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// The backup's name (its files' prefix in the volume; `spec.bootstrap.restore.backup`).
    pub name: String,
    /// `Scheduled` or `Requested`.
    pub trigger: BackupTrigger,
    /// Running, Succeeded or Failed.
    pub phase: BackupPhase,
    /// When its Job was created.
    pub started_at: Time,
    /// When the operator saw it finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Revision of the backed-up key space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    /// Size of the snapshot file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// SHA-256 of the snapshot file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The member it was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// Storage format of the records in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_format: Option<i32>,
    /// Seconds the backup took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl BackupRecord {
    /// A backup whose Job was just created.
    pub fn running(name: impl Into<String>, trigger: BackupTrigger, started_at: Time) -> Self {
        BackupRecord {
            name: name.into(),
            trigger,
            phase: BackupPhase::Running,
            started_at,
            completed_at: None,
            revision: None,
            size_bytes: None,
            sha256: None,
            member: None,
            storage_format: None,
            duration_seconds: None,
            message: None,
        }
    }
}

/// What started a backup.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupTrigger {
    /// `spec.backup.schedule`.
    Scheduled,
    /// `spec.backup.request`.
    Requested,
}

/// Where a backup is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BackupPhase {
    /// Its Job runs.
    Running,
    /// Its files are in the volume, verified.
    Succeeded,
    /// Its Job failed (nothing with its name is left in the volume but what a retry wrote).
    Failed,
}

/// Summary of the cluster's state, shown by `kubectl get msc`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Objects created, members not up yet.
    Bootstrapping,
    /// All members healthy, nothing in flight.
    Running,
    /// Adding or removing a member.
    Scaling,
    /// Rolling members onto another version or pod template.
    Upgrading,
    /// Running the storage format migration.
    Migrating,
    /// Replacing a member whose volume came back empty.
    Repairing,
    /// Defragmenting the members one at a time.
    Maintenance,
    /// A workflow stopped or the cluster is unhealthy; see the Degraded condition.
    Degraded,
    /// Fewer than a majority of the voting members are healthy.
    QuorumLost,
}

/// A condition type the operator sets.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema,
)]
pub enum ConditionType {
    /// The cluster serves requests (a leader and a quorum of healthy voters).
    Available,
    /// A workflow is moving the cluster towards the spec.
    Progressing,
    /// Something needs a human: a stopped workflow, a refused change, quorum loss.
    Degraded,
    /// A rolling upgrade is in flight.
    Upgrading,
    /// A storage format migration is in flight.
    Migrating,
}

/// `True`, `False` or `Unknown`, as Kubernetes conditions spell them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell.
    Unknown,
}

/// A status condition (the shape of `metav1.Condition`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterCondition {
    /// Condition type.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// One CamelCase word saying why.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The generation the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Role of a member in the Raft group.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MemberRole {
    /// The current leader.
    Leader,
    /// A voting follower.
    Follower,
    /// A non-voting learner catching up.
    Learner,
}

/// One member as the cluster reports it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Member name (the pod name).
    pub name: String,
    /// Member ID, in hex as `etcdctl member list` prints it.
    pub id: String,
    /// Leader, Follower or Learner.
    pub role: MemberRole,
    /// MetaStore version the member runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// On-disk format of the member's data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format_version: Option<i32>,
    /// Whether the member answered Status and is not in error.
    pub healthy: bool,
    /// Last applied Raft index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_index: Option<i64>,
    /// What holds this member's data (the PVC's uid; with the memory engine the pod's uid and
    /// container restart count), recorded while the member is healthy. A different holder
    /// under the same member ID later means the data is gone and the member must rejoin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_holder: Option<String>,
}

/// The kind of multi-step workflow in flight.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkflowKind {
    /// Adding members one at a time.
    ScaleUp,
    /// Removing members one at a time.
    ScaleDown,
    /// Replacing members one at a time on a new version or pod template (also rollbacks).
    Upgrade,
    /// Raising the on-disk format with the migration Job.
    Migration,
    /// Replacing a member whose volume came back empty.
    Rejoin,
    /// Defragmenting the members one at a time (`spec.maintenance.defragmentation`).
    Maintenance,
}

/// The step a workflow is at. Each step is idempotent: it is re-derived from the observed state
/// on every reconcile, and the recorded step only carries the deadline and the member in hand.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum WorkflowStep {
    /// Register the new member as a learner through MemberAdd.
    AddLearner,
    /// Grow the StatefulSet so the learner's pod starts.
    StartPod,
    /// Wait for the learner's applied index to reach the leader's.
    CatchUp,
    /// Promote the caught-up learner to a voter.
    Promote,
    /// Hand leadership to another member before touching the leader.
    MoveLeader,
    /// Remove a member through MemberRemove.
    RemoveMember,
    /// Shrink the StatefulSet after the member is gone.
    ShrinkStatefulSet,
    /// Delete the member's pod so the StatefulSet recreates it from the new template.
    DeletePod,
    /// Wait for the replaced member to be Ready and caught up.
    WaitMemberReady,
    /// Run the migration Job (`metastore-ctl migrate --to N --wait`).
    RunMigrationJob,
    /// Defragment one member (Maintenance.Defragment on that member).
    Defragment,
}

/// Progress of one multi-step workflow, kept in status so a restarted operator resumes it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    /// What is being done.
    pub kind: WorkflowKind,
    /// The step in flight.
    pub step: WorkflowStep,
    /// The goal: a version for Upgrade, a member count for scaling, a format for Migration,
    /// the member name for Rejoin.
    pub target: String,
    /// Where the workflow started from (the version before an upgrade, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The member being worked on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<String>,
    /// When the workflow started.
    pub started_at: Time,
    /// When the current step started.
    pub step_started_at: Time,
    /// When the current step must be done by; past it the workflow stops as Degraded.
    pub deadline: Time,
    /// The spec generation the workflow serves; a spec edit lets the operator re-plan.
    pub generation: i64,
    /// Set when the workflow stopped on a failure; it stays stopped until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// The CRD as the YAML document checked in under `crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml_ng::Error> {
    use kube::core::CustomResourceExt;
    serde_yaml_ng::to_string(&MetaStoreCluster::crd())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::CustomResourceExt;
    use serde_json::{json, Value};

    fn crd_schema() -> Value {
        let crd = MetaStoreCluster::crd();
        let version = &crd.spec.versions[0];
        serde_json::to_value(
            version
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .cloned(),
        )
        .unwrap_or(Value::Null)
    }

    fn object(spec: Value) -> Value {
        json!({
            "apiVersion": "metastore.io/v1alpha1",
            "kind": "MetaStoreCluster",
            "metadata": {"name": "demo", "namespace": "default"},
            "spec": spec,
        })
    }

    fn validate(new: Value, old: Option<Value>) -> Result<(), String> {
        let schema = crd_schema();
        kube::core::cel::Validator::new()
            .validate(&schema, &new, old.as_ref())
            .map_err(|e| format!("{e:?}"))
    }

    #[test]
    fn sample_manifests_pass_the_cel_rules() {
        for text in [
            include_str!("../../config/cluster-dev.yaml"),
            include_str!("../../config/cluster-production.yaml"),
        ] {
            let sample: Value = serde_yaml_ng::from_str(text).expect("sample parses");
            assert_eq!(validate(sample.clone(), None), Ok(()), "{sample}");
            // And as an update of itself (the transition rules compare with oldSelf).
            assert_eq!(
                validate(sample.clone(), Some(sample.clone())),
                Ok(()),
                "{sample}"
            );
            let typed: MetaStoreCluster = serde_json::from_value(sample).expect("typed");
            assert!(typed.spec.version.is_some());
        }
    }

    #[test]
    fn checked_in_crd_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../crds/metastoreclusters.metastore.io.yaml"
        );
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        let generated = crd_yaml().expect("CRD serializes");
        assert!(
            checked_in == generated,
            "crds/metastoreclusters.metastore.io.yaml is out of date with the Rust types; regenerate it with\n  \
             cargo run --release -p metastore-operator --bin crdgen > crds/metastoreclusters.metastore.io.yaml"
        );
    }

    #[test]
    fn crd_identity_and_columns() {
        let crd = MetaStoreCluster::crd();
        assert_eq!(crd.spec.group, "metastore.io");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.short_names, Some(vec!["msc".to_string()]));
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let columns: Vec<_> = v
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "Replicas", "Ready", "Version", "Format", "Leader", "Age"]
        );
    }

    #[test]
    fn schema_carries_cel_rules() {
        let text = serde_json::to_string(&crd_schema()).expect("serializes");
        for rule in [
            "self in [1, 3, 5, 7]",
            "self >= oldSelf",
            "self == oldSelf",
            "has(self.version) || has(self.image)",
        ] {
            assert!(text.contains(rule), "missing rule {rule}");
        }
        assert!(text.contains("x-kubernetes-list-map-keys"));
    }

    #[test]
    fn owned_flags_list_matches_the_cel_rule() {
        let text = serde_json::to_string(&crd_schema()).expect("serializes");
        for flag in OPERATOR_OWNED_FLAGS {
            assert!(
                text.contains(&format!("'{flag}'")),
                "{flag} not refused by CEL"
            );
        }
    }

    #[test]
    fn cel_rules_accept_and_refuse() {
        // (case, new spec, old spec, accepted)
        let cases: Vec<(&str, Value, Option<Value>, bool)> = vec![
            (
                "three replicas",
                json!({"replicas": 3, "version": "1.2.0"}),
                None,
                true,
            ),
            (
                "one replica",
                json!({"replicas": 1, "version": "1.2.0"}),
                None,
                true,
            ),
            (
                "seven replicas",
                json!({"replicas": 7, "version": "1.2.0"}),
                None,
                true,
            ),
            (
                "even replicas",
                json!({"replicas": 4, "version": "1.2.0"}),
                None,
                false,
            ),
            (
                "nine replicas",
                json!({"replicas": 9, "version": "1.2.0"}),
                None,
                false,
            ),
            (
                "image only",
                json!({"replicas": 3, "image": "reg/ms:v1.2.0"}),
                None,
                true,
            ),
            (
                "neither version nor image",
                json!({"replicas": 3}),
                None,
                false,
            ),
            (
                "owned flag in config",
                json!({"replicas": 3, "version": "1.2.0", "config": {"initial-cluster": "x"}}),
                None,
                false,
            ),
            (
                "free flag in config",
                json!({"replicas": 3, "version": "1.2.0", "config": {"quota-backend-bytes": "1"}}),
                None,
                true,
            ),
            (
                "format goes up",
                json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "rocksdb", "formatVersion": 2}}),
                Some(
                    json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "rocksdb", "formatVersion": 1}}),
                ),
                true,
            ),
            (
                "format goes down",
                json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "rocksdb", "formatVersion": 1}}),
                Some(
                    json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "rocksdb", "formatVersion": 2}}),
                ),
                false,
            ),
            (
                "engine changes",
                json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "memory", "formatVersion": 1}}),
                Some(
                    json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "rocksdb", "formatVersion": 1}}),
                ),
                false,
            ),
            (
                "engine unchanged, replicas change",
                json!({"replicas": 5, "version": "1.2.0", "storage": {"engine": "memory", "formatVersion": 1}}),
                Some(
                    json!({"replicas": 3, "version": "1.2.0", "storage": {"engine": "memory", "formatVersion": 1}}),
                ),
                true,
            ),
        ];
        for (case, new, old, accepted) in cases {
            let result = validate(object(new), old.map(object));
            assert_eq!(result.is_ok(), accepted, "{case}: {result:?}");
        }
    }

    #[test]
    fn spec_defaults_fill_in() {
        let spec: MetaStoreClusterSpec =
            serde_json::from_value(json!({"version": "1.0.0"})).expect("deserializes");
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.storage.engine, Engine::Rocksdb);
        assert_eq!(spec.storage.format_version, 1);
        assert_eq!(spec.step_timeout_seconds(), DEFAULT_STEP_TIMEOUT_SECONDS);
    }

    #[test]
    fn status_round_trips() {
        let status = MetaStoreClusterStatus {
            phase: Some(Phase::Upgrading),
            workflow: Some(Workflow {
                kind: WorkflowKind::Upgrade,
                step: WorkflowStep::DeletePod,
                target: "1.3.0".into(),
                from: Some("1.2.0".into()),
                member: Some("demo-2".into()),
                started_at: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                step_started_at: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                deadline: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
                generation: 4,
                failure: None,
            }),
            ..Default::default()
        };
        let value = serde_json::to_value(&status).unwrap_or_default();
        assert_eq!(value["workflow"]["kind"], "Upgrade");
        assert_eq!(value["workflow"]["stepStartedAt"], "1970-01-01T00:00:00Z");
        let back: MetaStoreClusterStatus = serde_json::from_value(value).expect("deserializes");
        assert_eq!(back, status);
    }
}
