//! The controller's conversations with the API server, against a mocked API server.
//!
//! As in kube-rs's `controller-rs`: `tower_test::mock::pair()` stands in for the API server
//! behind a real `kube::Client`; each scenario is the exact list of requests a reconcile must
//! send (method, path, query, body) with the answer to give, and [`ApiServer::run`] fails on
//! the first request that differs, on a missing one, and on a request whose permission is not
//! in [`super::permissions::PERMISSIONS`]. The etcd side is [`FakeClusterApi`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

use super::cluster_api::{ClientTls, ClusterApi};
use super::permissions::allowed;
use super::*;
use crate::crd::{
    MetaStoreClusterSpec, MetaStoreClusterStatus, StorageSpec, TlsSpec, Workflow, WorkflowKind,
    WorkflowStep,
};
use crate::metrics::Metrics;
use crate::naming::image_for_version;
use crate::plan::{ClusterView, HashCheck, MemberView};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type BodyCheck = Box<dyn Fn(&Value) + Send>;

const UID: &str = "6a2c1f1e-0000-4000-8000-000000000001";
const SELECTOR: &str = "app.kubernetes.io/instance=demo,app.kubernetes.io/name=metastore";
const APPLY_QUERY: &[(&str, &str)] = &[("fieldManager", FIELD_MANAGER), ("force", "true")];

fn t0() -> Timestamp {
    Timestamp::from_second(1_700_000_000).unwrap_or(Timestamp::UNIX_EPOCH)
}

fn t0_plus_120() -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(120))
        .unwrap_or(Timestamp::MAX)
}

/// One expected request and its answer.
struct Expect {
    method: &'static str,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<&'static str>,
    check: BodyCheck,
    status: u16,
    reply: Value,
}

impl Expect {
    fn new(method: &'static str, path: impl Into<String>) -> Self {
        Expect {
            method,
            path: path.into(),
            query: Vec::new(),
            content_type: None,
            check: Box::new(|_| {}),
            status: 200,
            reply: json!({}),
        }
    }

    fn get(path: impl Into<String>) -> Self {
        Self::new("GET", path)
    }

    fn list(path: impl Into<String>, selector: &str, kind: &str, items: Vec<Value>) -> Self {
        Self::get(path)
            .query(&[("labelSelector", selector)])
            .reply(json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items}))
    }

    /// A server-side apply of `expected`: exact body, field manager, force, content type;
    /// the answer echoes the object.
    fn apply(path: impl Into<String>, expected: Value) -> Self {
        let reply = expected.clone();
        Self::new("PATCH", path)
            .query(APPLY_QUERY)
            .content_type("application/apply-patch+yaml")
            .check(move |body| {
                assert_eq!(body, &expected, "applied object differs");
            })
            .reply(reply)
    }

    fn query(mut self, pairs: &[(&str, &str)]) -> Self {
        self.query = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }

    fn content_type(mut self, ct: &'static str) -> Self {
        self.content_type = Some(ct);
        self
    }

    fn check(mut self, f: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Box::new(f);
        self
    }

    fn reply(mut self, reply: Value) -> Self {
        self.reply = reply;
        self
    }

    fn not_found(mut self) -> Self {
        self.status = 404;
        self.reply = json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "reason": "NotFound", "code": 404, "message": "not found", "metadata": {}});
        self
    }
}

/// The RBAC (group, resource, verb) of a request.
fn permission_of(method: &str, path: &str, query: &[(String, String)]) -> (String, String, String) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, mut rest) = match segments.first() {
        Some(&"api") => ("", &segments[2..]),
        _ => (segments[1], &segments[3..]),
    };
    if rest.first() == Some(&"namespaces") && rest.len() >= 3 {
        rest = &rest[2..];
    }
    let resource = match rest.get(2) {
        Some(sub) => format!("{}/{sub}", rest[0]),
        None => rest[0].to_string(),
    };
    let named = rest.len() >= 2;
    let verb = match (method, named) {
        ("GET", true) => "get",
        ("GET", false) if query.iter().any(|(k, v)| k == "watch" && v == "true") => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", true) => "delete",
        _ => "deletecollection",
    };
    (group.to_string(), resource, verb.to_string())
}

struct ApiServer {
    handle: Handle,
}

impl ApiServer {
    /// Answers the scripted requests in order, asserting each; then expects no more.
    async fn run(mut self, script: Vec<Expect>) {
        for (i, step) in script.into_iter().enumerate() {
            let what = format!("request {i} ({} {})", step.method, step.path);
            let (request, send) =
                tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
                    .await
                    .unwrap_or_else(|_| panic!("{what}: never sent"))
                    .unwrap_or_else(|| panic!("{what}: client gone"));
            let method = request.method().to_string();
            let path = request.uri().path().to_string();
            let mut query: Vec<(String, String)> =
                url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
                    .into_owned()
                    .collect();
            query.sort();
            let content_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            assert_eq!(
                (method.as_str(), path.as_str()),
                (step.method, step.path.as_str()),
                "{what}: got {method} {path}"
            );
            let mut want = step.query.clone();
            want.sort();
            assert_eq!(query, want, "{what}: query");
            if let Some(ct) = step.content_type {
                assert_eq!(content_type.as_deref(), Some(ct), "{what}: content type");
            }
            let (group, resource, verb) = permission_of(&method, &path, &query);
            assert!(
                allowed(&group, &resource, &verb),
                "{what}: {verb} {group}/{resource} missing from PERMISSIONS"
            );
            // An apply may create the object (not so on a subresource such as status).
            if step.content_type == Some("application/apply-patch+yaml") && !resource.contains('/')
            {
                assert!(
                    allowed(&group, &resource, "create"),
                    "{what}: an apply may create; create {group}/{resource} missing"
                );
            }
            let bytes = request
                .into_body()
                .collect_bytes()
                .await
                .unwrap_or_else(|e| panic!("{what}: body: {e}"));
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"))
            };
            (step.check)(&body);
            let response = Response::builder()
                .status(step.status)
                .body(Body::from(
                    serde_json::to_vec(&step.reply).unwrap_or_default(),
                ))
                .unwrap_or_else(|e| panic!("{what}: response: {e}"));
            send.send_response(response);
        }
        // Nothing after the script.
        if let Ok(Some((request, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.handle.next_request()).await
        {
            panic!(
                "unexpected request after the script: {} {}",
                request.method(),
                request.uri()
            );
        }
    }
}

/// The etcd API of the cluster under test: answers `observe` with a fixed view and records
/// every membership call.
#[derive(Default)]
struct FakeClusterApi {
    view: Option<ClusterView>,
    calls: Mutex<Vec<String>>,
}

impl FakeClusterApi {
    fn record(&self, call: String) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(call);
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl ClusterApi for FakeClusterApi {
    fn observe<'a>(&'a self, endpoints: &'a [String]) -> BoxFuture<'a, Option<ClusterView>> {
        self.record(format!("observe {}", endpoints.len()));
        Box::pin(async move { self.view.clone() })
    }
    fn add_learner<'a>(&'a self, _: &'a [String], peer_url: &'a str) -> BoxFuture<'a, Result<()>> {
        self.record(format!("add_learner {peer_url}"));
        Box::pin(async { Ok(()) })
    }
    fn promote<'a>(&'a self, _: &'a [String], id: u64) -> BoxFuture<'a, Result<()>> {
        self.record(format!("promote {id}"));
        Box::pin(async { Ok(()) })
    }
    fn remove<'a>(&'a self, _: &'a [String], id: u64) -> BoxFuture<'a, Result<()>> {
        self.record(format!("remove {id}"));
        Box::pin(async { Ok(()) })
    }
    fn move_leader<'a>(&'a self, leader: &'a str, to: u64) -> BoxFuture<'a, Result<()>> {
        self.record(format!("move_leader {leader} {to}"));
        Box::pin(async { Ok(()) })
    }
    fn defragment<'a>(&'a self, member: &'a str) -> BoxFuture<'a, Result<()>> {
        self.record(format!("defragment {member}"));
        Box::pin(async { Ok(()) })
    }
    fn with_client_tls(self: Arc<Self>, tls: &ClientTls) -> Arc<dyn ClusterApi> {
        let [ca, cert, key] = [&tls.ca_pem, &tls.cert_pem, &tls.key_pem]
            .map(|pem| String::from_utf8_lossy(pem).into_owned());
        self.record(format!("with_client_tls ca={ca} cert={cert} key={key}"));
        self
    }
}

