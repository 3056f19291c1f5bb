//! The node: its lifecycle, its own runtime and threads, and the operations it offers.
//!
//! A [`Node`] owns a multi-threaded tokio runtime. Its async methods may be awaited from any
//! executor: disk work runs on the node's blocking pool, never on the caller's threads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use libp2p_identity::{Keypair, PeerId};
use serde::Serialize;
use tokio::runtime::{Handle, Runtime};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::cid::Cid;
use crate::config::NodeConfig;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::net::dht::Dht;
use crate::net::engine::Engine;
use crate::net::fetch::{self, FetchConfig, FetchState};
use crate::net::host::{Host, HostConfig};
use crate::net::spr::Spr;
use crate::store::{lock, Dataset, DatasetWriter, Space, Store, StoreConfig};
use libp2p::multiaddr::Protocol;

/// The version this node reports.
pub const VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), "+1.0.0-prototype.1");

/// The source revision this node reports.
pub const REVISION: &str = match option_env!("CODEX_REVISION") {
    Some(r) => r,
    None => "unknown",
};

/// How many blocks a download reads ahead of its consumer.
const READ_AHEAD: usize = 16;

/// How many blocks one trip to the blocking pool reads at most.
const READ_BATCH: usize = 8;

/// How many events a slow subscriber may fall behind before it loses some.
const EVENT_BACKLOG: usize = 1024;

/// Lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Created, not started.
    Created,
    /// Running.
    Started,
    /// Stopped; may be started again.
    Stopped,
    /// Closed: the store is released; only destruction remains.
    Closed,
}

/// Something that happened in the node, delivered to event subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Event {
    /// The node started.
    Started,
    /// The node stopped.
    Stopped,
    /// A dataset was stored by an upload.
    #[serde(rename_all = "camelCase")]
    DatasetStored {
        /// Manifest CID.
        cid: String,
        /// Unpadded size.
        dataset_size: u64,
    },
    /// A dataset was deleted.
    DatasetDeleted {
        /// Manifest CID.
        cid: String,
    },
    /// A background fetch finished: the whole dataset is local.
    FetchCompleted {
        /// Manifest CID.
        cid: String,
    },
    /// A background fetch failed.
    FetchFailed {
        /// Manifest CID.
        cid: String,
        /// Why.
        error: String,
    },
    /// Maintenance deleted expired blocks.
    BlocksExpired {
        /// How many.
        count: usize,
    },
}

/// Debug information, as `codex_debug` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DebugInfo {
    /// Peer ID.
    pub id: String,
    /// Listening addresses.
    pub addrs: Vec<String>,
    /// Signed peer record, empty while the node has no network.
    pub spr: String,
    /// Announced addresses: port mappings, the listen addresses (on the `extip` IP when
    /// set), relayed (`/p2p-circuit`) addresses.
    pub announce_addresses: Vec<String>,
    /// Discovery table.
    pub table: Table,
}

/// The discovery routing table summary of [`DebugInfo`].
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Table {
    /// This node.
    pub local_node: serde_json::Value,
    /// Known nodes.
    pub nodes: Vec<serde_json::Value>,
}

struct Inner {
    config: NodeConfig,
    key: Keypair,
    peer_id: PeerId,
    store: Mutex<Option<Arc<Store>>>,
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    maintenance: Mutex<Option<JoinHandle<()>>>,
    /// Cancelled at shutdown: long blocking loops check it.
    shutdown: CancellationToken,
    /// The network, while started.
    net: Mutex<Option<Net>>,
    /// Downloads from the network in progress, by manifest CID.
    fetches: Mutex<HashMap<Cid, Weak<Fetching>>>,
    runtime: Mutex<Option<Runtime>>,
}

/// The libp2p host and block exchange of a started node.
struct Net {
    host: Arc<Host>,
    engine: Engine,
    dht: Dht,
    /// Cancels the announcing loop.
    cancel: CancellationToken,
}

/// A dataset download shared by everyone waiting for it; cancelled when the last of them
/// lets go.
struct Fetching {
    state: watch::Receiver<FetchState>,
    cancel: CancellationToken,
}

impl Drop for Fetching {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self
            .runtime
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            // The last handle went away without `shutdown`: wind down without blocking.
            rt.shutdown_background();
        }
    }
}

