//! Progress of the archive service as typed events (PIPELINE.md's list, plus errors).

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use crate::community::CommunityId;

/// Something the archive service did or failed to do.
///
/// Owner, per archiving round: [`Creating`](Event::Creating), then a
/// [`Created`](Event::Created) per archive or one [`NoneCreated`](Event::NoneCreated), then
/// [`Seeding`](Event::Seeding) when a link was published.
///
/// Member, per accepted link: [`DownloadingStarted`](Event::DownloadingStarted),
/// [`IndexDownloaded`](Event::IndexDownloaded), an
/// [`ArchiveDownloaded`](Event::ArchiveDownloaded) per missing archive (newest first),
/// [`Seeding`](Event::Seeding), then [`Importing`](Event::Importing) /
/// [`Imported`](Event::Imported) per archive, and
/// [`DownloadingFinished`](Event::DownloadingFinished). A failed attempt emits
/// [`Failed`](Event::Failed) and is retried later when the failure is transient.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// Owner: an archiving round began for `[from, to)` (Unix seconds).
    Creating {
        /// The community.
        community: CommunityId,
        /// Start of the range.
        from: u64,
        /// End of the range.
        to: u64,
    },
    /// Owner: an archive was created and uploaded.
    Created {
        /// The community.
        community: CommunityId,
        /// Its archive ID.
        id: String,
        /// Start of its range.
        from: u64,
        /// End of its range.
        to: u64,
        /// Messages in it.
        messages: usize,
        /// Its size as uploaded.
        bytes: u64,
    },
    /// Owner: the round found no messages to archive.
    NoneCreated {
        /// The community.
        community: CommunityId,
    },
    /// Owner: a message was not archived because it alone is over the archive size limit.
    Oversized {
        /// The community.
        community: CommunityId,
        /// The message hash.
        hash: Vec<u8>,
    },
    /// The index and archives are stored and served to other nodes; owner: the link was
    /// published.
    Seeding {
        /// The community.
        community: CommunityId,
        /// The current index CID.
        index_cid: String,
    },
    /// The service stopped serving the community's index (archiving stopped).
    Unseeded {
        /// The community.
        community: CommunityId,
    },
    /// Member: a link was accepted and its download began.
    DownloadingStarted {
        /// The community.
        community: CommunityId,
        /// The index CID.
        index_cid: String,
    },
    /// Member: the index is local and parsed.
    IndexDownloaded {
        /// The community.
        community: CommunityId,
        /// Archives it names.
        archives: usize,
        /// Of those, the ones this node lacks.
        missing: usize,
    },
    /// Member: an archive is fully local, verified and recorded.
    ArchiveDownloaded {
        /// The community.
        community: CommunityId,
        /// Its archive ID.
        id: String,
        /// Start of its range.
        from: u64,
        /// End of its range.
        to: u64,
        /// Its size.
        bytes: u64,
    },
    /// Member: an archive's import began.
    Importing {
        /// The community.
        community: CommunityId,
        /// Its archive ID.
        id: String,
    },
    /// Member: an archive was imported.
    Imported {
        /// The community.
        community: CommunityId,
        /// Its archive ID.
        id: String,
        /// Messages inserted (new, on local chats).
        messages: usize,
    },
    /// Member: every archive of the link is downloaded and imported.
    DownloadingFinished {
        /// The community.
        community: CommunityId,
        /// The index CID.
        index_cid: String,
    },
    /// Something failed; `retry_in_secs` says when it is tried again (`None`: never, the
    /// data will not change).
    Failed {
        /// The community.
        community: CommunityId,
        /// What failed and why.
        error: String,
        /// Seconds until the next attempt, if any.
        retry_in_secs: Option<u64>,
    },
}

/// Where the service's events go: a broadcast channel; slow subscribers lose the oldest.
#[derive(Debug, Clone)]
pub(crate) struct Events {
    tx: broadcast::Sender<Event>,
}

impl Events {
    pub(crate) fn new() -> Self {
        Self {
            tx: broadcast::channel(4096).0,
        }
    }

    pub(crate) fn emit(&self, e: Event) {
        tracing::debug!(event = ?e, "archive event");
        let _ = self.tx.send(e);
    }

    /// Emits [`Event::Failed`]: `error`, retried after `retry` (`None`: never).
    pub(crate) fn failed(
        &self,
        community: &CommunityId,
        error: impl std::fmt::Display,
        retry: Option<std::time::Duration>,
    ) {
        self.emit(Event::Failed {
            community: community.clone(),
            error: error.to_string(),
            retry_in_secs: retry.map(|d| d.as_secs()),
        });
    }

    pub(crate) fn subscribe(&self) -> Pin<Box<dyn Stream<Item = Event> + Send>> {
        Box::pin(BroadcastStream::new(self.tx.subscribe()).filter_map(|r| async move { r.ok() }))
    }
}
