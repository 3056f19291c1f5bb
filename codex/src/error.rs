//! The one error type of this crate.

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value rejected before it reached the library.
    #[error("config: `{key}`: {message}")]
    Config {
        /// The config key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The library refused or failed the request; its own message.
    #[error("libcodex: {0}")]
    Library(String),
    /// A string that is not a Codex CID.
    #[error("invalid CID {cid:?}: {reason}")]
    InvalidCid {
        /// The input.
        cid: String,
        /// Why it is not a CID.
        reason: String,
    },
    /// A download that ended before the manifest's size (the reference ends a cancelled
    /// download with success and truncated data).
    #[error("download of {cid} ended after {received} of {expected} bytes")]
    Truncated {
        /// The dataset.
        cid: String,
        /// The manifest's size.
        expected: u64,
        /// Bytes received.
        received: u64,
    },
    /// The node was destroyed (or its dispatcher is gone) before the request completed.
    #[error("the node has been destroyed")]
    Destroyed,
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A local I/O error (reading an upload, writing a download).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The library answered with a payload this crate could not parse.
    #[error("unexpected answer from libcodex ({what}): {source}")]
    Payload {
        /// Which request.
        what: &'static str,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
