//! The "my attempts" projection: each user's attempts with status and score.

use chrono::{DateTime, Utc};
use podium_domain::attempt::AttemptEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use serde::Serialize;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::checkpointed::{BoxError, ProjectionLogic};
use crate::ranking::Submission;
use crate::tables::Generation;

pub const NAME: &str = "attempts";
pub const TABLES: [&str; 1] = ["my_attempts"];

pub struct AttemptsProjection {
    generation: Generation,
    table: String,
}

impl AttemptsProjection {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            table: generation.table("my_attempts"),
        }
    }
}

impl ProjectionLogic for AttemptsProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "attempts__next",
        }
    }

    fn wants(&self, aggregate_type: &str, event_type: &str) -> bool {
        AttemptStep::is(aggregate_type, event_type)
    }

    /// Starts are inserted, then submissions update them, each set-wise: a
    /// submission always follows its start in the log.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let mut started = Started::default();
        let mut submitted = Submitted::default();
        for event in events {
            match AttemptStep::of(event)? {
                Some(AttemptStep::Started(start)) => {
                    started.attempt_id.push(start.attempt_id);
                    started.user_id.push(start.user_id);
                    started.test_id.push(start.test_id);
                    started.max_score.push(start.max_score as i32);
                    started.started_at.push(start.started_at);
                }
                Some(AttemptStep::Submitted(done)) => {
                    submitted.attempt_id.push(done.attempt_id);
                    submitted.score.push(done.score as i32);
                    submitted.max_score.push(done.max_score as i32);
                    submitted.correct.push(done.correct as i32);
                    submitted.duration_ms.push(done.duration_ms as i64);
                    submitted.submitted_at.push(done.submitted_at);
                }
                None => {}
            }
        }
        if !started.attempt_id.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO {} (attempt_id, user_id, test_id, status, max_score, started_at)
                 SELECT a, u, t, 'in_progress', m, s
                   FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::int[], $5::timestamptz[])
                        AS x(a, u, t, m, s)
                 ON CONFLICT (attempt_id) DO NOTHING",
                self.table
            ))
            .bind(&started.attempt_id)
            .bind(&started.user_id)
            .bind(&started.test_id)
            .bind(&started.max_score)
            .bind(&started.started_at)
            .execute(&mut *conn)
            .await?;
        }
        if !submitted.attempt_id.is_empty() {
            sqlx::query(&format!(
                "UPDATE {t} SET status = 'submitted', score = x.score, max_score = x.max_score,
                                correct = x.correct, duration_ms = x.duration_ms,
                                submitted_at = x.submitted_at
                   FROM UNNEST($1::uuid[], $2::int[], $3::int[], $4::int[], $5::bigint[],
                               $6::timestamptz[])
                        AS x(attempt_id, score, max_score, correct, duration_ms, submitted_at)
                  WHERE {t}.attempt_id = x.attempt_id",
                t = self.table
            ))
            .bind(&submitted.attempt_id)
            .bind(&submitted.score)
            .bind(&submitted.max_score)
            .bind(&submitted.correct)
            .bind(&submitted.duration_ms)
            .bind(&submitted.submitted_at)
            .execute(&mut *conn)
            .await?;
        }
        Ok(Vec::new())
    }
}

/// An attempt's start, as "my attempts" records it.
struct Start {
    attempt_id: Uuid,
    user_id: String,
    test_id: Uuid,
    max_score: u32,
    started_at: DateTime<Utc>,
}

/// An attempt's submission, as "my attempts" records it.
#[derive(Clone, Copy)]
struct Done {
    attempt_id: Uuid,
    score: u32,
    max_score: u32,
    correct: u32,
    duration_ms: u64,
    submitted_at: DateTime<Utc>,
}

/// What an event does to "my attempts": starts an attempt, or completes
/// one; the one reading of events the projection and its fold share.
enum AttemptStep {
    Started(Start),
    Submitted(Done),
}

