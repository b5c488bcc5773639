"""Backups: `etcdctl snapshot save` against a real etcd 3.4 and against MetaStore
(same exit status, same printed line, both files pass etcdctl's own size check),
then `metastore snapshot status/restore` on MetaStore's file: a server started on
the restored directory serves the same keys; damaged, truncated and foreign
(etcd/bbolt) files are refused with a clear message and a non-zero exit.

MetaStore's snapshot file is not a bbolt file (docs/COMPATIBILITY.md), so
`etcdctl snapshot status/restore` are not compared.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from harness import Etcdctl, ServerProcess, free_port, start_servers

KEYS = [("a", "1"), ("b/1", "x"), ("b/2", "y"), ("a", "2"), ("unicode/ключ", "значение")]


def metastore(binary: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def save(ctl: Etcdctl, path: Path):
    r = ctl.run("snapshot", "save", str(path))
    return r.rc, r.stdout.replace(str(path), "FILE"), r.stderr


class RestoredServer(ServerProcess):
    """A MetaStore on an existing (restored) data directory, with a fixed peer
    URL so that its flags are the ones the restore used."""

    def __init__(self, binary: str, workdir: Path, restored: Path, peer_port: int):
        super().__init__("metastore-restored", binary, workdir)
        self.restored = restored
        self.fixed_peer = f"http://127.0.0.1:{peer_port}"

    def args(self) -> list[str]:
        a = super().args()
        a[a.index("--data-dir") + 1] = str(self.restored)
        return [x.replace(self.peer_url, self.fixed_peer) for x in a]


def get_all(ctl: Etcdctl) -> tuple:
    """(revision, key-values) of the whole key space (ids differ between the two)."""
    r = ctl.run("get", "", "--from-key", "-w", "json")
    assert r.rc == 0, r.stderr
    out = json.loads(r.stdout)
    return out["header"]["revision"], out["kvs"]


def test_snapshot_save_and_restore(server_factory, etcd_bin, etcdctl_bin, metastore_bin, tmp_path):
    ref = server_factory("etcd", etcd_bin)
    tgt = server_factory("metastore", metastore_bin)
    start_servers([ref, tgt])
    ctls = {"etcd": Etcdctl(etcdctl_bin, ref.client_url), "metastore": Etcdctl(etcdctl_bin, tgt.client_url)}
    for ctl in ctls.values():
        for k, v in KEYS:
            assert ctl.run("put", k, v).rc == 0
        assert ctl.run("del", "b/2").rc == 0

    files = {name: tmp_path / f"{name}.db" for name in ctls}
    results = {name: save(ctl, files[name]) for name, ctl in ctls.items()}
    assert results["etcd"][0] == 0, results["etcd"]
    assert results["metastore"][0] == results["etcd"][0], results["metastore"]
    assert results["metastore"][1] == results["etcd"][1] == "Snapshot saved at FILE\n"
    for name, f in files.items():
        # etcdctl itself checks this (a whole number of 512-byte pages plus a SHA-256).
        assert f.stat().st_size % 512 == 32, name

    # MetaStore's own tool reads its file...
    st = metastore(metastore_bin, "snapshot", "status", str(files["metastore"]))
    assert st.returncode == 0, st.stderr
    assert "revision 7" in st.stdout, st.stdout
    # ...and refuses etcd's (bbolt) with a clear message.
    st = metastore(metastore_bin, "snapshot", "status", str(files["etcd"]))
    assert st.returncode != 0
    assert "not a MetaStore snapshot" in st.stderr, st.stderr

    peer_port = free_port()
    peer = f"http://127.0.0.1:{peer_port}"
    restored = tmp_path / "restored"
    r = metastore(metastore_bin, "snapshot", "restore", str(files["metastore"]),
                  "--data-dir", str(restored), "--name", "n1",
                  "--initial-cluster", f"n1={peer}", "--initial-advertise-peer-urls", peer)
    assert r.returncode == 0, r.stderr
    assert "revision 7" in r.stdout, r.stdout

    # Restoring again into the now non-empty directory is refused, as etcdctl does.
    again = metastore(metastore_bin, "snapshot", "restore", str(files["metastore"]),
                      "--data-dir", str(restored))
    assert again.returncode != 0
    assert "not empty" in again.stderr, again.stderr

    before = get_all(ctls["metastore"])
    tgt.stop()
    srv = RestoredServer(metastore_bin, tmp_path / "restored-server", restored, peer_port)
    try:
        srv.start().wait_ready()
        after = get_all(Etcdctl(etcdctl_bin, srv.client_url))
    finally:
        srv.stop()
    assert after == before
    assert before[0] == 7 and len(before[1]) == 3


def test_restore_refuses_damaged_files(server_factory, etcdctl_bin, metastore_bin, tmp_path):
    srv = server_factory("metastore", metastore_bin)
    start_servers([srv])
    ctl = Etcdctl(etcdctl_bin, srv.client_url)
    for i in range(20):
        assert ctl.run("put", f"k{i}", "v" * 100).rc == 0
    good = tmp_path / "good.db"
    assert save(ctl, good)[0] == 0
    data = good.read_bytes()

    cases = {
        "truncated": (data[: len(data) // 2], "truncated"),
        "no-checksum": (data[:-32], "truncated"),
        "flipped": (data[:100] + bytes([data[100] ^ 0x40]) + data[101:], "checksum mismatch"),
        "empty": (b"", "truncated"),
        "foreign": (b"\0" * 4096 + b"\1" * 32, "not a MetaStore snapshot"),
    }
    for name, (content, message) in cases.items():
        f = tmp_path / f"{name}.db"
        f.write_bytes(content)
        out = tmp_path / f"out-{name}"
        r = metastore(metastore_bin, "snapshot", "restore", str(f), "--data-dir", str(out))
        assert r.returncode != 0, name
        assert message in r.stderr, (name, r.stderr)
        assert not out.exists(), f"{name}: a data directory was left behind"
        assert not (tmp_path / f".out-{name}.restoring").exists(), name
