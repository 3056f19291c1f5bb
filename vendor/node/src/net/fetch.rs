//! Downloading from peers: a manifest by CID, then a whole dataset from every peer that
//! provides it, in parallel, with a bounded window, timeouts, retries and failover.
//!
//! Providers are the connected peers that answer Have for the manifest CID (or delivered
//! it). Blocks are requested in index order, spread over the providers; a block a provider
//! does not have, that times out, or whose provider goes away is asked of another. Every
//! block is checked before it is stored: asked of that peer, hashing to its CID, and placed
//! by its proof under the tree root. A peer that sends a bad block is dropped.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::engine::{Engine, Inbound};
use super::message::{BlockAddress, Entry, Message, WantType};
use crate::bits::Bits;
use crate::cid::{Cid, CidKind, Digest32};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::merkle::Proof;
#[cfg(doc)]
use crate::store::Store;
use crate::store::TreeFill;

/// Blocks requested and not yet received, over all providers.
const WINDOW: usize = 512;

/// Bytes of block data the downloads of one node may have asked for and not yet written,
/// all together: what the node holds in memory for downloads does not grow with their
/// number or size. Each running download may use an equal share.
pub(crate) const FETCH_BUDGET: u64 = 16 << 20;

/// Blocks requested from one provider at once.
const PER_PEER: usize = 256;

/// How long a requested block may take before it is asked of another provider.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// Received blocks waiting to be verified and written.
const WRITE_QUEUE: usize = 256;

/// The longest a stored block waits for its commit (what makes it servable to others and
/// visible to an in-order reader) while more blocks may arrive to share the transaction.
const COMMIT_DELAY: Duration = Duration::from_millis(10);

/// Retry settings of downloads.
#[derive(Debug, Clone, Copy)]
pub struct FetchConfig {
    /// How many times a block (or a manifest) is asked for again before the download fails
    /// (`block-retries`).
    pub retries: u32,
    /// Time between retries when nobody answers.
    pub retry_interval: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            retries: 3000,
            retry_interval: Duration::from_secs(2),
        }
    }
}

/// Fetches the manifest `mcid` from connected peers. Returns it and the peer that sent it.
pub async fn manifest(
    engine: &Engine,
    mcid: Cid,
    cfg: FetchConfig,
    cancel: &CancellationToken,
) -> Result<(Manifest, PeerId)> {
    if mcid.kind() != CidKind::Manifest {
        return Err(Error::Invalid(format!(
            "{mcid} is not a manifest (dataset) CID"
        )));
    }
    let (tx, mut rx) = mpsc::channel(64);
    let _route = engine.route(mcid, tx);
    let ask = |peer: &PeerId| {
        engine.send(
            peer,
            Message::wants(vec![Entry::want(BlockAddress::Cid(mcid), WantType::Block)]),
        );
    };
    let mut asked = 0usize;
    for p in engine.peers() {
        ask(&p);
        asked += 1;
    }
    let mut rounds = 0u32;
    let mut tick = tokio::time::interval(cfg.retry_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Err(Error::Cancelled),
            _ = tick.tick() => {
                rounds += 1;
                if rounds > cfg.retries {
                    return Err(Error::Network(format!(
                        "no peer provides {mcid} (asked {asked} peers, {} retries)",
                        cfg.retries
                    )));
                }
                for p in engine.peers() {
                    ask(&p);
                    asked += 1;
                }
            }
            msg = rx.recv() => match msg {
                Some(Inbound::Delivery(peer, d)) if d.address == BlockAddress::Cid(mcid) => {
                    if !mcid.matches(&d.data) {
                        engine.penalise(&peer, "sent a manifest that does not match its CID");
                        continue;
                    }
                    match Manifest::decode(&d.data) {
                        Ok(m) => return Ok((m, peer)),
                        Err(e) => {
                            return Err(Error::Invalid(format!("{mcid} is not a manifest: {e}")))
                        }
                    }
                }
                Some(Inbound::PeerUp(peer)) => {
                    ask(&peer);
                    asked += 1;
                }
                Some(_) => {}
                None => return Err(Error::State("the network is stopped".into())),
            },
        }
    }
}

