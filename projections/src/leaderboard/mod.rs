//! The leaderboard projection and its Postgres store.

use podium_domain::attempt::AttemptEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use serde_json::json;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use std::collections::HashMap;

use crate::checkpointed::{apply_each, BoxError, ProjectionLogic};
use crate::ranking::{Entry, RankKey, Submission};
use crate::tables::Generation;

mod queries;
pub use queries::{Around, LeaderboardQueries, Page, PageStart, RankedEntry};

pub const NAME: &str = "leaderboard";
pub const TABLES: [&str; 2] = ["lb_entries", "lb_score_counts"];
/// The topic of leaderboard change notifications (key: the test id).
pub const TOPIC: &str = "leaderboard";

/// Keeps `lb_entries` and `lb_score_counts` from `AttemptSubmitted` events.
pub struct LeaderboardProjection {
    generation: Generation,
    entries: String,
    counts: String,
}

impl LeaderboardProjection {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            entries: generation.table("lb_entries"),
            counts: generation.table("lb_score_counts"),
        }
    }

    async fn entry(
        &self,
        conn: &mut PgConnection,
        test_id: Uuid,
        user_id: &str,
    ) -> Result<Option<Entry>, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT user_id, best_score, max_score, attempt_id, achieved_at, attempts
               FROM {} WHERE test_id = $1 AND user_id = $2 FOR UPDATE",
            self.entries
        ))
        .bind(test_id)
        .bind(user_id)
        .fetch_optional(conn)
        .await?;
        row.map(|row| entry_from_row(&row)).transpose()
    }

    async fn record(
        &self,
        conn: &mut PgConnection,
        submission: &Submission,
        seq: u64,
    ) -> Result<Vec<Change>, BoxError> {
        let previous = self
            .entry(conn, submission.test_id, &submission.user_id)
            .await?;
        let entry = Entry::record(previous.as_ref(), submission);
        let live = self.generation == Generation::Live;
        let previous_rank = match (&previous, live) {
            (Some(p), true) => Some(
                rank_in(
                    &mut *conn,
                    &self.entries,
                    &self.counts,
                    submission.test_id,
                    &p.rank_key(),
                )
                .await?,
            ),
            _ => None,
        };
        sqlx::query(&format!(
            "INSERT INTO {} (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                             attempts, changed_seq)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (test_id, user_id) DO UPDATE
                SET best_score = EXCLUDED.best_score, max_score = EXCLUDED.max_score,
                    attempt_id = EXCLUDED.attempt_id, achieved_at = EXCLUDED.achieved_at,
                    attempts = EXCLUDED.attempts, changed_seq = EXCLUDED.changed_seq",
            self.entries
        ))
        .bind(submission.test_id)
        .bind(&entry.user_id)
        .bind(entry.best_score as i32)
        .bind(entry.max_score as i32)
        .bind(entry.attempt_id)
        .bind(entry.achieved_at)
        .bind(entry.attempts as i32)
        .bind(seq as i64)
        .execute(&mut *conn)
        .await?;
        let mut deltas = HashMap::new();
        count_move(&mut deltas, previous.as_ref(), &entry, submission);
        self.apply_count_deltas(conn, deltas).await?;
        if !live {
            return Ok(Vec::new());
        }
        if let Some(previous) = previous
            .as_ref()
            .filter(|p| p.rank_key() != entry.rank_key())
        {
            record_move(conn, seq, submission.test_id, previous).await?;
        }
        let rank = rank_in(
            &mut *conn,
            &self.entries,
            &self.counts,
            submission.test_id,
            &entry.rank_key(),
        )
        .await?;
        Ok(vec![entry_change(
            submission.test_id,
            seq,
            &entry,
            rank,
            previous_rank,
        )])
    }
}

/// The change a recorded submission announces: the entry's new rank.
pub fn entry_change(
    test_id: Uuid,
    seq: u64,
    entry: &Entry,
    rank: u64,
    previous_rank: Option<u64>,
) -> Change {
    Change {
        topic: TOPIC.into(),
        key: test_id.to_string(),
        seq,
        data: json!({
            "user_id": entry.user_id,
            "score": entry.best_score,
            "rank": rank,
            "previous_rank": previous_rank,
            "attempts": entry.attempts,
        }),
    }
}

