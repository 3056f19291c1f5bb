//! Block sums: a CRC32C of every stored block, kept beside its data file, so that a read
//! checks a block against damage on disk for a small fraction of the cost of hashing it
//! again with SHA-256.
//!
//! `blocks/<treeCid>.sum` holds four bytes per leaf, the little-endian CRC32C of block `i`
//! at `4 * i`, and zero where no sum is known. A sum is written only for bytes already
//! verified against their leaf: an upload hashes every block it stores to make its tree, and
//! a download verifies every block before writing it. Block `i` of a tree has exactly one
//! correct content, so a sum is right for any data file of its tree, whatever order files
//! were written, renamed or lost in.
//!
//! A read whose bytes match their sum returns the bytes that were verified when they were
//! stored. Every other read (no sum file, no sum for that block, a mismatch, a damaged sum
//! file) falls back to the SHA-256 check against the leaf, which decides. Sums are advice:
//! failing to write one costs speed, never correctness, so write errors are not reported.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes per sum.
const SUM_BYTES: u64 = 4;

/// The sum of a block's bytes. Never zero, which marks a block without a sum: the rare block
/// whose CRC32C is zero has no sum and is always checked with SHA-256.
pub(crate) fn sum(data: &[u8]) -> Option<u32> {
    Some(crc32c::crc32c(data)).filter(|&s| s != 0)
}

/// The sum file of one tree.
#[derive(Debug)]
pub(crate) struct Sums {
    file: File,
}

impl Sums {
    /// Opens the sum file at `path` for reading; `None` when there is none (a tree stored
    /// before sums existed, or one whose file was lost: its reads hash every block).
    pub(crate) fn open(path: &Path) -> Option<Self> {
        File::open(path).ok().map(|file| Self { file })
    }

    /// Opens or creates the sum file at `path` for a tree being filled block by block.
    /// `None` when it cannot: the fill goes on without sums.
    pub(crate) fn for_fill(path: &Path, leaves: u64) -> Option<Self> {
        match super::open_at_least(path, leaves * SUM_BYTES) {
            Ok(file) => Some(Self { file }),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no block sums for this fill");
                None
            }
        }
    }

    /// Whether `data` is block `index` as it was verified when stored: its sum is known and
    /// matches. `false` means "not known to be intact", to be settled by hashing.
    pub(crate) fn intact(&self, index: u64, data: &[u8]) -> bool {
        let mut stored = [0u8; SUM_BYTES as usize];
        if self
            .file
            .read_exact_at(&mut stored, index * SUM_BYTES)
            .is_err()
        {
            return false;
        }
        let stored = u32::from_le_bytes(stored);
        stored != 0 && sum(data) == Some(stored)
    }

    /// Records the sum of block `index`, whose bytes `data` were verified against its leaf.
    pub(crate) fn record(&self, index: u64, data: &[u8]) {
        let s = sum(data).unwrap_or(0);
        if let Err(e) = self.file.write_all_at(&s.to_le_bytes(), index * SUM_BYTES) {
            tracing::debug!(index, error = %e, "could not record a block sum");
        }
    }
}

/// Writes the sums of an upload's blocks, which arrive in order, to a file of its own.
#[derive(Debug)]
pub(crate) struct SumWriter {
    out: Option<BufWriter<File>>,
}

impl SumWriter {
    /// Creates the file at `path`. If that fails the upload still goes on, without sums.
    pub(crate) fn create(path: &Path) -> Self {
        let out = File::create(path).map(BufWriter::new);
        if let Err(e) = &out {
            tracing::debug!(path = %path.display(), error = %e, "no block sums for this upload");
        }
        Self { out: out.ok() }
    }

    /// Appends the sum of the next block.
    pub(crate) fn push(&mut self, data: &[u8]) {
        let s = sum(data).unwrap_or(0);
        if let Some(out) = &mut self.out {
            if out.write_all(&s.to_le_bytes()).is_err() {
                self.out = None;
            }
        }
    }

    /// Flushes the file; whether every sum reached it.
    pub(crate) fn finish(mut self) -> io::Result<()> {
        match self.out.take() {
            Some(mut out) => out.flush(),
            None => Err(io::Error::other("a block sum could not be written")),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn block(seed: u8) -> Vec<u8> {
        (0..4096u32).map(|i| (i as u8).wrapping_mul(seed)).collect()
    }

    #[test]
    fn a_recorded_sum_vouches_for_its_block_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sum");
        let sums = Sums::for_fill(&path, 4).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16);
        let (a, b) = (block(3), block(5));
        // Nothing recorded yet: not known intact, whatever the bytes.
        assert!(!sums.intact(1, &a));
        sums.record(1, &a);
        assert!(sums.intact(1, &a));
        // A different block at that index, a flipped bit, another index: not intact.
        assert!(!sums.intact(1, &b));
        let mut flipped = a.clone();
        flipped[100] ^= 0x10;
        assert!(!sums.intact(1, &flipped));
        assert!(!sums.intact(2, &a));
        // Beyond the end of the file: not intact, no error.
        assert!(!sums.intact(99, &a));
        // Reopened for reading, the sum is still there.
        drop(sums);
        assert!(Sums::open(&path).unwrap().intact(1, &a));
        assert!(Sums::open(&dir.path().join("none.sum")).is_none());
    }

    #[test]
    fn an_upload_writes_its_sums_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("u.sum");
        let mut w = SumWriter::create(&path);
        let blocks = [block(1), block(2), block(7)];
        for b in &blocks {
            w.push(b);
        }
        w.finish().unwrap();
        let sums = Sums::open(&path).unwrap();
        for (i, b) in blocks.iter().enumerate() {
            assert!(sums.intact(i as u64, b));
        }
        assert!(!sums.intact(0, &blocks[1]));
    }

    #[test]
    fn a_damaged_sum_file_only_withholds_its_vouching() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sum");
        let sums = Sums::for_fill(&path, 2).unwrap();
        let a = block(9);
        sums.record(0, &a);
        std::fs::write(&path, [0xff; 8]).unwrap();
        assert!(!sums.intact(0, &a));
    }
}
