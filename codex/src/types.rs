//! Values the library returns, and the CID type.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// A Codex CID (CIDv1, SHA-256, base58btc text), checked before it reaches the library.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cid(String);

impl Cid {
    /// The text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Cid {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason: String| Error::InvalidCid {
            cid: s.to_owned(),
            reason,
        };
        let c = cid::Cid::try_from(s).map_err(|e| invalid(e.to_string()))?;
        if c.version() != cid::Version::V1 {
            return Err(invalid("not CIDv1".into()));
        }
        if c.hash().code() != 0x12 || c.hash().size() != 32 {
            return Err(invalid("not a SHA-256 multihash".into()));
        }
        if !matches!(c.codec(), 0xCD01..=0xCD03) {
            return Err(invalid(format!(
                "codec 0x{:x} is not a Codex codec",
                c.codec()
            )));
        }
        let text = c
            .to_string_of_base(cid::multibase::Base::Base58Btc)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self(text))
    }
}

impl TryFrom<String> for Cid {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

impl From<Cid> for String {
    fn from(c: Cid) -> String {
        c.0
    }
}

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A dataset's manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Manifest {
    /// Root of the dataset's Merkle tree.
    pub tree_cid: String,
    /// Unpadded size in bytes.
    pub dataset_size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// File name given at upload.
    pub filename: Option<String>,
    /// Mimetype derived from the file name.
    pub mimetype: Option<String>,
    /// Whether the dataset is erasure-coded.
    #[serde(default)]
    pub protected: bool,
}

/// A stored dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DatasetInfo {
    /// Its CID.
    pub cid: Cid,
    /// Its manifest.
    pub manifest: Manifest,
}

/// Quota figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Space {
    /// Blocks stored (manifests included).
    pub total_blocks: u64,
    /// The quota.
    pub quota_max_bytes: u64,
    /// Bytes used.
    pub quota_used_bytes: u64,
    /// Bytes reserved.
    pub quota_reserved_bytes: u64,
}

/// Debug information about the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct DebugInfo {
    /// Peer ID.
    pub id: String,
    /// Listening addresses.
    #[serde(default)]
    pub addrs: Vec<String>,
    /// Signed peer record.
    #[serde(default)]
    pub spr: String,
    /// Announced addresses.
    #[serde(default)]
    pub announce_addresses: Vec<String>,
    /// The discovery table, as the library reports it.
    #[serde(default)]
    pub table: serde_json::Value,
}

/// What a node knows of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PeerInfo {
    /// Peer ID.
    pub peer_id: String,
    /// Record sequence number.
    #[serde(default)]
    pub seq_no: u64,
    /// Known addresses.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// An event of the node, as JSON with its `type` field.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// The `type` field (`started`, `datasetStored`, …); empty when absent.
    pub kind: String,
    /// The whole event.
    pub json: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cids_are_checked_and_normalised() {
        let c: Cid = "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM"
            .parse()
            .unwrap();
        assert_eq!(
            c.as_str(),
            "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM"
        );
        for bad in ["", "x", "QmdfTbBqBPQ7VNxZEYEj14VmRuZBkqFbiwReogJgS1zR1n"] {
            assert!(bad.parse::<Cid>().is_err(), "{bad}");
        }
        let raw = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku";
        assert!(raw
            .parse::<Cid>()
            .unwrap_err()
            .to_string()
            .contains("codec"));
    }
}
