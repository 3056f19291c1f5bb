//! Streaming a large data file to disk while it is written, and letting go of its pages
//! behind reads for peers ([`ReadBehind`]).
//!
//! A download or upload of many gigabytes would otherwise leave all of its data dirty in
//! the page cache until the kernel's flusher or the final sync gets to it: the host's
//! useful cache is evicted for data nobody is about to read, writers across the system are
//! throttled once the dirty limit is reached, and the final sync waits for gigabytes.
//! [`Writeback`] starts writing each new stretch of the file as soon as it is a few
//! megabytes long and, one stretch later, waits for it (long since on its way) and lets
//! its pages go. A file smaller than two stretches keeps its pages, so a small dataset
//! read back at once (an archive being imported) is read from memory.
//!
//! Everything here is advice to the kernel: errors are ignored, as the sync that makes the
//! data durable (or the read that follows) reports them.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};

/// How much newly written data starts its writeback in one call.
const STRETCH: u64 = 8 << 20;

/// The part of a file written back and released so far. Offsets grow with the highest
/// byte written; data written below them later is left to the kernel and the final sync.
#[derive(Debug, Default)]
pub(crate) struct Writeback {
    /// Bytes before this offset are released from the page cache.
    released: u64,
    /// Bytes before this offset have had their writeback started.
    started: u64,
    /// One past the highest byte written.
    high: u64,
}

impl Writeback {
    /// Notes that `file` was written up to `end`, and advances the writeback when a
    /// stretch has built up since the last one.
    pub(crate) fn wrote(&mut self, file: &File, end: u64) {
        self.high = self.high.max(end);
        if self.high - self.started < STRETCH {
            return;
        }
        if self.started > self.released {
            let (from, len) = (self.released, self.started - self.released);
            write_back(file, from, len, true);
            release(file, from, len);
            self.released = self.started;
        }
        write_back(file, self.started, self.high - self.started, false);
        self.started = self.high;
    }
}

/// Blocks of one data file read for peers: each read lets the page cache drop the stretch
/// two before the one it reads in, so what stays cached is the current and the previous
/// stretch, which peers reading the same dataset close together still share.
///
/// A node serving a large dataset reads it through the cache once per peer; without this
/// each read takes a fresh page and evicts the host's useful cache for data no one is about
/// to read again (and on a VM that hands free memory back to its host, each fresh page
/// also costs a fault on the host). Whole stretches are released, as the cache holds a
/// file in folios of up to 2 MiB and a range that splits one releases none of it. Files
/// under four stretches (archives) keep their pages.
#[derive(Debug, Default)]
pub(crate) struct ReadBehind {
    /// One more than the stretch released last; 0 before any.
    released: AtomicU64,
}

impl ReadBehind {
    /// Notes a read of `file` (`file_len` bytes long) at `offset`.
    pub(crate) fn read(&self, file: &File, file_len: u64, offset: u64) {
        if file_len < 4 * STRETCH {
            return;
        }
        let Some(behind) = (offset / STRETCH).checked_sub(2) else {
            return;
        };
        // Once per stretch for a reader going forward; readers at different places may
        // release the same stretch twice, which costs a system call.
        if self.released.swap(behind + 1, Ordering::Relaxed) != behind + 1 {
            release(file, behind * STRETCH, STRETCH);
        }
    }
}

/// Starts writing back `len` bytes of `file` from `from`; with `wait`, first waits for
/// writeback already under way there and then for all of it to finish.
#[cfg(target_os = "linux")]
fn write_back(file: &File, from: u64, len: u64, wait: bool) {
    use std::os::fd::AsRawFd;
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: a plain syscall on a valid descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            from as libc::off64_t,
            len as libc::off64_t,
            flags,
        );
    }
}

/// Lets the clean pages of `len` bytes of `file` from `from` leave the page cache.
#[cfg(target_os = "linux")]
fn release(file: &File, from: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a valid descriptor; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            from as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn write_back(_: &File, _: u64, _: u64, _: bool) {}

#[cfg(not(target_os = "linux"))]
fn release(_: &File, _: u64, _: u64) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;

    /// Which 4 KiB pages of the first `len` bytes of `file` are in the page cache.
    fn resident(file: &File, len: usize) -> Vec<bool> {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared map of `len` bytes of a file at least that long,
        // only passed to mincore (never read) and unmapped before returning.
        unsafe {
            let addr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(addr, libc::MAP_FAILED);
            assert_eq!(libc::mincore(addr, len, vec.as_mut_ptr()), 0);
            libc::munmap(addr, len);
        }
        vec.iter().map(|v| v & 1 == 1).collect()
    }

    #[test]
    fn written_stretches_leave_the_page_cache_and_the_last_stays() {
        // Inside the crate rather than the system temp dir, which may be tmpfs (whose
        // pages cannot be released).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("data"))
            .unwrap();
        let mib = 1u64 << 20;
        let block = vec![7u8; mib as usize];
        let mut writeback = Writeback::default();
        // Five stretches, a mebibyte at a time.
        for i in 0..5 * STRETCH / mib {
            file.write_all_at(&block, i * mib).unwrap();
            writeback.wrote(&file, (i + 1) * mib);
        }
        let pages = resident(&file, (5 * STRETCH) as usize);
        let (released, kept) = pages.split_at((4 * STRETCH / 4096) as usize);
        assert!(
            released.iter().all(|r| !r),
            "{} pages of the first four stretches are still cached",
            released.iter().filter(|r| **r).count()
        );
        assert!(kept.iter().all(|r| *r), "the last stretch was released");
    }

    #[test]
    fn blocks_read_for_peers_let_go_of_what_is_well_behind_them() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let block = 64u64 << 10;
        let mut buf = vec![0u8; block as usize];
        // Reads `len` bytes of a new file block by block, as peers are served.
        let mut read_all = |name: &str, len: u64| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![9u8; len as usize]).unwrap();
            let file = File::open(&path).unwrap();
            file.sync_all().unwrap();
            let behind = ReadBehind::default();
            for i in 0..len / block {
                file.read_exact_at(&mut buf, i * block).unwrap();
                behind.read(&file, len, i * block);
            }
            resident(&file, len as usize)
        };
        // A small file keeps every page.
        assert!(read_all("small", 3 * STRETCH).iter().all(|r| *r));
        // A large one keeps the last two stretches read.
        let len = 6 * STRETCH;
        let pages = read_all("large", len);
        let (released, kept) = pages.split_at(((len - 2 * STRETCH) / 4096) as usize);
        assert!(
            released.iter().all(|r| !r),
            "{} pages well behind the reads are still cached",
            released.iter().filter(|r| **r).count()
        );
        assert!(kept.iter().all(|r| *r), "pages just read were let go");
    }
}
