//! Collection leaderboards: boards of the sum of each user's best scores over
//! a set of tests, in every window.
//!
//! A collection's board in a window's period is a board like a test's, under
//! an id of its own ([`board_id`]), kept by the leaderboard projection. A
//! user's entry on it is composed ([`compose`]) from their entries on the
//! boards of the collection's tests in the same period: the score is the sum
//! of the best scores, `max_score` the sum of those tests' maximum scores,
//! `attempts` counts the tests taken (the API's `tests_taken`), and
//! `achieved_at` is when the total was first reached (the latest time one of
//! the bests that add to it was reached; the first submission while the
//! total is 0). Since an entry is a function of its components, a test added
//! later counts everyone's history on it at once: the collection's boards are
//! composed afresh from its tests' boards.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::ranking::{Entry, Submission};
use crate::windows::{self, Window, PERIODIC};

/// Where collection boards' ids are derived (UUIDv5); not the namespace of
/// tests' periodic boards, and never the collection's own id, so a
/// collection that shares an id with a test still has boards of its own.
const NAMESPACE: Uuid = Uuid::from_u128(0x3e9a_07c4_61d2_4b8f_a513_9c0e_7d24_f6b1);

/// The board of `collection_id` in `window`'s period that starts at `start`
/// (ignored for `all`).
pub fn board_id(collection_id: Uuid, window: Window, start: DateTime<Utc>) -> Uuid {
    let mut name = [0u8; 25];
    name[..16].copy_from_slice(collection_id.as_bytes());
    name[16] = window as u8;
    if window != Window::All {
        name[17..].copy_from_slice(&start.timestamp().to_be_bytes());
    }
    Uuid::new_v5(&NAMESPACE, &name)
}

/// The board of `collection_id` in `window`'s period that holds `at`.
pub fn board_at(collection_id: Uuid, window: Window, at: DateTime<Utc>) -> Uuid {
    let start = window.period(at).map_or(DateTime::UNIX_EPOCH, |p| p.start);
    board_id(collection_id, window, start)
}

/// A user's entry on a collection's board, from their entries on the boards
/// of its tests in the same period (`None` when they have none).
pub fn compose<'a>(components: impl IntoIterator<Item = &'a Entry>) -> Option<Entry> {
    let mut composed: Option<Entry> = None;
    // The component that says when the total was reached: the latest best
    // above 0, or the first entry while every best is 0.
    let mut reached: Option<&Entry> = None;
    for entry in components {
        let total = composed.get_or_insert_with(|| Entry {
            user_id: entry.user_id.clone(),
            best_score: 0,
            max_score: 0,
            attempt_id: entry.attempt_id,
            achieved_at: entry.achieved_at,
            attempts: 0,
        });
        total.best_score += entry.best_score;
        total.max_score += entry.max_score;
        total.attempts += 1;
        let when = |e: &Entry| (e.achieved_at, e.attempt_id);
        let later = |than: &Entry| match (entry.best_score > 0, than.best_score > 0) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => when(entry) > when(than),
            (false, false) => when(entry) < when(than),
        };
        if reached.is_none_or(later) {
            reached = Some(entry);
        }
    }
    let mut composed = composed?;
    let reached = reached.expect("set with the first component");
    composed.achieved_at = reached.achieved_at;
    composed.attempt_id = reached.attempt_id;
    Some(composed)
}

/// A collection's board in one period, with the boards of its tests in that
/// period (in the order the tests were added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectionBoard {
    pub id: Uuid,
    pub components: Vec<Uuid>,
}

/// Which tests each collection holds, and which periods each test has boards
/// in: what the leaderboard needs to keep collection boards in memory (the
/// embedded mode, a rebuild's fold). The Postgres projection keeps the same
/// in `lb_collection_tests` and `lb_boards`.
#[derive(Debug, Default)]
pub struct Collections {
    members: HashMap<Uuid, Vec<Uuid>>,
    containing: HashMap<Uuid, Vec<Uuid>>,
    periods: HashMap<Uuid, BTreeSet<(Window, DateTime<Utc>)>>,
}

impl Collections {
    /// Adds `test_id` to `collection_id`; false if it was there.
    pub fn add(&mut self, collection_id: Uuid, test_id: Uuid) -> bool {
        let members = self.members.entry(collection_id).or_default();
        if members.contains(&test_id) {
            return false;
        }
        members.push(test_id);
        self.containing
            .entry(test_id)
            .or_default()
            .push(collection_id);
        true
    }

    /// Notes the periods `submission` (on its test, not yet on a board) has
    /// boards in.
    pub fn note(&mut self, submission: &Submission) {
        for window in PERIODIC {
            if let Some(period) = window.period(submission.submitted_at) {
                self.note_period(submission.test_id, window, period.start);
            }
        }
    }

