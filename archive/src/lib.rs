//! The Status community history archive service on an embedded Codex node.
//!
//! A community's control node (the *owner*) keeps the raw Waku messages of the community's
//! chats, packs each week into archives, uploads every archive and a cumulative index of
//! them to its Codex node, and announces the index CID in a signed link message. A
//! *member* that receives the link downloads the index and the archives it lacks from any
//! node that has them, imports their messages, and serves the data on to other members.
//!
//! - [`Owner`]: [`Owner::store_messages`], [`Owner::create_archives`],
//!   [`Owner::archive_and_publish`] and the periodic task ([`Owner::start`]).
//! - [`Member`]: [`Member::join`], [`Member::handle_link`], resumption after a restart.
//! - [`Database`]: the SQLite file both sides keep their state in.
//! - [`LinkPublisher`]: the seam to the client's Waku transport; [`LocalLinkBus`] is an
//!   in-process one.
//! - [`Event`]: progress, as a stream from [`Owner::events`] and [`Member::events`].
//!
//! Wire formats (the protobuf messages, archive IDs, topics) are status-go's, from
//! [`codex_proto`]; encrypted communities use AES-256-GCM as status-go does.
//!
//! # Data safety
//! Every state change that must be atomic is one SQLite transaction: an owner's round is
//! recorded only after all its uploads succeeded; a member records an archive only once it
//! is wholly stored and opens, and imports each archive's messages together with its
//! imported mark. A crash at any point leaves the state before or after such a step, and
//! the next run carries on from there: the download of an accepted link and the import of
//! downloaded archives resume when the community is joined again.

#![deny(missing_docs)]
#![deny(unreachable_pub)]
#![deny(rustdoc::broken_intra_doc_links)]

mod community;
mod config;
mod crypto;
mod db;
mod error;
mod events;
mod format;
mod link;
mod member;
mod owner;

pub use codex_proto;
pub use community::{Community, CommunityId, CommunityKey, Topic};
pub use config::ArchiveConfig;
pub use crypto::CommunityCipher;
pub use db::{message_hash, ArchiveInfo, ArchiveRecord, Chunk, Cursor, Database};
pub use error::{Error, Rejection, Result};
pub use events::Event;
pub use link::{LinkPublisher, LocalLinkBus, SignedLink};
pub use member::Member;
pub use owner::{CreatedArchive, Owner, RoundReport};
