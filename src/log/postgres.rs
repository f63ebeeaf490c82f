//! Reading the event log in its one total order, safely while writers commit
//! out of order.
//!
//! The order key is `(epoch, txid, position)`. Within the current epoch a
//! reader only takes rows whose writing transaction id is below the log's
//! horizon (`podium_log_horizon`, in the migrations): the oldest transaction
//! still running that may add events. Every transaction that could still
//! insert a row under it has finished, so nothing can later appear behind a
//! reader. Transactions that write no events say so first
//! ([`podium_projections::begin_writing_no_events`]) and then hold no reader
//! back, however long they run; nor do those of other databases. Rows of
//! earlier epochs (written before a restore into another cluster) are all
//! committed and come first.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use podium_domain::log::RecordedEvent;
use sqlx::{PgConnection, PgPool, Row};

/// Where a row sits in the log's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogKey {
    pub epoch: i32,
    /// The writing transaction's id (`xid8`), in decimal.
    pub txid: String,
    pub position: i64,
}

impl LogKey {
    /// The key's place in the log's order, comparable.
    pub(crate) fn order(&self) -> (i32, u64, i64) {
        (self.epoch, self.txid.parse().unwrap_or(0), self.position)
    }

    /// Before the first event.
    pub fn start() -> Self {
        Self {
            epoch: 0,
            txid: "0".into(),
            position: 0,
        }
    }
}

/// One row read from the log: its key and the event (whose `seq` the caller
/// assigns by counting, as the relay and replay both do).
#[derive(Clone)]
pub struct LogRow {
    pub key: LogKey,
    pub event: RecordedEvent,
}

/// A reader's place in the log: the last event's key and seq. Reading on from
/// it numbers events by counting, so every reader that starts from the
/// beginning — the relay, a replay — gives every event the same seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogCursor {
    pub key: LogKey,
    pub seq: u64,
}

impl LogCursor {
    pub fn start() -> Self {
        Self {
            key: LogKey::start(),
            seq: 0,
        }
    }

    /// The cursor after the first `seq` events of the log, for a reader that
    /// has had them (a checkpoint): every one of them lay below the horizon
    /// when it was numbered, so none can appear before them since.
    pub async fn after_first(conn: &mut PgConnection, seq: u64) -> Result<Self, sqlx::Error> {
        if seq == 0 {
            return Ok(Self::start());
        }
        // The offset in the statement, as `read_after`'s limit is. Ordered
        // by qualified columns: a bare `txid` would name the text output
        // column, and sort every row as text ("1000000" before "999999").
        // Counted along the commit-order index: for a large offset on a
        // table not vacuumed lately the planner prefers reading the whole
        // table and sorting it.
        let mut tx = sqlx::Connection::begin(conn).await?;
        sqlx::query("SET LOCAL enable_seqscan = off")
            .execute(&mut *tx)
            .await?;
        let (epoch, txid, position): (i32, String, i64) = sqlx::query_as(&format!(
            "SELECT epoch, txid::text, position FROM events
              ORDER BY events.epoch, events.txid, events.position OFFSET {} LIMIT 1",
            seq - 1
        ))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Self {
            key: LogKey {
                epoch,
                txid,
                position,
            },
            seq,
        })
    }

    /// The next events after this cursor (at most `limit`), numbered, and
    /// the cursor after them. Does not move `self`.
    pub async fn peek(
        &self,
        conn: &mut PgConnection,
        limit: i64,
    ) -> Result<(Vec<RecordedEvent>, LogCursor), sqlx::Error> {
        Ok(self.numbered(read_after(conn, &self.key, limit).await?))
    }

    /// `rows`, read after this cursor, numbered on from it, and the cursor
    /// after them.
    pub fn numbered(&self, rows: Vec<LogRow>) -> (Vec<RecordedEvent>, LogCursor) {
        let mut next = self.clone();
        let events = rows
            .into_iter()
            .map(|row| {
                next.seq += 1;
                next.key = row.key;
                RecordedEvent {
                    seq: next.seq,
                    ..row.event
                }
            })
            .collect();
        (events, next)
    }
}

const COLUMNS: &str = "epoch, txid::text AS txid, position, aggregate_type, aggregate_id, sequence,
    event_type, event_version, payload::text AS payload, metadata::text AS metadata, recorded_at";

