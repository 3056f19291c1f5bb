//! The dataset manifest: the block that a dataset CID names.

use serde::Serialize;

use crate::cid::{Cid, CidKind, BLOCK_CODEC, SHA256_CODE};
use crate::pb::{self, DecodeError, Fields};

/// The CID version ordinal the reference writes (Nim's `CIDv1` enum ordinal).
const CID_VERSION_ORDINAL: u64 = 2;

/// A (non erasure-coded) dataset manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Root of the CodexTree over the dataset's blocks.
    pub tree_cid: Cid,
    /// Block size in bytes.
    pub block_size: u64,
    /// Unpadded dataset size in bytes.
    pub dataset_size: u64,
    /// Base name of the uploaded file, when given.
    pub filename: Option<String>,
    /// Mimetype derived from the file name, when known.
    pub mimetype: Option<String>,
}

/// Why a manifest block is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not a valid encoding.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A field with an impossible value.
    #[error("invalid manifest: {0}")]
    Invalid(&'static str),
    /// Erasure-coded manifests belong to the marketplace, which this node does not run.
    #[error("protected (erasure-coded) manifests are not supported")]
    Protected,
}

impl Manifest {
    /// The number of blocks in the dataset.
    pub fn blocks(&self) -> u64 {
        self.dataset_size.div_ceil(self.block_size)
    }

    /// The exact bytes the reference writes.
    pub fn encode(&self) -> Vec<u8> {
        let mut header = Vec::with_capacity(96);
        pb::put_bytes(&mut header, 1, &self.tree_cid.to_bytes());
        pb::put_uint(&mut header, 2, self.block_size);
        pb::put_uint(&mut header, 3, self.dataset_size);
        pb::put_uint(&mut header, 4, BLOCK_CODEC);
        pb::put_uint(&mut header, 5, SHA256_CODE);
        pb::put_uint(&mut header, 6, CID_VERSION_ORDINAL);
        if let Some(f) = &self.filename {
            pb::put_bytes(&mut header, 8, f.as_bytes());
        }
        if let Some(m) = &self.mimetype {
            pb::put_bytes(&mut header, 9, m.as_bytes());
        }
        let mut outer = Vec::with_capacity(header.len() + 3);
        pb::put_bytes(&mut outer, 1, &header);
        outer
    }

    /// The manifest CID (`0xCD01` over the encoding).
    pub fn cid(&self) -> Cid {
        Cid::hash_of(CidKind::Manifest, &self.encode())
    }

    /// Decodes and validates a manifest block.
    pub fn decode(buf: &[u8]) -> Result<Self, ManifestError> {
        let mut header = None;
        for f in Fields::new(buf) {
            if let (1, v) = f? {
                header = Some(v.bytes("manifest header")?);
            }
        }
        let header = header.ok_or(ManifestError::Invalid("no header"))?;
        let (mut tree, mut block_size, mut size) = (None, 0, 0);
        let (mut filename, mut mimetype) = (None, None);
        for f in Fields::new(header) {
            match f? {
                (1, v) => tree = Some(v.bytes("treeCid")?),
                (2, v) => block_size = v.uint("blockSize")?,
                (3, v) => size = v.uint("datasetSize")?,
                (4, v) if v.uint("codec")? != BLOCK_CODEC => {
                    return Err(ManifestError::Invalid("block codec is not codex-block"))
                }
                (5, v) if v.uint("hcodec")? != SHA256_CODE => {
                    return Err(ManifestError::Invalid("hash is not SHA-256"))
                }
                (7, _) => return Err(ManifestError::Protected),
                (8, v) => filename = Some(utf8(v.bytes("filename")?)?),
                (9, v) => mimetype = Some(utf8(v.bytes("mimetype")?)?),
                _ => {}
            }
        }
        let tree = tree.ok_or(ManifestError::Invalid("no treeCid"))?;
        let tree_cid =
            Cid::from_bytes(tree).map_err(|_| ManifestError::Invalid("treeCid is not a CID"))?;
        if tree_cid.kind() != CidKind::Tree {
            return Err(ManifestError::Invalid("treeCid is not a tree CID"));
        }
        if block_size == 0 || block_size > crate::MAX_BLOCK_SIZE as u64 {
            return Err(ManifestError::Invalid("block size out of range"));
        }
        if size == 0 {
            return Err(ManifestError::Invalid("empty dataset"));
        }
        Ok(Self {
            tree_cid,
            block_size,
            dataset_size: size,
            filename,
            mimetype,
        })
    }

