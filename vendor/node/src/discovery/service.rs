//! The discovery service: one UDP socket, the sessions and handshakes over it, requests
//! and their answers, and the lookups built on them.
//!
//! One task owns the socket and the transport state (sessions, pending requests,
//! challenges). Lookups, announcements and the maintenance loop run as ordinary tasks that
//! send it requests through [`Discovery`]; the routing table and the provider records are
//! shared behind mutexes.
//!
//! Behaviour follows the reference where others can observe it: the handshake flow, which
//! records answers hold, 3 records per Nodes message, providers kept 24 hours, lookups of
//! 16 nodes asking 3 at a time with FindNode at 3 distances. Requests time out after
//! [`DiscoveryConfig::request_timeout`] (the reference uses 1 s; ours defaults to 2 s, as a
//! loaded machine can take longer than 1 s to answer a handshake).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::stream::{FuturesUnordered, StreamExt};
use k256::SecretKey;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use libp2p_identity::{Keypair, PeerId};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, trace, warn};

use super::crypto::{self, Key};
use super::messages::{Message, Request, Response};
use super::packet::{self, Auth, Packet};
use super::providers::Providers;
use super::table::{Contact, Table, BUCKET_SIZE};
use super::{rand_bytes, NodeId};
use crate::error::{Error, Result};
use crate::net::spr::{self, Spr};
use crate::store::lock;
use crate::Cid;

/// Concurrent requests of a lookup.
const ALPHA: usize = 3;
/// Records per Nodes message.
const NODES_PER_MESSAGE: usize = 3;
/// Bytes of provider records in one Providers answer. A discv5 packet should stay within
/// 1280 bytes to cross the Internet unfragmented, and the packet header, the message's
/// framing and the GCM tag take under 120 of them. The reference answers with every record
/// it holds (up to 200, some 30 KB), which is fragmented or dropped beyond a few records.
const PROVIDER_BYTES: usize = 1150;
/// Nodes answered to FindNodeFast.
const FAST_NODES: usize = 6;
/// Sessions kept.
const MAX_SESSIONS: usize = 256;
/// How long a WHOAREYOU waits for its handshake.
const CHALLENGE_TIME: Duration = Duration::from_millis(500);
/// Requests queued for one node while its handshake runs.
const MAX_QUEUED: usize = 32;
/// Nodes messages accepted for one request.
const MAX_NODES_MESSAGES: u32 = 8;
/// Commands waiting for the socket task.
const COMMANDS: usize = 256;
/// Maintenance: a random lookup this often when none ran meanwhile.
const REFRESH: Duration = Duration::from_secs(300);
/// Maintenance: ping one node every 5 to 10 seconds.
const REVALIDATE_MS: (u64, u64) = (5_000, 10_000);
/// Maintenance: expired provider records are dropped this often.
const EXPIRE: Duration = Duration::from_secs(600);

/// Settings of the discovery service.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The UDP address to bind (`disc-port`; port 0 picks a free one).
    pub bind: SocketAddr,
    /// The IPv4 address to put in this node's record; `None`: the bound address, or
    /// 127.0.0.1 when bound to 0.0.0.0.
    pub announce_ip: Option<Ipv4Addr>,
    /// The node's libp2p (TCP) addresses: the provider record, and the tail of this
    /// node's record after its UDP address.
    pub tcp_addrs: Vec<Multiaddr>,
    /// Records of nodes to join through.
    pub bootstrap: Vec<Spr>,
    /// How long a request (handshake included) may take.
    pub request_timeout: Duration,
    /// Whether a port in use is waited for (briefly) instead of refused at once.
    pub wait_for_port: bool,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8090),
            announce_ip: None,
            tcp_addrs: Vec::new(),
            bootstrap: Vec::new(),
            request_timeout: Duration::from_secs(2),
            wait_for_port: false,
        }
    }
}

/// A handle on the running discovery service; clones share it. Dropping the last handle
/// does not stop it: call [`Discovery::stop`].
#[derive(Clone, Debug)]
pub struct Discovery {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    own: NodeId,
    peer: PeerId,
    /// This node's record, shared with the socket task; replaced when addresses change.
    record: Arc<Mutex<Spr>>,
    provider_record: Mutex<Spr>,
    local: SocketAddr,
    table: Mutex<Table>,
    providers: Mutex<Providers>,
    commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
    last_lookup: Mutex<Instant>,
}

#[derive(Debug)]
enum Command {
    Request {
        contact: Contact,
        request: Request,
        reply: Option<oneshot::Sender<Result<Vec<Response>>>>,
    },
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_secs())
}

