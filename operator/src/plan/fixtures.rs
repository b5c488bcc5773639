//! Test fixtures: a healthy cluster and builders that bend one thing at a time.

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;
use crate::crd::{MetaStoreClusterSpec, MetaStoreClusterStatus, StorageSpec};

/// Cluster `demo` in namespace `db`, its observed state, and the plan over both.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub cluster: MetaStoreCluster,
    pub observed: Observed,
}

/// Member ID of ordinal `i` in fixtures.
pub fn id(i: i32) -> u64 {
    100 + i as u64
}

pub fn names() -> ClusterNames {
    ClusterNames::new("demo", "db", false, false)
}

pub fn image(version: &str) -> String {
    image_for_version(version)
}

pub fn t0() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn member(i: i32, version: &str) -> MemberView {
    MemberView {
        id: id(i),
        name: names().pod_name(i),
        peer_urls: vec![names().peer_url(i)],
        is_learner: false,
        healthy: true,
        applied_index: 5000,
        version: Version::parse(version),
        format_version: Some(1),
        format_migration_pending: false,
        supported_formats: vec![1, 2],
        db_size: 0,
        db_size_in_use: 0,
    }
}

fn pod(i: i32, version: &str) -> PodView {
    PodView {
        name: names().pod_name(i),
        ready: true,
        image: image(version),
        up_to_date: true,
        terminating: false,
        crash_looping: false,
        empty_volume: false,
    }
}

impl Fixture {
    /// A healthy cluster of `replicas` members on `version`, demo-0 leading, format 1.
    pub fn new(replicas: i32, version: &str) -> Self {
        let spec = MetaStoreClusterSpec {
            replicas,
            version: Some(version.to_string()),
            image: None,
            storage: StorageSpec::default(),
            resources: None,
            tls: None,
            pod: None,
            config: Default::default(),
            pod_disruption_budget: None,
            maintenance: None,
            backup: None,
            bootstrap: None,
            step_timeout_seconds: None,
        };
        let mut cluster = MetaStoreCluster::new("demo", spec);
        cluster.metadata.namespace = Some("db".into());
        cluster.metadata.generation = Some(1);
        cluster.status = Some(MetaStoreClusterStatus {
            current_version: Some(version.to_string()),
            current_format_version: Some(1),
            ..Default::default()
        });
        let observed = Observed {
            now: t0(),
            cluster: Some(ClusterView {
                members: (0..replicas).map(|i| member(i, version)).collect(),
                leader: Some(id(0)),
                alarms: vec![],
                hash: HashCheck::Agree,
            }),
            statefulset: Some(StatefulSetView {
                replicas,
                image: image(version),
            }),
            pods: (0..replicas).map(|i| pod(i, version)).collect(),
            migration_job: None,
        };
        Fixture { cluster, observed }
    }

    pub fn plan(&self) -> Decision {
        plan(&self.cluster, &self.observed)
    }

    /// Plans, then feeds the decision's workflow back into status (as the controller does).
    pub fn plan_and_record(&mut self) -> Decision {
        let d = self.plan();
        if let Some(status) = self.cluster.status.as_mut() {
            status.workflow = d.workflow.clone();
        }
        d
    }

    fn view(&mut self) -> &mut ClusterView {
        self.observed
            .cluster
            .as_mut()
            .expect("fixture has a cluster view")
    }

    fn member_mut(&mut self, i: i32) -> &mut MemberView {
        let name = names().pod_name(i);
        self.view()
            .members
            .iter_mut()
            .find(|m| m.name == name || m.id == id(i))
            .expect("fixture member exists")
    }

    fn pod_mut(&mut self, i: i32) -> &mut PodView {
        let name = names().pod_name(i);
        self.observed
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .expect("fixture pod exists")
    }

    // ---- spec ----

    pub fn spec_replicas(mut self, n: i32) -> Self {
        self.cluster.spec.replicas = n;
        self.cluster.metadata.generation = Some(2);
        self
    }

    pub fn spec_version(mut self, v: &str) -> Self {
        self.cluster.spec.version = Some(v.into());
        self.cluster.metadata.generation = Some(2);
        self
    }

    pub fn spec_format(mut self, f: i32) -> Self {
        self.cluster.spec.storage.format_version = f;
        self.cluster.metadata.generation = Some(2);
        self
    }

    pub fn format_since(mut self, v: &str) -> Self {
        if let Some(s) = self.cluster.status.as_mut() {
            s.format_version_since = Some(v.into());
        }
        self
    }

    // ---- recorded status ----

    pub fn nothing_exists(mut self) -> Self {
        self.cluster.status = None;
        self.observed.cluster = None;
        self.observed.statefulset = None;
        self.observed.pods.clear();
        self
    }

    /// No member answers MemberList.
    pub fn cluster_down(mut self) -> Self {
        self.observed.cluster = None;
        self
    }

    /// Status holds nothing yet: the cluster never formed.
    pub fn never_formed(mut self) -> Self {
        self.cluster.status = None;
        self
    }

