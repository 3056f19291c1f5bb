//! Packets: `masking-iv(16) ‖ masked(static-header ‖ authdata) ‖ message`.
//!
//! The static header is `"discv5" ‖ version 0x0001 ‖ flag ‖ nonce(12) ‖ authdata-size(2)`,
//! masked with AES-128-CTR under the first 16 bytes of the destination's node ID. Three
//! kinds, by flag:
//! - 0, message: authdata = source node ID; the message is AES-GCM under the session key.
//! - 1, WHOAREYOU: authdata = id-nonce(16) ‖ record-seq(8, BE); no message. The nonce is
//!   that of the packet that could not be decrypted.
//! - 2, handshake: authdata = source ID ‖ sig-size(1) ‖ key-size(1) ‖ id-signature (DER) ‖
//!   ephemeral key (37-byte libp2p protobuf form) ‖ the sender's SPR (optional, the rest).
//!
//! The associated data of the encryption is the unmasked `iv ‖ static-header ‖ authdata`.

use super::crypto::{self, TAG_LEN};
use super::NodeId;

/// The protocol ID of the static header.
const PROTOCOL_ID: &[u8; 6] = b"discv5";
/// The protocol version.
const VERSION: [u8; 2] = [0, 1];
/// Length of the masking IV.
const IV_LEN: usize = 16;
/// Length of the static header.
const STATIC_LEN: usize = 23;
/// Length of WHOAREYOU authdata.
const WHOAREYOU_AUTH_LEN: usize = 24;
/// The smallest valid packet (a WHOAREYOU).
pub const MIN_PACKET: usize = IV_LEN + STATIC_LEN + WHOAREYOU_AUTH_LEN;
/// The largest datagram read (the reference's receive buffer).
pub const MAX_PACKET: usize = 65_536;

/// Why a datagram is not a packet for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Too short, or fields that do not fit.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// Not `discv5` version 1 (or masked for another node).
    #[error("not a discv5 v1 packet for this node")]
    Protocol,
}

/// The authdata of a packet, by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// An ordinary message from `src`.
    Message {
        /// The sender.
        src: NodeId,
    },
    /// A challenge.
    Whoareyou {
        /// Random bytes that make the challenge unique.
        id_nonce: [u8; 16],
        /// The sequence number of the SPR the challenger holds for us (0: none).
        record_seq: u64,
    },
    /// The answer to a challenge, carrying the first message of the session.
    Handshake {
        /// The sender.
        src: NodeId,
        /// DER identity signature.
        signature: Vec<u8>,
        /// The ephemeral public key in libp2p protobuf form.
        eph_key: Vec<u8>,
        /// The sender's SPR envelope, when the challenger's copy was older.
        record: Option<Vec<u8>>,
    },
}

impl Auth {
    fn flag(&self) -> u8 {
        match self {
            Auth::Message { .. } => 0,
            Auth::Whoareyou { .. } => 1,
            Auth::Handshake { .. } => 2,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Auth::Message { src } => src.0.to_vec(),
            Auth::Whoareyou {
                id_nonce,
                record_seq,
            } => {
                let mut out = id_nonce.to_vec();
                out.extend_from_slice(&record_seq.to_be_bytes());
                out
            }
            Auth::Handshake {
                src,
                signature,
                eph_key,
                record,
            } => {
                let mut out = src.0.to_vec();
                // Sizes fit a byte: DER secp256k1 signatures are at most 72 bytes, keys 37.
                out.push(signature.len() as u8);
                out.push(eph_key.len() as u8);
                out.extend_from_slice(signature);
                out.extend_from_slice(eph_key);
                if let Some(r) = record {
                    out.extend_from_slice(r);
                }
                out
            }
        }
    }

    fn decode(flag: u8, auth: &[u8]) -> Result<Self, PacketError> {
        let node = |b: &[u8]| NodeId(b.try_into().unwrap_or([0; 32]));
        match flag {
            0 if auth.len() == 32 => Ok(Auth::Message { src: node(auth) }),
            0 => Err(PacketError::Malformed("message authdata is not 32 bytes")),
            1 if auth.len() == WHOAREYOU_AUTH_LEN => {
                let mut id_nonce = [0u8; 16];
                id_nonce.copy_from_slice(&auth[..16]);
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&auth[16..]);
                Ok(Auth::Whoareyou {
                    id_nonce,
                    record_seq: u64::from_be_bytes(seq),
                })
            }
            1 => Err(PacketError::Malformed("WHOAREYOU authdata is not 24 bytes")),
            2 => {
                if auth.len() < 34 {
                    return Err(PacketError::Malformed("handshake authdata too short"));
                }
                let sig_len = usize::from(auth[32]);
                let key_len = usize::from(auth[33]);
                let rest = &auth[34..];
                if rest.len() < sig_len + key_len {
                    return Err(PacketError::Malformed("handshake sizes exceed authdata"));
                }
                let (signature, rest) = rest.split_at(sig_len);
                let (eph_key, record) = rest.split_at(key_len);
                Ok(Auth::Handshake {
                    src: node(&auth[..32]),
                    signature: signature.to_vec(),
                    eph_key: eph_key.to_vec(),
                    record: (!record.is_empty()).then(|| record.to_vec()),
                })
            }
            _ => Err(PacketError::Malformed("unknown flag")),
        }
    }
}

