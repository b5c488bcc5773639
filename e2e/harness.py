"""Process-management helpers for MetaStore's end-to-end tests.

Reusable by any e2e test: locate binaries, start an etcd-flag-compatible server
(real etcd or MetaStore) on free loopback ports in a fresh temp dir, wait for
`GET /health`, run `etcdctl` against it, normalise outputs and compare two
servers command by command.

Nothing here is specific to one scenario; the scenarios live in test_*.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterable, Optional, Sequence

# --------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------


def find_etcd() -> Optional[str]:
    """Path of the real etcd server, or None."""
    return os.environ.get("ETCD_BIN") or shutil.which("etcd") or _existing("/usr/bin/etcd")


def find_etcdctl() -> Optional[str]:
    """Path of etcdctl, or None."""
    return os.environ.get("ETCDCTL_BIN") or shutil.which("etcdctl") or _existing("/usr/bin/etcdctl")


def metastore_candidates() -> list[str]:
    """Where the MetaStore binary is looked for, in order."""
    if os.environ.get("METASTORE_BIN"):
        return [os.environ["METASTORE_BIN"]]
    out = []
    if os.environ.get("CARGO_TARGET_DIR"):
        out.append(os.path.join(os.environ["CARGO_TARGET_DIR"], "release", "metastore"))
    out.append(os.path.join(os.path.expanduser("~"), ".cache", "metastore", "target", "release", "metastore"))
    return out


def find_metastore() -> Optional[str]:
    """Path of the MetaStore binary: $METASTORE_BIN, else
    $CARGO_TARGET_DIR/release/metastore, else ~/.cache/metastore/target/release/metastore."""
    for c in metastore_candidates():
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _existing(p: str) -> Optional[str]:
    return p if os.path.isfile(p) and os.access(p, os.X_OK) else None


def require_binary(path: Optional[str], what: str, hint: str) -> str:
    """Return `path`, or skip the test (fail it when $CI is set) if missing."""
    import pytest  # imported lazily so the module is usable without pytest

    if path:
        return path
    msg = f"{what} not found ({hint})"
    if os.environ.get("CI"):
        pytest.fail(f"{msg}; CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(f"{msg}; skipping (set CI=1 to make this a failure)")
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------

# Ports come from below the kernel's ephemeral range, through a counter shared by every
# test process of the machine (the Rust tests' `metastore_testkit::free_port` uses the same
# file and range): a port from `bind(0)` sits in the ephemeral range, where any outgoing
# connection may take it before the server that was handed it binds it.
FIRST_PORT = 15000
_MARGIN = 100
_COUNTER = os.path.join(tempfile.gettempdir(), "metastore-test-ports")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and handed out to no other test
    process until the range wraps around."""
    end = _ephemeral_low() - _MARGIN
    if end <= FIRST_PORT + 1000:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    fd = os.open(_COUNTER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            port = int(os.read(fd, 16).decode().strip())
        except ValueError:
            port = FIRST_PORT
        if not FIRST_PORT <= port < end:
            port = FIRST_PORT
        for _ in range(end - FIRST_PORT):
            candidate = port
            port = FIRST_PORT if port + 1 >= end else port + 1
            if _bindable(candidate):
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, str(port).encode())
                return candidate
    finally:
        os.close(fd)  # releases the lock
    raise RuntimeError(f"no free loopback port in {FIRST_PORT}..{end}")


# --------------------------------------------------------------------------
# Server processes
# --------------------------------------------------------------------------


class ServerStartError(RuntimeError):
    pass


