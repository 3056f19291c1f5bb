//! Content identifiers as Codex uses them: CIDv1, SHA-256 multihash, printed base58btc.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// Multicodec of a manifest block.
pub const MANIFEST_CODEC: u64 = 0xCD01;
/// Multicodec of a data block.
pub const BLOCK_CODEC: u64 = 0xCD02;
/// Multicodec of a CodexTree root.
pub const TREE_CODEC: u64 = 0xCD03;
/// Multihash code of SHA-256.
pub const SHA256_CODE: u64 = 0x12;

/// A 32-byte SHA-256 digest.
pub type Digest32 = [u8; 32];

/// What a [`Cid`] addresses, from its multicodec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CidKind {
    /// A dataset manifest (`0xCD01`).
    Manifest,
    /// A data block (`0xCD02`).
    Block,
    /// A Merkle tree root (`0xCD03`).
    Tree,
}

/// Why a string or byte sequence is not a usable Codex CID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidError {
    /// Not a CID at all.
    #[error("malformed CID: {0}")]
    Malformed(String),
    /// A CID, but not CIDv1.
    #[error("unsupported CID version {0}: Codex uses CIDv1")]
    Version(u64),
    /// A CID whose multicodec is not one of Codex's.
    #[error("unsupported CID codec 0x{0:x}: expected a Codex manifest, block or tree")]
    Codec(u64),
    /// A CID whose multihash is not a 32-byte SHA-256.
    #[error("unsupported multihash 0x{0:x}: Codex uses 32-byte SHA-256")]
    Hash(u64),
}

/// A validated Codex CID: version 1, SHA-256, one of the three Codex codecs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cid(cid::Cid);

impl Cid {
    /// The CID of `kind` whose multihash is the SHA-256 digest `digest`.
    pub fn from_digest(kind: CidKind, digest: Digest32) -> Self {
        let codec = match kind {
            CidKind::Manifest => MANIFEST_CODEC,
            CidKind::Block => BLOCK_CODEC,
            CidKind::Tree => TREE_CODEC,
        };
        // A 32-byte digest always fits the 64-byte multihash, so wrap cannot fail.
        let mh = cid::multihash::Multihash::<64>::wrap(SHA256_CODE, &digest)
            .unwrap_or_else(|_| unreachable!("32-byte digest fits a 64-byte multihash"));
        Self(cid::Cid::new_v1(codec, mh))
    }

    /// The CID of `kind` for `data`, hashed with SHA-256.
    pub fn hash_of(kind: CidKind, data: &[u8]) -> Self {
        Self::from_digest(kind, Sha256::digest(data).into())
    }

    /// Parses the binary form of a CID.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CidError> {
        let c = cid::Cid::try_from(bytes).map_err(|e| CidError::Malformed(e.to_string()))?;
        Self::validate(c)
    }

    fn validate(c: cid::Cid) -> Result<Self, CidError> {
        if c.version() != cid::Version::V1 {
            return Err(CidError::Version(c.version().into()));
        }
        if !matches!(c.codec(), MANIFEST_CODEC | BLOCK_CODEC | TREE_CODEC) {
            return Err(CidError::Codec(c.codec()));
        }
        if c.hash().code() != SHA256_CODE || c.hash().size() != 32 {
            return Err(CidError::Hash(c.hash().code()));
        }
        Ok(Self(c))
    }

    /// What this CID addresses.
    pub fn kind(&self) -> CidKind {
        match self.0.codec() {
            MANIFEST_CODEC => CidKind::Manifest,
            BLOCK_CODEC => CidKind::Block,
            _ => CidKind::Tree,
        }
    }

    /// The 32-byte SHA-256 digest this CID carries.
    pub fn digest(&self) -> Digest32 {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.0.hash().digest());
        d
    }

    /// The binary form (version, codec, multihash).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.0.to_bytes()
    }

    /// Whether `data` hashes to this CID's digest.
    pub fn matches(&self, data: &[u8]) -> bool {
        let d: Digest32 = Sha256::digest(data).into();
        d == self.digest()
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self
            .0
            .to_string_of_base(cid::multibase::Base::Base58Btc)
            .map_err(|_| fmt::Error)?;
        f.write_str(&s)
    }
}

impl fmt::Debug for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cid({self})")
    }
}

impl FromStr for Cid {
    type Err = CidError;

    fn from_str(s: &str) -> Result<Self, CidError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(CidError::Malformed("empty string".into()));
        }
        let c = cid::Cid::try_from(s).map_err(|e| CidError::Malformed(format!("{s:?}: {e}")))?;
        Self::validate(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_text_and_bytes() {
        let c = Cid::hash_of(CidKind::Block, b"abc");
        let s = c.to_string();
        assert!(s.starts_with('z'), "base58btc text form: {s}");
        assert_eq!(s.parse::<Cid>().unwrap(), c);
        assert_eq!(Cid::from_bytes(&c.to_bytes()).unwrap(), c);
        assert_eq!(c.kind(), CidKind::Block);
        assert!(c.matches(b"abc"));
        assert!(!c.matches(b"abd"));
    }

    #[test]
    fn codec_varints_are_the_codex_ones() {
        let m = Cid::hash_of(CidKind::Manifest, b"x").to_bytes();
        let b = Cid::hash_of(CidKind::Block, b"x").to_bytes();
        let t = Cid::hash_of(CidKind::Tree, b"x").to_bytes();
        assert_eq!(&m[..4], &[0x01, 0x81, 0x9a, 0x03]);
        assert_eq!(&b[..4], &[0x01, 0x82, 0x9a, 0x03]);
        assert_eq!(&t[..4], &[0x01, 0x83, 0x9a, 0x03]);
        assert_eq!(&t[4..6], &[0x12, 0x20]);
    }

    #[test]
    fn rejects_garbage_and_foreign_cids() {
        assert!(matches!("".parse::<Cid>(), Err(CidError::Malformed(_))));
        assert!(matches!(
            "not a cid".parse::<Cid>(),
            Err(CidError::Malformed(_))
        ));
        assert!(matches!(
            "zzzzzz".parse::<Cid>(),
            Err(CidError::Malformed(_))
        ));
        // CIDv0 (an IPFS dag-pb hash).
        let v0 = "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n";
        assert!(matches!(v0.parse::<Cid>(), Err(CidError::Version(0))));
        // CIDv1 raw codec (0x55).
        let raw = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
        assert!(matches!(raw.parse::<Cid>(), Err(CidError::Codec(0x55))));
    }
}
