//! The layers of a complete tree in a file beside its data: serving a block of a dataset of
//! any size reads a few dozen digests from it instead of holding the whole tree in memory.
//!
//! `blocks/<treeCid>.tree` holds every layer of the CodexTree, leaves first and root last,
//! 32 bytes per node. It is derived data: built from the tree's `leaves` blob the first time
//! the complete tree is read, checked against the tree CID when opened, and built again
//! when it is missing or damaged. Every proof read from it is checked before it is used.
//!
//! The top layers, at most [`TOP_NODES`] nodes, are the file's tail: an open tree keeps
//! them in memory, so a proof costs one read for the leaf and its sibling and one per
//! layer below the top (4 at 1 GiB of 64 KiB blocks, instead of 15). A tree of up to
//! 1024 leaves is read whole.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::cid::Digest32;
use crate::error::{Error, Result};
use crate::merkle::{layer_sizes, next_layer, Proof};

/// Digests read or written at a time while building (an even number).
const RUN: usize = 2048;

/// The most nodes of the top layers an open tree keeps in memory (64 KiB).
const TOP_NODES: u64 = 2048;

/// An open tree file.
#[derive(Debug)]
pub(crate) struct TreeFile {
    file: File,
    /// Nodes per layer, leaves first.
    sizes: Vec<u64>,
    /// Where each layer starts, in nodes.
    starts: Vec<u64>,
    /// The first layer held in `top`.
    top_from: usize,
    /// Layers `top_from..` (the file's tail), as read when the file was opened.
    top: Vec<Digest32>,
    root: Digest32,
}

fn starts(sizes: &[u64]) -> Vec<u64> {
    sizes
        .iter()
        .scan(0u64, |at, n| {
            let s = *at;
            *at += n;
            Some(s)
        })
        .collect()
}