/// Up to `limit` rows after `after`, in order, that no running transaction
/// can still precede.
pub async fn read_after(
    conn: &mut PgConnection,
    after: &LogKey,
    limit: i64,
) -> Result<Vec<LogRow>, sqlx::Error> {
    // The limit is written into the statement: as a parameter, a generic
    // plan assumes it is large and sorts every row after `after` instead of
    // walking the index.
    //
    // The horizon is looked for (in the lock table) only when a committed
    // event at or above the snapshot's xmin waits: otherwise every row the
    // statement sees lies below the xmin anyway. Whether one does is read
    // from the newest event's txid (`max`, one step backwards in
    // `events_commit_order`), not asked with `EXISTS`: once `events` has
    // statistics, Postgres estimates that a third of the log matches
    // `txid >= xmin`, scans the table from its start for one, and, as none
    // usually does, reads all of it (630 ms per read at 2,000,000 events).
    let rows = sqlx::query(&format!(
        "WITH snapshot AS MATERIALIZED (
             SELECT (SELECT epoch FROM log_epoch) AS epoch, pg_current_snapshot() AS snapshot),
         bounds AS MATERIALIZED (
             SELECT epoch, CASE WHEN (SELECT max(events.txid) FROM events
                                       WHERE events.epoch = snapshot.epoch)
                                     >= pg_snapshot_xmin(snapshot.snapshot)
                                THEN podium_log_horizon(snapshot.snapshot)
                                ELSE pg_snapshot_xmin(snapshot.snapshot) END AS horizon
               FROM snapshot)
         SELECT {COLUMNS} FROM events
          WHERE (epoch, txid, position) > ($1, $2::text::xid8, $3)
            AND (epoch < (SELECT epoch FROM bounds) OR txid < (SELECT horizon FROM bounds))
          ORDER BY events.epoch, events.txid, events.position
          LIMIT {limit}"
    ))
    .bind(after.epoch)
    .bind(&after.txid)
    .bind(after.position)
    .fetch_all(conn)
    .await?;
    rows.iter().map(decode_row).collect()
}

fn decode_row(row: &sqlx::postgres::PgRow) -> Result<LogRow, sqlx::Error> {
    // Both as JSON text: the payload stays text until a reader decodes it
    // into its type ([`RecordedEvent::decode`]); the metadata is parsed
    // straight into its map, no tree between.
    let decode = |err: serde_json::Error| sqlx::Error::Decode(Box::new(err));
    let metadata: &str = row.try_get("metadata")?;
    let metadata: HashMap<String, String> = serde_json::from_str(metadata).map_err(decode)?;
    let payload: String = row.try_get("payload")?;
    let payload = serde_json::value::RawValue::from_string(payload).map_err(decode)?;
    let sequence: i64 = row.try_get("sequence")?;
    let recorded_at: DateTime<Utc> = row.try_get("recorded_at")?;
    Ok(LogRow {
        key: LogKey {
            epoch: row.try_get("epoch")?,
            txid: row.try_get("txid")?,
            position: row.try_get("position")?,
        },
        event: RecordedEvent {
            seq: 0,
            position: row.try_get("position")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: sequence as u64,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload,
            metadata,
            recorded_at,
        },
    })
}

/// The key of the last committed event, if any.
pub async fn last_key(conn: &mut PgConnection) -> Result<Option<LogKey>, sqlx::Error> {
    let row: Option<(i32, String, i64)> = sqlx::query_as(
        // Qualified: a bare `txid` would name the text output column, and
        // sort every row as text instead of walking the index backwards.
        "SELECT epoch, txid::text, position FROM events
          ORDER BY events.epoch DESC, events.txid DESC, events.position DESC LIMIT 1",
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|(epoch, txid, position)| LogKey {
        epoch,
        txid,
        position,
    }))
}

/// Events after a key that [`count_after`] counts one by one; beyond them
/// it estimates.
pub const COUNTED_EXACTLY: i64 = 10_000;

/// How many committed events lie after `after` (readable or not yet):
/// exact up to [`COUNTED_EXACTLY`], so that an index walk of a long backlog
/// (O(backlog), and asked every few seconds while it lasts) never runs.
/// Beyond that, the events counted plus the distance in `position` from
/// the last of them to the last event of the log: positions are numbered
/// as rows are inserted, so this overcounts only by the numbers that
/// rolled-back or conflicting inserts took.
pub async fn count_after(conn: &mut PgConnection, after: &LogKey) -> Result<i64, sqlx::Error> {
    let (counted, furthest): (i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), max(position) FROM (
             SELECT position FROM events
              WHERE (epoch, txid, position) > ($1, $2::text::xid8, $3)
              ORDER BY epoch, txid, position LIMIT $4) AS counted",
    )
    .bind(after.epoch)
    .bind(&after.txid)
    .bind(after.position)
    .bind(COUNTED_EXACTLY)
    .fetch_one(&mut *conn)
    .await?;
    if counted < COUNTED_EXACTLY {
        return Ok(counted);
    }
    let last = last_key(conn).await?.map_or(0, |key| key.position);
    Ok(counted + (last - furthest.unwrap_or(last)).max(0))
}

