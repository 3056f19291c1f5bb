//! The community history demo: an owner and members of a community as separate processes
//! on 127.0.0.1.
//!
//! - [`node`]: `community-node`, one role (owner or member) in its own process, with its own
//!   Codex node and SQLite file, driven one command per line.
//! - [`messages`]: the community's chats and generated history.

mod messages;
pub(crate) mod node;
