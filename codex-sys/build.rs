//! Build script of `codex-sys`: decides which libcodex the crate links and, with the
//! `bindgen` feature, generates the bindings.
//!
//! The decision, in this order:
//!
//! 1. The `vendored` feature is on (the default), `CODEX_NO_VENDOR` is not set and no
//!    `CODEX_LIB_DIR` is given: the in-tree Rust implementation `codex-abi` provides the
//!    symbols as an ordinary rlib dependency. Nothing is linked from here; the script only
//!    sets `--cfg codex_vendored`.
//! 2. Otherwise a system libcodex is linked: from `CODEX_LIB_DIR` when given, else from
//!    the first standard library directory that holds it. `libcodex.a` when `CODEX_STATIC=1`
//!    or the `static` feature asks for it, `libcodex.so` otherwise.
//!
//! When that library cannot be found and it was asked for through the environment
//! (`CODEX_NO_VENDOR` or `CODEX_LIB_DIR`), the build fails here and says what to set. When
//! only the `vendored` feature is off, the same instructions are printed as warnings and
//! the link fails later: `cargo check`, `clippy` and `doc` of that configuration work on a
//! machine without libcodex.
//!
//! `CODEX_SYS_WRITE_BINDINGS=<absolute path>` (used by `scripts/regen-bindings.sh` with the
//! `bindgen` feature and `cargo check`) makes a regeneration run: the generated bindings are
//! also written to that path, and nothing is linked.
//!
//! Every environment variable is read through [`env`], which tells cargo to rerun this
//! script when the variable changes.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where a system libcodex is looked for when `CODEX_LIB_DIR` is not set.
const STANDARD_LIB_DIRS: &[&str] = &["/usr/local/lib", "/usr/lib", "/usr/lib/x86_64-linux-gnu"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(codex_vendored)");

    // Dependants (e.g. a C test program) find the header through `DEP_CODEX_INCLUDE`.
    let include_dir = include_dir();
    if !include_dir.join("libcodex.h").is_file() {
        println!(
            "cargo::warning=codex-sys: no libcodex.h in {}; set CODEX_INCLUDE_DIR to the \
             directory that holds it",
            include_dir.display()
        );
    }
    println!("cargo::metadata=include={}", include_dir.display());

    let write_bindings = env("CODEX_SYS_WRITE_BINDINGS").map(PathBuf::from);
    #[cfg(feature = "bindgen")]
    generate::bindings(&include_dir, write_bindings.as_deref());
    #[cfg(not(feature = "bindgen"))]
    if write_bindings.is_some() {
        panic!(
            "codex-sys: CODEX_SYS_WRITE_BINDINGS needs the `bindgen` feature; \
             regenerate the bindings with `scripts/regen-bindings.sh`"
        );
    }
    if write_bindings.is_some() {
        // A regeneration run (`scripts/regen-bindings.sh`, a `cargo check`): it only
        // produces the bindings, so it must not fail for want of a library to link.
        return;
    }

    match decide() {
        Linkage::Vendored => {
            println!("cargo::rustc-cfg=codex_vendored");
            println!("cargo::metadata=vendored=1");
        }
        Linkage::System { dir, kind } => {
            if let Some(dir) = dir {
                println!("cargo::rustc-link-search=native={}", dir.display());
                println!("cargo::metadata=lib_dir={}", dir.display());
            }
            println!("cargo::rustc-link-lib={}=codex", kind.rustc_kind());
            println!("cargo::metadata=vendored=0");
        }
    }
}

/// The library the crate ends up linked against.
enum Linkage {
    /// The in-tree implementation, linked as the `codex-abi` rlib.
    Vendored,
    /// A system libcodex, found in `dir` (`None`: not found, the link will fail).
    System {
        dir: Option<PathBuf>,
        kind: LinkKind,
    },
}

#[derive(Clone, Copy)]
enum LinkKind {
    Static,
    Dynamic,
}