/// Whether any committed event lies after `after` (readable or not yet).
///
/// The first such event in log order, looked up in the commit-order index.
/// Not `EXISTS`: Postgres drops an `ORDER BY` and `LIMIT` inside it, and for
/// a row comparison it then estimates that most of the log matches and
/// scans the table from its start for one, where the log's newest rows lie
/// last (a whole-table scan per call: 14 ms at 20,000 events, asked every
/// few milliseconds while the relay waits behind an open transaction).
pub async fn any_after(conn: &mut PgConnection, after: &LogKey) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT (SELECT position FROM events
                  WHERE (epoch, txid, position) > ($1, $2::text::xid8, $3)
                  ORDER BY epoch, txid, position LIMIT 1) IS NOT NULL",
    )
    .bind(after.epoch)
    .bind(&after.txid)
    .bind(after.position)
    .fetch_one(conn)
    .await
}

/// How long a reader that reads to the end ([`ReadToEnd`]) waits for
/// events held back behind a running transaction before it goes on without
/// them (the live workers apply them later).
pub const HELD_BACK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A reader that must read every event committed by the time it first came
/// to the end of what it could read (a replay, a far-behind projection's
/// catch-up). A read can come back short while committed events wait
/// behind the log's horizon: a running transaction that cannot be told
/// apart from this log's writers holds every reader back until it ends (one
/// that has a transaction id and said nothing, or another database's
/// `CREATE` or `DROP DATABASE`, which locks only shared catalogs). The
/// reader then reads again, up to the last event committed when it first
/// came that far, for at most [`HELD_BACK_WAIT`]; events committed later do
/// not move that end, so a reader on a busy log stops.
#[derive(Default)]
pub struct ReadToEnd {
    /// The last committed event when the reader first came to the end (none
    /// in an empty log), and until when it waits for it.
    end: Option<(Option<LogKey>, std::time::Instant)>,
}

impl ReadToEnd {
    /// After a read after `after` came back short: whether `after` is the
    /// end. If not, after a short pause, the caller reads again.
    pub async fn at_end(
        &mut self,
        conn: &mut PgConnection,
        after: &LogKey,
    ) -> Result<bool, sqlx::Error> {
        let (end, deadline) = match &self.end {
            Some(end) => end.clone(),
            None => {
                let end = (
                    last_key(conn).await?,
                    std::time::Instant::now() + HELD_BACK_WAIT,
                );
                self.end = Some(end.clone());
                end
            }
        };
        let Some(end) = end else { return Ok(true) };
        if after.order() >= end.order() {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                "committed events still wait behind a running transaction that holds the log back: going on without them"
            );
            return Ok(true);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        Ok(false)
    }
}

/// Seconds the transaction that holds the log's horizon back has been
/// running: while it runs, every tailer waits behind it. 0 when none does.
/// Measured against the clock, not `now()`: this statement's own
/// transaction may have started a moment before the writer's, and the age
/// came out negative.
pub async fn oldest_writer_age_secs(pool: &PgPool) -> Result<f64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT GREATEST(max(EXTRACT(EPOCH FROM clock_timestamp() - xact_start)), 0)::float8
           FROM pg_stat_activity
          WHERE backend_xid::text::bigint
                = podium_log_horizon(pg_current_snapshot())::text::bigint % 4294967296",
    )
    .fetch_one(pool)
    .await
}

/// The log's figure for `/metrics`: how long tailers have been held back.
pub struct LogProbe {
    pub pool: PgPool,
}

#[async_trait::async_trait]
impl crate::ops::metrics::Probe for LogProbe {
    async fn sample(&self, metrics: &crate::ops::metrics::Metrics) {
        if let Ok(age) = oldest_writer_age_secs(&self.pool).await {
            metrics.log_stall.set(age);
        }
    }
}

/// Records the cluster this database runs on and starts a new epoch when it
/// changed since the last start (the database was restored elsewhere).
/// Runs at every start, before anything writes events.
pub async fn sync_epoch(pool: &PgPool) -> Result<i32, sqlx::Error> {
    let (epoch, bumped): (i32, bool) = sqlx::query_as(
        "WITH current AS (SELECT system_identifier AS id FROM pg_control_system()),
              old AS (SELECT epoch, system_identifier FROM log_epoch FOR UPDATE)
         UPDATE log_epoch
            SET epoch = CASE WHEN old.system_identifier IS DISTINCT FROM current.id
                              AND old.system_identifier IS NOT NULL
                             THEN old.epoch + 1 ELSE old.epoch END,
                system_identifier = current.id
           FROM current, old
         RETURNING log_epoch.epoch, log_epoch.epoch <> old.epoch",
    )
    .fetch_one(pool)
    .await?;
    if bumped {
        tracing::warn!(
            epoch,
            "this database now runs on another Postgres cluster (restored?): started a new log epoch"
        );
    }
    Ok(epoch)
}
