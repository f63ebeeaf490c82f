//! What operators see of the projection engine and do to it: each
//! projection's owner, state and lag; rebuilds with their progress; dead
//! letters retried or skipped. Backs the operator API and `podium replay`.
//!
//! Everything lives in Postgres, so any instance answers the same:
//! - **Rebuilds** are rows of `projection_rebuilds`. A rebuild asked for
//!   through the API is started by the instance that owns the projection
//!   ([`run_requested`]); `podium replay` runs one itself. Either way the
//!   runner holds a session advisory lock per read model for as long as it
//!   rebuilds, so one runs at a time (a paused runner keeps its lock and its
//!   rebuild; a killed one loses both, and the owner starts it again), and it
//!   writes its progress to the row several times a second.
//! - **Dead letters** are rows of `dead_letters`, written by the worker before
//!   the letter goes to NATS. One stays unresolved while the projection's
//!   checkpoint is below its seq and nobody skipped it. Retry and skip are
//!   requests on the row that the projection's owner carries out: it wakes
//!   its halted worker ([`watch_requests`]), skips what was to be skipped
//!   ([`carry_out_skips`]), and the worker applies the rest again in order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use podium_nats::{DeadLetter, Projection, ProjectionError};
use sqlx::{Connection, PgPool};
use tokio_util::sync::CancellationToken;

use super::registry::ReadModel;
use super::replay::{replay, Rebuilt};
use crate::log::postgres::{LogCursor, ReadToEnd};
use crate::ops::lease::{RoleState, RoleStatus};
use crate::ops::operator::{DeadLetterView, Operator, ProjectionView, RebuildView, Refused};

/// The advisory-lock class of rebuilds (`pg_try_advisory_lock(class, key)`),
/// keyed by the read model's name.
const REBUILD_LOCK_CLASS: i32 = 0x7064_7262;

/// How often a runner writes its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// A rebuild whose runner has not written for this long may have died: its
/// projection's owner tries to take it over (the lock says if it can).
const STALE_AFTER_SECS: f64 = 5.0;

/// Connections a rebuild started by the owner opens for itself: the lock's,
/// the log reader's, one per read model applied set-wise, and progress.
const REBUILD_CONNECTIONS: u32 = 5;

/// How often the owner looks for requested rebuilds and operator requests.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// How often a projection waiting for the rebuild that catches it up looks
/// at it.
const CATCH_UP_LOOK: Duration = Duration::from_millis(250);
/// Events a far-behind projection without a read model applies at once
/// while it reads the log itself ([`CatchUp::read_the_log`]): large, since a
/// backlog's cost is mostly per batch (its transaction and lookups).
const LOG_BATCH: i64 = 5_000;

/// Events behind the head from which a running projection is said to be
/// catching up (more than one batch).
const CATCHING_UP_FROM: i64 = 1_000;

/// Every projection a deployment keeps, by name, in the order they apply.
pub fn projection_names() -> Vec<&'static str> {
    ReadModel::ALL
        .iter()
        .map(|model| model.name())
        .chain([crate::command::policy::NAME])
        .collect()
}

/// The read model named `name`, if it is one.
pub fn read_model(name: &str) -> Result<ReadModel, Refused> {
    if let Some(model) = ReadModel::ALL.into_iter().find(|m| m.name() == name) {
        return Ok(model);
    }
    if projection_names().contains(&name) {
        return Err(Refused::NotRebuildable(name.to_string()));
    }
    Err(Refused::UnknownProjection(name.to_string()))
}

/// Which lease gives an instance a projection.
#[derive(Debug, Clone)]
pub enum Owners {
    /// NATS workers: one lease per projection.
    PerProjection,
    /// The relay applies every projection in-process: the relay's lease.
    Relay(String),
}

impl Owners {
    pub fn lease(&self, projection: &str) -> String {
        match self {
            Self::PerProjection => super::lease_name(projection),
            Self::Relay(lease) => lease.clone(),
        }
    }

