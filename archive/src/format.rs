//! Archive and index bytes: encoding, optional encryption, decoding with checks, and the
//! Codex transfers that move them.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use codex::{Cid, CodexNode};
use codex_proto::{
    archive_id, CodexWakuMessageArchiveIndex, CodexWakuMessageArchiveIndexMetadata, Message,
    WakuMessageArchive,
};

use crate::crypto::CommunityCipher;
use crate::db::ArchiveRecord;
use crate::error::{Error, Result};

/// Index entries by archive ID.
pub(crate) type Entries = BTreeMap<String, CodexWakuMessageArchiveIndexMetadata>;

/// `plain`, encrypted when the community is.
pub(crate) fn seal(plain: Vec<u8>, cipher: Option<&CommunityCipher>) -> Result<Vec<u8>> {
    match cipher {
        Some(c) => c.encrypt(&plain),
        None => Ok(plain),
    }
}

/// Decodes an index. With a key, the data must decrypt (AES-GCM proves it was made with
/// the key); a plain index is accepted too, for a community that was public before. Without
/// a key the data must be a plain index.
pub(crate) fn open_index(
    data: &[u8],
    cipher: Option<&CommunityCipher>,
    cid: &str,
) -> Result<CodexWakuMessageArchiveIndex> {
    let what = format!("index {cid}");
    let plain = match cipher {
        Some(c) => match c.decrypt(data, &what) {
            Ok(p) => p,
            Err(e) => match CodexWakuMessageArchiveIndex::decode(data) {
                Ok(index) if !index.archives.is_empty() => return check_index(index, cid),
                _ => return Err(e),
            },
        },
        None => data.to_vec(),
    };
    let index = CodexWakuMessageArchiveIndex::decode(&plain[..])
        .map_err(|source| Error::Decode { what, source })?;
    check_index(index, cid)
}

/// Every entry must carry metadata and a CID, and hash to its key.
fn check_index(
    index: CodexWakuMessageArchiveIndex,
    cid: &str,
) -> Result<CodexWakuMessageArchiveIndex> {
    for (id, entry) in &index.archives {
        let bad = |reason: String| Error::InvalidIndex {
            cid: cid.into(),
            reason,
        };
        if archive_id(entry) != *id {
            return Err(bad(format!("entry {id} does not hash to its ID")));
        }
        let Some(m) = &entry.metadata else {
            return Err(bad(format!("entry {id} has no metadata")));
        };
        if m.from > m.to {
            return Err(bad(format!("entry {id} ends before it starts")));
        }
        entry
            .cid
            .parse::<Cid>()
            .map_err(|e| bad(format!("entry {id}: {e}")))?;
    }
    Ok(index)
}

/// Decodes an archive, decrypting it first when the community is encrypted.
pub(crate) fn open_archive(
    data: &[u8],
    cipher: Option<&CommunityCipher>,
    id: &str,
) -> Result<WakuMessageArchive> {
    let what = format!("archive {id}");
    let plain;
    let bytes = match cipher {
        Some(c) => {
            plain = c.decrypt(data, &what)?;
            &plain[..]
        }
        None => data,
    };
    WakuMessageArchive::decode(bytes).map_err(|source| Error::Decode { what, source })
}

/// The record of an index entry.
pub(crate) fn record(id: &str, entry: &CodexWakuMessageArchiveIndexMetadata) -> ArchiveRecord {
    let (from, to) = entry.metadata.as_ref().map_or((0, 0), |m| (m.from, m.to));
    ArchiveRecord {
        id: id.into(),
        cid: entry.cid.clone(),
        from,
        to,
        entry: entry.encode_to_vec(),
    }
}

/// The entries of records (their stored encodings).
pub(crate) fn entries_of(records: &[ArchiveRecord]) -> Entries {
    records
        .iter()
        .filter_map(|r| {
            let e = CodexWakuMessageArchiveIndexMetadata::decode(&r.entry[..]).ok()?;
            (archive_id(&e) == r.id).then(|| (r.id.clone(), e))
        })
        .collect()
}

