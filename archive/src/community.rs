//! Communities as this crate sees them: an ID (the community's public key), the chats whose
//! messages are archived or imported, and the key material of encrypted communities.

use codex_proto::TOPIC_LENGTH;
use libp2p_identity::secp256k1;

use crate::crypto::CommunityCipher;
use crate::error::{Error, Result};

/// A Waku content topic.
pub type Topic = [u8; TOPIC_LENGTH];

/// A community's ID: its compressed secp256k1 public key (33 bytes).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommunityId(Vec<u8>);

impl CommunityId {
    /// An ID from the 33 bytes of a compressed secp256k1 public key.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        secp256k1::PublicKey::try_from_bytes(bytes)
            .map_err(|e| Error::Invalid(format!("a community ID is a public key: {e}")))?;
        Ok(Self(bytes.to_vec()))
    }

    /// Its bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `0x` and its lowercase hex, as status-go writes community IDs.
    pub fn to_hex(&self) -> String {
        hex_0x(&self.0)
    }

    /// The topic of the community's universal chat, on which the link is published.
    pub fn universal_topic(&self) -> Topic {
        codex_proto::universal_topic(&self.0)
    }
}

impl std::fmt::Display for CommunityId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for CommunityId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommunityId({})", self.to_hex())
    }
}

impl std::str::FromStr for CommunityId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let hex = s.strip_prefix("0x").unwrap_or(s);
        Self::from_bytes(&parse_hex(hex)?)
    }
}

/// The community's signing key, held by its control node (the owner).
#[derive(Clone)]
pub struct CommunityKey {
    keypair: secp256k1::Keypair,
}

impl std::fmt::Debug for CommunityKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CommunityKey({})", self.id())
    }
}

impl CommunityKey {
    /// A new random key (a new community).
    pub fn generate() -> Self {
        Self {
            keypair: secp256k1::Keypair::generate(),
        }
    }

    /// The key of a 32-byte secret.
    pub fn from_secret(secret: &[u8]) -> Result<Self> {
        let mut bytes = secret.to_vec();
        let sk = secp256k1::SecretKey::try_from_bytes(&mut bytes)
            .map_err(|e| Error::Invalid(format!("not a secp256k1 secret key: {e}")))?;
        Ok(Self { keypair: sk.into() })
    }

    /// The 32 bytes of the secret.
    pub fn secret(&self) -> [u8; 32] {
        self.keypair.secret().to_bytes()
    }

    /// The community ID: the public key.
    pub fn id(&self) -> CommunityId {
        CommunityId(self.keypair.public().to_bytes().to_vec())
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.keypair.secret().sign(msg)
    }
}

/// A community as the client describes it to this crate.
#[derive(Debug, Clone)]
pub struct Community {
    /// Its ID.
    pub id: CommunityId,
    /// Chat IDs: on the owner, every chat of the community (their messages are archived);
    /// on a member, the chats it has locally (only their messages are imported).
    pub chat_ids: Vec<String>,
    /// Key material of an encrypted community; `None` for a public one.
    pub key_material: Option<Vec<u8>>,
}

impl Community {
    /// A public (unencrypted) community with `chat_ids`.
    pub fn new(id: CommunityId, chat_ids: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            id,
            chat_ids: chat_ids.into_iter().map(Into::into).collect(),
            key_material: None,
        }
    }

    /// The same community, encrypted with `key_material`.
    #[must_use]
    pub fn encrypted(mut self, key_material: impl Into<Vec<u8>>) -> Self {
        self.key_material = Some(key_material.into());
        self
    }

    /// The topics of its chats and its universal chat, sorted, without repeats: the
    /// archives' `contentTopic`, and the topics a member imports.
    pub fn topics(&self) -> Vec<Topic> {
        let mut t: Vec<Topic> = self
            .chat_ids
            .iter()
            .map(|c| codex_proto::topic(c))
            .collect();
        t.push(self.id.universal_topic());
        t.sort_unstable();
        t.dedup();
        t
    }

    pub(crate) fn cipher(&self) -> Option<CommunityCipher> {
        self.key_material.as_deref().map(CommunityCipher::new)
    }
}

pub(crate) use codex_proto::hex_0x;

pub(crate) fn parse_hex(s: &str) -> Result<Vec<u8>> {
    let bad = || Error::Invalid(format!("not hex: {s:?}"));
    if s.len() % 2 != 0 {
        return Err(bad());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn ids_round_trip_through_hex() {
        let key = CommunityKey::generate();
        let id = key.id();
        assert_eq!(id.as_bytes().len(), 33);
        assert_eq!(id.to_hex().parse::<CommunityId>().unwrap(), id);
        assert!("0x1234".parse::<CommunityId>().is_err());
        assert!("zz".parse::<CommunityId>().is_err());
        let again = CommunityKey::from_secret(&key.secret()).unwrap();
        assert_eq!(again.id(), id);
    }

    #[test]
    fn topics_include_the_universal_chat_once() {
        let id = CommunityKey::generate().id();
        let c = Community::new(id.clone(), ["general", "random", "general"]);
        let t = c.topics();
        assert_eq!(t.len(), 3);
        assert!(t.contains(&codex_proto::topic("general")));
        assert!(t.contains(&id.universal_topic()));
        assert_eq!(
            id.universal_topic(),
            codex_proto::topic(&format!("{}-memberUpdate", id.to_hex()))
        );
    }
}
