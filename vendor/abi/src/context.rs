//! One node behind the C ABI: the one place that turns requests into node calls and their
//! results into callbacks, with the reference's session semantics (upload sessions by id,
//! download sessions by CID).

use std::collections::HashMap;
use std::ffi::{c_int, c_void};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use codex_node::node::{Download, Upload};
use codex_node::{Cid, Node};
use tokio_util::sync::CancellationToken;

use crate::reply::{Callback, Gate, Reply, RET_ERR, RET_OK};

/// A request, its arguments already copied out of C memory.
#[derive(Debug)]
pub(crate) enum Request {
    Start,
    Stop,
    Close,
    Repo,
    Debug,
    Spr,
    PeerId,
    LogLevel(String),
    Connect {
        peer: String,
        addrs: Vec<String>,
    },
    PeerDebug(String),
    UploadInit {
        name: String,
        chunk_size: usize,
    },
    UploadChunk {
        session: String,
        data: Bytes,
    },
    UploadFinalize(String),
    UploadCancel(String),
    UploadFile(String),
    DownloadInit {
        cid: String,
        chunk_size: usize,
        local: bool,
    },
    DownloadChunk(String),
    DownloadStream {
        cid: String,
        chunk_size: usize,
        local: bool,
        path: String,
    },
    DownloadCancel(String),
    DownloadManifest(String),
    List,
    Space,
    Delete(String),
    Fetch(String),
    Exists(String),
}

struct UploadSlot {
    name: String,
    chunk_size: usize,
    upload: Option<Upload>,
    busy: bool,
    cancel: CancellationToken,
    _open: OpenSession,
}

/// Counts upload sessions open in this process, for leak checks in tests.
pub(crate) static OPEN_UPLOAD_SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// One open upload session in [`OPEN_UPLOAD_SESSIONS`], from creation to drop.
struct OpenSession;

impl OpenSession {
    fn new() -> Self {
        OPEN_UPLOAD_SESSIONS.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for OpenSession {
    fn drop(&mut self) {
        OPEN_UPLOAD_SESSIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

struct DownloadSlot {
    generation: u64,
    chunker: Option<Chunker>,
    busy: bool,
    cancel: CancellationToken,
}

/// The callback registered with `codex_set_event_callback`.
#[derive(Clone, Copy)]
struct EventSink {
    cb: Callback,
    ud: *mut c_void,
}

// SAFETY: as for `Reply`: the contract lets us call the callback with its user data from
// any of the library's threads; the pointer is never dereferenced here.
unsafe impl Send for EventSink {}

/// A node behind the C ABI.
pub(crate) struct Context {
    node: Node,
    pub(crate) gate: Arc<Gate>,
    uploads: Mutex<HashMap<String, UploadSlot>>,
    downloads: Mutex<HashMap<String, DownloadSlot>>,
    next_session: AtomicU64,
    next_generation: AtomicU64,
    events: Arc<Mutex<Option<EventSink>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn parse_cid(s: &str) -> Result<Cid, String> {
    s.parse::<Cid>().map_err(|e| e.to_string())
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string(v).map_err(|e| e.to_string())
}

impl Context {
    /// Wraps a created node and starts forwarding its events.
    pub(crate) fn new(node: Node) -> Arc<Self> {
        let ctx = Arc::new(Self {
            node,
            gate: Arc::new(Gate::default()),
            uploads: Mutex::new(HashMap::new()),
            downloads: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
            next_generation: AtomicU64::new(0),
            events: Arc::new(Mutex::new(None)),
        });
        let mut rx = ctx.node.events();
        let sink = Arc::clone(&ctx.events);
        let gate = Arc::clone(&ctx.gate);
        ctx.node.handle().spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let event = match rx.recv().await {
                    Ok(e) => e,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "event subscriber fell behind");
                        continue;
                    }
                    Err(RecvError::Closed) => break,
                };
                let Ok(text) = serde_json::to_string(&event) else {
                    continue;
                };
                let current = *lock(&sink);
                if let Some(s) = current {
                    // SAFETY: the pair was registered together by the caller.
                    gate.pass(|| unsafe {
                        crate::reply::invoke_msg(s.cb, s.ud, RET_OK, text.as_bytes())
                    });
                }
            }
        });
        ctx
    }

