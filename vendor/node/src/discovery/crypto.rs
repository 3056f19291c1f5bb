//! The cryptography of the discovery protocol: ECDH, session keys, the handshake's identity
//! signature, message encryption and header masking.
//!
//! Everything here is as in discv5 5.1 except the identity signature, which Codex's DHT
//! makes over `sha256(sha256(input))` with a DER encoding and puts the ephemeral key in its
//! 37-byte libp2p protobuf form into the signed input.

use aes::cipher::{KeyIvInit, StreamCipher};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Nonce};
use k256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
use k256::ecdsa::{Signature, SigningKey, VerifyingKey};
use k256::elliptic_curve::sec1::ToEncodedPoint;
use k256::{PublicKey, SecretKey};
use sha2::{Digest, Sha256};

use super::NodeId;

/// Prefix of the identity signature's input.
const ID_PROOF: &[u8] = b"discovery v5 identity proof";
/// Prefix of the HKDF info.
const KEY_AGREEMENT: &[u8] = b"discovery v5 key agreement";
/// The libp2p protobuf header of a compressed secp256k1 public key:
/// `{1: KeyType = 2 (Secp256k1), 2: <33 bytes>}`.
const PROTOBUF_KEY_PREFIX: [u8; 4] = [0x08, 0x02, 0x12, 0x21];

/// A 16-byte AES-128 key.
pub type Key = [u8; 16];

/// Length of a GCM tag, the smallest possible ciphertext.
pub const TAG_LEN: usize = 16;

/// Why a key, signature or ciphertext was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A public key that is not a secp256k1 point in libp2p protobuf or SEC1 form.
    #[error("not a secp256k1 public key")]
    PublicKey,
    /// The identity signature is not strict DER or does not verify.
    #[error("the identity signature does not verify")]
    Signature,
    /// Decryption failed: wrong key, or a forged or damaged message.
    #[error("the message does not decrypt")]
    Decrypt,
}

/// A secp256k1 public key in the 37-byte libp2p protobuf form.
pub fn protobuf_key(key: &PublicKey) -> [u8; 37] {
    let mut out = [0u8; 37];
    out[..4].copy_from_slice(&PROTOBUF_KEY_PREFIX);
    out[4..].copy_from_slice(key.to_encoded_point(true).as_bytes());
    out
}

/// Reads a public key in libp2p protobuf form (compressed or uncompressed point).
pub fn parse_protobuf_key(bytes: &[u8]) -> Result<PublicKey, CryptoError> {
    let key = libp2p_identity::PublicKey::try_decode_protobuf(bytes)
        .map_err(|_| CryptoError::PublicKey)?;
    let key = key
        .try_into_secp256k1()
        .map_err(|_| CryptoError::PublicKey)?;
    PublicKey::from_sec1_bytes(&key.to_bytes()).map_err(|_| CryptoError::PublicKey)
}

/// The 33-byte ECDH secret: the compressed point `secret × public`.
pub fn ecdh(secret: &SecretKey, public: &PublicKey) -> [u8; 33] {
    let point = (public.to_projective() * *secret.to_nonzero_scalar()).to_affine();
    let mut out = [0u8; 33];
    out.copy_from_slice(point.to_encoded_point(true).as_bytes());
    out
}

/// Session keys from an ECDH secret: `(initiator key, recipient key)`.
pub fn session_keys(
    secret: &[u8; 33],
    challenge: &[u8],
    initiator: &NodeId,
    recipient: &NodeId,
) -> (Key, Key) {
    let mut info = Vec::with_capacity(KEY_AGREEMENT.len() + 64);
    info.extend_from_slice(KEY_AGREEMENT);
    info.extend_from_slice(&initiator.0);
    info.extend_from_slice(&recipient.0);
    let mut okm = [0u8; 32];
    hkdf::Hkdf::<Sha256>::new(Some(challenge), secret)
        .expand(&info, &mut okm)
        // 32 bytes is far below HKDF-SHA256's limit of 255 × 32.
        .unwrap_or_else(|_| unreachable!("HKDF output of 32 bytes"));
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    a.copy_from_slice(&okm[..16]);
    b.copy_from_slice(&okm[16..]);
    (a, b)
}

