//! The test catalog: every published test, for clients that let a user pick
//! one. Tests are few and rarely change, so the Postgres store reads it from
//! the log itself (the Test aggregates' events) instead of keeping a table.

use chrono::{DateTime, Utc};
use podium_domain::log::PodiumEvent;
use podium_domain::test::{TestDefinition, TestEvent};
use serde::Serialize;
use sqlx::{PgExecutor, Row};
use uuid::Uuid;

/// A published test as the catalog lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct TestSummary {
    pub id: Uuid,
    pub title: String,
    pub max_score: u32,
    pub question_count: u32,
    pub time_limit_secs: Option<u32>,
    pub archived: bool,
    pub published_at: DateTime<Utc>,
}

impl TestSummary {
    pub fn published(id: Uuid, definition: &TestDefinition, at: DateTime<Utc>) -> Self {
        Self {
            id,
            title: definition.title.clone(),
            max_score: definition.max_score(),
            question_count: definition.questions.len() as u32,
            time_limit_secs: definition.time_limit_secs,
            archived: false,
            published_at: at,
        }
    }
}

/// Sorts the catalog newest first (then by id, so the order is total).
pub fn newest_first(tests: &mut [TestSummary]) {
    tests.sort_by(|a, b| {
        b.published_at
            .cmp(&a.published_at)
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// Every published test in Postgres, newest first.
pub async fn tests<'e>(db: impl PgExecutor<'e>) -> Result<Vec<TestSummary>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT aggregate_id, sequence, aggregate_type, event_type, event_version, payload,
                recorded_at
           FROM events WHERE aggregate_type = 'Test' ORDER BY aggregate_id, sequence",
    )
    .fetch_all(db)
    .await?;
    let mut tests: Vec<TestSummary> = Vec::new();
    for row in &rows {
        let event = podium_domain::log::RecordedEvent {
            seq: 0,
            position: 0,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get::<i64, _>("sequence")? as u64,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: Default::default(),
            recorded_at: row.try_get("recorded_at")?,
        };
        match event
            .decode()
            .map_err(|e| sqlx::Error::Decode(Box::new(e)))?
        {
            PodiumEvent::Test(TestEvent::TestPublished {
                test_id,
                definition,
            }) => tests.push(TestSummary::published(
                test_id,
                &definition,
                event.recorded_at,
            )),
            PodiumEvent::Test(TestEvent::TestArchived { test_id }) => {
                if let Some(test) = tests.iter_mut().find(|t| t.id == test_id) {
                    test.archived = true;
                }
            }
            _ => {}
        }
    }
    newest_first(&mut tests);
    Ok(tests)
}
