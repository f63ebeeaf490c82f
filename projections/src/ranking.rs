//! Leaderboard rules, pure: what a submission does to a user's entry, and
//! the order entries rank in. The Postgres store and the in-memory [`Board`]
//! both follow them.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

/// A submitted, graded attempt, as the leaderboard sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub test_id: Uuid,
    pub user_id: String,
    pub attempt_id: Uuid,
    pub score: u32,
    pub max_score: u32,
    pub submitted_at: DateTime<Utc>,
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
            Some(entry) if submission.score <= entry.best_score => Entry {
                attempts: entry.attempts + 1,
                ..entry.clone()
            },
            _ => Entry {
                user_id: submission.user_id.clone(),
                best_score: submission.score,
                max_score: submission.max_score,
                attempt_id: submission.attempt_id,
                achieved_at: submission.submitted_at,
                attempts: previous.map_or(1, |e| e.attempts + 1),
            },
        }
    }

    pub fn rank_key(&self) -> RankKey {
        RankKey {
            score: self.best_score,
            achieved_at: self.achieved_at,
            user_id: self.user_id.clone(),
        }
    }

    /// Whether `submission` improved on this entry (the previous one).
    pub fn improved_by(previous: Option<&Entry>, submission: &Submission) -> bool {
        previous.is_none_or(|e| submission.score > e.best_score)
    }
}

/// Where an entry ranks: score descending, then earliest, then user id.
/// `RankKey`s sort in rank order (the best first).
#[derive(Debug, Clone, PartialEq, Eq)]
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
        entries.sort_by_key(Entry::rank_key);
        entries
    }
}
