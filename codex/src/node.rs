//! A node: lifecycle and the operations that answer with one value.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use codex_sys as sys;
use futures::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::{oneshot, OwnedMutexGuard};
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::StreamExt;

use crate::config::CodexConfig;
use crate::error::{Error, Result};
use crate::ffi::{answer, cstring, Dispatcher, Progress, TextFn};
use crate::types::{Cid, DatasetInfo, DebugInfo, Event, Manifest, PeerInfo, Space};

/// How long teardown waits for each of stop and close.
const TEARDOWN_WAIT: Duration = Duration::from_secs(30);

pub(crate) struct Inner {
    pub(crate) dispatcher: Dispatcher,
    /// Download sessions are keyed by CID in the library: one at a time per CID.
    downloads: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Inner {
    /// Makes a request with no progress and returns its payload.
    pub(crate) async fn call(
        &self,
        keep: Box<dyn std::any::Any + Send>,
        f: impl FnOnce(crate::ffi::Call) -> std::ffi::c_int + Send + 'static,
    ) -> Result<Vec<u8>> {
        answer(self.dispatcher.request(Progress::None, keep, f)?).await
    }

    /// Makes a request of a `(ctx, text, cb, ud)` function and returns its payload.
    pub(crate) async fn call_text(&self, f: TextFn, arg: CString) -> Result<Vec<u8>> {
        answer(
            self.dispatcher
                .request_text(f, arg, Progress::None, Box::new(()))?,
        )
        .await
    }

    /// Takes the download slot of `cid` (waits while another download of it runs).
    pub(crate) async fn download_slot(&self, cid: &Cid) -> OwnedMutexGuard<()> {
        let m = {
            let mut map = self.downloads.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, m| Arc::strong_count(m) > 1 || m.try_lock().is_err());
            Arc::clone(map.entry(cid.to_string()).or_default())
        };
        m.lock_owned().await
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Best effort and non-blocking: the dispatcher thread tears the node down by itself.
        if !self.dispatcher.is_closed() {
            self.dispatcher.teardown(TEARDOWN_WAIT, None);
        }
    }
}

/// An in-process Codex node. Cheap to clone; the node is torn down (stop, close, destroy)
/// when the last clone is dropped, without blocking, or explicitly with
/// [`CodexNode::destroy`].
#[derive(Clone)]
pub struct CodexNode {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for CodexNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodexNode").finish_non_exhaustive()
    }
}

fn text(v: Vec<u8>) -> String {
    String::from_utf8_lossy(&v).into_owned()
}

fn parse<T: DeserializeOwned>(what: &'static str, v: &[u8]) -> Result<T> {
    serde_json::from_slice(v).map_err(|source| Error::Payload { what, source })
}

/// Calls a `(ctx, cb, ud)` library function.
macro_rules! plain {
    ($inner:expr, $f:path) => {
        // SAFETY: the dispatcher passes a live handle and the registry's callback/user data.
        $inner.call(Box::new(()), |c| unsafe { $f(c.ctx, c.cb, c.ud) })
    };
}

impl CodexNode {
    /// Creates a node (`codex_new`).
    ///
    /// # Cancel safety
    /// Dropping the future before it completes leaves the node to be torn down in the
    /// background.
    pub async fn new(config: CodexConfig) -> Result<Self> {
        let json = cstring("config", &config.to_json())?;
        let dispatcher = Dispatcher::spawn()?;
        let rx = dispatcher.create(json)?;
        let inner = Arc::new(Inner {
            dispatcher,
            downloads: Mutex::new(HashMap::new()),
        });
        answer(rx).await?;
        Ok(Self { inner })
    }

    /// The library version (`codex_version`).
    pub async fn version(&self) -> Result<String> {
        plain!(self.inner, sys::codex_version).await.map(text)
    }

    /// The library's source revision (`codex_revision`).
    pub async fn revision(&self) -> Result<String> {
        plain!(self.inner, sys::codex_revision).await.map(text)
    }

    /// Starts the node.
    ///
    /// # Cancel safety
    /// The start goes on if the future is dropped.
    pub async fn start(&self) -> Result<()> {
        plain!(self.inner, sys::codex_start).await.map(drop)
    }

    /// Stops the node. The reference library cannot be started again after a stop.
    pub async fn stop(&self) -> Result<()> {
        plain!(self.inner, sys::codex_stop).await.map(drop)
    }

    /// Closes the node (releases its store); only destruction remains after it.
    pub async fn close(&self) -> Result<()> {
        plain!(self.inner, sys::codex_close).await.map(drop)
    }

