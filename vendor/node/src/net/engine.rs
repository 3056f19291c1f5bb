//! The block exchange engine: serves stored blocks to peers and routes what peers send to
//! the downloads that asked for it.
//!
//! Per connected peer there is one outbound stream (opened when there is first something to
//! send, reopened after errors), one task reading each inbound stream continuously, and one
//! server task answering the peer's want lists in order. Every queue is bounded; a peer that
//! floods its queue loses the excess, never the node's memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::{PeerId, StreamProtocol};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::frames::FramePool;
use super::host::{Host, PeerEvent};
use super::message::{
    read_message_within, write_frame, BlockAddress, Delivery, DeliveryFrame, Entry, Frame, Message,
    Presence, WantType, MAX_MESSAGE,
};
use super::serving::{Charge, ServeBudget};
use crate::cid::Cid;
use crate::error::Error;
use crate::store::{lock, LeafRef, Store};

/// The block exchange protocol.
pub const BLOCKEXC: StreamProtocol = StreamProtocol::new("/codex/blockexc/1.0.0");

/// Most blocks per delivery message (as the reference sends them).
const DELIVERY_BLOCKS: usize = 20;

/// Most payload bytes per delivery message.
const DELIVERY_BYTES: usize = 4 << 20;

/// Messages queued for one peer's outbound stream.
const OUT_QUEUE: usize = 8;

/// Block bytes the node may hold read for peers and not yet written to their streams,
/// whatever the number of peers: 32 MiB.
const SERVE_BUDGET: u64 = 32 << 20;

/// The part of [`SERVE_BUDGET`] one peer may hold: 8 MiB, six delivery messages of 64 KiB
/// blocks, so its stream stays busy while the next ones are read. Peers served at once
/// split the node's budget evenly below this.
const PEER_SERVE: u64 = 8 << 20;

/// How long writing one frame to a peer may take before its stream is dropped, so a
/// peer that stops reading cannot hold its part of the serving budget forever.
const WRITE_TIME: Duration = Duration::from_secs(120);

/// Most want entries queued for one peer; beyond this its wants are dropped.
const MAX_QUEUED: usize = 1 << 16;

/// Entries answered per trip to the blocking pool.
const SERVE_BATCH: usize = 256;

/// How long a peer that sent bad data stays banned.
const BAN: Duration = Duration::from_secs(600);

/// Most inbound block exchange streams one peer may hold open (the protocol needs one).
const MAX_INBOUND: usize = 4;

/// How long a frame may take to arrive once it has started (a 100 MiB frame at under
/// 1 MB/s is not a peer worth waiting for).
const FRAME_TIME: Duration = Duration::from_secs(120);

/// Blocks a peer may send that no download asked for (late answers to cancelled requests
/// are normal) before it is dropped as a flooder.
const MAX_UNREQUESTED: u32 = 4096;

/// Something a peer sent that a download asked for, or a change in the peers.
#[derive(Debug)]
pub enum Inbound {
    /// A block.
    Delivery(PeerId, Delivery),
    /// Whether the peer has a block.
    Presence(PeerId, Presence),
    /// A peer connected.
    PeerUp(PeerId),
    /// A peer went away.
    PeerDown(PeerId),
}

struct Peer {
    out: mpsc::Sender<Outbound>,
    wants: Arc<Wants>,
    /// Blocks received that no download wanted.
    unrequested: u32,
}

/// A message for a peer, encoded, with the serving budget its blocks hold until it is
/// written.
struct Outbound {
    frame: Frame,
    _charge: Option<Charge>,
}

/// A peer's want entries not answered yet, in arrival order. Cancels remove entries still
/// queued, so a cancelled block is not sent.
#[derive(Default)]
struct Wants {
    queue: Mutex<std::collections::VecDeque<Entry>>,
    wake: tokio::sync::Notify,
}

