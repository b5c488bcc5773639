"""Differential KV test: the same etcdctl commands against a fresh real etcd
and a fresh MetaStore (or, with DIFF_TARGET=etcd, a second real etcd), then
compare exit code, stdout and stderr of every command.

Each test starts its own pair of servers. Every scenario is deterministic:
revision numbers in the comments are what a fresh store (revision 1) reaches.
Only KV, Txn and Compact are used here; leases, watches, members and
maintenance come in their own tests.

etcdctl 3.4 limits (why some brief items are covered differently):
  * `get --count-only` does not exist in etcdctl 3.4 (added in 3.5): covered
    by `count` in -w json everywhere, and by count_only over the JSON gateway
    in test_gateway_kv_extras.
  * a `lease("k") ...` txn compare makes etcdctl 3.4 itself panic ("bad value",
    etcd-io/etcd#20773) before anything is sent: lease compares are covered over
    the JSON gateway in test_gateway_kv_extras.
"""

from __future__ import annotations

import base64
import json

import pytest

from harness import DiffRunner

E_COMPACTED = "etcdserver: mvcc: required revision has been compacted"
E_FUTURE = "etcdserver: mvcc: required revision is a future revision"
E_NO_KEY = "etcdserver: key is not provided"
E_DUP = "etcdserver: duplicate key given in txn request"
E_NO_LEASE = "etcdserver: requested lease not found"
E_KEY_NOT_FOUND = "etcdserver: key not found"
E_TOO_MANY_OPS = "etcdserver: too many operations in txn request"


def big_value(n: int, salt: int) -> str:
    """Deterministic printable value of n chars (never starts with '-')."""
    return "".join(chr(48 + (i * 7 + salt) % 75) for i in range(n))


def ref_revision(d: DiffRunner, key: str = "rev-probe") -> int:
    """Current revision, read (as a compared step) from the reference etcd."""
    r, _ = d.run("get", key, "-w", "json", label="revision probe", expect_rc=0)
    return int(json.loads(r.stdout)["header"]["revision"])


def txn(d: DiffRunner, compares=(), success=(), failure=(), json_out=True, **expect):
    """`etcdctl txn` fed its interactive input on stdin: compares, blank line,
    success ops, blank line, failure ops, blank line."""
    text = "".join(f"{c}\n" for c in compares) + "\n" \
        + "".join(f"{o}\n" for o in success) + "\n" \
        + "".join(f"{o}\n" for o in failure) + "\n"
    args = ["txn", "-w", "json"] if json_out else ["txn"]
    return d.run(*args, stdin=text, label="txn", **expect)


def finish(d: DiffRunner):
    d.check()


# ---------------------------------------------------------------------------
# put / get
# ---------------------------------------------------------------------------

