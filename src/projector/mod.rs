//! The projection engine: the projections `podium serve` keeps, each run by
//! exactly one instance at a time.
//!
//! Every projection has a lease ([`crate::ops::lease`]); the instance holding it
//! runs a [`podium_nats::Worker`] that reads the events stream from the
//! projection's own checkpoint and applies natural batches, fenced by the
//! lease's token inside each transaction. The other instances stand by and
//! take over within one lease TTL when the owner stops renewing. Different
//! projections may be owned by different instances, so the work spreads.
//!
//! Here too: the one list of projections ([`registry`]), the embedded mode's
//! in-process runner ([`local`]), rebuilds ([`replay`]) and the time-triggered
//! notifications of period podiums ([`podiums`]). May use `relay`, `command`
//! (the policy issues commands), `query`, `log`, `ops`, `config` and `clock`.

pub mod local;
pub mod operations;
pub mod podiums;
pub mod registry;
pub mod replay;

use std::sync::Arc;
use std::time::Duration;

use podium_domain::log::RecordedEvent;
use podium_nats::{
    Applied, DeadLetter, EventBus, Projection, ProjectionError, Worker, WorkerConfig, WorkerError,
    WorkerStats,
};
use podium_projections::{ApplyError, Checkpointed, ProjectionLogic};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ops::lease::{supervise, Lease, RoleExit, RoleState, RoleStatus};
use crate::ops::metrics::{raise_to, Metrics, Probe, PROJECTION_STATES};
use crate::relay::ApplyBatch;
use prometheus::Histogram;
pub use registry::LiveParts;
use registry::Register;

/// Starts one supervised worker per projection (leaderboard, feed, attempts,
/// and the notification policy, whose commands go through `aggregates`),
/// each spawned on `tasks` and stopping when `stop` is cancelled.
pub fn spawn_all(
    pool: &PgPool,
    bus: &EventBus,
    parts: LiveParts,
    metrics: &Metrics,
    tasks: &TaskTracker,
    stop: &CancellationToken,
    leases: Leases<'_>,
) -> Vec<JoinHandle<()>> {
    let mut spawner = Spawner {
        pool,
        bus,
        metrics,
        tasks,
        stop,
        leases,
        watched: Vec::new(),
        spawned: Vec::new(),
    };
    registry::live(parts, &mut spawner);
    metrics.watch(Arc::new(ProjectionsProbe {
        pool: pool.clone(),
        relay: bus.subjects().prefix().to_string(),
        workers: spawner.watched,
    }));
    spawner.spawned
}

/// The projections' figures for `/metrics`: state on this instance, worker
/// counters, checkpoints and lag behind the head of the log, and which
/// instance owns each lease.
struct ProjectionsProbe {
    pool: PgPool,
    /// The relay whose numbering says where the head of the log is.
    relay: String,
    workers: Vec<(String, Arc<WorkerStats>, Arc<RoleStatus>)>,
}

#[async_trait::async_trait]
impl Probe for ProjectionsProbe {
    fn read(&self, metrics: &Metrics) {
        use std::sync::atomic::Ordering::Relaxed;
        for (projection, stats, status) in &self.workers {
            let p = [projection.as_str()];
            let state = match status.state() {
                RoleState::Standby => "standby",
                RoleState::Halted => "halted",
                RoleState::Running if stats.caught_up.load(Relaxed) => "running",
                RoleState::Running => "catching_up",
            };
            for name in PROJECTION_STATES {
                metrics
                    .projection_state
                    .with_label_values(&[projection, name])
                    .set(i64::from(name == state));
            }
            raise_to(
                &metrics.projection_transient_retries.with_label_values(&p),
                stats.transient_retries.load(Relaxed),
            );
            raise_to(
                &metrics.projection_redeliveries.with_label_values(&p),
                stats.repeats.load(Relaxed) + stats.out_of_order.load(Relaxed),
            );
            raise_to(
                &metrics.projection_retries.with_label_values(&p),
                stats.retries.load(Relaxed),
            );
            raise_to(
                &metrics.projection_dead_letters.with_label_values(&p),
                stats.dead_lettered.load(Relaxed),
            );
        }
    }

    async fn sample(&self, metrics: &Metrics) {
        let head = crate::relay::head(&self.pool, &self.relay).await.ok();
        let checkpoints = Checkpoints::load(&self.pool).await.unwrap_or_default();
        let owners: Vec<(String, String)> =
            sqlx::query_as("SELECT name, owner FROM leases WHERE expires_at > now()")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        metrics.lease_owner.reset();
        for (lease, owner) in &owners {
            metrics
                .lease_owner
                .with_label_values(&[lease, owner])
                .set(1);
        }
        for (projection, _, _) in &self.workers {
            let p = [projection.as_str()];
            let (seq, _) = checkpoints.of(projection);
            metrics.projection_checkpoint.with_label_values(&p).set(seq);
            if let Some(head) = head {
                let (behind, seconds) = checkpoints.lag(projection, head);
                metrics
                    .projection_lag_events
                    .with_label_values(&p)
                    .set(behind);
                metrics
                    .projection_lag_seconds
                    .with_label_values(&p)
                    .set(seconds);
            }
        }
    }
    fn halted(&self) -> Vec<(String, String)> {
        self.workers
            .iter()
            .filter_map(|(name, _, status)| status.halted().map(|reason| (name.clone(), reason)))
            .collect()
    }
}

