//! The main job's end-to-end time: `codex-cli demo` (an owner and two member processes on
//! 127.0.0.1) with its default community of 300 000 messages over 12 weeks, from starting
//! the program until it exits with every check passed. `CODEX_BENCH_MESSAGES` changes the
//! size.
//!
//! This bench belongs to the root package (`codex-cli`), not to `codex-benches` whose
//! crate lives in this directory: only a bench of the package that owns a binary can run
//! that binary (`CARGO_BIN_EXE_codex-cli`).
//!
//! Run: `cargo bench -p codex-cli --bench demo`. Besides criterion's figures it prints the
//! median of every step of the demo's summary over all runs, and the peak RSS of the
//! largest process.

#![allow(missing_docs)] // criterion_group! generates undocumented items
#![allow(clippy::unwrap_used, clippy::expect_used)] // a bench stops at the first failure

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};

const DEFAULT_MESSAGES: u64 = 300_000;

/// One run of the demo: its wall time and the seconds of each step of its summary.
fn run(messages: u64) -> (Duration, Vec<(String, f64)>) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_codex-cli"))
        .args(["demo", "--messages", &messages.to_string()])
        .env("RUST_LOG", "warn")
        .output()
        .expect("start codex-cli demo");
    let took = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("checks passed"),
        "the demo failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (took, steps(&stdout))
}

/// The summary's step lines: `  <name>   <seconds> s  <what>`.
fn steps(stdout: &str) -> Vec<(String, f64)> {
    let summary = stdout.split("\nsummary\n").nth(1).unwrap_or_default();
    summary
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once("  ")?;
            let secs = rest.trim_start().split_once(" s")?.0.parse().ok()?;
            Some((name.trim().to_owned(), secs))
        })
        .collect()
}

/// Peak resident memory of the largest finished child process (or its waited-for
/// descendants), in bytes.
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_CHILDREN is a valid `who`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    if rc == 0 {
        usage.ru_maxrss as u64 * 1024
    } else {
        0
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(c: &mut Criterion) {
    let messages = std::env::var("CODEX_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MESSAGES);
    let mut all: BTreeMap<String, (usize, Vec<f64>)> = BTreeMap::new();
    let mut g = c.benchmark_group("demo");
    g.sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_millis(1))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Elements(messages));
    g.bench_function(format!("end_to_end/{messages}"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (took, steps) = run(messages);
                total += took;
                for (order, (name, secs)) in steps.into_iter().enumerate() {
                    all.entry(name).or_insert((order, Vec::new())).1.push(secs);
                }
            }
            total
        });
    });
    g.finish();

    let mut rows: Vec<_> = all.into_iter().collect();
    rows.sort_by_key(|(_, (order, _))| *order);
    println!("demo steps, median over every run ({messages} messages):");
    for (name, (_, secs)) in rows {
        println!("  {name:<24} {:>8.2} s", median(secs));
    }
    println!(
        "peak RSS of the largest process: {} MiB",
        children_peak_rss() >> 20
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
