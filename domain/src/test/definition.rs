//! A test's content, parsed from a client's draft: invalid definitions cannot
//! be constructed.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::validation::ValidationErrors;

pub const MAX_TITLE_LEN: usize = 200;
pub const MAX_QUESTIONS: usize = 500;
pub const MAX_QUESTION_ID_LEN: usize = 64;
pub const MAX_PROMPT_LEN: usize = 2_000;
pub const MIN_CHOICES: usize = 2;
pub const MAX_CHOICES: usize = 20;
pub const MAX_CHOICE_LEN: usize = 500;
pub const MAX_POINTS: i64 = 1_000;
/// One week: longer limits are almost certainly a unit mistake.
pub const MAX_TIME_LIMIT_SECS: i64 = 7 * 24 * 3600;
/// The most a definition may weigh as JSON. It travels whole in one event,
/// and every event is one NATS message: NATS refuses messages over its
/// `max_payload` (1 MiB by default), so a definition stays well below it.
pub const MAX_DEFINITION_BYTES: usize = 512 * 1024;

/// What a client sends to publish a test. Numbers are wide so that out-of-range
/// values are reported per field rather than as a parse failure.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestDraft {
    pub title: String,
    #[serde(default)]
    pub time_limit_secs: Option<i64>,
    pub questions: Vec<QuestionDraft>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuestionDraft {
    pub id: String,
    pub prompt: String,
    pub choices: Vec<String>,
    pub answer: i64,
    pub points: i64,
}

/// A valid test: at least one question, unique question ids, every answer
/// index inside its choices, points in `0..=1000`, bounded sizes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestDefinition {
    pub title: String,
    pub time_limit_secs: Option<u32>,
    pub questions: Vec<Question>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    pub id: String,
    pub prompt: String,
    pub choices: Vec<String>,
    pub answer: u32,
    pub points: u32,
}

impl TestDefinition {
    pub fn parse(draft: TestDraft) -> Result<Self, ValidationErrors> {
        let mut errors = ValidationErrors::new();
        let title = draft.title.trim().to_string();
        errors.check_len("title", &title, 1, MAX_TITLE_LEN);
        let time_limit_secs = match draft.time_limit_secs {
            None => None,
            Some(secs) if (1..=MAX_TIME_LIMIT_SECS).contains(&secs) => Some(secs as u32),
            Some(_) => {
                errors.add(
                    "time_limit_secs",
                    format!("must be between 1 and {MAX_TIME_LIMIT_SECS}"),
                );
                None
            }
        };
        if draft.questions.is_empty() || draft.questions.len() > MAX_QUESTIONS {
            errors.add(
                "questions",
                format!("must hold 1 to {MAX_QUESTIONS} questions"),
            );
        }
        let mut seen = HashSet::new();
        let mut questions = Vec::with_capacity(draft.questions.len());
        for (i, q) in draft.questions.into_iter().enumerate() {
            let at = |field: &str| format!("questions[{i}].{field}");
            errors.check_len(at("id"), &q.id, 1, MAX_QUESTION_ID_LEN);
            if !seen.insert(q.id.clone()) {
                errors.add(at("id"), format!("duplicate question id {:?}", q.id));
            }
            errors.check_len(at("prompt"), &q.prompt, 1, MAX_PROMPT_LEN);
            if q.choices.len() < MIN_CHOICES || q.choices.len() > MAX_CHOICES {
                errors.add(
                    at("choices"),
                    format!("must hold {MIN_CHOICES} to {MAX_CHOICES} choices"),
                );
            }
            for (j, choice) in q.choices.iter().enumerate() {
                errors.check_len(
                    format!("questions[{i}].choices[{j}]"),
                    choice,
                    1,
                    MAX_CHOICE_LEN,
                );
            }
            if q.answer < 0 || q.answer >= q.choices.len() as i64 {
                errors.add(at("answer"), "must be the index of one of the choices");
            }
            if !(0..=MAX_POINTS).contains(&q.points) {
                errors.add(at("points"), format!("must be between 0 and {MAX_POINTS}"));
            }
            questions.push(Question {
                id: q.id,
                prompt: q.prompt,
                choices: q.choices,
                answer: q.answer.clamp(0, u32::MAX as i64) as u32,
                points: q.points.clamp(0, MAX_POINTS) as u32,
            });
        }
        let definition = Self {
            title,
            time_limit_secs,
            questions,
        };
        if errors.is_empty() {
            let bytes = definition.json_len();
            if bytes > MAX_DEFINITION_BYTES {
                errors.add(
                    "questions",
                    format!(
                        "the test is {bytes} bytes as JSON; at most {MAX_DEFINITION_BYTES} \
                         (shorten prompts and choices, or split it)"
                    ),
                );
            }
        }
        errors.into_result(definition)
    }

