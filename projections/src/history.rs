//! Rank history: a user's best score and rank on a board right after each
//! of their submissions, folded from the board's submissions in the order
//! they were made. A fold of the whole history, so it covers every attempt,
//! whenever it was made; each step costs O(log n) (a [`BoardIndex`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::board_index::BoardIndex;
use crate::ranking::{Entry, Submission};

/// One of a user's submissions, and where it left them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryItem {
    pub attempt_id: Uuid,
    pub submitted_at: DateTime<Utc>,
    pub score: u32,
    /// The user's best score right after it.
    pub best_score: u32,
    /// The user's rank on the board right after it.
    pub rank: u64,
}

/// `user_id`'s history among `submissions` (one board's, in any order),
/// oldest first: the board is replayed in the order the submissions were
/// made (time, then attempt id), and only as far as the user's last.
pub fn rank_history(mut submissions: Vec<Submission>, user_id: &str) -> Vec<HistoryItem> {
    Submission::in_log_order(&mut submissions);
    let Some(last) = submissions.iter().rposition(|s| s.user_id == user_id) else {
        return Vec::new();
    };
    submissions.truncate(last + 1);
    let mut entries: HashMap<String, Entry> = HashMap::new();
    let mut board = BoardIndex::new();
    let mut items = Vec::new();
    for submission in submissions {
        let entry = Entry::record(entries.get(&submission.user_id), &submission);
        board.upsert(&entry);
        if submission.user_id == user_id {
            let rank = board.ranked(user_id).map_or(0, |ranked| ranked.rank);
            items.push(HistoryItem {
                attempt_id: submission.attempt_id,
                submitted_at: submission.submitted_at,
                score: submission.score,
                best_score: entry.best_score,
                rank,
            });
        }
        entries.insert(submission.user_id, entry);
    }
    items
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;
    use proptest::prelude::*;

    use super::*;
    use crate::ranking::Board;

    fn submission(i: usize, user: u8, score: u32) -> Submission {
        Submission {
            test_id: Uuid::nil(),
            user_id: format!("u{user}"),
            attempt_id: Uuid::from_u128(i as u128),
            score,
            max_score: 10,
            correct: score,
            // Some at the same instant: the attempt id orders them.
            submitted_at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::minutes((i / 2) as i64),
        }
    }

    proptest! {
        /// The rank after each of a user's submissions is the rank that
        /// replaying the board up to it gives, whatever order the
        /// submissions are handed over in.
        #[test]
        fn each_rank_is_what_a_replay_of_the_prefix_gives(
            (subs, shuffled) in prop::collection::vec((0u8..6, 0u32..5), 1..50)
                .prop_map(|raw| raw.into_iter().enumerate()
                    .map(|(i, (user, score))| submission(i, user, score))
                    .collect::<Vec<_>>())
                .prop_flat_map(|subs| (Just(subs.clone()), Just(subs).prop_shuffle())),
        ) {
            for user in 0u8..6 {
                let user = format!("u{user}");
                let mut replay = Board::default();
                let mut expected = Vec::new();
                for s in &subs {
                    let (_, rank) = replay.record(s);
                    if s.user_id == user {
                        let best = replay.ranked().into_iter().find(|e| e.user_id == user).unwrap().best_score;
                        expected.push((s.attempt_id, s.score, best, rank as u64));
                    }
                }
                let got: Vec<_> = rank_history(shuffled.clone(), &user)
                    .into_iter()
                    .map(|i| (i.attempt_id, i.score, i.best_score, i.rank))
                    .collect();
                prop_assert_eq!(got, expected);
            }
        }
    }

    #[test]
    fn a_user_without_submissions_has_no_history() {
        assert!(rank_history(vec![submission(0, 1, 3)], "u2").is_empty());
    }
}