    /// Whether `instance` holds `projection`'s lease now.
    async fn held_by(
        &self,
        pool: &PgPool,
        projection: &str,
        instance: &str,
    ) -> Result<bool, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT EXISTS(SELECT 1 FROM leases
                            WHERE name = $1 AND owner = $2 AND expires_at > now())",
        )
        .bind(self.lease(projection))
        .bind(instance)
        .fetch_one(pool)
        .await
    }
}

/// The operator's side of a Postgres deployment.
pub struct Operations {
    pool: PgPool,
    /// The relay whose numbering says where the head of the log is.
    relay: String,
    owners: Owners,
}

impl Operations {
    pub fn new(pool: PgPool, relay: String, owners: Owners) -> Self {
        Self {
            pool,
            relay,
            owners,
        }
    }

    /// Which lease gives an instance each projection.
    pub fn owners(&self) -> &Owners {
        &self.owners
    }

    async fn ask(&self, id: i64, request: &str) -> Result<(), Refused> {
        let asked: Option<i64> = sqlx::query_scalar(&format!(
            "UPDATE dead_letters d SET state = $2
              WHERE d.id = $1 AND {UNRESOLVED} AND d.state IN ('open', 'retrying', 'skipping')
             RETURNING d.id"
        ))
        .bind(id)
        .bind(request)
        .fetch_optional(&self.pool)
        .await?;
        if asked.is_some() {
            tracing::info!(id, request, "an operator acted on a dead letter");
            return Ok(());
        }
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS(SELECT 1 FROM dead_letters WHERE id = $1)")
                .bind(id)
                .fetch_one(&self.pool)
                .await?;
        Err(if exists {
            Refused::Resolved(id)
        } else {
            Refused::UnknownLetter(id)
        })
    }
}

