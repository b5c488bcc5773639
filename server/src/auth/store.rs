//! [`AuthStore`]: users, roles, permissions and the auth switch, kept in the engine's `auth`
//! table and mirrored in memory for the request path.
//!
//! # Table layout
//! | key | value |
//! |---|---|
//! | `enabled` | `[1]` when auth is on |
//! | `revision` | the auth revision, u64 big endian (absent: 1, a fresh store) |
//! | `user/<name>` | `authpb.User` (password: a bcrypt hash) |
//! | `role/<name>` | `authpb.Role` (permissions sorted by key, as etcd keeps them) |
//!
//! The table is a state-machine table: Raft snapshots and backup files carry it, `snapshot
//! restore` restores it. Only [`AuthStore::prepare`] and [`AuthStore::commit`], called by the
//! apply step, change it; every member applies the same commands, so every member holds the
//! same users, roles and revision. Each change that does something raises the auth revision
//! by one, as etcd's `commitRevision` does (AuthStatus reports it).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use metastore_proto::authpb::{Permission, Role, User, UserAddOptions};
use metastore_proto::raftpb::auth_command::Request as AuthCommand;
use prost::Message;

use super::perms::UserPerms;
use super::token::TokenProvider;
use super::{AuthError, Result, ROOT};
use crate::storage::{Engine, Table, WriteBatch};

const KEY_ENABLED: &[u8] = b"enabled";
const KEY_REVISION: &[u8] = b"revision";
const USER_PREFIX: &[u8] = b"user/";
const ROLE_PREFIX: &[u8] = b"role/";

fn user_key(name: &str) -> Vec<u8> {
    [USER_PREFIX, name.as_bytes()].concat()
}

fn role_key(name: &str) -> Vec<u8> {
    [ROLE_PREFIX, name.as_bytes()].concat()
}

fn internal(e: impl std::fmt::Display) -> AuthError {
    AuthError::Internal(e.to_string())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The auth state at one auth revision.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub enabled: bool,
    pub revision: u64,
    pub users: BTreeMap<String, User>,
    pub roles: BTreeMap<String, Role>,
    /// Each user's merged permissions (derived from `users` and `roles`).
    perms: HashMap<String, Arc<UserPerms>>,
}

impl State {
    fn derive(&mut self) {
        self.perms = self
            .users
            .iter()
            .map(|(name, u)| {
                (
                    name.clone(),
                    Arc::new(UserPerms::compute(&u.roles, &self.roles)),
                )
            })
            .collect();
    }

    pub fn perms(&self, user: &str) -> Option<Arc<UserPerms>> {
        self.perms.get(user).cloned()
    }
}

/// A change checked against the current state, ready to be written and then committed.
#[derive(Debug)]
pub struct Prepared {
    state: State,
    batch: WriteBatch,
    revoke: Revoke,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Revoke {
    None,
    User(String),
    All,
}

impl Prepared {
    /// The table writes of the change (empty for a no-op), to be written atomically with the
    /// command's apply position before [`AuthStore::commit`].
    pub fn take_batch(&mut self) -> WriteBatch {
        std::mem::take(&mut self.batch)
    }
}

/// Users, roles and permissions; the token provider; the switch the request path reads.
pub struct AuthStore {
    engine: Arc<dyn Engine>,
    /// Mirrors `state.enabled`: the only thing a request reads when auth is off.
    enabled: AtomicBool,
    /// Replaced whole on every change (auth changes are rare; readers clone the `Arc`).
    state: RwLock<Arc<State>>,
    tokens: Box<dyn TokenProvider>,
    /// `--client-cert-auth`: a request without a token is the user its certificate names.
    client_cert_auth: bool,
    /// `--bcrypt-cost`.
    bcrypt_cost: u32,
}

impl AuthStore {
    /// Loads the state from `engine`'s auth table.
    ///
    /// Errors: `Internal` if the table cannot be read or holds a malformed record.
    pub fn open(
        engine: Arc<dyn Engine>,
        tokens: Box<dyn TokenProvider>,
        client_cert_auth: bool,
        bcrypt_cost: u32,
    ) -> Result<Self> {
        let state = load(engine.as_ref())?;
        Ok(Self {
            engine,
            enabled: AtomicBool::new(state.enabled),
            state: RwLock::new(Arc::new(state)),
            tokens,
            client_cert_auth,
            bcrypt_cost,
        })
    }

