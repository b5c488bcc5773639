//! The kube-runtime controller: observe → plan → apply → act → write status.
//!
//! One reconcile of a `MetaStoreCluster`:
//! 1. observe the StatefulSet, the member pods, their volumes and the migration Job, and the
//!    cluster itself through its etcd API ([`cluster_api`]);
//! 2. [`crate::plan::plan`] decides one action;
//! 3. the owned objects are rendered ([`crate::render`]) and sent with server-side apply (the
//!    StatefulSet's replicas come from the decision, so Bootstrap and ScaleStatefulSet are
//!    applies too), claims that the spec grew are patched, the PodDisruptionBudget is removed
//!    when disabled;
//! 4. the action is performed (MemberAdd/Promote/Remove, MoveLeader, a pod deletion, the
//!    migration Job);
//! 5. the status, workflow record included, is written by server-side apply on the status
//!    subresource, and an Event is published for every action and every new Degraded reason.
//!
//! Every step is idempotent: a reconcile that dies half-way is simply run again.
//!
//! A finalizer ([`FINALIZER`]) is added before the first apply. On deletion the owned objects
//! go with their owner references; the member volumes are kept unless
//! `spec.storage.deleteClaimsOnDelete` is true (see [`cleanup`]).
//!
//! The exact API requests of a reconcile are asserted against a mocked API server in
//! `tests.rs`; the RBAC rules they need are listed in [`permissions`]. The steps that face the
//! cluster rather than the API server ([`member_endpoints`], [`observe_cluster`],
//! [`render_params`], [`act_on_members`], [`volume_replaced`], [`job_view`],
//! [`status::build`], [`events`]) are public so `tests/it/real_cluster.rs` drives real
//! `metastore` and `metastore-ctl` processes through this very code.

pub mod cluster_api;
pub mod permissions;
pub mod status;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action as Requeue, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, warn};

use self::cluster_api::{ClientTls, ClusterApi};
use crate::crd::{
    ConditionStatus, ConditionType, Engine, MetaStoreCluster, MetaStoreClusterStatus, WorkflowKind,
};
use crate::metrics::Metrics;
use crate::naming::{version_of_image, ClusterNames, FIELD_MANAGER};
use crate::plan::backup::{BackupJobView, BackupPlan};
use crate::plan::{
    plan, Action, ClusterView, Decision, JobView, Observed, PodView, StatefulSetView, Version,
};
use crate::render::statefulset::{CONTAINER, DATA_VOLUME};
use crate::render::{volume_growth, RenderParams, Renderer};
use crate::{Error, Result};

/// Shared state of the reconcilers.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// The clusters' etcd API.
    pub cluster_api: Arc<dyn ClusterApi>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// The clock (fixed in tests so status bodies are exact).
    pub now: fn() -> Timestamp,
}

impl Context {
    /// A context with the real clock and an Event recorder reporting as this pod.
    pub fn new(client: Client, cluster_api: Arc<dyn ClusterApi>, metrics: Arc<Metrics>) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            cluster_api,
            metrics,
            now: Timestamp::now,
        }
    }
}

/// The finalizer the operator keeps on every `MetaStoreCluster` until its cleanup ran.
pub const FINALIZER: &str = "metastore.io/cleanup";

