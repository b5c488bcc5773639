use std::path::PathBuf;

/// Errors of the storage layer, shared by every engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine failed (I/O error, corruption reported by RocksDB, ...).
    #[error("storage engine: {0}")]
    Engine(String),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Codec(#[from] super::codec::CodecError),
    /// The data directory cannot be used by this binary.
    #[error("data directory {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    /// A snapshot file is damaged, of another format, or could not be read or written.
    #[error(transparent)]
    Snapshot(#[from] super::snapshot::SnapshotError),
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<rocksdb::Error> for Error {
    fn from(e: rocksdb::Error) -> Self {
        Error::Engine(e.into_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;
