//! The outbox relay: tails the event log in its commit-safe order and
//! publishes every event to JetStream, checkpointing only after JetStream
//! acknowledged the batch.
//!
//! Exactly one relay is active per NATS prefix: it holds a lease
//! ([`crate::ops::lease`]) that lapses within its TTL when the relay stops renewing
//! it (paused, killed, cut off); a standby then takes over. The checkpoint is
//! saved only while the lease is still held, so a paused ex-leader that wakes
//! up moves nothing. A relay that dies between publishing and checkpointing
//! publishes that batch again; the messages carry `Nats-Msg-Id`, so JetStream
//! stores them once (and consumers pass over repeats anyway). A deleted
//! events stream is created again and filled from the start of the log.
//!
//! Without NATS (one node on Postgres) the same relay feeds this process's
//! projections directly ([`Target::Local`]): each batch is applied to every
//! checkpointed projection and their changes go to the change hub.
//!
//! May use `query` (the change hub), `log`, `ops` and `config`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use podium_domain::log::{Change, RecordedEvent};
use podium_nats::{Backoff, EventBus, StreamLimits};
use podium_projections::{ApplyError, Fence};
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::log::postgres::{LogCursor, LogKey};
use crate::ops::lease::{supervise, Lease, RoleExit, RoleStatus};
use crate::ops::metrics::{raise_to, Metrics, Probe};
use crate::query::changes::ChangeHub;

/// The channel the `events` insert trigger notifies on.
const CHANNEL: &str = "podium_events";

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Events per batch.
    pub batch_size: i64,
    /// Longest wait between looks at the log when no notification arrives.
    pub poll_interval: Duration,
    /// How soon to look again when committed events wait behind a running
    /// transaction (which may never notify).
    pub blocked_poll: Duration,
    /// How long the lead stays with a relay that stopped renewing it.
    pub lease_ttl: Duration,
    /// This instance's name in the lease.
    pub owner: String,
    /// Longest wait between publish retries while NATS is down.
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 1_000,
            poll_interval: Duration::from_secs(1),
            blocked_poll: Duration::from_millis(5),
            lease_ttl: Duration::from_millis(crate::config::DEFAULT_LEASE_TTL_MS),
            owner: crate::ops::lease::new_instance_id(),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Whether this relay is the active one.
    pub leader: AtomicBool,
    /// Seq of the last event published and checkpointed.
    pub seq: AtomicU64,
    /// Events published by this process (a batch published twice counts twice).
    pub published: AtomicU64,
    pub batches: AtomicU64,
    pub publish_failures: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stopped")]
    Stopped,
    /// Another relay holds the lease now.
    #[error("another relay has taken the lead")]
    Fenced,
    /// A local projection is behind the relay's position (one added since,
    /// say): the relay reads the log again from its start.
    #[error("a projection is behind the relay")]
    Rewind,
}

/// Applies a batch of consecutive events to one projection (skipping what it
/// has) and returns the changes to announce.
pub type ApplyBatch = Box<
    dyn Fn(Arc<[RecordedEvent]>) -> BoxFuture<'static, Result<Vec<Change>, ApplyError>>
        + Send
        + Sync,
>;

/// Where the relay sends events.
pub enum Target {
    /// JetStream, for the projection workers of any instance.
    Nats(Box<EventBus>),
    /// This process's projections, in order, and its change hub.
    Local {
        projections: Vec<(String, ApplyBatch)>,
        hub: Arc<ChangeHub>,
    },
}

pub struct Relay {
    pool: PgPool,
    /// Where its lease is renewed, if not on `pool`
    /// ([`crate::ops::db::connect_leases`]).
    lease_pool: Option<PgPool>,
    /// The instances it spreads its lease over with, if any.
    roster: Option<Arc<crate::ops::lease::Roster>>,
    target: Target,
    config: RelayConfig,
    stats: Arc<RelayStats>,
    status: Arc<RoleStatus>,
    /// Where the delays of the events it publishes go, if anywhere.
    delays: Option<prometheus::Histogram>,
}

impl Relay {
    pub fn new(pool: PgPool, bus: EventBus, config: RelayConfig) -> Self {
        Self::to(pool, Target::Nats(Box::new(bus)), config)
    }