/// Runs the controller until a termination signal.
pub async fn run(client: Client, cluster_api: Arc<dyn ClusterApi>, metrics: Arc<Metrics>) {
    let context = Arc::new(Context::new(client.clone(), cluster_api, metrics));
    let owned =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=metastore-operator");
    Controller::new(
        Api::<MetaStoreCluster>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .owns(Api::<StatefulSet>::all(client.clone()), owned.clone())
    .owns(Api::<Service>::all(client.clone()), owned.clone())
    .owns(Api::<ConfigMap>::all(client.clone()), owned.clone())
    .owns(
        Api::<PodDisruptionBudget>::all(client.clone()),
        owned.clone(),
    )
    .owns(Api::<Job>::all(client.clone()), owned.clone())
    // Pods are owned by the StatefulSet, not the cluster: map them back by label.
    .watches(Api::<Pod>::all(client), owned, |pod| {
        let instance = pod.labels().get("app.kubernetes.io/instance")?.clone();
        Some(ObjectRef::<MetaStoreCluster>::new(&instance).within(&pod.namespace()?))
    })
    .shutdown_on_signal()
    .run(reconcile, error_policy, context)
    .for_each(|result| async move {
        match result {
            Ok((object, _)) => tracing::debug!(cluster = %object, "reconciled"),
            Err(error) => warn!(%error, "reconcile failed"),
        }
    })
    .await;
}

/// Requeue after an error, with the error logged and counted under its metric label.
pub fn error_policy(cluster: Arc<MetaStoreCluster>, error: &Error, ctx: Arc<Context>) -> Requeue {
    warn!(cluster = %cluster.name_any(), error = %error, label = error.metric_label(), "reconcile error");
    ctx.metrics.failed(error.metric_label());
    Requeue::requeue(Duration::from_secs(15))
}

/// One reconcile of one cluster: adds the finalizer, then [`apply_cluster`], or on deletion
/// [`cleanup`] and removes the finalizer.
pub async fn reconcile(cluster: Arc<MetaStoreCluster>, ctx: Arc<Context>) -> Result<Requeue> {
    let started = Instant::now();
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let api: Api<MetaStoreCluster> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, cluster, |event| async {
        match event {
            Finalizer::Apply(cluster) => apply_cluster(cluster, ctx.clone()).await,
            Finalizer::Cleanup(cluster) => cleanup(cluster, ctx.clone()).await,
        }
    })
    .await
    .map_err(Error::from);
    ctx.metrics.reconciled(started.elapsed());
    result
}

/// On deletion: deletes the member volumes when `spec.storage.deleteClaimsOnDelete` says so
/// (the other owned objects go with their owner references), and records an Event.
pub async fn cleanup(cluster: Arc<MetaStoreCluster>, ctx: Arc<Context>) -> Result<Requeue> {
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let names = ClusterNames::new(&cluster.name_any(), &namespace, false, false);
    let note = if cluster.spec.storage.delete_claims_on_delete {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
        let found = claims
            .list(&ListParams::default().labels(&selector(&names)))
            .await?
            .items;
        for claim in &found {
            delete_if_exists(&claims, &claim.name_any()).await?;
        }
        format!("deleted {} volume claims", found.len())
    } else {
        "volume claims kept (spec.storage.deleteClaimsOnDelete is false)".to_string()
    };
    info!(cluster = %cluster.name_any(), %note, "cleanup");
    let event = Event {
        type_: EventType::Normal,
        reason: "Deleting".into(),
        note: Some(note),
        action: "Cleanup".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
        warn!(%error, "publishing an event failed");
    }
    Ok(Requeue::await_change())
}

