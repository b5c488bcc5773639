"""A 3-member cluster of the runtime image on Docker, under load, through faults, a rolling
upgrade and the online storage-format migration.

What it does (one scenario, each step depending on the previous; `pytest -s` prints the
timeline):

1. Builds `metastore:dev` with e2e/images.sh and a second tag `metastore:dev-next` (the same
   script, `LABELS=io.metastore.build=next`), the "newer build" of the rolling upgrade. **The
   binaries in both images are identical**: the second image differs only by that label (so
   by image id). The upgrade exercises the procedure (replace every container in turn on its
   data volume, followers first, the leader last after `etcdctl move-leader`), not a change
   of code between versions.
2. Creates a private bridge network `mst-<run>` and three containers `mst-<run>-m1..m3` on
   it, each with a named volume on the image's data directory (`/var/lib/metastore`), started
   with etcd's flags: `--name mN`, `--initial-cluster` by container DNS names,
   `--initial-cluster-state new`, listening on 0.0.0.0, advertising `http://<container>:2379`
   and `:2380`, `--storage-format 1` (so the migration at the end has something to do).
   The test reaches the members from the host through their addresses on that network (the
   host routes to a user-defined bridge); nothing is published on the host and no traffic
   goes anywhere else. Whenever a member gives up its address (killed, disconnected,
   replaced), an idle container (`mst-<run>-holdN`, `sleep infinity`) takes it, so the member
   comes back at a new address as a Kubernetes pod does: its peers must find it again by DNS
   name; the test reads the new address from `docker inspect`.
3. Starts e2e/workload.py's Workload (6 clients over the JSON gateway: puts, linearizable
   gets, CAS txns, acknowledged unique writes), which runs until the final checks.
4. `docker kill` (SIGKILL) the leader, `docker start` it again.
5. `docker network disconnect` the leader, reconnect it after 3 election timeouts.
6. Rolling upgrade to `metastore:dev-next`: `docker stop` (SIGTERM) + `docker rm` + `docker
   run` on the same volume, followers first (highest ordinal first, as the operator does), the
   leader last after `etcdctl move-leader` to an upgraded follower; each replaced member must
   be healthy and caught up (applied index at the leader's index) before the next, and the
   members' HashKV at a common revision must agree after each step.
7. `metastore-ctl migrate --to=2 --wait` run by `docker exec` in one of the containers (the
   endpoints are the containers' DNS names, as the operator's Job uses its Service); then
   every member's Status (`POST /v3/maintenance/status`, field `storage_format`, 1000+) says
   format 2 with no migration pending. One follower is then replaced once more without
   `--storage-format` (as the operator renders the new format) and must come back at format 2.
8. e2e/test_cluster_faults.py's `final_checks`: the cluster healthy, every member at the same
   revision with the same HashKV, every acknowledged unique write on every member (and nothing
   never written), the history linearizable (lincheck), enough progress.

Everything it creates (containers, their named volumes, the network) is removed afterwards,
even on failure; the images are kept. On failure the containers' logs (of every container a
member ran in, replaced ones included) are attached to the report.

Needs a docker daemon, the release binaries (see e2e/images.sh) and etcdctl. Without a docker
daemon it is skipped, or fails when CI is set; missing binaries likewise. About 45-55 s here
once the images exist (building the base image by debootstrap the first time adds ~1 minute).

Environment: IMAGE (default metastore:dev), NEXT_IMAGE (default metastore:dev-next), BIN_DIR.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Optional

import pytest

import harness
from cluster import Cluster, ClusterError, Member, _healthy, post_json
from test_cluster_faults import Report, final_checks
from test_image import BUILD_TIMEOUT, SCRIPT, bin_dir, docker
from workload import Workload

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("IMAGE", "metastore:dev")
NEXT_IMAGE = os.environ.get("NEXT_IMAGE", "metastore:dev-next")
NEXT_LABEL = "io.metastore.build=next"
E2E_LABEL = "io.metastore.e2e=test_image_cluster"
DATA_DIR = "/var/lib/metastore"  # the image's declared volume
ELECTION_MS = 1000               # the server's defaults (heartbeat 100 ms)
HEARTBEAT_MS = 100
RESUME_BOUND = 10 * ELECTION_MS / 1000   # a write must be acknowledged this soon after a fault
CLIENT_TIMEOUT = 1.0


def _unavailable(why: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(why)


def _build(image: str, labels: str = "") -> float:
    start = time.monotonic()
    env = {**os.environ, "IMAGE": image, "BIN_DIR": bin_dir()}
    if labels:
        env["LABELS"] = labels
    out = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True,
                         timeout=BUILD_TIMEOUT, env=env, cwd=ROOT)
    assert out.returncode == 0, f"e2e/images.sh ({image}) failed:\n{out.stderr[-6000:]}\n{out.stdout[-3000:]}"
    print("".join(line + "\n" for line in out.stderr.splitlines() if line.startswith("==")), end="")
    return time.monotonic() - start


@pytest.fixture(scope="module")
def images() -> tuple[str, str]:
    """(current, next) image tags, built from the host's release binaries."""
    if shutil.which("docker") is None:
        _unavailable("docker not installed: the image cluster test needs a docker daemon")
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        _unavailable(f"no docker daemon reachable (docker info: {info.stderr.strip()[:200]})")
    for b in ("metastore", "metastore-ctl", "metastore-operator"):
        harness.require_binary(
            harness._existing(os.path.join(bin_dir(), b)), b,
            f"looked in {bin_dir()}; cargo build --release --bin metastore --bin metastore-ctl "
            "--bin metastore-operator")
    t1 = _build(IMAGE)
    t2 = _build(NEXT_IMAGE, NEXT_LABEL)
    print(f"images: {IMAGE} in {t1:.1f} s, {NEXT_IMAGE} in {t2:.1f} s")
    a = json.loads(docker("image", "inspect", IMAGE).stdout)[0]
    b = json.loads(docker("image", "inspect", NEXT_IMAGE).stdout)[0]
    assert a["Id"] != b["Id"], "the next image must be a different image"
    assert b["Config"]["Labels"].get("io.metastore.build") == "next", b["Config"]["Labels"]
    return IMAGE, NEXT_IMAGE


