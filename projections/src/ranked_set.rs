//! An order-statistic set: a sorted set that also answers "how many are
//! before this key" (a rank) and "which key is at position i" (an offset
//! page) without walking the keys in between.
//!
//! It is a list of sorted blocks of at most [`MAX_BLOCK`] keys, with the
//! blocks' lengths kept in a Fenwick tree (the layout of Python's
//! `sortedcontainers`, with the index a counted B-tree would keep): finding
//! a key's block is a binary search over the blocks' first keys, a rank is a
//! Fenwick prefix sum plus a binary search inside one block, and a position
//! is a Fenwick descent. Every operation is O(log n) but for the shifting
//! inside one block (at most [`MAX_BLOCK`] keys) and, when a block splits or
//! empties, rebuilding the Fenwick tree (O(n / MAX_BLOCK)).
//!
//! Keys sit in the blocks themselves: no per-key allocation beyond what a
//! key owns, and about 1/MAX_BLOCK of overhead per key.
//!
//! The order is the keys' own ([`Ord`]), or one the caller passes to the
//! `_by` methods: a compact index keeps small handles as keys and orders
//! them by what they point at ([`crate::board_index`]). A caller must pass
//! the same order to every call.

use std::cmp::Ordering;

/// The most keys a block holds before it splits in two.
pub const MAX_BLOCK: usize = 512;

#[derive(Debug, Clone)]
pub struct RankedSet<K> {
    blocks: Vec<Vec<K>>,
    /// Fenwick tree over the blocks' lengths (1-based).
    counts: Vec<usize>,
    len: usize,
}

impl<K> Default for RankedSet<K> {
    fn default() -> Self {
        Self {
            blocks: Vec::new(),
            counts: vec![0],
            len: 0,
        }
    }
}

impl<K> RankedSet<K> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A set of `keys`, which are sorted and distinct, in full blocks.
    pub fn from_sorted(keys: impl IntoIterator<Item = K>) -> Self {
        let mut set = Self::default();
        let mut block = Vec::with_capacity(MAX_BLOCK);
        for key in keys {
            block.push(key);
            if block.len() == MAX_BLOCK {
                set.len += block.len();
                set.blocks
                    .push(std::mem::replace(&mut block, Vec::with_capacity(MAX_BLOCK)));
            }
        }
        if !block.is_empty() {
            block.shrink_to_fit();
            set.len += block.len();
            set.blocks.push(block);
        }
        set.recount();
        set
    }

    /// The block where `key` is or would go.
    fn block_of(&self, key: &K, cmp: impl Fn(&K, &K) -> Ordering) -> usize {
        // The last block whose first key is at or before `key`.
        let after = self
            .blocks
            .partition_point(|block| cmp(&block[0], key) != Ordering::Greater);
        after.saturating_sub(1)
    }

    /// Keys in blocks before `block`.
    fn before_block(&self, block: usize) -> usize {
        let mut i = block;
        let mut sum = 0;
        while i > 0 {
            sum += self.counts[i];
            i &= i - 1;
        }
        sum
    }

    fn add_to_count(&mut self, block: usize, delta: isize) {
        let mut i = block + 1;
        while i < self.counts.len() {
            self.counts[i] = self.counts[i].wrapping_add_signed(delta);
            i += i & i.wrapping_neg();
        }
    }

    /// Builds the Fenwick tree afresh from the blocks' lengths.
    fn recount(&mut self) {
        let n = self.blocks.len();
        self.counts = vec![0; n + 1];
        for (i, block) in self.blocks.iter().enumerate() {
            self.counts[i + 1] += block.len();
            let parent = (i + 1) + ((i + 1) & (i + 1).wrapping_neg());
            if parent <= n {
                self.counts[parent] += self.counts[i + 1];
            }
        }
    }

    /// Adds `key` in the order `cmp`; false if it was there already.
    pub fn insert_by(&mut self, key: K, cmp: impl Fn(&K, &K) -> Ordering) -> bool {
        if self.blocks.is_empty() {
            self.blocks.push(vec![key]);
            self.len = 1;
            self.recount();
            return true;
        }
        let b = self.block_of(&key, &cmp);
        let block = &mut self.blocks[b];
        let at = match block.binary_search_by(|k| cmp(k, &key)) {
            Ok(_) => return false,
            Err(at) => at,
        };
        block.insert(at, key);
        self.len += 1;
        if block.len() > MAX_BLOCK {
            let tail = block.split_off(block.len() / 2);
            block.shrink_to_fit();
            self.blocks.insert(b + 1, tail);
            self.recount();
        } else {
            self.add_to_count(b, 1);
        }
        true
    }

    /// Removes `key` (found in the order `cmp`); false if it was not there.
    pub fn remove_by(&mut self, key: &K, cmp: impl Fn(&K, &K) -> Ordering) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let b = self.block_of(key, &cmp);
        let block = &mut self.blocks[b];
        let Ok(at) = block.binary_search_by(|k| cmp(k, key)) else {
            return false;
        };
        block.remove(at);
        self.len -= 1;
        if block.is_empty() {
            self.blocks.remove(b);
            self.recount();
        } else {
            self.add_to_count(b, -1);
        }
        true
    }

    /// How many keys sort before `key` in the order `cmp` (whether or not it
    /// is in the set): a key's 0-based position.
    pub fn position_by(&self, key: &K, cmp: impl Fn(&K, &K) -> Ordering) -> usize {
        if self.blocks.is_empty() {
            return 0;
        }
        let b = self.block_of(key, &cmp);
        let inside = self.blocks[b].partition_point(|k| cmp(k, key) == Ordering::Less);
        self.before_block(b) + inside
    }

    /// Bytes the set holds beyond the keys' own allocations.
    pub fn bytes(&self) -> usize {
        self.blocks
            .iter()
            .map(|block| block.capacity() * std::mem::size_of::<K>())
            .sum::<usize>()
            + self.blocks.capacity() * std::mem::size_of::<Vec<K>>()
            + self.counts.capacity() * std::mem::size_of::<usize>()
    }

    /// The block holding position `index`, and the position inside it.
    fn locate(&self, index: usize) -> Option<(usize, usize)> {
        if index >= self.len {
            return None;
        }
        // Fenwick descent: the last block whose prefix count is <= index.
        let n = self.blocks.len();
        let mut step = n.next_power_of_two();
        let (mut block, mut left) = (0, index);
        while step > 0 {
            let next = block + step;
            if next <= n && self.counts[next] <= left {
                block = next;
                left -= self.counts[next];
            }
            step /= 2;
        }
        Some((block, left))
    }

    /// The key at 0-based position `index`.
    pub fn get(&self, index: usize) -> Option<&K> {
        let (block, at) = self.locate(index)?;
        self.blocks[block].get(at)
    }

    /// The keys from 0-based position `index` on, in order.
    pub fn iter_from(&self, index: usize) -> impl Iterator<Item = &K> + '_ {
        let (block, at) = self.locate(index).unwrap_or((self.blocks.len(), 0));
        self.blocks
            .iter()
            .skip(block)
            .enumerate()
            .flat_map(move |(i, keys)| keys[if i == 0 { at } else { 0 }..].iter())
    }

    pub fn iter(&self) -> impl Iterator<Item = &K> + '_ {
        self.blocks.iter().flatten()
    }
}