struct Shared {
    store: Arc<Store>,
    host: Arc<Host>,
    peers: Mutex<HashMap<PeerId, Peer>>,
    /// Downloads by the CID their blocks are addressed by (tree or manifest CID).
    routes: Mutex<HashMap<Cid, Vec<mpsc::Sender<Inbound>>>>,
    banned: Mutex<HashMap<PeerId, Instant>>,
    /// Inbound streams open per peer.
    inbound: Mutex<HashMap<PeerId, usize>>,
    /// Block bytes all downloads may have asked for and not yet written.
    budget: Arc<super::fetch::Budget>,
    /// Buffers for the frames read and written.
    frames: Arc<FramePool>,
    /// Block bytes read for peers and not yet written to their streams.
    serving: Arc<ServeBudget>,
    stop: CancellationToken,
}

/// The block exchange of one node. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Unregisters a download's route when dropped.
pub struct Route {
    engine: Engine,
    key: Cid,
    tx: mpsc::Sender<Inbound>,
}

impl Drop for Route {
    fn drop(&mut self) {
        let mut routes = lock(&self.engine.shared.routes);
        if let Some(list) = routes.get_mut(&self.key) {
            list.retain(|t| !t.same_channel(&self.tx));
            if list.is_empty() {
                routes.remove(&self.key);
            }
        }
    }
}

impl Engine {
    /// The budget of block bytes the node's downloads share.
    pub(crate) fn budget(&self) -> &Arc<super::fetch::Budget> {
        &self.shared.budget
    }