    pub fn to(pool: PgPool, target: Target, config: RelayConfig) -> Self {
        Self {
            pool,
            lease_pool: None,
            roster: None,
            target,
            config,
            stats: Arc::default(),
            status: Arc::default(),
            delays: None,
        }
    }

    /// Takes and renews its lease through `pool`.
    pub fn leased_through(mut self, pool: PgPool) -> Self {
        self.lease_pool = Some(pool);
        self
    }

    /// Takes its lease within this instance's share of the roles
    /// ([`crate::ops::lease::Roster`]).
    pub fn on_roster(mut self, roster: &Arc<crate::ops::lease::Roster>) -> Self {
        self.roster = Some(roster.clone());
        self
    }

    /// Observes in `delays` how long each event waited to be published.
    pub fn timed_by(mut self, delays: prometheus::Histogram) -> Self {
        self.delays = Some(delays);
        self
    }

    /// Whether this process leads, stands by or has halted.
    pub fn status(&self) -> Arc<RoleStatus> {
        self.status.clone()
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// What `/metrics` reads of this relay.
    pub fn probe(&self) -> Arc<dyn Probe> {
        Arc::new(RelayProbe {
            pool: self.pool.clone(),
            name: self.name().to_string(),
            stats: self.stats.clone(),
            status: self.status.clone(),
        })
    }

    /// The checkpoint's name: one relay position per NATS prefix, and one
    /// for the local target.
    pub fn name(&self) -> &str {
        match &self.target {
            Target::Nats(bus) => bus.subjects().prefix(),
            Target::Local { .. } => LOCAL,
        }
    }

    /// Relays until `stop` is cancelled: waits to lead, then publishes; after
    /// a database error it steps down and tries again.
    pub async fn run(self, stop: CancellationToken) {
        let mut lease = Lease::new(
            self.lease_pool.clone().unwrap_or_else(|| self.pool.clone()),
            &lease_name(self.name()),
            self.config.lease_ttl,
            &self.config.owner,
        );
        if let Some(roster) = &self.roster {
            lease = lease.on_roster(roster);
        }
        let status = self.status.clone();
        let this = &self;
        let fence = lease.fence().clone();
        supervise(lease, status, stop, |role_stop| {
            let fence = fence.clone();
            async move {
                this.stats.leader.store(true, Ordering::Relaxed);
                let result = this.lead(&fence, &role_stop).await;
                this.stats.leader.store(false, Ordering::Relaxed);
                match result {
                    Ok(()) | Err(RelayError::Stopped) => RoleExit::Stopped,
                    Err(RelayError::Fenced) => RoleExit::Fenced,
                    Err(err) => RoleExit::Failed(err.to_string()),
                }
            }
        })
        .await;
        self.stats.leader.store(false, Ordering::Relaxed);
    }

    async fn lead(&self, fence: &Fence, stop: &CancellationToken) -> Result<(), RelayError> {
        tracing::info!(relay = self.name(), "this relay is now the active one");
        // A connection of its own, outside the pool's count, for as long as
        // this relay leads.
        let mut conn = self.pool.acquire().await?.detach();
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(CHANNEL).await?;
        let mut cursor = self.load_checkpoint(&mut conn).await?;
        self.stats.seq.store(cursor.seq, Ordering::Relaxed);
        // A backlog's stretch of the log is read once for this relay and a
        // far-behind projection's catch-up in this process, not once each.
        let reader = crate::log::shared::Reader::join(&mut conn, &cursor.key).await?;
        // The batch after `cursor`, read while the one before it was being
        // published (a backlog then goes at the pace of the slower of the
        // two, not of both in turn).
        let mut read_ahead = None;
        // The identity of the last event this relay published, while that
        // is the last message on the events stream: the next batch then
        // goes with one acknowledgement. The first batch of a lead goes
        // event by event.
        let mut last_on_stream = None;
        loop {
            if stop.is_cancelled() {
                return Err(RelayError::Stopped);
            }
            let (events, next) = match read_ahead.take() {
                Some(batch) => batch,
                None => {
                    reader
                        .peek(&cursor, &mut conn, self.config.batch_size)
                        .await?
                }
            };
            if events.is_empty() {
                // Committed events that we may not read yet wait behind an
                // older transaction that is still running — perhaps one that
                // writes no event and so will not notify: look again soon.
                let wait = if crate::log::postgres::any_after(&mut conn, &cursor.key).await? {
                    self.config.blocked_poll
                } else {
                    self.config.poll_interval
                };
                tokio::select! {
                    notification = listener.recv() => { notification?; }
                    () = tokio::time::sleep(wait) => {
                        if wait == self.config.poll_interval && self.recreated_stream().await {
                            cursor = LogCursor::start();
                            last_on_stream = None;
                        }
                    }
                    () = stop.cancelled() => return Err(RelayError::Stopped),
                }
                continue;
            }
            let span = tracing::debug_span!("relay_batch", from = cursor.seq + 1, to = next.seq);
            // A full batch says more is waiting: read it meanwhile.
            let more = events.len() as i64 == self.config.batch_size;
            let publish = self
                .publish(&events, &mut last_on_stream, stop)
                .instrument(span);
            let (published, read) = if more {
                let (published, read) = tokio::join!(
                    publish,
                    reader.peek(&next, &mut conn, self.config.batch_size)
                );
                (published, Some(read))
            } else {
                (publish.await, None)
            };
            match published {
                Err(RelayError::Rewind) => {
                    tracing::info!(
                        "a reader is behind the relay: reading the log again from its start"
                    );
                    cursor = LogCursor::start();
                    last_on_stream = None;
                    continue;
                }
                other => other?,
            }
            self.save_checkpoint(&mut conn, &next, fence).await?;
            read_ahead = read.transpose()?;
            cursor = next;
            self.stats.seq.store(cursor.seq, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Publishes until JetStream acknowledged every event, backing off while
    /// NATS is unreachable.
    async fn publish(
        &self,
        events: &[RecordedEvent],
        last_on_stream: &mut Option<String>,
        stop: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut backoff = Backoff::new(Duration::from_millis(100), self.config.max_backoff);
        loop {
            let sent = match &self.target {
                Target::Nats(bus) => match bus.publish_events(events, last_on_stream).await {
                    Err(_) if self.recreated_stream().await => return Err(RelayError::Rewind),
                    other => other.map_err(|e| e.to_string()),
                },
                Target::Local { projections, hub } => {
                    match apply_locally(projections, hub, events).await {
                        Err(ApplyError::Gap { .. }) => return Err(RelayError::Rewind),
                        other => other.map_err(|e| e.to_string()),
                    }
                }
            };
            match sent {
                Ok(()) => {
                    self.stats
                        .published
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                    if let Some(delays) = &self.delays {
                        crate::ops::metrics::observe_delays(delays, events);
                    }
                    return Ok(());
                }
                Err(err) => {
                    self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%err, "cannot publish; will retry");
                    if backoff.wait(stop).await {
                        return Err(RelayError::Stopped);
                    }
                }
            }
        }
    }

    /// When the events stream is gone (deleted by hand, say), makes it again
    /// and says so: the relay then fills it from the start of the log, so
    /// that readers behind it find their events.
    async fn recreated_stream(&self) -> bool {
        let Target::Nats(bus) = &self.target else {
            return false;
        };
        if !bus.events_stream_missing().await {
            return false;
        }
        tracing::warn!("the events stream is missing; creating it again");
        match bus.ensure_streams(&StreamLimits::default()).await {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(%err, "cannot create the events stream yet");
                false
            }
        }
    }

    async fn load_checkpoint(&self, conn: &mut PgConnection) -> Result<LogCursor, sqlx::Error> {
        let row: Option<(i64, i32, String, i64)> = sqlx::query_as(
            "SELECT seq, epoch, txid::text, position FROM relay_checkpoints WHERE name = $1",
        )
        .bind(self.name())
        .fetch_optional(conn)
        .await?;
        Ok(match row {
            None => LogCursor::start(),
            Some((seq, epoch, txid, position)) => LogCursor {
                seq: seq as u64,
                key: LogKey {
                    epoch,
                    txid,
                    position,
                },
            },
        })
    }

    /// Saves the relay's position, only while it still holds `fence`'s lease
    /// (see [`Fence::holds`]): one statement, one round trip.
    async fn save_checkpoint(
        &self,
        conn: &mut PgConnection,
        cursor: &LogCursor,
        fence: &Fence,
    ) -> Result<(), RelayError> {
        let token = fence.token();
        if token == 0 {
            return Err(RelayError::Fenced);
        }
        let saved: Option<i32> = sqlx::query_scalar(
            "INSERT INTO relay_checkpoints (name, seq, epoch, txid, position)
             SELECT $1, $2, $3, $4::text::xid8, $5
              WHERE EXISTS (SELECT 1 FROM leases WHERE name = $6 AND token = $7 FOR KEY SHARE)
             ON CONFLICT (name) DO UPDATE
                SET seq = EXCLUDED.seq, epoch = EXCLUDED.epoch, txid = EXCLUDED.txid,
                    position = EXCLUDED.position, updated_at = now()
             RETURNING 1",
        )
        .bind(self.name())
        .bind(cursor.seq as i64)
        .bind(cursor.key.epoch)
        .bind(&cursor.key.txid)
        .bind(cursor.key.position)
        .bind(fence.name())
        .bind(token)
        .fetch_optional(&mut *conn)
        .await?;
        match saved {
            Some(_) => Ok(()),
            None => Err(RelayError::Fenced),
        }
    }
}

/// Where the relay named `name` stands: the seq it has numbered up to, and
/// how many events of the log it has not reached yet.
async fn position(pool: &PgPool, name: &str) -> Result<(i64, i64), sqlx::Error> {
    let row: Option<(i64, i32, String, i64)> = sqlx::query_as(
        "SELECT seq, epoch, txid::text, position FROM relay_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let (relayed, key) = match row {
        None => (0, LogKey::start()),
        Some((seq, epoch, txid, position)) => (
            seq,
            LogKey {
                epoch,
                txid,
                position,
            },
        ),
    };
    let behind = crate::log::postgres::count_after(&mut *pool.acquire().await?, &key).await?;
    Ok((relayed, behind))
}

/// How far the relay named `name` is behind the head of the log, in events.
pub async fn lag(pool: &PgPool, name: &str) -> Result<i64, sqlx::Error> {
    Ok(position(pool, name).await?.1)
}

/// The head of the log in seqs, as the relay named `name` numbers it: what
/// it has numbered plus what it has not reached yet.
pub async fn head(pool: &PgPool, name: &str) -> Result<i64, sqlx::Error> {
    let (relayed, behind) = position(pool, name).await?;
    Ok(relayed + behind)
}

/// A relay's figures for `/metrics`: whether it leads, what it published,
/// how far behind the log it is.
struct RelayProbe {
    pool: PgPool,
    name: String,
    stats: Arc<RelayStats>,
    status: Arc<RoleStatus>,
}

#[async_trait::async_trait]
impl Probe for RelayProbe {
    fn read(&self, metrics: &Metrics) {
        let stats = &self.stats;
        let leader = stats.leader.load(Ordering::Relaxed);
        metrics.relay_leader.set(i64::from(leader));
        raise_to(
            &metrics.relay_published,
            stats.published.load(Ordering::Relaxed),
        );
        raise_to(
            &metrics.relay_failures,
            stats.publish_failures.load(Ordering::Relaxed),
        );
    }

    async fn sample(&self, metrics: &Metrics) {
        if let Ok(lag) = lag(&self.pool, &self.name).await {
            metrics.relay_lag.set(lag);
        }
    }

    fn halted(&self) -> Vec<(String, String)> {
        let halted = self.status.halted();
        halted
            .map(|reason| (format!("relay:{}", self.name), reason))
            .into_iter()
            .collect()
    }
}

/// The lease of the relay named `name`.
pub fn lease_name(name: &str) -> String {
    format!("relay:{name}")
}

/// The local target's checkpoint name.
pub const LOCAL: &str = "local";

/// Applies `events` to each projection in turn and hands their changes to
/// `hub`. A projection that fails stops the batch: the relay retries it, and
/// the projections that had applied it skip it then.
async fn apply_locally(
    projections: &[(String, ApplyBatch)],
    hub: &ChangeHub,
    events: &[RecordedEvent],
) -> Result<(), ApplyError> {
    let events: Arc<[RecordedEvent]> = events.into();
    for (name, apply) in projections {
        let changes = apply(events.clone()).await.inspect_err(|err| {
            tracing::warn!(projection = name.as_str(), %err, "a local projection failed");
        })?;
        for change in changes {
            hub.deliver(change);
        }
    }
    Ok(())
}
