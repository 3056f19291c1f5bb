//! The main job end to end: `codex-cli demo` with a small community (an owner and two
//! member processes on 127.0.0.1) must pass every check of its summary and exit 0.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_community_demo_passes_its_checks() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_codex-cli"))
        .args([
            "demo",
            "--messages",
            "5000",
            "--weeks",
            "5",
            "--timeout",
            "120",
        ])
        // TEST_NODE_LOG=debug keeps what the node processes log (in the kept data-dir).
        .env(
            "RUST_LOG",
            std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // 5 weeks of messages, the first one at the start of the first week: 5 archives.
    for line in [
        "[ok] the owner stored all 5000 generated messages",
        "[ok] the owner made 5 archives and an index",
        "[ok] member 1 holds the owner's 5 archive IDs, all imported, and its index",
        "[ok] member 2 holds the owner's 5 archive IDs, all imported, and its index",
        "[ok] member 2 downloaded all 5 archives from member 1 with the owner offline",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    for member in ["member 1", "member 2"] {
        let line = stdout
            .lines()
            .find(|l| l.contains(&format!("[ok] {member} imported exactly")))
            .unwrap_or_else(|| panic!("no import check of {member} in:\n{stdout}"));
        assert!(!line.contains(" 0 messages"), "{line}");
    }
    assert!(stdout.contains("all 7 checks passed"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn an_empty_history_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_codex-cli"))
        .args(["demo", "--messages", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