#[async_trait::async_trait]
impl Operator for Operations {
    async fn projections(&self) -> Result<Vec<ProjectionView>, sqlx::Error> {
        let head = crate::relay::head(&self.pool, &self.relay).await?;
        let checkpoints = super::Checkpoints::load(&self.pool).await?;
        let leases: Vec<(String, String, Option<String>)> =
            sqlx::query_as("SELECT name, owner, halted FROM leases WHERE expires_at > now()")
                .fetch_all(&self.pool)
                .await?;
        let rebuilding: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM projection_rebuilds WHERE state IN ('requested', 'rebuilding')",
        )
        .fetch_all(&self.pool)
        .await?;
        let letters: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT d.projection, count(*) FROM dead_letters d WHERE {UNRESOLVED} GROUP BY 1"
        ))
        .fetch_all(&self.pool)
        .await?;
        Ok(projection_names()
            .into_iter()
            .map(|name| {
                let (checkpoint, _) = checkpoints.of(name);
                let (lag_events, lag_seconds) = checkpoints.lag(name, head);
                let lease = self.owners.lease(name);
                let lease = leases.iter().find(|(n, _, _)| *n == lease);
                let halted = lease.and_then(|(_, _, halted)| halted.clone());
                let state = if rebuilding.iter().any(|r| r == name) {
                    "rebuilding"
                } else if lease.is_none() {
                    "standby"
                } else if halted.is_some() {
                    "halted"
                } else if lag_events >= CATCHING_UP_FROM {
                    "catching_up"
                } else {
                    "running"
                };
                ProjectionView {
                    name: name.to_string(),
                    checkpoint,
                    head,
                    lag_events,
                    lag_seconds,
                    state,
                    owner: lease.map(|(_, owner, _)| owner.clone()),
                    dead_letters: letters
                        .iter()
                        .find(|(n, _)| n == name)
                        .map_or(0, |(_, count)| *count),
                    halted,
                    rebuildable: read_model(name).is_ok(),
                }
            })
            .collect())
    }

    /// Asks for a rebuild of `name`; its owner starts it within a second.
    async fn request_rebuild(&self, name: &str) -> Result<(), Refused> {
        let model = read_model(name)?;
        let requested: Option<String> = sqlx::query_scalar(
            "INSERT INTO projection_rebuilds (name, state) VALUES ($1, 'requested')
             ON CONFLICT (name) DO UPDATE
                SET state = 'requested', requested_at = now(), runner = NULL, processed = 0,
                    total = 0, started_at = NULL, finished_at = NULL, heartbeat_at = NULL,
                    error = NULL
              WHERE projection_rebuilds.state NOT IN ('requested', 'rebuilding')
             RETURNING name",
        )
        .bind(model.name())
        .fetch_optional(&self.pool)
        .await?;
        if requested.is_none() {
            return Err(running(&self.pool, model.name()).await);
        }
        tracing::info!(projection = name, "a rebuild was requested");
        Ok(())
    }

    /// The last rebuild of `name`, or the one running.
    async fn rebuild(&self, name: &str) -> Result<RebuildView, Refused> {
        let model = read_model(name)?;
        Ok(rebuild_of(&self.pool, model.name()).await?)
    }

    /// Unresolved dead letters, oldest first, after id `after`.
    async fn dead_letters(
        &self,
        projection: Option<&str>,
        limit: i64,
        after: i64,
    ) -> Result<Vec<DeadLetterView>, Refused> {
        if let Some(name) = projection {
            if !projection_names().contains(&name) {
                return Err(Refused::UnknownProjection(name.to_string()));
            }
        }
        Ok(
            sqlx::query_as::<_, (i64, String, i64, String, String, i32, DateTime<Utc>, String)>(
                &format!(
                "SELECT d.id, d.projection, d.seq, d.event_type, d.error, d.failures, d.at, d.state
                   FROM dead_letters d
                  WHERE {UNRESOLVED} AND d.id > $1 AND ($2::text IS NULL OR d.projection = $2)
                  ORDER BY d.id LIMIT $3"
            ),
            )
            .bind(after)
            .bind(projection)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(
                |(id, projection, seq, event_type, error, failures, at, state)| DeadLetterView {
                    id,
                    projection,
                    seq,
                    event_type,
                    error,
                    failures,
                    at,
                    state,
                },
            )
            .collect(),
        )
    }

    /// Asks the projection's owner to apply dead letter `id` again (in order:
    /// the projection is stopped right before it).
    async fn retry(&self, id: i64) -> Result<(), Refused> {
        self.ask(id, "retrying").await
    }

    /// Asks the projection's owner to go on without dead letter `id`.
    async fn skip(&self, id: i64) -> Result<(), Refused> {
        self.ask(id, "skipping").await
    }
}

/// A dead letter `d` still to be dealt with: not skipped, and ahead of its
/// projection's checkpoint.
const UNRESOLVED: &str = "d.state <> 'skipped' AND d.seq > COALESCE(
    (SELECT c.seq FROM projection_checkpoints c WHERE c.name = d.projection), 0)";

