//! Builds the server from settings and runs it until a shutdown signal.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::idp::{KeySource, ProviderSettings};
use crate::auth::JwtKeys;
use crate::command::idempotency::{
    IdempotencyKeys, IdempotencyStore, PgIdempotencyKeys, RETENTION,
};
use crate::command::{Aggregates, Repository};
use crate::config::Settings;
use crate::delivery::memory::MemoryDeliveries;
use crate::delivery::postgres::PgDeliveries;
use crate::delivery::{Channel, Deliveries, DeliveryStore};
use crate::http::{self, AppParts, AppState};
use crate::log::memory::MemLog;
use crate::log::postgres::LogProbe;
use crate::ops::lease::Roster;
use crate::ops::metrics::Metrics;
use crate::projector::local::LocalProjector;
use crate::projector::operations::{Operations, Owners};
use crate::projector::LiveParts;
use crate::query::cache::{CacheConfig, QueryCache};
use crate::query::changes::ChangeHub;
use crate::query::rank_index::RankIndex;
use crate::query::store::{PgReadStore, ReadStore};
use crate::ratelimit::{MemoryWindows, PgWindows, RateLimiter, WindowStore};
use crate::relay::{Relay, RelayConfig, Target};
use podium_nats::{EventBus, StreamLimits};
use podium_projections::leaderboard::LiveBoards;

/// Connections in the projection workers' pool: one transaction per
/// projection, the relay's reads, and the notification policy's commands
/// (leases have connections of their own: [`crate::ops::db::connect_leases`]).
const WORKER_CONNECTIONS: u32 = 7;

/// How often the metrics that cost a query (lags, checkpoints, lease owners)
/// are sampled; a scrape reads memory only.
const METRICS_SAMPLE: Duration = Duration::from_secs(2);

/// How long background tasks get to stop after the server has.
const TASK_GRACE: Duration = Duration::from_secs(10);

/// How often expired idempotency keys and old leaderboard moves are purged.
const PURGE_INTERVAL: Duration = Duration::from_secs(300);

/// How long a leaderboard cursor can be continued exactly.
const CURSOR_RETENTION: Duration = Duration::from_secs(3600);

/// A server bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// Whether this process runs the relay and projection workers.
    workers: bool,
    /// The primary pool (production).
    pool: Option<sqlx::PgPool>,
    /// The embedded mode's projector.
    local: Option<Arc<LocalProjector>>,
    /// Connections of the projection workers' own, so that a burst of
    /// commands queueing for the main pool cannot starve them (production).
    worker_pool: Option<sqlx::PgPool>,
    /// The background roles' leases' own connections (production).
    lease_pool: Option<sqlx::PgPool>,
    shutdown_timeout: Duration,
    /// How long a background role stays with an instance that stopped renewing it.
    lease_ttl: Duration,
    /// Events behind from which a read model catches up by a rebuild.
    catch_up_rebuild_from: u64,
    /// Whether the background roles spread over the instances.
    spread_roles: bool,
    /// This instance's name in lease rows and metrics.
    instance: String,
    /// The rank index the query API reads and the leaderboard worker ranks with.
    ranks: Option<Arc<RankIndex>>,
    /// The projection engine as operators see it (Postgres only).
    operations: Option<Arc<Operations>>,
    /// Email and webhook delivery.
    deliveries: Arc<Deliveries>,
    /// Events each delivery channel's consumer hands out unacknowledged.
    delivery_max_ack_pending: i64,
    /// How long delivered and failed deliveries are kept.
    delivery_retention: chrono::Duration,
}

/// The stores, as the rest of the application uses them.
struct Wired {
    store: Arc<dyn ReadStore>,
    /// The operator API's view of the projection engine (Postgres only).
    operations: Option<Arc<Operations>>,
    idempotency: Arc<dyn IdempotencyStore>,
    repository: Repository,
    pool: Option<sqlx::PgPool>,
    worker_pool: Option<sqlx::PgPool>,
    lease_pool: Option<sqlx::PgPool>,
    local: Option<Arc<LocalProjector>>,
    ranks: Option<Arc<RankIndex>>,
    deliveries: Arc<dyn DeliveryStore>,
}

