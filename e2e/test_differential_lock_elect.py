"""Differential tests of etcdctl 3.4's concurrency commands (`lock`, `elect`)
and of `endpoint status / hashkv / health`: the same commands against a fresh
real etcd 3.4 and a fresh MetaStore (or, with DIFF_TARGET=etcd, a second real
etcd), outputs compared after normalisation (see harness.py and README.md).

`lock` / `elect` run in the background (`DiffRunner.start` / `stop`). Their
keys are `<name>/<session lease id in hex>`: the lease id is chosen by each
server, so `SessionIds` names it `<LEASEn>` in order of first appearance, per
side, exactly like the lease tests do (and `<LEASEn>` in an argument becomes
each side's own id). Every wait is a wait-for-condition: a contender is known
to be queued once its own key exists (polled with `get --prefix`), and only
then is it checked to have printed nothing (it is blocked) and the holder
released.

Endpoint outputs: what legitimately differs between two single-node clusters
is masked (`EndpointMasks`): version (3.4.23 vs MetaStore's 3.5.x, on purpose),
db sizes, raft term / index / applied index, the leader id (checked separately
to be the member's own id), member id, hashes (checked separately for
stability), `took`. Tables are compared cell by cell after masking (column
widths follow the masked values). Everything else, including the endpoint as
given (with or without `http://`), header revisions, `compact_revision`, error
messages and exit codes, is compared.
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from harness import DiffRunner, Etcdctl, LeaseIds



E_COMPACTED = "etcdserver: mvcc: required revision has been compacted"
E_FUTURE = "etcdserver: mvcc: required revision is a future revision"


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

class SessionIds(LeaseIds):
    """LeaseIds that also names the lease id inside lock / election keys
    (`<name>/<hex>`, for the given names only)."""

    def __init__(self, names) -> None:
        super().__init__()
        self._key = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")/([0-9a-f]{1,16})\b")

    def normalise(self, text: str) -> str:
        text = self._key.sub(lambda m: f"{m.group(1)}/{self._name(int(m.group(2), 16))}", text)
        return super().normalise(text)


def use_session_ids(d: DiffRunner, *names: str) -> None:
    d.ref_ids, d.tgt_ids = SessionIds(names), SessionIds(names)


def key_count(ctl: Etcdctl, prefix: str) -> int:
    out = ctl.run("get", prefix, "--prefix", "--keys-only").stdout
    return sum(1 for line in out.splitlines() if line)


def wait_keys(d: DiffRunner, prefix: str, n: int, timeout: float = 10.0) -> None:
    """Wait (no comparison) until both servers hold exactly n keys under prefix."""
    for side, ctl in (("etcd", d.ref), (d.tgt_name, d.tgt)):
        deadline = time.monotonic() + timeout
        while key_count(ctl, prefix) != n:
            assert time.monotonic() < deadline, f"{side}: never {n} keys under {prefix!r}"
            time.sleep(0.02)


def printed_key(out: str) -> bool:
    return "/" in out


def wait_printed(procs, timeout: float = 10.0) -> None:
    for p in procs:
        p.wait_until(printed_key, timeout)


def assert_silent(procs, what: str) -> None:
    """Both sides' background command printed nothing yet (it is blocked)."""
    for name, p in zip(("etcd", "target"), procs):
        out = p.stdout()
        assert out == "" and p.proc.poll() is None, \
            f"{name}: {what} should still be blocked, printed {out!r} (rc {p.proc.poll()})"


def check_remaining(d: DiffRunner) -> None:
    ref, tgt = d.ref_ids.remaining, d.tgt_ids.remaining
    assert len(ref) == len(tgt), f"remaining TTL counts differ: etcd {ref} vs target {tgt}"
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(ref, tgt)) if abs(a - b) > 1]
    assert not bad, f"remaining TTLs differ by more than 1 s (index, etcd, target): {bad}"


def stop_all(*procs) -> None:
    for pair in procs:
        for p in pair:
            p.stop(signal.SIGKILL)