    /// [`open`](Self::open) with etcd's defaults (simple tokens with a 300 s TTL, no
    /// client-certificate users, bcrypt cost 10): for tools and tests that apply commands
    /// without serving clients.
    pub fn open_default(engine: Arc<dyn Engine>) -> Result<Self> {
        Self::open(
            engine,
            Box::new(super::token::SimpleTokens::new(
                super::token::DEFAULT_SIMPLE_TTL,
            )),
            false,
            super::DEFAULT_BCRYPT_COST,
        )
    }

    /// Reloads the state from the table (after a Raft snapshot replaced it).
    pub fn reload(&self) -> Result<()> {
        let state = load(self.engine.as_ref())?;
        if !state.enabled {
            self.tokens.invalidate_all();
        }
        self.install(state);
        Ok(())
    }

    fn install(&self, state: State) {
        let enabled = state.enabled;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
        self.enabled.store(enabled, Ordering::Release);
    }

    /// Whether authentication is on (one atomic load).
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn client_cert_auth(&self) -> bool {
        self.client_cert_auth
    }

    /// The current state.
    pub fn state(&self) -> Arc<State> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn tokens(&self) -> &dyn TokenProvider {
        self.tokens.as_ref()
    }

    /// A bcrypt hash of `password` at `--bcrypt-cost` (slow on purpose: call it off the
    /// async workers).
    pub fn hash_password(&self, password: &str) -> Result<String> {
        bcrypt::hash(password, self.bcrypt_cost).map_err(internal)
    }

    /// Checks a user's password and issues a token (`index`: this member's applied index,
    /// the number after the dot of a simple token). Slow (bcrypt): call it off the async
    /// workers.
    ///
    /// Errors: `AuthNotEnabled`; `AuthFailed` for an unknown user, a user without a
    /// password, or a wrong password.
    pub fn authenticate(&self, name: &str, password: &str, index: u64) -> Result<String> {
        if !self.is_enabled() {
            return Err(AuthError::AuthNotEnabled);
        }
        let state = self.state();
        let user = state.users.get(name).ok_or(AuthError::AuthFailed)?;
        if user.options.as_ref().is_some_and(|o| o.no_password) {
            return Err(AuthError::AuthFailed);
        }
        let hash = std::str::from_utf8(&user.password).map_err(|_| AuthError::AuthFailed)?;
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return Err(AuthError::AuthFailed);
        }
        self.tokens.assign(name, state.revision, index)
    }

