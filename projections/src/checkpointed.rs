//! A projection whose read model and checkpoint live in one Postgres
//! transaction.

use std::future::Future;

use podium_domain::log::{Change, RecordedEvent};
use sqlx::{PgConnection, PgPool};

use crate::fence::{is_transient, Fence};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens a transaction that writes no events to the log: said first, before
/// the transaction has an id, so that readers of the log need not wait for
/// it to end however long it runs (`podium_writes_no_events` in the
/// migrations). Postgres refuses any event it then tries to insert.
const BEGIN_WRITING_NO_EVENTS: &str = "BEGIN; SELECT podium_writes_no_events()";

/// A transaction on `pool` opened with [`BEGIN_WRITING_NO_EVENTS`]: one round
/// trip, as a plain `BEGIN`.
pub async fn begin_writing_no_events(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with(BEGIN_WRITING_NO_EVENTS).await
}

/// What a projection does with the events, inside its transaction.
pub trait ProjectionLogic: Send + Sync + 'static {
    /// The checkpoint's name.
    fn name(&self) -> &str;

    /// Applies consecutive events to the read model through `conn` (a
    /// transaction) and returns what changed; events the projection ignores
    /// change nothing. Projections write a batch in a few set-wise
    /// statements. On an error, nothing of the batch counts: the transaction
    /// is rolled back.
    fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> impl Future<Output = Result<Vec<Change>, BoxError>> + Send;

    /// Whether events of this type can change the read model. Those it
    /// does not want may reach [`Self::apply_batch`] as
    /// [`RecordedEvent::passed_over`] (their seq and type, no payload), so
    /// that a live worker need not decode them; `apply_batch` must tell them
    /// apart by the same test and change nothing for them.
    fn wants(&self, aggregate_type: &str, event_type: &str) -> bool {
        let _ = (aggregate_type, event_type);
        true
    }

    /// Whether [`Self::apply_batch`] adds events to the log (a policy that
    /// issues commands). Those that do not run in transactions that hold no
    /// reader of the log back ([`begin_writing_no_events`]). A wrapper
    /// that delegates `apply_batch` must delegate this too: otherwise
    /// Postgres refuses the events it writes (never loses them).
    fn writes_events(&self) -> bool {
        false
    }

    /// [`Self::apply_batch`] for one event.
    fn apply(
        &self,
        conn: &mut PgConnection,
        event: &RecordedEvent,
    ) -> impl Future<Output = Result<Vec<Change>, BoxError>> + Send {
        self.apply_batch(conn, std::slice::from_ref(event))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the projection is at seq {checkpoint}; the events start later")]
    Gap { checkpoint: u64 },
    #[error("event seq {seq}: {error}")]
    Failed {
        seq: u64,
        error: String,
        /// The failure was the infrastructure's, not the event's: retry.
        transient: bool,
    },
    /// Another instance owns the projection now: this one must stop writing.
    #[error("the projection's lease {lease} is held by another instance now")]
    Fenced { lease: String },
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
}

impl ApplyError {
    /// Whether trying again later may succeed without anything changing
    /// about the events (see [`is_transient`]).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Failed { transient, .. } => *transient,
            Self::Database(error) => is_transient(error),
            Self::Gap { .. } | Self::Fenced { .. } => false,
        }
    }
}

/// A [`ProjectionLogic`] with its checkpoint in `projection_checkpoints`.
pub struct Checkpointed<L> {
    pool: PgPool,
    logic: L,
    /// The lease each transaction must still hold, when several instances
    /// may run this projection.
    fence: Option<Fence>,
}

