"""Multi-member clusters of an etcd-flag-compatible server, for fault tests.

Generic over the binary: real etcd 3.4 or MetaStore take the same clustering
flags (`--name --data-dir --listen-client-urls --advertise-client-urls
--listen-peer-urls --initial-advertise-peer-urls --initial-cluster
--initial-cluster-state --initial-cluster-token --heartbeat-interval
--election-timeout --snapshot-count`), and every observation goes through
what both serve: the JSON gateway (`POST /v3/maintenance/status`, `/v3/kv/*`)
and etcdctl (`member add|promote|remove`, `endpoint hashkv`).

Networks (`network=`):

- "netns" (default when root and `ip netns add` works): every member runs in
  its own network namespace (`ip netns exec`) with an address 10.77.X.(10+i)
  on a veth plugged into a bridge that lives in a private "hub" namespace
  (a fresh namespace has no firewall rules: bridging in the root namespace
  would go through Docker's `FORWARD DROP` via br_netfilter). The test
  process reaches every member through one more veth, 10.77.X.1, from the
  root namespace, so clients keep reaching a partitioned member. A partition
  adds blackhole routes inside the members' namespaces between the two sides;
  healing deletes them. Every member listens on 2379 (client) / 2380 (peer)
  of its own address. Nothing is created in the root namespace but that one
  veth (deleted with the hub).
- "loopback": members on 127.0.0.1 with free ports; no partitions
  (`partition()` raises PartitionUnsupported, tests skip).

Usage::

    c = Cluster("etcd", "/usr/bin/etcd", tmp_path, size=3, etcdctl="/usr/bin/etcdctl")
    c.start()                       # waits until every member sees one leader
    leader = c.leader()
    c.kill(leader); ...; c.restart(leader)
    c.partition([leader]); ...; c.heal()
    c.wait_converged()              # same revision and HashKV everywhere
    c.close()                       # SIGKILL everything, delete namespaces
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional, Sequence

import harness


class ClusterError(RuntimeError):
    pass


class PartitionUnsupported(ClusterError):
    pass


def _run(argv: Sequence[str], check: bool = True, timeout: float = 20.0) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def unb64(s: Optional[str]) -> str:
    return base64.b64decode(s or "").decode("utf-8", "surrogateescape")


def post_json(url: str, body: dict, timeout: float = 2.0) -> dict:
    """POST JSON to the gateway; the parsed answer, or raise (HTTPError with
    its body, URLError, OSError, TimeoutError)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"{}")


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


class LoopbackNetwork:
    kind = "loopback"
    client_port_fixed = False

    def setup(self) -> None:
        pass

    def add_member(self, name: str, index: int) -> tuple[str, list[str]]:
        """(host, exec prefix) for a new member."""
        return "127.0.0.1", []

    def partition(self, side_a, side_b) -> None:
        raise PartitionUnsupported(
            "partitions need network namespaces (root + iproute2); this cluster runs on "
            "plain loopback")

    def heal(self) -> None:
        pass

    def close(self) -> None:
        pass


