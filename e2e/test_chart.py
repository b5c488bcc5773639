"""Offline checks of the Helm chart charts/metastore-operator.

Helm itself comes from PyPI: helm-python-sdk bundles Helm's Go SDK (v4) as a shared library
(libhelm_c, called through ctypes), so there is no helm binary to download and nothing is
fetched at run time. What is checked:

- the chart's copy of the CRD (files/crds/) is byte-for-byte crds/ (`make chart-sync`), and the
  rendered CRD is that file plus the release labels and the keep annotation;
- `helm lint --strict` passes with the default values and with every optional value set;
- every rendered object passes kubernetes-validate --strict (Kubernetes 1.33 schemas), the
  MetaStoreCluster passes the CRD's own schema (unknown fields refused), the ServiceMonitor
  (no schema offline) is checked field by field;
- the RBAC is exactly operator/rbac.yaml's (which a unit test holds to permissions.rs);
- the secure defaults, the probes and the leader-election wiring of the Deployment;
- values.schema.json refuses wrong values, and the templates refuse contradictory ones.

Missing Python packages skip the tests, or fail them when CI is set.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Optional

import pytest

from test_manifests import (
    CRD,
    RBAC,
    ROOT,
    _module,
    crd_schema,
    k8s_validate,
    load_all,
    strict_schema,
)

CHART = ROOT / "charts" / "metastore-operator"
CHART_CRD = CHART / "files" / "crds" / CRD.name
RELEASE = "mso"
NAMESPACE = "metastore-system"
KUBE_VERSION = "v1.33.0"

# Every optional value set (and every default changed where that is the option).
ALL_VALUES: dict[str, Any] = {
    "nameOverride": "mso-op",
    "fullnameOverride": "metastore-op",
    "crds": {"enabled": True, "keep": True},
    "replicaCount": 3,
    "image": {
        "repository": "registry.example.com/metastore/metastore",
        "tag": "v1.2.0",
        "digest": "sha256:" + "ab" * 32,
        "pullPolicy": "Always",
    },
    "imagePullSecrets": [{"name": "regcred"}],
    "leaderElection": {"enabled": True},
    "logLevel": "metastore_operator=debug,kube=info",
    "serviceAccount": {
        "create": True,
        "name": "metastore-op-sa",
        "annotations": {"iam.example.com/role": "metastore-operator"},
    },
    "rbac": {"create": True},
    "metrics": {
        "port": 9090,
        "service": {"enabled": True, "port": 9091, "annotations": {"example.com/scrape": "true"}},
        "serviceMonitor": {
            "enabled": True,
            "labels": {"release": "prometheus"},
            "interval": "15s",
            "scrapeTimeout": "5s",
        },
    },
    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
    "podSecurityContext": {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
    "securityContext": {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
    },
    "livenessProbe": {"initialDelaySeconds": 10, "periodSeconds": 20, "timeoutSeconds": 2, "failureThreshold": 5},
    "readinessProbe": {
        "initialDelaySeconds": 1,
        "periodSeconds": 3,
        "timeoutSeconds": 2,
        "failureThreshold": 2,
        "successThreshold": 1,
    },
    "podDisruptionBudget": {"enabled": True},
    "commonLabels": {"team": "platform"},
    "podLabels": {"sidecar.example.com/inject": "false"},
    "podAnnotations": {"example.com/owner": "platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "control", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "topologyKey": "kubernetes.io/hostname",
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mso-op"}},
                }
            ]
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "mso-op"}},
        }
    ],
    "priorityClassName": "system-cluster-critical",
    "extraEnv": [
        {"name": "RUST_BACKTRACE", "value": "1"},
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ],
    "cluster": {
        "enabled": True,
        "name": "prod",
        "labels": {"tier": "metadata"},
        "annotations": {"example.com/backup": "daily"},
        # The production sample's spec: TLS, anti-affinity, zone spread, volumes, PDB.
        "spec": None,  # filled from config/cluster-production.yaml below
    },
}


def helm() -> Any:
    return _module("helm_python", "helm-python-sdk")


def all_values() -> dict[str, Any]:
    values = copy.deepcopy(ALL_VALUES)
    (prod,) = load_all((ROOT / "config" / "cluster-production.yaml").read_text())
    values["cluster"]["spec"] = prod["spec"]
    return values


def render(values: Optional[dict] = None, *, upgrade: bool = False) -> dict[str, str]:
    """The chart rendered offline as `helm template` would: template path -> text."""
    h = helm()
    with h.Chart.load(str(CHART)) as chart:
        return chart.render(
            values,
            name=RELEASE,
            namespace=NAMESPACE,
            is_install=not upgrade,
            is_upgrade=upgrade,
        )


def objects(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(load_all(text))
    return out


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict], kind: str) -> dict:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects: {[o['metadata']['name'] for o in found]}"
    return found[0]


def notes(rendered: dict[str, str]) -> str:
    return next(text for path, text in rendered.items() if path.endswith("NOTES.txt"))


def validate_all(objs: list[dict]) -> None:
    """Every object through the schema that fits it."""
    jsonschema = _module("jsonschema", "jsonschema")
    for obj in objs:
        if obj["apiVersion"] == "metastore.io/v1alpha1":
            errors = list(jsonschema.Draft7Validator(strict_schema(crd_schema())).iter_errors(obj))
            assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
        elif obj["apiVersion"].startswith("monitoring.coreos.com/"):
            check_service_monitor(obj)
        else:
            k8s_validate(obj)


def check_service_monitor(sm: dict) -> None:
    """No ServiceMonitor schema offline: the fields Prometheus Operator reads, by hand."""
    assert sm["kind"] == "ServiceMonitor" and sm["apiVersion"] == "monitoring.coreos.com/v1"
    spec = sm["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}, spec
    assert spec["selector"]["matchLabels"]
    assert spec["namespaceSelector"]["matchNames"] == [sm["metadata"]["namespace"]]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}, ep
        assert ep["path"] == "/metrics" and ep["port"] == "metrics"


def standard_labels(obj: dict) -> None:
    labels = obj["metadata"].get("labels", {})
    for key in (
        "helm.sh/chart",
        "app.kubernetes.io/instance",
        "app.kubernetes.io/managed-by",
        "app.kubernetes.io/part-of",
    ):
        assert key in labels, f"{obj['kind']} {obj['metadata']['name']} lacks label {key}"
    assert labels["helm.sh/chart"] == "metastore-operator-" + chart_meta()["version"]
    assert labels["app.kubernetes.io/managed-by"] == "Helm"


def chart_meta() -> dict:
    (meta,) = load_all((CHART / "Chart.yaml").read_text())
    return meta


def numbers_as_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: numbers_as_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [numbers_as_floats(v) for v in node]
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return float(node)
    return node


def rules(obj: dict) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in obj["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


# ---- the CRD ----------------------------------------------------------------------------------


def test_chart_crd_is_the_generated_crd():
    assert CHART_CRD.is_file(), f"{CHART_CRD} missing: run `make chart-sync`"
    assert CHART_CRD.read_bytes() == CRD.read_bytes(), (
        f"{CHART_CRD.relative_to(ROOT)} differs from {CRD.relative_to(ROOT)}: run `make chart-sync` "
        "(`make generate` does it too)"
    )


def test_rendered_crd_is_the_generated_crd_with_keep_policy():
    objs = objects(render())
    crd = one(objs, "CustomResourceDefinition")
    (source,) = load_all(CRD.read_text())
    assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    standard_labels(crd)
    stripped = copy.deepcopy(crd)
    stripped["metadata"].pop("annotations")
    stripped["metadata"].pop("labels")
    # Same document after the YAML round trip through the template (fromYaml/toYaml turns the
    # generated `minimum: 1.0` into `1`; JSON numbers, so the same value to the API server).
    assert numbers_as_floats(stripped) == numbers_as_floats(source)


def test_crds_can_be_left_out_or_not_kept():
    assert not by_kind(objects(render({"crds": {"enabled": False, "keep": True}})), "CustomResourceDefinition")
    crd = one(objects(render({"crds": {"enabled": True, "keep": False}})), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in crd["metadata"].get("annotations", {})


def test_crd_is_rendered_on_upgrade():
    """A template (not crds/), so `helm upgrade` applies schema changes."""
    assert by_kind(objects(render(upgrade=True)), "CustomResourceDefinition")


def test_chart_app_version_is_the_workspace_version():
    """The default image tag (v<appVersion>) is the release built from this tree."""
    cargo = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\][^\[]*?^version = "([^"]+)"', cargo, re.M | re.S)
    assert m, "no [workspace.package] version in Cargo.toml"
    assert chart_meta()["appVersion"] == m.group(1)


# ---- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, "all"], ids=["defaults", "all-values"])
def test_helm_lint_strict(values):
    h = helm()
    report = h.lint(
        str(CHART),
        all_values() if values == "all" else None,
        strict=True,
        namespace=NAMESPACE,
        kube_version=KUBE_VERSION,
    )
    # Severity: 1 info (e.g. "icon is recommended"), 2 warning, 3 error; --strict fails on >= 2.
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert not bad and not report["errors"], json.dumps(report, indent=2)
    assert report["total_charts_linted"] == 1


# ---- rendered objects -------------------------------------------------------------------------


def test_default_render_is_valid():
    rendered = render()
    objs = objects(rendered)
    assert sorted(o["kind"] for o in objs) == sorted(
        [
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
            "PodDisruptionBudget",
        ]
    )
    validate_all(objs)
    for obj in objs:
        standard_labels(obj)
        if obj["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["kind"]
    text = notes(rendered)
    assert "kubectl" in text and "MetaStoreCluster" in text and "helm.sh/resource-policy" in text


def test_all_values_render_is_valid():
    values = all_values()
    rendered = render(values)
    objs = objects(rendered)
    kinds = sorted(o["kind"] for o in objs)
    assert "ServiceMonitor" in kinds and "MetaStoreCluster" in kinds, kinds
    validate_all(objs)
    for obj in objs:
        standard_labels(obj)
        assert obj["metadata"]["labels"]["team"] == "platform"

    dep = one(objs, "Deployment")
    assert dep["metadata"]["name"] == "metastore-op"
    assert dep["spec"]["replicas"] == 3
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/metastore/metastore:v1.2.0@sha256:" + "ab" * 32
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "metastore-op-sa"
    assert pod["affinity"] == values["affinity"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["topologySpreadConstraints"] == values["topologySpreadConstraints"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    env = {e["name"]: e for e in c["env"]}
    assert env["METASTORE_OPERATOR_METRICS_ADDR"]["value"] == "0.0.0.0:9090"
    assert env["METASTORE_OPERATOR_LOG"]["value"] == values["logLevel"]
    assert env["RUST_BACKTRACE"]["value"] == "1" and "valueFrom" in env["NODE_NAME"]
    assert c["ports"] == [{"name": "metrics", "containerPort": 9090, "protocol": "TCP"}]
    assert c["livenessProbe"]["periodSeconds"] == 20
    assert dep["spec"]["template"]["metadata"]["labels"]["sidecar.example.com/inject"] == "false"
    assert dep["spec"]["template"]["metadata"]["annotations"] == values["podAnnotations"]

    sa = one(objs, "ServiceAccount")
    assert sa["metadata"]["name"] == "metastore-op-sa"
    assert sa["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    for binding in by_kind(objs, "ClusterRoleBinding") + by_kind(objs, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "metastore-op-sa", "namespace": NAMESPACE}]

    svc = one(objs, "Service")
    assert svc["spec"]["ports"][0]["port"] == 9091 and svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert svc["metadata"]["annotations"] == {"example.com/scrape": "true"}
    sm = one(objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    # The ServiceMonitor selects the metrics Service.
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()

    cluster = one(objs, "MetaStoreCluster")
    assert cluster["metadata"]["name"] == "prod" and cluster["metadata"]["namespace"] == NAMESPACE
    assert cluster["metadata"]["labels"]["tier"] == "metadata"
    assert cluster["metadata"]["annotations"] == {"example.com/backup": "daily"}
    assert cluster["spec"] == values["cluster"]["spec"]
    assert "kubectl -n metastore-system get msc prod" in notes(rendered)


def test_cluster_from_values_gets_the_chart_version():
    objs = objects(render({"cluster": {"enabled": True, "spec": {"replicas": 1, "storage": {"engine": "memory"}}}}))
    cluster = one(objs, "MetaStoreCluster")
    assert cluster["metadata"]["name"] == f"{RELEASE}-metastore-operator"
    assert cluster["spec"]["version"] == chart_meta()["appVersion"]
    validate_all([cluster])


def test_deployment_defaults_are_secure_and_wired_for_leader_election():
    dep = one(objects(render()), "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["runAsUser"] == 65532  # the image's user
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["command"] == ["metastore-operator"] and c["args"] == ["run"]
    assert c["image"] == "ghcr.io/metastore/metastore:v" + chart_meta()["appVersion"]
    # operator/src/main.rs: --metrics-addr (/metrics, /healthz), --leader-election,
    # --lease-namespace from POD_NAMESPACE, --identity from POD_NAME.
    env = {e["name"]: e for e in c["env"]}
    assert env["METASTORE_OPERATOR_LEADER_ELECTION"]["value"] == "true"
    assert env["METASTORE_OPERATOR_METRICS_ADDR"]["value"] == "0.0.0.0:8080"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["ports"][0]["containerPort"] == 8080
    # Replicas prefer distinct nodes when no affinity is given.
    assert pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]


def test_rbac_is_exactly_operator_rbac_yaml():
    source = load_all(RBAC.read_text())
    objs = objects(render())
    assert rules(one(objs, "ClusterRole")) == rules(one(source, "ClusterRole"))
    assert rules(one(objs, "Role")) == rules(one(source, "Role"))
    for obj in by_kind(objs, "ClusterRole") + by_kind(objs, "Role"):
        for rule in obj["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            # Secrets: read by name only (the client TLS Secret of a cluster), never listed.
            if "secrets" in rule["resources"]:
                assert rule["resources"] == ["secrets"] and rule["verbs"] == ["get"], rule
    role_ref = one(objs, "ClusterRoleBinding")["roleRef"]
    assert role_ref["name"] == one(objs, "ClusterRole")["metadata"]["name"]


def test_optional_objects_can_be_turned_off():
    objs = objects(
        render(
            {
                "replicaCount": 1,
                "leaderElection": {"enabled": False},
                "rbac": {"create": False},
                "serviceAccount": {"create": False, "name": "existing-sa"},
                "metrics": {"port": 8080, "service": {"enabled": False, "port": 8080}, "serviceMonitor": {"enabled": False}},
            }
        )
    )
    assert sorted(o["kind"] for o in objs) == ["CustomResourceDefinition", "Deployment"]
    dep = one(objs, "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e.get("value") for e in c["env"]}["METASTORE_OPERATOR_LEADER_ELECTION"] == "false"
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "existing-sa"
    validate_all(objs)


# ---- wrong values -----------------------------------------------------------------------------

WRONG_VALUES = [
    ({"replicaCount": "two"}, "replicaCount"),
    ({"replicaCount": 0}, "replicaCount"),
    ({"replicas": 2}, "replicas"),  # unknown key (a typo of replicaCount)
    ({"crds": {"enabled": "yes", "keep": True}}, "enabled"),
    ({"crds": {"enabled": True, "keep": True, "install": True}}, "install"),
    ({"image": {"repository": "r", "pullPolicy": "Sometimes"}}, "pullPolicy"),
    ({"image": {"repository": "r", "pullPolicy": "Always", "digest": "latest"}}, "digest"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"metrics": {"serviceMonitor": {"enabled": True, "interval": "soon"}}}, "interval"),
    ({"livenessProbe": {"periodSeconds": 0}}, "periodSeconds"),
    ({"resources": {"requests": {"memory": "lots"}}}, "memory"),
    ({"cluster": {"enabled": True, "spec": {"replicas": 2}}}, "replicas"),
    ({"podLabels": {"a": 1}}, "podLabels"),
]


@pytest.mark.parametrize("values,where", WRONG_VALUES, ids=[w for _, w in WRONG_VALUES])
def test_values_schema_refuses_wrong_values(values, where):
    h = helm()
    with h.Chart.load(str(CHART)) as chart:
        chart.validate_schema({})  # the defaults pass
        with pytest.raises(h.HelmValuesError) as e:
            chart.validate_schema(values)
    assert where in str(e.value), str(e.value)
    # `helm template/install` refuse them too, before rendering anything.
    with pytest.raises(h.HelmError):
        render(values)


def test_values_schema_accepts_all_values():
    h = helm()
    with h.Chart.load(str(CHART)) as chart:
        chart.validate_schema(all_values())


def test_values_schema_is_strict():
    """additionalProperties: false on every object of the chart's own (non-Kubernetes) values."""
    (schema,) = [json.loads((CHART / "values.schema.json").read_text())]
    open_objects = []

    def walk(node: dict, path: str) -> None:
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False and path != ".cluster.spec":
                open_objects.append(path or ".")
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")

    walk(schema, "")
    assert not open_objects, open_objects
    (defaults,) = load_all((CHART / "values.yaml").read_text())
    assert set(defaults) <= set(schema["properties"]), set(defaults) - set(schema["properties"])


@pytest.mark.parametrize(
    "values,message",
    [
        ({"replicaCount": 2, "leaderElection": {"enabled": False}}, "leaderElection"),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name"),
    ],
    ids=["replicas-without-leader-election", "no-serviceaccount-name"],
)
def test_templates_refuse_contradictions(values, message):
    h = helm()
    with pytest.raises(h.HelmError) as e:
        render(values)
    assert message in str(e.value), str(e.value)
