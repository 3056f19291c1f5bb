//! The vendored libcodex as a C shared and static library (`libcodex.so`, `libcodex.a`).
//!
//! All symbols are defined in `codex-abi`; this crate only gives them the library file
//! names a C or Go program links in place of the Nim-built libcodex. The header is
//! `vendor/abi/libcodex.h`.

pub use codex_abi::*;
