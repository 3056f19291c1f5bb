//! `transfer-demo`: one node uploads a generated file, downloads the dataset back and
//! checks every byte, in a temporary data-dir (the program's main job before the community
//! demo).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{download, open, upload, Res};

/// Generates, uploads, downloads and checks a file in a temporary data-dir.
pub(crate) async fn run(size_mib: u64, quota: Option<u64>) -> Res<()> {
    let tmp = tempfile::tempdir()?;
    let size = size_mib << 20;
    let node = open(
        &tmp.path().join("node"),
        Some(quota.unwrap_or(size * 2 + (64 << 20))),
    )
    .await?;
    println!("node {} in {}", node.peer_id().await?, node.repo().await?);

    let input = tmp.path().join("input.bin");
    let digest = generate(&input, size)?;
    println!("generated {size_mib} MiB of pseudo-random data");

    let t = Instant::now();
    let cid = upload(&node, &input, codex::DEFAULT_BLOCK_SIZE).await?;
    let up = t.elapsed();
    println!("uploaded   {cid}  {}", rate(size, up));

    let m = node.manifest(&cid).await?;
    println!(
        "manifest   tree {}  {} bytes in {}-byte blocks, file name {:?}",
        m.tree_cid,
        m.dataset_size,
        m.block_size,
        m.filename.unwrap_or_default()
    );

    let output = tmp.path().join("output.bin");
    let t = Instant::now();
    let n = download(&node, &cid, &output).await?;
    let down = t.elapsed();
    println!("downloaded {n} bytes  {}", rate(n, down));

    let back = checksum(&output)?;
    let space = node.space().await?;
    println!(
        "store      {} blocks, {} of {} bytes used",
        space.total_blocks, space.quota_used_bytes, space.quota_max_bytes
    );
    node.destroy().await?;
    if back != digest || n != size {
        return Err("the downloaded file differs from the uploaded one".into());
    }
    println!("check      downloaded bytes identical to the uploaded file: ok");
    Ok(())
}

fn rate(bytes: u64, t: Duration) -> String {
    format!(
        "{:.1} MB/s ({:.2} s)",
        bytes as f64 / t.as_secs_f64().max(1e-9) / 1e6,
        t.as_secs_f64()
    )
}

/// Writes `size` pseudo-random bytes; returns a checksum of them.
fn generate(path: &Path, size: u64) -> Res<u64> {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut sum: u64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        for word in buf[..n].chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
        sum = fold(sum, &buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(sum)
}

fn checksum(path: &Path) -> Res<u64> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = 0;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(sum);
        }
        sum = fold(sum, &buf[..n]);
    }
}

/// An order-sensitive checksum (FNV-1a over 8-byte words); enough to catch a wrong byte.
fn fold(mut h: u64, data: &[u8]) -> u64 {
    for w in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..w.len()].copy_from_slice(w);
        h = (h ^ u64::from_le_bytes(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}
