//! A small pool of frame buffers shared by the block exchange streams of a node.
//!
//! A frame carrying a batch of blocks is about 1.3 MiB. Allocated afresh for every frame,
//! glibc hands such buffers back to the kernel between frames (unmapping or trimming them),
//! and every page of the next one is faulted in and zeroed again: on a 1 GiB download that
//! was 80 000 to 190 000 page faults. Pooled buffers are reused instead. A received frame's
//! buffer goes back to the pool when the last block sliced from it is dropped, so a steady
//! transfer cycles through a few buffers; the pool keeps at most [`KEEP`] idle ones.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::store::lock;

/// Size of a pooled buffer: a delivery of a full batch of blocks (20 blocks of 64 KiB and
/// their proofs) fits. Larger frames get buffers of their own.
pub const FRAME_BUF: usize = 2 << 20;

/// Idle buffers kept, at most: 8 MiB.
const KEEP: usize = 4;

/// Reusable frame buffers. Cheap to share through an `Arc`.
#[derive(Debug, Default)]
pub struct FramePool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl FramePool {
    /// A new, empty pool.
    pub fn new() -> Arc<Self> {
        Arc::default()
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

    /// `buf` as `Bytes`; the buffer returns to the pool when the last slice of it is dropped.
    pub fn share(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: Arc::clone(self),
        })
    }

    /// Idle buffers held.
    pub fn idle(&self) -> usize {
        lock(&self.free).len()
    }
}

/// A pooled buffer lent out as `Bytes`.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<FramePool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_buffer_returns_when_its_last_slice_drops() {
        let pool = FramePool::new();
        let mut buf = pool.get();
        buf.extend_from_slice(b"hello world");
        let ptr = buf.as_ptr();
        let bytes = pool.share(buf);
        let slice = bytes.slice(6..);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        assert_eq!(&slice[..], b"world");
        drop(slice);
        assert_eq!(pool.idle(), 1);
        let again = pool.get();
        assert_eq!(again.as_ptr(), ptr, "the same buffer is reused");
        assert!(again.is_empty());
    }

    #[test]
    fn grown_buffers_and_extra_buffers_are_not_kept() {
        let pool = FramePool::new();
        let mut grown = pool.get();
        grown.resize(FRAME_BUF + 1, 0);
        pool.put(grown);
        assert_eq!(pool.idle(), 0);
        let bufs: Vec<_> = (0..KEEP + 2).map(|_| pool.get()).collect();
        for b in bufs {
            pool.put(b);
        }
        assert_eq!(pool.idle(), KEEP);
    }
}
