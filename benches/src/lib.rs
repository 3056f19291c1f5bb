//! Shared helpers of the benchmarks: data generation, memory and baseline measurements.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Dataset size in MiB: `CODEX_BENCH_MIB`, default 1024.
pub fn dataset_mib() -> u64 {
    env_u64("CODEX_BENCH_MIB").unwrap_or(1024)
}

/// The number in environment variable `key`, if it is set to one.
pub fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

/// A scratch directory in `CODEX_BENCH_DIR`, else in the system's temporary directory;
/// removed when dropped.
pub fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    match std::env::var("CODEX_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d),
        Err(_) => tempfile::tempdir(),
    }
}

/// Writes `size` pseudo-random bytes to `path`, 1 MiB at a time.
pub fn generate(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for w in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// This machine's single-core SHA-256 rate over 64 KiB blocks, in bytes per second.
pub fn sha256_rate() -> f64 {
    let block = vec![0x5au8; 65536];
    single_core_rate(block.len(), |_| {
        std::hint::black_box(Sha256::digest(&block));
    })
}

/// Bytes per second of `f` run for about half a second, each call (given its number)
/// handling `bytes` bytes.
fn single_core_rate(bytes: usize, mut f: impl FnMut(u64)) -> f64 {
    let mut n = 0u64;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(500) {
        for _ in 0..64 {
            f(n);
            n += 1;
        }
    }
    (n * bytes as u64) as f64 / t.elapsed().as_secs_f64()
}

/// This machine's single-core rates of sealing and of opening ChaCha20-Poly1305 frames of
/// the Noise transport's largest payload (65 519 bytes), in bytes per second: every byte
/// the block exchange moves is sealed once by the sender and opened once by the receiver,
/// with the same implementation libp2p's Noise uses (`ring`).
pub fn noise_cipher_rates() -> (f64, f64) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    const FRAME: usize = 65535 - 16;
    let key = || {
        let k = UnboundKey::new(&CHACHA20_POLY1305, &[7u8; 32]).expect("a 32-byte key");
        LessSafeKey::new(k)
    };
    let (seal, open) = (key(), key());
    let nonce = |n: u64| {
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_le_bytes());
        Nonce::assume_unique_for_key(b)
    };
    // One sealed frame (payload and tag) to open repeatedly, and a buffer to seal into.
    let mut sealed = vec![0x5au8; FRAME];
    let tag = seal
        .seal_in_place_separate_tag(nonce(0), Aad::empty(), &mut sealed)
        .expect("seal");
    sealed.extend_from_slice(tag.as_ref());
    let mut buf = vec![0x5au8; FRAME];
    let sealing = single_core_rate(FRAME, |n| {
        let tag = seal.seal_in_place_separate_tag(nonce(n + 1), Aad::empty(), &mut buf);
        let _ = std::hint::black_box(tag.expect("seal"));
    });
    // Opening decrypts in place, so each round restores the sealed frame first; the copy's
    // own time is measured alone and taken out.
    let mut scratch = sealed.clone();
    let with_copy = single_core_rate(FRAME, |_| {
        scratch.copy_from_slice(&sealed);
        let plain = open.open_in_place(nonce(0), Aad::empty(), &mut scratch);
        std::hint::black_box(plain.expect("a frame sealed with this key opens").len());
    });
    let copy = single_core_rate(FRAME, |_| {
        scratch.copy_from_slice(std::hint::black_box(&sealed));
        std::hint::black_box(&scratch);
    });
    let opening = 1.0 / (1.0 / with_copy - 1.0 / copy);
    (sealing, opening)
}

/// CPU time (user plus system) this process has used so far.
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Peak resident memory of this process in bytes (`VmHWM`).
pub fn peak_rss() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Resets the peak resident memory to the current one (Linux `clear_refs` 5).
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn status_kib(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}
