//! Archive creation and member import throughput for a large community (default one
//! million messages; `CODEX_BENCH_MESSAGES` changes it), each next to a baseline measured
//! in the same run on the same data:
//! - creation (read the messages, encode, upload every archive and the index, record the
//!   round) against reading the same messages from SQLite alone;
//! - import (read each archive from the node, decode, insert with de-duplication, mark it
//!   imported) against inserting the same messages into a fresh SQLite file directly.
//!
//! Run: `cargo bench -p codex-benches --bench archive`.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use codex::{CodexConfig, CodexNode};
use codex_archive::codex_proto::{topic, WakuMessage};
use codex_archive::{
    ArchiveConfig, Community, CommunityKey, Database, LocalLinkBus, Member, Owner,
};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};

const WEEK: u64 = 7 * 24 * 3600;
const WEEKS: u64 = 26;
const CHATS: [&str; 4] = ["general", "random", "dev", "support"];

struct Setup {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    node: CodexNode,
    owner: Owner,
    db: Database,
    community: Community,
    from: u64,
    to: u64,
    messages: u64,
    bytes: u64,
}

/// `n` messages over `WEEKS` weeks on the community's chats, payloads of 40 to 400 bytes.
fn generate(community: &Community, n: u64, end: u64) -> impl Iterator<Item = WakuMessage> + '_ {
    let start = end - WEEKS * WEEK;
    let topics: Vec<[u8; 4]> = CHATS.iter().map(|c| topic(c)).collect();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let _ = community;
    (0..n).map(move |i| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 40 + (x % 361) as usize;
        let mut payload = vec![0u8; len];
        for (j, b) in payload.iter_mut().enumerate() {
            *b = (x >> (j % 8 * 8)) as u8 ^ j as u8;
        }
        let mut hash = [0u8; 32];
        hash[..8].copy_from_slice(&i.to_le_bytes());
        hash[8..16].copy_from_slice(&x.to_le_bytes());
        WakuMessage {
            sig: vec![7u8; 65].into(),
            timestamp: start + i * WEEKS * WEEK / n,
            topic: topics[(x % topics.len() as u64) as usize].to_vec().into(),
            payload: payload.into(),
            hash: hash.to_vec().into(),
            ..Default::default()
        }
    })
}

fn setup() -> Setup {
    let messages = codex_benches::env_u64("CODEX_BENCH_MESSAGES").unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = codex_benches::scratch_dir().expect("scratch directory");
    let cfg = CodexConfig::builder()
        .data_dir(dir.path().join("codex"))
        .listen_addrs(["/ip4/127.0.0.1/tcp/0"])
        .storage_quota(8 << 30)
        .block_ttl(None)
        .build()
        .expect("config");
    let node = rt.block_on(async {
        let n = CodexNode::new(cfg).await.expect("node");
        n.start().await.expect("start");
        n
    });
    let db = Database::open(dir.path().join("owner.db")).expect("database");
    let key = CommunityKey::generate();
    let community = Community::new(key.id(), CHATS);
    let owner = Owner::new(
        db.clone(),
        node.clone(),
        Arc::new(LocalLinkBus::new()),
        ArchiveConfig::default(),
    );
    let to = 1_800_000_000;
    let from = to - WEEKS * WEEK;
    let t = Instant::now();
    let mut bytes = 0;
    let mut batch = Vec::with_capacity(10_000);
    for m in generate(&community, messages, to) {
        bytes += (m.payload.len() + m.sig.len()) as u64;
        batch.push(m);
        if batch.len() == 10_000 {
            db.store_messages(&batch).expect("store");
            batch.clear();
        }
    }
    db.store_messages(&batch).expect("store");
    eprintln!(
        "archive bench: {messages} messages, {:.0} MB (payload + signature), stored in {:.1?}",
        bytes as f64 / 1e6,
        t.elapsed()
    );
    Setup {
        rt,
        dir,
        node,
        owner,
        db,
        community,
        from,
        to,
        messages,
        bytes,
    }
}

fn bench(c: &mut Criterion) {
    let s = setup();
    let topics = s.community.topics();
    let mut g = c.benchmark_group("archive");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(s.messages));

    // Baseline: every message read from SQLite in archive-sized chunks.
    g.bench_function("baseline_sqlite_read", |b| {
        b.iter(|| {
            let mut n = 0;
            let mut start = s.from;
            while start < s.to {
                let end = (start + WEEK).min(s.to);
                let mut after = None;
                loop {
                    let chunk =
                        s.db.read_chunk(&topics, start, end, after.as_ref(), 30_000_000)
                            .expect("read");
                    n += chunk.messages.len();
                    match chunk.next {
                        Some(c) => after = Some(c),
                        None => break,
                    }
                }
                start = end;
            }
            assert_eq!(n as u64, s.messages);
        })
    });

    let mut report = None;
    g.bench_function("create", |b| {
        b.iter(|| {
            let r =
                s.rt.block_on(s.owner.create_archives(&s.community, s.from, s.to))
                    .expect("create");
            report = Some(r);
        })
    });
    let report = report.expect("created");

    // A member database with every archive recorded as downloaded, not imported: the
    // state right before import. Each run imports into a fresh copy of it.
    let template = s.dir.path().join("member-template.db");
    {
        let m = Database::open(&template).expect("member db");
        for a in s.db.archives(&s.community.id).expect("archives") {
            m.record_downloaded(&s.community.id, &a).expect("record");
        }
    }
    let fresh = |name: &str| {
        let path = s.dir.path().join(name);
        let _ = std::fs::remove_file(&path);
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(s.dir.path().join(format!("{name}{ext}")));
        }
        std::fs::copy(&template, &path).expect("copy");
        Database::open(&path).expect("open")
    };
    g.bench_function("import", |b| {
        b.iter_batched(
            || fresh("member.db"),
            |db| {
                let member = Member::new(db.clone(), s.node.clone(), ArchiveConfig::default());
                s.rt.block_on(async {
                    member.join(s.community.clone()).await.expect("join");
                    member.idle(&s.community.id).await;
                });
                assert_eq!(
                    db.imported_count(&s.community.id).expect("count"),
                    s.messages
                );
            },
            BatchSize::PerIteration,
        )
    });

    // Baseline: the same messages inserted straight into a fresh file.
    g.bench_function("baseline_sqlite_insert", |b| {
        b.iter_batched(
            || fresh("baseline.db"),
            |db| {
                let mut batch = Vec::with_capacity(10_000);
                for m in generate(&s.community, s.messages, s.to) {
                    batch.push(m);
                    if batch.len() == 10_000 {
                        db.store_messages(&batch).expect("insert");
                        batch.clear();
                    }
                }
                db.store_messages(&batch).expect("insert");
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
    eprintln!(
        "archive bench: {} archives, {:.0} MB uploaded, {:.0} MB of messages",
        report.created.len(),
        report.created.iter().map(|a| a.bytes).sum::<u64>() as f64 / 1e6,
        s.bytes as f64 / 1e6
    );
    drop(s.owner);
    s.rt.block_on(async { s.node.destroy().await.expect("destroy") });
}

criterion_group!(benches, bench);
criterion_main!(benches);
