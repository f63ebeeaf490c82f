//! Leaderboard rules, pure: what a submission does to a user's entry, and
//! the order entries rank in. The Postgres store and the in-memory [`Board`]
//! both follow them.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use podium_domain::attempt::AttemptEvent;
use podium_domain::log::{PodiumEvent, RecordedEvent};
use uuid::Uuid;

use crate::checkpointed::BoxError;

/// A submitted, graded attempt, as the leaderboard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub test_id: Uuid,
    pub user_id: String,
    pub attempt_id: Uuid,
    pub score: u32,
    pub max_score: u32,
    /// Questions answered correctly.
    pub correct: u32,
    pub submitted_at: DateTime<Utc>,
}

impl Submission {
    /// The submission an `AttemptSubmitted` event records; `None` for any
    /// other attempt event. The one conversion every reader of submissions
    /// (leaderboards, the notification policy) uses.
    pub fn from_event(event: &AttemptEvent) -> Option<Self> {
        let AttemptEvent::AttemptSubmitted {
            attempt_id,
            test_id,
            user_id,
            score,
            max_score,
            correct,
            submitted_at,
            ..
        } = event
        else {
            return None;
        };
        Some(Self {
            test_id: *test_id,
            user_id: user_id.to_string(),
            attempt_id: *attempt_id,
            score: *score,
            max_score: *max_score,
            correct: *correct,
            submitted_at: *submitted_at,
        })
    }

    /// The event that records this submission (one answered question), at
    /// log seq `seq`: what tests and benchmarks feed projections.
    pub fn recorded(&self, seq: u64) -> RecordedEvent {
        let event = AttemptEvent::AttemptSubmitted {
            attempt_id: self.attempt_id,
            test_id: self.test_id,
            user_id: podium_domain::UserId::parse(self.user_id.clone())
                .expect("a submission's user id is valid"),
            answers: Default::default(),
            score: self.score,
            max_score: self.max_score,
            correct: self.correct,
            question_count: 1,
            duration_ms: 1,
            submitted_at: self.submitted_at,
        };
        RecordedEvent {
            seq,
            position: seq as i64,
            aggregate_type: "Attempt".into(),
            aggregate_id: self.attempt_id.to_string(),
            sequence: 1,
            event_type: "AttemptSubmitted".into(),
            event_version: podium_domain::EVENT_VERSION.into(),
            payload: podium_domain::log::payload_of(&event),
            metadata: Default::default(),
            recorded_at: self.submitted_at,
        }
    }

    /// Puts `submissions` in the order the log records them: by time, then
    /// attempt id (what folds of a board's past replay them in).
    pub fn in_log_order(submissions: &mut [Submission]) {
        submissions.sort_unstable_by(|a, b| {
            a.submitted_at
                .cmp(&b.submitted_at)
                .then(a.attempt_id.cmp(&b.attempt_id))
        });
    }

    /// Whether events of `event_type` record submissions.
    pub fn is(event_type: &str) -> bool {
        event_type == "AttemptSubmitted"
    }

    /// The submission `event` records, if it is one (other events are told
    /// by their type, without decoding them).
    pub fn of(event: &RecordedEvent) -> Result<Option<Self>, BoxError> {
        if !Self::is(&event.event_type) {
            return Ok(None);
        }
        Ok(match event.decode()? {
            PodiumEvent::Attempt(attempt) => Self::from_event(&attempt),
            _ => None,
        })
    }
}

/// The fields of an entry a later submission changes, wherever the entry
/// is kept ([`Entry`], or a rebuild's leaner copy).
pub struct Best<'a> {
    pub score: &'a mut u32,
    pub max_score: &'a mut u32,
    pub attempt_id: &'a mut Uuid,
    pub achieved_at: &'a mut DateTime<Utc>,
    pub attempts: &'a mut u32,
}

impl Submission {
    /// Counts this submission in an entry of its user's: one attempt more;
    /// a better score replaces the best, an equal or lower one does not
    /// (the earliest time a score was reached is what ranks).
    pub fn count_in(&self, best: Best<'_>) {
        *best.attempts += 1;
        if self.score > *best.score {
            *best.score = self.score;
            *best.max_score = self.max_score;
            *best.attempt_id = self.attempt_id;
            *best.achieved_at = self.submitted_at;
        }
    }
}