# --------------------------------------------------------------------------
# Members as containers, behind cluster.py's Member / Cluster interface
# --------------------------------------------------------------------------


class ContainerMember(Member):
    """One member: a container `mst-<run>-mN` (replaced on upgrade, same name) on its named
    volume. `client_url` is the container's current address on the test's network."""

    def __init__(self, cluster: "DockerCluster", name: str, index: int):
        super().__init__(cluster, name, index, host="", exec_prefix=[], client_port=2379,
                         peer_port=2380)
        self.container = f"{cluster.prefix}-{name}"
        self.volume = f"{cluster.prefix}-{name}-data"
        self.kind = f"container {self.container}"
        self.workdir = Path(cluster.workdir) / name
        self.image = ""
        self.storage_format: Optional[int] = 1   # the --storage-format flag; None: no flag
        self.ip: Optional[str] = None
        self.previous_logs = ""                  # logs of the containers this member ran in
        self._running: tuple[float, bool] = (0.0, False)

    # -- addresses ---------------------------------------------------------
    @property
    def client_url(self) -> str:
        return f"http://{self.ip or '0.0.0.0'}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.container}:{self.peer_port}"

    @property
    def advertised_client_url(self) -> str:
        return f"http://{self.container}:{self.client_port}"

    def refresh_ip(self) -> Optional[str]:
        out = docker("inspect", self.container, check=False)
        if out.returncode == 0:
            nets = json.loads(out.stdout)[0]["NetworkSettings"]["Networks"] or {}
            ip = (nets.get(self.cluster.network) or {}).get("IPAddress")
            if ip:
                self.ip = ip
        return self.ip

    # -- lifecycle ---------------------------------------------------------
    def args(self) -> list[str]:
        c = self.cluster
        a = ["--name", self.name,
             "--data-dir", DATA_DIR,
             "--listen-client-urls", "http://0.0.0.0:2379",
             "--advertise-client-urls", self.advertised_client_url,
             "--listen-peer-urls", "http://0.0.0.0:2380",
             "--initial-advertise-peer-urls", self.peer_url,
             "--initial-cluster", self.initial_cluster,
             "--initial-cluster-state", "new",
             "--initial-cluster-token", c.token,
             "--heartbeat-interval", str(c.heartbeat_ms),
             "--election-timeout", str(c.election_ms)]
        if self.storage_format is not None:
            a += ["--storage-format", str(self.storage_format)]
        return a

    def run(self, image: str) -> None:
        """`docker run` a new container for this member (its volume keeps the data)."""
        self.starts += 1
        docker(
            "run", "-d", "--name", self.container, "--hostname", self.container,
            "--network", self.cluster.network,
            "--label", E2E_LABEL,
            "-v", f"{self.volume}:{DATA_DIR}",
            "--health-interval", "1s",
            image, *self.args(),
        )  # fmt: skip
        self.image = image
        self._running = (0.0, True)
        self.refresh_ip()

    def start(self) -> None:            # restart the same container
        self.starts += 1
        docker("start", self.container)
        self._running = (0.0, True)
        self.refresh_ip()

    def kill(self) -> None:              # SIGKILL (docker kill's default)
        docker("kill", self.container)
        docker("wait", self.container, timeout=30)
        self._running = (0.0, False)

    def stop_and_remove(self) -> str:
        """SIGTERM (docker stop, 10 s grace), keep the logs, remove the container (not the
        volume): what deleting a pod of an OnDelete StatefulSet does."""
        t = time.monotonic()
        docker("stop", "-t", "10", self.container, timeout=60)
        took = time.monotonic() - t
        code = docker("inspect", "-f", "{{.State.ExitCode}}", self.container).stdout.strip()
        self.previous_logs += self._logs(limit=None) + \
            f"\n===== container {self.container} ({self.image}) removed =====\n"
        docker("rm", self.container)
        self._running = (0.0, False)
        return f"stopped in {took:.1f} s, exit code {code}"

    def is_running(self) -> bool:
        at, running = self._running
        if time.monotonic() - at > 1.0:
            out = docker("inspect", "-f", "{{.State.Running}}", self.container, check=False)
            running = out.returncode == 0 and out.stdout.strip() == "true"
            self._running = (time.monotonic(), running)
        return running

    def container_image(self) -> str:
        return docker("inspect", "-f", "{{.Config.Image}}", self.container).stdout.strip()

    def storage_status(self) -> dict:
        """The MetaStore fields of Status (1000+), as the gateway names them (proto names;
        defaults omitted)."""
        s = post_json(self.client_url + "/v3/maintenance/status", {}, 2.0)
        return {"storage_format": int(s.get("storage_format", 0)),
                "storage_migration_pending": bool(s.get("storage_migration_pending", False)),
                "supported_storage_formats": [int(x) for x in s.get("supported_storage_formats", [])]}

    # -- logs ----------------------------------------------------------------
    def _logs(self, limit: Optional[int] = 200) -> str:
        args = ["logs"] + (["--tail", str(limit)] if limit else []) + [self.container]
        out = docker(*args, check=False)
        return out.stdout + out.stderr

    def read_log(self, which: str = "stderr", limit: int = 20000) -> str:
        text = self.previous_logs + self._logs(limit=None)
        return text[-limit:]

    def log_tail(self, limit: int = 6000) -> str:
        return f"--- {self.kind} (all containers of {self.name}) ---\n{self.read_log(limit=limit)}"

    def __repr__(self) -> str:
        return f"<{self.name} {self.container} {self.client_url}>"