    /// The node.
    pub(crate) fn node(&self) -> &Node {
        &self.node
    }

    /// Registers (or, with `None`, removes) the event callback.
    pub(crate) fn set_event_callback(&self, cb: Option<Callback>, ud: *mut c_void) {
        *lock(&self.events) = cb.map(|cb| EventSink { cb, ud });
    }

    /// Ends everything: no callback runs once this returns.
    pub(crate) fn destroy(&self) {
        self.gate.close();
        self.end_sessions();
        self.node.shutdown(Duration::from_secs(5));
    }

    /// Ends every upload and download session, cancelling the running ones: a running
    /// `upload_file` fails at its next block, a running stream ends (RET_OK, truncated).
    fn end_sessions(&self) {
        for (_, slot) in lock(&self.uploads).drain() {
            slot.cancel.cancel();
        }
        for (_, slot) in lock(&self.downloads).drain() {
            slot.cancel.cancel();
        }
    }

    /// Accepts a request: either answers RET_ERR now (and returns RET_ERR) or hands it to
    /// the node's threads (and returns RET_OK).
    pub(crate) fn dispatch(self: &Arc<Self>, req: Request, reply: Reply) -> c_int {
        match self.accept(req, reply) {
            Ok(()) => RET_OK,
            Err((reply, msg)) => {
                reply.err(msg);
                RET_ERR
            }
        }
    }

    fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.node.handle().spawn(fut);
    }

    /// Runs `f` on the node and answers with its result.
    fn answer<F, Fut, T>(&self, reply: Reply, f: F)
    where
        F: FnOnce(Node) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, String>> + Send,
        T: AsRef<[u8]>,
    {
        let node = self.node.clone();
        self.spawn(async move { reply.finish(f(node).await) });
    }

    #[allow(clippy::too_many_lines)]
    fn accept(self: &Arc<Self>, req: Request, reply: Reply) -> Result<(), (Reply, String)> {
        macro_rules! sync_try {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err((reply, e.to_string())),
                }
            };
        }
        match req {
            Request::Start => self.answer(reply, |n| async move {
                n.start().await.map(|()| "").map_err(|e| e.to_string())
            }),
            Request::Stop => self.answer(reply, |n| async move {
                n.stop().map(|()| "").map_err(|e| e.to_string())
            }),
            Request::Close => {
                // Open sessions hold the store: end them first, so that closing releases it
                // and no later request of theirs reaches it.
                self.end_sessions();
                self.answer(reply, |n| async move {
                    n.close().await.map(|()| "").map_err(|e| e.to_string())
                });
            }
            Request::Repo => self.answer(reply, |n| async move {
                Ok(n.repo().to_string_lossy().into_owned())
            }),
            Request::PeerId => {
                self.answer(reply, |n| async move { Ok(n.peer_id().to_base58()) })
            }
            Request::Debug => self.answer(reply, |n| async move { json(&n.debug_info()) }),
            Request::Spr => self.answer(reply, |n| async move { n.spr().map_err(|e| e.to_string()) }),
            Request::LogLevel(level) => {
                sync_try!(crate::logging::set_level(&level));
                self.answer(reply, |_| async move { Ok("") })
            }
            Request::Connect { peer, addrs } => {
                let peer = sync_try!(peer
                    .parse::<codex_node::PeerId>()
                    .map_err(|e| format!("peer id: {e}")));
                let addrs = sync_try!(addrs
                    .iter()
                    .map(|a| a
                        .parse::<codex_node::Multiaddr>()
                        .map_err(|e| format!("address {a}: {e}")))
                    .collect::<Result<Vec<_>, String>>());
                self.answer(reply, move |n| async move {
                    n.connect(peer, addrs)
                        .await
                        .map(|()| "")
                        .map_err(|e| e.to_string())
                })
            }
            Request::PeerDebug(peer) => {
                let peer = sync_try!(peer
                    .parse::<codex_node::PeerId>()
                    .map_err(|e| format!("peer id: {e}")));
                self.answer(reply, move |n| async move {
                    n.peer_info(&peer)
                        .map_err(|e| e.to_string())
                        .and_then(|v| json(&v))
                })
            }
            Request::UploadInit { name, chunk_size } => {
                if chunk_size > codex_node::MAX_BLOCK_SIZE {
                    return Err((reply, format!("chunk size {chunk_size} is larger than 100 MiB")));
                }
                let id = self.next_session.fetch_add(1, Ordering::Relaxed).to_string();
                lock(&self.uploads).insert(
                    id.clone(),
                    UploadSlot {
                        name,
                        chunk_size,
                        upload: None,
                        busy: false,
                        cancel: CancellationToken::new(),
                        _open: OpenSession::new(),
                    },
                );
                self.answer(reply, |_| async move { Ok(id) });
            }
            Request::UploadChunk { session, data } => {
                let mut upload = {
                    let mut uploads = lock(&self.uploads);
                    let slot = sync_try!(upload_slot(&mut uploads, &session));
                    let upload = match slot.upload.take() {
                        Some(u) => u,
                        None => {
                            let name = (!slot.name.is_empty()).then_some(slot.name.as_str());
                            sync_try!(self.node.upload(name, slot.chunk_size))
                        }
                    };
                    slot.busy = true;
                    upload
                };
                let ctx = Arc::clone(self);
                self.spawn(async move {
                    let r = upload.write(data).await;
                    if let Some(slot) = lock(&ctx.uploads).get_mut(&session) {
                        slot.upload = Some(upload);
                        slot.busy = false;
                    }
                    reply.finish(r.map(|()| "").map_err(|e| e.to_string()));
                });
            }
            Request::UploadFinalize(session) => {
                let slot = sync_try!(take_upload(&self.uploads, &session));
                self.spawn(async move {
                    let r = match slot.upload {
                        Some(u) => u.finish().await.map(|c| c.to_string()),
                        None => Err(codex_node::Error::Invalid(
                            "cannot upload an empty dataset".into(),
                        )),
                    };
                    reply.finish(r.map_err(|e| e.to_string()));
                });
            }
            Request::UploadCancel(session) => {
                // Busy or not: a running upload_file stops at its next block (and answers
                // RET_ERR), a running chunk finds its session gone and drops the upload.
                let Some(slot) = lock(&self.uploads).remove(&session) else {
                    return Err((reply, format!("no upload session {session:?}")));
                };
                slot.cancel.cancel();
                drop(slot);
                self.answer(reply, |_| async move { Ok("") });
            }
            Request::UploadFile(session) => {
                let (path, chunk_size, cancel) = {
                    let mut uploads = lock(&self.uploads);
                    let slot = sync_try!(upload_slot(&mut uploads, &session));
                    if !slot.name.starts_with('/') {
                        return Err((
                            reply,
                            format!("upload_file needs an absolute path, got {:?}", slot.name),
                        ));
                    }
                    slot.busy = true;
                    (PathBuf::from(&slot.name), slot.chunk_size, slot.cancel.clone())
                };
                let ctx = Arc::clone(self);
                self.spawn(async move {
                    let reply = Arc::new(reply);
                    let progress = {
                        let reply = Arc::clone(&reply);
                        move |n: u64| reply.progress_len(n as usize)
                    };
                    let r = ctx.node.upload_file(path, chunk_size, progress, cancel).await;
                    lock(&ctx.uploads).remove(&session);
                    match Arc::try_unwrap(reply) {
                        Ok(reply) => reply.finish(r.map(|c| c.to_string()).map_err(|e| e.to_string())),
                        Err(_) => tracing::error!("upload_file progress outlived its request"),
                    }
                });
            }
            Request::DownloadInit { cid, chunk_size, local } => {
                let parsed = sync_try!(parse_cid(&cid));
                let chunk_size = sync_try!(chunk_size_or_default(chunk_size));
                let generation = sync_try!(self.register_download(&cid));
                let ctx = Arc::clone(self);
                self.spawn(async move {
                    match ctx.node.download(parsed, local).await {
                        Ok(dl) => {
                            ctx.release_download(&cid, generation, Some(Chunker::new(dl, chunk_size)));
                            reply.ok("");
                        }
                        Err(e) => {
                            ctx.forget_download(&cid, generation);
                            reply.err(e);
                        }
                    }
                });
            }
            Request::DownloadChunk(cid) => {
                let (generation, mut chunker) = {
                    let mut downloads = lock(&self.downloads);
                    let Some(slot) = downloads.get_mut(&cid) else {
                        return Err((reply, format!("no download session for {cid}: call download_init first")));
                    };
                    if slot.busy {
                        return Err((reply, format!("another request is using the download session of {cid}")));
                    }
                    let Some(chunker) = slot.chunker.take() else {
                        return Err((reply, format!("the download session of {cid} failed")));
                    };
                    slot.busy = true;
                    (slot.generation, chunker)
                };
                let ctx = Arc::clone(self);
                self.spawn(async move {
                    match chunker.next().await {
                        Ok(data) => {
                            ctx.release_download(&cid, generation, Some(chunker));
                            if let Some(data) = data {
                                reply.progress(&data);
                            }
                            reply.ok("");
                        }
                        Err(e) => {
                            ctx.release_download(&cid, generation, None);
                            reply.err(e);
                        }
                    }
                });
            }
            Request::DownloadStream { cid, chunk_size, local, path } => {
                let parsed = sync_try!(parse_cid(&cid));
                let chunk_size = sync_try!(chunk_size_or_default(chunk_size));
                let generation = sync_try!(self.register_download(&cid));
                let cancel = lock(&self.downloads)
                    .get(&cid)
                    .map(|s| s.cancel.clone())
                    .unwrap_or_default();
                let ctx = Arc::clone(self);
                self.spawn(async move {
                    let r = stream(&ctx.node, parsed, chunk_size, local, &path, &reply, cancel).await;
                    ctx.forget_download(&cid, generation);
                    reply.finish(r.map(|()| ""));
                });
            }
            Request::DownloadCancel(cid) => {
                let Some(slot) = lock(&self.downloads).remove(&cid) else {
                    return Err((reply, format!("no download session for {cid}")));
                };
                slot.cancel.cancel();
                self.answer(reply, |_| async move { Ok("") });
            }
            Request::DownloadManifest(cid) => {
                let cid = sync_try!(parse_cid(&cid));
                self.answer(reply, move |n| async move {
                    let m = n.find_manifest(cid).await.map_err(|e| e.to_string())?;
                    json(&m.to_json())
                });
            }
            Request::List => self.answer(reply, |n| async move {
                let list = n.list().await.map_err(|e| e.to_string())?;
                let items: Vec<_> = list
                    .iter()
                    .map(|d| serde_json::json!({"cid": d.cid.to_string(), "manifest": d.manifest.to_json()}))
                    .collect();
                json(&items)
            }),
            Request::Space => self.answer(reply, |n| async move {
                json(&n.space().await.map_err(|e| e.to_string())?)
            }),
            Request::Delete(cid) => {
                let cid = sync_try!(parse_cid(&cid));
                self.answer(reply, move |n| async move {
                    n.delete(cid).await.map(|()| "").map_err(|e| e.to_string())
                });
            }
            Request::Exists(cid) => {
                let cid = sync_try!(parse_cid(&cid));
                self.answer(reply, move |n| async move {
                    let e = n.exists(cid).await.map_err(|e| e.to_string())?;
                    Ok(if e { "true" } else { "false" })
                });
            }
            Request::Fetch(cid) => {
                let cid = sync_try!(parse_cid(&cid));
                self.answer(reply, move |n| async move {
                    let m = n.fetch(cid).await.map_err(|e| e.to_string())?;
                    json(&m.to_json())
                });
            }
        }
        Ok(())
    }

    /// Opens (or replaces an idle) download session for `cid`, marked busy.
    fn register_download(&self, cid: &str) -> Result<u64, String> {
        let mut downloads = lock(&self.downloads);
        if downloads.get(cid).is_some_and(|s| s.busy) {
            return Err(format!(
                "another request is using the download session of {cid}"
            ));
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let slot = DownloadSlot {
            generation,
            chunker: None,
            busy: true,
            cancel: CancellationToken::new(),
        };
        if let Some(old) = downloads.insert(cid.to_owned(), slot) {
            old.cancel.cancel();
        }
        Ok(generation)
    }

    /// Returns a session to idle (if it still exists and was not replaced).
    fn release_download(&self, cid: &str, generation: u64, chunker: Option<Chunker>) {
        if let Some(slot) = lock(&self.downloads).get_mut(cid) {
            if slot.generation == generation {
                slot.chunker = chunker;
                slot.busy = false;
            }
        }
    }

    /// Removes a session (if it still exists and was not replaced).
    fn forget_download(&self, cid: &str, generation: u64) {
        let mut downloads = lock(&self.downloads);
        if downloads
            .get(cid)
            .is_some_and(|s| s.generation == generation)
        {
            downloads.remove(cid);
        }
    }
}

