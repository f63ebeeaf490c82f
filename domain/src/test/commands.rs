use uuid::Uuid;

use super::TestDefinition;

#[derive(Debug, Clone)]
pub enum TestCommand {
    /// Publish a new test; `test_id` is also the aggregate id it is sent to.
    PublishTest {
        test_id: Uuid,
        definition: TestDefinition,
    },
    /// Stop accepting new attempts. Archiving an archived test changes nothing.
    ArchiveTest,
}
