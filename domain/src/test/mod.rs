//! The `Test` aggregate: a published set of multiple-choice questions with an
//! answer key, which can later be archived (no new attempts).

mod aggregate;
mod commands;
mod definition;
mod events;

pub use aggregate::{PublishedTest, Test, TestError};
pub use commands::TestCommand;
pub use definition::{Question, QuestionDraft, TestDefinition, TestDraft};
pub use events::TestEvent;
