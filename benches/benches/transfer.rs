//! Two-process transfer over loopback: a seeder process uploads a dataset, a fresh leecher
//! process per iteration downloads it from the seeder over the block exchange. Reports
//! time-to-complete (every block verified and committed on the leecher) and time until the
//! leecher's data-dir is synced to disk, MB/s, peak RSS of both processes and disk used,
//! next to this machine's bound (the lower of SHA-256 and sequential disk writes, measured
//! in this run; the disk three times, once before the transfers and twice after, and the
//! median taken: one measurement of this machine's disk gave 321 MB/s to 2 GB/s, depending
//! on whether the filesystem reused space freed just before) and, when
//! `python3-libtorrent` is installed, libtorrent moving the same size with
//! `../shared/bench/bt_bench.sh`.
//!
//! ```sh
//! cargo bench -p codex-benches --bench transfer                      # 1 GiB
//! CODEX_BENCH_GIB=10 cargo bench -p codex-benches --bench transfer   # 10 GiB
//! ```
//!
//! It also reports the CPU time each process spent per GiB: the two processes share the
//! machine's cores, so on a small machine that is what bounds the rate. For the same
//! reason each node runs one worker thread (`num-threads = 1`).
//!
//! Knobs: `CODEX_BENCH_GIB` (size in GiB, default 1; `CODEX_BENCH_MIB` wins when set),
//! `CODEX_BENCH_BT` (path of bt_bench.sh, or `0` to skip the baseline),
//! `CODEX_BENCH_BT_REPS` (its repeats, default 3), `CODEX_BENCH_DROP_CACHES` (default 1:
//! drop the page cache before each transfer, as bt_bench.sh does; needs root),
//! `CODEX_BENCH_DIR` (scratch directory, default a temporary one).
//!
//! The same binary is the node program: run with `CODEX_BENCH_ROLE` set, it is a seeder or
//! a leecher (see [`node_process`]), so both sides run the bench profile's code.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use codex::{Cid, CodexConfig, CodexNode};
use codex_benches::{
    cpu_time, env_u64, generate, noise_cipher_rates, peak_rss, reset_peak_rss, sha256_rate,
};
use criterion::{criterion_group, Criterion, SamplingMode, Throughput};
use futures::StreamExt;
use sha2::{Digest, Sha256};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Dataset size in bytes.
fn size() -> u64 {
    if let Some(mib) = env_u64("CODEX_BENCH_MIB") {
        return mib << 20;
    }
    env_u64("CODEX_BENCH_GIB").unwrap_or(1) << 30
}

// ---- the node program ------------------------------------------------------------------

/// Runs this process as a node: `seed` uploads `CODEX_BENCH_FILE` and serves it until stdin
/// closes; `leech` downloads `CODEX_BENCH_CID` from the peer `CODEX_BENCH_PEER` at
/// `CODEX_BENCH_ADDR`, syncs its data-dir, checks the content's SHA-256 and reports.
/// Both print one `key value…` line per fact on stdout.
fn node_process(role: &str) -> Res<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let started = Instant::now();
    let dir = PathBuf::from(std::env::var("CODEX_BENCH_NODE_DIR")?);
    let cfg = CodexConfig::builder()
        .data_dir(&dir)
        .storage_quota(size() + (size() / 8) + (64 << 20))
        .listen_addrs(["/ip4/127.0.0.1/tcp/0"])
        // Seeder and leecher share this machine's cores, where two machines would each
        // have their own: one worker each, not one per core each, which only adds
        // park/wake traffic between the two processes (about 10% slower at 1 GiB on
        // 2 cores, measured in interleaved runs).
        .num_threads(1)
        .build()?;
    rt.block_on(async {
        let node = CodexNode::new(cfg).await?;
        node.start().await?;
        let debug = node.debug().await?;
        match role {
            "seed" => {
                let file = std::env::var("CODEX_BENCH_FILE")?;
                let cid = node.upload().file(&file).await?;
                // Serving, not uploading, is measured.
                reset_peak_rss();
                let cpu = cpu_time();
                println!("ready {} {} {cid}", debug.id, debug.addrs[0]);
                let mut line = String::new();
                while std::io::stdin().read_line(&mut line)? > 0 {}
                println!("rss {} {}", peak_rss(), (cpu_time() - cpu).as_secs_f64());
            }
            "leech" => {
                let cid: Cid = std::env::var("CODEX_BENCH_CID")?.parse()?;
                let peer = std::env::var("CODEX_BENCH_PEER")?;
                let addr = std::env::var("CODEX_BENCH_ADDR")?;
                node.connect(&peer, &[addr]).await?;
                node.fetch(&cid).await?;
                let mut events = node.events();
                while let Some(e) = events.next().await {
                    let this = e.json.get("cid").and_then(|c| c.as_str()) == Some(&cid.to_string());
                    if this && e.kind == "fetchCompleted" {
                        break;
                    }
                    if this && e.kind == "fetchFailed" {
                        return Err(format!("download failed: {}", e.json).into());
                    }
                }
                let complete = started.elapsed();
                let cpu = cpu_time();
                sync_dir(&dir)?;
                let synced = started.elapsed();
                let rss = peak_rss();
                // Not timed: the content, read back from the leecher's store.
                let mut dl = node.download(&cid).await?;
                let mut sha = Sha256::new();
                while let Some(chunk) = dl.next().await {
                    sha.update(chunk?);
                }
                println!(
                    "done {} {} {rss} {} {}",
                    complete.as_secs_f64(),
                    synced.as_secs_f64(),
                    cpu.as_secs_f64(),
                    hex(&sha.finalize())
                );
            }
            other => return Err(format!("unknown role {other}").into()),
        }
        node.destroy().await?;
        Ok(())
    })
}

