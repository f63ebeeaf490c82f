use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::test::{PublishedTest, TestDefinition};
use crate::UserId;

/// Commands carry what the aggregate cannot know by itself — the test and the
/// current time — so that the aggregate stays pure.
#[derive(Debug, Clone)]
pub enum AttemptCommand {
    StartAttempt {
        attempt_id: Uuid,
        user_id: UserId,
        /// The test as loaded by the caller; `None` when it does not exist.
        test: Option<PublishedTest>,
        now: DateTime<Utc>,
    },
    RecordAnswer {
        by: UserId,
        question_id: String,
        choice: i64,
        test: TestDefinition,
        now: DateTime<Utc>,
    },
    SubmitAttempt {
        by: UserId,
        /// Answers given with the submission; they override recorded ones.
        answers: BTreeMap<String, i64>,
        test: TestDefinition,
        now: DateTime<Utc>,
    },
}