/// A Codex node: a cheap, cloneable handle. Call [`Node::shutdown`] for an orderly end;
/// when the last handle is dropped without it, the runtime winds down in the background.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
    handle: Handle,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.inner.peer_id)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Creates a node: starts its runtime, opens its store and loads (or creates) its key.
    pub fn new(config: NodeConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            Error::io(
                format!("creating data-dir {}", config.data_dir.display()),
                e,
            )
        })?;
        let store = Store::open(&StoreConfig {
            data_dir: config.data_dir.clone(),
            quota: config.storage_quota,
            ttl: config.block_ttl,
        })?;
        let key = crate::key::load_or_create(&config.key_path())?;
        let peer_id = PeerId::from(key.public());
        // Built last: nothing after it can fail, so it is never dropped half-used.
        let workers = match config.num_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(4)),
            n => n,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .max_blocking_threads(64)
            .thread_name("codex-node")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the node's runtime", e))?;
        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        tracing::info!(%peer_id, data_dir = %config.data_dir.display(), "node created");
        let handle = runtime.handle().clone();
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                key,
                peer_id,
                store: Mutex::new(Some(Arc::new(store))),
                state: Mutex::new(State::Created),
                events,
                maintenance: Mutex::new(None),
                shutdown: CancellationToken::new(),
                net: Mutex::new(None),
                fetches: Mutex::new(HashMap::new()),
                runtime: Mutex::new(Some(runtime)),
            }),
            handle,
        })
    }

    /// A handle to the node's runtime, to run work on the node's threads.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.inner.config
    }

    /// The lifecycle state.
    pub fn state(&self) -> State {
        *lock(&self.inner.state)
    }

    /// The node's keypair.
    pub fn keypair(&self) -> &Keypair {
        &self.inner.key
    }

    /// The peer ID (`16Uiu2…`).
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// The data directory.
    pub fn repo(&self) -> &Path {
        &self.inner.config.data_dir
    }

    /// Subscribes to events. Subscribers that fall behind by more than 1024 events lose the
    /// oldest ones.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn emit(&self, e: Event) {
        let _ = self.inner.events.send(e);
    }

    /// The store, or an error once the node is closed.
    pub fn store(&self) -> Result<Arc<Store>> {
        lock(&self.inner.store)
            .clone()
            .ok_or_else(|| Error::State("the node is closed".into()))
    }

    /// Starts the node (again, after a stop): block maintenance, the libp2p host listening
    /// on `listen-addrs`, the block exchange, and connections to the bootstrap nodes.
    pub async fn start(&self) -> Result<()> {
        {
            let mut state = lock(&self.inner.state);
            match *state {
                State::Created | State::Stopped => *state = State::Started,
                State::Started => return Err(Error::State("the node is already started".into())),
                State::Closed => return Err(Error::State("the node is closed".into())),
            }
        }
        let net = self.handle.spawn(start_network(self.clone())).await;
        let net = match net {
            Ok(Ok(net)) => net,
            Ok(Err(e)) => {
                *lock(&self.inner.state) = State::Stopped;
                return Err(e);
            }
            Err(e) => {
                *lock(&self.inner.state) = State::Stopped;
                return Err(Error::State(format!("starting the network: {e}")));
            }
        };
        *lock(&self.inner.net) = Some(net);
        let store = self.store()?;
        let interval = self.inner.config.block_maintenance_interval;
        let per_pass = self.inner.config.block_maintenance_blocks;
        let events = self.inner.events.clone();
        let task = self
            .handle()
            .spawn(maintenance(store, interval, per_pass, events));
        *lock(&self.inner.maintenance) = Some(task);
        self.emit(Event::Started);
        tracing::info!(peer = %self.inner.peer_id, "node started");
        Ok(())
    }

    /// Stops the node's background work. Stored data stays available.
    pub fn stop(&self) -> Result<()> {
        {
            let mut state = lock(&self.inner.state);
            match *state {
                State::Started => *state = State::Stopped,
                State::Created | State::Stopped => {
                    return Err(Error::State("the node is not started".into()))
                }
                State::Closed => return Err(Error::State("the node is closed".into())),
            }
        }
        if let Some(task) = lock(&self.inner.maintenance).take() {
            task.abort();
        }
        self.stop_network();
        self.emit(Event::Stopped);
        tracing::info!(peer = %self.inner.peer_id, "node stopped");
        Ok(())
    }

    /// Closes the node: releases the store and the data-dir lock (waiting up to 5 s for work
    /// that still holds them), so a new node can open the same data-dir once this returns.
    /// Stops the node first if needed.
    pub async fn close(&self) -> Result<()> {
        if self.state() == State::Started {
            self.stop()?;
        }
        {
            let mut state = lock(&self.inner.state);
            if *state == State::Closed {
                return Err(Error::State("the node is already closed".into()));
            }
            *state = State::Closed;
        }
        let store = lock(&self.inner.store).take();
        if let Some(store) = store {
            self.handle
                .spawn(release(store))
                .await
                .map_err(|e| Error::State(format!("closing the store: {e}")))??;
        }
        Ok(())
    }

    /// Runs blocking store work on the node's blocking pool.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(Arc<Store>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let store = self.store()?;
        self.handle()
            .spawn_blocking(move || f(store))
            .await
            .map_err(|e| Error::State(format!("store task failed: {e}")))?
    }

    /// Starts an upload. `name` is the file name (or path) recorded in the manifest, with
    /// the mimetype its extension implies; `block_size` 0 means 65536.
    pub fn upload(&self, name: Option<&str>, block_size: usize) -> Result<Upload> {
        let block_size = if block_size == 0 {
            crate::DEFAULT_BLOCK_SIZE
        } else {
            block_size
        };
        let (filename, mimetype) = name_and_mimetype(name);
        let writer = self.store()?.writer(block_size, filename, mimetype)?;
        Ok(Upload {
            writer: Some(writer),
            handle: self.handle(),
            events: self.inner.events.clone(),
        })
    }

    /// Uploads the file at `path` (its base name goes into the manifest). `progress` is called
    /// with the byte count of each stored block, on the node's threads. Cancelling `cancel`
    /// (or shutting the node down) abandons the upload at the next block.
    pub async fn upload_file(
        &self,
        path: PathBuf,
        block_size: usize,
        mut progress: impl FnMut(u64) + Send + 'static,
        cancel: CancellationToken,
    ) -> Result<Cid> {
        let shutdown = self.inner.shutdown.clone();
        let mut upload = self.upload(path.to_str(), block_size)?;
        let Some(mut writer) = upload.writer.take() else {
            unreachable!("a new upload has its writer")
        };
        let bs = writer.block_size();
        let (cid, manifest) = self
            .blocking(move |_| {
                use std::io::Read;
                let mut f = std::fs::File::open(&path)
                    .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
                loop {
                    if cancel.is_cancelled() || shutdown.is_cancelled() {
                        return Err(Error::Cancelled);
                    }
                    // Read straight into a (recycled) block buffer: stored without a copy.
                    let mut buf = writer.buffer();
                    buf.resize(bs, 0);
                    let mut filled = 0;
                    while filled < bs {
                        match f.read(&mut buf[filled..]) {
                            Ok(0) => break,
                            Ok(n) => filled += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                return Err(Error::io(format!("reading {}", path.display()), e))
                            }
                        }
                    }
                    if filled == 0 {
                        break;
                    }
                    if filled < bs {
                        // The last, partial block is stored (padded) by `finish`.
                        writer.write(&buf[..filled])?;
                        let done = writer.finish()?;
                        progress(filled as u64);
                        return Ok(done);
                    }
                    writer.write_block(buf)?;
                    progress(filled as u64);
                }
                writer.finish()
            })
            .await?;
        self.emit(Event::DatasetStored {
            cid: cid.to_string(),
            dataset_size: manifest.dataset_size,
        });
        Ok(cid)
    }

    /// Opens a dataset for streaming, block by block, each verified. With `local` false, a
    /// dataset not fully stored here is downloaded from connected peers meanwhile (and kept):
    /// blocks stream in order as they arrive.
    pub async fn download(&self, cid: Cid, local: bool) -> Result<Download> {
        let fetching = if local || self.exists(cid).await? {
            None
        } else {
            Some(self.fetching(cid).await?)
        };
        let mut reader = self.blocking(move |s| s.reader(&cid)).await?;
        let manifest = reader.manifest().clone();
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let handle = self.handle();
        // Reads ahead while there is room, a batch per trip to the blocking pool: an idle
        // consumer parks only this task, never a blocking thread.
        self.handle().spawn(async move {
            let mut progress = fetching.as_ref().map(|f| f.state.clone());
            while let Ok(permit) = tx.reserve().await {
                // This task is the only sender: the room seen now is still there below.
                let mut batch = 1 + tx.capacity().min(READ_BATCH - 1);
                if let Some(progress) = progress.as_mut() {
                    // Read only what the download has stored.
                    let at = reader.position();
                    // A reader that goes away while blocks are awaited ends the download.
                    let ready = tokio::select! {
                        r = progress.wait_for(|st| st.prefix > at || st.error.is_some()) => {
                            r.map(|st| (st.prefix, st.error.clone()))
                        }
                        _ = tx.closed() => break,
                    };
                    match ready {
                        Ok((prefix, None)) => {
                            batch = batch.min((prefix - at).min(READ_BATCH as u64) as usize);
                        }
                        Ok((prefix, Some(e))) if prefix <= at => {
                            permit.send(Err(Error::Network(e)));
                            return;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            permit.send(Err(Error::Cancelled));
                            return;
                        }
                    }
                }
                let read = handle.spawn_blocking(move || {
                    let mut items = Vec::with_capacity(batch);
                    while items.len() < batch {
                        match reader.next_block().transpose() {
                            None => break,
                            Some(item) => {
                                let end = item.is_err();
                                items.push(item);
                                if end {
                                    break;
                                }
                            }
                        }
                    }
                    (reader, items)
                });
                let (r, items) = match read.await {
                    Ok(v) => v,
                    Err(e) => {
                        permit.send(Err(Error::State(format!("read task failed: {e}"))));
                        return;
                    }
                };
                reader = r;
                let done = items.len() < batch || items.last().is_some_and(Result::is_err);
                let mut items = items.into_iter();
                let Some(first) = items.next() else { return };
                permit.send(first);
                for item in items {
                    if tx.try_send(item).is_err() {
                        return;
                    }
                }
                if done {
                    return;
                }
            }
            drop(fetching);
        });
        Ok(Download { manifest, rx })
    }

    /// Joins the download of dataset `cid` in progress, or starts one: the manifest from the
    /// store or from peers, then the blocks.
    async fn fetching(&self, cid: Cid) -> Result<Arc<Fetching>> {
        if let Some(f) = self.live_fetch(&cid) {
            return Ok(f);
        }
        let Ok(engine) = self.engine() else {
            return Err(Error::NotFound(format!(
                "dataset {cid} (the node is not started, so it cannot fetch it from peers)"
            )));
        };
        let (manifest, first) = match self.manifest(cid).await {
            Ok(m) => (m, None),
            Err(Error::NotFound(_)) => {
                let (m, peer) = self.manifest_from_peers(&engine, cid).await?;
                (m, Some(peer))
            }
            Err(e) => return Err(e),
        };
        if let Some(f) = self.live_fetch(&cid) {
            return Ok(f);
        }
        // Registered before this returns: the manifest is then stored, and blocks are
        // servable as they arrive.
        let manifest_tree = manifest.tree_cid;
        let fill = self.blocking(move |s| s.fill(&cid, &manifest)).await?;
        // Checked once more under the lock the registration below holds.
        let mut fetches = lock(&self.inner.fetches);
        if let Some(f) = fetches.get(&cid).and_then(Weak::upgrade) {
            if f.state.borrow().error.is_none() {
                return Ok(f);
            }
        }
        let cfg = self.fetch_config();
        let cancel = self.inner.shutdown.child_token();
        let (state_tx, state) = watch::channel(FetchState::default());
        let task_cancel = cancel.clone();
        // A node holding the manifest serves blocks as they arrive: announce it at once,
        // and look for providers while the download runs.
        let seeking = cancel.child_token();
        if let Ok(dht) = self.dht() {
            dht.announce(cid, manifest_tree);
            self.handle.spawn(dht.seek(cid, seeking.clone()));
        }
        self.handle.spawn(async move {
            let _stop_seeking = seeking.drop_guard();
            let job = fetch::DatasetJob {
                engine,
                fill,
                mcid: cid,
                first,
                cfg,
            };
            let r = fetch::dataset(job, state_tx, task_cancel).await;
            match r {
                Ok(()) => tracing::info!(%cid, "dataset downloaded"),
                Err(Error::Cancelled) => tracing::debug!(%cid, "download cancelled"),
                Err(e) => tracing::warn!(%cid, error = %e, "download failed"),
            }
        });
        let f = Arc::new(Fetching { state, cancel });
        fetches.retain(|_, w| w.strong_count() > 0);
        fetches.insert(cid, Arc::downgrade(&f));
        Ok(f)
    }

    /// The download of `cid` in progress, unless there is none or it failed.
    fn live_fetch(&self, cid: &Cid) -> Option<Arc<Fetching>> {
        lock(&self.inner.fetches)
            .get(cid)
            .and_then(Weak::upgrade)
            .filter(|f| f.state.borrow().error.is_none())
    }

    /// Asks connected peers for the manifest `cid` (on the node's runtime, retrying as
    /// `block-retries` says). Returns it with the peer that sent it.
    async fn manifest_from_peers(&self, engine: &Engine, cid: Cid) -> Result<(Manifest, PeerId)> {
        let engine = engine.clone();
        let cfg = self.fetch_config();
        let cancel = self.inner.shutdown.child_token();
        // Providers found in the DHT are dialled while the manifest is asked for.
        let seeking = cancel.child_token();
        if let Ok(dht) = self.dht() {
            self.handle.spawn(dht.seek(cid, seeking.clone()));
        }
        let _stop_seeking = seeking.drop_guard();
        self.handle
            .spawn(async move { fetch::manifest(&engine, cid, cfg, &cancel).await })
            .await
            .map_err(|e| Error::State(format!("fetching the manifest: {e}")))?
    }

    fn fetch_config(&self) -> FetchConfig {
        FetchConfig {
            retries: self.inner.config.block_retries,
            ..FetchConfig::default()
        }
    }

    fn dht(&self) -> Result<Dht> {
        lock(&self.inner.net)
            .as_ref()
            .map(|n| n.dht.clone())
            .ok_or_else(|| Error::State("the node is not started".into()))
    }

    fn engine(&self) -> Result<Engine> {
        lock(&self.inner.net)
            .as_ref()
            .map(|n| n.engine.clone())
            .ok_or_else(|| Error::State("the node is not started".into()))
    }

    fn host(&self) -> Result<Arc<Host>> {
        lock(&self.inner.net)
            .as_ref()
            .map(|n| Arc::clone(&n.host))
            .ok_or_else(|| Error::State("the node is not started".into()))
    }

    /// The signed peer record (`spr:…`) of the started node: its discovery (UDP) address
    /// first (what the reference's DHT reads), then the addresses libp2p dials. It is
    /// signed again, with a higher sequence number, when those change (a port mapping, a
    /// relay reservation).
    pub fn spr(&self) -> Result<String> {
        Ok(self.dht()?.discovery().record().to_string())
    }

    /// Connects to `peer` at `addrs`. Returns once connected.
    pub async fn connect(&self, peer: PeerId, addrs: Vec<libp2p::Multiaddr>) -> Result<()> {
        if peer == self.inner.peer_id {
            return Err(Error::Invalid("cannot connect to this node itself".into()));
        }
        let addrs = if addrs.is_empty() {
            let dht = self.dht()?;
            let found = self
                .handle
                .spawn(async move { dht.find_peer(&peer).await })
                .await
                .map_err(|e| Error::State(format!("finding the peer: {e}")))?;
            match found {
                Some(a) if !a.is_empty() => a,
                Some(_) => {
                    return Err(Error::Network(format!(
                        "peer {peer} found through discovery, but its record has no TCP address"
                    )))
                }
                None => {
                    return Err(Error::Network(format!(
                        "peer {peer} not found through discovery (DHT)"
                    )))
                }
            }
        } else {
            addrs
        };
        let host = self.host()?;
        self.handle
            .spawn(async move { host.dial(peer, addrs).await })
            .await
            .map_err(|e| Error::State(format!("connecting: {e}")))?
    }

    /// What this node knows of a connected peer: `{peerId, seqNo, addresses}`, the
    /// addresses being those of its open connections (relayed ones contain `/p2p-circuit`).
    pub fn peer_info(&self, peer: &PeerId) -> Result<serde_json::Value> {
        let info = self.host()?.info();
        let addrs = info
            .peers
            .get(peer)
            .ok_or_else(|| Error::NotFound(format!("peer {peer}")))?;
        let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        Ok(serde_json::json!({
            "peerId": peer.to_base58(),
            "seqNo": 0,
            "addresses": addrs,
        }))
    }

    /// Peers connected now.
    pub fn peers(&self) -> Vec<PeerId> {
        self.engine().map(|e| e.peers()).unwrap_or_default()
    }

    fn stop_network(&self) {
        let net = lock(&self.inner.net).take();
        if let Some(net) = net {
            net.cancel.cancel();
            net.dht.stop();
            net.engine.stop();
            drop(net.host);
        }
        for (_, f) in lock(&self.inner.fetches).drain() {
            if let Some(f) = f.upgrade() {
                f.cancel.cancel();
            }
        }
    }

    /// The manifest of a stored dataset.
    pub async fn manifest(&self, cid: Cid) -> Result<Manifest> {
        self.blocking(move |s| s.manifest(&cid)).await
    }

    /// The manifest of a dataset: from the store, or else from connected peers (retrying as
    /// `block-retries` says) when the node is started.
    pub async fn find_manifest(&self, cid: Cid) -> Result<Manifest> {
        match self.manifest(cid).await {
            Err(Error::NotFound(what)) => {
                let Ok(engine) = self.engine() else {
                    return Err(Error::NotFound(what));
                };
                self.manifest_from_peers(&engine, cid).await.map(|(m, _)| m)
            }
            r => r,
        }
    }

    /// Every stored dataset.
    pub async fn list(&self) -> Result<Vec<Dataset>> {
        self.blocking(|s| s.list()).await
    }

    /// Quota figures.
    pub async fn space(&self) -> Result<Space> {
        self.blocking(|s| s.space()).await
    }

    /// Whether `cid` is stored (for a dataset: all of it).
    pub async fn exists(&self, cid: Cid) -> Result<bool> {
        self.blocking(move |s| s.exists(&cid)).await
    }

    /// Deletes a block, or a whole dataset by its manifest CID.
    pub async fn delete(&self, cid: Cid) -> Result<()> {
        let was_dataset = cid.kind() == crate::CidKind::Manifest;
        self.blocking(move |s| s.delete(&cid)).await?;
        if was_dataset {
            self.emit(Event::DatasetDeleted {
                cid: cid.to_string(),
            });
        }
        Ok(())
    }

    /// Makes a dataset local and returns its manifest. Without a network only datasets
    /// already stored can be fetched; completion is reported as [`Event::FetchCompleted`].
    pub async fn fetch(&self, cid: Cid) -> Result<Manifest> {
        if self.exists(cid).await? {
            let manifest = self.manifest(cid).await?;
            self.emit(Event::FetchCompleted {
                cid: cid.to_string(),
            });
            return Ok(manifest);
        }
        let fetching = self.fetching(cid).await?;
        let manifest = self.manifest(cid).await?;
        let events = self.inner.events.clone();
        self.handle.spawn(async move {
            let mut state = fetching.state.clone();
            let end = state
                .wait_for(|st| st.done || st.error.is_some())
                .await
                .map(|st| st.error.clone());
            let event = match end {
                Ok(None) => Event::FetchCompleted {
                    cid: cid.to_string(),
                },
                Ok(Some(error)) => Event::FetchFailed {
                    cid: cid.to_string(),
                    error,
                },
                Err(_) => Event::FetchFailed {
                    cid: cid.to_string(),
                    error: "the download stopped".into(),
                },
            };
            let _ = events.send(event);
            drop(fetching);
        });
        Ok(manifest)
    }

    /// Debug information.
    pub fn debug_info(&self) -> DebugInfo {
        let id = self.inner.peer_id.to_base58();
        let info = self.host().map(|h| h.info()).unwrap_or_default();
        let strings = |v: &[libp2p::Multiaddr]| v.iter().map(ToString::to_string).collect();
        DebugInfo {
            id: id.clone(),
            addrs: strings(&info.listen),
            spr: self.spr().unwrap_or_default(),
            announce_addresses: strings(&info.announce),
            table: self.table(&id),
        }
    }

    /// The discovery table for [`DebugInfo`].
    fn table(&self, id: &str) -> Table {
        let Ok(dht) = self.dht() else {
            return Table {
                local_node: serde_json::json!({ "peerId": id }),
                nodes: Vec::new(),
            };
        };
        let d = dht.discovery();
        let node = |peer: String, node_id: String, record: &Spr, addr: String, seen: bool| {
            serde_json::json!({
                "peerId": peer,
                "nodeId": node_id,
                "record": record.to_string(),
                "address": addr,
                "seen": seen,
            })
        };
        Table {
            local_node: node(
                id.to_owned(),
                d.node_id().to_string(),
                &d.record(),
                d.local_addr().to_string(),
                true,
            ),
            nodes: d
                .nodes()
                .into_iter()
                .map(|(c, seen)| {
                    node(
                        c.spr.peer_id().to_base58(),
                        c.id.to_string(),
                        &c.spr,
                        c.addr.to_string(),
                        seen >= 1.0,
                    )
                })
                .collect(),
        }
    }

    /// Shuts the node down: cancels its work, stops its runtime (waiting up to `timeout` for
    /// running work, or not at all when called from inside an async context) and releases
    /// the store. Idempotent; every clone is affected.
    pub fn shutdown(&self, timeout: Duration) {
        self.inner.shutdown.cancel();
        if let Some(task) = lock(&self.inner.maintenance).take() {
            task.abort();
        }
        self.stop_network();
        *lock(&self.inner.state) = State::Closed;
        lock(&self.inner.store).take();
        let rt = lock(&self.inner.runtime).take();
        if let Some(rt) = rt {
            if Handle::try_current().is_ok() {
                rt.shutdown_background();
            } else {
                rt.shutdown_timeout(timeout);
            }
        }
    }
}

