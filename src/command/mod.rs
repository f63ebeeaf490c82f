//! The event store: one cqrs-es framework per aggregate over postgres-es, all
//! on one sqlx pool (or over the embedded in-memory log), with upcasters
//! applied to every event read.

pub mod idempotency;
pub mod policy;

use std::sync::Arc;

use cqrs_es::persist::{
    PersistedEventRepository, PersistedEventStore, PersistenceError, ReplayStream, SerializedEvent,
    SerializedSnapshot,
};
use cqrs_es::{Aggregate, AggregateContext, AggregateError, CqrsFramework, EventStore};
use podium_domain::attempt::Attempt;
use podium_domain::notification::{Inbox, Notification};
use podium_domain::test::Test;
use podium_domain::EventMetadata;
use postgres_es::PostgresEventRepository;
use prometheus::Histogram;
use sqlx::PgPool;

use crate::log::memory::MemLog;
use crate::ops::metrics::Metrics;

type Persisted<A> = PersistedEventStore<Repository, A>;

/// Where events are kept: the port both event stores sit behind.
#[derive(Clone)]
pub enum Repository {
    Postgres(PgPool),
    Embedded(Arc<MemLog>),
}

/// Runs `$call` on whichever store `$repo` is.
macro_rules! delegate {
    ($repo:expr, $store:ident => $call:expr) => {
        match $repo {
            Repository::Postgres(pool) => {
                let $store = PostgresEventRepository::new(pool.clone());
                $call.await
            }
            Repository::Embedded(log) => {
                let $store = &**log;
                $call.await
            }
        }
    };
}

impl PersistedEventRepository for Repository {
    async fn get_events<A: Aggregate>(
        &self,
        id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, store => store.get_events::<A>(id))
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        delegate!(self, store => store.get_last_events::<A>(id, last_sequence))
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        delegate!(self, store => store.get_snapshot::<A>(id))
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, serde_json::Value, usize)>,
    ) -> Result<(), PersistenceError> {
        delegate!(self, store => store.persist::<A>(events, snapshot_update.clone()))
    }

    async fn stream_events<A: Aggregate>(
        &self,
        id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, store => store.stream_events::<A>(id))
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        delegate!(self, store => store.stream_all_events::<A>())
    }
}

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
    fn new(repository: &Repository, metrics: Option<&Metrics>) -> Self {
        let persisted = || {
            PersistedEventStore::new_event_store(repository.clone())
                .with_upcasters(podium_domain::upcasting::upcasters())
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
            tests: Store::new(repository, metrics),
            attempts: Store::new(repository, metrics),
            notifications: Store::new(repository, metrics),
            inboxes: Store::new(repository, metrics),
        }
    }
}

/// Runs each command against a fresh aggregate (the domain decides, as in
/// [`Store::execute`]) and inserts the events of all of them with one
/// statement, in the caller's transaction on `conn`. An aggregate that exists
/// already is left as it is: this is for commands whose ids derive from what
/// caused them (the notification policy's), where an existing one is the same.
pub async fn create_all<A>(
    conn: &mut sqlx::PgConnection,
    commands: Vec<(String, A::Command, EventMetadata)>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    A: Aggregate<Services = ()>,
    A::Error: Send + Sync + 'static,
{
    let mut rows: Vec<SerializedEvent> = Vec::with_capacity(commands.len());
    for (id, command, metadata) in commands {
        let mut aggregate = A::default();
        let sink = cqrs_es::event_sink::EventSink::default();
        aggregate.handle(command, &(), &sink).await?;
        let metadata = metadata.into_map();
        for (index, payload) in sink.collect().await.into_iter().enumerate() {
            let envelope = cqrs_es::EventEnvelope::<A> {
                aggregate_id: id.clone(),
                sequence: index + 1,
                payload,
                metadata: metadata.clone(),
            };
            rows.push(SerializedEvent::try_from(&envelope)?);
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         SELECT $1, * FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[],
                                  $6::jsonb[], $7::jsonb[])
         ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING",
    )
    .bind(A::TYPE)
    .bind(
        rows.iter()
            .map(|r| r.aggregate_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.sequence as i64).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.event_type.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.event_version.clone())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.payload.clone()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.metadata.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}