/// A user's entry on one test's leaderboard: their best attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub user_id: String,
    pub best_score: u32,
    pub max_score: u32,
    pub attempt_id: Uuid,
    /// When the best score was first reached.
    pub achieved_at: DateTime<Utc>,
    /// Submitted attempts on this test.
    pub attempts: u32,
}

impl Entry {
    /// The entry after `submission`. A better score replaces the best; an
    /// equal or lower one only counts as an attempt (the earliest time a
    /// score was reached is what ranks).
    pub fn record(previous: Option<&Entry>, submission: &Submission) -> Entry {
        match previous {
            Some(entry) => {
                let mut entry = entry.clone();
                entry.absorb(submission);
                entry
            }
            None => Entry {
                user_id: submission.user_id.clone(),
                best_score: submission.score,
                max_score: submission.max_score,
                attempt_id: submission.attempt_id,
                achieved_at: submission.submitted_at,
                attempts: 1,
            },
        }
    }

    /// [`Entry::record`] in place: this entry after `submission` (its user's).
    pub fn absorb(&mut self, submission: &Submission) {
        submission.count_in(Best {
            score: &mut self.best_score,
            max_score: &mut self.max_score,
            attempt_id: &mut self.attempt_id,
            achieved_at: &mut self.achieved_at,
            attempts: &mut self.attempts,
        });
    }

    pub fn rank_key(&self) -> RankKey {
        RankKey {
            score: self.best_score,
            achieved_at: self.achieved_at,
            user_id: self.user_id.clone(),
        }
    }

    /// The order of two entries on a board (the better first), as their
    /// [`RankKey`]s compare, without building them.
    pub fn rank_cmp(&self, other: &Entry) -> Ordering {
        other
            .best_score
            .cmp(&self.best_score)
            .then(self.achieved_at.cmp(&other.achieved_at))
            .then_with(|| self.user_id.cmp(&other.user_id))
    }

    /// Whether `submission` improved on this entry (the previous one).
    pub fn improved_by(previous: Option<&Entry>, submission: &Submission) -> bool {
        previous.is_none_or(|e| submission.score > e.best_score)
    }
}

/// Where an entry ranks: score descending, then earliest, then user id.
/// `RankKey`s sort in rank order (the best first).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RankKey {
    pub score: u32,
    pub achieved_at: DateTime<Utc>,
    pub user_id: String,
}

impl Ord for RankKey {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .score
            .cmp(&self.score)
            .then(self.achieved_at.cmp(&other.achieved_at))
            .then_with(|| self.user_id.cmp(&other.user_id))
    }
}

impl PartialOrd for RankKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// An in-memory leaderboard of one test, kept by the same rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Board {
    entries: BTreeMap<String, Entry>,
}

impl Board {
    /// Applies a submission; returns the previous and new 1-based ranks.
    pub fn record(&mut self, submission: &Submission) -> (Option<usize>, usize) {
        let previous_rank = self.rank_of(&submission.user_id);
        let entry = Entry::record(self.entries.get(&submission.user_id), submission);
        self.entries.insert(submission.user_id.clone(), entry);
        let rank = self.rank_of(&submission.user_id).expect("just recorded");
        (previous_rank, rank)
    }

    pub fn rank_of(&self, user_id: &str) -> Option<usize> {
        let key = self.entries.get(user_id)?.rank_key();
        Some(self.entries.values().filter(|e| e.rank_key() < key).count() + 1)
    }

    /// Every entry in rank order.
    pub fn ranked(&self) -> Vec<Entry> {
        let mut entries: Vec<Entry> = self.entries.values().cloned().collect();
        entries.sort_by(Entry::rank_cmp);
        entries
    }
}

/// The board `submissions` make, every entry in rank order: each is
/// recorded in the order of its time (then attempt id), as the log records
/// them. What a board looked like at an instant is this fold over the
/// submissions made up to it.
pub fn board_of(mut submissions: Vec<Submission>) -> Vec<Entry> {
    Submission::in_log_order(&mut submissions);
    board_of_ordered(&submissions)
}

