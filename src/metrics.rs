//! Prometheus metrics: one registry per application, so tests that run many
//! apps in one process see their own figures.

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

/// The metrics of one running application.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Query-cache lookups by cache and outcome (`hit`, `miss`).
    pub cache_lookups: IntCounterVec,
    /// Open SSE streams by stream kind (`leaderboard`, `feed`).
    pub sse_open: IntGaugeVec,
    /// SSE clients that fell behind their buffer, by stream kind and what was
    /// done (`caught_up` from the read model, `resync` told to reload).
    pub sse_lagged: IntCounterVec,
    /// Catch-ups of SSE streams from the read models, by reason (`resume`
    /// for a client's `Last-Event-ID`, `lagged`, `bus_reconnected`).
    pub sse_catch_ups: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("podium".into()), None).expect("a valid metric prefix");
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "cache_lookups_total",
                "Query-cache lookups by cache and outcome",
            ),
            &["cache", "outcome"],
        )
        .expect("valid metric");
        let sse_open = IntGaugeVec::new(
            Opts::new("sse_streams_open", "Open Server-Sent-Events streams"),
            &["stream"],
        )
        .expect("valid metric");
        let sse_lagged = IntCounterVec::new(
            Opts::new(
                "sse_slow_clients_total",
                "SSE clients that fell behind their buffer",
            ),
            &["stream", "action"],
        )
        .expect("valid metric");
        let sse_catch_ups = IntCounterVec::new(
            Opts::new(
                "sse_catch_ups_total",
                "SSE streams caught up from the read models",
            ),
            &["stream", "reason"],
        )
        .expect("valid metric");
        for collector in [
            Box::new(cache_lookups.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(sse_open.clone()),
            Box::new(sse_lagged.clone()),
            Box::new(sse_catch_ups.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            cache_lookups,
            sse_open,
            sse_lagged,
            sse_catch_ups,
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