    /// Starts serving `store` over `host`. `events` are the host's peer events.
    pub fn start(
        store: Arc<Store>,
        host: Arc<Host>,
        mut events: mpsc::Receiver<PeerEvent>,
    ) -> crate::Result<Self> {
        let mut incoming = host
            .control()
            .accept(BLOCKEXC)
            .map_err(|_| Error::State("the block exchange is already running".into()))?;
        let engine = Self {
            shared: Arc::new(Shared {
                store,
                host,
                peers: Mutex::new(HashMap::new()),
                routes: Mutex::new(HashMap::new()),
                banned: Mutex::new(HashMap::new()),
                inbound: Mutex::new(HashMap::new()),
                budget: Arc::new(super::fetch::Budget::new(super::fetch::FETCH_BUDGET)),
                frames: FramePool::new(),
                serving: ServeBudget::new(SERVE_BUDGET, PEER_SERVE),
                stop: CancellationToken::new(),
            }),
        };
        let stop = engine.shared.stop.clone();
        let e = engine.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    next = incoming.next() => match next {
                        Some((peer, stream)) => {
                            if e.is_banned(&peer) {
                                continue;
                            }
                            let Some(guard) = InboundGuard::new(&e, peer) else {
                                tracing::debug!(%peer, "too many inbound streams; refused one");
                                continue;
                            };
                            tokio::spawn(e.clone().read(peer, stream, guard));
                        }
                        None => break,
                    },
                    event = events.recv() => match event {
                        Some(PeerEvent::Connected(peer)) => e.peer_up(peer),
                        Some(PeerEvent::Disconnected(peer)) => e.peer_down(peer),
                        None => break,
                    },
                }
            }
        });
        Ok(engine)
    }

    /// Stops the engine's tasks.
    pub fn stop(&self) {
        self.shared.stop.cancel();
        lock(&self.shared.peers).clear();
    }

    /// Peers connected now.
    pub fn peers(&self) -> Vec<PeerId> {
        lock(&self.shared.peers).keys().copied().collect()
    }

    /// Registers a download for messages about blocks addressed by `key`.
    pub fn route(&self, key: Cid, tx: mpsc::Sender<Inbound>) -> Route {
        lock(&self.shared.routes)
            .entry(key)
            .or_default()
            .push(tx.clone());
        Route {
            engine: self.clone(),
            key,
            tx,
        }
    }

    /// Queues `msg` for `peer`. Returns false when the peer is gone or its queue is full.
    pub fn send(&self, peer: &PeerId, msg: Message) -> bool {
        let out = lock(&self.shared.peers).get(peer).map(|p| p.out.clone());
        let Some(out) = out else { return false };
        // Want lists and presences are small: a buffer of their own size, not a pooled one
        // sized for blocks, which the queue would hold as long as the message waits.
        let frame = match Frame::encode(&msg, Vec::new()) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "cannot send a block exchange message");
                return false;
            }
        };
        out.try_send(Outbound {
            frame,
            _charge: None,
        })
        .is_ok()
    }

    /// Drops a peer that sent bad data: disconnects it and refuses it for a while.
    pub fn penalise(&self, peer: &PeerId, why: &str) {
        tracing::warn!(%peer, why, "dropping misbehaving peer");
        lock(&self.shared.banned).insert(*peer, Instant::now() + BAN);
        self.shared.host.disconnect(*peer);
        self.peer_down(*peer);
    }

    /// Drops a block from `peer` that nobody asked it for. A few are normal (answers to
    /// requests cancelled meanwhile); a peer that keeps sending them is dropped, and then
    /// this returns true.
    pub fn unrequested(&self, peer: &PeerId) -> bool {
        tracing::trace!(%peer, "unrequested block dropped");
        let count = lock(&self.shared.peers).get_mut(peer).map_or(0, |p| {
            p.unrequested += 1;
            p.unrequested
        });
        if count > MAX_UNREQUESTED {
            self.penalise(peer, "sends blocks nobody asked for");
            return true;
        }
        false
    }

    fn is_banned(&self, peer: &PeerId) -> bool {
        let mut banned = lock(&self.shared.banned);
        match banned.get(peer) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                banned.remove(peer);
                false
            }
            None => false,
        }
    }

    fn peer_up(&self, peer: PeerId) {
        if self.is_banned(&peer) {
            self.shared.host.disconnect(peer);
            return;
        }
        let (out, out_rx) = mpsc::channel(OUT_QUEUE);
        let wants = Arc::new(Wants::default());
        lock(&self.shared.peers).insert(
            peer,
            Peer {
                out,
                wants: Arc::clone(&wants),
                unrequested: 0,
            },
        );
        tokio::spawn(self.clone().write(peer, out_rx));
        tokio::spawn(self.clone().serve(peer, wants));
        self.broadcast(|| Inbound::PeerUp(peer));
    }

    fn peer_down(&self, peer: PeerId) {
        if lock(&self.shared.peers).remove(&peer).is_some() {
            self.broadcast(|| Inbound::PeerDown(peer));
        }
    }

    fn broadcast(&self, event: impl Fn() -> Inbound) {
        let routes: Vec<mpsc::Sender<Inbound>> = lock(&self.shared.routes)
            .values()
            .flatten()
            .cloned()
            .collect();
        for r in routes {
            // A download too busy to hear about a peer finds out at its next timeout.
            let _ = r.try_send(event());
        }
    }

    /// The downloads interested in blocks at `address`.
    fn routes_for(&self, address: &BlockAddress) -> Vec<mpsc::Sender<Inbound>> {
        let key = match address {
            BlockAddress::Leaf { tree, .. } => tree,
            BlockAddress::Cid(cid) => cid,
        };
        lock(&self.shared.routes)
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// Reads one inbound stream of `peer` until it ends, acting on every message.
    async fn read(self, peer: PeerId, mut stream: libp2p::Stream, _guard: InboundGuard) {
        loop {
            let msg = tokio::select! {
                _ = self.shared.stop.cancelled() => return,
                m = read_message_within(&mut stream, MAX_MESSAGE, FRAME_TIME, &self.shared.frames) => m,
            };
            match msg {
                Ok(Some(msg)) => self.handle(peer, msg).await,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "block exchange stream ended");
                    return;
                }
            }
        }
    }

    async fn handle(&self, peer: PeerId, msg: Message) {
        let Message {
            wantlist,
            deliveries,
            presences,
        } = msg;
        if !wantlist.entries.is_empty() {
            let wants = lock(&self.shared.peers)
                .get(&peer)
                .map(|p| Arc::clone(&p.wants));
            if let Some(wants) = wants {
                let mut queue = lock(&wants.queue);
                for e in wantlist.entries {
                    if e.cancel {
                        queue.retain(|q| q.address != e.address);
                    } else if queue.len() < MAX_QUEUED {
                        queue.push_back(e);
                    } else {
                        tracing::debug!(%peer, "too many wants queued; dropping");
                        break;
                    }
                }
                drop(queue);
                wants.wake.notify_one();
            }
        }
        for p in presences {
            for r in self.routes_for(&p.address) {
                let _ = r.send(Inbound::Presence(peer, p.clone())).await;
            }
        }
        for d in deliveries {
            let routes = self.routes_for(&d.address);
            if routes.is_empty() {
                if self.unrequested(&peer) {
                    return;
                }
                continue;
            }
            let last = routes.len().saturating_sub(1);
            let mut d = Some(d);
            for (i, r) in routes.into_iter().enumerate() {
                let item = if i == last { d.take() } else { d.clone() };
                if let Some(item) = item {
                    // Backpressure: a download that cannot keep up slows this peer down.
                    let _ = r.send(Inbound::Delivery(peer, item)).await;
                }
            }
        }
    }

    /// Sends queued messages to `peer` on this node's own outbound stream.
    async fn write(self, peer: PeerId, mut rx: mpsc::Receiver<Outbound>) {
        let mut control = self.shared.host.control();
        let mut stream: Option<libp2p::Stream> = None;
        // The message's serving budget is given back when `_charge` drops after this turn.
        while let Some(Outbound { frame, _charge }) = rx.recv().await {
            for attempt in 0..2 {
                if stream.is_none() {
                    match control.open_stream(peer, BLOCKEXC).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "cannot open block exchange stream");
                            continue;
                        }
                    }
                }
                let Some(s) = stream.as_mut() else { continue };
                let written = tokio::time::timeout(WRITE_TIME, write_frame(s, frame.bytes()))
                    .await
                    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
                match written {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::debug!(%peer, attempt, error = %e, "block exchange write failed");
                        stream = None;
                    }
                }
            }
            self.shared.frames.put(frame.into_buf());
        }
    }

    /// Whether blocks are still worth reading for `peer`: it is connected and the node runs.
    fn serving(&self, peer: &PeerId) -> bool {
        !self.shared.stop.is_cancelled() && lock(&self.shared.peers).contains_key(peer)
    }

    /// Answers `peer`'s wants in order. Blocks are read on the blocking pool; what waits on
    /// the peer (room in its send queue, its share of the serving budget) waits here, as a
    /// task: a pool thread held by a peer that stopped reading would be one that other
    /// peers and the node's own storage calls could not have.
    async fn serve(self, peer: PeerId, wants: Arc<Wants>) {
        loop {
            let entries: Vec<Entry> = {
                let mut queue = lock(&wants.queue);
                let n = queue.len().min(SERVE_BATCH);
                queue.drain(..n).collect()
            };
            if entries.is_empty() {
                tokio::select! {
                    _ = self.shared.stop.cancelled() => return,
                    _ = wants.wake.notified() => continue,
                }
            }
            let out = lock(&self.shared.peers).get(&peer).map(|p| p.out.clone());
            let Some(out) = out else { return };
            if !self.answer(peer, &out, entries).await {
                return;
            }
        }
    }

    /// Answers one want list of `peer`; false once the peer is gone or the node stops.
    async fn answer(
        &self,
        peer: PeerId,
        out: &mpsc::Sender<Outbound>,
        entries: Vec<Entry>,
    ) -> bool {
        let mut job = Answer::new(entries, self.shared.frames.get());
        loop {
            if !self.serving(&peer) {
                return false;
            }
            let engine = self.clone();
            let stepped = tokio::task::spawn_blocking(move || {
                let shared = &engine.shared;
                let wait = job.step(&shared.store, &shared.frames, &shared.serving, peer);
                (job, wait)
            })
            .await;
            let Ok((back, wait)) = stepped else {
                return false;
            };
            job = back;
            let went_on = match wait {
                Wait::Done => {
                    job.finish(&self.shared.frames);
                    return true;
                }
                Wait::Send(message) => tokio::select! {
                    _ = self.shared.stop.cancelled() => false,
                    sent = out.send(message) => sent.is_ok(),
                },
                Wait::Budget(bytes) => {
                    let budget = &self.shared.serving;
                    let taken = budget.take(peer, bytes, || self.serving(&peer)).await;
                    job.granted = taken;
                    job.granted.is_some()
                }
            };
            if !went_on {
                return false;
            }
        }
    }
}