/// Progress of a dataset download, as subscribers see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FetchState {
    /// Every block below this index is stored (and servable).
    pub prefix: u64,
    /// Blocks stored.
    pub stored: u64,
    /// The whole dataset is stored.
    pub done: bool,
    /// Why the download failed, if it did.
    pub error: Option<String>,
}

/// A received block for the writer: who sent it, its index, CID, bytes and proof.
type ToWrite = (PeerId, u64, Cid, Bytes, Proof);

/// What the writer thread reports.
enum Written {
    /// A block was checked and written, or refused.
    Block {
        peer: PeerId,
        index: u64,
        result: Result<()>,
    },
    /// Metadata committed: blocks below `prefix` are servable; `stored` in all.
    Committed {
        prefix: u64,
        stored: u64,
        complete: bool,
    },
}

/// The node-wide budget of block bytes requested and not yet written ([`FETCH_BUDGET`]),
/// shared fairly by the downloads running at once.
#[derive(Debug)]
pub(crate) struct Budget {
    total: u64,
    state: std::sync::Mutex<BudgetState>,
}

#[derive(Debug)]
struct BudgetState {
    free: u64,
    downloads: u64,
}

impl Budget {
    /// A budget of `total` bytes.
    pub(crate) fn new(total: u64) -> Self {
        Self {
            total,
            state: std::sync::Mutex::new(BudgetState {
                free: total,
                downloads: 0,
            }),
        }
    }

    /// Joins the budget for one download.
    fn lease(self: &Arc<Self>) -> Lease {
        crate::store::lock(&self.state).downloads += 1;
        Lease {
            budget: Arc::clone(self),
            held: 0,
        }
    }
}

/// One download's part of the [`Budget`]; gives back what it holds when dropped.
#[derive(Debug)]
struct Lease {
    budget: Arc<Budget>,
    held: u64,
}

impl Lease {
    /// Takes `bytes` if the budget has them and this download stays within its share.
    fn take(&mut self, bytes: u64) -> bool {
        let mut st = crate::store::lock(&self.budget.state);
        let share = self.budget.total / st.downloads.max(1);
        // A download always gets one block, whatever its size or the share.
        let fits = self.held == 0 || self.held + bytes <= share;
        if fits && (st.free >= bytes || self.held == 0) {
            st.free = st.free.saturating_sub(bytes);
            self.held += bytes;
            true
        } else {
            false
        }
    }

    fn give(&mut self, bytes: u64) {
        let bytes = bytes.min(self.held);
        self.held -= bytes;
        let mut st = crate::store::lock(&self.budget.state);
        st.free = (st.free + bytes).min(self.budget.total);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut st = crate::store::lock(&self.budget.state);
        st.free = (st.free + self.held).min(self.budget.total);
        st.downloads = st.downloads.saturating_sub(1);
    }
}

/// Blocks neither held nor requested: those never asked for, walked in index order by a
/// cursor that skips the blocks held when the download started, and those to ask again.
/// One bit per block, whatever the size of the dataset.
struct Todo {
    held_at_start: Bits,
    /// Every block below it that was not held at the start has been handed out.
    next: u64,
    again: BTreeSet<u64>,
    left: u64,
}

