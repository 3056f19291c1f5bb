//! The CodexTree: a SHA-256 Merkle tree over block digests, with keyed compression.
//!
//! `compress(x, y, key) = sha256(x ‖ y ‖ key)`; key 1 pairs nodes on the bottom layer, 0 above;
//! an odd last node `x` becomes `compress(x, 0^32, 3)` on the bottom layer and `(.., 2)` above.
//! There is always at least one layer above the leaves.

use sha2::{Digest, Sha256};

use crate::cid::{Cid, CidKind, Digest32};
use crate::pb::{self, DecodeError, Fields, Value};

const ZERO: Digest32 = [0u8; 32];

/// Keyed compression of two nodes.
fn compress(x: &Digest32, y: &Digest32, key: u8) -> Digest32 {
    let mut h = Sha256::new();
    h.update(x);
    h.update(y);
    h.update([key]);
    h.finalize().into()
}

/// The layer above `layer`; `bottom` selects the bottom-layer keys. `layer` may be a run
/// of a longer layer that starts at an even index; only a layer's end has an odd node.
pub(crate) fn next_layer(layer: &[Digest32], bottom: bool) -> Vec<Digest32> {
    let base = u8::from(bottom);
    layer
        .chunks(2)
        .map(|pair| match pair {
            [x, y] => compress(x, y, base),
            [x] => compress(x, &ZERO, base + 2),
            _ => unreachable!("chunks(2) yields one or two nodes"),
        })
        .collect()
}

/// Why a tree or proof is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TreeError {
    /// A tree needs at least one leaf.
    #[error("a Merkle tree needs at least one leaf")]
    Empty,
    /// A leaf index past the end of the tree.
    #[error("leaf index {index} out of range for {leaves} leaves")]
    Index {
        /// The index asked for.
        index: u64,
        /// The number of leaves.
        leaves: u64,
    },
    /// A proof that does not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// A complete CodexTree, all layers held in memory (64 bytes per leaf).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodexTree {
    /// `layers[0]` are the leaves, the last layer is the root alone.
    layers: Vec<Vec<Digest32>>,
}

impl CodexTree {
    /// Builds the tree over `leaves` (block digests, in order).
    pub fn new(leaves: Vec<Digest32>) -> Result<Self, TreeError> {
        if leaves.is_empty() {
            return Err(TreeError::Empty);
        }
        let mut layers = vec![leaves];
        loop {
            let last = &layers[layers.len() - 1];
            if layers.len() > 1 && last.len() == 1 {
                break;
            }
            let next = next_layer(last, layers.len() == 1);
            layers.push(next);
        }
        Ok(Self { layers })
    }

    /// The root digest.
    pub fn root(&self) -> Digest32 {
        self.layers[self.layers.len() - 1][0]
    }

    /// The tree CID (`0xCD03` over the root).
    pub fn cid(&self) -> Cid {
        Cid::from_digest(CidKind::Tree, self.root())
    }

    /// The leaves.
    pub fn leaves(&self) -> &[Digest32] {
        &self.layers[0]
    }

    /// The number of leaves.
    pub fn len(&self) -> u64 {
        self.layers[0].len() as u64
    }

    /// Always false: a tree has at least one leaf.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The inclusion proof of leaf `index`.
    pub fn proof(&self, index: u64) -> Result<Proof, TreeError> {
        let leaves = self.len();
        let i = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.layers[0].len())
            .ok_or(TreeError::Index { index, leaves })?;
        let path = self.layers[..self.layers.len() - 1]
            .iter()
            .enumerate()
            .map(|(depth, layer)| *layer.get((i >> depth) ^ 1).unwrap_or(&ZERO))
            .collect();
        Ok(Proof {
            index,
            leaves,
            path,
        })
    }
}

/// An inclusion proof: the siblings of a leaf from the bottom layer up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The leaf index.
    pub index: u64,
    /// The number of leaves in the tree.
    pub leaves: u64,
    /// Sibling digests, bottom to top (zeros where a node has no sibling).
    pub path: Vec<Digest32>,
}

impl Proof {
    /// The root this proof leads to from `leaf`, or `None` when the proof's shape is
    /// impossible for its index and leaf count.
    pub fn root_from(&self, leaf: &Digest32) -> Option<Digest32> {
        if self.index >= self.leaves || self.path.len() != depth(self.leaves) {
            return None;
        }
        let (mut j, mut m, mut h) = (self.index, self.leaves, *leaf);
        for (level, p) in self.path.iter().enumerate() {
            let base = u8::from(level == 0);
            h = if j & 1 == 1 {
                compress(p, &h, base)
            } else if j == m - 1 {
                compress(&h, p, base + 2)
            } else {
                compress(&h, p, base)
            };
            j >>= 1;
            m = (m + 1) >> 1;
        }
        Some(h)
    }