/// A packet read from the wire, its header unmasked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The header nonce (the GCM nonce; for WHOAREYOU, the challenged packet's).
    pub nonce: [u8; 12],
    /// The authdata.
    pub auth: Auth,
    /// `iv ‖ static-header ‖ authdata`, unmasked: the associated data of the message, and
    /// for a WHOAREYOU the challenge data.
    pub header: Vec<u8>,
    /// The encrypted message (empty for WHOAREYOU).
    pub message: Vec<u8>,
}

/// The unmasked header of a packet: `iv ‖ static-header ‖ authdata`, the associated data
/// to encrypt its message with (or the challenge data of a WHOAREYOU). [`seal`] masks it
/// and appends the message.
pub fn header(iv: &[u8; 16], nonce: &[u8; 12], auth: &Auth) -> Vec<u8> {
    let authdata = auth.encode();
    let mut out = Vec::with_capacity(IV_LEN + STATIC_LEN + authdata.len());
    out.extend_from_slice(iv);
    out.extend_from_slice(PROTOCOL_ID);
    out.extend_from_slice(&VERSION);
    out.push(auth.flag());
    out.extend_from_slice(nonce);
    // Authdata is at most 34 + 255 + 255 + an SPR: an SPR longer than 64 KiB is never
    // sent (the datagram would not fit either).
    out.extend_from_slice(&(authdata.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(&authdata);
    out
}

/// Masks `header` (from [`header`]) for `dest` and appends the message encrypted with
/// `key` (nothing for a WHOAREYOU): the datagram.
pub fn seal(dest: &NodeId, header: &[u8], key: Option<&crypto::Key>, plaintext: &[u8]) -> Vec<u8> {
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&header[..IV_LEN]);
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&header[IV_LEN + 9..IV_LEN + 21]);
    let mut out = header.to_vec();
    crypto::mask(dest, &iv, &mut out[IV_LEN..]);
    if let Some(key) = key {
        out.extend_from_slice(&crypto::encrypt(key, &nonce, plaintext, header));
    }
    out
}

