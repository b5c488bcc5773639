"""The operator on a real Kubernetes cluster: runs only when KUBECONFIG is set.

One scenario, in order (each step needs the previous one):

1. install: the CRD (server-side apply of crds/), then the chart (rendered offline with
   helm-python-sdk as test_chart.py does, applied with kubectl) into a fresh namespace;
2. create a 3-member MetaStoreCluster and wait until it is Available with 3 ready members;
3. write a key through a port-forward to a member (the JSON gateway) and read it back from
   every member (serializable reads: each member's own copy);
4. scale to 5 (learners added and promoted), then back to 3 (members removed through the API,
   the StatefulSet shrunk), the key still on every member;
5. bump the version: the members are replaced one at a time, followers first and the leader
   last; every pod ends on the new image, status.currentVersion follows, the key survives;
6. delete the MetaStoreCluster: the owned objects go, the volume claims stay (the default).

Environment (see e2e/README.md, "Against a real cluster"):

- KUBECONFIG: the cluster; unset = every test here is skipped, saying so.
- E2E_IMAGE_REPOSITORY (default `metastore`): the images `<repo>:v<from>` and `<repo>:v<to>`
  must be pullable by the nodes (for kind: `kind load docker-image`). The operator takes a
  member's version from the member itself (Status `server_version`), so build each image with
  the version it is tagged with: `METASTORE_VERSION=1.2.0 make image && docker tag metastore:dev
  metastore:v1.2.0`, then the same for 1.3.0.
- E2E_FROM_VERSION (default 1.2.0), E2E_TO_VERSION (default 1.3.0): one minor apart.
- E2E_STORAGE_CLASS: the volumes' StorageClass (default: the cluster's default).
- E2E_TIMEOUT (default 300): seconds each wait may take.
- E2E_KEEP_NAMESPACE=1: leave the namespace for inspection.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
import uuid
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import pytest

from test_manifests import CRD, ROOT, _module, load_all

KUBECONFIG = os.environ.get("KUBECONFIG")
pytestmark = pytest.mark.skipif(
    not KUBECONFIG,
    reason="KUBECONFIG is not set: this suite needs a real Kubernetes cluster "
    "(see e2e/README.md, 'Against a real cluster')",
)

REPO = os.environ.get("E2E_IMAGE_REPOSITORY", "metastore")
FROM = os.environ.get("E2E_FROM_VERSION", "1.2.0")
TO = os.environ.get("E2E_TO_VERSION", "1.3.0")
STORAGE_CLASS = os.environ.get("E2E_STORAGE_CLASS")
TIMEOUT = float(os.environ.get("E2E_TIMEOUT", "300"))
CHART = ROOT / "charts" / "metastore-operator"
CLUSTER = "demo"


def kubectl(*args: str, input: Optional[str] = None, check: bool = True) -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("KUBECONFIG is set but kubectl is not on PATH")
    proc = subprocess.run(
        [exe, *args], input=input, capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: rc={proc.returncode}\n{proc.stderr}")
    return proc.stdout


def get_json(*args: str) -> Optional[dict]:
    out = kubectl("get", *args, "-o", "json", "--ignore-not-found", check=True)
    return json.loads(out) if out.strip() else None


def wait_for(what: str, probe: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Polls `probe` until it returns something truthy; fails with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except AssertionError as e:  # a kubectl hiccup: try again
            last = e
        else:
            if last:
                return last
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")


def condition(obj: dict, type_: str) -> Optional[dict]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def image(version: str) -> str:
    return f"{REPO}:v{version}"


# ------------------------------------------------------------------------------------------
# Install and teardown.


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    ns = f"metastore-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    crd_existed = bool(get_json("crd", "metastoreclusters.metastore.io"))
    kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / CRD.name))
    kubectl("wait", "--for=condition=Established", "crd/metastoreclusters.metastore.io", "--timeout=60s")
    cluster_scoped: list[dict] = []
    try:
        cluster_scoped = install_operator(ns)
        yield ns
    finally:
        if os.environ.get("E2E_KEEP_NAMESPACE") != "1":
            kubectl("delete", "msc", "--all", "-n", ns, "--wait=false", check=False)
            kubectl("delete", "namespace", ns, "--wait=false", check=False)
            for obj in cluster_scoped:
                kubectl("delete", obj["kind"], obj["metadata"]["name"], "--ignore-not-found", check=False)
            if not crd_existed:
                kubectl("delete", "crd", "metastoreclusters.metastore.io", "--wait=false", check=False)


def install_operator(ns: str) -> list[dict]:
    """The chart rendered as `helm template` would, applied; returns its cluster-scoped objects."""
    helm = _module("helm_python", "helm-python-sdk")
    values = {
        "crds": {"enabled": False},
        "replicaCount": 1,
        "image": {"repository": REPO, "tag": f"v{FROM}", "pullPolicy": "IfNotPresent"},
    }
    with helm.Chart.load(str(CHART)) as chart:
        rendered = chart.render(values, name="mso", namespace=ns, is_install=True, is_upgrade=False)
    objs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith("NOTES.txt"):
            objs.extend(load_all(text))
    # Cluster-scoped objects get a per-run name, so parallel runs do not share them.
    cluster_scoped = []
    for obj in objs:
        if obj["kind"] in ("ClusterRole", "ClusterRoleBinding"):
            obj["metadata"]["name"] = f'{obj["metadata"]["name"]}-{ns}'
            cluster_scoped.append(obj)
        if obj["kind"] == "ClusterRoleBinding":
            obj["roleRef"]["name"] = f'{obj["roleRef"]["name"]}-{ns}'
    kubectl("apply", "-n", ns, "-f", "-", input="\n---\n".join(json.dumps(o) for o in objs))
    deployments = [o for o in objs if o["kind"] == "Deployment"]
    assert deployments, "the chart renders the operator Deployment"
    for d in deployments:
        kubectl("rollout", "status", "-n", ns, f'deployment/{d["metadata"]["name"]}', f"--timeout={int(TIMEOUT)}s")
    return cluster_scoped


# ------------------------------------------------------------------------------------------
# Talking to the members: the JSON gateway through a port-forward.


@contextmanager
def port_forward(ns: str, pod: str) -> Iterator[str]:
    exe = shutil.which("kubectl")
    assert exe is not None
    proc = subprocess.Popen(
        [exe, "port-forward", "-n", ns, f"pod/{pod}", ":2379"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        m = re.search(r"127\.0\.0\.1:(\d+)", line)
        assert m, f"port-forward to {pod}: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        yield f"http://127.0.0.1:{m.group(1)}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def gateway(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def put(ns: str, pod: str, key: str, value: str) -> None:
    def attempt() -> bool:
        with port_forward(ns, pod) as url:
            gateway(url, "/v3/kv/put", {"key": b64(key), "value": b64(value)})
        return True

    wait_for(f"put {key} through {pod}", lambda: _quiet(attempt), timeout=60)


def local_get(ns: str, pod: str, key: str) -> Optional[str]:
    with port_forward(ns, pod) as url:
        out = gateway(url, "/v3/kv/range", {"key": b64(key), "serializable": True})
    kvs = out.get("kvs") or []
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else None


def _quiet(f: Callable[[], Any]) -> Any:
    try:
        return f()
    except (OSError, AssertionError, ValueError):
        return None


def key_everywhere(ns: str, pods: list[str], key: str, value: str) -> None:
    for pod in pods:
        wait_for(f"{key}={value} on {pod}", lambda: _quiet(lambda: local_get(ns, pod, key) == value), timeout=60)


# ------------------------------------------------------------------------------------------
# The scenario.


def cluster_manifest(ns: str) -> dict:
    storage: dict[str, Any] = {"engine": "rocksdb", "size": "1Gi"}
    if STORAGE_CLASS:
        storage["storageClassName"] = STORAGE_CLASS
    return {
        "apiVersion": "metastore.io/v1alpha1",
        "kind": "MetaStoreCluster",
        "metadata": {"name": CLUSTER, "namespace": ns},
        "spec": {"replicas": 3, "image": image(FROM), "storage": storage},
    }


def msc(ns: str) -> dict:
    obj = get_json("msc", CLUSTER, "-n", ns)
    assert obj is not None, "the MetaStoreCluster exists"
    return obj


def settled(ns: str, replicas: int) -> Optional[dict]:
    """The object once the operator reports `replicas` healthy voters and nothing in flight."""
    obj = msc(ns)
    status = obj.get("status") or {}
    available = condition(obj, "Available")
    members = status.get("members") or []
    ok = (
        status.get("observedGeneration") == obj["metadata"]["generation"]
        and status.get("phase") == "Running"
        and status.get("readyReplicas") == replicas
        and len(members) == replicas
        and all(m.get("healthy") and m.get("role") != "Learner" for m in members)
        and available is not None
        and available.get("status") == "True"
        and not status.get("workflow")
    )
    return obj if ok else None


def patch_spec(ns: str, spec: dict) -> None:
    kubectl("patch", "msc", CLUSTER, "-n", ns, "--type=merge", "-p", json.dumps({"spec": spec}))


def pods(n: int) -> list[str]:
    return [f"{CLUSTER}-{i}" for i in range(n)]


def pod_images(ns: str) -> dict[str, str]:
    out = get_json("pods", "-n", ns, "-l", f"app.kubernetes.io/instance={CLUSTER},app.kubernetes.io/name=metastore") or {}
    images = {}
    for p in out.get("items", []):
        for c in p["spec"]["containers"]:
            if c["name"] == "metastore":
                images[p["metadata"]["name"]] = c["image"]
    return images


def test_lifecycle_create_scale_upgrade_delete(namespace: str) -> None:
    ns = namespace
    kubectl("apply", "-f", "-", input=json.dumps(cluster_manifest(ns)))
    obj = wait_for("3 members Available", lambda: settled(ns, 3))
    assert obj["status"]["currentVersion"] == FROM
    assert obj["status"]["leader"] in pods(3)
    sts = get_json("statefulset", CLUSTER, "-n", ns)
    assert sts is not None and sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    pdb = get_json("pdb", CLUSTER, "-n", ns)
    assert pdb is not None and pdb["spec"]["maxUnavailable"] == 1

    put(ns, "demo-0", "e2e/key", "v1")
    key_everywhere(ns, pods(3), "e2e/key", "v1")

    # Scale to five and back.
    patch_spec(ns, {"replicas": 5})
    wait_for("5 members", lambda: settled(ns, 5))
    key_everywhere(ns, pods(5), "e2e/key", "v1")
    patch_spec(ns, {"replicas": 3})
    wait_for("back to 3 members", lambda: settled(ns, 3))
    wait_for(
        "StatefulSet at 3",
        lambda: (get_json("statefulset", CLUSTER, "-n", ns) or {}).get("spec", {}).get("replicas") == 3,
    )
    names = sorted(m["name"] for m in msc(ns)["status"]["members"])
    assert names == pods(3)
    key_everywhere(ns, pods(3), "e2e/key", "v1")

    # Rolling upgrade: watch the order the pods move to the new image.
    leader_before = msc(ns)["status"]["leader"]
    patch_spec(ns, {"image": image(TO)})
    order: list[str] = []
    saw_upgrading = False

    def upgraded() -> Optional[dict]:
        nonlocal saw_upgrading
        obj = msc(ns)
        saw_upgrading |= (obj.get("status") or {}).get("phase") == "Upgrading"
        for pod, img in sorted(pod_images(ns).items()):
            if img == image(TO) and pod not in order:
                order.append(pod)
        return settled(ns, 3) if len(order) == 3 else None

    obj = wait_for("rolling upgrade", upgraded, timeout=3 * TIMEOUT)
    assert saw_upgrading, "status showed the upgrade"
    assert obj["status"]["currentVersion"] == TO
    assert order[-1] == leader_before, f"the leader goes last: {order}, leader was {leader_before}"
    assert sorted(order[:-1], reverse=True) == order[:-1], f"followers highest ordinal first: {order}"
    key_everywhere(ns, pods(3), "e2e/key", "v1")
    put(ns, "demo-1", "e2e/after-upgrade", "v2")
    key_everywhere(ns, pods(3), "e2e/after-upgrade", "v2")

    # Delete: the finalizer runs, owned objects go, the claims stay.
    kubectl("delete", "msc", CLUSTER, "-n", ns, f"--timeout={int(TIMEOUT)}s")
    wait_for("the StatefulSet garbage-collected", lambda: get_json("statefulset", CLUSTER, "-n", ns) is None)
    claims = get_json("pvc", "-n", ns, "-l", f"app.kubernetes.io/instance={CLUSTER}") or {}
    assert len(claims.get("items", [])) == 3, "volume claims are kept by default"
