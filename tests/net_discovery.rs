//! Discovery between real OS processes on 127.0.0.1 (`codex-cli serve`, the safe `codex`
//! API over the vendored libcodex): nodes join the DHT through a bootstrap node, find the
//! providers of a CID by asking the DHT, and find a peer by its ID alone.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

#[path = "common/node.rs"]
mod node;

use node::{write_random, NodeProc};

/// A node's `spr:` record (its discovery address first, then its TCP address).
fn spr(n: &mut NodeProc) -> String {
    let info: serde_json::Value = serde_json::from_str(&n.ok("info")).unwrap();
    info["spr"].as_str().unwrap().to_owned()
}

#[test]
fn a_download_finds_its_provider_through_the_dht() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", (3 << 20) + 777, 11);
    // D only bootstraps the others; it never holds the dataset.
    let mut d = NodeProc::start(&[]);
    let boot = spr(&mut d);
    let mut a = NodeProc::start(&["--bootstrap", &boot]);
    let mut c = NodeProc::start(&["--bootstrap", &boot]);
    let cid = a.ok(&format!("upload {}", file.display()));
    // C was never told about A: it is connected to D only, which does not have the data.
    assert!(!c.is_connected(&a.peer_id));
    let out = tmp.path().join("out.bin");
    let n = c.ok(&format!("download {cid} {}", out.display()));
    assert_eq!(n, data.len().to_string());
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(
        c.is_connected(&a.peer_id),
        "C downloaded without dialling A?"
    );
    assert_eq!(d.ok(&format!("exists {cid}")), "false");

    // C announced what it downloaded: with A gone, E finds C and downloads from it.
    a.kill();
    let mut e = NodeProc::start(&["--bootstrap", &boot]);
    let out2 = tmp.path().join("out2.bin");
    e.ok(&format!("download {cid} {}", out2.display()));
    assert_eq!(std::fs::read(&out2).unwrap(), data);
    assert!(e.is_connected(&c.peer_id));
}

#[test]
fn a_peer_is_found_by_its_id_alone() {
    let mut d = NodeProc::start(&[]);
    let boot = spr(&mut d);
    let a = NodeProc::start(&["--bootstrap", &boot]);
    let mut b = NodeProc::start(&["--bootstrap", &boot]);
    // `connect` with no address asks the DHT for the peer's record.
    let mut connected = false;
    for _ in 0..20 {
        if b.cmd(&format!("connect {}", a.peer_id)).is_ok() {
            connected = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    assert!(connected, "B never found A");
    assert!(b.is_connected(&a.peer_id));
    // A peer nobody knows is a clear error.
    let stranger = "16Uiu2HAmJ3TSfPnrJNedHy2DMsjTqwBiVAQQqPo579DuMgGxmG99";
    let err = b.cmd(&format!("connect {stranger}")).unwrap_err();
    assert!(err.contains("not found") || err.contains("DHT"), "{err}");
}