impl LinkKind {
    fn rustc_kind(self) -> &'static str {
        match self {
            LinkKind::Static => "static",
            LinkKind::Dynamic => "dylib",
        }
    }

    fn file_names(self) -> &'static [&'static str] {
        match self {
            LinkKind::Static => &["libcodex.a"],
            LinkKind::Dynamic => &["libcodex.so", "libcodex.dylib"],
        }
    }

    fn other(self) -> LinkKind {
        match self {
            LinkKind::Static => LinkKind::Dynamic,
            LinkKind::Dynamic => LinkKind::Static,
        }
    }
}

/// The one decision of this script: vendored, or which system library.
fn decide() -> Linkage {
    let no_vendor = flag("CODEX_NO_VENDOR");
    let lib_dir = env("CODEX_LIB_DIR").map(PathBuf::from);
    let kind = if cfg!(feature = "static") || flag("CODEX_STATIC") {
        LinkKind::Static
    } else {
        LinkKind::Dynamic
    };

    let why_system = if !cfg!(feature = "vendored") {
        "the `vendored` feature of codex-sys is off"
    } else if no_vendor {
        "CODEX_NO_VENDOR is set"
    } else if lib_dir.is_some() {
        "CODEX_LIB_DIR is set"
    } else {
        return Linkage::Vendored;
    };

    let candidates: Vec<PathBuf> = match &lib_dir {
        Some(dir) => vec![dir.clone()],
        None => STANDARD_LIB_DIRS.iter().map(PathBuf::from).collect(),
    };
    let dir = find_in(&candidates, kind);
    if dir.is_none() {
        let message = not_found_message(why_system, &candidates, kind);
        if no_vendor || lib_dir.is_some() {
            panic!("{message}");
        }
        println!("cargo::warning=codex-sys: linking will fail until libcodex is found:");
        for line in message.lines().filter(|line| !line.trim().is_empty()) {
            println!("cargo::warning={line}");
        }
    }
    Linkage::System { dir, kind }
}

/// The first directory of `dirs` holding the library file for `kind`.
fn find_in(dirs: &[PathBuf], kind: LinkKind) -> Option<PathBuf> {
    dirs.iter()
        .find(|dir| {
            kind.file_names()
                .iter()
                .any(|name| dir.join(name).is_file())
        })
        .cloned()
}

fn not_found_message(why_system: &str, dirs: &[PathBuf], kind: LinkKind) -> String {
    let wanted = kind.file_names()[0];
    let searched = dirs
        .iter()
        .map(|dir| dir.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut message = format!(
        "\n\ncodex-sys: a system libcodex is required ({why_system}) but {wanted} was not \
         found in {searched}.\n"
    );
    if let Some(dir) = find_in(dirs, kind.other()) {
        let hint = match kind.other() {
            LinkKind::Static => "set CODEX_STATIC=1 to link it statically",
            LinkKind::Dynamic => "unset CODEX_STATIC and disable the `static` feature to link it",
        };
        message.push_str(&format!(
            "Found {} in {} instead: {hint}.\n",
            kind.other().file_names()[0],
            dir.display()
        ));
    }
    message.push_str(
        "\nDo one of:\n\
         \x20 * name the directory that holds libcodex.so (or libcodex.a with CODEX_STATIC=1):\n\
         \x20       CODEX_NO_VENDOR=1 CODEX_LIB_DIR=/path/to/codex/lib cargo build\n\
         \x20   (a shared library must also be found at run time, e.g. through \
         LD_LIBRARY_PATH=/path/to/codex/lib)\n\
         \x20 * or use the in-tree Rust implementation: enable the `vendored` feature of \
         codex-sys (on by default) and unset CODEX_NO_VENDOR and CODEX_LIB_DIR:\n\
         \x20       env -u CODEX_NO_VENDOR -u CODEX_LIB_DIR cargo build\n",
    );
    message
}

/// The directory holding `libcodex.h`: `CODEX_INCLUDE_DIR`, else the in-tree header in
/// `vendor/abi` of this workspace.
fn include_dir() -> PathBuf {
    match env("CODEX_INCLUDE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
            let workspace = manifest_dir.parent().unwrap_or(manifest_dir);
            workspace.join("vendor").join("abi")
        }
    }
}