/// Reads a datagram addressed to `own` (whose node ID masks the header).
pub fn decode(own: &NodeId, datagram: &[u8]) -> Result<Packet, PacketError> {
    if datagram.len() < MIN_PACKET {
        return Err(PacketError::Malformed("shorter than a WHOAREYOU"));
    }
    let mut iv = [0u8; 16];
    iv.copy_from_slice(&datagram[..IV_LEN]);
    // Unmask the static header first to learn the authdata size, then all of it: CTR's
    // keystream is the same either way.
    let mut header = datagram[..IV_LEN + STATIC_LEN].to_vec();
    crypto::mask(own, &iv, &mut header[IV_LEN..]);
    if &header[IV_LEN..IV_LEN + 6] != PROTOCOL_ID || header[IV_LEN + 6..IV_LEN + 8] != VERSION {
        return Err(PacketError::Protocol);
    }
    let flag = header[IV_LEN + 8];
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&header[IV_LEN + 9..IV_LEN + 21]);
    let auth_len = usize::from(u16::from_be_bytes([
        header[IV_LEN + 21],
        header[IV_LEN + 22],
    ]));
    let end = IV_LEN + STATIC_LEN + auth_len;
    if end > datagram.len() {
        return Err(PacketError::Malformed("authdata size exceeds the packet"));
    }
    let mut header = datagram[..end].to_vec();
    crypto::mask(own, &iv, &mut header[IV_LEN..]);
    let auth = Auth::decode(flag, &header[IV_LEN + STATIC_LEN..])?;
    let message = datagram[end..].to_vec();
    match auth {
        Auth::Whoareyou { .. } if !message.is_empty() => {
            return Err(PacketError::Malformed("bytes after a WHOAREYOU"))
        }
        Auth::Message { .. } | Auth::Handshake { .. } if message.len() < TAG_LEN => {
            return Err(PacketError::Malformed("message shorter than a GCM tag"))
        }
        _ => {}
    }
    Ok(Packet {
        nonce,
        auth,
        header,
        message,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use k256::SecretKey;

    use super::super::crypto::{ecdh, id_verify, parse_protobuf_key, session_keys};
    use super::super::messages::{Message, Request};
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        super::super::crypto::tests_hex(s)
    }

    // The "Packet Encodings Test Vectors" of the DHT (tests/discv5/
    // test_discoveryv5_encoding.nim): A sends to B, IV zero, nonce 0102…0c.
    const PRIV_A: &str = "fe5f08c842aa946659b266ce68faa5d2fd982634594dccdf7f916e3fcf0541a3";
    const PRIV_B: &str = "00064765abe9a4e63b068b5af99c26c61c8ade9bfdae6494873b137ec8152578";
    const NONCE: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12];

    fn keys() -> (SecretKey, SecretKey, NodeId, NodeId) {
        let a = SecretKey::from_slice(&hex(PRIV_A)).unwrap();
        let b = SecretKey::from_slice(&hex(PRIV_B)).unwrap();
        let ida = NodeId::from_public_key(&a.public_key());
        let idb = NodeId::from_public_key(&b.public_key());
        (a, b, ida, idb)
    }

    #[test]
    fn node_ids_of_the_vector_keys() {
        let (_, _, a, b) = keys();
        assert_eq!(
            a.0.to_vec(),
            hex("a3646e4d56478a29147fbe110b557bbfabb9d01860069dc4004a694d74bee342")
        );
        assert_eq!(
            b.0.to_vec(),
            hex("b925a99248062196a94e09c1f1fe138163608dc40a6b3b0e8f44b2290d602b47")
        );
    }

    #[test]
    fn ordinary_message_vector() {
        let (_, _, a, b) = keys();
        let wire = hex("000000000000000000000000000000003788c1e1079e89374c4beac74d76364dbd9e8cd1847adc2f49fbacc6862425583586c023b19b6fdd1d836777ee39fee87afd279a5fe4ffdd21ed1a6d388207f00b48115b8ee4e8eaf675b0865821e12636bc");
        let p = decode(&b, &wire).unwrap();
        assert_eq!(p.auth, Auth::Message { src: a });
        assert_eq!(p.nonce, NONCE);
        let key = [0u8; 16];
        let plain = crypto::decrypt(&key, &p.nonce, &p.message, &p.header).unwrap();
        assert_eq!(
            Message::decode(&plain).unwrap(),
            Message::Request(hex("00000001"), Request::Ping { seq: 2 })
        );
        // Encoding the same message gives the same bytes.
        let h = header(&[0; 16], &NONCE, &Auth::Message { src: a });
        let plain = Message::Request(hex("00000001"), Request::Ping { seq: 2 }).encode();
        assert_eq!(seal(&b, &h, Some(&key), &plain), wire);
    }

    const WHOAREYOU: &str = "000000000000000000000000000000003788c1e1079e89374d4beac74d76364dbd9e8cd1847ae48d2f96e595c7a904454033dd25eaefc076a4537f17e8a43a";

    #[test]
    fn whoareyou_vector() {
        let (_, _, _, b) = keys();
        let wire = hex(WHOAREYOU);
        let p = decode(&b, &wire).unwrap();
        let id_nonce: [u8; 16] = hex("0102030405060708090a0b0c0d0e0f10").try_into().unwrap();
        assert_eq!(
            p.auth,
            Auth::Whoareyou {
                id_nonce,
                record_seq: 0
            }
        );
        assert_eq!(p.nonce, NONCE);
        assert_eq!(p.header, hex("000000000000000000000000000000006469736376350001010102030405060708090a0b0c00180102030405060708090a0b0c0d0e0f100000000000000000"));
        let h = header(
            &[0; 16],
            &NONCE,
            &Auth::Whoareyou {
                id_nonce,
                record_seq: 0,
            },
        );
        assert_eq!(seal(&b, &h, None, &[]), wire);
        let mut longer = wire.clone();
        longer.push(0);
        assert!(decode(&b, &longer).is_err());
    }

    /// Checks a handshake vector from B's side: the signature, the keys, the message, and
    /// that re-encoding gives the same bytes.
    fn handshake(wire: &str, record_seq: u64, record: Option<&str>) {
        let (a, b, ida, idb) = keys();
        let wire = hex(wire);
        let p = decode(&idb, &wire).unwrap();
        let Auth::Handshake {
            src,
            signature,
            eph_key,
            record: got_record,
        } = p.auth.clone()
        else {
            panic!("not a handshake: {:?}", p.auth)
        };
        assert_eq!(src, ida);
        assert_eq!(got_record.as_deref(), record.map(hex).as_deref());
        let mut challenge = hex("000000000000000000000000000000006469736376350001010102030405060708090a0b0c00180102030405060708090a0b0c0d0e0f10");
        challenge.extend_from_slice(&record_seq.to_be_bytes());
        id_verify(&a.public_key(), &signature, &challenge, &eph_key, &idb).unwrap();
        let eph = parse_protobuf_key(&eph_key).unwrap();
        let secret = ecdh(&b, &eph);
        let (init, _) = session_keys(&secret, &challenge, &ida, &idb);
        let plain = crypto::decrypt(&init, &p.nonce, &p.message, &p.header).unwrap();
        assert_eq!(
            Message::decode(&plain).unwrap(),
            Message::Request(hex("00000001"), Request::Ping { seq: 1 })
        );
        let h = header(&[0; 16], &NONCE, &p.auth);
        assert_eq!(seal(&idb, &h, Some(&init), &plain), wire);
        let mut longer = wire.clone();
        longer.push(0);
        let p = decode(&idb, &longer).unwrap();
        assert!(crypto::decrypt(&init, &p.nonce, &p.message, &p.header).is_err());
    }

    #[test]
    fn handshake_vector_without_record() {
        handshake("000000000000000000000000000000003788c1e1079e89374e4beac74d76364dbd9e8cd1847a712f49fbacc6862425583586c023b19b6fdd1d836777ee39fee87afd279a5fe4ff441af3b17ec840104be4fae12da6828a752f1f7df615c4c7579558b0b537760549eb0e5ada50545b066734abb4b7bddbd503fad873e981b485dc9f8eee725661ebf766ce027edc9dcb55f6160b06d9c764481fb520b7581678e5fce2ab0d5fa2edaa92f252db6d6ea30d52a78e4114fb9dcf26fb1690e65ca0079386331f311bfc0aef4a771155ed", 1, None);
    }

    #[test]
    fn handshake_vector_with_record() {
        handshake("000000000000000000000000000000003788c1e1079e89374e4beac74d76364dbd9e8cd1847bc72f49fbacc6862425583586c023b19b6fdd1d836777ee39fee87afd279a5fe4ff441af3b17ec96b7e0586467988bd0c4784575e02a32d0e7594b65e939a8490bd71813894c9f4e8796f8c3d3fce29171fc3c568ace28d89ea80a9707693d2ee9388e74f89a5a62bc3cb55f6160bae865f0779b75c989805232d55b73645bbd797a7d550db7233300b3d1de011fbde92783b4d813ddabff9c96aa0361139ec10df16cf2c136caf44d064194cc6777202952dc24c6fccf04f026d6d58c1c43dcf643d211afe4ff8d9f9727fb45380862d47978fd015a4f9a7ff3928158c38173fd1192164e714ad5454446b681ed2130a349fdffd4b81f814700c5b04551e621b65432d3e1beca05dc8e801a4c21da44d4cb29b1eddb92417aeddde855ba1016e93eb25d55879a0d27d170dc7904c6dfa06ce813b0455b3258c661de55dcd349397bc5b8eb8e8ef5b4ed2115e968197effe44a0f5fb2b7d", 0, Some("0a25080212210375dea2b0552bb77de18f4ba8360997d1afa51c4fbe1a792a44002f93725b3e53120203011a380a270025080212210375dea2b0552bb77de18f4ba8360997d1afa51c4fbe1a792a44002f93725b3e5310011a0b0a09047f000001910223282a47304502210090ff041a285940521e90ee2874967a846cb96dcda67147a1b7c492705efbb86b02204c42833653e7f0d8a219c5a6a50de3e4a0d2242a7043e6cac208514047313edc"));
    }

    #[test]
    fn garbage_is_refused_cleanly() {
        let (_, _, _, b) = keys();
        assert!(decode(&b, &[]).is_err());
        assert!(decode(&b, &[0u8; 62]).is_err());
        assert_eq!(decode(&b, &[0u8; 200]), Err(PacketError::Protocol));
        // A WHOAREYOU masked for another node does not unmask.
        let (_, _, a, _) = keys();
        assert_eq!(decode(&a, &hex(WHOAREYOU)), Err(PacketError::Protocol));
        // Truncating the handshake's sizes.
        let h = header(
            &[0; 16],
            &NONCE,
            &Auth::Handshake {
                src: a,
                signature: vec![1; 70],
                eph_key: vec![2; 37],
                record: None,
            },
        );
        let mut wire = seal(&b, &h, Some(&[0; 16]), b"x");
        assert!(decode(&b, &wire).is_ok());
        wire.truncate(IV_LEN + STATIC_LEN + 40);
        assert!(decode(&b, &wire).is_err());
    }
}
