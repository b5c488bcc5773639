"""Differential tests of the JSON gateway's streaming routes (`POST /v3/watch`,
`POST /v3/lease/keepalive`) and of its answers to bad requests: the same HTTP
requests against a fresh real etcd 3.4 and a fresh MetaStore (or, with
DIFF_TARGET=etcd, a second etcd), compared byte for byte once the member
identity (cluster_id, member_id, raft_term) is replaced by placeholders.

Then the `etcd3gw` client (watch, watch_prefix, watch_once, lease.refresh) is
driven the same way against both and its results compared.

Known, documented differences (docs/COMPATIBILITY.md, "JSON gateway"): the text
of JSON decoding errors comes from serde, not Go's encoding/json, so only the
status and code of those are compared.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import threading
import time

import pytest

from harness import start_servers


def b64(s) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


_IDS = re.compile(r'"(cluster_id|member_id|raft_term)":"\d+"')


def norm(text: str) -> str:
    return _IDS.sub(lambda m: f'"{m.group(1)}":"<{m.group(1)}>"', text)


class Stream:
    """One POST over a raw socket: the status and the headers that matter,
    then the chunked answer one chunk at a time (etcd writes one line per
    chunk, and etcd3gw depends on it)."""

    KEPT = ("content-type", "content-length", "transfer-encoding",
            "grpc-metadata-content-type", "access-control-allow-origin",
            "x-content-type-options")

    def __init__(self, addr: str, path: str, body: bytes, method: str = "POST"):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        req = (f"{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        self.sock.sendall(req)
        self.f = self.sock.makefile("rb")
        self.status = None
        self.headers: dict[str, str] = {}

    def read_head(self) -> "Stream":
        line = self.f.readline()
        if not line:
            raise EOFError("connection closed before the status line")
        self.status = int(line.split()[1])
        while True:
            line = self.f.readline().decode()
            if line in ("\r\n", ""):
                break
            k, v = line.split(":", 1)
            if k.strip().lower() in self.KEPT:
                self.headers[k.strip().lower()] = v.strip()
        return self

    def chunk(self):
        """The next chunk (str), or None at the end of the body."""
        if self.headers.get("transfer-encoding") != "chunked":
            n = int(self.headers.get("content-length", "0"))
            data = self.f.read(n).decode() if n else ""
            self.headers["content-length"] = "0"
            return data or None
        n = int(self.f.readline().strip(), 16)
        data = self.f.read(n + 2)[:n].decode()
        return data if n else None

    def lines(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            c = self.chunk()
            if c is None:
                out.append("<end>")
                break
            out.append(norm(c))
        return out

    def summary(self) -> tuple:
        """The status and headers; a content length depends on the member ids."""
        return (self.status, tuple(sorted(
            (k, "<n>" if k == "content-length" else v) for k, v in self.headers.items())))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@pytest.fixture
def pair(server_factory, etcd_bin, target_kind_and_bin):
    tgt_kind, tgt_bin = target_kind_and_bin
    ref = server_factory("etcd", etcd_bin)
    tgt = server_factory(tgt_kind, tgt_bin)
    start_servers([ref, tgt])
    return ref, tgt


def both(pair, fn):
    return [fn(s.client_addr) for s in pair]


def post(addr: str, path: str, body) -> tuple:
    s = Stream(addr, path, json.dumps(body).encode() if not isinstance(body, bytes) else body)
    try:
        s.read_head()
        return s.summary(), norm(s.chunk() or "")
    finally:
        s.close()


def check(diffs: list, what: str, ref, tgt) -> None:
    if ref != tgt:
        diffs.append(f"{what}\n  etcd:   {ref!r}\n  target: {tgt!r}")


def test_watch_and_keepalive_streams(pair):
    diffs: list[str] = []
    ref, tgt = pair

    def run(what, fn):
        r, t = both(pair, fn)
        check(diffs, what, r, t)
        return r, t

    run("put foo", lambda a: post(a, "/v3/kv/put", {"key": b64("foo"), "value": b64("bar")}))

    # History: created, then the past event; the stream stays open.
    def history(a):
        s = Stream(a, "/v3/watch", json.dumps(
            {"create_request": {"key": b64("foo"), "start_revision": 1, "prev_kv": True}}).encode())
        try:
            s.read_head()
            return s.summary(), s.lines(2)
        finally:
            s.close()
    run("watch from history", history)

    # Live events on a prefix watch with prev_kv, and a second request in the body.
    opened = []
    for s in pair:
        w = Stream(s.client_addr, "/v3/watch", (
            json.dumps({"create_request": {"key": b64("a"), "range_end": b64("b"), "prev_kv": True}})
            + "\n" + json.dumps({"create_request": {"key": b64("zz"), "watch_id": 5}})).encode())
        w.read_head()
        opened.append((w, w.lines(2)))
    check(diffs, "live watch: created", *[(w.summary(), lines) for w, lines in opened])
    for s in pair:
        post(s.client_addr, "/v3/kv/put", {"key": b64("a/1"), "value": b64("x")})
        post(s.client_addr, "/v3/kv/put", {"key": b64("a/1"), "value": b64("y")})
        post(s.client_addr, "/v3/kv/deleterange", {"key": b64("a/1")})
    check(diffs, "live watch: events", *[w.lines(3) for w, _ in opened])
    for w, _ in opened:
        w.close()

    # Create errors, cancel, progress.
    run("inverted range", lambda a: _first_lines(
        a, {"create_request": {"key": b64("b"), "range_end": b64("a")}}, 1))
    run("cancel", lambda a: _first_lines(a, (
        json.dumps({"create_request": {"key": b64("c"), "watch_id": "7"}})
        + json.dumps({"cancel_request": {"watch_id": "7"}})).encode(), 2))
    run("progress request", lambda a: _first_lines(a, {"progress_request": {}}, 1))
    run("watch: not an object", lambda a: post(a, "/v3/watch", b"[]"))
    # Decoding errors: etcd's text comes from Go; compare status and code.
    for body in (b"{bad", b'{"create_request":{"key":5}}'):
        run(f"watch: {body!r}", lambda a: _status_code(a, "/v3/watch", body))
    # Over the gRPC receive limit (1.5 MiB + 512 KiB): a stream error, HTTP 429.
    big = json.dumps({"create_request": {"key": b64(b"k" * (2200 * 1024))}}).encode()
    run("watch: too large", lambda a: _first_lines(a, big, 2))
    # No request: etcd sends nothing at all until the client goes away.
    run("watch: empty body", _silent)

    # Keepalive: one answer per request, then the stream ends.
    run("grant", lambda a: post(a, "/v3/lease/grant", {"TTL": 60, "ID": 4660}))
    run("keepalive", lambda a: _first_lines(a, b'{"ID":4660}{"ID":"4660"}', 3, "/v3/lease/keepalive"))
    run("keepalive unknown lease", lambda a: _first_lines(a, {"ID": 999}, 2, "/v3/lease/keepalive"))
    run("keepalive no ID", lambda a: _first_lines(a, {}, 2, "/v3/lease/keepalive"))
    run("keepalive empty body", lambda a: _first_lines(a, b"", 1, "/v3/lease/keepalive"))
    run("keepalive: bad JSON", lambda a: _status_code(a, "/v3/lease/keepalive", b"{bad"))
    run("keepalive under /v3/kv/lease", lambda a: post(a, "/v3/kv/lease/keepalive", {"ID": 4660}))

    # Robustness of the other routes: wrong method, unknown route, unknown field.
    run("GET /v3/watch", lambda a: _method(a, "GET", "/v3/watch"))
    run("GET /v3/kv/range", lambda a: _method(a, "GET", "/v3/kv/range"))
    run("unknown route", lambda a: post(a, "/v3/nope", {}))
    run("unknown field", lambda a: post(a, "/v3/kv/range", {"key": b64("foo"), "nope": 1}))
    run("range: too large", lambda a: _status_code(
        a, "/v3/kv/range", json.dumps({"key": b64(b"k" * (2200 * 1024))}).encode()))
    assert not diffs, "\n\n".join(diffs)


def _first_lines(addr: str, body, n: int, path: str = "/v3/watch"):
    s = Stream(addr, path, body if isinstance(body, bytes) else json.dumps(body).encode())
    try:
        s.read_head()
        return s.summary(), s.lines(n)
    finally:
        s.close()


def _status_code(addr: str, path: str, body: bytes):
    s = Stream(addr, path, body)
    try:
        s.read_head()
        data = json.loads(s.chunk() or "null")
        return s.status, sorted(data), data.get("code")
    finally:
        s.close()


def _method(addr: str, method: str, path: str):
    s = Stream(addr, path, b"", method=method)
    try:
        s.read_head()
        return s.status, s.chunk()
    finally:
        s.close()


def _silent(addr: str):
    s = Stream(addr, "/v3/watch", b"")
    s.sock.settimeout(1.0)
    try:
        s.read_head()
        return "answered", s.status
    except (socket.timeout, TimeoutError):
        return "silent"
    finally:
        s.close()


# ---------------------------------------------------------------------------
# etcd3gw, unchanged, against both
# ---------------------------------------------------------------------------

def _event(e) -> dict:
    """An etcd3gw event with its bytes decoded; nothing server-specific in it."""
    return json.loads(json.dumps(e, default=lambda b: b.decode()))


def test_etcd3gw_watch_and_refresh(pair):
    etcd3gw = pytest.importorskip("etcd3gw")
    clients = [etcd3gw.client(host="127.0.0.1", port=s.client_port, timeout=10) for s in pair]
    diffs: list[str] = []

    def each(fn):
        out = []
        for c in clients:
            try:
                out.append(("ok", fn(c)))
            except Exception as e:  # compared by type and message
                out.append(("error", type(e).__name__, str(e)))
        return out

    def run(what, fn):
        r, t = each(fn)
        check(diffs, what, r, t)
        return r

    def watch_events(c, start, n, writes, **kw):
        events, cancel = start(c, **kw)
        try:
            for k, v in writes:
                c.put(k, v) if v is not None else c.delete(k)
            got = []
            for e in events:
                got.append(_event(e))
                if len(got) == n:
                    break
            return got
        finally:
            cancel()

    run("put k", lambda c: c.put("k", "0"))
    r = run("watch", lambda c: watch_events(
        c, lambda c, **kw: c.watch("k", **kw), 3, [("k", "1"), ("other", "x"), ("k", "2"), ("k", None)]))
    assert r[0] == "ok" and [e["kv"]["value"] for e in r[1][:2]] == ["1", "2"], r
    run("watch prev_kv", lambda c: watch_events(
        c, lambda c, **kw: c.watch("k", **kw), 2, [("k", "3"), ("k", None)], prev_kv=True))
    run("watch from history", lambda c: watch_events(
        c, lambda c, **kw: c.watch("k", **kw), 4, [], start_revision=2))
    run("watch_prefix", lambda c: watch_events(
        c, lambda c, **kw: c.watch_prefix("p/", **kw), 3,
        [("p/1", "a"), ("q", "b"), ("p/2", "c"), ("p/1", None)]))
    run("watch NOPUT", lambda c: watch_events(
        c, lambda c, **kw: c.watch_prefix("p/", **kw), 1, [("p/3", "d"), ("p/3", None)],
        filters=["NOPUT"]))

    def once(c):
        t = threading.Timer(0.3, lambda: c.put("once", "v"))
        t.start()
        try:
            return _event(c.watch_once("once", timeout=5))
        finally:
            t.cancel()
    run("watch_once", once)
    r = run("watch_once timeout", lambda c: c.watch_once("never", timeout=0.5))
    assert r[:2] == ("error", "WatchTimedOut"), r
    run("watch_once history", lambda c: _event(c.watch_once("k", timeout=5, start_revision=1)))

    # Leases: ids are chosen by each server, so compare TTLs only.
    leases = [c.lease(ttl=60) for c in clients]
    check(diffs, "refresh", *[lease.refresh() for lease in leases])
    check(diffs, "ttl", *[lease.ttl() in (59, 60) for lease in leases])
    for c, lease in zip(clients, leases):
        c.put("leased", "v", lease=lease)
    check(diffs, "keys", *[lease.keys() for lease in leases])
    check(diffs, "revoke", *[lease.revoke() for lease in leases])
    r = [lease.refresh() for lease in leases]
    check(diffs, "refresh revoked", *r)
    assert r[0] == -1, r
    check(diffs, "leased key gone", *[c.get("leased") for c in clients])
    # A lease refreshed by etcd3gw keeps its key past the original TTL.
    short = [c.lease(ttl=2) for c in clients]
    for c, lease in zip(clients, short):
        c.put("short", "v", lease=lease)
    for _ in range(3):
        time.sleep(1)
        check(diffs, "refresh short", *[lease.refresh() for lease in short])
    r = [c.get("short") for c in clients]
    check(diffs, "refreshed key kept", *r)
    assert r[0] == [b"v"], r
    assert not diffs, "\n\n".join(diffs)
