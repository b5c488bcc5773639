//! [`Replica`]: this member's view of the Raft group, and every request that must reach the
//! leader: proposals, ReadIndex, lease keep-alives, membership changes. A follower forwards
//! them over the peer protocol; the leader serves them itself.
//!
//! Retrying a proposal is safe only when it certainly was not accepted (the target said it is
//! not the leader, or could not be connected to). Any other failure leaves the outcome
//! unknown: the client's wait then ends with etcd's "request timed out", never with a second
//! copy of the write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metastore_proto::etcdserverpb::{
    LeaseKeepAliveRequest, LeaseTimeToLiveRequest, LeaseTimeToLiveResponse,
};
use metastore_proto::raftpb as pb;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tokio::sync::watch;
use tonic::Code;

use super::codec;
use super::network::Peers;
use super::read_index::{Fetch, ReadBatcher, ReadError};
use super::{Batch, MemberNode, Membership, NodeId, Raft};
use crate::apply::ApplyError;

/// The message a member that is not the leader answers forwarded requests with.
pub const MSG_NOT_LEADER: &str = "etcdserver: not leader";

/// Timing, from `--heartbeat-interval` and `--election-timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub heartbeat: Duration,
    pub election: Duration,
}

impl Timing {
    /// How long a request waits for a leader to appear before failing with "no leader".
    pub fn leader_wait(&self) -> Duration {
        self.election * 4
    }

    /// etcd's request timeout: 5 s plus two election timeouts.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(5) + self.election * 2
    }

    /// openraft's leader lease (its `election_timeout_max`): after the last heartbeat, a
    /// follower refuses to vote for anyone else for this long. 1.5 election timeouts keeps
    /// failover after a partition short.
    pub fn leader_lease(&self) -> Duration {
        self.election * 3 / 2
    }
}

pub struct Replica {
    pub raft: Raft,
    pub peers: Peers,
    pub member_id: NodeId,
    pub timing: Timing,
    applied: watch::Receiver<u64>,
    /// openraft's server metrics (vote, role, leader, membership), kept rather than asked
    /// for on every call: each response header reads the term from it.
    server: watch::Receiver<openraft::metrics::RaftServerMetrics<NodeId, MemberNode>>,
    /// openraft's full metrics, kept like `server`: one consistent snapshot of role,
    /// membership and log positions ([`sole_voter_read`], status, replication).
    raft_metrics: watch::Receiver<openraft::RaftMetrics<NodeId, MemberNode>>,
    reads: Arc<ReadBatcher>,
    changing: tokio::sync::Mutex<()>,
    /// True while this leader hands leadership over (MoveLeader): new proposals and
    /// ReadIndex requests wait, so that no append reaches a follower and refreshes its lease.
    transferring: watch::Sender<bool>,
    /// Proposals inside `client_write` on this leader; a transfer waits for them to end.
    writing: std::sync::atomic::AtomicUsize,
}

/// Ends a leadership transfer however it went: heartbeats back on, held requests released.
struct TransferGuard<'a>(&'a Replica);

impl Drop for TransferGuard<'_> {
    fn drop(&mut self) {
        self.0.raft.runtime_config().heartbeat(true);
        self.0.transferring.send_replace(false);
    }
}

/// Counts one proposal inside `client_write` (see [`Replica::writing`]).
struct Writing<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

fn retryable(s: &tonic::Status) -> bool {
    match s.code() {
        Code::FailedPrecondition => s.message() == MSG_NOT_LEADER,
        // The connection could not be made (refused, unresolvable): nothing was sent. An
        // expired deadline is not here: the request may have arrived.
        Code::Unavailable => {
            let m = s.message().to_ascii_lowercase();
            m.contains("connect") || m.contains("dns")
        }
        _ => false,
    }
}

