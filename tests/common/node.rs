//! A `codex-cli serve` node program in its own process and data-dir, driven over its
//! stdin/stdout line protocol, for the multi-node tests.

#![allow(dead_code)] // each test file uses a different part
#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// A `codex-cli` command on `data_dir` with a 2 GiB quota, running `args`, stdin and
/// stdout piped. `TEST_NODE_LOG=debug` shows what the node processes log.
pub(crate) fn cli(data_dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codex-cli"));
    c.arg("--data-dir")
        .arg(data_dir)
        .args(["--quota", &(2u64 << 30).to_string()])
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    c
}

/// A running node process.
pub(crate) struct NodeProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub(crate) peer_id: String,
    pub(crate) addr: String,
    _dir: tempfile::TempDir,
}

impl NodeProc {
    pub(crate) fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = cli(dir.path(), &["serve"]).args(extra).spawn().unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let info: serde_json::Value = serde_json::from_str(
            line.strip_prefix("ready ")
                .unwrap_or_else(|| panic!("{line}")),
        )
        .unwrap();
        // Empty for a node started with `--listen none`.
        let addr = info["addrs"][0].as_str().unwrap_or_default().to_owned();
        assert!(
            addr.is_empty() || addr.starts_with("/ip4/127.0.0.1/tcp/"),
            "{addr}"
        );
        Self {
            child,
            stdin,
            stdout,
            peer_id: info["peerId"].as_str().unwrap().to_owned(),
            addr,
            _dir: dir,
        }
    }

    pub(crate) fn cmd(&mut self, line: &str) -> Result<String, String> {
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

    pub(crate) fn ok(&mut self, line: &str) -> String {
        self.cmd(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    pub(crate) fn connect(&mut self, other: &NodeProc) {
        self.ok(&format!("connect {} {}", other.peer_id, other.addr));
    }

    /// Connects to `other` and downloads dataset `cid` from it in the background, waiting
    /// until it is complete.
    pub(crate) fn replicate(&mut self, other: &NodeProc, cid: &str) {
        self.connect(other);
        self.ok(&format!("fetch {cid}"));
        self.ok(&format!("wait-fetch {cid}"));
    }

    /// Connects to a peer given by id and address.
    pub(crate) fn connect_to(&mut self, peer_id: &str, addr: &str) {
        self.ok(&format!("connect {peer_id} {addr}"));
    }

    /// The node's `info`: `{peerId, spr, addrs, announce}`.
    pub(crate) fn info(&mut self) -> serde_json::Value {
        serde_json::from_str(&self.ok("info")).unwrap()
    }

    /// The addresses of this node's open connections to `peer_id` (none when not connected).
    pub(crate) fn peer_addrs(&mut self, peer_id: &str) -> Vec<String> {
        match self.cmd(&format!("peer {peer_id}")) {
            Ok(json) => {
                let v: serde_json::Value = serde_json::from_str(&json).unwrap();
                v["addresses"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| a.as_str().unwrap().to_owned())
                    .collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Whether this node is connected to `peer_id` now.
    pub(crate) fn is_connected(&mut self, peer_id: &str) -> bool {
        self.cmd(&format!("peer {peer_id}")).is_ok()
    }

    /// Whether this node is (or within 10 s becomes) disconnected from `peer_id`.
    pub(crate) fn drops(&mut self, peer_id: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.is_connected(peer_id) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// The process's resident set size now, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    pub(crate) fn kill(&mut self) {
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

pub(crate) fn write_random(dir: &Path, name: &str, len: usize, seed: u64) -> (PathBuf, Vec<u8>) {
    let data = super::common::pseudo_random(len, seed);
    let path = dir.join(name);
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

pub(crate) fn space_used(node: &mut NodeProc) -> u64 {
    let space: serde_json::Value = serde_json::from_str(&node.ok("space")).unwrap();
    space["quotaUsedBytes"].as_u64().unwrap()
}
