//! The persistent block store under `data-dir`.
//!
//! Layout:
//! - `repo.sqlite3`: metadata (trees, blocks with size, expiry and reference count, manifests);
//! - `blocks/<treeCid>.dat`: the padded blocks of one tree, block `i` at `i * blockSize`;
//! - `blocks/<treeCid>.tree`: every layer of a complete tree, derived from its leaves and
//!   read a few digests at a time to serve proofs (see `tree_file`);
//! - `blocks/<treeCid>.sum`: a CRC32C of each block, written as it is stored (see `sums`);
//! - `tmp/`: uploads in progress, renamed into `blocks/` just before their metadata commits.
//!
//! Blocks are de-duplicated by CID for accounting: the quota counts each distinct block once,
//! plus manifest bytes. Every block read is checked before it is returned: against the sum
//! recorded when its verified bytes were stored, or failing that against its tree leaf (and
//! so, through the tree, against the tree root).
//!
//! Crash safety: the metadata of a dataset commits in one SQLite transaction after its data
//! file is in place. At open, files in `tmp/` and data files no tree row names are removed, so
//! a process killed mid-upload leaves every completed dataset intact and nothing half-written.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior, MAIN_DB};
use sha2::{Digest, Sha256};

use crate::cid::{Cid, CidKind, Digest32};
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::merkle::{CodexTree, Proof};

mod fill;
mod sums;
mod tree_file;
mod writeback;

pub use fill::TreeFill;
use sums::{SumWriter, Sums};
use tree_file::TreeFile;
use writeback::ReadBehind;

/// Current schema version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 3;

/// Expiry of blocks that never expire.
const NEVER: i64 = i64::MAX;

/// How many trees the read cache keeps.
const TREE_CACHE: usize = 8;

const SCHEMA_V1: &str = "
CREATE TABLE trees (
    id         INTEGER PRIMARY KEY,
    cid        BLOB NOT NULL UNIQUE,
    block_size INTEGER NOT NULL,
    leaves     BLOB NOT NULL,
    refs       INTEGER NOT NULL,
    missing    INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE blocks (
    cid     BLOB PRIMARY KEY,
    size    INTEGER NOT NULL,
    expiry  INTEGER NOT NULL,
    refs    INTEGER NOT NULL,
    tree_id INTEGER,
    idx     INTEGER,
    data    BLOB
) WITHOUT ROWID;
CREATE INDEX blocks_by_expiry ON blocks(expiry);
CREATE TABLE manifests (
    cid     BLOB PRIMARY KEY,
    tree_id INTEGER NOT NULL REFERENCES trees(id)
) WITHOUT ROWID;
";

/// Version 2: trees filled block by block from the network, and per-leaf absence records.
/// A tree is *partial* while its `leaves` blob is empty: the leaves it holds are rows of
/// `partial`, each with the proof it arrived with. A complete tree that lost blocks lists
/// them in `holes`. In both cases `missing` counts the absent leaves.
const SCHEMA_V2: &str = "
CREATE TABLE partial (
    tree_id INTEGER NOT NULL REFERENCES trees(id),
    idx     INTEGER NOT NULL,
    digest  BLOB NOT NULL,
    proof   BLOB NOT NULL,
    PRIMARY KEY (tree_id, idx)
) WITHOUT ROWID;
CREATE INDEX partial_by_digest ON partial(digest);
CREATE TABLE holes (
    tree_id INTEGER NOT NULL REFERENCES trees(id),
    idx     INTEGER NOT NULL,
    PRIMARY KEY (tree_id, idx)
) WITHOUT ROWID;
ALTER TABLE trees ADD COLUMN leaf_count INTEGER NOT NULL DEFAULT 0;
UPDATE trees SET leaf_count = length(leaves) / 32;
";

/// Version 3: a partial tree's leaves are its own rows of `partial` until the tree
/// completes; only then do they join `blocks` (with their references and expiry), in CID
/// order. A download thus appends one row per block to `partial` instead of adding entries
/// to three randomly keyed B-trees (`blocks`, `blocks_by_expiry`, `partial_by_digest`),
/// which cost a page of WAL each per block: a fifth of a download's disk writes. Nothing
/// looks leaves up by digest any more.
const SCHEMA_V3: &str = "DROP INDEX partial_by_digest;";

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Maximum bytes of blocks and manifests.
    pub quota: u64,
    /// Lifetime of stored blocks; `None` keeps them forever.
    pub ttl: Option<Duration>,
}

/// Quota figures, as `codex_storage_space` reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Space {
    /// Distinct blocks stored, manifests included.
    pub total_blocks: u64,
    /// The quota.
    pub quota_max_bytes: u64,
    /// Bytes used by stored blocks.
    pub quota_used_bytes: u64,
    /// Bytes reserved by uploads in progress.
    pub quota_reserved_bytes: u64,
}

/// A dataset held in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Its manifest CID.
    pub cid: Cid,
    /// Its manifest.
    pub manifest: Manifest,
}

/// The block store. Cheap to share behind an `Arc`; all methods block on disk I/O.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    /// Held open for its exclusive `flock`: one node per data-dir.
    _lock: File,
    db: Mutex<Connection>,
    quota: u64,
    ttl: Option<Duration>,
    used: AtomicU64,
    reserved: AtomicU64,
    trees: Mutex<Vec<(Cid, Arc<TreeEntry>)>>,
    /// Bumped (under the `trees` lock) whenever a cached tree changes, so that an entry read
    /// from the database before the change is never cached after it.
    trees_changed: AtomicU64,
    /// Trees with a [`TreeFill`] alive: one at a time per tree.
    filling: Mutex<HashSet<Cid>>,
    /// Signalled when a fill ends.
    fill_ended: Condvar,
}

/// A tree opened for reading.
#[derive(Debug)]
struct TreeEntry {
    id: i64,
    /// `None` while the tree is partial: its leaves and proofs are then rows of `partial`,
    /// served by (tree, index) only, as they are in no row of `blocks` yet.
    tree: Option<TreeFile>,
    leaf_count: u64,
    block_size: u64,
    file: File,
    /// The tree's block sums, when it has a sum file.
    sums: Option<Sums>,
    /// What blocks read for peers let the page cache drop.
    behind: ReadBehind,
}

/// A block of a tree found in the store and not read yet: see [`Store::leaf_ref`].
#[derive(Debug)]
pub struct LeafRef {
    tree_cid: Cid,
    entry: Arc<TreeEntry>,
    index: u64,
    leaf: Digest32,
    /// The block's inclusion proof in its tree.
    pub proof: Proof,
}

impl LeafRef {
    /// The block's CID.
    pub fn cid(&self) -> Cid {
        Cid::from_digest(CidKind::Block, self.leaf)
    }

    /// The block's size in bytes.
    pub fn size(&self) -> usize {
        self.entry.block_size as usize
    }
}

