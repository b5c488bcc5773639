"""A concurrent KV workload over the JSON gateway that records a history for
lincheck, and the acknowledged writes for an "every acknowledged write is
present" check.

Each client thread loops over operations on a handful of register keys
(`<prefix>r/0` ... `r/N-1`), sending each to the next member's client URL in
turn (so every member serves every kind of request):

- get:  POST /v3/kv/range, linearizable (the default: serializable=false);
- put:  POST /v3/kv/put with a value unique to this write;
- cas:  POST /v3/kv/txn: compare value == expected (or create_revision == 0
        for "absent"), then put a unique value, else range the key, so a
        failed cas also records what the key held (lincheck `observed`);
- ack:  put of a key unique to this write (`<prefix>ack/<client>-<n>`),
        never overwritten: each acknowledged one must be on every member at
        the end (`check_acked`).

Outcomes: a 200 answer is a definite outcome. A refused connection means the
request never reached a server: the op is dropped. Anything else on a write
(timeout, reset, an HTTP error such as "request timed out" or "leader
changed") is an unknown outcome: recorded with complete=None. A read that
fails is dropped (it observed nothing).

Times are time.monotonic() taken just before sending and just after the
answer, so the recorded interval contains the real one.
"""

from __future__ import annotations

import collections
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence, Union

from cluster import b64, unb64
from lincheck import CAS, GET, PUT, Op, dump_jsonl


class Refused(Exception):
    """The request certainly did not reach a server."""


class Failed(Exception):
    """No definite answer (timeout, reset, HTTP error): outcome unknown."""


