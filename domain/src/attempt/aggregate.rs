use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::grading::{check_answer, grade, SUBMISSION_GRACE};
use super::{AttemptCommand, AttemptEvent};
use crate::test::TestDefinition;
use crate::validation::ValidationErrors;
use crate::UserId;

/// An attempt as its events left it: `started` is `None` until it starts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Attempt {
    pub started: Option<StartedAttempt>,
    pub answers: BTreeMap<String, u32>,
    pub grade: Option<Grade>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedAttempt {
    pub attempt_id: Uuid,
    pub test_id: Uuid,
    pub user_id: UserId,
    pub started_at: DateTime<Utc>,
    pub time_limit_secs: Option<u32>,
    pub max_score: u32,
}

/// The graded result of a submitted attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grade {
    pub score: u32,
    pub max_score: u32,
    pub correct: u32,
    pub duration_ms: u64,
    pub submitted_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptError {
    #[error("no such test")]
    TestNotFound,
    #[error("the test is archived and accepts no new attempts")]
    TestArchived,
    #[error("an attempt with this id already exists")]
    AlreadyStarted,
    #[error("no such attempt")]
    NotFound,
    #[error("this attempt belongs to another user")]
    NotOwner,
    #[error("the attempt has already been submitted")]
    AlreadySubmitted,
    #[error("the time limit ended at {deadline} (grace included)")]
    TimeLimitExceeded { deadline: DateTime<Utc> },
    #[error("invalid answers: {0}")]
    InvalidAnswers(ValidationErrors),
}

impl StartedAttempt {
    /// The last instant a submission or answer is accepted, if the test is timed.
    pub fn deadline(&self) -> Option<DateTime<Utc>> {
        self.time_limit_secs.map(|secs| {
            self.started_at + chrono::TimeDelta::seconds(i64::from(secs)) + SUBMISSION_GRACE
        })
    }
}

impl Attempt {
    /// The started attempt, if `by` may still change it at `now`.
    fn open_for(&self, by: &UserId, now: DateTime<Utc>) -> Result<&StartedAttempt, AttemptError> {
        let started = self.started.as_ref().ok_or(AttemptError::NotFound)?;
        if &started.user_id != by {
            return Err(AttemptError::NotOwner);
        }
        if self.grade.is_some() {
            return Err(AttemptError::AlreadySubmitted);
        }
        match started.deadline() {
            Some(deadline) if now > deadline => Err(AttemptError::TimeLimitExceeded { deadline }),
            _ => Ok(started),
        }
    }

    fn start(
        &self,
        attempt_id: Uuid,
        user_id: UserId,
        test: Option<crate::test::PublishedTest>,
        now: DateTime<Utc>,
    ) -> Result<AttemptEvent, AttemptError> {
        if self.started.is_some() {
            return Err(AttemptError::AlreadyStarted);
        }
        let test = test.ok_or(AttemptError::TestNotFound)?;
        if test.archived {
            return Err(AttemptError::TestArchived);
        }
        Ok(AttemptEvent::AttemptStarted {
            attempt_id,
            test_id: test.test_id,
            user_id,
            started_at: now,
            time_limit_secs: test.definition.time_limit_secs,
            max_score: test.definition.max_score(),
        })
    }

    fn submit(
        &self,
        by: &UserId,
        answers: BTreeMap<String, i64>,
        test: &TestDefinition,
        now: DateTime<Utc>,
    ) -> Result<AttemptEvent, AttemptError> {
        let started = self.open_for(by, now)?;
        if answers.len() > test.questions.len() {
            // At most one answer per question: refused before any is read.
            return Err(AttemptError::InvalidAnswers(ValidationErrors::single(
                "answers",
                format!(
                    "{} answers for {} questions: at most one per question",
                    answers.len(),
                    test.questions.len()
                ),
            )));
        }
        let mut errors = ValidationErrors::new();
        let mut final_answers = self.answers.clone();
        for (question_id, choice) in answers {
            let field = format!("answers.{question_id}");
            if let Some(choice) = check_answer(test, &question_id, choice, &field, &mut errors) {
                final_answers.insert(question_id, choice);
            }
        }
        if !errors.is_empty() {
            return Err(AttemptError::InvalidAnswers(errors));
        }
        let score = grade(test, &final_answers);
        let duration_ms = (now - started.started_at).num_milliseconds().max(0) as u64;
        Ok(AttemptEvent::AttemptSubmitted {
            attempt_id: started.attempt_id,
            test_id: started.test_id,
            user_id: started.user_id.clone(),
            answers: final_answers,
            score: score.score,
            max_score: score.max_score,
            correct: score.correct,
            question_count: test.questions.len() as u32,
            duration_ms,
            submitted_at: now,
        })
    }
}

impl Aggregate for Attempt {
    const TYPE: &'static str = "Attempt";
    type Command = AttemptCommand;
    type Event = AttemptEvent;
    type Error = AttemptError;
    type Services = ();

    async fn handle(
        &mut self,
        command: AttemptCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), AttemptError> {
        let event = match command {
            AttemptCommand::StartAttempt {
                attempt_id,
                user_id,
                test,
                now,
            } => self.start(attempt_id, user_id, test, now)?,
            AttemptCommand::RecordAnswer {
                by,
                question_id,
                choice,
                test,
                now,
            } => {
                let started = self.open_for(&by, now)?;
                let mut errors = ValidationErrors::new();
                let choice = check_answer(&test, &question_id, choice, "choice", &mut errors)
                    .ok_or(AttemptError::InvalidAnswers(errors))?;
                AttemptEvent::AnswerRecorded {
                    attempt_id: started.attempt_id,
                    question_id,
                    choice,
                    recorded_at: now,
                }
            }
            AttemptCommand::SubmitAttempt {
                by,
                answers,
                test,
                now,
            } => self.submit(&by, answers, &test, now)?,
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: AttemptEvent) {
        match event {
            AttemptEvent::AttemptStarted {
                attempt_id,
                test_id,
                user_id,
                started_at,
                time_limit_secs,
                max_score,
            } => {
                self.started = Some(StartedAttempt {
                    attempt_id,
                    test_id,
                    user_id,
                    started_at,
                    time_limit_secs,
                    max_score,
                });
            }
            AttemptEvent::AnswerRecorded {
                question_id,
                choice,
                ..
            } => {
                self.answers.insert(question_id, choice);
            }
            AttemptEvent::AttemptSubmitted {
                answers,
                score,
                max_score,
                correct,
                duration_ms,
                submitted_at,
                ..
            } => {
                self.answers = answers;
                self.grade = Some(Grade {
                    score,
                    max_score,
                    correct,
                    duration_ms,
                    submitted_at,
                });
            }
        }
    }
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod tests;