impl AttemptStep {
    /// Whether events of this type are steps (an answer is not).
    fn is(aggregate_type: &str, event_type: &str) -> bool {
        aggregate_type == "Attempt" && event_type != "AnswerRecorded"
    }

    /// `event`'s step, if it is one (other events are told by their type,
    /// without decoding them).
    fn of(event: &RecordedEvent) -> Result<Option<Self>, BoxError> {
        if !Self::is(&event.aggregate_type, &event.event_type) {
            return Ok(None);
        }
        Ok(match event.decode()? {
            PodiumEvent::Attempt(AttemptEvent::AttemptStarted {
                attempt_id,
                test_id,
                user_id,
                started_at,
                max_score,
                ..
            }) => Some(Self::Started(Start {
                attempt_id,
                user_id: user_id.to_string(),
                test_id,
                max_score,
                started_at,
            })),
            PodiumEvent::Attempt(AttemptEvent::AttemptSubmitted {
                attempt_id,
                score,
                max_score,
                correct,
                duration_ms,
                submitted_at,
                ..
            }) => Some(Self::Submitted(Done {
                attempt_id,
                score,
                max_score,
                correct,
                duration_ms,
                submitted_at,
            })),
            _ => None,
        })
    }
}

/// Columns of the attempts started in a batch.
#[derive(Default)]
struct Started {
    attempt_id: Vec<Uuid>,
    user_id: Vec<String>,
    test_id: Vec<Uuid>,
    max_score: Vec<i32>,
    started_at: Vec<DateTime<Utc>>,
}

/// Columns of the attempts submitted in a batch.
#[derive(Default)]
struct Submitted {
    attempt_id: Vec<Uuid>,
    score: Vec<i32>,
    max_score: Vec<i32>,
    correct: Vec<i32>,
    duration_ms: Vec<i64>,
    submitted_at: Vec<DateTime<Utc>>,
}

/// An attempt as the caller's list shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AttemptSummary {
    pub attempt_id: Uuid,
    pub test_id: Uuid,
    pub user_id: String,
    /// `in_progress` or `submitted`.
    pub status: String,
    pub started_at: DateTime<Utc>,
    pub max_score: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correct: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<DateTime<Utc>>,
}

/// Reads the live `my_attempts` table.
pub struct AttemptQueries;

impl AttemptQueries {
    /// Every submission of `test_id` made at or before `until` (and at or
    /// after `since`, if given), in no order.
    pub async fn submitted_between(
        conn: &mut PgConnection,
        test_id: Uuid,
        since: Option<DateTime<Utc>>,
        until: DateTime<Utc>,
    ) -> Result<Vec<Submission>, sqlx::Error> {
        /// user, attempt, score, max score, correct, submitted at.
        type Row = (String, Uuid, i32, i32, Option<i32>, DateTime<Utc>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT user_id, attempt_id, score, max_score, correct, submitted_at
               FROM my_attempts
              WHERE test_id = $1 AND status = 'submitted' AND submitted_at <= $2
                AND ($3::timestamptz IS NULL OR submitted_at >= $3) AND score IS NOT NULL",
        )
        .bind(test_id)
        .bind(until)
        .bind(since)
        .fetch_all(conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(
                |(user_id, attempt_id, score, max_score, correct, submitted_at)| Submission {
                    test_id,
                    user_id,
                    attempt_id,
                    score: score.max(0) as u32,
                    max_score: max_score.max(0) as u32,
                    correct: correct.unwrap_or(0).max(0) as u32,
                    submitted_at,
                },
            )
            .collect())
    }

