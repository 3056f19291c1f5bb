//! Safe async Rust API for an in-process Codex storage node.
//!
//! A [`CodexNode`] embeds a node through libcodex's C ABI: by default the in-tree Rust
//! implementation (`vendored` feature), or a Nim-built libcodex (see `codex-sys`). All
//! library calls of a node are made from one dispatcher thread the node owns; callbacks are
//! bridged to futures and streams without blocking the library's threads, and no panic
//! crosses the boundary.
//!
//! ```no_run
//! # async fn demo() -> codex::Result<()> {
//! use codex::{CodexConfig, CodexNode};
//! use futures::StreamExt;
//!
//! let config = CodexConfig::builder()
//!     .data_dir("/tmp/codex-demo")
//!     .storage_quota(1 << 30)
//!     .build()?;
//! let node = CodexNode::new(config).await?;
//! node.start().await?;
//!
//! let cid = node.upload().filename("hello.txt").bytes(&b"Hello World!"[..]).await?;
//! let mut download = node.download(&cid).await?;
//! while let Some(chunk) = download.next().await {
//!     println!("{} bytes", chunk?.len());
//! }
//! node.destroy().await?;
//! # Ok(()) }
//! ```
//!
//! # Working with the reference library
//! Nothing here relies on behaviour only the vendored node has: downloads of one CID are
//! serialised (the reference keys download sessions by CID), a download that ends short of
//! the manifest's size is an error ([`Error::Truncated`]; the reference ends a cancelled
//! download with success), strings the reference does not copy are kept alive until the
//! request completes, and the node is never restarted after a stop by this crate.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(rustdoc::broken_intra_doc_links)]

mod config;
mod download;
mod error;
mod ffi;
mod node;
mod types;
mod upload;

pub use config::{CodexConfig, CodexConfigBuilder, LogFormat, Nat, Relay};
pub use download::{Download, DownloadBuilder, DownloadProgress};
pub use error::{Error, Result};
pub use node::CodexNode;
pub use types::{Cid, DatasetInfo, DebugInfo, Event, Manifest, PeerInfo, Space};
pub use upload::{Upload, UploadBuilder, UploadProgress, DEFAULT_BLOCK_SIZE};

/// Whether the in-tree (vendored) libcodex is linked, rather than a system one.
pub fn vendored() -> bool {
    codex_sys::vendored()
}
