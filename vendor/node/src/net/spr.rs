//! Signed Peer Records (SPRs): how a Codex node tells others who it is and where to reach it.
//!
//! An SPR is a libp2p signed envelope (RFC 0002) signed for the domain `libp2p-peer-record`
//! with payload type `03 01`, whose payload is a libp2p `PeerRecord` (RFC 0003):
//!
//! ```text
//! Envelope   { 1: public_key (libp2p PublicKey protobuf), 2: payload_type, 3: payload, 5: signature }
//! PeerRecord { 1: peer_id (bytes), 2: seq (uint64), 3: repeated AddressInfo { 1: multiaddr (bytes) } }
//! ```
//!
//! The signature covers `varint(len) ‖ domain ‖ varint(len) ‖ payload_type ‖ varint(len) ‖
//! payload`. The text form, used by `bootstrap-node` and the REST API, is `spr:` followed by
//! the unpadded base64url encoding of the envelope bytes.
//!
//! rust-libp2p's `PeerRecord::new` signs for the old `libp2p-routing-state` domain, which the
//! reference rejects, so the record is built here by hand on top of
//! [`SignedEnvelope`], which takes the domain as an argument.

use std::fmt;
use std::str::FromStr;

use libp2p::core::signed_envelope::{self, ReadPayloadError, SignedEnvelope};
use libp2p::Multiaddr;
use libp2p_identity::{Keypair, PeerId, SigningError};

use crate::pb::{self, Fields};

/// The signing domain of peer records (the multicodec name of `0x0301`).
pub const DOMAIN: &str = "libp2p-peer-record";

/// The payload type of peer records: the multicodec `0x0301` as an unsigned varint.
pub const PAYLOAD_TYPE: [u8; 2] = [0x03, 0x01];

/// The prefix of the text form.
pub const PREFIX: &str = "spr:";

/// The domain rust-libp2p's `PeerRecord::new` signs for; recognised only to explain a failure.
const LEGACY_DOMAIN: &str = "libp2p-routing-state";

