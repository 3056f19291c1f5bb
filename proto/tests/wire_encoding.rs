//! Byte compatibility with status-go: each message encodes to wire bytes written out by hand
//! here from the protobuf encoding rules (a tag is `field_number << 3 | wire_type`, wire
//! type 0 for varints and 2 for length-delimited fields; varints are little-endian groups of
//! 7 bits, the high bit set on all but the last; proto3 leaves zero and empty fields out;
//! a map is a repeated field of entry messages with the key as field 1 and the value as
//! field 2). Every encoding decodes back to the message, and garbage decodes to an error.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use codex_proto::{
    Bytes, CodexWakuMessageArchiveIndex, CodexWakuMessageArchiveIndexMetadata,
    CommunityMessageArchiveLink, Message, WakuMessage, WakuMessageArchive,
    WakuMessageArchiveMetadata,
};

/// The concatenation of `parts`, so that each expected encoding reads field by field.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Encodes `msg`, checks the bytes, and checks they decode back to `msg`.
fn assert_wire<M: Message + Default + PartialEq + std::fmt::Debug>(msg: &M, expected: &[u8]) {
    let encoded = msg.encode_to_vec();
    assert_eq!(encoded, expected, "encoding of {msg:?}");
    assert_eq!(msg.encoded_len(), expected.len());
    assert_eq!(
        &M::decode(expected).unwrap(),
        msg,
        "decoding of {expected:02x?}"
    );
}

// 1_700_000_000 = 0x6553_F100 in 7-bit groups from the low end: 0x00, 0x62, 0x4F, 0x2A, 0x06.
const VARINT_1_700_000_000: &[u8] = &[0x80, 0xE2, 0xCF, 0xAA, 0x06];
// 1_700_604_800 (a week later) = 0x655D_2B80: groups 0x00, 0x57, 0x74, 0x2A, 0x06.
const VARINT_1_700_604_800: &[u8] = &[0x80, 0xD7, 0xF4, 0xAA, 0x06];

fn metadata_two_topics() -> WakuMessageArchiveMetadata {
    WakuMessageArchiveMetadata {
        version: 0,
        from: 1_700_000_000,
        to: 1_700_604_800,
        content_topic: vec![
            Bytes::from_static(&[0x01, 0x02, 0x03, 0x04]),
            Bytes::from_static(&[0xAA, 0xBB, 0xCC, 0xDD]),
        ],
    }
}

fn metadata_two_topics_wire() -> Vec<u8> {
    cat(&[
        // version 0: left out
        &[0x10], // from: field 2, varint
        VARINT_1_700_000_000,
        &[0x18], // to: field 3, varint
        VARINT_1_700_604_800,
        &[0x22, 0x04, 0x01, 0x02, 0x03, 0x04], // contentTopic: field 4, length 4
        &[0x22, 0x04, 0xAA, 0xBB, 0xCC, 0xDD], // a repeated field repeats its tag
    ])
}

#[test]
fn waku_message_with_all_seven_fields() {
    let msg = WakuMessage {
        sig: Bytes::from_static(&[0xAA, 0xBB]),
        timestamp: 1_700_000_000,
        topic: Bytes::from_static(&[0x01, 0x02, 0x03, 0x04]),
        payload: Bytes::from_static(b"hi"),
        padding: Bytes::from_static(&[0x00]),
        hash: Bytes::from_static(&[0xDE, 0xAD]),
        third_party_id: "tp".into(),
    };
    let expected = cat(&[
        &[0x0A, 0x02, 0xAA, 0xBB], // sig: field 1, length-delimited (1 << 3 | 2)
        &[0x10],                   // timestamp: field 2, varint (2 << 3 | 0)
        VARINT_1_700_000_000,
        &[0x1A, 0x04, 0x01, 0x02, 0x03, 0x04], // topic: field 3
        &[0x22, 0x02, b'h', b'i'],             // payload: field 4
        &[0x2A, 0x01, 0x00],                   // padding: field 5, one zero byte is not empty
        &[0x32, 0x02, 0xDE, 0xAD],             // hash: field 6
        &[0x3A, 0x02, b't', b'p'],             // thirdPartyId: field 7
    ]);
    assert_wire(&msg, &expected);
}