/// Whether a linearizable read may skip the ReadIndex round, from one snapshot of openraft's
/// metrics: this member leads, it is the only voter of the effective membership (every
/// config of a joint one), so no other member can commit anything; and it has applied an
/// entry of its own term, so everything committed before it became leader is applied too.
/// A write is acknowledged only once applied, so the applied state then holds every
/// acknowledged write. etcd's raft answers a single voter's ReadIndex at once the same way.
fn sole_voter_read(m: &openraft::RaftMetrics<NodeId, MemberNode>, me: NodeId) -> bool {
    m.state == ServerState::Leader
        && m.current_leader == Some(me)
        && {
            let configs = m.membership_config.membership().get_joint_config();
            !configs.is_empty()
                && configs
                    .iter()
                    .all(|voters| voters.len() == 1 && voters.contains(&me))
        }
        && m.last_applied
            .is_some_and(|l| l.leader_id.term == m.current_term)
}

impl Replica {
    pub fn new(
        raft: Raft,
        peers: Peers,
        member_id: NodeId,
        timing: Timing,
        applied: watch::Receiver<u64>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak: &std::sync::Weak<Replica>| {
            let weak = weak.clone();
            let fetch: Fetch = Arc::new(move || {
                let weak = weak.clone();
                Box::pin(async move {
                    match weak.upgrade() {
                        Some(r) => r.fetch_read_index().await,
                        None => Err(ReadError::Stopped),
                    }
                })
            });
            Replica {
                server: raft.server_metrics(),
                raft_metrics: raft.metrics(),
                raft,
                peers,
                member_id,
                timing,
                applied,
                reads: ReadBatcher::new(fetch),
                changing: tokio::sync::Mutex::new(()),
                transferring: watch::channel(false).0,
                writing: std::sync::atomic::AtomicUsize::new(0),
            }
        })
    }

    fn metrics(&self) -> openraft::RaftMetrics<NodeId, MemberNode> {
        self.raft_metrics.borrow().clone()
    }

    /// The leader this member knows of.
    pub fn leader_id(&self) -> Option<NodeId> {
        self.server.borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        let m = self.server.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.member_id)
    }

    pub fn term(&self) -> u64 {
        self.server.borrow().vote.leader_id().get_term()
    }

    /// Last log index, last applied index.
    pub fn indexes(&self) -> (u64, u64) {
        // The state machine's own applied index is exact (openraft's metrics trail it).
        let applied = *self.applied.borrow();
        let last = self.raft_metrics.borrow().last_log_index.unwrap_or(0);
        (last.max(applied), applied)
    }

    /// On the leader: each member's matched log index.
    pub fn replication(&self) -> Vec<(NodeId, u64)> {
        let m = self.raft_metrics.borrow();
        m.replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map_or(0, |l| l.index)))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn membership(&self) -> Membership {
        self.server.borrow().membership_config.membership().clone()
    }

    pub fn is_learner(&self) -> bool {
        let m = self.membership();
        let learner = m.learner_ids().any(|id| id == self.member_id);
        learner
    }

    /// Waits (up to [`Timing::leader_wait`]) for a leader; returns it and its node.
    pub async fn wait_leader(&self) -> Result<(NodeId, MemberNode), ApplyError> {
        let deadline = Instant::now() + self.timing.leader_wait();
        let mut rx = self.raft.server_metrics();
        loop {
            {
                let m = rx.borrow_and_update();
                if let Some(l) = m.current_leader {
                    if let Some(n) = m.membership_config.membership().get_node(&l) {
                        return Ok((l, n.clone()));
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApplyError::NoLeader);
            }
            if tokio::time::timeout(left, rx.changed())
                .await
                .is_ok_and(|r| r.is_err())
            {
                return Err(ApplyError::Mvcc(crate::mvcc::Error::Closed));
            }
        }
    }

    /// Gets `batch` (an encoded `CommandBatch`) committed. `Ok` means committed, or that the
    /// outcome is unknown (the waiting clients then time out); `Err` means it certainly was
    /// not, and why.
    pub async fn submit(&self, batch: Bytes) -> Result<(), ApplyError> {
        let deadline = Instant::now() + self.timing.request_timeout();
        loop {
            let (leader, node) = self.wait_leader().await?;
            if leader == self.member_id {
                let Some(_writing) = self.enter_write().await else {
                    // A leadership transfer ran meanwhile: find the leader again.
                    continue;
                };
                return match self.raft.client_write(Batch(batch)).await {
                    Ok(_) => Ok(()),
                    Err(RaftError::Fatal(_)) => Err(ApplyError::Mvcc(crate::mvcc::Error::Closed)),
                    // Leadership changed while the entry was in flight: it may still commit.
                    Err(RaftError::APIError(_)) => Ok(()),
                };
            }
            let mut client = self.peers.get(&node).map_err(ApplyError::Raft)?;
            // Bounded: a leader cut off by a partition must not hold this entry's slot (and
            // everything queued behind it) until TCP gives up. Past the deadline the outcome
            // is unknown and the waiting clients time out.
            let mut req = tonic::Request::new(pb::ProposeRequest {
                batch: batch.clone(),
            });
            req.set_timeout(self.timing.election);
            match client.propose(req).await {
                Ok(_) => return Ok(()),
                Err(s) if retryable(&s) && Instant::now() < deadline => {
                    tokio::time::sleep(self.timing.heartbeat).await;
                }
                Err(s) if retryable(&s) => return Err(ApplyError::NoLeader),
                Err(s) => {
                    tracing::debug!(error = %s, "forwarded proposal: outcome unknown");
                    return Ok(());
                }
            }
        }
    }

    /// Serves a forwarded proposal (on the leader).
    pub async fn propose_local(&self, batch: Bytes) -> Result<u64, tonic::Status> {
        let Some(_writing) = self.enter_write().await else {
            return Err(tonic::Status::failed_precondition(MSG_NOT_LEADER));
        };
        if !self.is_leader() {
            return Err(tonic::Status::failed_precondition(MSG_NOT_LEADER));
        }
        match self.raft.client_write(Batch(batch)).await {
            Ok(r) => Ok(r.log_id.index),
            Err(RaftError::Fatal(_)) => Err(tonic::Status::unavailable(
                crate::server::status::MSG_STOPPED,
            )),
            Err(RaftError::APIError(e)) => Err(tonic::Status::unavailable(format!(
                "etcdserver: leader changed ({e})"
            ))),
        }
    }

    /// Waits until this member has applied everything committed before the call: after it,
    /// a local read is linearizable.
    pub async fn linearizable_read(&self) -> Result<(), ApplyError> {
        if sole_voter_read(&self.raft_metrics.borrow(), self.member_id) {
            // Nothing another member could have committed: what is applied is current.
            return Ok(());
        }
        let index = self.reads.read_index().await.map_err(|e| match e {
            ReadError::NoLeader => ApplyError::NoLeader,
            ReadError::Timeout => ApplyError::Timeout,
            ReadError::Stopped => ApplyError::Mvcc(crate::mvcc::Error::Closed),
        })?;
        let mut rx = self.applied.clone();
        let waited = tokio::time::timeout(self.timing.request_timeout(), async move {
            rx.wait_for(|a| *a >= index).await.map(|_| ())
        })
        .await;
        match waited {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ApplyError::Mvcc(crate::mvcc::Error::Closed)),
            Err(_) => Err(ApplyError::Timeout),
        }
    }

    async fn fetch_read_index(&self) -> Result<u64, ReadError> {
        let deadline = Instant::now() + self.timing.request_timeout();
        loop {
            let (leader, node) = self.wait_leader().await.map_err(|_| ReadError::NoLeader)?;
            let r = if leader == self.member_id {
                self.local_read_index().await
            } else {
                match self.peers.get(&node) {
                    Ok(mut c) => {
                        let mut req = tonic::Request::new(pb::ReadIndexRequest {});
                        req.set_timeout(self.timing.election);
                        c.read_index(req).await.map(|r| r.into_inner().index)
                    }
                    Err(e) => Err(tonic::Status::unavailable(e)),
                }
            };
            match r {
                Ok(i) => return Ok(i),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(self.timing.heartbeat).await;
                }
                Err(s) if retryable(&s) => return Err(ReadError::NoLeader),
                Err(_) => return Err(ReadError::Timeout),
            }
        }
    }

    /// ReadIndex on the leader: confirms leadership with a quorum and returns the index
    /// every read arriving now must wait for.
    pub async fn local_read_index(&self) -> Result<u64, tonic::Status> {
        // ReadIndex sends heartbeats; during a transfer they would renew the lease the
        // transferee waits out. Held reads continue once it is over.
        self.wait_transfer().await;
        if !self.is_leader() {
            return Err(tonic::Status::failed_precondition(MSG_NOT_LEADER));
        }
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map_or(0, |l| l.index)),
            Err(RaftError::Fatal(_)) => Err(tonic::Status::unavailable(
                crate::server::status::MSG_STOPPED,
            )),
            Err(RaftError::APIError(e)) => Err(tonic::Status::failed_precondition(format!(
                "{MSG_NOT_LEADER}: {e}"
            ))),
        }
    }

    /// A keep-alive for `id` on the leader (which alone tracks lease deadlines); `renew`
    /// renews locally and returns the TTL (0: no such lease).
    pub async fn lease_keep_alive(
        &self,
        id: i64,
        renew: impl Fn(i64) -> Option<i64>,
    ) -> Result<i64, ApplyError> {
        let (leader, node) = self.wait_leader().await?;
        if leader == self.member_id {
            return renew(id).ok_or(ApplyError::LeaseNotFound);
        }
        let mut c = self.peers.get(&node).map_err(ApplyError::Raft)?;
        let mut req = tonic::Request::new(LeaseKeepAliveRequest { id });
        req.set_timeout(self.timing.election * 2);
        let r = c
            .lease_keep_alive(req)
            .await
            .map_err(|s| forwarded_error(&s))?
            .into_inner();
        if r.ttl <= 0 {
            return Err(ApplyError::LeaseNotFound);
        }
        Ok(r.ttl)
    }

    /// TimeToLive, answered by the leader.
    pub async fn lease_time_to_live_remote(
        &self,
        req: LeaseTimeToLiveRequest,
    ) -> Result<Option<LeaseTimeToLiveResponse>, ApplyError> {
        let (leader, node) = self.wait_leader().await?;
        if leader == self.member_id {
            return Ok(None);
        }
        let mut c = self.peers.get(&node).map_err(ApplyError::Raft)?;
        let mut req = tonic::Request::new(req);
        req.set_timeout(self.timing.election * 2);
        let r = c
            .lease_time_to_live(req)
            .await
            .map_err(|s| forwarded_error(&s))?
            .into_inner();
        Ok(Some(r))
    }

    /// Waits while a leadership transfer runs; true if it had to.
    async fn wait_transfer(&self) -> bool {
        let mut rx = self.transferring.subscribe();
        if !*rx.borrow_and_update() {
            return false;
        }
        // The transfer bounds itself by the request timeout; this bound is a safety net.
        let _ = tokio::time::timeout(self.timing.request_timeout(), rx.wait_for(|t| !*t)).await;
        true
    }

    /// Admits one proposal into `client_write` on this member, counted so that a transfer
    /// can wait for it. `None` when a transfer was running: the caller must look for the
    /// leader again. (Counting before checking the flag, and the transfer setting the flag
    /// before reading the count, means neither can miss the other.)
    async fn enter_write(&self) -> Option<Writing<'_>> {
        use std::sync::atomic::Ordering::SeqCst;
        self.writing.fetch_add(1, SeqCst);
        let guard = Writing(&self.writing);
        if !*self.transferring.borrow() {
            return Some(guard);
        }
        drop(guard);
        self.wait_transfer().await;
        None
    }

    /// Maintenance.MoveLeader, on the leader: hands leadership to voter `target`.
    ///
    /// openraft 0.9 has no leadership transfer, and its followers refuse to vote while the
    /// leader lease from the last heartbeat runs. So, as etcd's raft does for a transfer, the
    /// leader stops taking proposals, waits until `target` holds every entry, stops
    /// heartbeats, waits out the lease, and then asks `target` to campaign; `target`'s log is
    /// as long as anyone's, so it wins. Bounded by the request timeout.
    pub async fn move_leader(&self, target: NodeId) -> Result<(), ApplyError> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.is_leader() {
            return Err(ApplyError::NotLeader);
        }
        let membership = self.membership();
        if !membership.voter_ids().any(|id| id == target) {
            return Err(ApplyError::BadLeaderTransferee);
        }
        if target == self.member_id {
            return Ok(());
        }
        let node = membership
            .get_node(&target)
            .cloned()
            .ok_or(ApplyError::BadLeaderTransferee)?;
        let started = Instant::now();
        let deadline = started + self.timing.request_timeout();
        // No membership change meanwhile.
        let _one_at_a_time = self.changing.lock().await;
        tracing::info!(target = %format!("{target:x}"), "leadership transfer starting");
        self.transferring.send_replace(true);
        let _guard = TransferGuard(self);

        // 1. Every admitted proposal is in the log, and `target` has the whole log.
        let mut rx = self.raft.metrics();
        loop {
            if !self.is_leader() {
                return Err(ApplyError::NotLeader);
            }
            let caught_up = {
                let m = rx.borrow_and_update();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target).cloned().flatten())
                    .map_or(0, |l| l.index);
                matched >= last
            };
            if caught_up && self.writing.load(SeqCst) == 0 {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApplyError::TimeoutLeaderTransfer);
            }
            // Poll too: `writing` changes without a metrics update.
            let _ = tokio::time::timeout(left.min(self.timing.heartbeat), rx.changed()).await;
        }

        // 2. No more appends, then wait out the lease the last one gave every follower.
        self.raft.runtime_config().heartbeat(false);
        tokio::time::sleep(self.timing.leader_lease() + self.timing.heartbeat).await;

        // 3. The transferee campaigns; it has every entry, so a majority grants its vote.
        let mut client = self.peers.get(&node).map_err(ApplyError::Raft)?;
        let mut req = tonic::Request::new(pb::CampaignRequest {
            from: self.member_id,
        });
        req.set_timeout(self.timing.election);
        if let Err(s) = client.campaign(req).await {
            tracing::warn!(error = %s, "leadership transfer: the transferee did not campaign");
            return Err(ApplyError::TimeoutLeaderTransfer);
        }

        // 4. Done when this member follows `target`.
        loop {
            if rx.borrow_and_update().current_leader == Some(target) {
                tracing::info!(
                    target = %format!("{target:x}"),
                    took = ?started.elapsed(),
                    "leadership transfer finished"
                );
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ApplyError::TimeoutLeaderTransfer);
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }
    }

    /// The transferee's side of [`Replica::move_leader`]: campaign now.
    pub async fn campaign(&self) -> Result<(), tonic::Status> {
        if !self.membership().voter_ids().any(|id| id == self.member_id) {
            return Err(tonic::Status::failed_precondition(
                "etcdserver: bad leader transferee",
            ));
        }
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|_| tonic::Status::unavailable(crate::server::status::MSG_STOPPED))
    }

    /// Applies a membership change, on the leader (forwarding it there if needed).
    pub async fn member_change(
        &self,
        req: pb::MemberChangeRequest,
    ) -> Result<pb::MemberChangeResponse, ApplyError> {
        // A leader that is gone (stopped, or no longer leading) is waited out as for a
        // write: the change is sent again to the next one, until the request timeout. Only
        // failures where nothing was sent (no connection, "not leader") are retried.
        let deadline = Instant::now() + self.timing.request_timeout();
        loop {
            let (leader, node) = self.wait_leader().await?;
            let r = if leader != self.member_id {
                match self.peers.get(&node) {
                    Ok(mut c) => {
                        let mut forwarded = tonic::Request::new(req.clone());
                        forwarded.set_timeout(self.timing.request_timeout());
                        c.member_change(forwarded)
                            .await
                            .map(|r| r.into_inner())
                            .map_err(|s| (retryable(&s), forwarded_error(&s)))
                    }
                    Err(e) => Err((true, ApplyError::Raft(e))),
                }
            } else {
                self.member_change_local(req.clone())
                    .await
                    .map_err(|e| (matches!(e, ApplyError::NoLeader), e))
            };
            match r {
                Ok(r) => return Ok(r),
                Err((true, _)) if Instant::now() < deadline => {
                    tokio::time::sleep(self.timing.heartbeat).await;
                }
                Err((_, e)) => return Err(e),
            }
        }
    }

    /// Applies a membership change; this member must be the leader. Changes run one at a
    /// time (Raft allows one in flight).
    pub async fn member_change_local(
        &self,
        req: pb::MemberChangeRequest,
    ) -> Result<pb::MemberChangeResponse, ApplyError> {
        let _one_at_a_time = self.changing.lock().await;
        self.member_change_serialized(req).await
    }

    async fn member_change_serialized(
        &self,
        req: pb::MemberChangeRequest,
    ) -> Result<pb::MemberChangeResponse, ApplyError> {
        use pb::member_change_request::Change;
        let m = self.membership();
        let nodes: BTreeMap<NodeId, MemberNode> =
            m.nodes().map(|(id, n)| (*id, n.clone())).collect();
        let voters: BTreeSet<NodeId> = m.voter_ids().collect();
        let mut added = 0;
        let change: ChangeMembers<NodeId, MemberNode> = match req.change {
            None => return Err(ApplyError::Raft("empty membership change".into())),
            Some(Change::Add(a)) => {
                for url in &a.peer_ur_ls {
                    if nodes.values().any(|n| n.peer_urls.contains(url)) {
                        return Err(ApplyError::PeerUrlExists);
                    }
                }
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let id = crate::server::member::new_member_id(&a.peer_ur_ls, now);
                added = id;
                let node = MemberNode {
                    name: String::new(),
                    peer_urls: a.peer_ur_ls.clone(),
                    client_urls: Vec::new(),
                };
                self.write_membership(ChangeMembers::AddNodes([(id, node)].into()))
                    .await?;
                if a.is_learner {
                    return self.membership_response(id);
                }
                ChangeMembers::AddVoterIds([id].into())
            }
            Some(Change::Remove(r)) => {
                if !nodes.contains_key(&r.id) {
                    return Err(ApplyError::MemberNotFound);
                }
                if voters.contains(&r.id) {
                    if voters.len() == 1 {
                        return Err(ApplyError::NotEnoughStartedMembers);
                    }
                    self.write_membership(ChangeMembers::RemoveVoters([r.id].into()))
                        .await?;
                }
                ChangeMembers::RemoveNodes([r.id].into())
            }
            Some(Change::Update(u)) => {
                let Some(n) = nodes.get(&u.id) else {
                    return Err(ApplyError::MemberNotFound);
                };
                for url in &u.peer_ur_ls {
                    if nodes
                        .iter()
                        .any(|(id, n)| *id != u.id && n.peer_urls.contains(url))
                    {
                        return Err(ApplyError::PeerUrlExists);
                    }
                }
                let mut n = n.clone();
                n.peer_urls = u.peer_ur_ls.clone();
                ChangeMembers::SetNodes([(u.id, n)].into())
            }
            Some(Change::Promote(p)) => {
                if voters.contains(&p.id) {
                    return Err(ApplyError::MemberNotLearner);
                }
                if !nodes.contains_key(&p.id) {
                    return Err(ApplyError::MemberNotFound);
                }
                // etcd: a learner is ready once it has 90% of the leader's log.
                let metrics = self.metrics();
                let last = metrics.last_log_index.unwrap_or(0);
                let matched = metrics
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&p.id).cloned().flatten())
                    .map_or(0, |l| l.index);
                if (matched as f64) < (last as f64) * 0.9 {
                    return Err(ApplyError::LearnerNotReady);
                }
                ChangeMembers::AddVoterIds([p.id].into())
            }
            Some(Change::Publish(p)) => {
                let Some(n) = nodes.get(&p.id) else {
                    return Err(ApplyError::MemberNotFound);
                };
                if n.name == p.name && n.client_urls == p.client_urls {
                    return self.membership_response(p.id);
                }
                let mut n = n.clone();
                n.name = p.name;
                n.client_urls = p.client_urls;
                ChangeMembers::SetNodes([(p.id, n)].into())
            }
        };
        self.write_membership(change).await?;
        self.membership_response(added)
    }

    async fn write_membership(
        &self,
        change: ChangeMembers<NodeId, MemberNode>,
    ) -> Result<(), ApplyError> {
        let deadline = Instant::now() + self.timing.request_timeout();
        loop {
            let r = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()),
                self.raft.change_membership(change.clone(), true),
            )
            .await
            .map_err(|_| ApplyError::Timeout)?;
            // A change committed but not yet applied everywhere (or one a previous leader
            // left behind) blocks the next one briefly.
            if let Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                openraft::error::ChangeMembershipError::InProgress(_),
            ))) = &r
            {
                tokio::time::sleep(self.timing.heartbeat).await;
                continue;
            }
            return self.membership_result(r);
        }
    }

    fn membership_result(
        &self,
        r: Result<
            openraft::raft::ClientWriteResponse<super::TypeConfig>,
            RaftError<NodeId, ClientWriteError<NodeId, MemberNode>>,
        >,
    ) -> Result<(), ApplyError> {
        match r {
            Ok(_) => Ok(()),
            Err(RaftError::Fatal(_)) => Err(ApplyError::Mvcc(crate::mvcc::Error::Closed)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(ApplyError::NoLeader)
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ApplyError::Raft(e.to_string()))
            }
        }
    }

    fn membership_response(&self, id: NodeId) -> Result<pb::MemberChangeResponse, ApplyError> {
        Ok(pb::MemberChangeResponse {
            id,
            membership: Some(codec::membership_to_pb(&self.membership())),
        })
    }
}