impl<L: ProjectionLogic> Checkpointed<L> {
    /// Where its tables and checkpoint are.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn new(pool: PgPool, logic: L) -> Self {
        Self {
            pool,
            logic,
            fence: None,
        }
    }

    /// Commits nothing unless `fence`'s lease is still held.
    pub fn fenced_by(mut self, fence: Fence) -> Self {
        self.fence = Some(fence);
        self
    }

    pub fn name(&self) -> &str {
        self.logic.name()
    }

    pub fn logic(&self) -> &L {
        &self.logic
    }

    /// A transaction for a batch: one that holds no reader of the log back
    /// unless the logic writes events.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        if self.logic.writes_events() {
            self.pool.begin().await
        } else {
            begin_writing_no_events(&self.pool).await
        }
    }

    /// The seq of the last event applied, 0 before any.
    pub async fn checkpoint(&self) -> Result<u64, sqlx::Error> {
        checkpoint_of(&self.pool, self.name()).await
    }

    /// Locks the checkpoint row for this transaction and reads it, and checks
    /// the fence (see [`Fence::holds`]) in the same statement: a batch's
    /// opening is one round trip. The row is made on the first batch.
    async fn lock_checkpoint(&self, conn: &mut PgConnection) -> Result<u64, ApplyError> {
        let (lease, token) = self.lease()?;
        for first in [true, false] {
            let row: Option<(i64, Option<i64>)> = sqlx::query_as(
                "SELECT c.seq, (SELECT token FROM leases WHERE name = $2 FOR KEY SHARE)
                   FROM projection_checkpoints c WHERE c.name = $1 FOR UPDATE OF c",
            )
            .bind(self.name())
            .bind(lease)
            .fetch_optional(&mut *conn)
            .await?;
            match row {
                // The token this batch started with, as the compare-and-set
                // of a batch that writes events uses it.
                Some((_, current)) if lease.is_some() && current != Some(token) => {
                    return Err(self.fenced())
                }
                Some((seq, _)) => return Ok(seq as u64),
                None if first => {
                    sqlx::query(
                        "INSERT INTO projection_checkpoints (name, seq) VALUES ($1, 0)
                         ON CONFLICT (name) DO NOTHING",
                    )
                    .bind(self.name())
                    .execute(&mut *conn)
                    .await?;
                }
                None => break,
            }
        }
        Err(ApplyError::Database(sqlx::Error::RowNotFound))
    }

    /// The lease this projection's writes must still hold and the token it
    /// was given (`None` when unfenced); fenced at once while it holds none.
    fn lease(&self) -> Result<(Option<&str>, i64), ApplyError> {
        match &self.fence {
            Some(fence) if fence.token() == 0 => Err(self.fenced()),
            Some(fence) => Ok((Some(fence.name()), fence.token())),
            None => Ok((None, 0)),
        }
    }

    fn fenced(&self) -> ApplyError {
        ApplyError::Fenced {
            lease: self.fence.as_ref().map_or("", |f| f.name()).to_string(),
        }
    }

    async fn store_checkpoint(&self, conn: &mut PgConnection, seq: u64) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE projection_checkpoints SET seq = $2, updated_at = now() WHERE name = $1",
        )
        .bind(self.name())
        .bind(seq as i64)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Applies consecutive events after the checkpoint and advances it, all in
    /// one transaction; events at or below the checkpoint are skipped.
    /// Returns the new checkpoint and the changes to announce.
    pub async fn apply(&self, events: &[RecordedEvent]) -> Result<(u64, Vec<Change>), ApplyError> {
        let mut tx = self.begin().await?;
        let applied = if self.logic.writes_events() {
            self.apply_writing_events(&mut tx, events).await?
        } else {
            self.apply_in(&mut tx, events).await?
        };
        tx.commit().await?;
        Ok(applied)
    }

    /// [`Self::apply`] inside the caller's transaction.
    pub async fn apply_in(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(u64, Vec<Change>), ApplyError> {
        let checkpoint = self.lock_checkpoint(conn).await?;
        let Some(fresh) = fresh_after(events, checkpoint)? else {
            return Ok((checkpoint, Vec::new()));
        };
        let changes = self.run_logic(conn, fresh).await?;
        let checkpoint = fresh.last().map_or(checkpoint, |e| e.seq);
        self.store_checkpoint(conn, checkpoint).await?;
        Ok((checkpoint, changes))
    }

    /// [`Self::apply_in`] for a logic that writes events. Its transaction
    /// holds back every reader of the log from its first write to its end,
    /// so it writes as late as it can: the checkpoint is read without a
    /// lock (a lock would give the transaction its id at once), the logic
    /// reads and decides, and its writes are followed by one statement that
    /// moves the checkpoint only if it is still where it was read and the
    /// lease still this owner's. If it moved, nothing of the batch commits
    /// and the caller hears where it is now ([`ApplyError::Gap`]).
    async fn apply_writing_events(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<(u64, Vec<Change>), ApplyError> {
        let (lease, token) = self.lease()?;
        let checkpoint = checkpoint_of(&mut *conn, self.name()).await?;
        let Some(fresh) = fresh_after(events, checkpoint)? else {
            return Ok((checkpoint, Vec::new()));
        };
        let changes = self.run_logic(conn, fresh).await?;
        let last = fresh.last().map_or(checkpoint, |e| e.seq);
        let moved = sqlx::query(
            "UPDATE projection_checkpoints SET seq = $3, updated_at = now()
              WHERE name = $1 AND seq = $2
                AND ($4::text IS NULL
                     OR EXISTS (SELECT 1 FROM leases WHERE name = $4 AND token = $5 FOR KEY SHARE))",
        )
        .bind(self.name())
        .bind(checkpoint as i64)
        .bind(last as i64)
        .bind(lease)
        .bind(token)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if moved == 0 {
            // The row is not there yet (the first batch), another applier
            // moved it, or the lease is gone: find out under the lock.
            let now = self.lock_checkpoint(conn).await?;
            if now != checkpoint {
                return Err(ApplyError::Gap { checkpoint: now });
            }
            self.store_checkpoint(conn, last).await?;
        }
        Ok((last, changes))
    }

    /// The logic's changes for `fresh`, its failure the batch's.
    async fn run_logic(
        &self,
        conn: &mut PgConnection,
        fresh: &[RecordedEvent],
    ) -> Result<Vec<Change>, ApplyError> {
        self.logic
            .apply_batch(conn, fresh)
            .await
            .map_err(|error| ApplyError::Failed {
                seq: fresh[0].seq,
                transient: is_transient(&*error),
                error: error.to_string(),
            })
    }

    /// Moves the checkpoint past `seq` without applying it.
    pub async fn skip(&self, seq: u64) -> Result<(), ApplyError> {
        let mut tx = self.begin().await?;
        let checkpoint = self.lock_checkpoint(&mut tx).await?;
        if seq == checkpoint + 1 {
            self.store_checkpoint(&mut tx, seq).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The events after `checkpoint` (`None`: none are), which must follow it
/// without a gap.
fn fresh_after(
    events: &[RecordedEvent],
    checkpoint: u64,
) -> Result<Option<&[RecordedEvent]>, ApplyError> {
    let Some(start) = events.iter().position(|e| e.seq > checkpoint) else {
        return Ok(None);
    };
    let fresh = &events[start..];
    let contiguous = fresh
        .iter()
        .enumerate()
        .all(|(i, e)| e.seq == checkpoint + 1 + i as u64);
    if !contiguous {
        return Err(ApplyError::Gap { checkpoint });
    }
    Ok(Some(fresh))
}

/// The checkpoint of projection `name` as `db` sees it (0 before any event):
/// read in the same snapshot as a read model, it is the log seq that the
/// read model reflects exactly.
pub async fn checkpoint_of<'e>(
    db: impl sqlx::PgExecutor<'e>,
    name: &str,
) -> Result<u64, sqlx::Error> {
    let seq: Option<i64> =
        sqlx::query_scalar("SELECT seq FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(db)
            .await?;
    Ok(seq.unwrap_or(0) as u64)
}
