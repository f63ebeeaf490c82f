//! The `Collection` aggregate: a titled set of published tests whose
//! learners are ranked together (a cross-test leaderboard). Tests are added,
//! never removed, so a collection's boards only ever count more.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ValidationErrors;

/// Most tests in one collection.
pub const MAX_TESTS: usize = 100;
/// Longest title, in characters.
pub const MAX_TITLE_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub enum CollectionCommand {
    /// Create a collection of `test_ids` (checked published by the caller);
    /// `collection_id` is also the aggregate id it is sent to.
    CreateCollection {
        collection_id: Uuid,
        title: String,
        test_ids: Vec<Uuid>,
    },
    /// Add a test (checked published by the caller); adding a test the
    /// collection has changes nothing.
    AddTest { test_id: Uuid },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollectionEvent {
    CollectionCreated {
        collection_id: Uuid,
        title: String,
        test_ids: Vec<Uuid>,
    },
    CollectionTestAdded {
        collection_id: Uuid,
        test_id: Uuid,
    },
}

impl DomainEvent for CollectionEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CollectionCreated { .. } => "CollectionCreated",
            Self::CollectionTestAdded { .. } => "CollectionTestAdded",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}

/// A collection as its events left it: `None` until created.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Collection {
    pub created: Option<CreatedCollection>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedCollection {
    pub collection_id: Uuid,
    pub title: String,
    /// In the order they were added.
    pub test_ids: Vec<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollectionError {
    #[error("a collection with this id already exists")]
    AlreadyExists,
    #[error("no such collection")]
    NotFound,
    #[error("{0}")]
    Invalid(ValidationErrors),
    #[error("a collection holds at most {MAX_TESTS} tests")]
    Full,
}

/// The title and tests of a new collection, checked: a title of 1–200
/// characters, 1–100 tests, none twice.
pub fn validate(title: &str, test_ids: &[Uuid]) -> Result<(), ValidationErrors> {
    let mut errors = ValidationErrors::new();
    errors.check_len("title", title.trim(), 1, MAX_TITLE_CHARS);
    if test_ids.is_empty() || test_ids.len() > MAX_TESTS {
        errors.add("test_ids", format!("must hold 1–{MAX_TESTS} tests"));
    }
    for (i, test_id) in test_ids.iter().enumerate() {
        if test_ids[..i].contains(test_id) {
            errors.add(format!("test_ids[{i}]"), "is given twice");
        }
    }
    errors.into_result(())
}

impl Aggregate for Collection {
    const TYPE: &'static str = "Collection";
    type Command = CollectionCommand;
    type Event = CollectionEvent;
    type Error = CollectionError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CollectionCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CollectionError> {
        match (command, &self.created) {
            (CollectionCommand::CreateCollection { .. }, Some(_)) => {
                Err(CollectionError::AlreadyExists)
            }
            (
                CollectionCommand::CreateCollection {
                    collection_id,
                    title,
                    test_ids,
                },
                None,
            ) => {
                validate(&title, &test_ids).map_err(CollectionError::Invalid)?;
                let event = CollectionEvent::CollectionCreated {
                    collection_id,
                    title: title.trim().to_string(),
                    test_ids,
                };
                sink.write(event, self).await;
                Ok(())
            }
            (CollectionCommand::AddTest { .. }, None) => Err(CollectionError::NotFound),
            (CollectionCommand::AddTest { test_id }, Some(collection)) => {
                if collection.test_ids.contains(&test_id) {
                    return Ok(());
                }
                if collection.test_ids.len() >= MAX_TESTS {
                    return Err(CollectionError::Full);
                }
                let event = CollectionEvent::CollectionTestAdded {
                    collection_id: collection.collection_id,
                    test_id,
                };
                sink.write(event, self).await;
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: CollectionEvent) {
        match event {
            CollectionEvent::CollectionCreated {
                collection_id,
                title,
                test_ids,
            } => {
                self.created = Some(CreatedCollection {
                    collection_id,
                    title,
                    test_ids,
                });
            }
            CollectionEvent::CollectionTestAdded { test_id, .. } => {
                if let Some(collection) = &mut self.created {
                    collection.test_ids.push(test_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    const ID: Uuid = Uuid::from_u128(11);
    const A: Uuid = Uuid::from_u128(1);
    const B: Uuid = Uuid::from_u128(2);

    fn created(test_ids: Vec<Uuid>) -> CollectionEvent {
        CollectionEvent::CollectionCreated {
            collection_id: ID,
            title: "Term 1".into(),
            test_ids,
        }
    }

    fn create(title: &str, test_ids: Vec<Uuid>) -> CollectionCommand {
        CollectionCommand::CreateCollection {
            collection_id: ID,
            title: title.into(),
            test_ids,
        }
    }

    #[test]
    fn creating_records_the_title_trimmed_and_the_tests() {
        TestFramework::<Collection>::with(())
            .given_no_previous_events()
            .when(create("  Term 1 ", vec![A]))
            .then_expect_events(vec![created(vec![A])]);
    }

    #[test]
    fn creating_twice_is_a_conflict() {
        TestFramework::<Collection>::with(())
            .given(vec![created(vec![A])])
            .when(create("Term 1", vec![A]))
            .then_expect_error(CollectionError::AlreadyExists);
    }

    #[test]
    fn a_blank_title_no_tests_or_a_test_twice_is_refused_with_every_field() {
        let errors = validate(" ", &[]).unwrap_err();
        let fields: Vec<&str> = errors.fields().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["title", "test_ids"]);
        let errors = validate("Term", &[A, B, A]).unwrap_err();
        let fields: Vec<&str> = errors.fields().iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["test_ids[2]"]);
        let many: Vec<Uuid> = (0..=MAX_TESTS as u128).map(Uuid::from_u128).collect();
        assert!(validate("Term", &many).is_err());
        assert!(validate("Term", &many[..MAX_TESTS]).is_ok());
        assert!(validate(&"x".repeat(MAX_TITLE_CHARS + 1), &[A]).is_err());
    }

    #[test]
    fn adding_records_a_new_test_once() {
        TestFramework::<Collection>::with(())
            .given(vec![created(vec![A])])
            .when(CollectionCommand::AddTest { test_id: B })
            .then_expect_events(vec![CollectionEvent::CollectionTestAdded {
                collection_id: ID,
                test_id: B,
            }]);
        TestFramework::<Collection>::with(())
            .given(vec![created(vec![A])])
            .when(CollectionCommand::AddTest { test_id: A })
            .then_expect_events(vec![]);
    }

    #[test]
    fn adding_to_an_unknown_or_full_collection_is_refused() {
        TestFramework::<Collection>::with(())
            .given_no_previous_events()
            .when(CollectionCommand::AddTest { test_id: A })
            .then_expect_error(CollectionError::NotFound);
        let full: Vec<Uuid> = (100..100 + MAX_TESTS as u128)
            .map(Uuid::from_u128)
            .collect();
        TestFramework::<Collection>::with(())
            .given(vec![created(full)])
            .when(CollectionCommand::AddTest { test_id: A })
            .then_expect_error(CollectionError::Full);
    }
}