class ServerProcess:
    """One etcd-compatible server (`kind` is a label: "etcd", "metastore"...).

    Layout under `workdir`: data/ (the --data-dir), stdout.log, stderr.log.
    """

    def __init__(self, kind: str, binary: str, workdir: Path, name: str = "n1",
                 extra_args: Sequence[str] = ()):
        self.kind = kind
        self.binary = binary
        self.workdir = Path(workdir)
        self.name = name
        self.extra_args = list(extra_args)
        self.data_dir = self.workdir / "data"
        self.stdout_path = self.workdir / "stdout.log"
        self.stderr_path = self.workdir / "stderr.log"
        self.client_port = 0
        self.peer_port = 0
        self.proc: Optional[subprocess.Popen] = None

    # -- addresses ---------------------------------------------------------
    @property
    def client_addr(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"http://{self.client_addr}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def args(self) -> list[str]:
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", f"{self.name}={self.peer_url}",
            *self.extra_args,
        ]

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "ServerProcess":
        """Spawn the process (does not wait for readiness)."""
        assert self.proc is None, "already started"
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.client_port = free_port()
        self.peer_port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                self.args(), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=env, cwd=str(self.workdir), start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 30.0) -> "ServerProcess":
        """Poll GET /health until HTTP 200; raise ServerStartError with the
        captured stderr on early exit or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerStartError(
                    f"{self.kind} exited with code {rc} before becoming healthy\n"
                    f"command: {' '.join(self.args())}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.client_url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
                    last = f"HTTP {r.status}"
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200]!r}"
            except (urllib.error.URLError, OSError) as e:
                last = repr(e)
            time.sleep(0.05)
        raise ServerStartError(
            f"{self.kind} not healthy after {timeout:.0f}s at {self.client_url}/health "
            f"(last: {last})\ncommand: {' '.join(self.args())}\n{self.log_tail()}")

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Only ever signals our
        own process (and its own session)."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
            p.wait(timeout=10)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remove_data(self) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- logs --------------------------------------------------------------
    def read_log(self, which: str = "stderr", limit: int = 20000) -> str:
        p = self.stderr_path if which == "stderr" else self.stdout_path
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            return ""
        if len(data) > limit:
            data = b"...[truncated]...\n" + data[-limit:]
        return data.decode("utf-8", "backslashreplace")

    def log_tail(self, limit: int = 8000) -> str:
        return (f"--- {self.kind} stderr ({self.stderr_path}) ---\n{self.read_log('stderr', limit)}"
                f"--- {self.kind} stdout ({self.stdout_path}) ---\n{self.read_log('stdout', limit)}")


def start_servers(servers: Iterable[ServerProcess], timeout: float = 30.0,
                  attempts: int = 2) -> None:
    """Start several servers at once and wait until all are healthy. A server
    that dies at start (e.g. a port grabbed in between) is retried on new ports."""
    servers = list(servers)
    for s in servers:
        s.start()
    for s in servers:
        for attempt in range(attempts):
            try:
                s.wait_ready(timeout)
                break
            except ServerStartError:
                died = s.proc is not None and s.proc.poll() is not None
                if not died or attempt == attempts - 1 or "address already in use" not in s.read_log():
                    raise
                s.stop()
                s.start()


# --------------------------------------------------------------------------
# etcdctl
# --------------------------------------------------------------------------


@dataclasses.dataclass
class CmdResult:
    argv: list[str]
    stdin: Optional[str]
    rc: int
    stdout: str
    stderr: str
    duration: float = 0.0

    def describe(self) -> str:
        if self.argv and self.argv[0] == "POST":
            return "HTTP " + " ".join(self.argv)
        s = "etcdctl " + " ".join(shell_quote(a) for a in self.argv)
        if self.stdin is not None:
            s += "  <<< " + _clip(repr(self.stdin), 400)
        return s


def shell_quote(a: str) -> str:
    if len(a) > 80:
        return f"<{len(a)}-char arg {a[:20]!r}...>"
    if a and re.fullmatch(r"[A-Za-z0-9_./=:,+@%-]+", a):
        return a
    return "'" + a.replace("'", "'\\''") + "'"


class Etcdctl:
    """Runs `etcdctl --endpoints=<url> --command-timeout=5s ...` with ETCDCTL_API=3."""

    def __init__(self, binary: str, endpoint_url: str, command_timeout: str = "5s"):
        self.binary = binary
        self.endpoint_url = endpoint_url
        self.command_timeout = command_timeout
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
        self.env["ETCDCTL_API"] = "3"

    def run(self, *args: str, stdin: Optional[str] = None, timeout: float = 30.0) -> CmdResult:
        argv = [self.binary, f"--endpoints={self.endpoint_url}",
                f"--command-timeout={self.command_timeout}", *args]
        t0 = time.monotonic()
        try:
            p = subprocess.run(argv, input=(stdin.encode() if stdin is not None else b""),
                               capture_output=True, env=self.env, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = -999, e.stdout or b"", (e.stderr or b"") + b"\n<harness: etcdctl timed out>"
        return CmdResult(list(args), stdin, rc,
                         out.decode("utf-8", "surrogateescape"),
                         err.decode("utf-8", "surrogateescape"),
                         time.monotonic() - t0)

    def start(self, *args: str) -> "BackgroundEtcdctl":
        """Start a long-running etcdctl command (e.g. `watch`) in the background."""
        return BackgroundEtcdctl(self, args)


class BackgroundEtcdctl:
    """A long-running etcdctl (e.g. `watch`): stdout/stderr collected by reader
    threads while it runs; `wait_until` polls the collected stdout, `stop`
    sends a signal (SIGINT by default, like ^C) and returns a CmdResult."""

    def __init__(self, etcdctl: "Etcdctl", args: Sequence[str]):
        self.args = list(args)
        argv = [etcdctl.binary, f"--endpoints={etcdctl.endpoint_url}",
                f"--command-timeout={etcdctl.command_timeout}", *self.args]
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=etcdctl.env)
        self._out, self._err = bytearray(), bytearray()
        self._lock = threading.Lock()
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self._out),
                                          daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self._err),
                                          daemon=True)]
        for t in self._readers:
            t.start()

    def _pump(self, stream, buf: bytearray) -> None:
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                return
            with self._lock:
                buf.extend(chunk)

    def stdout(self) -> str:
        with self._lock:
            return bytes(self._out).decode("utf-8", "surrogateescape")

    def wait_until(self, pred, timeout: float = 10.0) -> bool:
        """Poll until pred(stdout) is true or the process exited; True if pred held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred(self.stdout()):
                return True
            if self.proc.poll() is not None:
                for t in self._readers:
                    t.join(timeout=1)
                return bool(pred(self.stdout()))
            time.sleep(0.02)
        return bool(pred(self.stdout()))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 5.0) -> CmdResult:
        """Signal the process if still running, wait, return what it printed.
        rc is the exit code, or -signal if it died of the signal."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(timeout=2)
        with self._lock:
            out, err = bytes(self._out), bytes(self._err)
        return CmdResult(self.args, None, self.proc.returncode,
                         out.decode("utf-8", "surrogateescape"),
                         err.decode("utf-8", "surrogateescape"),
                         time.monotonic() - self.t0)


def http_post_json(url: str, body: dict, timeout: float = 10.0) -> CmdResult:
    """POST JSON; the result's rc is the HTTP status (-1 if no answer) and its
    stdout the answer re-serialised canonically (sorted keys) when it is JSON."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        status, raw = -1, f"<no answer: {e!r}>".encode()
    text = raw.decode("utf-8", "surrogateescape")
    try:
        text = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except ValueError:
        pass
    path = url.split("/", 3)[3] if url.count("/") >= 3 else url
    return CmdResult(["POST", "/" + path, json.dumps(body, sort_keys=True)], None, status,
                     text, "", time.monotonic() - t0)


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------

