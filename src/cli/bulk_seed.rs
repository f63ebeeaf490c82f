//! Bulk seeding for benchmarks (`podium seed --bulk N`): a published test and
//! N users' attempts, each an `AttemptStarted` and an `AttemptSubmitted`
//! built and serialized by the domain's own types, written straight into the
//! event store in large batches. Replay and the relay read them like any
//! others; going through HTTP would take hours for a million attempts.

use std::collections::BTreeMap;

use chrono::{Duration, TimeZone, Utc};
use cqrs_es::DomainEvent;
use podium_domain::attempt::{grade, AttemptEvent};
use podium_domain::test::{QuestionDraft, TestDefinition, TestDraft, TestEvent};
use podium_domain::{EventMetadata, UserId};
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// Questions of the seeded test; question `i` is worth `i` points (max 210).
const QUESTIONS: u32 = 20;
/// Attempts per transaction.
const BATCH: u64 = 5_000;

/// Rows of one insert.
#[derive(Default)]
struct Rows {
    aggregate_type: Vec<&'static str>,
    aggregate_id: Vec<String>,
    sequence: Vec<i64>,
    event_type: Vec<String>,
    payload: Vec<Value>,
    metadata: Vec<Value>,
}

impl Rows {
    fn push(
        &mut self,
        aggregate_type: &'static str,
        id: String,
        sequence: i64,
        event: impl DomainEvent,
        actor: &str,
    ) -> anyhow::Result<()> {
        self.aggregate_type.push(aggregate_type);
        self.aggregate_id.push(id);
        self.sequence.push(sequence);
        self.event_type.push(event.event_type());
        self.payload.push(serde_json::to_value(&event)?);
        let metadata = EventMetadata {
            actor: actor.to_string(),
            request_id: "seed-bulk".into(),
            recorded_at: crate::clock::now(),
        };
        self.metadata
            .push(serde_json::to_value(metadata.into_map())?);
        Ok(())
    }

    async fn insert(self, pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT t, i, s, e, $5, p, m
               FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $6::jsonb[], $7::jsonb[])
                    AS x(t, i, s, e, p, m)",
        )
        .bind(&self.aggregate_type)
        .bind(&self.aggregate_id)
        .bind(&self.sequence)
        .bind(&self.event_type)
        .bind(podium_domain::EVENT_VERSION)
        .bind(&self.payload)
        .bind(&self.metadata)
        .execute(pool)
        .await?;
        Ok(())
    }
}

/// The seeded test's definition: 20 two-choice questions, the first choice
/// right, question `i` worth `i` points.
fn definition() -> anyhow::Result<TestDefinition> {
    TestDefinition::parse(TestDraft {
        title: "Bulk seed".into(),
        time_limit_secs: None,
        questions: (1..=QUESTIONS)
            .map(|i| QuestionDraft {
                id: format!("q{i}"),
                prompt: format!("Question {i}"),
                choices: vec!["right".into(), "wrong".into()],
                answer: 0,
                points: i64::from(i),
            })
            .collect(),
    })
    .map_err(|errors| anyhow::anyhow!("the seed test is invalid: {errors}"))
}

/// Publishes a test and records `attempts` attempts on it by users
/// `user-1` … `user-N` (one each), with scores spread like real ones.
/// Returns the test id and the events written.
pub async fn bulk(
    pool: &PgPool,
    attempts: u64,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> anyhow::Result<(Uuid, u64)> {
    bulk_from(pool, 1, attempts, progress).await
}

/// [`bulk`] by users `user-{first}` … `user-{first + attempts - 1}`.
pub async fn bulk_from(
    pool: &PgPool,
    first: u64,
    attempts: u64,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> anyhow::Result<(Uuid, u64)> {
    let test_id = Uuid::new_v4();
    let definition = definition()?;
    let max_score = definition.max_score();
    let mut rows = Rows::default();
    rows.push(
        "Test",
        test_id.to_string(),
        1,
        TestEvent::TestPublished {
            test_id,
            definition: definition.clone(),
        },
        "seed",
    )?;
    rows.insert(pool).await?;
    let epoch = Utc
        .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid date");
    let mut written = 1;
    let mut done = 0;
    while done < attempts {
        let mut rows = Rows::default();
        for n in done + 1..=(done + BATCH).min(attempts) {
            let user = UserId::parse(format!("user-{}", first + n - 1))?;
            let attempt_id = Uuid::new_v4();
            let started_at = epoch + Duration::seconds(n as i64);
            // Each answer right with a probability that varies by user: a
            // spread of scores, most in the middle.
            let skill = n.wrapping_mul(2_654_435_761) % 100;
            let answers: BTreeMap<String, u32> = (1..=QUESTIONS)
                .map(|i| {
                    let roll = (n.wrapping_mul(31).wrapping_add(u64::from(i) * 7919)) % 100;
                    (format!("q{i}"), u32::from(roll >= skill))
                })
                .collect();
            let grade = grade(&definition, &answers);
            let submitted_at = started_at + Duration::seconds(60 + (n % 600) as i64);
            rows.push(
                "Attempt",
                attempt_id.to_string(),
                1,
                AttemptEvent::AttemptStarted {
                    attempt_id,
                    test_id,
                    user_id: user.clone(),
                    started_at,
                    time_limit_secs: None,
                    max_score,
                },
                user.as_str(),
            )?;
            rows.push(
                "Attempt",
                attempt_id.to_string(),
                2,
                AttemptEvent::AttemptSubmitted {
                    attempt_id,
                    test_id,
                    user_id: user.clone(),
                    answers,
                    score: grade.score,
                    max_score,
                    correct: grade.correct,
                    question_count: QUESTIONS,
                    duration_ms: (submitted_at - started_at).num_milliseconds() as u64,
                    submitted_at,
                },
                user.as_str(),
            )?;
        }
        let batch = rows.sequence.len() as u64 / 2;
        rows.insert(pool).await?;
        done += batch;
        written += batch * 2;
        progress(done, attempts);
    }
    Ok((test_id, written))
}
