"""pytest fixtures for MetaStore's e2e tests.

Environment:
  DIFF_TARGET     "metastore" (default) or "etcd": what the differential tests
                  compare against the reference etcd. "etcd" runs a second real
                  etcd, which proves the harness itself gives zero diffs.
  METASTORE_BIN   MetaStore binary (else $CARGO_TARGET_DIR/release/metastore,
                  else ~/.cache/metastore/target/release/metastore).
  ETCD_BIN / ETCDCTL_BIN   override the etcd / etcdctl found on PATH.
  METASTORE_BENCH_BIN      the load tool (else metastore-bench beside the MetaStore binary).
  CI              when set, a missing binary fails the test instead of skipping it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import DiffRunner, Etcdctl, ServerProcess, start_servers  # noqa: E402


def diff_target() -> str:
    t = os.environ.get("DIFF_TARGET", "metastore").strip().lower() or "metastore"
    if t not in ("metastore", "etcd"):
        raise pytest.UsageError(f"DIFF_TARGET must be 'metastore' or 'etcd', not {t!r}")
    return t


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    # Attach every server's logs to a failed test's report.
    if rep.failed and rep.when in ("setup", "call"):
        members = [m for c in getattr(item, "_e2e_clusters", []) for m in c.members]
        for s in [*getattr(item, "_e2e_servers", []), *members]:
            rep.sections.append((f"server log: {s.kind} ({s.workdir})", s.log_tail(6000)))


# -- binaries ---------------------------------------------------------------

@pytest.fixture(scope="session")
def etcd_bin() -> str:
    return harness.require_binary(
        harness.find_etcd(), "etcd",
        "install Debian's etcd-server (apt-get install -y etcd-server etcd-client) or set ETCD_BIN")


@pytest.fixture(scope="session")
def etcdctl_bin() -> str:
    return harness.require_binary(
        harness.find_etcdctl(), "etcdctl",
        "install Debian's etcd-client (apt-get install -y etcd-client) or set ETCDCTL_BIN")


@pytest.fixture(scope="session")
def metastore_bin() -> str:
    return harness.require_binary(
        harness.find_metastore(), "MetaStore binary",
        "looked for " + ", ".join(harness.metastore_candidates())
        + "; build it with `cargo build --release` or set METASTORE_BIN")


@pytest.fixture(scope="session")
def bench_bin() -> str:
    """The load tool: METASTORE_BENCH_BIN, else `metastore-bench` beside the MetaStore binary."""
    path = os.environ.get("METASTORE_BENCH_BIN")
    if not path:
        metastore = harness.find_metastore()
        path = str(Path(metastore).parent / "metastore-bench") if metastore else ""
    found = path if os.path.isfile(path) and os.access(path, os.X_OK) else None
    return harness.require_binary(found, "metastore-bench",
                                  "build it with `cargo build --release -p metastore-bench` "
                                  "or set METASTORE_BENCH_BIN")


@pytest.fixture(scope="session")
def target_kind_and_bin(request) -> tuple[str, str]:
    """(label, binary) of the server under test."""
    if diff_target() == "etcd":
        return "etcd-as-target", request.getfixturevalue("etcd_bin")
    return "metastore", request.getfixturevalue("metastore_bin")


# -- servers ----------------------------------------------------------------

@pytest.fixture
def server_factory(request, tmp_path):
    """Factory: make(kind, binary) -> an un-started ServerProcess in its own
    temp dir. Every server made here is killed at teardown; its data dir is
    removed, its logs are kept under tmp_path (and attached to a failure)."""
    servers: list[ServerProcess] = []
    request.node._e2e_servers = servers

    def make(kind: str, binary: str, extra_args=()) -> ServerProcess:
        s = ServerProcess(kind, binary, tmp_path / f"{len(servers)}-{kind}", extra_args=extra_args)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()
    for s in servers:
        s.remove_data()


@pytest.fixture
def cluster_factory(request, tmp_path, etcdctl_bin):
    """Factory: make(kind, binary, size=3, **Cluster kwargs) -> a started
    cluster.Cluster (members in network namespaces when root, else on
    loopback). At teardown every member is SIGKILLed and the namespaces and
    data dirs removed; members' logs stay under tmp_path and are attached to
    a failure."""
    from cluster import Cluster

    clusters: list = []
    request.node._e2e_clusters = clusters

    def make(kind: str, binary: str, size: int = 3, start: bool = True, **kw) -> Cluster:
        c = Cluster(kind, binary, tmp_path / f"cluster{len(clusters)}-{kind}", size,
                    etcdctl=etcdctl_bin, **kw)
        clusters.append(c)
        if start:
            c.start()
        return c

    yield make
    for c in clusters:
        c.close()


@pytest.fixture
def diff(server_factory, etcd_bin, etcdctl_bin, target_kind_and_bin, tmp_path):
    """A DiffRunner over a fresh real etcd (reference) and a fresh target
    (MetaStore, or a second etcd with DIFF_TARGET=etcd)."""
    tgt_kind, tgt_bin = target_kind_and_bin
    ref = server_factory("etcd", etcd_bin)
    tgt = server_factory(tgt_kind, tgt_bin)
    start_servers([ref, tgt])
    runner = DiffRunner(
        Etcdctl(etcdctl_bin, ref.client_url), ref.client_addr,
        Etcdctl(etcdctl_bin, tgt.client_url), tgt.client_addr,
        ref_name="etcd", tgt_name=tgt_kind,
        transcript=tmp_path / "transcript.txt",
        servers=(ref, tgt),
    )
    yield runner
    runner.close()
