//! Grading: the server's score for a set of answers, from the answer key.

use std::collections::BTreeMap;

use chrono::TimeDelta;

use crate::test::TestDefinition;
use crate::validation::ValidationErrors;

/// How long after the time limit a submission is still accepted, to absorb
/// network delay between the learner's last click and our clock.
pub const SUBMISSION_GRACE: TimeDelta = TimeDelta::seconds(10);

/// The outcome of grading: points scored and questions answered correctly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Score {
    pub score: u32,
    pub max_score: u32,
    pub correct: u32,
}

/// Grades `answers` (question id → choice index) against the test's key.
/// Unanswered questions score nothing.
pub fn grade(test: &TestDefinition, answers: &BTreeMap<String, u32>) -> Score {
    let (score, correct) = test
        .questions
        .iter()
        .filter(|q| answers.get(&q.id) == Some(&q.answer))
        .fold((0, 0), |(score, correct), q| {
            (score + q.points, correct + 1)
        });
    Score {
        score,
        max_score: test.max_score(),
        correct,
    }
}

/// Checks one answer against the test: the question must exist and the choice
/// must be one of its indexes. `field` names the answer in error messages.
pub(crate) fn check_answer(
    test: &TestDefinition,
    question_id: &str,
    choice: i64,
    field: &str,
    errors: &mut ValidationErrors,
) -> Option<u32> {
    let Some(question) = test.question(question_id) else {
        errors.add(field, format!("the test has no question {question_id:?}"));
        return None;
    };
    if choice < 0 || choice >= question.choices.len() as i64 {
        errors.add(
            field,
            format!(
                "must be a choice index from 0 to {}",
                question.choices.len() - 1
            ),
        );
        return None;
    }
    Some(choice as u32)
}
