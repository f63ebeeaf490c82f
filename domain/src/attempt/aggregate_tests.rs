//! Given/when/then tests for every rule of the `Attempt` aggregate.

use chrono::TimeDelta;
use cqrs_es::test::TestFramework;

use super::*;
use crate::test::{PublishedTest, QuestionDraft, TestDraft};

const ATTEMPT: Uuid = Uuid::from_u128(1);
const TEST: Uuid = Uuid::from_u128(2);

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn alice() -> UserId {
    UserId::parse("alice").unwrap()
}

fn definition(time_limit_secs: Option<i64>) -> TestDefinition {
    let question = |id: &str, answer, points| QuestionDraft {
        id: id.into(),
        prompt: format!("question {id}"),
        choices: vec!["a".into(), "b".into(), "c".into()],
        answer,
        points,
    };
    TestDefinition::parse(TestDraft {
        title: "Quiz".into(),
        time_limit_secs,
        questions: vec![
            question("q1", 0, 2),
            question("q2", 1, 3),
            question("q3", 2, 5),
        ],
    })
    .unwrap()
}

fn published(archived: bool) -> PublishedTest {
    PublishedTest {
        test_id: TEST,
        definition: definition(Some(60)),
        archived,
    }
}

fn started() -> AttemptEvent {
    AttemptEvent::AttemptStarted {
        attempt_id: ATTEMPT,
        test_id: TEST,
        user_id: alice(),
        started_at: now(),
        time_limit_secs: Some(60),
        max_score: 10,
    }
}

fn answered(question_id: &str, choice: u32) -> AttemptEvent {
    AttemptEvent::AnswerRecorded {
        attempt_id: ATTEMPT,
        question_id: question_id.into(),
        choice,
        recorded_at: now(),
    }
}

fn start(test: Option<PublishedTest>) -> AttemptCommand {
    AttemptCommand::StartAttempt {
        attempt_id: ATTEMPT,
        user_id: alice(),
        test,
        now: now(),
    }
}

fn submit(by: &str, answers: &[(&str, i64)], after_secs: i64) -> AttemptCommand {
    AttemptCommand::SubmitAttempt {
        by: UserId::parse(by).unwrap(),
        answers: answers.iter().map(|(q, c)| (q.to_string(), *c)).collect(),
        test: definition(Some(60)),
        now: now() + TimeDelta::seconds(after_secs),
    }
}

fn record(by: &str, question_id: &str, choice: i64) -> AttemptCommand {
    AttemptCommand::RecordAnswer {
        by: UserId::parse(by).unwrap(),
        question_id: question_id.into(),
        choice,
        test: definition(Some(60)),
        now: now() + TimeDelta::seconds(5),
    }
}

fn framework() -> TestFramework<Attempt> {
    TestFramework::with(())
}

#[test]
fn starting_records_the_test_limits_and_max_score() {
    framework()
        .given_no_previous_events()
        .when(start(Some(published(false))))
        .then_expect_events(vec![started()]);
}

#[test]
fn starting_needs_an_existing_test_that_is_not_archived() {
    framework()
        .given_no_previous_events()
        .when(start(None))
        .then_expect_error(AttemptError::TestNotFound);
    framework()
        .given_no_previous_events()
        .when(start(Some(published(true))))
        .then_expect_error(AttemptError::TestArchived);
}

#[test]
fn starting_an_existing_attempt_is_reported() {
    framework()
        .given(vec![started()])
        .when(start(Some(published(false))))
        .then_expect_error(AttemptError::AlreadyStarted);
}

