//! The block exchange spoken directly to a live node process, message by message and byte
//! by byte: what it answers, and what it does with malformed, oversized, half-sent and
//! unwanted input (it drops the bad stream or peer and keeps serving everyone else).

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;

#[path = "common/node.rs"]
mod node;

#[path = "common/peer.rs"]
mod peer;

use std::time::Duration;

use codex_node::net::message::{
    frame, write_message, BlockAddress, Delivery, Entry, Message, WantType,
};
use codex_node::{Cid, CidKind, Manifest, PeerId};
use futures::AsyncWriteExt;
use node::{write_random, NodeProc};
use peer::{eventually, TestPeer};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

const BLOCK: usize = codex_node::DEFAULT_BLOCK_SIZE;

/// Collects what `from` sends until `done` says the answers are complete (10 s at most).
async fn answers(
    inbox: &mut mpsc::Receiver<(PeerId, Message)>,
    from: PeerId,
    mut done: impl FnMut(&Message) -> bool,
) -> Message {
    let mut all = Message::default();
    let collect = async {
        while let Some((peer, m)) = inbox.recv().await {
            if peer != from {
                continue;
            }
            all.deliveries.extend(m.deliveries);
            all.presences.extend(m.presences);
            if done(&all) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), collect)
        .await
        .expect("the node did not answer in time");
    all
}

/// A node holding a dataset, with its CID, the file's bytes and a temporary directory.
fn node_with_dataset(len: usize, seed: u64) -> (NodeProc, Cid, Vec<u8>, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let (file, data) = write_random(tmp.path(), "data.bin", len, seed);
    let mut a = NodeProc::start(&[]);
    let cid: Cid = a.ok(&format!("upload {}", file.display())).parse().unwrap();
    (a, cid, data, tmp)
}

