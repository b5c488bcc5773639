//! The peer client: openraft's RPCs, and requests forwarded to the leader, over tonic.
//!
//! Channels connect lazily and resolve the peer's host name on every connection attempt, so a
//! member can name peers whose DNS records do not exist yet (StatefulSet pods start before
//! their records appear); openraft retries unreachable peers with backoff. An `https://` peer
//! URL is dialled with TLS ([`crate::tls::lazy_channel`]): the peer's certificate is verified
//! against `--peer-trusted-ca-file` and this member presents its `--peer-cert-file`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metastore_proto::raftpb as pb;
use metastore_proto::raftpb::raft_client::RaftClient;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, SnapshotMismatch,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::SnapshotSegmentId;
use rustls::ClientConfig;
use tokio::runtime::Handle;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use super::codec;
use super::{MemberNode, NodeId, TypeConfig};

/// How long a connection attempt to a peer may take, at most.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub type Client = RaftClient<Channel>;

/// A lazily connecting client for `url`; `tls` is used for an `https://` URL. The
/// connection's tasks are spawned on `spawn_on` when given (else on the caller's runtime).
pub fn client(
    url: &str,
    connect_timeout: Duration,
    tls: Option<&Arc<ClientConfig>>,
    spawn_on: Option<&Handle>,
) -> Result<Client, String> {
    let configure = |endpoint: Endpoint| {
        let endpoint = match spawn_on {
            Some(h) => endpoint.executor(OnRuntime(h.clone())),
            None => endpoint,
        };
        endpoint
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
    };
    let channel = crate::tls::lazy_channel(url, tls, configure)
        .map_err(|e| format!("bad peer URL {url}: {e}"))?;
    Ok(RaftClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// Spawns a connection's tasks on one runtime, whichever runtime made the connection.
#[derive(Clone)]
struct OnRuntime(Handle);

impl<F> hyper::rt::Executor<F> for OnRuntime
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// Clients by peer URL, shared by everything that talks to peers outside openraft.
#[derive(Clone)]
pub struct Peers {
    clients: Arc<Mutex<HashMap<String, Client>>>,
    connect_timeout: Duration,
    /// For `https://` peer URLs.
    tls: Option<Arc<ClientConfig>>,
    /// Where connections run (see [`spawning_on`](Peers::spawning_on)).
    spawn_on: Option<Handle>,
}

impl Default for Peers {
    fn default() -> Self {
        Self::new(CONNECT_TIMEOUT, None)
    }
}

impl Peers {
    /// Clients whose connection attempts give up after `connect_timeout` (a peer that does
    /// not answer within an election timeout is as good as gone), dialling `https://` peers
    /// with `tls`.
    pub fn new(connect_timeout: Duration, tls: Option<Arc<ClientConfig>>) -> Self {
        Self {
            clients: Arc::default(),
            connect_timeout,
            tls,
            spawn_on: None,
        }
    }

    /// Runs every connection's tasks (HTTP/2 framing, reads and writes) on `handle`'s
    /// runtime, even when openraft, on a [`RaftThread`](super::thread::RaftThread), makes
    /// the connection: that thread then only hands each request over.
    pub fn spawning_on(mut self, handle: Handle) -> Self {
        self.spawn_on = Some(handle);
        self
    }

    /// A client for `node` (its first peer URL).
    pub fn get(&self, node: &MemberNode) -> Result<Client, String> {
        let url = node
            .peer_urls
            .first()
            .ok_or_else(|| format!("member {} has no peer URL", node.name))?;
        self.get_url(url)
    }

    pub fn get_url(&self, url: &str) -> Result<Client, String> {
        let mut clients = self
            .clients
            .lock()
            .map_err(|_| "peer client lock poisoned".to_string())?;
        if let Some(c) = clients.get(url) {
            return Ok(c.clone());
        }
        let c = client(
            url,
            self.connect_timeout,
            self.tls.as_ref(),
            self.spawn_on.as_ref(),
        )?;
        clients.insert(url.to_string(), c.clone());
        Ok(c)
    }
}

/// openraft's connection factory.
#[derive(Clone, Default)]
pub struct Network {
    pub peers: Peers,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> PeerClient {
        PeerClient {
            target,
            client: self.peers.get(node),
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerClient {
    target: NodeId,
    client: Result<Client, String>,
}

fn status_err<E: std::error::Error>(s: tonic::Status) -> RPCError<NodeId, MemberNode, E> {
    match s.code() {
        Code::Unavailable | Code::Unknown | Code::Cancelled => {
            RPCError::Unreachable(Unreachable::new(&s))
        }
        _ => RPCError::Network(NetworkError::new(&s)),
    }
}

fn bad_reply<E: std::error::Error>(what: &str) -> RPCError<NodeId, MemberNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
        "malformed {what} reply"
    ))))
}

