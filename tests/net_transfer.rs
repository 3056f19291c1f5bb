//! Multi-node transfers between real OS processes on 127.0.0.1, each running the
//! `codex-cli serve` node program (the safe `codex` API over the vendored libcodex) with its
//! own data-dir.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

#[path = "common/node.rs"]
mod node;

use std::time::{Duration, Instant};

use node::{space_used, write_random, NodeProc};

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

#[test]
fn cancelling_a_network_download_leaves_both_nodes_healthy() {
    let tmp = tempfile::tempdir().unwrap();
    let size = 256 << 20;
    let (file, data) = write_random(tmp.path(), "data.bin", size, 4);
    let mut a = NodeProc::start(&[]);
    let mut c = NodeProc::start(&[]);
    let cid = a.ok(&format!("upload {}", file.display()));
    c.connect(&a);
    // Read the first 4 MiB through the safe API, then drop the download.
    let got: usize = c
        .ok(&format!("download-part {cid} {}", 4 << 20))
        .parse()
        .unwrap();
    assert!((4 << 20..size).contains(&got), "{got}");
    // The download stops: what C holds stops growing, short of the whole dataset.
    std::thread::sleep(Duration::from_millis(500));
    let held = space_used(&mut c);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(space_used(&mut c), held, "the cancelled download went on");
    assert!(held < size as u64, "finished before it was cancelled");
    assert_eq!(c.ok(&format!("exists {cid}")), "false");

    // A still serves: a new node downloads everything from it.
    let mut d = NodeProc::start(&[]);
    d.connect(&a);
    let out = tmp.path().join("d.bin");
    d.ok(&format!("download {cid} {}", out.display()));
    assert!(std::fs::read(&out).unwrap() == data);
    // C resumes from what it kept and ends with the same bytes.
    let out = tmp.path().join("c.bin");
    c.ok(&format!("download {cid} {}", out.display()));
    assert!(std::fs::read(&out).unwrap() == data);
    assert_eq!(space_used(&mut c), space_used(&mut a));
}