# Header identity fields that legitimately differ between two clusters.
# -w json (etcdctl, numbers) and the JSON gateway (strings) spellings.
_JSON_ID_RE = re.compile(r'"(cluster_id|member_id|raft_term)":("?)(\d+)\2')
# -w fields spellings.
_FIELDS_ID_RE = re.compile(r'^"(ClusterID|MemberID|RaftTerm)" : \d+$', re.M)
# etcdctl's client-side zap warning line on a failed RPC:
# {"level":"warn","ts":"2026-...Z","caller":"clientv3/retry_interceptor.go:62",
#  "msg":"retrying of unary invoker failed",
#  "target":"endpoint://client-<uuid>/127.0.0.1:PORT","attempt":0,"error":"rpc error: ..."}
_TS_RE = re.compile(r'"ts":"[^"]*"')
_CLIENT_UUID_RE = re.compile(r"endpoint://client-[0-9a-f-]{36}/")


def normalise_text(text: str, endpoint_addr: str) -> str:
    """Replace what differs between two equivalent clusters and nothing else:
    header cluster_id / member_id / raft_term (JSON and fields outputs), and
    in etcdctl's own client log lines the timestamp, the random client id and
    the endpoint address (ours, chosen by the harness)."""
    text = _JSON_ID_RE.sub(lambda m: f'"{m.group(1)}":"<{m.group(1)}>"', text)
    text = _FIELDS_ID_RE.sub(lambda m: f'"{m.group(1)}" : <{m.group(1)}>', text)
    text = _TS_RE.sub('"ts":"<ts>"', text)
    text = _CLIENT_UUID_RE.sub("endpoint://client-<uuid>/", text)
    text = text.replace(endpoint_addr, "<endpoint>")
    return text


