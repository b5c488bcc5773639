"""The sample server configuration config/metastore.yaml.

- `metastore --config-file` starts with the file as it is (only the loopback ports swapped for
  free ones and the working directory a temp dir), and serves a put/get;
- the same with every commented-out example option switched on;
- every flag of `metastore --help` is mentioned in the file, so a new flag cannot be left out;
- `--worker-threads`: its default (one per core less the Raft thread's) and the flag, as the
  server's runtime has them (`metastore_server_worker_threads` on /metrics);
- `--write-answer-spin-us`: lone writes poll for their answer (counted on /metrics by outcome),
  and 0 turns that off.

Needs the MetaStore binary (METASTORE_BIN, see conftest.py) and etcdctl.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from harness import Etcdctl, free_port

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "config" / "metastore.yaml"
# Options the file cannot hold, each with the reason (also said in the file).
NOT_IN_FILE: set[str] = set()
# `# key: value` and `#   - item` lines: the commented-out examples.
EXAMPLE = re.compile(r"^# ((?:[a-z][a-z0-9-]*:(?: .*)?)|(?:  - .*))$")


def with_free_ports(text: str) -> tuple[str, int]:
    client = free_port()
    for default, port in (("2379", client), ("2380", free_port()), ("2381", free_port())):
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port}")
    return text, client


def activate_examples(text: str, skip: set[str]) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        m = EXAMPLE.match(line)
        if m and not m.group(1).startswith("  - "):
            skipping = m.group(1).split(":", 1)[0] in skip
        if m and not skipping:
            out.append(m.group(1))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def run_with(metastore_bin: str, etcdctl_bin: str, text: str, workdir: Path) -> None:
    """Starts `metastore --config-file` on `text` in `workdir`, checks put/get, stops it."""
    text, client = with_free_ports(text)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "metastore.yaml"
    config.write_text(text.replace("/var/lib/metastore", str(workdir / "data")))
    log = workdir / "stderr.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [metastore_bin, "--config-file", str(config)],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"metastore exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{client}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /health after 30 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        ctl = Etcdctl(etcdctl_bin, f"http://127.0.0.1:{client}")
        put = ctl.run("put", "config", "file")
        assert put.rc == 0, put.stderr
        get = ctl.run("get", "config")
        assert get.stdout.split() == ["config", "file"], get
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_sample_config_starts_the_server(metastore_bin, etcdctl_bin, tmp_path):
    run_with(metastore_bin, etcdctl_bin, SAMPLE.read_text(), tmp_path / "as-is")
    # The default data directory, ${name}.metastore, in the working directory.
    assert (tmp_path / "as-is" / "default.metastore").is_dir()


def test_sample_config_examples_are_valid(metastore_bin, etcdctl_bin, tmp_path):
    text = activate_examples(SAMPLE.read_text(), skip=NOT_IN_FILE)
    assert re.search(r"^data-dir: ", text, re.M) and re.search(r"^listen-metrics-urls:", text, re.M), text
    run_with(metastore_bin, etcdctl_bin, text, tmp_path / "examples")
    assert (tmp_path / "examples" / "data").is_dir()


def test_experimental_watch_progress_notify_interval_in_file(metastore_bin, etcdctl_bin, tmp_path):
    """A key whose flag name differs from its argument id is found by its flag name."""
    text = activate_examples(SAMPLE.read_text(), skip=set())
    run_with(metastore_bin, etcdctl_bin, text, tmp_path / "all")


def test_sample_config_mentions_every_flag(metastore_bin):
    help_text = subprocess.run(
        [metastore_bin, "--help"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    flags = set(re.findall(r"^\s+(?:-\w, )?--([a-z0-9][a-z0-9-]*)", help_text, re.M))
    flags -= {"help", "version", "config-file"}
    assert len(flags) >= 15, help_text
    text = SAMPLE.read_text()
    missing = sorted(f for f in flags if not re.search(rf"^(# )?{re.escape(f)}:", text, re.M))
    assert not missing, f"config/metastore.yaml does not mention {missing} (see metastore --help)"
    unknown = sorted(
        k for k in re.findall(r"^(?:# )?([a-z][a-z0-9-]*):", text, re.M) if k not in flags
    )
    assert not unknown, f"config/metastore.yaml has keys that are no flags: {unknown}"


def worker_threads(server) -> int:
    with urllib.request.urlopen(server.client_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(r"^metastore_server_worker_threads (\d+)$", text, re.M)
    assert m, "no metastore_server_worker_threads on /metrics"
    return int(m.group(1))


def test_worker_threads_default_and_flag(server_factory, metastore_bin):
    """A one-member cluster leaves a core to its Raft thread; --worker-threads sets the count."""
    cores = len(os.sched_getaffinity(0))
    default = server_factory("metastore", metastore_bin).start().wait_ready()
    assert worker_threads(default) == max(cores - 1, 1)
    chosen = cores + 2
    server = server_factory("metastore", metastore_bin, extra_args=["--worker-threads", str(chosen)])
    assert worker_threads(server.start().wait_ready()) == chosen


def write_answer_spins(server) -> dict[str, int]:
    with urllib.request.urlopen(server.client_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        outcome: int(n)
        for outcome, n in re.findall(
            r'^metastore_server_write_answer_spins_total\{outcome="(\w+)"\} (\d+)$', text, re.M)
    }


def test_lone_writes_poll_for_their_answer_unless_turned_off(server_factory, metastore_bin,
                                                             etcdctl_bin):
    """One etcdctl put after another: each write is alone, after a group of one, so its handler
    polls for the answer (a generous 100 ms here, so a slow disk's sync still lands in it)."""
    on = server_factory("metastore", metastore_bin,
                        extra_args=["--write-answer-spin-us", "100000"]).start().wait_ready()
    ctl = Etcdctl(etcdctl_bin, on.client_url)
    for i in range(10):
        r = ctl.run("put", f"spin-{i}", "v")
        assert r.rc == 0, r.stderr
    got = write_answer_spins(on)
    # The first put may follow no group of one; every later one does.
    assert got.get("answered", 0) >= 8, got
    assert ctl.run("get", "spin-9", "--print-value-only").stdout.strip() == "v"

    off = server_factory("metastore", metastore_bin,
                         extra_args=["--write-answer-spin-us", "0"]).start().wait_ready()
    ctl = Etcdctl(etcdctl_bin, off.client_url)
    for i in range(3):
        assert ctl.run("put", f"spin-{i}", "v").rc == 0
    assert write_answer_spins(off) == {}