# ---------------------------------------------------------------------------
# lock
# ---------------------------------------------------------------------------

def test_lock_blocks_until_holder_exits(diff: DiffRunner):
    d, r = diff, diff.run
    use_session_ids(d, "lk")
    a = d.start("lock", "lk")
    b = None
    try:
        wait_printed(a)
        r("get", "lk", "--prefix", label="get lock key (holder)")
        r("lease", "timetolive", "<LEASE1>", expect_out="granted with TTL(10s)")
        b = d.start("lock", "lk")
        wait_keys(d, "lk", 2)                       # the contender queued its key
        r("get", "lk", "--prefix", "--sort-by=CREATE", "--order=ASCEND", "--keys-only",
          label="get lock keys (holder, contender)")
        assert_silent(b, "second `lock lk`")
        d.stop(a, until=printed_key, label="holder (SIGINT)", expect_rc=0)
        d.stop(b, until=printed_key, label="contender acquires", expect_rc=0)
        r("get", "lk", "--prefix", "--keys-only", label="lock keys after both exited")
    finally:
        stop_all(a, *([b] if b else []))
    check_remaining(d)
    d.check()


def test_lock_exec(diff: DiffRunner, tmp_path: Path):
    d, r = diff, diff.run
    use_session_ids(d, "lx", "lw")
    r("lock", "lx", "echo", "hi", expect_rc=0, expect_out="hi")
    r("lock", "lx", "--", "sh", "-c", 'echo "$ETCD_LOCK_KEY rev=$ETCD_LOCK_REV"; exit 3',
      expect_rc=1, expect_err="exit status 3")
    r("get", "lx", "--prefix", expect_out="")                  # unlocked after the command
    r("lock", "lx", "no-such-command-xyz", expect_rc=1, expect_err="executable file not found")
    r("lock", expect_rc=128, expect_err="lock takes a lock name argument")
    r("lock", "--ttl=5", "lx", "--", "sh", "-c", 'echo "ttl $ETCD_LOCK_KEY"', expect_rc=0)

    # An exec-form holder releases when its command exits (a sentinel file, no sleep).
    gate = tmp_path / "release"
    a = d.start("lock", "lw", "--", "sh", "-c",
                f'echo "A $ETCD_LOCK_KEY"; while [ ! -e {gate} ]; do sleep 0.02; done; echo A done')
    b = None
    try:
        wait_printed(a)
        b = d.start("lock", "lw", "--", "sh", "-c", 'echo "B $ETCD_LOCK_KEY rev=$ETCD_LOCK_REV"')
        wait_keys(d, "lw", 2)
        r("get", "lw", "--prefix", "--sort-by=CREATE", "--order=ASCEND", "--keys-only")
        assert_silent(b, "second `lock lw -- ...`")
        gate.touch()
        d.stop(a, until=None, label="exec holder exits", expect_rc=0, expect_out="A done")
        d.stop(b, until=None, label="exec contender runs", expect_rc=0, expect_out="B lw/")
        r("get", "lw", "--prefix", "-w", "json", expect_out='"revision"')
    finally:
        stop_all(a, *([b] if b else []))
    d.check()


def test_lock_ttl_expiry(diff: DiffRunner):
    """`lock --ttl=2`: a holder killed with SIGKILL keeps the lock until its
    session lease expires; then the contender acquires."""
    d, r = diff, diff.run
    use_session_ids(d, "lt")
    a = d.start("lock", "--ttl=2", "lt")
    b = None
    try:
        wait_printed(a)
        r("get", "lt", "--prefix", label="get lock key (names its lease LEASE1)")
        r("lease", "timetolive", "<LEASE1>", "--keys", expect_out="granted with TTL(2s)")
        b = d.start("lock", "lt")
        wait_keys(d, "lt", 2)
        assert_silent(b, "`lock lt` behind a --ttl=2 holder")
        d.stop(a, until=printed_key, sig=signal.SIGKILL, label="holder SIGKILLed",
               expect_rc=-signal.SIGKILL)
        # The lease expires after about 2 s; the contender acquires then.
        d.stop(b, until=printed_key, timeout=8, label="contender acquires after expiry",
               expect_out="lt/")
        r("lease", "timetolive", "<LEASE1>", expect_out="already expired")
        r("get", "lt", "--prefix", "--keys-only")
    finally:
        stop_all(a, *([b] if b else []))
    check_remaining(d)
    d.check()


