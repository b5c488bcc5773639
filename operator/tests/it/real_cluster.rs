//! The operator's decisions carried out on a real MetaStore cluster: `metastore` processes on
//! loopback stand in for the member pods.
//!
//! Real here: the `metastore` binary, started with exactly the command line the operator
//! renders (the StatefulSet container's args, its environment from the ConfigMap); the etcd API
//! client [`GrpcClusterApi`] (MemberList, Status, Alarm, HashKV, MemberAdd / Promote / Remove,
//! MoveLeader); and the controller's own reconcile functions in the controller's order:
//! [`member_endpoints`] → [`observe_cluster`] → [`plan`] → [`render_params`] + [`Renderer`] →
//! [`act_on_members`] → [`status::build`], the status fed back into the next reconcile as the
//! API server would.
//!
//! Standing in for Kubernetes ([`Kube`]): the StatefulSet controller (one pod per ordinal below
//! `replicas`, created from the last applied template; a pod beyond it deleted with its volume,
//! as `whenScaled: Delete` does), the kubelet (Ready = `GET /health` answers 200), deleting a
//! pod (SIGTERM, then the StatefulSet starts it again from the current template on the same
//! data directory), and cluster DNS ([`Dns`]: `demo-i.demo-peer.db.svc:2379|2380` → the
//! member's loopback ports, in the flags and in every URL the operator sends or reads).
//!
//! The Job controller ([`Kube::apply_job`]): the migration Job the operator applies runs as a
//! real `metastore-ctl` process with the Job's container args (cluster DNS resolved, the client
//! Service to member 0's client port); its exit is reported back in the Job's status as the
//! API server would (`Complete`, or `Failed` after `backoffLimit` retries), and the
//! controller's own [`job_view`] reads it.
//!
//! Every member runs the same binary. Where a pod's image tag names a version, the harness
//! reports that version as the member's, standing in for the release the tag names (the
//! binary's own report would be the same for every pod); where the tag names none (`:dev`),
//! the server's own report (Status `server_version`) is what the controller sees. An older
//! binary's storage formats are played by `--max-storage-format` ([`Kube::extra_args`]).
//!
//! The binaries: `METASTORE_BIN`, else `metastore` in this test's target directory
//! (`$CARGO_TARGET_DIR/release`; `cargo build --release --bin metastore --bin metastore-ctl`),
//! and `metastore-ctl` next to it. Without them a test says so and passes, or fails when `CI`
//! is set.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use futures::future::BoxFuture;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobStatus};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::EventType;
use metastore_operator::controller::cluster_api::{ClientTls, ClusterApi, GrpcClusterApi};
use metastore_operator::controller::{
    act_on_members, backup_events as backup_events_of, backup_job_view, events, job_view,
    member_endpoints, observe_cluster, render_params, status, volume_replaced,
};
use metastore_operator::crd::{
    BackupPhase, BackupRecord, BackupSpec, BackupTrigger, BootstrapSpec, ConditionStatus,
    ConditionType, DefragmentationSpec, MaintenanceSpec, MemberRole, MetaStoreCluster,
    MetaStoreClusterSpec, MetaStoreClusterStatus, Phase, RestoreSpec, StorageSpec, WorkflowKind,
};
use metastore_operator::naming::{
    image_for_version, version_of_image, ClusterNames, CLIENT_PORT, DATA_DIR, PEER_PORT,
};
use metastore_operator::plan::backup::{self, BackupJobView};
use metastore_operator::plan::{
    plan, Action, ClusterView, Decision, Observed, PodView, Refusal, StatefulSetView, Version,
    WaitReason,
};
use metastore_operator::render::statefulset::CONTAINER;
use metastore_operator::render::{OwnedObjects, Renderer};
use metastore_proto::etcdserverpb::{
    cluster_client::ClusterClient, kv_client::KvClient, maintenance_client::MaintenanceClient,
    CompactionRequest, HashKvRequest, MemberListRequest, MoveLeaderRequest, PutRequest,
    RangeRequest, StatusRequest, StatusResponse,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const NAME: &str = "demo";
const NAMESPACE: &str = "db";
/// Ordinals a test may use.
const MAX_MEMBERS: usize = 5;
/// How long one workflow (bootstrap, a scale, an upgrade) may take.
const CONVERGE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The binary.

fn metastore_bin() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("METASTORE_BIN") {
        return Some(PathBuf::from(path));
    }
    let mut candidates = Vec::new();
    // This test binary is <target>/release/deps/it-<hash>.
    if let Ok(exe) = std::env::current_exe() {
        if let Some(release) = exe.parent().and_then(Path::parent) {
            candidates.push(release.join("metastore"));
        }
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir).join("release/metastore"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/metastore/target/release/metastore"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// The binary, or `None` after saying why the test does nothing (a failure when `CI` is set).
pub(crate) fn binary_or_skip() -> Option<PathBuf> {
    let bin = metastore_bin();
    if bin.is_none() {
        let why = "no metastore binary: set METASTORE_BIN or run \
                   `cargo build --release --bin metastore`";
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("SKIPPED: {why}");
    }
    bin
}

/// The binary, if `metastore-ctl` (the migration Job's tool) is next to it; else `None` after
/// saying why the test does nothing (a failure when `CI` is set).
fn binaries_with_ctl_or_skip() -> Option<PathBuf> {
    let bin = binary_or_skip()?;
    if bin.with_file_name("metastore-ctl").is_file() {
        return Some(bin);
    }
    let why = format!(
        "no metastore-ctl next to {}: run `cargo build --release --bin metastore-ctl`",
        bin.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

// ---------------------------------------------------------------------------------------------
// Cluster DNS.

/// The pods' stable DNS names resolved to loopback ports: member `i` listens on
/// `127.0.0.1:ports[i].0` (client) and `127.0.0.1:ports[i].1` (peer).
struct Dns {
    names: ClusterNames,
    ports: Vec<(u16, u16)>,
}

impl Dns {
    fn new(names: ClusterNames) -> anyhow::Result<Self> {
        // Members start one by one, long after this: the ports must not be ones an outgoing
        // connection can take meanwhile (see metastore_testkit).
        let ports = (0..2 * MAX_MEMBERS)
            .map(|_| metastore_testkit::free_port())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Dns {
            names,
            ports: ports.chunks(2).map(|p| (p[0], p[1])).collect(),
        })
    }

    /// `text` with every `<pod host>:2379|2380` replaced by the member's loopback address, and
    /// the client Service by member 0's client address.
    fn resolve(&self, text: &str) -> String {
        let service = self.names.service_url();
        let service = service.trim_start_matches("http://");
        let mut out = text.replace(service, &format!("127.0.0.1:{}", self.ports[0].0));
        for (i, (client, peer)) in self.ports.iter().enumerate() {
            let host = self.names.pod_host(i as i32);
            out = out
                .replace(
                    &format!("{host}:{CLIENT_PORT}"),
                    &format!("127.0.0.1:{client}"),
                )
                .replace(&format!("{host}:{PEER_PORT}"), &format!("127.0.0.1:{peer}"));
        }
        out
    }

    /// The DNS form of a loopback URL a member reports.
    fn name_of(&self, url: &str) -> String {
        let url_trimmed = url.trim_end_matches('/');
        for (i, (client, peer)) in self.ports.iter().enumerate() {
            if url_trimmed == format!("http://127.0.0.1:{peer}") {
                return self.names.peer_url(i as i32);
            }
            if url_trimmed == format!("http://127.0.0.1:{client}") {
                return self.names.client_url(i as i32);
            }
        }
        url.to_string()
    }

    fn client_url(&self, ordinal: i32) -> String {
        format!("http://127.0.0.1:{}", self.ports[ordinal as usize].0)
    }
}

/// The real [`GrpcClusterApi`] behind cluster DNS: URLs the operator sends are resolved, peer
/// URLs the members report are named back.
struct ResolvingApi {
    inner: GrpcClusterApi,
    dns: Arc<Dns>,
}

impl ResolvingApi {
    fn resolve_all(&self, endpoints: &[String]) -> Vec<String> {
        endpoints.iter().map(|e| self.dns.resolve(e)).collect()
    }
}

impl ClusterApi for ResolvingApi {
    fn observe<'a>(&'a self, endpoints: &'a [String]) -> BoxFuture<'a, Option<ClusterView>> {
        Box::pin(async move {
            let endpoints = self.resolve_all(endpoints);
            let mut view = self.inner.observe(&endpoints).await?;
            for m in &mut view.members {
                m.peer_urls = m.peer_urls.iter().map(|u| self.dns.name_of(u)).collect();
            }
            Some(view)
        })
    }

    fn add_learner<'a>(
        &'a self,
        endpoints: &'a [String],
        peer_url: &'a str,
    ) -> BoxFuture<'a, metastore_operator::Result<()>> {
        Box::pin(async move {
            let endpoints = self.resolve_all(endpoints);
            let peer_url = self.dns.resolve(peer_url);
            self.inner.add_learner(&endpoints, &peer_url).await
        })
    }

    fn promote<'a>(
        &'a self,
        endpoints: &'a [String],
        id: u64,
    ) -> BoxFuture<'a, metastore_operator::Result<()>> {
        Box::pin(async move {
            let endpoints = self.resolve_all(endpoints);
            self.inner.promote(&endpoints, id).await
        })
    }

    fn remove<'a>(
        &'a self,
        endpoints: &'a [String],
        id: u64,
    ) -> BoxFuture<'a, metastore_operator::Result<()>> {
        Box::pin(async move {
            let endpoints = self.resolve_all(endpoints);
            self.inner.remove(&endpoints, id).await
        })
    }

    fn move_leader<'a>(
        &'a self,
        leader: &'a str,
        to: u64,
    ) -> BoxFuture<'a, metastore_operator::Result<()>> {
        Box::pin(async move {
            let leader = self.dns.resolve(leader);
            self.inner.move_leader(&leader, to).await
        })
    }

    fn defragment<'a>(&'a self, member: &'a str) -> BoxFuture<'a, metastore_operator::Result<()>> {
        Box::pin(async move {
            let member = self.dns.resolve(member);
            self.inner.defragment(&member).await
        })
    }

    fn with_client_tls(self: Arc<Self>, tls: &ClientTls) -> Arc<dyn ClusterApi> {
        Arc::new(ResolvingApi {
            inner: GrpcClusterApi::with_tls(tls),
            dns: self.dns.clone(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Kubernetes, as far as the members are concerned.

/// A member pod: a `metastore` process, killed when dropped.
struct Pod {
    image: String,
    /// The pod template it was created from (JSON), to tell whether it is up to date.
    template: String,
    volume: u32,
    child: Child,
}

impl Pod {
    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// What deleting the pod does: SIGTERM, SIGKILL after the grace period.
    fn stop(&mut self) {
        if !self.exited() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Job's pod: a `metastore-ctl` process, killed when dropped.
struct JobRun {
    /// The Job as applied, its status filled in as the Job controller would.
    job: Job,
    /// The command line it ran (the Job's args, cluster DNS resolved).
    args: Vec<String>,
    child: Option<Child>,
    failures: i32,
    /// Where the container's `/dev/termination-log` is.
    termination_log: PathBuf,
}

impl Drop for JobRun {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The StatefulSet controller and the kubelet for one cluster.
struct Kube {
    /// Declared first: every process is killed before the directory goes.
    pods: BTreeMap<i32, Pod>,
    /// Jobs by name (the Job controller).
    jobs: BTreeMap<String, JobRun>,
    /// Extra flags of an ordinal's `metastore` (a node running an older binary).
    extra_args: BTreeMap<i32, Vec<String>>,
    bin: PathBuf,
    dns: Arc<Dns>,
    names: ClusterNames,
    template: Option<PodTemplateSpec>,
    replicas: Option<i32>,
    config: BTreeMap<String, String>,
    /// The volume (claim) of each ordinal; a new number is a new, empty claim.
    volumes: BTreeMap<i32, u32>,
    next_volume: u32,
    /// Ordinals whose pod cannot be scheduled (a node down): not recreated.
    unschedulable: BTreeSet<i32>,
    /// PersistentVolumeClaims other than the members' (a backup volume), by name: the host
    /// directory a pod or Job mounting one sees.
    claims: BTreeMap<String, PathBuf>,
    dir: tempfile::TempDir,
}

impl Kube {
    fn new(bin: PathBuf, dns: Arc<Dns>) -> anyhow::Result<Self> {
        Ok(Kube {
            pods: BTreeMap::new(),
            jobs: BTreeMap::new(),
            extra_args: BTreeMap::new(),
            bin,
            names: dns.names.clone(),
            dns,
            template: None,
            replicas: None,
            config: BTreeMap::new(),
            volumes: BTreeMap::new(),
            next_volume: 0,
            unschedulable: BTreeSet::new(),
            claims: BTreeMap::new(),
            dir: tempfile::tempdir()?,
        })
    }

    /// `(mount path, host directory)` of each of `mounts` that is a claim in [`Kube::claims`].
    fn claim_mounts(
        &self,
        volumes: Option<&Vec<k8s_openapi::api::core::v1::Volume>>,
        mounts: Option<&Vec<k8s_openapi::api::core::v1::VolumeMount>>,
    ) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let mut out = Vec::new();
        for m in mounts.into_iter().flatten() {
            let Some(claim) = volumes
                .into_iter()
                .flatten()
                .find(|v| v.name == m.name)
                .and_then(|v| v.persistent_volume_claim.as_ref())
            else {
                continue;
            };
            let host = self
                .claims
                .get(&claim.claim_name)
                .with_context(|| format!("claim {} does not exist", claim.claim_name))?;
            out.push((m.mount_path.clone(), host.clone()));
        }
        Ok(out)
    }

    /// A container's environment as the kubelet sets it (downward API, ConfigMap keys).
    fn env_of(
        &self,
        container: &k8s_openapi::api::core::v1::Container,
        pod_name: &str,
    ) -> anyhow::Result<BTreeMap<String, String>> {
        let mut env = BTreeMap::new();
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(value), _) => value.clone(),
                (None, Some(source)) => {
                    if let Some(field) = &source.field_ref {
                        match field.field_path.as_str() {
                            "metadata.name" => pod_name.to_string(),
                            "metadata.namespace" => NAMESPACE.to_string(),
                            other => bail!("field {other} not served by this stand-in"),
                        }
                    } else if let Some(key) = &source.config_map_key_ref {
                        self.config
                            .get(&key.key)
                            .cloned()
                            .with_context(|| format!("ConfigMap lacks {}", key.key))?
                    } else {
                        continue;
                    }
                }
                (None, None) => continue,
            };
            env.insert(var.name.clone(), value);
        }
        Ok(env)
    }

    /// The termination message a Job's (last) pod left.
    fn termination_message(&self, job: &str) -> Option<String> {
        let run = self.jobs.get(job)?;
        std::fs::read_to_string(&run.termination_log).ok()
    }

    /// Server-side apply of the ConfigMap and the StatefulSet; the StatefulSet controller then
    /// creates and deletes pods.
    fn apply(&mut self, objects: &OwnedObjects) -> anyhow::Result<()> {
        self.config = objects.config_map.data.clone().unwrap_or_default();
        let spec = objects
            .statefulset
            .spec
            .as_ref()
            .context("StatefulSet without spec")?;
        self.template = Some(spec.template.clone());
        self.replicas = spec.replicas;
        self.sync()
    }

    fn template_json(&self) -> String {
        serde_json::to_string(&self.template).unwrap_or_default()
    }

    fn template_image(&self) -> String {
        self.template
            .as_ref()
            .and_then(|t| t.spec.as_ref())
            .and_then(|s| s.containers.iter().find(|c| c.name == CONTAINER))
            .and_then(|c| c.image.clone())
            .unwrap_or_default()
    }

    /// The StatefulSet controller: a pod for every ordinal below `replicas`, none above (their
    /// claims deleted, `whenScaled: Delete`).
    fn sync(&mut self) -> anyhow::Result<()> {
        let replicas = self.replicas.unwrap_or(0);
        let beyond: Vec<i32> = self
            .pods
            .keys()
            .copied()
            .filter(|o| *o >= replicas)
            .collect();
        for ordinal in beyond {
            if let Some(mut pod) = self.pods.remove(&ordinal) {
                pod.stop();
            }
        }
        let unclaimed: Vec<i32> = self
            .volumes
            .keys()
            .copied()
            .filter(|o| *o >= replicas)
            .collect();
        for ordinal in unclaimed {
            if let Some(volume) = self.volumes.remove(&ordinal) {
                std::fs::remove_dir_all(self.volume_dir(volume)).ok();
            }
        }
        for ordinal in 0..replicas {
            if !self.pods.contains_key(&ordinal) && !self.unschedulable.contains(&ordinal) {
                self.start(ordinal)?;
            }
        }
        Ok(())
    }

    fn volume_dir(&self, volume: u32) -> PathBuf {
        self.dir.path().join(format!("volume-{volume}"))
    }

    /// Starts the pod of `ordinal` from the current template: its args with the environment
    /// expanded as the kubelet does, the pod DNS names resolved, the data directory on its
    /// volume.
    fn start(&mut self, ordinal: i32) -> anyhow::Result<()> {
        let template = self.template.as_ref().context("no StatefulSet applied")?;
        let container = template
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == CONTAINER))
            .context("no metastore container")?;
        let pod_name = self.names.pod_name(ordinal);
        let env = self.env_of(container, &pod_name)?;
        let volume = match self.volumes.get(&ordinal) {
            Some(v) => *v,
            None => {
                self.next_volume += 1;
                self.volumes.insert(ordinal, self.next_volume);
                self.next_volume
            }
        };
        let data_dir = self.volume_dir(volume);
        let (client, peer) = self.dns.ports[ordinal as usize];
        let args: Vec<String> = container
            .args
            .iter()
            .flatten()
            .chain(self.extra_args.get(&ordinal).into_iter().flatten())
            .map(|arg| {
                let mut arg = arg.clone();
                for (k, v) in &env {
                    arg = arg.replace(&format!("$({k})"), v);
                }
                let arg = arg
                    .replace(
                        &format!("--data-dir={DATA_DIR}"),
                        &format!("--data-dir={}", data_dir.display()),
                    )
                    .replace(
                        &format!("0.0.0.0:{CLIENT_PORT}"),
                        &format!("127.0.0.1:{client}"),
                    )
                    .replace(
                        &format!("0.0.0.0:{PEER_PORT}"),
                        &format!("127.0.0.1:{peer}"),
                    );
                self.dns.resolve(&arg)
            })
            .collect();
        let log_path = self.dir.path().join(format!("{pod_name}.log"));
        // Init containers first, each to completion (a failure leaves the pod not started).
        let pod_spec = template.spec.as_ref();
        for init in pod_spec
            .and_then(|s| s.init_containers.as_ref())
            .into_iter()
            .flatten()
        {
            ensure!(
                init.command.as_deref() == Some(&["metastore".to_string()][..]),
                "init container {} runs {:?}",
                init.name,
                init.command
            );
            let init_env = self.env_of(init, &pod_name)?;
            let mounts = self.claim_mounts(
                pod_spec.and_then(|s| s.volumes.as_ref()),
                init.volume_mounts.as_ref(),
            )?;
            let init_args: Vec<String> = init
                .args
                .iter()
                .flatten()
                .map(|arg| {
                    let mut arg = arg.clone();
                    for (k, v) in &init_env {
                        arg = arg.replace(&format!("$({k})"), v);
                    }
                    for (path, host) in &mounts {
                        arg = arg.replace(path.as_str(), &host.display().to_string());
                    }
                    let arg = arg.replace(
                        &format!("--data-dir={DATA_DIR}"),
                        &format!("--data-dir={}", data_dir.display()),
                    );
                    self.dns.resolve(&arg)
                })
                .collect();
            std::fs::create_dir_all(&data_dir)?; // the volume's mount point exists
            let out = Command::new(&self.bin)
                .args(&init_args)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("starting init container {}", init.name))?;
            let mut log = File::options().create(true).append(true).open(&log_path)?;
            writeln!(log, "===== init {}: {}", init.name, init_args.join(" "))?;
            log.write_all(&out.stdout)?;
            log.write_all(&out.stderr)?;
            ensure!(
                out.status.success(),
                "{pod_name}: init container {} failed: {}",
                init.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut log = File::options().create(true).append(true).open(&log_path)?;
        writeln!(log, "===== start: {}", args.join(" "))?;
        let child = Command::new(&self.bin)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let pod = Pod {
            image: container.image.clone().unwrap_or_default(),
            template: self.template_json(),
            volume,
            child,
        };
        self.pods.insert(ordinal, pod);
        Ok(())
    }

    /// Server-side apply of a Job: created (its pod started) if it does not exist, left alone
    /// if it does.
    fn apply_job(&mut self, job: Job) -> anyhow::Result<()> {
        let name = job.metadata.name.clone().context("Job without a name")?;
        if self.jobs.contains_key(&name) {
            return Ok(());
        }
        let container = job
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .context("Job without a container")?;
        ensure!(
            container.command.as_deref() == Some(&["metastore-ctl".to_string()][..]),
            "the Job runs {:?}",
            container.command
        );
        let mounts = self.claim_mounts(
            job.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.volumes.as_ref()),
            container.volume_mounts.as_ref(),
        )?;
        let termination_log = self.dir.path().join(format!("{name}.termination-log"));
        let args = container
            .args
            .iter()
            .flatten()
            .map(|a| {
                let mut a = a.replace(
                    "/dev/termination-log",
                    &termination_log.display().to_string(),
                );
                for (path, host) in &mounts {
                    a = a.replace(path.as_str(), &host.display().to_string());
                }
                self.dns.resolve(&a)
            })
            .collect();
        let mut run = JobRun {
            job,
            args,
            child: None,
            failures: 0,
            termination_log,
        };
        self.start_job(&name, &mut run)?;
        self.jobs.insert(name, run);
        Ok(())
    }

    fn start_job(&self, name: &str, run: &mut JobRun) -> anyhow::Result<()> {
        let ctl = self.bin.with_file_name("metastore-ctl");
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))?;
        writeln!(log, "===== start: {}", run.args.join(" "))?;
        run.child = Some(
            Command::new(&ctl)
                .args(&run.args)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", ctl.display()))?,
        );
        Ok(())
    }

    /// The Job controller: a pod that exited 0 completes its Job; one that failed is started
    /// again until `backoffLimit` failures, then the Job fails. Returns the Jobs as the API
    /// server would list them.
    fn jobs(&mut self) -> anyhow::Result<Vec<Job>> {
        let names: Vec<String> = self.jobs.keys().cloned().collect();
        for name in names {
            let Some(mut run) = self.jobs.remove(&name) else {
                continue;
            };
            let exited = match run.child.as_mut() {
                Some(child) => child.try_wait()?,
                None => None,
            };
            if let Some(exit) = exited {
                run.child = None;
                let condition = |type_: &str| JobCondition {
                    type_: type_.into(),
                    status: "True".into(),
                    ..Default::default()
                };
                let backoff = run
                    .job
                    .spec
                    .as_ref()
                    .and_then(|s| s.backoff_limit)
                    .unwrap_or(6);
                if exit.success() {
                    run.job.status = Some(JobStatus {
                        succeeded: Some(1),
                        failed: Some(run.failures),
                        conditions: Some(vec![condition("Complete")]),
                        ..Default::default()
                    });
                } else {
                    run.failures += 1;
                    if run.failures > backoff {
                        run.job.status = Some(JobStatus {
                            failed: Some(run.failures),
                            conditions: Some(vec![condition("Failed")]),
                            ..Default::default()
                        });
                    } else {
                        self.start_job(&name, &mut run)?;
                    }
                }
            } else if run.child.is_some() {
                run.job.status = Some(JobStatus {
                    active: Some(1),
                    failed: Some(run.failures),
                    ..Default::default()
                });
            }
            self.jobs.insert(name, run);
        }
        Ok(self.jobs.values().map(|r| r.job.clone()).collect())
    }

    /// Deletes a pod; the StatefulSet recreates it from the current template on the same claim.
    fn delete_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let ordinal = self.names.ordinal_of(name).context("not a member pod")?;
        if let Some(mut pod) = self.pods.remove(&ordinal) {
            pod.stop();
        }
        self.sync()
    }

    /// The pod's node goes away: the pod is gone and cannot be scheduled again for now.
    fn lose_node(&mut self, ordinal: i32) {
        self.unschedulable.insert(ordinal);
        if let Some(mut pod) = self.pods.remove(&ordinal) {
            pod.stop();
        }
    }

    /// The node is back: the StatefulSet recreates the pod on its claim.
    fn node_back(&mut self, ordinal: i32) -> anyhow::Result<()> {
        self.unschedulable.remove(&ordinal);
        self.sync()
    }

    fn statefulset_view(&self) -> Option<StatefulSetView> {
        Some(StatefulSetView {
            replicas: self.replicas?,
            image: self.template_image(),
        })
    }

    fn image_of(&self, pod_name: &str) -> Option<String> {
        let ordinal = self.names.ordinal_of(pod_name)?;
        self.pods.get(&ordinal).map(|p| p.image.clone())
    }

    /// What holds each pod's data: its claim.
    fn holders(&self) -> BTreeMap<String, String> {
        self.pods
            .iter()
            .map(|(o, p)| (self.names.pod_name(*o), format!("volume-{}", p.volume)))
            .collect()
    }

    /// The pods as the controller sees them (Ready from the kubelet's `/health` probe).
    async fn pod_views(
        &mut self,
        cluster: &MetaStoreCluster,
        view: Option<&ClusterView>,
        holders: &BTreeMap<String, String>,
    ) -> Vec<PodView> {
        let current = self.template_json();
        let mut pods = Vec::new();
        for (ordinal, pod) in &mut self.pods {
            let name = self.names.pod_name(*ordinal);
            let exited = pod.exited();
            let ready = !exited && health(&self.dns.client_url(*ordinal)).await;
            pods.push(PodView {
                ready,
                image: pod.image.clone(),
                up_to_date: pod.template == current,
                terminating: false,
                crash_looping: exited,
                empty_volume: volume_replaced(
                    cluster.status.as_ref(),
                    view,
                    &self.names,
                    &name,
                    holders.get(&name).map(String::as_str),
                ),
                name,
            });
        }
        pods
    }

    /// The last lines of every member's and Job's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        let pods = (0..MAX_MEMBERS as i32).map(|i| self.names.pod_name(i));
        for name in pods.chain(self.jobs.keys().cloned()) {
            let Ok(text) = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
            else {
                continue;
            };
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("\n--- {name} ---\n{tail}"));
        }
        out
    }
}

