//! Settings, from command-line flags and environment variables (README.md
//! documents each). Secrets are never printed: `Debug` redacts them.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;

pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 10;
pub const DEFAULT_DB_ACQUIRE_TIMEOUT_SECS: u64 = 5;
pub const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_NATS_PREFIX: &str = "podium";
pub const DEFAULT_DB_SLOW_STATEMENT_MS: u64 = 250;
pub const DEFAULT_LEASE_TTL_MS: u64 = 5_000;

/// A secret string whose `Debug` output is redacted.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

/// Where the database is and how many connections to hold.
#[derive(Debug, Clone, Args)]
pub struct DatabaseSettings {
    /// Postgres connection string of the primary (event store and read models).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<Secret>,
    /// Postgres connection string of a read replica for queries; the
    /// primary when unset.
    #[arg(long, env = "DATABASE_READ_URL", hide_env_values = true)]
    pub database_read_url: Option<Secret>,
    /// Most connections in the pool.
    #[arg(long, env = "PODIUM_DB_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS)]
    pub db_max_connections: u32,
    /// Most connections in the read replica's pool.
    #[arg(long, env = "PODIUM_DB_READ_MAX_CONNECTIONS", default_value_t = DEFAULT_DB_MAX_CONNECTIONS)]
    pub db_read_max_connections: u32,
    /// Seconds to wait for a free connection before answering 503.
    #[arg(long, env = "PODIUM_DB_ACQUIRE_TIMEOUT_SECS", default_value_t = DEFAULT_DB_ACQUIRE_TIMEOUT_SECS)]
    pub db_acquire_timeout_secs: u64,
    /// Statements slower than this many milliseconds are logged (warn).
    #[arg(long, env = "PODIUM_DB_SLOW_STATEMENT_MS", default_value_t = DEFAULT_DB_SLOW_STATEMENT_MS)]
    pub db_slow_statement_ms: u64,
}

impl DatabaseSettings {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.db_acquire_timeout_secs)
    }
}

/// The development secret of the embedded mode (never for production: it is
/// public, in this source file).
pub const DEV_JWT_SECRET: &str = "podium-embedded-development-secret-not-for-production";

/// The JWT secret shared by everything that signs or checks tokens.
#[derive(Debug, Clone, Args)]
pub struct AuthSettings {
    /// HS256 secret for bearer tokens (at least 32 bytes).
    #[arg(long, env = "PODIUM_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<Secret>,
}

impl AuthSettings {
    /// The configured secret, or the embedded mode's development secret
    /// (with `true`) when none is set.
    pub fn secret_or_dev(&self) -> (&str, bool) {
        match &self.jwt_secret {
            Some(secret) => (secret.expose(), false),
            None => (DEV_JWT_SECRET, true),
        }
    }
}

/// Where NATS is and which subjects and streams are ours.
#[derive(Debug, Clone, Args)]
pub struct NatsSettings {
    /// NATS server with JetStream, e.g. `nats://127.0.0.1:4222`. Without it
    /// events stay in Postgres and nothing is relayed.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Prefix of subjects and stream names, so deployments can share a server.
    #[arg(long, env = "PODIUM_NATS_PREFIX", default_value = DEFAULT_NATS_PREFIX)]
    pub nats_prefix: String,
}

/// The query side: cache and streams.
#[derive(Debug, Clone, Args)]
pub struct QuerySettings {
    /// Bytes of answers the query cache holds; 0 turns it off.
    #[arg(long, env = "PODIUM_CACHE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_max_bytes: u64,
    /// Seconds a cached answer lives at most, should a change notification be lost.
    #[arg(long, env = "PODIUM_CACHE_TTL_SECS", default_value_t = 30)]
    pub cache_ttl_secs: u64,
    /// Milliseconds between reloads of a cached answer that keeps changing.
    #[arg(long, env = "PODIUM_CACHE_REFRESH_MS", default_value_t = 5)]
    pub cache_refresh_ms: u64,
    /// Seconds between SSE heartbeat comments.
    #[arg(long, env = "PODIUM_SSE_HEARTBEAT_SECS", default_value_t = 15)]
    pub sse_heartbeat_secs: u64,
    /// Changes an SSE client may fall behind before it is caught up from the read model.
    #[arg(long, env = "PODIUM_SSE_BUFFER", default_value_t = 256)]
    pub sse_buffer: usize,
    /// Open SSE streams one user may hold on one instance.
    #[arg(long, env = "PODIUM_SSE_MAX_STREAMS_PER_USER", default_value_t = 8)]
    pub sse_max_streams_per_user: usize,
}

impl Default for QuerySettings {
    fn default() -> Self {
        Self {
            cache_max_bytes: 64 * 1024 * 1024,
            cache_ttl_secs: 30,
            cache_refresh_ms: 5,
            sse_heartbeat_secs: 15,
            sse_buffer: 256,
            sse_max_streams_per_user: 8,
        }
    }
}

