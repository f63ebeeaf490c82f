//! The leaderboard projection and its Postgres store.

use podium_domain::attempt::AttemptEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use serde_json::json;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::checkpointed::{BoxError, ProjectionLogic};
use crate::ranking::{Entry, RankKey, Submission};
use crate::tables::Generation;

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

    /// Counts one more entry at `score`.
    async fn count_in(
        &self,
        conn: &mut PgConnection,
        test_id: Uuid,
        score: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "INSERT INTO {counts} (test_id, score, entries) VALUES ($1, $2, 1)
             ON CONFLICT (test_id, score) DO UPDATE SET entries = {counts}.entries + 1",
            counts = self.counts
        ))
        .bind(test_id)
        .bind(score as i32)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Counts one entry fewer at `score` (it moved to a better one).
    async fn count_out(
        &self,
        conn: &mut PgConnection,
        test_id: Uuid,
        score: u32,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(&format!(
            "UPDATE {} SET entries = entries - 1 WHERE test_id = $1 AND score = $2",
            self.counts
        ))
        .bind(test_id)
        .bind(score as i32)
        .execute(conn)
        .await?;
        Ok(())
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
            "INSERT INTO {} (test_id, user_id, best_score, max_score, attempt_id, achieved_at, attempts)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (test_id, user_id) DO UPDATE
                SET best_score = EXCLUDED.best_score, max_score = EXCLUDED.max_score,
                    attempt_id = EXCLUDED.attempt_id, achieved_at = EXCLUDED.achieved_at,
                    attempts = EXCLUDED.attempts",
            self.entries
        ))
        .bind(submission.test_id)
        .bind(&entry.user_id)
        .bind(entry.best_score as i32)
        .bind(entry.max_score as i32)
        .bind(entry.attempt_id)
        .bind(entry.achieved_at)
        .bind(entry.attempts as i32)
        .execute(&mut *conn)
        .await?;
        if Entry::improved_by(previous.as_ref(), submission) {
            if let Some(previous) = &previous {
                self.count_out(conn, submission.test_id, previous.best_score)
                    .await?;
            }
            self.count_in(conn, submission.test_id, entry.best_score)
                .await?;
        }
        if !live {
            return Ok(Vec::new());
        }
        let rank = rank_in(
            &mut *conn,
            &self.entries,
            &self.counts,
            submission.test_id,
            &entry.rank_key(),
        )
        .await?;
        Ok(vec![Change {
            topic: TOPIC.into(),
            key: submission.test_id.to_string(),
            seq,
            data: json!({
                "user_id": entry.user_id,
                "score": entry.best_score,
                "rank": rank,
                "previous_rank": previous_rank,
                "attempts": entry.attempts,
            }),
        }])
    }
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
        if event.event_type != "AttemptSubmitted" {
            return Ok(Vec::new());
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
            return Ok(Vec::new());
        };
        let submission = Submission {
            test_id,
            user_id: user_id.to_string(),
            attempt_id,
            score,
            max_score,
            submitted_at,
        };
        self.record(conn, &submission, event.seq).await
    }
}

fn entry_from_row(row: &sqlx::postgres::PgRow) -> Result<Entry, sqlx::Error> {
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
async fn rank_in(
    conn: &mut PgConnection,
    entries: &str,
    counts: &str,
    test_id: Uuid,
    key: &RankKey,
) -> Result<u64, sqlx::Error> {
    let ahead: i64 = sqlx::query_scalar(&format!(
        "SELECT (SELECT COALESCE(sum(entries), 0) FROM {counts} WHERE test_id = $1 AND score > $2)::bigint
              + (SELECT count(*) FROM {entries}
                  WHERE test_id = $1 AND best_score = $2 AND (achieved_at, user_id) < ($3, $4))"
    ))
    .bind(test_id)
    .bind(key.score as i32)
    .bind(key.achieved_at)
    .bind(&key.user_id)
    .fetch_one(conn)
    .await?;
    Ok(ahead as u64 + 1)
}

/// A ranked leaderboard entry as queries return it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankedEntry {
    pub rank: u64,
    pub entry: Entry,
}

/// Reads the live leaderboard tables.
pub struct LeaderboardQueries;

const ENTRY_COLUMNS: &str = "user_id, best_score, max_score, attempt_id, achieved_at, attempts";

