//! Settings, from command-line flags and environment variables (README.md
//! documents each). Secrets are never printed: `Debug` redacts them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use clap::Args;

pub const DEFAULT_DB_MAX_CONNECTIONS: u32 = 10;
pub const DEFAULT_DB_ACQUIRE_TIMEOUT_SECS: u64 = 5;
pub const DEFAULT_BODY_LIMIT: usize = 2 * 1024 * 1024;
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_NATS_PREFIX: &str = "podium";
pub const DEFAULT_DB_SLOW_STATEMENT_MS: u64 = 250;
pub const DEFAULT_LEASE_TTL_MS: u64 = 5_000;
/// Events behind the head of the log from which a projection catches up from
/// the log rather than through NATS: a read model by a rebuild, the
/// notification policy by reading the log itself.
pub const DEFAULT_CATCH_UP_REBUILD_FROM: u64 = 100_000;

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

/// An identity provider whose tokens are accepted beside HS256 ones.
#[derive(Debug, Clone, Args)]
pub struct IdpSettings {
    /// The identity provider's JSON Web Key Set (RS256, ES256 and EdDSA keys).
    #[arg(long, env = "PODIUM_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// An OpenID Connect issuer whose discovery document names the key set
    /// (instead of PODIUM_JWKS_URL); its tokens must carry it as `iss`.
    #[arg(long, env = "PODIUM_OIDC_ISSUER", conflicts_with = "jwks_url")]
    pub oidc_issuer: Option<String>,
    /// The `iss` the provider's tokens must carry.
    #[arg(long, env = "PODIUM_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The `aud` the provider's tokens must carry.
    #[arg(long, env = "PODIUM_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// The claim that says `admin` (a string, or an array holding it; a
    /// dotted path reaches into objects).
    #[arg(long, env = "PODIUM_JWT_ROLE_CLAIM", default_value = "role")]
    pub jwt_role_claim: String,
    /// The shortest time between two fetches of the key set, in ms (a token
    /// with an unknown key makes one).
    #[arg(long, env = "PODIUM_JWKS_MIN_REFETCH_MS", default_value_t = 10_000)]
    pub jwks_min_refetch_ms: u64,
}

impl Default for IdpSettings {
    fn default() -> Self {
        Self {
            jwks_url: None,
            oidc_issuer: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_role_claim: "role".into(),
            jwks_min_refetch_ms: 10_000,
        }
    }
}