def test_put_and_get(diff: DiffRunner):
    d, r = diff, diff.run
    # Fresh store is at revision 1.
    r("get", "a", "-w", "json", expect_rc=0)
    r("get", "a", expect_rc=0, expect_out="")

    # -- puts, with and without existing keys ----------------------------------
    r("put", "a", "1", expect_out="OK")                          # rev 2
    r("put", "b", "2", "-w", "json")                             # rev 3
    r("put", "c", "3", "--prev-kv")                              # rev 4 (no prev)
    r("put", "c2", "3", "--prev-kv", "-w", "json")               # rev 5 (no prev)
    r("put", "a", "10", "--prev-kv", expect_out="a\n1")          # rev 6
    r("put", "a", "11", "--prev-kv", "-w", "json")               # rev 7
    r("put", "a", "12", "--prev-kv", "-w", "fields")             # rev 8
    r("put", "b", "--ignore-value")                              # rev 9, value stays "2"
    r("put", "b", "--ignore-value", "--prev-kv", "-w", "json")   # rev 10
    r("put", "c", "33", "--ignore-lease")                        # rev 11
    r("put", "c", "--ignore-value", "--ignore-lease", "-w", "json")  # rev 12
    r("put", "c", "34", "--lease=0", "-w", "json")               # rev 13, lease 0 = none
    r("get", "b", "-w", "json", expect_out='"version":3')
    r("get", "c", "-w", "fields")
    r("put", "empty", "")                                        # rev 14, empty value
    r("put", "empty", "", "--prev-kv", "-w", "json")             # rev 15
    r("put", "empty", "x", "--prev-kv")                          # rev 16
    r("put", "empty", "", "--prev-kv", "-w", "fields")           # rev 17
    r("get", "empty", "-w", "json")
    r("get", "empty")
    r("get", "empty", "--print-value-only")

    # -- bad input (nothing below is written) -----------------------------------
    r("put", "missing", "--ignore-value", expect_rc=1, expect_err=E_KEY_NOT_FOUND)
    r("put", "missing", "v", "--ignore-lease", expect_rc=1, expect_err=E_KEY_NOT_FOUND)
    r("put", "missing", "--ignore-value", "--prev-kv", "-w", "json", expect_rc=1)
    r("put", "", "x", expect_rc=1, expect_err=E_NO_KEY)
    r("put", "", "x", "-w", "json", expect_rc=1, expect_err=E_NO_KEY)
    r("put", "k", "v", "--lease=1234abcd", expect_rc=1, expect_err=E_NO_LEASE)
    r("put", "a", "v", "--lease=1234abcd", "--prev-kv", expect_rc=1, expect_err=E_NO_LEASE)
    r("get", "", expect_rc=1, expect_err=E_NO_KEY)
    r("get", "", "-w", "json", expect_rc=1, expect_err=E_NO_KEY)
    r("get", "k", expect_out="")
    assert ref_revision(d) == 17

    # -- a key space for ranges ---------------------------------------------------
    for k, v in [("a/1", "x1"), ("a/2", "x2"), ("a/3", "x3"), ("ab", "ab"), ("b/1", "y1"),
                 ("b/2", "y2"), ("d", "d"), ("a/2", "x2b")]:
        r("put", k, v)                                           # revs 18..25
    r("put", "key with spaces", "value with  spaces ")          # rev 26
    r("put", "ключ", "значение ✓")                              # rev 27
    r("put", "日本語/キー", "値")                                 # rev 28
    r("put", "emoji 🎉", "multi\nline\tvalue")                    # rev 29
    r("put", "z\u00e9\u0301", "combining")                        # rev 30
    big1, big2 = big_value(100 * 1024, 1), big_value(100 * 1024 + 7, 2)
    r("put", "big", big1)                                         # rev 31
    r("put", "big", big2, "--prev-kv", "-w", "json")              # rev 32
    assert ref_revision(d) == 32

    # -- single key, every output form --------------------------------------------
    for fmt in ([], ["-w", "json"], ["-w", "fields"], ["-w", "simple"]):
        r("get", "a", *fmt)
        r("get", "nope", *fmt)
        r("get", "a/", "--prefix", *fmt)
    r("get", "a", "--print-value-only")
    r("get", "a", "--keys-only")
    r("get", "a", "--keys-only", "-w", "json")
    r("get", "a", "--keys-only", "--print-value-only")
    r("get", "a", "--hex")
    r("get", "a", "--hex", "-w", "fields")

    # -- range forms --------------------------------------------------------------
    r("get", "a", "--prefix")                       # a, a/1, a/2, a/3, ab
    r("get", "a", "--prefix", "-w", "json")
    r("get", "", "--prefix", "--keys-only")          # every key
    r("get", "", "--prefix", "-w", "json")
    r("get", "", "--from-key", "--keys-only")        # every key
    r("get", "b", "--from-key", "--keys-only")
    r("get", "b", "--from-key", "-w", "json")
    r("get", "zzz", "--from-key", "-w", "json")       # nothing at or after
    r("get", "a", "c")                               # [a, c)
    r("get", "a", "c", "-w", "json")
    r("get", "a/1", "a/3", "--keys-only")
    r("get", "a", "a")                               # empty interval
    r("get", "b", "a", expect_rc=0, expect_out="")  # inverted range: nothing
    r("get", "b", "a", "-w", "json")
    r("get", "b/", "--prefix", "--print-value-only")
    r("get", "nope/", "--prefix", "-w", "json")

    # -- limit / more / count ---------------------------------------------------
    r("get", "a", "--prefix", "--limit=2", "-w", "json", expect_out='"more":true')
    r("get", "a", "--prefix", "--limit=5", "-w", "json")   # exactly all: more false
    r("get", "a", "--prefix", "--limit=6", "-w", "json")
    r("get", "", "--prefix", "--limit=3")
    r("get", "", "--prefix", "--limit=3", "-w", "fields")
    r("get", "", "--from-key", "--limit=1", "--keys-only", "-w", "json")
    r("get", "a", "c", "--limit=2", "--keys-only", "-w", "json")

    # -- unicode, spaces, big values ---------------------------------------------
    r("get", "key with spaces")
    r("get", "key with spaces", "-w", "json")
    r("get", "ключ", "-w", "json")
    r("get", "ключ", "-w", "fields")
    r("get", "日本語/", "--prefix")
    r("get", "emoji 🎉", "-w", "fields")
    r("get", "emoji 🎉")
    r("get", "z\u00e9\u0301", "-w", "json")
    r("get", "\u00ff", "--from-key", "--keys-only")   # only keys >= U+00FF bytes
    r("get", "big", "--print-value-only")
    r("get", "big", "-w", "json")
    r("get", "big", "--keys-only", "-w", "fields")

    # -- sorting (on a prefix of <= 12 keys, see NOTE below) ---------------------
    # Values, versions, create and mod revisions chosen with ties.
    for k, v in [("s/a", "3"), ("s/b", "1"), ("s/c", "2"), ("s/d", "1"), ("s/b", "9"),
                 ("s/e", "3"), ("s/c", "2"), ("s/a", "0"), ("s/a", "3"), ("s/f", "")]:
        r("put", k, v)
    for target in ("KEY", "VERSION", "CREATE", "MODIFY", "VALUE"):
        for order in ("ASCEND", "DESCEND"):
            r("get", "s/", "--prefix", f"--sort-by={target}", f"--order={order}")
        r("get", "s/", "--prefix", f"--sort-by={target}", "-w", "json")
        r("get", "s/", "--prefix", f"--sort-by={target}", "--order=DESCEND", "--limit=2", "-w", "json")
    r("get", "s/", "--prefix", "--order=DESCEND")
    r("get", "s/", "--prefix", "--order=ASCEND", "--keys-only")
    r("get", "s/", "--prefix", "--sort-by=value", "--order=descend", "--keys-only")
    r("get", "s/a", "s/e", "--sort-by=VERSION", "--order=DESCEND", "--keys-only")
    r("get", "s/", "--from-key", "--sort-by=MODIFY", "--order=DESCEND", "--limit=3", "--keys-only")
    # NOTE: etcd sorts with Go's sort.Sort, which is only stable (ties keep key
    # order) for <= 12 items; over larger ranges only use unique targets.
    r("get", "", "--prefix", "--sort-by=CREATE", "--order=DESCEND", "--keys-only")
    r("get", "", "--prefix", "--sort-by=MODIFY", "--order=ASCEND", "--keys-only", "--limit=4")
    r("get", "", "--prefix", "--sort-by=KEY", "--order=DESCEND", "--keys-only")

    # -- history reads --------------------------------------------------------
    r("get", "a", "--rev=1", expect_out="")             # did not exist yet
    r("get", "a", "--rev=2", expect_out="a\n1")
    r("get", "a", "--rev=5", "-w", "json")
    r("get", "a", "--rev=6")
    r("get", "a", "--rev=7", "-w", "fields")
    r("get", "b", "--rev=9", "-w", "json")             # --ignore-value put
    r("get", "", "--prefix", "--rev=4")                 # a, b, c
    r("get", "", "--from-key", "--rev=13", "-w", "json")
    r("get", "a", "c", "--rev=3", "--keys-only")
    r("get", "a/2", "--rev=24", "-w", "json")
    r("get", "s/", "--prefix", "--rev=40", "--sort-by=VALUE", "--order=DESCEND")
    r("get", "a", "--rev=0", "-w", "json")              # 0 = current
    r("get", "a", "--rev=-1", "-w", "json")             # negative = current too
    cur = ref_revision(d)
    r("get", "a", f"--rev={cur}", "-w", "json")
    r("get", "a", f"--rev={cur + 1}", expect_rc=1, expect_err=E_FUTURE)
    r("get", "a", "--prefix", f"--rev={cur + 1000}", "-w", "json", expect_rc=1, expect_err=E_FUTURE)

    # -- serializable reads ---------------------------------------------------
    r("get", "a", "--consistency=s")
    r("get", "a", "--consistency=s", "-w", "json")
    r("get", "", "--prefix", "--consistency=s", "--keys-only", "--limit=4", "-w", "json")
    r("get", "a", "--consistency=s", "--rev=2")
    r("get", "a", "--consistency=l", "-w", "fields")
    assert ref_revision(d) == cur            # reads never advance the revision
    finish(d)


