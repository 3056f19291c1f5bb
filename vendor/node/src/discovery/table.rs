//! The routing table: the nodes this node knows, by log distance from its own ID.
//!
//! 256 buckets of at most [`BUCKET_SIZE`] nodes (bucket `d - 1` holds the nodes at log
//! distance `d`), each with a replacement cache of [`REPLACEMENTS`]. The reference keeps a
//! split-bucket tree instead; what others can observe is the same: which nodes a FindNode
//! answer holds and which nodes are kept.
//!
//! Each node has a reliability score `seen`, as in the reference: 0 when learned from
//! another node, 1 after the first successful contact, then `0.9·seen + 0.1·outcome` per
//! request. Only nodes with `seen ≥ 1` are handed to others. Bootstrap nodes are never
//! removed.

use std::net::{IpAddr, SocketAddr};

use libp2p::multiaddr::Protocol;

use super::NodeId;
use crate::net::spr::Spr;

/// Nodes per bucket (Kademlia's k).
pub const BUCKET_SIZE: usize = 16;
/// Replacement candidates kept per bucket.
pub const REPLACEMENTS: usize = 8;

/// A node: its record, the key and UDP address taken from it, and what is known of it.
#[derive(Debug, Clone)]
pub struct Contact {
    /// The node's ID.
    pub id: NodeId,
    /// Its secp256k1 public key.
    pub key: k256::PublicKey,
    /// Its UDP contact address.
    pub addr: SocketAddr,
    /// The record it came from.
    pub spr: Spr,
}

impl Contact {
    /// A contact from a record: needs a secp256k1 key, an `/ip4` address and a `/udp` port
    /// (the first of each, as the reference reads them).
    pub fn from_spr(spr: Spr) -> Option<Self> {
        let key = spr_key(&spr)?;
        let addr = contact_addr(&spr)?;
        Some(Self {
            id: NodeId::from_peer_id(&spr.peer_id()),
            key,
            addr,
            spr,
        })
    }
}

/// The secp256k1 key of a record's peer (inside its identity peer ID).
pub fn spr_key(spr: &Spr) -> Option<k256::PublicKey> {
    let peer = spr.peer_id();
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return None;
    }
    super::crypto::parse_protobuf_key(mh.digest()).ok()
}

/// The UDP address of a record: the IPv4 address of the first address that starts with
/// `/ip4`, and the port of the first address whose second component is `/udp`.
pub fn contact_addr(spr: &Spr) -> Option<SocketAddr> {
    let ip = spr.addrs().iter().find_map(|a| match a.iter().next() {
        Some(Protocol::Ip4(ip)) => Some(ip),
        _ => None,
    })?;
    let port = spr.addrs().iter().find_map(|a| match a.iter().nth(1) {
        Some(Protocol::Udp(p)) => Some(p),
        _ => None,
    })?;
    Some(SocketAddr::new(IpAddr::V4(ip), port))
}

#[derive(Debug, Clone)]
struct Entry {
    contact: Contact,
    seen: f32,
    bootstrap: bool,
}

/// What [`Table::add`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new node in its bucket.
    Inserted,
    /// A known node; its record was replaced when the new one is newer.
    Known,
    /// The bucket is full: kept as a replacement candidate.
    Replacement,
    /// Our own ID.
    Own,
}

/// The routing table.
#[derive(Debug)]
pub struct Table {
    own: NodeId,
    /// Index `d - 1`: most recently successful node first.
    buckets: Vec<Vec<Entry>>,
    replacements: Vec<Vec<Contact>>,
}

impl Table {
    /// An empty table around `own`.
    pub fn new(own: NodeId) -> Self {
        Self {
            own,
            buckets: vec![Vec::new(); 256],
            replacements: vec![Vec::new(); 256],
        }
    }

    fn bucket(&self, id: &NodeId) -> Option<usize> {
        match self.own.log_distance(id) {
            0 => None,
            d => Some(usize::from(d) - 1),
        }
    }

    /// Adds a node (unseen), or updates a known one's record when `contact`'s is newer.
    pub fn add(&mut self, contact: Contact) -> Added {
        self.insert(contact, false, 0.0)
    }

    /// Adds a bootstrap node: never removed.
    pub fn add_bootstrap(&mut self, contact: Contact) -> Added {
        self.insert(contact, true, 0.0)
    }

    /// Adds a node that has just proven itself (a handshake whose record names the address
    /// it came from).
    pub fn add_seen(&mut self, contact: Contact) -> Added {
        let id = contact.id;
        let added = self.insert(contact, false, 1.0);
        if added == Added::Known {
            self.record_outcome(&id, true);
        }
        added
    }