/// Where events and read models live, as the settings choose.
enum Stores {
    Postgres {
        pool: sqlx::PgPool,
        read_pool: sqlx::PgPool,
        worker_pool: sqlx::PgPool,
        lease_pool: sqlx::PgPool,
    },
    Embedded {
        projector: Arc<LocalProjector>,
        keys: IdempotencyKeys,
    },
}

impl Stores {
    /// Refuses set-ups that cannot work, with the reason.
    fn check(settings: &Settings) -> anyhow::Result<()> {
        if settings.is_embedded() {
            anyhow::ensure!(
                settings.workers,
                "PODIUM_WORKERS=false needs a shared store: the embedded mode (no DATABASE_URL, \
                 no NATS_URL) projects its events in this process"
            );
            return Ok(());
        }
        anyhow::ensure!(
            settings.database.database_url.is_some(),
            "NATS_URL is set but DATABASE_URL is not: production needs Postgres for the event \
             log (NATS only carries it). Set DATABASE_URL, or unset NATS_URL for the embedded mode"
        );
        anyhow::ensure!(
            settings.data_file.is_none(),
            "PODIUM_DATA_FILE is for the embedded mode only; with DATABASE_URL the log is in Postgres"
        );
        anyhow::ensure!(
            settings.auth.jwt_secret.is_some(),
            "PODIUM_JWT_SECRET is not set: the server refuses to start without it"
        );
        Ok(())
    }

    /// Opens the stores the (checked) settings choose.
    async fn open(settings: &Settings) -> anyhow::Result<Self> {
        if settings.is_embedded() {
            let (log, keys) = match &settings.data_file {
                Some(path) => (
                    MemLog::open(path).await?,
                    IdempotencyKeys::open(&path.with_extension("keys.jsonl"), RETENTION)?,
                ),
                None => (MemLog::in_memory(), IdempotencyKeys::default()),
            };
            let projector = Arc::new(LocalProjector::new(Arc::new(log)));
            return Ok(Self::Embedded { projector, keys });
        }
        let pool = crate::ops::db::connect(&settings.database).await?;
        let worker_pool = crate::ops::db::connect_workers(
            &settings.database,
            WORKER_CONNECTIONS,
            Duration::from_millis(settings.lease_ttl_ms),
        )
        .await?;
        let lease_pool = crate::ops::db::connect_leases(
            &settings.database,
            Duration::from_millis(settings.lease_ttl_ms),
        )
        .await?;
        crate::ops::db::migrate(&pool).await?;
        let read_pool = crate::ops::db::connect_read(&settings.database, &pool).await?;
        crate::log::postgres::sync_epoch(&pool).await?;
        Ok(Self::Postgres {
            pool,
            read_pool,
            worker_pool,
            lease_pool,
        })
    }
}