impl Todo {
    fn new(held: &Bits, leaves: u64) -> Self {
        Self {
            next: held.next_absent(0).unwrap_or(leaves),
            left: leaves - held.count(),
            held_at_start: held.clone(),
            again: BTreeSet::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.left == 0
    }

    fn len(&self) -> u64 {
        self.left
    }

    /// The lowest block to do.
    fn first(&self) -> Option<u64> {
        let fresh = (self.next < self.held_at_start.len()).then_some(self.next);
        match (self.again.first(), fresh) {
            (Some(a), Some(f)) => Some((*a).min(f)),
            (a, f) => a.copied().or(f),
        }
    }

    /// Hands out the lowest block not in `refused`.
    fn take(&mut self, refused: &HashSet<u64>) -> Option<u64> {
        if let Some(i) = self.again.iter().find(|i| !refused.contains(i)).copied() {
            self.again.remove(&i);
            self.left -= 1;
            return Some(i);
        }
        let len = self.held_at_start.len();
        if self.next >= len {
            return None;
        }
        let i = self.next;
        self.next = self.held_at_start.next_absent(i + 1).unwrap_or(len);
        self.left -= 1;
        Some(i)
    }

    /// Puts a handed-out block back; false if it was to do already.
    fn put_back(&mut self, i: u64) -> bool {
        // Blocks ahead of the cursor or held from the start were never handed out.
        if i >= self.next || self.held_at_start.get(i) || !self.again.insert(i) {
            return false;
        }
        self.left += 1;
        true
    }
}

struct Flight {
    peer: PeerId,
    since: Instant,
}

#[derive(Default)]
struct Provider {
    inflight: usize,
    /// Blocks it said it does not have (asked again after a retry interval).
    refused: HashSet<u64>,
}

/// A dataset to download.
#[derive(Debug)]
pub struct DatasetJob {
    /// The block exchange to download through.
    pub engine: Engine,
    /// The dataset, registered in the store ([`Store::fill`]).
    pub fill: TreeFill,
    /// The dataset's manifest CID.
    pub mcid: Cid,
    /// A peer known to provide it (the one that sent the manifest).
    pub first: Option<PeerId>,
    /// Retry settings.
    pub cfg: FetchConfig,
}

/// Downloads a dataset into the store, publishing progress to `state`. Returns when the
/// dataset is complete, fails, or `cancel` fires.
pub async fn dataset(
    job: DatasetJob,
    state: watch::Sender<FetchState>,
    cancel: CancellationToken,
) -> Result<()> {
    let DatasetJob {
        engine,
        fill,
        mcid,
        first,
        cfg,
    } = job;
    let tree = *fill.tree_cid();
    let block_size = fill.block_size();
    let todo = Todo::new(fill.held(), fill.leaves());
    let stored = fill.leaves() - todo.len();
    let prefix = todo.first().unwrap_or(fill.leaves());
    state.send_replace(FetchState {
        prefix,
        stored,
        done: fill.is_complete(),
        error: None,
    });
    if fill.is_complete() {
        return Ok(());
    }
    let fill_leaves = fill.leaves();
    let (tx, mut inbound) = mpsc::channel(WRITE_QUEUE);
    let _route_tree = engine.route(tree, tx.clone());
    let _route_manifest = engine.route(mcid, tx);
    let (to_writer, writer_rx) = mpsc::channel(WRITE_QUEUE);
    let (writer_tx, mut written) = mpsc::channel(WRITE_QUEUE);
    let writer = std::thread::Builder::new()
        .name("codex-fetch-io".into())
        .spawn({
            let rt = tokio::runtime::Handle::current();
            move || write_blocks(fill, writer_rx, writer_tx, rt)
        })
        .map_err(|e| Error::io("starting a download writer", e))?;

    let mut s = Scheduler {
        engine: engine.clone(),
        mcid,
        tree,
        todo,
        lease: engine.budget().lease(),
        charged: Bits::new(fill_leaves),
        block_size,
        inflight: HashMap::new(),
        asked: HashMap::new(),
        providers: HashMap::new(),
        tries: HashMap::new(),
        retries: cfg.retries,
    };
    if let Some(p) = first {
        s.providers.entry(p).or_default();
    }
    for p in engine.peers() {
        s.probe(&p);
    }
    let mut idle_rounds = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut last_retry = Instant::now();
    // Blocks received and not yet handed to the writer. Reading from peers pauses while
    // any wait here, but the writer's reports are always read: neither side can block the
    // other. At most the window's worth of blocks is ever held.
    let mut backlog: std::collections::VecDeque<ToWrite> = std::collections::VecDeque::new();
    let result = loop {
        s.fill_window();
        tokio::select! {
            permit = to_writer.reserve(), if !backlog.is_empty() => match permit {
                Ok(permit) => {
                    if let Some(item) = backlog.pop_front() {
                        permit.send(item);
                    }
                }
                Err(_) => break Err(Error::State("the download writer stopped".into())),
            },
            _ = cancel.cancelled() => break Err(Error::Cancelled),
            _ = tick.tick() => {
                // Peer events can be missed when this download's queue is full: check.
                let connected: HashSet<PeerId> = engine.peers().into_iter().collect();
                let gone: Vec<PeerId> = s
                    .providers
                    .keys()
                    .filter(|p| !connected.contains(p))
                    .copied()
                    .collect();
                for p in gone {
                    s.peer_gone(&p);
                }
                if let Err(e) = s.expire() {
                    break Err(e);
                }
                if last_retry.elapsed() >= cfg.retry_interval {
                    last_retry = Instant::now();
                    for p in s.providers.values_mut() {
                        p.refused.clear();
                    }
                    if s.providers.is_empty() {
                        idle_rounds += 1;
                        if idle_rounds > cfg.retries {
                            break Err(Error::Network(format!(
                                "no connected peer provides {mcid} ({} retries)",
                                cfg.retries
                            )));
                        }
                    } else {
                        idle_rounds = 0;
                    }
                    // Peers that are not providers yet are asked again: their answer or
                    // the news of their arrival may have been missed, or they may have
                    // got the dataset since.
                    for p in engine.peers() {
                        if !s.providers.contains_key(&p) {
                            s.probe(&p);
                        }
                    }
                }
            }
            msg = inbound.recv(), if backlog.is_empty() => match msg {
                Some(Inbound::Delivery(peer, d)) => {
                    let BlockAddress::Leaf { tree: t, index } = d.address else { continue };
                    if t != tree {
                        continue;
                    }
                    if !s.asked.get(&index).is_some_and(|a| a.contains(&peer)) {
                        engine.unrequested(&peer);
                        continue;
                    }
                    s.arrived(index);
                    let Some(proof) = d.proof else {
                        engine.penalise(&peer, "sent a leaf block without a proof");
                        s.lost_peer(&peer, index);
                        continue;
                    };
                    backlog.push_back((peer, index, d.cid, d.data, proof));
                }
                Some(Inbound::Presence(peer, p)) => s.presence(peer, p.address, p.have),
                Some(Inbound::PeerUp(peer)) => s.probe(&peer),
                Some(Inbound::PeerDown(peer)) => s.peer_gone(&peer),
                None => break Err(Error::State("the network is stopped".into())),
            },
            w = written.recv() => match w {
                Some(Written::Block { peer, index, result }) => match result {
                    Ok(()) => {
                        s.asked.remove(&index);
                        s.tries.remove(&index);
                        s.release(index);
                    }
                    Err(Error::Corrupt { detail, .. }) => {
                        engine.penalise(&peer, &detail);
                        s.lost_peer(&peer, index);
                    }
                    Err(e) => break Err(e),
                },
                Some(Written::Committed { prefix, stored, complete }) => {
                    state.send_modify(|st| {
                        st.prefix = prefix;
                        st.stored = stored;
                    });
                    if complete {
                        break Ok(());
                    }
                }
                None => break Err(Error::State("the download writer stopped".into())),
            },
        }
    };
    s.cancel_all();
    drop(to_writer);
    // The writer commits what it has and reports how it ended.
    let joined = tokio::task::spawn_blocking(move || writer.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!(%mcid, "the download writer panicked");
    }
    state.send_modify(|st| match &result {
        Ok(()) => {
            st.done = true;
            st.prefix = u64::MAX;
        }
        Err(e) => st.error = Some(e.to_string()),
    });
    result
}

struct Scheduler {
    engine: Engine,
    mcid: Cid,
    tree: Cid,
    /// Blocks neither held nor requested.
    todo: Todo,
    /// This download's part of the node's budget of block bytes in memory.
    lease: Lease,
    /// Blocks charged to the lease: handed out and not yet written (or put back).
    charged: Bits,
    block_size: u64,
    inflight: HashMap<u64, Flight>,
    /// Peers each outstanding block was asked of (late answers from them are accepted).
    asked: HashMap<u64, Vec<PeerId>>,
    providers: HashMap<PeerId, Provider>,
    tries: HashMap<u64, u32>,
    retries: u32,
}

impl Scheduler {
    fn probe(&self, peer: &PeerId) {
        self.engine.send(
            peer,
            Message::wants(vec![Entry::want(
                BlockAddress::Cid(self.mcid),
                WantType::Have,
            )]),
        );
    }