impl LeaderboardProjection {
    /// A rebuild's batch: the entries of everyone in it are read once, the
    /// rules run in memory, and entries and score counts are written back in
    /// a few set-wise statements instead of several per event.
    async fn record_batch(
        &self,
        conn: &mut PgConnection,
        submissions: &[(u64, Submission)],
    ) -> Result<(), sqlx::Error> {
        let mut keys: Vec<(Uuid, String)> = submissions
            .iter()
            .map(|(_, s)| (s.test_id, s.user_id.clone()))
            .collect();
        keys.sort();
        keys.dedup();
        let (tests, users): (Vec<Uuid>, Vec<String>) = keys.into_iter().unzip();
        let rows = sqlx::query(&format!(
            "SELECT e.test_id, e.user_id, e.best_score, e.max_score, e.attempt_id, e.achieved_at,
                    e.attempts, e.changed_seq
               FROM {} e JOIN UNNEST($1::uuid[], $2::text[]) k(test_id, user_id)
                 ON e.test_id = k.test_id AND e.user_id = k.user_id",
            self.entries
        ))
        .bind(&tests)
        .bind(&users)
        .fetch_all(&mut *conn)
        .await?;
        // Each entry with the seq of its last change.
        let mut entries: HashMap<(Uuid, String), (Entry, u64)> = HashMap::new();
        for row in &rows {
            let test: Uuid = row.try_get("test_id")?;
            let entry = entry_from_row(row)?;
            let changed: i64 = row.try_get("changed_seq")?;
            entries.insert((test, entry.user_id.clone()), (entry, changed as u64));
        }
        let mut deltas: HashMap<(Uuid, u32), i32> = HashMap::new();
        for (seq, submission) in submissions {
            let key = (submission.test_id, submission.user_id.clone());
            let previous = entries.get(&key).map(|(entry, _)| entry);
            let entry = Entry::record(previous, submission);
            count_move(&mut deltas, previous, &entry, submission);
            entries.insert(key, (entry, *seq));
        }
        let touched: Vec<(&(Uuid, String), &Entry)> = entries
            .iter()
            .map(|(key, (entry, _))| (key, entry))
            .collect();
        let changed: Vec<i64> = entries.values().map(|(_, seq)| *seq as i64).collect();
        sqlx::query(&format!(
            "INSERT INTO {} (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                             attempts, changed_seq)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::int[], $5::uuid[],
                                  $6::timestamptz[], $7::int[], $8::bigint[])
             ON CONFLICT (test_id, user_id) DO UPDATE
                SET best_score = EXCLUDED.best_score, max_score = EXCLUDED.max_score,
                    attempt_id = EXCLUDED.attempt_id, achieved_at = EXCLUDED.achieved_at,
                    attempts = EXCLUDED.attempts, changed_seq = EXCLUDED.changed_seq",
            self.entries
        ))
        .bind(touched.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(touched.iter().map(|(k, _)| k.1.clone()).collect::<Vec<_>>())
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.best_score as i32)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.max_score as i32)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.attempt_id)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.achieved_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            touched
                .iter()
                .map(|(_, e)| e.attempts as i32)
                .collect::<Vec<_>>(),
        )
        .bind(&changed)
        .execute(&mut *conn)
        .await?;
        self.apply_count_deltas(conn, deltas).await
    }

    /// Adds `deltas` ((test, score) → change in entries) to the score table:
    /// gains by upsert, losses by update (an upsert would check the
    /// constraint `entries >= 0` on the negative delta itself).
    async fn apply_count_deltas(
        &self,
        conn: &mut PgConnection,
        deltas: HashMap<(Uuid, u32), i32>,
    ) -> Result<(), sqlx::Error> {
        let (gains, losses): (Vec<_>, Vec<_>) = deltas
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .partition(|(_, d)| *d > 0);
        for (changes, statement) in [
            (
                gains,
                format!(
                    "INSERT INTO {c} (test_id, score, entries)
                     SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::int[])
                     ON CONFLICT (test_id, score) DO UPDATE SET entries = {c}.entries + EXCLUDED.entries",
                    c = self.counts
                ),
            ),
            (
                losses,
                format!(
                    "UPDATE {c} SET entries = {c}.entries + d.delta
                       FROM UNNEST($1::uuid[], $2::int[], $3::int[]) d(test_id, score, delta)
                      WHERE {c}.test_id = d.test_id AND {c}.score = d.score",
                    c = self.counts
                ),
            ),
        ] {
            if changes.is_empty() {
                continue;
            }
            sqlx::query(&statement)
                .bind(changes.iter().map(|((t, _), _)| *t).collect::<Vec<_>>())
                .bind(changes.iter().map(|((_, s), _)| *s as i32).collect::<Vec<_>>())
                .bind(changes.iter().map(|(_, d)| *d).collect::<Vec<_>>())
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Records in `deltas` how `submission` moved its user between scores.
fn count_move(
    deltas: &mut HashMap<(Uuid, u32), i32>,
    previous: Option<&Entry>,
    entry: &Entry,
    submission: &Submission,
) {
    if Entry::improved_by(previous, submission) {
        if let Some(previous) = previous {
            *deltas
                .entry((submission.test_id, previous.best_score))
                .or_default() -= 1;
        }
        *deltas
            .entry((submission.test_id, entry.best_score))
            .or_default() += 1;
    }
}

/// The submission an event records, if it is one.
fn submission_of(event: &RecordedEvent) -> Result<Option<Submission>, BoxError> {
    if event.event_type != "AttemptSubmitted" {
        return Ok(None);
    }
    let PodiumEvent::Attempt(AttemptEvent::AttemptSubmitted {
        attempt_id,
        test_id,
        user_id,
        score,
        max_score,
        submitted_at,
        ..
    }) = event.decode()?
    else {
        return Ok(None);
    };
    Ok(Some(Submission {
        test_id,
        user_id: user_id.to_string(),
        attempt_id,
        score,
        max_score,
        submitted_at,
    }))
}

impl ProjectionLogic for LeaderboardProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "leaderboard__next",
        }
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<Vec<Change>, BoxError> {
        match submission_of(event)? {
            Some(submission) => self.record(conn, &submission, event.seq).await,
            None => Ok(Vec::new()),
        }
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        // Live batches announce each entry's new rank, one event at a time.
        if self.generation == Generation::Live {
            return apply_each(self, conn, events).await;
        }
        let submissions: Vec<(u64, Submission)> = events
            .iter()
            .filter_map(|e| submission_of(e).map(|s| s.map(|s| (e.seq, s))).transpose())
            .collect::<Result<_, _>>()?;
        if !submissions.is_empty() {
            self.record_batch(conn, &submissions).await?;
        }
        Ok(Vec::new())
    }
}

