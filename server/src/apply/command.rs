//! [`Command`]: every state change, and [`apply`], the one function that executes it.

use metastore_proto::etcdserverpb::{
    alarm_request::AlarmAction, AlarmRequest, CompactionRequest, CompactionResponse,
    DeleteRangeRequest, DeleteRangeResponse, LeaseGrantRequest, LeaseGrantResponse,
    LeaseRevokeRequest, LeaseRevokeResponse, PutRequest, PutResponse, TxnRequest, TxnResponse,
};
use metastore_proto::mvccpb::Event;

use super::txn::{self, header};
use super::{ApplyError, LeaseLookup, Result};
use crate::auth::AuthStore;
use crate::mvcc;
use crate::mvcc::compactor::CompactTicket;
use crate::mvcc::store::Applying;

/// A state change, as proposed (and, with Raft, as replicated).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Put(PutRequest),
    DeleteRange(DeleteRangeRequest),
    Txn(TxnRequest),
    Compact(CompactionRequest),
    /// A grant with its id already chosen (non-zero) and its TTL already raised to the minimum:
    /// both are decided before proposing, so applying it is deterministic.
    LeaseGrant(LeaseGrantRequest),
    LeaseRevoke(LeaseRevokeRequest),
    /// Raise or clear an alarm (GET is answered without proposing).
    Alarm(AlarmRequest),
    /// Switch the storage format new records are written in (online migration; see
    /// [`crate::migrate::online`]). Proposed only once every member said it supports it.
    SetStorageFormat(u8),
    /// A change to users, roles, permissions or the auth switch; passwords only as hashes,
    /// made before proposing, so applying is deterministic.
    Auth(AuthCommand),
}

pub use metastore_proto::raftpb::auth_command::Request as AuthCommand;

impl Command {
    /// The RPC name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Put(_) => "Put",
            Command::DeleteRange(_) => "DeleteRange",
            Command::Txn(_) => "Txn",
            Command::Compact(_) => "Compact",
            Command::LeaseGrant(_) => "LeaseGrant",
            Command::LeaseRevoke(_) => "LeaseRevoke",
            Command::Alarm(_) => "Alarm",
            Command::SetStorageFormat(_) => "SetStorageFormat",
            Command::Auth(_) => "Auth",
        }
    }
}

/// The result of an applied command. Headers carry only the revision.
#[derive(Debug)]
pub enum CommandResult {
    Put(PutResponse),
    DeleteRange(DeleteRangeResponse),
    Txn(TxnResponse),
    Compact(CompactionResponse, CompactTicket),
    LeaseGrant(LeaseGrantResponse),
    LeaseRevoke(LeaseRevokeResponse),
    /// The alarms after the change, as `(member id, alarm type)`.
    Alarm(Vec<(u64, i32)>),
    /// The format now written, and whether records remain to re-encode.
    SetStorageFormat {
        to: u8,
        pending: bool,
    },
    /// An auth change was applied (its response is a bare header).
    Auth,
}

/// An applied command's result and the events it produced (for watchers).
#[derive(Debug)]
pub struct Applied {
    pub result: CommandResult,
    pub events: Vec<Event>,
    pub revision: i64,
}

/// Applies `cmd` as command number `index`. A command that fails leaves the key space (and
/// the auth state) as it was (its batch is dropped) but still consumes its index.
pub fn apply(
    applying: &mut Applying<'_>,
    index: u64,
    cmd: &Command,
    leases: &dyn LeaseLookup,
    auth: &AuthStore,
) -> Result<Applied> {
    let mut r = apply_inner(applying, index, cmd, leases, auth);
    if let Err(ApplyError::Mvcc(mvcc::Error::Regroup)) = r {
        // The command read what earlier commands of the group changed in a way the group's
        // view cannot answer: write them, then run it again (it changed nothing yet).
        applying.flush()?;
        r = apply_inner(applying, index, cmd, leases, auth);
    }
    if r.is_err() {
        applying.skip(index)?;
    }
    r
}

fn apply_inner(
    applying: &mut Applying<'_>,
    index: u64,
    cmd: &Command,
    leases: &dyn LeaseLookup,
    auth: &AuthStore,
) -> Result<Applied> {
    let mut t = applying.begin()?;
    let result = match cmd {
        Command::Put(p) => {
            txn::check_put(&t, p, leases)?;
            CommandResult::Put(txn::put(&mut t, p)?)
        }
        Command::DeleteRange(d) => CommandResult::DeleteRange(txn::delete_range(&mut t, d)?),
        Command::Txn(r) => {
            let path = txn::path(&t, r)?;
            txn::check_path(&t, r, &path, leases)?;
            CommandResult::Txn(txn::execute(&mut t, r, &path)?)
        }
        Command::LeaseGrant(g) => {
            if g.ttl > crate::lease::MAX_LEASE_TTL {
                return Err(ApplyError::LeaseTtlTooLarge);
            }
            if g.id <= 0 {
                return Err(ApplyError::LeaseNotFound);
            }
            if leases.lease_exists(g.id) {
                return Err(ApplyError::LeaseExists);
            }
            t.lease_grant(g.id, g.ttl);
            let revision = t.rev();
            let outcome = applying.commit(t, index)?;
            leases.granted(g.id, g.ttl);
            return Ok(Applied {
                result: CommandResult::LeaseGrant(LeaseGrantResponse {
                    header: Some(header(revision)),
                    id: g.id,
                    ttl: g.ttl,
                    error: String::new(),
                }),
                events: outcome.events,
                revision: outcome.rev,
            });
        }
        Command::LeaseRevoke(r) => {
            if !leases.lease_exists(r.id) {
                return Err(ApplyError::LeaseNotFound);
            }
            t.lease_revoke(r.id)?;
            let outcome = applying.commit(t, index)?;
            leases.revoked(r.id);
            return Ok(Applied {
                result: CommandResult::LeaseRevoke(LeaseRevokeResponse {
                    header: Some(header(outcome.rev)),
                }),
                events: outcome.events,
                revision: outcome.rev,
            });
        }
        Command::Alarm(a) => {
            drop(t);
            let active = a.action == AlarmAction::Activate as i32;
            let alarms = applying.set_alarm(a.member_id, a.alarm, active, index)?;
            let revision = applying.applied_rev();
            return Ok(Applied {
                result: CommandResult::Alarm(alarms),
                events: Vec::new(),
                revision,
            });
        }
        Command::Auth(a) => {
            drop(t);
            let mut prepared = auth.prepare(a)?;
            applying.write(prepared.take_batch(), index)?;
            auth.commit(prepared);
            return Ok(Applied {
                result: CommandResult::Auth,
                events: Vec::new(),
                revision: applying.applied_rev(),
            });
        }
        Command::SetStorageFormat(to) => {
            drop(t);
            let pending = applying.set_storage_format(*to, index)?;
            let revision = applying.applied_rev();
            return Ok(Applied {
                result: CommandResult::SetStorageFormat { to: *to, pending },
                events: Vec::new(),
                revision,
            });
        }
        Command::Compact(c) => {
            drop(t);
            let ticket = applying.compact(c.revision, index)?;
            let revision = applying.applied_rev();
            return Ok(Applied {
                result: CommandResult::Compact(
                    CompactionResponse {
                        header: Some(header(revision)),
                    },
                    ticket,
                ),
                events: Vec::new(),
                revision,
            });
        }
    };
    let outcome = applying.commit(t, index)?;
    Ok(Applied {
        result,
        events: outcome.events,
        revision: outcome.rev,
    })
}

#[cfg(test)]
mod tests;