/// Why an SPR could not be made or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SprError {
    /// The text does not start with `spr:`.
    #[error("an SPR must start with \"spr:\"")]
    MissingPrefix,
    /// The text after `spr:` is not unpadded base64url.
    #[error("SPR text is not base64url: {0}")]
    Base64(&'static str),
    /// The bytes are not a signed envelope, or its public key cannot be read.
    #[error("SPR is not a libp2p signed envelope: {0}")]
    Envelope(#[source] signed_envelope::DecodingError),
    /// The envelope carries something other than a peer record.
    #[error("SPR payload type is {got:02x?}, expected [03, 01] (libp2p-peer-record)")]
    WrongPayloadType {
        /// The payload type found in the envelope.
        got: Vec<u8>,
    },
    /// The envelope is signed for another domain.
    #[error("SPR is signed for the domain {found:?}, expected \"libp2p-peer-record\"")]
    WrongDomain {
        /// The domain the signature verifies for.
        found: &'static str,
    },
    /// The signature does not verify with the envelope's key for `libp2p-peer-record`.
    #[error("SPR signature does not verify")]
    BadSignature,
    /// The payload is not a valid peer record.
    #[error("SPR payload is not a peer record: {0}")]
    Record(String),
    /// The record names a peer other than the one whose key signed it.
    #[error("SPR names peer {record} but is signed by {signer}")]
    PeerIdMismatch {
        /// The peer ID inside the record.
        record: Box<PeerId>,
        /// The peer ID of the signing key.
        signer: Box<PeerId>,
    },
    /// Signing failed.
    #[error("signing the SPR failed: {0}")]
    Signing(#[from] SigningError),
}

/// A verified Signed Peer Record: a peer ID, a sequence number and the peer's addresses,
/// together with the exact envelope bytes that carry them.
///
/// A value of this type has always passed verification: it was either signed here by
/// [`sign`] or read by [`Spr::from_envelope_bytes`] / [`FromStr`], which check the
/// signature, the domain, the payload type and that the signer is the peer named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spr {
    peer_id: PeerId,
    seq: u64,
    addrs: Vec<Multiaddr>,
    envelope: Vec<u8>,
}

/// Signs a peer record for `keypair` with sequence number `seq` and the addresses `addrs`.
///
/// The reference uses the Unix time in seconds as `seq`; a newer record must carry a larger
/// one.
pub fn sign(keypair: &Keypair, seq: u64, addrs: &[Multiaddr]) -> Result<Spr, SprError> {
    let peer_id = keypair.public().to_peer_id();
    let payload = encode_record(&peer_id, seq, addrs);
    let envelope = SignedEnvelope::new(keypair, DOMAIN.to_owned(), PAYLOAD_TYPE.to_vec(), payload)?;
    Ok(Spr {
        peer_id,
        seq,
        addrs: addrs.to_vec(),
        envelope: envelope.into_protobuf_encoding(),
    })
}

impl Spr {
    /// Reads and verifies an SPR from its envelope bytes.
    ///
    /// Addresses that do not parse as multiaddrs (or are empty) are skipped, as the reference
    /// skips them; they stay in [`Spr::envelope`]. (The reference also rejects a record whose
    /// addresses all fail; here such a record is accepted with no addresses.)
    pub fn from_envelope_bytes(bytes: &[u8]) -> Result<Self, SprError> {
        let envelope = SignedEnvelope::from_protobuf_encoding(bytes).map_err(SprError::Envelope)?;
        let (payload, key) =
            match envelope.payload_and_signing_key(DOMAIN.to_owned(), &PAYLOAD_TYPE) {
                Ok(found) => found,
                Err(ReadPayloadError::UnexpectedPayloadType { got, .. }) => {
                    return Err(SprError::WrongPayloadType { got })
                }
                Err(ReadPayloadError::InvalidSignature) => {
                    return Err(if envelope.verify(LEGACY_DOMAIN.to_owned()) {
                        SprError::WrongDomain {
                            found: LEGACY_DOMAIN,
                        }
                    } else {
                        SprError::BadSignature
                    });
                }
            };
        let (peer_id, seq, addrs) = decode_record(payload)?;
        let signer = key.to_peer_id();
        if peer_id != signer {
            return Err(SprError::PeerIdMismatch {
                record: Box::new(peer_id),
                signer: Box::new(signer),
            });
        }
        Ok(Self {
            peer_id,
            seq,
            addrs,
            envelope: bytes.to_vec(),
        })
    }

    /// The peer the record describes (and whose key signed it).
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The record's sequence number; a larger one supersedes a smaller one.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The peer's addresses, in record order.
    pub fn addrs(&self) -> &[Multiaddr] {
        &self.addrs
    }

    /// The signed envelope bytes, exactly as signed or received.
    pub fn envelope(&self) -> &[u8] {
        &self.envelope
    }
}

impl FromStr for Spr {
    type Err = SprError;

    /// Reads and verifies the text form `spr:<unpadded base64url>`.
    fn from_str(s: &str) -> Result<Self, SprError> {
        let text = s.strip_prefix(PREFIX).ok_or(SprError::MissingPrefix)?;
        Self::from_envelope_bytes(&base64url_decode(text)?)
    }
}

impl fmt::Display for Spr {
    /// Writes the text form `spr:<unpadded base64url>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        f.write_str(&base64url_encode(&self.envelope))
    }
}

/// Encodes the `PeerRecord` payload; `seq` is written even when zero, as the reference
/// requires the field.
fn encode_record(peer_id: &PeerId, seq: u64, addrs: &[Multiaddr]) -> Vec<u8> {
    let mut buf = Vec::new();
    pb::put_bytes(&mut buf, 1, &peer_id.to_bytes());
    pb::put_uint(&mut buf, 2, seq);
    let mut info = Vec::new();
    for addr in addrs {
        info.clear();
        pb::put_bytes(&mut info, 1, addr.as_ref());
        pb::put_bytes(&mut buf, 3, &info);
    }
    buf
}

/// Decodes a `PeerRecord` payload; the peer ID and the sequence number are required.
fn decode_record(payload: &[u8]) -> Result<(PeerId, u64, Vec<Multiaddr>), SprError> {
    let bad = |e: pb::DecodeError| SprError::Record(e.to_string());
    let mut peer_id = None;
    let mut seq = None;
    let mut addrs = Vec::new();
    for field in Fields::new(payload) {
        match field.map_err(bad)? {
            (1, v) => peer_id = Some(v.bytes("peer_id must be bytes").map_err(bad)?),
            (2, v) => seq = Some(v.uint("seq must be a varint").map_err(bad)?),
            (3, v) => {
                let info = v.bytes("addresses must be messages").map_err(bad)?;
                if let Some(addr) = decode_address(info)? {
                    addrs.push(addr);
                }
            }
            _ => {}
        }
    }
    let peer_id = peer_id.ok_or_else(|| SprError::Record("no peer_id".into()))?;
    let peer_id =
        PeerId::from_bytes(peer_id).map_err(|e| SprError::Record(format!("peer_id: {e}")))?;
    let seq = seq.ok_or_else(|| SprError::Record("no seq".into()))?;
    Ok((peer_id, seq, addrs))
}