/// A context over the mocked API server.
fn context(api: Arc<FakeClusterApi>, now: fn() -> Timestamp) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Arc::new(Metrics::new().expect("metrics register"));
    let mut ctx = Context::new(client, api, metrics);
    ctx.now = now;
    (Arc::new(ctx), ApiServer { handle })
}

/// Runs one reconcile against the script.
async fn reconcile_with(
    cluster: MetaStoreCluster,
    api: Arc<FakeClusterApi>,
    now: fn() -> Timestamp,
    script: Vec<Expect>,
) -> (Result<Requeue>, Arc<Context>) {
    let (ctx, server) = context(api, now);
    let served = tokio::spawn(server.run(script));
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        reconcile(Arc::new(cluster), ctx.clone()),
    )
    .await
    .expect("reconcile finishes");
    // Surfaces the server's assertion failures.
    if let Err(e) = served.await {
        std::panic::resume_unwind(e.into_panic());
    }
    (result, ctx)
}

/// `demo` in `db`, read from the API (uid, generation), with the finalizer in place.
fn cluster(replicas: i32, version: &str) -> MetaStoreCluster {
    let spec = MetaStoreClusterSpec {
        replicas,
        version: Some(version.into()),
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
    let mut c = MetaStoreCluster::new("demo", spec);
    c.metadata.namespace = Some("db".into());
    c.metadata.uid = Some(UID.into());
    c.metadata.generation = Some(1);
    c.metadata.resource_version = Some("7".into());
    c.metadata.finalizers = Some(vec![FINALIZER.into()]);
    c
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("serializes")
}

fn owner_reference() -> Value {
    json!([{"apiVersion": "metastore.io/v1alpha1", "kind": "MetaStoreCluster", "name": "demo",
        "uid": UID, "controller": true}])
}

const NS: &str = "/api/v1/namespaces/db";
const APPS: &str = "/apis/apps/v1/namespaces/db";
const CLUSTERS: &str = "/apis/metastore.io/v1alpha1/namespaces/db/metastoreclusters";

/// The four reads of the observe step, answered with what exists.
fn observe_requests(sts: Option<Value>, pods: Vec<Value>, claims: Vec<Value>) -> Vec<Expect> {
    observe_requests_with_jobs(sts, pods, claims, vec![])
}

/// [`observe_requests`] with migration Jobs.
fn observe_requests_with_jobs(
    sts: Option<Value>,
    pods: Vec<Value>,
    claims: Vec<Value>,
    jobs: Vec<Value>,
) -> Vec<Expect> {
    let sts_get = Expect::get(format!("{APPS}/statefulsets/demo"));
    vec![
        match sts {
            Some(sts) => sts_get.reply(sts),
            None => sts_get.not_found(),
        },
        Expect::list(format!("{NS}/pods"), SELECTOR, "PodList", pods),
        Expect::list(
            format!("{NS}/persistentvolumeclaims"),
            SELECTOR,
            "PersistentVolumeClaimList",
            claims,
        ),
        Expect::list(
            "/apis/batch/v1/namespaces/db/jobs",
            "app.kubernetes.io/instance=demo,app.kubernetes.io/component=migration",
            "JobList",
            jobs,
        ),
    ]
}

/// The five applies of the owned objects, each compared with `check`.
fn apply_requests(check: impl Fn(&str, &Value) + Clone + Send + 'static) -> Vec<Expect> {
    [
        (format!("{NS}/services/demo-peer"), "Service"),
        (format!("{NS}/services/demo-client"), "Service"),
        (format!("{NS}/configmaps/demo-config"), "ConfigMap"),
        (format!("{APPS}/statefulsets/demo"), "StatefulSet"),
        (
            "/apis/policy/v1/namespaces/db/poddisruptionbudgets/demo".to_string(),
            "PodDisruptionBudget",
        ),
    ]
    .into_iter()
    .map(|(path, kind)| {
        let check = check.clone();
        Expect::new("PATCH", path)
            .query(APPLY_QUERY)
            .content_type("application/apply-patch+yaml")
            .check(move |body| {
                assert_eq!(body["kind"], kind);
                assert_eq!(
                    body["metadata"]["ownerReferences"],
                    owner_reference(),
                    "{kind}"
                );
                check(kind, body);
            })
    })
    .collect()
}

fn status_patch(check: impl Fn(&Value) + Send + 'static, cluster: &MetaStoreCluster) -> Expect {
    Expect::new("PATCH", format!("{CLUSTERS}/demo/status"))
        .query(APPLY_QUERY)
        .content_type("application/apply-patch+yaml")
        .check(move |body| {
            assert_eq!(body["apiVersion"], "metastore.io/v1alpha1");
            assert_eq!(body["kind"], "MetaStoreCluster");
            check(&body["status"]);
        })
        .reply(to_json(cluster))
}

fn event(type_: &'static str, reason: &'static str) -> Expect {
    Expect::new("POST", "/apis/events.k8s.io/v1/namespaces/db/events").check(move |body| {
        assert_eq!(body["type"], type_);
        assert_eq!(body["reason"], reason);
        assert_eq!(body["regarding"]["name"], "demo");
        assert_eq!(body["regarding"]["uid"], UID);
        assert_eq!(body["reportingController"], FIELD_MANAGER);
    })
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

fn member(i: i32, healthy: bool) -> MemberView {
    let names = ClusterNames::new("demo", "db", false, false);
    MemberView {
        id: 100 + i as u64,
        name: names.pod_name(i),
        peer_urls: vec![names.peer_url(i)],
        is_learner: false,
        healthy,
        applied_index: 5000,
        version: None, // not reported: read from the pod image
        format_version: Some(1),
        format_migration_pending: false,
        supported_formats: vec![1, 2],
        db_size: 0,
        db_size_in_use: 0,
    }
}

fn view(healthy: [bool; 3]) -> ClusterView {
    ClusterView {
        members: (0..3).map(|i| member(i, healthy[i as usize])).collect(),
        leader: healthy[0].then_some(100),
        alarms: vec![],
        hash: HashCheck::Agree,
    }
}

fn pod(i: i32, version: &str, ready: bool) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("demo-{i}"), "namespace": "db", "uid": format!("pod-uid-{i}"),
            "labels": {"app.kubernetes.io/name": "metastore", "app.kubernetes.io/instance": "demo"}},
        "spec": {"containers": [{"name": "metastore", "image": image_for_version(version)}]},
        "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn claim(i: i32) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": format!("data-demo-{i}"), "namespace": "db", "uid": format!("pvc-uid-{i}")},
        "spec": {"resources": {"requests": {"storage": "10Gi"}}}})
}