    /// Whether this proof shows `leaf` at `self.index` under `root`.
    pub fn verify(&self, leaf: &Digest32, root: &Digest32) -> bool {
        self.root_from(leaf).is_some_and(|r| &r == root)
    }

    /// The protobuf encoding `{1: 0x12, 2: index, 3: nleaves, 4: {1: node}*}`.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(16 + self.path.len() * 36);
        pb::put_uint(&mut buf, 1, crate::cid::SHA256_CODE);
        pb::put_uint(&mut buf, 2, self.index);
        pb::put_uint(&mut buf, 3, self.leaves);
        let mut node = Vec::with_capacity(34);
        for p in &self.path {
            node.clear();
            pb::put_bytes(&mut node, 1, p);
            pb::put_bytes(&mut buf, 4, &node);
        }
        buf
    }

    /// Decodes [`Proof::encode`]'s format.
    pub fn decode(buf: &[u8]) -> Result<Self, TreeError> {
        let (mut index, mut leaves, mut path) = (0, 0, Vec::new());
        for f in Fields::new(buf) {
            match f? {
                (1, v) => {
                    let mcodec = v.uint("proof mcodec")?;
                    check_mcodec(mcodec)?;
                }
                (2, v) => index = v.uint("proof index")?,
                (3, v) => leaves = v.uint("proof nleaves")?,
                (4, v) => {
                    let mut node = None;
                    for nf in Fields::new(v.bytes("proof node")?) {
                        if let (1, Value::Bytes(b)) = nf? {
                            node = Some(<Digest32>::try_from(b).map_err(|_| {
                                TreeError::Decode(DecodeError("proof node is not 32 bytes"))
                            })?);
                        }
                    }
                    path.push(node.ok_or(DecodeError("proof node without digest"))?);
                }
                _ => {}
            }
        }
        Ok(Self {
            index,
            leaves,
            path,
        })
    }
}

fn check_mcodec(mcodec: u64) -> Result<(), DecodeError> {
    if mcodec == crate::cid::SHA256_CODE {
        Ok(())
    } else {
        Err(DecodeError("proof hash is not SHA-256"))
    }
}

/// The number of nodes in each layer of a tree with `leaves` leaves, leaves first, root
/// last (at least two layers).
pub(crate) fn layer_sizes(leaves: u64) -> Vec<u64> {
    let mut sizes = vec![leaves];
    let mut m = leaves;
    while sizes.len() < 2 || m > 1 {
        m = m.div_ceil(2);
        sizes.push(m);
    }
    sizes
}

/// The number of layers above the leaves of a tree with `leaves` leaves.
fn depth(leaves: u64) -> usize {
    let mut d = 1;
    let mut m = leaves.div_ceil(2);
    while m > 1 {
        m = m.div_ceil(2);
        d += 1;
    }
    d
}

/// Computes a tree's root from its leaves given in order, holding one pending node per
/// layer: the root of a dataset of any size in a few hundred bytes.
#[derive(Debug)]
pub(crate) struct RootBuilder {
    leaves: u64,
    pushed: u64,
    /// `pending[l]`: a node of layer `l` waiting for its right sibling.
    pending: Vec<Option<Digest32>>,
}

impl RootBuilder {
    /// A builder for a tree of `leaves` leaves.
    pub(crate) fn new(leaves: u64) -> Self {
        Self {
            leaves,
            pushed: 0,
            pending: Vec::new(),
        }
    }

    /// Adds the next leaf.
    pub(crate) fn push(&mut self, leaf: Digest32) {
        self.pushed += 1;
        self.carry(0, leaf);
    }

    fn carry(&mut self, mut level: usize, mut node: Digest32) {
        loop {
            if self.pending.len() <= level {
                self.pending.resize(level + 1, None);
            }
            match self.pending[level].take() {
                Some(left) => {
                    node = compress(&left, &node, u8::from(level == 0));
                    level += 1;
                }
                None => {
                    self.pending[level] = Some(node);
                    return;
                }
            }
        }
    }