async fn rebuild_of(pool: &PgPool, name: &str) -> Result<RebuildView, sqlx::Error> {
    type Row = (
        String,
        i64,
        i64,
        Option<DateTime<Utc>>,
        Option<DateTime<Utc>>,
        Option<f64>,
        Option<String>,
        Option<String>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT state, processed, total, started_at, finished_at,
                EXTRACT(EPOCH FROM COALESCE(finished_at, heartbeat_at) - started_at)::float8,
                error, runner
           FROM projection_rebuilds WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let Some((state, processed, total, started_at, finished_at, elapsed, error, runner)) = row
    else {
        return Ok(RebuildView {
            state: "none",
            processed: 0,
            total: 0,
            events_per_sec: 0.0,
            eta_secs: None,
            started_at: None,
            finished_at: None,
            error: None,
            runner: None,
        });
    };
    let state = match state.as_str() {
        "done" => "done",
        "failed" => "failed",
        _ => "rebuilding",
    };
    let rate = match elapsed {
        Some(secs) if secs > 0.0 => processed as f64 / secs,
        _ => 0.0,
    };
    let eta_secs = match state {
        "rebuilding" if rate > 0.0 => Some((total - processed).max(0) as f64 / rate),
        "rebuilding" => None,
        _ => Some(0.0),
    };
    Ok(RebuildView {
        state,
        processed,
        total,
        events_per_sec: rate,
        eta_secs,
        started_at,
        finished_at,
        error,
        runner,
    })
}

/// The refusal for a rebuild of `name` while one runs, with its progress.
async fn running(pool: &PgPool, name: &str) -> Refused {
    let progress = match rebuild_of(pool, name).await {
        Ok(view) => format!(
            "{} of {} events{}",
            view.processed,
            view.total,
            view.runner
                .map(|runner| format!(", on {runner}"))
                .unwrap_or_default()
        ),
        Err(err) => err.to_string(),
    };
    Refused::Running {
        name: name.to_string(),
        progress,
    }
}

/// Rebuilds `models` as `runner`, once: refused while
/// another rebuild of any of them runs. Progress goes to their rows (and to
/// `progress`), the outcome too.
pub async fn rebuild(
    pool: &PgPool,
    models: &[ReadModel],
    runner: &str,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Vec<Rebuilt>, RebuildError> {
    let names: Vec<&'static str> = models.iter().map(|m| m.name()).collect();
    // Its own connection, closed (never returned to the pool) when this
    // ends however it ends, so the locks go with it.
    let mut locks = pool.acquire().await?.detach();
    for name in &names {
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
            .bind(REBUILD_LOCK_CLASS)
            .bind(name)
            .fetch_one(&mut locks)
            .await?;
        if !locked {
            return Err(RebuildError::Refused(running(pool, name).await));
        }
    }
    sqlx::query(
        "INSERT INTO projection_rebuilds (name, state, runner, started_at, heartbeat_at)
         SELECT n, 'rebuilding', $2, now(), now() FROM unnest($1::text[]) AS n
         ON CONFLICT (name) DO UPDATE
            SET state = 'rebuilding', runner = $2, processed = 0, total = 0,
                started_at = now(), heartbeat_at = now(), finished_at = NULL, error = NULL",
    )
    .bind(&names)
    .bind(runner)
    .execute(pool)
    .await?;
    tracing::info!(runner, projections = ?names, "rebuilding");
    let (done, total) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = {
        let mut report = |d: u64, t: u64| {
            done.store(d, Ordering::Relaxed);
            total.store(t, Ordering::Relaxed);
            progress(d, t);
        };
        let rebuilding = replay(pool, models, &mut report);
        tokio::pin!(rebuilding);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                result = &mut rebuilding => break result,
                _ = tick.tick() => {
                    let written = write_progress(
                        pool,
                        &names,
                        done.load(Ordering::Relaxed),
                        total.load(Ordering::Relaxed),
                    )
                    .await;
                    if let Err(err) = written {
                        tracing::warn!(%err, "cannot write a rebuild's progress");
                    }
                }
            }
        }
    };
    let read = done.load(Ordering::Relaxed);
    // Done: every event up to the checkpoint swapped in, including those
    // written while the log was read (applied to the copies before the swap
    // or by it), and that is the whole of it; the live worker goes on from
    // there. Failed: as far as it read, of the total it expected.
    let (state, error, processed, total) = match &result {
        Ok(rebuilt) => {
            let reached = rebuilt.iter().map(|r| r.checkpoint).max().unwrap_or(read);
            ("done", None, reached, Some(reached))
        }
        Err(err) => ("failed", Some(format!("{err:#}")), read, None),
    };
    sqlx::query(
        "UPDATE projection_rebuilds
            SET state = $2, error = $3, finished_at = now(), heartbeat_at = now(),
                processed = $4, total = COALESCE($5, GREATEST(total, $4))
          WHERE name = ANY($1)",
    )
    .bind(&names)
    .bind(state)
    .bind(error)
    .bind(processed as i64)
    .bind(total.map(|t| t as i64))
    .execute(pool)
    .await?;
    locks.close().await?;
    tracing::info!(runner, projections = ?names, state, "rebuild finished");
    result.map_err(RebuildError::Failed)
}