/// Counts one inbound stream of a peer while it is open.
struct InboundGuard {
    engine: Engine,
    peer: PeerId,
}

impl InboundGuard {
    /// `None` when `peer` already has [`MAX_INBOUND`] streams open.
    fn new(engine: &Engine, peer: PeerId) -> Option<Self> {
        let mut inbound = lock(&engine.shared.inbound);
        let n = inbound.entry(peer).or_default();
        if *n >= MAX_INBOUND {
            return None;
        }
        *n += 1;
        Some(Self {
            engine: engine.clone(),
            peer,
        })
    }
}

impl Drop for InboundGuard {
    fn drop(&mut self) {
        let mut inbound = lock(&self.engine.shared.inbound);
        if let Some(n) = inbound.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                inbound.remove(&self.peer);
            }
        }
    }
}

/// A block found for a want, not read yet when it is a tree's.
enum Found {
    Leaf(LeafRef),
    Whole(Delivery),
}

impl Found {
    fn size(&self) -> u64 {
        match self {
            Found::Leaf(r) => r.size() as u64,
            Found::Whole(d) => d.data.len() as u64,
        }
    }
}

/// Why a step of an [`Answer`] stopped.
enum Wait {
    /// The want list is answered.
    Done,
    /// A message to queue for the peer before going on.
    Send(Outbound),
    /// Bytes of the serving budget to wait for before going on.
    Budget(u64),
}