fn statefulset(replicas: i32, version: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "demo", "namespace": "db"},
        "spec": {"replicas": replicas, "serviceName": "demo-peer", "selector": {},
            "template": {"spec": {"containers": [{"name": "metastore", "image": image_for_version(version)}]}}}})
}

#[tokio::test]
async fn first_reconcile_applies_every_owned_object_then_writes_status() {
    let cluster = cluster(3, "1.2.0");
    // What the reconcile must apply: the objects for a Bootstrap of three members.
    let expected = {
        let observed = Observed {
            now: t0(),
            cluster: None,
            statefulset: None,
            pods: vec![],
            migration_job: None,
        };
        let decision = plan(&cluster, &observed);
        assert_eq!(decision.action, Action::Bootstrap { replicas: 3 });
        let renderer = Renderer::new(&cluster).expect("renderer");
        renderer.render(&RenderParams::from_decision(&decision, 3, 1))
    };
    let fake = Arc::new(FakeClusterApi::default()); // no member answers yet
    let mut script = observe_requests(None, vec![], vec![]);
    script.extend([
        Expect::apply(
            format!("{NS}/services/demo-peer"),
            to_json(&expected.peer_service),
        ),
        Expect::apply(
            format!("{NS}/services/demo-client"),
            to_json(&expected.client_service),
        ),
        Expect::apply(
            format!("{NS}/configmaps/demo-config"),
            to_json(&expected.config_map),
        ),
        Expect::apply(
            format!("{APPS}/statefulsets/demo"),
            to_json(&expected.statefulset),
        ),
        Expect::apply(
            "/apis/policy/v1/namespaces/db/poddisruptionbudgets/demo",
            to_json(&expected.pdb.clone().expect("PDB enabled by default")),
        ),
        status_patch(
            |status| {
                let time = Time(t0());
                assert_eq!(status["phase"], "Bootstrapping");
                assert_eq!(status["observedGeneration"], 1);
                assert_eq!(status["readyReplicas"], 0);
                assert_eq!(status.get("workflow"), None);
                let available = condition(status, "Available");
                assert_eq!(available["status"], "Unknown");
                assert_eq!(available["reason"], "ClusterUnreachable");
                assert_eq!(available["lastTransitionTime"], to_json(&time));
                let progressing = condition(status, "Progressing");
                assert_eq!(progressing["status"], "True");
                assert_eq!(progressing["reason"], "Bootstrapping");
                assert_eq!(condition(status, "Degraded")["status"], "False");
            },
            &cluster,
        ),
        event("Normal", "Bootstrap"),
    ]);
    // Every applied object is owned by the cluster.
    for object in [
        to_json(&expected.peer_service),
        to_json(&expected.client_service),
        to_json(&expected.config_map),
        to_json(&expected.statefulset),
    ] {
        assert_eq!(object["metadata"]["ownerReferences"], owner_reference());
    }
    assert_eq!(to_json(&expected.statefulset)["spec"]["replicas"], 3);

    let (result, ctx) = reconcile_with(cluster, fake.clone(), t0, script).await;
    let requeue = result.expect("reconcile succeeds");
    assert_eq!(requeue, Requeue::requeue(Duration::from_secs(2)));
    assert_eq!(fake.calls(), ["observe 3"]);
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains("metastore_operator_reconciles_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"metastore_operator_actions_total{action="Bootstrap"} 1"#),
        "{metrics}"
    );
}

/// The record an upgrade to 1.3.0 leaves after choosing demo-2, at t0.
fn upgrading_demo_2() -> Workflow {
    Workflow {
        kind: WorkflowKind::Upgrade,
        step: WorkflowStep::DeletePod,
        target: "1.3.0".into(),
        from: Some("1.2.0".into()),
        member: Some("demo-2".into()),
        started_at: Time(t0()),
        step_started_at: Time(t0()),
        deadline: Time(
            t0().checked_add(SignedDuration::from_secs(600))
                .unwrap_or(t0()),
        ),
        generation: 2,
        failure: None,
    }
}

