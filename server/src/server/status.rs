//! The one error → gRPC status table. Codes and messages are etcd's (`rpctypes`), because
//! clients match on them: etcd's client libraries turn these exact strings back into typed
//! errors (`rpctypes.ErrCompacted`, ...).

use tonic::{Code, Status};

use crate::apply::ApplyError;
use crate::auth::AuthError;
use crate::mvcc;

pub const MSG_COMPACTED: &str = "etcdserver: mvcc: required revision has been compacted";
pub const MSG_FUTURE_REV: &str = "etcdserver: mvcc: required revision is a future revision";
pub const MSG_STOPPED: &str = "etcdserver: server stopped";

/// Maps an apply or validation error to etcd's status.
pub fn to_status(e: &ApplyError) -> Status {
    use ApplyError as E;
    match e {
        E::EmptyKey
        | E::KeyNotFound
        | E::ValueProvided
        | E::LeaseProvided
        | E::TooManyOps
        | E::DuplicateKey
        | E::InvalidSortOption
        | E::RequestTooLarge => Status::invalid_argument(e.to_string()),
        E::LeaseNotFound => Status::not_found(e.to_string()),
        E::LeaseExists => Status::failed_precondition(e.to_string()),
        E::LeaseTtlTooLarge => Status::out_of_range(e.to_string()),
        E::NoSpace | E::DiskFull(_) | E::RangeTooLarge { .. } | E::ResponseTooLarge(_) => {
            Status::resource_exhausted(e.to_string())
        }
        E::NoLeader | E::Timeout | E::UnhealthyCluster | E::TimeoutLeaderTransfer | E::Raft(_) => {
            Status::unavailable(e.to_string())
        }
        E::MemberNotFound => Status::not_found(e.to_string()),
        E::PeerUrlExists
        | E::MemberNotLearner
        | E::LearnerNotReady
        | E::NotEnoughStartedMembers
        | E::NotLeader
        | E::BadLeaderTransferee => Status::failed_precondition(e.to_string()),
        E::Mvcc(m) => mvcc_status(m),
        E::Auth(a) => auth_status(a),
        #[allow(unreachable_patterns)]
        _ => Status::internal(format!("etcdserver: {e}")),
    }
}

