"""The runtime image, built and run with no registry.

Builds `metastore:dev` with e2e/images.sh (the base image from debootstrap when missing, then
`docker build --target runtime-prebuilt` from the host's release binaries), runs it once with
`--read-only` on a docker network this test creates, its client port published on 127.0.0.1
only, and checks: the HEALTHCHECK turns healthy, GET /health, etcdctl put/get from the host,
a read through the network from a second container, the user (65532), the read-only root and
writable data volume, the data surviving a restart, and `metastore-operator render` in the
image. Everything it creates
(containers, their volumes, the network) is removed afterwards; the images are kept.

Skipped when no docker daemon is reachable. Missing binaries skip the tests, or fail them when
CI is set.

Environment: IMAGE (default metastore:dev), BIN_DIR (see e2e/images.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

import pytest

import harness

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "e2e" / "images.sh"
IMAGE = os.environ.get("IMAGE", "metastore:dev")
BUILD_TIMEOUT = 1800  # debootstrap + import + build; about 2 minutes here


def docker(*args: str, check: bool = True, timeout: float = 120, input: Optional[str] = None):
    out = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and out.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({out.returncode}):\n{out.stderr}{out.stdout}")
    return out


def bin_dir() -> str:
    if os.environ.get("BIN_DIR"):
        return os.environ["BIN_DIR"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "metastore", "target")
    return os.path.join(target, "release")


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("docker") is None:
        pytest.skip("docker not installed: the image test needs a docker daemon")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        pytest.skip(f"no docker daemon reachable (docker info: {info.stderr.strip()[:200]})")
    for b in ("metastore", "metastore-operator"):
        harness.require_binary(
            harness._existing(os.path.join(bin_dir(), b)),
            b,
            f"looked in {bin_dir()}; cargo build --release --bin metastore --bin metastore-operator",
        )
    start = time.monotonic()
    out = subprocess.run(
        ["bash", str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "IMAGE": IMAGE, "BIN_DIR": bin_dir()},
        cwd=ROOT,
    )
    assert out.returncode == 0, f"e2e/images.sh failed:\n{out.stderr[-6000:]}\n{out.stdout[-4000:]}"
    # The script's own timings ("== base image ... built in N s", "== image ... built in N s").
    print("".join(line + "\n" for line in out.stderr.splitlines() if line.startswith("==")))
    print(f"images.sh took {time.monotonic() - start:.1f} s")
    return IMAGE


@pytest.fixture
def network(image):
    name = f"metastore-e2e-{uuid.uuid4().hex[:8]}"
    docker("network", "create", "--driver", "bridge", "--label", "io.metastore.e2e=test_image", name)
    yield name
    docker("network", "rm", name, check=False)


@pytest.fixture
def container(image, network):
    """A MetaStore container, read-only root, client port on 127.0.0.1 only; removed with its
    anonymous data volume afterwards."""
    name = f"metastore-e2e-{uuid.uuid4().hex[:8]}"
    docker(
        "run", "-d", "--name", name, "--hostname", name,
        "--network", network,
        "--read-only",
        # The image's own health check command, run every second instead of every 10 s.
        "--health-interval", "1s",
        "--label", "io.metastore.e2e=test_image",
        "-p", "127.0.0.1::2379",
        image,
        "--name", "e2e",
        "--initial-cluster-token", "e2e",
    )  # fmt: skip
    try:
        yield name
    finally:
        logs = docker("logs", "--tail", "50", name, check=False)
        print(f"container {name} logs:\n{logs.stdout}{logs.stderr}")
        docker("rm", "-f", "-v", name, check=False)


def client_port(name: str) -> int:
    out = docker("port", name, "2379/tcp").stdout.strip().splitlines()
    # Only 127.0.0.1 (the IPv4 loopback) was asked for.
    (line,) = [line for line in out if line.startswith("127.0.0.1:")]
    return int(line.rsplit(":", 1)[1])


def inspect(name: str) -> dict:
    return json.loads(docker("inspect", name).stdout)[0]


def wait_healthy(name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        state = inspect(name)["State"]
        if not state["Running"]:
            raise AssertionError(f"container exited: {state}")
        status = state.get("Health", {}).get("Status")
        if status == "healthy":
            return
        if status == "unhealthy":
            break
        time.sleep(0.5)
    log = inspect(name)["State"].get("Health", {}).get("Log", [])
    raise AssertionError(f"health status {status!r} after {timeout} s; checks: {log}")


def http_get(url: str, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.read()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def test_image_metadata(image):
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert config["User"] == "65532:65532"
    assert "/var/lib/metastore" in config["Volumes"]
    assert {"2379/tcp", "2380/tcp"} <= set(config["ExposedPorts"])
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"] == ["/usr/local/bin/metastore"]
    # Every binary runs in the image (glibc, libstdc++ of the base match the build host).
    for binary in ("metastore", "metastore-ctl", "metastore-operator"):
        out = docker("run", "--rm", "--read-only", "--entrypoint", binary, image, "--version")
        assert binary in out.stdout, out.stdout
    # The binaries are shipped without debug sections (the release profile keeps line tables,
    # which tripled the image): 141 MB on 2026-11-25, of which the Debian base is 74 MB.
    size = json.loads(docker("image", "inspect", image).stdout)[0]["Size"]
    print(f"image size: {size / 1e6:.0f} MB")
    assert size < 200e6, f"image is {size / 1e6:.0f} MB: are the binaries stripped?"
    # The operator as the chart runs it (command: [metastore-operator], non-root, read-only).
    sample = ROOT / "config" / "cluster-dev.yaml"
    out = docker(
        "run", "--rm", "--read-only", "--user", "65532:65532",
        "-v", f"{sample}:/config/cluster.yaml:ro",
        "--entrypoint", "metastore-operator", image, "render", "--file", "/config/cluster.yaml",
    )  # fmt: skip
    assert "kind: StatefulSet" in out.stdout, out.stdout[:2000]


def test_run_read_only_put_get(image, network, container):
    etcdctl = harness.require_binary(harness.find_etcdctl(), "etcdctl", "apt-get install -y etcd-client")
    wait_healthy(container)
    state = inspect(container)
    assert state["HostConfig"]["ReadonlyRootfs"] is True
    # Published on the IPv4 loopback only.
    bindings = state["HostConfig"]["PortBindings"]["2379/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], bindings

    port = client_port(container)
    endpoint = f"127.0.0.1:{port}"
    health = json.loads(http_get(f"http://{endpoint}/health"))
    assert health["health"] == "true", health

    def ctl(*args: str) -> str:
        out = subprocess.run(
            [etcdctl, f"--endpoints={endpoint}", "--dial-timeout=5s", "--command-timeout=10s", *args],
            capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"},
        )  # fmt: skip
        assert out.returncode == 0, f"etcdctl {' '.join(args)}: {out.stderr}"
        return out.stdout

    assert ctl("put", "greeting", "hello").strip() == "OK"
    assert ctl("get", "greeting").split() == ["greeting", "hello"]

    # Non-root, read-only root filesystem, writable data volume.
    assert docker("exec", container, "id", "-u").stdout.strip() == "65532"
    assert docker("exec", container, "touch", "/usr/local/bin/x", check=False).returncode != 0
    assert docker("exec", container, "touch", "/var/lib/metastore/x").returncode == 0

    # Through the docker network, by container name, from a second container.
    probe = (
        f"exec 3<>/dev/tcp/{container}/2379 && "
        "printf 'GET /health HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n' >&3 && cat <&3"
    )
    out = docker(
        "run", "--rm", "--read-only", "--network", network, "--label", "io.metastore.e2e=test_image",
        "--entrypoint", "bash", image, "-c", probe,
    )  # fmt: skip
    assert '"health":"true"' in out.stdout, out.stdout

    # The data lives in the volume: it survives a restart (RocksDB, fsync on).
    docker("restart", container)
    wait_healthy(container)
    endpoint = f"127.0.0.1:{client_port(container)}"
    assert ctl("get", "greeting").split() == ["greeting", "hello"]
