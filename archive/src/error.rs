//! The one error type of this crate.

/// What can go wrong creating, fetching or importing archives.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Codex node failed a request.
    #[error("codex: {0}")]
    Codex(#[from] codex::Error),
    /// The database failed a request.
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    /// The database file was written by a newer version of this crate.
    #[error("database schema version {found} is newer than this program's {supported}")]
    SchemaTooNew {
        /// The version found in the file.
        found: i64,
        /// The newest version this crate knows.
        supported: i64,
    },
    /// Data that does not decode as the protobuf message it should be.
    #[error("{what} is not a valid protobuf message: {source}")]
    Decode {
        /// What was being decoded (`index`, `archive 0x…`).
        what: String,
        /// The decoder's error.
        #[source]
        source: codex_proto::DecodeError,
    },
    /// Encrypted data that does not decrypt with the community's key: a wrong key, or data
    /// altered after encryption (AES-GCM authenticates it).
    #[error("{what} does not decrypt with the community key (wrong key or corrupt data)")]
    Decrypt {
        /// What was being decrypted.
        what: String,
    },
    /// A dataset larger than the configured limit; it is not downloaded.
    #[error("{what} ({cid}) is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// What the dataset was supposed to be.
        what: String,
        /// Its CID.
        cid: String,
        /// Its size by its manifest.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A download that did not complete in time.
    #[error("{what} ({cid}) was not downloaded within {secs} s")]
    Timeout {
        /// What was being downloaded.
        what: String,
        /// Its CID.
        cid: String,
        /// The time allowed.
        secs: u64,
    },
    /// A dataset read whole that the node does not hold whole afterwards (evicted, or a
    /// node that does not store what it streams).
    #[error("dataset {cid} is not wholly stored after its download")]
    Incomplete {
        /// Its CID.
        cid: String,
    },
    /// An index whose entries do not hash to their archive IDs, or that is otherwise
    /// inconsistent.
    #[error("invalid index {cid}: {reason}")]
    InvalidIndex {
        /// The index CID.
        cid: String,
        /// What is wrong.
        reason: String,
    },
    /// A link message that is not accepted; see [`Rejection`].
    #[error("archive link rejected: {0}")]
    Rejected(#[from] Rejection),
    /// The community is not known to this node.
    #[error("unknown community {0}")]
    UnknownCommunity(String),
    /// An invalid argument or configuration value.
    #[error("{0}")]
    Invalid(String),
    /// Publishing the archive link failed (the client's transport).
    #[error("publishing the archive link: {0}")]
    Publish(String),
    /// The operation was cancelled (a newer link, or the service stopped).
    #[error("cancelled")]
    Cancelled,
    /// A blocking task of this crate panicked or was cancelled by the runtime.
    #[error("internal task failed: {0}")]
    Task(String),
}

/// Why a link message was not accepted (member side).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The signature does not verify against the claimed signer.
    #[error("the signature does not verify")]
    BadSignature,
    /// Signed by a key other than the community's.
    #[error("signed by {signer}, not by the community key")]
    NotCommunityKey {
        /// The signer's public key, hex.
        signer: String,
    },
    /// The member has not joined the community.
    #[error("not a member of community {0}")]
    NotJoined(String),
    /// This node controls the community: it makes the archives.
    #[error("this node is the control node of the community")]
    ControlNode,
    /// Archive support is switched off.
    #[error("archive support is disabled")]
    Disabled,
    /// Older than the newest link clock seen.
    #[error("clock {clock} is older than the last link's {last}")]
    Stale {
        /// The link's clock.
        clock: u64,
        /// The highest clock seen.
        last: u64,
    },
    /// The link names the index already downloaded or being downloaded.
    #[error("the link names the current index")]
    Duplicate,
    /// The payload is not a link message, or its link is empty or not a CID.
    #[error("malformed link: {0}")]
    Malformed(String),
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying again later may succeed (a network or timeout failure), as opposed to
    /// data that will never be valid (content-addressed bytes do not change).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Codex(e) => !matches!(e, codex::Error::InvalidCid { .. }),
            Error::Timeout { .. }
            | Error::Incomplete { .. }
            | Error::Database(_)
            | Error::Task(_)
            | Error::Publish(_) => true,
            _ => false,
        }
    }
}

pub(crate) fn task_error(e: tokio::task::JoinError) -> Error {
    Error::Task(e.to_string())
}
