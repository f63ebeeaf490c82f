//! Prometheus metrics: one registry per application (tests run many apps in
//! one process). Request metrics are recorded as requests pass; figures kept
//! elsewhere (relay and worker counters, pools, lags) are read at scrape time
//! by [`Metrics::refresh`] from the [`Probe`]s the stages register. Labels stay low-cardinality: route templates,
//! projection names, budget names, problem kinds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The metrics of one running application.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Requests by route template, method and status.
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Error answers by problem kind (`not-found`, `rate-limited`…).
    pub http_errors: IntCounterVec,
    /// Time spent in Postgres by operation (`command`, `load`, `query`).
    pub db_seconds: HistogramVec,
    db_pool: IntGaugeVec,
    /// Query-cache lookups by cache and outcome (`hit`, `miss` = a load).
    pub cache_lookups: IntCounterVec,
    /// Open SSE streams by stream kind (`leaderboard`, `feed`).
    pub sse_open: IntGaugeVec,
    /// SSE clients that fell behind their buffer, by stream and action.
    pub sse_lagged: IntCounterVec,
    /// Catch-ups of SSE streams from the read models, by stream and reason
    /// (`resume`, `lagged`, `bus_reconnected`, `gap`: a change notification
    /// was lost on the way).
    pub sse_catch_ups: IntCounterVec,
    /// Time a writer took to write one change to every stream of its key
    /// that it holds, by stream kind.
    pub sse_fan_out: HistogramVec,
    /// Requests refused by a rate limit, by budget.
    pub rate_limited: IntCounterVec,
    pub relay_lag: IntGauge,
    pub relay_leader: IntGauge,
    pub relay_published: IntCounter,
    pub relay_failures: IntCounter,
    /// From an event's transaction to its publication by the relay.
    pub relay_delay: Histogram,
    pub log_stall: prometheus::Gauge,
    /// How far the read replica's replay is behind (0 without a replica).
    pub replica_lag: prometheus::Gauge,
    pub projection_checkpoint: IntGaugeVec,
    pub projection_lag_events: IntGaugeVec,
    pub projection_lag_seconds: prometheus::GaugeVec,
    /// Time to apply a batch and commit its checkpoint, by projection.
    pub projection_apply: HistogramVec,
    /// From an event's transaction to the commit that applied it.
    pub projection_delay: HistogramVec,
    pub projection_redeliveries: IntCounterVec,
    pub projection_retries: IntCounterVec,
    pub projection_dead_letters: IntCounterVec,
    /// Dead-lettered events skipped at an operator's request.
    pub projection_skipped: IntCounterVec,
    pub projection_transient_retries: IntCounterVec,
    /// 1 for the state each projection is in on this instance.
    pub projection_state: IntGaugeVec,
    /// 1 for the instance holding each live lease (any instance's).
    pub lease_owner: IntGaugeVec,
    /// Warm boards in this instance's rank index, their entries and bytes.
    pub rank_index_boards: IntGauge,
    pub rank_index_entries: IntGauge,
    /// By part: `user_ids`, `index` (everything else).
    pub rank_index_bytes: IntGaugeVec,
    pub rank_index_warm_ups: IntCounter,
    pub rank_index_evictions: IntCounter,
    /// Rank lookups by where they were answered (`index`, `sql`; `batch`: a
    /// worker ranked a batch's changes in memory).
    pub rank_index_reads: IntCounterVec,
    /// Tries of deliveries by channel and outcome (`delivered`, `retried`,
    /// `failed`, `disabled`: a webhook endpoint answered 410).
    pub deliveries: IntCounterVec,
    /// Time one try took, by channel.
    pub delivery_seconds: HistogramVec,
    /// Deliveries waiting to be sent (or retried), by channel.
    pub delivery_pending: IntGaugeVec,
    /// Age of the oldest pending delivery, by channel.
    pub delivery_oldest_pending: prometheus::GaugeVec,
    sources: Arc<Mutex<Sources>>,
}

/// A projection's states as `/metrics` names them.
pub const PROJECTION_STATES: [&str; 4] = ["standby", "running", "catching_up", "halted"];

/// Figures kept elsewhere (a relay's counters, the projections' checkpoints,
/// the log's oldest writer), read into the metrics by the stage that keeps
/// them: what is in this process's memory at each scrape, what costs a query
/// in the background every few seconds ([`Metrics::sample_every`]), so that
/// a scrape never waits on the database.
#[async_trait::async_trait]
pub trait Probe: Send + Sync {
    /// Sets the figures this process keeps in memory.
    fn read(&self, _metrics: &Metrics) {}

    /// Sets the figures that cost a query.
    async fn sample(&self, _metrics: &Metrics) {}

