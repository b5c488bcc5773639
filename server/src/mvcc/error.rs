/// Errors of the MVCC layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("mvcc: required revision has been compacted")]
    Compacted,
    #[error("mvcc: required revision is a future revision")]
    FutureRev,
    #[error(transparent)]
    Storage(#[from] crate::storage::Error),
    #[error("mvcc: corrupt entry: {0}")]
    Corrupt(String),
    #[error("mvcc: store is closed")]
    Closed,
    /// The cluster switched to a storage format this binary cannot write (an older binary
    /// in a cluster that moved on): it must stop rather than write anything else.
    #[error(
        "mvcc: the cluster writes storage format {0}, which this binary does not support \
         (upgrade it)"
    )]
    UnsupportedFormat(u8),
    /// A write transaction read what its apply group changed in a way the group's view
    /// cannot answer exactly ([`crate::mvcc::WriteTxn`]): the applier writes the group and
    /// runs the command again. Never leaves the apply step.
    #[error("mvcc: the apply group must be written before this read")]
    Regroup,
}

impl From<crate::storage::codec::CodecError> for Error {
    fn from(e: crate::storage::codec::CodecError) -> Self {
        Error::Storage(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