async fn write_progress(
    pool: &PgPool,
    names: &[&str],
    done: u64,
    total: u64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_rebuilds SET processed = $2, total = $3, heartbeat_at = now()
          WHERE name = ANY($1)",
    )
    .bind(names)
    .bind(done as i64)
    .bind(total as i64)
    .execute(pool)
    .await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Refused(Refused),
    #[error("{0:#}")]
    Failed(anyhow::Error),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Starts the rebuilds asked for through the API of the projections this
/// instance owns (and takes over those whose runner died), one at a time,
/// until `stop` is cancelled.
pub async fn run_requested(
    pool: PgPool,
    instance: String,
    owners: Owners,
    stop: CancellationToken,
) {
    while !podium_nats::stopped_during(LOOK_EVERY, &stop).await {
        let wanted: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
            "SELECT name FROM projection_rebuilds
              WHERE state = 'requested'
                 OR (state = 'rebuilding' AND heartbeat_at < now() - make_interval(secs => $1))
              ORDER BY requested_at",
        )
        .bind(STALE_AFTER_SECS)
        .fetch_all(&pool)
        .await;
        let wanted = match wanted {
            Ok(wanted) => wanted,
            Err(err) => {
                tracing::warn!(%err, "cannot look for requested rebuilds");
                continue;
            }
        };
        for name in wanted {
            let Ok(model) = read_model(&name) else {
                continue;
            };
            match owners.held_by(&pool, &name, &instance).await {
                Ok(true) => {}
                Ok(false) => continue,
                Err(err) => {
                    tracing::warn!(%err, "cannot look at a projection's lease");
                    continue;
                }
            }
            let models = [model];
            let mut quiet = |_, _| {};
            let own = match own_pool(&pool).await {
                Ok(own) => own,
                Err(err) => {
                    tracing::warn!(%err, "cannot connect for a rebuild");
                    continue;
                }
            };
            let rebuilding = rebuild(&own, &models, &instance, &mut quiet);
            tokio::select! {
                result = rebuilding => match result {
                    Ok(_) | Err(RebuildError::Refused(_)) => {}
                    Err(err) => tracing::error!(projection = name, %err, "a rebuild failed"),
                },
                // Its row goes stale and the next owner starts it again.
                () = stop.cancelled() => return,
            }
            own.close().await;
        }
    }
}

/// Connections of a rebuild's own: it holds several for minutes, which
/// neither the requests' pool nor the workers' can spare.
async fn own_pool(pool: &PgPool) -> Result<PgPool, sqlx::Error> {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(REBUILD_CONNECTIONS)
        .connect_with((*pool.connect_options()).clone())
        .await
}

/// When a projection is so far behind that a rebuild brings it current
/// sooner than its worker would.
#[derive(Debug, Clone)]
pub struct CatchUp {
    /// The relay whose numbering says where the head of the log is.
    pub relay: String,
    /// Events behind from which a projection catches up from the log; 0
    /// never. A read model, by a rebuild, must also be behind by at least
    /// half the log, so that the rebuild reads at most twice what it has to
    /// catch up; the policy reads only what it catches up.
    pub rebuild_from: u64,
}

impl CatchUp {
    /// The read models that a rebuild would bring current sooner than their
    /// workers.
    async fn far_behind(&self, pool: &PgPool) -> Result<Vec<ReadModel>, sqlx::Error> {
        let head = crate::relay::head(pool, &self.relay).await?;
        let checkpoints = super::Checkpoints::load(pool).await?;
        Ok(ReadModel::ALL
            .into_iter()
            .filter(|model| {
                let (lag, _) = checkpoints.lag(model.name(), head);
                self.rebuild_from > 0 && lag as u64 >= self.rebuild_from && 2 * lag >= head
            })
            .collect())
    }