class DockerCluster(Cluster):
    """cluster.Cluster's health, convergence, etcdctl and timeline over containers."""

    def __init__(self, workdir: Path, etcdctl: str, image: str, size: int = 3):
        super().__init__("metastore-image", "docker", workdir, size, etcdctl=etcdctl,
                         network="loopback", heartbeat_ms=HEARTBEAT_MS, election_ms=ELECTION_MS)
        run = uuid.uuid4().hex[:8]
        self.prefix = f"mst-{run}"
        self.network = self.prefix
        self.token = f"mst-image-{run}"
        self.image = image
        self.network_created = False
        self.holders: list[str] = []

    def start(self, timeout: float = 60.0) -> "DockerCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        docker("network", "create", "--driver", "bridge", "--label", E2E_LABEL, self.network)
        self.network_created = True
        ms = [ContainerMember(self, f"m{i}", i) for i in range(1, self.size + 1)]
        self.members.extend(ms)
        ic = ",".join(f"{m.name}={m.peer_url}" for m in ms)
        for m in ms:
            docker("volume", "create", "--label", E2E_LABEL, m.volume)
            m.initial_cluster = ic
            m.run(self.image)
        self.note("start")
        self.wait_healthy(timeout)
        return self

    def hold_freed_address(self) -> str:
        """Start an idle container on the network so that it takes the address a member just
        gave up (Docker hands out the lowest free one): the member comes back at another
        address, as a pod does, and its peers must find it again by DNS name."""
        name = f"{self.prefix}-hold{len(self.holders) + 1}"
        # A tmpfs on the image's VOLUME: no anonymous volume is created for it.
        docker("run", "-d", "--name", name, "--network", self.network, "--label", E2E_LABEL,
               "--tmpfs", DATA_DIR, "--entrypoint", "sleep", self.image, "infinity")
        self.holders.append(name)
        return docker("inspect", "-f", f'{{{{(index .NetworkSettings.Networks "{self.network}").IPAddress}}}}',
                      name).stdout.strip()

    def close(self) -> None:
        for h in self.holders:
            docker("rm", "-f", "-v", h, check=False)   # -v: the image's anonymous volume
        for m in self.members:
            # Keep the logs for the failure report (conftest reads them after the test).
            m.previous_logs += m._logs(limit=None)
            docker("rm", "-f", m.container, check=False)
        for m in self.members:
            docker("volume", "rm", "-f", m.volume, check=False)
        if self.network_created:
            docker("network", "rm", self.network, check=False)

    def client_urls(self, members=None) -> list[str]:
        ms = members if members is not None else self.current
        return [m.client_url for m in ms if m.ip]

    def wait_member_ready(self, m: ContainerMember, timeout: float = 60.0) -> None:
        """Until `m` knows a leader and says healthy on /health."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not m.is_running():
                raise ClusterError(f"{m.container} exited\n{m.log_tail(4000)}")
            m.refresh_ip()
            try:
                s = m.status(0.5)
                if s["leader"] and _healthy(m.client_url):
                    return
                last = s
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise ClusterError(f"{m.name} not ready after {timeout} s: {last}\n{m.log_tail(4000)}")

    def wait_caught_up(self, m: ContainerMember, timeout: float = 60.0) -> int:
        """Until `m` has applied at least the leader's Raft index as read now; returns it."""
        target = self.leader().status()["raft_index"]
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = m.status(0.5)
                if last["raft_applied_index"] >= target:
                    return target
            except OSError as e:
                last = e
            time.sleep(0.1)
        raise ClusterError(f"{m.name} did not reach index {target} in {timeout} s: {last}")

    def hashkv_agree(self) -> tuple[int, int]:
        """HashKV of every member at the lowest revision they all hold (writes go on): the
        same everywhere. Returns (revision, hash)."""
        rev = min(m.status()["revision"] for m in self.live)
        hs = {m.name: m.hashkv(rev) for m in self.live}
        assert len({h["hash"] for h in hs.values()}) == 1, f"HashKV at revision {rev} differs: {hs}"
        return rev, next(iter(hs.values()))["hash"]

    def replace(self, m: ContainerMember, image: str) -> str:
        """Replace `m`'s container by one of `image` on the same volume; wait until ready.
        Returns how the old one stopped and how long the new one took."""
        self.note(f"replace {m.name} ({m.image} -> {image})")
        stopped = m.stop_and_remove()
        self.hold_freed_address()
        t = time.monotonic()
        m.run(image)
        self.wait_member_ready(m)
        return f"old container {stopped}; new one ready in {time.monotonic() - t:.1f} s"


