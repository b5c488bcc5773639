//! etcd's rules for users, roles and the auth switch; persistence and reload.

use std::sync::Arc;
use std::time::Duration;

use metastore_proto::authpb::{permission::Type as PermType, Permission};
use metastore_proto::etcdserverpb::{
    AuthDisableRequest, AuthEnableRequest, AuthRoleAddRequest, AuthRoleDeleteRequest,
    AuthRoleGrantPermissionRequest, AuthRoleRevokePermissionRequest, AuthUserAddRequest,
    AuthUserChangePasswordRequest, AuthUserDeleteRequest, AuthUserGrantRoleRequest,
    AuthUserRevokeRoleRequest,
};
use metastore_proto::raftpb::auth_command::Request as C;

use super::*;
use crate::auth::token::SimpleTokens;
use crate::storage::MemoryEngine;

fn open(engine: &Arc<dyn Engine>) -> AuthStore {
    AuthStore::open(
        engine.clone(),
        Box::new(SimpleTokens::new(Duration::from_secs(300))),
        false,
        4,
    )
    .expect("open")
}

fn apply(s: &AuthStore, cmd: C) -> Result<()> {
    let mut p = s.prepare(&cmd)?;
    s.engine.write(p.take_batch(), false).map_err(internal)?;
    s.commit(p);
    Ok(())
}

fn user_add(s: &AuthStore, name: &str, password: &str) -> Result<()> {
    let hashed_password = s.hash_password(password)?;
    apply(
        s,
        C::UserAdd(AuthUserAddRequest {
            name: name.into(),
            hashed_password,
            ..Default::default()
        }),
    )
}

fn role_add(s: &AuthStore, name: &str) -> Result<()> {
    apply(s, C::RoleAdd(AuthRoleAddRequest { name: name.into() }))
}

fn grant_role(s: &AuthStore, user: &str, role: &str) -> Result<()> {
    apply(
        s,
        C::UserGrantRole(AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        }),
    )
}

fn perm(t: PermType, key: &str, end: &str) -> Permission {
    Permission {
        perm_type: t as i32,
        key: key.as_bytes().to_vec().into(),
        range_end: end.as_bytes().to_vec().into(),
    }
}

fn grant_perm(s: &AuthStore, role: &str, p: Permission) -> Result<()> {
    apply(
        s,
        C::RoleGrantPermission(AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(p),
        }),
    )
}