    /// Before the owner of `projection` starts its worker: if the read model
    /// is far behind the log (a first start on a long log, a deployment
    /// whose workers were off for long), catches it up as a rebuild does,
    /// folding the log in memory and writing the result with COPY, together
    /// with every other read model as far behind (one read of the log for
    /// all). Through NATS, a backlog goes at the pace of the relay and of
    /// one batch after another. A projection without a read model (the
    /// notification policy) far behind reads the log itself instead
    /// ([`Self::read_the_log`]).
    ///
    /// A rebuild of it that is running already, started here or on another
    /// instance, is waited for. One whose runner writes no progress (paused,
    /// or dead with its lock not yet released) is not: the worker starts,
    /// and the rebuild, if it ever finishes, swaps in as any rebuild does.
    /// Stopping (shutdown, or the lease lost) abandons the rebuild. Errors
    /// are logged: the worker takes over from wherever the checkpoint is.
    pub async fn run<P: Projection>(
        &self,
        pool: &PgPool,
        projection: &P,
        instance: &str,
        stop: &CancellationToken,
    ) {
        let name = projection.name();
        let caught_up = match read_model(name) {
            Ok(model) => self
                .catch_up(pool, model, instance, stop)
                .await
                .map_err(|e| e.to_string()),
            Err(_) => self.read_the_log(pool, projection, stop).await,
        };
        if let Err(err) = caught_up {
            tracing::warn!(projection = name, %err, "cannot catch up from the log; the worker catches up");
        }
    }

    /// Catches `projection` up by reading the log itself, from its
    /// checkpoint to the head, in batches of [`LOG_BATCH`], if it is behind
    /// by at least `rebuild_from` events. Each batch is applied as the
    /// worker applies one, in one transaction with the checkpoint check and
    /// the lease's fence, so nothing is applied twice or by an ex-owner.
    /// Through NATS the same backlog would wait for the relay, cost NATS a
    /// delivery per event, and go in the smaller batches that the stream
    /// happens to hold (on 2 cores, a backlog of 200,001 events was worked
    /// off in 19–22 s that way and 16–18 s this way: BENCHMARKS.md).
    async fn read_the_log<P: Projection>(
        &self,
        pool: &PgPool,
        projection: &P,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let checkpoint = projection.checkpoint().await.map_err(|e| e.to_string())?;
        let head = crate::relay::head(pool, &self.relay)
            .await
            .map_err(|e| e.to_string())?;
        let behind = (head.max(0) as u64).saturating_sub(checkpoint);
        if self.rebuild_from == 0 || behind < self.rebuild_from {
            return Ok(());
        }
        tracing::info!(
            projection = projection.name(),
            checkpoint,
            behind,
            "catching up from the log"
        );
        let mut reader = pool.acquire().await.map_err(|e| e.to_string())?;
        let mut cursor = LogCursor::after_first(&mut reader, checkpoint)
            .await
            .map_err(|e| e.to_string())?;
        // What the relay and a rebuild here read of the same stretch is
        // read once.
        let shared = crate::log::shared::Reader::join(&mut reader, &cursor.key)
            .await
            .map_err(|e| e.to_string())?;
        // The batch after the one being applied is read meanwhile, on the
        // reader's own connection: the backlog goes at the pace of the
        // slower of the two, not of both in turn.
        let mut batch = shared.peek(&cursor, &mut reader, LOG_BATCH).await;
        let mut read_ahead = false;
        // Everything committed when it first came to the head is read, also
        // what waits behind a transaction that holds the log back.
        let mut to_end = ReadToEnd::default();
        while !stop.is_cancelled() {
            let (events, next) = batch.map_err(|e| e.to_string())?;
            if events.len() < LOG_BATCH as usize && read_ahead {
                // Read before the batch in front of it committed what it
                // writes to the log (its notifications): read it again.
                batch = shared.peek(&cursor, &mut reader, LOG_BATCH).await;
                read_ahead = false;
                continue;
            }
            if events.len() < LOG_BATCH as usize {
                // As far as it can read: the head, unless committed events
                // wait behind a transaction that holds the log back (another
                // database's CREATE DATABASE, say), which it reads once that
                // ends. Asked before its batch writes: its own notifications
                // are the worker's. From the head, the worker goes on.
                let at_end = to_end
                    .at_end(&mut reader, &next.key)
                    .await
                    .map_err(|e| e.to_string())?;
                if !events.is_empty() {
                    projection.apply(&events).await.map_err(|e| e.to_string())?;
                    cursor = next;
                }
                if at_end {
                    break;
                }
                batch = shared.peek(&cursor, &mut reader, LOG_BATCH).await;
                continue;
            }
            let (applied, read) = tokio::join!(
                projection.apply(&events),
                shared.peek(&next, &mut reader, LOG_BATCH)
            );
            applied.map_err(|e| e.to_string())?;
            (batch, read_ahead) = (read, true);
            cursor = next;
        }
        tracing::info!(
            projection = projection.name(),
            checkpoint = cursor.seq,
            "caught up from the log"
        );
        Ok(())
    }

