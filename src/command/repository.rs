//! The event repository: the port the command side keeps events through.
//! The port is cqrs-es's own [`PersistedEventRepository`]; its adapters are
//! postgres-es's [`PostgresEventRepository`] (production) and the embedded
//! mode's [`MemLog`]. That trait has generic methods, so it cannot be a trait
//! object: [`Repository`] is the closed set of its two adapters, and
//! delegates every call. Also here: [`created`] and [`insert_events_sql`],
//! the bulk insert the notification policy issues its commands with.

use std::sync::Arc;

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use podium_domain::EventMetadata;
use postgres_es::PostgresEventRepository;
use sqlx::PgPool;

use crate::log::memory::MemLog;

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

/// Runs each command against a fresh aggregate (the domain decides, as in
/// [`Store::execute`](super::Store::execute)) and returns the events of all
/// of them, to be inserted with one statement ([`insert_events_sql`]). For
/// commands whose ids derive from what caused them (the notification
/// policy's): an aggregate that exists already is the same, and its events
/// are passed over by the insert.
pub async fn created<A>(
    commands: Vec<(String, A::Command, EventMetadata)>,
) -> Result<Vec<SerializedEvent>, Box<dyn std::error::Error + Send + Sync>>
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
    Ok(rows)
}

/// The statement that inserts events of one aggregate type, `$1`, with
/// their columns in `$2`–`$7` ([`bind_events`]), those that exist already
/// passed over; after `with`, a caller's data-modifying `WITH …` clause
/// whose parameters start at `$8` (or nothing), so that its writes and the
/// events go in one round trip.
pub fn insert_events_sql(with: &str) -> String {
    // The epoch read once for the statement: the column's default reads it
    // once a row (a third of the insert's time).
    format!(
        "{with}
         INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata, epoch)
         SELECT $1, *, (SELECT epoch FROM log_epoch)
           FROM UNNEST($2::text[], $3::bigint[], $4::text[], $5::text[], $6::jsonb[], $7::jsonb[])
         ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING"
    )
}

/// Binds `$1`–`$7` of [`insert_events_sql`]: events `rows` of
/// `aggregate_type`.
pub fn bind_events<'q>(
    query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    aggregate_type: &'q str,
    rows: &[SerializedEvent],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let column = |f: fn(&SerializedEvent) -> String| rows.iter().map(f).collect::<Vec<_>>();
    query
        .bind(aggregate_type)
        .bind(column(|r| r.aggregate_id.clone()))
        .bind(rows.iter().map(|r| r.sequence as i64).collect::<Vec<_>>())
        .bind(column(|r| r.event_type.clone()))
        .bind(column(|r| r.event_version.clone()))
        .bind(rows.iter().map(|r| r.payload.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.metadata.clone()).collect::<Vec<_>>())
}
