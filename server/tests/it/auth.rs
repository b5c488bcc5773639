//! Authentication and authorization end to end: users, roles and range permissions enforced
//! on reads, writes, deletes, txns, watches and admin calls; bad tokens refused; the auth
//! state kept across restarts. The etcdctl view of the same, compared with a real etcd, is
//! e2e/test_differential_auth.py.

use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, GetOptions, Permission, Txn, TxnOp, WatchOptions,
};
use metastore_proto::etcdserverpb::{
    auth_client::AuthClient, kv_client::KvClient, AuthenticateRequest, RangeRequest,
};
use tonic::Code;

use crate::common::{free_port, status, Proc, TestServer};

const DENIED: (Code, &str) = (Code::PermissionDenied, "etcdserver: permission denied");

/// root (role root), and alice with READWRITE on the prefix `/a/` and READ on `/ro`; auth on.
async fn set_up(c: &mut Client) -> anyhow::Result<()> {
    c.user_add("root", "rootpw", None).await?;
    c.role_add("root").await?;
    c.user_grant_role("root", "root").await?;
    c.role_add("r1").await?;
    c.role_grant_permission("r1", Permission::read_write("/a/").with_prefix())
        .await?;
    c.role_grant_permission("r1", Permission::read("/ro"))
        .await?;
    c.user_add("alice", "pw", None).await?;
    c.user_grant_role("alice", "r1").await?;
    c.auth_enable().await?;
    Ok(())
}

async fn login(addr: std::net::SocketAddr, user: &str, pw: &str) -> anyhow::Result<Client> {
    Ok(Client::connect(
        [format!("http://{addr}")],
        Some(ConnectOptions::new().with_user(user, pw)),
    )
    .await?)
}