/// Observe, plan, apply, act and write status for one cluster that is not being deleted.
pub async fn apply_cluster(cluster: Arc<MetaStoreCluster>, ctx: Arc<Context>) -> Result<Requeue> {
    let namespace = cluster
        .namespace()
        .ok_or(Error::MissingObjectKey("metadata.namespace"))?;
    let renderer = Renderer::new(&cluster)?;
    let names = renderer.names().clone();
    let client = ctx.client.clone();
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), &namespace);
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);

    // 1. Observe.
    let selector = selector(&names);
    let sts = statefulsets.get_opt(&names.statefulset()).await?;
    let pods = pods_api
        .list(&ListParams::default().labels(&selector))
        .await?
        .items;
    let claims = if cluster.spec.storage.engine == Engine::Rocksdb {
        claims_api
            .list(&ListParams::default().labels(&selector))
            .await?
            .items
    } else {
        Vec::new()
    };
    let migration_jobs = jobs
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component=migration",
            names.name()
        )))
        .await?
        .items;

    let sts_replicas = sts
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let endpoints = member_endpoints(&cluster, &names, sts_replicas);
    let cluster_api = cluster_api_for(&ctx, &cluster, &namespace).await?;
    let view = observe_cluster(cluster_api.as_ref(), &names, &endpoints, |pod_name| {
        pods.iter()
            .find(|p| p.name_any() == pod_name)
            .and_then(container_image)
    })
    .await;
    let holders = data_holders(&cluster, &names, &pods, &claims);
    let observed = Observed {
        now: (ctx.now)(),
        statefulset: sts.as_ref().map(statefulset_view),
        pods: pods
            .iter()
            .map(|p| pod_view(&cluster, p, sts.as_ref(), view.as_ref(), &holders, &names))
            .collect(),
        migration_job: migration_jobs
            .iter()
            .filter_map(job_view)
            .max_by_key(|j| j.target_format),
        cluster: view,
    };

    // 2. Plan.
    let decision = plan(&cluster, &observed);
    info!(cluster = %cluster.name_any(), action = %decision.action, "planned");

    // 3. Apply the owned objects.
    let mut params = render_params(&cluster, &decision, sts_replicas);
    params.existing_claim_templates = sts
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.volume_claim_templates.clone());
    let objects = renderer.render(&params);
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.peer_service,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.client_service,
    )
    .await?;
    apply(
        &Api::namespaced(client.clone(), &namespace),
        &objects.config_map,
    )
    .await?;
    apply(&statefulsets, &objects.statefulset).await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    match &objects.pdb {
        Some(pdb) => apply(&pdbs, pdb).await?,
        None => delete_if_exists(&pdbs, &names.pdb()).await?,
    }
    grow_volumes(&cluster, &claims_api, &claims).await?;

    // 4. Act.
    act(
        &ctx,
        cluster_api.as_ref(),
        &renderer,
        &observed,
        &decision,
        &endpoints,
    )
    .await?;

    // 5. Backups (beside the workflows: they only read from the cluster).
    let backups = backups(&ctx, &cluster, &renderer, &observed, &decision).await?;

    // 6. Status and Events.
    let mut new_status = status::build(&cluster, &names, &observed, &decision, &holders);
    if let Some(b) = &backups {
        b.record_in(&mut new_status);
    }
    let patch = serde_json::json!({
        "apiVersion": "metastore.io/v1alpha1",
        "kind": "MetaStoreCluster",
        "status": new_status,
    });
    Api::<MetaStoreCluster>::namespaced(client, &namespace)
        .patch_status(
            &cluster.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    publish_events(&ctx, &cluster, &decision, &new_status).await;
    let mut after = match decision.action {
        Action::Done => Duration::from_secs(300),
        Action::MarkDegraded(_) | Action::RefuseWithCondition(_) => Duration::from_secs(60),
        Action::WaitFor(_) => Duration::from_secs(10),
        _ => Duration::from_secs(2),
    };
    if let Some(b) = &backups {
        publish_backup_events(&ctx, &cluster, b).await;
        for r in &b.finished {
            ctx.metrics
                .backup_finished(&namespace, &cluster.name_any(), r);
        }
        after = after.min(backup_requeue(b, observed.now));
    }
    Ok(Requeue::requeue(after))
}