/// Starts the host and the block exchange (on the node's runtime), then dials the bootstrap
/// nodes in the background.
async fn start_network(node: Node) -> Result<Net> {
    let cfg = &node.inner.config;
    let listen = cfg
        .listen_addrs
        .iter()
        .map(|a| {
            a.parse::<libp2p::Multiaddr>().map_err(|e| Error::Config {
                key: "listen-addrs".into(),
                message: format!("{a}: {e}"),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bootstrap = cfg
        .bootstrap_nodes
        .iter()
        .map(|s| {
            s.parse::<Spr>().map_err(|e| Error::Config {
                key: "bootstrap-node".into(),
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // The bootstrap nodes are the relays a node behind a NAT reserves a slot on.
    let relays = bootstrap
        .iter()
        .filter_map(|r| {
            let peer = r.peer_id();
            let addr = crate::net::dht::tcp_addrs(r)
                .into_iter()
                .find(|a| !a.iter().any(|p| matches!(p, Protocol::P2pCircuit)))?;
            Some(match addr.iter().last() {
                Some(Protocol::P2p(_)) => addr,
                _ => addr.with(Protocol::P2p(peer)),
            })
        })
        .collect();
    let (events, peer_events) = mpsc::channel(256);
    let host = Host::start(
        node.inner.key.clone(),
        HostConfig {
            listen,
            max_peers: cfg.max_peers,
            agent: cfg.agent_string.clone(),
            nat: cfg.nat.clone(),
            relay: cfg.relay,
            relays,
        },
        events,
    )
    .await?;
    let host = Arc::new(host);
    let engine = Engine::start(node.store()?, Arc::clone(&host), peer_events)?;
    let dht = match Dht::start(&node.inner.key, cfg, Arc::clone(&host), bootstrap.clone()).await {
        Ok(d) => d,
        Err(e) => {
            engine.stop();
            return Err(e);
        }
    };
    let cancel = node.inner.shutdown.child_token();
    // The records follow the announced addresses (port mappings, relay reservations).
    tokio::spawn(dht.clone().follow_addresses(
        node.inner.key.clone(),
        host.announced(),
        cancel.clone(),
    ));
    tokio::spawn(dht.clone().advertise(
        node.store()?,
        node.inner.events.subscribe(),
        cancel.clone(),
    ));
    for record in bootstrap {
        let host = Arc::clone(&host);
        tokio::spawn(async move {
            let peer = record.peer_id();
            let addrs = crate::net::dht::tcp_addrs(&record);
            if addrs.is_empty() {
                tracing::warn!(%peer, "bootstrap record has no TCP address; skipped");
                return;
            }
            if let Err(e) = host.dial(peer, addrs).await {
                tracing::warn!(%peer, error = %e, "cannot reach bootstrap node");
            }
        });
    }
    Ok(Net {
        host,
        engine,
        dht,
        cancel,
    })
}

/// Drops the last handle of the store, waiting (bounded) for tasks that still hold it.
/// Fails when the store is still in use after 5 s: it (and the data-dir lock) is then
/// released only when that work ends.
async fn release(mut store: Arc<Store>) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Arc::try_unwrap(store) {
            Ok(s) => {
                drop(s);
                return Ok(());
            }
            Err(still_shared) if tokio::time::Instant::now() < deadline => {
                store = still_shared;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(_) => {
                return Err(Error::State(
                    "the store is still in use 5 s after close: the data-dir stays locked \
                     until that work ends"
                        .into(),
                ))
            }
        }
    }
}

/// Periodically deletes expired blocks.
async fn maintenance(
    store: Arc<Store>,
    interval: Duration,
    per_pass: usize,
    events: broadcast::Sender<Event>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = Arc::clone(&store);
        match tokio::task::spawn_blocking(move || s.maintenance(per_pass)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(count)) => {
                tracing::info!(count, "deleted expired blocks");
                let _ = events.send(Event::BlocksExpired { count });
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "block maintenance failed"),
            Err(e) => tracing::warn!(error = %e, "block maintenance task failed"),
        }
    }
}

/// The manifest file name (the base name) and the mimetype its extension implies.
fn name_and_mimetype(name: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return (None, None);
    };
    let base = name.rsplit('/').next().unwrap_or(name);
    let filename = (!base.is_empty()).then(|| base.to_owned());
    (
        filename,
        crate::mime::mimetype_for_filename(name).map(str::to_owned),
    )
}

/// An upload in progress. Dropping it abandons the upload and frees what it stored.
#[derive(Debug)]
pub struct Upload {
    writer: Option<DatasetWriter>,
    handle: Handle,
    events: broadcast::Sender<Event>,
}

impl Upload {
    /// Appends bytes (any split: the stream is cut into blocks independently).
    pub async fn write(&mut self, data: Bytes) -> Result<()> {
        let mut writer = self
            .writer
            .take()
            .ok_or_else(|| Error::State("the upload has failed".into()))?;
        let (writer, r) = self
            .handle
            .spawn_blocking(move || {
                let r = writer.write(&data);
                (writer, r)
            })
            .await
            .map_err(|e| Error::State(format!("upload task failed: {e}")))?;
        self.writer = Some(writer);
        r.map(drop)
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.writer.as_ref().map_or(0, DatasetWriter::len)
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Completes the upload; returns the dataset (manifest) CID.
    pub async fn finish(mut self) -> Result<Cid> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| Error::State("the upload has failed".into()))?;
        let (cid, manifest) = self
            .handle
            .spawn_blocking(move || writer.finish())
            .await
            .map_err(|e| Error::State(format!("upload task failed: {e}")))??;
        let _ = self.events.send(Event::DatasetStored {
            cid: cid.to_string(),
            dataset_size: manifest.dataset_size,
        });
        Ok(cid)
    }
}

/// A dataset being read. Dropping it stops the read-ahead.
#[derive(Debug)]
pub struct Download {
    manifest: Manifest,
    rx: mpsc::Receiver<Result<Bytes>>,
}

impl Download {
    /// The dataset's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The next block's bytes (the last one truncated to the dataset size), `None` at the end.
    pub async fn next_block(&mut self) -> Result<Option<Bytes>> {
        self.rx.recv().await.transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &Path) -> Node {
        let mut cfg = NodeConfig::new(dir);
        cfg.storage_quota = 1 << 30;
        Node::new(cfg).unwrap()
    }

    #[tokio::test]
    async fn upload_and_download_through_the_node() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let mut events = node.events();
        let mut up = node.upload(Some("hello.txt"), 0).unwrap();
        up.write(Bytes::from_static(b"Hello World!")).await.unwrap();
        let cid = up.finish().await.unwrap();
        assert_eq!(
            cid.to_string(),
            "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM"
        );
        assert!(matches!(
            events.recv().await.unwrap(),
            Event::DatasetStored { .. }
        ));
        let mut dl = node.download(cid, true).await.unwrap();
        assert_eq!(dl.manifest().filename.as_deref(), Some("hello.txt"));
        assert_eq!(dl.manifest().mimetype.as_deref(), Some("text/plain"));
        assert_eq!(
            dl.next_block().await.unwrap().unwrap().as_ref(),
            b"Hello World!"
        );
        assert!(dl.next_block().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn lifecycle_rules() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        assert!(node.stop().is_err());
        node.start().await.unwrap();
        assert!(node.start().await.is_err());
        node.stop().unwrap();
        node.start().await.unwrap();
        node.close().await.unwrap();
        assert!(node.start().await.is_err());
        assert!(node.space().await.is_err());
        drop(node);
        // The data-dir is free again for a new node.
        let again = self::node(dir.path());
        assert_eq!(again.space().await.unwrap().total_blocks, 0);
    }

    #[tokio::test]
    async fn idle_downloads_do_not_starve_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let node = node(dir.path());
        let mut up = node.upload(None, 1024).unwrap();
        up.write(Bytes::from(vec![7u8; 64 * 1024])).await.unwrap();
        let cid = up.finish().await.unwrap();
        // More open, unread downloads than the blocking pool has threads.
        let mut open = Vec::new();
        for _ in 0..80 {
            open.push(node.download(cid, true).await.unwrap());
        }
        let space = tokio::time::timeout(Duration::from_secs(10), node.space()).await;
        assert!(space.expect("the store still answers").is_ok());
        let mut first = open.pop().unwrap();
        let mut n = 0;
        while let Some(b) = first.next_block().await.unwrap() {
            n += b.len();
        }
        assert_eq!(n, 64 * 1024);
    }

    #[tokio::test]
    async fn extip_is_announced_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = NodeConfig::new(dir.path());
        cfg.storage_quota = 1 << 30;
        cfg.listen_addrs = vec!["/ip4/127.0.0.1/tcp/0".into()];
        cfg.disc_port = Some(0);
        cfg.nat = crate::config::Nat::ExtIp("203.0.113.7".parse().unwrap());
        let node = Node::new(cfg).unwrap();
        node.start().await.unwrap();
        let info = node.debug_info();
        let port = info.addrs[0].rsplit('/').next().unwrap().to_owned();
        let ext = format!("/ip4/203.0.113.7/tcp/{port}");
        assert_eq!(info.addrs, vec![format!("/ip4/127.0.0.1/tcp/{port}")]);
        assert_eq!(info.announce_addresses, vec![ext.clone()]);
        // The record (`codex_spr`, the DHT's): the UDP address, then the TCP one, both on
        // the external IP.
        let spr: Spr = node.spr().unwrap().parse().unwrap();
        let addrs: Vec<String> = spr.addrs().iter().map(ToString::to_string).collect();
        assert_eq!(addrs.len(), 2);
        assert!(addrs[0].starts_with("/ip4/203.0.113.7/udp/"), "{addrs:?}");
        assert_eq!(addrs[1], ext);
        assert_eq!(info.spr, node.spr().unwrap());
        node.stop().unwrap();
    }

    #[test]
    fn names_and_mimetypes() {
        assert_eq!(
            name_and_mimetype(Some("/a/b/c.JSON")),
            (Some("c.JSON".into()), Some("application/json".into()))
        );
        assert_eq!(
            name_and_mimetype(Some("noext")),
            (Some("noext".into()), None)
        );
        assert_eq!(name_and_mimetype(None), (None, None));
    }
}
