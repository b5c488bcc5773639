"""Fault scenarios on 3-member clusters under a concurrent workload.

Every scenario runs against each server binary in TARGETS (real etcd 3.4 now;
MetaStore once it replicates) with the same clustering flags, and ends with
the same checks (`final_checks`):

- the cluster is healthy and every member reaches the same revision and the
  same HashKV;
- every acknowledged write of a unique key is on every member (serializable
  read of each member's own store), and nothing never written is there;
- the history of puts / linearizable gets / CAS txns is linearizable
  (lincheck; unknown outcomes may or may not have taken effect);
- the workload made progress.

Service resumption after a fault is measured by a probe put retried through
the surviving members and asserted against RESUME_BOUND (generous: a few
election timeouts; twice that for etcd, the reference: REFERENCE_RESUME_BOUND);
the timings are printed (`pytest -s`) and attached to a failure. Partitions
need network namespaces (root, iproute2); without them the partition scenario
is skipped.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import lincheck
from cluster import PartitionUnsupported
from harness import Etcdctl, normalise_text, start_servers
from workload import Workload, bulk_put

# The servers these scenarios run against: add "metastore" once Raft lands.
# E2E_CLUSTER_TARGETS=etcd,metastore overrides it without editing.
TARGETS = ["etcd", "metastore"]
TARGETS = [t for t in os.environ.get("E2E_CLUSTER_TARGETS", ",".join(TARGETS)).split(",") if t]

HEARTBEAT_MS = 50
ELECTION_MS = 500
# After a fault, a write must be acknowledged within this many seconds.
RESUME_BOUND = 10 * ELECTION_MS / 1000
CLIENT_TIMEOUT = 1.0


@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str]:
    """(kind, binary) of the server under test."""
    kind = request.param
    return kind, request.getfixturevalue(f"{kind}_bin")


@pytest.fixture
def make_cluster(cluster_factory, target):
    kind, binary = target

    def make(size: int = 3, **kw):
        kw.setdefault("heartbeat_ms", HEARTBEAT_MS)
        kw.setdefault("election_ms", ELECTION_MS)
        return cluster_factory(kind, binary, size, **kw)
    return make


@pytest.fixture
def workload_for():
    """workload_for(cluster, **Workload kwargs) -> an unstarted Workload over
    the cluster's voting members; every one is stopped at teardown, so a
    failed test leaves no client threads behind to hit the next cluster."""
    made: list[Workload] = []

    def make(c, **kw) -> Workload:
        kw.setdefault("clients", 6)
        kw.setdefault("keys", 5)
        kw.setdefault("timeout", CLIENT_TIMEOUT)
        wl = Workload(c.client_urls, **kw)
        made.append(wl)
        return wl
    yield make
    for wl in made:
        wl.stop()


class Report:
    """Timings and facts of one scenario, printed and attached to failures."""

    def __init__(self, name: str):
        self.name = name
        self.t0 = time.monotonic()
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(f"[{time.monotonic() - self.t0:6.2f} s] {line}")
        print(f"{self.name}: {self.lines[-1]}", flush=True)

    def text(self) -> str:
        return "\n".join(self.lines)


# etcd runs these scenarios to show the harness and the scenario are sound, and gets a wider
# bound: etcd 3.4 elects without pre-vote, and on a loaded 2-core CI machine a 5-member
# cluster once split its votes over five terms and took 5.97 s to take a write after the
# leader was isolated (CI, 2026-12-03), and once took 12.60 s in test_partition_leader[etcd-5]
# (CI, 2026-12-06; the reruns took less than 10 s). MetaStore's liveness is what the tight
# bound checks.
REFERENCE_RESUME_BOUND = 4 * RESUME_BOUND


def resume_bound(c) -> float:
    return REFERENCE_RESUME_BOUND if c.kind == "etcd" else RESUME_BOUND


def resumed(c, since: float, rep: Report, what: str, members=None) -> float:
    bound = resume_bound(c)
    took = c.wait_writable(since, timeout=max(30.0, bound * 3), members=members)
    rep(f"{what}: writes resumed after {took:.2f} s")
    assert took <= bound, (
        f"{what}: first write acknowledged {took:.2f} s after the fault "
        f"(bound {bound:.1f} s)\n{rep.text()}\n{c.timeline(rep.t0)}")
    return took


def final_checks(c, wl: Workload, rep: Report, tmp_path, min_acked: int = 50) -> None:
    wl.stop()
    rep(f"workload: {wl.summary()}")
    context = f"\n{rep.text()}\ntimeline:\n{c.timeline(rep.t0)}"
    wl.dump(tmp_path / "history.jsonl")
    c.wait_healthy()
    hashes = c.wait_converged()
    rep(f"converged: HashKV {sorted({h['hash'] for h in hashes.values()})} at revision "
        f"{next(iter(hashes.values()))['revision']} on {sorted(hashes)}")
    for m in c.live:
        stored = m.range_prefix(wl.prefix + "ack/")
        problems = wl.check_acked(stored)
        assert not problems, (f"{m.name}: {len(problems)} problems with acknowledged writes:\n"
                              + "\n".join(problems[:20]) + context)
    rep(f"all {len(wl.acked)} acknowledged unique writes on every member "
        f"({len(wl.maybe)} unknown outcomes)")
    res = lincheck.check(wl.history, budget=60)
    rep(f"lincheck: {res.explain() if res.ok else 'FAILED'} ({res.seconds:.2f} s)")
    assert res.ok is True, (f"history not linearizable (full history: "
                            f"{tmp_path / 'history.jsonl'}):\n{res.explain()}{context}")
    assert wl.acked_writes() >= min_acked, f"too little progress: {wl.summary()}{context}"


# --------------------------------------------------------------------------
# a) SIGKILL the leader, restart it later
# --------------------------------------------------------------------------

def test_kill_leader(make_cluster, workload_for, tmp_path):
    rep = Report("kill-leader")
    c = make_cluster()
    wl = workload_for(c, seed=1).start()
    time.sleep(2)
    for _ in range(2):
        leader = c.leader()
        t = time.monotonic()
        c.kill(leader)
        rep(f"SIGKILL leader {leader.name}")
        resumed(c, t, rep, f"leader {leader.name} killed")
        time.sleep(2)
        c.restart(leader)
        rep(f"{leader.name} restarted and ready")
        time.sleep(1.5)
    gap = wl.max_ack_gap(rep.t0 + 2, time.monotonic())
    rep(f"longest stretch without an acknowledged workload write: {gap:.2f} s")
    assert gap <= resume_bound(c) + 2 * CLIENT_TIMEOUT, rep.text()
    final_checks(c, wl, rep, tmp_path)


# --------------------------------------------------------------------------
# b) partition the leader from the majority, heal
# --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [3, 5])
def test_partition_leader(make_cluster, workload_for, tmp_path, size):
    """3 members: the leader alone; 5 members: the leader and one follower
    (a minority of two) are cut off from the other members."""
    rep = Report(f"partition-leader-{size}")
    c = make_cluster(size)
    wl = workload_for(c, seed=2).start()
    time.sleep(2)
    old = c.leader()
    minority = [old] + [m for m in c.live if m is not old][:(size - 1) // 2 - 1]
    majority = [m for m in c.live if m not in minority]
    t_part = time.monotonic()
    try:
        c.partition(minority)
    except PartitionUnsupported as e:
        wl.stop()
        pytest.skip(str(e))
    t_cut = time.monotonic()     # every route is in place from here on
    rep(f"partitioned {[m.name for m in minority]} (leader {old.name}) from "
        f"{[m.name for m in majority]}")
    resumed(c, t_part, rep, "leader isolated", members=majority)
    new = c.wait_healthy(members=majority)
    assert new in majority
    rep(f"new leader {new.name} in the majority")
    # Self-test of the harness: the cut is real, and lincheck catches the
    # stale read a serializable (local) read on the isolated member gives.
    probe = [lincheck.Op("self-test", lincheck.PUT, "/selftest", value="fresh",
                         invoke=time.monotonic(), complete=None)]
    c.wait_writable(probe[0].invoke, key="/selftest", value="fresh", members=majority)
    probe[0].complete = time.monotonic()
    t = time.monotonic()
    local = old.range_prefix("/selftest", serializable=True).get("/selftest")
    probe.append(lincheck.Op("self-test", lincheck.GET, "/selftest", result=local, invoke=t,
                             complete=time.monotonic()))
    assert local != "fresh", "the isolated member saw a write made after the cut"
    assert lincheck.check(probe).ok is False
    rep(f"self-test: isolated {old.name} serves the stale {local!r} locally; lincheck flags it")
    time.sleep(3)
    t_heal = time.monotonic()
    c.heal()
    rep("healed")
    c.wait_healthy()
    rep(f"cluster healthy again, leader {c.leader().name}")
    time.sleep(1.5)
    wl.stop()
    # The minority cannot commit anything: no write sent through one of its
    # members once the partition is in place (and answered before the heal)
    # may be acknowledged.
    cut_off = {m.client_url for m in minority}
    through_old = [o for o in wl.history
                   if o.where in cut_off and o.kind != lincheck.GET
                   and o.invoke >= t_cut and o.complete is not None and o.complete < t_heal]
    acked = [o for o in through_old if o.kind == lincheck.PUT or o.result is True]
    rep(f"writes through the minority during the partition: {len(through_old)} "
        f"answered, {len(acked)} acknowledged")
    assert not acked, ("the minority acknowledged writes:\n"
                       + "\n".join(o.describe() for o in acked[:10]))
    final_checks(c, wl, rep, tmp_path)


# --------------------------------------------------------------------------
# c) restart every member: one by one, then all at once
# --------------------------------------------------------------------------

def test_restart_members(make_cluster, workload_for, tmp_path):
    rep = Report("restart-members")
    c = make_cluster()
    wl = workload_for(c, seed=3).start()
    time.sleep(1.5)
    for m in list(c.current):
        c.restart(m, sig=signal.SIGTERM)
        rep(f"{m.name} SIGTERM + restart, ready")
        time.sleep(1)
    c.wait_healthy()
    t = time.monotonic()
    c.restart_all(sig=signal.SIGKILL)
    rep("all members SIGKILLed and restarted; healthy")
    resumed(c, t, rep, "full restart")
    time.sleep(2)
    final_checks(c, wl, rep, tmp_path)


# --------------------------------------------------------------------------
# d) add a learner, promote it, remove another member (the leader)
# --------------------------------------------------------------------------

def test_membership_change(make_cluster, workload_for, tmp_path):
    rep = Report("membership")
    c = make_cluster()
    wl = workload_for(c, seed=4).start()
    time.sleep(1.5)
    m4 = c.add_member(learner=True)
    rep(f"learner {m4.name} added and started")
    took = c.promote(m4)
    rep(f"{m4.name} promoted ({took:.2f} s of retries while it caught up)")
    assert {x["name"] for x in c.member_list() if not x.get("isLearner")} == \
        {m.name for m in c.current}
    time.sleep(1.5)
    victim = c.leader()
    t = time.monotonic()
    c.remove(victim, exit_timeout=0)
    rep(f"removed leader {victim.name}")
    resumed(c, t, rep, "leader removed")
    exited = c.reap(victim)
    # etcd shuts a removed member down by itself; reported, not asserted
    rep(f"{victim.name} {'exited by itself' if exited else 'had to be killed'} "
        f"(rc {victim.proc.returncode})")
    names = {x["name"] for x in c.member_list()}
    assert names == {m.name for m in c.current}, names
    time.sleep(2)
    final_checks(c, wl, rep, tmp_path)
    assert len(c.live) == 3 and m4 in c.live


# --------------------------------------------------------------------------
# e) a follower falls behind past log compaction and catches up
# --------------------------------------------------------------------------

# etcd keeps 5,000 entries behind its latest snapshot for slow followers
# (snapshotCatchUpEntries), so a follower needs to miss more than
# snapshot-count + 5,000 entries to need a snapshot.
BEHIND_WRITES = 6000


def test_follower_catches_up_after_compaction(make_cluster, workload_for, tmp_path):
    rep = Report("catch-up")
    c = make_cluster(snapshot_count=100)
    wl = workload_for(c, seed=5, clients=3).start()
    time.sleep(1)
    lagger = c.followers()[0]
    c.terminate(lagger)
    rep(f"follower {lagger.name} stopped (SIGTERM)")
    others = [m for m in c.current if m is not lagger]
    written = bulk_put([m.client_url for m in others], BEHIND_WRITES, "/bulk/")
    rep(f"{len(written)} puts while {lagger.name} was down")
    t = time.monotonic()
    c.restart(lagger)
    rep(f"{lagger.name} restarted")
    time.sleep(1)
    final_checks(c, wl, rep, tmp_path, min_acked=20)
    rep(f"{lagger.name} caught up {time.monotonic() - t:.2f} s after its restart")
    stored = lagger.range_prefix("/bulk/")
    assert stored == written, f"{lagger.name} holds {len(stored)} of {len(written)} bulk keys"
    if c.kind == "etcd":
        # Proves the scenario exercises the snapshot path on the reference.
        log = lagger.read_log("stderr", 10**7)
        assert "applied incoming snapshot" in log or "applying snapshot" in log, \
            "etcd did not catch up by snapshot: the scenario no longer covers it"


# --------------------------------------------------------------------------
# f) etcdctl with three endpoints behaves like a single node
# --------------------------------------------------------------------------

KV_SCRIPT = [
    ("put", "k1", "v1"),
    ("put", "k2", "v2", "-w", "json"),
    ("get", "k1"),
    ("get", "k", "--prefix", "-w", "json"),
    ("put", "k1", "v1b", "--prev-kv"),
    ("get", "k1", "--rev=2"),
    ("txn", "--interactive=false"),
    ("get", "k", "--prefix", "--keys-only"),
    ("del", "k2", "--prev-kv"),
    ("del", "k", "--prefix", "-w", "json"),
    ("get", "", "--from-key", "-w", "json"),
    ("compaction", "3"),
    ("get", "k1", "--rev=2"),           # compacted: an error, the same one
    ("get", "k1", "--rev=3", "-w", "json"),
]
EXPECT_RC = {len(KV_SCRIPT) - 2: 1}     # index in KV_SCRIPT -> exit code
TXN_STDIN = 'value("k1") = "v1b"\n\nput k3 v3\nget k1\n\nput k4 v4\n\n'


def test_etcdctl_multi_endpoint(make_cluster, server_factory, target, etcdctl_bin):
    kind, binary = target
    single = server_factory(kind, binary)
    start_servers([single])
    c = make_cluster()
    eps = ",".join(c.client_urls())
    one = Etcdctl(etcdctl_bin, single.client_url)
    many = Etcdctl(etcdctl_bin, eps)
    diffs = []
    for i, args in enumerate(KV_SCRIPT):
        stdin = TXN_STDIN if args[0] == "txn" else None
        a = one.run(*args, stdin=stdin)
        b = many.run(*args, stdin=stdin)
        na = normalise_text(a.stdout + "\n" + a.stderr, single.client_addr)
        nb = b.stdout + "\n" + b.stderr
        for m in c.members:
            nb = normalise_text(nb, f"{m.host}:{m.client_port}")
        if (a.rc, na) != (b.rc, nb):
            diffs.append(f"etcdctl {' '.join(args)}\n  single rc={a.rc}: {na!r}\n"
                         f"  cluster rc={b.rc}: {nb!r}")
        want = EXPECT_RC.get(i, 0)
        assert a.rc == want, f"scenario bug: {args} gave rc {a.rc} on a single node: {a.stderr}"
    assert not diffs, "\n".join(diffs)


# --------------------------------------------------------------------------
# g) etcdctl move-leader under load: leadership moves, nothing is lost
# --------------------------------------------------------------------------

def test_move_leader(make_cluster, workload_for, tmp_path, etcdctl_bin):
    rep = Report("move-leader")
    c = make_cluster()
    wl = workload_for(c, seed=7).start()
    time.sleep(1.5)
    ctl = Etcdctl(etcdctl_bin, ",".join(c.client_urls()))
    # etcd's refusal of a transferee that is not a member, word for word.
    bad = ctl.run("move-leader", "deadbeef")
    assert bad.rc != 0 and "etcdserver: bad leader transferee" in bad.stderr, bad.describe()
    for round_ in range(2):
        leader = c.leader()
        target = next(m for m in c.live if m is not leader)
        t = time.monotonic()
        r = ctl.run("move-leader", f"{target.id:x}")
        took = time.monotonic() - t
        assert r.rc == 0, r.describe()
        assert f"Leadership transferred from {leader.id:x} to {target.id:x}" in r.stdout, r.describe()
        rep(f"move-leader {leader.name} -> {target.name}: {took:.2f} s")
        new = c.leader()
        assert new is target, f"leader is {new.name}, wanted {target.name}\n{rep.text()}"
        time.sleep(1)
    gap = wl.max_ack_gap(rep.t0 + 1.5, time.monotonic())
    rep(f"longest stretch without an acknowledged workload write: {gap:.2f} s")
    assert gap <= resume_bound(c), rep.text()
    final_checks(c, wl, rep, tmp_path)