/// etcd's codes for authentication and authorization errors (`rpctypes`).
pub fn auth_status(e: &AuthError) -> Status {
    use AuthError as A;
    let code = match e {
        A::UserEmpty
        | A::RoleEmpty
        | A::AuthFailed
        | A::InvalidAuthMgmt
        | A::PermissionNotGiven => Code::InvalidArgument,
        A::RootUserNotExist
        | A::RootRoleNotExist
        | A::UserAlreadyExist
        | A::UserNotFound
        | A::RoleAlreadyExist
        | A::RoleNotFound
        | A::RoleNotGranted
        | A::PermissionNotGranted
        | A::AuthNotEnabled => Code::FailedPrecondition,
        A::PermissionDenied => Code::PermissionDenied,
        A::InvalidAuthToken => Code::Unauthenticated,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

/// The text etcd puts in a watch response refused by the permission check: the Go string
/// of the gRPC error (`rpc error: code = PermissionDenied desc = ...`).
pub fn auth_cancel_reason(e: &AuthError) -> String {
    let s = auth_status(e);
    let code = match s.code() {
        Code::InvalidArgument => "InvalidArgument",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::PermissionDenied => "PermissionDenied",
        Code::Unauthenticated => "Unauthenticated",
        _ => "Internal",
    };
    format!("rpc error: code = {code} desc = {}", s.message())
}

pub fn mvcc_status(e: &mvcc::Error) -> Status {
    match e {
        mvcc::Error::Compacted => Status::out_of_range(MSG_COMPACTED),
        mvcc::Error::FutureRev => Status::out_of_range(MSG_FUTURE_REV),
        mvcc::Error::Closed => Status::unavailable(MSG_STOPPED),
        mvcc::Error::Storage(s) => {
            Status::new(Code::Unavailable, format!("etcdserver: storage: {s}"))
        }
        other => Status::internal(format!("etcdserver: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_codes_and_messages() {
        let cases: Vec<(ApplyError, Code, &str)> = vec![
            (
                ApplyError::NoLeader,
                Code::Unavailable,
                "etcdserver: no leader",
            ),
            (
                ApplyError::Timeout,
                Code::Unavailable,
                "etcdserver: request timed out",
            ),
            (
                ApplyError::MemberNotFound,
                Code::NotFound,
                "etcdserver: member not found",
            ),
            (
                ApplyError::PeerUrlExists,
                Code::FailedPrecondition,
                "etcdserver: Peer URLs already exists",
            ),
            (
                ApplyError::LearnerNotReady,
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member which is in sync with leader",
            ),
            (
                ApplyError::MemberNotLearner,
                Code::FailedPrecondition,
                "etcdserver: can only promote a learner member",
            ),
            (
                ApplyError::NotLeader,
                Code::FailedPrecondition,
                "etcdserver: not leader",
            ),
            (
                ApplyError::BadLeaderTransferee,
                Code::FailedPrecondition,
                "etcdserver: bad leader transferee",
            ),
            (
                ApplyError::TimeoutLeaderTransfer,
                Code::Unavailable,
                "etcdserver: request timed out, leader transfer took too long",
            ),
            (
                ApplyError::EmptyKey,
                Code::InvalidArgument,
                "etcdserver: key is not provided",
            ),
            (
                ApplyError::TooManyOps,
                Code::InvalidArgument,
                "etcdserver: too many operations in txn request",
            ),
            (
                ApplyError::DuplicateKey,
                Code::InvalidArgument,
                "etcdserver: duplicate key given in txn request",
            ),
            (
                ApplyError::RequestTooLarge,
                Code::InvalidArgument,
                "etcdserver: request is too large",
            ),
            (
                ApplyError::ValueProvided,
                Code::InvalidArgument,
                "etcdserver: value is provided",
            ),
            (
                ApplyError::LeaseProvided,
                Code::InvalidArgument,
                "etcdserver: lease is provided",
            ),
            (
                ApplyError::KeyNotFound,
                Code::InvalidArgument,
                "etcdserver: key not found",
            ),
            (
                ApplyError::LeaseNotFound,
                Code::NotFound,
                "etcdserver: requested lease not found",
            ),
            (
                ApplyError::NoSpace,
                Code::ResourceExhausted,
                "etcdserver: mvcc: database space exceeded",
            ),
            (
                ApplyError::LeaseExists,
                Code::FailedPrecondition,
                "etcdserver: lease already exists",
            ),
            (
                ApplyError::LeaseTtlTooLarge,
                Code::OutOfRange,
                "etcdserver: too large lease TTL",
            ),
            (
                mvcc::Error::Compacted.into(),
                Code::OutOfRange,
                MSG_COMPACTED,
            ),
            (
                mvcc::Error::FutureRev.into(),
                Code::OutOfRange,
                MSG_FUTURE_REV,
            ),
        ];
        for (e, code, msg) in cases {
            let s = to_status(&e);
            assert_eq!((s.code(), s.message()), (code, msg));
        }
    }

    #[test]
    fn auth_codes_and_messages() {
        // Checked against etcd 3.4 (e2e/test_differential_auth.py compares the messages).
        use AuthError as A;
        let cases = [
            (
                A::RootUserNotExist,
                Code::FailedPrecondition,
                "etcdserver: root user does not exist",
            ),
            (
                A::RootRoleNotExist,
                Code::FailedPrecondition,
                "etcdserver: root user does not have root role",
            ),
            (
                A::UserAlreadyExist,
                Code::FailedPrecondition,
                "etcdserver: user name already exists",
            ),
            (
                A::UserNotFound,
                Code::FailedPrecondition,
                "etcdserver: user name not found",
            ),
            (
                A::RoleAlreadyExist,
                Code::FailedPrecondition,
                "etcdserver: role name already exists",
            ),
            (
                A::RoleNotFound,
                Code::FailedPrecondition,
                "etcdserver: role name not found",
            ),
            (
                A::RoleNotGranted,
                Code::FailedPrecondition,
                "etcdserver: role is not granted to the user",
            ),
            (
                A::PermissionNotGranted,
                Code::FailedPrecondition,
                "etcdserver: permission is not granted to the role",
            ),
            (
                A::AuthNotEnabled,
                Code::FailedPrecondition,
                "etcdserver: authentication is not enabled",
            ),
            (
                A::UserEmpty,
                Code::InvalidArgument,
                "etcdserver: user name is empty",
            ),
            (
                A::RoleEmpty,
                Code::InvalidArgument,
                "etcdserver: role name is empty",
            ),
            (
                A::AuthFailed,
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password",
            ),
            (
                A::InvalidAuthMgmt,
                Code::InvalidArgument,
                "etcdserver: invalid auth management",
            ),
            (
                A::PermissionDenied,
                Code::PermissionDenied,
                "etcdserver: permission denied",
            ),
            (
                A::InvalidAuthToken,
                Code::Unauthenticated,
                "etcdserver: invalid auth token",
            ),
        ];
        for (e, code, msg) in cases {
            let s = to_status(&ApplyError::Auth(e.clone()));
            assert_eq!((s.code(), s.message()), (code, msg));
        }
        assert_eq!(
            auth_cancel_reason(&A::PermissionDenied),
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        );
    }
}
