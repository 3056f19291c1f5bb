//! The libp2p host: TCP, Noise, mplex `/mplex/6.7.0`, identify (without a rust-libp2p signed
//! record, which the reference rejects), and raw streams for the block exchange.
//!
//! The swarm runs in one task on the node's runtime. Others talk to it through [`Host`]:
//! commands in, peer connection events out.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::identify;
use libp2p::swarm::{dial_opts::DialOpts, NetworkBehaviour, SwarmEvent};
use libp2p::{noise, tcp, Multiaddr, PeerId, Swarm};
use libp2p_identity::Keypair;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::store::lock;

/// The identify protocol version string the reference sends.
const PROTOCOL_VERSION: &str = "ipfs/0.1.0";

/// How long a dial may take before it is reported failed.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// Host settings, from the node's configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Most peers connected at once; further connections are closed.
    pub max_peers: u32,
    /// Identify's agent version.
    pub agent: String,
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
    /// Addresses the host listens on.
    pub listen: Vec<Multiaddr>,
    /// Connected peers and the address of one connection each.
    pub peers: HashMap<PeerId, Multiaddr>,
}

/// A running libp2p host. Dropping it (or [`Host::shutdown`]) closes every connection.
pub struct Host {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    control: libp2p_stream::Control,
    info: Arc<Mutex<HostInfo>>,
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
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                mplex_config,
            )
            .map_err(|e| Error::Network(format!("setting up TCP/Noise/mplex: {e}")))?
            .with_behaviour(|_| Behaviour {
                identify,
                stream: libp2p_stream::Behaviour::new(),
            })
            .map_err(|e| Error::Network(format!("setting up the host: {e}")))?
            // The reference keeps idle connections up; so do we.
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
            .build();
        let control = swarm.behaviour().stream.new_control();
        for addr in &cfg.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| Error::Network(format!("listening on {addr}: {e}")))?;
        }
        // Wait for every listener to be up (or fail), so addresses are known on return.
        let mut listening = Vec::new();
        while listening.len() < cfg.listen.len() {
            match tokio::time::timeout(Duration::from_secs(10), swarm.select_next_some()).await {
                Ok(SwarmEvent::NewListenAddr { address, .. }) => listening.push(address),
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
        let info = Arc::new(Mutex::new(HostInfo {
            listen: listening,
            peers: HashMap::new(),
        }));
        let (commands, rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            Driver {
                swarm,
                commands: rx,
                events,
                info: Arc::clone(&info),
                dials: HashMap::new(),
                max_peers: cfg.max_peers.max(1) as usize,
                stop: stop.clone(),
            }
            .run(),
        );
        tracing::info!(%peer_id, addrs = ?lock(&info).listen, "network started");
        Ok(Self {
            peer_id,
            commands,
            control,
            info,
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

    /// Listening addresses and connected peers.
    pub fn info(&self) -> HostInfo {
        lock(&self.info).clone()
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

/// mplex as the reference speaks it, sized for block transfers: large buffers that apply
/// backpressure instead of resetting streams.
fn mplex_config() -> libp2p_mplex::Config {
    let mut cfg = libp2p_mplex::Config::new();
    cfg.set_max_num_streams(256)
        .set_max_buffer_size(256)
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
}

impl Driver {
    async fn run(mut self) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => break,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.event(event).await,
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

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { peer, addrs, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(()));
                    return;
                }
                let opts = DialOpts::peer_id(peer).addresses(addrs).build();
                match self.swarm.dial(opts) {
                    Ok(()) => self.dials.entry(peer).or_default().push(reply),
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
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                lock(&self.info).peers.insert(peer_id, addr);
                if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, "peer connected");
                    let _ = self.events.send(PeerEvent::Connected(peer_id)).await;
                }
                self.answer_dial(peer_id, Ok(()));
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let known = lock(&self.info).peers.remove(&peer_id).is_some();
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
            SwarmEvent::NewListenAddr { address, .. } => {
                let mut info = lock(&self.info);
                if !info.listen.contains(&address) {
                    info.listen.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                lock(&self.info).listen.retain(|a| a != &address);
            }
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