/// Plans and starts backups when `spec.backup` is set or a recorded backup still runs:
/// observes the backup Jobs (and, for a finished one not yet recorded, its pod's termination
/// message, where `metastore-ctl backup` leaves its manifest), then creates the Job of a
/// backup that is due. `None` when the cluster has nothing to do with backups.
async fn backups(
    ctx: &Context,
    cluster: &MetaStoreCluster,
    renderer: &Renderer<'_>,
    observed: &Observed,
    decision: &Decision,
) -> Result<Option<BackupPlan>> {
    let running = cluster.status.as_ref().is_some_and(|s| {
        s.backups
            .iter()
            .any(|r| r.phase == crate::crd::BackupPhase::Running)
    });
    if cluster.spec.backup.is_none() && !running {
        return Ok(None);
    }
    let names = renderer.names();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), names.namespace());
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), names.namespace());
    let jobs = jobs_api
        .list(&ListParams::default().labels(&format!(
            "app.kubernetes.io/instance={},app.kubernetes.io/component=backup",
            names.name()
        )))
        .await?
        .items;
    let recorded_running = |name: &str| {
        cluster.status.as_ref().is_some_and(|s| {
            s.backups
                .iter()
                .any(|r| r.name == name && r.phase == crate::crd::BackupPhase::Running)
        })
    };
    let mut views = Vec::new();
    for job in &jobs {
        let mut view = backup_job_view(job);
        if (view.succeeded || view.failed) && recorded_running(&view.name) {
            let pods = pods_api
                .list(&ListParams::default().labels(&format!("job-name={}", view.name)))
                .await?
                .items;
            view.read_termination_message(pods.iter().rev().find_map(termination_message));
        }
        views.push(view);
    }
    let ready = crate::plan::backup::cluster_ready(observed.cluster.as_ref());
    let plan = crate::plan::backup::plan(cluster, &views, observed.now, ready);
    if let Some(start) = &plan.start {
        if let Some(job) = renderer.backup_job(&start.name, &decision.image) {
            apply(&jobs_api, &job).await?;
            info!(cluster = %cluster.name_any(), backup = %start.name, "backup started");
        }
    }
    Ok(Some(plan))
}

/// A backup Job as the planner sees it (the manifest and message are filled in by the caller).
pub fn backup_job_view(job: &Job) -> BackupJobView {
    let (succeeded, failed) = job_outcome(job);
    BackupJobView {
        name: job.name_any(),
        succeeded,
        failed,
        manifest: None,
        message: None,
    }
}

/// The termination message of a pod's first terminated container.
fn termination_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .filter(|m| !m.trim().is_empty())
}

/// When to look again for backups: soon while one runs, else at the next scheduled slot.
fn backup_requeue(plan: &BackupPlan, now: k8s_openapi::jiff::Timestamp) -> Duration {
    let running = plan
        .records
        .iter()
        .any(|r| r.phase == crate::crd::BackupPhase::Running);
    if running || plan.start.is_some() {
        return Duration::from_secs(10);
    }
    plan.next_scheduled
        .and_then(|next| {
            let secs = next.as_second().saturating_sub(now.as_second());
            u64::try_from(secs).ok()
        })
        .map_or(Duration::from_secs(300), |s| Duration::from_secs(s.max(1)))
}

/// Events for a backup started, finished, or a schedule that cannot be parsed.
async fn publish_backup_events(ctx: &Context, cluster: &MetaStoreCluster, plan: &BackupPlan) {
    for event in backup_events(plan) {
        if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
            warn!(%error, "publishing an event failed");
        }
    }
}

/// The Events of a backup plan.
pub fn backup_events(plan: &BackupPlan) -> Vec<Event> {
    let mut out = Vec::new();
    if let Some(start) = &plan.start {
        out.push(Event {
            type_: EventType::Normal,
            reason: "BackupStarted".into(),
            note: Some(format!("backup {} ({:?})", start.name, start.trigger)),
            action: "Backup".into(),
            secondary: None,
        });
    }
    for r in &plan.finished {
        let (type_, reason, note) = match r.phase {
            crate::crd::BackupPhase::Succeeded => (
                EventType::Normal,
                "BackupSucceeded",
                format!(
                    "backup {}: revision {}, {} bytes, from {}",
                    r.name,
                    r.revision.unwrap_or_default(),
                    r.size_bytes.unwrap_or_default(),
                    r.member.as_deref().unwrap_or("?")
                ),
            ),
            _ => (
                EventType::Warning,
                "BackupFailed",
                format!(
                    "backup {}: {}",
                    r.name,
                    r.message.as_deref().unwrap_or("failed")
                ),
            ),
        };
        out.push(Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Backup".into(),
            secondary: None,
        });
    }
    if let Some(e) = &plan.schedule_error {
        out.push(Event {
            type_: EventType::Warning,
            reason: "InvalidBackupSchedule".into(),
            note: Some(e.clone()),
            action: "Backup".into(),
            secondary: None,
        });
    }
    out
}

