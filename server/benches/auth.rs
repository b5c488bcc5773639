//! The cost of authorization on the request path (criterion): resolving the requester and
//! checking one key, with auth off (one atomic load) and on (a simple-token lookup and a
//! range check against a user with 10 roles of 10 permissions each).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use metastore::auth::{AuthStore, Credentials};
use metastore::storage::{Engine, MemoryEngine};
use metastore_proto::authpb::{permission::Type, Permission};
use metastore_proto::etcdserverpb::{
    AuthEnableRequest, AuthRoleAddRequest, AuthRoleGrantPermissionRequest, AuthUserAddRequest,
    AuthUserGrantRoleRequest,
};
use metastore_proto::raftpb::auth_command::Request as C;

fn apply(engine: &Arc<dyn Engine>, auth: &AuthStore, cmd: C) {
    let mut p = auth.prepare(&cmd).expect("prepare");
    engine.write(p.take_batch(), false).expect("write");
    auth.commit(p);
}

fn store(enabled: bool) -> (AuthStore, Credentials) {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let auth = AuthStore::open_default(engine.clone()).expect("auth store");
    let hashed_password = bcrypt::hash("pw", 4).expect("hash");
    for user in ["root", "alice"] {
        apply(
            &engine,
            &auth,
            C::UserAdd(AuthUserAddRequest {
                name: user.into(),
                hashed_password: hashed_password.clone(),
                ..Default::default()
            }),
        );
    }
    apply(
        &engine,
        &auth,
        C::UserGrantRole(AuthUserGrantRoleRequest {
            user: "root".into(),
            role: "root".into(),
        }),
    );
    for r in 0..10 {
        let role = format!("r{r}");
        apply(
            &engine,
            &auth,
            C::RoleAdd(AuthRoleAddRequest { name: role.clone() }),
        );
        for p in 0..10 {
            let key = format!("/registry/ns-{r}-{p}/");
            let mut end = key.clone().into_bytes();
            if let Some(last) = end.last_mut() {
                *last += 1;
            }
            apply(
                &engine,
                &auth,
                C::RoleGrantPermission(AuthRoleGrantPermissionRequest {
                    name: role.clone(),
                    perm: Some(Permission {
                        perm_type: Type::Readwrite as i32,
                        key: key.into_bytes().into(),
                        range_end: end.into(),
                    }),
                }),
            );
        }
        apply(
            &engine,
            &auth,
            C::UserGrantRole(AuthUserGrantRoleRequest {
                user: "alice".into(),
                role,
            }),
        );
    }
    if enabled {
        apply(&engine, &auth, C::Enable(AuthEnableRequest {}));
    }
    let token = enabled.then(|| auth.authenticate("alice", "pw", 1).expect("token"));
    (
        auth,
        Credentials {
            token,
            common_name: None,
        },
    )
}

fn check(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth");
    let key = b"/registry/ns-7-3/pod-1".as_slice();
    for (name, enabled) in [("off", false), ("on_simple_token", true)] {
        let (auth, creds) = store(enabled);
        g.bench_function(format!("resolve_and_check_read/{name}"), |b| {
            b.iter(|| {
                auth.access(&creds)
                    .and_then(|a| a.read(key, b""))
                    .expect("permitted")
            })
        });
    }
    let (auth, creds) = store(true);
    let access = auth.access(&creds).expect("access");
    g.bench_function("check_range/100_permissions", |b| {
        b.iter(|| {
            access
                .read(b"/registry/ns-7-3/", b"/registry/ns-7-30")
                .expect("permitted")
        })
    });
    g.finish();
}

criterion_group!(benches, check);
criterion_main!(benches);
