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
}

impl From<crate::storage::codec::CodecError> for Error {
    fn from(e: crate::storage::codec::CodecError) -> Self {
        Error::Storage(e.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
