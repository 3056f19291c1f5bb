//! The libp2p host: TCP, Noise, mplex `/mplex/6.7.0`, identify (without a rust-libp2p signed
//! record, which the reference rejects), and raw streams for the block exchange.
//!
//! Beyond the reference (which only speaks identify and the block exchange; everything
//! here is additive for it), the host gets through NATs:
//! - `nat = extip:<ip>` announces the listen ports on that IP; `any`/`upnp` (and `pmp`,
//!   which falls back to UPnP) ask the gateway to map the listen ports and announce the
//!   mapped addresses.
//! - Circuit relay v2: a node reachable directly relays for others, within [`relay_limits`];
//!   a node that is not reserves a slot on its bootstrap nodes and announces the
//!   `/p2p-circuit` address ([`behind_nat`] decides). Relayed connections use the same
//!   Noise and mplex upgrade as direct ones.
//! - DCUtR: peers connected through a relay try to open a direct connection.
//!
//! The swarm runs in one task on the node's runtime. Others talk to it through [`Host`]:
//! commands in, peer connection events and announced addresses out.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, ListenerId};
use libp2p::core::ConnectedPoint;
use libp2p::core::{upgrade, Transport};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{dial_opts::DialOpts, ConnectionId, DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{dcutr, identify, noise, relay, tcp, upnp, Multiaddr, PeerId, Swarm};
use libp2p_identity::Keypair;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{Nat, RelayMode};
use crate::error::{Error, Result};
use crate::store::lock;

/// The identify protocol version string the reference sends.
const PROTOCOL_VERSION: &str = "ipfs/0.1.0";

/// How long a dial may take before it is reported failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a node that needs a relay retries the relays it holds no reservation on.
const RESERVE_RETRY: Duration = Duration::from_secs(30);

/// Most relays a node reserves a slot on at once.
const MAX_RELAYS: usize = 3;

/// Host settings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Most peers connected at once; further connections are closed.
    pub max_peers: u32,
    /// Identify's agent version.
    pub agent: String,
    /// `nat`: a fixed external IP, UPnP port mapping, or nothing.
    pub nat: Nat,
    /// `relay`: whether to relay for others or reserve a slot on a relay.
    pub relay: RelayMode,
    /// Relays to reserve a slot on when this node cannot be reached directly (its
    /// bootstrap nodes): addresses ending in `/p2p/<relay peer ID>`.
    pub relays: Vec<Multiaddr>,
}

/// A peer connecting or going away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    /// The first connection to the peer is up.
    Connected(PeerId),
    /// The last connection to the peer closed.
    Disconnected(PeerId),
}

#[derive(NetworkBehaviour)]
#[behaviour(prelude = "libp2p::swarm::derive_prelude")]
struct Behaviour {
    identify: identify::Behaviour,
    stream: libp2p_stream::Behaviour,
    relay_client: relay::client::Behaviour,
    relay: relay::Behaviour,
    dcutr: dcutr::Behaviour,
    upnp: Toggle<upnp::tokio::Behaviour>,
}

enum Command {
    Dial {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: oneshot::Sender<Result<()>>,
    },
    Disconnect(PeerId),
}

/// What the host knows of itself and its peers, readable at any time.
#[derive(Debug, Default, Clone)]
pub struct HostInfo {
    /// TCP addresses the host listens on.
    pub listen: Vec<Multiaddr>,
    /// Addresses others can dial this host at, as the node's records announce them: port
    /// mappings, the listen addresses (on the `extip` IP when set), relayed addresses.
    pub announce: Vec<Multiaddr>,
    /// Whether the host considers itself unreachable directly (and so uses relays).
    pub behind_nat: bool,
    /// Connected peers and the remote address of each open connection, oldest first
    /// (a relayed connection's address contains `/p2p-circuit`).
    pub peers: HashMap<PeerId, Vec<Multiaddr>>,
}