    /// The last reconcile recorded the Bootstrapping phase: the cluster has not formed yet.
    pub fn still_bootstrapping(mut self) -> Self {
        if let Some(status) = self.cluster.status.as_mut() {
            status.phase = Some(crate::crd::Phase::Bootstrapping);
        }
        self
    }

    pub fn workflow(mut self, wf: Workflow) -> Self {
        if let Some(s) = self.cluster.status.as_mut() {
            s.workflow = Some(wf);
        }
        self
    }

    pub fn later(mut self, secs: i64) -> Self {
        self.observed.now = self
            .observed
            .now
            .checked_add(SignedDuration::from_secs(secs))
            .unwrap_or(Timestamp::MAX);
        self
    }

    // ---- cluster view ----

    pub fn unhealthy(mut self, i: i32) -> Self {
        self.member_mut(i).healthy = false;
        self
    }

    pub fn no_leader(mut self) -> Self {
        self.view().leader = None;
        self
    }

    pub fn leader(mut self, i: i32) -> Self {
        self.view().leader = Some(id(i));
        self
    }

    pub fn hash(mut self, h: HashCheck) -> Self {
        self.view().hash = h;
        self
    }

    pub fn alarm(mut self, a: &str) -> Self {
        self.view().alarms.push(a.into());
        self
    }

    pub fn lag(mut self, i: i32, behind: u64) -> Self {
        let m = self.member_mut(i);
        m.applied_index = m.applied_index.saturating_sub(behind);
        self
    }

    pub fn member_version(mut self, i: i32, v: &str) -> Self {
        self.member_mut(i).version = Version::parse(v);
        self
    }

    pub fn format(mut self, f: i32) -> Self {
        for m in &mut self.view().members {
            m.format_version = Some(f);
        }
        self
    }

    /// The storage formats member `i`'s binary supports.
    pub fn supported(mut self, i: i32, formats: &[i32]) -> Self {
        self.member_mut(i).supported_formats = formats.to_vec();
        self
    }

    /// Member `i` still re-encodes records of an older format.
    pub fn reencoding(mut self, i: i32) -> Self {
        self.member_mut(i).format_migration_pending = true;
        self
    }

    /// Adds ordinal `i` as a learner (started, named, caught up) with no pod yet.
    pub fn learner(mut self, i: i32) -> Self {
        let version = self.cluster.spec.version.clone().unwrap_or_default();
        let mut m = member(i, &version);
        m.is_learner = true;
        self.view().members.push(m);
        self
    }

    /// Adds ordinal `i` as a learner that MemberAdd registered but that never started.
    pub fn unstarted_learner(mut self, i: i32) -> Self {
        let mut m = member(i, "0.0.0");
        m.is_learner = true;
        m.name = String::new();
        m.healthy = false;
        m.applied_index = 0;
        m.version = None;
        self.view().members.push(m);
        self
    }

    pub fn promote(mut self, i: i32) -> Self {
        self.member_mut(i).is_learner = false;
        self
    }

    pub fn remove_member(mut self, i: i32) -> Self {
        let name = names().pod_name(i);
        self.view()
            .members
            .retain(|m| m.name != name && m.id != id(i));
        self
    }

    /// Replaces member `i` by a fresh one with a new ID (as after remove + add).
    pub fn new_id(mut self, i: i32, new: u64) -> Self {
        self.member_mut(i).id = new;
        self
    }

    // ---- StatefulSet and pods ----

    pub fn sts_replicas(mut self, n: i32) -> Self {
        if let Some(s) = self.observed.statefulset.as_mut() {
            s.replicas = n;
        }
        self
    }

    pub fn add_pod(mut self, i: i32) -> Self {
        let version = self.cluster.spec.version.clone().unwrap_or_default();
        self.observed.pods.push(pod(i, &version));
        self
    }

    pub fn no_pod(mut self, i: i32) -> Self {
        let name = names().pod_name(i);
        self.observed.pods.retain(|p| p.name != name);
        self
    }

    /// Pod `i` and its member run `version`.
    pub fn on_version(mut self, i: i32, version: &str) -> Self {
        self.pod_mut(i).image = image(version);
        self.member_mut(i).version = Version::parse(version);
        self
    }

    /// Every pod and member runs `version`.
    pub fn all_on(mut self, version: &str, n: i32) -> Self {
        for i in 0..n {
            self = self.on_version(i, version);
        }
        self
    }

    pub fn not_ready(mut self, i: i32) -> Self {
        self.pod_mut(i).ready = false;
        self
    }

    pub fn crash(mut self, i: i32) -> Self {
        self.pod_mut(i).crash_looping = true;
        self.pod_mut(i).ready = false;
        self
    }

    pub fn terminating(mut self, i: i32) -> Self {
        self.pod_mut(i).terminating = true;
        self
    }

    pub fn empty(mut self, i: i32) -> Self {
        self.pod_mut(i).empty_volume = true;
        self
    }

    pub fn stale_template(mut self, i: i32) -> Self {
        self.pod_mut(i).up_to_date = false;
        self
    }

    pub fn job(mut self, to: i32, succeeded: bool, failed: bool) -> Self {
        self.observed.migration_job = Some(JobView {
            target_format: to,
            succeeded,
            failed,
        });
        self
    }
}