#[test]
fn proto3_leaves_default_fields_out() {
    assert_wire(&WakuMessage::default(), &[]);
    assert_wire(&WakuMessageArchiveMetadata::default(), &[]);
    assert_wire(&WakuMessageArchive::default(), &[]);
    assert_wire(&CodexWakuMessageArchiveIndexMetadata::default(), &[]);
    assert_wire(&CodexWakuMessageArchiveIndex::default(), &[]);
    assert_wire(&CommunityMessageArchiveLink::default(), &[]);

    // Only the non-default fields: timestamp 300 = 0b10_0101100 -> 0xAC, 0x02.
    let msg = WakuMessage {
        timestamp: 300,
        hash: Bytes::from_static(&[0x01]),
        ..Default::default()
    };
    assert_wire(&msg, &[0x10, 0xAC, 0x02, 0x32, 0x01, 0x01]);

    // A set version is written; a present but empty sub-message is written as length 0.
    let meta = WakuMessageArchiveMetadata {
        version: 1,
        ..Default::default()
    };
    assert_wire(&meta, &[0x08, 0x01]);
    let archive = WakuMessageArchive {
        metadata: Some(WakuMessageArchiveMetadata::default()),
        ..Default::default()
    };
    assert_wire(&archive, &[0x12, 0x00]);
}

#[test]
fn archive_metadata_with_two_topics() {
    assert_wire(&metadata_two_topics(), &metadata_two_topics_wire());
    assert_eq!(metadata_two_topics_wire().len(), 24);
}

#[test]
fn archive_with_metadata_and_two_messages() {
    let archive = WakuMessageArchive {
        version: 0,
        metadata: Some(WakuMessageArchiveMetadata {
            from: 1,
            to: 2,
            content_topic: vec![Bytes::from_static(&[0x01, 0x02, 0x03, 0x04])],
            ..Default::default()
        }),
        messages: vec![
            WakuMessage {
                timestamp: 1,
                payload: Bytes::from_static(b"a"),
                ..Default::default()
            },
            WakuMessage {
                timestamp: 1,
                payload: Bytes::from_static(b"b"),
                ..Default::default()
            },
        ],
    };
    let expected = cat(&[
        // metadata: field 2, a 10-byte message
        &[0x12, 0x0A],
        &[0x10, 0x01, 0x18, 0x02, 0x22, 0x04, 0x01, 0x02, 0x03, 0x04],
        // messages: field 3, once per message, 5 bytes each
        &[0x1A, 0x05, 0x10, 0x01, 0x22, 0x01, b'a'],
        &[0x1A, 0x05, 0x10, 0x01, 0x22, 0x01, b'b'],
    ]);
    assert_wire(&archive, &expected);
}

#[test]
fn index_entry() {
    let entry = CodexWakuMessageArchiveIndexMetadata {
        version: 0,
        metadata: Some(metadata_two_topics()),
        cid: "zDvZRwzm2mK8kPGrDBZ3xz9J6F6Kq6Swh1cGvmFWQx4bsFdrzr2n".into(),
    };
    let expected = cat(&[
        &[0x12, 24], // metadata: field 2, 24 bytes
        &metadata_two_topics_wire(),
        &[0x1A, 52], // cid: field 3, 52 bytes
        b"zDvZRwzm2mK8kPGrDBZ3xz9J6F6Kq6Swh1cGvmFWQx4bsFdrzr2n",
    ]);
    assert_wire(&entry, &expected);
}

/// The index entries of the two-entry index tests, and their encodings.
fn entry(from: u64, cid: &str) -> CodexWakuMessageArchiveIndexMetadata {
    CodexWakuMessageArchiveIndexMetadata {
        version: 0,
        metadata: Some(WakuMessageArchiveMetadata {
            from,
            to: from + 1,
            ..Default::default()
        }),
        cid: cid.into(),
    }
}

