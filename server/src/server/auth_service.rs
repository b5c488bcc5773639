//! `etcdserverpb.Auth`: users, roles, permissions, the auth switch and tokens. Thin: check
//! the caller (root for every admin call, as etcd), hash passwords off the async workers,
//! propose the change or read the auth store, map errors through the one table.

use metastore_proto::etcdserverpb::auth_server::Auth;
use metastore_proto::etcdserverpb::{
    AuthDisableRequest, AuthDisableResponse, AuthEnableRequest, AuthEnableResponse,
    AuthRoleAddRequest, AuthRoleAddResponse, AuthRoleDeleteRequest, AuthRoleDeleteResponse,
    AuthRoleGetRequest, AuthRoleGetResponse, AuthRoleGrantPermissionRequest,
    AuthRoleGrantPermissionResponse, AuthRoleListRequest, AuthRoleListResponse,
    AuthRoleRevokePermissionRequest, AuthRoleRevokePermissionResponse, AuthStatusRequest,
    AuthStatusResponse, AuthUserAddRequest, AuthUserAddResponse, AuthUserChangePasswordRequest,
    AuthUserChangePasswordResponse, AuthUserDeleteRequest, AuthUserDeleteResponse,
    AuthUserGetRequest, AuthUserGetResponse, AuthUserGrantRoleRequest, AuthUserGrantRoleResponse,
    AuthUserListRequest, AuthUserListResponse, AuthUserRevokeRoleRequest,
    AuthUserRevokeRoleResponse, AuthenticateRequest, AuthenticateResponse, ResponseHeader,
};
use tonic::{Request, Response, Status};

use super::node::{Node, NodeRef};
use super::status::{auth_status, to_status};
use crate::apply::command::{AuthCommand, CommandResult};
use crate::apply::Command;
use crate::auth::{Access, AuthError};

pub struct AuthService {
    node: NodeRef,
}

impl AuthService {
    pub fn new(node: NodeRef) -> Self {
        Self { node }
    }

    /// An admin change: the caller must be root; proposes `cmd(request)`.
    async fn change<R>(
        &self,
        req: Request<R>,
        cmd: fn(R) -> AuthCommand,
    ) -> Result<Option<ResponseHeader>, Status> {
        let node = self.node.get()?;
        admin(&node, &req)?;
        propose(&node, cmd(req.into_inner())).await
    }
}

fn err(e: AuthError) -> Status {
    auth_status(&e)
}

/// The caller, who must hold the root role (or auth is off).
fn admin<T>(node: &Node, req: &Request<T>) -> Result<Access, Status> {
    let access = node.auth.request(req).map_err(err)?;
    access.admin().map_err(err)?;
    Ok(access)
}

/// Proposes an auth change; returns the response header.
async fn propose(node: &Node, cmd: AuthCommand) -> Result<Option<ResponseHeader>, Status> {
    match node.propose(Command::Auth(cmd)).await {
        Ok(a) if matches!(a.result, CommandResult::Auth) => {
            Ok(Some(node.header(node.store.current_revision())))
        }
        Ok(_) => Err(Status::internal("etcdserver: unexpected apply result")),
        Err(e) => Err(to_status(&e)),
    }
}

/// A bcrypt hash of `password`, computed on the blocking pool (it is slow on purpose).
async fn hash(node: &Node, password: String) -> Result<String, Status> {
    let auth = node.auth.clone();
    tokio::task::spawn_blocking(move || auth.hash_password(&password))
        .await
        .map_err(|e| Status::internal(format!("etcdserver: hashing task: {e}")))?
        .map_err(err)
}

fn header(node: &Node) -> Option<ResponseHeader> {
    Some(node.header(node.store.current_revision()))
}

#[tonic::async_trait]
impl Auth for AuthService {
    async fn auth_enable(
        &self,
        req: Request<AuthEnableRequest>,
    ) -> Result<Response<AuthEnableResponse>, Status> {
        let header = self.change(req, AuthCommand::Enable).await?;
        Ok(Response::new(AuthEnableResponse { header }))
    }

    async fn auth_disable(
        &self,
        req: Request<AuthDisableRequest>,
    ) -> Result<Response<AuthDisableResponse>, Status> {
        let header = self.change(req, AuthCommand::Disable).await?;
        Ok(Response::new(AuthDisableResponse { header }))
    }

    async fn auth_status(
        &self,
        _: Request<AuthStatusRequest>,
    ) -> Result<Response<AuthStatusResponse>, Status> {
        let node = self.node.get()?;
        let (enabled, auth_revision) = node.auth.status();
        Ok(Response::new(AuthStatusResponse {
            header: header(&node),
            enabled,
            auth_revision,
        }))
    }

    async fn authenticate(
        &self,
        req: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let node = self.node.get()?;
        let r = req.into_inner();
        // etcd authenticates through Raft: a user just added through another member exists.
        node.linearizable_read().await.map_err(|e| to_status(&e))?;
        let auth = node.auth.clone();
        let index = crate::raft::position_index(node.store.applied_index());
        let token =
            tokio::task::spawn_blocking(move || auth.authenticate(&r.name, &r.password, index))
                .await
                .map_err(|e| Status::internal(format!("etcdserver: authenticate task: {e}")))?
                .map_err(err)?;
        Ok(Response::new(AuthenticateResponse {
            header: header(&node),
            token,
        }))
    }