#[tokio::test]
async fn recorded_workflow_is_resumed() {
    // The operator restarted after recording "delete demo-2" but before deleting it.
    let mut cluster = cluster(3, "1.3.0");
    cluster.metadata.generation = Some(2);
    cluster.status = Some(MetaStoreClusterStatus {
        current_version: Some("1.2.0".into()),
        current_format_version: Some(1),
        workflow: Some(upgrading_demo_2()),
        ..Default::default()
    });
    let recorded = to_json(&upgrading_demo_2());
    let fake = Arc::new(FakeClusterApi {
        view: Some(view([true, true, true])),
        ..Default::default()
    });
    let mut script = observe_requests(
        Some(statefulset(3, "1.2.0")),
        (0..3).map(|i| pod(i, "1.2.0", true)).collect(),
        (0..3).map(claim).collect(),
    );
    script.extend(apply_requests(|kind, body| {
        if kind == "StatefulSet" {
            // The template moves to the target; OnDelete: pods change one by one.
            assert_eq!(body["spec"]["replicas"], 3);
            assert_eq!(
                body["spec"]["template"]["spec"]["containers"][0]["image"],
                image_for_version("1.3.0")
            );
        }
    }));
    script.extend([
        // The step in the record, performed now.
        Expect::new("DELETE", format!("{NS}/pods/demo-2")).reply(pod(2, "1.2.0", true)),
        status_patch(
            move |status| {
                // Same workflow, same step, same deadline: resumed, not restarted.
                assert_eq!(status["workflow"], recorded);
                assert_eq!(status["phase"], "Upgrading");
                assert_eq!(condition(status, "Upgrading")["status"], "True");
                assert_eq!(status["leader"], "demo-0");
                assert_eq!(status["members"][2]["dataHolder"], "pvc-uid-2");
            },
            &cluster,
        ),
        event("Normal", "ReplacePod"),
    ]);
    let (result, ctx) = reconcile_with(cluster, fake.clone(), t0_plus_120, script).await;
    result.expect("reconcile succeeds");
    assert_eq!(fake.calls(), ["observe 3"]);
    let metrics = ctx.metrics.render();
    assert!(
        metrics.contains(
            r#"metastore_operator_workflow_steps_total{action="ReplacePod",workflow="Upgrade"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test]
async fn quorum_loss_is_patched_as_degraded() {
    let cluster = {
        let mut c = cluster(3, "1.2.0");
        c.status = Some(MetaStoreClusterStatus {
            current_version: Some("1.2.0".into()),
            current_format_version: Some(1),
            ..Default::default()
        });
        c
    };
    let fake = Arc::new(FakeClusterApi {
        view: Some(view([true, false, false])),
        ..Default::default()
    });
    let mut script = observe_requests(
        Some(statefulset(3, "1.2.0")),
        vec![
            pod(0, "1.2.0", true),
            pod(1, "1.2.0", false),
            pod(2, "1.2.0", false),
        ],
        (0..3).map(claim).collect(),
    );
    script.extend(apply_requests(|_, _| {}));
    script.extend([
        status_patch(
            |status| {
                assert_eq!(status["phase"], "QuorumLost");
                assert_eq!(status["readyReplicas"], 1);
                let degraded = condition(status, "Degraded");
                assert_eq!(degraded["status"], "True");
                assert_eq!(degraded["reason"], "QuorumLost");
                assert_eq!(degraded["lastTransitionTime"], to_json(&Time(t0())));
                let available = condition(status, "Available");
                assert_eq!(available["status"], "False");
                assert_eq!(available["reason"], "QuorumLost");
                assert_eq!(available["message"], "1 of 3 voters healthy");
                assert_eq!(condition(status, "Progressing")["reason"], "Stopped");
            },
            &cluster,
        ),
        event("Warning", "QuorumLost"),
    ]);
    let (result, _) = reconcile_with(cluster, fake.clone(), t0, script).await;
    assert_eq!(
        result.expect("reconcile succeeds"),
        Requeue::requeue(Duration::from_secs(60))
    );
    // Never acts on the members without a quorum.
    assert_eq!(fake.calls(), ["observe 3"]);
}

#[tokio::test]
async fn finalizer_is_added_before_anything_is_applied() {
    let mut c = cluster(3, "1.2.0");
    c.metadata.finalizers = None;
    let reply = to_json(&c);
    let script = vec![Expect::new("PATCH", format!("{CLUSTERS}/demo"))
        .content_type("application/json-patch+json")
        .check(|body| {
            assert_eq!(
                body,
                &json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": null},
                    {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
                ])
            );
        })
        .reply(reply)];
    let fake = Arc::new(FakeClusterApi::default());
    let (result, _) = reconcile_with(c, fake.clone(), t0, script).await;
    assert_eq!(result.expect("reconcile succeeds"), Requeue::await_change());
    assert!(fake.calls().is_empty());
}

fn deleting(delete_claims: bool) -> MetaStoreCluster {
    let mut c = cluster(3, "1.2.0");
    c.spec.storage.delete_claims_on_delete = delete_claims;
    c.metadata.deletion_timestamp = Some(Time(t0()));
    c
}

fn remove_finalizer(c: &MetaStoreCluster) -> Expect {
    Expect::new("PATCH", format!("{CLUSTERS}/demo"))
        .content_type("application/json-patch+json")
        .check(|body| {
            assert_eq!(
                body,
                &json!([
                    {"op": "test", "path": "/metadata/finalizers/0", "value": FINALIZER},
                    {"op": "remove", "path": "/metadata/finalizers/0"},
                ])
            );
        })
        .reply(to_json(c))
}

#[tokio::test]
async fn deletion_keeps_the_volumes_by_default() {
    let c = deleting(false);
    let script = vec![
        event("Normal", "Deleting").check(|body| {
            assert_eq!(body["reason"], "Deleting");
            assert!(
                body["note"].as_str().is_some_and(|n| n.contains("kept")),
                "{body}"
            );
        }),
        remove_finalizer(&c),
    ];
    let fake = Arc::new(FakeClusterApi::default());
    let (result, _) = reconcile_with(c, fake.clone(), t0, script).await;
    assert_eq!(result.expect("cleanup succeeds"), Requeue::await_change());
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn deletion_deletes_the_volumes_when_asked() {
    let c = deleting(true);
    let script = vec![
        Expect::list(
            format!("{NS}/persistentvolumeclaims"),
            SELECTOR,
            "PersistentVolumeClaimList",
            (0..3).map(claim).collect(),
        ),
        Expect::new("DELETE", format!("{NS}/persistentvolumeclaims/data-demo-0")).reply(claim(0)),
        Expect::new("DELETE", format!("{NS}/persistentvolumeclaims/data-demo-1")).reply(claim(1)),
        Expect::new("DELETE", format!("{NS}/persistentvolumeclaims/data-demo-2")).not_found(),
        event("Normal", "Deleting"),
        remove_finalizer(&c),
    ];
    let fake = Arc::new(FakeClusterApi::default());
    let (result, _) = reconcile_with(c, fake, t0, script).await;
    assert_eq!(result.expect("cleanup succeeds"), Requeue::await_change());
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_under_their_label() {
    let script = vec![
        Expect::get(format!("{APPS}/statefulsets/demo")).reply(json!({
        "apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": "Forbidden",
        "code": 403, "message": "forbidden", "metadata": {}})),
    ];
    // 403 with a Status body.
    let mut script = script;
    script[0].status = 403;
    let fake = Arc::new(FakeClusterApi::default());
    let (result, _) = reconcile_with(cluster(3, "1.2.0"), fake, t0, script).await;
    let error = result.expect_err("a 403 fails the reconcile");
    assert_eq!(error.metric_label(), "kube");
}

/// `demo` with `spec.tls` naming `demo-client-tls` and `demo-peer-tls`.
fn tls_cluster() -> MetaStoreCluster {
    let mut c = cluster(3, "1.2.0");
    c.spec.tls = Some(TlsSpec {
        client_secret_name: Some("demo-client-tls".into()),
        peer_secret_name: Some("demo-peer-tls".into()),
    });
    c
}

/// The GET of the client TLS Secret, answered with `data`.
fn client_secret_get(data: &[(&str, &str)]) -> Expect {
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("demo-client-tls".into()),
            namespace: Some("db".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        k8s_openapi::ByteString(v.as_bytes().to_vec()),
                    )
                })
                .collect(),
        ),
        ..Default::default()
    };
    let mut reply = to_json(&secret);
    reply["apiVersion"] = json!("v1");
    reply["kind"] = json!("Secret");
    Expect::get(format!("{NS}/secrets/demo-client-tls")).reply(reply)
}

