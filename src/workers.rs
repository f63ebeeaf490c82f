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
use crate::metrics::Metrics;
use crate::policy::NotificationPolicy;
use crate::relay::ApplyBatch;
use prometheus::Histogram;

/// Starts one worker per projection (leaderboard, feed, attempts, and the
/// notification policy), each stopping when `stop` turns true.
pub fn spawn_all(
    pool: &PgPool,
    bus: &EventBus,
    aggregates: Arc<Aggregates>,
    metrics: &Metrics,
    stop: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let spawner = Spawner {
        pool,
        bus,
        metrics,
        stop,
    };
    vec![
        spawner.spawn(LeaderboardProjection::new(Generation::Live)),
        spawner.spawn(FeedProjection::new(Generation::Live)),
        spawner.spawn(AttemptsProjection::new(Generation::Live)),
        spawner.spawn(NotificationPolicy::new(aggregates)),
    ]
}

/// The same projections for the relay's local target (one node without
/// NATS): each applies a batch and advances its checkpoint in one
/// transaction, as under a worker.
pub fn local_projections(pool: &PgPool, aggregates: Arc<Aggregates>) -> Vec<(String, ApplyBatch)> {
    fn local<L: ProjectionLogic>(pool: &PgPool, logic: L) -> (String, ApplyBatch) {
        let name = logic.name().to_string();
        let projection = Arc::new(Checkpointed::new(pool.clone(), logic));
        let apply: ApplyBatch = Box::new(move |events| {
            let projection = projection.clone();
            Box::pin(async move { Ok(projection.apply(&events).await?.1) })
        });
        (name, apply)
    }
    vec![
        local(pool, LeaderboardProjection::new(Generation::Live)),
        local(pool, FeedProjection::new(Generation::Live)),
        local(pool, AttemptsProjection::new(Generation::Live)),
        local(pool, NotificationPolicy::new(aggregates)),
    ]
}

/// What every worker is started with.
struct Spawner<'a> {
    pool: &'a PgPool,
    bus: &'a EventBus,
    metrics: &'a Metrics,
    stop: &'a watch::Receiver<bool>,
}

impl Spawner<'_> {
    fn spawn<L: ProjectionLogic>(&self, logic: L) -> JoinHandle<()> {
        let name = logic.name().to_string();
        let projection = Arc::new(PgProjection {
            apply_seconds: Some(self.metrics.projection_apply.with_label_values(&[&name])),
            inner: Checkpointed::new(self.pool.clone(), logic),
        });
        let worker = Worker::new(self.bus.clone(), projection, WorkerConfig::default());
        self.metrics.watch_worker(&name, worker.stats());
        let stop = self.stop.clone();
        tokio::spawn(async move {
            if let Err(err) = worker.run(stop).await {
                tracing::error!(%err, "a projection worker stopped");
            }
        })
    }
}

/// A checkpointed Postgres projection, runnable by [`podium_nats::Worker`].
pub struct PgProjection<L> {
    pub inner: Checkpointed<L>,
    /// Where apply times go, if anywhere.
    pub apply_seconds: Option<Histogram>,
}

impl<L> PgProjection<L> {
    pub fn new(inner: Checkpointed<L>) -> Self {
        Self {
            inner,
            apply_seconds: None,
        }
    }
}

fn worker_error(err: ApplyError) -> ProjectionError {
    match err {
        ApplyError::Gap { checkpoint } => ProjectionError::Gap { checkpoint },
        other => ProjectionError::Failed(other.to_string()),
    }
}

impl<L: ProjectionLogic> Projection for PgProjection<L> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn checkpoint(&self) -> Result<u64, ProjectionError> {
        self.inner
            .checkpoint()
            .await
            .map_err(|err| ProjectionError::Failed(err.to_string()))
    }

    async fn apply(&self, events: &[RecordedEvent]) -> Result<Applied, ProjectionError> {
        let timer = self.apply_seconds.as_ref().map(Histogram::start_timer);
        let (checkpoint, changes) = self.inner.apply(events).await.map_err(worker_error)?;
        drop(timer);
        Ok(Applied {
            checkpoint,
            changes,
        })
    }

    async fn skip(&self, seq: u64) -> Result<(), ProjectionError> {
        self.inner.skip(seq).await.map_err(worker_error)
    }
}