impl PeerClient {
    fn client<E: std::error::Error>(&self) -> Result<Client, RPCError<NodeId, MemberNode, E>> {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&std::io::Error::other(e))))
    }
}

fn request<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(option.hard_ttl());
    r
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>>
    {
        let req = pb::AppendEntriesRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            prev_log_id: codec::opt_log_id_to_pb(&rpc.prev_log_id),
            entries: rpc.entries.iter().map(codec::entry_to_pb).collect(),
            leader_commit: codec::opt_log_id_to_pb(&rpc.leader_commit),
        };
        let resp = self
            .client()?
            .append_entries(request(req, &option))
            .await
            .map_err(status_err)?
            .into_inner();
        use pb::append_entries_response::Result as R;
        match resp.result {
            Some(R::Success(_)) => Ok(AppendEntriesResponse::Success),
            Some(R::PartialSuccess(p)) => Ok(AppendEntriesResponse::PartialSuccess(
                codec::opt_log_id_from_pb(&p.matching),
            )),
            Some(R::Conflict(_)) => Ok(AppendEntriesResponse::Conflict),
            Some(R::HigherVote(v)) => {
                Ok(AppendEntriesResponse::HigherVote(codec::vote_from_pb(&v)))
            }
            None => Err(bad_reply("append-entries")),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, MemberNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let req = pb::InstallSnapshotRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            meta: Some(codec::snapshot_meta_to_pb(&rpc.meta)),
            offset: rpc.offset,
            data: rpc.data.into(),
            done: rpc.done,
        };
        let resp = self
            .client()?
            .install_snapshot(request(req, &option))
            .await
            .map_err(status_err)?
            .into_inner();
        if let (Some(expect), Some(got)) = (resp.mismatch_expect, resp.mismatch_got) {
            let seg = |s: pb::SnapshotSegmentId| SnapshotSegmentId {
                id: s.id,
                offset: s.offset,
            };
            return Err(RPCError::RemoteError(RemoteError::new(
                self.target,
                RaftError::APIError(InstallSnapshotError::SnapshotMismatch(SnapshotMismatch {
                    expect: seg(expect),
                    got: seg(got),
                })),
            )));
        }
        let vote = resp
            .vote
            .as_ref()
            .map(codec::vote_from_pb)
            .ok_or_else(|| bad_reply("install-snapshot"))?;
        Ok(InstallSnapshotResponse { vote })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MemberNode, RaftError<NodeId>>> {
        let req = pb::VoteRequest {
            vote: Some(codec::vote_to_pb(&rpc.vote)),
            last_log_id: codec::opt_log_id_to_pb(&rpc.last_log_id),
        };
        let resp = self
            .client()?
            .vote(request(req, &option))
            .await
            .map_err(status_err)?
            .into_inner();
        let vote = resp
            .vote
            .as_ref()
            .map(codec::vote_from_pb)
            .ok_or_else(|| bad_reply("vote"))?;
        Ok(VoteResponse {
            vote,
            vote_granted: resp.vote_granted,
            last_log_id: codec::opt_log_id_from_pb(&resp.last_log_id),
        })
    }

    fn backoff(&self) -> openraft::network::Backoff {
        // Retry an unreachable peer soon, then every half second.
        openraft::network::Backoff::new(
            [50u64, 100, 200]
                .into_iter()
                .map(Duration::from_millis)
                .chain(std::iter::repeat(Duration::from_millis(500))),
        )
    }
}
