//! Uploads: from bytes, an `AsyncRead`, a byte stream or a file, with progress.

use std::future::{Future, IntoFuture};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use codex_sys as sys;
use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::WatchStream;

use crate::error::{Error, Result};
use crate::ffi::{answer, answer_ref, cstring, Progress};
use crate::node::{CodexNode, Inner};
use crate::types::Cid;

/// Default block size of a dataset.
pub const DEFAULT_BLOCK_SIZE: usize = 65536;

/// Progress of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct UploadProgress {
    /// Bytes stored so far.
    pub bytes: u64,
    /// Total bytes, when known in advance.
    pub total: Option<u64>,
}

enum Source {
    Bytes(Bytes),
    Reader(Box<dyn AsyncRead + Send + Unpin>),
    Stream(Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>),
    File(PathBuf),
}

/// Configures an upload; finish with one of the source methods.
#[derive(Debug)]
#[must_use]
pub struct UploadBuilder {
    node: CodexNode,
    filename: Option<String>,
    block_size: usize,
}

impl CodexNode {
    /// Starts configuring an upload.
    pub fn upload(&self) -> UploadBuilder {
        UploadBuilder {
            node: self.clone(),
            filename: None,
            block_size: DEFAULT_BLOCK_SIZE,
        }
    }
}

impl UploadBuilder {
    /// The file name recorded in the manifest (its extension sets the mimetype). Changes the
    /// dataset CID. For [`UploadBuilder::file`] the file's own name is used.
    pub fn filename(mut self, name: impl Into<String>) -> Self {
        self.filename = Some(name.into());
        self
    }

    /// The dataset's block size (default 65536). Changes the dataset CID.
    pub fn block_size(mut self, bytes: usize) -> Self {
        self.block_size = bytes;
        self
    }

    fn with(self, source: Source, total: Option<u64>) -> Upload {
        let (progress, _) = watch::channel(0);
        Upload {
            inner: Arc::clone(&self.node.inner),
            filename: self.filename,
            block_size: self.block_size,
            source,
            total,
            progress,
        }
    }

    /// Uploads bytes held in memory.
    pub fn bytes(self, data: impl Into<Bytes>) -> Upload {
        let data = data.into();
        let total = Some(data.len() as u64);
        self.with(Source::Bytes(data), total)
    }

    /// Uploads everything `reader` yields.
    pub fn reader(self, reader: impl AsyncRead + Send + Unpin + 'static) -> Upload {
        self.with(Source::Reader(Box::new(reader)), None)
    }

    /// Uploads a stream of byte chunks (any sizes).
    pub fn stream(
        self,
        stream: impl Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    ) -> Upload {
        self.with(Source::Stream(Box::pin(stream)), None)
    }

    /// Uploads a file; the node reads it directly (the fastest path).
    pub fn file(self, path: impl Into<PathBuf>) -> Upload {
        let path = path.into();
        let total = std::fs::metadata(&path).ok().map(|m| m.len());
        self.with(Source::File(path), total)
    }
}

/// An upload, ready to run: await it for the dataset CID. Nothing happens until it is
/// awaited. Dropping the future cancels the upload and frees what it stored.
///
/// Progress ([`Upload::progress`]) reports the bytes stored, block by block, ending at the
/// dataset size when the upload succeeds.
#[must_use = "an upload does nothing until awaited"]
pub struct Upload {
    inner: Arc<Inner>,
    filename: Option<String>,
    block_size: usize,
    source: Source,
    total: Option<u64>,
    progress: watch::Sender<u64>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("filename", &self.filename)
            .finish_non_exhaustive()
    }
}

impl Upload {
    /// A stream of progress updates; it ends when the upload finishes or is dropped.
    pub fn progress(&self) -> impl Stream<Item = UploadProgress> + Send + Unpin + 'static {
        let total = self.total;
        WatchStream::new(self.progress.subscribe())
            .map(move |bytes| UploadProgress { bytes, total })
    }

    async fn run(self) -> Result<Cid> {
        let Upload {
            inner,
            filename,
            block_size,
            source,
            progress,
            ..
        } = self;
        if let Source::File(path) = &source {
            let abs = tokio::fs::canonicalize(path)
                .await
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let session = Session::open(&inner, abs.to_string_lossy().as_ref(), block_size).await?;
            let id = cstring("session", &session.id)?;
            let rx = inner.dispatcher.request_text(
                sys::codex_upload_file,
                id,
                Progress::Count(progress),
                Box::new(()),
            )?;
            let cid = answer(rx).await?;
            session.done();
            return text_cid(cid);
        }
        let session = Session::open(&inner, filename.as_deref().unwrap_or(""), block_size).await?;
        let mut chunks = Chunks::new(source, block_size);
        let mut sent = 0u64;
        while let Some(chunk) = chunks.next().await? {
            let n = chunk.len() as u64;
            session.chunk(chunk).await?;
            sent += n;
            progress.send_replace(sent);
        }
        let id = cstring("session", &session.id)?;
        let cid = inner.call_text(sys::codex_upload_finalize, id).await?;
        session.done();
        text_cid(cid)
    }
}

