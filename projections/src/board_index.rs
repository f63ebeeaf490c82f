//! One leaderboard held in memory for ranking: every entry of a test in rank
//! order, answering a user's rank, their neighbours and an offset page in
//! O(log n), in about 50 bytes per entry beyond its user id.
//!
//! Each entry lives in a fixed-size [`Slot`] (its fields, its user id's place
//! in a shared byte arena); the rank order is a [`RankedSet`] of 4-byte slot
//! handles compared by what they point at; a hash table of handles finds a
//! user's slot by id. Nothing is allocated per entry, and every store grows
//! by chunks, never by doubling a large buffer. Users only ever join a board
//! (a best never goes away), so slots and ids are never freed.
//!
//! The order is [`RankKey`]'s: score descending, then earliest, then user id
//! (bytewise, as the `"C"` collation of the read model's `user_id`).

use std::cmp::Ordering;
use std::hash::{BuildHasher, RandomState};

use chrono::{DateTime, Utc};
use hashbrown::HashTable;
use uuid::Uuid;

use crate::leaderboard::RankedEntry;
use crate::ranked_set::RankedSet;
use crate::ranking::{Entry, RankKey};

/// Slots per chunk of the slot store.
const SLOTS_PER_CHUNK: usize = 4096;
/// Bytes per chunk of the user id arena.
const NAME_CHUNK: usize = 64 * 1024;
/// The handle that stands for a probe key in comparisons (no slot has it).
const PROBE: u32 = u32::MAX;

/// One entry, without its user id.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// `achieved_at`, in microseconds since the epoch (the read model's
    /// precision).
    at: i64,
    attempt_id: [u8; 16],
    /// Where the user id is in the arena: chunk * NAME_CHUNK + offset, at a
    /// length byte followed by the id.
    name: u32,
    best: u32,
    max: u32,
    attempts: u32,
}

/// The entries' fields and user ids, by handle.
#[derive(Debug, Clone, Default)]
struct Slots {
    names: Vec<Vec<u8>>,
    slots: Vec<Vec<Slot>>,
}

impl Slots {
    fn slot(&self, handle: u32) -> &Slot {
        let i = handle as usize;
        &self.slots[i / SLOTS_PER_CHUNK][i % SLOTS_PER_CHUNK]
    }

    fn slot_mut(&mut self, handle: u32) -> &mut Slot {
        let i = handle as usize;
        &mut self.slots[i / SLOTS_PER_CHUNK][i % SLOTS_PER_CHUNK]
    }

    fn name(&self, handle: u32) -> &[u8] {
        let at = self.slot(handle).name as usize;
        let chunk = &self.names[at / NAME_CHUNK];
        let start = at % NAME_CHUNK;
        let len = chunk[start] as usize;
        &chunk[start + 1..start + 1 + len]
    }

    /// The rank order of two handles; `PROBE` stands for `probe`. User ids
    /// are read only to break a tie of score and time: they live in another
    /// allocation, and fetching them on every comparison is most of the cost
    /// of a rank.
    fn compare(&self, a: u32, b: u32, probe: Option<&RankKey>) -> Ordering {
        let probe = |handle: u32| probe.filter(|_| handle == PROBE);
        let fields = |handle: u32| -> (u32, i64) {
            match probe(handle) {
                Some(key) => (key.score, micros(key.achieved_at)),
                None => {
                    let slot = self.slot(handle);
                    (slot.best, slot.at)
                }
            }
        };
        let name = |handle: u32| -> &[u8] {
            match probe(handle) {
                Some(key) => key.user_id.as_bytes(),
                None => self.name(handle),
            }
        };
        let (fa, fb) = (fields(a), fields(b));
        fb.0.cmp(&fa.0)
            .then(fa.1.cmp(&fb.1))
            .then_with(|| name(a).cmp(name(b)))
    }
}

/// Every entry of one test, in rank order.
#[derive(Debug, Clone)]
pub struct BoardIndex {
    slots: Slots,
    len: u32,
    /// Slot handles by user id.
    lookup: HashTable<u32>,
    hasher: RandomState,
    order: RankedSet<u32>,
}

impl Default for BoardIndex {
    fn default() -> Self {
        Self {
            slots: Slots::default(),
            len: 0,
            lookup: HashTable::new(),
            hasher: RandomState::new(),
            order: RankedSet::new(),
        }
    }
}