impl Discovery {
    /// Binds the socket and starts the service on the current Tokio runtime: the socket
    /// task, then the maintenance loop, which joins through the bootstrap nodes.
    pub async fn start(keypair: &Keypair, cfg: DiscoveryConfig) -> Result<Self> {
        let secret = keypair
            .clone()
            .try_into_secp256k1()
            .ok()
            .and_then(|k| SecretKey::from_slice(&k.secret().to_bytes()).ok())
            .ok_or_else(|| Error::Config {
                key: "net-privkey".into(),
                message: "discovery needs a secp256k1 node key".into(),
            })?;
        let socket = bind(cfg.bind, cfg.wait_for_port).await?;
        let local = socket
            .local_addr()
            .map_err(|e| Error::Network(format!("discovery socket address: {e}")))?;
        let ip = cfg.announce_ip.unwrap_or(match local.ip() {
            IpAddr::V4(v4) if !v4.is_unspecified() => v4,
            _ => Ipv4Addr::LOCALHOST,
        });
        let udp = Multiaddr::empty()
            .with(Protocol::Ip4(ip))
            .with(Protocol::Udp(local.port()));
        let mut addrs = vec![udp];
        addrs.extend(cfg.tcp_addrs.iter().cloned());
        let seq = now_secs();
        let record = spr::sign(keypair, seq, &addrs)
            .map_err(|e| Error::State(format!("signing the discovery record: {e}")))?;
        let provider_record = spr::sign(keypair, seq, &cfg.tcp_addrs)
            .map_err(|e| Error::State(format!("signing the provider record: {e}")))?;
        let peer = keypair.public().to_peer_id();
        let own = NodeId::from_peer_id(&peer);
        let mut table = Table::new(own);
        for b in &cfg.bootstrap {
            match Contact::from_spr(b.clone()) {
                Some(c) => {
                    table.add_bootstrap(c);
                }
                None => warn!(
                    peer = %b.peer_id(),
                    "bootstrap record has no secp256k1 key or no /ip4 and /udp address; skipped"
                ),
            }
        }
        let (commands, rx) = mpsc::channel(COMMANDS);
        let cancel = CancellationToken::new();
        let record = Arc::new(Mutex::new(record));
        let inner = Arc::new(Inner {
            own,
            peer,
            record: Arc::clone(&record),
            provider_record: Mutex::new(provider_record),
            local,
            table: Mutex::new(table),
            providers: Mutex::new(Providers::default()),
            commands,
            cancel: cancel.clone(),
            last_lookup: Mutex::new(Instant::now()),
        });
        let transport = Transport {
            socket,
            secret,
            own,
            record,
            timeout: cfg.request_timeout,
            inner: Arc::downgrade(&inner),
            sessions: HashMap::new(),
            used: 0,
            pending: HashMap::new(),
            handshaking: HashMap::new(),
            challenges: HashMap::new(),
            waiters: HashMap::new(),
        };
        tokio::spawn(transport.run(rx, cancel.clone()));
        let d = Discovery { inner };
        tokio::spawn(d.clone().maintain());
        debug!(%own, addr = %local, "discovery started");
        Ok(d)
    }

    /// Stops the service (the socket closes once its task has ended).
    pub fn stop(&self) {
        self.inner.cancel.cancel();
    }

    /// This node's ID.
    pub fn node_id(&self) -> NodeId {
        self.inner.own
    }

    /// This node's record (its UDP address first, then its TCP addresses).
    pub fn record(&self) -> Spr {
        lock(&self.inner.record).clone()
    }

    /// Replaces the TCP addresses of this node's record and of its provider record (the
    /// addresses changed: a port mapping, a relay reservation). Both are signed again with a
    /// higher sequence number, so nodes that revalidate this one fetch the new record.
    /// Provider records already announced keep the old addresses until the next
    /// announcement.
    pub fn update_tcp_addrs(&self, keypair: &Keypair, tcp_addrs: &[Multiaddr]) -> Result<()> {
        let mut record = lock(&self.inner.record);
        let mut addrs: Vec<Multiaddr> = record.addrs().first().cloned().into_iter().collect();
        addrs.extend(tcp_addrs.iter().cloned());
        let seq = now_secs().max(record.seq() + 1);
        let new = spr::sign(keypair, seq, &addrs)
            .map_err(|e| Error::State(format!("signing the discovery record: {e}")))?;
        let provider = spr::sign(keypair, seq, tcp_addrs)
            .map_err(|e| Error::State(format!("signing the provider record: {e}")))?;
        *record = new;
        *lock(&self.inner.provider_record) = provider;
        debug!(seq, addrs = ?addrs, "record updated");
        Ok(())
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local
    }

    /// The routing table's nodes and their scores.
    pub fn nodes(&self) -> Vec<(Contact, f32)> {
        lock(&self.inner.table).nodes()
    }

    /// Adds a node to the routing table (unproven until it answers).
    pub fn add_node(&self, spr: Spr) -> bool {
        match Contact::from_spr(spr) {
            Some(c) => {
                lock(&self.inner.table).add(c);
                true
            }
            None => false,
        }
    }