/// A running libp2p host. Dropping it (or [`Host::shutdown`]) closes every connection.
pub struct Host {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    info: Arc<Mutex<HostInfo>>,
    announced: watch::Receiver<Vec<Multiaddr>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Host {
    /// Starts the host on the current runtime and waits until it listens on every address.
    /// Peer connections and disconnections are sent to `events`.
    pub async fn start(
        key: Keypair,
        cfg: HostConfig,
        events: mpsc::Sender<PeerEvent>,
    ) -> Result<Self> {
        let peer_id = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                .with_agent_version(cfg.agent.clone()),
        );
        let upnp = match cfg.nat {
            Nat::Any | Nat::Upnp => true,
            Nat::Pmp => {
                tracing::warn!(
                    "nat = pmp: NAT-PMP is not supported by this node; trying UPnP instead"
                );
                true
            }
            Nat::None | Nat::ExtIp(_) => false,
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(tcp_transport)
            .map_err(|e| Error::Network(format!("setting up TCP/Noise/mplex: {e}")))?
            // Relayed connections get the same Noise and mplex upgrade as TCP ones.
            .with_relay_client(noise::Config::new, mplex_config)
            .map_err(|e| Error::Network(format!("setting up the relay client: {e}")))?
            .with_behaviour(|key, relay_client| Behaviour {
                identify,
                stream: libp2p_stream::Behaviour::new(),
                relay_client,
                relay: relay::Behaviour::new(key.public().to_peer_id(), relay_limits()),
                dcutr: dcutr::Behaviour::new(key.public().to_peer_id()),
                // Searches for a gateway in the background: no gateway costs nothing.
                upnp: Toggle::from(upnp.then(upnp::tokio::Behaviour::default)),
            })
            .map_err(|e| Error::Network(format!("setting up the host: {e}")))?
            // The reference keeps idle connections up; so do we.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        let control = swarm.behaviour().stream.new_control();
        let mut waiting = HashSet::new();
        for addr in &cfg.listen {
            let id = swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Network(format!("listening on {addr}: {e}")))?;
            waiting.insert(id);
        }
        // Wait for every listener to be up (or fail), so addresses are known on return.
        let mut listening = Vec::new();
        while !waiting.is_empty() {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr {
                    listener_id,
                    address,
                }) => {
                    waiting.remove(&listener_id);
                    listening.push(address);
                }
                Ok(SwarmEvent::ListenerError { error, .. }) => {
                    return Err(Error::Network(format!("listener failed: {error}")))
                }
                Ok(SwarmEvent::ListenerClosed {
                    reason, addresses, ..
                }) => {
                    return Err(Error::Network(format!(
                        "could not listen on {addresses:?}: {reason:?}"
                    )))
                }
                Ok(_) => {}
                Err(_) => return Err(Error::Network("listeners did not come up in 10 s".into())),
            }
        }
        // A wildcard listener reports each interface's address in turn: take the ones that
        // follow at once too, or the record signed at start would lack them and be signed
        // again a moment later.
        if cfg.listen.iter().any(is_wildcard) {
            let until = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(event) = tokio::time::timeout_at(
                until.min(tokio::time::Instant::now() + Duration::from_millis(100)),
                swarm.select_next_some(),
            )
            .await
            {
                if let SwarmEvent::NewListenAddr { address, .. } = event {
                    if !listening.contains(&address) {
                        listening.push(address);
                    }
                }
            }
        }
        let info = Arc::new(Mutex::new(HostInfo {
            listen: listening,
            ..HostInfo::default()
        }));
        let (commands, rx) = mpsc::channel(64);
        let (announce_tx, announced) = watch::channel(Vec::new());
        let stop = CancellationToken::new();
        let mut relays = cfg.relays;
        relays.retain(|a| matches!(a.iter().last(), Some(Protocol::P2p(p)) if p != peer_id));
        relays.truncate(MAX_RELAYS);
        let mut driver = Driver {
            swarm,
            commands: rx,
            events,
            info: Arc::clone(&info),
            dials: HashMap::new(),
            max_peers: cfg.max_peers.max(1) as usize,
            stop: stop.clone(),
            nat: cfg.nat,
            mode: cfg.relay,
            relays,
            relay_listeners: HashMap::new(),
            relayed: Vec::new(),
            mapped: Vec::new(),
            added_external: Vec::new(),
            behind: None,
            warned: HashSet::new(),
            conns: HashMap::new(),
            announce_tx,
        };
        driver.refresh();
        let task = tokio::spawn(driver.run());
        {
            let info = lock(&info);
            tracing::info!(
                %peer_id,
                addrs = ?info.listen,
                announce = ?info.announce,
                behind_nat = info.behind_nat,
                "network started"
            );
        }
        Ok(Self {
            peer_id,
            commands,
            control,
            info,
            announced,
            stop,
            task: Some(task),
        })
    }

    /// This host's peer ID.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A handle for opening and accepting streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    /// Listening and announced addresses, and connected peers.
    pub fn info(&self) -> HostInfo {
        lock(&self.info).clone()
    }

    /// The announced addresses ([`HostInfo::announce`]), updated whenever they change.
    pub fn announced(&self) -> watch::Receiver<Vec<Multiaddr>> {
        self.announced.clone()
    }

    /// Connects to `peer` at `addrs` (or at addresses already known); returns once connected.
    pub async fn dial(&self, peer: PeerId, addrs: Vec<Multiaddr>) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Dial { peer, addrs, reply })
            .await
            .map_err(|_| Error::State("the network is stopped".into()))?;
        match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Error::State("the network is stopped".into())),
            Err(_) => Err(Error::Network(format!("connecting to {peer} timed out"))),
        }
    }

    /// Closes every connection to `peer` (a misbehaving one).
    pub fn disconnect(&self, peer: PeerId) {
        let _ = self.commands.try_send(Command::Disconnect(peer));
    }

    /// Stops the host and waits for its task to end.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The relay server's limits. The libp2p defaults (128 KiB and 2 minutes per circuit) would
