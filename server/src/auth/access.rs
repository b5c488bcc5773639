//! [`Access`]: who a request comes from and what it may do, resolved once per request.
//!
//! With auth off this is [`Access::Open`] after one atomic load: nothing else is read, so
//! clients of a store without auth (kube-apiserver's usual set-up) pay nothing. With auth on,
//! the token (gRPC metadata `token`, or `authorization` as etcd's JSON gateway passes it)
//! names the user; without a token and with `--client-cert-auth`, the common name of the
//! verified client certificate does (as etcd: the token wins). The user's merged
//! permissions are taken once, so a request's checks need no lock.

use std::sync::Arc;

use metastore_proto::etcdserverpb::{request_op::Request as Op, TxnRequest};

use super::perms::UserPerms;
use super::store::AuthStore;
use super::{AuthError, Result};
use crate::tls::ClientIdentity;

/// What a request presents: a token and/or a client certificate's common name.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub common_name: Option<String>,
}

impl Credentials {
    /// The credentials of a gRPC request (or of a gateway request turned into one).
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        let md = req.metadata();
        let token = md
            .get("token")
            .or_else(|| md.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let common_name = ClientIdentity::of(req.extensions())
            .map(|c| c.common_name.clone())
            .filter(|cn| !cn.is_empty());
        Self { token, common_name }
    }

    /// The credentials of a gRPC request before tonic decoded it (its HTTP/2 headers and the
    /// connection's extensions), for the layers in front of tonic's router.
    pub fn of_http(parts: &http::request::Parts) -> Self {
        let h = &parts.headers;
        let token = h
            .get("token")
            .or_else(|| h.get("authorization"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let common_name = ClientIdentity::of(&parts.extensions)
            .map(|c| c.common_name.clone())
            .filter(|cn| !cn.is_empty());
        Self { token, common_name }
    }
}

/// The requester as the permission checks see it.
#[derive(Debug, Clone)]
pub enum Access {
    /// Authentication is off: everything is permitted.
    Open,
    /// A user (`name` empty: no credentials). `perms` is `None` if no such user exists.
    User {
        name: String,
        perms: Option<Arc<UserPerms>>,
    },
}

impl AuthStore {
    /// Resolves a request's requester. With auth off: [`Access::Open`], after one atomic load.
    ///
    /// Errors: `InvalidAuthToken` for an unknown, expired or forged token.
    pub fn request<T>(&self, req: &tonic::Request<T>) -> Result<Access> {
        if !self.is_enabled() {
            return Ok(Access::Open);
        }
        self.access(&Credentials::of(req))
    }

    /// Resolves `creds` (see [`request`](Self::request)).
    pub fn access(&self, creds: &Credentials) -> Result<Access> {
        if !self.is_enabled() {
            return Ok(Access::Open);
        }
        let name = match (&creds.token, &creds.common_name) {
            (Some(token), _) => self.tokens().user_of(token)?,
            (None, Some(cn)) if self.client_cert_auth() => cn.clone(),
            _ => String::new(),
        };
        let perms = self.state().perms(&name);
        Ok(Access::User { name, perms })
    }
}

impl Access {
    /// The user's permissions, or `None` when everything is permitted (auth off, root).
    fn restricted(&self) -> Result<Option<&UserPerms>> {
        match self {
            Access::Open => Ok(None),
            Access::User { name, .. } if name.is_empty() => Err(AuthError::UserEmpty),
            Access::User { perms: None, .. } => Err(AuthError::PermissionDenied),
            Access::User { perms: Some(p), .. } if p.root => Ok(None),
            Access::User { perms: Some(p), .. } => Ok(Some(p)),
        }
    }

    /// READ on a key or range (`range_end` as in a Range request).
    ///
    /// Errors: `UserEmpty` without credentials, `PermissionDenied` otherwise.
    pub fn read(&self, key: &[u8], range_end: &[u8]) -> Result<()> {
        match self.restricted()? {
            Some(p) if !p.read.covers(key, range_end) => Err(AuthError::PermissionDenied),
            _ => Ok(()),
        }
    }

    /// WRITE on a key or range. Errors as [`read`](Self::read).
    pub fn write(&self, key: &[u8], range_end: &[u8]) -> Result<()> {
        match self.restricted()? {
            Some(p) if !p.write.covers(key, range_end) => Err(AuthError::PermissionDenied),
            _ => Ok(()),
        }
    }

    /// Whether this requester may do anything (auth off, or the root role).
    pub fn is_admin(&self) -> bool {
        matches!(self.restricted(), Ok(None))
    }

    /// Admin operations (the Auth admin calls, defragment, ...): root only.
    ///
    /// Errors: `UserEmpty` without credentials, `UserNotFound` for a user that no longer
    /// exists, `PermissionDenied` for a user without the root role (etcd's
    /// `IsAdminPermitted`).
    pub fn admin(&self) -> Result<()> {
        match self {
            Access::User { perms: None, name } if !name.is_empty() => Err(AuthError::UserNotFound),
            _ => match self.restricted()? {
                None => Ok(()),
                Some(_) => Err(AuthError::PermissionDenied),
            },
        }
    }

    /// The user's name (`None` with auth off).
    pub fn user(&self) -> Option<&str> {
        match self {
            Access::Open => None,
            Access::User { name, .. } => Some(name),
        }
    }

    /// Whether the user holds `role`.
    pub fn has_role(&self, role: &str) -> bool {
        match self {
            Access::Open => false,
            Access::User { perms, .. } => perms
                .as_ref()
                .is_some_and(|p| p.roles.iter().any(|r| r == role)),
        }
    }

    /// A Txn, as etcd checks it (`checkTxnReqsPermission`): READ for every compare, and each
    /// operation of both branches by its kind (nested txns too); a delete with `prev_kv`
    /// needs READ as well.
    pub fn txn(&self, t: &TxnRequest) -> Result<()> {
        if self.restricted()?.is_none() {
            return Ok(());
        }
        for c in &t.compare {
            self.read(&c.key, &c.range_end)?;
        }
        for op in t.success.iter().chain(&t.failure) {
            match &op.request {
                Some(Op::RequestRange(r)) => self.read(&r.key, &r.range_end)?,
                Some(Op::RequestPut(p)) => self.write(&p.key, &[])?,
                Some(Op::RequestDeleteRange(d)) => {
                    if d.prev_kv {
                        self.read(&d.key, &d.range_end)?;
                    }
                    self.write(&d.key, &d.range_end)?;
                }
                Some(Op::RequestTxn(inner)) => self.txn(inner)?,
                None => {}
            }
        }
        Ok(())
    }
}