    /// Checks `cmd` against the current state and computes the state after it, etcd's
    /// semantics and errors (`auth/store.go`). Deterministic: passwords arrive hashed.
    pub fn prepare(&self, cmd: &AuthCommand) -> Result<Prepared> {
        let mut next = (*self.state()).clone();
        let mut touched_users: Vec<String> = Vec::new();
        let mut touched_roles: Vec<String> = Vec::new();
        let mut revoke = Revoke::None;
        let mut changed = true;
        match cmd {
            AuthCommand::Enable(_) => {
                if next.enabled {
                    changed = false;
                } else {
                    let root = next.users.get(ROOT).ok_or(AuthError::RootUserNotExist)?;
                    if !root.roles.iter().any(|r| r == ROOT) {
                        return Err(AuthError::RootRoleNotExist);
                    }
                    next.enabled = true;
                }
            }
            AuthCommand::Disable(_) => {
                if next.enabled {
                    next.enabled = false;
                    revoke = Revoke::All;
                } else {
                    changed = false;
                }
            }
            AuthCommand::UserAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::UserEmpty);
                }
                if next.users.contains_key(&r.name) {
                    return Err(AuthError::UserAlreadyExist);
                }
                let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
                next.users.insert(
                    r.name.clone(),
                    User {
                        name: r.name.clone().into_bytes().into(),
                        password: if no_password {
                            Default::default()
                        } else {
                            r.hashed_password.clone().into_bytes().into()
                        },
                        roles: Vec::new(),
                        options: Some(UserAddOptions { no_password }),
                    },
                );
                touched_users.push(r.name.clone());
            }
            AuthCommand::UserDelete(r) => {
                if next.enabled && r.name == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                next.users.remove(&r.name).ok_or(AuthError::UserNotFound)?;
                touched_users.push(r.name.clone());
                revoke = Revoke::User(r.name.clone());
            }
            AuthCommand::UserChangePassword(r) => {
                let user = next.users.get_mut(&r.name).ok_or(AuthError::UserNotFound)?;
                user.password = r.hashed_password.clone().into_bytes().into();
                touched_users.push(r.name.clone());
                revoke = Revoke::User(r.name.clone());
            }
            AuthCommand::UserGrantRole(r) => {
                if !next.users.contains_key(&r.user) {
                    return Err(AuthError::UserNotFound);
                }
                if r.role != ROOT && !next.roles.contains_key(&r.role) {
                    return Err(AuthError::RoleNotFound);
                }
                let user = next.users.get_mut(&r.user).ok_or(AuthError::UserNotFound)?;
                match user.roles.binary_search(&r.role) {
                    Ok(_) => changed = false,
                    Err(i) => {
                        user.roles.insert(i, r.role.clone());
                        touched_users.push(r.user.clone());
                    }
                }
            }
            AuthCommand::UserRevokeRole(r) => {
                if next.enabled && r.name == ROOT && r.role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                let user = next.users.get_mut(&r.name).ok_or(AuthError::UserNotFound)?;
                let i = user
                    .roles
                    .iter()
                    .position(|x| *x == r.role)
                    .ok_or(AuthError::RoleNotGranted)?;
                user.roles.remove(i);
                touched_users.push(r.name.clone());
            }
            AuthCommand::RoleAdd(r) => {
                if r.name.is_empty() {
                    return Err(AuthError::RoleEmpty);
                }
                if next.roles.contains_key(&r.name) {
                    return Err(AuthError::RoleAlreadyExist);
                }
                next.roles.insert(
                    r.name.clone(),
                    Role {
                        name: r.name.clone().into_bytes().into(),
                        key_permission: Vec::new(),
                    },
                );
                touched_roles.push(r.name.clone());
            }
            AuthCommand::RoleDelete(r) => {
                if next.enabled && r.role == ROOT {
                    return Err(AuthError::InvalidAuthMgmt);
                }
                next.roles.remove(&r.role).ok_or(AuthError::RoleNotFound)?;
                touched_roles.push(r.role.clone());
                for (name, user) in next.users.iter_mut() {
                    if let Some(i) = user.roles.iter().position(|x| *x == r.role) {
                        user.roles.remove(i);
                        touched_users.push(name.clone());
                    }
                }
            }
            AuthCommand::RoleGrantPermission(r) => {
                let perm = r.perm.clone().ok_or(AuthError::PermissionNotGiven)?;
                let role = next.roles.get_mut(&r.name).ok_or(AuthError::RoleNotFound)?;
                grant(&mut role.key_permission, perm);
                touched_roles.push(r.name.clone());
            }
            AuthCommand::RoleRevokePermission(r) => {
                let role = next.roles.get_mut(&r.role).ok_or(AuthError::RoleNotFound)?;
                let i = role
                    .key_permission
                    .iter()
                    .position(|p| p.key == r.key && p.range_end == r.range_end)
                    .ok_or(AuthError::PermissionNotGranted)?;
                role.key_permission.remove(i);
                touched_roles.push(r.role.clone());
            }
        }
        let mut batch = WriteBatch::new();
        if changed {
            next.revision += 1;
            next.derive();
            batch.put(
                Table::Auth,
                KEY_REVISION.to_vec(),
                next.revision.to_be_bytes().to_vec(),
            );
            if next.enabled {
                batch.put(Table::Auth, KEY_ENABLED.to_vec(), vec![1]);
            } else {
                batch.delete(Table::Auth, KEY_ENABLED.to_vec());
            }
            for name in touched_users {
                match next.users.get(&name) {
                    Some(u) => batch.put(Table::Auth, user_key(&name), u.encode_to_vec()),
                    None => batch.delete(Table::Auth, user_key(&name)),
                }
            }
            for name in touched_roles {
                match next.roles.get(&name) {
                    Some(r) => batch.put(Table::Auth, role_key(&name), r.encode_to_vec()),
                    None => batch.delete(Table::Auth, role_key(&name)),
                }
            }
        }
        Ok(Prepared {
            state: next,
            batch,
            revoke,
        })
    }

    /// Makes a prepared change visible (after its batch was written) and revokes the tokens
    /// it invalidates.
    pub fn commit(&self, p: Prepared) {
        match &p.revoke {
            Revoke::None => {}
            Revoke::User(u) => self.tokens.invalidate_user(u),
            Revoke::All => self.tokens.invalidate_all(),
        }
        self.install(p.state);
    }

    /// A user's roles. Errors: `UserNotFound`.
    pub fn user_get(&self, name: &str) -> Result<Vec<String>> {
        self.state()
            .users
            .get(name)
            .map(|u| u.roles.clone())
            .ok_or(AuthError::UserNotFound)
    }

    /// A role's permissions. Errors: `RoleNotFound`.
    pub fn role_get(&self, name: &str) -> Result<Vec<Permission>> {
        self.state()
            .roles
            .get(name)
            .map(|r| r.key_permission.clone())
            .ok_or(AuthError::RoleNotFound)
    }

    pub fn user_list(&self) -> Vec<String> {
        self.state().users.keys().cloned().collect()
    }

    pub fn role_list(&self) -> Vec<String> {
        self.state().roles.keys().cloned().collect()
    }

    /// `(enabled, auth revision)`.
    pub fn status(&self) -> (bool, u64) {
        let s = self.state();
        (s.enabled, s.revision)
    }
}