/// Flushes the filesystem of `dir` to disk (`syncfs`).
fn sync_dir(dir: &Path) -> Res<()> {
    let f = std::fs::File::open(dir)?;
    // SAFETY: a valid open file descriptor for the duration of the call.
    let r = unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    if r != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

// ---- the bench -------------------------------------------------------------------------

struct Seeder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    peer: String,
    addr: String,
    cid: String,
}

impl Seeder {
    fn start(dir: &Path, file: &Path) -> Res<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .env("CODEX_BENCH_ROLE", "seed")
            .env("CODEX_BENCH_NODE_DIR", dir)
            .env("CODEX_BENCH_FILE", file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["ready", peer, addr, cid] = words.as_slice() else {
            return Err(format!("seeder said {line:?}").into());
        };
        Ok(Self {
            peer: (*peer).to_owned(),
            addr: (*addr).to_owned(),
            cid: (*cid).to_owned(),
            child,
            stdin,
            stdout,
        })
    }

    /// Stops the seeder; returns its peak RSS and the CPU time it used while serving.
    fn stop(mut self) -> Res<(u64, Duration)> {
        drop(self.stdin.take());
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        self.child.wait()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let ["rss", rss, cpu] = words.as_slice() else {
            return Err(format!("seeder said {line:?}").into());
        };
        Ok((rss.parse()?, Duration::from_secs_f64(cpu.parse()?)))
    }
}

/// One leecher run.
struct Leech {
    complete: Duration,
    synced: Duration,
    rss: u64,
    /// CPU time the leecher used until complete.
    cpu: Duration,
    disk: u64,
}

fn leech(seed: &Seeder, dir: &Path, expect_sha: &str) -> Res<Leech> {
    let out = Command::new(std::env::current_exe()?)
        .env("CODEX_BENCH_ROLE", "leech")
        .env("CODEX_BENCH_NODE_DIR", dir)
        .env("CODEX_BENCH_CID", &seed.cid)
        .env("CODEX_BENCH_PEER", &seed.peer)
        .env("CODEX_BENCH_ADDR", &seed.addr)
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text.split_whitespace().collect();
    let ["done", complete, synced, rss, cpu, sha] = words.as_slice() else {
        return Err(format!("leecher said {text:?}").into());
    };
    if *sha != expect_sha {
        return Err("the leecher's content differs from the seeder's file".into());
    }
    Ok(Leech {
        complete: Duration::from_secs_f64(complete.parse()?),
        synced: Duration::from_secs_f64(synced.parse()?),
        rss: rss.parse()?,
        cpu: Duration::from_secs_f64(cpu.parse()?),
        disk: disk_used(dir),
    })
}

/// Bytes allocated on disk under `dir`.
fn disk_used(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.blocks() * 512,
                Err(_) => {}
            }
        }
    }
    total
}

fn drop_caches() {
    if std::env::var("CODEX_BENCH_DROP_CACHES").as_deref() == Ok("0") {
        return;
    }
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    // Needs root; without it the runs start with warm caches (reported below).
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// Sequential write rate of the filesystem holding `dir`: 1 GiB (at most the dataset size)
/// written in 1 MiB pieces and synced, in bytes per second.
fn disk_write_rate(dir: &Path, size: u64) -> Res<f64> {
    let path = dir.join("disk-rate.bin");
    let n = size.min(1 << 30);
    let buf = vec![0xa5u8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    let mut left = n;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..k])?;
        left -= k as u64;
    }
    f.sync_all()?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn file_sha256(path: &Path) -> Res<String> {
    let mut f = std::fs::File::open(path)?;
    let mut sha = Sha256::new();
    std::io::copy(&mut f, &mut sha)?;
    Ok(hex(&sha.finalize()))
}