#[tokio::test]
async fn a_tls_cluster_is_called_with_its_client_secret() {
    let cluster = tls_cluster();
    let fake = Arc::new(FakeClusterApi::default());
    let mut script = observe_requests(None, vec![], vec![]);
    script.push(client_secret_get(&[
        ("ca.crt", "CA PEM"),
        ("tls.crt", "CERT PEM"),
        ("tls.key", "KEY PEM"),
    ]));
    script.extend(apply_requests(|kind, body| {
        if kind == "StatefulSet" {
            let args = body["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
            assert!(args.contains("--client-cert-auth"), "{args}");
        }
    }));
    script.extend([
        status_patch(
            |status| assert_eq!(status["phase"], "Bootstrapping"),
            &cluster,
        ),
        event("Normal", "Bootstrap"),
    ]);
    let (result, _) = reconcile_with(cluster, fake.clone(), t0, script).await;
    result.expect("reconcile succeeds");
    // The Secret's CA and identity, then the cluster observed through them.
    assert_eq!(
        fake.calls(),
        [
            "with_client_tls ca=CA PEM cert=CERT PEM key=KEY PEM",
            "observe 3"
        ]
    );
}

#[tokio::test]
async fn a_missing_or_incomplete_client_secret_fails_the_reconcile_before_any_apply() {
    // Not there (yet): a Kubernetes error, nothing applied, the cluster not called.
    let fake = Arc::new(FakeClusterApi::default());
    let mut script = observe_requests(None, vec![], vec![]);
    script.push(Expect::get(format!("{NS}/secrets/demo-client-tls")).not_found());
    let (result, _) = reconcile_with(tls_cluster(), fake.clone(), t0, script).await;
    assert_eq!(result.expect_err("no Secret").metric_label(), "kube");
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    // Without ca.crt: named in the error.
    let fake = Arc::new(FakeClusterApi::default());
    let mut script = observe_requests(None, vec![], vec![]);
    script.push(client_secret_get(&[
        ("tls.crt", "CERT"),
        ("tls.key", "KEY"),
    ]));
    let (result, _) = reconcile_with(tls_cluster(), fake.clone(), t0, script).await;
    let error = result.expect_err("no ca.crt");
    assert_eq!(error.metric_label(), "missing_object_key");
    assert!(error.to_string().contains("ca.crt"), "{error}");
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());
}

