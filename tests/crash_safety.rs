//! A process killed in the middle of an upload leaves a store that opens and serves every
//! dataset completed before, with nothing of the interrupted upload left behind.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use codex::{CodexConfig, CodexNode};

const QUOTA: &str = "1073741824";

fn write_random(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let data = common::pseudo_random(size, seed);
    std::fs::write(path, &data).unwrap();
    data
}

fn cli(data_dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_codex-cli"));
    c.arg("--data-dir").arg(data_dir).arg("--quota").arg(QUOTA);
    c
}

/// The size of the upload in progress in `tmp/`, if any.
fn partial_upload(data_dir: &Path) -> Option<u64> {
    std::fs::read_dir(data_dir.join("tmp"))
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .find(|&n| n > 0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_upload_keeps_completed_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("node");
    let small_path = dir.path().join("small.bin");
    let small = write_random(&small_path, 300_000, 1);
    let out = cli(&data_dir)
        .arg("upload")
        .arg(&small_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let small_cid = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    // A large upload, killed (SIGKILL) as soon as it has written blocks.
    let big_path = dir.path().join("big.bin");
    write_random(&big_path, 96 << 20, 2);
    let mut child = cli(&data_dir)
        .arg("upload")
        .arg(&big_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let partial = loop {
        if let Some(n) = partial_upload(&data_dir) {
            break n;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the upload ended before it was killed"
        );
        assert!(
            Instant::now() < deadline,
            "the upload never started writing"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(partial > 0);

    // A new node on the same data-dir: the completed dataset is whole, the interrupted one
    // left nothing, and the quota counts only what is stored.
    let cfg = CodexConfig::builder()
        .data_dir(&data_dir)
        .storage_quota(1 << 30)
        .build()
        .unwrap();
    let node = CodexNode::new(cfg).await.unwrap();
    node.start().await.unwrap();
    let cid = small_cid.parse().unwrap();
    let back = node.download(&cid).await.unwrap().bytes().await.unwrap();
    assert_eq!(&back[..], &small[..]);
    let list = node.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].cid, cid);
    let space = node.space().await.unwrap();
    assert_eq!(space.total_blocks, 6, "5 data blocks and the manifest");
    assert!(space.quota_used_bytes < 6 * 65536, "{space:?}");
    assert_eq!(std::fs::read_dir(data_dir.join("tmp")).unwrap().count(), 0);
    // The completed dataset's data file, its block sums, and its tree's layers (built at
    // the first read), all of one tree.
    let mut files: Vec<String> = std::fs::read_dir(data_dir.join("blocks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let tree = files[0].trim_end_matches(".dat");
    assert_eq!(
        files,
        [
            format!("{tree}.dat"),
            format!("{tree}.sum"),
            format!("{tree}.tree")
        ]
    );

    // And the store takes new uploads after the crash.
    let again = node.upload().file(&big_path).await.unwrap();
    assert_eq!(node.manifest(&again).await.unwrap().dataset_size, 96 << 20);
    node.destroy().await.unwrap();
}