    /// Up to `limit` of `user_id`'s attempts, newest first, after the one
    /// started at `after` (a `(started_at, attempt_id)` pair); the flag tells
    /// whether more follow.
    pub async fn page(
        conn: &mut PgConnection,
        user_id: &str,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<(Vec<AttemptSummary>, bool), sqlx::Error> {
        let (started_at, attempt_id) = after.unzip();
        let rows = sqlx::query(
            "SELECT attempt_id, test_id, user_id, status, started_at, max_score, score, correct,
                    duration_ms, submitted_at
               FROM my_attempts
              WHERE user_id = $1 AND ($2::timestamptz IS NULL OR (started_at, attempt_id) < ($2, $3))
              ORDER BY started_at DESC, attempt_id DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(started_at)
        .bind(attempt_id)
        .bind(limit + 1)
        .fetch_all(conn)
        .await?;
        let mut attempts = rows
            .iter()
            .map(|row| {
                Ok(AttemptSummary {
                    attempt_id: row.try_get("attempt_id")?,
                    test_id: row.try_get("test_id")?,
                    user_id: row.try_get("user_id")?,
                    status: row.try_get("status")?,
                    started_at: row.try_get("started_at")?,
                    max_score: row.try_get::<i32, _>("max_score")? as u32,
                    score: row.try_get::<Option<i32>, _>("score")?.map(|v| v as u32),
                    correct: row.try_get::<Option<i32>, _>("correct")?.map(|v| v as u32),
                    duration_ms: row
                        .try_get::<Option<i64>, _>("duration_ms")?
                        .map(|v| v as u64),
                    submitted_at: row.try_get("submitted_at")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let more = attempts.len() as i64 > limit;
        attempts.truncate(limit as usize);
        Ok((attempts, more))
    }
}

/// "My attempts" folded in memory for a rebuild, by the same rules as
/// [`AttemptsProjection`]: the first start of an attempt inserts it, a
/// submission of an attempt started before completes it; written with COPY.
#[derive(Default)]
pub struct AttemptsFold {
    attempts: std::collections::HashMap<Uuid, (Start, Option<Done>)>,
}

impl crate::fold::Fold for AttemptsFold {
    fn expect(&mut self, rows: &dyn Fn(&str) -> usize) {
        self.attempts.reserve(rows("my_attempts"));
    }

    fn add(&mut self, events: &[RecordedEvent]) -> Result<(), BoxError> {
        for event in events {
            match AttemptStep::of(event)? {
                Some(AttemptStep::Started(start)) => {
                    self.attempts
                        .entry(start.attempt_id)
                        .or_insert((start, None));
                }
                Some(AttemptStep::Submitted(done)) => {
                    if let Some((_, submitted)) = self.attempts.get_mut(&done.attempt_id) {
                        *submitted = Some(done);
                    }
                }
                None => {}
            }
        }
        Ok(())
    }

    fn write<'c>(
        self: Box<Self>,
        conn: &'c mut PgConnection,
    ) -> futures::future::BoxFuture<'c, Result<(), sqlx::Error>> {
        Box::pin(async move {
            use crate::fold::CopyWriter;
            let mut rows = CopyWriter::fresh(
                conn,
                &Generation::Next.table("my_attempts"),
                "attempt_id, user_id, test_id, status, score, max_score, correct, duration_ms, started_at, submitted_at",
            )
            .await?;
            // In key order: the copy's primary key then grows at its right
            // edge instead of splitting pages all over.
            let mut attempts: Vec<_> = self.attempts.into_iter().collect();
            attempts.sort_unstable_by_key(|(attempt_id, _)| *attempt_id);
            for (attempt_id, (start, done)) in attempts {
                rows.field(attempt_id)
                    .field(&start.user_id)
                    .field(start.test_id)
                    .field(if done.is_some() {
                        "submitted"
                    } else {
                        "in_progress"
                    })
                    .field(done.map(|d| d.score))
                    .field(done.map_or(start.max_score, |d| d.max_score))
                    .field(done.map(|d| d.correct))
                    .field(done.map(|d| d.duration_ms))
                    .field(start.started_at)
                    .field(done.map(|d| d.submitted_at));
                rows.end_row().await?;
            }
            rows.finish().await?;
            Ok(())
        })
    }
}
