//! The command side: one cqrs-es framework per aggregate over the event
//! repository ([`repository`]: postgres-es on one sqlx pool, or the embedded
//! in-memory log), with upcasters applied to every event read; the
//! notification policy ([`policy`]); idempotency keys ([`idempotency`]).
//! May use `log`, `ops` and `clock`.

pub mod idempotency;
pub mod policy;
pub mod repository;

pub use repository::{bind_events, created, insert_events_sql, Repository};

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateContext, AggregateError, CqrsFramework, EventStore};
use podium_domain::attempt::Attempt;
use podium_domain::collection::Collection;
use podium_domain::notification::{Inbox, Notification};
use podium_domain::test::Test;
use podium_domain::EventMetadata;
use prometheus::Histogram;
use sqlx::PgPool;

use crate::ops::metrics::Metrics;

type Persisted<A> = PersistedEventStore<Repository, A>;

/// Events between two snapshots of an inbox.
pub const INBOX_SNAPSHOT_EVERY: usize = 50;

/// One aggregate type's command side: execute commands, load current state.
pub struct Store<A: Aggregate> {
    cqrs: CqrsFramework<A, Persisted<A>>,
    events: Persisted<A>,
    /// Where the time of commands and loads goes, if anywhere.
    timers: Option<(Histogram, Histogram)>,
}

impl<A> Store<A>
where
    A: Aggregate<Services = ()>,
{
    /// `snapshot_every`: for aggregates whose streams grow without end, a
    /// snapshot every that many events, so a load reads the snapshot and
    /// what followed rather than the whole stream.
    fn new(
        repository: &Repository,
        metrics: Option<&Metrics>,
        snapshot_every: Option<usize>,
    ) -> Self {
        let persisted = || {
            let store = match snapshot_every {
                Some(size) => PersistedEventStore::new_snapshot_store(repository.clone(), size),
                None => PersistedEventStore::new_event_store(repository.clone()),
            };
            store.with_upcasters(podium_domain::upcasting::upcasters())
        };
        Self {
            cqrs: CqrsFramework::new(persisted(), Vec::new(), ()),
            events: persisted(),
            timers: metrics.map(|m| (m.db_timer("command"), m.db_timer("load"))),
        }
    }

    /// Runs `command` against aggregate `id` and stores its events with
    /// `metadata`, or fails with the aggregate's rejection or a conflict.
    pub async fn execute(
        &self,
        id: &str,
        command: A::Command,
        metadata: EventMetadata,
    ) -> Result<(), AggregateError<A::Error>> {
        let _timer = self
            .timers
            .as_ref()
            .map(|(command, _)| command.start_timer());
        self.cqrs
            .execute_with_metadata(id, command, metadata.into_map())
            .await
    }

    /// The aggregate's current state (its default when it has no events).
    pub async fn load(&self, id: &str) -> Result<A, AggregateError<A::Error>> {
        let _timer = self.timers.as_ref().map(|(_, load)| load.start_timer());
        let mut context = self.events.load_aggregate(id).await?;
        Ok(std::mem::take(context.aggregate()))
    }
}

/// Every aggregate's store.
pub struct Aggregates {
    pub tests: Store<Test>,
    pub attempts: Store<Attempt>,
    pub notifications: Store<Notification>,
    pub inboxes: Store<Inbox>,
    pub collections: Store<Collection>,
}

impl Aggregates {
    pub fn new(pool: &PgPool) -> Self {
        Self::build(&Repository::Postgres(pool.clone()), None)
    }

    /// Stores that time their work in `metrics`.
    pub fn with_metrics(repository: &Repository, metrics: &Metrics) -> Self {
        Self::build(repository, Some(metrics))
    }

    fn build(repository: &Repository, metrics: Option<&Metrics>) -> Self {
        Self {
            tests: Store::new(repository, metrics, None),
            attempts: Store::new(repository, metrics, None),
            notifications: Store::new(repository, metrics, None),
            // One "read all" after another, for as long as the user stays.
            inboxes: Store::new(repository, metrics, Some(INBOX_SNAPSHOT_EVERY)),
            collections: Store::new(repository, metrics, None),
        }
    }
}
