//! Rebuilding read models from the event log in Postgres.
//!
//! A replay fills fresh copies of a projection's tables (`<table>__next`)
//! from the whole log while the live tables keep answering queries. Then, in
//! one transaction that locks the live tables, it applies the events written
//! meanwhile, swaps the copies in by renaming, and hands its checkpoint to the
//! live projection, whose worker carries on from there: nothing written during
//! the rebuild is lost, nothing is applied twice.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use podium_domain::log::RecordedEvent;
use podium_projections::leaderboard::LeaderboardQueries;
use podium_projections::{
    begin_writing_no_events, ApplyError, Checkpointed, Generation, ProjectionLogic,
};
use sqlx::{PgConnection, PgPool};

use podium_projections::fold::Fold;

use super::registry::{ReadModel, Register};
use crate::log::postgres::{LogCursor, ReadToEnd};

/// Events per transaction while rebuilding.
const BATCH: i64 = 1_000;
/// Events between refreshes of the copies' planner statistics.
const ANALYZE_EVERY: u64 = 100_000;
/// What each index build of a replay may sort in memory (Postgres' default,
/// 64 MB, spills a leaderboard of millions of entries to disk).
const INDEX_SORT_MEMORY: &str = "256MB";
/// Most writes, index builds or vacuums of a replay at once.
const MAX_SIDE_BY_SIDE: usize = 3;
/// How long one try of the swap waits for its lock on the live tables.
const SWAP_LOCK_WAIT: Duration = Duration::from_secs(2);
/// How long the swap keeps trying before the replay fails.
const SWAP_PATIENCE: Duration = Duration::from_secs(300);
/// Most batches the swap applies under its lock on the live tables of what
/// came since the copies caught up, once they are as far as the live read
/// models (never behind them); the live worker goes on from the checkpoint
/// swapped in.
const SWAP_BATCHES: usize = 4;
/// How long Postgres lets the swap's transaction sit idle before it ends the
/// session: a runner paused (or cut off) while it holds the live tables
/// stalls every instance's queries of them only this long; awake again, it
/// finds its session gone and swaps once more.
const SWAP_IDLE_LIMIT: Duration = Duration::from_secs(5);

/// What a replay rebuilds: one read model, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scope {
    Leaderboard,
    Feed,
    Attempts,
    Catalog,
    All,
}

impl Scope {
    pub fn read_models(self) -> Vec<ReadModel> {
        match self {
            Self::Leaderboard => vec![ReadModel::Leaderboard],
            Self::Feed => vec![ReadModel::Feed],
            Self::Attempts => vec![ReadModel::Attempts],
            Self::Catalog => vec![ReadModel::Catalog],
            Self::All => ReadModel::ALL.to_vec(),
        }
    }
}

/// What a replay did, per projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub projection: &'static str,
    /// The log seq the rebuilt read model is at.
    pub checkpoint: u64,
}

/// A projection writing into `__next` copies, whatever its logic.
#[async_trait::async_trait]
trait NextGeneration: Send + Sync {
    /// Its checkpoint's name.
    fn next_name(&self) -> &str;
    /// Applies `events` in the caller's transaction; returns the checkpoint.
    async fn apply_in(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<u64, ApplyError>;
}

#[async_trait::async_trait]
impl<L: ProjectionLogic> NextGeneration for Checkpointed<L> {
    fn next_name(&self) -> &str {
        self.name()
    }

    async fn apply_in(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<u64, ApplyError> {
        Ok(Checkpointed::apply_in(self, conn, events).await?.0)
    }
}

/// One read model being rebuilt into its `__next` tables.
struct Rebuilding {
    model: ReadModel,
    next: Box<dyn NextGeneration>,
    /// Where the log is folded while it is read, if the read model folds;
    /// written into the copies at the end.
    fold: Option<Box<dyn Fold>>,
}

impl Rebuilding {
    fn new(pool: &PgPool, model: ReadModel) -> Self {
        struct Next<'a>(&'a PgPool, Option<Box<dyn NextGeneration>>);
        impl Register for Next<'_> {
            fn register<L: ProjectionLogic>(&mut self, logic: L) {
                self.1 = Some(Box::new(Checkpointed::new(self.0.clone(), logic)));
            }
        }
        let mut next = Next(pool, None);
        model.register_into(Generation::Next, &mut next);
        Self {
            model,
            next: next.1.expect("every read model registers its projection"),
            fold: model.fold(),
        }
    }