/// A board being filled: entries go in unordered, and are sorted once.
pub struct Loading(BoardIndex);

impl Loading {
    /// Adds `entry`; a second entry of the same user is ignored.
    pub fn add(&mut self, entry: &Entry) {
        if self.0.handle(&entry.user_id).is_none() {
            self.0.push(entry);
        }
    }

    pub fn finish(self) -> BoardIndex {
        let mut board = self.0;
        let mut handles: Vec<u32> = (0..board.len).collect();
        handles.sort_unstable_by(|a, b| board.slots.compare(*a, *b, None));
        board.order = RankedSet::from_sorted(handles);
        board
    }
}

/// What a board's memory is spent on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoardBytes {
    /// The user ids, with their length bytes and the arena's unused tail.
    pub user_ids: usize,
    /// Everything else: slots, the rank order, the lookup table.
    pub index: usize,
}

impl BoardBytes {
    pub fn total(&self) -> usize {
        self.user_ids + self.index
    }
}

/// Makes room in `chunk` for `more` items: it doubles, as a vector does, so
/// a small board stays small, but never past `most`, so a large one has no
/// half-empty doubled buffers.
fn grow<T>(chunk: &mut Vec<T>, more: usize, most: usize) {
    let needed = chunk.len() + more;
    if needed > chunk.capacity() {
        let target = (chunk.capacity() * 2).max(needed).max(16).min(most);
        chunk.reserve_exact(target - chunk.len());
    }
}

fn micros(at: DateTime<Utc>) -> i64 {
    at.timestamp_micros()
}

impl BoardIndex {
    pub fn new() -> Self {
        Self::default()
    }

    /// A board of `entries` (one per user, in any order).
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Self {
        let mut loading = Self::loading();
        for entry in entries {
            loading.add(entry);
        }
        loading.finish()
    }

    /// A board filled entry by entry, then put in order once.
    pub fn loading() -> Loading {
        Loading(Self::new())
    }