/// The set in its keys' own order.
impl<K: Ord> RankedSet<K> {
    /// Adds `key`; false if it was there already.
    pub fn insert(&mut self, key: K) -> bool {
        self.insert_by(key, K::cmp)
    }

    /// Removes `key`; false if it was not there.
    pub fn remove(&mut self, key: &K) -> bool {
        self.remove_by(key, K::cmp)
    }

    pub fn contains(&self, key: &K) -> bool {
        !self.blocks.is_empty()
            && self.blocks[self.block_of(key, K::cmp)]
                .binary_search(key)
                .is_ok()
    }

    /// How many keys sort before `key` (whether or not it is in the set):
    /// a key's 0-based position.
    pub fn position(&self, key: &K) -> usize {
        self.position_by(key, K::cmp)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Remove(u16),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                3 => any::<u16>().prop_map(|k| Op::Insert(k % 3000)),
                1 => any::<u16>().prop_map(|k| Op::Remove(k % 3000)),
            ],
            0..4000,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever is inserted and removed, into a set built empty or from
        /// sorted keys, it answers as a sorted set walked key by key would.
        #[test]
        fn it_answers_as_a_walked_sorted_set(
            start in prop::collection::btree_set(0u16..3000, 0..2000),
            ops in ops(),
            probes in prop::collection::vec(0u16..3100, 20),
        ) {
            let mut set = RankedSet::from_sorted(start.iter().copied());
            let mut reference = start;
            for op in ops {
                match op {
                    Op::Insert(k) => prop_assert_eq!(set.insert(k), reference.insert(k)),
                    Op::Remove(k) => prop_assert_eq!(set.remove(&k), reference.remove(&k)),
                }
            }
            prop_assert_eq!(set.len(), reference.len());
            let sorted: Vec<u16> = reference.iter().copied().collect();
            prop_assert_eq!(set.iter().copied().collect::<Vec<_>>(), sorted.clone());
            for probe in probes {
                let position = reference.range(..probe).count();
                prop_assert_eq!(set.position(&probe), position);
                prop_assert_eq!(set.contains(&probe), reference.contains(&probe));
                let index = probe as usize % (sorted.len() + 1);
                prop_assert_eq!(set.get(index), sorted.get(index));
                let from: Vec<u16> = set.iter_from(index).take(7).copied().collect();
                prop_assert_eq!(&from[..], &sorted[index..(index + 7).min(sorted.len())]);
            }
        }
    }

    #[test]
    fn blocks_split_and_empty_as_keys_come_and_go() {
        let mut set = RankedSet::new();
        for k in (0..10_000u32).rev() {
            assert!(set.insert(k));
        }
        assert!(set.blocks.len() > 10_000 / MAX_BLOCK);
        assert_eq!(set.position(&5_000), 5_000);
        assert_eq!(set.get(9_999), Some(&9_999));
        for k in 0..9_990u32 {
            assert!(set.remove(&k));
        }
        assert_eq!(set.len(), 10);
        assert_eq!(
            set.iter().copied().collect::<Vec<_>>(),
            (9_990..10_000).collect::<Vec<_>>()
        );
        assert_eq!(set.position(&9_995), 5);
        assert_eq!(set.get(10), None);
        assert_eq!(set.iter_from(10).count(), 0);
    }
}
