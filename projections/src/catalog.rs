//! The test catalog: every published test, for clients that let a user pick
//! one, kept by a projection of the Test aggregates' events (summaries only:
//! a definition can weigh half a megabyte).

use chrono::{DateTime, Utc};
use podium_domain::collection::CollectionEvent;
use podium_domain::log::{Change, PodiumEvent, RecordedEvent};
use podium_domain::test::{TestDefinition, TestEvent};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::checkpointed::{BoxError, ProjectionLogic};
use crate::tables::Generation;

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

pub const NAME: &str = "catalog";
pub const TABLES: [&str; 2] = ["catalog_tests", "catalog_collections"];

/// A collection as the catalog lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct CollectionSummary {
    pub id: Uuid,
    pub title: String,
    /// In the order they were added.
    pub test_ids: Vec<Uuid>,
    #[serde(serialize_with = "podium_domain::time::serialize")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: DateTime<Utc>,
}

/// Sorts collections newest first (then by id, so the order is total).
pub fn newest_collections_first(collections: &mut [CollectionSummary]) {
    collections.sort_by(|a, b| {
        b.created_at
            .cmp(&a.created_at)
            .then_with(|| a.id.cmp(&b.id))
    });
}

/// The catalog read model: one row per published test.
pub struct CatalogProjection {
    generation: Generation,
    table: String,
    collections: String,
}

impl CatalogProjection {
    pub fn new(generation: Generation) -> Self {
        Self {
            generation,
            table: generation.table("catalog_tests"),
            collections: generation.table("catalog_collections"),
        }
    }
}

/// Whether events of `aggregate_type` change the catalog.
fn is_listed(aggregate_type: &str) -> bool {
    matches!(aggregate_type, "Test" | "Collection")
}

impl ProjectionLogic for CatalogProjection {
    fn name(&self) -> &str {
        match self.generation {
            Generation::Live => NAME,
            Generation::Next => "catalog__next",
        }
    }

    fn wants(&self, aggregate_type: &str, _event_type: &str) -> bool {
        is_listed(aggregate_type)
    }

    /// A publish inserts its test once, an archive sets a flag, a collection
    /// is inserted once and a test appended to it once: applying an event
    /// again changes nothing.
    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let listed = |e: &&RecordedEvent| is_listed(&e.aggregate_type);
        for event in events.iter().filter(listed) {
            match event.decode()? {
                PodiumEvent::Collection(CollectionEvent::CollectionCreated {
                    collection_id,
                    title,
                    test_ids,
                }) => {
                    sqlx::query(&format!(
                        "INSERT INTO {} (collection_id, title, test_ids, created_at)
                         VALUES ($1, $2, $3, $4) ON CONFLICT (collection_id) DO NOTHING",
                        self.collections
                    ))
                    .bind(collection_id)
                    .bind(title)
                    .bind(test_ids)
                    .bind(event.recorded_at)
                    .execute(&mut *conn)
                    .await?;
                }
                PodiumEvent::Collection(CollectionEvent::CollectionTestAdded {
                    collection_id,
                    test_id,
                }) => {
                    sqlx::query(&format!(
                        "UPDATE {} SET test_ids = array_append(test_ids, $2)
                          WHERE collection_id = $1 AND NOT $2 = ANY(test_ids)",
                        self.collections
                    ))
                    .bind(collection_id)
                    .bind(test_id)
                    .execute(&mut *conn)
                    .await?;
                }
                PodiumEvent::Test(TestEvent::TestPublished {
                    test_id,
                    definition,
                }) => {
                    let test = TestSummary::published(test_id, &definition, event.recorded_at);
                    sqlx::query(&format!(
                        "INSERT INTO {} (test_id, title, max_score, question_count,
                                         time_limit_secs, published_at)
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (test_id) DO NOTHING",
                        self.table
                    ))
                    .bind(test.id)
                    .bind(&test.title)
                    .bind(test.max_score as i32)
                    .bind(test.question_count as i32)
                    .bind(test.time_limit_secs.map(|s| s as i32))
                    .bind(test.published_at)
                    .execute(&mut *conn)
                    .await?;
                }
                PodiumEvent::Test(TestEvent::TestArchived { test_id }) => {
                    sqlx::query(&format!(
                        "UPDATE {} SET archived = true WHERE test_id = $1",
                        self.table
                    ))
                    .bind(test_id)
                    .execute(&mut *conn)
                    .await?;
                }
                _ => {}
            }
        }
        Ok(Vec::new())
    }
}

/// Every collection in Postgres, newest first.
pub async fn collections<'e>(
    db: impl PgExecutor<'e>,
) -> Result<Vec<CollectionSummary>, sqlx::Error> {
    let rows: Vec<(Uuid, String, Vec<Uuid>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT collection_id, title, test_ids, created_at
           FROM catalog_collections ORDER BY created_at DESC, collection_id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, title, test_ids, created_at)| CollectionSummary {
            id,
            title,
            test_ids,
            created_at,
        })
        .collect())
}

/// Every published test in Postgres, newest first.
pub async fn tests<'e>(db: impl PgExecutor<'e>) -> Result<Vec<TestSummary>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT test_id, title, max_score, question_count, time_limit_secs, archived,
                published_at
           FROM catalog_tests ORDER BY published_at DESC, test_id",
    )
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(TestSummary {
                id: row.try_get("test_id")?,
                title: row.try_get("title")?,
                max_score: row.try_get::<i32, _>("max_score")? as u32,
                question_count: row.try_get::<i32, _>("question_count")? as u32,
                time_limit_secs: row
                    .try_get::<Option<i32>, _>("time_limit_secs")?
                    .map(|s| s as u32),
                archived: row.try_get("archived")?,
                published_at: row.try_get("published_at")?,
            })
        })
        .collect()
}