    /// The live projection's name (its checkpoint).
    fn name(&self) -> &'static str {
        self.model.name()
    }

    fn next_name(&self) -> &str {
        self.next.next_name()
    }

    fn tables(&self) -> &'static [&'static str] {
        self.model.tables()
    }

    async fn apply_in(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<u64, ApplyError> {
        self.next.apply_in(conn, events).await
    }
}

/// Rebuilds `models` from the log in one pass and swaps them in; reports
/// progress through `progress` (events done, events in all). Callers make
/// sure that no other rebuild of them runs meanwhile
/// ([`super::operations::rebuild`]).
pub async fn replay(
    pool: &PgPool,
    models: &[ReadModel],
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> anyhow::Result<Vec<Rebuilt>> {
    let mut projections: Vec<Rebuilding> = models
        .iter()
        .map(|&model| Rebuilding::new(pool, model))
        .collect();
    // How long each phase took, logged at the end.
    let mut phases: Vec<(&str, Duration)> = Vec::new();
    let mut phase_started = Instant::now();
    let mut lap = |phase: &'static str, phases: &mut Vec<(&str, Duration)>| {
        phases.push((phase, phase_started.elapsed()));
        phase_started = Instant::now();
    };
    let mut deferred = Deferred::default();
    for projection in &projections {
        prepare_next(pool, projection, &mut deferred).await?;
    }
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?;
    // The folds sized for the read models as they stand (Postgres'
    // estimate of their rows; none for tables never analyzed).
    let tables: Vec<&str> = projections
        .iter()
        .flat_map(|p| p.tables())
        .copied()
        .collect();
    let live_rows: HashMap<String, i64> = sqlx::query_as(
        "SELECT t, GREATEST((SELECT reltuples FROM pg_class WHERE oid = to_regclass(t)), 0)::int8
           FROM unnest($1::text[]) AS t",
    )
    .bind(&tables)
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    let rows = |table: &str| live_rows.get(table).map_or(0, |&n| n as usize);
    for fold in projections.iter_mut().filter_map(|p| p.fold.as_mut()) {
        fold.expect(&rows);
    }
    let mut reader = pool.acquire().await?;
    // What the relay and the policy's catch-up here read of the same
    // stretch is read once.
    let mut cursor = LogCursor::start();
    let shared = crate::log::shared::Reader::join(&mut reader, &cursor.key).await?;
    // The last event read that can move leaderboard entries: the rebuilt
    // leaderboard records no moves ([`swap_once`]).
    let mut last_move = None;
    // Everything committed when it first came to the end is read, also
    // what waits behind a transaction that holds the log back.
    let mut to_end = ReadToEnd::default();
    let mut next = shared.peek(&cursor, &mut reader, BATCH).await?;
    loop {
        let (events, after) = next;
        if events.is_empty() {
            if !to_end.at_end(&mut reader, &cursor.key).await? {
                next = shared.peek(&cursor, &mut reader, BATCH).await?;
                continue;
            }
            break;
        }
        // Read the next batch while this one is applied: the replay then
        // runs at the pace of the slower of the two, not of both in turn.
        // Each projection in a transaction of its own (their copies and
        // checkpoints are apart), side by side.
        let (folding, applying): (Vec<_>, Vec<_>) =
            projections.iter_mut().partition(|p| p.fold.is_some());
        let apply = futures::future::try_join_all(applying.into_iter().map(|projection| {
            let events = &events;
            async move {
                let mut tx = begin_writing_copies(pool).await?;
                projection
                    .apply_in(&mut tx, events)
                    .await
                    .with_context(|| format!("rebuilding {}", projection.name()))?;
                tx.commit().await?;
                anyhow::Ok(())
            }
        }));
        // Folds work while the next batch is on its way (the read is polled
        // first, so its query is sent before they start).
        let fold = async {
            for projection in folding {
                let fold = projection.fold.as_mut().expect("partitioned by fold");
                fold.add(&events)
                    .map_err(|err| anyhow::anyhow!("folding {}: {err}", projection.name()))?;
            }
            anyhow::Ok(())
        };
        let (read, applied, folded) =
            tokio::join!(shared.peek(&after, &mut reader, BATCH), apply, fold);
        applied?;
        folded?;
        next = read?;
        last_move = last_move_in(&events).or(last_move);
        cursor = after;
        progress(cursor.seq, total.max(cursor.seq as i64) as u64);
        // The copies start empty; without fresh statistics the planner keeps
        // treating them as tiny and scans them whole on every batch.
        let batches = cursor.seq / BATCH as u64;
        if batches.is_power_of_two() || cursor.seq % ANALYZE_EVERY < BATCH as u64 {
            for projection in projections.iter().filter(|p| p.fold.is_none()) {
                for table in projection.tables() {
                    let next = Generation::Next.table(table);
                    sqlx::query(&format!("ANALYZE {next}"))
                        .execute(pool)
                        .await?;
                }
            }
        }
    }
    drop(reader);
    lap("read and apply or fold the log", &mut phases);
    // The folds written out, each with the checkpoint of the last event it
    // folded, from which what was written meanwhile is applied: a few
    // at once on connections of their own, so that formatting rows here and
    // storing them in Postgres overlap.
    let folds: Vec<_> = projections
        .iter_mut()
        .filter_map(|projection| {
            let fold = projection.fold.take()?;
            Some((fold, projection.name(), projection.next_name().to_string()))
        })
        .collect();
    let seq = cursor.seq;
    let mut writes: Vec<Step<'_>> = Vec::new();
    for (fold, name, next_name) in folds {
        writes.push(Box::pin(async move {
            let mut tx = begin_writing_no_events(pool).await?;
            fold.write(&mut tx)
                .await
                .with_context(|| format!("writing {name}"))?;
            set_checkpoint(&mut tx, &next_name, seq).await?;
            tx.commit().await?;
            anyhow::Ok(())
        }));
    }
    side_by_side(pool, writes).await?;
    lap("write the folds", &mut phases);
    // The deferred indexes, built once over the whole result rather than
    // kept up row by row, side by side (building indexes only share-locks
    // a table), each with room to sort in memory.
    let mut builds: Vec<Step<'_>> = Vec::new();
    for definition in &deferred.indexes {
        builds.push(Box::pin(async move {
            let mut tx = begin_writing_no_events(pool).await?;
            sqlx::query(&format!(
                "SET LOCAL maintenance_work_mem = '{INDEX_SORT_MEMORY}'"
            ))
            .execute(&mut *tx)
            .await?;
            sqlx::query(definition).execute(&mut *tx).await?;
            tx.commit().await?;
            anyhow::Ok(())
        }));
    }
    side_by_side(pool, builds).await?;
    // The folds' keys and unique constraints back on their indexes, built
    // above with the others: a change of the catalog alone.
    if !deferred.constraints.is_empty() {
        let mut tx = begin_writing_no_events(pool).await?;
        for constraint in &deferred.constraints {
            sqlx::query(constraint).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    lap("build the indexes", &mut phases);
    // What the log took in while the folds were written and the indexes
    // built (on a live log: new submissions, a backlog's notifications),
    // applied to the copies now, a batch to a transaction, up to the head
    // as it is now, and on while the live read models are further. The
    // swap then applies at most a few batches of what came since, under
    // its lock on the live tables, which every query of them waits behind
    // (a 2,000,001-event backlog's tail held it 16.5 s before this).
    let mut head = log_head(pool).await?;
    let mut reader = pool.acquire().await?;
    loop {
        let (events, after) = shared.peek(&cursor, &mut reader, BATCH).await?;
        if events.is_empty() {
            break;
        }
        let mut tx = begin_writing_copies(pool).await?;
        for projection in &projections {
            projection
                .apply_in(&mut tx, &events)
                .await
                .with_context(|| format!("rebuilding {}", projection.name()))?;
        }
        tx.commit().await?;
        last_move = last_move_in(&events).or(last_move);
        cursor = after;
        progress(cursor.seq, total.max(cursor.seq as i64) as u64);
        let past_head = events.last().map(|e| e.position) >= head;
        if events.len() < BATCH as usize || past_head {
            // The live read models may have gone further meanwhile (this
            // runner paused here, or slower than their workers): the swap
            // applies as far as they got under its lock, so the copies go
            // on while that is more than its few batches.
            let live: i64 = sqlx::query_scalar(
                "SELECT COALESCE(max(seq), 0) FROM projection_checkpoints WHERE name = ANY($1)",
            )
            .bind(projections.iter().map(|p| p.name()).collect::<Vec<_>>())
            .fetch_one(pool)
            .await?;
            if live as u64 <= cursor.seq + SWAP_BATCHES as u64 * BATCH as u64 {
                break;
            }
            head = log_head(pool).await?;
        }
    }
    drop(reader);
    lap("catch up the copies", &mut phases);
    let checkpoint = swap(pool, &projections, cursor, last_move).await?;
    lap("swap", &mut phases);
    // Fresh statistics and visibility map for the swapped-in tables, so that
    // rank counts are index-only scans from the start; side by side too.
    let mut vacuums: Vec<Step<'_>> = Vec::new();
    for table in projections
        .iter()
        .flat_map(|projection| projection.tables())
    {
        vacuums.push(Box::pin(async move {
            sqlx::query(&format!("VACUUM ANALYZE {table}"))
                .execute(pool)
                .await?;
            anyhow::Ok(())
        }));
    }
    side_by_side(pool, vacuums).await?;
    lap("vacuum", &mut phases);
    let phases: Vec<String> = phases
        .iter()
        .map(|(phase, took)| format!("{phase} {:.1} s", took.as_secs_f64()))
        .collect();
    tracing::info!(events = checkpoint, phases = %phases.join(", "), "replayed");
    Ok(projections
        .iter()
        .map(|p| Rebuilt {
            projection: p.name(),
            checkpoint,
        })
        .collect())
}

/// What a replay builds once the copies are full.
#[derive(Default)]
struct Deferred {
    /// Index definitions (`CREATE [UNIQUE] INDEX …`).
    indexes: Vec<String>,
    /// Primary keys and unique constraints to attach to their indexes once
    /// built (`ALTER TABLE … ADD CONSTRAINT … USING INDEX …`).
    constraints: Vec<String>,
}

/// Fresh, empty `__next` copies of `projection`'s live tables, and no
/// checkpoint. Their secondary indexes are dropped, and their definitions
/// kept in `deferred` to be built once the copies are full. Copies applied
/// batch by batch keep their primary keys and unique indexes (what a batch
/// looks rows up by); those written at the end (by a fold, with COPY) lose
/// them too: an index built once over sorted rows costs less than
/// one kept up row by row (4,000,000 leaderboard entries in key order: 3.4
/// s copied without their key, and 2.2 s to build it, against 6.6 s with it).
async fn prepare_next(
    pool: &PgPool,
    projection: &Rebuilding,
    deferred: &mut Deferred,
) -> Result<(), sqlx::Error> {
    let written_at_the_end = projection.fold.is_some();
    let mut tx = begin_writing_no_events(pool).await?;
    for table in projection.tables() {
        let next = Generation::Next.table(table);
        sqlx::query(&format!("DROP TABLE IF EXISTS {next}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("CREATE TABLE {next} (LIKE {table} INCLUDING ALL)"))
            .execute(&mut *tx)
            .await?;
        if written_at_the_end {
            let constraints: Vec<(String, String, String, String)> = sqlx::query_as(
                "SELECT c.conname::text,
                        CASE c.contype WHEN 'p' THEN 'PRIMARY KEY' ELSE 'UNIQUE' END,
                        i.relname::text, pg_get_indexdef(c.conindid)
                   FROM pg_constraint c JOIN pg_class i ON i.oid = c.conindid
                  WHERE c.conrelid = $1::regclass AND c.contype IN ('p', 'u')",
            )
            .bind(&next)
            .fetch_all(&mut *tx)
            .await?;
            for (constraint, kind, index, definition) in constraints {
                sqlx::query(&format!("ALTER TABLE {next} DROP CONSTRAINT {constraint}"))
                    .execute(&mut *tx)
                    .await?;
                deferred.indexes.push(definition);
                deferred.constraints.push(format!(
                    "ALTER TABLE {next} ADD CONSTRAINT {constraint} {kind} USING INDEX {index}"
                ));
            }
        }
        let dropped: Vec<(String, String)> = sqlx::query_as(
            "SELECT c.relname::text, pg_get_indexdef(x.indexrelid)
               FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid
              WHERE x.indrelid = $1::regclass AND (NOT x.indisunique OR $2)",
        )
        .bind(&next)
        .bind(written_at_the_end)
        .fetch_all(&mut *tx)
        .await?;
        for (index, definition) in dropped {
            sqlx::query(&format!("DROP INDEX {index}"))
                .execute(&mut *tx)
                .await?;
            deferred.indexes.push(definition);
        }
    }
    sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1")
        .bind(projection.next_name())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// One write, index build or vacuum of a replay.
type Step<'a> = futures::future::BoxFuture<'a, anyhow::Result<()>>;

/// Runs `steps` a few at a time (each index build may sort in
/// [`INDEX_SORT_MEMORY`]), never more than `pool` can serve with one
/// connection to spare, so that none waits past its acquire timeout.
async fn side_by_side(pool: &PgPool, steps: Vec<Step<'_>>) -> anyhow::Result<()> {
    let spare = (pool.options().get_max_connections() as usize).saturating_sub(1);
    futures::stream::iter(steps)
        .buffer_unordered(spare.clamp(1, MAX_SIDE_BY_SIDE))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Sets projection `name`'s checkpoint to `seq`.
async fn set_checkpoint(conn: &mut PgConnection, name: &str, seq: u64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_checkpoints (name, seq) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET seq = EXCLUDED.seq, updated_at = now()",
    )
    .bind(name)
    .bind(seq as i64)
    .execute(conn)
    .await?;
    Ok(())
}

/// Under a lock on the live tables: applies what was written since the
/// copies caught up (as far as the live read models got, and at most
/// [`SWAP_BATCHES`] batches beyond), then renames the copies in and moves
/// the checkpoints over.
///
/// The lock is waited for [`SWAP_LOCK_WAIT`] at a time: every query of the
/// live tables queues behind a waiting exclusive lock, so a long reader
/// must not stall them all. Between tries the readers go on; after
/// [`SWAP_PATIENCE`] the replay fails, naming what held the tables.
async fn swap(
    pool: &PgPool,
    projections: &[Rebuilding],
    cursor: LogCursor,
    last_move: Option<u64>,
) -> anyhow::Result<u64> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match swap_once(pool, projections, cursor.clone(), last_move).await {
            Err(err)
                if (lock_not_available(&err) || session_lost(&err))
                    && started.elapsed() < SWAP_PATIENCE =>
            {
                if lock_not_available(&err) {
                    let holders = lock_holders(pool, projections).await;
                    tracing::info!(
                        waited_ms = started.elapsed().as_millis() as u64,
                        holders,
                        "a replay waits for its lock on the live tables"
                    );
                } else {
                    tracing::warn!(%err, "a replay lost its session while swapping; swapping again");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(err) if lock_not_available(&err) => {
                let holders = lock_holders(pool, projections).await;
                return Err(err).with_context(|| {
                    format!(
                        "the live tables stayed locked for {} s, by: {holders}",
                        SWAP_PATIENCE.as_secs()
                    )
                });
            }
            done => return done,
        }
    }
}

/// Whether `err` is a lock wait that ran out (`lock_timeout`).
fn lock_not_available(err: &anyhow::Error) -> bool {
    has_code(err, "55P03")
}

/// Whether `err` is the swap's session ended under it (by
/// [`SWAP_IDLE_LIMIT`]: `idle_in_transaction_session_timeout`, or a
/// connection lost), its transaction rolled back.
fn session_lost(err: &anyhow::Error) -> bool {
    has_code(err, "25P03") || err.chain().any(crate::ops::db::is_unavailable)
}

/// Whether Postgres answered `err` (or what caused it) with SQLSTATE `code`.
fn has_code(err: &anyhow::Error, code: &str) -> bool {
    err.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some(code)
        )
    })
}

/// The sessions holding locks on `projections`' live tables, for the log.
async fn lock_holders(pool: &PgPool, projections: &[Rebuilding]) -> String {
    let tables: Vec<&str> = projections
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    let holders: Result<Vec<String>, sqlx::Error> = sqlx::query_scalar(
        "SELECT DISTINCT format('pid %s (%s, %s): %s', a.pid, a.application_name, a.state,
                               left(a.query, 120))
           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
          WHERE l.granted AND l.relation = ANY(SELECT t::regclass::oid FROM unnest($1::text[]) t)
            AND a.pid <> pg_backend_pid()",
    )
    .bind(&tables)
    .fetch_all(pool)
    .await;
    match holders {
        Ok(holders) if holders.is_empty() => "nobody now".to_string(),
        Ok(holders) => holders.join("; "),
        Err(err) => format!("(cannot tell: {err})"),
    }
}

/// The position of the newest event written (committed or not): where a
/// catch-up of the copies stops.
async fn log_head(pool: &PgPool) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await
}