    /// The JSON object of the C ABI.
    pub fn to_json(&self) -> ManifestJson {
        ManifestJson {
            tree_cid: self.tree_cid.to_string(),
            dataset_size: self.dataset_size,
            block_size: self.block_size,
            filename: self.filename.clone(),
            mimetype: self.mimetype.clone(),
            protected: false,
        }
    }
}

fn utf8(b: &[u8]) -> Result<String, ManifestError> {
    String::from_utf8(b.to_vec()).map_err(|_| ManifestError::Invalid("text field is not UTF-8"))
}

/// A manifest as the C ABI prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManifestJson {
    /// Tree CID, base58btc.
    pub tree_cid: String,
    /// Unpadded size.
    pub dataset_size: u64,
    /// Block size.
    pub block_size: u64,
    /// File name or null.
    pub filename: Option<String>,
    /// Mimetype or null.
    pub mimetype: Option<String>,
    /// Always false here.
    pub protected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_cid() -> Cid {
        "zDzSvJTezk7bJNQqFq8k1iHXY84psNuUfZVusA5bBQQUSuyzDSVL"
            .parse()
            .unwrap()
    }

    #[test]
    fn encodes_the_documented_bytes() {
        let m = Manifest {
            tree_cid: tree_cid(),
            block_size: 65536,
            dataset_size: 18,
            filename: None,
            mimetype: None,
        };
        let mut expect = vec![0x0a, 0x36, 0x0a, 0x26];
        expect.extend(tree_cid().to_bytes());
        expect.extend([0x10, 0x80, 0x80, 0x04, 0x18, 0x12, 0x20, 0x82, 0x9a, 0x03]);
        expect.extend([0x28, 0x12, 0x30, 0x02]);
        assert_eq!(m.encode(), expect);
        assert_eq!(
            m.cid().to_string(),
            "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy"
        );
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn filename_and_mimetype_round_trip() {
        let m = Manifest {
            tree_cid: tree_cid(),
            block_size: 1024,
            dataset_size: 5000,
            filename: Some("a.txt".into()),
            mimetype: Some("text/plain".into()),
        };
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.blocks(), 5);
        let json = serde_json::to_value(m.to_json()).unwrap();
        assert_eq!(json["treeCid"], tree_cid().to_string());
        assert_eq!(json["datasetSize"], 5000);
        assert_eq!(json["protected"], false);
    }

    #[test]
    fn hostile_manifests_are_rejected() {
        assert!(Manifest::decode(b"").is_err());
        assert!(Manifest::decode(b"\x0a\x02\x10\x00").is_err());
        assert!(Manifest::decode(&[0x0a, 0x40, 0x01]).is_err());
        let mut m = Manifest {
            tree_cid: tree_cid(),
            block_size: 0,
            dataset_size: 1,
            filename: None,
            mimetype: None,
        };
        assert!(Manifest::decode(&m.encode()).is_err());
        m.block_size = 64;
        m.dataset_size = 0;
        assert!(Manifest::decode(&m.encode()).is_err());
        // A block CID where the tree CID belongs.
        m.dataset_size = 1;
        m.tree_cid = Cid::hash_of(CidKind::Block, b"x");
        assert!(Manifest::decode(&m.encode()).is_err());
    }
}