# ---------------------------------------------------------------------------
# delete
# ---------------------------------------------------------------------------

def test_delete(diff: DiffRunner):
    d, r = diff, diff.run
    for k in ["a", "a/1", "a/2", "a/3", "ab", "b", "b/1", "c", "d", "e/1", "e/2", "f"]:
        r("put", k, "v-" + k)                                     # revs 2..13
    r("del", "a", expect_out="1")                                 # rev 14
    r("del", "a", expect_out="0")                                 # nothing: no new revision
    r("del", "a", "-w", "json")
    r("get", "a", "-w", "json")
    assert ref_revision(d) == 14
    r("del", "a/", "--prefix", "--prev-kv")                       # rev 15: a/1 a/2 a/3
    r("del", "a/", "--prefix", "-w", "json")                      # nothing
    r("del", "b", "c", "-w", "json")                              # rev 16: b, b/1
    r("del", "e", "--from-key", "--prev-kv", "-w", "json")       # rev 17: e/1 e/2 f
    r("del", "zz", "--from-key")                                  # nothing
    r("del", "zzz", "--prev-kv", "-w", "json")                    # nothing
    r("del", "zzz", "--prev-kv", "-w", "fields")
    r("del", "d", "b", "-w", "json")                              # inverted: nothing
    r("del", "", expect_rc=1, expect_err=E_NO_KEY)
    r("del", "", "-w", "json", expect_rc=1, expect_err=E_NO_KEY)
    r("get", "", "--prefix", "-w", "json")                       # ab, c, d
    assert ref_revision(d) == 17

    # Re-create a deleted key: new create_revision, version back to 1.
    r("put", "a", "again", "--prev-kv", "-w", "json")             # rev 18
    r("get", "a", "-w", "json", expect_out='"version":1')
    r("get", "a", "--rev=13", "-w", "json")                       # old generation
    r("get", "a", "--rev=14", "-w", "json")                       # deleted at 14
    r("get", "", "--prefix", "--rev=13", "--keys-only")           # everything before deletes
    r("get", "", "--prefix", "--rev=16", "-w", "json")
    r("del", "a", "--prev-kv", "-w", "fields")                    # rev 19
    r("del", "ab", "--prev-kv")                                   # rev 20
    r("put", "x y", "sp")                                          # rev 21
    r("put", "ключ", "v")                                           # rev 22
    r("del", "x y", "--prev-kv")                                  # rev 23
    r("del", "ключ", "--prev-kv", "-w", "json")                    # rev 24
    r("del", "", "--prefix", "--prev-kv", "-w", "json")           # rev 25: everything left
    r("get", "", "--from-key", "-w", "json")
    r("del", "", "--from-key", "-w", "json")                      # nothing left
    r("get", "c", "--rev=24", "-w", "json")
    assert ref_revision(d) == 25
    finish(d)