    /// The background roles it watches that have halted, with why.
    fn halted(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

/// What [`Metrics::refresh`] reads from.
#[derive(Default)]
struct Sources {
    pools: Vec<(&'static str, PgPool)>,
    probes: Vec<Arc<dyn Probe>>,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

/// Observes in `delays` how long ago each of `events` was written (from
/// the start of its transaction, by the database's clock).
pub fn observe_delays<'a>(
    delays: &Histogram,
    events: impl IntoIterator<Item = &'a podium_domain::log::RecordedEvent>,
) {
    let now = chrono::Utc::now();
    for event in events {
        let delay = (now - event.recorded_at).to_std().unwrap_or_default();
        delays.observe(delay.as_secs_f64());
    }
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(BUCKETS.to_vec());
    let metric = HistogramVec::new(opts, labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: C) -> C {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self::unset();
        // Series that exist before their first event, so dashboards and
        // alerts see zeros rather than nothing.
        for stream in ["leaderboard", "feed"] {
            metrics.sse_open.with_label_values(&[stream]);
            metrics.sse_lagged.with_label_values(&[stream, "caught_up"]);
        }
        for budget in ["user_commands", "user_queries", "ip"] {
            metrics.rate_limited.with_label_values(&[budget]);
        }
        metrics
    }

    fn unset() -> Self {
        let registry = Registry::new_custom(Some("podium".into()), None).expect("a valid prefix");
        let r = &registry;
        Self {
            http_requests: counter_vec(
                r,
                "http_requests_total",
                "HTTP requests by route template, method and status",
                &["route", "method", "status"],
            ),
            http_duration: histogram_vec(
                r,
                "http_request_duration_seconds",
                "Time to answer (to the response head for streams)",
                &["route", "method"],
            ),
            http_errors: counter_vec(
                r,
                "http_errors_total",
                "Error answers by problem kind",
                &["kind"],
            ),
            db_seconds: histogram_vec(
                r,
                "db_seconds",
                "Time spent in Postgres by operation",
                &["op"],
            ),
            db_pool: gauge_vec(
                r,
                "db_pool_connections",
                "Pool connections by pool and state",
                &["pool", "state"],
            ),
            cache_lookups: counter_vec(
                r,
                "cache_lookups_total",
                "Query-cache lookups by cache and outcome (a miss is a load)",
                &["cache", "outcome"],
            ),
            sse_open: gauge_vec(r, "sse_streams_open", "Open SSE streams", &["stream"]),
            sse_lagged: counter_vec(
                r,
                "sse_slow_clients_total",
                "SSE clients that fell behind their buffer",
                &["stream", "action"],
            ),
            sse_catch_ups: counter_vec(
                r,
                "sse_catch_ups_total",
                "SSE streams caught up from the read models",
                &["stream", "reason"],
            ),
            sse_fan_out: histogram_vec(
                r,
                "sse_fan_out_seconds",
                "Time a writer took to write one change to all its streams of the key",
                &["stream"],
            ),
            rate_limited: counter_vec(
                r,
                "rate_limited_total",
                "Requests refused by a rate limit, by budget",
                &["budget"],
            ),
            relay_lag: register(
                r,
                IntGauge::new("relay_lag_events", "Events in the log not yet relayed").unwrap(),
            ),
            relay_delay: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "relay_delay_seconds",
                        "From the start of an event's transaction to its publication by the relay",
                    )
                    .buckets(BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            relay_leader: register(
                r,
                IntGauge::new("relay_leader", "1 when this process runs the active relay").unwrap(),
            ),
            relay_published: register(
                r,
                IntCounter::new("relay_published_events_total", "Events published to NATS").unwrap(),
            ),
            relay_failures: register(
                r,
                IntCounter::new("relay_publish_failures_total", "Failed publish batches").unwrap(),
            ),
            log_stall: register(
                r,
                prometheus::Gauge::new(
                    "log_oldest_writer_age_seconds",
                    "Age of the oldest open transaction that holds back tailers of the log",
                )
                .unwrap(),
            ),
            replica_lag: register(
                r,
                prometheus::Gauge::new(
                    "db_replica_lag_seconds",
                    "Seconds the read replica's replay is behind the primary (0 when caught up, or without a replica)",
                )
                .unwrap(),
            ),
            projection_checkpoint: gauge_vec(
                r,
                "projection_checkpoint_seq",
                "Seq of the last event a projection applied",
                &["projection"],
            ),
            projection_lag_events: gauge_vec(
                r,
                "projection_lag_events",
                "Events in the log a projection has not applied yet",
                &["projection"],
            ),
            projection_lag_seconds: register(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "projection_lag_seconds",
                        "While behind, seconds since the projection last advanced (0 when caught up)",
                    ),
                    &["projection"],
                )
                .unwrap(),
            ),
            projection_apply: histogram_vec(
                r,
                "projection_apply_seconds",
                "Time to apply a batch and commit its checkpoint",
                &["projection"],
            ),
            projection_delay: histogram_vec(
                r,
                "projection_delay_seconds",
                "From the start of an event's transaction to the commit of the batch that applied it",
                &["projection"],
            ),
            projection_redeliveries: counter_vec(
                r,
                "projection_redeliveries_total",
                "Events delivered again (repeats and early arrivals)",
                &["projection"],
            ),
            projection_retries: counter_vec(
                r,
                "projection_retries_total",
                "Failed applications retried",
                &["projection"],
            ),
            projection_dead_letters: counter_vec(
                r,
                "projection_dead_letters_total",
                "Events sent to the dead-letter stream",
                &["projection"],
            ),
            projection_skipped: counter_vec(
                r,
                "projection_skipped_total",
                "Dead-lettered events skipped at an operator's request",
                &["projection"],
            ),
            projection_transient_retries: counter_vec(
                r,
                "projection_transient_retries_total",
                "Applications retried after a passing failure (database away), not counted against the event",
                &["projection"],
            ),
            projection_state: gauge_vec(
                r,
                "projection_state",
                "1 for the state a projection is in on this instance (standby, running, catching_up, halted)",
                &["projection", "state"],
            ),
            lease_owner: gauge_vec(
                r,
                "lease_owner",
                "1 for the instance that holds each background role's lease",
                &["lease", "owner"],
            ),
            rank_index_boards: register(
                r,
                IntGauge::new("rank_index_boards", "Leaderboards warm in this instance's rank index")
                    .unwrap(),
            ),
            rank_index_entries: register(
                r,
                IntGauge::new("rank_index_entries", "Entries held by the rank index").unwrap(),
            ),
            rank_index_bytes: gauge_vec(
                r,
                "rank_index_bytes",
                "Bytes held by the rank index, by part (user_ids, index: everything else)",
                &["part"],
            ),
            rank_index_warm_ups: register(
                r,
                IntCounter::new("rank_index_warm_ups_total", "Boards loaded into the rank index")
                    .unwrap(),
            ),
            rank_index_evictions: register(
                r,
                IntCounter::new(
                    "rank_index_evictions_total",
                    "Boards evicted from the rank index to stay within its byte budget",
                )
                .unwrap(),
            ),
            rank_index_reads: counter_vec(
                r,
                "rank_index_reads_total",
                "Rank lookups by where they were answered: index, sql (queries), batch (a worker's batch ranked in memory)",
                &["source"],
            ),
            deliveries: counter_vec(
                r,
                "deliveries_total",
                "Tries of email and webhook deliveries by channel and outcome",
                &["channel", "outcome"],
            ),
            delivery_seconds: histogram_vec(
                r,
                "delivery_seconds",
                "Time one delivery try took, by channel",
                &["channel"],
            ),
            delivery_pending: gauge_vec(
                r,
                "delivery_pending",
                "Deliveries waiting to be sent or retried, by channel",
                &["channel"],
            ),
            delivery_oldest_pending: register(
                r,
                prometheus::GaugeVec::new(
                    Opts::new(
                        "delivery_oldest_pending_seconds",
                        "Age of the oldest pending delivery, by channel",
                    ),
                    &["channel"],
                )
                .expect("valid metric"),
            ),
            registry,
            sources: Arc::default(),
        }
    }

    /// Reports `pool`'s connections as `name` at each scrape.
    pub fn watch_pool(&self, name: &'static str, pool: &PgPool) {
        self.sources().pools.push((name, pool.clone()));
    }

    /// Reads `probe` at each scrape.
    pub fn watch(&self, probe: Arc<dyn Probe>) {
        self.sources().probes.push(probe);
    }

    /// The background roles of this instance that have halted, with why:
    /// `/readyz` names them.
    pub fn halted(&self) -> Vec<(String, String)> {
        let probes = self.sources().probes.clone();
        probes.iter().flat_map(|probe| probe.halted()).collect()
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, Sources> {
        self.sources.lock().expect("never poisoned")
    }

    pub fn db_timer(&self, op: &str) -> Histogram {
        self.db_seconds.with_label_values(&[op])
    }

    /// Reads what is kept in memory elsewhere: pools, and every probe's
    /// in-memory figures. Cheap: every scrape does it.
    pub fn refresh(&self) {
        let (pools, probes) = {
            let sources = self.sources();
            (sources.pools.clone(), sources.probes.clone())
        };
        for (name, pool) in &pools {
            let idle = pool.num_idle() as i64;
            self.db_pool.with_label_values(&[name, "idle"]).set(idle);
            self.db_pool
                .with_label_values(&[name, "used"])
                .set(i64::from(pool.size()) - idle);
        }
        for probe in probes {
            probe.read(self);
        }
    }

    /// Samples every probe's queried figures now and then every `period`,
    /// until `stop` is cancelled.
    pub async fn sample_every(self, period: Duration, stop: CancellationToken) {
        loop {
            let probes = self.sources().probes.clone();
            for probe in probes {
                probe.sample(&self).await;
            }
            if podium_nats::stopped_during(period, &stop).await {
                return;
            }
        }
    }
}

/// Raises `counter` to `total`, a count kept elsewhere that only grows.
pub fn raise_to(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
