//! A libp2p peer inside the test process (the node's own host: TCP, Noise, mplex), for
//! speaking the block exchange to a node process directly: raw frames, or a peer that
//! answers every request with a lie.

#![allow(dead_code)] // each test file uses a different part
#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use codex_node::net::engine::BLOCKEXC;
use codex_node::net::host::{Host, HostConfig, PeerEvent};
use codex_node::net::message::{
    read_message, write_message, BlockAddress, Delivery, Message, Presence, WantType, MAX_MESSAGE,
};
use codex_node::store::Store;
use codex_node::{Cid, CidKind, Multiaddr, PeerId};
use futures::StreamExt;
use tokio::sync::{mpsc, Mutex};

/// A peer with its own host, listening on 127.0.0.1.
pub(crate) struct TestPeer {
    pub(crate) host: Arc<Host>,
    pub(crate) addr: Multiaddr,
    events: Mutex<mpsc::Receiver<PeerEvent>>,
}

impl TestPeer {
    pub(crate) async fn start(agent: &str) -> Self {
        let (tx, events) = mpsc::channel(64);
        let host = Host::start(
            libp2p_identity::Keypair::generate_secp256k1(),
            HostConfig {
                listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
                max_peers: 16,
                agent: agent.into(),
                // A plain host: no port mapping, no relaying.
                nat: codex_node::config::Nat::None,
                relay: codex_node::config::RelayMode::Never,
                relays: Vec::new(),
            },
            tx,
        )
        .await
        .unwrap();
        let addr = host.info().listen[0].clone();
        Self {
            host: Arc::new(host),
            addr,
            events: Mutex::new(events),
        }
    }

    pub(crate) fn peer_id(&self) -> String {
        self.host.peer_id().to_base58()
    }

    /// Connects to a node given by the peer id and address it printed.
    pub(crate) async fn dial(&self, peer: &str, addr: &str) -> PeerId {
        let peer: PeerId = peer.parse().unwrap();
        self.host
            .dial(peer, vec![addr.parse().unwrap()])
            .await
            .unwrap();
        peer
    }

    /// Opens a block exchange stream to `peer`.
    pub(crate) async fn open(&self, peer: PeerId) -> libp2p::Stream {
        self.host
            .control()
            .open_stream(peer, BLOCKEXC)
            .await
            .unwrap()
    }

    /// Accepts the block exchange streams peers open to this one and forwards every message
    /// read from them, with its sender. Call before dialling.
    pub(crate) fn inbox(&self) -> mpsc::Receiver<(PeerId, Message)> {
        let (tx, rx) = mpsc::channel(1024);
        let mut incoming = self.host.control().accept(BLOCKEXC).unwrap();
        tokio::spawn(async move {
            while let Some((from, mut stream)) = incoming.next().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Ok(Some(m)) = read_message(&mut stream, MAX_MESSAGE).await {
                        if tx.send((from, m)).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        rx
    }

    /// Accepts the block exchange streams peers open to this one and never reads them: a
    /// peer that asks and stops reading. The streams stay open while the peer lives.
    pub(crate) fn hoard(&self) {
        let mut incoming = self.host.control().accept(BLOCKEXC).unwrap();
        tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Some((_, stream)) = incoming.next().await {
                kept.push(stream);
            }
        });
    }

    /// Waits up to `within` for the connection to `peer` to close.
    pub(crate) async fn disconnected(&self, peer: PeerId, within: Duration) -> bool {
        if !self.host.info().peers.contains_key(&peer) {
            return true;
        }
        let mut events = self.events.lock().await;
        let wait = async {
            while let Some(e) = events.recv().await {
                if e == PeerEvent::Disconnected(peer) {
                    return;
                }
            }
        };
        tokio::time::timeout(within, wait).await.is_ok()
            || !self.host.info().peers.contains_key(&peer)
    }
}

/// Polls `cond` every 20 ms for up to `within`; true once it holds.
pub(crate) async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// How a hostile peer lies about blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lie {
    /// One byte flipped, with a CID recomputed to match: only the proof shows it.
    FlippedByte,
    /// The right block with the proof of another leaf.
    OtherLeafsProof,
    /// The right block with no proof at all.
    NoProof,
    /// Half the block, with a matching CID.
    Truncated,
    /// Garbage in place of the manifest; blocks with a flipped byte.
    GarbageManifest,
}