# ---------------------------------------------------------------------------
# txn
# ---------------------------------------------------------------------------

def test_txn(diff: DiffRunner):
    d, r = diff, diff.run
    r("put", "k1", "v1")     # rev 2: k1 ver 1, create 2, mod 2
    r("put", "k2", "v2")     # rev 3
    r("put", "k2", "v2b")    # rev 4: k2 ver 2, create 3, mod 4, value v2b
    r("put", "p/1", "p1")    # rev 5
    r("put", "p/2", "p2")    # rev 6

    ok = ("put res ok", "get k1")
    ko = ("put res ko", "get k2")
    cases = [
        # (compare, should succeed)
        ('value("k1") = "v1"', True), ('value("k1") = "nope"', False),
        ('value("k1") != "v1"', False), ('value("k1") != "v0"', True),
        ('value("k1") > "v0"', True), ('value("k1") > "v1"', False),
        ('value("k1") < "v2"', True), ('value("k1") < "v0"', False),
        ('version("k2") = "2"', True), ('version("k2") = "1"', False),
        ('version("k2") != "2"', False), ('version("k2") != "3"', True),
        ('version("k2") > "1"', True), ('version("k2") > "2"', False),
        ('version("k2") < "3"', True), ('version("k2") < "2"', False),
        ('create("k2") = "3"', True), ('create("k2") = "4"', False),
        ('create("k2") != "3"', False), ('create("k2") != "2"', True),
        ('create("k2") > "2"', True), ('create("k2") > "3"', False),
        ('create("k2") < "4"', True), ('create("k2") < "3"', False),
        ('mod("k2") = "4"', True), ('mod("k2") = "3"', False),
        ('mod("k2") != "4"', False), ('mod("k2") != "3"', True),
        ('mod("k2") > "3"', True), ('mod("k2") > "4"', False),
        ('mod("k2") < "5"', True), ('mod("k2") < "4"', False),
        # a key missing from the store: version/create/mod compare as 0,
        # and a value compare on a missing key is always false.
        ('version("nokey") = "0"', True), ('version("nokey") > "0"', False),
        ('create("nokey") = "0"', True), ('create("nokey") != "0"', False),
        ('mod("nokey") = "0"', True), ('mod("nokey") < "1"', True),
        ('value("nokey") != "x"', False), ('value("nokey") > ""', False),
    ]
    for i, (cmp, succeeds) in enumerate(cases):
        if i % 2 == 0:   # alternate -w json and simple output
            want = '"succeeded":true' if succeeds else '"header"'
            txn(d, [cmp], ok, ko, expect_rc=0, expect_out=want)
        else:
            txn(d, [cmp], ok, ko, json_out=False, expect_rc=0,
                expect_out="SUCCESS" if succeeds else "FAILURE")
    r("get", "res", "-w", "json")
    base = ref_revision(d)

    # Several compares: all must hold.
    txn(d, ['value("k1") = "v1"', 'version("k2") = "2"', 'mod("k2") = "4"'],
        ["put multi yes"], ["put multi no"], expect_out='"succeeded":true')
    txn(d, ['value("k1") = "v1"', 'version("k2") = "1"'],
        ["put multi yes2"], ["put multi no2"], json_out=False, expect_out="FAILURE")
    txn(d, ['value("k1") = "v1"', 'version("nokey") = "0"', 'create("k1") = "2"'],
        ["get multi"], [], json_out=False, expect_out="SUCCESS")

    # Ops of every kind in both branches, with options.
    both = ["put t/1 a", "put t/2 b --prev-kv", "get k1", "get p/ --prefix",
            "get p/ --prefix --keys-only --limit=1", "get k --from-key --keys-only",
            "get k1 --rev=2", "del p/1 --prev-kv", "del none", "get t/ --prefix"]
    txn(d, ['value("k1") = "v1"'], both, ["put never 1"])
    txn(d, ['value("k1") = "v1"'], both, ["put never 1"], json_out=False)
    txn(d, ['value("k1") = "zz"'], ["put never 2"],
        ["put t/1 c --prev-kv", "get t/1", "get k2", "put t/9 z", "del t/2 --prev-kv"])
    txn(d, ['value("k1") = "zz"'], ["put never 3"],
        ["del t/9 --prev-kv", "get t/ --prefix", "put u 1"], json_out=False)
    txn(d, [], ["get k1", "put noc 1"], ["put never 4"])     # no compares -> success
    txn(d, [], [], [], expect_out='"succeeded":true')          # empty txn
    txn(d, [], [], [], json_out=False, expect_out="SUCCESS")
    txn(d, ['mod("k1") = "2"'], [], ["put never 5"])           # success, nothing to do
    r0 = ref_revision(d)
    txn(d, ['value("k1") = "v1"'], ["get k1", "get k2"], ["get p/ --prefix"])  # read-only
    txn(d, ['value("k1") = "v0"'], ["get k1"], ["get p/ --prefix", "del nothing"])
    assert ref_revision(d) == r0, "read-only txns and deletes of nothing advance nothing"
    txn(d, [], ["get res --rev=%d" % base, "get k1 --rev=%d" % (r0 + 1)], [],
        expect_rc=1, expect_err=E_FUTURE)                      # future rev inside a txn
    txn(d, ['value("k1") = "v1"'], ["put k1 v1-new --prev-kv", "put k2 v2-new"], [])
    r("get", "k", "--prefix", "-w", "json")                      # both at one revision

    # Bad txns.
    txn(d, [], ["put dup 1", "put dup 2"], [], expect_rc=1, expect_err=E_DUP)
    txn(d, ['value("k1") = "zz"'], ["put dup 1", "put dup 2"], [], expect_rc=1, expect_err=E_DUP)
    txn(d, [], [], ["put dup 1", "put dup 2"], json_out=False, expect_rc=1, expect_err=E_DUP)
    txn(d, [], ["put dup 1", "del dup"], [], expect_rc=1, expect_err=E_DUP)
    txn(d, [], ["del dup", "put dup 1"], [], expect_rc=1, expect_err=E_DUP)
    txn(d, [], ["put y/1 1", "del y/ --prefix"], [], expect_rc=1, expect_err=E_DUP)
    txn(d, [], ["del dup", "del dup --prefix"], [], expect_rc=0)      # overlapping deletes are fine
    txn(d, [], ["put dup 1", "get dup"], [], expect_rc=0)             # get + put of one key is fine
    txn(d, [], ["put dup 2"], ["put dup 3"], expect_rc=0)             # same key in different branches
    txn(d, [], ["put leased 1 --lease=1234abcd"], [], expect_rc=1, expect_err=E_NO_LEASE)
    txn(d, [], [], ["put leased 1 --lease=1234abcd"], expect_rc=0)   # branch not taken
    txn(d, [], ["put missing --ignore-value"], [], expect_rc=1, expect_err=E_KEY_NOT_FOUND)
    txn(d, [], ["put k1 --ignore-value --prev-kv"], [], expect_rc=0)
    txn(d, [], ["put \"\" x"], [], json_out=False)                     # how etcdctl parses it
    txn(d, [], [f"put m/{i} v" for i in range(129)], [], expect_rc=1, expect_err=E_TOO_MANY_OPS)
    txn(d, [], [f"put m/{i} v" for i in range(128)], [], json_out=False, expect_rc=0)
    r("get", "m/", "--prefix", "-w", "json", "--limit=3", "--keys-only")
    r("get", "", "--prefix", "-w", "json", "--keys-only")
    finish(d)