/// The kubelet's readiness probe: `GET /health` on the client port answers 200.
async fn health(url: &str) -> bool {
    let Some(addr) = url.strip_prefix("http://") else {
        return false;
    };
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 16];
        stream.read_exact(&mut head).await.ok()?;
        Some(head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"))
    };
    tokio::time::timeout(Duration::from_secs(1), probe)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// The operator.

/// One action the operator took, with the leader it saw when it decided.
#[derive(Clone, Debug)]
struct Taken {
    action: Action,
    leader: Option<String>,
}

/// An Event the controller would have published.
#[derive(Clone, Debug, PartialEq)]
struct Published {
    warning: bool,
    reason: String,
    note: String,
}

/// The controller's reconcile, minus the Kubernetes API calls that [`Kube`] stands in for.
struct Operator {
    cluster: MetaStoreCluster,
    api: ResolvingApi,
    names: ClusterNames,
    /// Every Event published, in order.
    events: Vec<Published>,
    /// Every status written, in order.
    statuses: Vec<MetaStoreClusterStatus>,
}

impl Operator {
    fn new(cluster: MetaStoreCluster, dns: Arc<Dns>) -> Self {
        Operator {
            names: dns.names.clone(),
            cluster,
            api: ResolvingApi {
                inner: GrpcClusterApi::default(),
                dns,
            },
            events: Vec::new(),
            statuses: Vec::new(),
        }
    }