def _post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            detail = e.read()[:300].decode("utf-8", "replace")
        except OSError:
            detail = ""
        raise Failed(f"HTTP {e.code} {detail}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ConnectionRefusedError):
            raise Refused(str(e.reason)) from None
        raise Failed(repr(e.reason)) from None
    except ConnectionRefusedError as e:
        raise Refused(str(e)) from None
    except (OSError, socket.timeout, ValueError) as e:   # reset, timeout, bad JSON
        raise Failed(repr(e)) from None


Endpoints = Union[Sequence[str], Callable[[], Sequence[str]]]


class Workload:
    """Start with `start()`, stop with `stop()`; then `history` (lincheck Ops),
    `acked` / `maybe` (unique keys written), `stats`."""

    def __init__(self, endpoints: Endpoints, *, prefix: str = "/w/", keys: int = 5,
                 clients: int = 6, timeout: float = 1.0, think: float = 0.002,
                 seed: int = 0, mix: Optional[dict[str, float]] = None):
        self._endpoints = endpoints
        self.prefix = prefix
        self.keys = [f"{prefix}r/{i}" for i in range(keys)]
        self.n_clients = clients
        self.timeout = timeout
        self.think = think
        self.seed = seed
        self.mix = mix or {"get": 0.4, "put": 0.25, "cas": 0.25, "ack": 0.1}
        self.history: list[Op] = []
        self.acked: dict[str, str] = {}      # unique key -> value, acknowledged
        self.maybe: dict[str, str] = {}      # unique key -> value, unknown outcome
        self.stats: collections.Counter = collections.Counter()
        self.errors: collections.Counter = collections.Counter()
        self.acks: list[float] = []          # completion times of acknowledged writes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = self.stopped = 0.0

    def endpoints(self) -> list[str]:
        e = self._endpoints
        return list(e() if callable(e) else e)

    def set_endpoints(self, endpoints: Endpoints) -> None:
        self._endpoints = endpoints

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "Workload":
        self.started = time.monotonic()
        for c in range(self.n_clients):
            t = threading.Thread(target=self._client, args=(c,), name=f"workload-{c}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> "Workload":
        if self._stop.is_set():
            return self
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 10)
        self.stopped = time.monotonic()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- one client ----------------------------------------------------------
    def _client(self, c: int) -> None:
        rng = random.Random(self.seed * 1000 + c)
        kinds, weights = zip(*self.mix.items())
        last: dict[str, Optional[str]] = {}     # what this client last saw per key
        n = 0
        turn = c
        while not self._stop.is_set():
            eps = self.endpoints()
            if not eps:
                time.sleep(0.05)
                continue
            url = eps[turn % len(eps)]
            turn += 1
            n += 1
            kind = rng.choices(kinds, weights)[0]
            key = rng.choice(self.keys)
            val = f"c{c}-{n}"
            try:
                if kind == "get":
                    self._get(c, url, key, last)
                elif kind == "put":
                    self._put(c, url, key, val, last)
                elif kind == "cas":
                    self._cas(c, url, key, last.get(key), val, last)
                else:
                    self._ack(c, url, f"{self.prefix}ack/{val}", val)
            except Exception as e:  # a bug here must not silently stop a client
                with self._lock:
                    self.errors[f"client crash: {e!r}"] += 1
                raise
            if self.think:
                time.sleep(self.think * rng.random() * 2)

    def _record(self, op: Optional[Op], outcome: str, err: str = "") -> None:
        with self._lock:
            if op is not None:
                self.history.append(op)
            self.stats[outcome] += 1
            if err:
                self.errors[err[:120]] += 1

    def _get(self, c, url, key, last) -> None:
        t0 = time.monotonic()
        try:
            r = _post(url + "/v3/kv/range", {"key": b64(key)}, self.timeout)
        except (Refused, Failed) as e:
            self._record(None, "get dropped", str(e))
            return
        t1 = time.monotonic()
        kvs = r.get("kvs") or []
        v = unb64(kvs[0].get("value")) if kvs else None
        last[key] = v
        self._record(Op(c, GET, key, result=v, where=url, invoke=t0, complete=t1), "get ok")

    def _put(self, c, url, key, val, last) -> None:
        t0 = time.monotonic()
        try:
            _post(url + "/v3/kv/put", {"key": b64(key), "value": b64(val)}, self.timeout)
        except Refused as e:
            self._record(None, "put refused", str(e))
            return
        except Failed as e:
            self._record(Op(c, PUT, key, value=val, where=url, invoke=t0, complete=None), "put unknown", str(e))
            last.pop(key, None)
            return
        t1 = time.monotonic()
        last[key] = val
        with self._lock:
            self.acks.append(t1)
        self._record(Op(c, PUT, key, value=val, where=url, invoke=t0, complete=t1), "put ok")

    def _cas(self, c, url, key, expected, val, last) -> None:
        if expected is None:
            cmp = {"key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
        else:
            cmp = {"key": b64(key), "target": "VALUE", "result": "EQUAL", "value": b64(expected)}
        body = {"compare": [cmp],
                "success": [{"request_put": {"key": b64(key), "value": b64(val)}}],
                "failure": [{"request_range": {"key": b64(key)}}]}
        t0 = time.monotonic()
        try:
            r = _post(url + "/v3/kv/txn", body, self.timeout)
        except Refused as e:
            self._record(None, "cas refused", str(e))
            return
        except Failed as e:
            self._record(Op(c, CAS, key, value=val, expected=expected, where=url, invoke=t0, complete=None),
                         "cas unknown", str(e))
            last.pop(key, None)
            return
        t1 = time.monotonic()
        ok = bool(r.get("succeeded", False))
        op = Op(c, CAS, key, value=val, expected=expected, result=ok, where=url, invoke=t0, complete=t1)
        if ok:
            last[key] = val
            with self._lock:
                self.acks.append(t1)
        else:
            resp = (r.get("responses") or [{}])[0].get("response_range", {})
            kvs = resp.get("kvs") or []
            op.observed = unb64(kvs[0].get("value")) if kvs else None
            last[key] = op.observed
        self._record(op, "cas ok" if ok else "cas failed")

    def _ack(self, c, url, key, val) -> None:
        try:
            _post(url + "/v3/kv/put", {"key": b64(key), "value": b64(val)}, self.timeout)
        except Refused as e:
            self._record(None, "ack refused", str(e))
            return
        except Failed as e:
            with self._lock:
                self.maybe[key] = val
            self._record(None, "ack unknown", str(e))
            return
        with self._lock:
            self.acked[key] = val
            self.acks.append(time.monotonic())
        self._record(None, "ack ok")

    # -- checks ------------------------------------------------------------
    def acked_writes(self) -> int:
        return self.stats["put ok"] + self.stats["cas ok"] + self.stats["ack ok"]

    def check_acked(self, stored: dict[str, str]) -> list[str]:
        """Problems with one member's copy of `<prefix>ack/` (as
        Member.range_prefix returns it): acknowledged keys missing or with
        another value, and keys that were never written."""
        problems = []
        for k, v in sorted(self.acked.items()):
            if k not in stored:
                problems.append(f"acknowledged write {k}={v} missing")
            elif stored[k] != v:
                problems.append(f"acknowledged write {k}={v} reads {stored[k]!r}")
        for k in sorted(set(stored) - set(self.acked) - set(self.maybe)):
            problems.append(f"{k}={stored[k]!r} was never written")
        return problems

    def max_ack_gap(self, start: float, end: float) -> float:
        """Longest time without any acknowledged write within [start, end]."""
        ts = sorted(t for t in self.acks if start <= t <= end)
        pts = [start, *ts, end]
        return max(b - a for a, b in zip(pts, pts[1:]))

    def summary(self) -> str:
        s = ", ".join(f"{k}: {v}" for k, v in sorted(self.stats.items()))
        e = "; ".join(f"{v}x {k}" for k, v in self.errors.most_common(6))
        dur = (self.stopped or time.monotonic()) - self.started
        return (f"{len(self.history)} ops in history over {dur:.1f} s ({s})"
                + (f"\n  errors: {e}" if e else ""))

    def dump(self, path) -> None:
        """Write the history as JSON lines (`python3 e2e/lincheck.py PATH` re-checks it)."""
        dump_jsonl(self.history, path)


def bulk_put(urls: Sequence[str], n: int, prefix: str, threads: int = 4,
             timeout: float = 5.0) -> dict[str, str]:
    """Put n distinct keys `<prefix><i>` through `urls` (round robin), from
    `threads` threads on persistent HTTP connections; each put is one Raft
    entry. Every put must be acknowledged (raises otherwise). Returns the
    key -> value map written."""
    import http.client
    from urllib.parse import urlsplit

    written: dict[str, str] = {}
    lock = threading.Lock()
    errors: list[str] = []

    def run(t: int) -> None:
        conns: dict[str, http.client.HTTPConnection] = {}
        for i in range(t, n, threads):
            url = urls[i % len(urls)]
            k, v = f"{prefix}{i:06d}", f"v{i}"
            body = json.dumps({"key": b64(k), "value": b64(v)})
            for attempt in range(2):    # a stale keep-alive connection: reconnect once
                u = urlsplit(url)
                conn = conns.get(url) or http.client.HTTPConnection(u.hostname, u.port,
                                                                    timeout=timeout)
                conns[url] = conn
                try:
                    conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    if resp.status != 200:
                        raise OSError(f"HTTP {resp.status} {data[:200]!r}")
                    break
                except (OSError, http.client.HTTPException) as e:
                    conn.close()
                    conns.pop(url, None)
                    if attempt == 1:
                        with lock:
                            errors.append(f"put {k} via {url}: {e!r}")
                        return
            with lock:
                written[k] = v
        for c in conns.values():
            c.close()

    ts = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise AssertionError(f"{len(errors)} bulk puts failed; first: {errors[0]}")
    return written
