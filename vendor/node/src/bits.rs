//! A fixed-size set of block indices, one bit per block: what a download holds or still
//! needs costs 2 KiB per GiB of 64 KiB blocks, not a map entry per block.

/// A set of indices in `0..len`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
    len: u64,
}

impl Bits {
    /// An empty set over `0..len`.
    pub(crate) fn new(len: u64) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
            len,
        }
    }

    /// The set of every index in `0..len`.
    pub(crate) fn full(len: u64) -> Self {
        let mut b = Self {
            words: vec![u64::MAX; len.div_ceil(64) as usize],
            len,
        };
        if len % 64 != 0 {
            if let Some(last) = b.words.last_mut() {
                *last = (1u64 << (len % 64)) - 1;
            }
        }
        b
    }

    /// The size of the index range.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Whether `i` is in the set (never, beyond `len`).
    pub(crate) fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Adds (`true`) or removes `i`; ignored beyond `len`.
    pub(crate) fn set(&mut self, i: u64, on: bool) {
        if i >= self.len {
            return;
        }
        let w = &mut self.words[(i / 64) as usize];
        if on {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// How many indices are in the set.
    pub(crate) fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first index at or after `from` that is not in the set.
    pub(crate) fn next_absent(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.len {
            let w = self.words[(i / 64) as usize] | ((1u64 << (i % 64)) - 1);
            if w != u64::MAX {
                let found = (i / 64) * 64 + u64::from(w.trailing_ones());
                return (found < self.len).then_some(found);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::Bits;

    #[test]
    fn sets_counts_and_finds_gaps() {
        for len in [0u64, 1, 63, 64, 65, 200] {
            let mut b = Bits::new(len);
            assert_eq!((b.count(), b.next_absent(0)), (0, (len > 0).then_some(0)));
            for i in (0..len).step_by(3) {
                b.set(i, true);
            }
            let expected: Vec<u64> = (0..len).filter(|i| i % 3 != 0).collect();
            let mut found = Vec::new();
            let mut at = 0;
            while let Some(i) = b.next_absent(at) {
                found.push(i);
                at = i + 1;
            }
            assert_eq!(found, expected, "len {len}");
            assert_eq!(b.count(), len.div_ceil(3));
            assert!(!b.get(len) && !b.get(len + 64));
            let full = Bits::full(len);
            assert_eq!((full.count(), full.next_absent(0)), (len, None));
            b.set(0, false);
            assert!(!b.get(0));
        }
    }
}