# ---------------------------------------------------------------------------
# elect
# ---------------------------------------------------------------------------

def _two_leaders(out: str) -> bool:
    return out.count("el/") >= 2


def test_elect(diff: DiffRunner):
    d, r = diff, diff.run
    use_session_ids(d, "el")
    procs = []
    try:
        early = d.start("elect", "-l", "el")          # observes an election with no leader yet
        procs.append(early)
        c1 = d.start("elect", "el", "p1")
        procs.append(c1)
        wait_printed(c1)
        wait_printed(early)
        r("get", "el", "--prefix", label="leader key", expect_out="p1")
        late = d.start("elect", "-l", "el")          # observes the current leader at once
        procs.append(late)
        wait_printed(late)
        c2 = d.start("elect", "el", "p2")
        procs.append(c2)
        wait_keys(d, "el", 2)
        r("get", "el", "--prefix", "--sort-by=CREATE", "--order=ASCEND",
          label="candidates (leader, waiting)")
        assert_silent(c2, "second candidate")
        d.stop(c1, until=printed_key, label="leader p1 resigns (SIGINT)", expect_out="p1")
        d.stop(c2, until=printed_key, label="candidate p2 elected", expect_out="p2")
        d.stop(early, until=_two_leaders, label="observer from before any leader",
               expect_out="p2")
        d.stop(late, until=_two_leaders, label="observer started under p1", expect_out="p2")
        r("get", "el", "--prefix", "--keys-only", label="no candidates left")
    finally:
        stop_all(*procs)

    r("elect", expect_rc=128, expect_err="elect takes one election name argument")
    r("elect", "el", expect_rc=128, expect_err="no proposal argument but -l not set")
    r("elect", "-l", "el", "p", expect_rc=128, expect_err="proposal given but -l is set")
    r("elect", "a", "b", "c", expect_rc=128)
    d.check()


# ---------------------------------------------------------------------------
# endpoint status / hashkv / health
# ---------------------------------------------------------------------------

_TABLE_MASKED = {"ID", "VERSION", "DB SIZE", "RAFT TERM", "RAFT INDEX", "RAFT APPLIED INDEX",
                 "HASH", "TOOK"}
_JSON_MASKED = re.compile(
    r'"(version|dbSize|dbSizeInUse|leader|raftIndex|raftTerm|raftAppliedIndex|hash|took)":'
    r'("[^"]*"|\d+)')
_FIELDS_MASKED = re.compile(
    r'^"(Version|DBSize|Leader|RaftIndex|RaftAppliedIndex|Hash)" : ("[^"]*"|\d+)$', re.M)
_TOOK = re.compile(r'(?m)took = \S+|^"Took" : \S+$')


class EndpointMasks:
    """Per-side normaliser (DiffRunner ids protocol: resolve / normalise) for
    endpoint status / hashkv / health outputs, see the module docstring."""

    def resolve(self, arg: str) -> str:
        return arg

    @staticmethod
    def _table(text: str) -> str:
        out, header = [], None
        for line in text.splitlines():
            if line.startswith("+"):
                out.append("+-+")
            elif line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if header is None:
                    header = cells
                else:
                    cells = [f"<{h}>" if h in _TABLE_MASKED else c for h, c in zip(header, cells)]
                out.append("| " + " | ".join(cells) + " |")
            else:
                out.append(line)
        return "\n".join(out) + ("\n" if text.endswith("\n") else "")

    @staticmethod
    def _simple(text: str) -> str:
        """`endpoint status` / `hashkv` simple output: `<endpoint>, a, b, ...`."""
        out = []
        for line in text.splitlines():
            f = line.split(", ")
            if len(f) == 10 and "<endpoint>" in f[0]:        # status
                for i in (1, 2, 3, 6, 7, 8):                 # id version dbsize term index applied
                    f[i] = "<masked>"
            elif len(f) == 2 and "<endpoint>" in f[0] and f[1].isdigit():   # hashkv
                f[1] = "<hash>"
            out.append(", ".join(f))
        return "\n".join(out) + ("\n" if text.endswith("\n") else "")

    def normalise(self, text: str) -> str:
        if text.lstrip().startswith("+"):
            return self._table(text)
        text = _JSON_MASKED.sub(lambda m: f'"{m.group(1)}":"<{m.group(1)}>"', text)
        text = _FIELDS_MASKED.sub(lambda m: f'"{m.group(1)}" : <{m.group(1)}>', text)
        text = _TOOK.sub(lambda m: '"Took" : <took>' if m.group(0).startswith('"')
                         else "took = <took>", text)
        return self._simple(text)


