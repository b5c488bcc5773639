"""Unit tests of the linearizability checker (no server needed)."""

from __future__ import annotations

import random
import time

import pytest

from lincheck import CAS, GET, PUT, Op, cas, check, get, put


def ok(history):
    res = check(history)
    assert res.ok is True, res.explain()
    return res


def bad(history):
    res = check(history)
    assert res.ok is False, "expected a violation, checker said: " + res.explain()
    return res


# -- hand-made histories ------------------------------------------------------

def test_sequential():
    ok([put(0, "x", "1", 0, 1), get(0, "x", "1", 2, 3), cas(0, "x", "1", "2", True, 4, 5),
        cas(0, "x", "1", "3", False, 6, 7), get(0, "x", "2", 8, 9)])


def test_read_of_absent_key_then_write():
    ok([get(0, "x", None, 0, 1), put(1, "x", "a", 2, 3), get(0, "x", "a", 4, 5)])


def test_stale_read():
    res = bad([put(0, "x", "1", 0, 1), put(0, "x", "2", 2, 3), get(1, "x", "1", 4, 5)])
    r = res.keys["x"]
    assert r.stuck is not None and r.stuck.kind == GET and r.stuck.result == "1"
    assert [o.value for o in r.prefix] == ["1", "2"]
    text = res.explain()
    assert "key 'x'" in text and "get('x')" in text and "longest linearizable prefix: 2" in text


def test_lost_write():
    # an acknowledged write that a later read does not see, nothing else wrote
    bad([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, 3), get(2, "x", "1", 4, 5)])
    bad([put(0, "x", "1", 0, 1), get(2, "x", None, 4, 5)])


def test_read_of_never_written_value():
    bad([put(0, "x", "1", 0, 1), get(1, "x", "zzz", 0.5, 2)])


def test_cas_anomalies():
    # two CAS from the same expected value both succeed
    bad([put(0, "x", "0", 0, 1), cas(1, "x", "0", "a", True, 2, 4), cas(2, "x", "0", "b", True, 2, 4)])
    # CAS reports failure although the value matched and nobody else wrote
    bad([put(0, "x", "0", 0, 1), cas(1, "x", "0", "a", False, 2, 3)])
    # CAS on an absent key reports success, then a read sees the old value
    bad([put(0, "x", "0", 0, 1), cas(1, "x", None, "a", True, 2, 3)])
    # CAS success invisible to a later read
    bad([put(0, "x", "0", 0, 1), cas(1, "x", "0", "a", True, 2, 3), get(0, "x", "0", 4, 5)])


def test_cas_fine():
    ok([cas(0, "x", None, "a", True, 0, 1), cas(1, "x", None, "b", False, 2, 3),
        cas(1, "x", "a", "b", True, 4, 5), get(2, "x", "b", 6, 7)])
    # concurrent CAS race: exactly one winner, either order
    ok([put(0, "x", "0", 0, 1), cas(1, "x", "0", "a", False, 2, 4), cas(2, "x", "0", "b", True, 2, 4),
        get(0, "x", "b", 5, 6)])


def test_concurrent_overlaps_are_fine():
    # a read overlapping a write may see either value; two overlapping reads
    # may see new then old only if the write overlaps both and order allows
    ok([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, 10), get(2, "x", "2", 3, 4),
        get(3, "x", "2", 5, 6)])
    ok([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, 10), get(2, "x", "1", 3, 4),
        get(3, "x", "2", 5, 6)])
    # the write is linearized before the first read, so the later read cannot go back
    bad([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, 10), get(2, "x", "2", 3, 4),
         get(3, "x", "1", 5, 6)])
    # touching intervals count as concurrent
    ok([put(0, "x", "1", 0, 1), get(1, "x", None, 1, 2)])
    # reads that complete in reverse order of the writes they saw
    ok([put(0, "x", "1", 0, 5), put(1, "x", "2", 0, 5), get(2, "x", "2", 1, 6), get(3, "x", "1", 0, 7)])