/// One want list being answered: presences for WantHave, blocks for WantBlock. Every block
/// takes its size from the serving budget before it is read, until its message is written;
/// when the budget is spent, what is ready goes out first and the next read waits. Blocks
/// of trees are read from the store straight into the message's frame.
///
/// It works in steps on the blocking pool, each ending where something must wait on the
/// peer (see [`Wait`]); the waiting is done between steps, off the pool.
struct Answer {
    entries: std::vec::IntoIter<Entry>,
    /// Addresses cancelled later in the same list: not answered.
    cancelled: Vec<BlockAddress>,
    frame: DeliveryFrame,
    /// The serving budget the blocks in `frame` hold.
    charge: Option<Charge>,
    /// A block found whose budget was not free, with the want it answers.
    pending: Option<(Entry, Found)>,
    /// Budget granted by a wait, for the pending block.
    granted: Option<Charge>,
}

impl Answer {
    fn new(entries: Vec<Entry>, buf: Vec<u8>) -> Self {
        let cancelled = entries
            .iter()
            .filter(|e| e.cancel)
            .map(|e| e.address)
            .collect();
        Self {
            entries: entries.into_iter(),
            cancelled,
            frame: DeliveryFrame::new(buf),
            charge: None,
            pending: None,
            granted: None,
        }
    }