/// Where NATS is and which subjects and streams are ours.
#[derive(Debug, Clone, Args)]
pub struct NatsSettings {
    /// NATS server with JetStream, e.g. `nats://127.0.0.1:4222`, or a
    /// cluster's servers separated by commas. Without it events stay in
    /// Postgres and nothing is relayed.
    #[arg(long, env = "NATS_URL")]
    pub nats_url: Option<String>,
    /// Prefix of subjects and stream names, so deployments can share a server.
    #[arg(long, env = "PODIUM_NATS_PREFIX", default_value = DEFAULT_NATS_PREFIX)]
    pub nats_prefix: String,
    /// Copies JetStream keeps of Podium's streams (up to the cluster's size;
    /// 3 survives the loss of any one node of three).
    #[arg(long, env = "PODIUM_NATS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: u8,
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
    /// Writes an SSE stream may have queued while its socket is full; past
    /// that it is caught up from the read model once the socket drains.
    #[arg(long, env = "PODIUM_SSE_BUFFER", default_value_t = 256)]
    pub sse_buffer: usize,
    /// Open SSE streams one user may hold on one instance.
    #[arg(long, env = "PODIUM_SSE_MAX_STREAMS_PER_USER", default_value_t = 8)]
    pub sse_max_streams_per_user: usize,
    /// Bytes of leaderboards this instance holds in memory to answer ranks
    /// (least recently read boards are evicted); 0 turns the index off.
    #[arg(long, env = "PODIUM_RANK_INDEX_MAX_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub rank_index_max_bytes: u64,
    /// Bytes of leaderboards as of past instants (`as_of`) this instance
    /// keeps once folded (least recently read are evicted).
    #[arg(long, env = "PODIUM_AS_OF_CACHE_MAX_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub as_of_cache_max_bytes: u64,
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
            rank_index_max_bytes: 256 * 1024 * 1024,
            as_of_cache_max_bytes: 128 * 1024 * 1024,
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
    pub idp: IdpSettings,
    #[command(flatten)]
    pub nats: NatsSettings,
    #[command(flatten)]
    pub query: QuerySettings,
    #[command(flatten)]
    pub delivery: DeliverySettings,
    /// Run the relay and the projection workers in this process (with NATS).
    /// API-only instances set it to false.
    #[arg(long, env = "PODIUM_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub workers: bool,
    /// Rate limits: `off`, or budgets such as
    /// `user_commands=120/min,user_queries=600/min,ip=1200/min` (units s, min,
    /// h); unnamed budgets keep those defaults. Unset in the embedded mode:
    /// off.
    #[arg(long, env = "PODIUM_RATE_LIMITS", default_value = "")]
    pub rate_limits: RateLimits,
    /// Comma-separated IP addresses of proxies whose `X-Forwarded-For` is
    /// believed; otherwise the client is the socket's peer.
    #[arg(long, env = "PODIUM_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: TrustedProxies,
    /// Count and time every request in `/metrics` (off only to measure what
    /// that costs).
    #[arg(long, env = "PODIUM_HTTP_METRICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub http_metrics: bool,
    /// Sentry DSN: report errors there. Off when unset.
    #[arg(long, env = "SENTRY_DSN", hide_env_values = true)]
    pub sentry_dsn: Option<Secret>,
    /// Comma-separated origins allowed to call the API from a browser.
    #[arg(long, env = "PODIUM_CORS_ORIGINS", default_value = "")]
    pub cors_origins: CorsOrigins,
    /// Embedded mode only (no DATABASE_URL, no NATS_URL): keep the event log
    /// in this file and rebuild the read models from it at start. Without
    /// it, everything lives in memory and is gone at exit.
    #[arg(long, env = "PODIUM_DATA_FILE")]
    pub data_file: Option<std::path::PathBuf>,
    /// Asks for the embedded mode even on an address other machines can
    /// reach: only then does it sign tokens with the public development
    /// secret there (without PODIUM_JWT_SECRET).
    #[arg(long, env = "PODIUM_EMBEDDED", default_value_t = false, action = clap::ArgAction::Set)]
    pub embedded: bool,
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
    /// Events behind the head of the log from which a projection whose
    /// lease an instance takes (at start, or after a failover) catches up
    /// from the log instead of through NATS: a read model by a rebuild, with
    /// the other read models as far behind, only when it is also behind by
    /// at least half the log; the notification policy by reading the log
    /// itself in large batches. 0: never.
    #[arg(long, env = "PODIUM_CATCH_UP_REBUILD_FROM", default_value_t = DEFAULT_CATCH_UP_REBUILD_FROM)]
    pub catch_up_rebuild_from: u64,
    /// Spread the background roles over the instances: each takes at most
    /// ⌈roles / live instances⌉ of them and hands what it holds beyond that
    /// over, one role at a time. false: the first instance to take a role
    /// keeps it until it stops (one instance running every role, the others
    /// standing by).
    #[arg(long, env = "PODIUM_SPREAD_ROLES", default_value_t = true, action = clap::ArgAction::Set)]
    pub spread_roles: bool,
    /// Where the API, leaderboard windows and the rate limiter read the
    /// time: the system's; tests set a manual one.
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
            idp: IdpSettings::default(),
            nats: NatsSettings {
                nats_url: None,
                nats_prefix: DEFAULT_NATS_PREFIX.to_string(),
                nats_replicas: 1,
            },
            query: QuerySettings::default(),
            delivery: DeliverySettings::default(),
            workers: true,
            rate_limits: RateLimits::Off,
            trusted_proxies: TrustedProxies::default(),
            cors_origins: CorsOrigins::default(),
            sentry_dsn: None,
            http_metrics: true,
            listen,
            embedded: false,
            data_file: None,
            body_limit: DEFAULT_BODY_LIMIT,
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
            lease_ttl_ms: DEFAULT_LEASE_TTL_MS,
            catch_up_rebuild_from: DEFAULT_CATCH_UP_REBUILD_FROM,
            spread_roles: true,
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

/// Email and webhook delivery.
#[derive(Debug, Clone, Args)]
pub struct DeliverySettings {
    /// SMTP server that sends the emails: `smtp://host:port` (plain;
    /// `?tls=required` or `?tls=opportunistic` for STARTTLS),
    /// `smtps://host:port` (TLS), with `user:password@` when it asks for
    /// them. Without it no email is sent; users' settings are still kept.
    #[arg(long, env = "PODIUM_SMTP_URL", hide_env_values = true)]
    pub smtp_url: Option<Secret>,
    /// The emails' sender.
    #[arg(long, env = "PODIUM_EMAIL_FROM", default_value = DEFAULT_EMAIL_FROM)]
    pub email_from: String,
    /// Waits before each retry of an email that failed for a while
    /// (connection refused, SMTP 4xx); after the last one it is failed.
    #[arg(long, env = "PODIUM_EMAIL_RETRY_SCHEDULE", default_value = DEFAULT_EMAIL_RETRY_SCHEDULE)]
    pub email_retry_schedule: Schedule,
    /// Waits before each retry of a webhook that did not answer 2xx; after
    /// the last one the delivery is failed.
    #[arg(long, env = "PODIUM_WEBHOOK_RETRY_SCHEDULE", default_value = DEFAULT_WEBHOOK_RETRY_SCHEDULE)]
    pub webhook_retry_schedule: Schedule,
    /// How long a webhook receiver has to answer, in milliseconds.
    #[arg(long, env = "PODIUM_WEBHOOK_TIMEOUT_MS", default_value_t = DEFAULT_WEBHOOK_TIMEOUT_MS)]
    pub webhook_timeout_ms: u64,
    /// Sends in flight at once on this instance (emails and webhooks); the
    /// SMTP pool holds as many connections.
    #[arg(long, env = "PODIUM_DELIVERY_CONCURRENCY", default_value_t = DEFAULT_DELIVERY_CONCURRENCY)]
    pub delivery_concurrency: usize,
    /// Events each channel's JetStream consumer hands out unacknowledged,
    /// across all instances: how far intake may run ahead.
    #[arg(long, env = "PODIUM_DELIVERY_MAX_ACK_PENDING", default_value_t = DEFAULT_DELIVERY_MAX_ACK_PENDING)]
    pub delivery_max_ack_pending: i64,
    /// Milliseconds an instance keeps a delivery it took before another may
    /// take it (it was killed, paused or cut off mid-send). Longer than any
    /// send: the webhook timeout, an SMTP exchange.
    #[arg(long, env = "PODIUM_DELIVERY_LEASE_MS", default_value_t = DEFAULT_DELIVERY_LEASE_MS)]
    pub delivery_lease_ms: u64,
    /// How often, in milliseconds, an instance looks for deliveries that came
    /// due (retries, other instances' lapsed leases); new ones start at once.
    #[arg(long, env = "PODIUM_DELIVERY_POLL_MS", default_value_t = DEFAULT_DELIVERY_POLL_MS)]
    pub delivery_poll_ms: u64,
    /// Days delivered and failed deliveries stay in the delivery logs.
    #[arg(long, env = "PODIUM_DELIVERY_RETENTION_DAYS", default_value_t = DEFAULT_DELIVERY_RETENTION_DAYS)]
    pub delivery_retention_days: u32,
}

pub const DEFAULT_EMAIL_FROM: &str = "Podium <podium@localhost>";
pub const DEFAULT_EMAIL_RETRY_SCHEDULE: &str = "5s,30s,2m,10m,30m,1h,2h,4h";
pub const DEFAULT_WEBHOOK_RETRY_SCHEDULE: &str = "5s,5m,30m,2h,5h,10h,10h";
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u64 = 15_000;
pub const DEFAULT_DELIVERY_CONCURRENCY: usize = 16;
pub const DEFAULT_DELIVERY_MAX_ACK_PENDING: i64 = 1_000;
pub const DEFAULT_DELIVERY_LEASE_MS: u64 = 60_000;
pub const DEFAULT_DELIVERY_POLL_MS: u64 = 500;
pub const DEFAULT_DELIVERY_RETENTION_DAYS: u32 = 30;

impl Default for DeliverySettings {
    fn default() -> Self {
        Self {
            smtp_url: None,
            email_from: DEFAULT_EMAIL_FROM.to_string(),
            email_retry_schedule: DEFAULT_EMAIL_RETRY_SCHEDULE
                .parse()
                .expect("a valid default"),
            webhook_retry_schedule: DEFAULT_WEBHOOK_RETRY_SCHEDULE
                .parse()
                .expect("a valid default"),
            webhook_timeout_ms: DEFAULT_WEBHOOK_TIMEOUT_MS,
            delivery_concurrency: DEFAULT_DELIVERY_CONCURRENCY,
            delivery_max_ack_pending: DEFAULT_DELIVERY_MAX_ACK_PENDING,
            delivery_lease_ms: DEFAULT_DELIVERY_LEASE_MS,
            delivery_poll_ms: DEFAULT_DELIVERY_POLL_MS,
            delivery_retention_days: DEFAULT_DELIVERY_RETENTION_DAYS,
        }
    }
}

/// Waits between retries: comma-separated durations such as `5s,5m,2h`
/// (units `ms`, `s`, `m` or `min`, `h`, `d`). A delivery is tried once plus
/// once per entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule(pub Vec<Duration>);

impl Schedule {
    /// The wait before the next try after `attempts` tries, or `None` when
    /// the schedule is spent.
    pub fn after(&self, attempts: u32) -> Option<Duration> {
        let index = usize::try_from(attempts).ok()?.checked_sub(1)?;
        self.0.get(index).copied()
    }
}

impl FromStr for Schedule {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        spec.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|part| {
                let digits = part
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(part.len());
                let (count, unit) = part.split_at(digits);
                let count: u64 = count
                    .parse()
                    .map_err(|_| format!("retry wait {part:?} is not a number and a unit"))?;
                let unit_ms: u64 = match unit {
                    "ms" => 1,
                    "s" => 1_000,
                    "m" | "min" => 60_000,
                    "h" => 3_600_000,
                    "d" => 86_400_000,
                    other => {
                        return Err(format!(
                            "retry wait {part:?}: unit {other:?} is not ms, s, m, min, h or d"
                        ))
                    }
                };
                Ok(Duration::from_millis(count.saturating_mul(unit_ms)))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// `PODIUM_RATE_LIMITS`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimits {
    /// Unset (or empty): the defaults, except in the embedded mode (off).
    Unset,
    Off,
    On(Budgets),
}

impl RateLimits {
    /// The budgets in force, `embedded` or not; `None` when off.
    pub fn budgets(&self, embedded: bool) -> Option<Budgets> {
        match self {
            Self::Unset if embedded => None,
            Self::Unset => Some(Budgets::default()),
            Self::Off => None,
            Self::On(budgets) => Some(budgets.clone()),
        }
    }
}

impl FromStr for RateLimits {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        if spec.trim().is_empty() {
            return Ok(Self::Unset);
        }
        match parse_budgets(spec) {
            Ok(Some(budgets)) => Ok(Self::On(budgets)),
            Ok(None) => Ok(Self::Off),
            Err(err) => Err(format!("PODIUM_RATE_LIMITS: {err}")),
        }
    }
}

/// A budget: `limit` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub name: &'static str,
    pub limit: u32,
    pub period: Duration,
}