def normalise_result(r: CmdResult, endpoint_addr: str) -> CmdResult:
    return dataclasses.replace(r, stdout=normalise_text(r.stdout, endpoint_addr),
                               stderr=normalise_text(r.stderr, endpoint_addr))


class LeaseIds:
    """Per-server lease-id normaliser (one instance per side of a DiffRunner).

    Lease ids are chosen by each server, so they legitimately differ. Every id
    is named `<LEASEn>` in the order it is first seen in this server's outputs
    (so the n-th lease granted is LEASEn on both sides), in the contexts where
    etcdctl prints lease ids and nowhere else:
      simple: `lease <hex> granted|keepalived|revoked|already expired`,
              the id lines of `lease list` (`found N leases` then one hex id a line);
      json:   `"ID":<dec>`, `"id":<dec>`, `"lease":<dec>` (0 = no lease, kept);
      fields: `"ID" : <dec>`, `"Lease" : <dec>`.
    `resolve()` turns `<LEASEn>` in a command argument back into this server's
    hex id, so one scenario drives both servers.

    Remaining TTLs (`remaining(Ns)`, and `ttl` / `TTL` in the json / fields
    output of `lease timetolive`) are rounded down seconds of a deadline that
    each server computes at its own instant: they can legitimately differ by
    one. They are replaced by `<remaining>` and the raw values are kept in
    `remaining` so a test can check both sides pairwise within one second.
    Negative values (expired: -1) are kept as is.
    The `attached keys([...])` / `"keys":[...]` list of `lease timetolive
    --keys` is sorted: etcd 3.4 itself prints it in Go map order (random run
    to run)."""

    _HEX_CTX = re.compile(r"\blease ([0-9a-f]{1,16})(?= (?:granted|keepalived|revoked|already expired))")
    _DEC_JSON = re.compile(r'"(ID|id|lease)":(\d+)')
    _DEC_FIELDS = re.compile(r'^"(ID|Lease)" : (\d+)$', re.M)
    _LIST = re.compile(r"\Afound \d+ leases\n((?:[0-9a-f]{1,16}\n)*)")
    _REMAINING = re.compile(r"remaining\((\d+)s\)")
    _JSON_TTL = re.compile(r'"ttl":(\d+)')
    _FIELDS_TTL = re.compile(r'^"TTL" : (\d+)$', re.M)
    _KEYS_SIMPLE = re.compile(r"attached keys\(\[([^\]]*)\]\)")
    _KEYS_JSON = re.compile(r'"keys":\[([^\]]*)\]')

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.remaining: list[int] = []

    def _name(self, value: int) -> str:
        if value not in self.names:
            self.names[value] = f"LEASE{len(self.names) + 1}"
        return "<" + self.names[value] + ">"

    def resolve(self, arg: str) -> str:
        for value, name in self.names.items():
            arg = arg.replace(f"<{name}>", format(value, "x"))
        return arg

    def normalise(self, text: str) -> str:
        text = self._HEX_CTX.sub(lambda m: "lease " + self._name(int(m.group(1), 16)), text)
        text = self._LIST.sub(
            lambda m: m.group(0)[:m.start(1) - m.start(0)] + "".join(
                self._name(int(x, 16)) + "\n" for x in m.group(1).splitlines()), text)
        text = self._DEC_JSON.sub(
            lambda m: m.group(0) if m.group(2) == "0"
            else f'"{m.group(1)}":{self._name(int(m.group(2)))}', text)
        text = self._DEC_FIELDS.sub(
            lambda m: m.group(0) if m.group(2) == "0"
            else f'"{m.group(1)}" : {self._name(int(m.group(2)))}', text)

        def rem(m, fmt):
            self.remaining.append(int(m.group(1)))
            return fmt
        text = self._REMAINING.sub(lambda m: rem(m, "remaining(<remaining>)"), text)
        if '"granted-ttl":' in text:
            text = self._JSON_TTL.sub(lambda m: rem(m, '"ttl":<remaining>'), text)
        if '"GrantedTTL" :' in text:
            text = self._FIELDS_TTL.sub(lambda m: rem(m, '"TTL" : <remaining>'), text)
        text = self._KEYS_SIMPLE.sub(
            lambda m: "attached keys([" + " ".join(sorted(m.group(1).split())) + "])", text)
        text = self._KEYS_JSON.sub(
            lambda m: '"keys":[' + ",".join(sorted(x for x in m.group(1).split(",") if x)) + "]",
            text)
        return text