    async fn catch_up(
        &self,
        pool: &PgPool,
        model: ReadModel,
        instance: &str,
        stop: &CancellationToken,
    ) -> Result<(), RebuildError> {
        let mut refused = false;
        loop {
            // Whether a rebuild is running first: far_behind counts what
            // the relay has yet to reach, a scan of the backlog.
            let running: Vec<String> = sqlx::query_scalar(
                "SELECT name FROM projection_rebuilds
                  WHERE state = 'rebuilding'
                    AND heartbeat_at >= now() - make_interval(secs => $1)",
            )
            .bind(STALE_AFTER_SECS)
            .fetch_all(pool)
            .await?;
            if running.iter().any(|name| name == model.name()) {
                refused = false;
                if podium_nats::stopped_during(CATCH_UP_LOOK, stop).await {
                    return Ok(());
                }
                continue;
            }
            let behind = self.far_behind(pool).await?;
            if !behind.contains(&model) {
                return Ok(());
            }
            if refused {
                // Its lock is held by a runner that writes no progress.
                return Ok(());
            }
            let models: Vec<ReadModel> = behind
                .into_iter()
                .filter(|m| !running.iter().any(|name| name == m.name()))
                .collect();
            let names: Vec<&str> = models.iter().map(|m| m.name()).collect();
            tracing::info!(projection = model.name(), projections = ?names, "far behind the log: catching up by a rebuild");
            let own = own_pool(pool).await?;
            let mut quiet = |_, _| {};
            let outcome = tokio::select! {
                outcome = rebuild(&own, &models, instance, &mut quiet) => Some(outcome),
                () = stop.cancelled() => None,
            };
            own.close().await;
            match outcome {
                Some(Ok(_)) => return Ok(()),
                Some(Err(RebuildError::Refused(_))) => {
                    // Another runner took a lock first; it may not have
                    // written its progress yet.
                    refused = true;
                    if podium_nats::stopped_during(CATCH_UP_LOOK, stop).await {
                        return Ok(());
                    }
                }
                Some(Err(err)) => return Err(err),
                None => {
                    sqlx::query(
                        "UPDATE projection_rebuilds
                            SET state = 'failed', finished_at = now(),
                                error = 'stopped before it finished: the instance stopped or lost the projection'
                          WHERE name = ANY($1) AND runner = $2 AND state = 'rebuilding'",
                    )
                    .bind(&names)
                    .bind(instance)
                    .execute(pool)
                    .await?;
                    return Ok(());
                }
            }
        }
    }
}

