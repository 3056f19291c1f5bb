//! Downloads: a dataset as a `Stream` of `Bytes`, an `AsyncRead`, or into a file.
//!
//! Chunks are pulled one `codex_download_chunk` call at a time, with the next one always
//! requested while the caller handles the current one. That gives backpressure without ever
//! blocking the node's threads: the node is asked for more only as fast as it is consumed.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use codex_sys as sys;
use futures::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot, watch, OwnedMutexGuard};
use tokio_stream::wrappers::WatchStream;

use crate::error::{Error, Result};
use crate::ffi::{cstring, Progress};
use crate::node::{CodexNode, Inner};
use crate::types::{Cid, Manifest};

/// Progress of a download against the manifest's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DownloadProgress {
    /// Bytes delivered so far.
    pub bytes: u64,
    /// The dataset's size.
    pub total: u64,
}

/// Options of a download.
#[derive(Debug)]
#[must_use]
pub struct DownloadBuilder {
    node: CodexNode,
    cid: Cid,
    chunk_size: usize,
    local: bool,
}

impl CodexNode {
    /// Downloads a dataset (from this node's store, or from the network when it is not
    /// local). See [`CodexNode::download_with`] for options.
    ///
    /// # Cancel safety
    /// Dropping the future before it completes releases everything it took.
    pub async fn download(&self, cid: &Cid) -> Result<Download> {
        self.download_with(cid).start().await
    }

    /// Configures a download.
    pub fn download_with(&self, cid: &Cid) -> DownloadBuilder {
        DownloadBuilder {
            node: self.clone(),
            cid: cid.clone(),
            chunk_size: 65536,
            local: false,
        }
    }
}

impl DownloadBuilder {
    /// Size of the pieces the stream yields (default 65536; the last may be shorter).
    pub fn chunk_size(mut self, bytes: usize) -> Self {
        self.chunk_size = bytes.max(1);
        self
    }

    /// Only read what this node stores; never fetch from peers.
    pub fn local(mut self, local: bool) -> Self {
        self.local = local;
        self
    }

    /// Opens the download: waits for any other download of the same CID on this node (the
    /// library keys sessions by CID), reads the manifest and opens the session.
    pub async fn start(self) -> Result<Download> {
        let DownloadBuilder {
            node,
            cid,
            chunk_size,
            local,
        } = self;
        let inner = Arc::clone(&node.inner);
        let slot = inner.download_slot(&cid).await;
        let (progress, _) = watch::channel(0);
        // Built before the session opens: if this future is dropped while the library opens
        // it, or opening fails, dropping `dl` cancels the session and frees the CID.
        let mut dl = Download {
            inner: Arc::clone(&inner),
            cid,
            // Read once the session is open: a network download has fetched it by then,
            // and a local one fails fast without looking for it on the network.
            manifest: Manifest::default(),
            next: None,
            received: 0,
            progress,
            slot: Some(slot),
            done: false,
        };
        let c = cstring("cid", dl.cid.as_str())?;
        let p = c.as_ptr() as usize;
        inner
            .call(Box::new(c), move |call| {
                // SAFETY: the CID string lives in the request's keep-alive.
                unsafe {
                    sys::codex_download_init(
                        call.ctx,
                        p as *const std::ffi::c_char,
                        chunk_size,
                        local,
                        call.cb,
                        call.ud,
                    )
                }
            })
            .await?;
        dl.manifest = node.manifest(&dl.cid).await?;
        dl.next = Some(dl.request()?);
        Ok(dl)
    }
}

/// One `codex_download_chunk` in flight.
struct ChunkRequest {
    done: oneshot::Receiver<Result<Vec<u8>, String>>,
    data: mpsc::Receiver<Bytes>,
}

