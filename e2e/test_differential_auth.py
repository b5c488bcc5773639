"""Differential auth test: users, roles, permissions and the auth switch driven
by etcdctl against a fresh real etcd and a fresh MetaStore, comparing exit
code, stdout and stderr of every command (etcdctl's stderr carries the gRPC
code and message of every failed call it retried, so codes are compared too).

Covered: `user add/get/list/delete/passwd/grant-role/revoke-role`, `role
add/get/list/delete/grant-permission/revoke-permission` (keys, ranges,
--prefix, --from-key), `auth enable/disable`, `--user` with right and wrong
passwords, and a user refused reads, writes, deletes, txns, watches, lease
revokes and admin calls outside its permissions.

etcdctl 3.4 has no `auth status` (3.5): AuthStatus is covered by the Rust
integration tests.
"""

from __future__ import annotations

import pytest

from harness import DiffRunner

E_DENIED = "etcdserver: permission denied"
E_USER_EMPTY = "etcdserver: user name is empty"
E_AUTH_FAILED = "etcdserver: authentication failed, invalid user ID or password"
E_ROOT_USER = "etcdserver: root user does not exist"
E_USER_EXISTS = "etcdserver: user name already exists"
E_USER_NOT_FOUND = "etcdserver: user name not found"
E_ROLE_EXISTS = "etcdserver: role name already exists"
E_ROLE_NOT_FOUND = "etcdserver: role name not found"
E_ROLE_NOT_GRANTED = "etcdserver: role is not granted to the user"
E_PERM_NOT_GRANTED = "etcdserver: permission is not granted to the role"
E_INVALID_MGMT = "etcdserver: invalid auth management"
E_ROLE_EMPTY = "etcdserver: role name is empty"

ROOT = "--user=root:rootpw"
ALICE = "--user=alice:pw"