// One map entry, field 1 of the index: an entry message of 17 bytes holding the key
// (field 1, 4 bytes: 6 bytes in all) and the value (field 2, 9 bytes: 11 bytes in all).
const WIRE_ENTRY_AA: &[u8] = &[
    0x0A, 0x11, // archives: field 1, 17 bytes
    0x0A, 0x04, b'0', b'x', b'a', b'a', // key: field 1
    0x12, 0x09, // value: field 2, 9 bytes
    0x12, 0x04, 0x10, 0x01, 0x18, 0x02, // metadata {from 1, to 2}
    0x1A, 0x01, b'a', // cid "a"
];
const WIRE_ENTRY_BB: &[u8] = &[
    0x0A, 0x11, //
    0x0A, 0x04, b'0', b'x', b'b', b'b', //
    0x12, 0x09, //
    0x12, 0x04, 0x10, 0x02, 0x18, 0x03, // metadata {from 2, to 3}
    0x1A, 0x01, b'b', // cid "b"
];

#[test]
fn index_with_two_entries_is_in_ascending_key_order() {
    // Inserted in descending order: the encoding does not depend on insertion order.
    let mut index = CodexWakuMessageArchiveIndex::default();
    index.archives.insert("0xbb".into(), entry(2, "b"));
    index.archives.insert("0xaa".into(), entry(1, "a"));
    assert_wire(&index, &cat(&[WIRE_ENTRY_AA, WIRE_ENTRY_BB]));
}

#[test]
fn index_keys_are_ordered_bytewise() {
    // Byte order, as Go's deterministic marshalling sorts strings: "0xB" (0x42) < "0xa"
    // (0x61), and a prefix comes before its extensions.
    let mut index = CodexWakuMessageArchiveIndex::default();
    for key in ["0xa", "0xB", "0xab", "0x"] {
        index.archives.insert(key.into(), entry(1, "c"));
    }
    let order: Vec<_> = index.archives.keys().map(String::as_str).collect();
    assert_eq!(order, ["0x", "0xB", "0xa", "0xab"]);

    let decoded = CodexWakuMessageArchiveIndex::decode(&index.encode_to_vec()[..]).unwrap();
    assert_eq!(decoded, index);
    assert_eq!(decoded.encode_to_vec(), index.encode_to_vec());
}

#[test]
fn index_in_any_entry_order_decodes_to_the_same_index() {
    // status-go's proto.Marshal writes map entries in Go's random map order; whatever the
    // order, the index is the same, and re-encoding it gives our canonical order.
    let go_order = cat(&[WIRE_ENTRY_BB, WIRE_ENTRY_AA]);
    let index = CodexWakuMessageArchiveIndex::decode(&go_order[..]).unwrap();
    assert_eq!(index.archives.len(), 2);
    assert_eq!(index.archives["0xaa"], entry(1, "a"));
    assert_eq!(index.archives["0xbb"], entry(2, "b"));
    assert_eq!(index.encode_to_vec(), cat(&[WIRE_ENTRY_AA, WIRE_ENTRY_BB]));
}

#[test]
fn map_entry_with_a_default_value() {
    // The one place where prost and Go's encoder differ: Go writes every map entry's key and
    // value even when they are defaults (`12 00` for an empty value message), prost leaves
    // them out like other proto3 fields. Real index entries always carry a CID and
    // metadata, so both write the same bytes for them; both forms decode to the same map.
    let mut index = CodexWakuMessageArchiveIndex::default();
    index
        .archives
        .insert("k".into(), CodexWakuMessageArchiveIndexMetadata::default());
    assert_wire(&index, &[0x0A, 0x03, 0x0A, 0x01, b'k']);

    let go_bytes = [0x0A, 0x05, 0x0A, 0x01, b'k', 0x12, 0x00];
    assert_eq!(
        CodexWakuMessageArchiveIndex::decode(&go_bytes[..]).unwrap(),
        index
    );
}

