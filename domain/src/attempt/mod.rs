//! The `Attempt` aggregate: one learner's go at one test, from start through
//! answers to a submission that the server grades from the answer key.

mod aggregate;
mod commands;
mod events;
mod grading;

pub use aggregate::{Attempt, AttemptError, Grade, StartedAttempt};
pub use commands::AttemptCommand;
pub use events::AttemptEvent;
pub use grading::{grade, Score, SUBMISSION_GRACE};