/// A dataset being downloaded: a `Stream` of chunks, each verified by the node. Dropping it
/// cancels the download.
pub struct Download {
    inner: Arc<Inner>,
    cid: Cid,
    manifest: Manifest,
    next: Option<ChunkRequest>,
    received: u64,
    progress: watch::Sender<u64>,
    slot: Option<OwnedMutexGuard<()>>,
    done: bool,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("cid", &self.cid)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Download {
    /// The dataset's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes delivered so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// A stream of progress updates against the manifest's size.
    pub fn progress(&self) -> impl Stream<Item = DownloadProgress> + Send + Unpin + 'static {
        let total = self.manifest.dataset_size;
        WatchStream::new(self.progress.subscribe())
            .map(move |bytes| DownloadProgress { bytes, total })
    }

    fn request(&self) -> Result<ChunkRequest> {
        let (tx, data) = mpsc::channel(1);
        let c = cstring("cid", self.cid.as_str())?;
        let done = self.inner.dispatcher.request_text(
            sys::codex_download_chunk,
            c,
            Progress::Data(tx),
            Box::new(()),
        )?;
        Ok(ChunkRequest { done, data })
    }

    /// Ends the session in the library and releases the CID for other downloads (after the
    /// library has answered the cancel).
    fn finish(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.next = None;
            let Ok(c) = cstring("cid", self.cid.as_str()) else {
                return;
            };
            // The slot is released with the request, once the library has answered.
            let _ = self.inner.dispatcher.request_text(
                sys::codex_download_cancel,
                c,
                Progress::None,
                Box::new(slot),
            );
        }
    }

    /// Explicitly cancels the download.
    pub fn cancel(mut self) {
        self.finish();
    }

    /// The whole dataset in memory. Check [`manifest`](Self::manifest)'s `dataset_size`
    /// first when the dataset comes from a peer: it is held whole.
    pub async fn bytes(mut self) -> Result<Bytes> {
        // The manifest's size is the peer's word until the blocks arrive: reserve at most
        // 64 MiB up front and let verified data grow the buffer past that.
        let reserve = self.manifest.dataset_size.min(64 << 20);
        let mut out = BytesMut::with_capacity(usize::try_from(reserve).unwrap_or(0));
        while let Some(chunk) = self.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out.freeze())
    }

    /// Writes the dataset to `path` (created or truncated) and syncs it; returns its size.
    pub async fn to_file(mut self, path: impl AsRef<Path>) -> Result<u64> {
        let path = path.as_ref();
        let ctx = |what: &str| format!("{what} {}", path.display());
        let mut f = tokio::fs::File::create(path)
            .await
            .map_err(|e| Error::io(ctx("creating"), e))?;
        while let Some(chunk) = self.next().await {
            f.write_all(&chunk?)
                .await
                .map_err(|e| Error::io(ctx("writing"), e))?;
        }
        f.sync_all()
            .await
            .map_err(|e| Error::io(ctx("syncing"), e))?;
        Ok(self.received)
    }

    /// The dataset as an `AsyncRead`.
    pub fn into_async_read(self) -> impl tokio::io::AsyncRead + Send + Unpin {
        tokio_util::io::StreamReader::new(self.map(|r| r.map_err(std::io::Error::other)))
    }
}

impl Stream for Download {
    type Item = Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let Some(req) = self.next.as_mut() else {
            return Poll::Ready(None);
        };
        let answer = ready!(Pin::new(&mut req.done).poll(cx));
        let data = req.data.try_recv().ok();
        let result = match answer {
            Ok(Ok(_)) => Ok(data),
            Ok(Err(msg)) => Err(Error::Library(msg)),
            Err(_) => Err(Error::Destroyed),
        };
        let this = &mut *self;
        match result {
            Ok(Some(chunk)) => {
                this.received += chunk.len() as u64;
                this.progress.send_replace(this.received);
                // Ask for the next chunk while the caller handles this one.
                match this.request() {
                    Ok(r) => this.next = Some(r),
                    Err(e) => {
                        this.done = true;
                        this.finish();
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Ok(None) => {
                this.done = true;
                this.finish();
                if this.received < this.manifest.dataset_size {
                    return Poll::Ready(Some(Err(Error::Truncated {
                        cid: this.cid.to_string(),
                        expected: this.manifest.dataset_size,
                        received: this.received,
                    })));
                }
                Poll::Ready(None)
            }
            Err(e) => {
                this.done = true;
                this.finish();
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        self.finish();
    }
}