    /// Notes that `test_id` has a board in `window`'s period from `start`.
    pub fn note_period(&mut self, test_id: Uuid, window: Window, start: DateTime<Utc>) {
        self.periods
            .entry(test_id)
            .or_default()
            .insert((window, start));
    }

    /// The tests of `collection_id`, in the order they were added.
    pub fn members(&self, collection_id: Uuid) -> &[Uuid] {
        self.members.get(&collection_id).map_or(&[], Vec::as_slice)
    }

    /// The collections boards that `submission` (on its test) counts on.
    pub fn touched_by(&self, submission: &Submission) -> Vec<CollectionBoard> {
        let Some(collections) = self.containing.get(&submission.test_id) else {
            return Vec::new();
        };
        let at = submission.submitted_at;
        let mut boards = Vec::new();
        for collection in collections {
            for window in std::iter::once(Window::All).chain(PERIODIC) {
                boards.push(CollectionBoard {
                    id: board_at(*collection, window, at),
                    components: self
                        .members(*collection)
                        .iter()
                        .map(|test| windows::board_at(*test, window, at))
                        .collect(),
                });
            }
        }
        boards
    }

    /// Every board of `collection_id` that has a component with entries
    /// (any of its tests has a board in that period), the all-time one first.
    pub fn boards_of(&self, collection_id: Uuid) -> Vec<CollectionBoard> {
        let members = self.members(collection_id);
        let periods: BTreeSet<(Window, DateTime<Utc>)> = members
            .iter()
            .filter_map(|test| self.periods.get(test))
            .flatten()
            .copied()
            .collect();
        std::iter::once((Window::All, DateTime::UNIX_EPOCH))
            .chain(periods)
            .map(|(window, start)| CollectionBoard {
                id: board_id(collection_id, window, start),
                components: members
                    .iter()
                    .map(|test| windows::board_id(*test, window, start))
                    .collect(),
            })
            .collect()
    }