def resumed(c: DockerCluster, since: float, rep: Report, what: str, members=None) -> float:
    took = c.wait_writable(since, timeout=RESUME_BOUND * 3, members=members)
    rep(f"{what}: writes resumed {took:.2f} s after the fault")
    assert took <= RESUME_BOUND, f"{what}: took {took:.2f} s (bound {RESUME_BOUND} s)\n{rep.text()}"
    return took


# --------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------


def test_image_cluster_faults_upgrade_migration(images, request, tmp_path):
    current, nxt = images
    etcdctl = harness.require_binary(harness.find_etcdctl(), "etcdctl", "apt-get install -y etcd-client")
    rep = Report("image-cluster")
    c = DockerCluster(tmp_path / "cluster", etcdctl, current)
    request.node._e2e_clusters = [c]      # conftest attaches the members' logs to a failure
    wl: Optional[Workload] = None
    try:
        c.start()
        rep(f"3 containers of {current} on network {c.network}: "
            + ", ".join(f"{m.name}={m.container}@{m.ip}" for m in c.members)
            + f"; leader {c.leader().name}")
        formats = {m.name: m.storage_status()["storage_format"] for m in c.live}
        assert set(formats.values()) == {1}, formats

        wl = Workload(c.client_urls, clients=6, keys=5, timeout=CLIENT_TIMEOUT, seed=11).start()
        time.sleep(3)

        # -- SIGKILL the leader, start it again --------------------------------------
        victim = c.leader()
        t = time.monotonic()
        c.kill(victim)
        rep(f"docker kill {victim.container} (leader {victim.name})")
        resumed(c, t, rep, "leader killed")
        time.sleep(2)
        old_ip = victim.ip
        held = c.hold_freed_address()
        c.note(f"docker start {victim.name}")
        victim.start()
        c.wait_member_ready(victim)
        c.wait_healthy()
        rep(f"{victim.name} started again at {victim.ip} (was {old_ip}; {held} now held by an "
            f"idle container), ready; leader {c.leader().name}")
        time.sleep(2)

        # -- disconnect the leader from the network, reconnect it ----------------------
        cut = c.leader()
        others = [m for m in c.live if m is not cut]
        t = time.monotonic()
        docker("network", "disconnect", c.network, cut.container)
        c.note(f"network disconnect {cut.name}")
        rep(f"docker network disconnect {cut.container} (leader {cut.name})")
        resumed(c, t, rep, "leader disconnected", members=others)
        new = c.wait_healthy(members=others)
        rep(f"new leader {new.name}")
        old_ip = cut.ip
        c.hold_freed_address()
        time.sleep(max(0.0, 3 * ELECTION_MS / 1000 - (time.monotonic() - t)))
        docker("network", "connect", c.network, cut.container)
        c.note(f"network connect {cut.name}")
        c.wait_member_ready(cut)
        c.wait_healthy()
        c.wait_caught_up(cut)
        rep(f"{cut.name} reconnected at {cut.ip} (was {old_ip}) after {time.monotonic() - t:.1f} s, caught up; "
            f"leader {c.leader().name}")
        time.sleep(2)

        # -- rolling upgrade: followers first (highest ordinal first), the leader last ----
        t_upgrade = time.monotonic()
        leader = c.leader()
        order = sorted(c.followers(), key=lambda m: -m.index) + [leader]
        for m in order:
            if m is c.leader():
                upgraded = [x for x in c.live if x is not m and x.image == nxt]
                target = (upgraded or [x for x in c.live if x is not m])[0]
                r = c.etcdctl("move-leader", f"{target.id:x}")
                assert r.rc == 0, r.describe()
                assert c.leader() is target, f"leader is {c.leader().name}, wanted {target.name}"
                rep(f"move-leader {m.name} -> {target.name}")
            t = time.monotonic()
            how = c.replace(m, nxt)
            assert m.container_image() == nxt
            c.wait_healthy()
            idx = c.wait_caught_up(m)
            rev, h = c.hashkv_agree()
            rep(f"{m.name} replaced by {nxt} in {time.monotonic() - t:.1f} s ({how}; now at {m.ip}), caught "
                f"up to index {idx}; HashKV {h} at revision {rev} on every member")
        assert {m.container_image() for m in c.live} == {nxt}
        rep(f"rolling upgrade done in {time.monotonic() - t_upgrade:.1f} s; leader {c.leader().name}")

        # -- online storage-format migration ---------------------------------------------
        runner = c.leader()
        endpoints = ",".join(m.advertised_client_url for m in c.current)
        t = time.monotonic()
        out = docker("exec", runner.container, "metastore-ctl", "migrate", f"--endpoints={endpoints}",
                     "--to=2", "--wait", "--timeout=2m", "--poll-interval=500ms", timeout=180)
        c.note("metastore-ctl migrate --to=2 --wait")
        rep(f"metastore-ctl migrate --to=2 --wait (docker exec in {runner.container}): "
            f"{time.monotonic() - t:.1f} s; last lines: {(out.stdout + out.stderr).strip().splitlines()[-3:]}")
        st = {m.name: m.storage_status() for m in c.live}
        assert all(s["storage_format"] == 2 and not s["storage_migration_pending"] for s in st.values()), st
        rep(f"Status on every member: {st}")

        # The switch is durable: a member replaced without --storage-format (as the operator
        # renders the new format) comes back writing format 2.
        m = c.followers()[-1]
        m.storage_format = None
        t = time.monotonic()
        how = c.replace(m, nxt)
        c.wait_healthy()
        c.wait_caught_up(m)
        s = m.storage_status()
        assert s["storage_format"] == 2 and not s["storage_migration_pending"], s
        rep(f"{m.name} replaced without --storage-format in {time.monotonic() - t:.1f} s ({how}): "
            "format 2")
        time.sleep(2)

        final_checks(c, wl, rep, tmp_path)
        rep("done")
    finally:
        if wl is not None:
            wl.stop()
        c.close()
    leftovers = docker("ps", "-a", "-q", "--filter", f"name={c.prefix}-").stdout.split()
    leftovers += docker("volume", "ls", "-q", "--filter", f"name={c.prefix}-").stdout.split()
    assert not leftovers, f"containers or volumes left behind: {leftovers}"
    rep(f"removed the containers, volumes and network {c.network}")