/// Decodes one `AddressInfo`: `None` when its multiaddr is missing, empty or unreadable.
fn decode_address(info: &[u8]) -> Result<Option<Multiaddr>, SprError> {
    let bad = |e: pb::DecodeError| SprError::Record(e.to_string());
    let mut bytes = None;
    for field in Fields::new(info) {
        if let (1, v) = field.map_err(bad)? {
            bytes = Some(v.bytes("multiaddr must be bytes").map_err(bad)?);
        }
    }
    Ok(bytes
        .filter(|b| !b.is_empty())
        .and_then(|b| Multiaddr::try_from(b.to_vec()).ok()))
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Encodes `data` as base64url without padding (RFC 4648 §5).
fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// Decodes base64url. Padding is optional but must be right when present, and the unused
/// low bits of the last character must be zero, so every byte string has one text form.
fn base64url_decode(text: &str) -> Result<Vec<u8>, SprError> {
    let bytes = text.as_bytes();
    let data = match bytes {
        [rest @ .., b'=', b'='] | [rest @ .., b'='] => {
            if bytes.len() % 4 != 0 {
                return Err(SprError::Base64("misplaced padding"));
            }
            rest
        }
        _ => bytes,
    };
    if data.len() % 4 == 1 {
        return Err(SprError::Base64("truncated"));
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut n: u32 = 0;
        for &c in chunk {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'-' => 62,
                b'_' => 63,
                _ => return Err(SprError::Base64("character outside the base64url alphabet")),
            };
            n = n << 6 | u32::from(v);
        }
        // `chunk.len()` is 2, 3 or 4 here: 6 * len bits hold len - 1 whole bytes.
        let len = chunk.len();
        let spare = 6 * len - 8 * (len - 1);
        if n & ((1 << spare) - 1) != 0 {
            return Err(SprError::Base64("non-zero bits after the last byte"));
        }
        let n = n >> spare;
        for i in (0..len - 1).rev() {
            out.push((n >> (8 * i)) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The `debug/info` example of the Codex docs, `learn/local-two-client-test.md` in
    /// codex-storage/codex-docs: the node's SPR and, beside it, its peer ID.
    const DOCS_LOCAL_SPR: &str = "spr:CiUIAhIhA1AL2J7EWfg7x77iOrR9YYBisY6CDtU2nEhuwDaQyjpkEgIDARo8CicAJQgCEiEDUAvYnsRZ-DvHvuI6tH1hgGKxjoIO1TacSG7ANpDKOmQQ2MWasAYaCwoJBH8AAAGRAh-aKkYwRAIgB2ooPfAyzWEJDe8hD2OXKOBnyTOPakc4GzqKqjM2OGoCICraQLPWf0oSEuvmSroFebVQx-3SDtMqDoIyWhjq1XFF";
    const DOCS_LOCAL_PEER: &str = "16Uiu2HAmJ3TSfPnrJNedHy2DMsjTqwBiVAQQqPo579DuMgGxmG99";

    /// The first Codex testnet bootstrap node, from `networks/testnet.md` of
    /// codex-storage/codex-docs (still in `es/networks/testnet.md`).
    const TESTNET_BOOTSTRAP_SPR: &str = "spr:CiUIAhIhAiJvIcA_ZwPZ9ugVKDbmqwhJZaig5zKyLiuaicRcCGqLEgIDARo8CicAJQgCEiECIm8hwD9nA9n26BUoNuarCEllqKDnMrIuK5qJxFwIaosQ3d6esAYaCwoJBJ_f8zKRAnU6KkYwRAIgM0MvWNJL296kJ9gWvfatfmVvT-A7O2s8Mxp8l9c8EW0CIC-h-H-jBVSgFjg3Eny2u33qF7BDnWFzo7fGfZ7_qc9P";

    fn addrs() -> Vec<Multiaddr> {
        vec![
            "/ip4/127.0.0.1/tcp/8070".parse().unwrap(),
            "/ip4/192.168.1.5/udp/8090".parse().unwrap(),
        ]
    }

    /// An envelope over `payload`, signed by `key` for `domain`, as text.
    fn envelope_text(key: &Keypair, domain: &str, payload_type: &[u8], payload: Vec<u8>) -> String {
        let env =
            SignedEnvelope::new(key, domain.to_owned(), payload_type.to_vec(), payload).unwrap();
        format!("spr:{}", base64url_encode(&env.into_protobuf_encoding()))
    }

    #[test]
    fn reference_spr_from_the_docs_verifies() {
        let spr: Spr = DOCS_LOCAL_SPR.parse().unwrap();
        assert_eq!(spr.peer_id().to_string(), DOCS_LOCAL_PEER);
        assert_eq!(spr.seq(), 1_711_710_936);
        // The DHT's record: the discovery (UDP) address.
        assert_eq!(spr.addrs(), ["/ip4/127.0.0.1/udp/8090".parse().unwrap()]);
        assert_eq!(spr.to_string(), DOCS_LOCAL_SPR);
    }

    #[test]
    fn testnet_bootstrap_spr_verifies() {
        let spr: Spr = TESTNET_BOOTSTRAP_SPR.parse().unwrap();
        assert_eq!(
            spr.peer_id().to_string(),
            "16Uiu2HAkwk68LSyCYa3HbmfkBLGRDLdQzB5nisydM5LR318iUUtA"
        );
        assert_eq!(
            spr.addrs(),
            ["/ip4/159.223.243.50/udp/30010".parse().unwrap()]
        );
        assert_eq!(spr.to_string(), TESTNET_BOOTSTRAP_SPR);
    }

    #[test]
    fn reference_payload_layout_matches_ours() {
        // Re-encoding the reference's record gives its payload byte for byte.
        let spr: Spr = DOCS_LOCAL_SPR.parse().unwrap();
        let env = SignedEnvelope::from_protobuf_encoding(spr.envelope()).unwrap();
        let (payload, _) = env
            .payload_and_signing_key(DOMAIN.to_owned(), &PAYLOAD_TYPE)
            .unwrap();
        assert_eq!(
            encode_record(&spr.peer_id(), spr.seq(), spr.addrs()),
            payload
        );
        // And rust-libp2p writes the envelope fields as the reference does.
        assert_eq!(env.into_protobuf_encoding(), spr.envelope());
    }

    #[test]
    fn sign_display_parse_round_trip() {
        let key = Keypair::generate_secp256k1();
        let spr = sign(&key, 1_700_000_000, &addrs()).unwrap();
        assert_eq!(spr.peer_id(), key.public().to_peer_id());
        assert!(spr.peer_id().to_string().starts_with("16Uiu2HA"));
        let text = spr.to_string();
        assert!(text.starts_with("spr:CiUIAhIh"), "{text}");
        assert!(!text.contains('='));
        let back: Spr = text.parse().unwrap();
        assert_eq!(back, spr);
        assert_eq!(back.seq(), 1_700_000_000);
        assert_eq!(back.addrs(), addrs());
        assert_eq!(Spr::from_envelope_bytes(spr.envelope()).unwrap(), spr);
    }

    #[test]
    fn zero_seq_and_no_addresses_round_trip() {
        let key = Keypair::generate_secp256k1();
        let spr = sign(&key, 0, &[]).unwrap();
        let back: Spr = spr.to_string().parse().unwrap();
        assert_eq!(back.seq(), 0);
        assert!(back.addrs().is_empty());
    }

    #[test]
    fn every_tampered_byte_fails() {
        let key = Keypair::generate_secp256k1();
        let spr = sign(&key, 7, &addrs()).unwrap();
        for i in 0..spr.envelope().len() {
            let mut bytes = spr.envelope().to_vec();
            bytes[i] ^= 0x01;
            assert!(Spr::from_envelope_bytes(&bytes).is_err(), "byte {i}");
        }
        let mut bytes = spr.envelope().to_vec();
        bytes.pop();
        assert!(Spr::from_envelope_bytes(&bytes).is_err());
    }

    #[test]
    fn wrong_domain_fails() {
        let key = Keypair::generate_secp256k1();
        let payload = encode_record(&key.public().to_peer_id(), 1, &addrs());
        let legacy = envelope_text(&key, LEGACY_DOMAIN, &PAYLOAD_TYPE, payload.clone());
        assert!(matches!(
            legacy.parse::<Spr>(),
            Err(SprError::WrongDomain {
                found: LEGACY_DOMAIN
            })
        ));
        let other = envelope_text(&key, "some-other-domain", &PAYLOAD_TYPE, payload.clone());
        assert!(matches!(other.parse::<Spr>(), Err(SprError::BadSignature)));
        let right = envelope_text(&key, DOMAIN, &PAYLOAD_TYPE, payload);
        assert!(right.parse::<Spr>().is_ok());
    }

    #[test]
    fn rust_libp2p_legacy_record_is_rejected() {
        let key = Keypair::generate_secp256k1();
        let record = libp2p::core::PeerRecord::new(&key, addrs()).unwrap();
        let bytes = record.into_signed_envelope().into_protobuf_encoding();
        assert!(matches!(
            Spr::from_envelope_bytes(&bytes),
            Err(SprError::WrongPayloadType { .. })
        ));
    }

    #[test]
    fn wrong_payload_type_fails() {
        let key = Keypair::generate_secp256k1();
        let payload = encode_record(&key.public().to_peer_id(), 1, &addrs());
        let text = envelope_text(&key, DOMAIN, &[0x03, 0x02], payload);
        assert!(matches!(
            text.parse::<Spr>(),
            Err(SprError::WrongPayloadType { got }) if got == [0x03, 0x02]
        ));
    }

    #[test]
    fn record_for_another_peer_fails() {
        let signer = Keypair::generate_secp256k1();
        let other = Keypair::generate_secp256k1().public().to_peer_id();
        let payload = encode_record(&other, 1, &addrs());
        let text = envelope_text(&signer, DOMAIN, &PAYLOAD_TYPE, payload);
        match text.parse::<Spr>() {
            Err(SprError::PeerIdMismatch { record, signer: s }) => {
                assert_eq!(*record, other);
                assert_eq!(*s, signer.public().to_peer_id());
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn record_without_seq_or_peer_id_fails() {
        let key = Keypair::generate_secp256k1();
        let mut no_seq = Vec::new();
        pb::put_bytes(&mut no_seq, 1, &key.public().to_peer_id().to_bytes());
        let text = envelope_text(&key, DOMAIN, &PAYLOAD_TYPE, no_seq);
        assert!(matches!(text.parse::<Spr>(), Err(SprError::Record(_))));
        let mut no_peer = Vec::new();
        pb::put_uint(&mut no_peer, 2, 1);
        let text = envelope_text(&key, DOMAIN, &PAYLOAD_TYPE, no_peer);
        assert!(matches!(text.parse::<Spr>(), Err(SprError::Record(_))));
    }

    #[test]
    fn unreadable_addresses_are_skipped() {
        let key = Keypair::generate_secp256k1();
        let mut payload = encode_record(&key.public().to_peer_id(), 3, &addrs()[..1]);
        let mut info = Vec::new();
        pb::put_bytes(&mut info, 1, &[0xff, 0xff, 0xff]);
        pb::put_bytes(&mut payload, 3, &info);
        let text = envelope_text(&key, DOMAIN, &PAYLOAD_TYPE, payload);
        let spr: Spr = text.parse().unwrap();
        assert_eq!(spr.addrs(), &addrs()[..1]);
    }

    #[test]
    fn text_errors() {
        assert!(matches!("".parse::<Spr>(), Err(SprError::MissingPrefix)));
        assert!(matches!(
            "enr:CiUIAhIh".parse::<Spr>(),
            Err(SprError::MissingPrefix)
        ));
        assert!(matches!("spr:a".parse::<Spr>(), Err(SprError::Base64(_))));
        assert!(matches!(
            "spr:ab+/".parse::<Spr>(),
            Err(SprError::Base64(_))
        ));
        assert!(matches!("spr:ab=".parse::<Spr>(), Err(SprError::Base64(_))));
        assert!(matches!("spr:".parse::<Spr>(), Err(SprError::Envelope(_))));
        // "AB" and "AA" would both decode to [0]: only the one with zero spare bits is valid.
        assert_eq!(base64url_decode("AA").unwrap(), [0]);
        assert!(matches!(base64url_decode("AB"), Err(SprError::Base64(_))));
        assert!(matches!(base64url_decode("AAB"), Err(SprError::Base64(_))));
    }

    #[test]
    fn base64url_round_trips_and_accepts_padding() {
        for len in 0..40usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64url_encode(&data);
            assert_eq!(text.len(), (len * 4).div_ceil(3));
            assert_eq!(base64url_decode(&text).unwrap(), data);
            let padded = format!("{text}{}", "=".repeat((4 - text.len() % 4) % 4));
            assert_eq!(base64url_decode(&padded).unwrap(), data);
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_decode("-_8").unwrap(), b"\xfb\xff");
    }

    #[test]
    fn garbage_never_panics() {
        let spr = sign(&Keypair::generate_secp256k1(), 9, &addrs()).unwrap();
        let good = spr.envelope().to_vec();
        // A small deterministic generator keeps the test reproducible.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..2000 {
            let bytes: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 200) as usize;
                (0..len).map(|_| next() as u8).collect()
            } else {
                let mut b = good.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b.truncate((next() as usize) % (b.len() + 1));
                b
            };
            let _ = Spr::from_envelope_bytes(&bytes);
            let text: String = bytes.iter().map(|&b| char::from(b % 128)).collect();
            let _ = format!("spr:{text}").parse::<Spr>();
            let _ = decode_record(&bytes);
        }
    }
}