/// cut any block transfer; these let one circuit carry a 1 GiB dataset even at about
/// 150 KiB/s, while bounding what a node gives to others: 64 reservations (2 per peer),
/// 16 circuits (4 per peer), each ending after 2 hours or 2 GiB relayed, whichever comes
/// first. The default rate limits on new reservations and circuits stay.
pub fn relay_limits() -> relay::Config {
    relay::Config {
        max_reservations: 64,
        max_reservations_per_peer: 2,
        reservation_duration: Duration::from_secs(3600),
        max_circuits: 16,
        max_circuits_per_peer: 4,
        max_circuit_duration: Duration::from_secs(2 * 3600),
        max_circuit_bytes: 2 << 30,
        ..relay::Config::default()
    }
}

/// Whether a node is unreachable directly and so should reserve a slot on a relay.
///
/// With `relay = auto`: when it has no TCP listen address at all, or when NAT traversal is
/// on (`nat` is `any`, `upnp` or `pmp`), no port mapping succeeded (`mapped` is empty), and
/// its listen addresses are private (RFC 1918, shared, link-local or unique-local; loopback
/// ones do not count either way: a node listening only on loopback is a local test bed,
/// reachable by the nodes of its host). `nat = none` or `extip` says the listen addresses
/// are reachable as they are (or through a forwarded port).
pub fn behind_nat(mode: RelayMode, nat: &Nat, listen: &[Multiaddr], mapped: &[Multiaddr]) -> bool {
    match mode {
        RelayMode::Never => false,
        RelayMode::Always => true,
        RelayMode::Auto => {
            if listen.is_empty() {
                return true;
            }
            if matches!(nat, Nat::None | Nat::ExtIp(_)) || !mapped.is_empty() {
                return false;
            }
            let ips: Vec<IpAddr> = listen.iter().filter_map(first_ip).collect();
            ips.iter().any(is_private) && ips.iter().all(|ip| ip.is_loopback() || is_private(ip))
        }
    }
}