#[test]
fn archive_link() {
    // 1_700_000_000_123 ms = 0x18B_CFE5_687B: groups 0x7B, 0x50, 0x15, 0x7F, 0x3C, 0x31.
    let link = CommunityMessageArchiveLink {
        clock: 1_700_000_000_123,
        archive_link: "zDvZ".into(),
    };
    let expected = cat(&[
        &[0x08, 0xFB, 0xD0, 0x95, 0xFF, 0xBC, 0x31], // clock: field 1, varint
        &[0x12, 0x04, b'z', b'D', b'v', b'Z'],       // archive_link: field 2
    ]);
    assert_wire(&link, &expected);
    assert_eq!(codex_proto::COMMUNITY_MESSAGE_ARCHIVE_LINK, 43);
}

#[test]
fn unknown_fields_are_skipped() {
    // A newer writer's field 9 (varint) and field 10 (bytes) before a known field.
    let bytes = [0x48, 0x05, 0x52, 0x01, 0xFF, 0x08, 0x07];
    let link = CommunityMessageArchiveLink::decode(&bytes[..]).unwrap();
    assert_eq!(link.clock, 7);
}

#[test]
fn big_archive_round_trips() {
    let archive = WakuMessageArchive {
        version: 0,
        metadata: Some(metadata_two_topics()),
        messages: (0..1000u32)
            .map(|i| WakuMessage {
                sig: Bytes::from(i.to_le_bytes().repeat(16)),
                timestamp: 1_700_000_000 + u64::from(i),
                topic: Bytes::from_static(&[0x01, 0x02, 0x03, 0x04]),
                payload: Bytes::from(vec![u8::try_from(i % 251).unwrap(); (i % 300) as usize]),
                padding: Bytes::new(),
                hash: Bytes::from(i.to_be_bytes().repeat(8)),
                third_party_id: if i % 2 == 0 {
                    String::new()
                } else {
                    format!("id-{i}")
                },
            })
            .collect(),
    };
    let bytes = archive.encode_to_vec();
    assert_eq!(bytes.len(), archive.encoded_len());
    let decoded = WakuMessageArchive::decode(Bytes::from(bytes)).unwrap();
    assert_eq!(decoded, archive);
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    let cases: &[(&str, &[u8])] = &[
        ("varint that never ends", &[0x10, 0xFF, 0xFF, 0xFF]),
        (
            "varint longer than 10 bytes",
            &[
                0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01,
            ],
        ),
        ("length past the end", &[0x0A, 0x05, 0x01]),
        ("invalid wire type 7", &[0x0F]),
        ("field number 0", &[0x00, 0x01]),
        ("varint field sent as bytes", &[0x12, 0x01, 0x00]),
        ("string that is not UTF-8", &[0x3A, 0x02, 0xC3, 0x28]),
    ];
    for (what, bytes) in cases {
        assert!(WakuMessage::decode(*bytes).is_err(), "{what}: {bytes:02x?}");
    }
    // Nested: the index entry's value is truncated, then a key that is not UTF-8.
    assert!(
        CodexWakuMessageArchiveIndex::decode(&WIRE_ENTRY_AA[..WIRE_ENTRY_AA.len() - 1]).is_err()
    );
    assert!(CodexWakuMessageArchiveIndex::decode(&[0x0A, 0x03, 0x0A, 0x01, 0xFF][..]).is_err());
    // Wrong message type: an index read as an archive (field 1 is a varint there).
    assert!(WakuMessageArchive::decode(WIRE_ENTRY_AA).is_err());
}

#[test]
fn random_bytes_never_panic() {
    // xorshift64*: deterministic, so a failure reproduces.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut errors = 0;
    for _ in 0..5000 {
        let len = (next() % 64) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        errors += usize::from(WakuMessageArchive::decode(&bytes[..]).is_err());
        let _ = CodexWakuMessageArchiveIndex::decode(&bytes[..]);
        let _ = CommunityMessageArchiveLink::decode(&bytes[..]);
    }
    assert!(errors > 0, "random bytes should mostly fail to decode");
}
