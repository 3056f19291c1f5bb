//! Filling a tree block by block, as blocks arrive from the network in any order.
//!
//! A dataset being downloaded is registered at once (manifest, tree row with an empty
//! `leaves` blob, its data file at full size): every block is servable to other peers by
//! (tree, index) as soon as its `partial` row is flushed, with the proof it arrived with.
//! When the last block is in, the leaves are assembled and checked against the tree CID, the
//! tree becomes complete, and its blocks join the `blocks` index (by CID, with references
//! and expiry) in one sorted pass. Until then a download appends one row per block and
//! touches no randomly keyed index. Its data goes to disk as it arrives and leaves the page
//! cache behind it (see `writeback`).
//!
//! Crash safety: a block's bytes are written before its metadata commits, so a row never
//! names bytes that are not in the file. Without fsync this holds for process crashes; after
//! power loss a lost page reads as a corrupt block, never as data.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, OptionalExtension, TransactionBehavior, MAIN_DB};

use super::sums::Sums;
use super::writeback::Writeback;
use super::{add_reference, io_err, lock, Store};
use crate::bits::Bits;
use crate::cid::{Cid, CidKind, Digest32};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::merkle::{Proof, RootBuilder};

/// Blocks written before their metadata is committed in one transaction.
const FLUSH_EVERY: usize = 64;

/// How long [`Store::fill`] waits for an earlier fill of the same tree to end.
const FILL_WAIT: Duration = Duration::from_secs(60);

/// A dataset being filled from the network. One per tree at a time: a second
/// [`Store::fill`] of the same tree waits for the first to be dropped. Dropping it commits
/// what was received and frees the unused reservation.
#[derive(Debug)]
pub struct TreeFill {
    store: Arc<Store>,
    tree_id: i64,
    tree_cid: Cid,
    block_size: u64,
    leaves: u64,
    file: File,
    writeback: Writeback,
    /// The sums of the blocks written, when the tree's sum file could be opened.
    sums: Option<Sums>,
    /// Leaf indices held (committed or pending).
    have: Bits,
    missing: u64,
    /// Distinct digests a complete tree being repaired holds; `None` while the tree is
    /// partial, whose leaves join `blocks` only when it completes: a download keeps no
    /// per-block state but one bit.
    digests: Option<HashSet<Digest32>>,
    /// The leaves of a complete tree being repaired; `None` while partial.
    known: Option<Vec<Digest32>>,
    pending: Vec<(u64, Digest32, Vec<u8>)>,
    reserved: u64,
    complete: bool,
    /// Declared last: released after `Drop` has committed.
    _slot: FillSlot,
}

/// The right to fill one tree, held by its [`TreeFill`].
#[derive(Debug)]
struct FillSlot {
    store: Arc<Store>,
    tree: Cid,
}

impl FillSlot {
    /// Waits until no other fill of `tree` is alive, then takes the slot.
    fn take(store: &Arc<Store>, tree: Cid) -> Result<Self> {
        let deadline = std::time::Instant::now() + FILL_WAIT;
        let mut filling = lock(&store.filling);
        while filling.contains(&tree) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::State(format!(
                    "tree {tree} is still being filled by an earlier download"
                )));
            }
            filling = store
                .fill_ended
                .wait_timeout(filling, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        filling.insert(tree);
        Ok(Self {
            store: Arc::clone(store),
            tree,
        })
    }
}

impl Drop for FillSlot {
    fn drop(&mut self) {
        lock(&self.store.filling).remove(&self.tree);
        self.store.fill_ended.notify_all();
    }
}

