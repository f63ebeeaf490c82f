//! Glue between the projections' Postgres stores and the NATS worker runtime,
//! and the set of workers `podium serve` runs.

use std::sync::Arc;

use podium_domain::log::RecordedEvent;
use podium_nats::{Applied, EventBus, Projection, ProjectionError, Worker, WorkerConfig};
use podium_projections::attempts::AttemptsProjection;
use podium_projections::feed::FeedProjection;
use podium_projections::leaderboard::LeaderboardProjection;
use podium_projections::{ApplyError, Checkpointed, Generation, ProjectionLogic};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::eventstore::Aggregates;
use crate::policy::NotificationPolicy;

/// Starts one worker per projection (leaderboard, feed, attempts, and the
/// notification policy), each stopping when `stop` turns true.
pub fn spawn_all(
    pool: &PgPool,
    bus: &EventBus,
    aggregates: Arc<Aggregates>,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    vec![
        spawn(
            pool,
            bus,
            LeaderboardProjection::new(Generation::Live),
            stop,
        ),
        spawn(pool, bus, FeedProjection::new(Generation::Live), stop),
        spawn(pool, bus, AttemptsProjection::new(Generation::Live), stop),
        spawn(pool, bus, NotificationPolicy::new(aggregates), stop),
    ]
}

fn spawn<L: ProjectionLogic>(
    pool: &PgPool,
    bus: &EventBus,
    logic: L,
    stop: &watch::Receiver<bool>,
) -> JoinHandle<()> {
    let projection = Arc::new(PgProjection(Checkpointed::new(pool.clone(), logic)));
    let worker = Worker::new(bus.clone(), projection, WorkerConfig::default());
    let stop = stop.clone();
    tokio::spawn(async move {
        if let Err(err) = worker.run(stop).await {
            tracing::error!(%err, "a projection worker stopped");
        }
    })
}

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
