//! Fan-out benchmark: relay throughput and commit→consumer latency.
//!
//!     cargo run --release --example fanout_bench -- [EVENTS] [RATE_PER_SEC] [SECONDS]
//!
//! Needs Postgres (PODIUM_TEST_DATABASE_URL, default the local `postgres`
//! database) and NATS (PODIUM_TEST_NATS_URL, default 127.0.0.1:4222). It
//! creates a scratch database and stream prefix and removes them at the end.
//!
//! 1. Throughput: appends EVENTS events with the relay stopped, then starts
//!    the relay and times until JetStream acknowledged them all.
//! 2. Latency: with relay and a consumer running, appends at RATE_PER_SEC for
//!    SECONDS (open loop) and measures from each append's commit to the
//!    consumer's apply of that event.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use podium::command::Aggregates;
use podium::projector::PgProjection;
use podium::relay::{Relay, RelayConfig};
use podium_domain::log::{Change, RecordedEvent};
use podium_domain::notification::InboxCommand;
use podium_domain::{EventMetadata, UserId};
use podium_nats::{EventBus, Worker, WorkerConfig};
use podium_projections::{BoxError, Checkpointed, ProjectionLogic};
use sqlx::postgres::PgPoolOptions;
use sqlx::PgConnection;
use tokio_util::sync::CancellationToken;

/// Notes when each event reached the consumer.
struct Stopwatch {
    seen: Arc<Mutex<HashMap<String, Instant>>>,
}

impl ProjectionLogic for Stopwatch {
    fn name(&self) -> &str {
        "stopwatch"
    }

    async fn apply_batch(
        &self,
        _: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap();
        for event in events {
            seen.insert(event.identity(), now);
        }
        Ok(Vec::new())
    }
}

fn metadata() -> EventMetadata {
    EventMetadata {
        actor: "bench".into(),
        request_id: "bench".into(),
        recorded_at: Utc::now(),
    }
}

/// Appends one event for `user`; returns once it is committed.
async fn append(aggregates: &Aggregates, user: &UserId) {
    loop {
        let command = InboxCommand::ReadAll {
            user_id: user.clone(),
            now: Utc::now(),
        };
        match aggregates
            .inboxes
            .execute(user.as_str(), command, metadata())
            .await
        {
            Ok(()) => break,
            Err(cqrs_es::AggregateError::AggregateConflict) => continue,
            Err(err) => panic!("append failed: {err}"),
        }
    }
}

mod support;
use support::{numeric_args, percentile, ScratchDb};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = numeric_args();
    let events = *args.first().unwrap_or(&50_000);
    let rate = *args.get(1).unwrap_or(&500);
    let seconds = *args.get(2).unwrap_or(&10);

    let nats_url =
        std::env::var("PODIUM_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let db = ScratchDb::create(20).await?;
    let (pool, url) = (db.pool.clone(), db.url.clone());
    let bus = EventBus::connect(&nats_url, &format!("bench{}", &db.name[13..25])).await?;
    bus.ensure_streams(&Default::default()).await?;
    let aggregates = Arc::new(Aggregates::new(&pool));

    // 1. Relay throughput over a backlog.
    eprintln!("appending {events} events…");
    let started = Instant::now();
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let aggregates = aggregates.clone();
            tokio::spawn(async move {
                for i in 0..events / 16 {
                    let user =
                        UserId::parse(format!("u{}", (w * events / 16 + i) % 5_000)).unwrap();
                    append(&aggregates, &user).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await?;
    }
    let backlog = (events / 16) * 16;
    let append_rate = backlog as f64 / started.elapsed().as_secs_f64();
    let relay = Relay::new(pool.clone(), bus.clone(), RelayConfig::default());
    let relay_stats = relay.stats();
    let stop = CancellationToken::new();
    let relay_started = Instant::now();
    tokio::spawn(relay.run(stop.clone()));
    while relay_stats.seq.load(Ordering::Relaxed) < backlog {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relay_rate = backlog as f64 / relay_started.elapsed().as_secs_f64();

    // 2. Commit → consumer latency at a steady rate.
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let stopwatch = Stopwatch { seen: seen.clone() };
    // The consumer gets connections of its own, as `podium serve` gives its
    // workers: writers queueing for the pool must not starve it.
    let worker_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await?;
    let projection = Arc::new(PgProjection::new(Checkpointed::new(
        worker_pool.clone(),
        stopwatch,
    )));
    // Start the consumer at the head: skip the backlog.
    sqlx::query("INSERT INTO projection_checkpoints (name, seq) VALUES ('stopwatch', $1)")
        .bind(backlog as i64)
        .execute(&pool)
        .await?;
    let worker = Worker::new(bus.clone(), projection, WorkerConfig::default());
    let worker_stats = worker.stats();
    tokio::spawn(worker.run(stop.clone()));
    // Let the consumer pass over the backlog (acknowledged as repeats) first.
    while worker_stats.repeats.load(Ordering::Relaxed) < backlog {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Core-NATS tap on the event subjects: when each event left the relay.
    let relayed = Arc::new(Mutex::new(HashMap::new()));
    let mut tap = bus.client().subscribe(bus.subjects().all_events()).await?;
    let tap_seen = relayed.clone();
    tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(message) = tap.next().await {
            if let Ok(event) = serde_json::from_slice::<RecordedEvent>(&message.payload) {
                tap_seen
                    .lock()
                    .unwrap()
                    .insert(event.identity(), Instant::now());
            }
        }
    });
    let committed = Arc::new(Mutex::new(HashMap::new()));
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let begin = tokio::time::Instant::now();
    let mut sends = Vec::new();
    for i in 0..total {
        tokio::time::sleep_until(begin + interval * i as u32).await;
        let aggregates = aggregates.clone();
        let committed = committed.clone();
        sends.push(tokio::spawn(async move {
            let user = UserId::parse(format!("lat{i}")).unwrap();
            append(&aggregates, &user).await;
            committed
                .lock()
                .unwrap()
                .insert(format!("Inbox:lat{i}:1"), Instant::now());
        }));
    }
    for send in sends {
        send.await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < total as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let committed = committed.lock().unwrap().clone();
    let seen = seen.lock().unwrap().clone();
    let mut latencies: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, at)| seen.get(id).map(|got| got.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    let relayed = relayed.lock().unwrap().clone();
    let mut to_nats: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, at)| {
            relayed
                .get(id)
                .map(|got| got.saturating_duration_since(*at))
        })
        .collect();
    to_nats.sort();
    stop.cancel();

    println!(
        "fan-out benchmark ({} events backlog, {rate}/s for {seconds}s)",
        backlog
    );
    println!("append (16 writers, direct to the event store): {append_rate:.0} events/s");
    println!("relay throughput (backlog to JetStream acks):   {relay_rate:.0} events/s");
    println!(
        "commit → consumer latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {total} seen)",
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3,
        latencies.len(),
    );

    println!(
        "  of which commit → relayed on NATS: p50 {:.1} ms, p99 {:.1} ms",
        percentile(&to_nats, 0.50).as_secs_f64() * 1e3,
        percentile(&to_nats, 0.99).as_secs_f64() * 1e3,
    );

    eprintln!("worker: {worker_stats:?}");
    drop(pool);
    worker_pool.close().await;
    db.drop().await?;
    let js = bus.jetstream();
    js.delete_stream(bus.subjects().events_stream()).await?;
    js.delete_stream(bus.subjects().dead_letter_stream())
        .await?;
    Ok(())
}
