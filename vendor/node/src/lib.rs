//! A Codex storage node in Rust.
//!
//! The node is a plain Rust API (`store`, `merkle`, `manifest`, `node`) that runs on its own
//! threads; the C ABI of libcodex is a thin layer over it in the `codex-abi` crate.
//!
//! The configuration takes every key of the reference plus one of its own, `relay`
//! ([`config::RelayMode`]): beyond the reference's NAT handling (UPnP, `extip`), a node
//! nobody can dial reserves a slot on a circuit relay and announces the relayed address,
//! and reachable nodes relay for others within bounds (see [`net::host`]).

#![deny(unsafe_op_in_unsafe_fn)]

mod bits;
pub mod cid;
pub mod config;
pub mod discovery;
pub mod error;
mod key;
pub mod manifest;
pub mod merkle;
mod mime;
pub mod net;
pub mod node;
mod pb;
pub mod store;

pub use cid::{Cid, CidKind};
pub use config::NodeConfig;
pub use error::{Error, Result};
pub use libp2p::Multiaddr;
pub use libp2p_identity::PeerId;
pub use manifest::Manifest;
pub use merkle::{CodexTree, Proof};
pub use node::{Download, Event, Node, State, Upload};

/// Default block size (the reference's `DefaultBlockSize`).
pub const DEFAULT_BLOCK_SIZE: usize = 65536;

/// Largest accepted block size: 100 MiB, the block exchange's message limit.
pub const MAX_BLOCK_SIZE: usize = 100 * 1024 * 1024;