#[test]
fn request_permissions() {
    let q = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let cases = [
        (
            "GET",
            "/apis/apps/v1/namespaces/db/statefulsets/demo",
            vec![],
            ("apps", "statefulsets", "get"),
        ),
        (
            "GET",
            "/api/v1/namespaces/db/pods",
            vec![],
            ("", "pods", "list"),
        ),
        (
            "GET",
            "/api/v1/pods",
            q("watch", "true"),
            ("", "pods", "watch"),
        ),
        (
            "PATCH",
            "/apis/metastore.io/v1alpha1/namespaces/db/metastoreclusters/demo/status",
            vec![],
            ("metastore.io", "metastoreclusters/status", "patch"),
        ),
        (
            "POST",
            "/apis/events.k8s.io/v1/namespaces/db/events",
            vec![],
            ("events.k8s.io", "events", "create"),
        ),
        (
            "DELETE",
            "/api/v1/namespaces/db/pods/demo-2",
            vec![],
            ("", "pods", "delete"),
        ),
    ];
    for (method, path, query, (g, r, v)) in cases {
        assert_eq!(
            permission_of(method, path, &query),
            (g.to_string(), r.to_string(), v.to_string()),
            "{method} {path}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Workflows, one reconcile at a time: what is applied, patched, deleted and called.

/// `n` healthy voters at the same applied index, `leader` leading.
fn voters(n: i32, leader: i32) -> ClusterView {
    ClusterView {
        members: (0..n).map(|i| member(i, true)).collect(),
        leader: Some(100 + leader as u64),
        alarms: vec![],
        hash: HashCheck::Agree,
    }
}

/// A bootstrapped cluster (status says what runs) whose spec asks for `replicas` × `version`.
fn running(replicas: i32, version: &str, status_version: &str) -> MetaStoreCluster {
    let mut c = cluster(replicas, version);
    c.status = Some(MetaStoreClusterStatus {
        current_version: Some(status_version.into()),
        current_format_version: Some(1),
        ..Default::default()
    });
    c
}

fn workflow_of(status: &Value) -> (&str, &str, &str) {
    let wf = &status["workflow"];
    (
        wf["kind"].as_str().unwrap_or("-"),
        wf["step"].as_str().unwrap_or("-"),
        wf["member"].as_str().unwrap_or("-"),
    )
}

/// One reconcile: the observe reads, the five applies (checked by `applied`), `acts` (the
/// requests the action makes), the status patch (checked by `status`) and the Event, if any.
/// Returns the membership calls made on the cluster.
async fn reconcile_step(
    cluster: MetaStoreCluster,
    view: ClusterView,
    observed: Vec<Expect>,
    applied: impl Fn(&str, &Value) + Clone + Send + 'static,
    acts: Vec<Expect>,
    status: impl Fn(&Value) + Send + 'static,
    event_reason: Option<(&'static str, &'static str)>,
) -> Vec<String> {
    let fake = Arc::new(FakeClusterApi {
        view: Some(view),
        ..Default::default()
    });
    let mut script = observed;
    script.extend(apply_requests(applied));
    script.extend(acts);
    script.push(status_patch(status, &cluster));
    if let Some((type_, reason)) = event_reason {
        script.push(event(type_, reason));
    }
    let (result, _) = reconcile_with(cluster, fake.clone(), t0, script).await;
    result.expect("reconcile succeeds");
    fake.calls()
}

fn sts_replicas_are(want: i32) -> impl Fn(&str, &Value) + Clone + Send + 'static {
    move |kind, body| {
        if kind == "StatefulSet" {
            assert_eq!(body["spec"]["replicas"], want, "StatefulSet replicas");
        }
    }
}

fn pods_on(versions: &[&str]) -> Vec<Value> {
    versions
        .iter()
        .enumerate()
        .map(|(i, v)| pod(i as i32, v, true))
        .collect()
}

#[tokio::test]
async fn scale_up_registers_a_learner_then_grows_the_statefulset_for_it() {
    let names = ClusterNames::new("demo", "db", false, false);
    // 1. Three voters, the spec asks for five: MemberAdd demo-3 as a learner; the StatefulSet
    //    keeps three pods until the member is registered.
    let initial = names.initial_cluster(0..3);
    let calls = reconcile_step(
        running(5, "1.2.0", "1.2.0"),
        voters(3, 0),
        observe_requests(
            Some(statefulset(3, "1.2.0")),
            pods_on(&["1.2.0"; 3]),
            (0..3).map(claim).collect(),
        ),
        move |kind, body| {
            sts_replicas_are(3)(kind, body);
            if kind == "ConfigMap" {
                assert_eq!(body["data"]["initial-cluster-state"], "existing");
                assert_eq!(body["data"]["initial-cluster"], initial.as_str());
            }
            if kind == "PodDisruptionBudget" {
                // Quorum-aware for the spec's five members: two may go at once.
                assert_eq!(body["spec"]["maxUnavailable"], 2);
            }
        },
        vec![],
        |status| {
            assert_eq!(status["phase"], "Scaling");
            assert_eq!(workflow_of(status), ("ScaleUp", "AddLearner", "demo-3"));
            assert_eq!(status["workflow"]["target"], "5");
            assert_eq!(condition(status, "Progressing")["status"], "True");
        },
        Some(("Normal", "AddLearner")),
    )
    .await;
    assert_eq!(
        calls,
        [
            "observe 5",
            "add_learner http://demo-3.demo-peer.db.svc:2380"
        ]
    );

    // 2. The learner is registered (no name yet: it never started): one more pod, listed in
    //    the ConfigMap so it joins the running cluster.
    let mut with_learner = voters(3, 0);
    with_learner.members.push(MemberView {
        id: 103,
        name: String::new(),
        peer_urls: vec![names.peer_url(3)],
        is_learner: true,
        healthy: false,
        applied_index: 0,
        version: None,
        format_version: None,
        format_migration_pending: false,
        supported_formats: vec![],
        db_size: 0,
        db_size_in_use: 0,
    });
    let initial = names.initial_cluster(0..4);
    let calls = reconcile_step(
        running(5, "1.2.0", "1.2.0"),
        with_learner,
        observe_requests(
            Some(statefulset(3, "1.2.0")),
            pods_on(&["1.2.0"; 3]),
            (0..3).map(claim).collect(),
        ),
        move |kind, body| {
            sts_replicas_are(4)(kind, body);
            if kind == "ConfigMap" {
                assert_eq!(body["data"]["initial-cluster-state"], "existing");
                assert_eq!(body["data"]["initial-cluster"], initial.as_str());
            }
        },
        vec![],
        |status| {
            assert_eq!(workflow_of(status), ("ScaleUp", "StartPod", "demo-3"));
            assert_eq!(status["members"][3]["name"], "demo-3");
            assert_eq!(status["members"][3]["role"], "Learner");
        },
        Some(("Normal", "ScaleStatefulSet")),
    )
    .await;
    assert_eq!(calls, ["observe 5"]);

    // 3. The learner caught up: MemberPromote.
    let mut caught_up = voters(3, 0);
    let mut learner = member(3, true);
    learner.is_learner = true;
    caught_up.members.push(learner);
    let calls = reconcile_step(
        running(5, "1.2.0", "1.2.0"),
        caught_up,
        observe_requests(
            Some(statefulset(4, "1.2.0")),
            pods_on(&["1.2.0"; 4]),
            (0..4).map(claim).collect(),
        ),
        sts_replicas_are(4),
        vec![],
        |status| assert_eq!(workflow_of(status), ("ScaleUp", "Promote", "demo-3")),
        Some(("Normal", "PromoteLearner")),
    )
    .await;
    assert_eq!(calls, ["observe 5", "promote 103"]);
}

#[tokio::test]
async fn scale_down_moves_leadership_removes_the_member_then_shrinks_the_statefulset() {
    let five = || {
        observe_requests(
            Some(statefulset(5, "1.2.0")),
            pods_on(&["1.2.0"; 5]),
            (0..5).map(claim).collect(),
        )
    };
    // 1. demo-4 goes first, and it leads: MoveLeader to demo-0, sent to demo-4.
    let calls = reconcile_step(
        running(3, "1.2.0", "1.2.0"),
        voters(5, 4),
        five(),
        |kind, body| {
            sts_replicas_are(5)(kind, body);
            if kind == "PodDisruptionBudget" {
                assert_eq!(body["spec"]["maxUnavailable"], 1);
            }
        },
        vec![],
        |status| assert_eq!(workflow_of(status), ("ScaleDown", "MoveLeader", "demo-4")),
        Some(("Normal", "MoveLeader")),
    )
    .await;
    assert_eq!(
        calls,
        [
            "observe 5",
            "move_leader http://demo-4.demo-peer.db.svc:2379 100"
        ]
    );

    // 2. demo-0 leads now: MemberRemove demo-4; its pod stays until membership is done.
    let calls = reconcile_step(
        running(3, "1.2.0", "1.2.0"),
        voters(5, 0),
        five(),
        sts_replicas_are(5),
        vec![],
        |status| assert_eq!(workflow_of(status), ("ScaleDown", "RemoveMember", "demo-4")),
        Some(("Normal", "RemoveMember")),
    )
    .await;
    assert_eq!(calls, ["observe 5", "remove 104"]);

    // 3. Three members left: the StatefulSet shrinks to them.
    let calls = reconcile_step(
        running(3, "1.2.0", "1.2.0"),
        voters(3, 0),
        five(),
        sts_replicas_are(3),
        vec![],
        |status| {
            assert_eq!(workflow_of(status), ("ScaleDown", "ShrinkStatefulSet", "-"));
            assert_eq!(status["readyReplicas"], 3);
        },
        Some(("Normal", "ScaleStatefulSet")),
    )
    .await;
    assert_eq!(calls, ["observe 5"]);
}

#[tokio::test]
async fn rolling_upgrade_deletes_followers_first_and_the_leader_last_after_move_leader() {
    let upgrade = |status_workflow: Option<Workflow>| {
        let mut c = running(3, "1.3.0", "1.2.0");
        c.metadata.generation = Some(2);
        if let Some(status) = c.status.as_mut() {
            status.workflow = status_workflow;
        }
        c
    };
    let observed = |versions: [&str; 3]| {
        observe_requests(
            Some(statefulset(3, "1.3.0")),
            pods_on(&versions),
            (0..3).map(claim).collect(),
        )
    };
    let template_moves = |kind: &str, body: &Value| {
        if kind == "StatefulSet" {
            assert_eq!(body["spec"]["updateStrategy"]["type"], "OnDelete");
            assert_eq!(
                body["spec"]["template"]["spec"]["containers"][0]["image"],
                image_for_version("1.3.0")
            );
        }
    };
    let delete = |i: i32| {
        vec![Expect::new("DELETE", format!("{NS}/pods/demo-{i}")).reply(pod(i, "1.2.0", true))]
    };

    // 1. Followers first, the highest ordinal first.
    let calls = reconcile_step(
        upgrade(None),
        voters(3, 0),
        observed(["1.2.0", "1.2.0", "1.2.0"]),
        template_moves,
        delete(2),
        |status| {
            assert_eq!(workflow_of(status), ("Upgrade", "DeletePod", "demo-2"));
            assert_eq!(status["workflow"]["from"], "1.2.0");
            assert_eq!(condition(status, "Upgrading")["status"], "True");
        },
        Some(("Normal", "ReplacePod")),
    )
    .await;
    assert_eq!(calls, ["observe 3"]);

    // 2. demo-2 is back on 1.3.0, Ready and caught up: the next follower.
    reconcile_step(
        upgrade(Some(upgrading_demo_2())),
        voters(3, 0),
        observed(["1.2.0", "1.2.0", "1.3.0"]),
        template_moves,
        delete(1),
        |status| assert_eq!(workflow_of(status), ("Upgrade", "DeletePod", "demo-1")),
        Some(("Normal", "ReplacePod")),
    )
    .await;

    // 3. Only the leader is left: no pod deleted, leadership handed to an upgraded follower.
    let calls = reconcile_step(
        upgrade(None),
        voters(3, 0),
        observed(["1.2.0", "1.3.0", "1.3.0"]),
        template_moves,
        vec![],
        |status| assert_eq!(workflow_of(status), ("Upgrade", "MoveLeader", "demo-0")),
        Some(("Normal", "MoveLeader")),
    )
    .await;
    assert_eq!(
        calls,
        [
            "observe 3",
            "move_leader http://demo-0.demo-peer.db.svc:2379 101"
        ]
    );

    // 4. demo-1 leads: the old leader's pod goes last.
    reconcile_step(
        upgrade(None),
        voters(3, 1),
        observed(["1.2.0", "1.3.0", "1.3.0"]),
        template_moves,
        delete(0),
        |status| assert_eq!(workflow_of(status), ("Upgrade", "DeletePod", "demo-0")),
        Some(("Normal", "ReplacePod")),
    )
    .await;
}

fn migration_job(to: i32, status: Value) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": format!("demo-migrate-v{to}"), "namespace": "db",
            "labels": {"app.kubernetes.io/instance": "demo",
                "app.kubernetes.io/component": "migration",
                "metastore.io/target-format": to.to_string()}},
        "spec": {"template": {"spec": {"containers": []}}},
        "status": status})
}

