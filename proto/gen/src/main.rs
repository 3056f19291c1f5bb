//! Regenerates `proto/src/generated/` from `proto/proto/*.proto`.
//!
//! ```text
//! cargo run -p codex-proto-gen            # rewrite proto/src/generated/
//! cargo run -p codex-proto-gen -- DIR     # write the generated files into DIR instead
//! ```
//!
//! The schemas are parsed by protox (a protobuf compiler in Rust, so no `protoc` is needed)
//! and turned into Rust by prost-build. `scripts/regen-proto.sh --check` runs this program
//! into a temporary directory and compares the result with the committed files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// The schema files, relative to the schema directory. All are in package `protobuf`, so
/// prost-build writes one file, `protobuf.rs`.
const SCHEMAS: &[&str] = &["history_archive.proto"];

fn main() -> ExitCode {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("codex-proto-gen lives in proto/gen")
        .to_path_buf();
    let out_dir = match std::env::args_os().nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => crate_dir.join("src").join("generated"),
    };
    match generate(&crate_dir.join("proto"), &out_dir) {
        Ok(()) => {
            println!("codex-proto-gen: wrote {}", out_dir.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("codex-proto-gen: {err}");
            ExitCode::FAILURE
        }
    }
}

fn generate(schema_dir: &Path, out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    // File names in the descriptors are relative to `schema_dir`, so the output does not
    // depend on where the repository is checked out.
    let descriptors = protox::compile(SCHEMAS, [schema_dir])?;
    std::fs::create_dir_all(out_dir)?;
    prost_build::Config::new()
        .out_dir(out_dir)
        // `bytes` fields become `bytes::Bytes`: archives are sliced out of one buffer
        // without copying each payload.
        .bytes(["."])
        // Maps become `BTreeMap`s, encoded in ascending key order: the index encodes to the
        // same bytes (and so the same CID) every time, like Go's deterministic marshalling.
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