def test_unknown_outcome_both_ways():
    # a timed-out write that later turns out to have happened ...
    ok([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, None), get(2, "x", "2", 10, 11)])
    # ... or not
    ok([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, None), get(2, "x", "1", 10, 11)])
    # ... but it cannot take effect before it was invoked
    bad([put(0, "x", "1", 0, 1), get(2, "x", "2", 1.1, 1.9), put(1, "x", "2", 2, None)])
    # and once observed it cannot be un-done
    bad([put(0, "x", "1", 0, 1), put(1, "x", "2", 2, None), get(2, "x", "2", 10, 11),
         get(2, "x", "1", 12, 13)])
    # an unknown CAS applies only if its comparison held at its linearization point
    ok([put(0, "x", "0", 0, 1), cas(1, "x", "0", "a", None, 2, None), get(2, "x", "a", 10, 11)])
    ok([put(0, "x", "0", 0, 1), cas(1, "x", "0", "a", None, 2, None), get(2, "x", "0", 10, 11)])
    bad([put(0, "x", "1", 0, 1), cas(1, "x", "0", "a", None, 2, None), get(2, "x", "a", 10, 11)])
    # an unknown get tells nothing
    ok([put(0, "x", "1", 0, 1), get(1, "x", "garbage", 2, None)])


def test_keys_are_independent_and_reported():
    res = bad([put(0, "a", "1", 0, 1), get(0, "a", "1", 2, 3),
               put(0, "b", "1", 0, 1), get(1, "b", None, 2, 3)])
    assert res.keys["a"].ok is True and res.keys["b"].ok is False
    assert "key 'b'" in res.explain() and "key 'a'" not in res.explain()


def test_rejects_malformed():
    with pytest.raises(ValueError):
        check([put(0, "x", "1", 2, 1)])


# -- randomized ---------------------------------------------------------------

def generate(seed: int, n_ops: int, n_keys: int = 5, n_clients: int = 10,
             unknown_rate: float = 0.02, observe_failed_cas: bool = True):
    """A history from a real sequential execution: each client issues ops
    back to back with random durations; each op takes effect at a random
    instant inside its interval; the ops are then executed in the order of
    those instants to compute the results. Some writes get an unknown outcome
    (complete=None): half of them took effect, half did not. A failed cas
    records the value it saw (like the workload's txn else branch) unless
    observe_failed_cas is False."""
    rng = random.Random(seed)
    keys = [f"k{i}" for i in range(n_keys)]
    ops = []  # (lin point, op, applied?)
    clock = [rng.random() for _ in range(n_clients)]
    seq = 0
    for i in range(n_ops):
        c = min(range(n_clients), key=lambda j: clock[j])
        invoke = clock[c]
        dur = rng.expovariate(1.0) + 0.01
        complete = invoke + dur
        lin = rng.uniform(invoke, complete)
        clock[c] = complete + rng.random() * 0.2
        key = rng.choice(keys)
        seq += 1
        r = rng.random()
        if r < 0.45:
            op = Op(c, GET, key, invoke=invoke, complete=complete)
        elif r < 0.75:
            op = Op(c, PUT, key, value=f"v{seq}", invoke=invoke, complete=complete)
        else:
            op = Op(c, CAS, key, value=f"v{seq}", invoke=invoke, complete=complete)
        applied = True
        if op.kind != GET and rng.random() < unknown_rate:
            op.complete = None
            applied = rng.random() < 0.5
            clock[c] = complete + 5   # the client gave up after a timeout
        ops.append((lin, op, applied))
    state: dict[str, str | None] = {}
    recent: dict[str, list] = {k: [] for k in keys}
    for lin, op, applied in sorted(ops, key=lambda t: t[0]):
        cur = state.get(op.key)
        if op.kind == CAS and op.expected is None:
            # pick the expected value: usually the current one, sometimes a stale one
            hist = recent[op.key]
            op.expected = cur if (rng.random() < 0.6 or not hist) else rng.choice(hist[-4:])
        if not applied:
            continue
        if op.kind == GET:
            op.result = cur
        elif op.kind == PUT:
            state[op.key] = op.value
        else:
            op.result = cur == op.expected
            if not op.result and observe_failed_cas:
                op.observed = cur
            if op.result:
                state[op.key] = op.value
        if op.kind != GET and state.get(op.key) != cur:
            recent[op.key].append(cur)
    return [op for _, op, _ in sorted(ops, key=lambda t: t[1].invoke)]


