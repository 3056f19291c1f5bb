//! Encryption of archives and indexes of encrypted communities, as status-go does it:
//! AES-256-GCM with a random 12-byte nonce appended to the ciphertext (and its tag), the key
//! being the Keccak-256 of the community's key material.

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Key, Nonce};

use crate::error::{Error, Result};

/// Length of the nonce appended to the ciphertext.
pub(crate) const NONCE_LEN: usize = 12;

/// Length of the GCM authentication tag.
const TAG_LEN: usize = 16;

/// An AES-256-GCM key derived from a community's key material.
#[derive(Clone)]
pub struct CommunityCipher {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for CommunityCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommunityCipher(..)")
    }
}

impl CommunityCipher {
    /// The cipher of key material `material` (the key is its Keccak-256).
    pub fn new(material: &[u8]) -> Self {
        let key = codex_proto::keccak256(material);
        Self {
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key)),
        }
    }

    /// `plain` encrypted under a fresh random nonce: ciphertext, tag, nonce.
    pub fn encrypt(&self, plain: &[u8]) -> Result<Vec<u8>> {
        let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
        let mut out = self
            .cipher
            .encrypt(&nonce, plain)
            .map_err(|_| Error::Invalid("AES-GCM refused to encrypt".into()))?;
        out.extend_from_slice(&nonce);
        Ok(out)
    }

    /// The plaintext of `data` (ciphertext, tag, nonce); [`Error::Decrypt`] when the key is
    /// wrong or the data was altered. `what` names the data in the error.
    pub fn decrypt(&self, data: &[u8], what: &str) -> Result<Vec<u8>> {
        let err = || Error::Decrypt { what: what.into() };
        if data.len() < NONCE_LEN + TAG_LEN {
            return Err(err());
        }
        let (sealed, nonce) = data.split_at(data.len() - NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), sealed)
            .map_err(|_| err())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let c = CommunityCipher::new(b"key material");
        let sealed = c.encrypt(b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + TAG_LEN + NONCE_LEN);
        assert_eq!(c.decrypt(&sealed, "x").unwrap(), b"hello");
        // A fresh nonce each time.
        assert_ne!(c.encrypt(b"hello").unwrap(), sealed);
    }

    #[test]
    fn matches_an_independent_aes_gcm_with_the_keccak_key() {
        // Built by hand the way status-go does: key = keccak256(material), nonce appended.
        let material = b"community key material";
        let key = codex_proto::keccak256(material);
        let nonce = [7u8; NONCE_LEN];
        let cipher = Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(&key));
        let mut sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), &b"archive bytes"[..])
            .unwrap();
        sealed.extend_from_slice(&nonce);
        let ours = CommunityCipher::new(material);
        assert_eq!(ours.decrypt(&sealed, "x").unwrap(), b"archive bytes");
    }

    #[test]
    fn a_wrong_key_or_altered_data_is_an_error() {
        let sealed = CommunityCipher::new(b"right").encrypt(b"secret").unwrap();
        let wrong = CommunityCipher::new(b"wrong");
        assert!(matches!(
            wrong.decrypt(&sealed, "archive"),
            Err(Error::Decrypt { .. })
        ));
        let right = CommunityCipher::new(b"right");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 0x01;
            assert!(right.decrypt(&bad, "archive").is_err(), "byte {i}");
        }
        assert!(right.decrypt(&sealed[..10], "archive").is_err());
        assert!(right.decrypt(&[], "archive").is_err());
    }
}
