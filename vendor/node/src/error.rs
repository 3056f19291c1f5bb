//! The node's error type.

use std::io;
use std::path::PathBuf;

use crate::cid::CidError;
use crate::manifest::ManifestError;
use crate::merkle::TreeError;

/// Everything that can go wrong in the node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration key with a bad value.
    #[error("config: `{key}`: {message}")]
    Config {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A network failure: a peer unreachable, a listener down, data nobody provides.
    #[error("network: {0}")]
    Network(String),
    /// A malformed or unsupported CID.
    #[error(transparent)]
    Cid(#[from] CidError),
    /// Data that is not in this node's store.
    #[error("{0} not found in the local store")]
    NotFound(String),
    /// Stored data that no longer matches its CID.
    #[error("corrupt block {cid} on disk: {detail}")]
    Corrupt {
        /// The block (or tree leaf) that failed verification.
        cid: String,
        /// What failed.
        detail: String,
    },
    /// A write that would exceed `storage-quota`.
    #[error(
        "storage quota exceeded: {needed} more bytes needed, {available} of {quota} available"
    )]
    Quota {
        /// Bytes the write needs.
        needed: u64,
        /// Bytes left under the quota.
        available: u64,
        /// The quota.
        quota: u64,
    },
    /// The data-dir's filesystem cannot hold the configured quota.
    #[error(
        "storage-quota of {quota} bytes does not fit in {path}: only {free} bytes free on its \
         filesystem; lower `storage-quota` or free disk space"
    )]
    DiskSpace {
        /// The data-dir.
        path: PathBuf,
        /// The quota.
        quota: u64,
        /// Free bytes (plus what the store already uses).
        free: u64,
    },
    /// A manifest that cannot be used.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// A Merkle tree or proof that cannot be used.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A request that cannot be honoured as made.
    #[error("{0}")]
    Invalid(String),
    /// The node is not in a state that allows the request.
    #[error("{0}")]
    State(String),
    /// The operation was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// An I/O error, with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What the node was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(#[from] rusqlite::Error),
}

impl Error {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// The node's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
