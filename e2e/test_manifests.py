"""Offline validation of the operator's manifests against Kubernetes schemas.

- the generated CRD (crds/) and operator/rbac.yaml, with kubernetes-validate --strict;
- the sample MetaStoreClusters (config/cluster-*.yaml) against the CRD's own
  openAPIV3Schema, with jsonschema (unknown fields refused, as a typo would be pruned
  silently by the API server);
- every object `metastore-operator render --file SAMPLE` prints, with
  kubernetes-validate --strict.

Needs the operator binary (METASTORE_OPERATOR_BIN, else
$CARGO_TARGET_DIR/release/metastore-operator, else
~/.cache/metastore/target/release/metastore-operator) and the Python packages in
requirements.txt. Missing ones skip the tests, or fail them when CI is set.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
CRD = ROOT / "crds" / "metastoreclusters.metastore.io.yaml"
RBAC = ROOT / "operator" / "rbac.yaml"
SAMPLES = sorted((ROOT / "config").glob("cluster-*.yaml"))
# The Kubernetes version of the API types the operator is built against (k8s-openapi v1_33).
KUBERNETES_VERSION = "1.33.0"


def _missing(what: str) -> None:
    msg = f"{what} not found"
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(f"{msg}; skipping (set CI=1 to make this a failure)")


def _module(name: str, package: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        _missing(f"Python package {package} (pip install -r e2e/requirements.txt)")


def operator_candidates() -> list[str]:
    if os.environ.get("METASTORE_OPERATOR_BIN"):
        return [os.environ["METASTORE_OPERATOR_BIN"]]
    out = []
    if os.environ.get("CARGO_TARGET_DIR"):
        out.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release", "metastore-operator"))
    out.append(os.path.join(os.path.expanduser("~"), ".cache", "metastore", "target", "release", "metastore-operator"))
    return out


def find_operator() -> Optional[str]:
    for c in operator_candidates():
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def load_all(text: str) -> list[dict]:
    yaml = _module("yaml", "PyYAML")
    return [d for d in yaml.safe_load_all(text) if d]


def k8s_validate(obj: dict) -> None:
    kv = _module("kubernetes_validate", "kubernetes-validate")
    try:
        kv.validate(obj, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as e:
        name = obj.get("metadata", {}).get("name")
        pytest.fail(f"{obj.get('kind')} {name}: {e.message} at {list(e.path)}", pytrace=False)


def strict_schema(schema: Any) -> Any:
    """The CRD schema with unknown fields refused wherever it lists properties."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_schema() -> dict:
    """The CRD's openAPIV3Schema with the fields the API server adds to every object."""
    (crd,) = load_all(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema.setdefault("properties", {}).update(
        {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        }
    )
    return schema


def render(sample: Path) -> list[dict]:
    binary = find_operator()
    if binary is None:
        _missing(
            "metastore-operator binary (cargo build --release -p metastore-operator; looked in "
            + ", ".join(operator_candidates())
            + ")"
        )
    out = subprocess.run(
        [binary, "render", "--file", str(sample)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return load_all(out.stdout)


def test_samples_exist():
    names = [p.name for p in SAMPLES]
    assert "cluster-dev.yaml" in names and "cluster-production.yaml" in names, names


def test_every_config_file_is_checked():
    """Each file in config/ is a MetaStoreCluster sample checked here (cluster-*.yaml) or the
    server configuration checked by test_config.py; a new file must be one or the other."""
    for path in sorted((ROOT / "config").iterdir()):
        if path.name == "metastore.yaml":
            continue
        assert path in SAMPLES, f"config/{path.name}: name MetaStoreCluster samples cluster-*.yaml"
        kinds = [d.get("kind") for d in load_all(path.read_text())]
        assert kinds == ["MetaStoreCluster"], f"config/{path.name}: {kinds}"


def test_crd_is_a_valid_custom_resource_definition():
    (crd,) = load_all(CRD.read_text())
    assert crd["kind"] == "CustomResourceDefinition"
    k8s_validate(crd)


def test_rbac_objects_are_valid():
    docs = load_all(RBAC.read_text())
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    }
    for doc in docs:
        k8s_validate(doc)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_sample_matches_the_crd_schema(sample: Path):
    jsonschema = _module("jsonschema", "jsonschema")
    schema = strict_schema(crd_schema())
    (cluster,) = load_all(sample.read_text())
    assert cluster["apiVersion"] == "metastore.io/v1alpha1"
    assert cluster["kind"] == "MetaStoreCluster"
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(cluster), key=lambda e: list(e.path)
    )
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_check_refuses_a_typo():
    """The strict schema catches what the API server would silently prune."""
    jsonschema = _module("jsonschema", "jsonschema")
    schema = strict_schema(crd_schema())
    (cluster,) = load_all((ROOT / "config" / "cluster-dev.yaml").read_text())
    cluster["spec"]["storage"]["engin"] = "memory"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(cluster))
    cluster["spec"]["storage"].pop("engin")
    cluster["spec"]["replicas"] = "three"
    assert list(jsonschema.Draft7Validator(schema).iter_errors(cluster))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_rendered_objects_are_valid(sample: Path):
    objects = render(sample)
    kinds = [o["kind"] for o in objects]
    assert kinds[:4] == ["Service", "Service", "ConfigMap", "StatefulSet"], kinds
    (cluster,) = load_all(sample.read_text())
    for obj in objects:
        assert obj["metadata"]["namespace"] == cluster["metadata"]["namespace"]
        (owner,) = obj["metadata"]["ownerReferences"]
        assert owner["kind"] == "MetaStoreCluster" and owner["controller"] is True
        k8s_validate(obj)
    (sts,) = [o for o in objects if o["kind"] == "StatefulSet"]
    assert sts["spec"]["replicas"] == cluster["spec"]["replicas"]
