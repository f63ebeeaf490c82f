use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::UserId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptEvent {
    AttemptStarted {
        attempt_id: Uuid,
        test_id: Uuid,
        user_id: UserId,
        started_at: DateTime<Utc>,
        time_limit_secs: Option<u32>,
        max_score: u32,
    },
    AnswerRecorded {
        attempt_id: Uuid,
        question_id: String,
        choice: u32,
        recorded_at: DateTime<Utc>,
    },
    AttemptSubmitted {
        attempt_id: Uuid,
        test_id: Uuid,
        user_id: UserId,
        /// The final answers that were graded, by question id.
        answers: BTreeMap<String, u32>,
        score: u32,
        max_score: u32,
        correct: u32,
        question_count: u32,
        duration_ms: u64,
        submitted_at: DateTime<Utc>,
    },
}

impl DomainEvent for AttemptEvent {
    fn event_type(&self) -> String {
        match self {
            Self::AttemptStarted { .. } => "AttemptStarted",
            Self::AnswerRecorded { .. } => "AnswerRecorded",
            Self::AttemptSubmitted { .. } => "AttemptSubmitted",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
