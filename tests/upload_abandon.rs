//! An upload future dropped while the library opens its session must not leak the
//! session. Alone in its test binary: it counts the sessions open in the process.

#![allow(clippy::unwrap_used)] // tests: a failed step should stop the test

use std::future::IntoFuture;
use std::time::Duration;

use bytes::Bytes;
use codex::{CodexConfig, CodexNode};
use futures::FutureExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_dropped_while_its_session_opens_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    // An explicit quota: the default (20 GiB) need not fit on the test machine's disk.
    let cfg = CodexConfig::builder()
        .data_dir(dir.path())
        .storage_quota(1 << 30)
        .build()
        .unwrap();
    let node = CodexNode::new(cfg).await.unwrap();
    node.start().await.unwrap();
    assert_eq!(codex_abi::open_upload_sessions(), 0);
    for i in 0..20u8 {
        // One poll sends `upload_init`; the future is dropped before the answer arrives.
        let upload = node
            .upload()
            .bytes(Bytes::from(vec![i; 1000]))
            .into_future();
        assert!(upload.now_or_never().is_none());
    }
    // Each session the library opened anyway is cancelled once its id arrives.
    let mut open = codex_abi::open_upload_sessions();
    for _ in 0..300 {
        if open == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        open = codex_abi::open_upload_sessions();
    }
    assert_eq!(open, 0, "abandoned upload sessions were left open");
    // The node still works.
    let cid = node
        .upload()
        .bytes(Bytes::from_static(b"after"))
        .await
        .unwrap();
    assert!(node.exists(&cid).await.unwrap());
    assert_eq!(codex_abi::open_upload_sessions(), 0);
    node.destroy().await.unwrap();
}