# ---------------------------------------------------------------------------
# compaction
# ---------------------------------------------------------------------------

def test_compaction(diff: DiffRunner):
    d, r = diff, diff.run
    r("compaction", "1", expect_out="compacted revision 1")    # fresh store, rev 1
    r("compaction", "1", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "k", "--rev=1", "-w", "json")
    for i in range(1, 6):
        r("put", "k", f"v{i}")                                  # revs 2..6
    r("put", "other", "o")                                      # rev 7
    r("del", "other")                                           # rev 8
    r("put", "k", "v6")                                         # rev 9
    r("put", "gone", "g")                                       # rev 10
    r("del", "gone")                                            # rev 11
    r("get", "k", "--rev=2", expect_out="v1")

    r("compaction", "3", expect_out="compacted revision 3")
    r("get", "k", "--rev=2", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "k", "--rev=2", "-w", "json", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "", "--prefix", "--rev=1", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "k", "--rev=3", expect_out="v2")                  # the compacted revision itself
    r("get", "k", "--rev=4", "-w", "json")
    r("get", "k", "--rev=0", "-w", "json")
    r("compaction", "3", expect_rc=1, expect_err=E_COMPACTED)  # again, same revision
    r("compaction", "2", expect_rc=1, expect_err=E_COMPACTED)  # older revision
    r("compaction", "0", expect_rc=1, expect_err=E_COMPACTED)
    r("compaction", "12", expect_rc=1, expect_err=E_FUTURE)    # current is 11
    r("compaction", "1000", expect_rc=1, expect_err=E_FUTURE)
    txn(d, [], ["get k --rev=2"], [], expect_rc=1, expect_err=E_COMPACTED)

    r("compaction", "5", "--physical", expect_out="compacted revision 5")
    r("get", "k", "--rev=4", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "k", "--rev=5", "-w", "json")
    r("get", "other", "--rev=7", "-w", "json")                 # still in history
    r("get", "other", "--rev=8", "-w", "json")                 # deleted at 8
    r("get", "gone", "--rev=10")
    r("get", "", "--prefix", "--rev=6", "--keys-only")

    # Compact up to the current revision: latest live versions stay, deleted
    # keys and older versions go.
    r("compaction", "11", expect_out="compacted revision 11")
    r("get", "k", "--rev=10", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "other", "--rev=8", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "k", "--rev=11", "-w", "json")
    r("get", "k", "-w", "json", expect_out='"version":6')
    r("get", "", "--prefix", "-w", "json")
    r("get", "", "--prefix", "--rev=11", "--consistency=s", "-w", "json")
    r("put", "k", "v7", "--prev-kv", "-w", "json")             # rev 12, version 7
    r("put", "other", "o2", "-w", "json")                      # rev 13, new generation
    r("get", "", "--prefix", "-w", "json")
    r("del", "k", "--prev-kv")                                  # rev 14
    r("compaction", "14", "--physical", expect_out="compacted revision 14")
    r("get", "k", "--rev=13", expect_rc=1, expect_err=E_COMPACTED)
    r("get", "k", "--rev=14", "-w", "json")
    r("get", "", "--from-key", "-w", "json")
    r("compaction", "13", "--physical", expect_rc=1, expect_err=E_COMPACTED)
    r("compaction", "15", "--physical", expect_rc=1, expect_err=E_FUTURE)
    r("put", "k", "v8", "-w", "json")                            # rev 15, version 1
    r("get", "k", "--rev=15", "-w", "json")
    finish(d)