fn upload_slot<'a>(
    uploads: &'a mut HashMap<String, UploadSlot>,
    session: &str,
) -> Result<&'a mut UploadSlot, String> {
    let slot = uploads
        .get_mut(session)
        .ok_or_else(|| format!("no upload session {session:?}"))?;
    if slot.busy {
        return Err(format!(
            "another request is using upload session {session:?}"
        ));
    }
    Ok(slot)
}

fn take_upload(
    uploads: &Mutex<HashMap<String, UploadSlot>>,
    session: &str,
) -> Result<UploadSlot, String> {
    let mut uploads = lock(uploads);
    upload_slot(&mut uploads, session)?;
    uploads
        .remove(session)
        .ok_or_else(|| format!("no upload session {session:?}"))
}

fn chunk_size_or_default(n: usize) -> Result<usize, String> {
    match n {
        0 => Ok(codex_node::DEFAULT_BLOCK_SIZE),
        n if n > codex_node::MAX_BLOCK_SIZE => {
            Err(format!("chunk size {n} is larger than 100 MiB"))
        }
        n => Ok(n),
    }
}

/// Streams a dataset to the callback (and to `path` when non-empty). A cancel ends the
/// stream early with success, as the reference does.
async fn stream(
    node: &Node,
    cid: Cid,
    chunk_size: usize,
    local: bool,
    path: &str,
    reply: &Reply,
    cancel: CancellationToken,
) -> Result<(), String> {
    use std::io::Write;
    let dl = node.download(cid, local).await.map_err(|e| e.to_string())?;
    let mut chunker = Chunker::new(dl, chunk_size);
    let mut file = if path.is_empty() {
        None
    } else {
        let f = std::fs::File::create(path).map_err(|e| format!("creating {path}: {e}"))?;
        Some(std::io::BufWriter::with_capacity(1 << 20, f))
    };
    loop {
        let next = tokio::select! {
            biased;
            () = cancel.cancelled() => return Ok(()),
            next = chunker.next() => next.map_err(|e| e.to_string())?,
        };
        let Some(data) = next else { break };
        if let Some(f) = file.as_mut() {
            tokio::task::block_in_place(|| f.write_all(&data))
                .map_err(|e| format!("writing {path}: {e}"))?;
        }
        reply.progress(&data);
    }
    if let Some(mut f) = file {
        tokio::task::block_in_place(|| f.flush()).map_err(|e| format!("writing {path}: {e}"))?;
    }
    Ok(())
}