/// The etcd API client for one cluster: [`Context::cluster_api`] as it is for plain `http`
/// client URLs; with `spec.tls.clientSecretName`, the same over TLS with that Secret's CA and
/// client certificate (`ca.crt`, `tls.crt`, `tls.key`), read on every reconcile so a rotated
/// Secret is used at once. A missing Secret or key fails the reconcile under its label.
pub async fn cluster_api_for(
    ctx: &Context,
    cluster: &MetaStoreCluster,
    namespace: &str,
) -> Result<Arc<dyn ClusterApi>> {
    let Some(secret_name) = cluster
        .spec
        .tls
        .as_ref()
        .and_then(|t| t.client_secret_name.as_deref())
    else {
        return Ok(ctx.cluster_api.clone());
    };
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get(secret_name)
        .await?;
    let tls = ClientTls::from_secret(&secret)?;
    Ok(ctx.cluster_api.clone().with_client_tls(&tls))
}

/// Performs the decided action against the cluster or the pods.
async fn act(
    ctx: &Context,
    cluster_api: &dyn ClusterApi,
    renderer: &Renderer<'_>,
    observed: &Observed,
    decision: &Decision,
    endpoints: &[String],
) -> Result<()> {
    let names = renderer.names();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), names.namespace());
    let started = std::time::Instant::now();
    if act_on_members(
        cluster_api,
        names,
        observed.cluster.as_ref(),
        &decision.action,
        endpoints,
    )
    .await?
    {
        if let Action::Defragment { member, .. } = &decision.action {
            ctx.metrics
                .defragmented(names.namespace(), names.name(), member, started.elapsed());
        }
        return Ok(());
    }
    match &decision.action {
        Action::DeletePodForUpgrade { member } | Action::RestartPod { member } => {
            delete_if_exists(&pods, member).await
        }
        Action::StartMigrationJob { to } => {
            let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), names.namespace());
            apply(&jobs, &renderer.migration_job(*to, &decision.image)).await
        }
        // The StatefulSet's replicas were applied with the objects; the membership calls were
        // made above.
        Action::Bootstrap { .. }
        | Action::ScaleStatefulSet { .. }
        | Action::AddLearner { .. }
        | Action::PromoteLearner { .. }
        | Action::RemoveMember { .. }
        | Action::MoveLeader { .. }
        | Action::Defragment { .. }
        | Action::WaitFor(_)
        | Action::MarkDegraded(_)
        | Action::RefuseWithCondition(_)
        | Action::Done => Ok(()),
    }
}

/// The client URLs the cluster is observed and changed through: every ordinal that may hold a
/// member (the StatefulSet's, the spec's and the recorded membership's, whichever is largest).
pub fn member_endpoints(
    cluster: &MetaStoreCluster,
    names: &ClusterNames,
    sts_replicas: Option<i32>,
) -> Vec<String> {
    let recorded = cluster.status.as_ref().map_or(0, |s| s.members.len());
    let span = sts_replicas
        .unwrap_or(0)
        .max(cluster.spec.replicas)
        .max(i32::try_from(recorded).unwrap_or(0));
    (0..span).map(|i| names.client_url(i)).collect()
}

/// Observes the cluster through its etcd API. A member's version is what its binary reports
/// (Status `server_version`): the image tag may name no version (`latest`, a digest) or
/// another build. Only for a member that reports none (an older server, or not answering yet)
/// is it read from its pod's image tag (`image_of(pod name)`). The upgrade itself follows the
/// pods' images either way; the versions feed the version-change rules and status.
pub async fn observe_cluster(
    api: &dyn ClusterApi,
    names: &ClusterNames,
    endpoints: &[String],
    image_of: impl Fn(&str) -> Option<String>,
) -> Option<ClusterView> {
    let mut view = api.observe(endpoints).await?;
    for m in &mut view.members {
        if m.version.is_none() {
            m.version = m
                .ordinal(names)
                .and_then(|o| image_of(&names.pod_name(o)))
                .and_then(|image| version_of_image(&image))
                .and_then(|v| Version::parse(&v));
        }
    }
    Some(view)
}

