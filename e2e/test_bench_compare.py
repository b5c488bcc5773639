"""`bench/compare --quick` against a real etcd and MetaStore, so that the comparison script and
the load tool it drives cannot rot: every workload must come back with a positive figure for
both servers, single member and 3 members (tiny totals, one repeat; the figures themselves are
not judged here, `docs/PERFORMANCE.md` holds the real comparison).

`bench/tests/smoke.rs` checks each `metastore-bench` workload's report in detail (counts,
histograms, flags); this only checks that the script runs them all, end to end, on both.

Environment: METASTORE_BIN, ETCD_BIN as for every e2e test; METASTORE_BENCH_BIN for the load
tool (else `metastore-bench` beside the MetaStore binary).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPARE = ROOT / "bench" / "compare"

# The workloads of the comparison, and the metastore-bench workload each runs.
CASES = {
    "put-1c": "put", "put-16c": "put", "put-256c": "put",
    "range-l-16c": "range", "range-l-256c": "range", "range-s-16c": "range",
    "range-s-256c": "range", "range-1000": "range", "txn-put": "txn-put",
    "txn-mixed": "txn-mixed", "watch-create": "watch", "watch-events": "watch-latency",
    "watch-latency": "watch-latency", "lease-keepalive": "lease-keepalive", "put-rate": "put",
}
ONE_M = ["load-1m", "rss-1m", "start-1m", "disk-1m"]
TOOL_WORKLOADS = {"put", "range", "txn-put", "txn-mixed", "watch", "watch-latency",
                  "lease-keepalive"}


def compare(tmp_path: Path, etcd_bin: str, metastore_bin: str, bench_bin: str,
            *args: str, timeout: float = 170) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "compare.json"
    cmd = [sys.executable, str(COMPARE), "--etcd-bin", etcd_bin, "--metastore-bin",
           metastore_bin, "--bench-bin", bench_bin, "--workdir", str(tmp_path / "work"),
           "--json", str(out), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr[-6000:]}"
    return r, json.loads(out.read_text())


def check(r: subprocess.CompletedProcess, doc: dict, expected: list[str]) -> None:
    rows = {row["name"]: row for row in doc["results"]}
    assert sorted(rows) == sorted(expected), r.stdout
    for name, row in rows.items():
        assert not row["failures"], f"{name}: {row['failures']}"
        for side in ("etcd_median", "metastore_median", "median_ratio"):
            assert isinstance(row[side], (int, float)) and row[side] > 0, f"{name}: {row}"
        assert row["met"] in ("yes", "no", "–"), row["met"]
        # The table on stdout has the row, with its target column.
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith(f"| {name}:")), None)
        assert line is not None, f"{name} missing from the table:\n{r.stdout}"
        assert line.count("|") == 8, line
    # Every workload of the tool ran against both servers.
    for server in ("etcd", "metastore"):
        ran = {rep["report"]["workload"] for row in rows.values() for rep in row["reports"]
               if rep["server"] == server and row["name"] in CASES}
        assert ran == TOOL_WORKLOADS, f"{server}: ran {sorted(ran)}"
    for name, row in rows.items():
        if name in CASES:
            assert all(rep["report"]["workload"] == CASES[name] for rep in row["reports"])


def test_quick_single_member(tmp_path, etcd_bin, metastore_bin, bench_bin):
    r, doc = compare(tmp_path, etcd_bin, metastore_bin, bench_bin, "--quick")
    check(r, doc, [*CASES, *ONE_M])
    assert doc["members"] == 1 and doc["quick"] and doc["repeats"] == 1
    assert "load average before" in r.stdout


def test_quick_three_members(tmp_path, etcd_bin, metastore_bin, bench_bin):
    r, doc = compare(tmp_path, etcd_bin, metastore_bin, bench_bin, "--quick", "--members", "3")
    check(r, doc, list(CASES))
    assert r.stdout.startswith("3-member")
    # In a 3-member run only put-256c has a target (the 3-member one).
    targets = {row["name"]: row["target"] for row in doc["results"]}
    assert targets.pop("put-256c") == "≥2×"
    assert set(targets.values()) == {None}


def test_bad_workload_name_is_refused():
    r = subprocess.run([sys.executable, str(COMPARE), "--workloads", "put-1c,nope"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "nope" in r.stderr, r.stderr


AB = ROOT / "bench" / "ab"


def ab(bench_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(AB), *args], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "BENCH": bench_bin})


def test_ab_runs_two_builds_round_by_round(metastore_bin, bench_bin):
    r = ab(bench_bin, metastore_bin, metastore_bin, "2", "put-1c", "txn-put")
    assert r.returncode == 0, r.stderr[-4000:]
    for name, unit in (("put-1c", "ms"), ("txn-put", "txn-put/s")):
        rounds = [ln for ln in r.stdout.splitlines() if ln.startswith(f"  {name} round")]
        assert len(rounds) == 2, r.stdout
        summary = next(ln for ln in r.stdout.splitlines() if ln.startswith(f"{name} ({unit})"))
        m = re.search(r"A ([\d.,]+) B ([\d.,]+) B/A ([\d.]+), B won (\d) of 2; server CPU "
                      r"per request A ([\d.]+) µs, B ([\d.]+) µs", summary)
        assert m, summary
        a, b, ratio = (float(m.group(i).replace(",", "")) for i in (1, 2, 3))
        assert a > 0 and b > 0 and abs(ratio - b / a) < 0.01 * ratio + 0.001, summary
        assert float(m.group(5)) > 0 and float(m.group(6)) > 0, summary


def test_ab_passes_settings_to_its_server_and_refuses_unknown_workloads(metastore_bin,
                                                                        bench_bin):
    # The setting reaches B's server: a value it refuses stops the run before any round.
    r = ab(bench_bin, metastore_bin, f"METASTORE_SNAPSHOT_COUNT=lots@{metastore_bin}", "1",
           "put-1c")
    assert r.returncode != 0 and "round" not in r.stdout, r.stdout
    assert "snapshot" in (r.stdout + r.stderr).lower(), r.stderr[-3000:]
    r = ab(bench_bin, metastore_bin, metastore_bin, "1", "put-1c", "nope")
    assert r.returncode == 2 and "nope" in r.stderr, r.stderr


INSTRUCTIONS = ROOT / "bench" / "instructions"


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_instructions_counts_a_servers_work_per_request(metastore_bin, bench_bin):
    r = subprocess.run([str(INSTRUCTIONS), "-b", metastore_bin, "-t", bench_bin, "-n", "200",
                        "-c", "8", "-k", "2", "--", "--key-space-size", "100", "put"],
                       capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr[-4000:]
    m = re.search(r"^([\d,]+) instructions per request, ([\d.]+) allocations per request "
                  r"\(200 requests, ([\d,]+) instructions\)$", r.stdout, re.M)
    assert m, r.stdout
    per, allocs, total = int(m.group(1).replace(",", "")), float(m.group(2)), int(
        m.group(3).replace(",", ""))
    # A put is tens of thousands of instructions and tens of allocations; the total is the
    # per-request figure times the requests.
    assert 10_000 < per < 10_000_000 and 1 < allocs < 10_000, r.stdout
    assert abs(total / 200 - per) <= 1, r.stdout
    assert "put: 200 operations, 0 errors" in r.stdout, r.stdout
    profile = re.search(r"^profile: (\S+)", r.stdout, re.M)
    assert profile and Path(profile.group(1)).stat().st_size > 0, r.stdout


def test_instructions_refuses_a_call_without_a_workload():
    r = subprocess.run([str(INSTRUCTIONS), "-n", "10"], capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "WORKLOAD" in r.stdout, (r.stdout, r.stderr)