#[tokio::test]
async fn format_migration_creates_the_job_then_follows_it() {
    let migrating = || {
        let mut c = running(3, "1.3.0", "1.3.0");
        c.spec.storage.format_version = 2;
        c.metadata.generation = Some(2);
        c
    };
    let observed = |jobs: Vec<Value>| {
        observe_requests_with_jobs(
            Some(statefulset(3, "1.3.0")),
            pods_on(&["1.3.0"; 3]),
            (0..3).map(claim).collect(),
            jobs,
        )
    };
    let expected_job = {
        let c = migrating();
        let renderer = Renderer::new(&c).expect("renderer");
        to_json(&renderer.migration_job(2, &image_for_version("1.3.0")))
    };
    assert_eq!(
        expected_job["spec"]["template"]["spec"]["containers"][0]["args"],
        json!([
            "migrate",
            "--to=2",
            "--wait",
            "--endpoints=http://demo-client.db.svc:2379"
        ])
    );
    // 1. Every binary supports format 2, the cluster is healthy: the Job is applied.
    let calls = reconcile_step(
        migrating(),
        voters(3, 0),
        observed(vec![]),
        |kind, body| {
            if kind == "ConfigMap" {
                // New data directories keep the current format until the migration is done.
                assert_eq!(body["data"]["storage-format"], "1");
            }
        },
        vec![Expect::apply(
            "/apis/batch/v1/namespaces/db/jobs/demo-migrate-v2",
            expected_job,
        )],
        |status| {
            assert_eq!(status["phase"], "Migrating");
            assert_eq!(workflow_of(status), ("Migration", "RunMigrationJob", "-"));
            assert_eq!(status["workflow"]["target"], "2");
            assert_eq!(condition(status, "Migrating")["status"], "True");
        },
        Some(("Normal", "StartMigration")),
    )
    .await;
    assert_eq!(calls, ["observe 3"]);

    // 2. The Job runs: followed, nothing else applied, no Event.
    reconcile_step(
        migrating(),
        voters(3, 0),
        observed(vec![migration_job(2, json!({"active": 1}))]),
        |_, _| {},
        vec![],
        |status| {
            assert_eq!(status["phase"], "Migrating");
            assert_eq!(condition(status, "Migrating")["status"], "True");
        },
        None,
    )
    .await;

    // What the first step recorded.
    let recorded = || {
        let mut c = migrating();
        if let Some(s) = c.status.as_mut() {
            s.workflow = Some(Workflow {
                kind: WorkflowKind::Migration,
                step: WorkflowStep::RunMigrationJob,
                target: "2".into(),
                from: Some("1".into()),
                member: None,
                started_at: Time(t0()),
                step_started_at: Time(t0()),
                deadline: Time(t0_plus_120()),
                generation: 2,
                failure: None,
            });
        }
        c
    };
    let succeeded = || {
        migration_job(
            2,
            json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}),
        )
    };

    // 3. The switch applied (every member writes format 2) but demo-1 still re-encodes: the
    //    members show format 2, the cluster is not there yet.
    let mut switched = voters(3, 0);
    for m in &mut switched.members {
        m.format_version = Some(2);
    }
    switched.members[1].format_migration_pending = true;
    reconcile_step(
        recorded(),
        switched,
        observed(vec![succeeded()]),
        |_, _| {},
        vec![],
        |status| {
            assert_eq!(status["phase"], "Migrating");
            assert_eq!(status["currentFormatVersion"], 1);
            assert!(status["members"]
                .as_array()
                .is_some_and(|ms| ms.iter().all(|m| m["formatVersion"] == 2)));
            assert_eq!(condition(status, "Migrating")["status"], "True");
        },
        None,
    )
    .await;

    // 4. The Job succeeded and every member reports format 2 with nothing left: recorded,
    //    announced, and older binaries can no longer be rolled back to.
    let mut migrated = voters(3, 0);
    for m in &mut migrated.members {
        m.format_version = Some(2);
    }
    reconcile_step(
        recorded(),
        migrated,
        observed(vec![succeeded()]),
        |kind, body| {
            if kind == "ConfigMap" {
                assert_eq!(body["data"]["storage-format"], "1");
            }
        },
        vec![],
        |status| {
            assert_eq!(status["phase"], "Running");
            assert_eq!(status["currentFormatVersion"], 2);
            assert_eq!(status["formatVersionSince"], "1.3.0");
            assert_eq!(condition(status, "Migrating")["status"], "False");
            assert!(status.get("workflow").is_none_or(Value::is_null));
        },
        Some(("Normal", "MigrationComplete")),
    )
    .await;

    // 5. The next reconcile renders the format the members now write for restarted pods.
    let mut after = migrating();
    if let Some(s) = after.status.as_mut() {
        s.current_format_version = Some(2);
        s.members = (0..3)
            .map(|i| crate::crd::MemberStatus {
                name: format!("demo-{i}"),
                id: format!("{:x}", 100 + i),
                role: crate::crd::MemberRole::Follower,
                version: Some("1.3.0".into()),
                format_version: Some(2),
                healthy: true,
                applied_index: None,
                data_holder: None,
            })
            .collect();
    }
    let mut migrated = voters(3, 0);
    for m in &mut migrated.members {
        m.format_version = Some(2);
    }
    reconcile_step(
        after,
        migrated,
        observed(vec![succeeded()]),
        |kind, body| {
            if kind == "ConfigMap" {
                assert_eq!(body["data"]["storage-format"], "2");
            }
        },
        vec![],
        |status| assert_eq!(status["phase"], "Running"),
        None,
    )
    .await;

    // 6. A failed Job: Degraded, with a Warning Event.
    reconcile_step(
        migrating(),
        voters(3, 0),
        observed(vec![migration_job(
            2,
            json!({"failed": 3, "conditions": [{"type": "Failed", "status": "True"}]}),
        )]),
        |_, _| {},
        vec![],
        |status| {
            assert_eq!(status["phase"], "Degraded");
            let degraded = condition(status, "Degraded");
            assert_eq!(degraded["status"], "True");
            assert_eq!(degraded["reason"], "MigrationFailed");
        },
        Some(("Warning", "MigrationFailed")),
    )
    .await;
}