/// Appends `len` bytes of `file` at `offset` to `out`, read straight into its spare
/// capacity: a block served to a peer goes from the page cache into the frame that carries
/// it, not zeroed first and copied after. `out` is left as it was on an error.
fn append_at(file: &File, offset: u64, len: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    out.reserve(len);
    let start = out.len();
    let mut done = 0;
    while done < len {
        let spare = &mut out.spare_capacity_mut()[done..len];
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `spare` is memory `out` owns, valid for `spare.len()` bytes of writes;
        // pread writes at most that many into it and nothing reads it before `set_len`.
        let n =
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => done += n as usize,
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    // SAFETY: pread initialised the `len` bytes after `start`, within the reserved capacity.
    unsafe { out.set_len(start + len) };
    Ok(())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |e| Error::io(context, e)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
    // back on drop), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// Opens (creating if needed) the store under `cfg.data_dir`, cleans up what an
    /// interrupted run left, and checks that the quota fits on the filesystem.
    pub fn open(cfg: &StoreConfig) -> Result<Self> {
        let dir = cfg.data_dir.clone();
        for sub in ["blocks", "tmp"] {
            fs::create_dir_all(dir.join(sub))
                .map_err(io_err(format!("creating {}", dir.join(sub).display())))?;
        }
        let dir_lock = lock_dir(&dir)?;
        let db_path = dir.join("repo.sqlite3");
        let mut conn = Connection::open(&db_path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(10))?;
        migrate(&mut conn)?;

        let store = Self {
            dir,
            _lock: dir_lock,
            db: Mutex::new(conn),
            quota: cfg.quota,
            ttl: cfg.ttl,
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            trees: Mutex::new(Vec::new()),
            trees_changed: AtomicU64::new(0),
            filling: Mutex::new(HashSet::new()),
            fill_ended: Condvar::new(),
        };
        store.recover()?;
        // Blocks in the index, and those partial trees hold (one block size per leaf).
        let used: i64 = lock(&store.db).query_row(
            "SELECT (SELECT COALESCE(SUM(size), 0) FROM blocks)
                  + (SELECT COALESCE(SUM(t.block_size), 0)
                     FROM partial p JOIN trees t ON t.id = p.tree_id)",
            [],
            |r| r.get(0),
        )?;
        store.used.store(used as u64, Ordering::SeqCst);
        store.check_disk_space()?;
        Ok(store)
    }

    /// Removes leftovers of interrupted uploads and deletions.
    fn recover(&self) -> Result<()> {
        let tmp = self.dir.join("tmp");
        for entry in fs::read_dir(&tmp).map_err(io_err("listing tmp"))? {
            let path = entry.map_err(io_err("listing tmp"))?.path();
            tracing::info!(path = %path.display(), "removing interrupted upload");
            fs::remove_file(&path).map_err(io_err(format!("removing {}", path.display())))?;
        }
        let known: HashSet<String> = {
            let db = lock(&self.db);
            let mut stmt = db.prepare("SELECT cid FROM trees")?;
            let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
            let mut known = HashSet::new();
            for row in rows {
                if let Ok(cid) = Cid::from_bytes(&row?) {
                    known.insert(format!("{cid}.dat"));
                    known.insert(format!("{cid}.tree"));
                    known.insert(format!("{cid}.sum"));
                }
            }
            known
        };
        let blocks = self.dir.join("blocks");
        for entry in fs::read_dir(&blocks).map_err(io_err("listing blocks"))? {
            let entry = entry.map_err(io_err("listing blocks"))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::info!(file = %name, "removing data file no dataset names");
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn check_disk_space(&self) -> Result<()> {
        let free = free_space(&self.dir)?;
        let used = self.used.load(Ordering::SeqCst);
        if self.quota > free.saturating_add(used) {
            return Err(Error::DiskSpace {
                path: self.dir.clone(),
                quota: self.quota,
                free: free.saturating_add(used),
            });
        }
        Ok(())
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn expiry(&self) -> i64 {
        match self.ttl {
            Some(ttl) => now_secs().saturating_add(ttl.as_secs() as i64),
            None => NEVER,
        }
    }

    /// Reserves `bytes` of quota, or fails without reserving anything.
    fn reserve(&self, bytes: u64) -> Result<()> {
        let mut cur = self.reserved.load(Ordering::SeqCst);
        loop {
            let used = self.used.load(Ordering::SeqCst);
            let available = self.quota.saturating_sub(used.saturating_add(cur));
            if bytes > available {
                return Err(Error::Quota {
                    needed: bytes,
                    available,
                    quota: self.quota,
                });
            }
            match self.reserved.compare_exchange(
                cur,
                cur + bytes,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    fn release(&self, bytes: u64) {
        self.reserved.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Quota figures.
    pub fn space(&self) -> Result<Space> {
        let total: i64 =
            lock(&self.db).query_row("SELECT COUNT(*) FROM blocks", [], |r| r.get(0))?;
        Ok(Space {
            total_blocks: total as u64,
            quota_max_bytes: self.quota,
            quota_used_bytes: self.used.load(Ordering::SeqCst),
            quota_reserved_bytes: self.reserved.load(Ordering::SeqCst),
        })
    }

    /// Whether a block with this CID (any kind, manifests included) is stored.
    pub fn exists_block(&self, cid: &Cid) -> Result<bool> {
        self.has_block(cid)
    }

    /// Whether block `index` of tree `tree_cid` is stored.
    pub fn holds_leaf(&self, tree_cid: &Cid, index: u64) -> Result<bool> {
        let db = lock(&self.db);
        let row: Option<(i64, i64, bool)> = db
            .prepare_cached("SELECT id, leaf_count, length(leaves) > 0 FROM trees WHERE cid = ?1")?
            .query_row([tree_cid.to_bytes()], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let Some((id, count, complete)) = row else {
            return Ok(false);
        };
        if index >= count as u64 {
            return Ok(false);
        }
        let sql = if complete {
            "SELECT NOT EXISTS (SELECT 1 FROM holes WHERE tree_id = ?1 AND idx = ?2)"
        } else {
            "SELECT EXISTS (SELECT 1 FROM partial WHERE tree_id = ?1 AND idx = ?2)"
        };
        let held = db
            .prepare_cached(sql)?
            .query_row(params![id, index as i64], |r| r.get(0))?;
        Ok(held)
    }

    fn has_block(&self, cid: &Cid) -> Result<bool> {
        let db = lock(&self.db);
        let mut stmt = db.prepare_cached("SELECT 1 FROM blocks WHERE cid = ?1")?;
        Ok(stmt.exists([cid.to_bytes()])?)
    }

    /// Starts an upload of a dataset with `block_size`-byte blocks.
    pub fn writer(
        self: &Arc<Self>,
        block_size: usize,
        filename: Option<String>,
        mimetype: Option<String>,
    ) -> Result<DatasetWriter> {
        if block_size == 0 || block_size > crate::MAX_BLOCK_SIZE {
            return Err(Error::Invalid(format!(
                "block size {block_size} out of range 1..={}",
                crate::MAX_BLOCK_SIZE
            )));
        }
        let path = self
            .dir
            .join("tmp")
            .join(format!("upload-{}.part", unique_suffix()));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        Ok(DatasetWriter {
            store: Arc::clone(self),
            io: Some(BlockWriter::spawn(file, &path.with_extension("sum"))?),
            path,
            block_size,
            buf: Vec::with_capacity(block_size),
            leaves: Vec::new(),
            seen: HashSet::new(),
            reserved: 0,
            failed: false,
            filename,
            mimetype,
        })
    }

    /// Registers a completed upload: moves its data file in place, then commits its metadata.
    fn commit(
        &self,
        tmp: &Path,
        tree: CodexTree,
        block_size: u64,
        manifest: &Manifest,
        reserved: u64,
    ) -> Result<Cid> {
        let tree_cid = tree.cid();
        let mbytes = manifest.encode();
        let mcid = Cid::hash_of(CidKind::Manifest, &mbytes);
        let final_path = self.tree_path(&tree_cid);
        let expiry = self.expiry();

        // The whole commit holds the metadata lock, file moves included, so a concurrent
        // delete of the same tree cannot unlink a file this commit has just registered.
        let mut db = lock(&self.db);
        let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let existing: Option<(i64, i64)> = tx
            .query_row(
                "SELECT id, missing FROM trees WHERE cid = ?1",
                [tree_cid.to_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        // A new tree, or one that lost blocks, takes the complete file just written (moved in
        // before the metadata commits: a crash in between leaves an orphan file that the next
        // open removes). A complete tree keeps its file.
        if existing.is_none_or(|(_, missing)| missing > 0) {
            fs::rename(tmp, &final_path).map_err(io_err(format!("moving {}", tmp.display())))?;
            self.forget_tree(&tree_cid);
        }
        // The upload's block sums are right for whichever data file the tree keeps.
        let sums_path = self.sums_path(&tree_cid);
        let _ = fs::rename(tmp.with_extension("sum"), &sums_path);
        let mut added: u64 = 0;
        // What a partial tree of this content held counted as used; it now joins `blocks`.
        let was_partial = match existing {
            Some((id, missing)) if missing > 0 => partial_bytes(&tx, id)?,
            _ => 0,
        };
        let tree_id = match existing {
            Some((id, _)) => id,
            None => {
                tx.execute(
                    "INSERT INTO trees (cid, block_size, leaves, refs, leaf_count)
                     VALUES (?1, ?2, ?3, 0, ?4)",
                    params![
                        tree_cid.to_bytes(),
                        block_size as i64,
                        tree.leaves().concat(),
                        tree.len() as i64
                    ],
                )?;
                tx.last_insert_rowid()
            }
        };
        {
            // The blocks this tree already holds (all of them when it is complete; none
            // when it is partial) only live longer; every other distinct block gains this
            // tree as a reference.
            let held = match existing {
                Some((id, _)) => held_digests(&tx, id)?,
                None => HashSet::new(),
            };
            let mut extend =
                tx.prepare_cached("UPDATE blocks SET expiry = MAX(expiry, ?2) WHERE cid = ?1")?;
            let mut distinct = HashSet::with_capacity(tree.leaves().len());
            for (i, leaf) in tree.leaves().iter().enumerate() {
                if !distinct.insert(*leaf) {
                    continue;
                }
                if held.contains(leaf) {
                    let cid = Cid::from_digest(CidKind::Block, *leaf).to_bytes();
                    extend.execute(params![cid, expiry])?;
                } else {
                    added += add_reference(&tx, leaf, block_size, expiry, tree_id, i as u64)?;
                }
            }
        }
        if existing.is_some_and(|(_, missing)| missing > 0) {
            // A damaged or partial tree is now complete, with the file just written.
            tx.execute("DELETE FROM holes WHERE tree_id = ?1", [tree_id])?;
            tx.execute("DELETE FROM partial WHERE tree_id = ?1", [tree_id])?;
            tx.execute(
                "UPDATE trees SET missing = 0, leaves = ?2, leaf_count = ?3 WHERE id = ?1",
                params![tree_id, tree.leaves().concat(), tree.len() as i64],
            )?;
        }
        let new_manifest = tx.execute(
            "INSERT OR IGNORE INTO blocks (cid, size, expiry, refs, data) VALUES (?1, ?2, ?3, 1, ?4)",
            params![mcid.to_bytes(), mbytes.len() as i64, expiry, mbytes],
        )? == 1;
        if new_manifest {
            added += mbytes.len() as u64;
            tx.execute(
                "INSERT INTO manifests (cid, tree_id) VALUES (?1, ?2)",
                params![mcid.to_bytes(), tree_id],
            )?;
            tx.execute("UPDATE trees SET refs = refs + 1 WHERE id = ?1", [tree_id])?;
        } else {
            // The same dataset again: its manifest lives as long as its blocks.
            tx.execute(
                "UPDATE blocks SET expiry = MAX(expiry, ?2) WHERE cid = ?1",
                params![mcid.to_bytes(), expiry],
            )?;
        }
        // Blocks found stored while uploading may have been deleted since: anything beyond
        // what the upload reserved must still fit, or the whole commit rolls back.
        let extra = added.saturating_sub(reserved.saturating_add(was_partial));
        // On failure a new tree's file goes too (a rare database error elsewhere leaves it to
        // the sweep at the next open).
        let undo_move = || {
            if existing.is_none() {
                self.forget_tree(&tree_cid);
                let _ = fs::remove_file(&final_path);
                let _ = fs::remove_file(&sums_path);
            }
        };
        if extra > 0 {
            if let Err(e) = self.reserve(extra) {
                undo_move();
                return Err(e);
            }
        }
        if let Err(e) = tx.commit() {
            self.release(extra);
            undo_move();
            return Err(e.into());
        }
        self.used.fetch_add(added, Ordering::SeqCst);
        self.used.fetch_sub(was_partial, Ordering::SeqCst);
        self.release(extra);
        drop(db);
        // Kept the existing file: the one just written is not needed.
        let _ = fs::remove_file(tmp);
        Ok(mcid)
    }

    fn tree_path(&self, tree_cid: &Cid) -> PathBuf {
        self.dir.join("blocks").join(format!("{tree_cid}.dat"))
    }

    /// Where a tree's block sums live ([`Sums`]).
    fn sums_path(&self, tree_cid: &Cid) -> PathBuf {
        self.dir.join("blocks").join(format!("{tree_cid}.sum"))
    }

    /// Where a complete tree's layers live ([`TreeFile`]).
    fn layers_path(&self, tree_cid: &Cid) -> PathBuf {
        self.dir.join("blocks").join(format!("{tree_cid}.tree"))
    }

    /// Opens a complete tree's layer file, building it from the `leaves` blob when it is
    /// missing or does not match the tree.
    fn layers(&self, tree_cid: &Cid, id: i64, leaf_count: u64) -> Result<TreeFile> {
        let path = self.layers_path(tree_cid);
        let root = tree_cid.digest();
        if let Some(t) = TreeFile::open(&path, leaf_count, &root)? {
            return Ok(t);
        }
        let built = {
            let db = lock(&self.db);
            let leaves = db.blob_open(MAIN_DB, c"trees", c"leaves", id, true)?;
            TreeFile::build(&path, leaf_count, leaves)?
        };
        if built != root {
            let _ = fs::remove_file(&path);
            return Err(Error::Corrupt {
                cid: tree_cid.to_string(),
                detail: "stored leaves do not hash to the tree root".into(),
            });
        }
        TreeFile::open(&path, leaf_count, &root)?.ok_or_else(|| {
            Error::State(format!(
                "the layer file of {tree_cid} is unusable once built"
            ))
        })
    }

    /// Removes a layer file that gave a bad proof, so that the next read builds it again.
    fn drop_layers(&self, tree_cid: &Cid) {
        self.forget_tree(tree_cid);
        let _ = fs::remove_file(self.layers_path(tree_cid));
    }

    /// Opens a tree for reading (cached), checking a complete tree's leaves against its CID.
    fn open_tree(&self, tree_cid: &Cid) -> Result<Arc<TreeEntry>> {
        loop {
            let seen = {
                let cache = lock(&self.trees);
                if let Some((_, e)) = cache.iter().find(|(c, _)| c == tree_cid) {
                    return Ok(Arc::clone(e));
                }
                self.trees_changed.load(Ordering::SeqCst)
            };
            let entry = self.read_tree(tree_cid)?;
            let mut cache = lock(&self.trees);
            if self.trees_changed.load(Ordering::SeqCst) != seen {
                // A tree changed while this one was read: it may be stale; read again.
                continue;
            }
            if cache.len() >= TREE_CACHE {
                cache.remove(0);
            }
            cache.push((*tree_cid, Arc::clone(&entry)));
            return Ok(entry);
        }
    }

    /// Reads a tree's metadata from the database and opens its file.
    fn read_tree(&self, tree_cid: &Cid) -> Result<Arc<TreeEntry>> {
        let row: Option<(i64, i64, i64, bool)> = lock(&self.db)
            .query_row(
                "SELECT id, block_size, leaf_count, length(leaves) > 0 FROM trees WHERE cid = ?1",
                [tree_cid.to_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let (id, block_size, leaf_count, complete) =
            row.ok_or_else(|| Error::NotFound(format!("tree {tree_cid}")))?;
        let tree = if complete {
            Some(self.layers(tree_cid, id, leaf_count as u64)?)
        } else {
            None
        };
        let path = self.tree_path(tree_cid);
        let file = File::open(&path).map_err(io_err(format!("opening {}", path.display())))?;
        Ok(Arc::new(TreeEntry {
            id,
            tree,
            leaf_count: leaf_count as u64,
            block_size: block_size as u64,
            file,
            sums: Sums::open(&self.sums_path(tree_cid)),
            behind: ReadBehind::default(),
        }))
    }

    /// Drops a tree's cached entry after its metadata or file changed.
    fn forget_tree(&self, tree_cid: &Cid) {
        let mut cache = lock(&self.trees);
        cache.retain(|(c, _)| c != tree_cid);
        self.trees_changed.fetch_add(1, Ordering::SeqCst);
    }

    /// The leaf digest of block `index` of a partial tree, and its proof, if held.
    fn partial_leaf(&self, entry: &TreeEntry, index: u64) -> Result<Option<(Digest32, Vec<u8>)>> {
        let db = lock(&self.db);
        let mut stmt =
            db.prepare_cached("SELECT digest, proof FROM partial WHERE tree_id = ?1 AND idx = ?2")?;
        let row: Option<(Vec<u8>, Vec<u8>)> = stmt
            .query_row(params![entry.id, index as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        Ok(row.map(|(d, p)| (d.try_into().unwrap_or([0; 32]), p)))
    }

    /// Reads block `index` of a tree, verified against its leaf.
    fn read_leaf(&self, tree_cid: &Cid, entry: &TreeEntry, index: u64) -> Result<Bytes> {
        let absent = || Error::NotFound(format!("block {index} of tree {tree_cid}"));
        let leaf = match &entry.tree {
            Some(tree) => tree.leaf(index)?.ok_or_else(absent)?,
            None => self.partial_leaf(entry, index)?.ok_or_else(absent)?.0,
        };
        self.read_verified(tree_cid, entry, index, &leaf)
    }

    /// Reads block `index` of a tree and checks it: against its recorded sum, or else by
    /// hashing it to `leaf`.
    fn read_verified(
        &self,
        tree_cid: &Cid,
        entry: &TreeEntry,
        index: u64,
        leaf: &Digest32,
    ) -> Result<Bytes> {
        let mut buf = Vec::new();
        self.append_verified(tree_cid, entry, index, leaf, &mut buf)?;
        Ok(Bytes::from(buf))
    }

    /// [`Store::read_verified`], appending the block to `out`, which is left as it was
    /// when the block cannot be read or fails its check.
    fn append_verified(
        &self,
        tree_cid: &Cid,
        entry: &TreeEntry,
        index: u64,
        leaf: &Digest32,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let start = out.len();
        append_at(
            &entry.file,
            index * entry.block_size,
            entry.block_size as usize,
            out,
        )
        .map_err(io_err(format!("reading block {index} of tree {tree_cid}")))?;
        let block = &out[start..];
        if entry.sums.as_ref().is_some_and(|s| s.intact(index, block)) {
            return Ok(());
        }
        let digest: Digest32 = Sha256::digest(block).into();
        if &digest == leaf {
            return Ok(());
        }
        out.truncate(start);
        let cid = Cid::from_digest(CidKind::Block, *leaf);
        if !self.has_block(&cid)? {
            return Err(Error::NotFound(format!(
                "block {cid} (index {index} of {tree_cid})"
            )));
        }
        tracing::error!(%cid, index, tree = %tree_cid, "stored block fails verification");
        Err(Error::Corrupt {
            cid: cid.to_string(),
            detail: format!("block {index} of tree {tree_cid} does not match its leaf"),
        })
    }

    /// Returns a stored block by CID, verified.
    pub fn block(&self, cid: &Cid) -> Result<Bytes> {
        /// Inline data, or the tree CID and index where the block lives.
        type Location = (Option<Vec<u8>>, Option<Vec<u8>>, Option<i64>);
        let row: Option<Location> = lock(&self.db)
            .query_row(
                "SELECT b.data, t.cid, b.idx FROM blocks b LEFT JOIN trees t ON t.id = b.tree_id
                 WHERE b.cid = ?1",
                [cid.to_bytes()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        match row {
            None => Err(Error::NotFound(format!("block {cid}"))),
            Some((Some(data), _, _)) => {
                if cid.matches(&data) {
                    Ok(Bytes::from(data))
                } else {
                    Err(Error::Corrupt {
                        cid: cid.to_string(),
                        detail: "hash mismatch".into(),
                    })
                }
            }
            Some((None, Some(tree), Some(idx))) => {
                let tree = Cid::from_bytes(&tree)?;
                let entry = self.open_tree(&tree)?;
                self.read_leaf(&tree, &entry, idx as u64)
            }
            Some(_) => Err(Error::Corrupt {
                cid: cid.to_string(),
                detail: "block has no data and no location".into(),
            }),
        }
    }

    /// Block `index` of a tree with its inclusion proof, as the block exchange serves it.
    /// The block is verified against its leaf before it is returned.
    pub fn leaf(&self, tree_cid: &Cid, index: u64) -> Result<(Bytes, Proof)> {
        self.leaf_block(tree_cid, index)
            .map(|(_, data, proof)| (data, proof))
    }

    /// [`Store::leaf`] with the block's CID (known from its leaf, so not hashed again).
    pub fn leaf_block(&self, tree_cid: &Cid, index: u64) -> Result<(Cid, Bytes, Proof)> {
        let leaf = self.leaf_ref(tree_cid, index)?;
        let mut data = Vec::new();
        self.read_leaf_into(&leaf, &mut data)?;
        Ok((leaf.cid(), Bytes::from(data), leaf.proof))
    }

    /// Where block `index` of a tree is held, its CID and its proof: what the block
    /// exchange writes around the block, known before the block is read
    /// ([`Store::read_leaf_into`]).
    pub fn leaf_ref(&self, tree_cid: &Cid, index: u64) -> Result<LeafRef> {
        if tree_cid.kind() != CidKind::Tree {
            return Err(Error::Invalid(format!("{tree_cid} is not a tree CID")));
        }
        let entry = self.open_tree(tree_cid)?;
        let absent = || Error::NotFound(format!("block {index} of tree {tree_cid}"));
        let (leaf, proof) = match &entry.tree {
            Some(tree) => match tree.leaf_and_proof(index) {
                Ok(found) => found.ok_or_else(absent)?,
                Err(e) => {
                    tracing::error!(tree = %tree_cid, error = %e, "rebuilding a damaged layer file");
                    self.drop_layers(tree_cid);
                    return Err(e);
                }
            },
            None => {
                let (leaf, proof) = self.partial_leaf(&entry, index)?.ok_or_else(absent)?;
                (leaf, Proof::decode(&proof)?)
            }
        };
        Ok(LeafRef {
            tree_cid: *tree_cid,
            entry,
            index,
            leaf,
            proof,
        })
    }

    /// Appends the block `leaf` refers to to `out`, verified; `out` is left as it was when
    /// the block cannot be read or fails its check.
    pub fn read_leaf_into(&self, leaf: &LeafRef, out: &mut Vec<u8>) -> Result<()> {
        self.append_verified(&leaf.tree_cid, &leaf.entry, leaf.index, &leaf.leaf, out)
    }

    /// [`Store::read_leaf_into`] for a peer. In a dataset of 32 MiB or more, the page cache
    /// may then drop the 8 MiB stretch two before the block's own.
    pub fn serve_leaf_into(&self, leaf: &LeafRef, out: &mut Vec<u8>) -> Result<()> {
        self.read_leaf_into(leaf, out)?;
        let entry = &leaf.entry;
        let size = entry.block_size;
        entry
            .behind
            .read(&entry.file, entry.leaf_count * size, leaf.index * size);
        Ok(())
    }

    /// The manifest of a dataset.
    pub fn manifest(&self, cid: &Cid) -> Result<Manifest> {
        if cid.kind() != CidKind::Manifest {
            return Err(Error::Invalid(format!(
                "{cid} is not a manifest (dataset) CID"
            )));
        }
        Ok(Manifest::decode(&self.block(cid)?)?)
    }

    /// Opens a dataset for sequential reading.
    pub fn reader(self: &Arc<Self>, cid: &Cid) -> Result<DatasetReader> {
        let manifest = self.manifest(cid)?;
        let entry = self.open_tree(&manifest.tree_cid)?;
        if entry.block_size != manifest.block_size || entry.leaf_count != manifest.blocks() {
            return Err(Error::Corrupt {
                cid: cid.to_string(),
                detail: "manifest does not match its tree".into(),
            });
        }
        Ok(DatasetReader {
            store: Arc::clone(self),
            entry,
            tree_cid: manifest.tree_cid,
            remaining: manifest.dataset_size,
            next: 0,
            manifest,
        })
    }

    /// Whether `cid` is stored; for a manifest CID, whether the whole dataset is.
    pub fn exists(&self, cid: &Cid) -> Result<bool> {
        if cid.kind() != CidKind::Manifest {
            return self.has_block(cid);
        }
        let db = lock(&self.db);
        let missing: Option<i64> = db
            .query_row(
                "SELECT t.missing FROM manifests m JOIN trees t ON t.id = m.tree_id
                 WHERE m.cid = ?1",
                [cid.to_bytes()],
                |r| r.get(0),
            )
            .optional()?;
        Ok(missing == Some(0))
    }

    /// Every dataset in the store, in no particular order.
    pub fn list(&self) -> Result<Vec<Dataset>> {
        let db = lock(&self.db);
        let mut stmt = db.prepare(
            "SELECT m.cid, b.data FROM manifests m JOIN blocks b ON b.cid = m.cid ORDER BY m.cid",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (cid, data) = row?;
            let cid = Cid::from_bytes(&cid)?;
            match Manifest::decode(&data) {
                Ok(manifest) if cid.matches(&data) => out.push(Dataset { cid, manifest }),
                _ => tracing::error!(%cid, "stored manifest fails verification; not listed"),
            }
        }
        Ok(out)
    }

    /// Deletes a block; a manifest CID deletes its whole dataset (blocks other datasets
    /// share are kept). Deleting what is not stored succeeds.
    pub fn delete(&self, cid: &Cid) -> Result<()> {
        match cid.kind() {
            CidKind::Manifest => self.delete_dataset(cid, None),
            CidKind::Block => self.delete_block(cid, None),
            CidKind::Tree => Err(Error::Invalid(format!(
                "{cid} is a tree CID: delete the dataset by its manifest CID"
            ))),
        }
    }

    /// Deletes a dataset; with `expired_at`, only if its manifest is still expired then
    /// (maintenance must not delete what an upload refreshed meanwhile).
    fn delete_dataset(&self, mcid: &Cid, expired_at: Option<i64>) -> Result<()> {
        let mut freed: u64 = 0;
        {
            let mut db = lock(&self.db);
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !still_expired(&tx, mcid, expired_at)? {
                return Ok(());
            }
            let row: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT m.tree_id, b.size FROM manifests m JOIN blocks b ON b.cid = m.cid
                     WHERE m.cid = ?1",
                    [mcid.to_bytes()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((tree_id, msize)) = row else {
                // Not a dataset here; maybe a stray manifest block.
                freed += delete_rows(&tx, &[mcid.to_bytes()])?;
                tx.commit()?;
                self.used.fetch_sub(freed, Ordering::SeqCst);
                return Ok(());
            };
            tx.execute("DELETE FROM manifests WHERE cid = ?1", [mcid.to_bytes()])?;
            tx.execute("DELETE FROM blocks WHERE cid = ?1", [mcid.to_bytes()])?;
            freed += msize as u64;
            let refs: i64 = tx.query_row(
                "UPDATE trees SET refs = refs - 1 WHERE id = ?1 RETURNING refs",
                [tree_id],
                |r| r.get(0),
            )?;
            if refs <= 0 {
                let tree_cid: Vec<u8> =
                    tx.query_row("SELECT cid FROM trees WHERE id = ?1", [tree_id], |r| {
                        r.get(0)
                    })?;
                freed += release_tree(&tx, tree_id)?;
                tx.execute("DELETE FROM partial WHERE tree_id = ?1", [tree_id])?;
                tx.execute("DELETE FROM holes WHERE tree_id = ?1", [tree_id])?;
                tx.execute("DELETE FROM trees WHERE id = ?1", [tree_id])?;
                tx.commit()?;
                // Still under the metadata lock: no commit of the same tree can slip in
                // between and have its new file unlinked. A crash before the unlink leaves
                // an orphan file that the next open removes.
                let tree = Cid::from_bytes(&tree_cid)?;
                self.forget_tree(&tree);
                let path = self.tree_path(&tree);
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove data file");
                }
                let _ = fs::remove_file(self.layers_path(&tree));
                let _ = fs::remove_file(self.sums_path(&tree));
            } else {
                tx.commit()?;
            }
        }
        self.used.fetch_sub(freed, Ordering::SeqCst);
        Ok(())
    }

    /// Deletes one data block: its row goes, its bytes are zeroed in every tree holding it,
    /// and those trees count it missing.
    fn delete_block(&self, cid: &Cid, expired_at: Option<i64>) -> Result<()> {
        let digest = cid.digest();
        let mut holes: Vec<(Cid, u64, u64)> = Vec::new();
        let freed;
        {
            let mut db = lock(&self.db);
            let tx = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if !still_expired(&tx, cid, expired_at)? {
                return Ok(());
            }
            freed = delete_rows(&tx, &[cid.to_bytes()])?;
            if freed > 0 {
                // Complete trees record a hole; a partial tree keeps its own copy.
                for (tree_id, tree_cid, block_size, indices) in trees_containing(&tx, &digest)? {
                    let mut lost = 0;
                    for i in indices {
                        lost += tx.execute(
                            "INSERT OR IGNORE INTO holes (tree_id, idx) VALUES (?1, ?2)",
                            params![tree_id, i as i64],
                        )?;
                        holes.push((tree_cid, block_size, i));
                    }
                    tx.execute(
                        "UPDATE trees SET missing = missing + ?2 WHERE id = ?1",
                        params![tree_id, lost as i64],
                    )?;
                }
            }
            tx.commit()?;
        }
        self.used.fetch_sub(freed, Ordering::SeqCst);
        for (tree, block_size, index) in holes {
            self.punch(&tree, block_size, index);
        }
        Ok(())
    }

    /// Frees the bytes of block `index` of a tree file (best effort; reads then fail
    /// verification and report the block missing).
    fn punch(&self, tree: &Cid, block_size: u64, index: u64) {
        let path = self.tree_path(tree);
        let Ok(file) = File::options().write(true).open(&path) else {
            return;
        };
        if let Err(e) = punch_hole(&file, index * block_size, block_size)
            .or_else(|_| file.write_all_at(&vec![0u8; block_size as usize], index * block_size))
        {
            tracing::warn!(path = %path.display(), index, error = %e, "could not clear block");
        }
    }

    /// Deletes up to `max` expired blocks (expired manifests take their dataset with them).
    /// Returns how many expired blocks were handled.
    pub fn maintenance(&self, max: usize) -> Result<usize> {
        let expired: Vec<Vec<u8>> = {
            let db = lock(&self.db);
            let mut stmt =
                db.prepare("SELECT cid FROM blocks WHERE expiry <= ?1 ORDER BY expiry LIMIT ?2")?;
            let rows = stmt.query_map(params![now_secs(), max as i64], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let now = now_secs();
        for cid in &expired {
            let cid = Cid::from_bytes(cid)?;
            tracing::debug!(%cid, "block expired");
            match cid.kind() {
                CidKind::Manifest => self.delete_dataset(&cid, Some(now))?,
                _ => self.delete_block(&cid, Some(now))?,
            }
        }
        Ok(expired.len())
    }
}

/// Whether a deletion may go ahead: always without `expired_at`; with it, only if the block
/// is still expired at that time.
fn still_expired(
    tx: &rusqlite::Transaction<'_>,
    cid: &Cid,
    expired_at: Option<i64>,
) -> Result<bool> {
    let Some(now) = expired_at else {
        return Ok(true);
    };
    let expiry: Option<i64> = tx
        .query_row(
            "SELECT expiry FROM blocks WHERE cid = ?1",
            [cid.to_bytes()],
            |r| r.get(0),
        )
        .optional()?;
    Ok(expiry.is_some_and(|e| e <= now))
}

/// Deletes block rows regardless of references; returns the bytes freed.
fn delete_rows(tx: &rusqlite::Transaction<'_>, cids: &[Vec<u8>]) -> Result<u64> {
    let mut freed = 0;
    let mut stmt = tx.prepare_cached("DELETE FROM blocks WHERE cid = ?1 RETURNING size")?;
    for cid in cids {
        if let Some(size) = stmt.query_row([cid], |r| r.get::<_, i64>(0)).optional()? {
            freed += size as u64;
        }
    }
    Ok(freed)
}

/// The distinct block digests a tree holds in `blocks`: a complete tree's leaves except its
/// holes. A partial tree's leaves are in no row of `blocks` yet: none.
fn held_digests(tx: &rusqlite::Transaction<'_>, tree_id: i64) -> Result<HashSet<Digest32>> {
    let leaves: Vec<u8> =
        tx.query_row("SELECT leaves FROM trees WHERE id = ?1", [tree_id], |r| {
            r.get(0)
        })?;
    let mut held = HashSet::new();
    if leaves.is_empty() {
        return Ok(held);
    }
    let holes: HashSet<u64> = {
        let mut stmt = tx.prepare_cached("SELECT idx FROM holes WHERE tree_id = ?1")?;
        let rows = stmt.query_map([tree_id], |r| r.get::<_, i64>(0))?;
        rows.map(|r| r.map(|i| i as u64))
            .collect::<rusqlite::Result<_>>()?
    };
    for (i, leaf) in leaves.chunks_exact(32).enumerate() {
        if !holes.contains(&(i as u64)) {
            held.insert(leaf.try_into().unwrap_or([0; 32]));
        }
    }
    Ok(held)
}

/// Gives tree `tree_id` a reference to the block `digest`: a new row locating it at `idx`
/// of the tree, or one more reference to the stored block, which then lives at least until
/// `expiry`. Returns the bytes of a new block (0 for one already stored).
fn add_reference(
    tx: &rusqlite::Transaction<'_>,
    digest: &Digest32,
    block_size: u64,
    expiry: i64,
    tree_id: i64,
    idx: u64,
) -> Result<u64> {
    let cid = Cid::from_digest(CidKind::Block, *digest).to_bytes();
    let new = tx
        .prepare_cached(
            "INSERT OR IGNORE INTO blocks (cid, size, expiry, refs, tree_id, idx)
             VALUES (?1, ?2, ?3, 1, ?4, ?5)",
        )?
        .execute(params![cid, block_size as i64, expiry, tree_id, idx as i64])?;
    if new == 1 {
        return Ok(block_size);
    }
    tx.prepare_cached(
        "UPDATE blocks SET refs = refs + 1, expiry = MAX(expiry, ?2) WHERE cid = ?1",
    )?
    .execute(params![cid, expiry])?;
    Ok(0)
}

/// Bytes a partial tree holds: one block size per received leaf.
fn partial_bytes(tx: &rusqlite::Transaction<'_>, tree_id: i64) -> Result<u64> {
    let bytes: i64 = tx.query_row(
        "SELECT COALESCE(SUM(t.block_size), 0) FROM partial p JOIN trees t ON t.id = p.tree_id
         WHERE p.tree_id = ?1",
        [tree_id],
        |r| r.get(0),
    )?;
    Ok(bytes as u64)
}

/// Releases what a tree being deleted holds; returns the bytes freed. A partial tree's
/// leaves are its own; a complete tree drops one reference from every distinct block it
/// holds ([`drop_references`]).
fn release_tree(tx: &rusqlite::Transaction<'_>, tree_id: i64) -> Result<u64> {
    let partial = partial_bytes(tx, tree_id)?;
    if partial > 0 {
        return Ok(partial);
    }
    drop_references(tx, tree_id, held_digests(tx, tree_id)?)
}

/// Drops tree `tree_id`'s reference from each block of `digests`. Blocks nobody else
/// references are deleted; blocks that lived in this tree's file but are shared move their
/// location to another complete tree that holds them, or go when none does. Returns the
/// bytes freed.
fn drop_references(
    tx: &rusqlite::Transaction<'_>,
    tree_id: i64,
    digests: HashSet<Digest32>,
) -> Result<u64> {
    let mut freed = 0;
    let mut dec = tx.prepare_cached(
        "UPDATE blocks SET refs = refs - 1 WHERE cid = ?1 RETURNING refs, size, tree_id",
    )?;
    let mut del = tx.prepare_cached("DELETE FROM blocks WHERE cid = ?1")?;
    let mut relocate = Vec::new();
    for digest in digests {
        let cid = Cid::from_digest(CidKind::Block, digest).to_bytes();
        let row: Option<(i64, i64, Option<i64>)> = dec
            .query_row([&cid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        match row {
            Some((refs, size, _)) if refs <= 0 => {
                del.execute([&cid])?;
                freed += size as u64;
            }
            Some((_, _, Some(at))) if at == tree_id => relocate.push((cid, digest)),
            _ => {}
        }
    }
    for (cid, digest) in relocate {
        let other = trees_containing(tx, &digest)?
            .into_iter()
            .find(|(id, ..)| *id != tree_id)
            .and_then(|(id, _, _, idx)| idx.first().map(|&i| (id, i)));
        match other {
            Some((id, idx)) => {
                tx.execute(
                    "UPDATE blocks SET tree_id = ?2, idx = ?3 WHERE cid = ?1",
                    params![cid, id, idx as i64],
                )?;
            }
            None => {
                freed += delete_rows(tx, &[cid])?;
            }
        }
    }
    Ok(freed)
}

/// A tree holding a given block: (id, cid, block size, leaf indices).
type TreeHit = (i64, Cid, u64, Vec<u64>);

/// Complete trees that hold `digest` (holes excluded). A full scan, used only on the rare
/// paths that delete shared blocks.
fn trees_containing(tx: &rusqlite::Transaction<'_>, digest: &Digest32) -> Result<Vec<TreeHit>> {
    let mut out = Vec::new();
    let mut stmt = tx
        .prepare_cached("SELECT id, cid, block_size, leaves FROM trees WHERE length(leaves) > 0")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, Vec<u8>>(3)?,
        ))
    })?;
    let mut hole = tx.prepare_cached("SELECT 1 FROM holes WHERE tree_id = ?1 AND idx = ?2")?;
    for row in rows {
        let (id, cid, bs, leaves) = row?;
        let mut idx = Vec::new();
        for (i, l) in leaves.chunks_exact(32).enumerate() {
            if l == digest && !hole.exists(params![id, i as i64])? {
                idx.push(i as u64);
            }
        }
        if !idx.is_empty() {
            out.push((id, Cid::from_bytes(&cid)?, bs as u64, idx));
        }
    }
    Ok(out)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(Error::State(format!(
            "the store was written by a newer version (schema {version}, this build knows \
             {SCHEMA_VERSION})"
        )));
    }
    if version < 1 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V1)?;
        tx.pragma_update(None, "user_version", 1)?;
        tx.commit()?;
    }
    if version < 2 {
        let tx = conn.transaction()?;
        tx.execute_batch(SCHEMA_V2)?;
        // Version 1 only counted lost blocks: find which leaves they were.
        let damaged: Vec<(i64, Vec<u8>)> = {
            let mut stmt = tx.prepare("SELECT id, leaves FROM trees WHERE missing > 0")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (id, leaves) in damaged {
            let mut holes = 0;
            for (i, leaf) in leaves.chunks_exact(32).enumerate() {
                let digest: Digest32 = leaf.try_into().unwrap_or([0; 32]);
                let cid = Cid::from_digest(CidKind::Block, digest).to_bytes();
                let held: bool = tx
                    .prepare_cached("SELECT 1 FROM blocks WHERE cid = ?1")?
                    .exists([cid])?;
                if !held {
                    tx.execute(
                        "INSERT INTO holes (tree_id, idx) VALUES (?1, ?2)",
                        params![id, i as i64],
                    )?;
                    holes += 1;
                }
            }
            tx.execute(
                "UPDATE trees SET missing = ?2 WHERE id = ?1",
                params![id, holes],
            )?;
        }
        tx.pragma_update(None, "user_version", 2)?;
        tx.commit()?;
    }
    if version < 3 {
        let tx = conn.transaction()?;
        // Version 2 counted a partial tree's leaves in `blocks`: drop those references.
        let partial: Vec<i64> = {
            let mut stmt = tx.prepare("SELECT id FROM trees WHERE length(leaves) = 0")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for id in partial {
            let digests: HashSet<Digest32> = {
                let mut stmt =
                    tx.prepare("SELECT DISTINCT digest FROM partial WHERE tree_id = ?1")?;
                let rows = stmt.query_map([id], |r| r.get::<_, Vec<u8>>(0))?;
                rows.filter_map(|d| d.map(|d| d.try_into().ok()).transpose())
                    .collect::<rusqlite::Result<_>>()?
            };
            drop_references(&tx, id, digests)?;
        }
        tx.execute_batch(SCHEMA_V3)?;
        tx.pragma_update(None, "user_version", 3)?;
        tx.commit()?;
    }
    Ok(())
}

/// Opens the file at `path` for reading and writing, creating it if needed, and grows it
/// (sparse) to at least `size` bytes without touching what it holds.
fn open_at_least(path: &Path, size: u64) -> std::io::Result<File> {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if f.metadata()?.len() < size {
        f.set_len(size)?;
    }
    Ok(f)
}

fn unique_suffix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{nanos:x}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Takes the data-dir's lock file, failing when another node (in any process) holds it.
fn lock_dir(dir: &Path) -> Result<File> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a valid open descriptor has no memory effects.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(Error::State(format!(
            "data-dir {} is in use by another node; stop it or choose another data-dir",
            dir.display()
        )));
    }
    Ok(file)
}

fn free_space(path: &Path) -> Result<u64> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains a NUL byte", path.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable memory of the
    // right type; statvfs initialises it when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io(
            format!("checking free space of {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: statvfs returned 0, so `st` is initialised.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a valid open descriptor; the kernel validates the range.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// An upload in progress: cuts the incoming bytes into blocks, hashes and stores them.
/// Dropping it without [`DatasetWriter::finish`] abandons the upload and frees its space.
#[derive(Debug)]
pub struct DatasetWriter {
    store: Arc<Store>,
    io: Option<BlockWriter>,
    path: PathBuf,
    block_size: usize,
    buf: Vec<u8>,
    leaves: Vec<Digest32>,
    seen: HashSet<Digest32>,
    reserved: u64,
    failed: bool,
    filename: Option<String>,
    mimetype: Option<String>,
}

impl DatasetWriter {
    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.leaves.len() as u64 * self.block_size as u64 + self.buf.len() as u64
    }

    /// Whether no byte was accepted yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block size.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Appends bytes; returns the number of blocks stored by this call. After an error the
    /// upload cannot go on: drop it.
    pub fn write(&mut self, mut data: &[u8]) -> Result<usize> {
        if self.failed {
            return Err(Error::State(
                "this upload failed earlier and was abandoned".into(),
            ));
        }
        let mut stored = 0;
        while !data.is_empty() {
            let r = if self.buf.is_empty() && data.len() >= self.block_size {
                let (block, rest) = data.split_at(self.block_size);
                data = rest;
                self.store_block(block)
            } else {
                let take = (self.block_size - self.buf.len()).min(data.len());
                self.buf.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.buf.len() < self.block_size {
                    continue;
                }
                let block = std::mem::take(&mut self.buf);
                let r = self.store_block(&block);
                self.buf = block;
                self.buf.clear();
                r
            };
            if let Err(e) = r {
                self.failed = true;
                return Err(e);
            }
            stored += 1;
        }
        Ok(stored)
    }

    /// A buffer with room for one block, recycled from a block already written when there
    /// is one (its length and contents are then those of that block). Fill it with exactly
    /// one block and pass it to [`DatasetWriter::write_block`] to store it without copying.
    pub fn buffer(&mut self) -> Vec<u8> {
        self.io
            .as_ref()
            .and_then(BlockWriter::recycled)
            .unwrap_or_else(|| Vec::with_capacity(self.block_size))
    }

    /// Stores one whole block, taking its buffer (no copy). Only between whole blocks:
    /// after a [`DatasetWriter::write`] that left a partial block pending, this is refused.
    /// A block shorter than the block size must be the last: pass it to
    /// [`DatasetWriter::write`] and then call [`DatasetWriter::finish`].
    pub fn write_block(&mut self, block: Vec<u8>) -> Result<()> {
        if self.failed {
            return Err(Error::State(
                "this upload failed earlier and was abandoned".into(),
            ));
        }
        if !self.buf.is_empty() || block.len() != self.block_size {
            return Err(Error::Invalid(format!(
                "write_block takes one whole block of {} bytes at a block boundary",
                self.block_size
            )));
        }
        let r = self.store_owned(block);
        self.failed = r.is_err();
        r
    }

    fn store_block(&mut self, block: &[u8]) -> Result<()> {
        let mut owned = self.buffer();
        owned.clear();
        owned.extend_from_slice(block);
        self.store_owned(owned)
    }

    fn store_owned(&mut self, block: Vec<u8>) -> Result<()> {
        let digest: Digest32 = Sha256::digest(&block).into();
        if self.seen.insert(digest) {
            let cid = Cid::from_digest(CidKind::Block, digest);
            if !self.store.has_block(&cid)? {
                self.store.reserve(self.block_size as u64)?;
                self.reserved += self.block_size as u64;
            }
        }
        let io = self
            .io
            .as_mut()
            .ok_or(Error::State("upload already finished".into()))?;
        let offset = self.leaves.len() as u64 * self.block_size as u64;
        io.write(offset, block)?;
        self.leaves.push(digest);
        Ok(())
    }

    /// Stores the last (zero-padded) block, builds the tree and manifest and commits the
    /// dataset. Returns the manifest CID and the manifest.
    pub fn finish(mut self) -> Result<(Cid, Manifest)> {
        if self.failed {
            return Err(Error::State(
                "this upload failed earlier and was abandoned".into(),
            ));
        }
        let size = self.len();
        let partial = self.buf.len();
        if partial > 0 {
            let mut block = std::mem::take(&mut self.buf);
            block.resize(self.block_size, 0);
            self.store_block(&block)?;
        }
        if self.leaves.is_empty() {
            return Err(Error::Invalid("cannot upload an empty dataset".into()));
        }
        let tree = CodexTree::new(std::mem::take(&mut self.leaves))?;
        let manifest = Manifest {
            tree_cid: tree.cid(),
            block_size: self.block_size as u64,
            dataset_size: size,
            filename: self.filename.take(),
            mimetype: self.mimetype.take(),
        };
        let mbytes = manifest.encode().len() as u64;
        self.store.reserve(mbytes)?;
        self.reserved += mbytes;
        if let Some(io) = self.io.take() {
            io.finish()?;
        }
        let cid = self.store.commit(
            &self.path,
            tree,
            self.block_size as u64,
            &manifest,
            self.reserved,
        )?;
        Ok((cid, manifest))
    }
}

impl Drop for DatasetWriter {
    fn drop(&mut self) {
        if let Some(io) = self.io.take() {
            let _ = io.finish();
        }
        self.store.release(self.reserved);
        // After a successful finish the files were renamed away and this fails harmlessly.
        let _ = fs::remove_file(&self.path);
        let _ = fs::remove_file(self.path.with_extension("sum"));
    }
}

/// Writes an upload's blocks, and their sums, on a thread of its own, so hashing (in the
/// caller) and writing proceed in parallel. At most `WRITE_QUEUE` blocks wait in between.
#[derive(Debug)]
struct BlockWriter {
    tx: Option<std::sync::mpsc::SyncSender<(u64, Vec<u8>)>>,
    /// Buffers of written blocks, handed back for reuse.
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

/// Blocks queued between hashing and writing.
const WRITE_QUEUE: usize = 16;

impl BlockWriter {
    fn spawn(file: File, sums_path: &Path) -> Result<Self> {
        let mut sums = SumWriter::create(sums_path);
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Vec<u8>)>(WRITE_QUEUE);
        let (spare_tx, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(WRITE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("codex-upload-io".into())
            .spawn(move || {
                // Blocks arrive in order: write what is queued in one vectored call.
                let mut batch: Vec<Vec<u8>> = Vec::with_capacity(WRITE_QUEUE);
                while let Ok((offset, first)) = rx.recv() {
                    batch.push(first);
                    while batch.len() < WRITE_QUEUE {
                        match rx.try_recv() {
                            Ok((_, block)) => batch.push(block),
                            Err(_) => break,
                        }
                    }
                    write_all_vectored_at(&file, &batch, offset)?;
                    for block in batch.drain(..) {
                        sums.push(&block);
                        // When the hashing side has enough spares, the rest are freed.
                        let _ = spare_tx.try_send(block);
                    }
                }
                if let Err(e) = sums.finish() {
                    tracing::debug!(error = %e, "an upload's block sums are incomplete");
                }
                Ok(())
            })
            .map_err(io_err("starting an upload writer thread"))?;
        Ok(Self {
            tx: Some(tx),
            spare,
            thread: Some(thread),
        })
    }

    /// A buffer of a block already written, if one is waiting.
    fn recycled(&self) -> Option<Vec<u8>> {
        self.spare.try_recv().ok()
    }

    fn write(&mut self, offset: u64, block: Vec<u8>) -> Result<()> {
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send((offset, block)).is_ok());
        if sent {
            Ok(())
        } else {
            // The thread stopped: it failed. Its error says why.
            self.join()
                .and(Err(Error::State("the upload writer stopped".into())))
        }
    }

    fn join(&mut self) -> Result<()> {
        self.tx.take();
        match self.thread.take().map(std::thread::JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(Error::io("writing block", e)),
            Some(Err(_)) => Err(Error::State("the upload writer panicked".into())),
        }
    }

    /// Waits until every queued block is written.
    fn finish(mut self) -> Result<()> {
        self.join()
    }
}

/// Writes `blocks` back to back at `offset` with `pwritev`, retrying short writes.
fn write_all_vectored_at(file: &File, blocks: &[Vec<u8>], mut offset: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut bufs: Vec<&[u8]> = blocks.iter().map(Vec::as_slice).collect();
    while !bufs.is_empty() {
        let iov: Vec<libc::iovec> = bufs
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: every iovec points into a live slice of `blocks` for the length given.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        let mut written = n as usize;
        while let Some(first) = bufs.first_mut() {
            if written >= first.len() {
                written -= first.len();
                bufs.remove(0);
            } else {
                *first = &first[written..];
                break;
            }
        }
    }
    Ok(())
}

/// Sequential reader of a stored dataset, verifying every block.
#[derive(Debug)]
pub struct DatasetReader {
    store: Arc<Store>,
    entry: Arc<TreeEntry>,
    tree_cid: Cid,
    remaining: u64,
    next: u64,
    manifest: Manifest,
}

impl DatasetReader {
    /// The dataset's manifest (read and verified when the reader was opened).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Bytes not yet returned.
    pub fn remaining(&self) -> u64 {
        self.remaining
    }

    /// The index of the next block.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next block's bytes (truncated at the dataset's end), or `None` at the end.
    pub fn next_block(&mut self) -> Result<Option<Bytes>> {
        if self.remaining == 0 {
            return Ok(None);
        }
        let mut block = match self.store.read_leaf(&self.tree_cid, &self.entry, self.next) {
            // The tree was partial when opened and has completed since: its leaves moved.
            Err(Error::NotFound(_)) if self.entry.tree.is_none() => {
                self.entry = self.store.open_tree(&self.tree_cid)?;
                self.store
                    .read_leaf(&self.tree_cid, &self.entry, self.next)?
            }
            r => r?,
        };
        self.next += 1;
        let n = (block.len() as u64).min(self.remaining);
        block.truncate(n as usize);
        self.remaining -= n;
        Ok(Some(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, quota: u64) -> Arc<Store> {
        let cfg = StoreConfig {
            data_dir: dir.to_path_buf(),
            quota,
            ttl: None,
        };
        Arc::new(Store::open(&cfg).unwrap())
    }

    fn upload(store: &Arc<Store>, data: &[u8], bs: usize) -> Result<(Cid, Manifest)> {
        let mut w = store.writer(bs, None, None)?;
        w.write(data)?;
        w.finish()
    }

    fn read_all(store: &Arc<Store>, cid: &Cid) -> Result<Vec<u8>> {
        let mut r = store.reader(cid)?;
        let mut out = Vec::new();
        while let Some(b) = r.next_block()? {
            out.extend_from_slice(&b);
        }
        Ok(out)
    }

    /// The names of the files in the store's `blocks` directory.
    fn block_files(dir: &Path) -> Vec<String> {
        fs::read_dir(dir.join("blocks"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn reproduces_reference_cids() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let (cid, m) = upload(&store, b"some file contents", 65536).unwrap();
        assert_eq!(
            m.tree_cid.to_string(),
            "zDzSvJTezk7bJNQqFq8k1iHXY84psNuUfZVusA5bBQQUSuyzDSVL"
        );
        assert_eq!(
            cid.to_string(),
            "zDvZRwzm1ePSzKSXt57D5YxHwcSDmsCyYN65wW4HT7fuX9HrzFXy"
        );
        let (_, m) = upload(&store, &vec![b'a'; 131082], 65536).unwrap();
        assert_eq!(
            m.tree_cid.to_string(),
            "zDzSvJTfF5HWJpRa3BxWkAj7ecnNwZ7GSbsYj8SmvS4WWv3F6aQQ"
        );
    }

    #[test]
    fn chunk_boundaries_do_not_change_the_cid() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let (whole, _) = upload(&store, &data, 1024).unwrap();
        let mut w = store.writer(1024, None, None).unwrap();
        for piece in data.chunks(333) {
            w.write(piece).unwrap();
        }
        let (pieces, m) = w.finish().unwrap();
        assert_eq!(whole, pieces);
        assert_eq!(m.dataset_size, 10_000);
        assert_eq!(read_all(&store, &whole).unwrap(), data);
    }

    #[test]
    fn serves_leaves_with_proofs_to_the_tree_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 239) as u8).collect();
        let (_, m) = upload(&store, &data, 1024).unwrap();
        for i in 0..m.blocks() {
            let (block, proof) = store.leaf(&m.tree_cid, i).unwrap();
            let leaf: Digest32 = Sha256::digest(&block).into();
            assert!(proof.verify(&leaf, &m.tree_cid.digest()), "block {i}");
            assert_eq!(Proof::decode(&proof.encode()).unwrap(), proof);
        }
        assert!(store.leaf(&m.tree_cid, m.blocks()).is_err());
        let missing = Cid::hash_of(CidKind::Tree, b"nothing");
        assert!(matches!(store.leaf(&missing, 0), Err(Error::NotFound(_))));
    }

    #[test]
    fn quota_counts_distinct_blocks_and_manifests() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let (cid, m) = upload(&store, &[7u8; 48], 65536).unwrap();
        let s = store.space().unwrap();
        assert_eq!(s.quota_used_bytes, 65536 + m.encode().len() as u64);
        assert_eq!(s.total_blocks, 2);
        // Two identical blocks are stored once.
        let (cid2, m2) = upload(&store, &[1u8; 2048], 1024).unwrap();
        let s2 = store.space().unwrap();
        assert_eq!(s2.total_blocks, 4);
        assert_eq!(
            s2.quota_used_bytes,
            s.quota_used_bytes + 1024 + m2.encode().len() as u64
        );
        store.delete(&cid2).unwrap();
        assert_eq!(store.space().unwrap(), s);
        store.delete(&cid).unwrap();
        assert_eq!(store.space().unwrap().quota_used_bytes, 0);
        assert_eq!(store.space().unwrap().total_blocks, 0);
    }

    #[test]
    fn quota_exhaustion_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 5000);
        let (small, _) = upload(&store, &[1u8; 1000], 1024).unwrap();
        let before = store.space().unwrap();
        let big: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let err = upload(&store, &big, 1024).unwrap_err();
        assert!(matches!(err, Error::Quota { .. }), "{err}");
        assert_eq!(store.space().unwrap(), before);
        assert_eq!(read_all(&store, &small).unwrap(), vec![1u8; 1000]);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn blocks_deleted_during_an_upload_still_count_against_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 4000);
        let a: Vec<u8> = (0..3072u32).map(|i| (i % 251) as u8).collect();
        let (ca, _) = upload(&store, &a, 1024).unwrap();
        // This upload finds a's blocks stored, so it reserves nothing for them...
        let mut w = store.writer(1024, None, None).unwrap();
        w.write(&a).unwrap();
        // ...but they are deleted, and the space taken by another dataset, before it ends.
        store.delete(&ca).unwrap();
        let b: Vec<u8> = (0..3072u32).map(|i| (i % 247) as u8 ^ 0x55).collect();
        let (cb, _) = upload(&store, &b, 1024).unwrap();
        let before = store.space().unwrap();
        let err = w.finish().unwrap_err();
        assert!(matches!(err, Error::Quota { .. }), "{err}");
        assert_eq!(store.space().unwrap(), before);
        assert!(!store.exists(&ca).unwrap());
        // Only b's data and sums are left: the failed commit took its files away.
        let tree_b = store.manifest(&cb).unwrap().tree_cid;
        let mut files = block_files(dir.path());
        files.sort();
        assert_eq!(files, [format!("{tree_b}.dat"), format!("{tree_b}.sum")]);
        assert_eq!(read_all(&store, &cb).unwrap(), b);
    }

    #[test]
    fn shared_blocks_survive_deleting_one_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let mut a = vec![5u8; 1024];
        a.extend(vec![6u8; 1024]);
        let mut b = vec![6u8; 1024];
        b.extend(vec![9u8; 1024]);
        let (ca, _) = upload(&store, &a, 1024).unwrap();
        let (cb, _) = upload(&store, &b, 1024).unwrap();
        store.delete(&ca).unwrap();
        assert!(!store.exists(&ca).unwrap());
        assert_eq!(read_all(&store, &cb).unwrap(), b);
        let shared = Cid::hash_of(CidKind::Block, &[6u8; 1024]);
        assert_eq!(store.block(&shared).unwrap().as_ref(), &[6u8; 1024]);
    }

    #[test]
    fn corrupt_blocks_are_detected_not_returned() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let data = vec![3u8; 4096];
        let (cid, m) = upload(&store, &data, 1024).unwrap();
        let path = store.tree_path(&m.tree_cid);
        let f = File::options().write(true).open(path).unwrap();
        f.write_all_at(b"evil", 2048 + 10).unwrap();
        let err = read_all(&store, &cid).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    }

    #[test]
    fn deleting_a_block_makes_the_dataset_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let (cid, _) = upload(&store, &data, 1024).unwrap();
        let block = Cid::hash_of(CidKind::Block, &data[1024..2048]);
        assert!(store.exists(&block).unwrap());
        store.delete(&block).unwrap();
        assert!(!store.exists(&block).unwrap());
        assert!(!store.exists(&cid).unwrap());
        assert!(matches!(
            read_all(&store, &cid).unwrap_err(),
            Error::NotFound(_)
        ));
    }

    #[test]
    fn data_survives_reopen_and_interrupted_uploads_are_cleaned() {
        let dir = tempfile::tempdir().unwrap();
        let (cid, m) = {
            let store = open(dir.path(), 1 << 30);
            upload(&store, b"persistent", 1024).unwrap()
        };
        // What a process killed mid-upload leaves: a partial file in tmp/.
        fs::write(
            dir.path().join("tmp").join("upload-1-2-3.part"),
            [1u8; 5000],
        )
        .unwrap();
        fs::write(dir.path().join("blocks").join("stray.dat"), b"x").unwrap();
        let store = open(dir.path(), 1 << 30);
        assert_eq!(read_all(&store, &cid).unwrap(), b"persistent");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        // The stray file went; the tree's data, sums and (built at the first read) layers stay.
        let mut files = block_files(dir.path());
        files.sort();
        let tree = m.tree_cid;
        assert_eq!(
            files,
            [
                format!("{tree}.dat"),
                format!("{tree}.sum"),
                format!("{tree}.tree")
            ]
        );
        assert_eq!(store.list().unwrap().len(), 1);
        // A damaged layer file is noticed and built again.
        drop(store);
        fs::write(
            dir.path().join("blocks").join(format!("{tree}.tree")),
            [0u8; 64],
        )
        .unwrap();
        let store = open(dir.path(), 1 << 30);
        assert_eq!(read_all(&store, &cid).unwrap(), b"persistent");
        let (data, proof) = store.leaf(&tree, 0).unwrap();
        assert!(proof.verify(&Sha256::digest(&data).into(), &tree.digest()));
    }

    #[test]
    fn expired_datasets_are_removed_by_maintenance() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            quota: 1 << 30,
            ttl: Some(Duration::ZERO),
        };
        let store = Arc::new(Store::open(&cfg).unwrap());
        let (cid, _) = upload(&store, &[4u8; 3000], 1024).unwrap();
        assert!(store.exists(&cid).unwrap());
        let n = store.maintenance(1000).unwrap();
        assert!(n >= 1);
        assert!(!store.exists(&cid).unwrap());
        assert_eq!(store.space().unwrap().total_blocks, 0);
        assert_eq!(store.space().unwrap().quota_used_bytes, 0);
    }

    #[test]
    fn uploading_existing_content_extends_its_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            quota: 1 << 30,
            ttl: Some(Duration::from_secs(3600)),
        };
        let store = Arc::new(Store::open(&cfg).unwrap());
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 241) as u8).collect();
        let upload_as = |name: &str| {
            let mut w = store.writer(1024, Some(name.into()), None).unwrap();
            w.write(&data).unwrap();
            w.finish().unwrap().0
        };
        let a = upload_as("a");
        // Time passes: everything stored so far is now expired.
        lock(&store.db)
            .execute("UPDATE blocks SET expiry = 1", [])
            .unwrap();
        let b = upload_as("b");
        assert!(store.maintenance(1000).unwrap() >= 1);
        assert!(!store.exists(&a).unwrap(), "the expired manifest goes");
        assert!(
            store.exists(&b).unwrap(),
            "the blocks b shares were refreshed"
        );
        assert_eq!(read_all(&store, &b).unwrap(), data);
    }

    #[test]
    fn uploading_again_repairs_a_dataset_that_lost_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), 1 << 30);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 3) as u8).collect();
        let (cid, _) = upload(&store, &data, 1024).unwrap();
        let used = store.space().unwrap().quota_used_bytes;
        store
            .delete(&Cid::hash_of(CidKind::Block, &data[1024..2048]))
            .unwrap();
        assert!(!store.exists(&cid).unwrap());
        let (again, _) = upload(&store, &data, 1024).unwrap();
        assert_eq!(again, cid);
        assert!(store.exists(&cid).unwrap());
        assert_eq!(read_all(&store, &cid).unwrap(), data);
        assert_eq!(store.space().unwrap().quota_used_bytes, used);
    }

    #[test]
    fn a_data_dir_serves_one_store_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), 1 << 20);
        let cfg = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            quota: 1 << 20,
            ttl: None,
        };
        let err = Store::open(&cfg).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        Store::open(&cfg).unwrap();
    }

    #[test]
    fn quota_larger_than_the_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = StoreConfig {
            data_dir: dir.path().to_path_buf(),
            quota: u64::MAX,
            ttl: None,
        };
        let err = Store::open(&cfg).unwrap_err();
        assert!(matches!(err, Error::DiskSpace { .. }), "{err}");
        assert!(err.to_string().contains("storage-quota"));
    }
}