/// Adds `perm` to a role's permissions, kept sorted by key; a permission on the same key and
/// range end only changes its type (etcd's `RoleGrantPermission`).
fn grant(perms: &mut Vec<Permission>, perm: Permission) {
    let i = perms.partition_point(|p| p.key < perm.key);
    if let Some(p) = perms
        .get_mut(i)
        .filter(|p| p.key == perm.key && p.range_end == perm.range_end)
    {
        p.perm_type = perm.perm_type;
    } else {
        perms.insert(i, perm);
    }
}

fn load(engine: &dyn Engine) -> Result<State> {
    let mut s = State {
        revision: 1,
        ..Default::default()
    };
    let snap = engine.snapshot();
    let mut it = snap.iter(Table::Auth);
    it.seek(&[]);
    while it.valid() {
        let (k, v) = (it.key(), it.value());
        if k == KEY_ENABLED {
            s.enabled = v == [1];
        } else if k == KEY_REVISION {
            s.revision = <[u8; 8]>::try_from(v)
                .map(u64::from_be_bytes)
                .map_err(|_| internal("malformed auth revision"))?;
        } else if let Some(name) = k.strip_prefix(USER_PREFIX) {
            let u = User::decode(v).map_err(|e| internal(format!("user {}: {e}", text(name))))?;
            s.users.insert(text(name), u);
        } else if let Some(name) = k.strip_prefix(ROLE_PREFIX) {
            let r = Role::decode(v).map_err(|e| internal(format!("role {}: {e}", text(name))))?;
            s.roles.insert(text(name), r);
        }
        it.next();
    }
    it.status().map_err(internal)?;
    s.derive();
    Ok(s)
}

#[cfg(test)]
mod tests;