class NetnsNetwork:
    """See the module doc. X (the third octet) is chosen free at setup."""

    kind = "netns"
    client_port_fixed = True

    def __init__(self) -> None:
        self.x: Optional[int] = None
        self.prefix = f"mst-{os.getpid()}"
        self.hub = ""
        self.host_if = ""
        self.namespaces: list[str] = []
        self.routes: list[tuple[str, str]] = []    # (namespace, destination)
        self.members: dict[str, str] = {}           # name -> namespace

    @staticmethod
    def available() -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "not root"
        if not shutil.which("ip"):
            return False, "iproute2 (`ip`) not installed"
        probe = f"mst-probe-{os.getpid()}"
        p = _run(["ip", "netns", "add", probe], check=False)
        if p.returncode != 0:
            return False, f"`ip netns add` fails: {p.stderr.strip()}"
        _run(["ip", "netns", "del", probe], check=False)
        return True, ""

    @staticmethod
    def cleanup_stale() -> None:
        """Delete namespaces left by test processes that died (mst-<pid>-...),
        killing the members still running in them."""
        p = _run(["ip", "netns", "list"], check=False)
        for line in p.stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            m = re.match(r"mst-(\d+)-", name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                # members orphaned by a test process killed hard
                pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, ValueError):
                        pass
                _run(["ip", "netns", "del", name], check=False)

    def setup(self) -> None:
        self.cleanup_stale()
        used = _run(["ip", "-o", "-4", "addr"], check=False).stdout
        for x in range(77, 250):
            if f"10.77.{x}." in used:
                continue
            host_if = f"mst{x}h"
            hub = f"{self.prefix}-{x}-hub"
            if _run(["ip", "netns", "add", hub], check=False).returncode != 0:
                continue
            p = _run(["ip", "link", "add", host_if, "type", "veth", "peer", "name", "up0",
                      "netns", hub], check=False)
            if p.returncode != 0:          # taken by a concurrent run: next one
                _run(["ip", "netns", "del", hub], check=False)
                continue
            self.x, self.hub, self.host_if = x, hub, host_if
            self.namespaces.append(hub)
            break
        else:
            raise ClusterError("no free 10.77.X.0/24 subnet")
        x = self.x
        for cmd in (
            ["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"],
            ["ip", "-n", self.hub, "link", "set", "br0", "up"],
            ["ip", "-n", self.hub, "link", "set", "up0", "master", "br0", "up"],
            ["ip", "-n", self.hub, "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"10.77.{x}.1/24", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
        ):
            _run(cmd)

    def add_member(self, name: str, index: int) -> tuple[str, list[str]]:
        ns = f"{self.prefix}-{self.x}-{name}"
        host = f"10.77.{self.x}.{10 + index}"
        port = f"p{index}"
        _run(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        for cmd in (
            ["ip", "-n", self.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0",
             "netns", ns],
            ["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"],
            ["ip", "-n", ns, "addr", "add", f"{host}/24", "dev", "eth0"],
            ["ip", "-n", ns, "link", "set", "eth0", "up"],
            ["ip", "-n", ns, "link", "set", "lo", "up"],
        ):
            _run(cmd)
        self.members[name] = ns
        return host, ["ip", "netns", "exec", ns]

    def partition(self, side_a, side_b) -> None:
        """Drop all traffic between every member of side_a and every member of
        side_b (both directions); the test process still reaches everyone."""
        for a in side_a:
            for b in side_b:
                for src, dst in ((a, b), (b, a)):
                    ns = self.members[src.name]
                    _run(["ip", "-n", ns, "route", "add", "blackhole", f"{dst.host}/32"])
                    self.routes.append((ns, dst.host))

    def heal(self) -> None:
        for ns, dst in self.routes:
            _run(["ip", "-n", ns, "route", "del", "blackhole", f"{dst}/32"], check=False)
        self.routes.clear()

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            _run(["ip", "netns", "del", ns], check=False)
        self.namespaces.clear()


def make_network(kind: str = "auto"):
    """"netns", "loopback" or "auto" (netns when it works, else loopback).
    E2E_CLUSTER_NETWORK overrides "auto"."""
    if kind == "auto":
        kind = os.environ.get("E2E_CLUSTER_NETWORK", "auto")
    if kind == "auto":
        ok, _why = NetnsNetwork.available()
        kind = "netns" if ok else "loopback"
    if kind == "netns":
        ok, why = NetnsNetwork.available()
        if not ok:
            raise ClusterError(f"network namespaces unavailable: {why}")
        return NetnsNetwork()
    if kind == "loopback":
        return LoopbackNetwork()
    raise ValueError(f"unknown network kind {kind!r}")


# --------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------


class Member:
    """One member process. Same `kind`, `workdir` and `log_tail()` as
    harness.ServerProcess, so conftest attaches its logs to a failure."""

    def __init__(self, cluster: "Cluster", name: str, index: int, host: str,
                 exec_prefix: list[str], client_port: int, peer_port: int):
        self.cluster = cluster
        self.name = name
        self.index = index
        self.host = host
        self.exec_prefix = exec_prefix
        self.client_port = client_port
        self.peer_port = peer_port
        self.kind = f"{cluster.kind} {name}"
        self.workdir = Path(cluster.workdir) / name
        self.data_dir = self.workdir / "data"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.proc: Optional[subprocess.Popen] = None
        self.initial_cluster = ""
        self.initial_state = "new"
        self.id: Optional[int] = None       # member id, learned from status
        self.removed = False
        self.learner = False
        self.starts = 0

    @property
    def client_url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def args(self) -> list[str]:
        c = self.cluster
        a = [c.binary,
             "--name", self.name,
             "--data-dir", str(self.data_dir),
             "--listen-client-urls", self.client_url,
             "--advertise-client-urls", self.client_url,
             "--listen-peer-urls", self.peer_url,
             "--initial-advertise-peer-urls", self.peer_url,
             "--initial-cluster", self.initial_cluster,
             "--initial-cluster-state", self.initial_state,
             "--initial-cluster-token", c.token,
             "--heartbeat-interval", str(c.heartbeat_ms),
             "--election-timeout", str(c.election_ms)]
        if c.snapshot_count is not None:
            a += ["--snapshot-count", str(c.snapshot_count)]
        return a + list(c.extra_args)

    def start(self) -> None:
        assert not self.is_running(), f"{self.name} already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self.starts += 1
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            banner = f"\n===== harness: start #{self.starts} of {self.name} at {time.time():.3f} =====\n"
            err.write(banner.encode())
            err.flush()
            self.proc = subprocess.Popen(self.exec_prefix + self.args(), stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err, env=env, cwd=str(self.workdir),
                                         start_new_session=True)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.is_running():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def wait_exit(self, timeout: float = 15.0) -> Optional[int]:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{self.name} did not exit within {timeout} s") from None

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait_exit()

    def terminate(self, timeout: float = 15.0) -> Optional[int]:
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    # -- observations ------------------------------------------------------
    def status(self, timeout: float = 1.0) -> dict:
        """POST /v3/maintenance/status (gateway), ints converted."""
        s = post_json(self.client_url + "/v3/maintenance/status", {}, timeout)
        hdr = s.get("header", {})
        out = {
            "member_id": int(hdr.get("member_id", 0)),
            "revision": int(hdr.get("revision", 0)),
            "raft_term": int(hdr.get("raft_term", 0)),
            "leader": int(s.get("leader", 0)),
            "raft_index": int(s.get("raftIndex", 0)),
            "raft_applied_index": int(s.get("raftAppliedIndex", 0)),
            "is_learner": bool(s.get("isLearner", False)),
            "version": s.get("version", ""),
        }
        self.id = out["member_id"] or self.id
        return out

    def hashkv(self, rev: int = 0) -> dict:
        """`etcdctl endpoint hashkv -w json [--rev]` on this member alone."""
        args = ["endpoint", "hashkv", "-w", "json"]
        if rev:
            args.append(f"--rev={rev}")
        r = self.cluster.etcdctl(*args, endpoints=[self])
        if r.rc != 0:
            raise ClusterError(f"hashkv on {self.name} failed: {r.stderr.strip()}")
        h = json.loads(r.stdout)[0]["HashKV"]
        return {"hash": int(h.get("hash", 0)), "compact_revision": int(h.get("compact_revision", 0)),
                "revision": int(h.get("header", {}).get("revision", 0))}

    def range_prefix(self, prefix: str, serializable: bool = True, timeout: float = 5.0) -> dict[str, str]:
        """Every key under `prefix` as this member's own store holds it
        (serializable read: no round trip to the leader)."""
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        r = post_json(self.client_url + "/v3/kv/range",
                      {"key": b64(prefix), "range_end": b64(end), "serializable": serializable},
                      timeout)
        return {unb64(kv["key"]): unb64(kv.get("value")) for kv in r.get("kvs", [])}

    # -- logs (harness.ServerProcess interface) -----------------------------
    def read_log(self, which: str = "stderr", limit: int = 20000) -> str:
        p = self.stderr_path if which == "stderr" else self.stdout_path
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return ""
        if len(data) > limit:
            data = b"...[truncated]...\n" + data[-limit:]
        return data.decode("utf-8", "backslashreplace")

    def log_tail(self, limit: int = 6000) -> str:
        return (f"--- {self.kind} stderr ({self.stderr_path}) ---\n{self.read_log('stderr', limit)}"
                f"--- {self.kind} stdout ({self.stdout_path}) ---\n{self.read_log('stdout', limit)}")

    def __repr__(self) -> str:
        return f"<{self.name} {self.client_url}{' down' if not self.is_running() else ''}>"


# --------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------


class Cluster:
    def __init__(self, kind: str, binary: str, workdir, size: int = 3, *, etcdctl: str,
                 network: str = "auto", heartbeat_ms: int = 50, election_ms: int = 500,
                 snapshot_count: Optional[int] = None, extra_args: Sequence[str] = (),
                 on_member: Optional[Callable[[Member], None]] = None):
        self.kind = kind
        self.binary = binary
        self.workdir = Path(workdir)
        self.size = size
        self.etcdctl_bin = etcdctl
        self.heartbeat_ms = heartbeat_ms
        self.election_ms = election_ms
        self.snapshot_count = snapshot_count
        self.extra_args = list(extra_args)
        self.token = f"mst-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        self.net = make_network(network)
        self.members: list[Member] = []
        self.on_member = on_member
        self._next_index = 1
        self.events: list[tuple[float, str]] = []   # (monotonic, what): the fault timeline

    # -- lifecycle ---------------------------------------------------------
    def note(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def _new_member(self) -> Member:
        i = self._next_index
        self._next_index += 1
        name = f"m{i}"
        host, prefix = self.net.add_member(name, i)
        if self.net.client_port_fixed:
            cp, pp = 2379, 2380
        else:
            cp, pp = harness.free_port(), harness.free_port()
        m = Member(self, name, i, host, prefix, cp, pp)
        self.members.append(m)
        if self.on_member:
            self.on_member(m)
        return m

    def start(self, timeout: float = 30.0) -> "Cluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.net.setup()
        ms = [self._new_member() for _ in range(self.size)]
        ic = ",".join(f"{m.name}={m.peer_url}" for m in ms)
        for m in ms:
            m.initial_cluster = ic
            m.initial_state = "new"
            m.start()
        self.note("start")
        self.wait_healthy(timeout)
        return self

    def close(self) -> None:
        """SIGKILL every member, delete the namespaces and the data dirs
        (logs stay)."""
        for m in self.members:
            m.signal(signal.SIGKILL)
        for m in self.members:
            try:
                m.wait_exit(10)
            except ClusterError:
                pass
        self.net.close()
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)

    @property
    def live(self) -> list[Member]:
        """Members that run and were not removed."""
        return [m for m in self.members if m.is_running() and not m.removed]

    @property
    def current(self) -> list[Member]:
        """Members of the cluster (running or not), i.e. not removed."""
        return [m for m in self.members if not m.removed]

    def client_urls(self, members: Optional[Sequence[Member]] = None) -> list[str]:
        """Client URLs of the given members (default: every voting member of
        the cluster, running or not; learners serve no client requests)."""
        ms = members if members is not None else [m for m in self.current if not m.learner]
        return [m.client_url for m in ms]

    # -- health ------------------------------------------------------------
    def statuses(self, members: Optional[Sequence[Member]] = None, timeout: float = 1.0
                 ) -> dict[str, Optional[dict]]:
        out: dict[str, Optional[dict]] = {}
        for m in (members if members is not None else self.live):
            try:
                out[m.name] = m.status(timeout)
            except (urllib.error.URLError, OSError, ValueError):
                out[m.name] = None
        return out

    def wait_healthy(self, timeout: float = 30.0, members: Optional[Sequence[Member]] = None
                     ) -> Member:
        """Until every given member (default: every running one) answers
        status and all report the same leader, which is one of them; returns
        the leader."""
        deadline = time.monotonic() + timeout
        last = {}
        while time.monotonic() < deadline:
            ms = list(members) if members is not None else self.live
            dead = [m for m in ms if not m.is_running()]
            if dead:
                raise ClusterError(f"{dead} exited while waiting for health\n"
                                   + "\n".join(m.log_tail(3000) for m in dead))
            last = self.statuses(ms)
            leaders = {s["leader"] for s in last.values() if s}
            if all(last.values()) and len(leaders) == 1 and 0 not in leaders:
                lid = leaders.pop()
                for m in ms:
                    if m.id == lid:
                        return m
            time.sleep(0.05)
        raise ClusterError(f"cluster not healthy after {timeout} s; last statuses: {last}")

    def leader(self, timeout: float = 30.0) -> Member:
        return self.wait_healthy(timeout)

    def followers(self, timeout: float = 30.0) -> list[Member]:
        lead = self.leader(timeout)
        return [m for m in self.live if m is not lead]

    def wait_writable(self, since: float, timeout: float = 30.0, key: str = "/harness/probe",
                      members: Optional[Sequence[Member]] = None,
                      value: Optional[str] = None) -> float:
        """Put `key` through each given member in turn (default: every running
        one; 0.5 s timeout each) until one put is acknowledged; returns the
        seconds from `since` (a monotonic time, e.g. when the fault was
        injected) to that acknowledgement."""
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            ms = list(members) if members is not None else self.live
            for m in ms:
                n += 1
                try:
                    post_json(m.client_url + "/v3/kv/put",
                              {"key": b64(key), "value": b64(value if value is not None
                                                                 else str(n))}, timeout=0.5)
                    return time.monotonic() - since
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            time.sleep(0.02)
        raise ClusterError(f"no write acknowledged within {timeout} s")

    def wait_converged(self, timeout: float = 30.0, members: Optional[Sequence[Member]] = None
                       ) -> dict[str, dict]:
        """Until every given member (default: every running one) is at the same
        revision with the same HashKV at that revision. Call once writes have
        stopped. Returns {name: hashkv}."""
        deadline = time.monotonic() + timeout
        last: dict = {}
        while time.monotonic() < deadline:
            ms = list(members) if members is not None else self.live
            st = self.statuses(ms)
            revs = {s["revision"] for s in st.values() if s}
            if all(st.values()) and len(revs) == 1:
                try:
                    hs = {m.name: m.hashkv() for m in ms}
                except ClusterError as e:
                    last = {"error": str(e)}
                    time.sleep(0.2)
                    continue
                last = hs
                if len({(h["hash"], h["revision"]) for h in hs.values()}) == 1:
                    return hs
            else:
                last = st
            time.sleep(0.1)
        raise ClusterError(f"members did not converge within {timeout} s: {last}")

    # -- faults ------------------------------------------------------------
    def kill(self, m: Member) -> None:
        """SIGKILL."""
        self.note(f"SIGKILL {m.name}")
        m.kill()

    def terminate(self, m: Member) -> None:
        """SIGTERM, wait for exit."""
        self.note(f"SIGTERM {m.name}")
        m.terminate()

    def restart(self, m: Member, wait: bool = True, sig: Optional[int] = None,
                timeout: float = 30.0) -> None:
        """Start `m` again with the same flags (its data dir makes the
        --initial-* flags irrelevant). With `sig`, stop it first with that signal."""
        if sig is not None and m.is_running():
            self.note(f"{signal.Signals(sig).name} {m.name}")
            m.signal(sig)
            m.wait_exit()
        self.note(f"restart {m.name}")
        m.start()
        if wait:
            self.wait_member_ready(m, timeout)

    def wait_member_ready(self, m: Member, timeout: float = 30.0) -> None:
        """Until `m` answers status, knows a leader and reports itself healthy on /health
        (both servers answer 200 only once the member serves: a leader known and, for a
        joining member, its name published in the member list)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not m.is_running():
                raise ClusterError(f"{m.name} exited (rc {m.proc.returncode})\n{m.log_tail(4000)}")
            try:
                s = m.status(0.5)
                if s["leader"] and _healthy(m.client_url):
                    return
                last = s
            except (urllib.error.URLError, OSError, ValueError) as e:
                last = e
            time.sleep(0.05)
        raise ClusterError(f"{m.name} not ready after {timeout} s: {last}")

    def restart_all(self, sig: int = signal.SIGKILL, timeout: float = 30.0) -> None:
        """Stop every member at once with `sig`, start them all, wait for health."""
        ms = self.current
        self.note(f"{signal.Signals(sig).name} all")
        for m in ms:
            m.signal(sig)
        for m in ms:
            m.wait_exit()
        self.note("restart all")
        for m in ms:
            m.start()
        self.wait_healthy(timeout)

    def partition(self, side_a: Sequence[Member], side_b: Optional[Sequence[Member]] = None) -> None:
        """Cut every link between side_a and side_b (default: everyone else).
        Clients (the test process) still reach every member."""
        side_b = side_b if side_b is not None else [m for m in self.current if m not in side_a]
        self.net.partition(side_a, side_b)
        self.note(f"partition {[m.name for m in side_a]} | {[m.name for m in side_b]}")

    def heal(self) -> None:
        self.net.heal()
        self.note("heal")

    # -- membership (etcdctl member ...) -------------------------------------
    def etcdctl(self, *args: str, endpoints: Optional[Sequence[Member]] = None,
                timeout: str = "5s") -> harness.CmdResult:
        eps = endpoints if endpoints is not None else self.live
        return harness.Etcdctl(self.etcdctl_bin, ",".join(m.client_url for m in eps),
                               command_timeout=timeout).run(*args)

    def _reconfig(self, args: list[str], endpoints: list[Member], timeout: float
                  ) -> harness.CmdResult:
        """Run a membership change, retrying while the server refuses it with
        "unhealthy cluster": etcd's strict reconfiguration check refuses
        changes until every member has been connected for 5 s (after a
        restart or a partition). That is the protocol, not a flake."""
        deadline = time.monotonic() + timeout
        while True:
            r = self.etcdctl(*args, endpoints=endpoints)
            if r.rc == 0 or "unhealthy cluster" not in r.stderr or time.monotonic() > deadline:
                return r
            time.sleep(0.25)

    def add_member(self, learner: bool = False, start: bool = True, timeout: float = 30.0) -> Member:
        """`etcdctl member add NAME --peer-urls=URL [--learner]`, then start the
        new member with `--initial-cluster-state existing` and the
        initial-cluster string etcdctl printed."""
        m = self._new_member()
        args = ["member", "add", m.name, f"--peer-urls={m.peer_url}"]
        if learner:
            args.append("--learner")
        r = self._reconfig(args, [x for x in self.live], timeout)
        if r.rc != 0:
            m.removed = True
            raise ClusterError(f"member add failed: {r.stdout}{r.stderr}")
        ic = re.search(r'ETCD_INITIAL_CLUSTER="([^"]*)"', r.stdout)
        mid = re.search(r"Member\s+([0-9a-f]+) added", r.stdout)
        if not ic or not mid:
            raise ClusterError(f"cannot parse `member add` output: {r.stdout!r}")
        m.id = int(mid.group(1), 16)
        m.initial_cluster = ic.group(1)
        m.initial_state = "existing"
        m.learner = learner
        self.note(f"member add {m.name}{' (learner)' if learner else ''}")
        if start:
            m.start()
            self.wait_member_ready(m, timeout)
        return m

    def promote(self, m: Member, timeout: float = 30.0) -> float:
        """`etcdctl member promote`, retried while etcd says the learner is not
        yet in sync (that is the protocol, not a flake). Returns seconds taken."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = None
        while time.monotonic() < deadline:
            r = self.etcdctl("member", "promote", format(m.id, "x"),
                             endpoints=[x for x in self.live if x is not m])
            if r.rc == 0:
                m.learner = False
                self.note(f"member promote {m.name}")
                return time.monotonic() - t0
            last = r
            # "can only promote a learner member which is in sync with leader"
            if not any(x in r.stderr for x in ("in sync with leader", "unhealthy cluster",
                                               "leader changed")):
                break
            time.sleep(0.2)
        raise ClusterError(f"member promote {m.name} failed: {last and last.stderr}")

    def remove(self, m: Member, timeout: float = 30.0, exit_timeout: float = 10.0) -> bool:
        """`etcdctl member remove` (through the other members). etcd shuts a
        removed member down; this waits up to `exit_timeout` for that (0: do
        not wait; call `reap(m)` later) and SIGKILLs it otherwise. Returns
        whether it exited on its own."""
        others = [x for x in self.live if x is not m]
        if m.id is None:
            m.status()
        r = self._reconfig(["member", "remove", format(m.id, "x")], others, timeout)
        if r.rc != 0 and any(x in r.stderr for x in ("leader changed", "timed out",
                                                       "DeadlineExceeded")):
            # Removing the leader can make the answer fail while the change
            # itself committed: ask the cluster.
            try:
                if all(int(x["ID"]) != m.id for x in self.member_list()):
                    r = dataclasses.replace(r, rc=0)
            except (ClusterError, ValueError, KeyError):
                pass
        if r.rc != 0:
            raise ClusterError(f"member remove {m.name} failed: {r.stdout}{r.stderr}")
        m.removed = True
        self.note(f"member remove {m.name}")
        return self.reap(m, exit_timeout) if exit_timeout else False

    def reap(self, m: Member, timeout: float = 10.0) -> bool:
        """Wait up to `timeout` for a removed member to exit, SIGKILL it if it
        does not; True if it exited on its own."""
        try:
            m.wait_exit(timeout)
            return True
        except ClusterError:
            self.note(f"{m.name} still running {timeout} s after its removal: SIGKILL")
            m.kill()
            return False

    def member_list(self) -> list[dict]:
        r = self.etcdctl("member", "list", "-w", "json")
        if r.rc != 0:
            raise ClusterError(f"member list failed: {r.stderr}")
        return json.loads(r.stdout).get("members", [])

    def timeline(self, t0: float) -> str:
        return "\n".join(f"  {t - t0:7.3f} s  {w}" for t, w in self.events)


def _healthy(client_url: str) -> bool:
    """`GET /health` answers 200 with "health":"true"."""
    try:
        with urllib.request.urlopen(client_url + "/health", timeout=0.5) as r:
            return r.status == 200 and b'"true"' in r.read()
    except (urllib.error.URLError, OSError, ValueError):
        return False
