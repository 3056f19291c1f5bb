//! Discovery: the Codex DHT, a UDP fork of discv5 that finds nodes and content providers.
//!
//! Wire-compatible with the reference (`logos-storage-nim-dht`): discv5 5.1's packet
//! layer (`"discv5"`, masked headers, WHOAREYOU handshakes, AES-GCM sessions) with SPRs in
//! place of ENRs, protobuf messages, a DER identity signature over a double SHA-256, and
//! four extra messages: AddProvider, GetProviders, Providers and FindNodeFast.
//!
//! - A node's ID is the Keccak-256 of its libp2p peer ID bytes ([`NodeId::from_peer_id`]).
//! - Content is keyed by the Keccak-256 of its binary CID ([`NodeId::from_cid`]). A node
//!   announces the manifest CID and the tree CID of every dataset it holds, with an SPR of
//!   its TCP addresses; a downloader asks the nodes closest to the key for providers and
//!   dials the addresses in their SPRs.
//!
//! Layers: [`crypto`] (keys, signatures, ciphers), [`packet`] (datagrams), [`messages`]
//! (plaintexts), [`table`] (the routing table), [`providers`] (records held for others)
//! and [`service`] (the socket, sessions, requests and lookups).

pub mod crypto;
pub mod messages;
pub mod packet;
pub mod providers;
pub mod service;
pub mod table;

use std::cmp::Ordering;
use std::fmt;

use libp2p_identity::PeerId;
use sha3::{Digest, Keccak256};

pub use service::{Discovery, DiscoveryConfig};

/// A 256-bit node ID or content key, big-endian.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub [u8; 32]);

impl NodeId {
    /// The ID of a peer: Keccak-256 of its peer ID's multihash bytes.
    pub fn from_peer_id(peer: &PeerId) -> Self {
        Self(Keccak256::digest(peer.to_bytes()).into())
    }

    /// The ID of the node with this secp256k1 key.
    pub fn from_public_key(key: &k256::PublicKey) -> Self {
        // The peer ID of a key this short is the identity multihash of its protobuf form.
        let mut bytes = vec![0x00, 37];
        bytes.extend_from_slice(&crypto::protobuf_key(key));
        Self(Keccak256::digest(&bytes).into())
    }

    /// The content key of a CID: Keccak-256 of the binary CID.
    pub fn from_cid(cid: &crate::Cid) -> Self {
        Self(Keccak256::digest(cid.to_bytes()).into())
    }

    /// The log distance to `other`: the bit length of `self XOR other` (0 when equal).
    pub fn log_distance(&self, other: &NodeId) -> u16 {
        for (i, (a, b)) in self.0.iter().zip(other.0.iter()).enumerate() {
            let x = a ^ b;
            if x != 0 {
                return (256 - i * 8 - x.leading_zeros() as usize) as u16;
            }
        }
        0
    }

    /// Orders `a` and `b` by XOR distance to `self`.
    pub fn cmp_distance(&self, a: &NodeId, b: &NodeId) -> Ordering {
        for i in 0..32 {
            let (x, y) = (a.0[i] ^ self.0[i], b.0[i] ^ self.0[i]);
            if x != y {
                return x.cmp(&y);
            }
        }
        Ordering::Equal
    }

    /// A random ID.
    pub fn random() -> Self {
        Self(rand_bytes())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// `N` random bytes from the operating system's generator.
pub(crate) fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut out);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn small(v: u64) -> NodeId {
        let mut id = [0u8; 32];
        id[24..].copy_from_slice(&v.to_be_bytes());
        NodeId(id)
    }

    #[test]
    fn log_distances_of_the_reference_tests() {
        let zero = small(0);
        for (v, d) in [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 2),
            (4, 3),
            (7, 3),
            (8, 4),
            (0xf, 4),
            (0x80, 8),
            (0xff, 8),
            (0x100, 9),
            (0x1ff, 9),
            (0x8000, 16),
            (0xffff, 16),
        ] {
            assert_eq!(zero.log_distance(&small(v)), d, "{v:#x}");
        }
        let mut top = [0u8; 32];
        top[0] = 0x80;
        assert_eq!(zero.log_distance(&NodeId(top)), 256);
    }

    #[test]
    fn node_id_of_a_key_hashes_its_peer_id() {
        // "Distance check with keys" in tests/discv5/test_discoveryv5.nim.
        let key = k256::PublicKey::from_sec1_bytes(&crypto::tests_hex(
            "045d485bdcbe9bc89314a10ae9231e429d33853e3a8fa2af39f5f827370a2e4185e344ace5d16237491dad41f278f1d3785210d29ace76cd627b9147ee340b1125",
        ))
        .unwrap();
        let id = NodeId::from_public_key(&key);
        assert_eq!(
            id.to_string(),
            "c92c707bdcbdf5109c66de68e8f26adec1527d075e0f93df0ad21c72e98b7a4d"
        );
        for (private, d) in [
            (
                "14a98db9b46a831d67eff29f3b85b1b485bb12ae9796aea98d91be3dc78d8a91",
                248,
            ),
            (
                "29738ba0c1a4397d6a65f292eee07f02df8e58d41594ba2be3cf84ce0fc58169",
                252,
            ),
            (
                "ce1435a956a98ffec484cd11489c4f165cf1606819ab6b521cee440f0c677e9e",
                253,
            ),
            (
                "a30599b12827b69120633f15b98a7f6bc9fc2e9a0fd6ae2ebb767c0e64d743ab",
                254,
            ),
            (
                "d09e5eaeec0fd596236faed210e55ef45112409a5aa7f3276d26646080dcfaeb",
                255,
            ),
            (
                "511b1686e4e58a917f7f848e9bf5539d206a68f5ad6b54b552c2399fe7d174ae",
                256,
            ),
        ] {
            let sk = k256::SecretKey::from_slice(&crypto::tests_hex(private)).unwrap();
            assert_eq!(
                id.log_distance(&NodeId::from_public_key(&sk.public_key())),
                d
            );
        }
        // The same ID from the libp2p peer ID.
        let lp =
            libp2p_identity::secp256k1::PublicKey::try_from_bytes(&key.to_sec1_bytes()).unwrap();
        let peer = libp2p_identity::PublicKey::from(lp).to_peer_id();
        assert_eq!(NodeId::from_peer_id(&peer), id);
    }

    #[test]
    fn content_keys_of_the_vector_cids() {
        for (cid, key) in [
            (
                "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy",
                "9c2340e844ea7c4a8bfbe9f81b97b5374d853afe11de4a1f1c204bffd2919a23",
            ),
            (
                "zDzSvJTezk7bJNQqFq8k1iHXY84psNuUfZVusA5bBQQUSuyzDSVL",
                "9e072aa2d60ffc02499eaa38a4754188c878eacfaa2db90d833898e399d77368",
            ),
            (
                "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM",
                "777d0521f139740e844e8a4cf7721107203e2ef9462ca5c1d67dc5dd16d2c64a",
            ),
        ] {
            let cid: crate::Cid = cid.parse().unwrap();
            assert_eq!(NodeId::from_cid(&cid).to_string(), key);
        }
    }
}
