//! Provider records this node holds for others: content key → SPRs of the nodes that
//! announced it.
//!
//! As in the reference, a record lives 24 hours from its last announcement and a key
//! holds at most 200 providers; a peer's newer record (higher seq) replaces its older one.
//! Unlike the reference, memory is bounded overall: at most [`MAX_KEYS`] keys, the key
//! announced least recently goes first. Records are not kept across restarts; providers
//! announce again every 30 minutes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p_identity::PeerId;

use super::NodeId;
use crate::net::spr::Spr;

/// How long a record lives after its last announcement.
pub const TTL: Duration = Duration::from_secs(24 * 3600);
/// Providers kept per key.
pub const MAX_PER_KEY: usize = 200;
/// Keys kept.
pub const MAX_KEYS: usize = 10_000;

#[derive(Debug)]
struct Record {
    spr: Spr,
    expires: Instant,
}

#[derive(Debug)]
struct Key {
    providers: HashMap<PeerId, Record>,
    touched: Instant,
}

/// The provider records held.
#[derive(Debug, Default)]
pub struct Providers {
    keys: HashMap<NodeId, Key>,
}

impl Providers {
    /// Stores (or refreshes) `spr` as a provider of `key`.
    pub fn add(&mut self, key: NodeId, spr: Spr, now: Instant) {
        if !self.keys.contains_key(&key) && self.keys.len() >= MAX_KEYS {
            self.expire(now);
            if self.keys.len() >= MAX_KEYS {
                if let Some(oldest) = self
                    .keys
                    .iter()
                    .min_by_key(|(_, k)| k.touched)
                    .map(|(k, _)| *k)
                {
                    self.keys.remove(&oldest);
                }
            }
        }
        let entry = self.keys.entry(key).or_insert_with(|| Key {
            providers: HashMap::new(),
            touched: now,
        });
        entry.touched = now;
        let expires = now + TTL;
        match entry.providers.get_mut(&spr.peer_id()) {
            Some(r) => {
                if spr.seq() > r.spr.seq() {
                    r.spr = spr;
                }
                r.expires = expires;
            }
            None => {
                if entry.providers.len() >= MAX_PER_KEY {
                    // Make room by dropping the record closest to expiring.
                    if let Some(p) = entry
                        .providers
                        .iter()
                        .min_by_key(|(_, r)| r.expires)
                        .map(|(p, _)| *p)
                    {
                        entry.providers.remove(&p);
                    }
                }
                entry
                    .providers
                    .insert(spr.peer_id(), Record { spr, expires });
            }
        }
    }

    /// The live providers of `key`, the most recently announced first.
    pub fn get(&self, key: &NodeId, now: Instant) -> Vec<Spr> {
        let Some(k) = self.keys.get(key) else {
            return Vec::new();
        };
        let mut live: Vec<&Record> = k.providers.values().filter(|r| r.expires > now).collect();
        live.sort_by_key(|r| std::cmp::Reverse(r.expires));
        live.into_iter().map(|r| r.spr.clone()).collect()
    }

    /// Forgets `peer` as a provider of anything (its addresses did not answer).
    pub fn remove_peer(&mut self, peer: &PeerId) {
        for k in self.keys.values_mut() {
            k.providers.remove(peer);
        }
        self.keys.retain(|_, k| !k.providers.is_empty());
    }

    /// Drops expired records.
    pub fn expire(&mut self, now: Instant) {
        for k in self.keys.values_mut() {
            k.providers.retain(|_, r| r.expires > now);
        }
        self.keys.retain(|_, k| !k.providers.is_empty());
    }

    /// The number of keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use libp2p::Multiaddr;
    use libp2p_identity::Keypair;

    use super::*;
    use crate::net::spr;

    fn record(key: &Keypair, seq: u64) -> Spr {
        let a: Multiaddr = "/ip4/127.0.0.1/tcp/4000".parse().unwrap();
        spr::sign(key, seq, &[a]).unwrap()
    }

    #[test]
    fn records_expire_and_newer_ones_win() {
        let now = Instant::now();
        let mut p = Providers::default();
        let k = NodeId::random();
        let peer = Keypair::generate_secp256k1();
        p.add(k, record(&peer, 5), now);
        p.add(k, record(&peer, 3), now);
        assert_eq!(p.get(&k, now).len(), 1);
        assert_eq!(p.get(&k, now)[0].seq(), 5);
        p.add(k, record(&peer, 7), now);
        assert_eq!(p.get(&k, now)[0].seq(), 7);
        assert!(p.get(&k, now + TTL).is_empty());
        p.expire(now + TTL);
        assert!(p.is_empty());
    }

    #[test]
    fn a_key_holds_at_most_its_limit_and_removal_is_per_peer() {
        let now = Instant::now();
        let mut p = Providers::default();
        let k = NodeId::random();
        let peers: Vec<Keypair> = (0..MAX_PER_KEY + 5)
            .map(|_| Keypair::generate_secp256k1())
            .collect();
        for (i, peer) in peers.iter().enumerate() {
            p.add(k, record(peer, 1), now + Duration::from_millis(i as u64));
        }
        let held = p.get(&k, now);
        assert_eq!(held.len(), MAX_PER_KEY);
        // The earliest announcements made room.
        assert!(!held
            .iter()
            .any(|s| s.peer_id() == peers[0].public().to_peer_id()));
        let last = peers.last().unwrap().public().to_peer_id();
        assert!(held.iter().any(|s| s.peer_id() == last));
        p.remove_peer(&last);
        assert_eq!(p.get(&k, now).len(), MAX_PER_KEY - 1);
    }
}