/// What to render for `decision`: the StatefulSet's replicas come from the decision when it
/// bootstraps or scales and stay as they are otherwise. (The existing claim templates are the
/// caller's to add.)
///
/// `--storage-format` is the format the members write, as last recorded in
/// `status.members[*].formatVersion` (the lowest), else `status.currentFormatVersion`, else
/// the spec's (a new cluster). The server refuses a data directory stamped with another format
/// than the flag, and the online switch stamps every directory with the new format at once:
/// a member restarted while it re-encodes must be given the new format, not the one the
/// cluster settled at.
pub fn render_params(
    cluster: &MetaStoreCluster,
    decision: &Decision,
    sts_replicas: Option<i32>,
) -> RenderParams {
    let replicas = match decision.action {
        Action::Bootstrap { replicas } | Action::ScaleStatefulSet { replicas } => replicas,
        _ => sts_replicas.unwrap_or(cluster.spec.replicas),
    };
    let status = cluster.status.as_ref();
    let storage_format = status
        .and_then(|s| s.members.iter().filter_map(|m| m.format_version).min())
        .or_else(|| status.and_then(|s| s.current_format_version))
        .unwrap_or(cluster.spec.storage.format_version);
    RenderParams::from_decision(decision, replicas, storage_format)
}

/// Performs the membership half of an action through the cluster's etcd API (MemberAdd as a
/// learner, MemberPromote, MemberRemove, MoveLeader sent to the leader's client URL).
/// `Ok(false)` when the action is not a membership call.
pub async fn act_on_members(
    api: &dyn ClusterApi,
    names: &ClusterNames,
    view: Option<&ClusterView>,
    action: &Action,
    endpoints: &[String],
) -> Result<bool> {
    match action {
        Action::AddLearner { peer_url, .. } => api.add_learner(endpoints, peer_url).await?,
        Action::PromoteLearner { id, .. } => api.promote(endpoints, *id).await?,
        Action::RemoveMember { id, .. } => api.remove(endpoints, *id).await?,
        Action::MoveLeader { to_id, .. } => {
            let leader = view
                .and_then(ClusterView::leader_member)
                .and_then(|m| m.ordinal(names))
                .map(|o| names.client_url(o));
            // No leader known: leadership already moved or an election is on; replan.
            if let Some(url) = leader {
                api.move_leader(&url, *to_id).await?;
            }
        }
        Action::Defragment { id, .. } => {
            let url = view
                .and_then(|v| v.members.iter().find(|m| m.id == *id))
                .and_then(|m| m.ordinal(names))
                .map(|o| names.client_url(o));
            // The member is gone from the view: replan.
            if let Some(url) = url {
                api.defragment(&url).await?;
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Whether the pod `pod_name` came back with a volume that does not hold the data of the
/// member registered under its name: the data holder recorded in status while that member was
/// healthy (same member ID) differs from the one the pod has now (`current`).
pub fn volume_replaced(
    status: Option<&crate::crd::MetaStoreClusterStatus>,
    view: Option<&ClusterView>,
    names: &ClusterNames,
    pod_name: &str,
    current: Option<&str>,
) -> bool {
    let Some(ordinal) = names.ordinal_of(pod_name) else {
        return false;
    };
    let member_id = view
        .and_then(|v| v.members.iter().find(|m| m.ordinal(names) == Some(ordinal)))
        .map(|m| format!("{:x}", m.id));
    let recorded = status.and_then(|s| {
        s.members
            .iter()
            .find(|m| m.name == pod_name && Some(&m.id) == member_id.as_ref())
            .and_then(|m| m.data_holder.as_deref())
    });
    matches!((recorded, current), (Some(recorded), Some(current)) if recorded != current)
}

async fn publish_events(
    ctx: &Context,
    cluster: &MetaStoreCluster,
    decision: &Decision,
    new_status: &MetaStoreClusterStatus,
) {
    let (type_, reason) = action_reason(&decision.action);
    if type_ == EventType::Normal && !matches!(decision.action, Action::WaitFor(_) | Action::Done) {
        let workflow = decision.workflow.as_ref().map(|w| format!("{:?}", w.kind));
        ctx.metrics.action(reason, workflow.as_deref());
    }
    for event in events(cluster, decision, new_status) {
        if let Err(error) = ctx.recorder.publish(&event, &cluster.object_ref(&())).await {
            warn!(%error, "publishing an event failed");
        }
    }
}

/// The Events of one reconcile, given the status before (`cluster.status`) and after: one for
/// the action (none for a wait or Done), a Warning per Degraded reason not shown yet, and
/// `MigrationComplete` when a format migration recorded in status has reached its format on
/// every member.
pub fn events(
    cluster: &MetaStoreCluster,
    decision: &Decision,
    new_status: &MetaStoreClusterStatus,
) -> Vec<Event> {
    let mut out = Vec::new();
    let (type_, reason) = action_reason(&decision.action);
    // A Degraded reason already shown is not announced again on every reconcile.
    let already = type_ == EventType::Warning
        && cluster.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| {
                c.type_ == ConditionType::Degraded
                    && c.status == ConditionStatus::True
                    && c.reason == reason
            })
        });
    if !matches!(decision.action, Action::WaitFor(_) | Action::Done) && !already {
        out.push(Event {
            type_,
            reason: reason.into(),
            note: Some(decision.action.to_string()),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    let migrated_to = cluster
        .status
        .as_ref()
        .and_then(|s| s.workflow.as_ref())
        .filter(|w| w.kind == WorkflowKind::Migration && w.failure.is_none())
        .and_then(|w| w.target.parse::<i32>().ok());
    let finished = decision
        .workflow
        .as_ref()
        .is_none_or(|w| w.kind != WorkflowKind::Migration);
    let restored_before = cluster
        .status
        .as_ref()
        .is_some_and(|s| s.restored_from.is_some());
    if let (Some(r), false) = (&new_status.restored_from, restored_before) {
        out.push(Event {
            type_: EventType::Normal,
            reason: "Restored".into(),
            note: Some(format!(
                "every initial member restored from backup {} (claim {})",
                r.backup, r.claim_name
            )),
            action: "Reconcile".into(),
            secondary: None,
        });
    }
    if let Some(to) = migrated_to.filter(|_| finished) {
        if new_status.current_format_version.is_some_and(|f| f >= to) {
            out.push(Event {
                type_: EventType::Normal,
                reason: "MigrationComplete".into(),
                note: Some(format!(
                    "every member writes storage format {to} and holds no record in an older one"
                )),
                action: "Reconcile".into(),
                secondary: None,
            });
        }
    }
    out
}

/// The Event type and reason of an action (also its `action` metric label).
fn action_reason(action: &Action) -> (EventType, &'static str) {
    match action {
        Action::MarkDegraded(reason) => (EventType::Warning, reason.reason()),
        Action::RefuseWithCondition(refusal) => (EventType::Warning, refusal.reason()),
        Action::WaitFor(_) => (EventType::Normal, "Wait"),
        Action::Done => (EventType::Normal, "Done"),
        Action::Bootstrap { .. } => (EventType::Normal, "Bootstrap"),
        Action::AddLearner { .. } => (EventType::Normal, "AddLearner"),
        Action::PromoteLearner { .. } => (EventType::Normal, "PromoteLearner"),
        Action::RemoveMember { .. } => (EventType::Normal, "RemoveMember"),
        Action::MoveLeader { .. } => (EventType::Normal, "MoveLeader"),
        Action::DeletePodForUpgrade { .. } => (EventType::Normal, "ReplacePod"),
        Action::RestartPod { .. } => (EventType::Normal, "RestartPod"),
        Action::ScaleStatefulSet { .. } => (EventType::Normal, "ScaleStatefulSet"),
        Action::StartMigrationJob { .. } => (EventType::Normal, "StartMigration"),
        Action::Defragment { .. } => (EventType::Normal, "Defragment"),
    }
}

/// Server-side apply under the operator's field manager.
async fn apply<K>(api: &Api<K>, object: &K) -> Result<()>
where
    K: Resource + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingObjectKey("metadata.name"))?;
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Patches claims smaller than the spec asks (claim templates are immutable).
async fn grow_volumes(
    cluster: &MetaStoreCluster,
    api: &Api<PersistentVolumeClaim>,
    claims: &[PersistentVolumeClaim],
) -> Result<()> {
    let Some(desired) = cluster.spec.storage.size.as_ref() else {
        return Ok(());
    };
    for claim in claims {
        let current = claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"));
        if let Some(size) = current.and_then(|c| volume_growth(desired, c)) {
            let patch = serde_json::json!({"spec": {"resources": {"requests": {"storage": size}}}});
            api.patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        }
    }
    Ok(())
}

fn selector(names: &ClusterNames) -> String {
    names
        .selector_labels()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn container_image(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == CONTAINER)?
        .image
        .clone()
}

fn statefulset_view(sts: &StatefulSet) -> StatefulSetView {
    let spec = sts.spec.as_ref();
    StatefulSetView {
        replicas: spec.and_then(|s| s.replicas).unwrap_or(0),
        image: spec
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.iter().find(|c| c.name == CONTAINER))
            .and_then(|c| c.image.clone())
            .unwrap_or_default(),
    }
}

/// The migration Job as the plan sees it: its target format (label
/// `metastore.io/target-format`) and whether it completed or failed for good.
pub fn job_view(job: &Job) -> Option<JobView> {
    let target_format = job
        .labels()
        .get("metastore.io/target-format")?
        .parse()
        .ok()?;
    let (succeeded, failed) = job_outcome(job);
    Some(JobView {
        target_format,
        succeeded,
        failed,
    })
}

/// Whether a Job completed, and whether it failed for good (as the Job controller reports).
fn job_outcome(job: &Job) -> (bool, bool) {
    let status = job.status.as_ref();
    let condition = |t: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == t && c.status == "True"))
    };
    (
        condition("Complete") || status.and_then(|s| s.succeeded).unwrap_or(0) > 0,
        condition("Failed"),
    )
}