impl Budget {
    /// Tokens one lease asks for: a twentieth of the budget, so that what
    /// another instance may hold unspent stays small against it.
    pub fn chunk(&self) -> u32 {
        (self.limit / 20).clamp(1, 10_000)
    }
}

/// The budgets in force, or none (`off`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budgets {
    pub user_commands: Budget,
    pub user_queries: Budget,
    pub ip: Budget,
}

impl Default for Budgets {
    fn default() -> Self {
        let per_minute = |name, limit| Budget {
            name,
            limit,
            period: Duration::from_secs(60),
        };
        Self {
            user_commands: per_minute("user_commands", 120),
            user_queries: per_minute("user_queries", 600),
            ip: per_minute("ip", 1200),
        }
    }
}

/// Parses `PODIUM_RATE_LIMITS`: `off`, or comma-separated
/// `name=count/unit` (units `s`, `min`, `h`); unnamed budgets keep their
/// defaults. `None` means off.
fn parse_budgets(spec: &str) -> Result<Option<Budgets>, String> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let mut budgets = Budgets::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, rate) = part
            .split_once('=')
            .ok_or_else(|| format!("rate limit {part:?} is not name=count/unit"))?;
        let (count, unit) = rate
            .split_once('/')
            .ok_or_else(|| format!("rate limit {part:?} is not name=count/unit"))?;
        let limit: u32 = count
            .trim()
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("rate limit {part:?}: the count must be a positive number"))?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => {
                return Err(format!(
                    "rate limit {part:?}: unit {other:?} is not s, min or h"
                ))
            }
        };
        let budget = match name.trim() {
            "user_commands" => &mut budgets.user_commands,
            "user_queries" => &mut budgets.user_queries,
            "ip" => &mut budgets.ip,
            other => {
                return Err(format!(
                    "rate limit {other:?} is not one of user_commands, user_queries, ip"
                ))
            }
        };
        budget.limit = limit;
        budget.period = period;
    }
    Ok(Some(budgets))
}