    /// Sends `request` to `contact` and waits for its answer (all Nodes messages of it).
    /// Records the outcome in the routing table.
    pub async fn request(&self, contact: &Contact, request: Request) -> Result<Vec<Response>> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Request {
                contact: contact.clone(),
                request,
                reply: Some(tx),
            })
            .await
            .map_err(|_| Error::State("discovery is stopped".into()))?;
        let result = rx
            .await
            .unwrap_or_else(|_| Err(Error::State("discovery is stopped".into())));
        let mut table = lock(&self.inner.table);
        table.record_outcome(&contact.id, result.is_ok());
        if result.is_err() {
            table.replace(&contact.id, 0.5);
        }
        result
    }

    /// Sends a request that gets no answer (AddProvider).
    async fn tell(&self, contact: &Contact, request: Request) {
        let _ = self
            .inner
            .commands
            .send(Command::Request {
                contact: contact.clone(),
                request,
                reply: None,
            })
            .await;
    }

    /// Pings `contact`; returns its record seq and our address as it saw it.
    pub async fn ping(&self, contact: &Contact) -> Result<(u64, SocketAddr)> {
        let seq = lock(&self.inner.record).seq();
        let answers = self.request(contact, Request::Ping { seq }).await?;
        match answers.first() {
            Some(Response::Pong { seq, ip, port }) => Ok((*seq, SocketAddr::new(*ip, *port))),
            _ => Err(Error::Network(format!(
                "{} did not answer a ping",
                contact.id
            ))),
        }
    }

    /// Asks `contact` for the nodes at `distances` from it; returns the valid records.
    async fn find_node(&self, contact: &Contact, distances: Vec<u16>) -> Result<Vec<Contact>> {
        let answers = self
            .request(
                contact,
                Request::FindNode {
                    distances: distances.clone(),
                },
            )
            .await?;
        let mut out = Vec::new();
        let mut ids = HashSet::new();
        for a in answers {
            let Response::Nodes { records, .. } = a else {
                continue;
            };
            for r in records {
                let Some(c) = verify_node(&r, contact) else {
                    continue;
                };
                let d = c.id.log_distance(&contact.id);
                if (distances.contains(&d) || (d == 0 && c.id == contact.id))
                    && ids.insert(c.id)
                    && out.len() < BUCKET_SIZE
                {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// The (up to 16) nodes closest to `target` that the network knows of, found by
    /// asking ever closer nodes, 3 at a time. Every node found is added to the table.
    pub async fn lookup(&self, target: NodeId) -> Vec<Contact> {
        *lock(&self.inner.last_lookup) = Instant::now();
        let mut best: Vec<Contact> = lock(&self.inner.table).closest(&target, BUCKET_SIZE, 0.0);
        let mut asked: HashSet<NodeId> = HashSet::new();
        let mut flying = FuturesUnordered::new();
        loop {
            while flying.len() < ALPHA {
                let Some(next) = best.iter().find(|c| !asked.contains(&c.id)).cloned() else {
                    break;
                };
                asked.insert(next.id);
                let distances = lookup_distances(&target, &next.id);
                let me = self.clone();
                flying.push(async move {
                    let found = me.find_node(&next, distances).await;
                    (next, found)
                });
            }
            let Some((from, found)) = flying.next().await else {
                break;
            };
            let Ok(found) = found else {
                trace!(node = %from.id, "lookup: no answer");
                continue;
            };
            let mut table = lock(&self.inner.table);
            for c in found {
                if c.id == self.inner.own {
                    continue;
                }
                table.add(c.clone());
                if !best.iter().any(|b| b.id == c.id) {
                    best.push(c);
                }
            }
            drop(table);
            best.sort_by(|a, b| target.cmp_distance(&a.id, &b.id));
            best.truncate(BUCKET_SIZE);
        }
        best
    }

    /// Announces this node as a provider of `cid` to the nodes closest to its key (and
    /// keeps the record locally too). Returns how many nodes were told.
    pub async fn provide(&self, cid: &Cid) -> usize {
        let key = NodeId::from_cid(cid);
        let record = lock(&self.inner.provider_record).clone();
        lock(&self.inner.providers).add(key, record.clone(), Instant::now());
        let nodes = self.lookup(key).await;
        for n in &nodes {
            self.tell(
                n,
                Request::AddProvider {
                    key,
                    record: record.envelope().to_vec(),
                },
            )
            .await;
        }
        debug!(%cid, nodes = nodes.len(), "announced");
        nodes.len()
    }

    /// The providers of `cid` other than this node: those held here and those the nodes
    /// closest to its key hold, one record per peer (the newest).
    pub async fn find_providers(&self, cid: &Cid) -> Vec<Spr> {
        let key = NodeId::from_cid(cid);
        let mut found = lock(&self.inner.providers).get(&key, Instant::now());
        let nodes = self.lookup(key).await;
        let mut asks: FuturesUnordered<_> = nodes
            .iter()
            .map(|n| self.request(n, Request::GetProviders { key }))
            .collect();
        while let Some(answer) = asks.next().await {
            let Ok(answer) = answer else { continue };
            for a in answer {
                if let Response::Providers { records, .. } = a {
                    for r in records {
                        match Spr::from_envelope_bytes(&r) {
                            Ok(s) => found.push(s),
                            Err(e) => debug!("dropping a provider record: {e}"),
                        }
                    }
                }
            }
        }
        let mut best: HashMap<PeerId, Spr> = HashMap::new();
        for s in found {
            if s.peer_id() == self.inner.peer {
                continue;
            }
            match best.get(&s.peer_id()) {
                Some(b) if b.seq() >= s.seq() => {}
                _ => {
                    best.insert(s.peer_id(), s);
                }
            }
        }
        best.into_values().collect()
    }

    /// Forgets `peer` as a provider (dialling it failed).
    pub fn forget_provider(&self, peer: &PeerId) {
        lock(&self.inner.providers).remove_peer(peer);
    }

    /// The record of `peer`: from the table, asking the node itself for its newest, or
    /// by a lookup of its ID.
    pub async fn find_peer(&self, peer: &PeerId) -> Option<Spr> {
        let id = NodeId::from_peer_id(peer);
        let known = lock(&self.inner.table).get(&id).cloned();
        if let Some(c) = known {
            if let Ok(mut found) = self.find_node(&c, vec![0]).await {
                if let Some(newer) = found.pop() {
                    return Some(newer.spr);
                }
            }
            return Some(c.spr);
        }
        self.lookup(id)
            .await
            .into_iter()
            .find(|c| c.id == id)
            .map(|c| c.spr)
    }

    /// The maintenance loop: join, then refresh, revalidate and expire.
    async fn maintain(self) {
        let cancel = self.inner.cancel.clone();
        let join = async {
            self.lookup(self.inner.own).await;
            self.lookup(NodeId::random()).await;
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = join => {}
        }
        let mut last_expire = Instant::now();
        loop {
            let r: [u8; 8] = rand_bytes();
            let wait =
                REVALIDATE_MS.0 + u64::from_le_bytes(r) % (REVALIDATE_MS.1 - REVALIDATE_MS.0);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            }
            let pick = usize::from(rand_bytes::<2>()[0]);
            let stalest = lock(&self.inner.table).stalest(pick);
            if let Some(c) = stalest {
                if let Ok((seq, _)) = self.ping(&c).await {
                    if seq > c.spr.seq() {
                        if let Ok(mut found) = self.find_node(&c, vec![0]).await {
                            if let Some(newer) = found.pop() {
                                lock(&self.inner.table).add(newer);
                            }
                        }
                    }
                }
            }
            let idle = lock(&self.inner.last_lookup).elapsed();
            if idle >= REFRESH {
                self.lookup(NodeId::random()).await;
            }
            if last_expire.elapsed() >= EXPIRE {
                lock(&self.inner.providers).expire(Instant::now());
                last_expire = Instant::now();
            }
        }
    }
}

/// Binds the UDP socket. With `wait`, a port in use is tried again for up to a second: a
/// node of this process that was just stopped may still be releasing it.
async fn bind(addr: SocketAddr, wait: bool) -> Result<UdpSocket> {
    let mut tries = 0;
    loop {
        match UdpSocket::bind(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if wait && e.kind() == std::io::ErrorKind::AddrInUse && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(Error::Network(format!(
                    "binding the discovery port {addr}: {e}"
                )))
            }
        }
    }
}

/// The distances a lookup asks a node for: the target's, then alternately one further and
/// one nearer, three in all; as in the reference, further ones stay below 256 and nearer
/// ones above 0.
pub fn lookup_distances(target: &NodeId, node: &NodeId) -> Vec<u16> {
    let td = target.log_distance(node);
    let mut out = vec![td];
    let mut i = 1u16;
    while out.len() < 3 && i < 256 {
        if td + i < 256 {
            out.push(td + i);
        }
        if out.len() < 3 && td > i {
            out.push(td - i);
        }
        i += 1;
    }
    out
}

/// A record from a Nodes answer of `from`, if valid and reachable from where `from` is.
fn verify_node(record: &[u8], from: &Contact) -> Option<Contact> {
    let spr = Spr::from_envelope_bytes(record).ok()?;
    let c = Contact::from_spr(spr)?;
    let ip = c.addr.ip();
    let from_ip = from.addr.ip();
    let ok = !ip.is_unspecified()
        && !ip.is_multicast()
        && (!ip.is_loopback() || from_ip.is_loopback())
        && (!is_private(&ip) || is_private(&from_ip) || from_ip.is_loopback());
    ok.then_some(c)
}

fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

struct Session {
    write: Key,
    read: Key,
    read_previous: Option<Key>,
    used: u64,
}

struct Pending {
    contact: Contact,
    plaintext: Vec<u8>,
    deadline: Instant,
}

struct Challenge {
    data: Vec<u8>,
    key: Option<k256::PublicKey>,
    deadline: Instant,
}

struct Waiter {
    reply: oneshot::Sender<Result<Vec<Response>>>,
    got: Vec<Response>,
    deadline: Instant,
}

type SessionKey = (NodeId, SocketAddr);

/// A handshake under way: until when, and the plaintexts waiting for its session.
type Handshaking = (Instant, VecDeque<(Contact, Vec<u8>)>);

/// The socket task's state.
struct Transport {
    socket: UdpSocket,
    secret: SecretKey,
    own: NodeId,
    record: Arc<Mutex<Spr>>,
    timeout: Duration,
    inner: std::sync::Weak<Inner>,
    sessions: HashMap<SessionKey, Session>,
    used: u64,
    /// Sent packets that a WHOAREYOU may answer, by nonce.
    pending: HashMap<[u8; 12], Pending>,
    /// Nodes whose handshake runs, with the requests waiting for it.
    handshaking: HashMap<NodeId, Handshaking>,
    /// WHOAREYOUs sent, waiting for their handshake.
    challenges: HashMap<SessionKey, Challenge>,
    /// Requests waiting for their answer, by (node, request ID).
    waiters: HashMap<(NodeId, Vec<u8>), Waiter>,
}

impl Transport {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>, cancel: CancellationToken) {
        let mut buf = vec![0u8; packet::MAX_PACKET];
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                received = self.socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        let datagram = buf[..n].to_vec();
                        self.on_datagram(&datagram, from).await;
                    }
                    // ICMP errors of earlier sends surface here on some systems.
                    Err(e) => trace!("discovery receive: {e}"),
                },
                command = commands.recv() => match command {
                    Some(Command::Request { contact, request, reply }) => {
                        self.send_request(contact, request, reply).await;
                    }
                    None => break,
                },
                _ = tick.tick() => self.expire(),
            }
        }
        for (_, w) in self.waiters.drain() {
            let _ = w
                .reply
                .send(Err(Error::State("discovery is stopped".into())));
        }
    }

    async fn send(&self, to: SocketAddr, datagram: &[u8]) {
        if let Err(e) = self.socket.send_to(datagram, to).await {
            debug!(%to, "discovery send: {e}");
        }
    }

    async fn send_request(
        &mut self,
        contact: Contact,
        request: Request,
        reply: Option<oneshot::Sender<Result<Vec<Response>>>>,
    ) {
        let id = rand_bytes::<8>().to_vec();
        let plaintext = Message::Request(id.clone(), request).encode();
        if let Some(reply) = reply {
            self.waiters.insert(
                (contact.id, id),
                Waiter {
                    reply,
                    got: Vec::new(),
                    deadline: Instant::now() + self.timeout,
                },
            );
        }
        self.send_plain(contact, plaintext).await;
    }

    /// Sends a message under the node's session, or starts a handshake for it.
    async fn send_plain(&mut self, contact: Contact, plaintext: Vec<u8>) {
        let key = (contact.id, contact.addr);
        let nonce: [u8; 12] = rand_bytes();
        let header = packet::header(&rand_bytes(), &nonce, &Auth::Message { src: self.own });
        let datagram = if let Some(s) = self.sessions.get_mut(&key) {
            self.used += 1;
            s.used = self.used;
            packet::seal(&contact.id, &header, Some(&s.write), &plaintext)
        } else {
            let now = Instant::now();
            if let Some((deadline, queue)) = self.handshaking.get_mut(&contact.id) {
                if *deadline > now {
                    if queue.len() < MAX_QUEUED {
                        queue.push_back((contact, plaintext));
                    }
                    return;
                }
            }
            self.handshaking
                .insert(contact.id, (now + self.timeout, VecDeque::new()));
            // No session: a packet the node cannot decrypt, which it answers with WHOAREYOU.
            let mut d = packet::seal(&contact.id, &header, None, &[]);
            d.extend_from_slice(&rand_bytes::<20>());
            d
        };
        let to = contact.addr;
        self.pending.insert(
            nonce,
            Pending {
                contact,
                plaintext,
                deadline: Instant::now() + self.timeout,
            },
        );
        self.send(to, &datagram).await;
    }

    async fn on_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let p = match packet::decode(&self.own, datagram) {
            Ok(p) => p,
            Err(e) => {
                trace!(%from, "discovery packet dropped: {e}");
                return;
            }
        };
        match p.auth.clone() {
            Auth::Message { src } => self.on_message(p, src, from).await,
            Auth::Whoareyou { record_seq, .. } => self.on_whoareyou(p, record_seq, from).await,
            Auth::Handshake {
                src,
                signature,
                eph_key,
                record,
            } => {
                self.on_handshake(p, src, &signature, &eph_key, record, from)
                    .await
            }
        }
    }

    async fn on_message(&mut self, p: Packet, src: NodeId, from: SocketAddr) {
        let key = (src, from);
        let plain = self.sessions.get_mut(&key).and_then(|s| {
            if let Ok(m) = crypto::decrypt(&s.read, &p.nonce, &p.message, &p.header) {
                return Some(m);
            }
            let prev = s.read_previous?;
            let m = crypto::decrypt(&prev, &p.nonce, &p.message, &p.header).ok()?;
            s.read_previous = Some(s.read);
            s.read = prev;
            Some(m)
        });
        match plain {
            Some(m) => self.on_plaintext(src, from, &m).await,
            None => self.challenge(src, from, p.nonce).await,
        }
    }

    /// Answers a packet that could not be decrypted with a WHOAREYOU.
    async fn challenge(&mut self, src: NodeId, from: SocketAddr, nonce: [u8; 12]) {
        let key = (src, from);
        if self
            .challenges
            .get(&key)
            .is_some_and(|c| c.deadline > Instant::now())
        {
            return;
        }
        let known = self
            .inner
            .upgrade()
            .and_then(|i| lock(&i.table).get(&src).cloned());
        let auth = Auth::Whoareyou {
            id_nonce: rand_bytes(),
            record_seq: known.as_ref().map_or(0, |c| c.spr.seq()),
        };
        let header = packet::header(&rand_bytes(), &nonce, &auth);
        let datagram = packet::seal(&src, &header, None, &[]);
        self.challenges.insert(
            key,
            Challenge {
                data: header,
                key: known.map(|c| c.key),
                deadline: Instant::now() + CHALLENGE_TIME,
            },
        );
        self.send(from, &datagram).await;
    }

    async fn on_whoareyou(&mut self, p: Packet, record_seq: u64, from: SocketAddr) {
        let Some(pending) = self.pending.remove(&p.nonce) else {
            trace!(%from, "unrequested WHOAREYOU");
            return;
        };
        let c = pending.contact;
        if c.addr != from {
            trace!(%from, "WHOAREYOU from another address than the request went to");
            return;
        }
        let eph = SecretKey::random(&mut rand::rngs::OsRng);
        let eph_key = crypto::protobuf_key(&eph.public_key()).to_vec();
        let signature = crypto::id_sign(&self.secret, &p.header, &eph_key, &c.id);
        let shared = crypto::ecdh(&eph, &c.key);
        let (init, recip) = crypto::session_keys(&shared, &p.header, &self.own, &c.id);
        let record = {
            let own = lock(&self.record);
            (record_seq < own.seq()).then(|| own.envelope().to_vec())
        };
        let auth = Auth::Handshake {
            src: self.own,
            signature,
            eph_key,
            record,
        };
        let nonce: [u8; 12] = rand_bytes();
        let header = packet::header(&rand_bytes(), &nonce, &auth);
        let datagram = packet::seal(&c.id, &header, Some(&init), &pending.plaintext);
        self.store_session((c.id, c.addr), init, recip);
        self.send(c.addr, &datagram).await;
        if let Some((_, queue)) = self.handshaking.remove(&c.id) {
            for (contact, plaintext) in queue {
                self.send_plain(contact, plaintext).await;
            }
        }
    }

    async fn on_handshake(
        &mut self,
        p: Packet,
        src: NodeId,
        signature: &[u8],
        eph_key: &[u8],
        record: Option<Vec<u8>>,
        from: SocketAddr,
    ) {
        let Some(challenge) = self.challenges.remove(&(src, from)) else {
            trace!(%from, "handshake without a challenge");
            return;
        };
        let mut contact = None;
        let key = match &record {
            Some(r) => match Spr::from_envelope_bytes(r) {
                Ok(spr) if NodeId::from_peer_id(&spr.peer_id()) == src => {
                    let k = super::table::spr_key(&spr);
                    contact = Contact::from_spr(spr);
                    k
                }
                Ok(_) => {
                    debug!(%from, "handshake record names another node");
                    return;
                }
                Err(e) => {
                    debug!(%from, "handshake record: {e}");
                    return;
                }
            },
            None => challenge.key,
        };
        let Some(key) = key else {
            debug!(%from, "handshake without a record from an unknown node");
            return;
        };
        if let Err(e) = crypto::id_verify(&key, signature, &challenge.data, eph_key, &self.own) {
            debug!(%from, "handshake: {e}");
            return;
        }
        let Ok(eph) = crypto::parse_protobuf_key(eph_key) else {
            debug!(%from, "handshake: bad ephemeral key");
            return;
        };
        let shared = crypto::ecdh(&self.secret, &eph);
        let (init, recip) = crypto::session_keys(&shared, &challenge.data, &src, &self.own);
        let Ok(plain) = crypto::decrypt(&init, &p.nonce, &p.message, &p.header) else {
            debug!(%from, "handshake message does not decrypt");
            self.sessions.remove(&(src, from));
            return;
        };
        if Message::decode(&plain).is_err() {
            debug!(%from, "handshake message does not decode");
            return;
        }
        self.store_session((src, from), recip, init);
        if let (Some(c), Some(inner)) = (contact, self.inner.upgrade()) {
            if c.addr == from {
                lock(&inner.table).add_seen(c);
            }
        }
        self.on_plaintext(src, from, &plain).await;
    }

    fn store_session(&mut self, key: SessionKey, write: Key, read: Key) {
        self.used += 1;
        let read_previous = self.sessions.get(&key).map(|s| s.read);
        if !self.sessions.contains_key(&key) && self.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(k, _)| *k)
            {
                self.sessions.remove(&oldest);
            }
        }
        self.sessions.insert(
            key,
            Session {
                write,
                read,
                read_previous,
                used: self.used,
            },
        );
    }

    async fn on_plaintext(&mut self, src: NodeId, from: SocketAddr, plain: &[u8]) {
        let message = match Message::decode(plain) {
            Ok(m) => m,
            Err(e) => {
                trace!(%from, "discovery message dropped: {e}");
                return;
            }
        };
        match message {
            Message::Request(id, r) => {
                if let Request::Ping { seq } = &r {
                    self.on_newer_record(src, *seq);
                }
                for answer in self.answer(r, from) {
                    let reply = Message::Response(id.clone(), answer).encode();
                    self.respond(src, from, &reply).await;
                }
            }
            Message::Response(id, r) => {
                let key = (src, id);
                let Some(w) = self.waiters.get_mut(&key) else {
                    trace!(%from, "unsolicited response");
                    return;
                };
                let total = match &r {
                    Response::Nodes { total, .. } => (*total).clamp(1, MAX_NODES_MESSAGES),
                    _ => 1,
                };
                w.got.push(r);
                w.deadline = Instant::now() + self.timeout;
                if w.got.len() as u32 >= total {
                    if let Some(w) = self.waiters.remove(&key) {
                        let _ = w.reply.send(Ok(w.got));
                    }
                }
            }
        }
    }

    /// A node pinged with a record newer than the one the table holds (its addresses
    /// changed): asks it for that record in the background, as revalidation would later.
    fn on_newer_record(&self, src: NodeId, seq: u64) {
        let Some(inner) = self.inner.upgrade() else {
            return;
        };
        let known = lock(&inner.table).get(&src).cloned();
        let Some(contact) = known.filter(|c| c.spr.seq() < seq) else {
            return;
        };
        let d = Discovery { inner };
        tokio::spawn(async move {
            if let Ok(mut found) = d.find_node(&contact, vec![0]).await {
                if let Some(newer) = found.pop().filter(|n| n.spr.seq() > contact.spr.seq()) {
                    debug!(node = %newer.id, seq = newer.spr.seq(), "newer record");
                    lock(&d.inner.table).add(newer);
                }
            }
        });
    }

    /// The answers to a request (none for AddProvider).
    fn answer(&self, request: Request, from: SocketAddr) -> Vec<Response> {
        let Some(inner) = self.inner.upgrade() else {
            return Vec::new();
        };
        match request {
            Request::Ping { .. } => vec![Response::Pong {
                seq: lock(&self.record).seq(),
                ip: from.ip(),
                port: from.port(),
            }],
            Request::FindNode { distances } => {
                let records: Vec<Vec<u8>> = if distances.contains(&0) {
                    vec![lock(&self.record).envelope().to_vec()]
                } else if distances.iter().any(|d| *d > 256) {
                    Vec::new()
                } else {
                    lock(&inner.table)
                        .at_distances(&distances)
                        .into_iter()
                        .map(|c| c.spr.envelope().to_vec())
                        .collect()
                };
                nodes(records)
            }
            Request::FindNodeFast { target } => nodes(
                lock(&inner.table)
                    .closest(&target, FAST_NODES, 1.0)
                    .into_iter()
                    .map(|c| c.spr.envelope().to_vec())
                    .collect(),
            ),
            Request::TalkReq { .. } => vec![Response::TalkResp {
                response: Vec::new(),
            }],
            Request::AddProvider { key, record } => {
                match Spr::from_envelope_bytes(&record) {
                    Ok(spr) => lock(&inner.providers).add(key, spr, Instant::now()),
                    Err(e) => debug!(%from, "AddProvider with a bad record: {e}"),
                }
                Vec::new()
            }
            Request::GetProviders { key } => vec![Response::Providers {
                total: 1,
                records: fit(
                    lock(&inner.providers)
                        .get(&key, Instant::now())
                        .iter()
                        .map(|s| s.envelope().to_vec()),
                    PROVIDER_BYTES,
                ),
            }],
        }
    }

    async fn respond(&mut self, src: NodeId, to: SocketAddr, plaintext: &[u8]) {
        let nonce: [u8; 12] = rand_bytes();
        let header = packet::header(&rand_bytes(), &nonce, &Auth::Message { src: self.own });
        let Some(s) = self.sessions.get(&(src, to)) else {
            return;
        };
        let datagram = packet::seal(&src, &header, Some(&s.write), plaintext);
        self.send(to, &datagram).await;
    }

    fn expire(&mut self) {
        let now = Instant::now();
        self.pending.retain(|_, p| p.deadline > now);
        self.handshaking.retain(|_, (d, _)| *d > now);
        self.challenges.retain(|_, c| c.deadline > now);
        let late: Vec<(NodeId, Vec<u8>)> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in late {
            if let Some(w) = self.waiters.remove(&k) {
                let result = if w.got.is_empty() {
                    Err(Error::Network(format!(
                        "node {} did not answer in time",
                        k.0
                    )))
                } else {
                    Ok(w.got)
                };
                let _ = w.reply.send(result);
            }
        }
    }
}