impl Store {
    /// Registers the dataset of `manifest` (whose CID is `mcid`) for filling from the
    /// network, or resumes filling it. Reserves the quota for every missing block at once,
    /// failing with [`Error::Quota`] if it cannot fit.
    pub fn fill(self: &Arc<Self>, mcid: &Cid, manifest: &Manifest) -> Result<TreeFill> {
        let mbytes = manifest.encode();
        if Cid::hash_of(CidKind::Manifest, &mbytes) != *mcid {
            return Err(Error::Invalid(format!(
                "{mcid} is not the CID of this manifest"
            )));
        }
        let block_size = manifest.block_size;
        if block_size == 0 || block_size > crate::MAX_BLOCK_SIZE as u64 {
            return Err(Error::Invalid(format!(
                "manifest block size {block_size} out of range"
            )));
        }
        let leaves = manifest.blocks();
        let tree_cid = manifest.tree_cid;
        if tree_cid.kind() != CidKind::Tree || leaves == 0 {
            return Err(Error::Invalid(format!("manifest {mcid} names no tree")));
        }
        let slot = FillSlot::take(self, tree_cid)?;
        let path = self.tree_path(&tree_cid);
        let expiry = self.expiry();

        let mut db = lock(&self.db);
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let row: Option<(i64, i64, i64, Vec<u8>)> = tx
            .query_row(
                "SELECT id, block_size, leaf_count, leaves FROM trees WHERE cid = ?1",
                [tree_cid.to_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let mut added = 0u64;
        let (tree_id, known) = match row {
            Some((id, bs, count, blob)) => {
                if bs as u64 != block_size || count as u64 != leaves {
                    return Err(Error::Corrupt {
                        cid: mcid.to_string(),
                        detail: "manifest disagrees with the stored tree".into(),
                    });
                }
                let known = (!blob.is_empty()).then(|| {
                    blob.chunks_exact(32)
                        .map(|c| c.try_into().unwrap_or([0; 32]))
                        .collect::<Vec<Digest32>>()
                });
                (id, known)
            }
            None => {
                tx.execute(
                    "INSERT INTO trees (cid, block_size, leaves, refs, missing, leaf_count)
                     VALUES (?1, ?2, x'', 0, ?3, ?3)",
                    params![tree_cid.to_bytes(), block_size as i64, leaves as i64],
                )?;
                (tx.last_insert_rowid(), None)
            }
        };
        // The manifest block, and the dataset's reference to its tree.
        if tx.execute(
            "INSERT OR IGNORE INTO blocks (cid, size, expiry, refs, data) VALUES (?1, ?2, ?3, 1, ?4)",
            params![mcid.to_bytes(), mbytes.len() as i64, expiry, mbytes],
        )? == 1
        {
            added += mbytes.len() as u64;
            tx.execute(
                "INSERT INTO manifests (cid, tree_id) VALUES (?1, ?2)",
                params![mcid.to_bytes(), tree_id],
            )?;
            tx.execute("UPDATE trees SET refs = refs + 1 WHERE id = ?1", [tree_id])?;
        }
        let (have, digests) = match &known {
            Some(_) => {
                let mut have = Bits::full(leaves);
                let mut stmt = tx.prepare("SELECT idx FROM holes WHERE tree_id = ?1")?;
                for i in stmt.query_map([tree_id], |r| r.get::<_, i64>(0))? {
                    have.set(i? as u64, false);
                }
                (have, Some(super::held_digests(&tx, tree_id)?))
            }
            None => {
                let mut have = Bits::new(leaves);
                let mut stmt = tx.prepare("SELECT idx FROM partial WHERE tree_id = ?1")?;
                for i in stmt.query_map([tree_id], |r| r.get::<_, i64>(0))? {
                    have.set(i? as u64, true);
                }
                (have, None)
            }
        };
        let missing = leaves - have.count();
        let reserve = missing * block_size + added;
        self.reserve(reserve)?;
        let file = match super::open_at_least(&path, leaves * block_size) {
            Ok(f) => f,
            Err(e) => {
                self.release(reserve);
                return Err(Error::io(format!("opening {}", path.display()), e));
            }
        };
        // Before the commit, so that a reader that finds the tree also finds its sums.
        let sums = Sums::for_fill(&self.sums_path(&tree_cid), leaves);
        if let Err(e) = tx.commit() {
            self.release(reserve);
            return Err(e.into());
        }
        self.used.fetch_add(added, Ordering::SeqCst);
        self.release(added);
        drop(db);
        Ok(TreeFill {
            store: Arc::clone(self),
            tree_id,
            tree_cid,
            block_size,
            leaves,
            file,
            writeback: Writeback::default(),
            sums,
            have,
            missing,
            digests,
            known,
            pending: Vec::new(),
            reserved: missing * block_size,
            complete: missing == 0,
            _slot: slot,
        })
    }
}

impl TreeFill {
    /// The tree being filled.
    pub fn tree_cid(&self) -> &Cid {
        &self.tree_cid
    }

    /// The number of leaves (blocks) of the tree.
    pub fn leaves(&self) -> u64 {
        self.leaves
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Whether block `index` is held (stored or pending).
    pub fn has(&self, index: u64) -> bool {
        self.have.get(index)
    }

    /// The blocks held (stored or pending), one bit each.
    pub(crate) fn held(&self) -> &Bits {
        &self.have
    }

    /// Blocks still missing.
    pub fn missing(&self) -> u64 {
        self.missing
    }

    /// Whether every block is held and committed.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// Stores block `index`. `digest` must be the SHA-256 of `data` (the caller computed it
    /// to check the block's CID); the proof is checked here against the tree root. A block
    /// already held is ignored.
    pub fn put(&mut self, index: u64, data: &[u8], digest: Digest32, proof: &Proof) -> Result<()> {
        if index >= self.leaves {
            return Err(Error::Invalid(format!(
                "block {index} is beyond the {} blocks of {}",
                self.leaves, self.tree_cid
            )));
        }
        if self.has(index) {
            return Ok(());
        }
        if data.len() as u64 != self.block_size {
            // The sender's fault, not the caller's: the block is bad, the download goes on.
            return Err(Error::Corrupt {
                cid: Cid::from_digest(CidKind::Block, digest).to_string(),
                detail: format!(
                    "block {index} of {} has {} bytes, not {}",
                    self.tree_cid,
                    data.len(),
                    self.block_size
                ),
            });
        }
        let root_ok = proof.index == index
            && proof.leaves == self.leaves
            && proof.verify(&digest, &self.tree_cid.digest());
        let leaf_ok = self
            .known
            .as_ref()
            .is_none_or(|k| k.get(index as usize) == Some(&digest));
        if !root_ok || !leaf_ok {
            return Err(Error::Corrupt {
                cid: Cid::from_digest(CidKind::Block, digest).to_string(),
                detail: format!("proof does not place it at {index} of {}", self.tree_cid),
            });
        }
        self.file
            .write_all_at(data, index * self.block_size)
            .map_err(io_err(format!(
                "writing block {index} of {}",
                self.tree_cid
            )))?;
        if let Some(sums) = &self.sums {
            sums.record(index, data);
        }
        self.writeback
            .wrote(&self.file, (index + 1) * self.block_size);
        self.have.set(index, true);
        self.pending.push((index, digest, proof.encode()));
        if self.pending.len() >= FLUSH_EVERY {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits the metadata of the blocks written since the last flush, so that they are
    /// served to others; completes the tree when it was the last of them.
    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let store = Arc::clone(&self.store);
        let expiry = store.expiry();
        let pending = std::mem::take(&mut self.pending);
        let mut added = 0u64;
        let mut db = lock(&store.db);
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let state: Option<(Vec<u8>, i64)> = tx
            .query_row(
                "SELECT leaves, missing FROM trees WHERE id = ?1",
                [self.tree_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match state {
            None => {
                return Err(Error::NotFound(format!(
                    "{} was deleted while it was being downloaded",
                    self.tree_cid
                )))
            }
            Some((_, 0)) => {
                // Completed meanwhile (an upload of the same content): nothing to add.
                self.complete = true;
                return Ok(());
            }
            Some((blob, _)) if blob.is_empty() != self.known.is_none() => {
                return Err(Error::State(format!(
                    "{} changed while it was being downloaded",
                    self.tree_cid
                )))
            }
            Some(_) => {}
        }
        let mut committed = 0i64;
        {
            let mut leaf = tx.prepare_cached(
                "INSERT OR IGNORE INTO partial (tree_id, idx, digest, proof) VALUES (?1, ?2, ?3, ?4)",
            )?;
            let mut hole =
                tx.prepare_cached("DELETE FROM holes WHERE tree_id = ?1 AND idx = ?2")?;
            for (index, digest, proof) in &pending {
                let Some(set) = &mut self.digests else {
                    // A partial tree's leaf is its own until the tree completes.
                    if leaf.execute(params![self.tree_id, *index as i64, digest, proof])? == 1 {
                        committed += 1;
                        added += self.block_size;
                    }
                    continue;
                };
                if hole.execute(params![self.tree_id, *index as i64])? == 0 {
                    continue;
                }
                committed += 1;
                // Unless the tree holds this content at another index already, the block
                // gains the tree as a reference.
                if set.insert(*digest) {
                    added +=
                        add_reference(&tx, digest, self.block_size, expiry, self.tree_id, *index)?;
                }
            }
        }
        let missing: i64 = tx.query_row(
            "UPDATE trees SET missing = missing - ?2 WHERE id = ?1 RETURNING missing",
            params![self.tree_id, committed],
            |r| r.get(0),
        )?;
        // Bytes that moved from the partial tree into `blocks`.
        let mut joined = 0;
        if missing <= 0 && self.known.is_none() {
            let root = assemble(&tx, self.tree_id, self.leaves)?;
            if root != self.tree_cid.digest() {
                return Err(Error::Corrupt {
                    cid: self.tree_cid.to_string(),
                    detail: "the received leaves do not hash to the tree root".into(),
                });
            }
            added += join_blocks(&tx, self.tree_id, self.block_size, expiry)?;
            joined = self.leaves * self.block_size;
            tx.execute("DELETE FROM partial WHERE tree_id = ?1", [self.tree_id])?;
        }
        tx.commit()?;
        if missing <= 0 {
            // Before the metadata lock goes: no reader can see the completed tree's rows
            // while its partial entry is still cached.
            store.forget_tree(&self.tree_cid);
        }
        drop(db);
        store.used.fetch_add(added, Ordering::SeqCst);
        store.used.fetch_sub(joined, Ordering::SeqCst);
        let done = pending.len() as u64 * self.block_size;
        store.release(done.min(self.reserved));
        self.reserved = self.reserved.saturating_sub(done);
        self.missing = missing.max(0) as u64;
        if missing <= 0 {
            self.complete = true;
        }
        Ok(())
    }
}

/// Enters the distinct leaves of a partial tree that has just completed into `blocks`, in
/// CID order so that each page of the index is written once: a new block lives in this
/// tree's file; one already stored gains the tree as a reference. SQLite sorts on disk, so
/// memory stays flat whatever the size of the tree. Returns the bytes of the new blocks.
fn join_blocks(
    tx: &rusqlite::Transaction<'_>,
    tree_id: i64,
    block_size: u64,
    expiry: i64,
) -> Result<u64> {
    let mut leaves = tx.prepare(
        "SELECT digest, MIN(idx) FROM partial WHERE tree_id = ?1 GROUP BY digest ORDER BY digest",
    )?;
    let rows = leaves.query_map([tree_id], |r| {
        Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut added = 0;
    for row in rows {
        let (digest, idx) = row?;
        let digest = leaf_digest(tree_id, idx, digest)?;
        added += add_reference(tx, &digest, block_size, expiry, tree_id, idx as u64)?;
    }
    Ok(added)
}

/// The digest of leaf `idx` as a `partial` row of tree `tree_id` stores it.
fn leaf_digest(tree_id: i64, idx: i64, digest: Vec<u8>) -> Result<Digest32> {
    digest.try_into().map_err(|_| Error::Corrupt {
        cid: format!("tree row {tree_id}"),
        detail: format!("leaf {idx} is not a 32-byte digest"),
    })
}

/// Moves the leaves of a partial tree that holds every leaf into its `leaves` blob, in
/// order and a slice at a time, and returns the root they hash to. Memory stays flat
/// whatever the size of the dataset.
fn assemble(tx: &rusqlite::Transaction<'_>, tree_id: i64, count: u64) -> Result<Digest32> {
    const SLICE: usize = 64 * 1024;
    let lost = |e: std::io::Error| Error::io("writing the leaves of a completed tree", e);
    tx.execute(
        "UPDATE trees SET leaves = zeroblob(?2), missing = 0 WHERE id = ?1",
        params![tree_id, (count * 32) as i64],
    )?;
    let mut blob = tx.blob_open(MAIN_DB, c"trees", c"leaves", tree_id, false)?;
    let mut stmt = tx.prepare("SELECT idx, digest FROM partial WHERE tree_id = ?1 ORDER BY idx")?;
    let rows = stmt.query_map([tree_id], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
    })?;
    let mut root = RootBuilder::new(count);
    let mut buf = Vec::with_capacity(SLICE);
    for (next, row) in (0u64..).zip(rows) {
        let (idx, digest) = row?;
        let leaf = leaf_digest(tree_id, idx, digest)?;
        if idx as u64 != next {
            return Err(Error::State(format!(
                "leaf {next} of a completed tree is absent"
            )));
        }
        root.push(leaf);
        buf.extend_from_slice(&leaf);
        if buf.len() >= SLICE {
            blob.write_all(&buf).map_err(lost)?;
            buf.clear();
        }
    }
    blob.write_all(&buf).map_err(lost)?;
    root.finish()
        .ok_or_else(|| Error::State("a completed tree lacks leaves".into()))
}

impl Drop for TreeFill {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(tree = %self.tree_cid, error = %e, "could not record received blocks");
        }
        self.store.release(self.reserved);
    }
}