    /// A new operator process: it knows only what the API server holds (the object with its
    /// status, through JSON).
    fn restarted(self) -> anyhow::Result<Self> {
        let json = serde_json::to_value(&self.cluster)?;
        Ok(Operator {
            cluster: serde_json::from_value(json)?,
            ..self
        })
    }

    /// Edits the spec as `kubectl apply` would (a new generation).
    fn edit(&mut self, change: impl FnOnce(&mut MetaStoreClusterSpec)) {
        change(&mut self.cluster.spec);
        self.cluster.metadata.generation = Some(self.cluster.metadata.generation.unwrap_or(1) + 1);
    }

    /// Observe, plan, apply, act, write status; the membership call's error, if any, is
    /// returned beside the decision (the controller would requeue).
    async fn reconcile(&mut self, kube: &mut Kube) -> anyhow::Result<(Decision, Option<String>)> {
        let sts_replicas = kube.replicas;
        let endpoints = member_endpoints(&self.cluster, &self.names, sts_replicas);
        let mut view =
            observe_cluster(&self.api, &self.names, &endpoints, |pod| kube.image_of(pod)).await;
        // One binary for every image: a tag that names a release stands for that release.
        for m in view.iter_mut().flat_map(|v| v.members.iter_mut()) {
            let tagged = m
                .ordinal(&self.names)
                .and_then(|o| kube.image_of(&self.names.pod_name(o)))
                .and_then(|image| version_of_image(&image))
                .and_then(|v| Version::parse(&v));
            if tagged.is_some() {
                m.version = tagged;
            }
        }
        let holders = kube.holders();
        let pods = kube.pod_views(&self.cluster, view.as_ref(), &holders).await;
        // The Job controller's view, listed once for the migration and the backups.
        let jobs = kube.jobs()?;
        let migration_job = jobs
            .iter()
            .filter_map(job_view)
            .max_by_key(|j| j.target_format);
        let observed = Observed {
            now: Timestamp::now(),
            cluster: view,
            statefulset: kube.statefulset_view(),
            pods,
            migration_job,
        };
        let decision = plan(&self.cluster, &observed);

        let renderer = Renderer::new(&self.cluster)?;
        let objects = renderer.render(&render_params(&self.cluster, &decision, sts_replicas));
        kube.apply(&objects)?;

        let mut error = None;
        match act_on_members(
            &self.api,
            &self.names,
            observed.cluster.as_ref(),
            &decision.action,
            &endpoints,
        )
        .await
        {
            Ok(true) => {}
            Ok(false) => match &decision.action {
                Action::DeletePodForUpgrade { member } | Action::RestartPod { member } => {
                    kube.delete_pod(member)?;
                }
                Action::StartMigrationJob { to } => {
                    kube.apply_job(renderer.migration_job(*to, &decision.image))?;
                }
                _ => {}
            },
            Err(e) => error = Some(e.to_string()),
        }
        // Backups, as the controller's `backups` step: the Jobs labelled `component=backup`,
        // the manifest from a finished one's termination message, the plan, the Job applied.
        let mut backup_events = Vec::new();
        let backups = if self.cluster.spec.backup.is_some() {
            let views: Vec<BackupJobView> = jobs
                .iter()
                .filter(|j| {
                    j.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("app.kubernetes.io/component"))
                        .map(String::as_str)
                        == Some("backup")
                })
                .map(|j| {
                    let mut v = backup_job_view(j);
                    v.read_termination_message(kube.termination_message(&v.name));
                    v
                })
                .collect();
            let ready = backup::cluster_ready(observed.cluster.as_ref());
            let p = backup::plan(&self.cluster, &views, observed.now, ready);
            if let Some(start) = &p.start {
                let job = renderer
                    .backup_job(&start.name, &decision.image)
                    .context("spec.backup is set")?;
                kube.apply_job(job)?;
            }
            backup_events = backup_events_of(&p);
            Some(p)
        } else {
            None
        };
        let mut new_status =
            status::build(&self.cluster, &self.names, &observed, &decision, &holders);
        if let Some(b) = &backups {
            b.record_in(&mut new_status);
        }
        self.events
            .extend(backup_events.into_iter().map(|e| Published {
                warning: e.type_ == EventType::Warning,
                reason: e.reason,
                note: e.note.unwrap_or_default(),
            }));
        self.events.extend(
            events(&self.cluster, &decision, &new_status)
                .into_iter()
                .map(|e| Published {
                    warning: e.type_ == EventType::Warning,
                    reason: e.reason,
                    note: e.note.unwrap_or_default(),
                }),
        );
        self.statuses.push(new_status.clone());
        self.cluster.status = Some(new_status);
        Ok((decision, error))
    }

    /// Reconciles until the plan says Done; returns the actions taken (waits left out).
    /// Fails on Degraded, on a refusal, and after [`CONVERGE`].
    async fn converge(&mut self, kube: &mut Kube, what: &str) -> anyhow::Result<Vec<Taken>> {
        self.until(kube, what, |d| d.action == Action::Done).await
    }

    /// Reconciles until `stop` holds for a decision (that decision's action included).
    async fn until(
        &mut self,
        kube: &mut Kube,
        what: &str,
        stop: impl Fn(&Decision) -> bool,
    ) -> anyhow::Result<Vec<Taken>> {
        let start = Instant::now();
        let mut taken = Vec::new();
        let mut last_error = None;
        loop {
            let (decision, error) = self.reconcile(kube).await?;
            match &decision.action {
                Action::MarkDegraded(reason) => {
                    bail!("{what}: Degraded: {reason}{}", kube.logs())
                }
                Action::RefuseWithCondition(refusal) => {
                    bail!("{what}: refused: {refusal}{}", kube.logs())
                }
                Action::WaitFor(_) | Action::Done => {}
                action if error.is_none() => taken.push(Taken {
                    action: action.clone(),
                    // The leader the decision was made on (what status now shows).
                    leader: self.cluster.status.as_ref().and_then(|s| s.leader.clone()),
                }),
                _ => {}
            }
            if stop(&decision) && error.is_none() {
                // Shown with a failure (and with --no-capture).
                eprintln!("{what}: {:.1?}", start.elapsed());
                for t in &taken {
                    eprintln!("  {} (leader {:?})", t.action, t.leader);
                }
                return Ok(taken);
            }
            if error.is_some() {
                last_error = error;
            }
            ensure!(
                start.elapsed() < CONVERGE,
                "{what}: not done after {CONVERGE:?}; last action: {}; last error: {last_error:?}{}",
                decision.action,
                kube.logs()
            );
            let pause = if matches!(decision.action, Action::WaitFor(_)) {
                200
            } else {
                50
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
}

fn spec(replicas: i32, version: &str) -> MetaStoreClusterSpec {
    MetaStoreClusterSpec {
        replicas,
        version: Some(version.into()),
        image: None,
        storage: StorageSpec::default(),
        resources: None,
        tls: None,
        pod: None,
        // Faster elections on loopback; no fsync in a test.
        config: BTreeMap::from([
            ("heartbeat-interval".to_string(), "50".to_string()),
            ("election-timeout".to_string(), "500".to_string()),
            ("unsafe-no-fsync".to_string(), "true".to_string()),
        ]),
        pod_disruption_budget: None,
        maintenance: None,
        backup: None,
        bootstrap: None,
        step_timeout_seconds: None,
    }
}

/// A cluster of `replicas` members on `version`, bootstrapped by the operator.
async fn bootstrap(bin: PathBuf, replicas: i32) -> anyhow::Result<(Kube, Operator)> {
    let (kube, op) = bootstrap_with(bin, spec(replicas, "1.2.0"), |_| {}).await?;
    let status = op.cluster.status.as_ref().context("status")?;
    assert_eq!(status.current_version.as_deref(), Some("1.2.0"));
    Ok((kube, op))
}

/// A cluster of `spec`, bootstrapped by the operator; `prepare` sets the stand-in up first.
async fn bootstrap_with(
    bin: PathBuf,
    spec: MetaStoreClusterSpec,
    prepare: impl FnOnce(&mut Kube),
) -> anyhow::Result<(Kube, Operator)> {
    let replicas = spec.replicas;
    let mut cluster = MetaStoreCluster::new(NAME, spec);
    cluster.metadata.namespace = Some(NAMESPACE.into());
    cluster.metadata.uid = Some("6a2c1f1e-0000-4000-8000-000000000001".into());
    cluster.metadata.generation = Some(1);
    let names = ClusterNames::new(NAME, NAMESPACE, false, false);
    let dns = Arc::new(Dns::new(names)?);
    let mut kube = Kube::new(bin, dns.clone())?;
    prepare(&mut kube);
    let mut op = Operator::new(cluster, dns);
    let taken = op.converge(&mut kube, "bootstrap").await?;
    assert_eq!(actions(&taken), [Action::Bootstrap { replicas }]);
    let status = op.cluster.status.as_ref().context("status")?;
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(status.ready_replicas, replicas);
    Ok((kube, op))
}

fn actions(taken: &[Taken]) -> Vec<Action> {
    taken.iter().map(|t| t.action.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// Talking to the members directly, to check outcomes.

async fn put(url: &str, key: &str, value: &str) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let attempt = async {
            let mut kv = KvClient::connect(url.to_string()).await?;
            let request = PutRequest {
                key: key.as_bytes().to_vec().into(),
                value: value.as_bytes().to_vec().into(),
                ..Default::default()
            };
            let response = kv.put(request).await?.into_inner();
            anyhow::Ok(response.header.map_or(0, |h| h.revision))
        };
        match attempt.await {
            Ok(revision) => return Ok(revision),
            Err(e) if Instant::now() > deadline => return Err(e.context(format!("put {key}"))),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A serializable read: the member's own copy.
async fn local_get(url: &str, key: &str) -> anyhow::Result<Option<String>> {
    Ok(local_value(url, key)
        .await?
        .map(|v| String::from_utf8_lossy(&v).into_owned()))
}

/// `key`'s value on the member at `url` (a serializable read: its own copy).
async fn local_value(url: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let mut kv = KvClient::connect(url.to_string()).await?;
    let request = RangeRequest {
        key: key.as_bytes().to_vec().into(),
        serializable: true,
        ..Default::default()
    };
    let response = kv.range(request).await?.into_inner();
    Ok(response.kvs.into_iter().next().map(|kv| kv.value.to_vec()))
}

/// Members as (name, id, learner), sorted by name.
async fn members(url: &str) -> anyhow::Result<Vec<(String, u64, bool)>> {
    let mut cluster = ClusterClient::connect(url.to_string()).await?;
    let list = cluster
        .member_list(MemberListRequest { linearizable: true })
        .await?
        .into_inner();
    let mut out: Vec<_> = list
        .members
        .into_iter()
        .map(|m| (m.name, m.id, m.is_learner))
        .collect();
    out.sort();
    Ok(out)
}

async fn leader_id(url: &str) -> anyhow::Result<u64> {
    let mut maintenance = MaintenanceClient::connect(url.to_string()).await?;
    Ok(maintenance
        .status(StatusRequest {})
        .await?
        .into_inner()
        .leader)
}

/// Waits until every member in `ordinals` holds `key` = `value` and they agree on HashKV at
/// `revision`.
async fn converged(
    dns: &Dns,
    ordinals: &[i32],
    key: &str,
    value: &str,
    revision: i64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut ok = true;
        let mut hashes = Vec::new();
        for &o in ordinals {
            let url = dns.client_url(o);
            ok &= local_get(&url, key).await.ok().flatten().as_deref() == Some(value);
            let mut maintenance = MaintenanceClient::connect(url).await?;
            let hash = maintenance
                .hash_kv(HashKvRequest { revision })
                .await
                .map(|r| r.into_inner().hash)
                .ok();
            hashes.push(hash);
        }
        let agree = hashes[0].is_some() && hashes.iter().all(|h| *h == hashes[0]);
        if ok && agree {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "members {ordinals:?}: {key} present everywhere: {ok}, HashKV at {revision}: {hashes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pod_names(ordinals: impl IntoIterator<Item = i32>) -> Vec<String> {
    ordinals
        .into_iter()
        .map(|i| format!("{NAME}-{i}"))
        .collect()
}

/// Whether the action is a MoveLeader immediately followed, in `taken`, by the removal or the
/// replacement of the member that led when it was decided.
fn leadership_moved_off(taken: &[Taken], i: usize) -> bool {
    let Some(from) = taken[i].leader.as_deref() else {
        return false;
    };
    matches!(
        taken.get(i + 1).map(|t| &t.action),
        Some(Action::RemoveMember { member, .. } | Action::DeletePodForUpgrade { member })
            if member == from
    )
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_up_adds_learners_then_scale_down_removes_members() -> anyhow::Result<()> {
    let Some(bin) = binary_or_skip() else {
        return Ok(());
    };
    let (mut kube, mut op) = bootstrap(bin, 3).await?;
    let dns = op.api.dns.clone();
    for i in 0..20 {
        put(&dns.client_url(0), &format!("before-{i}"), "x").await?;
    }
    let revision = put(&dns.client_url(0), "marker", "3").await?;
    let original = members(&dns.client_url(0)).await?;

    // 3 -> 5: each new member joins as a learner, its pod starts, it is promoted once caught up.
    op.edit(|s| s.replicas = 5);
    let taken = op.converge(&mut kube, "scale 3 -> 5").await?;
    let add = |i: i32| Action::AddLearner {
        member: format!("{NAME}-{i}"),
        peer_url: op.names.peer_url(i),
    };
    let promoted: Vec<&str> = taken
        .iter()
        .filter_map(|t| match &t.action {
            Action::PromoteLearner { member, .. } => Some(member.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        actions(&taken)
            .into_iter()
            .filter(|a| !matches!(a, Action::PromoteLearner { .. }))
            .collect::<Vec<_>>(),
        [
            add(3),
            Action::ScaleStatefulSet { replicas: 4 },
            add(4),
            Action::ScaleStatefulSet { replicas: 5 },
        ],
        "{taken:#?}"
    );
    // Promotion comes after the learner's pod started and before the next member is added.
    assert!(
        matches!(&taken[2].action, Action::PromoteLearner { member, .. } if member == "demo-3"),
        "{taken:#?}"
    );
    assert_eq!(promoted, ["demo-3", "demo-4"]);
    let list = members(&dns.client_url(0)).await?;
    assert_eq!(
        list.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
        pod_names(0..5)
    );
    assert!(list.iter().all(|m| !m.2), "no learner left: {list:?}");
    // The three original members kept their IDs.
    assert!(
        original.iter().all(|o| list.contains(o)),
        "{original:?} {list:?}"
    );
    converged(&dns, &[0, 1, 2, 3, 4], "marker", "3", revision).await?;
    assert_eq!(
        local_get(&dns.client_url(4), "before-7").await?.as_deref(),
        Some("x")
    );
    let status = op.cluster.status.as_ref().context("status")?;
    assert_eq!(status.ready_replicas, 5);
    assert_eq!(status.members.len(), 5);
    assert_eq!(
        status
            .members
            .iter()
            .filter(|m| m.role == MemberRole::Leader)
            .count(),
        1
    );
    assert_eq!(status.workflow, None);

    // 5 -> 3: highest ordinals removed through the API, then the StatefulSet shrinks.
    let revision = put(&dns.client_url(1), "marker", "5").await?;
    op.edit(|s| s.replicas = 3);
    let taken = op.converge(&mut kube, "scale 5 -> 3").await?;
    for (i, t) in taken.iter().enumerate() {
        if matches!(t.action, Action::MoveLeader { .. }) {
            assert!(leadership_moved_off(&taken, i), "{taken:#?}");
        }
    }
    let without_moves: Vec<Action> = actions(&taken)
        .into_iter()
        .filter(|a| !matches!(a, Action::MoveLeader { .. }))
        .collect();
    let removed: Vec<&str> = without_moves
        .iter()
        .filter_map(|a| match a {
            Action::RemoveMember { member, .. } => Some(member.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(removed, ["demo-4", "demo-3"], "{taken:#?}");
    assert_eq!(
        without_moves.last(),
        Some(&Action::ScaleStatefulSet { replicas: 3 })
    );
    // No removed member led when it was removed.
    for t in &taken {
        if let Action::RemoveMember { member, .. } = &t.action {
            assert_ne!(t.leader.as_deref(), Some(member.as_str()), "{taken:#?}");
        }
    }
    assert_eq!(members(&dns.client_url(0)).await?, original);
    assert_eq!(kube.pods.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(kube.volumes.keys().copied().collect::<Vec<_>>(), [0, 1, 2]);
    let after = put(&dns.client_url(2), "after-scale-down", "y").await?;
    assert!(after > revision);
    converged(&dns, &[0, 1, 2], "after-scale-down", "y", after).await?;
    assert_eq!(
        local_get(&dns.client_url(2), "marker").await?.as_deref(),
        Some("5")
    );
    assert_eq!(
        op.cluster.status.as_ref().map(|s| s.ready_replicas),
        Some(3)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_gone_is_waited_for_and_a_removal_without_quorum_is_refused() -> anyhow::Result<()>
{
    let Some(bin) = binary_or_skip() else {
        return Ok(());
    };
    let (mut kube, mut op) = bootstrap(bin, 3).await?;
    let dns = op.api.dns.clone();
    let original = members(&dns.client_url(0)).await?;

    // demo-1's node goes away: the pod is gone, but that is not a scale-in.
    kube.lose_node(1);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (decision, _) = op.reconcile(&mut kube).await?;
        if decision.action
            == Action::WaitFor(WaitReason::MemberUnhealthy {
                member: "demo-1".into(),
            })
        {
            break;
        }
        ensure!(Instant::now() < deadline, "last: {}", decision.action);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = op.cluster.status.clone().context("status")?;
    assert_eq!(status.ready_replicas, 2);
    let demo_1 = status
        .members
        .iter()
        .find(|m| m.name == "demo-1")
        .context("demo-1 still listed")?;
    assert!(!demo_1.healthy);
    assert_eq!(members(&dns.client_url(0)).await?, original);

    // Shrinking to one member now would leave 1 healthy voter of 2: refused, nothing removed.
    op.edit(|s| s.replicas = 1);
    let (decision, _) = op.reconcile(&mut kube).await?;
    assert_eq!(
        decision.action,
        Action::RefuseWithCondition(Refusal::WouldLoseQuorum {
            member: "demo-2".into()
        })
    );
    let status = op.cluster.status.clone().context("status")?;
    assert_eq!(status.phase, Some(Phase::Degraded));
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == ConditionType::Degraded)
        .context("Degraded condition")?;
    assert_eq!(degraded.status, ConditionStatus::True);
    assert_eq!(degraded.reason, "WouldLoseQuorum");
    assert_eq!(members(&dns.client_url(0)).await?, original);
    assert_eq!(kube.replicas, Some(3), "the StatefulSet keeps its size");

    // Spec reverted, node back: the member returns with its data and the cluster is whole.
    op.edit(|s| s.replicas = 3);
    kube.node_back(1)?;
    let taken = op.converge(&mut kube, "member back").await?;
    assert!(taken.is_empty(), "nothing to do but wait: {taken:#?}");
    assert_eq!(members(&dns.client_url(1)).await?, original);
    let revision = put(&dns.client_url(1), "back", "1").await?;
    converged(&dns, &[0, 1, 2], "back", "1", revision).await?;
    Ok(())
}

/// MoveLeader straight through the API (to set a test up), waiting until it took.
async fn make_leader(dns: &Dns, ordinal: i32) -> anyhow::Result<()> {
    let target = members(&dns.client_url(ordinal))
        .await?
        .into_iter()
        .find(|m| m.0 == format!("{NAME}-{ordinal}"))
        .context("member")?
        .1;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let leader = leader_id(&dns.client_url(ordinal)).await?;
        if leader == target {
            return Ok(());
        }
        for o in 0..MAX_MEMBERS as i32 {
            let Ok(id) = members(&dns.client_url(o)).await else {
                continue;
            };
            if id
                .iter()
                .any(|m| m.1 == leader && m.0 == format!("{NAME}-{o}"))
            {
                let mut maintenance = MaintenanceClient::connect(dns.client_url(o)).await?;
                maintenance
                    .move_leader(MoveLeaderRequest { target_id: target })
                    .await?;
                break;
            }
        }
        ensure!(
            Instant::now() < deadline,
            "{NAME}-{ordinal} never became leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_down_moves_leadership_off_a_member_before_removing_it() -> anyhow::Result<()> {
    let Some(bin) = binary_or_skip() else {
        return Ok(());
    };
    let (mut kube, mut op) = bootstrap(bin, 3).await?;
    let dns = op.api.dns.clone();
    let revision = put(&dns.client_url(0), "kept", "yes").await?;
    make_leader(&dns, 2).await?;

    op.edit(|s| s.replicas = 1);
    let taken = op.converge(&mut kube, "scale 3 -> 1").await?;
    assert!(
        matches!(&taken[0].action, Action::MoveLeader { .. }) && leadership_moved_off(&taken, 0),
        "the leader demo-2 hands leadership over first: {taken:#?}"
    );
    for (i, t) in taken.iter().enumerate() {
        match &t.action {
            Action::MoveLeader { .. } => assert!(leadership_moved_off(&taken, i), "{taken:#?}"),
            Action::RemoveMember { member, .. } => {
                assert_ne!(t.leader.as_deref(), Some(member.as_str()), "{taken:#?}");
            }
            _ => {}
        }
    }
    let removed: Vec<&str> = taken
        .iter()
        .filter_map(|t| match &t.action {
            Action::RemoveMember { member, .. } => Some(member.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(removed, ["demo-2", "demo-1"]);
    assert_eq!(
        taken.last().map(|t| &t.action),
        Some(&Action::ScaleStatefulSet { replicas: 1 })
    );
    let list = members(&dns.client_url(0)).await?;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].0, "demo-0");
    converged(&dns, &[0], "kept", "yes", revision).await?;
    put(&dns.client_url(0), "alone", "ok").await?;
    assert_eq!(
        op.cluster.status.as_ref().and_then(|s| s.leader.as_deref()),
        Some("demo-0")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_replaces_followers_first_and_the_leader_last_then_rolls_back(
) -> anyhow::Result<()> {
    let Some(bin) = binary_or_skip() else {
        return Ok(());
    };
    let (mut kube, mut op) = bootstrap(bin, 3).await?;
    let dns = op.api.dns.clone();
    for i in 0..50 {
        put(
            &dns.client_url(i % 3),
            &format!("k{i:02}"),
            &format!("v{i}"),
        )
        .await?;
    }
    let original = members(&dns.client_url(0)).await?;

    op.edit(|s| s.version = Some("1.3.0".into()));
    // The first pod is replaced; then the operator restarts and must pick up where it was.
    let mut taken = op
        .until(&mut kube, "upgrade, first step", |d| {
            matches!(d.action, Action::DeletePodForUpgrade { .. })
        })
        .await?;
    let Some(Action::DeletePodForUpgrade { member: first_pod }) =
        taken.last().map(|t| t.action.clone())
    else {
        bail!("the upgrade starts by replacing a pod: {taken:#?}");
    };
    // The operator restarts: it has only what the API server keeps (times to the second).
    let mut op = op.restarted()?;
    let recorded = op
        .cluster
        .status
        .as_ref()
        .and_then(|s| s.workflow.clone())
        .context("the upgrade is recorded in status")?;
    assert_eq!(recorded.kind, WorkflowKind::Upgrade);
    assert_eq!(recorded.target, "1.3.0");
    assert_eq!(recorded.from.as_deref(), Some("1.2.0"));
    assert_eq!(recorded.member.as_deref(), Some(first_pod.as_str()));

    let (next, _) = op.reconcile(&mut kube).await?;
    let resumed = op
        .cluster
        .status
        .as_ref()
        .and_then(|s| s.workflow.clone())
        .context("still upgrading after the restart")?;
    assert_eq!(
        (resumed.kind, &resumed.target, &resumed.started_at),
        (
            WorkflowKind::Upgrade,
            &recorded.target,
            &recorded.started_at
        ),
        "the same workflow goes on"
    );
    if !matches!(next.action, Action::WaitFor(_)) {
        taken.push(Taken {
            action: next.action.clone(),
            leader: op.cluster.status.as_ref().and_then(|s| s.leader.clone()),
        });
    }
    taken.extend(op.converge(&mut kube, "upgrade to 1.3.0").await?);
    assert_eq!(
        op.cluster.status.as_ref().and_then(|s| s.workflow.clone()),
        None
    );

    check_rolling_order(&taken, &first_pod, &original)?;
    let image = image_for_version("1.3.0");
    assert!(kube.pods.values().all(|p| p.image == image));
    let status = op.cluster.status.as_ref().context("status")?;
    assert_eq!(status.current_version.as_deref(), Some("1.3.0"));
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(
        members(&dns.client_url(0)).await?,
        original,
        "same members, same IDs"
    );
    let revision = put(&dns.client_url(2), "after-upgrade", "1").await?;
    converged(&dns, &[0, 1, 2], "after-upgrade", "1", revision).await?;
    for o in 0..3 {
        assert_eq!(
            local_get(&dns.client_url(o), "k42").await?.as_deref(),
            Some("v42")
        );
    }

    // Reverting the spec (the format has not moved) rolls back the same way.
    op.edit(|s| s.version = Some("1.2.0".into()));
    let taken = op.converge(&mut kube, "rollback to 1.2.0").await?;
    check_rolling_order(&taken, "", &original)?;
    let image = image_for_version("1.2.0");
    assert!(kube.pods.values().all(|p| p.image == image));
    assert_eq!(
        op.cluster
            .status
            .as_ref()
            .and_then(|s| s.current_version.as_deref()),
        Some("1.2.0")
    );
    let revision = put(&dns.client_url(0), "after-rollback", "1").await?;
    converged(&dns, &[0, 1, 2], "after-rollback", "1", revision).await?;
    assert_eq!(members(&dns.client_url(0)).await?, original);
    Ok(())
}

/// One pod replaced at a time, each once; never the leader of the moment; exactly one
/// MoveLeader, right before the last replacement, away from the member replaced last.
fn check_rolling_order(
    taken: &[Taken],
    first: &str,
    original: &[(String, u64, bool)],
) -> anyhow::Result<()> {
    let replaced: Vec<&str> = taken
        .iter()
        .filter_map(|t| match &t.action {
            Action::DeletePodForUpgrade { member } => Some(member.as_str()),
            _ => None,
        })
        .collect();
    let mut sorted = replaced.clone();
    sorted.sort_unstable();
    let all: Vec<&str> = original.iter().map(|m| m.0.as_str()).collect();
    ensure!(sorted == all, "each member replaced once: {taken:#?}");
    if !first.is_empty() {
        ensure!(replaced[0] == first, "{taken:#?}");
    }
    for t in taken {
        if let Action::DeletePodForUpgrade { member } = &t.action {
            ensure!(
                t.leader.as_deref() != Some(member.as_str()),
                "{member} replaced while it led: {taken:#?}"
            );
        }
    }
    let moves: Vec<usize> = taken
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.action, Action::MoveLeader { .. }))
        .map(|(i, _)| i)
        .collect();
    ensure!(moves.len() == 1, "one MoveLeader: {taken:#?}");
    ensure!(
        moves[0] + 2 == taken.len() && leadership_moved_off(taken, moves[0]),
        "leader last, after MoveLeader: {taken:#?}"
    );
    // Followers went highest ordinal first.
    let followers = &replaced[..replaced.len() - 1];
    ensure!(
        followers.windows(2).all(|w| w[0] > w[1]),
        "followers highest ordinal first: {followers:?}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Storage format migration.

/// A spec on an image whose tag names no version (`:dev`): the members' versions can only come
/// from what their servers report. At storage format 1, which a new data directory would not
/// get by default (2).
fn dev_spec(replicas: i32) -> MetaStoreClusterSpec {
    let mut spec = MetaStoreClusterSpec {
        version: None,
        image: Some("ghcr.io/metastore/metastore:dev".into()),
        ..spec(replicas, "0.0.0")
    };
    spec.storage.format_version = 1;
    spec
}

async fn server_status(url: &str) -> anyhow::Result<StatusResponse> {
    let mut maintenance = MaintenanceClient::connect(url.to_string()).await?;
    Ok(maintenance.status(StatusRequest {}).await?.into_inner())
}

/// HashKV of members 0..3 at `revision`.
async fn hashes(dns: &Dns, revision: i64) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for o in 0..3 {
        let mut maintenance = MaintenanceClient::connect(dns.client_url(o)).await?;
        out.push(
            maintenance
                .hash_kv(HashKvRequest { revision })
                .await?
                .into_inner()
                .hash,
        );
    }
    Ok(out)
}

/// Writes 300 keys (the first 50 twice) and a marker; returns the marker's revision once every
/// member holds it.
async fn write_data(dns: &Dns) -> anyhow::Result<i64> {
    for i in 0..300 {
        put(
            &dns.client_url(i % 3),
            &format!("k{i:03}"),
            &format!("v{i}"),
        )
        .await?;
    }
    for i in 0..50 {
        put(
            &dns.client_url(i % 3),
            &format!("k{i:03}"),
            &format!("w{i}"),
        )
        .await?;
    }
    let revision = put(&dns.client_url(0), "marker", "before").await?;
    converged(dns, &[0, 1, 2], "marker", "before", revision).await?;
    Ok(revision)
}

/// `n` more keys through one connection.
async fn bulk_load(url: &str, n: usize) -> anyhow::Result<()> {
    let mut kv = KvClient::connect(url.to_string()).await?;
    for i in 0..n {
        let request = PutRequest {
            key: format!("bulk/{i:05}").into_bytes().into(),
            value: vec![b'x'; 100].into(),
            ..Default::default()
        };
        kv.put(request).await?;
    }
    Ok(())
}

/// Every member still holds what [`write_data`] wrote.
async fn data_intact(dns: &Dns) -> anyhow::Result<()> {
    for o in 0..3 {
        let url = dns.client_url(o);
        for (key, value) in [
            ("k000", "w0"),
            ("k049", "w49"),
            ("k050", "v50"),
            ("k173", "v173"),
            ("k299", "v299"),
            ("marker", "before"),
        ] {
            assert_eq!(
                local_get(&url, key).await?.as_deref(),
                Some(value),
                "{key} on member {o}"
            );
        }
    }
    Ok(())
}

/// Each member's (storage format written, re-encoding pending), asked directly.
async fn formats(dns: &Dns) -> anyhow::Result<Vec<(u32, bool)>> {
    let mut out = Vec::new();
    for o in 0..3 {
        let s = server_status(&dns.client_url(o)).await?;
        out.push((s.storage_format, s.storage_migration_pending));
    }
    Ok(out)
}

fn condition_of(
    status: &MetaStoreClusterStatus,
    type_: ConditionType,
) -> anyhow::Result<(ConditionStatus, String, String)> {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .with_context(|| format!("no {type_:?} condition"))?;
    Ok((c.status, c.reason.clone(), c.message.clone()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_migration_runs_metastore_ctl_and_records_format_2_on_every_member(
) -> anyhow::Result<()> {
    let Some(bin) = binaries_with_ctl_or_skip() else {
        return Ok(());
    };
    let mut spec = dev_spec(3);
    // Re-encoding throttled to 500 records a second (in batches of 1000), and enough records
    // for three batches below: it takes seconds, and the operator sees the members switched
    // but not done.
    spec.config
        .insert("experimental-storage-migration-rate".into(), "500".into());
    let (mut kube, mut op) = bootstrap_with(bin, spec, |_| {}).await?;
    let dns = op.api.dns.clone();

    // Created at format 1, the cluster runs at format 1: the ConfigMap feeds the StatefulSet's
    // `--storage-format=$(STORAGE_FORMAT)`.
    assert_eq!(
        kube.config.get("storage-format").map(String::as_str),
        Some("1")
    );
    assert_eq!(formats(&dns).await?, [(1, false); 3]);
    let reported = server_status(&dns.client_url(0)).await?;
    ensure!(
        Version::parse(&reported.server_version).is_some(),
        "the server reports its release: {:?}",
        reported.server_version
    );
    assert_eq!(reported.supported_storage_formats, [1, 2]);
    let status = op.cluster.status.clone().context("status")?;
    assert_eq!(status.current_format_version, Some(1));
    assert_eq!(
        status.current_version.as_deref(),
        Some(reported.server_version.as_str()),
        "the image tag names no version: the servers' report"
    );
    for m in &status.members {
        assert_eq!(m.format_version, Some(1), "{}", m.name);
        assert_eq!(
            m.version.as_deref(),
            Some(reported.server_version.as_str()),
            "{}",
            m.name
        );
    }

    bulk_load(&dns.client_url(2), 2500).await?;
    let revision = write_data(&dns).await?;
    let before = hashes(&dns, revision).await?;
    ensure!(before.iter().all(|h| *h == before[0]), "{before:?}");

    // formatVersion 1 -> 2: the Job runs `metastore-ctl migrate --to=2 --wait`, the operator
    // follows it and the members, and records the result.
    let (seen_statuses, seen_events) = (op.statuses.len(), op.events.len());
    op.edit(|s| s.storage.format_version = 2);
    let taken = op.converge(&mut kube, "migration to format 2").await?;
    assert_eq!(actions(&taken), [Action::StartMigrationJob { to: 2 }]);

    // The Job ran as rendered, once, and succeeded.
    let image = "ghcr.io/metastore/metastore:dev";
    let rendered = Renderer::new(&op.cluster)?.migration_job(2, image);
    let rendered_args: Vec<String> = rendered
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.args.clone())
        .context("Job args")?;
    assert_eq!(
        rendered_args,
        [
            "migrate",
            "--to=2",
            "--wait",
            "--endpoints=http://demo-client.db.svc:2379"
        ]
    );
    assert_eq!(
        kube.jobs.keys().collect::<Vec<_>>(),
        ["demo-migrate-v2"],
        "one Job"
    );
    let run = &kube.jobs["demo-migrate-v2"];
    assert_eq!(
        run.args,
        rendered_args
            .iter()
            .map(|a| dns.resolve(a))
            .collect::<Vec<_>>()
    );
    assert_eq!(run.failures, 0, "{}", kube.logs());
    assert_eq!(
        run.job.status.as_ref().and_then(|s| s.succeeded),
        Some(1),
        "{}",
        kube.logs()
    );

    // Status while it ran: Migrating, the workflow recorded; then done.
    let during = &op.statuses[seen_statuses..];
    let migrating = during
        .iter()
        .position(|s| s.phase == Some(Phase::Migrating))
        .context("a Migrating phase")?;
    let first = &during[migrating];
    assert_eq!(
        condition_of(first, ConditionType::Migrating)?.0,
        ConditionStatus::True
    );
    assert_eq!(
        condition_of(first, ConditionType::Migrating)?.1,
        "Migrating"
    );
    let wf = first.workflow.as_ref().context("workflow recorded")?;
    assert_eq!(
        (wf.kind, wf.target.as_str(), wf.from.as_deref()),
        (WorkflowKind::Migration, "2", Some("1"))
    );
    let running_job: Vec<&MetaStoreClusterStatus> = during[migrating..]
        .iter()
        .take_while(|s| s.phase == Some(Phase::Migrating))
        .collect();
    // Format 2 is recorded only once reached: not when the Job starts, and never while a
    // member still writes format 1. Once every member has re-encoded, it may be recorded
    // before the Job itself is seen to end (the phase then still says Migrating).
    ensure!(
        first.current_format_version == Some(1),
        "format 1 while the Job starts: {first:#?}"
    );
    let all_write_2 = |s: &MetaStoreClusterStatus| {
        s.members.len() == 3 && s.members.iter().all(|m| m.format_version == Some(2))
    };
    ensure!(
        during[migrating..]
            .iter()
            .all(|s| s.current_format_version == Some(1) || all_write_2(s)),
        "format 2 recorded before every member wrote it: {during:#?}"
    );
    // The members' own progress was followed: switched (writing format 2) while still
    // re-encoding, before the cluster counted as migrated.
    ensure!(
        running_job.iter().any(|s| all_write_2(s)),
        "no reconcile saw the members switched before the end: {running_job:#?}"
    );
    let status = op.cluster.status.clone().context("status")?;
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(status.workflow, None);
    assert_eq!(status.current_format_version, Some(2));
    assert_eq!(
        status.format_version_since.as_deref(),
        Some(reported.server_version.as_str()),
        "no downgrade below the release that moved the format"
    );
    let (migrating_now, reason, _) = condition_of(&status, ConditionType::Migrating)?;
    assert_eq!(
        (migrating_now, reason.as_str()),
        (ConditionStatus::False, "Idle")
    );
    assert_eq!(
        condition_of(&status, ConditionType::Degraded)?.0,
        ConditionStatus::False
    );
    assert_eq!(status.members.len(), 3);
    for m in &status.members {
        assert_eq!(m.format_version, Some(2), "{}", m.name);
        assert!(m.healthy, "{}", m.name);
    }
    let published: Vec<(bool, &str)> = op.events[seen_events..]
        .iter()
        .map(|e| (e.warning, e.reason.as_str()))
        .collect();
    assert_eq!(
        published,
        [(false, "StartMigration"), (false, "MigrationComplete")]
    );

    // The members agree: format 2 everywhere, nothing left to re-encode, the data intact.
    assert_eq!(formats(&dns).await?, [(2, false); 3]);
    data_intact(&dns).await?;
    let after = hashes(&dns, revision).await?;
    assert_eq!(after, before, "HashKV at the same revision is unchanged");
    let revision = put(&dns.client_url(1), "after-migration", "1").await?;
    converged(&dns, &[0, 1, 2], "after-migration", "1", revision).await?;

    // Pods restarted from now on are started at format 2.
    op.reconcile(&mut kube).await?;
    assert_eq!(
        kube.config.get("storage-format").map(String::as_str),
        Some("2")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_migration_waits_for_a_member_whose_binary_lacks_the_format() -> anyhow::Result<()> {
    let Some(bin) = binaries_with_ctl_or_skip() else {
        return Ok(());
    };
    // demo-1's node runs a binary that knows format 1 only.
    let older = vec!["--max-storage-format=1".to_string()];
    let (mut kube, mut op) = bootstrap_with(bin, dev_spec(3), |k| {
        k.extra_args.insert(1, older);
    })
    .await?;
    let dns = op.api.dns.clone();
    assert_eq!(
        server_status(&dns.client_url(1))
            .await?
            .supported_storage_formats,
        [1]
    );
    write_data(&dns).await?;

    op.edit(|s| s.storage.format_version = 2);
    let refused = Action::RefuseWithCondition(Refusal::FormatUnsupported {
        member: "demo-1".into(),
        to: 2,
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (decision, _) = op.reconcile(&mut kube).await?;
        if decision.action == refused {
            break;
        }
        ensure!(Instant::now() < deadline, "last: {}", decision.action);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = op.cluster.status.clone().context("status")?;
    assert_eq!(status.phase, Some(Phase::Degraded));
    let (degraded, reason, message) = condition_of(&status, ConditionType::Degraded)?;
    assert_eq!(
        (degraded, reason.as_str()),
        (ConditionStatus::True, "FormatUnsupported")
    );
    ensure!(
        message.contains("demo-1") && message.contains("storage format 2"),
        "the condition says why: {message}"
    );
    assert_eq!(
        condition_of(&status, ConditionType::Migrating)?.0,
        ConditionStatus::False
    );
    assert_eq!(status.current_format_version, Some(1));
    ensure!(kube.jobs.is_empty(), "no migration Job");
    // Said once, not on every reconcile.
    let (decision, _) = op.reconcile(&mut kube).await?;
    assert_eq!(decision.action, refused);
    let warnings: Vec<&str> = op
        .events
        .iter()
        .filter(|e| e.warning)
        .map(|e| e.reason.as_str())
        .collect();
    assert_eq!(warnings, ["FormatUnsupported"]);
    ensure!(kube.jobs.is_empty(), "no migration Job");
    assert_eq!(formats(&dns).await?, [(1, false); 3]);
    data_intact(&dns).await?;

    // The node gets the current binary: once demo-1 reports format 2, the migration runs.
    kube.extra_args.remove(&1);
    kube.delete_pod("demo-1")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let formats = server_status(&dns.client_url(1))
            .await
            .map(|s| s.supported_storage_formats)
            .unwrap_or_default();
        if formats == [1, 2] {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "demo-1 did not come back{}",
            kube.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let taken = op
        .converge(&mut kube, "migration after the upgrade")
        .await?;
    assert_eq!(actions(&taken), [Action::StartMigrationJob { to: 2 }]);
    let status = op.cluster.status.clone().context("status")?;
    assert_eq!(status.current_format_version, Some(2));
    assert_eq!(
        condition_of(&status, ConditionType::Degraded)?.0,
        ConditionStatus::False
    );
    assert_eq!(formats(&dns).await?, [(2, false); 3]);
    data_intact(&dns).await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Backups and restores.

/// The claim the backups go to, in every cluster of a test.
const BACKUP_CLAIM: &str = "backups";

/// Reconciles until the backup the request `request` started has finished; returns its record.
async fn requested_backup(
    op: &mut Operator,
    kube: &mut Kube,
    request: &str,
) -> anyhow::Result<BackupRecord> {
    op.edit(|s| {
        if let Some(b) = s.backup.as_mut() {
            b.request = Some(request.to_string());
        }
    });
    let start = Instant::now();
    let mut seen = None;
    loop {
        op.reconcile(kube).await?;
        let status = op.cluster.status.clone().context("status")?;
        if status.last_backup_request.as_deref() == Some(request) {
            let newest = status
                .backups
                .last()
                .cloned()
                .context("a backup recorded")?;
            if seen.is_none() {
                assert_eq!(newest.phase, BackupPhase::Running);
                assert_eq!(newest.trigger, BackupTrigger::Requested);
                seen = Some(newest.name.clone());
            }
            let r = status
                .backups
                .iter()
                .find(|r| Some(&r.name) == seen.as_ref())
                .cloned()
                .context("the record stays")?;
            match r.phase {
                BackupPhase::Succeeded => return Ok(r),
                BackupPhase::Failed => bail!("backup failed: {:?}{}", r.message, kube.logs()),
                BackupPhase::Running => {}
            }
        }
        ensure!(
            start.elapsed() < CONVERGE,
            "backup {request} not done after {CONVERGE:?}{}",
            kube.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new cluster `name` of `replicas` restored from `backup` by the operator, with its DNS.
async fn restored_cluster(
    bin: PathBuf,
    name: &str,
    replicas: i32,
    store: &Path,
    backup: &str,
) -> anyhow::Result<(Kube, Operator, Arc<Dns>)> {
    let mut spec = dev_spec(replicas);
    spec.bootstrap = Some(BootstrapSpec {
        restore: Some(RestoreSpec {
            claim_name: BACKUP_CLAIM.into(),
            backup: backup.into(),
        }),
    });
    let mut cluster = MetaStoreCluster::new(name, spec);
    cluster.metadata.namespace = Some(NAMESPACE.into());
    cluster.metadata.uid = Some("6a2c1f1e-0000-4000-8000-000000000002".into());
    cluster.metadata.generation = Some(1);
    let dns = Arc::new(Dns::new(ClusterNames::new(name, NAMESPACE, false, false))?);
    let mut kube = Kube::new(bin, dns.clone())?;
    kube.claims.insert(BACKUP_CLAIM.into(), store.to_path_buf());
    let mut op = Operator::new(cluster, dns.clone());
    let taken = op
        .converge(&mut kube, &format!("restore into {name}"))
        .await?;
    assert_eq!(actions(&taken), [Action::Bootstrap { replicas }]);
    let restored = op
        .cluster
        .status
        .as_ref()
        .and_then(|s| s.restored_from.clone())
        .context("status.restoredFrom")?;
    assert_eq!(
        (restored.backup.as_str(), restored.claim_name.as_str()),
        (backup, BACKUP_CLAIM)
    );
    let restored_events = op.events.iter().filter(|e| e.reason == "Restored").count();
    assert_eq!(restored_events, 1, "one Restored Event");
    Ok((kube, op, dns))
}

async fn cluster_id(url: &str) -> anyhow::Result<u64> {
    let mut c = ClusterClient::connect(url.to_string()).await?;
    let r = c
        .member_list(MemberListRequest::default())
        .await?
        .into_inner();
    Ok(r.header.map_or(0, |h| h.cluster_id))
}

async fn hash_at(url: &str, revision: i64) -> anyhow::Result<u32> {
    let mut m = MaintenanceClient::connect(url.to_string()).await?;
    Ok(m.hash_kv(HashKvRequest { revision })
        .await?
        .into_inner()
        .hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_under_load_restore_into_new_clusters_of_three_and_one() -> anyhow::Result<()> {
    let Some(bin) = binaries_with_ctl_or_skip() else {
        return Ok(());
    };
    let store = tempfile::tempdir()?;
    let mut spec = dev_spec(3);
    spec.backup = Some(BackupSpec {
        claim_name: BACKUP_CLAIM.into(),
        schedule: None,
        keep: 2,
        request: None,
    });
    let (mut kube, mut op) = bootstrap_with(bin.clone(), spec, |k| {
        k.claims
            .insert(BACKUP_CLAIM.into(), store.path().to_path_buf());
    })
    .await?;
    let dns = op.api.dns.clone();
    let before = write_data(&dns).await?;

    // A backup taken while a client writes.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let url = dns.client_url(1);
        let stop = stop.clone();
        async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                put(&url, &format!("load/{n:06}"), "x").await?;
                n += 1;
            }
            anyhow::Ok(n)
        }
    });
    let record = requested_backup(&mut op, &mut kube, "first").await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await??;
    assert!(written > 0, "the writer ran during the backup");
    let name = record.name.clone();
    for file in [
        format!("{name}.snapshot"),
        format!("{name}.snapshot.sha256"),
        format!("{name}.manifest.json"),
    ] {
        ensure!(store.path().join(&file).is_file(), "{file} missing");
    }
    let revision = record.revision.context("the record has the revision")?;
    assert!(revision > before, "{revision} > {before}");
    assert!(record.size_bytes.unwrap_or_default() > 0);
    assert_eq!(record.sha256.as_ref().map(String::len), Some(64));
    let leader = op.cluster.status.as_ref().and_then(|s| s.leader.clone());
    assert_ne!(record.member, leader, "taken from a follower");
    let reasons: Vec<&str> = op.events.iter().map(|e| e.reason.as_str()).collect();
    assert!(reasons.contains(&"BackupStarted") && reasons.contains(&"BackupSucceeded"));
    let source_hashes = hashes(&dns, revision).await?;
    assert!(
        source_hashes.windows(2).all(|w| w[0] == w[1]),
        "{source_hashes:?}"
    );
    let source_id = cluster_id(&dns.client_url(0)).await?;

    // Retention: two more backups, `keep: 2` leaves the newest two in the volume.
    let second = requested_backup(&mut op, &mut kube, "second").await?;
    tokio::time::sleep(Duration::from_millis(1100)).await; // one backup name per second
    let third = requested_backup(&mut op, &mut kube, "third").await?;
    ensure!(
        !store.path().join(format!("{name}.snapshot")).exists(),
        "the oldest was removed"
    );
    for r in [&second, &third] {
        ensure!(store.path().join(format!("{}.snapshot", r.name)).is_file());
    }
    assert_eq!(op.cluster.status.as_ref().map(|s| s.backups.len()), Some(3));

    // Restored into a new cluster of three: the backup's data and revision, a new cluster id.
    let (_k3, _op3, dns3) =
        restored_cluster(bin.clone(), "three", 3, store.path(), &second.name).await?;
    let second_rev = second.revision.context("revision")?;
    let restored = hashes(&dns3, second_rev).await?;
    let source = hashes(&dns, second_rev).await?;
    assert_eq!(restored, source, "HashKV at the backup revision");
    assert_ne!(cluster_id(&dns3.client_url(0)).await?, source_id);
    let next = put(&dns3.client_url(2), "after-restore", "1").await?;
    assert_eq!(next, second_rev + 1, "revisions go on from the backup's");

    // And into a cluster of one.
    let (_k1, _op1, dns1) =
        restored_cluster(bin.clone(), "one", 1, store.path(), &third.name).await?;
    let third_rev = third.revision.context("revision")?;
    assert_eq!(
        hash_at(&dns1.client_url(0), third_rev).await?,
        hash_at(&dns.client_url(0), third_rev).await?
    );

    // A damaged backup (its recorded checksum kept) is refused before a member starts.
    let bad = "damaged";
    let mut bytes = std::fs::read(store.path().join(format!("{}.snapshot", third.name)))?;
    bytes[200] ^= 0x40;
    std::fs::write(store.path().join(format!("{bad}.snapshot")), &bytes)?;
    std::fs::copy(
        store.path().join(format!("{}.snapshot.sha256", third.name)),
        store.path().join(format!("{bad}.snapshot.sha256")),
    )?;
    let err = restored_cluster(bin, "broken", 1, store.path(), bad)
        .await
        .err()
        .context("a damaged backup must not restore")?;
    let message = format!("{err:#}");
    assert!(message.contains("does not match"), "{message}");
    Ok(())
}

/// Writes `rounds` values of 8 KiB (values that do not compress: RocksDB compresses its
/// tables) to each of the keys `big/000`..`big/199`, the value of round `r` of key `i` being
/// [`big_value`]`(r, i)` for `r` from `first_round`, then compacts all history away
/// (physically: every member has dropped it when the call returns). Returns the compacted
/// revision.
async fn overwrite_and_compact(url: &str, first_round: u64, rounds: u64) -> anyhow::Result<i64> {
    let mut kv = KvClient::connect(url.to_string()).await?;
    let mut revision = 0;
    for round in first_round..first_round + rounds {
        for i in 0..200u64 {
            let request = PutRequest {
                key: format!("big/{i:03}").into_bytes().into(),
                value: big_value(round, i).into(),
                ..Default::default()
            };
            let header = kv.put(request).await?.into_inner().header;
            revision = header.context("header")?.revision;
        }
    }
    kv.compact(CompactionRequest {
        revision,
        physical: true,
    })
    .await?;
    Ok(revision)
}

fn big_value(round: u64, i: u64) -> Vec<u8> {
    metastore_testkit::noise(round * 1000 + i, 8 << 10)
}

/// Each member's (dbSize, dbSizeInUse) from its own Status.
async fn db_sizes(dns: &Dns) -> anyhow::Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for o in 0..3 {
        let s = server_status(&dns.client_url(o)).await?;
        out.push((s.db_size, s.db_size_in_use));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defragmentation_reclaims_space_member_by_member_followers_first_the_leader_last(
) -> anyhow::Result<()> {
    let Some(bin) = binary_or_skip() else {
        return Ok(());
    };
    let (mut kube, mut op) = bootstrap(bin, 3).await?;
    let dns = op.api.dns.clone();

    // Garbage: 200 keys of 8 KiB written four times, then history compacted away.
    overwrite_and_compact(&dns.client_url(0), 0, 4).await?;
    // HashKV refuses the compacted revision itself: agreement is checked one write later.
    let marker = put(&dns.client_url(0), "marker", "compacted").await?;
    converged(&dns, &[0, 1, 2], "marker", "compacted", marker).await?;
    // The member with the middle name leads, so "leader last" is not "last by name".
    make_leader(&dns, 1).await?;
    let spec = DefragmentationSpec {
        free_percent_threshold: 10,
        min_db_size_bytes: 1 << 20,
    };
    // The rule of `plan::maintenance::due`, restated from the spec's documentation as the
    // test's own oracle over the figures each member reports.
    let due = |(size, in_use): (i64, i64)| {
        size >= spec.min_db_size_bytes
            && (size - in_use) * 100 >= i64::from(spec.free_percent_threshold) * size
    };
    // Status's dbSize is measured at most every 250 ms.
    let deadline = Instant::now() + Duration::from_secs(10);
    let before = loop {
        let sizes = db_sizes(&dns).await?;
        if sizes.iter().all(|s| due(*s)) {
            break sizes;
        }
        ensure!(
            Instant::now() < deadline,
            "the members are not due before the test starts: (dbSize, in use) {sizes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Nothing is done while the spec does not ask for it.
    let idle = op.converge(&mut kube, "no maintenance").await?;
    assert!(idle.is_empty(), "{idle:#?}");

    op.edit(|s| {
        s.maintenance = Some(MaintenanceSpec {
            compaction: None,
            defragmentation: Some(spec.clone()),
        })
    });
    let taken = op.converge(&mut kube, "defragment").await?;
    let defragmented: Vec<(&str, Option<&str>)> = taken
        .iter()
        .filter_map(|t| match &t.action {
            Action::Defragment { member, .. } => Some((member.as_str(), t.leader.as_deref())),
            _ => None,
        })
        .collect();
    assert_eq!(
        defragmented,
        [
            ("demo-0", Some("demo-1")),
            ("demo-2", Some("demo-1")),
            ("demo-1", Some("demo-1")),
        ],
        "one call per member, followers first, the leader last: {taken:#?}"
    );
    assert_eq!(taken.len(), 3, "nothing but the three calls: {taken:#?}");

    let after = db_sizes(&dns).await?;
    for (o, ((size, _), &(now, in_use))) in before.iter().zip(&after).enumerate() {
        eprintln!("  member {o}: dbSize {size} -> {now} (in use {in_use})");
        // 600 overwritten values of 8 KiB (4.7 MiB) were garbage; the Raft log keeps its copy
        // of every value (it is not purged at this size), so that is at most what can be given
        // back. RocksDB's own flushes and compactions may already have dropped part of it
        // before `before` was read (CI once saw 3.7 MiB reclaimed, from 11.7 MiB to 8.1 MiB),
        // so the test asks for more than half of it.
        assert!(
            size - now >= 5 << 19,
            "member {o}: dbSize {size} -> {now}, less than 2.5 MiB reclaimed"
        );
        assert!(
            !due((now, in_use)),
            "member {o} is still due after its defragmentation: dbSize {now}, in use {in_use}"
        );
    }
    // The data is intact and the members agree on it.
    let agreed = hashes(&dns, marker).await?;
    assert!(agreed.iter().all(|h| *h == agreed[0]), "HashKV {agreed:?}");
    for o in 0..3 {
        for i in [0u64, 117, 199] {
            assert!(
                local_value(&dns.client_url(o), &format!("big/{i:03}")).await?
                    == Some(big_value(3, i)),
                "big/{i:03} on member {o}"
            );
        }
    }
    let reasons: Vec<&str> = op
        .events
        .iter()
        .filter(|e| e.reason == "Defragment")
        .map(|e| e.note.as_str())
        .collect();
    assert_eq!(reasons.len(), 3, "one Event per member: {:#?}", op.events);

    // A member that is due again while another is down waits for the health gate.
    overwrite_and_compact(&dns.client_url(0), 4, 1).await?;
    kube.lose_node(2);
    let waited = op
        .until(&mut kube, "a member down", |d| {
            matches!(d.action, Action::WaitFor(_))
        })
        .await?;
    assert!(
        !waited
            .iter()
            .any(|t| matches!(t.action, Action::Defragment { .. })),
        "no defragmentation while a member is down: {waited:#?}"
    );
    kube.node_back(2)?;
    let taken = op.converge(&mut kube, "member back").await?;
    assert!(
        taken
            .iter()
            .all(|t| matches!(t.action, Action::Defragment { .. })),
        "{taken:#?}"
    );
    for (o, (size, in_use)) in db_sizes(&dns).await?.into_iter().enumerate() {
        assert!(
            !due((size, in_use)),
            "member {o} is due once the workflow is done: dbSize {size}, in use {in_use}"
        );
    }
    Ok(())
}