impl IntoFuture for Upload {
    type Output = Result<Cid>;
    type IntoFuture = Pin<Box<dyn Future<Output = Result<Cid>> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

fn text_cid(v: Vec<u8>) -> Result<Cid> {
    String::from_utf8_lossy(&v)
        .parse()
        .map_err(|e| Error::Library(format!("upload answered a bad CID: {e}")))
}

/// An open upload session; cancelled in the library when dropped before [`Session::done`].
struct Session {
    inner: Arc<Inner>,
    id: String,
    open: bool,
}

impl Session {
    async fn open(inner: &Arc<Inner>, name: &str, block_size: usize) -> Result<Self> {
        let name = cstring("filename", name)?;
        let p = name.as_ptr() as usize;
        let rx = inner
            .dispatcher
            .request(Progress::None, Box::new(name), move |c| {
                // SAFETY: the name lives in the request's keep-alive.
                unsafe {
                    sys::codex_upload_init(
                        c.ctx,
                        p as *const std::ffi::c_char,
                        block_size,
                        c.cb,
                        c.ud,
                    )
                }
            })?;
        // If this future is dropped before the library answers, the guard cancels the
        // session the library opens anyway, once its id is known.
        let mut pending = PendingOpen {
            inner: Arc::clone(inner),
            rx: Some(rx),
        };
        let id = match pending.rx.as_mut() {
            Some(rx) => answer_ref(rx).await,
            None => unreachable!("the receiver was just stored"),
        };
        // Answered (with an id or an error): nothing left to clean up in the background.
        pending.rx = None;
        let id = id?;
        Ok(Self {
            inner: Arc::clone(inner),
            id: String::from_utf8_lossy(&id).into_owned(),
            open: true,
        })
    }

    async fn chunk(&self, data: Bytes) -> Result<()> {
        let id = cstring("session", &self.id)?;
        let (p, d, n) = (id.as_ptr() as usize, data.as_ptr() as usize, data.len());
        // The chunk stays alive until the terminal callback, whatever the library copies.
        self.inner
            .call(Box::new((id, data)), move |c| {
                // SAFETY: the session string and the chunk live in the keep-alive.
                unsafe {
                    sys::codex_upload_chunk(
                        c.ctx,
                        p as *const std::ffi::c_char,
                        d as *const u8,
                        n,
                        c.cb,
                        c.ud,
                    )
                }
            })
            .await
            .map(drop)
    }

    fn done(mut self) {
        self.open = false;
    }
}

impl Session {
    /// Cancels the session in the library without waiting for the answer.
    fn abandon(&mut self) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        let Ok(id) = cstring("session", &self.id) else {
            return;
        };
        // Fire and forget: nobody waits for the answer.
        let _ = self.inner.dispatcher.request_text(
            sys::codex_upload_cancel,
            id,
            Progress::None,
            Box::new(()),
        );
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.abandon();
    }
}

/// An `upload_init` whose answer nobody may wait for: dropped while the answer is still
/// due, it waits for the session id in the background and cancels that session.
struct PendingOpen {
    inner: Arc<Inner>,
    rx: Option<oneshot::Receiver<Result<Vec<u8>, String>>>,
}

impl Drop for PendingOpen {
    fn drop(&mut self) {
        let Some(rx) = self.rx.take() else {
            return;
        };
        let inner = Arc::clone(&self.inner);
        let cancel = move |answer: std::result::Result<Result<Vec<u8>, String>, _>| {
            if let Ok(Ok(id)) = answer {
                Session {
                    inner,
                    id: String::from_utf8_lossy(&id).into_owned(),
                    open: true,
                }
                .abandon();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { cancel(rx.await) });
            }
            // Dropped outside a runtime: a short-lived thread waits for the answer instead.
            Err(_) => {
                let _ = std::thread::Builder::new()
                    .name("codex-upload-abandon".into())
                    .spawn(move || cancel(rx.blocking_recv()));
            }
        }
    }
}

/// Cuts any source into chunks of exactly the block size (the last shorter), as the
/// library expects them.
struct Chunks {
    source: Source,
    block_size: usize,
    buf: BytesMut,
    eof: bool,
}

impl Chunks {
    fn new(source: Source, block_size: usize) -> Self {
        let block_size = if block_size == 0 {
            DEFAULT_BLOCK_SIZE
        } else {
            block_size
        };
        Self {
            source,
            block_size,
            buf: BytesMut::new(),
            eof: false,
        }
    }

    async fn next(&mut self) -> Result<Option<Bytes>> {
        while self.buf.len() < self.block_size && !self.eof {
            match &mut self.source {
                Source::Bytes(b) => {
                    if b.is_empty() {
                        self.eof = true;
                    } else if self.buf.is_empty() && b.len() >= self.block_size {
                        // Zero-copy: hand out slices of the caller's buffer.
                        return Ok(Some(b.split_to(self.block_size)));
                    } else {
                        let take = (self.block_size - self.buf.len()).min(b.len());
                        self.buf.extend_from_slice(&b.split_to(take));
                    }
                }
                Source::Reader(r) => {
                    self.buf.reserve(self.block_size - self.buf.len());
                    let n = r
                        .read_buf(&mut self.buf)
                        .await
                        .map_err(|e| Error::io("reading the upload source", e))?;
                    if n == 0 {
                        self.eof = true;
                    }
                }
                Source::Stream(s) => match s.next().await {
                    Some(Ok(b)) => self.buf.extend_from_slice(&b),
                    Some(Err(e)) => return Err(Error::io("reading the upload stream", e)),
                    None => self.eof = true,
                },
                Source::File(_) => unreachable!("files are uploaded by the node itself"),
            }
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        let n = self.buf.len().min(self.block_size);
        Ok(Some(self.buf.split_to(n).freeze()))
    }
}
