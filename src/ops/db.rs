//! The Postgres pool and the embedded migrations.

use anyhow::Context;
use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions as _;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::{DatabaseSettings, Secret};

/// How long a session may sit idle inside a transaction before Postgres ends it.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "30s";

/// The migrations in `migrations/`, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects a pool to `DATABASE_URL`.
pub async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let url = primary_url(settings)?;
    connect_to(
        url,
        "DATABASE_URL",
        settings.db_max_connections,
        settings,
        IDLE_IN_TRANSACTION_TIMEOUT,
        &[],
    )
    .await
}

/// The background roles' pool (relay, projections) on `DATABASE_URL`:
/// `connections` of their own, and sessions left idle in a transaction —
/// an owner paused mid-batch — ended after `idle_timeout` (the lease TTL), so
/// that the row locks they hold do not delay the instance taking over.
pub async fn connect_workers(
    settings: &DatabaseSettings,
    connections: u32,
    idle_timeout: Duration,
) -> anyhow::Result<PgPool> {
    let url = primary_url(settings)?;
    let idle = format!("{}ms", idle_timeout.as_millis().max(1));
    connect_to(url, "DATABASE_URL", connections, settings, &idle, &[]).await
}

/// Connections of the leases' own ([`crate::ops::lease`]): renewing a lease
/// waits neither for a free connection of the workers (each may be in a
/// batch that waits on the disk) nor for the write-ahead log to reach the
/// disk. A renewal or takeover lost in a crash of Postgres loses nothing:
/// the lease lapses sooner, and a takeover is on disk before anything its
/// new owner writes under it is (the log is flushed in order), while every
/// such write checks the lease's token. A disk slow to sync (seconds, on a
/// busy host) then no longer moves every lease of an instance at once.
pub async fn connect_leases(
    settings: &DatabaseSettings,
    idle_timeout: Duration,
) -> anyhow::Result<PgPool> {
    let url = primary_url(settings)?;
    let idle = format!("{}ms", idle_timeout.as_millis().max(1));
    let no_wait = [("synchronous_commit", "off")];
    connect_to(
        url,
        "DATABASE_URL",
        LEASE_CONNECTIONS,
        settings,
        &idle,
        &no_wait,
    )
    .await
}

/// Connections in the leases' pool: a renewal or a look is one short
/// statement, for the few roles an instance holds or waits for.
const LEASE_CONNECTIONS: u32 = 2;

fn primary_url(settings: &DatabaseSettings) -> anyhow::Result<&Secret> {
    settings
        .database_url
        .as_ref()
        .context("DATABASE_URL is not set: Podium needs a Postgres database (see README.md)")
}

/// The pool queries read from: `DATABASE_READ_URL` (a read replica) when
/// set, else `primary`.
pub async fn connect_read(settings: &DatabaseSettings, primary: &PgPool) -> anyhow::Result<PgPool> {
    match &settings.database_read_url {
        Some(url) => {
            connect_to(
                url,
                "DATABASE_READ_URL",
                settings.db_read_max_connections,
                settings,
                IDLE_IN_TRANSACTION_TIMEOUT,
                &[],
            )
            .await
        }
        None => Ok(primary.clone()),
    }
}

async fn connect_to(
    url: &Secret,
    variable: &str,
    max_connections: u32,
    settings: &DatabaseSettings,
    idle_in_transaction: &str,
    settings_of_its_own: &[(&str, &str)],
) -> anyhow::Result<PgPool> {
    let options = PgConnectOptions::from_str(url.expose())
        .with_context(|| format!("{variable} is not a valid Postgres URL"))?
        // A transaction left open holds back every tailer of the log (they
        // read only below the oldest running transaction): end such sessions.
        .options([("idle_in_transaction_session_timeout", idle_in_transaction)])
        .options(settings_of_its_own.iter().copied())
        .log_slow_statements(
            log::LevelFilter::Warn,
            Duration::from_millis(settings.db_slow_statement_ms),
        );
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(settings.acquire_timeout())
        .connect_with(options)
        .await
        .with_context(|| format!("cannot connect to Postgres at {variable}"))
}

/// A read-only transaction whose reads all see one snapshot: a page, its
/// total and the projection checkpoint it reflects agree with each other.
pub async fn snapshot(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
}

/// Applies every migration not yet applied. Safe to run from several
/// processes at once: sqlx serialises them with an advisory lock.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR
        .run(pool)
        .await
        .context("cannot apply database migrations")
}

/// Whether Postgres answers a trivial query.
pub async fn is_ready(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}

/// A store could not answer: the error type of every storage port (read
/// store, idempotency keys), which `http` turns into 503 or 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached right now: retrying later may work.
    #[error("the database is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Anything else: a bug or a broken row.
    #[error(transparent)]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        if is_unavailable(&err) {
            Self::Unavailable(err)
        } else {
            Self::Failed(err.into())
        }
    }
}

impl From<Box<dyn std::error::Error + Send + Sync>> for StoreError {
    fn from(err: Box<dyn std::error::Error + Send + Sync>) -> Self {
        match err.downcast::<sqlx::Error>() {
            Ok(err) => (*err).into(),
            Err(err) => Self::Failed(err),
        }
    }
}

/// Whether `err` means "the database cannot be reached right now" rather
/// than a bug.
pub fn is_unavailable(err: &(dyn std::error::Error + 'static)) -> bool {
    match err.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)) => true,
        Some(sqlx::Error::Database(db)) => {
            // Class 08: connection exceptions; 57P0x: the server is shutting down.
            db.code()
                .is_some_and(|code| code.starts_with("08") || code.starts_with("57P0"))
        }
        _ => false,
    }
}

/// How far a read replica's replay is behind its primary, for `/metrics`:
/// 0 once it has replayed all it received (an idle primary sends nothing),
/// else the time since the last transaction it replayed was committed.
pub struct ReplicaProbe {
    pub pool: PgPool,
}

#[async_trait::async_trait]
impl crate::ops::metrics::Probe for ReplicaProbe {
    async fn sample(&self, metrics: &crate::ops::metrics::Metrics) {
        let lag: Result<f64, sqlx::Error> = sqlx::query_scalar(
            "SELECT CASE
                      WHEN NOT pg_is_in_recovery() THEN 0
                      WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
                      ELSE COALESCE(EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp()), 0)
                    END::float8",
        )
        .fetch_one(&self.pool)
        .await;
        match lag {
            Ok(lag) => metrics.replica_lag.set(lag),
            Err(err) => tracing::debug!(%err, "cannot read the replica's lag"),
        }
    }
}