    fn insert(&mut self, contact: Contact, bootstrap: bool, seen: f32) -> Added {
        let Some(b) = self.bucket(&contact.id) else {
            return Added::Own;
        };
        let bucket = &mut self.buckets[b];
        if let Some(e) = bucket.iter_mut().find(|e| e.contact.id == contact.id) {
            if contact.spr.seq() > e.contact.spr.seq() {
                e.contact = contact;
            }
            e.bootstrap |= bootstrap;
            return Added::Known;
        }
        if bucket.len() < BUCKET_SIZE {
            bucket.push(Entry {
                contact,
                seen,
                bootstrap,
            });
            return Added::Inserted;
        }
        let cache = &mut self.replacements[b];
        cache.retain(|c| c.id != contact.id);
        if cache.len() == REPLACEMENTS {
            cache.remove(0);
        }
        cache.push(contact);
        Added::Replacement
    }

    /// Records a request's outcome: success moves the node to its bucket's head.
    pub fn record_outcome(&mut self, id: &NodeId, ok: bool) {
        let Some(b) = self.bucket(id) else { return };
        let bucket = &mut self.buckets[b];
        let Some(i) = bucket.iter().position(|e| e.contact.id == *id) else {
            return;
        };
        let e = &mut bucket[i];
        e.seen = if e.seen == 0.0 && ok {
            1.0
        } else {
            0.9 * e.seen + if ok { 0.1 } else { 0.0 }
        };
        if ok {
            let e = bucket.remove(i);
            bucket.insert(0, e);
        }
    }

    /// After a failed request: removes the node when a replacement can take its place or
    /// its score is at most `threshold` (bootstrap nodes stay).
    pub fn replace(&mut self, id: &NodeId, threshold: f32) {
        let Some(b) = self.bucket(id) else { return };
        let Some(i) = self.buckets[b].iter().position(|e| e.contact.id == *id) else {
            return;
        };
        let e = &self.buckets[b][i];
        if e.bootstrap || (self.replacements[b].is_empty() && e.seen > threshold) {
            return;
        }
        self.buckets[b].remove(i);
        if let Some(c) = self.replacements[b].pop() {
            self.buckets[b].push(Entry {
                contact: c,
                seen: 0.0,
                bootstrap: false,
            });
        }
    }

    /// The node with this ID, if in a bucket.
    pub fn get(&self, id: &NodeId) -> Option<&Contact> {
        let b = self.bucket(id)?;
        self.buckets[b]
            .iter()
            .find(|e| e.contact.id == *id)
            .map(|e| &e.contact)
    }

    /// Up to `k` nodes closest to `target` with `seen ≥ min_seen`, closest first.
    pub fn closest(&self, target: &NodeId, k: usize, min_seen: f32) -> Vec<Contact> {
        let mut all: Vec<&Entry> = self
            .buckets
            .iter()
            .flatten()
            .filter(|e| e.seen >= min_seen)
            .collect();
        all.sort_by(|a, b| target.cmp_distance(&a.contact.id, &b.contact.id));
        all.into_iter().take(k).map(|e| e.contact.clone()).collect()
    }

    /// The answer to FindNode: up to [`BUCKET_SIZE`] proven nodes at the given log
    /// distances.
    pub fn at_distances(&self, distances: &[u16]) -> Vec<Contact> {
        let mut out = Vec::new();
        for d in distances {
            if *d == 0 || *d > 256 {
                continue;
            }
            let bucket = &self.buckets[usize::from(*d) - 1];
            for e in bucket.iter().filter(|e| e.seen >= 1.0) {
                if out.len() == BUCKET_SIZE {
                    return out;
                }
                out.push(e.contact.clone());
            }
        }
        out
    }

    /// The least recently successful node of a non-empty bucket chosen by `pick` (an
    /// index modulo the number of non-empty buckets): the node to ping next.
    pub fn stalest(&self, pick: usize) -> Option<Contact> {
        let full: Vec<&Vec<Entry>> = self.buckets.iter().filter(|b| !b.is_empty()).collect();
        if full.is_empty() {
            return None;
        }
        full[pick % full.len()].last().map(|e| e.contact.clone())
    }

    /// Every node, closest bucket first.
    pub fn nodes(&self) -> Vec<(Contact, f32)> {
        self.buckets
            .iter()
            .flatten()
            .map(|e| (e.contact.clone(), e.seen))
            .collect()
    }

    /// The number of nodes in buckets.
    pub fn len(&self) -> usize {
        self.buckets.iter().map(Vec::len).sum()
    }

