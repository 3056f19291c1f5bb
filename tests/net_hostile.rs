//! Hostile peers: libp2p peers in the test process that claim every block and then serve
//! corrupt blocks, wrong proofs or a garbage manifest to a real node process. Nothing they
//! send may reach the downloader's data; each is dropped; the download completes from an
//! honest node.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

#[path = "common/node.rs"]
mod node;

#[path = "common/peer.rs"]
mod peer;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use codex_node::store::{Store, StoreConfig};
use node::{space_used, write_random, NodeProc};
use peer::{eventually, Hostile, Lie};

/// A store in `dir` holding `data` as `data.bin`, as the node program uploads it; returns
/// it with the dataset CID.
fn store_with(dir: &Path, data: &[u8]) -> (Arc<Store>, String) {
    let store = Arc::new(
        Store::open(&StoreConfig {
            data_dir: dir.to_owned(),
            quota: 1 << 30,
            ttl: None,
        })
        .unwrap(),
    );
    let mut w = store
        .writer(
            codex_node::DEFAULT_BLOCK_SIZE,
            Some("data.bin".into()),
            Some("application/octet-stream".into()),
        )
        .unwrap();
    w.write(data).unwrap();
    let (cid, _) = w.finish().unwrap();
    (store, cid.to_string())
}

/// Waits until `liar` has told a lie and is disconnected from the node `node_peer`.
async fn assert_dropped(liar: &Hostile, node_peer: &str, what: Lie) {
    assert!(
        eventually(Duration::from_secs(30), || liar.lies() > 0).await,
        "{what:?}: the peer was never asked for anything"
    );
    let node_peer = node_peer.parse().unwrap();
    assert!(
        liar.peer
            .disconnected(node_peer, Duration::from_secs(30))
            .await,
        "{what:?}: the lying peer was not dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_peers_are_dropped_and_the_download_completes_from_an_honest_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", (4 << 20) + 777, 11);
    let mut a = NodeProc::start(&[]);
    let cid = a.ok(&format!("upload {}", file.display()));
    let (store, hostile_cid) = store_with(&tmp.path().join("hostile"), &data);
    assert_eq!(
        hostile_cid, cid,
        "the hostile store must hold the same dataset"
    );

    let lies = [
        Lie::FlippedByte,
        Lie::OtherLeafsProof,
        Lie::NoProof,
        Lie::Truncated,
    ];
    let mut liars = Vec::new();
    for lie in lies {
        liars.push(Hostile::start(Arc::clone(&store), lie).await);
    }
    let mut c = NodeProc::start(&[]);
    for liar in &liars {
        c.connect_to(&liar.peer.peer_id(), &liar.peer.addr.to_string());
    }
    // The liars serve the real manifest, then every block they send is false.
    c.ok(&format!("fetch {cid}"));
    for (liar, lie) in liars.iter().zip(lies) {
        assert_dropped(liar, &c.peer_id, lie).await;
        assert!(c.drops(&liar.peer.peer_id()), "{lie:?}");
    }
    assert_eq!(c.ok(&format!("exists {cid}")), "false");

    // An honest provider appears; the download completes with the true bytes.
    c.connect(&a);
    c.ok(&format!("wait-fetch {cid}"));
    let out = tmp.path().join("out.bin");
    c.ok(&format!("download {cid} {}", out.display()));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "corrupt data reached the downloader"
    );
    assert_eq!(space_used(&mut c), space_used(&mut a));

    // A dropped liar stays banned: when it dials back, the node hangs up.
    let liar = &liars[0];
    let node_peer = liar.peer.dial(&c.peer_id, &c.addr).await;
    assert!(
        liar.peer
            .disconnected(node_peer, Duration::from_secs(10))
            .await
    );
    assert!(c.drops(&liar.peer.peer_id()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_a_garbage_manifest_is_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", 1 << 20, 12);
    let mut a = NodeProc::start(&[]);
    let cid = a.ok(&format!("upload {}", file.display()));
    let (store, _) = store_with(&tmp.path().join("hostile"), &data);
    let liar = Hostile::start(store, Lie::GarbageManifest).await;
    let mut c = NodeProc::start(&["--block-retries", "1"]);
    c.connect_to(&liar.peer.peer_id(), &liar.peer.addr.to_string());

    // The only peer lies: the manifest is not found, the liar is dropped.
    let err = c.cmd(&format!("fetch {cid}")).unwrap_err();
    assert!(err.contains("no peer provides"), "{err}");
    assert_dropped(&liar, &c.peer_id, Lie::GarbageManifest).await;
    assert_eq!(c.ok("list"), "[]");

    c.connect(&a);
    c.ok(&format!("fetch {cid}"));
    c.ok(&format!("wait-fetch {cid}"));
    let out = tmp.path().join("out.bin");
    c.ok(&format!("download {cid} {}", out.display()));
    assert!(std::fs::read(&out).unwrap() == data);
}