#[test]
fn etcds_rules_and_errors() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let s = open(&engine);
    assert_eq!(
        s.status(),
        (false, 1),
        "a fresh store is at auth revision 1"
    );
    let enable = || apply(&s, C::Enable(AuthEnableRequest {}));
    assert_eq!(enable(), Err(AuthError::RootUserNotExist));
    user_add(&s, "root", "rootpw").expect("root");
    assert_eq!(user_add(&s, "root", "x"), Err(AuthError::UserAlreadyExist));
    assert_eq!(user_add(&s, "", "x"), Err(AuthError::UserEmpty));
    assert_eq!(enable(), Err(AuthError::RootRoleNotExist));
    assert_eq!(grant_role(&s, "root", "r2"), Err(AuthError::RoleNotFound));
    assert_eq!(
        grant_role(&s, "nobody", "root"),
        Err(AuthError::UserNotFound)
    );
    // The root role can be granted before it is created.
    grant_role(&s, "root", "root").expect("grant root");
    let rev = s.status().1;
    grant_role(&s, "root", "root").expect("granting again is a no-op");
    assert_eq!(s.status().1, rev, "a no-op does not raise the revision");
    role_add(&s, "r1").expect("r1");
    assert_eq!(role_add(&s, "r1"), Err(AuthError::RoleAlreadyExist));
    assert_eq!(role_add(&s, ""), Err(AuthError::RoleEmpty));
    assert_eq!(
        apply(
            &s,
            C::UserRevokeRole(AuthUserRevokeRoleRequest {
                name: "root".into(),
                role: "r1".into()
            })
        ),
        Err(AuthError::RoleNotGranted)
    );
    grant_perm(&s, "r1", perm(PermType::Read, "foo", "")).expect("grant");
    grant_perm(&s, "r1", perm(PermType::Write, "/p/", "/p0")).expect("grant");
    grant_perm(&s, "r1", perm(PermType::Readwrite, "foo", "")).expect("retype");
    assert_eq!(
        s.role_get("r1").expect("r1"),
        vec![
            perm(PermType::Write, "/p/", "/p0"),
            perm(PermType::Readwrite, "foo", ""),
        ],
        "sorted by key, one permission per key and range end"
    );
    assert_eq!(
        apply(
            &s,
            C::RoleRevokePermission(AuthRoleRevokePermissionRequest {
                role: "r1".into(),
                key: "nope".into(),
                range_end: Default::default(),
            })
        ),
        Err(AuthError::PermissionNotGranted)
    );
    user_add(&s, "alice", "pw").expect("alice");
    grant_role(&s, "alice", "r1").expect("grant r1");
    assert_eq!(s.user_get("alice").expect("alice"), vec!["r1".to_string()]);
    assert_eq!(s.user_list(), vec!["alice".to_string(), "root".to_string()]);

    assert_eq!(
        s.authenticate("root", "rootpw", 5),
        Err(AuthError::AuthNotEnabled)
    );
    enable().expect("enable");
    assert!(s.is_enabled());
    let rev = s.status().1;
    enable().expect("enabling again is a no-op");
    assert_eq!(s.status().1, rev);
    assert_eq!(
        apply(
            &s,
            C::UserDelete(AuthUserDeleteRequest {
                name: "root".into()
            })
        ),
        Err(AuthError::InvalidAuthMgmt)
    );
    assert_eq!(
        apply(
            &s,
            C::RoleDelete(AuthRoleDeleteRequest {
                role: "root".into()
            })
        ),
        Err(AuthError::InvalidAuthMgmt)
    );
    assert_eq!(
        apply(
            &s,
            C::UserRevokeRole(AuthUserRevokeRoleRequest {
                name: "root".into(),
                role: "root".into()
            })
        ),
        Err(AuthError::InvalidAuthMgmt)
    );

    // Passwords and tokens.
    assert_eq!(s.authenticate("root", "bad", 5), Err(AuthError::AuthFailed));
    assert_eq!(s.authenticate("nobody", "x", 5), Err(AuthError::AuthFailed));
    let token = s.authenticate("alice", "pw", 5).expect("token");
    assert!(token.ends_with(".5"));
    let access = s
        .access(&crate::auth::Credentials {
            token: Some(token.clone()),
            common_name: None,
        })
        .expect("access");
    assert_eq!(access.user(), Some("alice"));
    assert!(access.read(b"foo", b"").is_ok());
    assert_eq!(access.read(b"/p/1", b""), Err(AuthError::PermissionDenied));
    assert!(access.write(b"/p/1", b"").is_ok());
    assert_eq!(access.admin(), Err(AuthError::PermissionDenied));
    let hashed_password = s.hash_password("new").expect("hash");
    apply(
        &s,
        C::UserChangePassword(AuthUserChangePasswordRequest {
            name: "alice".into(),
            hashed_password,
            ..Default::default()
        }),
    )
    .expect("change password");
    let creds = crate::auth::Credentials {
        token: Some(token),
        common_name: None,
    };
    assert_eq!(
        s.access(&creds).err(),
        Some(AuthError::InvalidAuthToken),
        "a password change revokes the user's simple tokens"
    );
    assert_eq!(s.authenticate("alice", "pw", 6), Err(AuthError::AuthFailed));
    assert!(s.authenticate("alice", "new", 6).is_ok());

    // Deleting a role takes it from its users.
    apply(
        &s,
        C::RoleDelete(AuthRoleDeleteRequest { role: "r1".into() }),
    )
    .expect("delete");
    assert!(s.user_get("alice").expect("alice").is_empty());
    apply(&s, C::Disable(AuthDisableRequest {})).expect("disable");
    assert!(!s.is_enabled());

    // Everything is in the table: a reopened store sees the same state.
    let before = s.state();
    let again = open(&engine);
    let after = again.state();
    assert_eq!(
        (after.enabled, after.revision, &after.users, &after.roles),
        (
            before.enabled,
            before.revision,
            &before.users,
            &before.roles
        )
    );
}

#[test]
fn reload_follows_a_replaced_table() {
    let engine: Arc<dyn Engine> = Arc::new(MemoryEngine::new());
    let s = open(&engine);
    user_add(&s, "root", "pw").expect("root");
    grant_role(&s, "root", "root").expect("grant");
    apply(&s, C::Enable(AuthEnableRequest {})).expect("enable");
    // A snapshot install empties the table and loads another member's.
    let mut b = WriteBatch::new();
    b.clear_table(Table::Auth);
    engine.write(b, false).expect("clear");
    s.reload().expect("reload");
    assert!(!s.is_enabled());
    assert_eq!(s.status(), (false, 1));
    assert!(s.user_list().is_empty());
}