#[test]
fn recording_an_answer_checks_question_and_choice() {
    framework()
        .given(vec![started()])
        .when(record("alice", "q2", 1))
        .then_expect_events(vec![AttemptEvent::AnswerRecorded {
            attempt_id: ATTEMPT,
            question_id: "q2".into(),
            choice: 1,
            recorded_at: now() + TimeDelta::seconds(5),
        }]);
    for (question, choice) in [("q9", 0), ("q1", 3), ("q1", -1)] {
        let result = framework()
            .given(vec![started()])
            .when(record("alice", question, choice))
            .inspect_result();
        assert!(
            matches!(result, Err(AttemptError::InvalidAnswers(_))),
            "{question} {choice}"
        );
    }
}

#[test]
fn only_the_owner_may_answer_or_submit() {
    framework()
        .given(vec![started()])
        .when(record("mallory", "q1", 0))
        .then_expect_error(AttemptError::NotOwner);
    framework()
        .given(vec![started()])
        .when(submit("mallory", &[], 10))
        .then_expect_error(AttemptError::NotOwner);
}

#[test]
fn answering_or_submitting_an_unknown_attempt_is_not_found() {
    framework()
        .given_no_previous_events()
        .when(submit("alice", &[], 10))
        .then_expect_error(AttemptError::NotFound);
}

#[test]
fn submitting_grades_recorded_answers_overridden_by_submitted_ones() {
    // q1 recorded right (2 points), q2 recorded wrong but fixed at submit (3),
    // q3 left unanswered.
    framework()
        .given(vec![started(), answered("q1", 0), answered("q2", 0)])
        .when(submit("alice", &[("q2", 1)], 42))
        .then_expect_events(vec![AttemptEvent::AttemptSubmitted {
            attempt_id: ATTEMPT,
            test_id: TEST,
            user_id: alice(),
            answers: [("q1".to_string(), 0), ("q2".to_string(), 1)].into(),
            score: 5,
            max_score: 10,
            correct: 2,
            question_count: 3,
            duration_ms: 42_000,
            submitted_at: now() + TimeDelta::seconds(42),
        }]);
}

#[test]
fn submitting_rejects_invalid_answers_and_records_nothing() {
    let result = framework()
        .given(vec![started()])
        .when(submit("alice", &[("q1", 0), ("nope", 1), ("q2", 7)], 10))
        .inspect_result();
    let Err(AttemptError::InvalidAnswers(errors)) = result else {
        panic!("expected invalid answers, got {result:?}");
    };
    let fields: Vec<_> = errors.fields().iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["answers.nope", "answers.q2"]);
}

#[test]
fn a_submitted_attempt_cannot_be_submitted_or_answered_again() {
    let submitted = framework()
        .given(vec![started()])
        .when(submit("alice", &[], 10))
        .inspect_result()
        .unwrap();
    let mut history = vec![started()];
    history.extend(submitted);
    framework()
        .given(history.clone())
        .when(submit("alice", &[], 11))
        .then_expect_error(AttemptError::AlreadySubmitted);
    framework()
        .given(history)
        .when(record("alice", "q1", 0))
        .then_expect_error(AttemptError::AlreadySubmitted);
}

#[test]
fn the_time_limit_allows_a_short_grace_and_no_more() {
    let in_grace = 60 + SUBMISSION_GRACE.num_seconds();
    let result = framework()
        .given(vec![started()])
        .when(submit("alice", &[], in_grace))
        .inspect_result();
    assert!(result.is_ok(), "{result:?}");
    framework()
        .given(vec![started()])
        .when(submit("alice", &[], in_grace + 1))
        .then_expect_error(AttemptError::TimeLimitExceeded {
            deadline: now() + TimeDelta::seconds(in_grace),
        });
}

#[test]
fn an_untimed_test_accepts_late_submissions() {
    let untimed = AttemptEvent::AttemptStarted {
        attempt_id: ATTEMPT,
        test_id: TEST,
        user_id: alice(),
        started_at: now(),
        time_limit_secs: None,
        max_score: 10,
    };
    let result = framework()
        .given(vec![untimed])
        .when(submit("alice", &[], 86_400))
        .inspect_result();
    assert!(result.is_ok(), "{result:?}");
}