/// An error a forwarded request came back with, as the client should see it.
pub fn forwarded_error(s: &tonic::Status) -> ApplyError {
    let msg = s.message();
    let known = [
        ApplyError::NoLeader,
        ApplyError::Timeout,
        ApplyError::LeaseNotFound,
        ApplyError::MemberNotFound,
        ApplyError::PeerUrlExists,
        ApplyError::MemberNotLearner,
        ApplyError::LearnerNotReady,
        ApplyError::NotEnoughStartedMembers,
    ];
    for k in known {
        if k.to_string() == msg {
            return k;
        }
    }
    if retryable(s) {
        return ApplyError::NoLeader;
    }
    ApplyError::Raft(msg.trim_start_matches("etcdserver: ").to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use openraft::{
        CommittedLeaderId, LogId, Membership, RaftMetrics, ServerState, StoredMembership,
    };

    use super::sole_voter_read;
    use crate::raft::{MemberNode, NodeId};

    /// Metrics of a leader `me` in term 3 that applied an entry of term `applied_term`, with
    /// the voter configs `configs` (more than one: a joint membership).
    fn metrics(
        me: NodeId,
        configs: &[&[NodeId]],
        applied_term: u64,
    ) -> RaftMetrics<NodeId, MemberNode> {
        let mut m = RaftMetrics::new_initial(me);
        m.state = ServerState::Leader;
        m.current_leader = Some(me);
        m.current_term = 3;
        m.last_applied = Some(LogId::new(CommittedLeaderId::new(applied_term, me), 7));
        let configs: Vec<BTreeSet<NodeId>> = configs
            .iter()
            .map(|c| c.iter().copied().collect())
            .collect();
        let nodes: BTreeMap<NodeId, MemberNode> = configs
            .iter()
            .flatten()
            .map(|&id| (id, MemberNode::default()))
            .collect();
        m.membership_config =
            Arc::new(StoredMembership::new(None, Membership::new(configs, nodes)));
        m
    }

    #[test]
    fn only_a_sole_voter_leader_that_applied_its_own_term_skips_read_index() {
        assert!(sole_voter_read(&metrics(1, &[&[1]], 3), 1));
        // Not yet applied an entry of its term: earlier committed entries may be unapplied.
        assert!(!sole_voter_read(&metrics(1, &[&[1]], 2), 1));
        // Other voters, alone or in a joint membership being entered or left.
        assert!(!sole_voter_read(&metrics(1, &[&[1, 2, 3]], 3), 1));
        assert!(!sole_voter_read(&metrics(1, &[&[1], &[1, 2]], 3), 1));
        assert!(!sole_voter_read(&metrics(1, &[&[1, 2], &[1]], 3), 1));
        // Another member is the only voter (this one a learner).
        assert!(!sole_voter_read(&metrics(1, &[&[2]], 3), 1));
        // Not the leader, or not knowing itself as leader.
        let mut follower = metrics(1, &[&[1]], 3);
        follower.state = ServerState::Follower;
        assert!(!sole_voter_read(&follower, 1));
        let mut other_leader = metrics(1, &[&[1]], 3);
        other_leader.current_leader = Some(2);
        assert!(!sole_voter_read(&other_leader, 1));
        let mut nothing_applied = metrics(1, &[&[1]], 3);
        nothing_applied.last_applied = None;
        assert!(!sole_voter_read(&nothing_applied, 1));
    }
}