@pytest.mark.parametrize("seed", range(5))
def test_random_linearizable(seed):
    h = generate(seed, 2000)
    ok(h)


@pytest.mark.parametrize("seed", range(5))
def test_random_mutated_read_fails(seed):
    h = generate(100 + seed, 2000)
    rng = random.Random(seed)
    reads = [o for o in h if o.kind == GET and o.complete is not None]
    victim = rng.choice(reads)
    victim.result = "never-written"
    res = bad(h)
    assert res.keys[victim.key].ok is False
    assert "never-written" in res.explain()


def _stale_candidates(h):
    """(read, stale value) pairs where the stale value provably cannot be read:
    it was written by w0, and an effective write w1 of another value started
    after w0 completed and completed before the read started."""
    out = []
    by_key: dict[str, list[Op]] = {}
    for o in h:
        by_key.setdefault(o.key, []).append(o)
    for key, ops in by_key.items():
        writes = [o for o in ops if o.complete is not None and
                  (o.kind == PUT or (o.kind == CAS and o.result))]
        for r in ops:
            if r.kind != GET or r.complete is None:
                continue
            for w1 in writes:
                if w1.complete >= r.invoke:
                    continue
                for w0 in writes:
                    if w0.complete < w1.invoke and w0.value != r.result:
                        out.append((r, w0.value))
                        break
                if out and out[-1][0] is r:
                    break
    return out


@pytest.mark.parametrize("seed", range(3))
def test_random_stale_read_fails(seed):
    h = generate(200 + seed, 2000)
    cands = _stale_candidates(h)
    assert cands
    r, stale = random.Random(seed).choice(cands)
    r.result = stale
    bad(h)


def test_big_history_is_fast():
    h = generate(7, 10_000, n_keys=5, n_clients=10)
    t0 = time.monotonic()
    res = ok(h)
    took = time.monotonic() - t0
    assert took < 10, f"10,000 ops took {took:.1f} s"
    reads = [o for o in h if o.kind == GET]
    reads[len(reads) // 2].result = "never-written"
    t0 = time.monotonic()
    bad(h)
    assert time.monotonic() - t0 < 10
    print(f"10,000 ops: linearizable in {took:.2f} s ({res.explain()})")


def test_many_unknown_outcomes_stay_tractable():
    # a fault leaves many writes with unknown outcomes: unobserved ones are
    # pruned, observed ones get a finite deadline (their first observer)
    for seed in range(3):
        h = generate(300 + seed, 3000, n_keys=1, n_clients=6, unknown_rate=0.1)
        t0 = time.monotonic()
        ok(h)
        assert time.monotonic() - t0 < 10


def test_failed_cas_without_observation_disables_pruning():
    # an unobserved unknown put is the only explanation of the failed cas
    ok([put(0, "x", "0", 0, 1), put(1, "x", "u", 2, None), cas(2, "x", "0", "a", False, 3, 4),
        put(0, "x", "b", 5, 6), get(0, "x", "b", 7, 8)])
    # with the observation recorded, the failed cas saw "0": it must have succeeded
    bad([put(0, "x", "0", 0, 1), put(1, "x", "u", 2, None),
         cas(2, "x", "0", "a", False, 3, 4, observed="0")])
    ok([put(0, "x", "0", 0, 1), put(1, "x", "u", 2, None),
        cas(2, "x", "0", "a", False, 3, 4, observed="u")])


def test_observed_unknown_write_must_precede_its_observer():
    ok([put(1, "x", "u", 0, None), get(0, "x", "u", 1, 2), get(0, "x", "u", 3, 4)])
    bad([put(1, "x", "u", 0, None), get(0, "x", "u", 1, 2), put(2, "x", "v", 3, 4),
         get(0, "x", "u", 5, 6)])


def test_jsonl_round_trip(tmp_path):
    from lincheck import dump_jsonl, load_jsonl
    h = generate(9, 500)
    dump_jsonl(h, tmp_path / "h.jsonl")
    back = load_jsonl(tmp_path / "h.jsonl")
    assert [(o.kind, o.key, o.value, o.expected, o.result, o.observed, o.invoke, o.complete)
            for o in back] == \
        [(o.kind, o.key, o.value, o.expected, o.result, o.observed, o.invoke, o.complete)
         for o in h]
    assert check(back).ok is True