    /// The root, or `None` unless exactly the announced number of leaves was pushed.
    pub(crate) fn finish(mut self) -> Option<Digest32> {
        if self.pushed != self.leaves || self.leaves == 0 {
            return None;
        }
        // Bottom-up, the node left pending on a layer is its odd last node: it rises paired
        // with zeros, and becomes the last node of the layer above.
        let (mut level, mut count) = (0usize, self.leaves);
        loop {
            if level > 0 && count == 1 {
                return self.pending.get_mut(level).and_then(Option::take);
            }
            if let Some(x) = self.pending.get_mut(level).and_then(Option::take) {
                let parent = compress(&x, &ZERO, u8::from(level == 0) + 2);
                self.carry(level + 1, parent);
            }
            level += 1;
            count = count.div_ceil(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &Digest32) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The leaves of vectors.json: 32-character ASCII decimal indices, zero-padded.
    fn vector_leaves(n: usize) -> Vec<Digest32> {
        (1..=n)
            .map(|i| format!("{i:0>32}").as_bytes().try_into().unwrap())
            .collect()
    }

    #[test]
    fn reproduces_the_reference_roots() {
        let vectors = [
            (
                1,
                "ab77a68f53293329179389d6f0feabc6e514057d49e8403c2aa913c30706b094",
            ),
            (
                2,
                "0b642bff731e11e1438845a5c37ef8aa1278384e722862e03f19efb4dd51d737",
            ),
            (
                3,
                "d3baa021b74562dfc6c1fc0c077581aa408c813824a600590a09e2f6b14a0c98",
            ),
            (
                7,
                "802487e6dfcdb9b457fd927bef32c6aacd4f39b52ea5d29e8e5f70f302f5fcaf",
            ),
            (
                8,
                "b3b9271afbe786de1db89c88448d3a97b785baff85f0584a25d3f2a4f9932d61",
            ),
            (
                10,
                "15f8cf4ddf6aa3cf33ea1eef8b66522c4db60ff28d3557f9be62d73a215a3c47",
            ),
        ];
        for (n, root) in vectors {
            let tree = CodexTree::new(vector_leaves(n)).unwrap();
            assert_eq!(hex(&tree.root()), root, "{n} leaves");
        }
    }

    #[test]
    fn shapes_follow_the_spec() {
        let l = vector_leaves(3);
        let tree = CodexTree::new(l.clone()).unwrap();
        let expect = compress(&compress(&l[0], &l[1], 1), &compress(&l[2], &ZERO, 3), 0);
        assert_eq!(tree.root(), expect);
        let one = CodexTree::new(vector_leaves(1)).unwrap();
        assert_eq!(one.root(), compress(&vector_leaves(1)[0], &ZERO, 3));
        assert!(matches!(CodexTree::new(vec![]), Err(TreeError::Empty)));
    }

    #[test]
    fn every_proof_verifies_and_round_trips() {
        for n in [1usize, 2, 3, 5, 7, 8, 10, 33] {
            let tree = CodexTree::new(vector_leaves(n)).unwrap();
            for i in 0..n as u64 {
                let p = tree.proof(i).unwrap();
                assert_eq!(p.path.len(), depth(n as u64));
                assert!(
                    p.verify(&tree.leaves()[i as usize], &tree.root()),
                    "{n}/{i}"
                );
                assert_eq!(Proof::decode(&p.encode()).unwrap(), p);
                // The wrong leaf, index or root fails.
                assert!(!p.verify(&[7; 32], &tree.root()));
                let mut q = p.clone();
                q.index = (i + 1) % n as u64;
                if n > 1 {
                    assert!(!q.verify(&tree.leaves()[i as usize], &tree.root()));
                }
            }
            assert!(tree.proof(n as u64).is_err());
        }
    }

    #[test]
    fn malformed_proofs_are_rejected() {
        let tree = CodexTree::new(vector_leaves(4)).unwrap();
        let mut p = tree.proof(1).unwrap();
        p.path.pop();
        assert!(!p.verify(&tree.leaves()[1], &tree.root()));
        p.leaves = 0;
        assert!(p.root_from(&tree.leaves()[1]).is_none());
        assert!(Proof::decode(&[0x22, 0x03, 0x0a, 0x01, 0x00]).is_err());
        assert!(Proof::decode(&[0x08, 0x13]).is_err());
    }

    #[test]
    fn root_builder_matches_the_whole_tree() {
        for n in 1..130u64 {
            let leaves: Vec<Digest32> = (0..n)
                .map(|i| Sha256::digest(i.to_le_bytes()).into())
                .collect();
            let mut b = RootBuilder::new(n);
            for l in &leaves {
                b.push(*l);
            }
            let tree = CodexTree::new(leaves).unwrap();
            assert_eq!(b.finish(), Some(tree.root()), "{n} leaves");
        }
        let mut short = RootBuilder::new(3);
        short.push(ZERO);
        assert_eq!(short.finish(), None);
    }
}