@pytest.fixture(params=["http", "bare"], ids=["http://host:port", "host:port"])
def ep_diff(request, diff: DiffRunner):
    """`diff` with endpoint normalisation, endpoints given as `http://127.0.0.1:P`
    (what the harness uses) or as etcdctl's default scheme-less `127.0.0.1:P`."""
    d = diff
    if request.param == "bare":
        d = DiffRunner(Etcdctl(diff.ref.binary, diff.ref_addr), diff.ref_addr,
                       Etcdctl(diff.tgt.binary, diff.tgt_addr), diff.tgt_addr,
                       ref_name=diff.ref_name, tgt_name=diff.tgt_name,
                       transcript=diff.transcript.with_name("transcript-bare.txt"),
                       servers=diff.servers)
    d.ref_ids, d.tgt_ids = EndpointMasks(), EndpointMasks()
    yield d
    if d is not diff:
        d.close()


def _raw_json(ctl: Etcdctl, *args: str):
    res = ctl.run(*args, "-w", "json")
    assert res.rc == 0, f"{args}: rc {res.rc}: {res.stderr}"
    return json.loads(res.stdout)


def _hash(ctl: Etcdctl, *args: str) -> int:
    return _raw_json(ctl, "endpoint", "hashkv", *args)[0]["HashKV"]["hash"]


def _sides(d: DiffRunner):
    return (("etcd", d.ref), (d.tgt_name, d.tgt))


def test_endpoint_status_health(ep_diff: DiffRunner):
    d, r = ep_diff, ep_diff.run
    r("put", "a", "1")
    r("put", "b", "2")
    r("endpoint", "status", "-w", "json", expect_out='"revision":3')
    r("endpoint", "status", "-w", "table", expect_out="IS LEADER")
    r("endpoint", "status", expect_out=", true, false, ")
    r("endpoint", "status", "-w", "fields", expect_out='"IsLearner" : false')
    r("endpoint", "status", "-w", "protobuf", expect_rc=4)
    r("endpoint", "health", expect_err="is healthy: successfully committed proposal")
    r("endpoint", "health", "-w", "json", expect_out='"health":true')
    r("endpoint", "health", "-w", "table", expect_out="HEALTH")
    r("endpoint", "health", "-w", "fields")
    d.check()

    # What is masked above, checked per side.
    problems = []
    for side, ctl in _sides(d):
        st = _raw_json(ctl, "endpoint", "status")
        s = st[0]["Status"]
        if s["leader"] != s["header"]["member_id"]:
            problems.append(f"{side}: leader {s['leader']} != member_id {s['header']['member_id']}")
        if not re.fullmatch(r"3\.\d+\.\d+", s["version"]):
            problems.append(f"{side}: version {s['version']!r}")
        if not 0 < s["raftAppliedIndex"] <= s["raftIndex"]:
            problems.append(f"{side}: raftAppliedIndex {s['raftAppliedIndex']} "
                            f"raftIndex {s['raftIndex']}")
        if s["raftTerm"] != s["header"]["raft_term"] or s["raftTerm"] < 1:
            problems.append(f"{side}: raftTerm {s['raftTerm']} header {s['header']['raft_term']}")
        if not 0 < s.get("dbSizeInUse", 0) <= s["dbSize"]:
            problems.append(f"{side}: dbSizeInUse {s.get('dbSizeInUse')} dbSize {s['dbSize']}")
        idx = s["raftIndex"]
        ctl.run("put", "c", "3")
        s2 = _raw_json(ctl, "endpoint", "status")[0]["Status"]
        if not s2["raftIndex"] > idx:
            problems.append(f"{side}: raftIndex did not grow after a put: {idx} -> {s2['raftIndex']}")
        tbl = ctl.run("endpoint", "status", "-w", "table").stdout
        if format(s["header"]["member_id"], "x") not in tbl:
            problems.append(f"{side}: table ID is not the member id:\n{tbl}")
    assert not problems, "\n".join(problems)