/// A boolean environment variable: set and not one of `""`, `0`, `false`, `no`, `off`.
fn flag(name: &str) -> bool {
    env(name).is_some_and(|value| {
        let value = value.to_string_lossy().trim().to_ascii_lowercase();
        !matches!(value.as_str(), "" | "0" | "false" | "no" | "off")
    })
}

/// Reads an environment variable and has cargo rerun this script when it changes. Every
/// variable this script reads goes through here.
fn env(name: &str) -> Option<OsString> {
    println!("cargo::rerun-if-env-changed={name}");
    env::var_os(name)
}

/// Build-time generation of the bindings: the one code path that produces both the bindings
/// compiled with the `bindgen` feature and the committed `src/bindings.rs`.
#[cfg(feature = "bindgen")]
mod generate {
    use std::fs;
    use std::path::{Path, PathBuf};

    use bindgen::callbacks::{IntKind, ParseCallbacks};
    use bindgen::{Formatter, RustEdition, RustTarget};

    /// Written above the generated code, in `OUT_DIR` and in `src/bindings.rs` alike.
    const HEADER: &str = "\
// Raw bindings to libcodex, generated by bindgen from codex-sys/wrapper.h and
// vendor/abi/libcodex.h. DO NOT EDIT BY HAND: regenerate with `scripts/regen-bindings.sh`
// (CI runs `scripts/regen-bindings.sh --check`).

";

    /// The items of the ABI; everything else the header pulls in stays out.
    const ALLOWLIST: &str = "codex_.*|RET_.*|libcodexNimMain|CodexCallback";

    /// The `RET_*` codes are compared with the callback's `int callerRet`: make them `c_int`.
    #[derive(Debug)]
    struct RetCodesAreInt;

    impl ParseCallbacks for RetCodesAreInt {
        fn int_macro(&self, name: &str, _value: i64) -> Option<IntKind> {
            name.starts_with("RET_").then_some(IntKind::Int)
        }
    }

    /// Generates the bindings into `$OUT_DIR/bindings.rs`, and also into `copy_to` if given.
    pub(super) fn bindings(include_dir: &Path, copy_to: Option<&Path>) {
        println!("cargo::rerun-if-changed=wrapper.h");
        let out_dir =
            PathBuf::from(super::env("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));

        // Pinned to the MSRV and edition (not bindgen's default, the building rustc) and
        // formatted with prettyplease (not whatever rustfmt is installed), so the output
        // depends only on the header and the locked bindgen version.
        let rust_target = RustTarget::stable(85, 0).expect("Rust 1.85 is a valid bindgen target");
        let generated = bindgen::Builder::default()
            .header("wrapper.h")
            .clang_arg(format!("-I{}", include_dir.display()))
            .allowlist_item(ALLOWLIST)
            .rust_target(rust_target)
            .rust_edition(RustEdition::Edition2021)
            .use_core()
            .ctypes_prefix("::core::ffi")
            .layout_tests(false)
            .merge_extern_blocks(true)
            .disable_header_comment()
            .formatter(Formatter::Prettyplease)
            .parse_callbacks(Box::new(RetCodesAreInt))
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .generate()
            .unwrap_or_else(|err| {
                panic!(
                    "codex-sys: bindgen failed on wrapper.h with -I{} ({err}). Is libclang \
                     installed? On Debian/Ubuntu: `sudo apt-get install -y libclang-dev`, \
                     or point LIBCLANG_PATH at the directory holding libclang.so. Set \
                     CODEX_INCLUDE_DIR to the directory holding libcodex.h.",
                    include_dir.display()
                )
            });
        let contents = format!("{HEADER}{generated}");

        let out = out_dir.join("bindings.rs");
        fs::write(&out, &contents)
            .unwrap_or_else(|err| panic!("codex-sys: cannot write {}: {err}", out.display()));
        if let Some(path) = copy_to {
            fs::write(path, &contents)
                .unwrap_or_else(|err| panic!("codex-sys: cannot write {}: {err}", path.display()));
        }
    }
}