/// The addresses to announce: those the gateway mapped, then the listen addresses (with
/// the `extip` IP in place of theirs, for addresses of its family), then relayed ones.
pub fn announce_addrs(
    listen: &[Multiaddr],
    nat: &Nat,
    mapped: &[Multiaddr],
    relayed: &[Multiaddr],
) -> Vec<Multiaddr> {
    let direct = listen.iter().map(|a| match nat {
        Nat::ExtIp(ext) => with_ip(a, *ext),
        _ => a.clone(),
    });
    let mut out: Vec<Multiaddr> = Vec::new();
    for a in mapped
        .iter()
        .cloned()
        .chain(direct)
        .chain(relayed.iter().cloned())
    {
        if !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// `addr` with its IP replaced by `ip` when both are of the same family.
fn with_ip(addr: &Multiaddr, ip: IpAddr) -> Multiaddr {
    let mut parts = addr.iter();
    let head = match (parts.next(), ip) {
        (Some(Protocol::Ip4(_)), IpAddr::V4(v4)) => Protocol::Ip4(v4),
        (Some(Protocol::Ip6(_)), IpAddr::V6(v6)) => Protocol::Ip6(v6),
        _ => return addr.clone(),
    };
    std::iter::once(head).chain(parts).collect()
}

/// The IP an address starts with.
fn first_ip(addr: &Multiaddr) -> Option<IpAddr> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    }
}

/// Whether `ip` is private: RFC 1918, shared (100.64/10), link-local, unique-local.
fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || v4.is_link_local() || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => v6.is_unique_local() || v6.is_unicast_link_local(),
    }
}

/// Whether `addr` listens on every interface (`0.0.0.0` or `::`).
fn is_wildcard(addr: &Multiaddr) -> bool {
    first_ip(addr).is_some_and(|ip| ip.is_unspecified())
}

/// Whether an address goes through a relay.
fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Bytes read from a TCP socket at once.
///
/// Noise's frame decoder reads its transport 8 KiB at a time, one system call each; a
/// buffer of one full Noise frame (64 KiB) between them makes that one call per frame.
/// In interleaved 1 GiB transfers this cut the receiver's CPU time by about a fifth;
/// 256 KiB did no better.
const TCP_READ_BUF: usize = 64 << 10;

/// TCP, Noise and mplex, as `SwarmBuilder::with_tcp` builds them, with each socket read
/// through a [`TCP_READ_BUF`] buffer.
fn tcp_transport(
    key: &Keypair,
) -> std::result::Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>>
{
    Ok(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .map(|socket, _| futures::io::BufReader::with_capacity(TCP_READ_BUF, socket))
            .upgrade(upgrade::Version::V1Lazy)
            .authenticate(noise::Config::new(key)?)
            .multiplex(mplex_config())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    )
}

/// mplex as the reference speaks it, sized for block transfers: buffers that apply
/// backpressure instead of resetting streams.
///
/// mplex has no flow control of its own: what a peer sends on a substream nobody is reading
/// yet waits in that substream's buffer, up to `max_buffer_size` frames of up to 1 MiB each,
/// before the connection stops being read. 32 frames hold 2 MiB of our 64 KiB frames (the
/// block exchange reads its stream promptly, so more bought no speed in 1 GiB transfers)
/// and bound a hostile sender to 32 MiB per substream. A connection needs a handful of
/// substreams (block exchange both ways, identify, relay); 64 leaves room to spare.
fn mplex_config() -> libp2p_mplex::Config {
    let mut cfg = libp2p_mplex::Config::new();
    cfg.set_max_num_streams(64)
        .set_max_buffer_size(32)
        .set_max_buffer_behaviour(libp2p_mplex::MaxBufferBehaviour::Block)
        .set_split_send_size(64 * 1024);
    cfg
}