/// Re-cuts a download's blocks into pieces of the requested size.
pub(crate) struct Chunker {
    download: Download,
    size: usize,
    pending: Bytes,
}

impl Chunker {
    fn new(download: Download, size: usize) -> Self {
        Self {
            download,
            size,
            pending: Bytes::new(),
        }
    }

    /// The next piece of at most `size` bytes (shorter only at the end), `None` at the end.
    async fn next(&mut self) -> codex_node::Result<Option<Bytes>> {
        if self.pending.len() >= self.size {
            return Ok(Some(self.pending.split_to(self.size)));
        }
        if self.pending.is_empty() {
            // The common case (chunk size = block size) moves blocks without copying.
            match self.download.next_block().await? {
                None => return Ok(None),
                Some(b) if b.len() == self.size => return Ok(Some(b)),
                Some(b) => self.pending = b,
            }
            if self.pending.len() >= self.size {
                return Ok(Some(self.pending.split_to(self.size)));
            }
        }
        let mut out = BytesMut::with_capacity(self.size);
        out.extend_from_slice(&std::mem::take(&mut self.pending));
        while out.len() < self.size {
            let Some(mut b) = self.download.next_block().await? else {
                break;
            };
            let take = (self.size - out.len()).min(b.len());
            out.extend_from_slice(&b.split_to(take));
            self.pending = b;
        }
        Ok(if out.is_empty() {
            None
        } else {
            Some(out.freeze())
        })
    }
}