    fn presence(&mut self, peer: PeerId, address: BlockAddress, have: bool) {
        match address {
            BlockAddress::Cid(c) if c == self.mcid && have => {
                self.providers.entry(peer).or_default();
            }
            BlockAddress::Leaf { tree, index }
                if tree == self.tree
                    && !have
                    && self.inflight.get(&index).is_some_and(|f| f.peer == peer) =>
            {
                self.undo(index);
                if let Some(p) = self.providers.get_mut(&peer) {
                    p.refused.insert(index);
                }
            }
            _ => {}
        }
    }

    /// Requests blocks, in index order, spread over the providers with room.
    fn fill_window(&mut self) {
        if self.todo.is_empty() || self.providers.is_empty() {
            return;
        }
        let mut batches: HashMap<PeerId, Vec<Entry>> = HashMap::new();
        let mut peers: Vec<PeerId> = self.providers.keys().copied().collect();
        peers.sort_by_key(|p| self.providers[p].inflight);
        let mut progress = true;
        while progress && self.inflight.len() < WINDOW && !self.todo.is_empty() {
            progress = false;
            for peer in &peers {
                if self.inflight.len() >= WINDOW {
                    break;
                }
                let Some(p) = self.providers.get_mut(peer) else {
                    continue;
                };
                // Topped up in batches: a provider gets more once half its share came in.
                let topping_up = batches.contains_key(peer);
                if p.inflight >= PER_PEER || (p.inflight > PER_PEER / 2 && !topping_up) {
                    continue;
                }
                if !self.lease.take(self.block_size) {
                    break;
                }
                let Some(index) = self.todo.take(&p.refused) else {
                    self.lease.give(self.block_size);
                    continue;
                };
                self.charged.set(index, true);
                p.inflight += 1;
                self.inflight.insert(
                    index,
                    Flight {
                        peer: *peer,
                        since: Instant::now(),
                    },
                );
                self.asked.entry(index).or_default().push(*peer);
                batches.entry(*peer).or_default().push(Entry::want(
                    BlockAddress::Leaf {
                        tree: self.tree,
                        index,
                    },
                    WantType::Block,
                ));
                progress = true;
            }
        }
        for (peer, entries) in batches {
            let indices: Vec<u64> = entries
                .iter()
                .filter_map(|e| match e.address {
                    BlockAddress::Leaf { index, .. } => Some(index),
                    BlockAddress::Cid(_) => None,
                })
                .collect();
            if !self.engine.send(&peer, Message::wants(entries)) {
                // Queue full or peer gone: put the blocks back for the next round.
                for index in indices {
                    self.undo(index);
                }
            }
        }
    }