/// What the transfer runs measured.
#[derive(Default)]
struct Figures {
    runs: Vec<Leech>,
    seed_rss: u64,
    /// CPU time the seeder used serving all runs.
    seed_cpu: Duration,
    sha: f64,
    /// Single-core rates of sealing and of opening Noise frames.
    noise: (f64, f64),
    /// Sequential write rates of the scratch disk, in the order measured.
    disk: Vec<f64>,
}

impl Figures {
    /// The median of the disk rates measured.
    fn disk(&self) -> f64 {
        let mut d = self.disk.clone();
        d.sort_by(f64::total_cmp);
        d.get(d.len() / 2).copied().unwrap_or(0.0)
    }
}

static FIGURES: Mutex<Option<Figures>> = Mutex::new(None);

fn transfer(c: &mut Criterion) {
    let size = size();
    let work = codex_benches::scratch_dir().expect("scratch directory");
    let file = work.path().join("data.bin");
    generate(&file, size).expect("generate the dataset");
    let sha = file_sha256(&file).expect("hash the dataset");
    let mut fig = Figures {
        sha: sha256_rate(),
        noise: noise_cipher_rates(),
        disk: vec![disk_write_rate(work.path(), size).expect("disk rate")],
        ..Figures::default()
    };
    let seed = Seeder::start(&work.path().join("seed"), &file).expect("seeder");
    // The seeder holds the dataset now; the source file is not needed.
    std::fs::remove_file(&file).expect("remove the source file");

    let mut g = c.benchmark_group("transfer");
    // Ten transfers (criterion's minimum), one per sample, plus one to warm up.
    g.sample_size(10);
    g.sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_millis(1));
    g.measurement_time(Duration::from_secs(1));
    g.throughput(Throughput::Bytes(size));
    let mut runs = Vec::new();
    let mut n = 0u32;
    g.bench_function(format!("loopback_{}MiB", size >> 20), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                n += 1;
                let dir = work.path().join(format!("leech-{n}"));
                drop_caches();
                let run = leech(&seed, &dir, &sha).expect("transfer");
                total += run.synced;
                runs.push(run);
                std::fs::remove_dir_all(&dir).expect("remove the leecher's data");
            }
            total
        });
    });
    g.finish();
    (fig.seed_rss, fig.seed_cpu) = seed.stop().expect("stop the seeder");
    for _ in 0..2 {
        drop_caches();
        fig.disk
            .push(disk_write_rate(work.path(), size).expect("disk rate"));
    }
    fig.runs = runs;
    *FIGURES.lock().unwrap_or_else(|p| p.into_inner()) = Some(fig);
}

criterion_group!(benches, transfer);

