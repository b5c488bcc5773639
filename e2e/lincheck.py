"""Linearizability checker for a key-value register model.

Operations, on string keys and string values:

- ``put(k, v)``                       -> nothing
- ``get(k)``                          -> the value, or ``None`` when absent
- ``cas(k, expected, new)``           -> ``True`` (k held ``expected`` and now holds ``new``)
                                         or ``False`` (nothing changed); ``expected=None``
                                         means "k is absent"

A history is a list of :class:`Op` with the client's monotonic invoke time
and completion time. ``complete=None`` is an *unknown outcome* (a timeout, a
lost connection): the operation may or may not have taken effect, so its
interval extends to +infinity and its result is not known. A ``get`` with an
unknown outcome tells nothing and is ignored.

Algorithm: Wing & Gong's search for a linearization with Lowe's
optimisations, as Porcupine and Knossos implement them:

- call and return events in one doubly linked list sorted by time (a call
  sorts before a return at the same instant: touching intervals count as
  concurrent, the permissive reading);
- depth-first: take the first call event whose operation can be applied to
  the current model state, "lift" its call and return out of the list, push
  it on a stack; meeting a return event means the operation it closes should
  already be linearized: backtrack (pop, unlift, try the next candidate);
- memoisation: the pair (set of linearized operations as a bitset, model
  state) is recorded once reached and never explored twice;
- P-compositionality: a register model is a product of independent
  per-key registers, so each key's sub-history is checked on its own (the
  search is exponential in the worst case; splitting by key keeps it small).

An unknown-outcome operation gets its return event at +infinity: linearizing
it last, after every observation, is the same as it never taking effect. Its
step is total: a ``put`` always applies; a ``cas`` applies when the register
holds ``expected`` and is a no-op otherwise.

On failure, :class:`CheckResult` names the key, the longest linearizable
prefix found (in linearization order) and the operation that could not be
placed after it (the one whose completion forced the backtrack).

Usage::

    from lincheck import Op, check
    res = check(history)
    assert res.ok, res.explain()
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from typing import Any, Hashable, Iterable, Optional

# --------------------------------------------------------------------------
# History
# --------------------------------------------------------------------------

PUT, GET, CAS = "put", "get", "cas"


class _NotObserved:
    def __repr__(self):
        return "NOT_OBSERVED"


NOT_OBSERVED = _NotObserved()


@dataclasses.dataclass
class Op:
    """One client operation.

    kind:     "put" | "get" | "cas"
    key:      the register
    value:    put: the value written; cas: the new value
    expected: cas only: the value compared against (None = key absent)
    result:   get: the value read (None = absent); cas: True/False; put: unused.
              Ignored when the outcome is unknown.
    observed: cas with result False only: the value the key held at the cas
              (None = absent), when the client read it in the same atomic step
              (a txn's else branch); NOT_OBSERVED otherwise. Recording it makes
              a failed cas as informative as a read and lets the checker drop
              unknown-outcome writes nobody ever observed (see _prune).
    invoke / complete: monotonic seconds; complete=None = unknown outcome.
    """

    client: Any
    kind: str
    key: str
    value: Optional[str] = None
    expected: Optional[str] = None
    result: Any = None
    observed: Any = NOT_OBSERVED
    invoke: float = 0.0
    complete: Optional[float] = None
    index: int = -1          # position in the caller's history (set by check())
    where: str = ""          # free-form: e.g. the endpoint the client used

    def describe(self) -> str:
        if self.kind == PUT:
            s = f"put({self.key!r}, {self.value!r})"
        elif self.kind == GET:
            s = f"get({self.key!r})"
        else:
            s = f"cas({self.key!r}, {self.expected!r} -> {self.value!r})"
        if self.complete is None:
            out, end = "unknown outcome", "inf"
        else:
            out = "ok" if self.kind == PUT else repr(self.result)
            if self.kind == CAS and not self.result and self.observed is not NOT_OBSERVED:
                out += f" (held {self.observed!r})"
            end = f"{self.complete:.6f}"
        via = f" via {self.where}" if self.where else ""
        return f"#{self.index} client {self.client}{via}: {s} -> {out}  [{self.invoke:.6f}, {end}]"


def put(client, key, value, invoke, complete) -> Op:
    return Op(client, PUT, key, value=value, invoke=invoke, complete=complete)


def get(client, key, result, invoke, complete) -> Op:
    return Op(client, GET, key, result=result, invoke=invoke, complete=complete)


def cas(client, key, expected, new, ok, invoke, complete, observed=NOT_OBSERVED) -> Op:
    return Op(client, CAS, key, value=new, expected=expected, result=ok, invoke=invoke,
              complete=complete, observed=observed)


# --------------------------------------------------------------------------
# Model: one register; state = current value or None (absent)
# --------------------------------------------------------------------------


def _step(state: Optional[str], op: Op) -> tuple[bool, Optional[str]]:
    """(legal, next state) of applying `op` to a register holding `state`."""
    k = op.kind
    if k == PUT:
        return True, op.value
    if k == GET:
        return op.result == state, state
    # CAS
    holds = state == op.expected
    if op.complete is None:          # unknown outcome: whatever the register says
        return True, (op.value if holds else state)
    if op.result:
        return holds, (op.value if holds else state)
    if op.observed is not NOT_OBSERVED and op.observed != state:
        return False, state
    return not holds, state


# --------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------


@dataclasses.dataclass
class KeyResult:
    key: str
    ok: Optional[bool]                 # None: gave up (time budget)
    ops: int
    prefix: list[Op] = dataclasses.field(default_factory=list)   # longest linearizable prefix
    stuck: Optional[Op] = None          # the op that could not be placed after it
    states_explored: int = 0
    seconds: float = 0.0

    def explain(self, context: int = 12) -> str:
        if self.ok:
            return f"key {self.key!r}: linearizable ({self.ops} ops)"
        if self.ok is None:
            return (f"key {self.key!r}: undecided after {self.states_explored} states "
                    f"({self.seconds:.1f} s budget exhausted, {self.ops} ops)")
        lines = [f"key {self.key!r}: NOT linearizable ({self.ops} ops, "
                 f"{self.states_explored} states explored)",
                 f"longest linearizable prefix: {len(self.prefix)} ops; its last "
                 f"{min(context, len(self.prefix))}, in linearization order:"]
        state: Optional[str] = None
        states = []
        for op in self.prefix:
            state = _step(state, op)[1]
            states.append(state)
        start = max(0, len(self.prefix) - context)
        for op, st in zip(self.prefix[start:], states[start:]):
            lines.append(f"  {op.describe()}   => {st!r}")
        if self.stuck is not None:
            lines.append(f"register then holds {state!r}; this op completed but cannot be "
                         f"placed anywhere after that prefix:")
            lines.append(f"  {self.stuck.describe()}")
        return "\n".join(lines)


@dataclasses.dataclass
class CheckResult:
    ok: Optional[bool]                  # True / False / None (undecided)
    keys: dict[str, KeyResult]
    seconds: float

    @property
    def failures(self) -> list[KeyResult]:
        return [r for r in self.keys.values() if r.ok is not True]

    def explain(self) -> str:
        bad = self.failures
        if not bad:
            return (f"linearizable: {sum(r.ops for r in self.keys.values())} ops over "
                    f"{len(self.keys)} keys in {self.seconds:.2f} s")
        return "\n\n".join(r.explain() for r in bad)


# --------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------


class _Entry:
    __slots__ = ("op", "id", "time", "is_call", "match", "prev", "next")

    def __init__(self, op, id_, t, is_call):
        self.op = op
        self.id = id_
        self.time = t
        self.is_call = is_call
        self.match: Optional[_Entry] = None
        self.prev: Optional[_Entry] = None
        self.next: Optional[_Entry] = None


def _lift(e: _Entry) -> None:
    e.prev.next = e.next
    e.next.prev = e.prev
    m = e.match
    m.prev.next = m.next
    if m.next is not None:
        m.next.prev = m.prev


def _unlift(e: _Entry) -> None:
    m = e.match
    m.prev.next = m
    if m.next is not None:
        m.next.prev = m
    e.prev.next = e
    e.next.prev = e


def _prune(ops: list[Op]) -> list[Op]:
    """Drop what cannot change the verdict.

    - A get with an unknown outcome observed nothing.
    - An unknown-outcome write (put or cas) whose value nobody ever observed
      (no get result, cas `expected` or cas `observed` equals it), provided
      every completed failed cas recorded what it observed. Proof sketch:
      given a linearization with such a write u, remove u. Until the next
      effective write the register held u's value, which no get, successful
      cas or observed failed cas can be linearized against; an unknown cas
      there was a no-op and can move to the end (its interval is unbounded);
      puts overwrite both states alike. Conversely u linearized last, after
      everything, never took effect. Without this, k never-observed unknown
      writes make the search explore up to 2^k subsets of them.
    This is what keeps histories with many timeouts (faults) tractable; a
    value must be unique per write for it to help."""
    ops = [o for o in ops if not (o.kind == GET and o.complete is None)]
    if any(o.kind == CAS and o.complete is not None and not o.result
           and o.observed is NOT_OBSERVED for o in ops):
        return ops
    seen = set()
    for o in ops:
        if o.kind == GET:
            seen.add(o.result)
        elif o.kind == CAS:
            seen.add(o.expected)
            if o.complete is not None and not o.result:
                seen.add(o.observed)
    return [o for o in ops if o.complete is not None or o.kind == GET or o.value in seen]


def _deadlines(ops: list[Op]) -> dict[int, float]:
    """Return times for unknown-outcome writes that were observed.

    If exactly one op writes value w (values unique per write) and some op
    saw the register hold w (a get returning w, a successful cas expecting w,
    a failed cas that observed w), the writer took effect before that op's
    linearization point, so before it completed: its interval can end at the
    earliest such completion instead of +infinity. Same verdicts, far fewer
    states when a fault left many writes with unknown outcomes."""
    writers: dict[str, list[Op]] = {}
    for o in ops:
        if o.kind != GET:
            writers.setdefault(o.value, []).append(o)
    out: dict[int, float] = {}
    for o in ops:
        if o.complete is None:
            continue
        if o.kind == GET:
            w = o.result
        elif o.kind == CAS and o.result:
            w = o.expected
        elif o.kind == CAS and o.observed is not NOT_OBSERVED:
            w = o.observed
        else:
            continue
        ws = writers.get(w)
        if ws and len(ws) == 1 and ws[0].complete is None:
            u = id(ws[0])
            if o.complete > ws[0].invoke and o.complete < out.get(u, math.inf):
                out[u] = o.complete
    return out


def check_key(key: str, ops: list[Op], budget: float = 60.0,
              initial: Optional[str] = None) -> KeyResult:
    """Check one key's sub-history (all ops on `key`)."""
    t0 = time.monotonic()
    ops = _prune(ops)
    deadlines = _deadlines(ops)
    events = []
    for i, o in enumerate(ops):
        c = _Entry(o, i, o.invoke, True)
        end = o.complete if o.complete is not None else deadlines.get(id(o), math.inf)
        r = _Entry(o, i, end, False)
        c.match = r
        events.append(c)
        events.append(r)
    # calls before returns at equal times (touching intervals are concurrent)
    events.sort(key=lambda e: (e.time, not e.is_call))
    head = _Entry(None, -1, -math.inf, False)
    prev = head
    for e in events:
        prev.next = e
        e.prev = prev
        prev = e

    state = initial
    linearized = 0
    cache: set[tuple[int, Hashable]] = set()
    stack: list[tuple[_Entry, Optional[str]]] = []
    best_len, best_prefix, best_stuck = -1, [], None
    explored = 0
    entry = head.next
    deadline = t0 + budget
    while head.next is not None:
        if entry.is_call:
            legal, nstate = _step(state, entry.op)
            if legal:
                nlin = linearized | (1 << entry.id)
                sig = (nlin, nstate)
                if sig not in cache:
                    cache.add(sig)
                    explored += 1
                    if not explored & 0xFFF and time.monotonic() > deadline:
                        return KeyResult(key, None, len(ops), states_explored=explored,
                                         seconds=time.monotonic() - t0)
                    stack.append((entry, state))
                    state, linearized = nstate, nlin
                    _lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            # A return event: its op had to be linearized by now. Backtrack.
            if len(stack) > best_len:
                best_len = len(stack)
                best_prefix = [e.op for e, _ in stack]
                best_stuck = entry.op
            if not stack:
                return KeyResult(key, False, len(ops), best_prefix, best_stuck, explored,
                                 time.monotonic() - t0)
            top, state = stack.pop()
            linearized &= ~(1 << top.id)
            _unlift(top)
            entry = top.next
    return KeyResult(key, True, len(ops), states_explored=explored, seconds=time.monotonic() - t0)


def check(history: Iterable[Op], budget: float = 120.0) -> CheckResult:
    """Check a whole history, key by key. `budget` (seconds) is shared by the
    keys; a key whose search exceeds what is left is reported undecided
    (ok=None), never silently passed."""
    t0 = time.monotonic()
    by_key: dict[str, list[Op]] = {}
    for i, o in enumerate(history):
        o.index = i
        if o.kind not in (PUT, GET, CAS):
            raise ValueError(f"unknown op kind {o.kind!r}")
        if o.complete is not None and o.complete < o.invoke:
            raise ValueError(f"op completes before it is invoked: {o.describe()}")
        by_key.setdefault(o.key, []).append(o)
    results = {}
    for k in sorted(by_key):
        left = max(0.1, budget - (time.monotonic() - t0))
        results[k] = check_key(k, by_key[k], budget=left)
    oks = [r.ok for r in results.values()]
    ok: Optional[bool] = True
    if any(x is False for x in oks):
        ok = False
    elif any(x is None for x in oks):
        ok = None
    return CheckResult(ok, results, time.monotonic() - t0)


# --------------------------------------------------------------------------
# Histories on disk (one JSON object per line), and a command line
# --------------------------------------------------------------------------


def dump_jsonl(history: Iterable[Op], path) -> None:
    """Write a history, one op a line; `observed` is omitted when not observed."""
    with open(path, "w") as f:
        for o in history:
            d = {"client": o.client, "kind": o.kind, "key": o.key, "value": o.value,
                 "expected": o.expected, "result": o.result, "invoke": o.invoke,
                 "complete": o.complete, "where": o.where}
            if o.observed is not NOT_OBSERVED:
                d["observed"] = o.observed
            f.write(json.dumps(d) + "\n")


def load_jsonl(path) -> list[Op]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                obs = d.pop("observed", NOT_OBSERVED)
                out.append(Op(**d, observed=obs))
    return out


if __name__ == "__main__":
    # python3 e2e/lincheck.py <history.jsonl>: re-check a saved history.
    if len(sys.argv) != 2:
        sys.exit("usage: lincheck.py HISTORY.jsonl")
    result = check(load_jsonl(sys.argv[1]))
    print(result.explain())
    sys.exit(0 if result.ok else 1)
