//! Glue between the projections' Postgres stores and the NATS worker runtime.

use podium_domain::log::RecordedEvent;
use podium_nats::{Applied, Projection, ProjectionError};
use podium_projections::{ApplyError, Checkpointed, ProjectionLogic};

/// A checkpointed Postgres projection, runnable by [`podium_nats::Worker`].
pub struct PgProjection<L>(pub Checkpointed<L>);

fn worker_error(err: ApplyError) -> ProjectionError {
    match err {
        ApplyError::Gap { checkpoint } => ProjectionError::Gap { checkpoint },
        other => ProjectionError::Failed(other.to_string()),
    }
}

impl<L: ProjectionLogic> Projection for PgProjection<L> {
    fn name(&self) -> &str {
        self.0.name()
    }

    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.0
            .checkpoint()
            .await
            .map_err(|err| ProjectionError::Failed(err.to_string()))
    }

    async fn apply(&self, events: &[RecordedEvent]) -> Result<Applied, ProjectionError> {
        let (checkpoint, changes) = self.0.apply(events).await.map_err(worker_error)?;
        Ok(Applied {
            checkpoint,
            changes,
        })
    }

    async fn skip(&self, seq: u64) -> Result<(), ProjectionError> {
        self.0.skip(seq).await.map_err(worker_error)
    }
}