/// Every projection's checkpoint, and how long ago it last moved.
#[derive(Default)]
pub struct Checkpoints(std::collections::HashMap<String, (i64, f64)>);

impl Checkpoints {
    pub async fn load(pool: &PgPool) -> Result<Self, sqlx::Error> {
        let rows: Vec<(String, i64, f64)> = sqlx::query_as(
            "SELECT name, seq, EXTRACT(EPOCH FROM now() - updated_at)::float8 FROM projection_checkpoints",
        )
        .fetch_all(pool)
        .await?;
        Ok(Self(
            rows.into_iter()
                .map(|(name, seq, idle)| (name, (seq, idle)))
                .collect(),
        ))
    }

    /// Projection `name`'s checkpoint and seconds since it moved (0 before
    /// its first event).
    pub fn of(&self, name: &str) -> (i64, f64) {
        self.0.get(name).copied().unwrap_or((0, 0.0))
    }

    /// How far `name` is behind `head`, in events, and how long it has
    /// stood still while behind (0 when caught up).
    pub fn lag(&self, name: &str, head: i64) -> (i64, f64) {
        let (seq, idle) = self.of(name);
        let behind = (head - seq).max(0);
        (behind, if behind > 0 { idle } else { 0.0 })
    }
}

/// Delivery intake for the relay's local target (one node without NATS):
/// records the deliveries each batch asks for before the relay moves on, so
/// a failure makes the relay send the batch again (recorded once).
pub fn delivery_intake(deliveries: Arc<crate::delivery::Deliveries>) -> (String, ApplyBatch) {
    let apply: ApplyBatch = Box::new(move |events| {
        let deliveries = deliveries.clone();
        Box::pin(async move {
            deliveries
                .intake(&crate::delivery::Channel::ALL, &events)
                .await?;
            Ok(Vec::new())
        })
    });
    ("delivery".to_string(), apply)
}

/// The same projections for the relay's local target (one node without
/// NATS): each applies a batch and advances its checkpoint in one
/// transaction, as under a worker.
pub fn local_projections(pool: &PgPool, parts: LiveParts) -> Vec<(String, ApplyBatch)> {
    struct Local<'a> {
        pool: &'a PgPool,
        projections: Vec<(String, ApplyBatch)>,
    }
    impl Register for Local<'_> {
        fn register<L: ProjectionLogic>(&mut self, logic: L) {
            let name = logic.name().to_string();
            let projection = Arc::new(Checkpointed::new(self.pool.clone(), logic));
            let apply: ApplyBatch = Box::new(move |events| {
                let projection = projection.clone();
                Box::pin(async move { Ok(projection.apply(&events).await?.1) })
            });
            self.projections.push((name, apply));
        }
    }
    let mut local = Local {
        pool,
        projections: Vec::new(),
    };
    registry::live(parts, &mut local);
    local.projections
}

/// The lease that gives one instance a projection.
pub fn lease_name(projection: &str) -> String {
    format!("projection:{projection}")
}

/// How this instance holds its projections' leases.
#[derive(Clone, Copy)]
pub struct Leases<'a> {
    /// The leases' own connections ([`crate::ops::db::connect_leases`]).
    pub pool: &'a PgPool,
    /// How long a lease stays with an instance that stopped renewing it.
    pub ttl: Duration,
    /// This instance's name in the lease rows.
    pub owner: &'a str,
    /// The instances it spreads its roles over with, if it does.
    pub roster: Option<&'a Arc<crate::ops::lease::Roster>>,
    /// Events behind the head from which a read model whose lease this
    /// instance takes catches up by a rebuild ([`operations::CatchUp`]).
    pub rebuild_from: u64,
}

/// What every worker is started with.
struct Spawner<'a> {
    pool: &'a PgPool,
    bus: &'a EventBus,
    metrics: &'a Metrics,
    tasks: &'a TaskTracker,
    stop: &'a CancellationToken,
    leases: Leases<'a>,
    /// What the metrics read of each worker spawned.
    watched: Vec<(String, Arc<WorkerStats>, Arc<RoleStatus>)>,
    spawned: Vec<JoinHandle<()>>,
}

