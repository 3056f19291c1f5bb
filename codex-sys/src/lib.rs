//! Raw FFI bindings to **libcodex**, the C ABI of the Codex storage node (release
//! `1.0.0-prototype.1`, see [`ABI_VERSION`]).
//!
//! This crate only declares the C functions, the [`CodexCallback`] type and the `RET_*`
//! codes of `libcodex.h`; the safe async API lives in the `codex` crate. Every function
//! reports its result through the callback: each accepted request gets zero or more
//! [`RET_PROGRESS`] callbacks and then exactly one terminal [`RET_OK`] or [`RET_ERR`], on a
//! thread of the library.
//!
//! # Which library is linked
//!
//! The build script makes one decision:
//!
//! | features / environment | library |
//! |---|---|
//! | `vendored` (default), no `CODEX_NO_VENDOR`, no `CODEX_LIB_DIR` | the in-tree Rust implementation (`vendor/abi`, crate `codex-abi`), linked as an ordinary Rust dependency |
//! | `vendored` off, or `CODEX_NO_VENDOR=1`, or `CODEX_LIB_DIR` set | a system `libcodex` (for example the Nim-built reference): `libcodex.so`, or `libcodex.a` with `CODEX_STATIC=1` or the `static` feature |
//!
//! A system library is taken from `CODEX_LIB_DIR` if set, else from the first of
//! `/usr/local/lib`, `/usr/lib`, `/usr/lib/x86_64-linux-gnu` that has it; if it is not
//! found the build fails with the exact variables to set. A shared library must also be
//! found at run time (`LD_LIBRARY_PATH` when it is not in a standard directory).
//! [`vendored()`] tells at run time which kind was linked.
//!
//! Since cargo features are additive, the environment variables are the way to override a
//! `vendored` feature that some dependant turned on:
//!
//! ```sh
//! CODEX_NO_VENDOR=1 CODEX_LIB_DIR=/opt/codex/lib cargo build
//! ```
//!
//! # Environment variables
//!
//! - `CODEX_NO_VENDOR=1`: link a system libcodex even when the `vendored` feature is on.
//! - `CODEX_LIB_DIR=<dir>`: the directory holding `libcodex.so` / `libcodex.a` (implies a
//!   system library).
//! - `CODEX_STATIC=1`: link the system library statically (`libcodex.a`).
//! - `CODEX_INCLUDE_DIR=<dir>`: the directory holding `libcodex.h`, for the `bindgen`
//!   feature; defaults to `vendor/abi` of this workspace.
//!
//! Dependants that declare `codex-sys` as a dependency get the header directory as
//! `DEP_CODEX_INCLUDE` in their build scripts (and `DEP_CODEX_VENDORED`, `1` or `0`).
//!
//! # Features
//!
//! - `vendored` (default): build and link the in-tree implementation.
//! - `static`: prefer `libcodex.a` when a system library is linked.
//! - `bindgen`: generate the bindings at build time (needs libclang) instead of using the
//!   committed `src/bindings.rs`. Both come from the same code in `build.rs`;
//!   `scripts/regen-bindings.sh` regenerates the committed file and
//!   `scripts/regen-bindings.sh --check` fails when it is stale.

/// The generated declarations; see `build.rs` for how they are made.
#[allow(
    non_camel_case_types,
    non_upper_case_globals,
    non_snake_case,
    missing_docs,
    unreachable_pub,
    dead_code,
    improper_ctypes,
    clippy::all,
    clippy::pedantic,
    rustdoc::all
)]
mod bindings {
    #[cfg(feature = "bindgen")]
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
    #[cfg(not(feature = "bindgen"))]
    include!("bindings.rs");
}

pub use bindings::*;

// Link the in-tree implementation: its `#[no_mangle]` functions are the symbols declared
// above. Not referenced when a system library is linked, so the two never clash.
#[cfg(codex_vendored)]
use codex_abi as _;

/// The upstream libcodex release whose ABI these bindings match (the build metadata of
/// this crate's version). A compatible library reports a version containing it through
/// [`codex_version`].
pub const ABI_VERSION: &str = "1.0.0-prototype.1";

/// Whether the in-tree Rust implementation of libcodex is linked (`true`), rather than a
/// system libcodex (`false`).
#[must_use]
pub const fn vendored() -> bool {
    cfg!(codex_vendored)
}