impl Application {
    /// Opens the stores (Postgres and NATS, or the embedded ones), applies
    /// migrations and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Stores::check(&settings)?;
        let (secret, dev_secret) = settings.auth.secret_or_dev();
        anyhow::ensure!(
            !dev_secret || settings.listen.ip().is_loopback() || settings.embedded,
            "PODIUM_JWT_SECRET is not set and the server would listen on {}, which other \
             machines can reach: it refuses to sign tokens there with the public development \
             secret. Set PODIUM_JWT_SECRET, listen on 127.0.0.1, or set PODIUM_EMBEDDED=true \
             to run the embedded mode there anyway",
            settings.listen
        );
        let mut keys = JwtKeys::new(secret)?;
        if let Some(provider) = identity_provider(&settings.idp) {
            let provider = Arc::new(crate::auth::idp::IdentityProvider::new(provider));
            // A provider away at start is fetched again on the first token
            // it signs; HS256 tokens work meanwhile.
            provider.refresh().await;
            keys = keys.with_provider(provider);
        }
        let stores = Stores::open(&settings).await?;
        let bus = match (&settings.nats.nats_url, &stores) {
            (Some(url), _) => {
                let bus = EventBus::connect(url, &settings.nats.nats_prefix).await?;
                bus.ensure_streams(&StreamLimits {
                    replicas: usize::from(settings.nats.nats_replicas),
                    ..StreamLimits::default()
                })
                .await?;
                Some(bus)
            }
            (None, Stores::Postgres { .. }) if settings.workers => {
                tracing::warn!(
                    "NATS_URL is not set: this process projects the events itself (one node only: \
                     other instances would not see its changes; give every instance NATS_URL to \
                     run several)"
                );
                None
            }
            (None, Stores::Postgres { .. }) => {
                tracing::warn!(
                    "NATS_URL is not set and PODIUM_WORKERS=false: nothing projects the events here"
                );
                None
            }
            (None, Stores::Embedded { .. }) => None,
        };
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        if let Stores::Embedded { projector, .. } = &stores {
            announce_embedded(&listener, projector, dev_secret);
        }
        let query = settings.query.clone();
        let cache_ttl = Duration::from_secs(query.cache_ttl_secs);
        let hub = ChangeHub::new(query.sse_buffer, cache_ttl);
        let metrics = Metrics::new();
        // Changes come from NATS, or from this process's own projections
        // (embedded, or one node on Postgres); otherwise nothing says when
        // answers change.
        let changes_known = bus.is_some() || settings.workers;
        let cache = QueryCache::new(
            CacheConfig {
                enabled: query.cache_max_bytes > 0 && changes_known,
                max_bytes: query.cache_max_bytes,
                ttl: cache_ttl,
                refresh_after: Duration::from_millis(query.cache_refresh_ms),
            },
            hub.clone(),
            metrics.clone(),
        );
        let shutdown = CancellationToken::new();
        // Embedded (one developer, one process), limits are off unless asked for.
        let budgets = settings
            .rate_limits
            .budgets(matches!(stores, Stores::Embedded { .. }));
        let cors_origins = settings
            .cors_origins
            .0
            .iter()
            .filter_map(|origin| axum::http::HeaderValue::from_str(origin).ok())
            .collect();
        // The relay whose numbering the projections follow: the NATS
        // prefix's, or this single node's own.
        let numbering_relay = match (&settings.nats.nats_url, settings.workers) {
            (Some(_), _) => Some(settings.nats.nats_prefix.clone()),
            (None, true) => Some(crate::relay::LOCAL.to_string()),
            (None, false) => None,
        };
        let wired = match stores {
            Stores::Postgres {
                pool,
                read_pool,
                worker_pool,
                lease_pool,
            } => {
                metrics.watch_pool("primary", &pool);
                if settings.database.database_read_url.is_some() {
                    metrics.watch_pool("replica", &read_pool);
                    metrics.watch(Arc::new(crate::ops::db::ReplicaProbe {
                        pool: read_pool.clone(),
                    }));
                }
                metrics.watch_pool("workers", &worker_pool);
                metrics.watch_pool("leases", &lease_pool);
                metrics.watch(Arc::new(LogProbe { pool: pool.clone() }));
                // Ranks from memory need to hear of every change, as the cache does.
                let ranks = (query.rank_index_max_bytes > 0 && changes_known).then(|| {
                    let index = RankIndex::new(
                        read_pool.clone(),
                        hub.clone(),
                        query.rank_index_max_bytes,
                        shutdown.child_token(),
                    );
                    metrics.watch(index.clone());
                    index
                });
                // Operators see the projections of whichever relay numbers
                // the log (none: the log has no order to project from).
                let operations = numbering_relay.clone().map(|relay| {
                    let owners = match settings.nats.nats_url {
                        Some(_) => Owners::PerProjection,
                        None => Owners::Relay(crate::relay::lease_name(&relay)),
                    };
                    Arc::new(Operations::new(pool.clone(), relay, owners))
                });
                Wired {
                    operations,
                    store: Arc::new(PgReadStore {
                        pool: pool.clone(),
                        read_pool,
                        relay: numbering_relay,
                        ranks: ranks.clone(),
                    }),
                    idempotency: Arc::new(PgIdempotencyKeys { pool: pool.clone() }),
                    repository: Repository::Postgres(pool.clone()),
                    deliveries: Arc::new(PgDeliveries { pool: pool.clone() }),
                    pool: Some(pool),
                    worker_pool: Some(worker_pool),
                    lease_pool: Some(lease_pool),
                    local: None,
                    ranks,
                }
            }
            Stores::Embedded { projector, keys } => {
                metrics.watch(projector.clone());
                Wired {
                    store: projector.models.clone(),
                    idempotency: Arc::new(keys),
                    repository: Repository::Embedded(projector.log.clone()),
                    operations: None,
                    pool: None,
                    worker_pool: None,
                    lease_pool: None,
                    local: Some(projector),
                    ranks: None,
                    deliveries: Arc::new(MemoryDeliveries::default()),
                }
            }
        };
        let deliveries = Deliveries::new(wired.deliveries, &settings.delivery, metrics.clone())?;
        metrics.watch(deliveries.probe());
        let state = AppState::new(AppParts {
            aggregates: Arc::new(Aggregates::with_metrics(&wired.repository, &metrics)),
            limiter: budgets.map(|budgets| {
                // Every budget's refusals show in /metrics from the start (a
                // rate over an absent series is no rate at all).
                for budget in [&budgets.user_commands, &budgets.user_queries, &budgets.ip] {
                    metrics.rate_limited.with_label_values(&[budget.name]);
                }
                let windows: Arc<dyn WindowStore> = match &wired.pool {
                    Some(pool) => Arc::new(PgWindows { pool: pool.clone() }),
                    None => Arc::new(MemoryWindows::default()),
                };
                Arc::new(RateLimiter::new(windows, budgets, settings.clock.clone()))
            }),
            trusted_proxies: Arc::new(settings.trusted_proxies.0.clone()),
            cors_origins: Arc::new(cors_origins),
            http_metrics: settings.http_metrics,
            definitions: moka::future::Cache::new(10_000),
            clock: settings.clock.clone(),
            as_of: Arc::new(crate::query::as_of::AsOfBoards::new(
                settings.query.as_of_cache_max_bytes,
            )),
            deliveries: deliveries.clone(),
            store: wired.store,
            operations: wired
                .operations
                .clone()
                .map(|o| o as Arc<dyn crate::ops::operator::Operator>),
            idempotency: wired.idempotency,
            keys: Arc::new(keys),
            body_limit: settings.body_limit,
            bus,
            hub,
            cache,
            metrics,
            streams: Arc::default(),
            query: Arc::new(query),
            shutdown,
        });
        Ok(Self {
            listener,
            state,
            workers: settings.workers,
            pool: wired.pool,
            worker_pool: wired.worker_pool,
            lease_pool: wired.lease_pool,
            local: wired.local,
            shutdown_timeout: Duration::from_secs(settings.shutdown_timeout_secs),
            lease_ttl: Duration::from_millis(settings.lease_ttl_ms),
            catch_up_rebuild_from: settings.catch_up_rebuild_from,
            spread_roles: settings.spread_roles,
            instance: crate::ops::lease::new_instance_id(),
            ranks: wired.ranks,
            operations: wired.operations,
            deliveries,
            delivery_max_ack_pending: settings.delivery.delivery_max_ack_pending,
            delivery_retention: chrono::Duration::days(i64::from(
                settings.delivery.delivery_retention_days.max(1),
            )),
        })
    }

    /// What this instance's live projections act through: `aggregates`,
    /// and the rank index the leaderboard ranks with.
    fn live_parts(&self, aggregates: Arc<Aggregates>) -> LiveParts {
        LiveParts {
            aggregates,
            boards: self.ranks.clone().map(|ranks| ranks as Arc<dyn LiveBoards>),
        }
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|addr| addr.port())
            .unwrap_or_default()
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish
    /// for at most the configured shutdown timeout.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let relay_config = RelayConfig {
            lease_ttl: self.lease_ttl,
            owner: self.instance.clone(),
            ..RelayConfig::default()
        };
        // Every background task stops when `stop` is cancelled.
        let stop = self.state.shutdown.clone();
        let tasks = TaskTracker::new();
        let mut spawned = vec![tasks.spawn(maintain(
            self.state.store.clone(),
            self.state.idempotency.clone(),
            self.state.limiter.clone(),
            (self.deliveries.store.clone(), self.delivery_retention),
            stop.clone(),
        ))];
        if let Some(bus) = &self.state.bus {
            spawned.push(tasks.spawn(self.state.hub.clone().listen(bus.clone(), stop.clone())));
        }
        let sampling = self
            .state
            .metrics
            .clone()
            .sample_every(METRICS_SAMPLE, stop.clone());
        spawned.push(tasks.spawn(sampling));
        if let Some(local) = &self.local {
            spawned.push(tasks.spawn(local.clone().project(
                self.state.aggregates.clone(),
                self.state.hub.clone(),
                self.deliveries.clone(),
                stop.clone(),
            )));
        }
        let relay_on = self.state.bus.as_ref().filter(|_| self.workers);
        if let (Some(bus), Some(_), Some(worker_pool), Some(lease_pool)) =
            (relay_on, &self.pool, &self.worker_pool, &self.lease_pool)
        {
            // The roles spread over the instances that are live.
            let roster = self.spread_roles.then(|| {
                let roster = Roster::new(lease_pool.clone(), &self.instance, self.lease_ttl);
                spawned.push(tasks.spawn(roster.clone().keep_present(stop.clone())));
                roster
            });
            let mut relay = Relay::new(worker_pool.clone(), bus.clone(), relay_config.clone())
                .leased_through(lease_pool.clone())
                .timed_by(self.state.metrics.relay_delay.clone());
            if let Some(roster) = &roster {
                relay = relay.on_roster(roster);
            }
            self.state.metrics.watch(relay.probe());
            spawned.push(tasks.spawn(relay.run(stop.clone())));
            // The policy's commands go through the workers' pool, off the
            // one that serves requests.
            let aggregates = Arc::new(Aggregates::with_metrics(
                &Repository::Postgres(worker_pool.clone()),
                &self.state.metrics,
            ));
            let projections = crate::projector::spawn_all(
                worker_pool,
                bus,
                self.live_parts(aggregates),
                &self.state.metrics,
                &tasks,
                &stop,
                crate::projector::Leases {
                    pool: lease_pool,
                    ttl: self.lease_ttl,
                    owner: &self.instance,
                    roster: roster.as_ref(),
                    rebuild_from: self.catch_up_rebuild_from,
                },
            );
            spawned.extend(projections);
            // Every instance pulls each channel's events from one durable
            // consumer: an event is recorded by one of them.
            let channels: Vec<Channel> = Channel::ALL
                .into_iter()
                .filter(|c| *c != Channel::Email || self.deliveries.emails())
                .collect();
            // Before anything is served: on a first start, delivery begins
            // after what the relay has numbered so far, not at whatever
            // the stream holds once an intake's consumer is made (events of
            // the first requests would be missed if it came late).
            let numbered: Option<i64> =
                sqlx::query_scalar("SELECT seq FROM relay_checkpoints WHERE name = $1")
                    .bind(bus.subjects().prefix())
                    .fetch_optional(worker_pool)
                    .await
                    .unwrap_or_else(|err| {
                        tracing::warn!(%err, "cannot read the relay's position");
                        None
                    });
            for channel in &channels {
                let seq = numbered.unwrap_or(0).max(0) as u64;
                if let Err(err) = self.deliveries.store.begin_intake(*channel, seq).await {
                    tracing::warn!(%err, "cannot record where delivery begins");
                }
            }
            for channel in channels {
                spawned.push(tasks.spawn(crate::delivery::intake::run(
                    self.deliveries.clone(),
                    bus.clone(),
                    channel,
                    self.delivery_max_ack_pending,
                    stop.clone(),
                )));
            }
        }
        if let (None, true, Some(pool)) = (&self.state.bus, self.workers, &self.pool) {
            let mut projections = crate::projector::local_projections(
                pool,
                self.live_parts(self.state.aggregates.clone()),
            );
            projections.push(crate::projector::delivery_intake(self.deliveries.clone()));
            let target = Target::Local {
                projections,
                hub: self.state.hub.clone(),
            };
            let relay = Relay::to(pool.clone(), target, relay_config.clone())
                .timed_by(self.state.metrics.relay_delay.clone());
            self.state.metrics.watch(relay.probe());
            spawned.push(tasks.spawn(relay.run(stop.clone())));
        }
        // Rebuilds asked for through the operator API run on the instance
        // that owns the projection.
        if let (true, Some(pool), Some(operations)) = (self.workers, &self.pool, &self.operations) {
            spawned.push(tasks.spawn(crate::projector::operations::run_requested(
                pool.clone(),
                self.instance.clone(),
                operations.owners().clone(),
                stop.clone(),
            )));
        }
        // Every instance answers boards as of past instants: it knows from
        // the start how far they are settled.
        let clock = self.state.clock.clone();
        spawned.push(tasks.spawn(self.state.as_of.clone().keep_marking(
            self.state.store.clone(),
            move || clock.now(),
            stop.clone(),
        )));
        // Every instance that runs background work notifies the podiums of
        // periods that close (each exactly once, whoever does it).
        if self.workers || self.local.is_some() {
            let ledger: Arc<dyn crate::projector::podiums::PodiumLedger> = match &self.pool {
                Some(pool) => Arc::new(crate::projector::podiums::PgPodiumLedger(pool.clone())),
                None => Arc::new(crate::projector::podiums::MemoryPodiumLedger::default()),
            };
            let podiums = crate::projector::podiums::Podiums {
                store: self.state.store.clone(),
                aggregates: self.state.aggregates.clone(),
                ledger,
                clock: self.state.clock.clone(),
            };
            spawned.push(tasks.spawn(podiums.run(stop.clone())));
        }
        // Every instance that runs background work sends due deliveries.
        if self.workers {
            spawned.push(
                tasks.spawn(
                    self.deliveries
                        .clone()
                        .dispatch(tasks.clone(), stop.clone()),
                ),
            );
        }
        // Every open stream lives in one of a few writers.
        let writer_settings = http::sse::writer::WriterSettings {
            writers: std::thread::available_parallelism().map_or(1, usize::from),
            buffer: self.state.query.sse_buffer,
            heartbeat: Duration::from_secs(self.state.query.sse_heartbeat_secs.max(1)),
        };
        let (writers, writer_tasks) = http::sse::writer::Writers::start(
            self.state.hub.clone(),
            self.state.metrics.clone(),
            self.state.clock.clone(),
            &writer_settings,
            stop.clone(),
            &tasks,
        );
        spawned.extend(writer_tasks);
        tasks.close();
        tracing::info!(address = %self.listener.local_addr()?, "podium is listening");
        let router = http::router(self.state);
        let stopping = stop.clone();
        let serve = http::server::serve(self.listener, router, writers, async move {
            shutdown.await;
            stopping.cancel();
        });
        let mut server = tokio::spawn(serve);
        let timeout = self.shutdown_timeout;
        let drain_deadline = async {
            stop.cancelled().await;
            tokio::time::sleep(timeout).await;
        };
        let result = tokio::select! {
            result = &mut server => result.context("the server task failed").and_then(|r| Ok(r?)),
            () = drain_deadline => {
                tracing::warn!(?timeout, "in-flight requests did not finish in time; exiting");
                server.abort();
                Ok(())
            }
        };
        // Background tasks saw the same stop signal; give them a moment to
        // finish their batch, then end them.
        if tokio::time::timeout(TASK_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time; ending them");
            spawned.iter().for_each(JoinHandle::abort);
        }
        result
    }
}