# --------------------------------------------------------------------------
# Differential runner
# --------------------------------------------------------------------------


def _clip(line: str, width: int = 300) -> str:
    return line if len(line) <= width else line[:width] + f"...[{len(line) - width} more chars]"


def _for_display(text: str) -> str:
    """Pretty-print lines that are JSON documents so a diff of a long one-line
    answer points at the differing field (display only; comparison is on the
    raw normalised text)."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s[:1] in "{[" and len(s) > 120:
            try:
                out.append(json.dumps(json.loads(s), indent=1, ensure_ascii=False))
                continue
            except ValueError:
                pass
        out.append(line)
    return "\n".join(out)


def unified(a: str, b: str, a_name: str, b_name: str, max_lines: int = 40) -> str:
    pa, pb = _for_display(a), _for_display(b)
    if pa != pb:
        a, b = pa, pb
    d = list(difflib.unified_diff(a.splitlines(), b.splitlines(), a_name, b_name, lineterm="", n=2))
    if not d:  # differ only in trailing newline / line endings
        d = [f"(texts differ only in line endings: {a[-20:]!r} vs {b[-20:]!r})"]
    if len(d) > max_lines:
        d = d[:max_lines] + [f"... [{len(d) - max_lines} more diff lines]"]
    return "\n".join(_clip(x) for x in d)


@dataclasses.dataclass
class Mismatch:
    step: int
    label: str
    ref: CmdResult
    tgt: CmdResult

    def render(self, ref_name: str, tgt_name: str) -> str:
        out = [f"#{self.step} {self.label}: {self.ref.describe()}"]
        if self.ref.rc != self.tgt.rc:
            out.append(f"  exit code: {ref_name}={self.ref.rc} {tgt_name}={self.tgt.rc}")
        for stream in ("stdout", "stderr"):
            a, b = getattr(self.ref, stream), getattr(self.tgt, stream)
            if a != b:
                out.append(f"  {stream} diff:")
                out.append(_indent(unified(a, b, f"{ref_name}.{stream}", f"{tgt_name}.{stream}"), 4))
        return "\n".join(out)


def _indent(s: str, n: int) -> str:
    return "\n".join(" " * n + x for x in s.splitlines())


class ExpectationError(AssertionError):
    pass


class DiffRunner:
    """Runs each etcdctl command against the reference (real etcd) and the
    target, in parallel, normalises, compares exit code/stdout/stderr and
    records every mismatch. Call `check()` at the end to fail with all of them.

    `expect_rc` / `expect_out` / `expect_err` are sanity checks on the
    *reference* output (the scenario must exercise what it claims to);
    they raise immediately since they mean the scenario itself is wrong.
    """

    def __init__(self, ref: Etcdctl, ref_addr: str, tgt: Etcdctl, tgt_addr: str,
                 ref_name: str = "etcd", tgt_name: str = "target",
                 transcript: Optional[Path] = None,
                 servers: Sequence[ServerProcess] = (), max_slow: int = 3):
        self.ref, self.tgt = ref, tgt
        self.ref_addr, self.tgt_addr = ref_addr, tgt_addr
        self.ref_name, self.tgt_name = ref_name, tgt_name
        self.mismatches: list[Mismatch] = []
        self.steps = 0
        self.transcript = transcript
        self.servers = list(servers)
        self.max_slow = max_slow
        self.slow = 0
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        # Optional per-side id normalisers (see use_lease_ids).
        self.ref_ids: Optional[LeaseIds] = None
        self.tgt_ids: Optional[LeaseIds] = None
        if transcript:
            transcript.write_text("")

    def use_lease_ids(self) -> None:
        """Normalise lease ids (and remaining TTLs) per side, see LeaseIds;
        `<LEASEn>` in command arguments becomes each side's own id."""
        self.ref_ids, self.tgt_ids = LeaseIds(), LeaseIds()

    def _args(self, ids: Optional[LeaseIds], args: Sequence[str]) -> list[str]:
        return [ids.resolve(a) for a in args] if ids else list(args)

    def _norm(self, res: CmdResult, addr: str, ids: Optional[LeaseIds],
              args: Sequence[str]) -> CmdResult:
        res = dataclasses.replace(normalise_result(res, addr), argv=list(args))
        if ids:
            res = dataclasses.replace(res, stdout=ids.normalise(res.stdout),
                                      stderr=ids.normalise(res.stderr))
        return res

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def run(self, *args: str, stdin: Optional[str] = None, label: str = "",
            expect_rc: Optional[int] = None, expect_out: Optional[str] = None,
            expect_err: Optional[str] = None) -> tuple[CmdResult, CmdResult]:
        self.steps += 1
        fr = self._pool.submit(self.ref.run, *self._args(self.ref_ids, args), stdin=stdin)
        ft = self._pool.submit(self.tgt.run, *self._args(self.tgt_ids, args), stdin=stdin)
        r = self._norm(fr.result(), self.ref_addr, self.ref_ids, args)
        t = self._norm(ft.result(), self.tgt_addr, self.tgt_ids, args)
        self._record(r, t, label or args[0])
        return self._expect(r, t, expect_rc, expect_out, expect_err)

    def _expect(self, r: CmdResult, t: CmdResult, expect_rc: Optional[int],
                expect_out: Optional[str], expect_err: Optional[str]) -> tuple[CmdResult, CmdResult]:
        problems = []
        if expect_rc is not None and r.rc != expect_rc:
            problems.append(f"exit code {r.rc}, expected {expect_rc}")
        if expect_out is not None and expect_out not in r.stdout:
            problems.append(f"stdout lacks {expect_out!r}")
        if expect_err is not None and expect_err not in r.stderr:
            problems.append(f"stderr lacks {expect_err!r}")
        if problems:
            raise ExpectationError(
                f"scenario bug: reference {self.ref_name} did not behave as the scenario expects "
                f"at #{self.steps} {r.describe()}: {'; '.join(problems)}\n"
                f"stdout: {_clip(r.stdout, 2000)}\nstderr: {_clip(r.stderr, 2000)}")
        return r, t

    def start(self, *args: str) -> tuple[BackgroundEtcdctl, BackgroundEtcdctl]:
        """Start a long-running etcdctl command (e.g. `watch --rev=N ...`) on
        both servers; finish it with `stop()`."""
        procs = (self.ref.start(*self._args(self.ref_ids, args)),
                 self.tgt.start(*self._args(self.tgt_ids, args)))
        for p in procs:
            p.scenario_args = list(args)   # as written, before <LEASEn> resolution
        return procs

    def stop(self, procs: tuple[BackgroundEtcdctl, BackgroundEtcdctl], until=None,
             timeout: float = 10.0, settle: float = 0.3, sig: int = signal.SIGINT,
             label: str = "", expect_rc: Optional[int] = None, expect_out: Optional[str] = None,
             expect_err: Optional[str] = None) -> tuple[CmdResult, CmdResult]:
        """Wait until `until(stdout)` holds on both sides (or the process
        exited; the target gets the same `timeout`, then is stopped anyway and
        the outputs compared), wait `settle` seconds more so that extra output
        would show, then send `sig` and compare the collected outputs.
        `until=None`: just wait for the processes to exit on their own."""
        bref, btgt = procs
        self.steps += 1
        pred = until or (lambda _out: False)
        ok_ref = bref.wait_until(pred, timeout)
        btgt.wait_until(pred, timeout)
        if settle and until is not None:
            time.sleep(settle)
        fr = self._pool.submit(bref.stop, sig)
        ft = self._pool.submit(btgt.stop, sig)
        args = ["(background)", *getattr(bref, "scenario_args", bref.args)]
        r = self._norm(fr.result(), self.ref_addr, self.ref_ids, args)
        t = self._norm(ft.result(), self.tgt_addr, self.tgt_ids, args)
        self._record(r, t, label or "background " + args[1])
        if until is not None and not ok_ref:
            raise ExpectationError(
                f"scenario bug: reference {self.ref_name} never printed what the scenario waits "
                f"for at #{self.steps} {r.describe()}\nstdout: {_clip(r.stdout, 2000)}\n"
                f"stderr: {_clip(r.stderr, 2000)}")
        return self._expect(r, t, expect_rc, expect_out, expect_err)

    def run_gateway(self, path: str, body: dict, label: str = "",
                    expect_status: Optional[int] = None) -> tuple[CmdResult, CmdResult]:
        """POST `body` as JSON to the gRPC-gateway `path` (e.g. /v3/kv/range)
        on both servers and compare HTTP status and the parsed JSON answer
        (canonically re-serialised, header ids normalised). For what etcdctl
        3.4 cannot send (count_only, lease compares, min/max revisions)."""
        self.steps += 1
        fr = self._pool.submit(http_post_json, self.ref.endpoint_url + path, body)
        ft = self._pool.submit(http_post_json, self.tgt.endpoint_url + path, body)
        r = normalise_result(fr.result(), self.ref_addr)
        t = normalise_result(ft.result(), self.tgt_addr)
        self._record(r, t, label or path)
        if expect_status is not None and r.rc != expect_status:
            raise ExpectationError(
                f"scenario bug: reference {self.ref_name} answered HTTP {r.rc} (expected "
                f"{expect_status}) at #{self.steps} {r.describe()}: {_clip(r.stdout, 2000)}")
        return r, t

    def _record(self, r: CmdResult, t: CmdResult, label: str) -> None:
        self._log(r, t)
        if (r.rc, r.stdout, r.stderr) != (t.rc, t.stdout, t.stderr):
            self.mismatches.append(Mismatch(self.steps, label, r, t))
        # Stop early rather than wait out every remaining command when a
        # server died or keeps timing out.
        dead = [s for s in self.servers if s.proc is not None and s.proc.poll() is not None]
        if dead:
            raise AssertionError(
                "".join(f"{s.kind} exited with code {s.proc.returncode} during step #{self.steps}\n"
                        f"{s.log_tail(4000)}\n" for s in dead) + "\n" + self.report())
        self.slow = self.slow + 1 if t.duration > 4.0 else 0
        if self.slow >= self.max_slow:
            raise AssertionError(
                f"{self.tgt_name} took > 4 s on {self.slow} commands in a row; giving up\n\n"
                + self.report())

    def _log(self, r: CmdResult, t: CmdResult) -> None:
        if not self.transcript:
            return
        same = (r.rc, r.stdout, r.stderr) == (t.rc, t.stdout, t.stderr)
        with open(self.transcript, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"#{self.steps} {'SAME' if same else 'DIFF'} {r.describe()}\n")
            for name, x in ((self.ref_name, r), (self.tgt_name, t)):
                if name == self.tgt_name and same:
                    break
                f.write(f"  [{name}] rc={x.rc} ({x.duration * 1000:.0f} ms)\n")
                f.write(_indent(_clip(x.stdout, 2000), 4) + "\n")
                if x.stderr:
                    f.write(_indent("stderr: " + _clip(x.stderr, 2000), 4) + "\n")

    def report(self) -> str:
        head = (f"{len(self.mismatches)} of {self.steps} commands differ between "
                f"{self.ref_name} (reference) and {self.tgt_name}")
        if self.transcript:
            head += f"\nfull transcript: {self.transcript}"
        return head + "\n\n" + "\n\n".join(
            m.render(self.ref_name, self.tgt_name) for m in self.mismatches)

    def check(self) -> None:
        if self.mismatches:
            raise AssertionError(self.report())
