use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{TestCommand, TestDefinition, TestEvent};

/// A test as its events left it: `None` until published.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Test {
    pub published: Option<PublishedTest>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedTest {
    pub test_id: Uuid,
    pub definition: TestDefinition,
    pub archived: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TestError {
    #[error("a test with this id already exists")]
    AlreadyExists,
    #[error("no such test")]
    NotFound,
}

impl Aggregate for Test {
    const TYPE: &'static str = "Test";
    type Command = TestCommand;
    type Event = TestEvent;
    type Error = TestError;
    type Services = ();

    async fn handle(
        &mut self,
        command: TestCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), TestError> {
        match (command, &self.published) {
            (TestCommand::PublishTest { .. }, Some(_)) => Err(TestError::AlreadyExists),
            (
                TestCommand::PublishTest {
                    test_id,
                    definition,
                },
                None,
            ) => {
                let event = TestEvent::TestPublished {
                    test_id,
                    definition,
                };
                sink.write(event, self).await;
                Ok(())
            }
            (TestCommand::ArchiveTest, None) => Err(TestError::NotFound),
            (TestCommand::ArchiveTest, Some(test)) if test.archived => Ok(()),
            (TestCommand::ArchiveTest, Some(test)) => {
                let event = TestEvent::TestArchived {
                    test_id: test.test_id,
                };
                sink.write(event, self).await;
                Ok(())
            }
        }
    }

    fn apply(&mut self, event: TestEvent) {
        match event {
            TestEvent::TestPublished {
                test_id,
                definition,
            } => {
                self.published = Some(PublishedTest {
                    test_id,
                    definition,
                    archived: false,
                });
            }
            TestEvent::TestArchived { .. } => {
                if let Some(test) = &mut self.published {
                    test.archived = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::test::{QuestionDraft, TestDraft};

    const ID: Uuid = Uuid::from_u128(7);

    fn definition() -> TestDefinition {
        TestDefinition::parse(TestDraft {
            title: "Capitals".into(),
            time_limit_secs: None,
            questions: vec![QuestionDraft {
                id: "q1".into(),
                prompt: "Capital of France?".into(),
                choices: vec!["Lyon".into(), "Paris".into()],
                answer: 1,
                points: 3,
            }],
        })
        .unwrap()
    }

    fn published() -> TestEvent {
        TestEvent::TestPublished {
            test_id: ID,
            definition: definition(),
        }
    }

    #[test]
    fn publishing_a_new_test_records_it() {
        TestFramework::<Test>::with(())
            .given_no_previous_events()
            .when(TestCommand::PublishTest {
                test_id: ID,
                definition: definition(),
            })
            .then_expect_events(vec![published()]);
    }

    #[test]
    fn publishing_twice_is_a_conflict() {
        TestFramework::<Test>::with(())
            .given(vec![published()])
            .when(TestCommand::PublishTest {
                test_id: ID,
                definition: definition(),
            })
            .then_expect_error(TestError::AlreadyExists);
    }

    #[test]
    fn archiving_records_once_and_then_changes_nothing() {
        TestFramework::<Test>::with(())
            .given(vec![published()])
            .when(TestCommand::ArchiveTest)
            .then_expect_events(vec![TestEvent::TestArchived { test_id: ID }]);
        TestFramework::<Test>::with(())
            .given(vec![published(), TestEvent::TestArchived { test_id: ID }])
            .when(TestCommand::ArchiveTest)
            .then_expect_events(vec![]);
    }

    #[test]
    fn archiving_an_unknown_test_is_not_found() {
        TestFramework::<Test>::with(())
            .given_no_previous_events()
            .when(TestCommand::ArchiveTest)
            .then_expect_error(TestError::NotFound);
    }
}