    /// Every (test, window, period start) noted.
    pub fn periods(&self) -> impl Iterator<Item = (Uuid, Window, DateTime<Utc>)> + '_ {
        self.periods
            .iter()
            .flat_map(|(test, periods)| periods.iter().map(|(w, start)| (*test, *w, *start)))
    }

    /// Every collection, with its tests.
    pub fn all(&self) -> impl Iterator<Item = (&Uuid, &Vec<Uuid>)> {
        self.members.iter()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        windows::parse_instant(text).unwrap()
    }

    fn entry(user: &str, score: u32, time: &str, attempts: u32) -> Entry {
        Entry {
            user_id: user.into(),
            best_score: score,
            max_score: 10,
            attempt_id: Uuid::from_u128(u128::from(score) + 1),
            achieved_at: at(time),
            attempts,
        }
    }

    #[test]
    fn an_entry_adds_the_bests_and_dates_the_total() {
        let a = entry("u", 7, "2026-12-01T10:00:00Z", 3);
        let b = entry("u", 2, "2026-12-01T09:00:00Z", 1);
        let zero = entry("u", 0, "2026-12-01T11:00:00Z", 1);
        let total = compose([&a, &zero, &b]).unwrap();
        assert_eq!(
            (total.best_score, total.max_score, total.attempts),
            (9, 30, 3)
        );
        // A zero adds nothing: the total was reached with the 7 at 10:00.
        assert_eq!(total.achieved_at, at("2026-12-01T10:00:00Z"));
        assert_eq!(total.attempt_id, a.attempt_id);
        let zeros = compose([&zero, &entry("u", 0, "2026-12-01T08:00:00Z", 2)]).unwrap();
        assert_eq!(zeros.achieved_at, at("2026-12-01T08:00:00Z"));
        assert_eq!(compose([]), None);
    }

    #[test]
    fn collection_boards_are_their_own() {
        let id = Uuid::from_u128(5);
        let now = at("2026-12-02T12:00:00Z");
        assert_ne!(board_at(id, Window::All, now), id);
        assert_ne!(
            board_at(id, Window::All, now),
            windows::board_at(id, Window::All, now)
        );
        assert_ne!(
            board_at(id, Window::Day, now),
            windows::board_at(id, Window::Day, now)
        );
        assert_eq!(
            board_at(id, Window::All, now),
            board_at(id, Window::All, at("1999-01-01"))
        );
        assert_ne!(
            board_at(id, Window::Day, now),
            board_at(id, Window::Week, now)
        );
    }

    /// One step of a random history: a submission some minutes after the
    /// one before, or a test joining the collection (tests 0 and 1 are in it
    /// from the start).
    #[derive(Debug, Clone)]
    enum Step {
        Submit {
            test: u8,
            user: u8,
            score: u32,
            minutes: i64,
        },
        Add {
            test: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0u8..4, 0u8..5, 0u32..5, 0i64..(60 * 24 * 6))
                .prop_map(|(test, user, score, minutes)| Step::Submit { test, user, score, minutes }),
            1 => (0u8..4).prop_map(|test| Step::Add { test }),
        ]
    }

    type Boards = HashMap<Uuid, HashMap<String, Entry>>;

    /// Composes `user`'s entry on `board` from `tests`' boards into `kept`.
    fn compose_into(kept: &mut Boards, tests: &Boards, board: &CollectionBoard, user: &str) {
        let parts = board
            .components
            .iter()
            .filter_map(|b| tests.get(b)?.get(user));
        if let Some(entry) = compose(parts) {
            kept.entry(board.id)
                .or_default()
                .insert(user.to_string(), entry);
        }
    }

    proptest! {
        /// Boards kept as submissions arrive and tests join (the touched
        /// boards composed afresh; all of them on a join) equal the naive
        /// recomputation from the plain list of submissions: per period and
        /// user, the running sum over the collection's (final) tests of the
        /// user's best, dated by the submission that last raised it.
        #[test]
        fn kept_boards_equal_a_recomputation(steps in proptest::collection::vec(step(), 1..80)) {
            let collection = Uuid::from_u128(99);
            let test = |n: u8| Uuid::from_u128(u128::from(n) + 1);
            let users: Vec<String> = (0..5).map(|u| format!("user-{u}")).collect();
            // Across the leap day, a month end and a year's weeks.
            let mut now = at("2028-02-24T00:00:00Z");
            let mut memberships = Collections::default();
            memberships.add(collection, test(0));
            memberships.add(collection, test(1));
            let mut tests = Boards::new();
            let mut kept = Boards::new();
            let mut submissions: Vec<Submission> = Vec::new();
            for (i, step) in steps.iter().enumerate() {
                match step {
                    Step::Submit { test: t, user, score, minutes } => {
                        now += chrono::Duration::minutes(*minutes);
                        let submission = Submission {
                            test_id: test(*t),
                            user_id: users[usize::from(*user)].clone(),
                            attempt_id: Uuid::from_u128(i as u128 + 1000),
                            score: *score,
                            max_score: 4,
                            correct: *score,
                            submitted_at: now,
                        };
                        memberships.note(&submission);
                        for on_board in windows::boards_of(&submission) {
                            let board = tests.entry(on_board.test_id).or_default();
                            let entry = Entry::record(board.get(&on_board.user_id), &on_board);
                            board.insert(on_board.user_id.clone(), entry);
                        }
                        for board in memberships.touched_by(&submission) {
                            compose_into(&mut kept, &tests, &board, &submission.user_id);
                        }
                        submissions.push(submission);
                    }
                    Step::Add { test: t } => {
                        if memberships.add(collection, test(*t)) {
                            for board in memberships.boards_of(collection) {
                                for user in &users {
                                    compose_into(&mut kept, &tests, &board, user);
                                }
                            }
                        }
                    }
                }
            }
            let members = memberships.members(collection).to_vec();
            // (board, user) → (each member's best, total, tests taken, when, attempt).
            type Running = (HashMap<Uuid, u32>, u32, u32, DateTime<Utc>, Uuid);
            let mut naive: HashMap<(Uuid, String), Running> = HashMap::new();
            for s in submissions.iter().filter(|s| members.contains(&s.test_id)) {
                for window in std::iter::once(Window::All).chain(PERIODIC) {
                    let key = (board_at(collection, window, s.submitted_at), s.user_id.clone());
                    let running = naive
                        .entry(key)
                        .or_insert_with(|| (HashMap::new(), 0, 0, s.submitted_at, s.attempt_id));
                    let best = running.0.entry(s.test_id).or_insert_with(|| {
                        running.2 += 1;
                        0
                    });
                    if s.score > *best {
                        running.1 += s.score - *best;
                        *best = s.score;
                        running.3 = s.submitted_at;
                        running.4 = s.attempt_id;
                    }
                }
            }
            type Row = (u32, u32, DateTime<Utc>, Uuid);
            let got: HashMap<(Uuid, String), Row> = kept
                .iter()
                .flat_map(|(board, entries)| entries.iter().map(move |(user, e)| {
                    ((*board, user.clone()), (e.best_score, e.attempts, e.achieved_at, e.attempt_id))
                }))
                .collect();
            let expected: HashMap<(Uuid, String), Row> = naive
                .into_iter()
                .map(|(key, (_, total, taken, when, attempt))| (key, (total, taken, when, attempt)))
                .collect();
            prop_assert_eq!(got, expected);
        }
    }
}