def test_users_roles_and_permissions(diff: DiffRunner):
    d, r = diff, diff.run

    # -- users and roles, auth off ---------------------------------------------
    r("auth", "enable", expect_rc=1, expect_err=E_ROOT_USER)
    r("user", "add", "root:rootpw", expect_out="User root created")
    r("user", "add", "root:other", expect_rc=1, expect_err=E_USER_EXISTS)
    r("user", "get", "nobody", expect_rc=1, expect_err=E_USER_NOT_FOUND)
    r("role", "get", "nobody", expect_rc=1, expect_err=E_ROLE_NOT_FOUND)
    r("role", "add", "", expect_rc=1, expect_err=E_ROLE_EMPTY)
    r("role", "add", "r1", expect_out="Role r1 created")
    r("role", "add", "r1", expect_rc=1, expect_err=E_ROLE_EXISTS)
    r("role", "add", "root")
    r("role", "get", "root")
    r("user", "grant-role", "root", "r2", expect_rc=1, expect_err=E_ROLE_NOT_FOUND)
    r("user", "grant-role", "nobody", "r1", expect_rc=1, expect_err=E_USER_NOT_FOUND)
    r("user", "grant-role", "root", "root")
    r("user", "grant-role", "root", "root")               # again: no error
    r("user", "revoke-role", "root", "r1", expect_rc=1, expect_err=E_ROLE_NOT_GRANTED)
    r("role", "grant-permission", "r1", "readwrite", "foo")
    r("role", "grant-permission", "r1", "read", "/a", "/b")
    r("role", "grant-permission", "r1", "write", "--prefix", "/p/")
    r("role", "grant-permission", "r1", "read", "--from-key", "z")
    r("role", "grant-permission", "r1", "read", "foo")     # same key: type replaced
    r("role", "grant-permission", "r1", "readwrite", "foo")
    r("role", "grant-permission", "nobody", "read", "x", expect_rc=1, expect_err=E_ROLE_NOT_FOUND)
    r("role", "get", "r1")
    r("role", "get", "r1", "-w", "json")
    r("role", "revoke-permission", "r1", "nope", expect_rc=1, expect_err=E_PERM_NOT_GRANTED)
    r("role", "revoke-permission", "r1", "/a", expect_rc=1, expect_err=E_PERM_NOT_GRANTED)
    r("role", "add", "gone")
    r("role", "grant-permission", "gone", "read", "g")
    r("user", "add", "alice:pw")
    r("user", "grant-role", "alice", "r1")
    r("user", "grant-role", "alice", "gone")
    r("user", "get", "alice")
    r("user", "get", "alice", "--detail")
    r("role", "delete", "gone")                            # taken from alice too
    r("user", "get", "alice", "-w", "json")
    r("user", "list")
    r("role", "list")
    r("user", "add", "bob:bobpw")
    r("user", "delete", "bob")
    r("user", "delete", "bob", expect_rc=1, expect_err=E_USER_NOT_FOUND)
    r("role", "delete", "nobody", expect_rc=1, expect_err=E_ROLE_NOT_FOUND)
    r("user", "list", "-w", "json")
    # `--user` while auth is off: the token is not needed, the command works.
    r(ALICE, "put", "x", "1")

    # -- enabling ---------------------------------------------------------------
    r("user", "revoke-role", "root", "root")
    # etcdctl then tries to create the root role itself, which exists.
    r("auth", "enable", expect_rc=1, expect_err=E_ROLE_EXISTS)
    r("user", "grant-role", "root", "root")
    r("auth", "enable", expect_out="Authentication Enabled")
    r("auth", "enable", expect_rc=1, expect_err=E_USER_EMPTY)
    r("get", "foo", expect_rc=1, expect_err=E_USER_EMPTY)
    r("--user=root:bad", "user", "list", expect_err=E_AUTH_FAILED)
    r("--user=nobody:x", "get", "foo", expect_err=E_AUTH_FAILED)
    r(ROOT, "auth", "enable", expect_out="Authentication Enabled")
    r(ROOT, "user", "list")

    # -- a user inside and outside its permissions ------------------------------
    r(ROOT, "put", "secret", "s")
    r(ROOT, "put", "/a/1", "a1")
    r(ALICE, "put", "foo", "f", expect_out="OK")
    r(ALICE, "get", "foo")
    r(ALICE, "get", "/a", "/b")
    r(ALICE, "get", "--prefix", "/a")
    r(ALICE, "get", "/a", "/c", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "get", "secret", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "get", "--from-key", "z")
    r(ALICE, "get", "--from-key", "y", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "put", "secret", "x", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "put", "/a/1", "x", expect_rc=1, expect_err=E_DENIED)       # read only
    r(ALICE, "put", "/p/1", "v", expect_out="OK")                        # write only
    r(ALICE, "get", "/p/1", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "put", "--prev-kv", "/p/1", "w", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "del", "--prev-kv", "/p/1", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "del", "--prefix", "/p", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "del", "secret", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "del", "/p/1", expect_out="1")
    r(ALICE, "del", "--prefix", "/p/", expect_out="0")
    r(ALICE, "txn", stdin='value("secret") = "s"\n\nput foo yes\n\n\n',
      expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "txn", stdin='value("foo") = "f"\n\nput foo yes\n\ndel secret\n\n',
      expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "txn", stdin='value("foo") = "f"\n\nput foo yes\nget /a/1\n\n\n')
    r(ROOT, "get", "foo")
    r(ALICE, "watch", "secret")                       # canceled by the server
    r("watch", "foo")
    r(ALICE, "compaction", "2")                       # etcd checks no permission
    r(ALICE, "member", "remove", "1234", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "member", "update", "1234", "--peer-urls=http://127.0.0.1:9",
      expect_rc=1, expect_err=E_DENIED)

    # -- admin calls ------------------------------------------------------------
    r(ALICE, "user", "list", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "role", "list", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "role", "add", "r9", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "user", "get", "alice")                  # its own entry
    r(ALICE, "user", "get", "root", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "role", "get", "r1")                     # a role it holds
    r(ALICE, "role", "get", "root", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "auth", "disable", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "user", "passwd", "alice", "--interactive=false", stdin="new\n",
      expect_rc=1, expect_err=E_DENIED)
    r(ROOT, "user", "delete", "root", expect_rc=1, expect_err=E_INVALID_MGMT)
    r(ROOT, "role", "delete", "root", expect_rc=1, expect_err=E_INVALID_MGMT)
    r(ROOT, "user", "revoke-role", "root", "root", expect_rc=1, expect_err=E_INVALID_MGMT)
    r(ROOT, "user", "passwd", "alice", "--interactive=false", stdin="new\n")
    r(ALICE, "get", "foo", expect_err=E_AUTH_FAILED)
    r("--user=alice:new", "get", "foo")

    # Permission changes apply to the next request.
    r(ROOT, "role", "grant-permission", "r1", "read", "secret")
    r("--user=alice:new", "get", "secret")
    r(ROOT, "role", "revoke-permission", "r1", "secret")
    r("--user=alice:new", "get", "secret", expect_rc=1, expect_err=E_DENIED)
    r(ROOT, "user", "revoke-role", "alice", "r1")
    r("--user=alice:new", "get", "foo", expect_rc=1, expect_err=E_DENIED)

    # -- disabling --------------------------------------------------------------
    r(ROOT, "auth", "disable", expect_out="Authentication Disabled")
    r("auth", "disable", expect_out="Authentication Disabled")
    r("get", "secret")
    r("user", "list")
    r("role", "get", "r1", "-w", "json")
    d.check()


def test_leases_under_auth(diff: DiffRunner):
    d, r = diff, diff.run
    d.use_lease_ids()
    for c in (("user", "add", "root:rootpw"), ("role", "add", "root"),
              ("user", "grant-role", "root", "root"), ("role", "add", "r1"),
              ("role", "grant-permission", "r1", "readwrite", "--prefix", "/a/"),
              ("user", "add", "alice:pw"), ("user", "grant-role", "alice", "r1"),
              ("auth", "enable")):
        r(*c)
    r(ROOT, "lease", "grant", "100")
    r(ROOT, "put", "--lease=<LEASE1>", "secret", "v")
    r(ALICE, "put", "--lease=<LEASE1>", "/a/1", "v", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "lease", "revoke", "<LEASE1>", expect_rc=1, expect_err=E_DENIED)
    r(ALICE, "lease", "grant", "100")
    r(ALICE, "put", "--lease=<LEASE2>", "/a/2", "v")
    r(ALICE, "lease", "revoke", "<LEASE2>")
    r(ALICE, "get", "--prefix", "/a/")
    r(ROOT, "lease", "revoke", "<LEASE1>")
    r(ROOT, "get", "secret")
    d.check()