/// Records `letter` of `projection` for operators. A letter recorded before
/// for the same event adds up its failures; a skip already asked for stays.
pub async fn record_dead_letter(
    pool: &PgPool,
    projection: &str,
    letter: &DeadLetter,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO dead_letters (projection, seq, event_type, error, failures, state, resolved_at)
         VALUES ($1, $2, $3, $4, $5, CASE WHEN $6 THEN 'skipped' ELSE 'open' END,
                 CASE WHEN $6 THEN now() END)
         ON CONFLICT (projection, seq) DO UPDATE
            SET error = EXCLUDED.error, failures = dead_letters.failures + EXCLUDED.failures,
                event_type = EXCLUDED.event_type, at = now(),
                state = CASE WHEN dead_letters.state = 'skipping' THEN 'skipping'
                             ELSE EXCLUDED.state END,
                resolved_at = EXCLUDED.resolved_at",
    )
    .bind(projection)
    .bind(letter.seq as i64)
    .bind(&letter.event_type)
    .bind(&letter.error)
    .bind(letter.failures as i32)
    .bind(letter.skipped)
    .execute(pool)
    .await?;
    Ok(())
}

/// While this instance's `projection` is halted, wakes it as soon as an
/// operator asks for a retry or a skip of one of its dead letters.
pub async fn watch_requests(
    pool: PgPool,
    projection: String,
    status: Arc<RoleStatus>,
    stop: CancellationToken,
) {
    while !podium_nats::stopped_during(LOOK_EVERY, &stop).await {
        if status.state() != RoleState::Halted {
            continue;
        }
        let asked: Result<bool, sqlx::Error> = sqlx::query_scalar(
            "SELECT EXISTS(SELECT 1 FROM dead_letters
                            WHERE projection = $1 AND state IN ('retrying', 'skipping'))",
        )
        .bind(&projection)
        .fetch_one(&pool)
        .await;
        match asked {
            Ok(true) => status.wake(),
            Ok(false) => {}
            Err(err) => tracing::warn!(projection, %err, "cannot look for operator requests"),
        }
    }
}

/// Before the owner's worker starts: skips the dead letters an operator
/// asked to skip that are next in line (each one a metric and a log line),
/// and marks the retries asked for as under way (the worker applies them).
pub async fn carry_out_skips<P: Projection>(
    pool: &PgPool,
    projection: &P,
    skipped: &prometheus::IntCounterVec,
) -> Result<(), ProjectionError> {
    let name = projection.name().to_string();
    let db = |err: sqlx::Error| {
        if crate::ops::db::is_unavailable(&err) {
            ProjectionError::Transient(err.to_string())
        } else {
            ProjectionError::Failed(err.to_string())
        }
    };
    sqlx::query(
        "UPDATE dead_letters SET state = 'open' WHERE projection = $1 AND state = 'retrying'",
    )
    .bind(&name)
    .execute(pool)
    .await
    .map_err(db)?;
    let asked: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM dead_letters WHERE projection = $1 AND state = 'skipping' ORDER BY seq",
    )
    .bind(&name)
    .fetch_all(pool)
    .await
    .map_err(db)?;
    for seq in asked {
        let checkpoint = projection.checkpoint().await?;
        if checkpoint + 1 < seq as u64 {
            // Not its turn yet: skipped when the worker halts on it.
            break;
        }
        if checkpoint + 1 == seq as u64 {
            projection.skip(seq as u64).await?;
            skipped.with_label_values(&[&name]).inc();
            tracing::warn!(
                projection = name,
                seq,
                "skipped a dead-lettered event, as an operator asked"
            );
        }
        // Skipped now; or applied before the skip came, and then resolved
        // already (the checkpoint passed it): the request is void.
        let state = if checkpoint + 1 == seq as u64 {
            "skipped"
        } else {
            "open"
        };
        sqlx::query(
            "UPDATE dead_letters SET state = $3, resolved_at = now()
              WHERE projection = $1 AND seq = $2",
        )
        .bind(&name)
        .bind(seq)
        .bind(state)
        .execute(pool)
        .await
        .map_err(db)?;
    }
    Ok(())
}
