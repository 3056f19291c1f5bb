//! Protobuf messages of the Status community history archive, byte-compatible with
//! status-go.
//!
//! A community owner stores the Waku messages of the community's chats, packs each time
//! range into a [`WakuMessageArchive`], uploads it to Codex and records the upload in a
//! [`CodexWakuMessageArchiveIndex`] entry keyed by its [`archive_id`]. The index is uploaded
//! too, and its CID is announced to members in a [`CommunityMessageArchiveLink`] (application
//! message type [`COMMUNITY_MESSAGE_ARCHIVE_LINK`]) on the community's universal chat.
//!
//! Field numbers and types are those of status-go's `communities.proto` (package
//! `protobuf`), so the bytes are interchangeable with status-go's. status-go names the two
//! index messages `LogosStorageWakuMessageArchiveIndex(Metadata)`; names are not on the wire.
//!
//! ```
//! use codex_proto::{archive_id, CodexWakuMessageArchiveIndexMetadata, Message,
//!                   WakuMessageArchiveMetadata};
//!
//! let entry = CodexWakuMessageArchiveIndexMetadata {
//!     version: 0,
//!     metadata: Some(WakuMessageArchiveMetadata {
//!         from: 1_700_000_000,
//!         to: 1_700_604_800,
//!         content_topic: vec![codex_proto::topic("general").to_vec().into()],
//!         ..Default::default()
//!     }),
//!     cid: "zDvZRwzm...".into(),
//! };
//! let bytes = entry.encode_to_vec();
//! assert_eq!(CodexWakuMessageArchiveIndexMetadata::decode(&bytes[..])?, entry);
//! assert!(archive_id(&entry).starts_with("0x"));
//! # Ok::<(), codex_proto::DecodeError>(())
//! ```
//!
//! # Encoding
//! Encoding is deterministic: fields in field-number order, proto3 defaults (zero, empty)
//! omitted, and the index map in ascending key order (it is a [`BTreeMap`]), so an index
//! always encodes to the same bytes and, uploaded, to the same CID. status-go's
//! `proto.Marshal` writes map entries in Go's randomised map order (only its
//! `Deterministic` option sorts them, by key, as here); both orders decode to the same
//! index.
//!
//! # Generated code
//! The message types are generated from `proto/proto/*.proto` by protox and prost-build
//! and committed in `proto/src/generated/`; building this crate runs no code generation.
//! After editing a schema, run `scripts/regen-proto.sh` and commit the result;
//! `scripts/regen-proto.sh --check` fails when the committed code is stale.
//!
//! [`BTreeMap`]: std::collections::BTreeMap

#![deny(missing_docs)]
#![deny(unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]

/// The code prost-build generates from the schemas; see the crate docs.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod generated {
    include!("generated/protobuf.rs");
}

pub use bytes::Bytes;
pub use generated::{
    CodexWakuMessageArchiveIndex, CodexWakuMessageArchiveIndexMetadata,
    CommunityMessageArchiveLink, WakuMessage, WakuMessageArchive, WakuMessageArchiveMetadata,
};
pub use prost::{DecodeError, EncodeError, Message};

use sha3::{Digest, Keccak256};

/// The application message type of a [`CommunityMessageArchiveLink`]
/// (`ApplicationMetadataMessage.Type.COMMUNITY_MESSAGE_ARCHIVE_LINK` in status-go, the value
/// the magnet-link message had before it). A protobuf enum value, hence `i32`.
pub const COMMUNITY_MESSAGE_ARCHIVE_LINK: i32 = 43;

/// Length of a Waku content topic in bytes.
pub const TOPIC_LENGTH: usize = 4;

/// Keccak-256 of `data`: the legacy Keccak of Ethereum (`crypto.Keccak256` in status-go),
/// not the standardised SHA3-256, which pads differently and gives other digests.
pub fn keccak256(data: &[u8]) -> [u8; 32] {
    Keccak256::digest(data).into()
}

/// The archive ID of an index entry: `0x` followed by the lowercase hex Keccak-256 of the
/// entry's protobuf encoding (status-go's `crypto.Keccak256Hash(bytes).String()`).
///
/// It is the key of the entry in [`CodexWakuMessageArchiveIndex::archives`].
pub fn archive_id(entry: &CodexWakuMessageArchiveIndexMetadata) -> String {
    hex_0x(&keccak256(&entry.encode_to_vec()))
}

/// The Waku content topic of a chat: the first [`TOPIC_LENGTH`] bytes of the Keccak-256 of
/// the chat ID's UTF-8 bytes (status-go's `ToTopic`).
pub fn topic(chat_id: &str) -> [u8; TOPIC_LENGTH] {
    let digest = keccak256(chat_id.as_bytes());
    let mut topic = [0; TOPIC_LENGTH];
    topic.copy_from_slice(&digest[..TOPIC_LENGTH]);
    topic
}

/// The chat ID of a community's universal chat, `0x<community ID hex>-memberUpdate`, from
/// the community ID (its compressed public key, 33 bytes). status-go sends all of a
/// community's chats, and the archive link message, on this chat's topic
/// (`Community.UniversalChatID()`); [`universal_topic`] is that topic.
pub fn universal_chat_id(community_id: &[u8]) -> String {
    format!("{}-memberUpdate", hex_0x(community_id))
}

/// The content topic of a community's universal chat: [`topic`] of [`universal_chat_id`].
pub fn universal_topic(community_id: &[u8]) -> [u8; TOPIC_LENGTH] {
    topic(&universal_chat_id(community_id))
}

/// `0x` and the lowercase hex of `bytes`, like go-ethereum's `hexutil.Encode`: the form of
/// archive IDs and community IDs.
pub fn hex_0x(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 + 2 * bytes.len());
    out.push_str("0x");
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_prefixed() {
        assert_eq!(hex_0x(&[]), "0x");
        assert_eq!(hex_0x(&[0x00, 0x0f, 0xa0, 0xff]), "0x000fa0ff");
    }
}