    /// An outstanding request goes back to be asked again.
    fn undo(&mut self, index: u64) {
        if self.arrived(index) {
            self.put_back(index);
        }
    }

    /// A handed-out block goes back to be asked again, and gives back its budget.
    fn put_back(&mut self, index: u64) {
        self.todo.put_back(index);
        self.release(index);
    }

    /// Gives back the budget a block holds (it was written, or put back).
    fn release(&mut self, index: u64) {
        if self.charged.get(index) {
            self.charged.set(index, false);
            self.lease.give(self.block_size);
        }
    }

    /// Ends the request for block `index`; false when none was outstanding.
    fn arrived(&mut self, index: u64) -> bool {
        let Some(f) = self.inflight.remove(&index) else {
            return false;
        };
        if let Some(p) = self.providers.get_mut(&f.peer) {
            p.inflight = p.inflight.saturating_sub(1);
        }
        true
    }

    /// A block from `peer` was bad: it goes back to be asked of someone else.
    fn lost_peer(&mut self, peer: &PeerId, index: u64) {
        self.peer_gone(peer);
        if let Some(a) = self.asked.get_mut(&index) {
            a.retain(|p| p != peer);
        }
        self.put_back(index);
    }

    fn peer_gone(&mut self, peer: &PeerId) {
        self.providers.remove(peer);
        let lost: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.peer == *peer)
            .map(|(i, _)| *i)
            .collect();
        for i in lost {
            self.inflight.remove(&i);
            self.put_back(i);
        }
    }

