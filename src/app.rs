//! Builds the server from settings and runs it until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::JwtKeys;
use crate::cache::{CacheConfig, QueryCache};
use crate::changes::ChangeHub;
use crate::config::Settings;
use crate::eventstore::Aggregates;
use crate::http::{self, AppParts, AppState};
use crate::metrics::Metrics;
use crate::ratelimit::RateLimiter;
use crate::relay::{Relay, RelayConfig};
use podium_nats::{EventBus, StreamLimits};
use podium_projections::leaderboard::LeaderboardQueries;

/// Connections in the projection workers' pool.
const WORKER_CONNECTIONS: u32 = 4;

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
    /// Turns true on shutdown; handlers and tasks hold receivers.
    stop: watch::Sender<bool>,
    /// Whether this process runs the relay and projection workers.
    workers: bool,
    /// Connections of the projection workers' own, so that a burst of
    /// commands queueing for the main pool cannot starve them.
    worker_pool: sqlx::PgPool,
    shutdown_timeout: Duration,
}

impl Application {
    /// Connects to Postgres, applies migrations and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let secret = settings
            .auth
            .jwt_secret
            .as_ref()
            .context("PODIUM_JWT_SECRET is not set: the server refuses to start without it")?;
        let keys = JwtKeys::new(secret.expose())?;
        let pool = crate::db::connect(&settings.database).await?;
        let worker_pool = crate::db::connect(&crate::config::DatabaseSettings {
            db_max_connections: WORKER_CONNECTIONS,
            ..settings.database.clone()
        })
        .await?;
        crate::db::migrate(&pool).await?;
        let read_pool = crate::db::connect_read(&settings.database, &pool).await?;
        crate::eventlog::sync_epoch(&pool).await?;
        let bus = match &settings.nats.nats_url {
            Some(url) => {
                let bus = EventBus::connect(url, &settings.nats.nats_prefix).await?;
                bus.ensure_streams(&StreamLimits::default()).await?;
                Some(bus)
            }
            None => {
                tracing::warn!("NATS_URL is not set: events stay in Postgres and are not relayed");
                None
            }
        };
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("cannot listen on {}", settings.listen))?;
        let query = settings.query.clone();
        let cache_ttl = Duration::from_secs(query.cache_ttl_secs);
        let hub = ChangeHub::new(query.sse_buffer, cache_ttl);
        let metrics = Metrics::new();
        let cache = QueryCache::new(
            CacheConfig {
                // Without NATS nothing says when answers change.
                enabled: query.cache_max_bytes > 0 && bus.is_some(),
                max_bytes: query.cache_max_bytes,
                ttl: cache_ttl,
                refresh_after: Duration::from_millis(query.cache_refresh_ms),
            },
            hub.clone(),
            metrics.clone(),
        );
        let (stop, shutdown) = watch::channel(false);
        let budgets = crate::ratelimit::parse(&settings.rate_limits)
            .map_err(|err| anyhow::anyhow!("PODIUM_RATE_LIMITS: {err}"))?;
        let trusted_proxies = crate::ratelimit::parse_proxies(&settings.trusted_proxies)
            .map_err(|err| anyhow::anyhow!("PODIUM_TRUSTED_PROXIES: {err}"))?;
        let cors_origins = parse_origins(&settings.cors_origins)?;
        metrics.watch_pool("primary", &pool);
        if settings.database.database_read_url.is_some() {
            metrics.watch_pool("replica", &read_pool);
        }
        metrics.watch_pool("workers", &worker_pool);
        let state = AppState::new(AppParts {
            aggregates: Arc::new(Aggregates::with_metrics(&pool, &metrics)),
            limiter: budgets.map(|b| Arc::new(RateLimiter::new(pool.clone(), b))),
            trusted_proxies: Arc::new(trusted_proxies),
            cors_origins: Arc::new(cors_origins),
            http_metrics: settings.http_metrics,
            definitions: moka::future::Cache::new(10_000),
            pool,
            read_pool,
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
            stop,
            workers: settings.workers,
            worker_pool,
            shutdown_timeout: Duration::from_secs(settings.shutdown_timeout_secs),
        })
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
        let stop_tx = self.stop;
        let stop_rx = self.state.shutdown.clone();
        let mut tasks = vec![tokio::spawn(maintain(
            self.state.pool.clone(),
            stop_rx.clone(),
        ))];
        if let Some(bus) = &self.state.bus {
            tasks.push(tokio::spawn(
                self.state.hub.clone().listen(bus.clone(), stop_rx.clone()),
            ));
        }
        if let Some(bus) = self.state.bus.as_ref().filter(|_| self.workers) {
            let relay = Relay::new(self.state.pool.clone(), bus.clone(), RelayConfig::default());
            self.state
                .metrics
                .watch_relay(bus.subjects().prefix(), relay.stats());
            tasks.push(tokio::spawn(relay.run(stop_rx.clone())));
            let projections = crate::workers::spawn_all(
                &self.worker_pool,
                bus,
                self.state.aggregates.clone(),
                &self.state.metrics,
                &stop_rx,
            );
            tasks.extend(projections);
        }
        tracing::info!(address = %self.listener.local_addr()?, "podium is listening");
        // One router for every connection (a plain router would be rebuilt
        // per connection), with the peer address for rate limits.
        let service = http::router(self.state).into_make_service_with_connect_info::<SocketAddr>();
        let serve = axum::serve(self.listener, service).with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut server = tokio::spawn(async move { serve.await });
        let timeout = self.shutdown_timeout;
        let mut stopped = stop_rx;
        let drain_deadline = async move {
            if stopped.wait_for(|stop| *stop).await.is_ok() {
                tokio::time::sleep(timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
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
        for mut task in tasks {
            if tokio::time::timeout(TASK_GRACE, &mut task).await.is_err() {
                tracing::warn!("a background task did not stop in time; ending it");
                task.abort();
            }
        }
        result
    }
}

/// Purges what has expired: idempotency keys, and leaderboard moves older
/// than any cursor that can still be continued.
async fn maintain(pool: sqlx::PgPool, mut stop: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(PURGE_INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                match http::idempotency::purge_expired(&pool).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "purged expired idempotency keys"),
                    Err(err) => tracing::warn!(%err, "cannot purge expired idempotency keys"),
                }
                if let Err(err) = crate::ratelimit::purge_expired(&pool).await {
                    tracing::warn!(%err, "cannot purge rate-limit windows");
                }
                match LeaderboardQueries::prune_moves(&pool, CURSOR_RETENTION).await {
                    Ok(0) => {}
                    Ok(pruned) => tracing::info!(pruned, "pruned old leaderboard moves"),
                    Err(err) => tracing::warn!(%err, "cannot prune leaderboard moves"),
                }
            }
            // The only change ever sent is "stop".
            _ = stop.changed() => return,
        }
    }
}

/// Parses `PODIUM_CORS_ORIGINS`: comma-separated origins such as
/// `https://app.example.org`.
fn parse_origins(spec: &str) -> anyhow::Result<Vec<axum::http::HeaderValue>> {
    spec.split(',')
        .map(str::trim)
        .filter(|origin| !origin.is_empty())
        .map(|origin| {
            let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                && !origin.ends_with('/');
            anyhow::ensure!(
                valid,
                "PODIUM_CORS_ORIGINS: {origin:?} is not an origin like https://app.example.org"
            );
            Ok(axum::http::HeaderValue::from_str(origin)?)
        })
        .collect()
}