/// The first of `records` whose encodings (with their field framing) fit in `budget`
/// bytes; one too large for the budget is skipped.
fn fit(records: impl Iterator<Item = Vec<u8>>, budget: usize) -> Vec<Vec<u8>> {
    let mut left = budget;
    let mut out = Vec::new();
    for r in records {
        // Field tag and length varint.
        let size = r.len() + 1 + if r.len() < 128 { 1 } else { 2 };
        if size <= left {
            left -= size;
            out.push(r);
        }
    }
    out
}

/// Records split into Nodes messages of 3 (one empty message for none).
fn nodes(records: Vec<Vec<u8>>) -> Vec<Response> {
    if records.is_empty() {
        return vec![Response::Nodes {
            total: 1,
            records: Vec::new(),
        }];
    }
    let chunks: Vec<Vec<Vec<u8>>> = records
        .chunks(NODES_PER_MESSAGE)
        .map(<[Vec<u8>]>::to_vec)
        .collect();
    let total = chunks.len() as u32;
    chunks
        .into_iter()
        .map(|records| Response::Nodes { total, records })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_providers_answer_fits_one_unfragmented_packet() {
        // 50 providers with records of a realistic size (an SPR with two addresses).
        let key = Keypair::generate_secp256k1();
        let record = spr::sign(
            &key,
            1,
            &[
                "/ip4/192.168.1.20/tcp/8070".parse().unwrap(),
                "/ip6/2001:db8::1/tcp/8070".parse().unwrap(),
            ],
        )
        .unwrap()
        .envelope()
        .to_vec();
        let records = fit(std::iter::repeat_n(record.clone(), 50), PROVIDER_BYTES);
        assert!(records.len() >= 3, "only {} records fit", records.len());
        assert!(records.len() < 50);
        let msg = Message::Response(
            vec![0xff; 8], // the longest request ID
            Response::Providers { total: 1, records },
        );
        // Masking IV, static header, message authdata (source ID), GCM tag.
        let packet = 16 + 23 + 32 + msg.encode().len() + 16;
        assert!(packet <= 1280, "{packet} bytes");
        // A record larger than the budget is skipped, not sent alone.
        let huge = vec![0u8; PROVIDER_BYTES];
        assert_eq!(
            fit([huge, record.clone()].into_iter(), PROVIDER_BYTES),
            vec![record]
        );
    }

    #[test]
    fn lookup_distances_match_the_reference() {
        let zero = NodeId([0; 32]);
        let at = |d: u16| {
            let mut id = [0u8; 32];
            if d > 0 {
                let bit = d - 1;
                id[31 - usize::from(bit / 8)] = 1 << (bit % 8);
            }
            NodeId(id)
        };
        assert_eq!(lookup_distances(&zero, &at(0)), vec![0, 1, 2]);
        assert_eq!(lookup_distances(&zero, &at(1)), vec![1, 2, 3]);
        assert_eq!(lookup_distances(&zero, &at(100)), vec![100, 101, 99]);
        assert_eq!(lookup_distances(&zero, &at(255)), vec![255, 254, 253]);
        assert_eq!(lookup_distances(&zero, &at(256)), vec![256, 255, 254]);
    }

    #[test]
    fn nodes_answers_hold_three_records_each() {
        assert_eq!(
            nodes(Vec::new()),
            vec![Response::Nodes {
                total: 1,
                records: vec![]
            }]
        );
        let answers = nodes(vec![vec![1]; 7]);
        assert_eq!(answers.len(), 3);
        for a in answers {
            let Response::Nodes { total, records } = a else {
                panic!()
            };
            assert_eq!(total, 3);
            assert!(!records.is_empty() && records.len() <= 3);
        }
    }

    async fn node(bootstrap: Vec<Spr>, tcp_port: u16) -> (Keypair, Discovery) {
        let key = Keypair::generate_secp256k1();
        let cfg = DiscoveryConfig {
            bind: "127.0.0.1:0".parse().unwrap(),
            tcp_addrs: vec![format!("/ip4/127.0.0.1/tcp/{tcp_port}").parse().unwrap()],
            bootstrap,
            ..DiscoveryConfig::default()
        };
        let d = Discovery::start(&key, cfg).await.unwrap();
        (key, d)
    }

    /// Polls `f` every 100 ms for up to 20 s.
    async fn eventually<F, Fut, T>(what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_join_through_a_bootstrap_node_and_find_providers() {
        let (_, boot) = node(Vec::new(), 4000).await;
        let mut nodes = Vec::new();
        for i in 0..5u16 {
            nodes.push(node(vec![boot.record()], 4001 + i).await);
        }
        // The bootstrap node learns of every node from its handshake.
        eventually("the bootstrap node's table", || async {
            (boot.nodes().len() == 5).then_some(())
        })
        .await;
        for (_, n) in &nodes {
            assert!(n.nodes().iter().any(|(c, _)| c.id == boot.node_id()));
        }

        let cid: Cid = "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM"
            .parse()
            .unwrap();
        let (provider_key, provider) = &nodes[1];
        assert!(provider.provide(&cid).await > 0);
        let (_, seeker) = &nodes[4];
        let found = eventually("the provider record", || async {
            let found = seeker.find_providers(&cid).await;
            (!found.is_empty()).then_some(found)
        })
        .await;
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].peer_id(), provider_key.public().to_peer_id());
        // The provider record carries the TCP address to dial, not the UDP one.
        assert_eq!(
            found[0].addrs(),
            &["/ip4/127.0.0.1/tcp/4002".parse::<Multiaddr>().unwrap()]
        );
        // Nobody provides another CID; the provider does not find itself.
        let other: Cid = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy"
            .parse()
            .unwrap();
        assert!(seeker.find_providers(&other).await.is_empty());
        assert!(provider.find_providers(&cid).await.is_empty());

        // A node is found by its peer ID, with its UDP address first and its TCP one after.
        let (target_key, target) = &nodes[2];
        let spr = eventually("the peer's record", || async {
            nodes[3]
                .1
                .find_peer(&target_key.public().to_peer_id())
                .await
        })
        .await;
        assert_eq!(
            spr.addrs()[0],
            format!("/ip4/127.0.0.1/udp/{}", target.local_addr().port())
                .parse::<Multiaddr>()
                .unwrap()
        );
        assert_eq!(
            spr.addrs()[1],
            "/ip4/127.0.0.1/tcp/4003".parse::<Multiaddr>().unwrap()
        );

        for (_, n) in &nodes {
            n.stop();
        }
        boot.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_updated_record_reaches_the_nodes_that_ask() {
        let (key, a) = node(Vec::new(), 4200).await;
        let (_, b) = node(vec![a.record()], 4201).await;
        let before = a.record();
        let relayed: Multiaddr = format!(
            "/ip4/127.0.0.1/tcp/4300/p2p/{}/p2p-circuit/p2p/{}",
            b.record().peer_id(),
            before.peer_id()
        )
        .parse()
        .unwrap();
        let tcp: Vec<Multiaddr> = vec!["/ip4/127.0.0.1/tcp/4200".parse().unwrap(), relayed.clone()];
        a.update_tcp_addrs(&key, &tcp).unwrap();
        let after = a.record();
        assert!(after.seq() > before.seq());
        // The UDP address stays first, as the reference reads it.
        assert_eq!(after.addrs()[0], before.addrs()[0]);
        assert_eq!(&after.addrs()[1..], &tcp[..]);
        // A ping shows the higher seq; asking the node itself gives the new record.
        let contact = Contact::from_spr(before).unwrap();
        let (seq, _) = b.ping(&contact).await.unwrap();
        assert_eq!(seq, after.seq());
        let found = b.find_peer(&after.peer_id()).await.unwrap();
        assert_eq!(found.seq(), after.seq());
        assert!(found.addrs().contains(&relayed));
        a.stop();
        b.stop();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_and_forged_packets_leave_the_service_working() {
        let (_, a) = node(Vec::new(), 4100).await;
        let (_, b) = node(vec![a.record()], 4101).await;
        eventually("the join", || async {
            (a.nodes().len() == 1).then_some(())
        })
        .await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = a.local_addr();
        // Random bytes of every length, a WHOAREYOU nobody asked for, a handshake with no
        // challenge, a message from an unknown node.
        for len in [0usize, 1, 62, 63, 64, 200, 1500, 65_000] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            sock.send_to(&junk, to).await.unwrap();
        }
        let stranger = NodeId::random();
        for auth in [
            Auth::Whoareyou {
                id_nonce: [1; 16],
                record_seq: 0,
            },
            Auth::Handshake {
                src: stranger,
                signature: vec![0x30; 70],
                eph_key: vec![8; 37],
                record: Some(vec![1, 2, 3]),
            },
            Auth::Message { src: stranger },
        ] {
            let h = packet::header(&[0; 16], &[9; 12], &auth);
            let mut d = packet::seal(&a.node_id(), &h, None, &[]);
            if !matches!(auth, Auth::Whoareyou { .. }) {
                d.extend_from_slice(&[0u8; 32]);
            }
            sock.send_to(&d, to).await.unwrap();
        }
        // The stranger's message got a WHOAREYOU back.
        let mut buf = vec![0u8; 2048];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let p = packet::decode(&stranger, &buf[..n]).unwrap();
        assert!(matches!(p.auth, Auth::Whoareyou { .. }));
        assert_eq!(p.nonce, [9; 12]);
        // And the real node still gets answers.
        let contact = Contact::from_spr(a.record()).unwrap();
        let (_, seen) = b.ping(&contact).await.unwrap();
        assert_eq!(seen, b.local_addr());
        a.stop();
        b.stop();
    }
}