    /// Stops (if started), closes and destroys the node, waiting for all of it. Requests
    /// still pending fail with [`Error::Destroyed`]. Other clones see every later request
    /// fail the same way.
    pub async fn destroy(self) -> Result<()> {
        if self.inner.dispatcher.is_closed() {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        self.inner.dispatcher.teardown(TEARDOWN_WAIT, Some(tx));
        rx.await.map_err(|_| Error::Destroyed)
    }

    /// The data directory (`codex_repo`).
    pub async fn repo(&self) -> Result<String> {
        plain!(self.inner, sys::codex_repo).await.map(text)
    }

    /// The peer ID (`codex_peer_id`).
    pub async fn peer_id(&self) -> Result<String> {
        plain!(self.inner, sys::codex_peer_id).await.map(text)
    }

    /// The signed peer record, `spr:…` (`codex_spr`; fails before start).
    pub async fn spr(&self) -> Result<String> {
        plain!(self.inner, sys::codex_spr).await.map(text)
    }

    /// Debug information (`codex_debug`).
    pub async fn debug(&self) -> Result<DebugInfo> {
        parse("debug", &plain!(self.inner, sys::codex_debug).await?)
    }

    /// Changes the log level (`codex_log_level`).
    pub async fn set_log_level(&self, level: &str) -> Result<()> {
        self.inner
            .call_text(sys::codex_log_level, cstring("log-level", level)?)
            .await
            .map(drop)
    }

    /// Connects to a peer by ID, at the given addresses (none: find it by discovery).
    pub async fn connect(&self, peer_id: &str, addrs: &[String]) -> Result<()> {
        let peer = cstring("peer id", peer_id)?;
        let addrs: Vec<CString> = addrs
            .iter()
            .map(|a| cstring("address", a))
            .collect::<Result<_>>()?;
        let ptrs: Vec<usize> = addrs.iter().map(|a| a.as_ptr() as usize).collect();
        let (peer_p, ptrs_p, n) = (peer.as_ptr() as usize, ptrs.as_ptr() as usize, ptrs.len());
        // The reference does not copy the strings: they live until the terminal callback.
        let keep = Box::new((peer, addrs, ptrs));
        self.inner
            .call(keep, move |c| {
                // SAFETY: the strings and the pointer array live in `keep`.
                unsafe {
                    sys::codex_connect(
                        c.ctx,
                        peer_p as *const c_char,
                        ptrs_p as *mut *const c_char,
                        n,
                        c.cb,
                        c.ud,
                    )
                }
            })
            .await
            .map(drop)
    }

    /// What the node knows of a peer (`codex_peer_debug`).
    pub async fn peer_debug(&self, peer_id: &str) -> Result<PeerInfo> {
        let v = self
            .inner
            .call_text(sys::codex_peer_debug, cstring("peer id", peer_id)?)
            .await?;
        parse("peer_debug", &v)
    }

    /// A dataset's manifest (`codex_download_manifest`).
    pub async fn manifest(&self, cid: &Cid) -> Result<Manifest> {
        let v = self
            .inner
            .call_text(sys::codex_download_manifest, cstring("cid", cid.as_str())?)
            .await?;
        parse("manifest", &v)
    }

    /// Every stored dataset (`codex_storage_list`).
    pub async fn list(&self) -> Result<Vec<DatasetInfo>> {
        parse("list", &plain!(self.inner, sys::codex_storage_list).await?)
    }

    /// Quota figures (`codex_storage_space`).
    pub async fn space(&self) -> Result<Space> {
        parse(
            "space",
            &plain!(self.inner, sys::codex_storage_space).await?,
        )
    }

    /// Whether a CID is stored (`codex_storage_exists`). With the vendored node a dataset
    /// CID answers true only when the whole dataset is local; the reference checks only the
    /// manifest block.
    pub async fn exists(&self, cid: &Cid) -> Result<bool> {
        let v = self
            .inner
            .call_text(sys::codex_storage_exists, cstring("cid", cid.as_str())?)
            .await?;
        match v.as_slice() {
            b"true" => Ok(true),
            b"false" => Ok(false),
            other => Err(Error::Library(format!(
                "exists answered {:?}",
                String::from_utf8_lossy(other)
            ))),
        }
    }

    /// Deletes a dataset by its CID (`codex_storage_delete`).
    pub async fn delete(&self, cid: &Cid) -> Result<()> {
        self.inner
            .call_text(sys::codex_storage_delete, cstring("cid", cid.as_str())?)
            .await
            .map(drop)
    }

    /// Starts making a dataset local in the background; answers its manifest
    /// (`codex_storage_fetch`). Completion is reported as an event.
    pub async fn fetch(&self, cid: &Cid) -> Result<Manifest> {
        let v = self
            .inner
            .call_text(sys::codex_storage_fetch, cstring("cid", cid.as_str())?)
            .await?;
        parse("fetch", &v)
    }

    /// The node's events. A subscriber more than 1024 events behind loses the oldest.
    pub fn events(&self) -> impl Stream<Item = Event> + Send + Unpin + 'static {
        BroadcastStream::new(self.inner.dispatcher.events()).filter_map(|r| {
            let bytes = r.ok()?;
            let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
            let kind = json
                .get("type")
                .and_then(|t| t.as_str())
                .unwrap_or_default()
                .to_owned();
            Some(Event { kind, json })
        })
    }
}
