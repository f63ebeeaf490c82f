use cqrs_es::DomainEvent;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::TestDefinition;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestEvent {
    TestPublished {
        test_id: Uuid,
        definition: TestDefinition,
    },
    TestArchived {
        test_id: Uuid,
    },
}

impl DomainEvent for TestEvent {
    fn event_type(&self) -> String {
        match self {
            Self::TestPublished { .. } => "TestPublished",
            Self::TestArchived { .. } => "TestArchived",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        crate::EVENT_VERSION.to_string()
    }
}