    /// Requests that took too long go back to be asked again, of the least busy provider.
    fn expire(&mut self) -> Result<()> {
        let now = Instant::now();
        let late: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, f)| now.duration_since(f.since) >= REQUEST_TIMEOUT)
            .map(|(i, _)| *i)
            .collect();
        for index in late {
            self.undo(index);
            let tries = self.tries.entry(index).or_default();
            *tries += 1;
            if *tries > self.retries {
                return Err(Error::Network(format!(
                    "block {index} of {} not received after {} retries",
                    self.mcid, self.retries
                )));
            }
        }
        Ok(())
    }

    /// Tells providers the outstanding requests are no longer wanted.
    fn cancel_all(&mut self) {
        let mut by_peer: HashMap<PeerId, Vec<Entry>> = HashMap::new();
        for (index, f) in self.inflight.drain() {
            let mut e = Entry::want(
                BlockAddress::Leaf {
                    tree: self.tree,
                    index,
                },
                WantType::Block,
            );
            e.cancel = true;
            e.send_dont_have = false;
            by_peer.entry(f.peer).or_default().push(e);
        }
        for (peer, entries) in by_peer {
            self.engine.send(&peer, Message::wants(entries));
        }
    }
}

/// The writer thread: checks each block against its CID and proof, stores it, and commits
/// in batches: every `FLUSH_EVERY` blocks while they stream in, and once no block has come
/// for [`COMMIT_DELAY`] since the first uncommitted one, or the last block is in.
fn write_blocks(
    mut fill: TreeFill,
    mut rx: mpsc::Receiver<ToWrite>,
    tx: mpsc::Sender<Written>,
    rt: tokio::runtime::Handle,
) {
    let mut stored = (0..fill.leaves()).filter(|i| fill.has(*i)).count() as u64;
    let mut prefix = 0u64;
    // When the oldest block not yet committed was stored.
    let mut dirty: Option<Instant> = None;
    loop {
        let next = match rx.try_recv() {
            Ok(item) => Some(item),
            Err(mpsc::error::TryRecvError::Empty) => {
                let left = match dirty {
                    None => None,
                    Some(_) if stored == fill.leaves() => Some(Duration::ZERO),
                    Some(since) => Some(COMMIT_DELAY.saturating_sub(since.elapsed())),
                };
                let waited = match left {
                    None => Some(rx.blocking_recv()),
                    Some(left) if left.is_zero() => None,
                    // Timers only fire while the runtime runs; its shutdown drops the
                    // download, whose sender's going ends the wait first.
                    Some(left) => rt
                        .block_on(async { tokio::time::timeout(left, rx.recv()).await })
                        .ok(),
                };
                match waited {
                    Some(item) => item,
                    None => {
                        dirty = None;
                        if !commit(&mut fill, &mut prefix, stored, &tx) || fill.is_complete() {
                            return;
                        }
                        continue;
                    }
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        let Some((peer, index, cid, data, proof)) = next else {
            if dirty.is_some() {
                commit(&mut fill, &mut prefix, stored, &tx);
            }
            return;
        };
        let digest: Digest32 = Sha256::digest(&data).into();
        let result = if cid.kind() != CidKind::Block || cid.digest() != digest {
            Err(Error::Corrupt {
                cid: cid.to_string(),
                detail: format!("block {index} does not hash to its CID"),
            })
        } else if fill.has(index) {
            Ok(())
        } else {
            fill.put(index, &data, digest, &proof).map(|()| {
                stored += 1;
                dirty.get_or_insert_with(Instant::now);
            })
        };
        if tx
            .blocking_send(Written::Block {
                peer,
                index,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

fn commit(fill: &mut TreeFill, prefix: &mut u64, stored: u64, tx: &mpsc::Sender<Written>) -> bool {
    if let Err(e) = fill.flush() {
        tracing::warn!(tree = %fill.tree_cid(), error = %e, "could not commit received blocks");
        return false;
    }
    while *prefix < fill.leaves() && fill.has(*prefix) {
        *prefix += 1;
    }
    tx.blocking_send(Written::Committed {
        prefix: *prefix,
        stored,
        complete: fill.is_complete(),
    })
    .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, StoreConfig};

    #[test]
    fn the_writer_commits_when_blocks_stop_coming_and_at_the_last_block() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let open = |dir: &std::path::Path| {
            Arc::new(
                Store::open(&StoreConfig {
                    data_dir: dir.to_path_buf(),
                    quota: 1 << 20,
                    ttl: None,
                })
                .unwrap(),
            )
        };
        let (sa, sb) = (open(a.path()), open(b.path()));
        let bytes: Vec<u8> = (0..5 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut w = sa.writer(1024, None, None).unwrap();
        w.write(&bytes).unwrap();
        let (mcid, manifest) = w.finish().unwrap();
        let tree = manifest.tree_cid;
        let fill = sb.fill(&mcid, &manifest).unwrap();
        let (to_writer, rx) = mpsc::channel(8);
        let (tx, mut written) = mpsc::channel(64);
        let writer = std::thread::spawn({
            let rt = rt.handle().clone();
            move || write_blocks(fill, rx, tx, rt)
        });
        let peer = PeerId::random();
        let send = |i: u64| {
            let (block, proof) = sa.leaf(&tree, i).unwrap();
            let cid = Cid::hash_of(CidKind::Block, &block);
            to_writer
                .blocking_send((peer, i, cid, block, proof))
                .unwrap();
        };
        // Two blocks, then nothing: they are committed without waiting for more.
        send(0);
        send(1);
        let mut stored = Vec::new();
        let committed = loop {
            match written.blocking_recv().unwrap() {
                Written::Block { index, result, .. } => {
                    result.unwrap();
                    stored.push(index);
                }
                Written::Committed {
                    prefix,
                    stored,
                    complete,
                } => break (prefix, stored, complete),
            }
        };
        assert_eq!((stored, committed), (vec![0, 1], (2, 2, false)));
        // Committed blocks are served to others.
        assert_eq!(sb.leaf(&tree, 1).unwrap().0, &bytes[1024..2048]);
        // The last block completes the tree at once.
        for i in 2..5 {
            send(i);
        }
        let last = loop {
            if let Written::Committed {
                prefix,
                stored,
                complete,
            } = written.blocking_recv().unwrap()
            {
                if complete {
                    break (prefix, stored);
                }
            }
        };
        assert_eq!(last, (5, 5));
        writer.join().unwrap();
        drop(to_writer);
        assert_eq!(sb.leaf(&tree, 4).unwrap().0, &bytes[4096..]);
    }

    #[test]
    fn todo_walks_missing_blocks_in_order_and_takes_back_handed_out_ones() {
        let mut held = Bits::new(7);
        held.set(1, true);
        held.set(3, true);
        let mut todo = Todo::new(&held, 7);
        assert_eq!((todo.len(), todo.first()), (5, Some(0)));
        let none = HashSet::new();
        assert_eq!(todo.take(&none), Some(0));
        assert_eq!(todo.take(&none), Some(2));
        assert_eq!(todo.first(), Some(4));
        // A block still ahead of the cursor, or held from the start, is not put back twice.
        assert!(!todo.put_back(5) && !todo.put_back(1));
        assert!(todo.put_back(2) && !todo.put_back(2));
        assert_eq!((todo.len(), todo.first()), (4, Some(2)));
        // A block a provider refused goes to another one, or waits.
        let refused: HashSet<u64> = [2].into();
        assert_eq!(todo.take(&refused), Some(4));
        assert_eq!(todo.take(&none), Some(2));
        assert_eq!(todo.take(&none), Some(5));
        assert_eq!(todo.take(&none), Some(6));
        assert_eq!((todo.take(&none), todo.is_empty()), (None, true));
    }

    #[test]
    fn downloads_share_the_budget() {
        let budget = Arc::new(Budget::new(4));
        let mut a = budget.lease();
        assert!((0..4).all(|_| a.take(1)) && !a.take(1));
        // A second download gets a block at once, and half the budget as the first gives
        // back what it holds beyond its new share.
        let mut b = budget.lease();
        assert!(b.take(1) && !b.take(1));
        a.give(2);
        assert!(!a.take(1), "the first download is at its share");
        assert!(b.take(1) && !b.take(1));
        drop(a);
        assert!(b.take(1) && b.take(1) && !b.take(1));
        drop(b);
        let mut c = budget.lease();
        assert!((0..4).all(|_| c.take(1)) && !c.take(1));
    }
}
