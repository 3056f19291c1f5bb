//! A C program built against `libcodex.h` and the libraries this crate produces: it creates
//! and starts a node, uploads a file with `codex_upload_file`, downloads it back with
//! `codex_download_stream` and tears the node down (`tests/c/upload_download.c`).
//!
//! The program is compiled with the system C compiler (`$CC`, else `cc`) and linked once
//! against `libcodex.so` (with an rpath) and once statically against `libcodex.a`. Both are
//! this package's library target, which `cargo test` does not build (it builds only rlib
//! libraries for integration tests): the test builds them first with `cargo build --lib`
//! into the directories of its own run (see [`lib_dir`]), so `cargo test -p codex-lib`
//! alone always tests the current code.

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The system libraries a Rust staticlib needs on Linux (`rustc --print native-static-libs`).
const NATIVE_STATIC_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

/// How long building the libraries may take (a first build links two large files).
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The directory holding `file`, one of this package's libraries, freshly built for the
/// profile (and target) of this test run: the profile directory, parent of the `deps/`
/// directory the test binary runs from.
///
/// `cargo test` does not build them: it builds only linkable (rlib) library targets for
/// integration tests, and this package's library is a cdylib and a staticlib. So the first
/// call runs `cargo build --lib` for this package, with this run's target directory,
/// profile and target triple: quick when nothing changed, and the C program never links a
/// missing or stale library. The outer cargo holds no build lock while tests run.
fn lib_dir(file: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let profile_dir = BUILT.get_or_init(build_libraries);
    let path = profile_dir.join(file);
    assert!(
        path.is_file(),
        "`cargo build --lib` of codex-lib did not produce {}",
        path.display()
    );
    profile_dir.clone()
}

/// Runs `cargo build --lib` for this package into the directories of this test run;
/// returns the profile directory.
fn build_libraries() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary runs from <target-dir>/[<triple>/]<profile>/deps/");
    let profile_name = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a profile directory name");
    let parent = profile_dir.parent().expect("a target directory");
    // Cargo marks the root of a target directory with CACHEDIR.TAG; a directory between it
    // and the profile directory is a target triple (`cargo test --target <triple>`).
    let (target_dir, triple) = if parent.join("CACHEDIR.TAG").is_file() {
        (parent, None)
    } else {
        let root = parent.parent().expect("a target directory");
        (root, parent.file_name().and_then(|n| n.to_str()))
    };
    // The `dev` and `test` profiles build into `debug/`, every other profile into its name.
    let profile = if profile_name == "debug" {
        "dev"
    } else {
        profile_name
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(manifest_dir().join("Cargo.toml"))
        .args(["--lib", "--quiet", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir);
    if let Some(triple) = triple {
        cmd.args(["--target", triple]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let started = Instant::now();
    while child.try_wait().expect("waiting for cargo").is_none() {
        if started.elapsed() > BUILD_TIMEOUT {
            let _ = child.kill();
            panic!("{cmd:?} took more than {BUILD_TIMEOUT:?}; build the library first: cargo build -p codex-lib");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("cargo's output");
    assert!(
        out.status.success(),
        "building libcodex failed: {cmd:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    profile_dir.to_path_buf()
}

/// The C compiler: `$CC` (which may carry arguments), else `cc`.
fn compiler() -> Command {
    let cc = std::env::var("CC").unwrap_or_default();
    let mut words = cc.split_whitespace();
    let mut cmd = Command::new(words.next().unwrap_or("cc"));
    cmd.args(words);
    cmd
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}): {cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How the program is linked.
enum Link {
    /// `-lcodex` against `libcodex.so`, found at run time through an rpath.
    Shared,
    /// `libcodex.a` and the system libraries it needs.
    Static,
}

/// Compiles `tests/c/upload_download.c` into `out_dir`; returns the executable.
fn build(link: &Link, out_dir: &Path) -> PathBuf {
    let source = manifest_dir().join("tests/c/upload_download.c");
    let include = manifest_dir().join("../abi");
    let exe = out_dir.join(match link {
        Link::Shared => "upload_download_shared",
        Link::Static => "upload_download_static",
    });
    let mut cc = compiler();
    cc.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .arg("-I")
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Shared => {
            let dir = lib_dir("libcodex.so");
            let mut rpath = OsString::from("-Wl,-rpath,");
            rpath.push(&dir);
            cc.arg("-L")
                .arg(&dir)
                .arg("-lcodex")
                .arg(rpath)
                .arg("-pthread");
        }
        Link::Static => {
            cc.arg(lib_dir("libcodex.a").join("libcodex.a"))
                .arg("-pthread")
                .args(NATIVE_STATIC_LIBS);
        }
    }
    run(&mut cc, "compiling the C program");
    exe
}

/// `n` pseudo-random bytes.
fn data(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A fresh directory for one run, under cargo's scratch directory for integration tests.
/// Removed by the caller on success, kept for inspection on failure.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("c_program-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Builds the program, runs it on a multi-block file and checks what it did; returns the
/// CID it printed.
fn upload_and_download(link: &Link, name: &str) -> String {
    let work = scratch(name);
    let exe = build(link, &work);
    let input = work.join("input.bin");
    let output = work.join("output.bin");
    let data_dir = work.join("data");
    // Four whole 64 KiB blocks and a partial one.
    let original = data(300 * 1024 + 123);
    fs::write(&input, &original).expect("writing the input file");

    let out = run(
        Command::new(&exe).arg(&data_dir).arg(&input).arg(&output),
        "the C program",
    );
    let stdout = String::from_utf8(out.stdout).expect("the CID is text");
    let cid = stdout.trim();
    assert!(
        cid.starts_with("zDvZRwzm") && cid.len() > 40 && !cid.contains(char::is_whitespace),
        "not a dataset CID: {stdout:?}"
    );
    assert_eq!(
        fs::read(&output).expect("the output file"),
        original,
        "the downloaded file differs"
    );
    assert!(
        data_dir.join("blocks").is_dir(),
        "the node did not use the data-dir"
    );
    fs::remove_dir_all(&work).expect("removing the scratch directory");
    cid.to_owned()
}

#[test]
fn a_c_program_uploads_and_downloads_through_the_shared_library() {
    let first = upload_and_download(&Link::Shared, "shared-1");
    // The same bytes under the same file name always give the same dataset CID.
    assert_eq!(upload_and_download(&Link::Shared, "shared-2"), first);
}

#[test]
fn a_c_program_links_the_static_library() {
    let cid = upload_and_download(&Link::Static, "static");
    assert_eq!(cid, upload_and_download(&Link::Shared, "shared-3"));
}