/// Asks `node` for the manifest `mcid` and block `index` of its tree, and checks the block
/// against `data` and the tree root. Returns the manifest.
async fn fetch_one(
    peer: &TestPeer,
    inbox: &mut mpsc::Receiver<(PeerId, Message)>,
    node: PeerId,
    mcid: Cid,
    index: u64,
    data: &[u8],
) -> Manifest {
    let mut s = peer.open(node).await;
    write_message(
        &mut s,
        &Message::wants(vec![Entry::want(BlockAddress::Cid(mcid), WantType::Block)]),
    )
    .await
    .unwrap();
    let got = answers(inbox, node, |m| !m.deliveries.is_empty()).await;
    assert!(mcid.matches(&got.deliveries[0].data));
    let manifest = Manifest::decode(&got.deliveries[0].data).unwrap();
    let address = BlockAddress::Leaf {
        tree: manifest.tree_cid,
        index,
    };
    write_message(
        &mut s,
        &Message::wants(vec![Entry::want(address, WantType::Block)]),
    )
    .await
    .unwrap();
    let got = answers(inbox, node, |m| !m.deliveries.is_empty()).await;
    let d = &got.deliveries[0];
    assert_eq!(d.address, address);
    let start = index as usize * BLOCK;
    let end = (start + BLOCK).min(data.len());
    assert_eq!(&d.data[..end - start], &data[start..end]);
    // Past the end of the file the last block is zero-padded to the block size.
    assert_eq!(d.data.len(), BLOCK);
    assert!(d.data[end - start..].iter().all(|b| *b == 0));
    let digest: [u8; 32] = Sha256::digest(&d.data).into();
    assert_eq!(d.cid, Cid::from_digest(CidKind::Block, digest));
    let proof = d.proof.as_ref().expect("a leaf delivery carries its proof");
    assert_eq!(proof.index, index);
    assert!(proof.verify(&digest, &manifest.tree_cid.digest()));
    manifest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_node_answers_wants_with_presences_and_proven_blocks() {
    let len = 16 * BLOCK + 5;
    let (a, mcid, data, _tmp) = node_with_dataset(len, 21);
    let peer = TestPeer::start("protocol-test").await;
    let mut inbox = peer.inbox();
    let node = peer.dial(&a.peer_id, &a.addr).await;

    let manifest = fetch_one(&peer, &mut inbox, node, mcid, 3, &data).await;
    assert_eq!(manifest.dataset_size, len as u64);
    // The last, padded block.
    fetch_one(&peer, &mut inbox, node, mcid, 16, &data).await;

    // Presences: Have for what it holds, DontHave (when asked for it) for what it does not.
    let unknown = Cid::hash_of(CidKind::Manifest, b"nobody stores this");
    let beyond = BlockAddress::Leaf {
        tree: manifest.tree_cid,
        index: 17,
    };
    let mut s = peer.open(node).await;
    let mut quiet = Entry::want(BlockAddress::Cid(unknown), WantType::Have);
    quiet.send_dont_have = false;
    write_message(
        &mut s,
        &Message::wants(vec![
            quiet,
            Entry::want(BlockAddress::Cid(mcid), WantType::Have),
            Entry::want(BlockAddress::Cid(unknown), WantType::Have),
            Entry::want(beyond, WantType::Block),
        ]),
    )
    .await
    .unwrap();
    let got = answers(&mut inbox, node, |m| m.presences.len() >= 3).await;
    let have = |address: BlockAddress| {
        got.presences
            .iter()
            .find(|p| p.address == address)
            .map(|p| p.have)
    };
    assert_eq!(have(BlockAddress::Cid(mcid)), Some(true));
    assert_eq!(have(BlockAddress::Cid(unknown)), Some(false));
    assert_eq!(have(beyond), Some(false));
    assert_eq!(got.presences.len(), 3, "{:?}", got.presences);
    assert!(got.deliveries.is_empty());

    // A cancel in the same list withdraws the want: only the second block comes back.
    let first = BlockAddress::Leaf {
        tree: manifest.tree_cid,
        index: 0,
    };
    let second = BlockAddress::Leaf {
        tree: manifest.tree_cid,
        index: 1,
    };
    let mut cancel = Entry::want(first, WantType::Block);
    cancel.cancel = true;
    write_message(
        &mut s,
        &Message::wants(vec![
            Entry::want(first, WantType::Block),
            cancel,
            Entry::want(second, WantType::Block),
        ]),
    )
    .await
    .unwrap();
    let got = answers(&mut inbox, node, |m| !m.deliveries.is_empty()).await;
    assert_eq!(got.deliveries.len(), 1);
    assert_eq!(got.deliveries[0].address, second);
}

/// After each kind of abuse, the node still answers an honest peer and its own commands.
async fn still_serves(a: &mut NodeProc, mcid: Cid, data: &[u8]) {
    let honest = TestPeer::start("honest").await;
    let mut inbox = honest.inbox();
    let node = honest.dial(&a.peer_id, &a.addr).await;
    fetch_one(&honest, &mut inbox, node, mcid, 2, data).await;
    assert_eq!(a.ok(&format!("exists {mcid}")), "true");
}

/// Checks that the node stopped reading stream `s` (a want sent on it goes unanswered)
/// while it still reads a new stream from the same peer.
async fn stream_dropped(
    peer: &TestPeer,
    inbox: &mut mpsc::Receiver<(PeerId, Message)>,
    node: PeerId,
    mut s: libp2p::Stream,
    mcid: Cid,
) {
    let ask = Message::wants(vec![Entry::want(BlockAddress::Cid(mcid), WantType::Have)]);
    // The write may fail (the reset arrived) or vanish; either way no answer comes.
    let _ = write_message(&mut s, &ask).await;
    let quiet = tokio::time::timeout(Duration::from_secs(1), inbox.recv()).await;
    assert!(
        quiet.is_err(),
        "the node still reads a stream it should have dropped"
    );
    let mut fresh = peer.open(node).await;
    write_message(&mut fresh, &ask).await.unwrap();
    let got = answers(inbox, node, |m| !m.presences.is_empty()).await;
    assert!(got.presences[0].have);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_lose_their_stream_and_nothing_else() {
    let (mut a, mcid, data, _tmp) = node_with_dataset(4 * BLOCK, 22);
    let bad = TestPeer::start("bad-frames").await;
    let mut inbox = bad.inbox();
    let node = bad.dial(&a.peer_id, &a.addr).await;

    // A length of 200 MiB: refused before any of it is read.
    let mut s = bad.open(node).await;
    let mut huge = vec![0x80, 0x80, 0x80, 0x64]; // varint 200 MiB
    huge.extend_from_slice(&[0u8; 1000]);
    s.write_all(&huge).await.unwrap();
    s.flush().await.unwrap();
    stream_dropped(&bad, &mut inbox, node, s, mcid).await;

    // A well-framed message that is not protobuf.
    let mut s = bad.open(node).await;
    s.write_all(&[0x05, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    s.flush().await.unwrap();
    stream_dropped(&bad, &mut inbox, node, s, mcid).await;

    // A want for a block address that cannot exist (a leaf of a manifest CID): no answer
    // but DontHave.
    let mut s = bad.open(node).await;
    let odd = BlockAddress::Leaf {
        tree: mcid,
        index: u64::MAX,
    };
    write_message(
        &mut s,
        &Message::wants(vec![Entry::want(odd, WantType::Block)]),
    )
    .await
    .unwrap();
    let got = answers(&mut inbox, node, |m| !m.presences.is_empty()).await;
    assert!(!got.presences[0].have);

    // Half a frame, then the connection goes away.
    let mut s = bad.open(node).await;
    let framed = frame(&Message::wants(vec![Entry::want(
        BlockAddress::Cid(mcid),
        WantType::Block,
    )]));
    s.write_all(&framed[..framed.len() / 2]).await.unwrap();
    s.flush().await.unwrap();
    bad.host.disconnect(node);
    assert!(bad.disconnected(node, Duration::from_secs(10)).await);

    still_serves(&mut a, mcid, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_flooding_and_spamming_peers_do_not_hurt_the_node() {
    let (mut a, mcid, data, _tmp) = node_with_dataset(4 * BLOCK, 23);

    // A peer that connects, opens a stream and says nothing.
    let silent = TestPeer::start("silent").await;
    let silent_node = silent.dial(&a.peer_id, &a.addr).await;
    let _quiet_stream = silent.open(silent_node).await;

    // A peer that floods want lists for blocks nobody has (and never reads the answers).
    let rss_before = a.rss_kib();
    let flood = TestPeer::start("flood").await;
    let node = flood.dial(&a.peer_id, &a.addr).await;
    let mut s = flood.open(node).await;
    for round in 0..40u64 {
        let entries = (0..5_000u64)
            .map(|i| {
                let cid = Cid::hash_of(CidKind::Block, &(round * 5_000 + i).to_le_bytes());
                Entry::want(BlockAddress::Cid(cid), WantType::Block)
            })
            .collect();
        write_message(&mut s, &Message::wants(entries))
            .await
            .unwrap();
    }
    still_serves(&mut a, mcid, &data).await;
    let grown = a.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 << 10,
        "200 000 queued wants grew the node by {grown} KiB"
    );

    // A peer that sends blocks nobody asked for is dropped after a few thousand.
    let spam = TestPeer::start("spam").await;
    let node = spam.dial(&a.peer_id, &a.addr).await;
    let mut s = spam.open(node).await;
    let mut sent = 0u64;
    let dropped = loop {
        let deliveries = (0..500u64)
            .map(|i| {
                let data = (sent + i).to_le_bytes().to_vec();
                let cid = Cid::hash_of(CidKind::Block, &data);
                Delivery {
                    cid,
                    data: data.into(),
                    address: BlockAddress::Cid(cid),
                    proof: None,
                }
            })
            .collect();
        let msg = Message {
            deliveries,
            ..Message::default()
        };
        if write_message(&mut s, &msg).await.is_err() {
            break true;
        }
        sent += 500;
        if sent > 20_000 {
            break false;
        }
    };
    assert!(
        dropped || spam.disconnected(node, Duration::from_secs(10)).await,
        "a peer sending {sent} unrequested blocks was kept"
    );
    assert!(
        eventually(Duration::from_secs(10), || !spam
            .host
            .info()
            .peers
            .contains_key(&node))
        .await
    );

    // The silent peer is still connected, and the node still serves.
    assert!(a.is_connected(&silent.peer_id()));
    still_serves(&mut a, mcid, &data).await;
}

/// The tree CID of dataset `mcid` held by `a`, as a peer learns it from the manifest.
async fn tree_of(a: &NodeProc, mcid: Cid, data: &[u8]) -> Cid {
    let peer = TestPeer::start("manifest").await;
    let mut inbox = peer.inbox();
    let node = peer.dial(&a.peer_id, &a.addr).await;
    fetch_one(&peer, &mut inbox, node, mcid, 0, data)
        .await
        .tree_cid
}

/// A peer that asks `a` for the first `blocks` blocks of `tree` and never reads what the
/// node sends, with the stream it asked on.
async fn stalled_peer(
    a: &NodeProc,
    name: &str,
    tree: Cid,
    blocks: u64,
) -> (TestPeer, libp2p::Stream) {
    let h = TestPeer::start(name).await;
    h.hoard();
    let node = h.dial(&a.peer_id, &a.addr).await;
    let wants = Message::wants(
        (0..blocks)
            .map(|index| Entry::want(BlockAddress::Leaf { tree, index }, WantType::Block))
            .collect(),
    );
    // A busy node may drop a new inbound stream (libp2p-stream hands streams over one at a
    // time and drops what arrives meanwhile); a peer then opens another.
    for _ in 0..5 {
        let mut s = h.open(node).await;
        if write_message(&mut s, &wants).await.is_ok() {
            return (h, s);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name}: the node took no want list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_that_ask_for_everything_and_stop_reading_hold_bounded_memory() {
    const BLOCKS: u64 = 768; // 48 MiB: more than a stalled peer's buffers take in
    let (mut a, mcid, data, _tmp) = node_with_dataset(BLOCKS as usize * BLOCK, 29);
    let tree = tree_of(&a, mcid, &data).await;
    let rss_before = a.rss_kib();

    // Eight peers each want every block and never read what the node sends.
    let mut hoarders = Vec::new();
    for i in 0..8 {
        hoarders.push(stalled_peer(&a, &format!("hoarder-{i}"), tree, BLOCKS).await);
    }
    // Until their connections stop taking data, the node sends; then its reads wait.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Another peer is still served at once, and the node did not fill up with blocks
    // queued for the stalled peers (unbounded, that is 10 MiB or more for each).
    still_serves(&mut a, mcid, &data).await;
    let grown = a.rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 << 10,
        "eight stalled peers grew the node by {grown} KiB"
    );
    drop(hoarders);
    still_serves(&mut a, mcid, &data).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_stalled_peers_than_the_node_has_blocking_threads_do_not_stop_it() {
    // The node reads blocks on a pool of 64 threads. A read waiting for a stalled peer (for
    // its share of the serving budget, or for room in its send queue) must not hold one of
    // them, or 64 peers that ask for everything and stop reading stop the node serving
    // anyone else, and stop its own storage calls too.
    const STALLED: usize = 72;
    const BLOCKS: u64 = 256; // 16 MiB: more than a stalled connection's buffers take in
    let (mut a, mcid, data, _tmp) = node_with_dataset(BLOCKS as usize * BLOCK, 31);
    let tree = tree_of(&a, mcid, &data).await;
    let mut hoarders = Vec::new();
    for i in 0..STALLED {
        hoarders.push(stalled_peer(&a, &format!("hoarder-{i}"), tree, BLOCKS).await);
    }
    // Time for every stalled connection to fill and every read for it to start waiting.
    tokio::time::sleep(Duration::from_secs(5)).await;

    // A new peer is served, and the node's own calls answer, all while they wait.
    tokio::time::timeout(Duration::from_secs(20), still_serves(&mut a, mcid, &data))
        .await
        .expect("the node stopped serving while peers stalled");
    drop(hoarders);
    still_serves(&mut a, mcid, &data).await;
}