impl Register for Spawner<'_> {
    fn register<L: ProjectionLogic>(&mut self, logic: L) {
        let name = logic.name().to_string();
        let mut lease = Lease::new(
            self.leases.pool.clone(),
            &lease_name(&name),
            self.leases.ttl,
            self.leases.owner,
        );
        if let Some(roster) = self.leases.roster {
            lease = lease.on_roster(roster);
        }
        let projection = Arc::new(PgProjection {
            apply_seconds: Some(self.metrics.projection_apply.with_label_values(&[&name])),
            delay_seconds: Some(self.metrics.projection_delay.with_label_values(&[&name])),
            inner: Checkpointed::new(self.pool.clone(), logic).fenced_by(lease.fence().clone()),
        });
        let stats = Arc::new(WorkerStats::default());
        let status = Arc::new(RoleStatus::default());
        self.watched
            .push((name.clone(), stats.clone(), status.clone()));
        // Zero until an operator skips one.
        self.metrics.projection_skipped.with_label_values(&[&name]);
        let bus = self.bus.clone();
        let stop = self.stop.clone();
        // Operators' retries and skips of its dead letters wake it when halted.
        self.spawned
            .push(self.tasks.spawn(operations::watch_requests(
                self.pool.clone(),
                name,
                status.clone(),
                stop.clone(),
            )));
        let pool = self.pool.clone();
        let skipped = self.metrics.projection_skipped.clone();
        let catch_up = operations::CatchUp {
            relay: self.bus.subjects().prefix().to_string(),
            rebuild_from: self.leases.rebuild_from,
        };
        let owner = self.leases.owner.to_string();
        self.spawned.push(
            self.tasks
                .spawn(supervise(lease, status, stop, move |role_stop| {
                    let worker =
                        Worker::new(bus.clone(), projection.clone(), WorkerConfig::default())
                            .sharing_stats(stats.clone());
                    let (pool, projection, skipped, catch_up, owner) = (
                        pool.clone(),
                        projection.clone(),
                        skipped.clone(),
                        catch_up.clone(),
                        owner.clone(),
                    );
                    async move {
                        // What operators asked of its dead letters comes first.
                        if let Err(err) =
                            operations::carry_out_skips(&pool, &*projection, &skipped).await
                        {
                            return RoleExit::Failed(err.to_string());
                        }
                        // Far behind, it catches up from the log first: a
                        // read model by a rebuild, the policy by reading it.
                        catch_up.run(&pool, &*projection, &owner, &role_stop).await;
                        role_exit(worker.run(role_stop).await)
                    }
                })),
        );
    }
}

/// How a worker's end looks to its supervisor.
fn role_exit(result: Result<(), WorkerError>) -> RoleExit {
    match result {
        Ok(()) => RoleExit::Stopped,
        Err(WorkerError::Fenced { .. }) => RoleExit::Fenced,
        Err(err @ (WorkerError::Halted { .. } | WorkerError::Missing { .. })) => {
            RoleExit::Halted(err.to_string())
        }
        Err(err) => RoleExit::Failed(err.to_string()),
    }
}

/// A checkpointed Postgres projection, runnable by [`podium_nats::Worker`].
pub struct PgProjection<L> {
    pub inner: Checkpointed<L>,
    /// Where apply times go, if anywhere.
    pub apply_seconds: Option<Histogram>,
    /// Where the delays of the events it applies go, if anywhere.
    pub delay_seconds: Option<Histogram>,
}

impl<L> PgProjection<L> {
    pub fn new(inner: Checkpointed<L>) -> Self {
        Self {
            inner,
            apply_seconds: None,
            delay_seconds: None,
        }
    }
}

fn worker_error(err: ApplyError) -> ProjectionError {
    match err {
        ApplyError::Gap { checkpoint } => ProjectionError::Gap { checkpoint },
        ApplyError::Fenced { .. } => ProjectionError::Fenced(err.to_string()),
        err if err.is_transient() => ProjectionError::Transient(err.to_string()),
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
            .map_err(|err| worker_error(err.into()))
    }

    async fn apply(&self, events: &[RecordedEvent]) -> Result<Applied, ProjectionError> {
        let timer = self.apply_seconds.as_ref().map(Histogram::start_timer);
        let (checkpoint, changes) = self.inner.apply(events).await.map_err(worker_error)?;
        drop(timer);
        if let Some(delays) = &self.delay_seconds {
            // Those it wanted: the others were passed over unread, with no
            // time of their own.
            let wanted = events
                .iter()
                .filter(|e| self.wants(&e.aggregate_type, &e.event_type));
            crate::ops::metrics::observe_delays(delays, wanted);
        }
        Ok(Applied {
            checkpoint,
            changes,
        })
    }

    fn wants(&self, aggregate_type: &str, event_type: &str) -> bool {
        self.inner.logic().wants(aggregate_type, event_type)
    }

    async fn skip(&self, seq: u64) -> Result<(), ProjectionError> {
        self.inner.skip(seq).await.map_err(worker_error)
    }

    async fn record_dead_letter(&self, letter: &DeadLetter) -> Result<(), ProjectionError> {
        operations::record_dead_letter(self.inner.pool(), self.name(), letter)
            .await
            .map_err(|err| worker_error(err.into()))
    }
}