impl LeaderboardQueries {
    /// Entries on test `test_id`.
    pub async fn total<'e>(db: impl PgExecutor<'e>, test_id: Uuid) -> Result<u64, sqlx::Error> {
        let total: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(entries), 0)::bigint FROM lb_score_counts WHERE test_id = $1",
        )
        .bind(test_id)
        .fetch_one(db)
        .await?;
        Ok(total as u64)
    }

    /// The entry of `user_id` with its rank, if any.
    pub async fn entry_of(
        conn: &mut PgConnection,
        test_id: Uuid,
        user_id: &str,
    ) -> Result<Option<RankedEntry>, sqlx::Error> {
        let row = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM lb_entries WHERE test_id = $1 AND user_id = $2"
        ))
        .bind(test_id)
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let entry = entry_from_row(&row)?;
        let rank = rank_in(
            conn,
            "lb_entries",
            "lb_score_counts",
            test_id,
            &entry.rank_key(),
        )
        .await?;
        Ok(Some(RankedEntry { rank, entry }))
    }

    /// Up to `limit` entries ranked after `after` (from the top when `None`),
    /// in rank order; `first_rank` is the rank of the first one returned.
    pub async fn page_after(
        conn: &mut PgConnection,
        test_id: Uuid,
        after: Option<&RankKey>,
        first_rank: u64,
        limit: i64,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        let rows = match after {
            None => {
                sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM lb_entries WHERE test_id = $1
                      ORDER BY best_score DESC, achieved_at, user_id LIMIT $2"
                ))
                .bind(test_id)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
            }
            Some(key) => {
                sqlx::query(&format!(
                    "SELECT {ENTRY_COLUMNS} FROM lb_entries
                      WHERE test_id = $1
                        AND (best_score < $2
                             OR (best_score = $2 AND (achieved_at, user_id) > ($3, $4)))
                      ORDER BY best_score DESC, achieved_at, user_id LIMIT $5"
                ))
                .bind(test_id)
                .bind(key.score as i32)
                .bind(key.achieved_at)
                .bind(&key.user_id)
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?
            }
        };
        rows.iter()
            .enumerate()
            .map(|(i, row)| {
                Ok(RankedEntry {
                    rank: first_rank + i as u64,
                    entry: entry_from_row(row)?,
                })
            })
            .collect()
    }

    /// Up to `limit` entries from rank `offset + 1`: the score table finds the
    /// score holding that rank, an index range the rest.
    pub async fn page_at_offset(
        conn: &mut PgConnection,
        test_id: Uuid,
        offset: u64,
        limit: i64,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        // The highest score whose entries reach past `offset`, and how many
        // entries rank above that score.
        let bucket: Option<(i32, i64)> = sqlx::query_as(
            "SELECT score, above FROM (
                 SELECT score,
                        (COALESCE(sum(entries) OVER (ORDER BY score DESC
                             ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0))::bigint AS above,
                        (sum(entries) OVER (ORDER BY score DESC))::bigint AS through
                   FROM lb_score_counts WHERE test_id = $1 AND entries > 0) buckets
              WHERE through > $2 ORDER BY score DESC LIMIT 1",
        )
        .bind(test_id)
        .bind(offset as i64)
        .fetch_optional(&mut *conn)
        .await?;
        let Some((score, above)) = bucket else {
            return Ok(Vec::new());
        };
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM lb_entries
              WHERE test_id = $1 AND best_score <= $2
              ORDER BY best_score DESC, achieved_at, user_id
              OFFSET $3 LIMIT $4"
        ))
        .bind(test_id)
        .bind(score)
        .bind(offset as i64 - above)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
        rows.iter()
            .enumerate()
            .map(|(i, row)| {
                Ok(RankedEntry {
                    rank: offset + 1 + i as u64,
                    entry: entry_from_row(row)?,
                })
            })
            .collect()
    }

    /// Up to `radius` entries ranked just above `key`, in rank order.
    pub async fn above(
        conn: &mut PgConnection,
        test_id: Uuid,
        key: &RankKey,
        rank: u64,
        radius: i64,
    ) -> Result<Vec<RankedEntry>, sqlx::Error> {
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM lb_entries
              WHERE test_id = $1
                AND (best_score > $2 OR (best_score = $2 AND (achieved_at, user_id) < ($3, $4)))
              ORDER BY best_score, achieved_at DESC, user_id DESC LIMIT $5"
        ))
        .bind(test_id)
        .bind(key.score as i32)
        .bind(key.achieved_at)
        .bind(&key.user_id)
        .bind(radius)
        .fetch_all(&mut *conn)
        .await?;
        let mut above: Vec<RankedEntry> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                Ok(RankedEntry {
                    rank: rank - 1 - i as u64,
                    entry: entry_from_row(row)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        above.reverse();
        Ok(above)
    }
}