struct Driver {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<PeerEvent>,
    info: Arc<Mutex<HostInfo>>,
    dials: HashMap<PeerId, Vec<oneshot::Sender<Result<()>>>>,
    max_peers: usize,
    stop: CancellationToken,
    nat: Nat,
    mode: RelayMode,
    /// Relays to reserve on when behind a NAT (addresses ending in `/p2p/<relay>`).
    relays: Vec<Multiaddr>,
    /// Relay listeners (reservations asked for or held), with the relay address.
    relay_listeners: HashMap<ListenerId, Multiaddr>,
    /// `/p2p-circuit` addresses of the reservations held.
    relayed: Vec<Multiaddr>,
    /// External addresses the gateway mapped (UPnP).
    mapped: Vec<Multiaddr>,
    /// External addresses this driver gave the swarm (what a relay tells its clients).
    added_external: Vec<Multiaddr>,
    /// Whether behind a NAT, once decided.
    behind: Option<bool>,
    /// Relays whose failed reservation was already reported.
    warned: HashSet<Multiaddr>,
    /// Open connections: their peer and remote address.
    conns: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    announce_tx: watch::Sender<Vec<Multiaddr>>,
}

impl Driver {
    async fn run(mut self) {
        let mut retry = tokio::time::interval(RESERVE_RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        retry.tick().await;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event).await,
                _ = retry.tick() => {
                    if self.behind == Some(true) {
                        self.reserve();
                    }
                }
            }
        }
        for (_, waiters) in self.dials.drain() {
            for w in waiters {
                let _ = w.send(Err(Error::State("the network is stopped".into())));
            }
        }
        let peers: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
        for peer in peers {
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        lock(&self.info).peers.clear();
        tracing::info!("network stopped");
    }

    /// Decides again whether this node is behind a NAT and what it announces, after its
    /// addresses changed: switches relay serving and relay reservations accordingly and
    /// publishes the announced addresses.
    fn refresh(&mut self) {
        let listen = lock(&self.info).listen.clone();
        let behind = behind_nat(self.mode, &self.nat, &listen, &self.mapped);
        if self.behind != Some(behind) {
            self.behind = Some(behind);
            let serve = !behind && self.mode != RelayMode::Never;
            let status = if serve {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            };
            self.swarm.behaviour_mut().relay.set_status(Some(status));
            if behind {
                if self.relays.is_empty() {
                    tracing::warn!(
                        "this node seems unreachable directly (no public or mapped listen \
                         address) and has no bootstrap node to use as a relay"
                    );
                } else {
                    tracing::info!(
                        relays = ?self.relays,
                        "this node seems unreachable directly; reserving a relay slot"
                    );
                }
                self.reserve();
            } else {
                for (id, _) in self.relay_listeners.drain() {
                    self.swarm.remove_listener(id);
                }
                self.relayed.clear();
            }
        }
        let announce = announce_addrs(&listen, &self.nat, &self.mapped, &self.relayed);
        // A relay answers reservations with its external addresses: those of a node that
        // serves are its direct announced addresses (UPnP confirms mapped ones itself).
        let external: Vec<Multiaddr> = if behind {
            Vec::new()
        } else {
            announce
                .iter()
                .filter(|a| !is_relayed(a))
                .cloned()
                .collect()
        };
        let added = std::mem::take(&mut self.added_external);
        for old in added.iter().filter(|a| !external.contains(a)) {
            self.swarm.remove_external_address(old);
        }
        for a in external.iter().filter(|a| !added.contains(a)) {
            self.swarm.add_external_address(a.clone());
        }
        self.added_external = external;
        let mut info = lock(&self.info);
        info.behind_nat = behind;
        if info.announce != announce {
            tracing::debug!(?announce, "announced addresses changed");
            info.announce = announce.clone();
            drop(info);
            self.announce_tx.send_replace(announce);
        }
    }

    /// Asks for a reservation on every relay that has none (held or under way). A relay
    /// not connected yet is dialled first: the reservation follows once it is (the relay
    /// client's own dial would give way to any dial of the same peer under way).
    fn reserve(&mut self) {
        for relay in self.relays.clone() {
            if self.relay_listeners.values().any(|r| r == &relay) {
                continue;
            }
            let Some(Protocol::P2p(peer)) = relay.iter().last() else {
                continue;
            };
            if !self.swarm.is_connected(&peer) {
                let opts = DialOpts::peer_id(peer)
                    .addresses(vec![relay.clone()])
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    tracing::trace!(%relay, "dialling the relay: {e}");
                }
                continue;
            }
            match self
                .swarm
                .listen_on(relay.clone().with(Protocol::P2pCircuit))
            {
                Ok(id) => {
                    self.relay_listeners.insert(id, relay);
                }
                Err(e) => tracing::debug!(%relay, "cannot reserve a relay slot: {e}"),
            }
        }
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                match self.swarm.dial(opts) {
                    // A dial of this peer is under way (a relay being reached): its outcome
                    // answers this one too.
                    Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {
                        self.dials.entry(peer).or_default().push(reply)
                    }
                    Err(e) => {
                        let _ = reply.send(Err(Error::Network(format!("cannot dial {peer}: {e}"))));
                    }
                }
            }
            Command::Disconnect(peer) => {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
    }

    async fn event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                connection_id,
                ..
            } => {
                let connected = lock(&self.info).peers.len();
                if num_established.get() == 1 && connected >= self.max_peers {
                    tracing::debug!(peer = %peer_id, "max-peers reached; closing connection");
                    self.swarm.close_connection(connection_id);
                    self.answer_dial(peer_id, Err(Error::Network("max-peers reached".into())));
                    return;
                }
                let addr = match endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    // A relayed connection's remote address is the bare peer ID: show
                    // the circuit it came through.
                    ConnectedPoint::Listener { local_addr, .. } if is_relayed(&local_addr) => {
                        local_addr
                    }
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                if is_relayed(&addr) {
                    tracing::debug!(peer = %peer_id, %addr, "relayed connection");
                } else if self.behind == Some(true)
                    && self
                        .relays
                        .iter()
                        .any(|r| r.iter().last() == Some(Protocol::P2p(peer_id)))
                {
                    self.reserve();
                }
                self.conns.insert(connection_id, (peer_id, addr.clone()));
                lock(&self.info)
                    .peers
                    .entry(peer_id)
                    .or_default()
                    .push(addr);
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, "peer connected");
                    let _ = self.events.send(PeerEvent::Connected(peer_id)).await;
                }
                self.answer_dial(peer_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                let Some((_, addr)) = self.conns.remove(&connection_id) else {
                    return;
                };
                let known = {
                    let mut info = lock(&self.info);
                    if let Some(addrs) = info.peers.get_mut(&peer_id) {
                        if let Some(i) = addrs.iter().position(|a| a == &addr) {
                            addrs.remove(i);
                        }
                    }
                    num_established == 0 && info.peers.remove(&peer_id).is_some()
                };
                if known {
                    tracing::debug!(peer = %peer_id, "peer disconnected");
                    let _ = self.events.send(PeerEvent::Disconnected(peer_id)).await;
                }
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } if !self.swarm.is_connected(&peer) => {
                self.answer_dial(
                    peer,
                    Err(Error::Network(format!("cannot connect to {peer}: {error}"))),
                );
            }
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                if self.relay_listeners.contains_key(&listener_id) || is_relayed(&address) {
                    tracing::info!(%address, "relay slot reserved; announcing the relayed address");
                    if !self.relayed.contains(&address) {
                        self.relayed.push(address);
                    }
                } else {
                    let mut info = lock(&self.info);
                    if !info.listen.contains(&address) {
                        info.listen.push(address);
                    }
                }
                self.refresh();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.relayed.retain(|a| a != &address);
                lock(&self.info).listen.retain(|a| a != &address);
                self.refresh();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                addresses,
                reason,
            } => {
                if let Some(relay) = self.relay_listeners.remove(&listener_id) {
                    self.relayed.retain(|a| !addresses.contains(a));
                    match reason {
                        Err(e) if self.warned.insert(relay.clone()) => tracing::warn!(
                            %relay,
                            "no relay slot on this node: {e}; retrying every {} s",
                            RESERVE_RETRY.as_secs()
                        ),
                        Err(e) => tracing::debug!(%relay, "no relay slot: {e}"),
                        Ok(()) => tracing::debug!(%relay, "relay reservation ended"),
                    }
                    self.refresh();
                }
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::debug!(%address, "external address confirmed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Upnp(e)) => self.upnp(e),
            SwarmEvent::Behaviour(BehaviourEvent::RelayClient(e)) => match e {
                relay::client::Event::ReservationReqAccepted {
                    relay_peer_id,
                    renewal: false,
                    limit,
                } => {
                    tracing::debug!(relay = %relay_peer_id, ?limit, "relay reservation accepted");
                }
                e => tracing::trace!(?e, "relay client"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Relay(e)) => {
                tracing::debug!(?e, "relay server");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            })) => match result {
                Ok(_) => {
                    tracing::info!(peer = %remote_peer_id, "direct connection through hole punching")
                }
                Err(e) => tracing::debug!(peer = %remote_peer_id, "hole punching failed: {e}"),
            },
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                tracing::debug!(peer = %peer_id, agent = %info.agent_version, "identified");
            }
            _ => {}
        }
    }

    fn upnp(&mut self, e: upnp::Event) {
        match e {
            upnp::Event::NewExternalAddr { external_addr, .. } => {
                tracing::info!(address = %external_addr, "UPnP mapped a listen port");
                if !self.mapped.contains(&external_addr) {
                    self.mapped.push(external_addr);
                }
                self.refresh();
            }
            upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                tracing::info!(address = %external_addr, "UPnP port mapping expired");
                self.mapped.retain(|a| a != &external_addr);
                self.refresh();
            }
            upnp::Event::GatewayNotFound => tracing::debug!("no UPnP gateway found"),
            upnp::Event::NonRoutableGateway => {
                tracing::debug!("the UPnP gateway has no public address itself")
            }
        }
    }

    fn answer_dial(&mut self, peer: PeerId, result: Result<()>) {
        if let Some(waiters) = self.dials.remove(&peer) {
            for w in waiters {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(Error::Network(e.to_string())),
                };
                let _ = w.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn a_wildcard_listener_has_every_interface_address_on_start() {
        let (events, _rx) = mpsc::channel(16);
        let host = Host::start(
            Keypair::generate_secp256k1(),
            HostConfig {
                listen: addrs(&["/ip4/0.0.0.0/tcp/0", "/ip4/127.0.0.1/tcp/0"]),
                max_peers: 8,
                agent: "test".into(),
                nat: Nat::None,
                relay: RelayMode::Never,
                relays: Vec::new(),
            },
            events,
        )
        .await
        .unwrap();
        let at_start = host.info().listen;
        // Both listeners are up, the explicit one among them.
        assert!(
            at_start
                .iter()
                .filter(|a| a.to_string().starts_with("/ip4/127.0.0.1/"))
                .count()
                >= 2,
            "{at_start:?}"
        );
        // Nothing the wildcard listener reports later was missing at start (on a machine
        // with an interface besides loopback, its address came in after the first one).
        tokio::time::sleep(Duration::from_millis(700)).await;
        let later = host.info().listen;
        assert_eq!(at_start.len(), later.len(), "{at_start:?} then {later:?}");
        host.shutdown().await;
    }

    #[test]
    fn extip_replaces_the_listen_ip_in_announced_addresses() {
        let listen = addrs(&[
            "/ip4/127.0.0.1/tcp/8070",
            "/ip4/192.168.1.5/tcp/8070",
            "/ip6/::1/tcp/8071",
        ]);
        let ext = Nat::ExtIp("203.0.113.7".parse().unwrap());
        // Both IPv4 addresses become one; the IPv6 one is of another family and stays.
        assert_eq!(
            announce_addrs(&listen, &ext, &[], &[]),
            addrs(&["/ip4/203.0.113.7/tcp/8070", "/ip6/::1/tcp/8071"])
        );
        let ext6 = Nat::ExtIp("2001:db8::1".parse().unwrap());
        assert_eq!(
            announce_addrs(&listen[2..], &ext6, &[], &[]),
            addrs(&["/ip6/2001:db8::1/tcp/8071"])
        );
        // Without extip the listen addresses are announced as they are.
        assert_eq!(announce_addrs(&listen, &Nat::Any, &[], &[]), listen);
    }

    #[test]
    fn mapped_addresses_come_first_and_relayed_ones_last() {
        let listen = addrs(&["/ip4/192.168.1.5/tcp/8070"]);
        let mapped = addrs(&["/ip4/198.51.100.9/tcp/41000"]);
        let relayed = addrs(&[
            "/ip4/198.51.100.1/tcp/8070/p2p/16Uiu2HAkvpvw7Q5SwQ63KrhtmePZrT2Lf3hhM4y2VY8smrG4MzQf/p2p-circuit",
        ]);
        assert_eq!(
            announce_addrs(&listen, &Nat::Upnp, &mapped, &relayed),
            [mapped.clone(), listen.clone(), relayed.clone()].concat()
        );
        assert_eq!(
            announce_addrs(&[], &Nat::Any, &[], &relayed),
            relayed.clone()
        );
    }

    #[test]
    fn who_counts_as_behind_a_nat() {
        let lan = addrs(&["/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.5/tcp/1"]);
        let cgnat = addrs(&["/ip4/100.72.0.3/tcp/1"]);
        let ula = addrs(&["/ip6/fd00::5/tcp/1"]);
        let public = addrs(&["/ip4/127.0.0.1/tcp/1", "/ip4/198.51.100.9/tcp/1"]);
        let loopback = addrs(&["/ip4/127.0.0.1/tcp/1"]);
        let mapped = addrs(&["/ip4/198.51.100.9/tcp/41000"]);
        let auto = |nat: &Nat, listen: &[Multiaddr], mapped: &[Multiaddr]| {
            behind_nat(RelayMode::Auto, nat, listen, mapped)
        };
        // No listener at all: nobody can dial in, whatever `nat` says.
        assert!(auto(&Nat::None, &[], &[]));
        // Only private addresses, NAT traversal on, nothing mapped.
        assert!(auto(&Nat::Any, &lan, &[]));
        assert!(auto(&Nat::Pmp, &cgnat, &[]));
        assert!(auto(&Nat::Upnp, &ula, &[]));
        // A mapping, `extip` or `nat = none` make the node reachable.
        assert!(!auto(&Nat::Any, &lan, &mapped));
        assert!(!auto(
            &Nat::ExtIp("198.51.100.9".parse().unwrap()),
            &lan,
            &[]
        ));
        assert!(!auto(&Nat::None, &lan, &[]));
        // A public address, or only loopback (a local test bed).
        assert!(!auto(&Nat::Any, &public, &[]));
        assert!(!auto(&Nat::Any, &loopback, &[]));
        // The config key overrides the guess.
        assert!(behind_nat(RelayMode::Always, &Nat::None, &public, &[]));
        assert!(!behind_nat(RelayMode::Never, &Nat::Any, &[], &[]));
    }

    #[test]
    fn relay_limits_let_a_large_transfer_through() {
        let c = relay_limits();
        assert!(c.max_circuit_bytes >= 2 << 30);
        assert!(c.max_circuit_duration >= Duration::from_secs(3600));
        assert!(c.max_circuits <= 16 && c.max_reservations <= 64);
    }
}