/// Everything `podium serve` needs.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    #[command(flatten)]
    pub database: DatabaseSettings,
    #[command(flatten)]
    pub auth: AuthSettings,
    #[command(flatten)]
    pub nats: NatsSettings,
    #[command(flatten)]
    pub query: QuerySettings,
    /// Run the relay and the projection workers in this process (with NATS).
    /// API-only instances set it to false.
    #[arg(long, env = "PODIUM_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub workers: bool,
    /// Rate limits: `off`, or budgets such as
    /// `user_commands=120/min,user_queries=600/min,ip=1200/min` (units s, min,
    /// h); unnamed budgets keep those defaults. Unset in the embedded mode:
    /// off.
    #[arg(long, env = "PODIUM_RATE_LIMITS", default_value = "")]
    pub rate_limits: String,
    /// Comma-separated IP addresses of proxies whose `X-Forwarded-For` is
    /// believed; otherwise the client is the socket's peer.
    #[arg(long, env = "PODIUM_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Count and time every request in `/metrics` (off only to measure what
    /// that costs).
    #[arg(long, env = "PODIUM_HTTP_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub http_metrics: bool,
    /// Sentry DSN: report errors there. Off when unset.
    #[arg(long, env = "SENTRY_DSN", hide_env_values = true)]
    pub sentry_dsn: Option<Secret>,
    /// Comma-separated origins allowed to call the API from a browser.
    #[arg(long, env = "PODIUM_CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// Embedded mode only (no DATABASE_URL, no NATS_URL): keep the event log
    /// in this file and rebuild the read models from it at start. Without
    /// it, everything lives in memory and is gone at exit.
    #[arg(long, env = "PODIUM_DATA_FILE")]
    pub data_file: Option<std::path::PathBuf>,
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "PODIUM_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes (larger ones get 413).
    #[arg(long, env = "PODIUM_BODY_LIMIT", default_value_t = DEFAULT_BODY_LIMIT)]
    pub body_limit: usize,
    /// Seconds that in-flight requests get to finish after a shutdown signal.
    #[arg(long, env = "PODIUM_SHUTDOWN_TIMEOUT_SECS", default_value_t = DEFAULT_SHUTDOWN_TIMEOUT_SECS)]
    pub shutdown_timeout_secs: u64,
    /// Milliseconds a background role (the relay, each projection) stays
    /// with an instance that stopped renewing it (paused, killed, cut off)
    /// before another instance takes it over.
    #[arg(long, env = "PODIUM_LEASE_TTL_MS", default_value_t = DEFAULT_LEASE_TTL_MS)]
    pub lease_ttl_ms: u64,
    /// Where time-windowed parts (the rate limiter) read the time: the
    /// system's; tests set a manual one.
    #[arg(skip)]
    pub clock: crate::clock::Clock,
}

impl Settings {
    /// Settings for a server on `listen` with the given database and secret,
    /// everything else at its default, except that rate limits are off.
    pub fn new(listen: SocketAddr, database_url: String, jwt_secret: String) -> Self {
        Self {
            database: DatabaseSettings {
                database_url: Some(database_url.into()),
                database_read_url: None,
                db_max_connections: DEFAULT_DB_MAX_CONNECTIONS,
                db_read_max_connections: DEFAULT_DB_MAX_CONNECTIONS,
                db_slow_statement_ms: DEFAULT_DB_SLOW_STATEMENT_MS,
                db_acquire_timeout_secs: DEFAULT_DB_ACQUIRE_TIMEOUT_SECS,
            },
            auth: AuthSettings {
                jwt_secret: Some(jwt_secret.into()),
            },
            nats: NatsSettings {
                nats_url: None,
                nats_prefix: DEFAULT_NATS_PREFIX.to_string(),
            },
            query: QuerySettings::default(),
            workers: true,
            rate_limits: "off".into(),
            trusted_proxies: String::new(),
            cors_origins: String::new(),
            sentry_dsn: None,
            http_metrics: true,
            listen,
            data_file: None,
            body_limit: DEFAULT_BODY_LIMIT,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            clock: crate::clock::Clock::system(),
        }
    }

    /// Settings for an embedded server (no Postgres, no NATS) on `listen`
    /// with the development secret, rate limits off.
    pub fn embedded(listen: SocketAddr) -> Self {
        let mut settings = Self::new(listen, String::new(), String::new());
        settings.database.database_url = None;
        settings.auth.jwt_secret = None;
        settings
    }

    /// Whether this is the embedded mode: neither Postgres nor NATS given.
    pub fn is_embedded(&self) -> bool {
        self.database.database_url.is_none() && self.nats.nats_url.is_none()
    }
}