/// The digest the identity signature signs: `sha256(sha256(prefix ‖ challenge ‖ eph-key ‖
/// dest-id))`, where `eph_key` is exactly as carried in the packet.
fn id_digest(challenge: &[u8], eph_key: &[u8], dest: &NodeId) -> [u8; 32] {
    let inner = Sha256::new()
        .chain_update(ID_PROOF)
        .chain_update(challenge)
        .chain_update(eph_key)
        .chain_update(dest.0)
        .finalize();
    Sha256::digest(inner).into()
}

/// The handshake's identity signature (DER, low-S, RFC 6979 nonce).
pub fn id_sign(key: &SecretKey, challenge: &[u8], eph_key: &[u8], dest: &NodeId) -> Vec<u8> {
    let digest = id_digest(challenge, eph_key, dest);
    let signature: Signature = SigningKey::from(key)
        .sign_prehash(&digest)
        // Signing a 32-byte digest with a valid key cannot fail.
        .unwrap_or_else(|_| unreachable!("ECDSA over a 32-byte digest"));
    let signature = signature.normalize_s().unwrap_or(signature);
    signature.to_der().as_bytes().to_vec()
}

/// Checks a handshake's identity signature (strict DER, low-S).
pub fn id_verify(
    key: &PublicKey,
    signature: &[u8],
    challenge: &[u8],
    eph_key: &[u8],
    dest: &NodeId,
) -> Result<(), CryptoError> {
    let signature = Signature::from_der(signature).map_err(|_| CryptoError::Signature)?;
    if signature.normalize_s().is_some() {
        return Err(CryptoError::Signature);
    }
    let digest = id_digest(challenge, eph_key, dest);
    VerifyingKey::from(key)
        .verify_prehash(&digest, &signature)
        .map_err(|_| CryptoError::Signature)
}

/// AES-128-GCM encryption with the header as associated data; the tag is appended.
pub fn encrypt(key: &Key, nonce: &[u8; 12], plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    Aes128Gcm::new(key.into())
        .encrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // Only plaintexts beyond GCM's 64 GiB limit fail.
        .unwrap_or_else(|_| unreachable!("AES-GCM of a UDP payload"))
}

/// AES-128-GCM decryption and authentication.
pub fn decrypt(
    key: &Key,
    nonce: &[u8; 12],
    ciphertext: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    Aes128Gcm::new(key.into())
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: ciphertext,
                aad,
            },
        )
        .map_err(|_| CryptoError::Decrypt)
}

/// Masks or unmasks a header in place: AES-128-CTR keyed by the first 16 bytes of the
/// destination's node ID, the packet's masking IV as the initial counter block.
pub fn mask(dest: &NodeId, iv: &[u8; 16], header: &mut [u8]) {
    let mut key = [0u8; 16];
    key.copy_from_slice(&dest.0[..16]);
    ctr::Ctr128BE::<aes::Aes128>::new(&key.into(), iv.into()).apply_keystream(header);
}

