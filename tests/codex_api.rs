//! The safe async API end to end, against the vendored node on real files.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

mod common;
use common::pseudo_random;

use std::future::IntoFuture;
use std::time::Duration;

use bytes::Bytes;
use codex::{Cid, CodexConfig, CodexNode, Error};
use futures::StreamExt;
use tokio::io::AsyncReadExt;

const QUOTA: u64 = 256 << 20;

async fn node_in(dir: &std::path::Path, quota: u64) -> CodexNode {
    let cfg = CodexConfig::builder()
        .data_dir(dir)
        .storage_quota(quota)
        .build()
        .unwrap();
    let node = CodexNode::new(cfg).await.unwrap();
    node.start().await.unwrap();
    node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_vector_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), QUOTA).await;
    assert!(codex::vendored());
    assert!(node.version().await.unwrap().contains("1.0.0-prototype.1"));

    let cid = node
        .upload()
        .filename("hello.txt")
        .bytes(&b"Hello World!"[..])
        .await
        .unwrap();
    assert_eq!(
        cid.as_str(),
        "zDvZRwzmAkhzDRPH5EW242gJBNZ2T7aoH2v1fVH66FxXL4kSbvyM"
    );
    let m = node.manifest(&cid).await.unwrap();
    assert_eq!(m.dataset_size, 12);
    assert_eq!(m.block_size, 65536);
    assert_eq!(m.filename.as_deref(), Some("hello.txt"));
    assert_eq!(m.mimetype.as_deref(), Some("text/plain"));
    let data = node.download(&cid).await.unwrap().bytes().await.unwrap();
    assert_eq!(&data[..], b"Hello World!");

    // The same bytes through every upload source give the same CID.
    let payload = pseudo_random(300_000, 7);
    let from_bytes = node.upload().bytes(payload.clone()).await.unwrap();
    let from_reader = node
        .upload()
        .reader(std::io::Cursor::new(payload.clone()))
        .await
        .unwrap();
    let pieces: Vec<std::io::Result<Bytes>> = payload
        .chunks(10_007)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let from_stream = node
        .upload()
        .stream(futures::stream::iter(pieces))
        .await
        .unwrap();
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, &payload).unwrap();
    let upload = node.upload().file(&file);
    let progress = upload.progress();
    let from_file = upload.await.unwrap();
    assert_eq!(from_bytes, from_reader);
    assert_eq!(from_bytes, from_stream);
    // A file upload records the file name, so its manifest (and CID) differ.
    assert_ne!(from_bytes, from_file);
    let last = progress.collect::<Vec<_>>().await.last().copied().unwrap();
    assert_eq!(last.bytes, 300_000);
    assert_eq!(last.total, Some(300_000));
    assert_eq!(
        node.manifest(&from_file).await.unwrap().filename.as_deref(),
        Some("payload.bin")
    );

    // Every way of reading gives the bytes back.
    let dl = node.download(&from_file).await.unwrap();
    let progress = dl.progress();
    let mut reader = dl.into_async_read();
    let mut back = Vec::new();
    reader.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, payload);
    drop(reader);
    assert_eq!(
        progress.collect::<Vec<_>>().await.last().unwrap().bytes,
        300_000
    );

    let out = dir.path().join("out.bin");
    let n = node
        .download(&from_bytes)
        .await
        .unwrap()
        .to_file(&out)
        .await
        .unwrap();
    assert_eq!(n, 300_000);
    assert_eq!(std::fs::read(&out).unwrap(), payload);

    let chunks: Vec<Bytes> = node
        .download_with(&from_stream)
        .chunk_size(100_000)
        .local(true)
        .start()
        .await
        .unwrap()
        .map(|c| c.unwrap())
        .collect()
        .await;
    assert_eq!(
        chunks.iter().map(Bytes::len).collect::<Vec<_>>(),
        [100_000; 3]
    );
    node.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_operations() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), QUOTA).await;
    let before = node.space().await.unwrap();
    assert_eq!(before.quota_max_bytes, QUOTA);
    assert_eq!(before.total_blocks, 0);

    let cid = node.upload().bytes(vec![1u8; 48]).await.unwrap();
    let space = node.space().await.unwrap();
    assert_eq!(space.total_blocks, 2);
    assert!(space.quota_used_bytes > 65536);
    assert!(node.exists(&cid).await.unwrap());
    let list = node.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].cid, cid);
    assert_eq!(list[0].manifest.dataset_size, 48);
    assert_eq!(node.fetch(&cid).await.unwrap().dataset_size, 48);
    assert_eq!(node.repo().await.unwrap(), dir.path().to_string_lossy());
    let peer = node.peer_id().await.unwrap();
    assert!(peer.starts_with("16Uiu2"), "{peer}");
    assert_eq!(node.debug().await.unwrap().id, peer);

    node.delete(&cid).await.unwrap();
    assert!(!node.exists(&cid).await.unwrap());
    assert!(node.list().await.unwrap().is_empty());
    assert_eq!(node.space().await.unwrap().quota_used_bytes, 0);
    node.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), 1 << 20).await;

    assert!(matches!(
        "nope".parse::<Cid>(),
        Err(Error::InvalidCid { .. })
    ));
    // Well-formed but unknown.
    let unknown: Cid = "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy"
        .parse()
        .unwrap();
    let e = node
        .download_with(&unknown)
        .local(true)
        .start()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not found"), "{e}");
    assert!(!node.exists(&unknown).await.unwrap());

    let e = node.upload().bytes(Bytes::new()).await.unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");

    // Quota: 1 MiB; a 2 MiB upload fails and leaves the store as it was.
    let small = node.upload().bytes(vec![9u8; 1000]).await.unwrap();
    let space = node.space().await.unwrap();
    let e = node
        .upload()
        .bytes(pseudo_random(2 << 20, 3))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("quota"), "{e}");
    assert_eq!(node.space().await.unwrap(), space);
    assert_eq!(
        node.download(&small)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .len(),
        1000
    );

    let missing = dir.path().join("no-such-file");
    let e = node.upload().file(&missing).await.unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");

    let e = CodexConfig::builder().storage_quota(0).build().unwrap_err();
    assert!(e.to_string().contains("storage-quota"));
    node.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_rejects_a_bad_config_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    // More quota than any disk has: the node refuses to start, naming the setting.
    let cfg = CodexConfig::builder()
        .data_dir(dir.path())
        .storage_quota(u64::MAX / 2)
        .build()
        .unwrap();
    let e = CodexNode::new(cfg).await.unwrap_err();
    assert!(matches!(e, Error::Library(_)), "{e}");
    assert!(e.to_string().contains("storage-quota"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blocks_are_reported_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), QUOTA).await;
    let payload = pseudo_random(4 * 65536, 11);
    let cid = node.upload().bytes(payload.clone()).await.unwrap();
    let data_file = std::fs::read_dir(dir.path().join("blocks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dat"))
        .unwrap();
    let mut bytes = std::fs::read(&data_file).unwrap();
    bytes[2 * 65536 + 5] ^= 0xff;
    std::fs::write(&data_file, bytes).unwrap();

    let mut dl = node.download(&cid).await.unwrap();
    let mut good = Vec::new();
    let err = loop {
        match dl.next().await {
            Some(Ok(chunk)) => good.extend_from_slice(&chunk),
            Some(Err(e)) => break e,
            None => panic!("the corrupt block was not detected"),
        }
    };
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(good, payload[..good.len()]);
    assert!(good.len() <= 2 * 65536);
    node.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_download_cancels_it_and_frees_the_cid() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), QUOTA).await;
    let payload = pseudo_random(2 << 20, 5);
    let cid = node.upload().bytes(payload.clone()).await.unwrap();
    let mut dl = node.download(&cid).await.unwrap();
    let first = dl.next().await.unwrap().unwrap();
    assert_eq!(first.len(), 65536);
    drop(dl);
    // The same CID can be downloaded again at once, in full.
    let again = tokio::time::timeout(Duration::from_secs(20), async {
        node.download(&cid).await.unwrap().bytes().await.unwrap()
    })
    .await
    .unwrap();
    assert_eq!(&again[..], &payload[..]);

    // Two downloads of one CID at the same time both complete (serialised).
    let (a, b) = tokio::join!(
        async { node.download(&cid).await.unwrap().bytes().await.unwrap() },
        async { node.download(&cid).await.unwrap().bytes().await.unwrap() },
    );
    assert_eq!(a, b);
    node.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_upload_frees_its_space() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), QUOTA).await;
    let (tx, rx) = tokio::io::duplex(1 << 16);
    let upload = node.upload().reader(rx);
    let task = tokio::spawn(upload.into_future());
    let mut tx = tx;
    tokio::io::AsyncWriteExt::write_all(&mut tx, &pseudo_random(1 << 20, 9))
        .await
        .unwrap();
    // Let some blocks reach the store, then abandon the upload.
    tokio::time::sleep(Duration::from_millis(200)).await;
    task.abort();
    let _ = task.await;
    drop(tx);
    let mut space = node.space().await.unwrap();
    for _ in 0..100 {
        if space.quota_reserved_bytes == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        space = node.space().await.unwrap();
    }
    assert_eq!(space.quota_reserved_bytes, 0);
    assert_eq!(space.quota_used_bytes, 0);
    assert!(node.list().await.unwrap().is_empty());
    node.destroy().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_lifecycle_and_destroy() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CodexConfig::builder()
        .data_dir(dir.path())
        .storage_quota(QUOTA)
        .build()
        .unwrap();
    let node = CodexNode::new(cfg.clone()).await.unwrap();
    let mut events = node.events();
    node.start().await.unwrap();
    let cid = node.upload().bytes(vec![3u8; 100]).await.unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .unwrap()
            .unwrap();
        if e.kind == "datasetStored" {
            assert_eq!(e.json["cid"], cid.as_str());
        }
        kinds.push(e.kind);
    }
    assert_eq!(kinds, ["started", "datasetStored"]);

    node.stop().await.unwrap();
    let clone = node.clone();
    node.destroy().await.unwrap();
    // Every clone now fails cleanly.
    assert!(matches!(clone.space().await, Err(Error::Destroyed)));
    drop(clone);

    // The data survived, and the data-dir is free for a new node.
    let node = CodexNode::new(cfg).await.unwrap();
    assert!(node.exists(&cid).await.unwrap());
    // Dropping the last handle tears the node down in the background.
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_blocks_are_deleted_by_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CodexConfig::builder()
        .data_dir(dir.path())
        .storage_quota(QUOTA)
        .block_ttl(Some(Duration::from_secs(1)))
        .block_maintenance_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let node = CodexNode::new(cfg).await.unwrap();
    let mut events = node.events();
    node.start().await.unwrap();
    let cid = node
        .upload()
        .bytes(pseudo_random(200_000, 4))
        .await
        .unwrap();
    assert!(node.exists(&cid).await.unwrap());
    let expired = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let e = events.next().await.unwrap();
            if e.kind == "blocksExpired" {
                return e;
            }
        }
    })
    .await
    .unwrap();
    assert!(expired.json["count"].as_u64().unwrap() >= 1);
    assert!(!node.exists(&cid).await.unwrap());
    assert!(node.list().await.unwrap().is_empty());
    assert_eq!(node.space().await.unwrap().quota_used_bytes, 0);
    node.destroy().await.unwrap();
}