    /// Entries on the board.
    pub fn len(&self) -> u64 {
        u64::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn hash(&self, user_id: &[u8]) -> u64 {
        self.hasher.hash_one(user_id)
    }

    fn handle(&self, user_id: &str) -> Option<u32> {
        let hash = self.hash(user_id.as_bytes());
        self.lookup
            .find(hash, |&h| self.slots.name(h) == user_id.as_bytes())
            .copied()
    }

    /// Adds a slot and a lookup for a user the board does not hold, outside
    /// the rank order; returns its handle.
    fn push(&mut self, entry: &Entry) -> u32 {
        let id = entry.user_id.as_bytes();
        let len = u8::try_from(id.len()).expect("user ids are at most 128 bytes");
        let Slots { names, slots } = &mut self.slots;
        if names
            .last()
            .is_none_or(|chunk| chunk.len() + 1 + id.len() > NAME_CHUNK)
        {
            names.push(Vec::new());
        }
        let chunk_index = names.len() - 1;
        let chunk = &mut names[chunk_index];
        grow(chunk, 1 + id.len(), NAME_CHUNK);
        let name = u32::try_from(chunk_index * NAME_CHUNK + chunk.len())
            .expect("under 4 GiB of user ids on one board");
        chunk.push(len);
        chunk.extend_from_slice(id);
        if slots
            .last()
            .is_none_or(|chunk| chunk.len() == SLOTS_PER_CHUNK)
        {
            slots.push(Vec::new());
        }
        let handle = self.len;
        let chunk = slots
            .last_mut()
            .expect("a chunk with room was just ensured");
        grow(chunk, 1, SLOTS_PER_CHUNK);
        chunk.push(Slot {
            at: 0,
            attempt_id: [0; 16],
            name,
            best: 0,
            max: 0,
            attempts: 0,
        });
        self.len = self.len.checked_add(1).expect("under 4 billion entries");
        self.fill(handle, entry);
        let hash = self.hash(id);
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.lookup
            .insert_unique(hash, handle, |&h| hasher.hash_one(slots.name(h)));
        handle
    }

    fn fill(&mut self, handle: u32, entry: &Entry) {
        let slot = self.slots.slot_mut(handle);
        slot.at = micros(entry.achieved_at);
        slot.attempt_id = *entry.attempt_id.as_bytes();
        slot.best = entry.best_score;
        slot.max = entry.max_score;
        slot.attempts = entry.attempts;
    }

    /// Puts `entry` on the board: the user's new entry, or their first.
    pub fn upsert(&mut self, entry: &Entry) {
        let handle = match self.handle(&entry.user_id) {
            Some(handle) => {
                let slots = &self.slots;
                self.order
                    .remove_by(&handle, |a, b| slots.compare(*a, *b, None));
                self.fill(handle, entry);
                handle
            }
            None => self.push(entry),
        };
        let slots = &self.slots;
        self.order
            .insert_by(handle, |a, b| slots.compare(*a, *b, None));
    }

    fn entry(&self, handle: u32) -> Entry {
        let slot = self.slots.slot(handle);
        Entry {
            user_id: String::from_utf8_lossy(self.slots.name(handle)).into_owned(),
            best_score: slot.best,
            max_score: slot.max,
            attempt_id: Uuid::from_bytes(slot.attempt_id),
            achieved_at: DateTime::from_timestamp_micros(slot.at)
                .expect("stored from a valid time"),
            attempts: slot.attempts,
        }
    }

    /// The 0-based position of the user's entry.
    fn position(&self, handle: u32) -> usize {
        self.order
            .position_by(&handle, |a, b| self.slots.compare(*a, *b, None))
    }

    /// The 1-based rank `key` has, or would have, on the board.
    pub fn rank_of_key(&self, key: &RankKey) -> u64 {
        let position = self
            .order
            .position_by(&PROBE, |a, b| self.slots.compare(*a, *b, Some(key)));
        position as u64 + 1
    }

    /// `user_id`'s entry with its rank.
    pub fn ranked(&self, user_id: &str) -> Option<RankedEntry> {
        let handle = self.handle(user_id)?;
        Some(RankedEntry {
            rank: self.position(handle) as u64 + 1,
            entry: self.entry(handle),
        })
    }

    /// Up to `limit` entries from rank `offset + 1`, ranked.
    pub fn page(&self, offset: u64, limit: usize) -> Vec<RankedEntry> {
        let Ok(start) = usize::try_from(offset) else {
            return Vec::new();
        };
        self.order
            .iter_from(start)
            .take(limit)
            .enumerate()
            .map(|(i, handle)| RankedEntry {
                rank: offset + i as u64 + 1,
                entry: self.entry(*handle),
            })
            .collect()
    }

    /// `user_id`'s entry with up to `radius` neighbours on each side, in
    /// rank order.
    pub fn around(
        &self,
        user_id: &str,
        radius: usize,
    ) -> Option<(RankedEntry, Vec<RankedEntry>, Vec<RankedEntry>)> {
        let handle = self.handle(user_id)?;
        let position = self.position(handle);
        let first = position.saturating_sub(radius);
        let mut above = self.page(first as u64, position - first);
        let mut rest = self.page(position as u64, radius + 1).into_iter();
        let me = rest.next().expect("the user is on the board");
        above.truncate(position - first);
        Some((me, above, rest.collect()))
    }

    /// What the board's memory is spent on (allocated, not just used).
    pub fn bytes(&self) -> BoardBytes {
        let Slots { names, slots } = &self.slots;
        let user_ids = names.iter().map(Vec::capacity).sum::<usize>()
            + names.capacity() * std::mem::size_of::<Vec<u8>>();
        let slots = slots.iter().map(Vec::capacity).sum::<usize>() * std::mem::size_of::<Slot>()
            + slots.capacity() * std::mem::size_of::<Vec<Slot>>();
        // A hash table spends a control byte on each bucket besides the handle.
        let lookup = self.lookup.capacity() * 8 / 7 * (std::mem::size_of::<u32>() + 1);
        BoardBytes {
            user_ids,
            index: slots + lookup + self.order.bytes() + std::mem::size_of::<Self>(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;
    use crate::ranking::Submission;

    fn submission(user: u16, score: u32, minute: i64) -> Submission {
        Submission {
            test_id: Uuid::nil(),
            // Ids of several lengths, some sharing a prefix.
            user_id: format!("u{}{}", "x".repeat(user as usize % 4), user),
            attempt_id: Uuid::from_u128(minute as u128 + 1),
            score,
            max_score: 10,
            correct: score,
            // Whole minutes, and ties of time between users too.
            submitted_at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes(minute / 3),
        }
    }

    /// The board sorted afresh: every entry in rank order.
    fn sorted(entries: &BTreeMap<String, Entry>) -> Vec<Entry> {
        let mut sorted: Vec<Entry> = entries.values().cloned().collect();
        sorted.sort_by_key(Entry::rank_key);
        sorted
    }

    fn ranked(sorted: &[Entry], from: usize, to: usize) -> Vec<RankedEntry> {
        sorted[from.min(sorted.len())..to.min(sorted.len())]
            .iter()
            .enumerate()
            .map(|(i, entry)| RankedEntry {
                rank: (from + i) as u64 + 1,
                entry: entry.clone(),
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// After every submission, every rank, neighbourhood and offset page
        /// is what a sort of the entries says; a board built from the
        /// entries at any point answers the same.
        #[test]
        fn the_index_agrees_with_a_sort_of_the_entries(
            raw in prop::collection::vec((0u16..300, 0u32..8), 1..700),
            probes in prop::collection::vec((0u16..300, 0u64..320, 0usize..4), 4),
            rebuild_at in 0usize..700,
        ) {
            let mut index = BoardIndex::new();
            let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
            for (i, (user, score)) in raw.iter().enumerate() {
                let s = submission(*user, *score, i as i64);
                let entry = Entry::record(entries.get(&s.user_id), &s);
                entries.insert(s.user_id.clone(), entry.clone());
                index.upsert(&entry);
                if i == rebuild_at {
                    index = BoardIndex::from_entries(entries.values());
                }
                let sorted = sorted(&entries);
                prop_assert_eq!(index.len(), sorted.len() as u64);
                let position = sorted.iter().position(|e| e.user_id == s.user_id).unwrap();
                prop_assert_eq!(index.ranked(&s.user_id), ranked(&sorted, position, position + 1).pop());
                for (probe_user, offset, radius) in &probes {
                    let offset = *offset as usize;
                    prop_assert_eq!(index.page(offset as u64, 5), ranked(&sorted, offset, offset + 5));
                    let probe = submission(*probe_user, 0, 0).user_id;
                    let expected = sorted.iter().position(|e| e.user_id == probe).map(|p| {
                        let first = p.saturating_sub(*radius);
                        (
                            ranked(&sorted, p, p + 1).pop().unwrap(),
                            ranked(&sorted, first, p),
                            ranked(&sorted, p + 1, p + 1 + radius),
                        )
                    });
                    prop_assert_eq!(index.around(&probe, *radius), expected);
                    // A key's rank, on the board or not: one more than the
                    // entries ahead of it.
                    let key = RankKey {
                        score: *probe_user as u32 % 8,
                        achieved_at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes(offset as i64),
                        user_id: probe,
                    };
                    let ahead = sorted.iter().filter(|e| e.rank_key() < key).count();
                    prop_assert_eq!(index.rank_of_key(&key), ahead as u64 + 1);
                }
            }
        }
    }

    /// What a board of a million entries costs, beside its user ids.
    #[test]
    fn a_large_board_costs_under_64_bytes_an_entry_beyond_its_user_ids() {
        let n = 200_000u32;
        let entries: Vec<Entry> = (0..n)
            .map(|i| Entry {
                user_id: format!("user-{i:08}"),
                best_score: i % 1000,
                max_score: 1000,
                attempt_id: Uuid::from_u128(u128::from(i)),
                achieved_at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(i64::from(i % 977)),
                attempts: 1,
            })
            .collect();
        let mut board = BoardIndex::from_entries(&entries);
        // Then as many improvements again, landing all over the board.
        for entry in entries.iter().step_by(2) {
            board.upsert(&Entry {
                best_score: entry.best_score + 500,
                ..entry.clone()
            });
        }
        let bytes = board.bytes();
        let per_entry = bytes.index as f64 / f64::from(n);
        assert!(per_entry <= 64.0, "{per_entry:.1} bytes an entry");
        assert_eq!(board.len(), u64::from(n));
    }
}