/// Hex to bytes, for the test vectors.
#[cfg(test)]
pub(crate) fn tests_hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        tests_hex(s)
    }

    fn id(s: &str) -> NodeId {
        NodeId(hex(s).try_into().unwrap())
    }

    const EPH_PRIV: &str = "fb757dc581730490a1d7a00deea65e9b1936924caaea8f44d476014856b68736";
    const CHALLENGE: &str = "000000000000000000000000000000006469736376350001010102030405060708090a0b0c00180102030405060708090a0b0c0d0e0f100000000000000000";
    const ID_B: &str = "bbbb9d047f0488c0b5a93c1c3f2d8bafc7c8ff337024a55434a0d0555de64db9";

    // Vectors of the DHT's "Cryptographic Primitives Test Vectors"
    // (tests/discv5/test_discoveryv5_encoding.nim in logos-storage-nim-dht).

    #[test]
    fn ecdh_vector() {
        let public = PublicKey::from_sec1_bytes(&hex(
            "039961e4c2356d61bedb83052c115d311acb3a96f5777296dcf297351130266231",
        ))
        .unwrap();
        let secret = SecretKey::from_slice(&hex(EPH_PRIV)).unwrap();
        assert_eq!(
            ecdh(&secret, &public).to_vec(),
            hex("033b11a2a1f214567e1537ce5e509ffd9b21373247f2a3ff6841f4976f53165e7e")
        );
    }

    #[test]
    fn key_derivation_vector() {
        let dest = PublicKey::from_sec1_bytes(&hex(
            "0317931e6e0840220642f230037d285d122bc59063221ef3226b1f403ddc69ca91",
        ))
        .unwrap();
        let secret = ecdh(&SecretKey::from_slice(&hex(EPH_PRIV)).unwrap(), &dest);
        let (a, b) = session_keys(
            &secret,
            &hex(CHALLENGE),
            &id("aaaa8419e9f49d0083561b48287df592939a8d19947d8c0ef88f2a4856a69fbb"),
            &id(ID_B),
        );
        assert_eq!(a.to_vec(), hex("dccc82d81bd610f4f76d3ebe97a40571"));
        assert_eq!(b.to_vec(), hex("ac74bb8773749920b0d3a8881c173ec5"));
    }

    #[test]
    fn id_signature_vector_is_over_a_double_sha256() {
        let key = SecretKey::from_slice(&hex(EPH_PRIV)).unwrap();
        let eph = hex("039961e4c2356d61bedb83052c115d311acb3a96f5777296dcf297351130266231");
        let der = id_sign(&key, &hex(CHALLENGE), &eph, &id(ID_B));
        let compact = Signature::from_der(&der).unwrap().to_bytes().to_vec();
        assert_eq!(
            compact,
            hex("db0ae930a460fd767cb26a519221e6be5edc3501865406d8af6d215f87ebf35b07563d891082d97147d9499f49bb86ee399f57367af1b866674f9e54760e3a21")
        );
        let public = key.public_key();
        id_verify(&public, &der, &hex(CHALLENGE), &eph, &id(ID_B)).unwrap();
        // Any other input, or a high-S form of the same signature, is refused.
        assert_eq!(
            id_verify(&public, &der, &hex(CHALLENGE), &eph, &id(EPH_PRIV)),
            Err(CryptoError::Signature)
        );
        let sig = Signature::from_der(&der).unwrap();
        let (r, s) = sig.split_scalars();
        let high = Signature::from_scalars(r, -*s).unwrap();
        assert_eq!(
            id_verify(
                &public,
                high.to_der().as_bytes(),
                &hex(CHALLENGE),
                &eph,
                &id(ID_B)
            ),
            Err(CryptoError::Signature)
        );
    }

    #[test]
    fn aes_gcm_vector() {
        let key: Key = hex("9f2d77db7004bf8a1a85107ac686990b").try_into().unwrap();
        let nonce: [u8; 12] = hex("27b5af763c446acd2749fe8e").try_into().unwrap();
        let aad = hex("93a7400fa0d6a694ebc24d5cf570f65d04215b6ac00757875e3f3a5f42107903");
        let ct = encrypt(&key, &nonce, &hex("01c20101"), &aad);
        assert_eq!(ct, hex("a5d12a2d94b8ccb3ba55558229867dc13bfa3648"));
        assert_eq!(decrypt(&key, &nonce, &ct, &aad).unwrap(), hex("01c20101"));
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert_eq!(decrypt(&key, &nonce, &bad, &aad), Err(CryptoError::Decrypt));
    }

    #[test]
    fn protobuf_keys_round_trip() {
        let key = SecretKey::from_slice(&hex(EPH_PRIV)).unwrap().public_key();
        let pb = protobuf_key(&key);
        assert_eq!(pb[..4], PROTOBUF_KEY_PREFIX);
        assert_eq!(parse_protobuf_key(&pb).unwrap(), key);
        assert_eq!(parse_protobuf_key(&pb[..36]), Err(CryptoError::PublicKey));
        // An Ed25519 key (type 1) is not usable for the handshake.
        let mut ed = vec![0x08, 0x01, 0x12, 0x20];
        ed.extend_from_slice(&[7u8; 32]);
        assert_eq!(parse_protobuf_key(&ed), Err(CryptoError::PublicKey));
    }
}
