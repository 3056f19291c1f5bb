//! Local upload and download of a dataset (1 GiB by default, `CODEX_BENCH_MIB`) through the

#![allow(missing_docs)] // criterion_group! generates undocumented items
//! safe API, next to this machine's SHA-256 rate measured in the same run.
//!
//! `cargo bench -p codex-benches --bench local`

use std::future::IntoFuture;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use codex::{Cid, CodexConfig, CodexNode};
use codex_benches::{dataset_mib, generate, peak_rss, reset_peak_rss, sha256_rate};
use criterion::{criterion_group, Criterion, Throughput};
use futures::StreamExt;

/// What one benchmark measured, for the summary.
struct Measured {
    name: String,
    bytes_per_iter: u64,
    total: Duration,
    iters: u64,
    peak_rss: u64,
}

static RESULTS: Mutex<Vec<Measured>> = Mutex::new(Vec::new());

fn record(name: &str, bytes_per_iter: u64, total: Duration, iters: u64) {
    let mut r = RESULTS.lock().unwrap_or_else(|p| p.into_inner());
    r.retain(|m| m.name != name);
    r.push(Measured {
        name: name.to_owned(),
        bytes_per_iter,
        total,
        iters,
        peak_rss: peak_rss(),
    });
}

fn local(c: &mut Criterion) {
    let size = dataset_mib() << 20;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("input.bin");
    generate(&input, size).expect("generate the dataset");
    let cfg = CodexConfig::builder()
        .data_dir(dir.path().join("node"))
        .storage_quota(size * 3)
        .build()
        .expect("config");
    let node = rt.block_on(async {
        let node = CodexNode::new(cfg).await.expect("node");
        node.start().await.expect("start");
        node
    });

    let mut g = c.benchmark_group("local");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Bytes(size));

    let mut cid: Option<Cid> = None;
    g.bench_function("upload_file", |b| {
        b.iter_custom(|iters| {
            reset_peak_rss();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // Each iteration stores the dataset anew: delete it first (not timed).
                if let Some(c) = cid.take() {
                    rt.block_on(node.delete(&c)).expect("delete");
                }
                let t = Instant::now();
                cid = Some(
                    rt.block_on(node.upload().file(&input).into_future())
                        .expect("upload"),
                );
                total += t.elapsed();
            }
            record("upload_file", size, total, iters);
            total
        });
    });

    let cid = cid.expect("uploaded");
    g.bench_function("download_stream", |b| {
        b.iter_custom(|iters| {
            reset_peak_rss();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let n = rt.block_on(async {
                    let mut dl = node.download(&cid).await.expect("download");
                    let mut n = 0u64;
                    while let Some(chunk) = dl.next().await {
                        n += chunk.expect("chunk").len() as u64;
                    }
                    n
                });
                total += t.elapsed();
                assert_eq!(n, size);
            }
            record("download_stream", size, total, iters);
            total
        });
    });
    g.finish();
    rt.block_on(node.destroy()).expect("destroy");
}

criterion_group!(benches, local);

fn main() {
    let sha = sha256_rate();
    benches();
    Criterion::default().configure_from_args().final_summary();
    println!(
        "\nsummary ({} MiB dataset; SHA-256 measured in this run: {:.0} MB/s on one core)",
        dataset_mib(),
        sha / 1e6
    );
    println!(
        "{:<18} {:>10} {:>14} {:>14}",
        "bench", "MB/s", "x SHA-256", "peak RSS MiB"
    );
    for m in RESULTS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let rate = (m.bytes_per_iter * m.iters) as f64 / m.total.as_secs_f64() / 1e6;
        let ratio = rate * 1e6 / sha;
        println!(
            "{:<18} {rate:>10.0} {ratio:>14.2} {:>14}",
            m.name,
            m.peak_rss >> 20
        );
    }
}
