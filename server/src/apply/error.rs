/// Errors of the apply step and request validation. Each maps to one etcd gRPC status in the
/// server's error table; the messages are etcd's, because clients match on them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    #[error("etcdserver: key is not provided")]
    EmptyKey,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: value is provided")]
    ValueProvided,
    #[error("etcdserver: lease is provided")]
    LeaseProvided,
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
    #[error("etcdserver: invalid sort option")]
    InvalidSortOption,
    #[error("etcdserver: request is too large")]
    RequestTooLarge,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
    #[error("etcdserver: no leader")]
    NoLeader,
    #[error("etcdserver: request timed out")]
    Timeout,
    #[error("etcdserver: member not found")]
    MemberNotFound,
    #[error("etcdserver: Peer URLs already exists")]
    PeerUrlExists,
    #[error("etcdserver: can only promote a learner member")]
    MemberNotLearner,
    #[error("etcdserver: can only promote a learner member which is in sync with leader")]
    LearnerNotReady,
    #[error("etcdserver: re-configuration failed due to not enough started members")]
    NotEnoughStartedMembers,
    #[error("etcdserver: unhealthy cluster")]
    UnhealthyCluster,
    #[error("etcdserver: not leader")]
    NotLeader,
    #[error("etcdserver: bad leader transferee")]
    BadLeaderTransferee,
    #[error("etcdserver: request timed out, leader transfer took too long")]
    TimeoutLeaderTransfer,
    /// A Range whose result must be held whole (sorted) needs more memory than the whole
    /// `--max-range-memory-bytes`. MetaStore's own: etcd has no such limit.
    #[error(
        "etcdserver: range needs {needed} bytes of memory to sort, more than \
         --max-range-memory-bytes ({budget}); use limit, or ascending key order"
    )]
    RangeTooLarge { needed: u64, budget: u64 },
    /// A unary Range response would not fit one gRPC message (4 GiB).
    #[error("etcdserver: range response of {0} bytes exceeds 4 GiB; use limit or RangeStream")]
    ResponseTooLarge(u64),
    /// A txn with a write was given to the read-only path (a server bug, never a client's).
    #[error("etcdserver: txn with writes on the read-only path")]
    NotReadOnly,
    /// A replication failure with no etcd equivalent; the message says what happened.
    #[error("etcdserver: {0}")]
    Raft(String),
    /// The data directory's disk is (nearly) full (`--disk-free-reserve-bytes`). MetaStore's
    /// own: etcd stops on a full disk.
    #[error(transparent)]
    DiskFull(#[from] crate::storage::disk_guard::DiskFull),
    #[error(transparent)]
    Mvcc(#[from] crate::mvcc::Error),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
}

pub type Result<T> = std::result::Result<T, ApplyError>;