/// Notes where `previous` stood before the submission at `seq` moved it up.
async fn record_move(
    conn: &mut PgConnection,
    seq: u64,
    test_id: Uuid,
    previous: &Entry,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO lb_moves (seq, test_id, user_id, old_score, old_achieved_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
    )
    .bind(seq as i64)
    .bind(test_id)
    .bind(&previous.user_id)
    .bind(previous.best_score as i32)
    .bind(previous.achieved_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) fn entry_from_row(row: &sqlx::postgres::PgRow) -> Result<Entry, sqlx::Error> {
    Ok(Entry {
        user_id: row.try_get("user_id")?,
        best_score: row.try_get::<i32, _>("best_score")? as u32,
        max_score: row.try_get::<i32, _>("max_score")? as u32,
        attempt_id: row.try_get("attempt_id")?,
        achieved_at: row.try_get("achieved_at")?,
        attempts: row.try_get::<i32, _>("attempts")? as u32,
    })
}

/// The 1-based rank `key` has (or would have) on test `test_id`: the entries
/// with a higher score, counted from the score table, plus the entries with
/// the same score that rank ahead, from a short index range.
pub(crate) async fn rank_in(
    conn: &mut PgConnection,
    entries: &str,
    counts: &str,
    test_id: Uuid,
    key: &RankKey,
) -> Result<u64, sqlx::Error> {
    let ahead: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT COALESCE(sum(entries), 0) FROM {counts} WHERE test_id = $1 AND score > $2)::bigint
              + (SELECT count(*) FROM {entries}
                  WHERE test_id = $1 AND -best_score = -$2 AND (achieved_at, user_id) < ($3, $4))"
    ))
    .bind(test_id)
    .bind(key.score as i32)
    .bind(key.achieved_at)
    .bind(&key.user_id)
    .fetch_one(conn)
    .await?;
    Ok(ahead as u64 + 1)
}