# ---------------------------------------------------------------------------
# What etcdctl 3.4 cannot send: over the JSON gRPC gateway
# ---------------------------------------------------------------------------

def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def test_gateway_kv_extras(diff: DiffRunner):
    """count_only, lease compares and min/max mod/create revision filters,
    which etcdctl 3.4 cannot express, sent as JSON to /v3/kv/*.

    Compared on HTTP status and the parsed JSON (canonical re-serialisation),
    header cluster_id/member_id/raft_term normalised."""
    d, r, g = diff, diff.run, diff.run_gateway
    for k, v in [("a", "1"), ("a/1", "x"), ("a/2", "y"), ("b", "2"), ("a/1", "x2"), ("c", "3")]:
        r("put", k, v)                                             # revs 2..7
    rng = "/v3/kv/range"
    g(rng, {"key": _b64("a"), "range_end": _b64("b"), "count_only": True}, expect_status=200)
    g(rng, {"key": _b64("a"), "range_end": _b64("b"), "count_only": True, "limit": 1})
    g(rng, {"key": _b64("\0"), "range_end": _b64("\0"), "count_only": True})
    g(rng, {"key": _b64("zz"), "range_end": _b64("\0"), "count_only": True})
    g(rng, {"key": _b64("a"), "count_only": True, "revision": 2})
    g(rng, {"key": _b64("a"), "range_end": _b64("b"), "count_only": True, "keys_only": True})
    g(rng, {"key": _b64("a"), "range_end": _b64("b"), "limit": 2})
    g(rng, {"key": _b64("\0"), "range_end": _b64("\0"), "min_mod_revision": 4})
    g(rng, {"key": _b64("\0"), "range_end": _b64("\0"), "max_mod_revision": 4, "keys_only": True})
    g(rng, {"key": _b64("\0"), "range_end": _b64("\0"), "min_create_revision": 3,
            "max_create_revision": 4, "keys_only": True})
    g(rng, {"key": _b64("\0"), "range_end": _b64("\0"), "min_mod_revision": 3, "limit": 1,
            "keys_only": True})
    g(rng, {"key": _b64("\0"), "range_end": _b64("\0"), "count_only": True, "min_mod_revision": 6})
    g(rng, {"key": _b64("a"), "revision": 100})                       # future: error
    g(rng, {"key": ""})                                              # empty key: error

    tx = "/v3/kv/txn"
    get_a = [{"request_range": {"key": _b64("a")}}]
    get_b = [{"request_range": {"key": _b64("b")}}]
    for key, result, lease in [("a", "EQUAL", "0"), ("a", "NOT_EQUAL", "0"),
                               ("a", "GREATER", "0"), ("a", "LESS", "1"),
                               ("a", "EQUAL", "1234"), ("nokey", "EQUAL", "0"),
                               ("nokey", "GREATER", "0")]:
        g(tx, {"compare": [{"key": _b64(key), "target": "LEASE", "result": result, "lease": lease}],
               "success": get_a, "failure": get_b}, expect_status=200)
    # Range compare (range_end) is not expressible with etcdctl either.
    g(tx, {"compare": [{"key": _b64("a/"), "range_end": _b64("a0"), "target": "VERSION",
                        "result": "GREATER", "version": "0"}], "success": get_a, "failure": get_b})
    g(tx, {"compare": [{"key": _b64("a/"), "range_end": _b64("a0"), "target": "MOD",
                        "result": "LESS", "mod_revision": "5"}], "success": get_a, "failure": get_b})
    # Nested txn in a branch.
    g(tx, {"success": [{"request_txn": {"compare": [{"key": _b64("a"), "target": "VALUE",
                                                      "result": "EQUAL", "value": _b64("1")}],
                                         "success": [{"request_put": {"key": _b64("n"),
                                                                      "value": _b64("1")}}]}}]})
    r("get", "", "--prefix", "-w", "json")
    finish(d)
