//! A small pool of frame buffers shared by the block exchange streams of a node.
//!
//! A frame carrying a batch of blocks is about 1.3 MiB. Allocated afresh for every frame,
//! glibc hands such buffers back to the kernel between frames (unmapping or trimming them),
//! and every page of the next one is faulted in and zeroed again: on a 1 GiB download that
//! was 80 000 to 190 000 page faults. Pooled buffers are reused instead; the pool keeps at
//! most 4 idle send buffers and 16 receive maps.
//!
//! A received frame's buffer goes back to the pool when the last block sliced from it is
//! dropped, which can be much later and in any order. These buffers are anonymous memory
//! maps, not heap memory: from the heap, buffers freed in that order fragmented glibc's
//! arenas, and a 10 GiB download peaked at 151 MiB instead of 76. A map that is not kept
//! goes back to the kernel at once. Frames to send are built in pooled heap buffers (a
//! served block is read from the store straight into its frame), which return as soon as
//! the frame is written.
//!
//! A frame larger than a pooled buffer (the protocol allows 100 MiB) takes its bytes from
//! a budget the node's streams share, [`LARGE_FRAMES`], before it is read, and gives them
//! back when the last block sliced from it is dropped: however many peers send such
//! frames, the node holds at most that much of them. Neither our nodes nor the reference
//! send frames that large (at most 20 blocks per message), so only an unusual or hostile
//! peer ever waits for it.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use memmap2::MmapMut;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::store::lock;

/// Size of a pooled buffer: a delivery of a full batch of blocks (20 blocks of 64 KiB and
/// their proofs) fits. Larger frames get buffers of their own.
pub const FRAME_BUF: usize = 2 << 20;

/// Idle buffers to send from kept, at most: 8 MiB. Few writers run at once.
const KEEP: usize = 4;

/// Idle receive maps kept, at most: about as many as a download's blocks in flight span
/// (16 MiB of blocks, 13 frames), so that a steady download maps no new ones.
const KEEP_MAPS: usize = 16;

/// Bytes of frames larger than [`FRAME_BUF`] a node holds at once, being read or not yet
/// dropped: one frame of the protocol's largest size.
pub const LARGE_FRAMES: usize = super::message::MAX_MESSAGE;

/// Unit of the large-frame budget (a semaphore counts in `u32`).
const KIB: usize = 1024;

/// Reusable frame buffers, and the budget of larger frames. Cheap to share through an `Arc`.
#[derive(Debug)]
pub struct FramePool {
    free: Mutex<Vec<Vec<u8>>>,
    maps: Mutex<Vec<MmapMut>>,
    /// [`LARGE_FRAMES`], in KiB.
    large: Arc<Semaphore>,
}

impl FramePool {
    /// A new, empty pool.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            free: Mutex::default(),
            maps: Mutex::default(),
            large: Arc::new(Semaphore::new(LARGE_FRAMES.div_ceil(KIB))),
        })
    }

    /// Waits until `len` bytes (at most [`LARGE_FRAMES`]) of the large-frame budget are
    /// free and takes them, for a frame larger than [`FRAME_BUF`]; see [`FramePool::own`].
    pub async fn reserve_large(&self, len: usize) -> LargeFrame {
        let kib = len.min(LARGE_FRAMES).div_ceil(KIB) as u32;
        // The semaphore is never closed, so acquiring fails only if it were.
        let permit = Arc::clone(&self.large).acquire_many_owned(kib).await.ok();
        LargeFrame { _permit: permit }
    }

    /// `buf` as `Bytes` that hold `budget` until the last slice of them is dropped.
    pub fn own(buf: Vec<u8>, budget: LargeFrame) -> Bytes {
        Bytes::from_owner(Owned {
            buf,
            _budget: budget,
        })
    }

    /// Bytes of the large-frame budget not taken.
    pub fn large_free(&self) -> usize {
        self.large.available_permits() * KIB
    }

    /// An empty buffer with room for [`FRAME_BUF`] bytes.
    pub fn get(&self) -> Vec<u8> {
        lock(&self.free)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(FRAME_BUF))
    }

    /// Takes `buf` back, if it is a pooled buffer (one that never grew) and the pool has room.
    pub fn put(&self, mut buf: Vec<u8>) {
        if buf.capacity() != FRAME_BUF {
            return;
        }
        buf.clear();
        let mut free = lock(&self.free);
        if free.len() < KEEP {
            free.push(buf);
        }
    }

    /// A buffer of [`FRAME_BUF`] bytes to receive a frame in (its contents are whatever
    /// it last held), or `None` if the kernel refuses the memory.
    pub fn receive_buf(&self) -> Option<MmapMut> {
        if let Some(map) = lock(&self.maps).pop() {
            return Some(map);
        }
        MmapMut::map_anon(FRAME_BUF).ok()
    }

    /// The first `len` bytes of `map` as `Bytes`; the map returns to the pool when the last
    /// slice of it is dropped.
    pub fn share(self: &Arc<Self>, map: MmapMut, len: usize) -> Bytes {
        Bytes::from_owner(Lent {
            len: len.min(map.len()),
            map: Some(map),
            pool: Arc::clone(self),
        })
    }

    /// Idle buffers held: heap buffers to send from, maps to receive in.
    pub fn idle(&self) -> (usize, usize) {
        (lock(&self.free).len(), lock(&self.maps).len())
    }
}

/// Part of the large-frame budget, held for one frame.
#[derive(Debug)]
pub struct LargeFrame {
    _permit: Option<OwnedSemaphorePermit>,
}

/// A large frame's buffer as `Bytes`, holding its budget.
struct Owned {
    buf: Vec<u8>,
    _budget: LargeFrame,
}

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// A pooled receive buffer lent out as `Bytes`.
struct Lent {
    map: Option<MmapMut>,
    len: usize,
    pool: Arc<FramePool>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], |m| &m[..self.len])
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let Some(map) = self.map.take() else { return };
        let mut maps = lock(&self.pool.maps);
        if maps.len() < KEEP_MAPS {
            maps.push(map);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_returns_when_its_last_slice_drops() {
        let pool = FramePool::new();
        let mut map = pool.receive_buf().unwrap();
        map[..11].copy_from_slice(b"hello world");
        let ptr = map.as_ptr();
        let bytes = pool.share(map, 11);
        assert_eq!(bytes.len(), 11);
        let slice = bytes.slice(6..);
        drop(bytes);
        assert_eq!(pool.idle(), (0, 0), "a slice still holds the buffer");
        assert_eq!(&slice[..], b"world");
        drop(slice);
        assert_eq!(pool.idle(), (0, 1));
        let again = pool.receive_buf().unwrap();
        assert_eq!(again.as_ptr(), ptr, "the same buffer is reused");
        assert_eq!(again.len(), FRAME_BUF);
    }

    #[test]
    fn grown_buffers_and_extra_buffers_are_not_kept() {
        let pool = FramePool::new();
        let mut grown = pool.get();
        grown.resize(FRAME_BUF + 1, 0);
        pool.put(grown);
        assert_eq!(pool.idle(), (0, 0));
        let bufs: Vec<_> = (0..KEEP + 2).map(|_| pool.get()).collect();
        for b in bufs {
            pool.put(b);
        }
        let maps: Vec<_> = (0..KEEP_MAPS + 2)
            .map(|_| pool.share(pool.receive_buf().unwrap(), 1))
            .collect();
        drop(maps);
        assert_eq!(pool.idle(), (KEEP, KEEP_MAPS));
    }
}
