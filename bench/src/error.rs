//! The one error type of the load tool's library.

/// What can stop a benchmark before it produces a report. Errors of single requests do not stop
/// it: they are counted in the report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The flags do not describe a runnable benchmark.
    #[error("invalid options: {0}")]
    Options(String),
    /// An endpoint could not be reached.
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A set-up call (opening a stream, granting a lease) failed.
    #[error("set-up failed: {0}")]
    Setup(#[from] tonic::Status),
    /// A stream ended or answered something the set-up did not expect.
    #[error("stream: {0}")]
    Stream(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
