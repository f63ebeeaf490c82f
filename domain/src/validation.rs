//! Field-level validation errors, reported to clients as a list.

use std::fmt;

use serde::Serialize;

/// One invalid field: a path such as `questions[2].answer` and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Every problem found in one input, collected rather than stopping at the first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ValidationErrors(Vec<FieldError>);

impl ValidationErrors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn single(field: impl Into<String>, message: impl Into<String>) -> Self {
        let mut errors = Self::new();
        errors.add(field, message);
        errors
    }

    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    /// Takes in every error of `other`.
    pub fn extend(&mut self, other: ValidationErrors) {
        self.0.extend(other.0);
    }

    /// Checks that `value` has between `min` and `max` characters.
    pub fn check_len(&mut self, field: impl Into<String>, value: &str, min: usize, max: usize) {
        let len = value.chars().count();
        if len < min || len > max {
            let message = if min == 0 {
                format!("must be at most {max} characters")
            } else {
                format!("must be {min} to {max} characters")
            };
            self.add(field, message);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn fields(&self) -> &[FieldError] {
        &self.0
    }

    /// `Ok(value)` when nothing was found, else the errors.
    pub fn into_result<T>(self, value: T) -> Result<T, Self> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

/// How many errors a message names; the rest are counted.
const NAMED_IN_MESSAGE: usize = 5;

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .take(NAMED_IN_MESSAGE)
            .map(|e| format!("{}: {}", e.field, e.message))
            .collect();
        f.write_str(&parts.join("; "))?;
        match self.0.len().saturating_sub(NAMED_IN_MESSAGE) {
            0 => Ok(()),
            more => write!(f, "; and {more} more"),
        }
    }
}

impl std::error::Error for ValidationErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_names_a_few_errors_and_counts_the_rest() {
        let mut errors = ValidationErrors::new();
        for n in 0..1_000 {
            errors.add(format!("answers.q{n}"), "no such question");
        }
        let message = errors.to_string();
        assert!(message.starts_with("answers.q0: no such question; answers.q1"));
        assert!(message.ends_with("; and 995 more"), "{message}");
        assert!(message.len() < 300);
    }
}
