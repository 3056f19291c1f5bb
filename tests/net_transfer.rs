//! Multi-node transfers between real OS processes on 127.0.0.1, each running the
//! `codex-cli serve` node program (the safe `codex` API over the vendored libcodex) with its
//! own data-dir.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct NodeProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    peer_id: String,
    addr: String,
    _dir: tempfile::TempDir,
}

impl NodeProc {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_codex-cli"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["--quota", &(2u64 << 30).to_string(), "serve"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(
            line.strip_prefix("ready ")
                .unwrap_or_else(|| panic!("{line}")),
        )
        .unwrap();
        let addr = info["addrs"][0].as_str().unwrap().to_owned();
        assert!(addr.starts_with("/ip4/127.0.0.1/tcp/"), "{addr}");
        Self {
            child,
            stdin,
            stdout,
            peer_id: info["peerId"].as_str().unwrap().to_owned(),
            addr,
            _dir: dir,
        }
    }

    fn cmd(&mut self, line: &str) -> Result<String, String> {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut out = String::new();
        self.stdout.read_line(&mut out).unwrap();
        let out = out.trim_end();
        if let Some(ok) = out.strip_prefix("ok") {
            Ok(ok.trim_start().to_owned())
        } else if let Some(err) = out.strip_prefix("err ") {
            Err(err.to_owned())
        } else {
            panic!("node said {out:?} to {line:?}")
        }
    }

    fn ok(&mut self, line: &str) -> String {
        self.cmd(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    fn connect(&mut self, other: &NodeProc) {
        self.ok(&format!("connect {} {}", other.peer_id, other.addr));
    }

    /// Connects to `other` and downloads dataset `cid` from it in the background, waiting
    /// until it is complete.
    fn replicate(&mut self, other: &NodeProc, cid: &str) {
        self.connect(other);
        self.ok(&format!("fetch {cid}"));
        self.ok(&format!("wait-fetch {cid}"));
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

fn write_random(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = common::pseudo_random(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn space_used(node: &mut NodeProc) -> u64 {
    let space: serde_json::Value = serde_json::from_str(&node.ok("space")).unwrap();
    space["quotaUsedBytes"].as_u64().unwrap()
}

#[test]
fn two_nodes_transfer_a_dataset_by_cid() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", (5 << 20) + 12345, 1);
    let mut a = NodeProc::start(&[]);
    let mut b = NodeProc::start(&[]);
    let cid = a.ok(&format!("upload {}", file.display()));
    b.connect(&a);
    assert_eq!(b.ok(&format!("exists {cid}")), "false");
    let out = tmp.path().join("out.bin");
    let n = b.ok(&format!("download {cid} {}", out.display()));
    assert_eq!(n, data.len().to_string());
    assert_eq!(std::fs::read(&out).unwrap(), data);
    // B now holds the dataset itself, under the same CID.
    assert_eq!(b.ok(&format!("exists {cid}")), "true");
    assert!(b.ok("list").contains(&cid));
    assert_eq!(space_used(&mut a), space_used(&mut b));
}

#[test]
fn a_chain_serves_what_it_downloaded() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", 3 << 20, 2);
    let mut a = NodeProc::start(&[]);
    let mut b = NodeProc::start(&[]);
    let mut c = NodeProc::start(&[]);
    let cid = a.ok(&format!("upload {}", file.display()));
    b.replicate(&a, &cid);
    a.kill();
    c.connect(&b);
    let out = tmp.path().join("out.bin");
    c.ok(&format!("download {cid} {}", out.display()));
    assert_eq!(std::fs::read(&out).unwrap(), data);
}

#[test]
fn a_download_from_two_providers_survives_losing_one() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 192 << 20;
    let (file, data) = write_random(tmp.path(), "data.bin", size, 3);
    let mut a = NodeProc::start(&[]);
    let mut b = NodeProc::start(&[]);
    let mut c = NodeProc::start(&[]);
    let cid = a.ok(&format!("upload {}", file.display()));
    b.replicate(&a, &cid);
    c.connect(&a);
    c.connect(&b);
    c.ok(&format!("fetch {cid}"));
    // Kill A once C has a part (but not all) of the dataset.
    let deadline = Instant::now() + Duration::from_secs(60);
    while space_used(&mut c) < (size as u64) / 4 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    a.kill();
    let killed_at = space_used(&mut c);
    assert!(killed_at < size as u64, "finished before A was killed");
    c.ok(&format!("wait-fetch {cid}"));
    let out = tmp.path().join("out.bin");
    c.ok(&format!("download {cid} {}", out.display()));
    assert!(std::fs::read(&out).unwrap() == data);
}

#[test]
fn a_cid_nobody_has_fails_after_the_retries() {
    let mut a = NodeProc::start(&[]);
    let mut b = NodeProc::start(&["--block-retries", "2"]);
    b.connect(&a);
    // A well-formed dataset CID that no node stores.
    let cid = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy";
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let err = b
        .cmd(&format!(
            "download {cid} {}",
            tmp.path().join("x").display()
        ))
        .unwrap_err();
    assert!(err.contains("no peer provides"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Both nodes are still healthy.
    assert_eq!(a.ok(&format!("exists {cid}")), "false");
    assert_eq!(b.ok("list"), "[]");
}