fn code(e: etcd_client::Error) -> (Code, String) {
    status(e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_users_are_refused_outside_their_permissions() -> anyhow::Result<()> {
    let s = TestServer::start(&["--bcrypt-cost", "4"]).await?;
    set_up(&mut s.client().await?).await?;
    let mut alice = login(s.addr(), "alice", "pw").await?;
    let mut root = login(s.addr(), "root", "rootpw").await?;
    let denied = || (DENIED.0, DENIED.1.to_string());

    // Inside the permissions.
    alice.put("/a/1", "v", None).await?;
    assert_eq!(alice.get("/a/1", None).await?.kvs().len(), 1);
    let all_a = alice
        .get("/a/", Some(GetOptions::new().with_prefix()))
        .await?;
    assert_eq!(all_a.count(), 1);
    root.put("/ro", "x", None).await?;
    assert_eq!(alice.get("/ro", None).await?.kvs().len(), 1);

    // Outside: reads, writes, deletes, wider ranges, txns.
    root.put("/b", "secret", None).await?;
    assert_eq!(
        code(alice.get("/b", None).await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.put("/b", "x", None).await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.put("/ro", "x", None).await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.delete("/b", None).await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.delete("/ro", None).await.expect_err("refused")),
        denied()
    );
    let wide = GetOptions::new().with_range("/b");
    assert_eq!(
        code(alice.get("/a/", Some(wide)).await.expect_err("refused")),
        denied()
    );
    let wide_delete = DeleteOptions::new().with_prefix();
    assert_eq!(
        code(
            alice
                .delete("/a", Some(wide_delete))
                .await
                .expect_err("refused")
        ),
        denied()
    );
    // A put with prev_kv reads the key too.
    assert_eq!(
        code(
            alice
                .put(
                    "/ro",
                    "x",
                    Some(etcd_client::PutOptions::new().with_prev_key())
                )
                .await
                .expect_err("refused")
        ),
        denied()
    );
    let txn = Txn::new()
        .when([etcd_client::Compare::value(
            "/b",
            etcd_client::CompareOp::Equal,
            "secret",
        )])
        .and_then([TxnOp::put("/a/2", "v", None)]);
    assert_eq!(code(alice.txn(txn).await.expect_err("refused")), denied());
    let txn = Txn::new()
        .and_then([TxnOp::put("/a/2", "v", None)])
        .or_else([TxnOp::delete("/b", None)]);
    assert_eq!(code(alice.txn(txn).await.expect_err("refused")), denied());
    let txn = Txn::new().and_then([TxnOp::put("/a/2", "v", None), TxnOp::get("/ro", None)]);
    assert!(alice.txn(txn).await?.succeeded());
    assert_eq!(root.get("/b", None).await?.kvs()[0].value(), b"secret");

    // Leases: revoking deletes the keys, so it needs WRITE on them; attaching more keys to a
    // lease holding a key the user may not write is refused too.
    let lease = root.lease_grant(60, None).await?.id();
    root.put(
        "/b",
        "leased",
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    assert_eq!(
        code(alice.lease_revoke(lease).await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(
            alice
                .put(
                    "/a/3",
                    "x",
                    Some(etcd_client::PutOptions::new().with_lease(lease))
                )
                .await
                .expect_err("refused")
        ),
        denied()
    );

    // Watches: refused outside READ, served inside it.
    let mut stream = alice.watch("/b", None).await?;
    let r = stream.message().await?.expect("a response");
    assert!(r.canceled());
    assert_eq!(
        r.cancel_reason(),
        "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
    );
    let mut stream = alice
        .watch("/a/", Some(WatchOptions::new().with_prefix()))
        .await?;
    assert!(stream.message().await?.expect("created").created());
    root.put("/a/9", "seen", None).await?;
    let r = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await??
        .expect("an event");
    assert_eq!(r.events()[0].kv().map(|kv| kv.key()), Some(&b"/a/9"[..]));

    // Admin calls are root's.
    assert_eq!(
        code(alice.user_list().await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.role_add("r2").await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.auth_disable().await.expect_err("refused")),
        denied()
    );
    assert_eq!(
        code(alice.defragment().await.expect_err("refused")),
        denied()
    );
    // ... except a user's own entry and roles (etcd).
    assert_eq!(alice.user_get("alice").await?.roles(), ["r1"]);
    assert_eq!(alice.role_get("r1").await?.permissions().len(), 2);
    assert_eq!(
        code(alice.user_get("root").await.expect_err("refused")),
        denied()
    );
    assert_eq!(root.user_list().await?.users(), ["alice", "root"]);

    // Without credentials.
    let mut anonymous = s.client().await?;
    assert_eq!(
        code(anonymous.get("/a/1", None).await.expect_err("refused")),
        (
            Code::InvalidArgument,
            "etcdserver: user name is empty".into()
        )
    );

    // Permissions change at once for existing tokens.
    root.role_grant_permission("r1", Permission::read("/b"))
        .await?;
    assert_eq!(alice.get("/b", None).await?.kvs().len(), 1);
    root.user_revoke_role("alice", "r1").await?;
    assert_eq!(
        code(alice.get("/a/1", None).await.expect_err("refused")),
        denied()
    );

    // Auth off again: everyone may do everything.
    root.auth_disable().await?;
    assert_eq!(anonymous.get("/b", None).await?.kvs().len(), 1);
    Ok(())
}

/// A raw KV client sending `token` as etcd clients do.
async fn range_with_token(addr: std::net::SocketAddr, token: &str) -> Result<(), tonic::Status> {
    let mut kv = KvClient::connect(format!("http://{addr}"))
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(RangeRequest {
        key: "/a/1".into(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "token",
        token
            .parse()
            .map_err(|_| tonic::Status::invalid_argument("token"))?,
    );
    kv.range(req).await.map(|_| ())
}

/// A token from the raw Auth service.
async fn authenticate(
    auth: &mut AuthClient<tonic::transport::Channel>,
    name: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    let req = AuthenticateRequest {
        name: name.into(),
        password: password.into(),
    };
    Ok(auth.authenticate(req).await?.into_inner().token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_expired_and_forged_tokens_are_refused() -> anyhow::Result<()> {
    let s = TestServer::start(&["--bcrypt-cost", "4", "--auth-token-ttl", "1"]).await?;
    set_up(&mut s.client().await?).await?;
    let mut auth = AuthClient::connect(format!("http://{}", s.addr())).await?;
    let token = authenticate(&mut auth, "alice", "pw").await?;
    let (letters, _index) = token.split_once('.').expect("etcd's simple token format");
    assert_eq!(letters.len(), 16);
    range_with_token(s.addr(), &token).await?;
    let invalid = |r: Result<(), tonic::Status>| {
        let e = r.expect_err("refused");
        (e.code(), e.message().to_string())
    };
    let want = (
        Code::Unauthenticated,
        "etcdserver: invalid auth token".to_string(),
    );
    assert_eq!(
        invalid(range_with_token(s.addr(), "abcdefghijklmnop.1").await),
        want
    );
    let forged = format!(
        "{}.{}",
        "x".repeat(16),
        token.split_once('.').map_or("", |t| t.1)
    );
    assert_eq!(invalid(range_with_token(s.addr(), &forged).await), want);
    // Unused for longer than --auth-token-ttl: expired.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(invalid(range_with_token(s.addr(), &token).await), want);
    let e = authenticate(&mut auth, "alice", "wrong")
        .await
        .expect_err("bad password");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password"
        )
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_jwt_tokens_verify_and_forgeries_are_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let write_keys = |name: &str| -> anyhow::Result<(String, String)> {
        let pair = rcgen::KeyPair::generate()?;
        let private = dir.path().join(format!("{name}.key"));
        let public = dir.path().join(format!("{name}.pub"));
        std::fs::write(&private, pair.serialize_pem())?;
        std::fs::write(&public, pair.public_key_pem())?;
        Ok((public.display().to_string(), private.display().to_string()))
    };
    let (public, private) = write_keys("server")?;
    let spec = format!("jwt,pub-key={public},priv-key={private},sign-method=ES256,ttl=10m");
    let s = TestServer::start(&["--bcrypt-cost", "4", "--auth-token", &spec]).await?;
    set_up(&mut s.client().await?).await?;
    let mut auth = AuthClient::connect(format!("http://{}", s.addr())).await?;
    let token = authenticate(&mut auth, "alice", "pw").await?;
    assert_eq!(token.split('.').count(), 3, "a JWT");
    range_with_token(s.addr(), &token).await?;
    // A token for root signed with another key.
    let (_, other) = write_keys("forger")?;
    let forger = metastore::auth::token::from_flag(
        &format!("jwt,pub-key={public},priv-key={other},sign-method=ES256"),
        Duration::from_secs(1),
    )?;
    let forged = forger.assign("root", 1, 1)?;
    let e = range_with_token(s.addr(), &forged)
        .await
        .expect_err("forged");
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unauthenticated, "etcdserver: invalid auth token")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_state_survives_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let env = [("METASTORE_BCRYPT_COST", "4")];
    let mut p = Proc::spawn(dir.path(), port, &env)?;
    set_up(&mut p.client().await?).await?;
    p.signal("KILL")?;
    let p = Proc::spawn(dir.path(), port, &env)?;
    let mut anonymous = p.client().await?;
    assert_eq!(
        code(anonymous.get("/a/1", None).await.expect_err("refused")).0,
        Code::InvalidArgument,
        "auth is still on"
    );
    let mut alice = login(p.addr, "alice", "pw").await?;
    alice.put("/a/1", "v", None).await?;
    assert_eq!(
        code(alice.get("/b", None).await.expect_err("refused")),
        (DENIED.0, DENIED.1.into())
    );
    let mut root = login(p.addr, "root", "rootpw").await?;
    assert_eq!(root.role_get("r1").await?.permissions().len(), 2);
    Ok(())
}