#[cfg(test)]
mod fill_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn open(dir: &Path) -> Arc<Store> {
        let cfg = StoreConfig {
            data_dir: dir.to_path_buf(),
            quota: 64 << 20,
            ttl: None,
        };
        Arc::new(Store::open(&cfg).unwrap())
    }

    fn data(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
            .collect()
    }

    fn upload(store: &Arc<Store>, bytes: &[u8], bs: usize) -> (Cid, Manifest) {
        let mut w = store.writer(bs, None, None).unwrap();
        w.write(bytes).unwrap();
        w.finish().unwrap()
    }

    fn read_all(store: &Arc<Store>, cid: &Cid) -> Vec<u8> {
        let mut r = store.reader(cid).unwrap();
        let mut out = Vec::new();
        while let Some(b) = r.next_block().unwrap() {
            out.extend_from_slice(&b);
        }
        out
    }

    /// Copies block `i` of `tree` from `src` into `fill`, as the block exchange would.
    fn copy(src: &Store, fill: &mut TreeFill, i: u64) -> Result<()> {
        let (block, proof) = src.leaf(fill.tree_cid(), i)?;
        let digest: Digest32 = Sha256::digest(&block).into();
        fill.put(i, &block, digest, &proof)
    }

    #[test]
    fn a_dataset_filled_in_any_order_is_served_as_it_arrives() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (open(a.path()), open(b.path()));
        let bytes = data(10 * 4096 + 123, 1);
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        assert_eq!((fill.leaves(), fill.missing()), (11, 11));
        // Listed at once, complete only at the end.
        assert_eq!(sb.list().unwrap().len(), 1);
        for i in [7, 0, 10, 3] {
            copy(&sa, &mut fill, i).unwrap();
        }
        fill.flush().unwrap();
        assert!(!sb.exists(&mcid).unwrap());
        // What arrived is served at once, with a proof to the root.
        let (block, proof) = sb.leaf(&manifest.tree_cid, 10).unwrap();
        assert!(proof.verify(&Sha256::digest(&block).into(), &manifest.tree_cid.digest()));
        assert!(matches!(
            sb.leaf(&manifest.tree_cid, 5),
            Err(Error::NotFound(_))
        ));
        for i in [9, 8, 1, 2, 6, 5, 4] {
            copy(&sa, &mut fill, i).unwrap();
        }
        fill.flush().unwrap();
        assert!(fill.is_complete());
        drop(fill);
        assert!(sb.exists(&mcid).unwrap());
        assert_eq!(read_all(&sb, &mcid), bytes);
        assert_eq!(sb.space().unwrap(), sa.space().unwrap());
        drop(sb);
        let sb = open(b.path());
        assert_eq!(read_all(&sb, &mcid), bytes);
        assert_eq!(sb.space().unwrap().quota_reserved_bytes, 0);
    }

    #[test]
    fn block_sums_are_recorded_as_blocks_are_stored_and_damage_is_still_caught() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (open(a.path()), open(b.path()));
        let bytes = data(6 * 4096, 4);
        let block = |i: usize| &bytes[i * 4096..(i + 1) * 4096];
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        let tree = manifest.tree_cid;
        let expected: Vec<u8> = (0..6)
            .flat_map(|i| sums::sum(block(i)).unwrap().to_le_bytes())
            .collect();
        // An upload writes the sums of its blocks, in order.
        assert_eq!(fs::read(sa.sums_path(&tree)).unwrap(), expected);
        // A fill records the sum of each block it stores, and only of those.
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        for i in [4, 1] {
            copy(&sa, &mut fill, i).unwrap();
        }
        let got = fs::read(sb.sums_path(&tree)).unwrap();
        for i in 0..6 {
            let want = if i == 1 || i == 4 {
                &expected[i * 4..i * 4 + 4]
            } else {
                &[0u8; 4][..]
            };
            assert_eq!(&got[i * 4..i * 4 + 4], want, "sum of block {i}");
        }
        for i in [0, 2, 3, 5] {
            copy(&sa, &mut fill, i).unwrap();
        }
        fill.flush().unwrap();
        drop(fill);
        assert_eq!(fs::read(sb.sums_path(&tree)).unwrap(), expected);
        assert_eq!(read_all(&sb, &mcid), bytes);

        // Rot in block 3 is caught whether its sum file is intact, garbage or gone; the
        // other blocks read right in every case.
        let (dat, sum_file) = (sb.tree_path(&tree), sb.sums_path(&tree));
        drop(sb);
        let f = File::options().write(true).open(&dat).unwrap();
        f.write_all_at(b"rot", 3 * 4096 + 7).unwrap();
        for sums in [Some(expected.clone()), Some(vec![0xa5; 24]), None] {
            match &sums {
                Some(s) => fs::write(&sum_file, s).unwrap(),
                None => fs::remove_file(&sum_file).unwrap(),
            }
            let sb = open(b.path());
            let err = sb.leaf(&tree, 3).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
            for i in [0, 2, 5] {
                assert_eq!(sb.leaf(&tree, i as u64).unwrap().0, block(i));
            }
            // Read into a buffer (as into a frame), a rotten block leaves it as it was.
            let mut out = b"head".to_vec();
            let rotten = sb.leaf_ref(&tree, 3).unwrap();
            assert_eq!(rotten.size(), 4096);
            let err = sb.read_leaf_into(&rotten, &mut out).unwrap_err();
            assert!(matches!(err, Error::Corrupt { .. }), "{err}");
            assert_eq!(out, b"head");
            sb.read_leaf_into(&sb.leaf_ref(&tree, 2).unwrap(), &mut out)
                .unwrap();
            assert_eq!(&out[..4], b"head");
            assert_eq!(&out[4..], block(2));
        }
    }

    #[test]
    fn wrong_blocks_and_proofs_are_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (open(a.path()), open(b.path()));
        let (mcid, manifest) = upload(&sa, &data(4 * 4096, 2), 4096);
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        let (block, proof) = sa.leaf(&manifest.tree_cid, 1).unwrap();
        let digest: Digest32 = Sha256::digest(&block).into();
        // Right block, wrong place.
        assert!(matches!(
            fill.put(2, &block, digest, &proof),
            Err(Error::Corrupt { .. })
        ));
        // Tampered data (its own digest, so the CID check upstream would pass).
        let mut bad = block.to_vec();
        bad[0] ^= 1;
        let bad_digest: Digest32 = Sha256::digest(&bad).into();
        assert!(matches!(
            fill.put(1, &bad, bad_digest, &proof),
            Err(Error::Corrupt { .. })
        ));
        assert!(fill.put(9, &block, digest, &proof).is_err());
        assert!(fill.put(1, &block[..100], digest, &proof).is_err());
        assert_eq!(fill.missing(), 4);
        fill.put(1, &block, digest, &proof).unwrap();
        assert!(fill.has(1));
        // A manifest whose CID is not the one claimed.
        let other = Cid::hash_of(CidKind::Manifest, b"x");
        assert!(matches!(sb.fill(&other, &manifest), Err(Error::Invalid(_))));
    }

    #[test]
    fn an_interrupted_fill_resumes_and_a_partial_dataset_deletes_cleanly() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = open(a.path());
        let bytes = data(6 * 4096, 3);
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        {
            let sb = open(b.path());
            let mut fill = sb.fill(&mcid, &manifest).unwrap();
            for i in 0..3 {
                copy(&sa, &mut fill, i).unwrap();
            }
            // Dropped: what arrived is committed.
        }
        let sb = open(b.path());
        let fill = sb.fill(&mcid, &manifest).unwrap();
        assert_eq!(fill.missing(), 3);
        assert!(fill.has(2) && !fill.has(3));
        assert_eq!(sb.space().unwrap().quota_reserved_bytes, 3 * 4096);
        drop(fill);
        assert_eq!(sb.space().unwrap().quota_reserved_bytes, 0);
        sb.delete(&mcid).unwrap();
        let space = sb.space().unwrap();
        assert_eq!((space.quota_used_bytes, space.total_blocks), (0, 0));
        assert!(sb.list().unwrap().is_empty());
        assert_eq!(fs::read_dir(b.path().join("blocks")).unwrap().count(), 0);
    }

    #[test]
    fn a_second_fill_of_a_tree_waits_for_the_first_to_end() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = open(a.path());
        let bytes = data(4 * 4096, 5);
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        let sb = open(b.path());
        let mut first = sb.fill(&mcid, &manifest).unwrap();
        copy(&sa, &mut first, 0).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let second = {
            let sb = Arc::clone(&sb);
            let manifest = manifest.clone();
            std::thread::spawn(move || {
                let fill = sb.fill(&mcid, &manifest).unwrap();
                tx.send(fill.missing()).unwrap();
            })
        };
        // Still waiting while the first fill is alive...
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        copy(&sa, &mut first, 1).unwrap();
        drop(first);
        // ...and it then sees everything the first one received.
        assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 2);
        second.join().unwrap();
    }

    #[test]
    fn a_shared_block_lost_and_regained_keeps_its_references() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let x = data(4096, 7);
        let y = data(4096, 8);
        let z = data(4096, 9);
        let t1 = [x.clone(), y].concat();
        let t2 = [x.clone(), z].concat();
        let (c1, _) = upload(&store, &t1, 4096);
        let xcid = Cid::hash_of(CidKind::Block, &x);
        store.delete(&xcid).unwrap();
        assert!(!store.exists(&c1).unwrap());
        let (c2, _) = upload(&store, &t2, 4096);
        // Re-uploading t1 repairs it: x now has two holders.
        upload(&store, &t1, 4096);
        assert!(store.exists(&c1).unwrap());
        store.delete(&c2).unwrap();
        assert!(store.exists(&xcid).unwrap());
        assert_eq!(read_all(&store, &c1), t1);
        store.delete(&c1).unwrap();
        let space = store.space().unwrap();
        assert_eq!((space.quota_used_bytes, space.total_blocks), (0, 0));
    }

    #[test]
    fn a_partial_tree_keeps_its_blocks_to_itself_until_complete() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (open(a.path()), open(b.path()));
        let (x, y) = (data(4096, 10), data(4096, 11));
        // x twice in the dataset, and in a dataset b already holds.
        let bytes = [x.clone(), y.clone(), x.clone()].concat();
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        let (other, _) = upload(&sb, &[x.clone(), data(4096, 12)].concat(), 4096);
        let before = sb.space().unwrap();
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        copy(&sa, &mut fill, 0).unwrap();
        copy(&sa, &mut fill, 1).unwrap();
        fill.flush().unwrap();
        // Served by tree address, counted as used, not yet indexed by CID.
        assert!(sb.leaf(&manifest.tree_cid, 1).is_ok());
        let ycid = Cid::hash_of(CidKind::Block, &y);
        assert!(!sb.exists_block(&ycid).unwrap());
        let space = sb.space().unwrap();
        let mlen = manifest.encode().len() as u64;
        assert_eq!(
            space.quota_used_bytes,
            before.quota_used_bytes + mlen + 2 * 4096
        );
        // Deleting x from the complete dataset leaves the download's copy alone.
        let xcid = Cid::hash_of(CidKind::Block, &x);
        sb.delete(&xcid).unwrap();
        assert!(!sb.exists(&other).unwrap());
        copy(&sa, &mut fill, 2).unwrap();
        drop(fill);
        assert!(sb.exists(&mcid).unwrap() && sb.exists_block(&ycid).unwrap());
        assert_eq!(read_all(&sb, &mcid), bytes);
        // x (stored again) and y once each, beside the other dataset's remaining block.
        let space = sb.space().unwrap();
        assert_eq!(space.total_blocks, 5);
        assert_eq!(
            space.quota_used_bytes,
            2 * 4096 + mlen + before.quota_used_bytes - 4096
        );
        sb.delete(&other).unwrap();
        assert_eq!(read_all(&sb, &mcid), bytes);
        sb.delete(&mcid).unwrap();
        let space = sb.space().unwrap();
        assert_eq!((space.quota_used_bytes, space.total_blocks), (0, 0));
    }

    #[test]
    fn a_version_2_store_with_a_partial_tree_migrates() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let sa = open(a.path());
        let x = data(4096, 13);
        let bytes = [x.clone(), data(4096, 14), data(4096, 15)].concat();
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        let sb = open(b.path());
        let (other, _) = upload(&sb, &[x.clone(), data(4096, 16)].concat(), 4096);
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        copy(&sa, &mut fill, 0).unwrap();
        copy(&sa, &mut fill, 1).unwrap();
        drop(fill);
        let space = sb.space().unwrap();
        drop(sb);
        // What version 2 kept: the partial leaves in `blocks`, counted once per tree.
        {
            let conn = Connection::open(b.path().join("repo.sqlite3")).unwrap();
            let rows: Vec<(i64, i64, Vec<u8>)> = conn
                .prepare("SELECT tree_id, idx, digest FROM partial")
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            for (tree, idx, digest) in rows {
                let cid = Cid::from_digest(CidKind::Block, digest.try_into().unwrap()).to_bytes();
                let new = conn
                    .execute(
                        "INSERT OR IGNORE INTO blocks (cid, size, expiry, refs, tree_id, idx)
                         VALUES (?1, 4096, ?2, 1, ?3, ?4)",
                        params![cid, NEVER, tree, idx],
                    )
                    .unwrap();
                if new == 0 {
                    conn.execute("UPDATE blocks SET refs = refs + 1 WHERE cid = ?1", [cid])
                        .unwrap();
                }
            }
            conn.execute_batch(
                "CREATE INDEX partial_by_digest ON partial(digest); PRAGMA user_version = 2;",
            )
            .unwrap();
        }
        let sb = open(b.path());
        assert_eq!(sb.space().unwrap(), space);
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        copy(&sa, &mut fill, 2).unwrap();
        drop(fill);
        assert_eq!(read_all(&sb, &mcid), bytes);
        sb.delete(&other).unwrap();
        assert_eq!(read_all(&sb, &mcid), bytes);
        sb.delete(&mcid).unwrap();
        let space = sb.space().unwrap();
        assert_eq!((space.quota_used_bytes, space.total_blocks), (0, 0));
    }

    #[test]
    fn a_fill_shares_blocks_with_stored_datasets() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (sa, sb) = (open(a.path()), open(b.path()));
        let x = data(4096, 5);
        let bytes = [x.clone(), data(4096, 6)].concat();
        let (mcid, manifest) = upload(&sa, &bytes, 4096);
        // b already holds x through another dataset.
        let (other, _) = upload(&sb, &[x.clone(), data(4096, 4)].concat(), 4096);
        let mut fill = sb.fill(&mcid, &manifest).unwrap();
        copy(&sa, &mut fill, 0).unwrap();
        copy(&sa, &mut fill, 1).unwrap();
        drop(fill);
        assert!(sb.exists(&mcid).unwrap());
        sb.delete(&other).unwrap();
        assert_eq!(read_all(&sb, &mcid), bytes);
        sb.delete(&mcid).unwrap();
        let space = sb.space().unwrap();
        assert_eq!((space.quota_used_bytes, space.total_blocks), (0, 0));
    }
}