/// `PODIUM_TRUSTED_PROXIES`: the proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<IpAddr>);

impl FromStr for TrustedProxies {
    type Err = String;

    /// Comma-separated IP addresses.
    fn from_str(spec: &str) -> Result<Self, String> {
        spec.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                IpAddr::from_str(p).map_err(|_| {
                    format!("PODIUM_TRUSTED_PROXIES: trusted proxy {p:?} is not an IP address")
                })
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

/// `PODIUM_CORS_ORIGINS`: the browser origins allowed to call the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CorsOrigins(pub Vec<String>);

impl FromStr for CorsOrigins {
    type Err = String;

    /// Comma-separated origins such as `https://app.example.org`.
    fn from_str(spec: &str) -> Result<Self, String> {
        spec.split(',')
            .map(str::trim)
            .filter(|origin| !origin.is_empty())
            .map(|origin| {
                let valid = (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && origin.bytes().all(|b| b.is_ascii_graphic());
                if valid {
                    Ok(origin.to_string())
                } else {
                    Err(format!(
                        "PODIUM_CORS_ORIGINS: {origin:?} is not an origin like https://app.example.org"
                    ))
                }
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_schedule_reads_the_contracts_units_and_is_spent_after_its_last_wait() {
        let schedule: Schedule = DEFAULT_WEBHOOK_RETRY_SCHEDULE.parse().unwrap();
        assert_eq!(schedule.0.len(), 7);
        assert_eq!(schedule.after(1), Some(Duration::from_secs(5)));
        assert_eq!(schedule.after(2), Some(Duration::from_secs(300)));
        assert_eq!(schedule.after(4), Some(Duration::from_secs(7200)));
        assert_eq!(schedule.after(7), Some(Duration::from_secs(36_000)));
        assert_eq!(schedule.after(8), None);
        assert_eq!(schedule.after(0), None);
        let short: Schedule = "100ms, 1min,2d".parse().unwrap();
        assert_eq!(
            short.0,
            [100, 60_000, 172_800_000].map(Duration::from_millis)
        );
        assert_eq!("".parse::<Schedule>().unwrap().after(1), None);
        for bad in ["5", "s", "5 s", "5w", "-5s", "5s,x"] {
            assert!(bad.parse::<Schedule>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn parses_budgets_and_keeps_defaults_for_unnamed_ones() {
        let budgets = parse_budgets("user_queries=10/s, ip=5/h").unwrap().unwrap();
        assert_eq!(budgets.user_queries.limit, 10);
        assert_eq!(budgets.user_queries.period, Duration::from_secs(1));
        assert_eq!(budgets.ip.limit, 5);
        assert_eq!(budgets.ip.period, Duration::from_secs(3600));
        assert_eq!(budgets.user_commands, Budgets::default().user_commands);
        assert_eq!(parse_budgets("off").unwrap(), None);
        assert_eq!(parse_budgets("").unwrap(), Some(Budgets::default()));
    }

    #[test]
    fn refuses_malformed_budgets() {
        for bad in [
            "user_queries",
            "user_queries=10",
            "ip=0/min",
            "ip=10/day",
            "other=1/s",
            "ip=x/s",
        ] {
            assert!(parse_budgets(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn rate_limits_unset_mean_defaults_except_embedded() {
        let unset: RateLimits = "".parse().unwrap();
        assert_eq!(unset.budgets(false), Some(Budgets::default()));
        assert_eq!(unset.budgets(true), None);
        let off: RateLimits = "off".parse().unwrap();
        assert_eq!(off.budgets(false), None);
        let err = "ip=lots/min".parse::<RateLimits>().unwrap_err();
        assert!(err.starts_with("PODIUM_RATE_LIMITS: "), "{err}");
    }

    #[test]
    fn proxies_and_origins_are_checked_when_read() {
        let proxies: TrustedProxies = " 10.0.0.1, ::1 ,".parse().unwrap();
        assert_eq!(proxies.0.len(), 2);
        assert!("a-proxy"
            .parse::<TrustedProxies>()
            .unwrap_err()
            .contains("PODIUM_TRUSTED_PROXIES"));
        let origins: CorsOrigins = "https://a.example.org, http://localhost:3000"
            .parse()
            .unwrap();
        assert_eq!(
            origins.0,
            ["https://a.example.org", "http://localhost:3000"]
        );
        for bad in ["app.example.org", "https://a.example.org/", "https://a b"] {
            let err = bad.parse::<CorsOrigins>().unwrap_err();
            assert!(err.contains("PODIUM_CORS_ORIGINS"), "{bad}: {err}");
        }
    }
}
