"""`metastore-bench kube`: kube-apiserver's traffic profile on a 3-member cluster, with the
leader SIGKILLed in the middle and restarted, checked on the fly by the tool (see
`bench/src/workload/kube/`): every watch sees every change exactly once and in order (across
its re-watches), a list at revision R equals the watchers' state at R, a watch from a
compacted revision is refused as compacted, a progress notification at R comes after every
event up to R.

The same run goes against MetaStore and against Debian's etcd 3.4 (the reference: the checker
must hold there too). The tool's exit status and JSON report are asserted on: verdict `ok`,
every planned object created, and every kind of check actually exercised (events, lists,
compactions, compacted refusals followed by re-lists, re-watches after the kill).

Scale: 100 watchers over 10 types; `KUBE_OBJECTS` objects on MetaStore (default 100,000),
`KUBE_ETCD_OBJECTS` on etcd (default 30,000, to keep the CI run near 3 minutes; otherwise the
same flags). `E2E_KUBE_TARGETS=metastore` (or `etcd`) runs one side only. Each run's full JSON
report is kept as `<tmp_path>/report.json`, and copied to `$KUBE_REPORT_DIR/<kind>.json` when
that is set (docs/PERFORMANCE.md's figures come from there).

`test_checker_catches_a_dropped_event` runs the tool with `--self-test-drop-event` on a single
etcd: the run must exit non-zero, naming the invariant.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import start_servers

# etcd is the reference run of the tool itself, opt-in (E2E_KUBE_TARGETS=metastore,etcd): on
# 2026-12-03 the tool twice did not finish against Debian's etcd 3.4.23 after the leader kill
# (every watcher silent after the writes ended, the tool still running at 400 s), once passing
# in between. Since then a watch stream is opened with a progress request (etcd sends a stream's
# headers only with its first message, so a stream of parked watchers got no answer and never
# reached the loop that unparks them) and a deadline that also heeds the stop. The hang did not
# come back in 15 runs on a faster machine, but it did not show there with the old tool either,
# so the cause is not confirmed; until it is, this run is by hand, not in CI.
TARGETS = [t for t in os.environ.get("E2E_KUBE_TARGETS", "metastore").split(",") if t]
OBJECTS = {"metastore": int(os.environ.get("KUBE_OBJECTS", "100000")),
           "etcd": int(os.environ.get("KUBE_ETCD_OBJECTS", "60000"))}
TYPES = 10
WATCHERS = 100
# etcd's and MetaStore's per-watcher progress notifications (default every 10 minutes).
SERVER_ARGS = ["--experimental-watch-progress-notify-interval", "1s"]
# A watch times out after 4-8 s and every third time-out re-watches from a stale revision, so
# the first refusals as compacted come within about 15 s (compactions every 4 s, each to the
# revision of the round before), well inside a run of 20 s on a fast machine (with an 8 s
# time-out, a 21 s run once ended before any stale re-watch was refused). A round whose txn
# meets the leader kill is skipped until the next tick, as kube-apiserver's compactor does:
# at 5 s, an 18 s run once ended with one compaction (first round at 5 s never compacts, the
# round at 10 s met the kill); at 4 s, rounds at 8, 12 and 16 s leave two even then.
KUBE_FLAGS = [
    "--types", str(TYPES), "--watchers", str(WATCHERS), "--watchers-per-stream", "10",
    "--updates-per-object", "0.2", "--delete-fraction", "0.05",
    "--compact-interval", "4", "--watch-timeout", "4", "--stale-every", "3",
    "--list-interval-ms", "300", "--page-size", "1000", "--drain-timeout", "60",
]
COMMON_FLAGS = ["--clients", "64", "--val-size", "128"]
TIMEOUT = 400


class Run:
    """The tool in the background; its stderr progress lines parsed as they come."""

    PROGRESS = re.compile(r"created (\d+)/(\d+)")

    def __init__(self, argv: list[str]):
        self.argv = argv
        self.lines: list[str] = []
        self.created = 0
        self.planned = 1
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        self.out = ""
        self._t_out = threading.Thread(target=self._read_out, daemon=True)
        self._t_err = threading.Thread(target=self._read_err, daemon=True)
        self._t_out.start()
        self._t_err.start()

    def _read_out(self) -> None:
        self.out = self.proc.stdout.read()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())
            m = self.PROGRESS.search(line)
            if m:
                self.created, self.planned = int(m.group(1)), int(m.group(2))

    def wait_created(self, fraction: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.created < fraction * self.planned:
            if self.proc.poll() is not None:
                raise AssertionError(f"the tool exited early ({self.proc.returncode}):\n"
                                     + self.stderr_tail())
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.created}/{self.planned} created after {timeout} s\n"
                                     + self.stderr_tail())
            time.sleep(0.2)

    def finish(self, timeout: float) -> tuple[int, dict]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the tool did not finish in {timeout} s\n" + self.stderr_tail())
        self._t_out.join(10)
        self._t_err.join(10)
        try:
            return rc, json.loads(self.out)
        except json.JSONDecodeError:
            raise AssertionError(f"no JSON report (exit {rc}):\n{self.out[-2000:]}\n"
                                 + self.stderr_tail()) from None

    def stderr_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


def kube_argv(bench_bin: str, endpoints: list[str], objects: int) -> list[str]:
    return [bench_bin, "--endpoints", ",".join(endpoints), "--json", *COMMON_FLAGS,
            "kube", "--objects", str(objects), *KUBE_FLAGS]


# MetaStore once missed the event at a new watch's start revision (a watch from current+1 whose
# Created response was in flight while that revision was published); fixed in the watch hub,
# with deterministic regression tests in server/src/watch/hub/tests.rs. No xfail: a miss fails.
@pytest.fixture(params=TARGETS)
def target(request) -> tuple[str, str]:
    kind = request.param
    return kind, request.getfixturevalue(f"{kind}_bin")


def test_kube_profile_with_a_leader_kill(cluster_factory, target, bench_bin, tmp_path):
    kind, binary = target
    objects = OBJECTS[kind]
    c = cluster_factory(kind, binary, 3, extra_args=SERVER_ARGS)
    t0 = time.monotonic()
    run = Run(kube_argv(bench_bin, c.client_urls(), objects))
    run.wait_created(0.5, timeout=TIMEOUT)
    leader = c.leader()
    c.kill(leader)
    killed_at = run.created
    time.sleep(2)
    c.restart(leader)
    rc, rep = run.finish(TIMEOUT)
    took = time.monotonic() - t0
    (tmp_path / "report.json").write_text(json.dumps(rep, indent=1))
    if os.environ.get("KUBE_REPORT_DIR"):
        out = Path(os.environ["KUBE_REPORT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{kind}.json").write_text(json.dumps(rep, indent=1))
    summary = (f"{kind}: exit {rc} in {took:.0f} s, leader {leader.name} killed at "
               f"{killed_at}/{run.planned} created\n"
               + json.dumps({k: rep.get(k) for k in ("verdict", "broken", "violations", "objects",
                                                     "checks", "errors", "error_messages",
                                                     "server_version")}, indent=1)
               + "\n" + run.stderr_tail(10))
    print(summary)
    assert rc == 0 and rep["verdict"] == "ok" and rep["violation_count"] == 0, summary
    o, ch = rep["objects"], rep["checks"]
    # Every planned write was done (writes with an unknown outcome were resolved and retried).
    assert o["created"] == objects, summary
    assert o["updated"] == round(objects * 0.2) and o["deleted"] == round(objects * 0.05), summary
    assert o["live"] == objects - o["deleted"] + TYPES, summary
    # Each acknowledged write reached the 10 watchers of its type, but in the gaps of the
    # watchers that waited for a compaction to pass them and listed again.
    assert ch["watchers"] == WATCHERS
    assert ch["events_checked"] >= ch["acked_writes"] * (WATCHERS // TYPES) * 0.5, summary
    assert ch["acked_writes"] >= objects, summary
    # Every kind of check ran.
    assert ch["lists_checked"] >= 50 and ch["lists_taken"] >= 20, summary
    assert ch["compactions"] >= 2 and ch["compacted_probes"] == ch["compactions"], summary
    assert ch["compacted_refusals"] >= 1, summary
    assert 0 < ch["relists"] <= ch["compacted_refusals"] + ch["no_prev_kv"], summary
    # Every update and delete carries prev_kv on MetaStore (COMPAT.md). etcd 3.4 leaves it out
    # when the previous revision was compacted while a watcher replayed history; the watcher
    # then lists again, as kube-apiserver does ("etcd event received with PrevKv=nil").
    if kind == "metastore":
        assert ch["no_prev_kv"] == 0, summary
    assert ch["rewatches"] >= 1, summary
    # etcd sends a progress notification only to a watcher that got no event for a whole
    # interval, which a busy run may never leave; MetaStore's notifications are checked.
    if kind == "metastore":
        assert ch["progress_notifications"] > 0, summary
    # The killed member's streams broke and were re-established elsewhere.
    assert ch["stream_restarts"] >= 1, summary
    # kube-apiserver relies on progress-request answers from etcd 3.4.31 / 3.5.13 on only:
    # MetaStore reports 3.5.x and is checked; Debian's 3.4.23 is not.
    assert ch["progress_requests_checked"] == (kind == "metastore"), summary
    assert ch["progress_answers"] > 0, summary
    for op in ("create", "update", "delete", "list", "keys-only", "count", "initial-list",
               "relist", "compact", "compact-txn", "compacted-watch", "status", "health",
               "progress-request"):
        assert rep["ops"].get(op, {}).get("count", 0) > 0, f"no {op}: {summary}"


def test_checker_catches_a_dropped_event(server_factory, etcd_bin, bench_bin):
    """End to end, the tool's verdict is not a rubber stamp: drop one event on watcher 0
    and the run must fail, naming the invariant."""
    s = server_factory("etcd", etcd_bin)
    start_servers([s])
    argv = [bench_bin, "--endpoints", s.client_url, "--json", "--clients", "8", "kube",
            "--objects", "2000", "--types", "2", "--watchers", "4", "--compact-interval", "0",
            "--self-test-drop-event", "500"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode != 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["verdict"] == "broken", rep
    # The missed event (and, when a list was compared after it, the list that no longer
    # matches the watcher's state).
    assert rep["broken"][0] == "watch-exactly-once-in-order", rep["violations"]
    assert set(rep["broken"]) <= {"watch-exactly-once-in-order",
                                  "list-equals-state-at-revision"}, rep["violations"]
    assert "invariant broken: watch-exactly-once-in-order" in r.stderr, r.stderr[-3000:]
    assert any("watcher 0" in v["detail"] for v in rep["violations"]), rep["violations"]