/// Uploads `data` to the node; returns its CID.
pub(crate) async fn upload(node: &CodexNode, data: Vec<u8>, filename: &str) -> Result<String> {
    let cid = node.upload().filename(filename).bytes(data).await?;
    Ok(cid.to_string())
}

/// Limits of one download.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fetch {
    /// Largest dataset accepted.
    pub(crate) max_bytes: u64,
    /// Time allowed for the whole download.
    pub(crate) timeout: Duration,
    /// Only read what the node stores.
    pub(crate) local: bool,
}

/// Downloads dataset `cid` whole (from the node's store, or from peers when `local` is
/// false; what is fetched is stored, so the node serves it on at once).
pub(crate) async fn download(
    node: &CodexNode,
    cid: &str,
    what: &str,
    limits: Fetch,
) -> Result<Bytes> {
    let parsed: Cid = cid.parse()?;
    let work = async {
        let dl = node
            .download_with(&parsed)
            .local(limits.local)
            .start()
            .await?;
        let size = dl.manifest().dataset_size;
        if size > limits.max_bytes {
            return Err(Error::TooLarge {
                what: what.into(),
                cid: cid.into(),
                size,
                limit: limits.max_bytes,
            });
        }
        Ok(dl.bytes().await?)
    };
    match tokio::time::timeout(limits.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            what: what.into(),
            cid: cid.into(),
            secs: limits.timeout.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use codex_proto::WakuMessageArchiveMetadata;

    const CID: &str = "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM";

    fn index() -> CodexWakuMessageArchiveIndex {
        let entry = CodexWakuMessageArchiveIndexMetadata {
            version: 0,
            metadata: Some(WakuMessageArchiveMetadata {
                from: 10,
                to: 20,
                ..Default::default()
            }),
            cid: CID.into(),
        };
        CodexWakuMessageArchiveIndex {
            archives: [(archive_id(&entry), entry)].into_iter().collect(),
        }
    }

    #[test]
    fn indexes_open_plain_or_encrypted_and_are_checked() {
        let plain = index().encode_to_vec();
        assert_eq!(open_index(&plain, None, "i").unwrap(), index());
        let key = CommunityCipher::new(b"k");
        let sealed = seal(plain.clone(), Some(&key)).unwrap();
        assert_eq!(open_index(&sealed, Some(&key), "i").unwrap(), index());
        // A plain index is read by a member holding a key too.
        assert_eq!(open_index(&plain, Some(&key), "i").unwrap(), index());
        assert!(open_index(&sealed, None, "i").is_err());
        assert!(matches!(
            open_index(&sealed, Some(&CommunityCipher::new(b"x")), "i"),
            Err(Error::Decrypt { .. })
        ));
        // An entry whose key is not its hash.
        let mut forged = index();
        let (_, e) = forged.archives.pop_first().unwrap();
        forged.archives.insert("0x00".into(), e);
        assert!(matches!(
            open_index(&forged.encode_to_vec(), None, "i"),
            Err(Error::InvalidIndex { .. })
        ));
        // Not protobuf at all.
        assert!(open_index(b"\xff\xff\xff\xff", None, "i").is_err());
    }

    #[test]
    fn archives_open_with_the_right_key_only() {
        let a = WakuMessageArchive::default().encode_to_vec();
        let key = CommunityCipher::new(b"k");
        let sealed = seal(a.clone(), Some(&key)).unwrap();
        assert!(open_archive(&sealed, Some(&key), "a").is_ok());
        assert!(matches!(
            open_archive(&sealed, Some(&CommunityCipher::new(b"x")), "a"),
            Err(Error::Decrypt { .. })
        ));
        assert!(open_archive(&a, None, "a").is_ok());
    }
}