/// A peer that claims to have every block and serves `store`'s blocks falsified as `lie`
/// says. Counts the falsified blocks and manifests it sent.
pub(crate) struct Hostile {
    pub(crate) peer: TestPeer,
    pub(crate) lies_told: Arc<AtomicUsize>,
}

impl Hostile {
    pub(crate) async fn start(store: Arc<Store>, lie: Lie) -> Self {
        let peer = TestPeer::start("hostile").await;
        let lies_told = Arc::new(AtomicUsize::new(0));
        let mut incoming = peer.host.control().accept(BLOCKEXC).unwrap();
        let host = Arc::clone(&peer.host);
        let told = Arc::clone(&lies_told);
        tokio::spawn(async move {
            // One writer per remote peer, fed by every stream read from it.
            let writers: Arc<std::sync::Mutex<HashMap<PeerId, mpsc::Sender<Message>>>> =
                Arc::default();
            while let Some((from, mut stream)) = incoming.next().await {
                let out = writers
                    .lock()
                    .unwrap()
                    .entry(from)
                    .or_insert_with(|| {
                        let (tx, mut rx) = mpsc::channel::<Message>(64);
                        let host = Arc::clone(&host);
                        tokio::spawn(async move {
                            // A stream that cannot be opened or written is opened again: one
                            // failure must not leave the peer mute for the rest of the test.
                            let mut stream = None;
                            while let Some(m) = rx.recv().await {
                                for _ in 0..20 {
                                    if stream.is_none() {
                                        stream =
                                            host.control().open_stream(from, BLOCKEXC).await.ok();
                                    }
                                    if let Some(s) = stream.as_mut() {
                                        if write_message(s, &m).await.is_ok() {
                                            break;
                                        }
                                    }
                                    stream = None;
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        });
                        tx
                    })
                    .clone();
                let store = Arc::clone(&store);
                let told = Arc::clone(&told);
                tokio::spawn(async move {
                    while let Ok(Some(msg)) = read_message(&mut stream, MAX_MESSAGE).await {
                        let (reply, lies) = lie_about(&store, lie, &msg);
                        told.fetch_add(lies, Ordering::SeqCst);
                        if out.send(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { peer, lies_told }
    }

    pub(crate) fn lies(&self) -> usize {
        self.lies_told.load(Ordering::SeqCst)
    }
}

/// The hostile answer to `msg` and how many lies it holds.
fn lie_about(store: &Store, lie: Lie, msg: &Message) -> (Message, usize) {
    let mut reply = Message::default();
    let mut lies = 0;
    for e in msg.wantlist.entries.iter().filter(|e| !e.cancel) {
        if e.want_type == WantType::Have {
            reply.presences.push(Presence {
                address: e.address,
                have: true,
            });
            continue;
        }
        match e.address {
            BlockAddress::Cid(cid) => {
                let data = if lie == Lie::GarbageManifest {
                    lies += 1;
                    bytes::Bytes::from_static(b"not a manifest at all")
                } else {
                    store.block(&cid).unwrap()
                };
                reply.deliveries.push(Delivery {
                    cid,
                    data,
                    address: e.address,
                    proof: None,
                });
            }
            BlockAddress::Leaf { tree, index } => {
                let (data, proof) = store.leaf(&tree, index).unwrap();
                let mut data = data.to_vec();
                let mut proof = Some(proof);
                match lie {
                    Lie::FlippedByte | Lie::GarbageManifest => data[0] ^= 1,
                    Lie::OtherLeafsProof => {
                        let other = if index == 0 { 1 } else { index - 1 };
                        proof = Some(store.leaf(&tree, other).unwrap().1);
                    }
                    Lie::NoProof => proof = None,
                    Lie::Truncated => data.truncate(data.len() / 2),
                }
                lies += 1;
                reply.deliveries.push(Delivery {
                    cid: Cid::hash_of(CidKind::Block, &data),
                    data: data.into(),
                    address: e.address,
                    proof,
                });
            }
        }
    }
    (reply, lies)
}