impl TreeFile {
    /// Opens the tree file at `path` if it exists, has the size of a tree of `leaves`
    /// leaves and ends in `root`; `None` when it must be built.
    pub(crate) fn open(path: &Path, leaves: u64, root: &Digest32) -> Result<Option<Self>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
        };
        let sizes = layer_sizes(leaves);
        let starts = starts(&sizes);
        let nodes: u64 = sizes.iter().sum();
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?
            .len();
        if len != nodes * 32 {
            return Ok(None);
        }
        // The highest layers whose nodes together fit in TOP_NODES; the root always does.
        let top_from = (0..sizes.len())
            .find(|&l| nodes - starts[l] <= TOP_NODES)
            .unwrap_or(sizes.len() - 1);
        let mut tail = vec![0u8; ((nodes - starts[top_from]) * 32) as usize];
        file.read_exact_at(&mut tail, starts[top_from] * 32)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        let top: Vec<Digest32> = tail.chunks_exact(32).map(digest).collect();
        if top.last() != Some(root) {
            return Ok(None);
        }
        Ok(Some(Self {
            file,
            sizes,
            starts,
            top_from,
            top,
            root: *root,
        }))
    }

    /// Builds the tree file at `path` from `leaves` (the digests in order, `count` of them),
    /// writing it under a temporary name first. Returns the root the leaves hash to.
    pub(crate) fn build(path: &Path, count: u64, leaves: impl Read) -> Result<Digest32> {
        let tmp = path.with_extension(format!("tree.{}.part", super::unique_suffix()));
        let built = build_at(&tmp, count, leaves);
        match built {
            Ok(root) => match fs::rename(&tmp, path) {
                Ok(()) => Ok(root),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    Err(Error::io(format!("moving {}", tmp.display()), e))
                }
            },
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Node `index` of layer `layer`, which must exist.
    fn node(&self, layer: usize, index: u64) -> Result<Digest32> {
        let mut d = [[0u8; 32]];
        self.nodes(layer, index, &mut d)?;
        Ok(d[0])
    }

    /// Nodes `first..` of layer `layer` into `out`, from memory or in one read.
    fn nodes(&self, layer: usize, first: u64, out: &mut [Digest32]) -> Result<()> {
        let at = self.starts[layer] + first;
        if layer >= self.top_from {
            let i = (at - self.starts[self.top_from]) as usize;
            out.copy_from_slice(&self.top[i..][..out.len()]);
            return Ok(());
        }
        self.file
            .read_exact_at(out.as_flattened_mut(), at * 32)
            .map_err(|e| Error::io("reading a tree file", e))
    }

    /// The number of leaves.
    pub(crate) fn leaves(&self) -> u64 {
        self.sizes[0]
    }

    /// Leaf `index`, or `None` past the end.
    pub(crate) fn leaf(&self, index: u64) -> Result<Option<Digest32>> {
        if index >= self.leaves() {
            return Ok(None);
        }
        self.node(0, index).map(Some)
    }

    /// Leaf `index` and its proof, checked against the root; `None` past the end.
    pub(crate) fn leaf_and_proof(&self, index: u64) -> Result<Option<(Digest32, Proof)>> {
        if index >= self.leaves() {
            return Ok(None);
        }
        // The leaf and its sibling (absent for the last of an odd layer) side by side.
        let (leaf, sibling) = {
            let first = index & !1;
            let pair = if first + 1 < self.leaves() { 2 } else { 1 };
            let mut nodes = [[0u8; 32]; 2];
            self.nodes(0, first, &mut nodes[..pair])?;
            let odd = (index & 1) as usize;
            (nodes[odd], nodes[odd ^ 1])
        };
        let mut path = Vec::with_capacity(self.sizes.len() - 1);
        path.push(sibling);
        for (layer, size) in self.sizes[..self.sizes.len() - 1]
            .iter()
            .enumerate()
            .skip(1)
        {
            let sibling = (index >> layer) ^ 1;
            path.push(if sibling < *size {
                self.node(layer, sibling)?
            } else {
                [0; 32]
            });
        }
        let proof = Proof {
            index,
            leaves: self.leaves(),
            path,
        };
        if !proof.verify(&leaf, &self.root) {
            return Err(Error::Corrupt {
                cid: crate::cid::Cid::from_digest(crate::cid::CidKind::Tree, self.root).to_string(),
                detail: format!("the tree file gives a bad proof for block {index}"),
            });
        }
        Ok(Some((leaf, proof)))
    }
}

fn digest(bytes: &[u8]) -> Digest32 {
    let mut d = [0u8; 32];
    d.copy_from_slice(bytes);
    d
}