    /// Its size as JSON, in bytes.
    fn json_len(&self) -> usize {
        serde_json::to_vec(self).map_or(usize::MAX, |json| json.len())
    }

    /// The score of a perfect attempt.
    pub fn max_score(&self) -> u32 {
        self.questions.iter().map(|q| q.points).sum()
    }

    pub fn question(&self, id: &str) -> Option<&Question> {
        self.questions.iter().find(|q| q.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_too_heavy_for_one_message_is_refused() {
        let heavy = |prompt_len: usize, choice_len: usize| TestDraft {
            title: "Heavy".into(),
            time_limit_secs: None,
            questions: (0..MAX_QUESTIONS)
                .map(|i| QuestionDraft {
                    prompt: "x".repeat(prompt_len),
                    choices: (0..10)
                        .map(|c| format!("{c}{}", "y".repeat(choice_len)))
                        .collect(),
                    ..question(&format!("q{i}"))
                })
                .collect(),
        };
        // 500 questions of 2,000 characters and 10 choices of 300: ~2.5 MB.
        let errors = TestDefinition::parse(heavy(2_000, 300)).unwrap_err();
        assert_eq!(errors.fields()[0].field, "questions");
        assert!(errors.fields()[0].message.contains("bytes as JSON"));
        // Just under the bound: accepted.
        let fits = TestDefinition::parse(heavy(800, 5)).unwrap();
        assert!(fits.json_len() <= MAX_DEFINITION_BYTES);
    }

    fn question(id: &str) -> QuestionDraft {
        QuestionDraft {
            id: id.into(),
            prompt: "2 + 2?".into(),
            choices: vec!["3".into(), "4".into()],
            answer: 1,
            points: 5,
        }
    }

    fn draft(questions: Vec<QuestionDraft>) -> TestDraft {
        TestDraft {
            title: "Arithmetic".into(),
            time_limit_secs: Some(600),
            questions,
        }
    }

    fn fields(result: Result<TestDefinition, ValidationErrors>) -> Vec<String> {
        result
            .unwrap_err()
            .fields()
            .iter()
            .map(|e| e.field.clone())
            .collect()
    }

    #[test]
    fn parses_a_valid_test_and_sums_its_points() {
        let test = TestDefinition::parse(draft(vec![question("q1"), question("q2")])).unwrap();
        assert_eq!(test.max_score(), 10);
        assert_eq!(test.time_limit_secs, Some(600));
    }

    #[test]
    fn needs_at_least_one_question() {
        assert_eq!(fields(TestDefinition::parse(draft(vec![]))), ["questions"]);
    }

    #[test]
    fn rejects_duplicate_question_ids() {
        let result = TestDefinition::parse(draft(vec![question("q1"), question("q1")]));
        assert_eq!(fields(result), ["questions[1].id"]);
    }

    #[test]
    fn rejects_an_answer_outside_the_choices() {
        let mut q = question("q1");
        q.answer = 2;
        let mut negative = question("q2");
        negative.answer = -1;
        let result = TestDefinition::parse(draft(vec![q, negative]));
        assert_eq!(
            fields(result),
            ["questions[0].answer", "questions[1].answer"]
        );
    }

    #[test]
    fn rejects_negative_points_and_bad_sizes() {
        let mut q = question("q1");
        q.points = -1;
        q.choices = vec!["only".into()];
        q.answer = 0;
        let mut d = draft(vec![q]);
        d.title = " ".into();
        d.time_limit_secs = Some(0);
        let result = TestDefinition::parse(d);
        assert_eq!(
            fields(result),
            [
                "title",
                "time_limit_secs",
                "questions[0].choices",
                "questions[0].points"
            ]
        );
    }

    #[test]
    fn bounds_the_number_of_questions_and_choices() {
        let many: Vec<_> = (0..=MAX_QUESTIONS)
            .map(|i| question(&format!("q{i}")))
            .collect();
        assert_eq!(fields(TestDefinition::parse(draft(many))), ["questions"]);
        let mut q = question("q1");
        q.choices = (0..=MAX_CHOICES).map(|i| i.to_string()).collect();
        assert_eq!(
            fields(TestDefinition::parse(draft(vec![q]))),
            ["questions[0].choices"]
        );
    }
}