    /// Whether no node is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use libp2p::Multiaddr;
    use libp2p_identity::Keypair;

    use super::*;
    use crate::net::spr;

    /// A contact with a fresh key at 127.0.0.1:`port`, record seq `seq`.
    pub(crate) fn contact(port: u16, seq: u64) -> (Keypair, Contact) {
        let key = Keypair::generate_secp256k1();
        let addr: Multiaddr = format!("/ip4/127.0.0.1/udp/{port}").parse().unwrap();
        let c = Contact::from_spr(spr::sign(&key, seq, &[addr]).unwrap()).unwrap();
        (key, c)
    }

    #[test]
    fn contact_addresses_follow_the_reference() {
        let key = Keypair::generate_secp256k1();
        let addrs: Vec<Multiaddr> = [
            "/ip4/10.0.0.1/tcp/4000",
            "/ip6/::1/udp/7",
            "/ip4/10.0.0.2/udp/9000",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        let s = spr::sign(&key, 1, &addrs).unwrap();
        // The first ip4 address, the first udp port (which here belongs to the ip6 one).
        assert_eq!(contact_addr(&s), Some("10.0.0.1:7".parse().unwrap()));
        let tcp_only = spr::sign(&key, 1, &addrs[..1]).unwrap();
        assert!(Contact::from_spr(tcp_only).is_none());
    }

    #[test]
    fn buckets_fill_then_overflow_into_replacements() {
        let own = NodeId([0; 32]);
        let mut t = Table::new(own);
        // Every random ID is at distance 256 from zero with probability 1/2; fill bucket 255.
        let mut far = Vec::new();
        while far.len() < BUCKET_SIZE + 3 {
            let (_, c) = contact(1000 + far.len() as u16, 1);
            if own.log_distance(&c.id) == 256 {
                far.push(c);
            }
        }
        for c in &far[..BUCKET_SIZE] {
            assert_eq!(t.add(c.clone()), Added::Inserted);
        }
        assert_eq!(t.add(far[BUCKET_SIZE].clone()), Added::Replacement);
        assert_eq!(t.add(far[0].clone()), Added::Known);
        assert_eq!(t.len(), BUCKET_SIZE);
        // Unseen nodes are not handed out; proven ones are.
        assert!(t.at_distances(&[256]).is_empty());
        t.record_outcome(&far[3].id, true);
        let given = t.at_distances(&[256]);
        assert_eq!(given.len(), 1);
        assert_eq!(given[0].id, far[3].id);
        // A failed node is replaced by the candidate.
        t.replace(&far[5].id, 0.0);
        assert!(t.get(&far[5].id).is_none());
        assert!(t.get(&far[BUCKET_SIZE].id).is_some());
        // A proven node with no candidate left stays after one failure at 0.5.
        t.record_outcome(&far[3].id, false);
        t.replace(&far[3].id, 0.5);
        assert!(t.get(&far[3].id).is_some());
    }

    #[test]
    fn newer_records_replace_older_ones_and_bootstrap_nodes_stay() {
        let (key, c) = contact(2000, 5);
        let mut t = Table::new(NodeId::random());
        t.add_bootstrap(c.clone());
        let addr: Multiaddr = "/ip4/127.0.0.1/udp/2001".parse().unwrap();
        let newer =
            Contact::from_spr(spr::sign(&key, 6, std::slice::from_ref(&addr)).unwrap()).unwrap();
        let older = Contact::from_spr(spr::sign(&key, 4, &[addr]).unwrap()).unwrap();
        t.add(older);
        assert_eq!(t.get(&c.id).unwrap().addr.port(), 2000);
        t.add(newer);
        assert_eq!(t.get(&c.id).unwrap().addr.port(), 2001);
        t.replace(&c.id, 1.0);
        assert!(t.get(&c.id).is_some());
    }

    #[test]
    fn closest_is_sorted_by_xor_distance() {
        let mut t = Table::new(NodeId::random());
        let contacts: Vec<Contact> = (0..40).map(|i| contact(3000 + i, 1).1).collect();
        for c in &contacts {
            t.add(c.clone());
        }
        let target = NodeId::random();
        let got = t.closest(&target, 5, 0.0);
        let mut ids: Vec<NodeId> = t.nodes().into_iter().map(|(c, _)| c.id).collect();
        ids.sort_by(|a, b| target.cmp_distance(a, b));
        assert_eq!(
            got.iter().map(|c| c.id).collect::<Vec<_>>(),
            ids[..5].to_vec()
        );
    }
}