/// Runs bt_bench.sh for the same size; returns libtorrent's mean MB/s to verified
/// completion and to fsync, or why it could not run.
fn libtorrent_rate(size: u64) -> Result<(f64, f64), String> {
    let script = match std::env::var("CODEX_BENCH_BT") {
        Ok(s) if s == "0" => return Err("skipped (CODEX_BENCH_BT=0)".into()),
        Ok(s) => PathBuf::from(s),
        Err(_) => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/bench/bt_bench.sh"),
    };
    if !script.exists() {
        return Err(format!(
            "{} not found (set CODEX_BENCH_BT)",
            script.display()
        ));
    }
    let results = codex_benches::scratch_dir().map_err(|e| e.to_string())?;
    let sizes = if size % (1 << 30) == 0 {
        format!("{}", size >> 30)
    } else {
        format!("{}M", size >> 20)
    };
    let reps = std::env::var("CODEX_BENCH_BT_REPS").unwrap_or_else(|_| "3".into());
    println!("\nbaseline: {} SIZES={sizes} REPS={reps}", script.display());
    let status = Command::new("bash")
        .arg(&script)
        .env("SIZES", &sizes)
        .env("REPS", &reps)
        .env("RESULTS", results.path())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!(
            "bt_bench.sh failed ({status}); it needs python3-libtorrent: scripts/install-bench-deps.sh"
        ));
    }
    let csv = std::fs::read_dir(results.path())
        .map_err(|e| e.to_string())?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".csv"))
        .ok_or("bt_bench.sh wrote no CSV")?;
    let text = std::fs::read_to_string(csv.path()).map_err(|e| e.to_string())?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (Some(complete), Some(fsynced)) = (col("t_verified_complete_s"), col("t_fsynced_s")) else {
        return Err("unexpected CSV columns from bt_bench.sh".into());
    };
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mean = |i: usize| {
        let v: Vec<f64> = rows.iter().filter_map(|r| r.get(i)?.parse().ok()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (tc, tf) = (mean(complete), mean(fsynced));
    if tc <= 0.0 || tf <= 0.0 {
        return Err("bt_bench.sh reported no times".into());
    }
    Ok((size as f64 / tc / 1e6, size as f64 / tf / 1e6))
}

fn main() {
    if let Ok(role) = std::env::var("CODEX_BENCH_ROLE") {
        if let Err(e) = node_process(&role) {
            eprintln!("{role}: {e}");
            std::process::exit(1);
        }
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
    let Some(fig) = FIGURES.lock().unwrap_or_else(|p| p.into_inner()).take() else {
        return; // filtered out
    };
    let size = size();
    let bt = libtorrent_rate(size);
    let mb = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let mean = |f: &dyn Fn(&Leech) -> Duration| {
        fig.runs.iter().map(f).sum::<Duration>() / fig.runs.len().max(1) as u32
    };
    let (complete, synced) = (mean(&|r| r.complete), mean(&|r| r.synced));
    let bound = fig.sha.min(fig.disk());
    println!(
        "\nsummary: {} MiB over loopback, {} runs",
        size >> 20,
        fig.runs.len()
    );
    println!(
        "  machine: SHA-256 {:.0} MB/s, disk writes {:.0} MB/s (synced; median of {}) -> bound {:.0} MB/s",
        fig.sha / 1e6,
        fig.disk() / 1e6,
        fig.disk
            .iter()
            .map(|d| format!("{:.0}", d / 1e6))
            .collect::<Vec<_>>()
            .join(", "),
        bound / 1e6
    );
    println!(
        "  codex:   complete {:.2} s ({:.0} MB/s), synced {:.2} s ({:.0} MB/s) = {:.2} x bound",
        complete.as_secs_f64(),
        mb(complete),
        synced.as_secs_f64(),
        mb(synced),
        mb(synced) * 1e6 / bound
    );
    match bt {
        Ok((c, f)) => println!(
            "  libtorrent: complete {c:.0} MB/s, fsynced {f:.0} MB/s -> codex/libtorrent = {:.2} (complete), {:.2} (synced)",
            mb(complete) / c,
            mb(synced) / f
        ),
        Err(e) => println!("  libtorrent: not measured: {e}"),
    }
    let max = |f: &dyn Fn(&Leech) -> u64| fig.runs.iter().map(f).max().unwrap_or(0);
    println!(
        "  peak RSS: leecher {} MiB, seeder {} MiB (serving); leecher disk used {} MiB",
        max(&|r| r.rss) >> 20,
        fig.seed_rss >> 20,
        max(&|r| r.disk) >> 20
    );
    // Both processes share the machine's cores, so CPU time per GiB bounds the rate.
    let gib = size as f64 / (1u64 << 30) as f64;
    let runs = fig.runs.len().max(1) as f64;
    let (leech_cpu, seed_cpu) = (
        mean(&|r| r.cpu).as_secs_f64(),
        fig.seed_cpu.as_secs_f64() / runs,
    );
    println!(
        "  CPU time per GiB: leecher {:.2} s, seeder {:.2} s (serving, averaged over runs)",
        leech_cpu / gib,
        seed_cpu / gib
    );
    // How close the machine's cores were to being the limit: both processes' CPU time
    // over the time to completion, per core.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let busy = (leech_cpu + seed_cpu) / complete.as_secs_f64();
    println!(
        "  cores busy until complete: {busy:.2} of {cores} ({:.0}%)",
        100.0 * busy / cores as f64
    );
    // What no implementation of the protocol can beat on these cores: every byte sealed
    // once by the seeder, opened once and hashed once by the leecher, and nothing else.
    let (seal, open) = fig.noise;
    let ceiling = cores as f64 / (1.0 / seal + 1.0 / open + 1.0 / fig.sha);
    println!(
        "  protocol ceiling: Noise seal {:.0}, open {:.0}, SHA-256 {:.0} MB/s per core -> at most {:.0} MB/s on {cores} cores doing nothing else; codex complete = {:.2} x ceiling",
        seal / 1e6,
        open / 1e6,
        fig.sha / 1e6,
        ceiling / 1e6,
        mb(complete) * 1e6 / ceiling
    );
}