    async fn user_add(
        &self,
        req: Request<AuthUserAddRequest>,
    ) -> Result<Response<AuthUserAddResponse>, Status> {
        let node = self.node.get()?;
        admin(&node, &req)?;
        let mut r = req.into_inner();
        if r.name.is_empty() {
            return Err(err(AuthError::UserEmpty));
        }
        let no_password = r.options.as_ref().is_some_and(|o| o.no_password);
        if !no_password && r.hashed_password.is_empty() {
            r.hashed_password = hash(&node, std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        let header = propose(&node, AuthCommand::UserAdd(r)).await?;
        Ok(Response::new(AuthUserAddResponse { header }))
    }

    async fn user_get(
        &self,
        req: Request<AuthUserGetRequest>,
    ) -> Result<Response<AuthUserGetResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req).map_err(err)?;
        let r = req.into_inner();
        // etcd: a user may read its own entry.
        if let Err(e) = access.admin() {
            if access.user() != Some(r.name.as_str()) {
                return Err(err(e));
            }
        }
        let roles = node.auth.user_get(&r.name).map_err(err)?;
        Ok(Response::new(AuthUserGetResponse {
            header: header(&node),
            roles,
        }))
    }

    async fn user_list(
        &self,
        req: Request<AuthUserListRequest>,
    ) -> Result<Response<AuthUserListResponse>, Status> {
        let node = self.node.get()?;
        admin(&node, &req)?;
        Ok(Response::new(AuthUserListResponse {
            header: header(&node),
            users: node.auth.user_list(),
        }))
    }

    async fn user_delete(
        &self,
        req: Request<AuthUserDeleteRequest>,
    ) -> Result<Response<AuthUserDeleteResponse>, Status> {
        let header = self.change(req, AuthCommand::UserDelete).await?;
        Ok(Response::new(AuthUserDeleteResponse { header }))
    }

    async fn user_change_password(
        &self,
        req: Request<AuthUserChangePasswordRequest>,
    ) -> Result<Response<AuthUserChangePasswordResponse>, Status> {
        let node = self.node.get()?;
        admin(&node, &req)?;
        let mut r = req.into_inner();
        if !node.auth.state().users.contains_key(&r.name) {
            return Err(err(AuthError::UserNotFound));
        }
        if r.hashed_password.is_empty() {
            r.hashed_password = hash(&node, std::mem::take(&mut r.password)).await?;
        }
        r.password.clear();
        let header = propose(&node, AuthCommand::UserChangePassword(r)).await?;
        Ok(Response::new(AuthUserChangePasswordResponse { header }))
    }

    async fn user_grant_role(
        &self,
        req: Request<AuthUserGrantRoleRequest>,
    ) -> Result<Response<AuthUserGrantRoleResponse>, Status> {
        let header = self.change(req, AuthCommand::UserGrantRole).await?;
        Ok(Response::new(AuthUserGrantRoleResponse { header }))
    }

    async fn user_revoke_role(
        &self,
        req: Request<AuthUserRevokeRoleRequest>,
    ) -> Result<Response<AuthUserRevokeRoleResponse>, Status> {
        let header = self.change(req, AuthCommand::UserRevokeRole).await?;
        Ok(Response::new(AuthUserRevokeRoleResponse { header }))
    }

    async fn role_add(
        &self,
        req: Request<AuthRoleAddRequest>,
    ) -> Result<Response<AuthRoleAddResponse>, Status> {
        let header = self.change(req, AuthCommand::RoleAdd).await?;
        Ok(Response::new(AuthRoleAddResponse { header }))
    }

    async fn role_get(
        &self,
        req: Request<AuthRoleGetRequest>,
    ) -> Result<Response<AuthRoleGetResponse>, Status> {
        let node = self.node.get()?;
        let access = node.auth.request(&req).map_err(err)?;
        let r = req.into_inner();
        // etcd: a user may read the roles it holds.
        if let Err(e) = access.admin() {
            if !access.has_role(&r.role) {
                return Err(err(e));
            }
        }
        let perm = node.auth.role_get(&r.role).map_err(err)?;
        Ok(Response::new(AuthRoleGetResponse {
            header: header(&node),
            perm,
        }))
    }

    async fn role_list(
        &self,
        req: Request<AuthRoleListRequest>,
    ) -> Result<Response<AuthRoleListResponse>, Status> {
        let node = self.node.get()?;
        admin(&node, &req)?;
        Ok(Response::new(AuthRoleListResponse {
            header: header(&node),
            roles: node.auth.role_list(),
        }))
    }

    async fn role_delete(
        &self,
        req: Request<AuthRoleDeleteRequest>,
    ) -> Result<Response<AuthRoleDeleteResponse>, Status> {
        let header = self.change(req, AuthCommand::RoleDelete).await?;
        Ok(Response::new(AuthRoleDeleteResponse { header }))
    }

    async fn role_grant_permission(
        &self,
        req: Request<AuthRoleGrantPermissionRequest>,
    ) -> Result<Response<AuthRoleGrantPermissionResponse>, Status> {
        let header = self.change(req, AuthCommand::RoleGrantPermission).await?;
        Ok(Response::new(AuthRoleGrantPermissionResponse { header }))
    }

    async fn role_revoke_permission(
        &self,
        req: Request<AuthRoleRevokePermissionRequest>,
    ) -> Result<Response<AuthRoleRevokePermissionResponse>, Status> {
        let header = self.change(req, AuthCommand::RoleRevokePermission).await?;
        Ok(Response::new(AuthRoleRevokePermissionResponse { header }))
    }
}
