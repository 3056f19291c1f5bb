//! The archive link: the message an owner sends on the community's universal chat to name
//! the current index, signed with the community key, and the transport that carries it.
//!
//! In a Status client the link travels as a Waku application message (type
//! [`codex_proto::COMMUNITY_MESSAGE_ARCHIVE_LINK`]) whose signature the client's transport
//! checks; it then hands the member the signer's public key with the payload. The
//! [`SignedLink`] here carries the same three things (payload, signer, signature) so the
//! rules can be applied and tested without Waku; [`LinkPublisher`] is the seam where a
//! client plugs its transport in, and [`LocalLinkBus`] an in-process transport for tests
//! and the demo.

use std::future::Future;
use std::pin::Pin;

use codex_proto::{CommunityMessageArchiveLink, Message};
use libp2p_identity::secp256k1;
use tokio::sync::broadcast;

use crate::community::{hex_0x, parse_hex, CommunityId, CommunityKey};
use crate::error::{Error, Rejection, Result};

/// A link message as sent: the encoded [`CommunityMessageArchiveLink`], who signed it, and
/// the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedLink {
    /// The community the link is for.
    pub community_id: CommunityId,
    /// The signer's compressed public key.
    pub signer: Vec<u8>,
    /// The protobuf encoding of the link message.
    pub payload: Vec<u8>,
    /// The signer's signature of `payload`.
    pub signature: Vec<u8>,
}

impl SignedLink {
    /// `link` for `community`, signed with `key`.
    pub fn sign(
        key: &CommunityKey,
        community_id: &CommunityId,
        link: &CommunityMessageArchiveLink,
    ) -> Self {
        let payload = link.encode_to_vec();
        Self {
            community_id: community_id.clone(),
            signer: key.id().as_bytes().to_vec(),
            signature: key.sign(&payload),
            payload,
        }
    }

    /// The link message, when the signature verifies and the signer is the community.
    pub fn verify(&self) -> Result<CommunityMessageArchiveLink, Rejection> {
        let signer = secp256k1::PublicKey::try_from_bytes(&self.signer)
            .map_err(|_| Rejection::BadSignature)?;
        if !signer.verify(&self.payload, &self.signature) {
            return Err(Rejection::BadSignature);
        }
        if self.signer != self.community_id.as_bytes() {
            return Err(Rejection::NotCommunityKey {
                signer: hex_0x(&self.signer),
            });
        }
        let link = CommunityMessageArchiveLink::decode(&self.payload[..])
            .map_err(|e| Rejection::Malformed(format!("not a link message: {e}")))?;
        if link.archive_link.is_empty() {
            return Err(Rejection::Malformed("the link is empty".into()));
        }
        link.archive_link
            .parse::<codex::Cid>()
            .map_err(|e| Rejection::Malformed(e.to_string()))?;
        Ok(link)
    }
}

/// Text form for carrying a link between processes: four `0x` hex fields joined by `:`
/// (community, signer, signature, payload).
impl std::fmt::Display for SignedLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.community_id.to_hex(),
            hex_0x(&self.signer),
            hex_0x(&self.signature),
            hex_0x(&self.payload)
        )
    }
}

impl std::str::FromStr for SignedLink {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let parts: Vec<&str> = s.trim().split(':').collect();
        let [c, signer, sig, payload] = parts[..] else {
            return Err(Error::Invalid(format!("not a signed link: {s:?}")));
        };
        let field = |h: &str| parse_hex(h.strip_prefix("0x").unwrap_or(h));
        Ok(Self {
            community_id: c.parse()?,
            signer: field(signer)?,
            signature: field(sig)?,
            payload: field(payload)?,
        })
    }
}

/// Sends archive links to the community's members: the client implements it with its Waku
/// transport (the universal chat of the community, application message type
/// [`codex_proto::COMMUNITY_MESSAGE_ARCHIVE_LINK`]).
pub trait LinkPublisher: Send + Sync + 'static {
    /// Sends `link`. An error is reported and the link is sent again after the next
    /// archiving round.
    fn publish(&self, link: SignedLink) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;
}

/// An in-process link transport: every published link reaches every subscriber.
#[derive(Debug, Clone)]
pub struct LocalLinkBus {
    tx: broadcast::Sender<SignedLink>,
}

impl Default for LocalLinkBus {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalLinkBus {
    /// A bus holding up to 64 links for slow subscribers.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(64).0,
        }
    }

    /// A receiver of the links published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<SignedLink> {
        self.tx.subscribe()
    }
}

impl LinkPublisher for LocalLinkBus {
    fn publish(&self, link: SignedLink) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        // Nobody listening is not an error: members may join later.
        let _ = self.tx.send(link);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const CID: &str = "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM";

    fn link(s: &str) -> CommunityMessageArchiveLink {
        CommunityMessageArchiveLink {
            clock: 1_700_000_000_000,
            archive_link: s.into(),
        }
    }

    #[test]
    fn a_link_signed_by_the_community_verifies_and_round_trips() {
        let key = CommunityKey::generate();
        let signed = SignedLink::sign(&key, &key.id(), &link(CID));
        assert_eq!(signed.verify().unwrap(), link(CID));
        let text = signed.to_string();
        assert_eq!(text.parse::<SignedLink>().unwrap(), signed);
    }

    #[test]
    fn forged_altered_and_empty_links_are_rejected() {
        let key = CommunityKey::generate();
        let other = CommunityKey::generate();
        // Signed by someone else, claiming to be for the community.
        let forged = SignedLink::sign(&other, &key.id(), &link(CID));
        assert!(matches!(
            forged.verify(),
            Err(Rejection::NotCommunityKey { .. })
        ));
        // The community key as claimed signer, with someone else's signature.
        let mut stolen = SignedLink::sign(&key, &key.id(), &link(CID));
        stolen.signature = forged.signature.clone();
        assert_eq!(stolen.verify(), Err(Rejection::BadSignature));
        // A payload altered after signing.
        let mut altered = SignedLink::sign(&key, &key.id(), &link(CID));
        altered.payload = link("zDvZRwzmOther").encode_to_vec();
        assert_eq!(altered.verify(), Err(Rejection::BadSignature));
        // Signed, but empty or not a CID.
        for bad in ["", "magnet:?xt=urn:btih:abc"] {
            let s = SignedLink::sign(&key, &key.id(), &link(bad));
            assert!(matches!(s.verify(), Err(Rejection::Malformed(_))), "{bad}");
        }
        // Signed garbage.
        let mut garbage = SignedLink::sign(&key, &key.id(), &link(CID));
        garbage.payload = vec![0xff; 7];
        garbage.signature = key.sign(&garbage.payload);
        assert!(matches!(garbage.verify(), Err(Rejection::Malformed(_))));
        assert!("a:b".parse::<SignedLink>().is_err());
    }
}