/// The identity provider to accept tokens from, if one is configured.
fn identity_provider(idp: &crate::config::IdpSettings) -> Option<ProviderSettings> {
    let source = match (&idp.jwks_url, &idp.oidc_issuer) {
        (Some(url), _) => KeySource::Jwks(url.clone()),
        (None, Some(issuer)) => KeySource::Oidc(issuer.clone()),
        (None, None) => return None,
    };
    Some(ProviderSettings {
        issuer: idp.jwt_issuer.clone().or_else(|| idp.oidc_issuer.clone()),
        audience: idp.jwt_audience.clone(),
        role_claim: idp.jwt_role_claim.clone(),
        min_refetch: Duration::from_millis(idp.jwks_min_refetch_ms),
        source,
    })
}

/// Purges what has expired: idempotency keys, rate-limit windows,
/// leaderboard moves older than any cursor that can still be continued, and
/// deliveries done for longer than their retention.
async fn maintain(
    store: Arc<dyn ReadStore>,
    keys: Arc<dyn IdempotencyStore>,
    limiter: Option<Arc<RateLimiter>>,
    (deliveries, retention): (Arc<dyn DeliveryStore>, chrono::Duration),
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                match keys.purge_expired().await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "purged expired idempotency keys"),
                    Err(err) => tracing::warn!(%err, "cannot purge expired idempotency keys"),
                }
                if let Some(limiter) = &limiter {
                    if let Err(err) = limiter.purge_expired().await {
                        tracing::warn!(%err, "cannot purge rate-limit windows");
                    }
                }
                match store.prune_moves(CURSOR_RETENTION).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, "pruned old leaderboard moves"),
                    Err(err) => tracing::warn!(%err, "cannot prune leaderboard moves"),
                }
                match deliveries.purge(chrono::Utc::now() - retention).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "purged old deliveries"),
                    Err(err) => tracing::warn!(%err, "cannot purge old deliveries"),
                }
            }
            () = stop.cancelled() => return,
        }
    }
}

/// Says at start, in one block, that this is the embedded mode, where its
/// data lives and which secret signs tokens.
fn announce_embedded(listener: &TcpListener, embedded: &LocalProjector, dev_secret: bool) {
    let address = listener
        .local_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let data = match embedded.log.path() {
        Some(path) => format!(
            "event log in {} ({} events read back; read models rebuilt from it)",
            path.display(),
            embedded.log.read_after(0, usize::MAX).len()
        ),
        None => "in memory only: everything is gone when the process exits \
                 (set PODIUM_DATA_FILE to keep it)"
            .to_string(),
    };
    let secret = if dev_secret {
        format!(
            "the development JWT secret {:?} (PODIUM_JWT_SECRET is not set; never use it in production)",
            crate::config::DEV_JWT_SECRET
        )
    } else {
        "PODIUM_JWT_SECRET".to_string()
    };
    eprintln!(
        "\n  Podium is running EMBEDDED: no Postgres, no NATS (DATABASE_URL and NATS_URL are unset).\n  \
         data:    {data}\n  \
         tokens:  signed with {secret}\n  \
         demo:    http://{address}/  (then `podium seed --url http://{address}` for demo data)\n  \
         For production set DATABASE_URL and NATS_URL (see README.md).\n"
    );
}
