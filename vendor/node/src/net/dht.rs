//! The node's use of the discovery DHT: announcing what it stores and finding providers of
//! what it downloads.
//!
//! As the reference does, the node announces the manifest CID and the tree CID of every
//! dataset it holds: when an upload is stored, as soon as a download has its manifest, and
//! every 30 minutes for everything in the store (records live 24 hours). A download looks
//! for providers at once and then again, less and less often, while it runs; every
//! provider found is dialled over libp2p and joins the download like any connected peer.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use libp2p_identity::{Keypair, PeerId};
use tokio::sync::{broadcast, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::host::Host;
use super::spr::Spr;
use crate::config::{Nat, NodeConfig, DEFAULT_DISC_PORT};
use crate::discovery::{Discovery, DiscoveryConfig};
use crate::error::Result;
use crate::node::Event;
use crate::store::Store;
use crate::Cid;

/// How often everything stored is announced again.
const REANNOUNCE: Duration = Duration::from_secs(30 * 60);
/// First pause between provider searches of one download; it doubles up to [`SEEK_MAX`].
const SEEK_FIRST: Duration = Duration::from_secs(3);
/// Longest pause between provider searches of one download.
const SEEK_MAX: Duration = Duration::from_secs(60);

/// The DHT as the node uses it.
#[derive(Clone, Debug)]
pub struct Dht {
    discovery: Discovery,
    host: Arc<Host>,
    /// Wakes the announcing loop when the node's addresses changed.
    reannounce: Arc<Notify>,
}

impl Dht {
    /// Starts discovery on `disc-port` next to the started `host`. The UDP socket binds the
    /// listen addresses' IPv4 address when they all share one, else 0.0.0.0. When the
    /// default port is taken, a free one is used instead (an explicit `disc-port` must be
    /// free).
    pub async fn start(
        key: &Keypair,
        cfg: &NodeConfig,
        host: Arc<Host>,
        bootstrap: Vec<Spr>,
    ) -> Result<Self> {
        let info = host.info();
        let tcp_addrs = info.announce;
        let bind_ip = shared_ipv4(&info.listen).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let announce_ip = match cfg.nat {
            Nat::ExtIp(IpAddr::V4(ip)) => Some(ip),
            _ => announce_ipv4(&info.listen),
        };
        let port = cfg.disc_port.unwrap_or(DEFAULT_DISC_PORT);
        let dcfg = |port| DiscoveryConfig {
            bind: SocketAddr::new(IpAddr::V4(bind_ip), port),
            announce_ip,
            tcp_addrs: tcp_addrs.clone(),
            bootstrap: bootstrap.clone(),
            wait_for_port: cfg.disc_port.is_some(),
            ..DiscoveryConfig::default()
        };
        let discovery = match Discovery::start(key, dcfg(port)).await {
            Ok(d) => d,
            Err(e) if cfg.disc_port.is_none() => {
                warn!("{e}; using a free UDP port for discovery instead");
                Discovery::start(key, dcfg(0)).await?
            }
            Err(e) => return Err(e),
        };
        info!(addr = %discovery.local_addr(), "discovery listening");
        Ok(Self {
            discovery,
            host,
            reannounce: Arc::new(Notify::new()),
        })
    }

    /// Signs the node's records again whenever the announced addresses change, and then
    /// announces everything stored again so that provider records carry the new
    /// addresses; until `cancel`.
    pub async fn follow_addresses(
        self,
        key: Keypair,
        mut addrs: watch::Receiver<Vec<Multiaddr>>,
        cancel: CancellationToken,
    ) {
        let mut current = self.discovery.record().addrs().get(1..).map(<[_]>::to_vec);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = addrs.changed() => if changed.is_err() { return },
            }
            let new = addrs.borrow_and_update().clone();
            if current.as_ref() == Some(&new) {
                continue;
            }
            match self.discovery.update_tcp_addrs(&key, &new) {
                Ok(()) => {
                    info!(addrs = ?new, "addresses changed; record signed again");
                    current = Some(new);
                    self.reannounce.notify_one();
                }
                Err(e) => warn!("updating the node's record: {e}"),
            }
        }
    }

    /// The discovery service.
    pub fn discovery(&self) -> &Discovery {
        &self.discovery
    }

    /// Stops discovery.
    pub fn stop(&self) {
        self.discovery.stop();
    }

    /// Announces a dataset (its manifest and tree CIDs) in the background.
    pub fn announce(&self, manifest: Cid, tree: Cid) {
        let d = self.discovery.clone();
        tokio::spawn(async move {
            for cid in [manifest, tree] {
                let told = d.provide(&cid).await;
                if told == 0 {
                    debug!(%cid, "announced to no node (the DHT knows no other node yet)");
                }
            }
        });
    }

    /// Announces every dataset stored when one is stored, every 30 minutes and when the
    /// node's addresses changed, until `cancel`.
    pub async fn advertise(
        self,
        store: Arc<Store>,
        mut events: broadcast::Receiver<Event>,
        cancel: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(REANNOUNCE);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = async {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = self.reannounce.notified() => {}
                    }
                } => {
                    let s = Arc::clone(&store);
                    match tokio::task::spawn_blocking(move || s.list()).await {
                        Ok(Ok(list)) => {
                            for d in list {
                                self.announce(d.cid, d.manifest.tree_cid);
                            }
                        }
                        Ok(Err(e)) => warn!("listing datasets to announce: {e}"),
                        Err(e) => warn!("listing datasets to announce: {e}"),
                    }
                }
                e = events.recv() => match e {
                    Ok(Event::DatasetStored { cid, .. }) => {
                        let Ok(cid) = cid.parse::<Cid>() else { continue };
                        let s = Arc::clone(&store);
                        if let Ok(Ok(m)) =
                            tokio::task::spawn_blocking(move || s.manifest(&cid)).await
                        {
                            self.announce(cid, m.tree_cid);
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    /// Looks for providers of `cid` and dials those not connected: at once, then after 3 s,
    /// 6 s, … up to every minute, until `cancel`.
    pub async fn seek(self, cid: Cid, cancel: CancellationToken) {
        let mut pause = SEEK_FIRST;
        loop {
            let search = async {
                let found = self.discovery.find_providers(&cid).await;
                let connected = self.host.info().peers;
                for spr in found {
                    let peer = spr.peer_id();
                    if connected.contains_key(&peer) {
                        continue;
                    }
                    let addrs = tcp_addrs(&spr);
                    if addrs.is_empty() {
                        continue;
                    }
                    debug!(%cid, %peer, "dialling a provider found in the DHT");
                    if let Err(e) = self.host.dial(peer, addrs).await {
                        debug!(%peer, "provider unreachable: {e}");
                        self.discovery.forget_provider(&peer);
                    }
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = search => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(SEEK_MAX);
        }
    }

    /// The TCP addresses of `peer` from its DHT record.
    pub async fn find_peer(&self, peer: &PeerId) -> Option<Vec<Multiaddr>> {
        let spr = self.discovery.find_peer(peer).await?;
        Some(tcp_addrs(&spr))
    }
}

/// The addresses of a record that libp2p can dial (TCP).
pub fn tcp_addrs(spr: &Spr) -> Vec<Multiaddr> {
    spr.addrs()
        .iter()
        .filter(|a| a.iter().any(|p| matches!(p, Protocol::Tcp(_))))
        .cloned()
        .collect()
}

/// The IPv4 address every address has, if they agree on one that is not 0.0.0.0.
fn shared_ipv4(addrs: &[Multiaddr]) -> Option<Ipv4Addr> {
    let mut ips = addrs.iter().map(|a| match a.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(ip),
        _ => None,
    });
    let first = ips.next()??;
    (!first.is_unspecified() && ips.all(|ip| ip == Some(first))).then_some(first)
}

/// The IPv4 address to announce: the first one that is neither 0.0.0.0 nor loopback, else
/// the first loopback one.
fn announce_ipv4(addrs: &[Multiaddr]) -> Option<Ipv4Addr> {
    let v4: Vec<Ipv4Addr> = addrs
        .iter()
        .filter_map(|a| match a.iter().next() {
            Some(Protocol::Ip4(ip)) if !ip.is_unspecified() => Some(ip),
            _ => None,
        })
        .collect();
    v4.iter()
        .find(|ip| !ip.is_loopback())
        .or_else(|| v4.first())
        .copied()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn addrs(list: &[&str]) -> Vec<Multiaddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn the_socket_binds_the_listen_ip_and_announces_a_reachable_one() {
        let lo = addrs(&["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"]);
        assert_eq!(shared_ipv4(&lo), Some(Ipv4Addr::LOCALHOST));
        assert_eq!(announce_ipv4(&lo), Some(Ipv4Addr::LOCALHOST));
        let all = addrs(&["/ip4/127.0.0.1/tcp/1", "/ip4/192.168.1.5/tcp/1"]);
        assert_eq!(shared_ipv4(&all), None);
        assert_eq!(announce_ipv4(&all), Some(Ipv4Addr::new(192, 168, 1, 5)));
        assert_eq!(shared_ipv4(&addrs(&["/ip4/0.0.0.0/tcp/1"])), None);
        assert_eq!(announce_ipv4(&addrs(&["/ip6/::1/tcp/1"])), None);
    }
}