    /// Answers entries until a message is full, the budget is spent or the list is done.
    fn step(
        &mut self,
        store: &Store,
        frames: &FramePool,
        budget: &Arc<ServeBudget>,
        peer: PeerId,
    ) -> Wait {
        loop {
            if let Some((e, found)) = self.pending.take() {
                let size = found.size();
                let Some(taken) = self.granted.take().or_else(|| budget.try_take(peer, size))
                else {
                    self.pending = Some((e, found));
                    // Blocks in hand would wait outside the budget: they go out first.
                    let sent = self.flush(|| frames.get());
                    return sent.map_or(Wait::Budget(size), Wait::Send);
                };
                if !self.add(store, &e.address, found, taken) && e.send_dont_have {
                    self.dont_have(e.address);
                }
            } else if let Some(e) = self.entries.next() {
                if e.cancel || self.cancelled.contains(&e.address) {
                    continue;
                }
                match e.want_type {
                    WantType::Have => {
                        let have = holds(store, &e.address);
                        if have || e.send_dont_have {
                            self.frame.presence(Presence {
                                address: e.address,
                                have,
                            });
                        }
                    }
                    WantType::Block => match find(store, &e.address) {
                        Some(found) => {
                            self.pending = Some((e, found));
                            continue;
                        }
                        None if e.send_dont_have => self.dont_have(e.address),
                        None => {}
                    },
                }
            } else {
                // The list's last message: no pooled buffer is taken for a next one.
                return self.flush(Vec::new).map_or(Wait::Done, Wait::Send);
            }
            let full =
                self.frame.blocks() >= DELIVERY_BLOCKS || self.frame.data_bytes() >= DELIVERY_BYTES;
            if full {
                if let Some(message) = self.flush(|| frames.get()) {
                    return Wait::Send(message);
                }
            }
        }
    }

    fn dont_have(&mut self, address: BlockAddress) {
        self.frame.presence(Presence {
            address,
            have: false,
        });
    }

    /// Reads `found` into the message with the budget `taken` for it; false when it cannot
    /// be read (the budget goes back).
    fn add(&mut self, store: &Store, address: &BlockAddress, found: Found, taken: Charge) -> bool {
        let read = match found {
            Found::Whole(d) => {
                self.frame.push(&d);
                Ok(())
            }
            Found::Leaf(r) => self
                .frame
                .push_with(&r.cid(), address, &r.proof, r.size(), |buf| {
                    store.serve_leaf_into(&r, buf)
                }),
        };
        if let Err(e) = read {
            unreadable(address, &e);
            return false;
        }
        match &mut self.charge {
            Some(c) => c.absorb(taken),
            None => self.charge = Some(taken),
        }
        true
    }

    /// The message the frame holds, with the budget its blocks hold, and a frame in the
    /// buffer `next` gives in its place; `None` when it holds nothing.
    fn flush(&mut self, next: impl FnOnce() -> Vec<u8>) -> Option<Outbound> {
        if self.frame.is_empty() {
            return None;
        }
        let full = std::mem::replace(&mut self.frame, DeliveryFrame::new(next()));
        let charge = self.charge.take();
        match full.finish() {
            Ok(frame) => Some(Outbound {
                frame,
                _charge: charge,
            }),
            // Not with blocks of the sizes stores hold: DELIVERY_BYTES keeps well within.
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a block exchange message");
                None
            }
        }
    }

    /// Gives the frame's buffer back to the pool (which keeps only pooled-size buffers).
    fn finish(self, frames: &FramePool) {
        frames.put(self.frame.into_buf());
    }
}

fn holds(store: &Store, address: &BlockAddress) -> bool {
    match address {
        BlockAddress::Cid(cid) => store.exists_block(cid).unwrap_or(false),
        BlockAddress::Leaf { tree, index } => store.holds_leaf(tree, *index).unwrap_or(false),
    }
}

/// The block at `address`, if it is held: a tree's block located, a block by CID read.
fn find(store: &Store, address: &BlockAddress) -> Option<Found> {
    let found = match address {
        BlockAddress::Cid(cid) => store.block(cid).map(|data| {
            Found::Whole(Delivery {
                cid: *cid,
                data,
                address: *address,
                proof: None,
            })
        }),
        BlockAddress::Leaf { tree, index } => store.leaf_ref(tree, *index).map(Found::Leaf),
    };
    found.map_err(|e| unreadable(address, &e)).ok()
}

/// Logs why a block cannot be served, unless it is simply not held.
fn unreadable(address: &BlockAddress, e: &Error) {
    match e {
        // Not held, or an address that cannot exist (the peer's mistake, not ours).
        Error::NotFound(_) | Error::Invalid(_) => {}
        e => tracing::warn!(?address, error = %e, "cannot serve block"),
    }
}