def test_endpoint_hashkv(ep_diff: DiffRunner):
    d, r = ep_diff, ep_diff.run
    for i in range(4):
        r("put", f"k{i}", f"v{i}")                                 # revs 2..5
    r("compaction", "3", expect_out="compacted revision 3")        # compact_revision set on both
    r("endpoint", "hashkv", "-w", "json", expect_out='"compact_revision":3')
    r("endpoint", "hashkv", "-w", "json", "--rev=4", expect_out='"revision":5')
    r("endpoint", "hashkv", "-w", "fields", "--rev=5")
    r("endpoint", "hashkv", "-w", "table")
    r("endpoint", "hashkv", expect_rc=0)
    r("endpoint", "hashkv", "--rev=100", expect_rc=1, expect_err=E_FUTURE)
    r("endpoint", "hashkv", "-w", "json", "--rev=100", expect_rc=1, expect_err=E_FUTURE)
    r("endpoint", "hashkv", "--rev=2", expect_rc=1, expect_err=E_COMPACTED)
    r("endpoint", "hashkv", "-w", "protobuf", expect_rc=4)
    d.check()

    problems = []
    for side, ctl in _sides(d):
        h1, h2 = _hash(ctl), _hash(ctl)
        at5 = _hash(ctl, "--rev=5")
        at4 = _hash(ctl, "--rev=4")
        if h1 != h2:
            problems.append(f"{side}: hashkv not stable across two calls: {h1} {h2}")
        if at5 != h1:
            problems.append(f"{side}: hashkv --rev=5 (current) {at5} != hashkv {h1}")
        if at4 == h1:
            problems.append(f"{side}: hashkv --rev=4 == --rev=5 ({at4}) though rev 5 wrote k3")
        ctl.run("put", "k9", "x")                                  # rev 6
        h3 = _hash(ctl)
        if h3 == h1:
            problems.append(f"{side}: hashkv unchanged after a write: {h1}")
        if _hash(ctl, "--rev=5") != at5 or _hash(ctl, "--rev=4") != at4:
            problems.append(f"{side}: hashkv of a past revision changed after a later write")
        if _hash(ctl) != h3:
            problems.append(f"{side}: hashkv not stable after the write")
    assert not problems, "\n".join(problems)


def test_endpoint_hashkv_never_compacted(diff: DiffRunner):
    d = diff
    d.ref_ids, d.tgt_ids = EndpointMasks(), EndpointMasks()
    d.run("put", "a", "1")
    d.run("endpoint", "hashkv", "-w", "json", expect_out='"compact_revision":-1')
    d.check()


def test_endpoint_hashkv_at_compacted_revision(diff: DiffRunner):
    d = diff
    d.ref_ids, d.tgt_ids = EndpointMasks(), EndpointMasks()
    for v in ("1", "2", "3"):
        d.run("put", "a", v)                                       # revs 2..4
    d.run("compaction", "3", expect_out="compacted revision 3")
    d.run("endpoint", "hashkv", "--rev=3", expect_rc=1, expect_err=E_COMPACTED)
    d.run("endpoint", "hashkv", "--rev=4", expect_rc=0)
    d.check()