/// [`board_of`] for `submissions` already in log order.
pub fn board_of_ordered(submissions: &[Submission]) -> Vec<Entry> {
    let mut entries: std::collections::HashMap<&str, Entry> =
        std::collections::HashMap::with_capacity(submissions.len());
    for submission in submissions {
        match entries.get_mut(submission.user_id.as_str()) {
            Some(entry) => entry.absorb(submission),
            None => {
                entries.insert(&submission.user_id, Entry::record(None, submission));
            }
        }
    }
    let mut ranked: Vec<Entry> = entries.into_values().collect();
    // One entry per user: no two are equal.
    ranked.sort_unstable_by(Entry::rank_cmp);
    ranked
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;

    fn at(minute: i64) -> DateTime<Utc> {
        DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes(minute)
    }

    fn submission(user: u8, score: u32, minute: i64) -> Submission {
        Submission {
            test_id: Uuid::nil(),
            user_id: format!("u{user}"),
            attempt_id: Uuid::from_u128(minute as u128),
            score,
            max_score: 10,
            correct: score,
            submitted_at: at(minute),
        }
    }

    /// The rules applied directly: per user, the best score, the earliest
    /// time it was reached, and the number of attempts; ranked by sorting.
    fn naive(submissions: &[Submission]) -> Vec<(String, u32, DateTime<Utc>, u32)> {
        let mut by_user: HashMap<&str, Vec<&Submission>> = HashMap::new();
        for s in submissions {
            by_user.entry(&s.user_id).or_default().push(s);
        }
        let mut rows: Vec<_> = by_user
            .into_iter()
            .map(|(user, subs)| {
                let best = subs.iter().map(|s| s.score).max().unwrap();
                let first = subs
                    .iter()
                    .filter(|s| s.score == best)
                    .map(|s| s.submitted_at)
                    .min()
                    .unwrap();
                (user.to_string(), best, first, subs.len() as u32)
            })
            .collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
        rows
    }

    fn submissions() -> impl Strategy<Value = Vec<Submission>> {
        // Few users and scores so that ties and repeats are common; minutes
        // increase, as submissions arrive in log order.
        prop::collection::vec((0u8..8, 0u32..6), 1..60).prop_map(|raw| {
            raw.into_iter()
                .enumerate()
                .map(|(i, (user, score))| submission(user, score, i as i64))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn the_incremental_board_equals_the_rules_applied_directly(subs in submissions()) {
            let mut board = Board::default();
            for (i, s) in subs.iter().enumerate() {
                let (_, rank) = board.record(s);
                // The rank reported at each step is the rank by the rules so far.
                let expected = naive(&subs[..=i]).iter().position(|r| r.0 == s.user_id).unwrap() + 1;
                prop_assert_eq!(rank, expected);
            }
            let ranked: Vec<_> = board
                .ranked()
                .into_iter()
                .map(|e| (e.user_id, e.best_score, e.achieved_at, e.attempts))
                .collect();
            prop_assert_eq!(ranked, naive(&subs));
        }

        #[test]
        fn a_board_as_of_any_instant_is_the_rules_over_the_submissions_up_to_it(
            (subs, shuffled) in submissions()
                .prop_flat_map(|subs| (Just(subs.clone()), Just(subs).prop_shuffle())),
            instant in -1i64..61,
        ) {
            // Handed over in any order, folded up to `instant` only.
            let given: Vec<Submission> = shuffled
                .into_iter()
                .filter(|s| s.submitted_at <= at(instant))
                .collect();
            let board: Vec<_> = board_of(given)
                .into_iter()
                .map(|e| (e.user_id, e.best_score, e.achieved_at, e.attempts))
                .collect();
            let upto: Vec<Submission> = subs.iter().take_while(|s| s.submitted_at <= at(instant)).cloned().collect();
            prop_assert_eq!(board, naive(&upto));
        }

        #[test]
        fn rebuilding_from_any_prefix_gives_the_same_board(subs in submissions(), cut in 0usize..60) {
            let mut whole = Board::default();
            for s in &subs {
                whole.record(s);
            }
            // A board rebuilt up to `cut` and then continued live ends equal.
            let cut = cut.min(subs.len());
            let mut resumed = Board::default();
            for s in &subs[..cut] {
                resumed.record(s);
            }
            let mut continued = resumed.clone();
            for s in &subs[cut..] {
                continued.record(s);
            }
            prop_assert_eq!(continued, whole);
        }
    }

    #[test]
    fn a_tie_keeps_the_earliest_time_and_counts_the_attempt() {
        let first = Entry::record(None, &submission(1, 5, 1));
        let tie = Entry::record(Some(&first), &submission(1, 5, 9));
        assert_eq!(tie.achieved_at, at(1));
        assert_eq!(tie.attempts, 2);
        let better = Entry::record(Some(&tie), &submission(1, 6, 10));
        assert_eq!(
            (better.best_score, better.achieved_at, better.attempts),
            (6, at(10), 3)
        );
    }
}