/// What holds each pod's data now: the PVC uid, or with the memory engine the pod uid and
/// the container's restart count (a restart loses everything).
fn data_holders(
    cluster: &MetaStoreCluster,
    names: &ClusterNames,
    pods: &[Pod],
    claims: &[PersistentVolumeClaim],
) -> BTreeMap<String, String> {
    pods.iter()
        .filter_map(|pod| {
            let name = pod.name_any();
            let holder = match cluster.spec.storage.engine {
                Engine::Rocksdb => {
                    let claim = format!("{DATA_VOLUME}-{name}");
                    claims.iter().find(|c| c.name_any() == claim)?.uid()?
                }
                Engine::Memory => {
                    let restarts = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER))
                        .map_or(0, |c| c.restart_count);
                    format!("{}:{restarts}", pod.uid()?)
                }
            };
            names.ordinal_of(&name)?;
            Some((name, holder))
        })
        .collect()
}

fn pod_view(
    cluster: &MetaStoreCluster,
    pod: &Pod,
    sts: Option<&StatefulSet>,
    view: Option<&ClusterView>,
    holders: &BTreeMap<String, String>,
    names: &ClusterNames,
) -> PodView {
    let name = pod.name_any();
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let update_revision = sts
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.update_revision.as_deref());
    let up_to_date = match update_revision {
        Some(revision) => {
            pod.labels()
                .get("controller-revision-hash")
                .map(String::as_str)
                == Some(revision)
        }
        None => true,
    };
    let crash_looping = status
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.state
                    .as_ref()
                    .and_then(|s| s.waiting.as_ref())
                    .and_then(|w| w.reason.as_deref())
                    == Some("CrashLoopBackOff")
            })
        });
    let empty_volume = volume_replaced(
        cluster.status.as_ref(),
        view,
        names,
        &name,
        holders.get(&name).map(String::as_str),
    );
    PodView {
        image: container_image(pod).unwrap_or_default(),
        name,
        ready,
        up_to_date,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        crash_looping,
        empty_volume,
    }
}