#[tokio::test]
async fn a_member_version_is_what_its_server_reports_else_its_image_tag() {
    let mut view = voters(3, 0);
    // demo-0's image says 1.2.0 but its binary reports 1.3.0-rc.1; demo-1 reports nothing.
    view.members[0].version = Version::parse("1.3.0-rc.1");
    let fake = FakeClusterApi {
        view: Some(view),
        ..Default::default()
    };
    let names = ClusterNames::new("demo", "db", false, false);
    let endpoints = vec![names.client_url(0)];
    let observed = observe_cluster(&fake, &names, &endpoints, |_| {
        Some(image_for_version("1.2.0"))
    })
    .await
    .expect("a view");
    let versions: Vec<String> = observed
        .members
        .iter()
        .map(|m| m.version.as_ref().map_or("-".into(), ToString::to_string))
        .collect();
    assert_eq!(versions, ["1.3.0-rc.1", "1.2.0", "1.2.0"]);
}

fn claim_of_size(i: i32, size: &str) -> Value {
    let mut c = claim(i);
    c["spec"]["resources"]["requests"]["storage"] = json!(size);
    c
}

#[tokio::test]
async fn growing_the_volume_size_patches_the_smaller_claims() {
    let mut c = running(3, "1.2.0", "1.2.0");
    c.spec.storage.size = Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
        "20Gi".into(),
    ));
    let grow = |i: i32| {
        Expect::new(
            "PATCH",
            format!("{NS}/persistentvolumeclaims/data-demo-{i}"),
        )
        .content_type("application/merge-patch+json")
        .check(|body| {
            assert_eq!(
                body,
                &json!({"spec": {"resources": {"requests": {"storage": "20Gi"}}}})
            );
        })
        .reply(claim_of_size(i, "20Gi"))
    };
    let calls = reconcile_step(
        c,
        voters(3, 0),
        observe_requests(
            Some(statefulset(3, "1.2.0")),
            pods_on(&["1.2.0"; 3]),
            vec![claim(0), claim(1), claim_of_size(2, "20Gi")],
        ),
        |_, _| {},
        // demo-2's claim is already big enough.
        vec![grow(0), grow(1)],
        |status| assert_eq!(status["phase"], "Running"),
        None,
    )
    .await;
    assert_eq!(calls, ["observe 3"]);
}

fn backup_jobs_list(items: Vec<Value>) -> Expect {
    Expect::list(
        "/apis/batch/v1/namespaces/db/jobs",
        "app.kubernetes.io/instance=demo,app.kubernetes.io/component=backup",
        "JobList",
        items,
    )
}

fn with_backup_request(mut c: MetaStoreCluster) -> MetaStoreCluster {
    c.spec.backup = Some(crate::crd::BackupSpec {
        claim_name: "backups".into(),
        schedule: None,
        keep: 3,
        request: Some("now".into()),
    });
    c
}

#[tokio::test]
async fn a_backup_request_creates_the_job_and_its_result_comes_from_the_termination_message() {
    let name = format!("demo-backup-{}", t0().as_second());
    let observed = || {
        observe_requests(
            Some(statefulset(3, "1.3.0")),
            pods_on(&["1.3.0"; 3]),
            (0..3).map(claim).collect(),
        )
    };
    let expected_job = {
        let c = with_backup_request(running(3, "1.3.0", "1.3.0"));
        let job = Renderer::new(&c)
            .expect("renderer")
            .backup_job(&name, &image_for_version("1.3.0"))
            .expect("a backup spec");
        to_json(&job)
    };
    // 1. A new request: the Job is applied and recorded as Running.
    let n = name.clone();
    reconcile_step(
        with_backup_request(running(3, "1.3.0", "1.3.0")),
        voters(3, 0),
        observed(),
        |_, _| {},
        vec![
            backup_jobs_list(vec![]),
            Expect::apply(
                format!("/apis/batch/v1/namespaces/db/jobs/{name}"),
                expected_job,
            ),
        ],
        move |status| {
            assert_eq!(status["phase"], "Running");
            assert_eq!(status["lastBackupRequest"], "now");
            let b = &status["backups"][0];
            assert_eq!(b["name"], n.as_str());
            assert_eq!(
                (b["phase"].as_str(), b["trigger"].as_str()),
                (Some("Running"), Some("Requested"))
            );
        },
        Some(("Normal", "BackupStarted")),
    )
    .await;

    // 2. The Job completed: the manifest its container left is read from its pod.
    let recorded = || {
        let mut c = with_backup_request(running(3, "1.3.0", "1.3.0"));
        if let Some(s) = c.status.as_mut() {
            s.last_backup_request = Some("now".into());
            s.backups = vec![crate::crd::BackupRecord::running(
                format!("demo-backup-{}", t0().as_second()),
                crate::crd::BackupTrigger::Requested,
                Time(t0()),
            )];
        }
        c
    };
    let job = json!({"apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": "db",
            "labels": {"app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": "backup"}},
        "spec": {"template": {"spec": {"containers": []}}},
        "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}});
    let manifest = json!({"name": name, "cluster": "db/demo", "revision": 4242,
        "size_bytes": 1048576, "sha256": "ab".repeat(32), "member": "demo-1",
        "storage_format": 1, "duration_seconds": 1.5, "file": format!("{name}.snapshot")});
    let job_pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{name}-x7k2p"), "namespace": "db"},
        "status": {"containerStatuses": [{"name": "backup", "image": "img", "imageID": "",
            "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "message": manifest.to_string()}}}]}});
    reconcile_step(
        recorded(),
        voters(3, 0),
        observed(),
        |_, _| {},
        vec![
            backup_jobs_list(vec![job]),
            Expect::list(
                format!("{NS}/pods"),
                &format!("job-name={name}"),
                "PodList",
                vec![job_pod],
            ),
        ],
        |status| {
            let b = &status["backups"][0];
            assert_eq!(b["phase"], "Succeeded");
            assert_eq!(b["revision"], 4242);
            assert_eq!(b["sizeBytes"], 1048576);
            assert_eq!(b["member"], "demo-1");
            assert_eq!(b["durationSeconds"], 1.5);
        },
        Some(("Normal", "BackupSucceeded")),
    )
    .await;
}
