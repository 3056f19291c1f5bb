//! Archive IDs, content topics and the hash behind both: Keccak-256 as Ethereum and
//! status-go use it (the original Keccak padding), checked against published test vectors
//! and against values computed independently of this crate.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use codex_proto::{
    archive_id, keccak256, topic, universal_chat_id, universal_topic, Bytes,
    CodexWakuMessageArchiveIndex, CodexWakuMessageArchiveIndexMetadata, Message,
    WakuMessageArchiveMetadata,
};
use sha3::{Digest, Keccak256, Sha3_256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn keccak256_is_legacy_keccak_not_sha3() {
    // Ethereum's Keccak-256 test vectors.
    assert_eq!(
        hex(&keccak256(b"")),
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    );
    assert_eq!(
        hex(&keccak256(b"abc")),
        "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"
    );
    // FIPS 202 SHA3-256 of "" differs: same permutation, other padding.
    let sha3_empty = "a7ffc6f8bf1ed76651c14756a061d662f580ff4de43b49fa82d80a4b80f8434a";
    assert_eq!(hex(&Sha3_256::digest(b"")), sha3_empty);
    assert_ne!(hex(&keccak256(b"")), sha3_empty);
}

/// The 52-byte CID of the entry below.
const CID: &str = "zDvZRwzm2mK8kPGrDBZ3xz9J6F6Kq6Swh1cGvmFWQx4bsFdrzr2n";

/// An index entry's bytes, written field by field (as derived in `wire_encoding.rs`).
fn entry_wire() -> Vec<u8> {
    [
        &[0x12, 24][..],                       // metadata: field 2, 24 bytes
        &[0x10, 0x80, 0xE2, 0xCF, 0xAA, 0x06], // from 1_700_000_000
        &[0x18, 0x80, 0xD7, 0xF4, 0xAA, 0x06], // to 1_700_604_800
        &[0x22, 0x04, 0x01, 0x02, 0x03, 0x04], // contentTopic
        &[0x22, 0x04, 0xAA, 0xBB, 0xCC, 0xDD], // contentTopic
        &[0x1A, 52],                           // cid: field 3, 52 bytes
        CID.as_bytes(),
    ]
    .concat()
}

fn entry() -> CodexWakuMessageArchiveIndexMetadata {
    CodexWakuMessageArchiveIndexMetadata {
        version: 0,
        metadata: Some(WakuMessageArchiveMetadata {
            version: 0,
            from: 1_700_000_000,
            to: 1_700_604_800,
            content_topic: vec![
                Bytes::from_static(&[0x01, 0x02, 0x03, 0x04]),
                Bytes::from_static(&[0xAA, 0xBB, 0xCC, 0xDD]),
            ],
        }),
        cid: CID.into(),
    }
}

#[test]
fn archive_id_is_0x_and_keccak256_of_the_entry_encoding() {
    let entry = entry();
    assert_eq!(entry.encode_to_vec(), entry_wire());

    // Computed from the hand-written bytes with the hash crate directly...
    let expected = format!("0x{}", hex(&Keccak256::digest(entry_wire())));
    assert_eq!(archive_id(&entry), expected);
    // ...and with a separate Keccak implementation (a short Python one, checked against
    // hashlib's SHA3 with SHA3 padding and against the vectors above), over the same bytes.
    assert_eq!(
        archive_id(&entry),
        "0x7d7a8e5fbb29c6bbd2f4c29a7790bc70a2012a863c21b14c9c98fb0a459b1301"
    );
    assert_eq!(archive_id(&entry).len(), 2 + 64);
}

#[test]
fn archive_id_of_a_small_entry() {
    // metadata {from 1, to 2}, cid "a": 12 04 10 01 18 02 1A 01 61.
    let entry = CodexWakuMessageArchiveIndexMetadata {
        version: 0,
        metadata: Some(WakuMessageArchiveMetadata {
            from: 1,
            to: 2,
            ..Default::default()
        }),
        cid: "a".into(),
    };
    let wire = [0x12, 0x04, 0x10, 0x01, 0x18, 0x02, 0x1A, 0x01, b'a'];
    assert_eq!(entry.encode_to_vec(), wire);
    assert_eq!(
        archive_id(&entry),
        "0xde57534733d2b05ca6e6f1f9eeb67d7860aedd24ff7f95242c08d5391e89dc0c"
    );
    assert_eq!(
        archive_id(&entry),
        format!("0x{}", hex(&Keccak256::digest(wire)))
    );
}

#[test]
fn archive_id_changes_with_every_field() {
    let base = entry();
    let mut versioned = base.clone();
    versioned.version = 1;
    let mut other_cid = base.clone();
    other_cid.cid.push('x');
    let mut other_range = base.clone();
    other_range.metadata.as_mut().unwrap().to += 1;
    let ids = [&base, &versioned, &other_cid, &other_range].map(archive_id);
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
        }
    }
}

#[test]
fn index_keyed_by_archive_id_round_trips_stably() {
    let mut index = CodexWakuMessageArchiveIndex::default();
    for (from, cid) in [(3, "c"), (1, "a"), (2, "b")] {
        let entry = CodexWakuMessageArchiveIndexMetadata {
            version: 0,
            metadata: Some(WakuMessageArchiveMetadata {
                from,
                to: from + 604_800,
                ..Default::default()
            }),
            cid: cid.into(),
        };
        index.archives.insert(archive_id(&entry), entry);
    }
    let bytes = index.encode_to_vec();
    let decoded = CodexWakuMessageArchiveIndex::decode(&bytes[..]).unwrap();
    assert_eq!(decoded, index);
    // The member side recomputes each ID from its entry and finds the key.
    for (id, entry) in &decoded.archives {
        assert_eq!(&archive_id(entry), id);
    }
    assert_eq!(decoded.encode_to_vec(), bytes);
}

#[test]
fn topic_is_the_first_four_bytes_of_keccak256() {
    // Status's contact discovery topic, published as 0xf8946aac, is the topic of the chat
    // name "contact-discovery".
    assert_eq!(topic("contact-discovery"), [0xf8, 0x94, 0x6a, 0xac]);
    for chat_id in ["", "general", "0x02aa-memberUpdate"] {
        assert_eq!(topic(chat_id)[..], keccak256(chat_id.as_bytes())[..4]);
    }
}

#[test]
fn universal_chat_of_a_community() {
    // A community ID is a compressed secp256k1 public key: 33 bytes, 0x02 or 0x03 first.
    let mut community_id = [0u8; 33];
    community_id[0] = 0x02;
    for (i, b) in community_id.iter_mut().enumerate().skip(1) {
        *b = u8::try_from(i).unwrap() * 7;
    }
    let chat_id = universal_chat_id(&community_id);
    assert_eq!(
        chat_id,
        "0x02070e151c232a31383f464d545b626970777e858c939aa1a8afb6bdc4cbd2d9e0-memberUpdate"
    );
    assert_eq!(universal_topic(&community_id), topic(&chat_id));
    assert_eq!(
        universal_topic(&community_id)[..],
        Keccak256::digest(chat_id.as_bytes())[..4]
    );
}
