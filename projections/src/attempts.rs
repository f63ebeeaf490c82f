//! The "my attempts" projection: each user's attempts with status and score.

use podium_domain::attempt::AttemptEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use sqlx::PgConnection;

use crate::checkpointed::{BoxError, ProjectionLogic};
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

    async fn apply(
        &self,
        conn: &mut PgConnection,
        event: &RecordedEvent,
    ) -> Result<Vec<Change>, BoxError> {
        if event.aggregate_type != "Attempt" || event.event_type == "AnswerRecorded" {
            return Ok(Vec::new());
        }
        match event.decode()? {
            PodiumEvent::Attempt(AttemptEvent::AttemptStarted {
                attempt_id,
                test_id,
                user_id,
                started_at,
                max_score,
                ..
            }) => {
                sqlx::query(&format!(
                    "INSERT INTO {} (attempt_id, user_id, test_id, status, max_score, started_at)
                     VALUES ($1, $2, $3, 'in_progress', $4, $5)
                     ON CONFLICT (attempt_id) DO NOTHING",
                    self.table
                ))
                .bind(attempt_id)
                .bind(user_id.as_str())
                .bind(test_id)
                .bind(max_score as i32)
                .bind(started_at)
                .execute(conn)
                .await?;
            }
            PodiumEvent::Attempt(AttemptEvent::AttemptSubmitted {
                attempt_id,
                score,
                max_score,
                correct,
                duration_ms,
                submitted_at,
                ..
            }) => {
                sqlx::query(&format!(
                    "UPDATE {} SET status = 'submitted', score = $2, max_score = $3, correct = $4,
                                   duration_ms = $5, submitted_at = $6
                      WHERE attempt_id = $1",
                    self.table
                ))
                .bind(attempt_id)
                .bind(score as i32)
                .bind(max_score as i32)
                .bind(correct as i32)
                .bind(duration_ms as i64)
                .bind(submitted_at)
                .execute(conn)
                .await?;
            }
            _ => {}
        }
        Ok(Vec::new())
    }
}