/// A transaction that writes the copies (and no events). Rebuilt tables
/// are thrown away if the replay fails, so its commit need not wait for the
/// disk; the swap's commit, which does, comes after it.
async fn begin_writing_copies(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let mut tx = begin_writing_no_events(pool).await?;
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The last of `events` that can move leaderboard entries (a submission;
/// a collection's test, which moves many on the collection's boards).
fn last_move_in(events: &[RecordedEvent]) -> Option<u64> {
    events
        .iter()
        .filter(|e| {
            matches!(
                e.event_type.as_str(),
                "AttemptSubmitted" | "CollectionCreated" | "CollectionTestAdded"
            )
        })
        .map(|e| e.seq)
        .next_back()
}

/// One try of [`swap`]; `last_move` is the last event read before it that
/// can move leaderboard entries ([`last_move_in`]).
async fn swap_once(
    pool: &PgPool,
    projections: &[Rebuilding],
    mut cursor: LogCursor,
    mut last_move: Option<u64>,
) -> anyhow::Result<u64> {
    let mut tx = begin_writing_no_events(pool).await?;
    sqlx::query(&format!(
        "SELECT set_config('lock_timeout', '{}', true),
                set_config('idle_in_transaction_session_timeout', '{}', true)",
        SWAP_LOCK_WAIT.as_millis(),
        SWAP_IDLE_LIMIT.as_millis()
    ))
    .execute(&mut *tx)
    .await?;
    // The live workers' checkpoint rows first, then their tables: a worker
    // locks its checkpoint before it writes its tables, so taking them in
    // the same order cannot deadlock with one, and none commits in between.
    let mut live_leaderboard = 0;
    // The furthest of the live read models: the copies are not swapped in
    // behind it, so no read model goes back in time.
    let mut live_ahead = 0;
    for projection in projections {
        let live: Option<i64> =
            sqlx::query_scalar("SELECT seq FROM projection_checkpoints WHERE name = $1 FOR UPDATE")
                .bind(projection.name())
                .fetch_optional(&mut *tx)
                .await?;
        let live = live.unwrap_or(0) as u64;
        if projection.model == ReadModel::Leaderboard {
            live_leaderboard = live;
        }
        live_ahead = live_ahead.max(live);
    }
    let live: Vec<&str> = projections
        .iter()
        .flat_map(|p| p.tables().iter().copied())
        .collect();
    sqlx::query(&format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        live.join(", ")
    ))
    .execute(&mut *tx)
    .await?;
    for batch in 0.. {
        if batch >= SWAP_BATCHES && cursor.seq >= live_ahead {
            break;
        }
        let (events, after) = cursor.peek(&mut tx, BATCH).await?;
        if events.is_empty() {
            break;
        }
        for projection in projections {
            projection.apply_in(&mut tx, &events).await?;
        }
        last_move = last_move_in(&events).or(last_move);
        cursor = after;
    }
    // The moves of events the rebuilt leaderboard holds and the live one
    // had not applied (folded, or applied to the copies since) are not
    // recorded: rebuilds record none.
    let unrecorded_move = last_move.filter(|&seq| seq > live_leaderboard);
    for projection in projections {
        for table in projection.tables() {
            let next_table = Generation::Next.table(table);
            rename(&mut tx, table, &format!("{table}__old")).await?;
            rename(&mut tx, &next_table, table).await?;
            sqlx::query(&format!("DROP TABLE {table}__old"))
                .execute(&mut *tx)
                .await?;
        }
        set_checkpoint(&mut tx, projection.name(), cursor.seq).await?;
        sqlx::query("DELETE FROM projection_checkpoints WHERE name = $1")
            .bind(projection.next_name())
            .execute(&mut *tx)
            .await?;
        if let (ReadModel::Leaderboard, Some(seq)) = (projection.model, unrecorded_move) {
            // Cursors from before that submission cannot be continued exactly.
            LeaderboardQueries::raise_moves_horizon(&mut tx, seq).await?;
        }
    }
    tx.commit().await?;
    Ok(cursor.seq)
}

async fn rename(conn: &mut PgConnection, from: &str, to: &str) -> Result<(), sqlx::Error> {
    sqlx::query(&format!("ALTER TABLE {from} RENAME TO {to}"))
        .execute(conn)
        .await?;
    Ok(())
}

/// Progress lines on stderr, at most one a second: events done, rate, ETA.
pub fn stderr_progress() -> impl FnMut(u64, u64) + Send {
    let started = Instant::now();
    let mut last = Instant::now() - Duration::from_secs(2);
    move |done, total| {
        if last.elapsed() < Duration::from_secs(1) && done < total {
            return;
        }
        last = Instant::now();
        let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
        let eta = total.saturating_sub(done) as f64 / rate.max(1.0);
        eprintln!("replay: {done}/{total} events, {rate:.0} events/s, ETA {eta:.0} s");
    }
}