fn build_at(tmp: &Path, count: u64, leaves: impl Read) -> Result<Digest32> {
    let io = |e: std::io::Error| Error::io(format!("writing {}", tmp.display()), e);
    let sizes = layer_sizes(count);
    let starts = starts(&sizes);
    let mut file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io)?;
    // The leaves, as given.
    {
        let mut out = BufWriter::with_capacity(RUN * 32, &mut file);
        let copied = std::io::copy(&mut leaves.take(count * 32), &mut out).map_err(io)?;
        if copied != count * 32 {
            return Err(Error::State(format!(
                "a tree of {count} leaves has only {} bytes of leaves",
                copied
            )));
        }
        out.flush().map_err(io)?;
    }
    // Each layer from the one below, a run at a time (positional I/O: no shared offset).
    let mut bytes = vec![0u8; RUN * 32];
    let mut run: Vec<Digest32> = Vec::with_capacity(RUN);
    let mut parents = Vec::with_capacity(RUN * 16);
    for layer in 0..sizes.len() - 1 {
        let mut done = 0u64;
        while done < sizes[layer] {
            let n = ((sizes[layer] - done) as usize).min(RUN);
            let buf = &mut bytes[..n * 32];
            file.read_exact_at(buf, (starts[layer] + done) * 32)
                .map_err(io)?;
            run.clear();
            run.extend(buf.chunks_exact(32).map(digest));
            parents.clear();
            for p in next_layer(&run, layer == 0) {
                parents.extend_from_slice(&p);
            }
            file.write_all_at(&parents, (starts[layer + 1] + done / 2) * 32)
                .map_err(io)?;
            done += n as u64;
        }
    }
    let mut root = [0u8; 32];
    file.read_exact_at(&mut root, (starts[sizes.len() - 1]) * 32)
        .map_err(io)?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::CodexTree;
    use sha2::{Digest, Sha256};

    #[test]
    fn a_tree_file_gives_the_proofs_of_the_tree_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        for n in [1u64, 2, 3, 5, 8, 33, 2048, 2049, 4099] {
            let leaves: Vec<Digest32> = (0..n)
                .map(|i| Sha256::digest(i.to_le_bytes()).into())
                .collect();
            let tree = CodexTree::new(leaves.clone()).unwrap();
            let path = dir.path().join(format!("{n}.tree"));
            let root = TreeFile::build(&path, n, leaves.concat().as_slice()).unwrap();
            assert_eq!(root, tree.root());
            let file = TreeFile::open(&path, n, &root)
                .unwrap()
                .expect("valid file");
            // Every leaf: pairs read from the file and nodes held in memory alike.
            for i in 0..n {
                let (leaf, proof) = file.leaf_and_proof(i).unwrap().unwrap();
                assert_eq!((leaf, proof), (leaves[i as usize], tree.proof(i).unwrap()));
                assert_eq!(file.leaf(i).unwrap(), Some(leaves[i as usize]));
            }
            assert!(file.leaf_and_proof(n).unwrap().is_none());
            // Another tree's root, or a wrong leaf count: the file is not used.
            assert!(TreeFile::open(&path, n, &[7; 32]).unwrap().is_none());
            assert!(TreeFile::open(&path, n + 1, &root).unwrap().is_none());
        }
        assert!(TreeFile::open(&dir.path().join("none"), 1, &[0; 32])
            .unwrap()
            .is_none());
        // Too few leaves: an error, and nothing left behind.
        let path = dir.path().join("short.tree");
        assert!(TreeFile::build(&path, 4, [0u8; 64].as_slice()).is_err());
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("short"))
            .collect();
        assert!(left.is_empty());
    }

    #[test]
    fn a_damaged_node_is_caught_by_the_proof_check() {
        let dir = tempfile::tempdir().unwrap();
        // 8 leaves: the whole tree is held in memory. 4099: layers 0 to 2 are read from the
        // file for every proof, and the rest is held.
        for (n, held) in [(8u64, true), (4099, false)] {
            let leaves: Vec<Digest32> = (0..n)
                .map(|i| Sha256::digest(i.to_le_bytes()).into())
                .collect();
            let path = dir.path().join(format!("{n}.tree"));
            let root = TreeFile::build(&path, n, leaves.concat().as_slice()).unwrap();
            assert_eq!(
                TreeFile::open(&path, n, &root).unwrap().unwrap().top_from == 0,
                held
            );
            // Layer 1 starts after the leaves: damage its first node, the parent of leaves
            // 0 and 1 and a sibling on the path of leaves 2 and 3.
            let f = File::options().write(true).open(&path).unwrap();
            f.write_all_at(&[0xff; 32], n * 32).unwrap();
            let file = TreeFile::open(&path, n, &root).unwrap().unwrap();
            assert!(matches!(file.leaf_and_proof(3), Err(Error::Corrupt { .. })));
            assert!(file.leaf_and_proof(7).is_ok());
            // A damaged leaf fails its own proof.
            f.write_all_at(&[0xff; 32], 6 * 32).unwrap();
            let file = TreeFile::open(&path, n, &root).unwrap().unwrap();
            assert!(matches!(file.leaf_and_proof(6), Err(Error::Corrupt { .. })));
            assert!(matches!(file.leaf_and_proof(7), Err(Error::Corrupt { .. })));
            assert!(file.leaf_and_proof(4).is_ok());
            // A damaged root: the file is not used at all.
            let nodes: u64 = layer_sizes(n).iter().sum();
            f.write_all_at(&[0xff; 32], (nodes - 1) * 32).unwrap();
            assert!(TreeFile::open(&path, n, &root).unwrap().is_none());
        }
    }
}
