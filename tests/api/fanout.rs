//! The relay and the worker runtime against real Postgres and NATS.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use podium::command::Aggregates;
use podium::log::postgres::{any_after, LogCursor};
use podium::projector::PgProjection;
use podium::relay::{Relay, RelayConfig};
use podium_domain::log::{Change, RecordedEvent};
use podium_domain::notification::InboxCommand;
use podium_domain::{EventMetadata, UserId};
use podium_nats::{DeadLetterPolicy, Worker, WorkerConfig};
use podium_projections::{ApplyError, BoxError, Checkpointed, Fence, ProjectionLogic};
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::helpers::{poll, TestDb};
use crate::nats::{wait_until, PrivateNats, TestBus};

/// A projection that records every event it applies, in the order applied,
/// and can be told to fail on some seqs.
struct Recorder {
    /// seq → how many more times applying it fails (`u32::MAX`: always).
    failing: HashMap<u64, AtomicU32>,
}

impl Recorder {
    fn new() -> Self {
        Self {
            failing: HashMap::new(),
        }
    }

    fn failing(mut self, seq: u64, times: u32) -> Self {
        self.failing.insert(seq, AtomicU32::new(times));
        self
    }
}

async fn create_recording_table(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE recorded (
            applied_order bigserial PRIMARY KEY,
            seq bigint NOT NULL UNIQUE,
            identity text NOT NULL UNIQUE)",
    )
    .execute(pool)
    .await
    .unwrap();
}

impl ProjectionLogic for Recorder {
    fn name(&self) -> &str {
        "recorder"
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        let mut changes = Vec::new();
        for event in events {
            if let Some(left) = self.failing.get(&event.seq) {
                let failing = left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                        0 => None,
                        u32::MAX => Some(u32::MAX),
                        n => Some(n - 1),
                    })
                    .is_ok();
                if failing {
                    return Err(format!("recorder refuses seq {}", event.seq).into());
                }
            }
            sqlx::query("INSERT INTO recorded (seq, identity) VALUES ($1, $2)")
                .bind(event.seq as i64)
                .bind(event.identity())
                .execute(&mut *conn)
                .await?;
            changes.push(Change {
                topic: "recorder".into(),
                key: event.aggregate_id.clone(),
                seq: event.seq,
                data: serde_json::json!({"event_type": event.event_type}),
                prev: None,
            });
        }
        Ok(changes)
    }
}

fn metadata() -> EventMetadata {
    EventMetadata {
        actor: "writer".into(),
        request_id: "test".into(),
        recorded_at: Utc::now(),
    }
}

/// Appends `count` events through the real event store: "read all" on one of
/// `users` inboxes, so aggregates see concurrent writers; conflicts retry.
async fn append(aggregates: &Aggregates, writer: usize, count: usize, users: usize) {
    for i in 0..count {
        let user = UserId::parse(format!("user-{}", (writer * 7 + i) % users)).unwrap();
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
}

/// Every event of the log, read from Postgres from the start: what a replay sees.
/// The whole log in replay order, once `n` events are readable. The log is
/// read below the oldest transaction still open in the cluster (any
/// database's: other tests' too), so a moment may pass before the last
/// events committed here can be read.
async fn replay_order(pool: &PgPool, n: usize) -> Vec<(u64, String)> {
    poll(
        &format!("{n} events readable in replay order"),
        Duration::from_secs(30),
        || async {
            let all = read_log(pool).await;
            if all.len() >= n {
                Ok(all)
            } else {
                Err(all.len())
            }
        },
    )
    .await
}

/// What a reader can take now, from the start of the log: up to the
/// horizon, not waiting for what is held back behind it.
async fn read_log(pool: &PgPool) -> Vec<(u64, String)> {
    let mut conn = pool.acquire().await.unwrap();
    let mut cursor = LogCursor::start();
    let mut all = Vec::new();
    loop {
        let (events, next) = cursor.peek(&mut conn, 1000).await.unwrap();
        if events.is_empty() {
            return all;
        }
        all.extend(events.iter().map(|e| (e.seq, e.identity())));
        cursor = next;
    }
}

async fn recorded(pool: &PgPool) -> Vec<(i64, String)> {
    sqlx::query_as("SELECT seq, identity FROM recorded ORDER BY applied_order")
        .fetch_all(pool)
        .await
        .unwrap()
}

fn spawn_relay(
    db: &TestDb,
    bus: &TestBus,
    config: RelayConfig,
) -> (
    Arc<podium::relay::RelayStats>,
    tokio::task::JoinHandle<()>,
    DropGuard,
) {
    let relay = Relay::new(db.pool.clone(), bus.bus.clone(), config);
    let stats = relay.stats();
    let stop = CancellationToken::new();
    (
        stats,
        tokio::spawn(relay.run(stop.clone())),
        stop.drop_guard(),
    )
}

/// The relay's saved position (its seq), if any.
async fn relay_seq(pool: &PgPool) -> Option<i64> {
    sqlx::query_scalar("SELECT seq FROM relay_checkpoints")
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_lease_was_taken_over_saves_no_position() {
    let db = TestDb::new().await;
    let bus = TestBus::new().await;
    let aggregates = Aggregates::new(&db.pool);
    let (stats, _relay_task, _stop_relay) = spawn_relay(&db, &bus, RelayConfig::default());
    append(&aggregates, 0, 5, 5).await;
    poll(
        "the relay to save seq 5",
        Duration::from_secs(30),
        || async {
            match relay_seq(&db.pool).await {
                Some(5) => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    // Another instance takes the lead while this one still thinks it has it.
    let taken = sqlx::query(
        "UPDATE leases SET owner = 'another', token = token + 1,
                           expires_at = now() + interval '1 hour'
          WHERE name LIKE 'relay:%'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(taken.rows_affected(), 1);
    append(&aggregates, 0, 5, 5).await;
    poll(
        "the relay to step down",
        Duration::from_secs(30),
        || async {
            match stats.leader.load(Ordering::Relaxed) {
                false => Ok(()),
                true => Err("still leading"),
            }
        },
    )
    .await;
    assert_eq!(
        relay_seq(&db.pool).await,
        Some(5),
        "the position is the new leader's to save"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_writers_twenty_thousand_events_each_consumed_once_in_replay_order() {
    let db = TestDb::with_pool_size(12).await;
    let bus = TestBus::new().await;
    create_recording_table(&db.pool).await;
    let (_relay, _relay_task, _stop_relay) = spawn_relay(&db, &bus, RelayConfig::default());
    let projection = Arc::new(PgProjection::new(Checkpointed::new(
        db.pool.clone(),
        Recorder::new(),
    )));
    let worker = Worker::new(bus.bus.clone(), projection, WorkerConfig::default());
    let stats = worker.stats();
    let stop_worker = CancellationToken::new();
    let _stop_worker = stop_worker.clone().drop_guard();
    let worker_task = tokio::spawn(worker.run(stop_worker));

    let aggregates = Arc::new(Aggregates::new(&db.pool));
    let writers: Vec<_> = (0..16)
        .map(|writer| {
            let aggregates = aggregates.clone();
            tokio::spawn(async move { append(&aggregates, writer, 1250, 1000).await })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(db.event_count().await, 20_000);
    let written = std::time::Instant::now();
    let report = || {
        format!(
            "checkpoint {} applied {} repeats {} out-of-order {} retries {}",
            stats.checkpoint.load(Ordering::Relaxed),
            stats.applied.load(Ordering::Relaxed),
            stats.repeats.load(Ordering::Relaxed),
            stats.out_of_order.load(Ordering::Relaxed),
            stats.retries.load(Ordering::Relaxed),
        )
    };
    let caught_up = tokio::time::timeout(Duration::from_secs(120), async {
        while stats.checkpoint.load(Ordering::Relaxed) < 20_000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(caught_up.is_ok(), "the consumer fell behind: {}", report());
    eprintln!(
        "consumer caught up {:?} after the last write; {}",
        written.elapsed(),
        report()
    );
    assert!(!worker_task.is_finished());

    let recorded = recorded(&db.pool).await;
    let replay = replay_order(&db.pool, 20_000).await;
    assert_eq!(recorded.len(), 20_000);
    let recorded: Vec<(u64, String)> = recorded.into_iter().map(|(s, i)| (s as u64, i)).collect();
    // Applied in seq order 1..=20000, and the same order a replay reads.
    assert!(recorded
        .iter()
        .enumerate()
        .all(|(i, (seq, _))| *seq == i as u64 + 1));
    assert_eq!(recorded, replay);
    // Each aggregate's events arrive in their sequence order.
    let mut last_sequence: HashMap<String, u64> = HashMap::new();
    for (_, identity) in &recorded {
        let (aggregate, sequence) = identity.rsplit_once(':').unwrap();
        let sequence: u64 = sequence.parse().unwrap();
        let previous = last_sequence
            .insert(aggregate.to_string(), sequence)
            .unwrap_or(0);
        assert_eq!(sequence, previous + 1, "{identity}");
    }
    assert_eq!(bus.stream_messages().await, 20_000);
    // Read once from the stream: nothing passed over, nothing sent back.
    assert_eq!(stats.applied.load(Ordering::Relaxed), 20_000);
    assert_eq!(stats.out_of_order.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_stream_is_replaced_and_nothing_is_stored_twice() {
    let db = TestDb::new().await;
    let bus = TestBus::new().await;
    let aggregates = Aggregates::new(&db.pool);
    append(&aggregates, 0, 2_000, 50).await;
    let slow = RelayConfig {
        batch_size: 20,
        ..RelayConfig::default()
    };
    let (first, first_task, _stop_first) = spawn_relay(&db, &bus, slow.clone());
    wait_until(
        Duration::from_secs(30),
        "the first relay published some",
        || async { first.seq.load(Ordering::Relaxed) >= 200 },
    )
    .await;
    first_task.abort();
    let _ = first_task.await;
    assert!(
        first.seq.load(Ordering::Relaxed) < 2_000,
        "killed mid-stream"
    );
    // Rewind the checkpoint as if the kill had come between publish and
    // checkpoint for every batch: everything is published again.
    sqlx::query("DELETE FROM relay_checkpoints")
        .execute(&db.pool)
        .await
        .unwrap();
    let (second, _second_task, _stop_second) = spawn_relay(&db, &bus, slow);
    wait_until(
        Duration::from_secs(60),
        "the second relay caught up",
        || async { second.seq.load(Ordering::Relaxed) == 2_000 },
    )
    .await;
    assert!(second.published.load(Ordering::Relaxed) >= 2_000);
    assert_eq!(
        bus.stream_messages().await,
        2_000,
        "de-duplication by Nats-Msg-Id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_relays_one_publishes_and_the_standby_takes_over() {
    let db = TestDb::new().await;
    let bus = TestBus::new().await;
    let aggregates = Aggregates::new(&db.pool);
    let (a, a_task, _stop_a) = spawn_relay(&db, &bus, RelayConfig::default());
    let (b, b_task, _stop_b) = spawn_relay(&db, &bus, RelayConfig::default());
    wait_until(Duration::from_secs(10), "one relay leads", || async {
        a.leader.load(Ordering::Relaxed) || b.leader.load(Ordering::Relaxed)
    })
    .await;
    append(&aggregates, 0, 100, 10).await;
    wait_until(
        Duration::from_secs(30),
        "100 events are published and checkpointed",
        || async {
            a.seq
                .load(Ordering::Relaxed)
                .max(b.seq.load(Ordering::Relaxed))
                == 100
        },
    )
    .await;
    assert_eq!(bus.stream_messages().await, 100);
    let (leader, leader_task, standby) = if a.leader.load(Ordering::Relaxed) {
        (a, a_task, b)
    } else {
        (b, b_task, a)
    };
    assert!(!standby.leader.load(Ordering::Relaxed));
    assert_eq!(standby.published.load(Ordering::Relaxed), 0);
    assert_eq!(leader.published.load(Ordering::Relaxed), 100);

    leader_task.abort();
    let _ = leader_task.await;
    wait_until(
        Duration::from_secs(10),
        "the standby takes over",
        || async { standby.leader.load(Ordering::Relaxed) },
    )
    .await;
    append(&aggregates, 1, 100, 10).await;
    wait_until(
        Duration::from_secs(30),
        "the new leader publishes the rest",
        || async { standby.seq.load(Ordering::Relaxed) == 200 },
    )
    .await;
    assert_eq!(bus.stream_messages().await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_succeed_while_nats_is_down_and_every_event_arrives_after() {
    let mut nats = PrivateNats::start();
    let url = nats.url();
    let prefix = crate::nats::unique_prefix();
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.nats.nats_url = Some(url.clone());
        settings.nats.nats_prefix = prefix.clone();
    })
    .await;
    nats.stop();
    let admin = app.admin();
    for i in 0..20 {
        let body = serde_json::json!({"user_ids": [format!("u{i}")], "title": "Hi", "body": "NATS is down"});
        let response = app.post("/v1/notifications", &admin, Some(body)).await;
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    }
    assert_eq!(app.event_count().await, 20);
    nats.restart();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream_name = podium_nats::Subjects::new(&prefix).unwrap().events_stream();
    wait_until(
        Duration::from_secs(60),
        "all 20 events reach the stream",
        || async {
            match js.get_stream(&stream_name).await {
                Ok(mut stream) => stream
                    .info()
                    .await
                    .map(|i| i.state.messages == 20)
                    .unwrap_or(false),
                Err(_) => false,
            }
        },
    )
    .await;
}

async fn run_until_halted_or(
    db: &TestDb,
    bus: &TestBus,
    recorder: Recorder,
    policy: DeadLetterPolicy,
    done: impl Fn(u64) -> bool,
) -> Option<podium_nats::worker::WorkerError> {
    let projection = Arc::new(PgProjection::new(Checkpointed::new(
        db.pool.clone(),
        recorder,
    )));
    let config = WorkerConfig {
        max_failures: 3,
        backoff_base: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        policy,
        ..WorkerConfig::default()
    };
    let worker = Worker::new(bus.bus.clone(), projection, config);
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(worker.run(stop.clone()));
    let what = "the worker to halt or finish";
    poll(what, Duration::from_secs(60), || async {
        let checkpoint = stats.checkpoint.load(Ordering::Relaxed);
        if task.is_finished() || done(checkpoint) {
            Ok(())
        } else {
            Err(checkpoint)
        }
    })
    .await;
    stop.cancel();
    task.await.unwrap().err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_event_is_retried_dead_lettered_and_never_applied_twice_or_out_of_order() {
    let db = TestDb::new().await;
    let bus = TestBus::new().await;
    create_recording_table(&db.pool).await;
    let aggregates = Aggregates::new(&db.pool);
    append(&aggregates, 0, 30, 5).await;
    let (relay, _relay_task, _stop) = spawn_relay(&db, &bus, RelayConfig::default());
    wait_until(Duration::from_secs(30), "30 events are relayed", || async {
        relay.seq.load(Ordering::Relaxed) == 30
    })
    .await;
    let mut changes = bus
        .bus
        .client()
        .subscribe(bus.bus.subjects().all_changed("recorder"))
        .await
        .unwrap();

    // Seq 7 fails twice, then works; seq 12 always fails: the worker stops there.
    let recorder = Recorder::new().failing(7, 2).failing(12, u32::MAX);
    let halted = run_until_halted_or(&db, &bus, recorder, DeadLetterPolicy::Stop, |_| false).await;
    match halted {
        Some(podium_nats::worker::WorkerError::Halted { seq, attempts, .. }) => {
            assert_eq!((seq, attempts), (12, 3));
        }
        other => panic!("expected the worker to halt, got {other:?}"),
    }
    let applied: Vec<i64> = recorded(&db.pool).await.iter().map(|(s, _)| *s).collect();
    assert_eq!(applied, (1..=11).collect::<Vec<_>>());
    assert_eq!(bus.dead_letters().await, 1);
    let mut seen = HashSet::new();
    while seen.len() < 11 {
        let message = tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .expect("a change notification")
            .unwrap();
        let change: Change = serde_json::from_slice(&message.payload).unwrap();
        seen.insert(change.seq);
    }
    assert_eq!(seen, (1..=11).collect());

    // With the skip policy the event is dead-lettered again and passed over.
    let recorder = Recorder::new().failing(12, u32::MAX);
    let halted =
        run_until_halted_or(&db, &bus, recorder, DeadLetterPolicy::Skip, |c| c == 30).await;
    assert!(halted.is_none(), "{halted:?}");
    let applied: Vec<i64> = recorded(&db.pool).await.iter().map(|(s, _)| *s).collect();
    let expected: Vec<i64> = (1..=30).filter(|s| *s != 12).collect();
    assert_eq!(applied, expected);
    assert_eq!(bus.dead_letters().await, 2);
    let letter = bus
        .bus
        .jetstream()
        .get_stream(bus.bus.subjects().dead_letter_stream())
        .await
        .unwrap()
        .get_raw_message(1)
        .await
        .unwrap();
    let letter: serde_json::Value = serde_json::from_slice(&letter.payload).unwrap();
    assert_eq!(letter["seq"], 12);
    assert_eq!(letter["projection"], "recorder");
    assert!(letter["error"]
        .as_str()
        .unwrap()
        .contains("recorder refuses seq 12"));
}

#[tokio::test]
async fn a_restore_into_another_cluster_starts_a_new_epoch_that_sorts_last() {
    let db = TestDb::new().await;
    let aggregates = Aggregates::new(&db.pool);
    assert_eq!(
        podium::log::postgres::sync_epoch(&db.pool).await.unwrap(),
        1
    );
    append(&aggregates, 0, 3, 3).await;
    // Pretend the database was written by another cluster before.
    sqlx::query("UPDATE log_epoch SET system_identifier = 42")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        podium::log::postgres::sync_epoch(&db.pool).await.unwrap(),
        2
    );
    // Starting again on the same cluster keeps the epoch.
    assert_eq!(
        podium::log::postgres::sync_epoch(&db.pool).await.unwrap(),
        2
    );
    append(&aggregates, 1, 3, 3).await;
    let epochs: Vec<i32> = sqlx::query_scalar("SELECT epoch FROM events ORDER BY position")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(epochs, [1, 1, 1, 2, 2, 2]);
    let replay = replay_order(&db.pool, 6).await;
    assert_eq!(replay.len(), 6);
}

#[tokio::test]
async fn the_log_is_read_in_numeric_transaction_order() {
    let db = TestDb::new().await;
    // Rows of an earlier epoch are all readable; their transaction ids cross
    // a digit boundary, where text order ("10" before "9") would differ.
    for txid in ["100", "9", "10"] {
        sqlx::query(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                                 payload, metadata, epoch, txid)
             VALUES ('Inbox', $1, 1, 'AllNotificationsRead', '1.0', '{}', '{}', 0, $1::xid8)",
        )
        .bind(txid)
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let mut conn = db.pool.acquire().await.unwrap();
    // One event per read, so the cursor's key does the ordering too.
    let order: Vec<(u64, String)> = crate::helpers::whole_log(&mut conn, 1)
        .await
        .into_iter()
        .map(|event| (event.seq, event.aggregate_id))
        .collect();
    assert_eq!(
        order,
        [(1, "9".to_string()), (2, "10".into()), (3, "100".into())]
    );
    let all = crate::helpers::whole_log(&mut conn, 10).await;
    let ids: Vec<&str> = all.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert_eq!(ids, ["9", "10", "100"]);
}

#[tokio::test]
async fn a_test_too_large_for_one_message_is_refused_and_the_relay_goes_on() {
    let (app, _prefix) = crate::read_models::spawn_app_with_workers().await;
    // 500 questions with long prompts and choices: ~1.5 MB, under the 2 MiB
    // body limit, over what one NATS message carries.
    let questions: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({
                "id": format!("q{i}"),
                "prompt": "p".repeat(2_000),
                "choices": (0..4).map(|c| format!("{c}{}", "c".repeat(250))).collect::<Vec<_>>(),
                "answer": 0,
                "points": 1,
            })
        })
        .collect();
    let heavy = serde_json::json!({"title": "Heavy", "questions": questions});
    let size = serde_json::to_vec(&heavy).unwrap().len();
    assert!((1_000_000..2_000_000).contains(&size), "{size} bytes");
    let response = app.publish_test(heavy).await;
    let problem =
        crate::helpers::assert_problem(response, reqwest::StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem["errors"][0]["field"], "questions");
    assert_eq!(app.event_count().await, 0, "nothing was recorded");

    // Everything after it is relayed and projected as usual.
    let test_id = app.published_test().await;
    crate::queries::take(&app, &test_id, "ann", 10).await;
    crate::queries::settle_board(&app, &test_id, 1).await;
}

/// A projection that wants only the events of one aggregate type (none:
/// no event at all); it notes what it is handed in `handed`, with the
/// transaction it was handed in.
struct WantsOnly(Option<&'static str>);

/// The table [`WantsOnly`] writes to.
async fn create_handed(pool: &PgPool) {
    sqlx::query(
        "CREATE TABLE handed (seq bigint PRIMARY KEY, kind text NOT NULL, payload jsonb,
                              txid bigint NOT NULL DEFAULT txid_current())",
    )
    .execute(pool)
    .await
    .unwrap();
}

impl ProjectionLogic for WantsOnly {
    fn name(&self) -> &str {
        "wants-only"
    }

    fn wants(&self, aggregate_type: &str, _event_type: &str) -> bool {
        self.0 == Some(aggregate_type)
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        for event in events {
            sqlx::query("INSERT INTO handed (seq, kind, payload) VALUES ($1, $2, $3)")
                .bind(event.seq as i64)
                .bind(format!("{}.{}", event.aggregate_type, event.event_type))
                .bind(sqlx::types::Json(&event.payload))
                .execute(&mut *conn)
                .await?;
        }
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_projection_does_not_want_are_passed_over_undecoded_in_order() {
    let db = TestDb::new().await;
    let bus = TestBus::new().await;
    create_handed(&db.pool).await;
    let aggregates = Aggregates::new(&db.pool);
    append(&aggregates, 0, 40, 5).await;
    let (_relay, _relay_task, _stop) = spawn_relay(&db, &bus, RelayConfig::default());
    let projection = Arc::new(PgProjection::new(Checkpointed::new(
        db.pool.clone(),
        WantsOnly(None),
    )));
    let worker = Worker::new(bus.bus.clone(), projection, WorkerConfig::default());
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let _stop_worker = stop.clone().drop_guard();
    tokio::spawn(worker.run(stop));
    poll(
        "the checkpoint to pass every event",
        Duration::from_secs(30),
        || async {
            match stats.checkpoint.load(Ordering::Relaxed) {
                40 => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    // Each event once, in the log's order, with its type and no payload.
    let handed: Vec<(i64, String, serde_json::Value)> =
        sqlx::query_as("SELECT seq, kind, payload FROM handed ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    let log = crate::helpers::whole_log(&mut conn, 100).await;
    assert_eq!(log.len(), 40);
    let expected: Vec<(i64, String, serde_json::Value)> = log
        .iter()
        .map(|e| {
            let kind = format!("{}.{}", e.aggregate_type, e.event_type);
            (e.seq as i64, kind, serde_json::Value::Null)
        })
        .collect();
    assert_eq!(handed, expected);
    assert!(log.iter().all(|e| e.payload.get() != "null"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwanted_events_are_held_back_and_go_in_with_the_next_wanted_one() {
    let db = TestDb::new().await;
    let bus = TestBus::new().await;
    create_handed(&db.pool).await;
    let aggregates = Aggregates::new(&db.pool);
    let (_relay, _relay_task, _stop) = spawn_relay(&db, &bus, RelayConfig::default());
    let projection = Arc::new(PgProjection::new(Checkpointed::new(
        db.pool.clone(),
        WantsOnly(Some("Probe")),
    )));
    // Held back for as long as it takes, so that only a wanted event can
    // move the checkpoint.
    let hour = Duration::from_secs(3600);
    let config = WorkerConfig {
        hold_quiet: hour,
        hold_max: hour,
        ..WorkerConfig::default()
    };
    let worker = Worker::new(bus.bus.clone(), projection, config);
    let stats = worker.stats();
    let stop = CancellationToken::new();
    let _stop_worker = stop.clone().drop_guard();
    tokio::spawn(worker.run(stop));
    // Twelve events it does not want, each from a command of its own.
    append(&aggregates, 0, 12, 5).await;
    poll(
        "the worker to hold back all 12",
        Duration::from_secs(30),
        || async {
            match stats.held.load(Ordering::Relaxed) {
                12 => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    assert_eq!(stats.checkpoint.load(Ordering::Relaxed), 0);
    let handed: i64 = sqlx::query_scalar("SELECT count(*) FROM handed")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(handed, 0, "nothing was applied yet");

    // One it wants: the twelve go in with it, in one transaction, in order.
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('Probe', 'p', 1, 'Pinged', '1.0', '{\"n\": 1}', '{}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    poll(
        "the checkpoint to pass all 13",
        Duration::from_secs(30),
        || async {
            match stats.checkpoint.load(Ordering::Relaxed) {
                13 => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    let rows: Vec<(i64, String, Option<serde_json::Value>, i64)> =
        sqlx::query_as("SELECT seq, kind, payload, txid FROM handed ORDER BY seq")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let seqs: Vec<i64> = rows.iter().map(|r| r.0).collect();
    assert_eq!(seqs, (1..=13).collect::<Vec<_>>());
    let transactions: HashSet<i64> = rows.iter().map(|r| r.3).collect();
    assert_eq!(transactions.len(), 1, "one transaction for all: {rows:?}");
    assert!(rows[..12]
        .iter()
        .all(|r| r.1 == "Inbox.AllNotificationsRead" && r.2 == Some(serde_json::Value::Null)));
    assert_eq!(rows[12].1, "Probe.Pinged");
    assert_eq!(rows[12].2, Some(serde_json::json!({"n": 1})));
    assert_eq!(stats.held.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_batch_commits_only_while_its_projection_lease_is_held() {
    let db = TestDb::new().await;
    create_handed(&db.pool).await;
    sqlx::query(
        "INSERT INTO leases (name, owner, token, expires_at)
         VALUES ('wants-only', 'this', 7, now() + interval '1 hour')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let fence = Fence::new("wants-only");
    let projection = Checkpointed::new(db.pool.clone(), WantsOnly(None)).fenced_by(fence.clone());
    let event = |seq| RecordedEvent::passed_over(seq, "Inbox", "AllNotificationsRead");
    let fenced = |result: Result<(u64, Vec<Change>), ApplyError>| matches!(result, Err(ApplyError::Fenced { lease }) if lease == "wants-only");
    assert!(
        fenced(projection.apply(&[event(1)]).await),
        "not acquired yet"
    );
    fence.set_token(7);
    assert_eq!(projection.apply(&[event(1)]).await.unwrap().0, 1);
    // Another instance takes the lease over: this one's next batch commits
    // nothing.
    sqlx::query("UPDATE leases SET owner = 'other', token = 8")
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(fenced(projection.apply(&[event(2)]).await));
    assert_eq!(projection.checkpoint().await.unwrap(), 1);
    let handed: Vec<i64> = sqlx::query_scalar("SELECT seq FROM handed ORDER BY seq")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(handed, [1]);
}

/// Inserts one event of its own (`id`) through `conn`.
async fn insert_event(conn: &mut PgConnection, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version,
                             payload, metadata)
         VALUES ('Inbox', $1, 1, 'AllNotificationsRead', '1.0', '{}', '{}')",
    )
    .bind(id)
    .execute(conn)
    .await
    .map(drop)
}

/// The ids of the events a reader can take now, from the start of the log.
async fn readable(pool: &PgPool) -> Vec<String> {
    read_log(pool)
        .await
        .into_iter()
        .map(|(_, identity)| identity)
        .collect()
}

/// Waits until a reader from the start of the log takes exactly `expected`.
async fn until_readable(pool: &PgPool, what: &str, expected: &[&str]) {
    poll(what, Duration::from_secs(30), || async {
        let read = readable(pool).await;
        if read == expected {
            Ok(())
        } else {
            Err(read)
        }
    })
    .await;
}

/// A transaction that said first that it writes no events (a read model's
/// batch, a rebuild) holds no reader of the log back, however long it
/// runs; one that did not say so still does, until it ends.
#[tokio::test]
async fn a_transaction_that_writes_no_events_holds_no_reader_back() {
    let db = TestDb::new().await;
    let mut apart = podium_projections::begin_writing_no_events(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO projection_checkpoints (name, seq) VALUES ('apart', 1)")
        .execute(&mut *apart)
        .await
        .unwrap();
    insert_event(&mut db.pool.acquire().await.unwrap(), "first")
        .await
        .unwrap();
    // Other databases' transactions may hold the log back for a moment
    // (those whose locks do not show which database they are in); the one
    // open here, never.
    until_readable(
        &db.pool,
        "the event committed after the open transaction is readable",
        &["Inbox:first:1"],
    )
    .await;
    // A transaction that writes without saying so holds the horizon.
    let mut holding = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO projection_checkpoints (name, seq) VALUES ('holding', 1)")
        .execute(&mut *holding)
        .await
        .unwrap();
    insert_event(&mut db.pool.acquire().await.unwrap(), "second")
        .await
        .unwrap();
    assert_eq!(readable(&db.pool).await, ["Inbox:first:1"]);
    holding.commit().await.unwrap();
    until_readable(
        &db.pool,
        "the second event is readable once the transaction before it ended",
        &["Inbox:first:1", "Inbox:second:1"],
    )
    .await;
    apart.rollback().await.unwrap();
}

/// A transaction in the middle of an `INSERT ... ON CONFLICT` (a speculative
/// insertion: the notification policy's upserts) still holds readers back.
/// The lock that insertion takes shows its transaction id in `pg_locks`'
/// database column, and was once read as "in another database, so it
/// cannot write this log's events": the relay then passed over the
/// policy's notifications.
#[tokio::test]
async fn a_transaction_in_a_speculative_insertion_still_holds_readers_back() {
    let db = TestDb::new().await;
    // An index that takes seconds per row: an insert stays inside its
    // speculative insertion (between taking its token and releasing it)
    // that long.
    sqlx::raw_sql(
        "CREATE FUNCTION slowly(bigint) RETURNS bigint LANGUAGE plpgsql IMMUTABLE AS
             $$ BEGIN PERFORM pg_sleep(5); RETURN $1; END $$;
         CREATE TABLE slow (id bigint PRIMARY KEY);
         CREATE INDEX ON slow (slowly(id));",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut writer = db.pool.begin().await.unwrap();
    insert_event(&mut writer, "held").await.unwrap();
    let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut *writer)
        .await
        .unwrap();
    let inserting = tokio::spawn(async move {
        sqlx::query("INSERT INTO slow VALUES (1) ON CONFLICT DO NOTHING")
            .execute(&mut *writer)
            .await
            .unwrap();
        writer.rollback().await.unwrap();
    });
    let speculating = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'spectoken' AND pid = $1)",
        )
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    poll(
        "the speculative insertion under way",
        Duration::from_secs(30),
        || async { speculating().await.then_some(()).ok_or("not yet") },
    )
    .await;
    insert_event(&mut db.pool.acquire().await.unwrap(), "after")
        .await
        .unwrap();
    let read = readable(&db.pool).await;
    assert!(speculating().await, "the insertion outlasted the read");
    assert_eq!(read, Vec::<String>::new(), "read past a running writer");
    inserting.await.unwrap();
    until_readable(
        &db.pool,
        "the later event readable once the writer rolled back",
        &["Inbox:after:1"],
    )
    .await;
}

/// Saying it late, or writing an event after saying it, is refused: either
/// would let a reader pass an event that commits later.
#[tokio::test]
async fn a_transaction_that_said_it_writes_no_events_cannot_write_one() {
    let db = TestDb::new().await;
    let mut apart = podium_projections::begin_writing_no_events(&db.pool)
        .await
        .unwrap();
    let refused = insert_event(&mut apart, "apart").await.unwrap_err();
    assert!(
        refused.to_string().contains("writes no events"),
        "{refused}"
    );
    drop(apart);
    let mut late = db.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO projection_checkpoints (name, seq) VALUES ('late', 1)")
        .execute(&mut *late)
        .await
        .unwrap();
    let refused = sqlx::query("SELECT podium_writes_no_events()")
        .execute(&mut *late)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("must come before"),
        "{refused}"
    );
    drop(late);
    assert_eq!(db.event_count().await, 0);
    // Outside such a transaction, events are written as ever.
    insert_event(&mut db.pool.acquire().await.unwrap(), "plain")
        .await
        .unwrap();
    assert_eq!(db.event_count().await, 1);
}

/// A reader tailing the log while event writers commit late (each holds its
/// transaction open a while after inserting) and transactions that write no
/// events come and go reads every event once, in the order a reader from the
/// start reads them afterwards: passing over the transactions that write no
/// events never passes over a late event. Half the writers insert as the
/// notification policy does, many rows at once with `ON CONFLICT DO
/// NOTHING`: the speculative-insertion locks that takes name no database in
/// `pg_locks`, and once made the horizon pass over such a writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tailing_reader_misses_no_late_event_among_transactions_that_write_none() {
    const WRITERS: usize = 4;
    const TRANSACTIONS_EACH: usize = 150;
    /// Events in each transaction of a writer that inserts many at once.
    const MANY: usize = 20;
    const APART: usize = 3;
    let events = WRITERS / 2 * TRANSACTIONS_EACH * (1 + MANY);
    let db = TestDb::with_pool_size(WRITERS as u32 + APART as u32 + 3).await;
    let done = CancellationToken::new();
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let pool = db.pool.clone();
            tokio::spawn(async move {
                for i in 0..TRANSACTIONS_EACH {
                    let mut tx = pool.begin().await.unwrap();
                    if writer % 2 == 0 {
                        insert_event(&mut tx, &format!("w{writer}-{i}"))
                            .await
                            .unwrap();
                    } else {
                        sqlx::query(
                            "INSERT INTO events (aggregate_type, aggregate_id, sequence,
                                                 event_type, event_version, payload, metadata)
                             SELECT 'Inbox', $1 || n, 1, 'AllNotificationsRead', '1.0', '{}', '{}'
                               FROM generate_series(1, $2) AS n
                             ON CONFLICT DO NOTHING",
                        )
                        .bind(format!("w{writer}-{i}-"))
                        .bind(MANY as i32)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    }
                    // Committed late: readers must wait for it.
                    let hold = (writer * 7 + i * 3) % 5;
                    tokio::time::sleep(Duration::from_millis(hold as u64)).await;
                    tx.commit().await.unwrap();
                }
            })
        })
        .collect();
    let apart: Vec<_> = (0..APART)
        .map(|n| {
            let pool = db.pool.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut i = 0u64;
                while !done.is_cancelled() {
                    let mut tx = podium_projections::begin_writing_no_events(&pool)
                        .await
                        .unwrap();
                    sqlx::query(
                        "INSERT INTO projection_checkpoints (name, seq) VALUES ($1, 0)
                         ON CONFLICT (name) DO UPDATE SET seq = projection_checkpoints.seq + 1",
                    )
                    .bind(format!("apart-{n}"))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                    // Long next to the writers' transactions.
                    tokio::time::sleep(Duration::from_millis(10 + (i % 4) * 10)).await;
                    tx.commit().await.unwrap();
                    i += 1;
                }
            })
        })
        .collect();
    let written = CancellationToken::new();
    let tailer = {
        let pool = db.pool.clone();
        let written = written.clone();
        tokio::spawn(async move {
            let mut conn = pool.acquire().await.unwrap();
            let mut cursor = LogCursor::start();
            let mut tailed = Vec::new();
            loop {
                // Whether every writer had committed before this read.
                let finished = written.is_cancelled();
                let (events, next) = cursor.peek(&mut conn, 50).await.unwrap();
                tailed.extend(events.iter().map(|e| (e.seq, e.identity())));
                cursor = next;
                if events.is_empty() {
                    // At the end of the log for good: what was passed over
                    // is missing from `tailed`.
                    if finished && !any_after(&mut conn, &cursor.key).await.unwrap() {
                        return tailed;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    written.cancel();
    let tailed = tokio::time::timeout(Duration::from_secs(120), tailer)
        .await
        .expect("the tailer reached the end of the log")
        .unwrap();
    done.cancel();
    for task in apart {
        task.await.unwrap();
    }
    let replay = replay_order(&db.pool, events).await;
    assert_eq!(
        tailed.len(),
        replay.len(),
        "events passed over by the tailer"
    );
    assert_eq!(tailed, replay);
}

/// A logic that writes events, as the notification policy does: it reads,
/// then waits at a gate the test opens, then writes one event of its own.
struct Gated {
    reached: Arc<tokio::sync::Notify>,
    open: Arc<tokio::sync::Notify>,
}

impl ProjectionLogic for Gated {
    fn name(&self) -> &str {
        "gated"
    }

    fn writes_events(&self) -> bool {
        true
    }

    async fn apply_batch(
        &self,
        conn: &mut PgConnection,
        events: &[RecordedEvent],
    ) -> Result<Vec<Change>, BoxError> {
        sqlx::query("SELECT count(*) FROM events")
            .execute(&mut *conn)
            .await?;
        self.reached.notify_one();
        self.open.notified().await;
        let last = events.last().map_or(0, |e| e.seq);
        insert_event(conn, &format!("gated-{last}")).await?;
        Ok(Vec::new())
    }
}

/// A [`Gated`] batch of events 1 and 2 running in a task of its own, held
/// at its gate: the test does what it will there, then opens it.
struct HeldBatch {
    open: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<Result<(u64, Vec<Change>), ApplyError>>,
}

async fn hold_a_batch(projection: Arc<Checkpointed<Gated>>) -> HeldBatch {
    let (reached, open) = (
        projection.logic().reached.clone(),
        projection.logic().open.clone(),
    );
    let task = tokio::spawn(async move {
        let events: Vec<RecordedEvent> = (1..=2)
            .map(|seq| RecordedEvent::passed_over(seq, "Attempt", "AttemptStarted"))
            .collect();
        projection.apply(&events).await
    });
    tokio::time::timeout(Duration::from_secs(30), reached.notified())
        .await
        .expect("the batch reaches its gate");
    HeldBatch { open, task }
}

impl HeldBatch {
    async fn finish(self) -> Result<(u64, Vec<Change>), ApplyError> {
        self.open.notify_one();
        self.task.await.unwrap()
    }
}

fn gated(db: &TestDb) -> Arc<Checkpointed<Gated>> {
    Arc::new(Checkpointed::new(
        db.pool.clone(),
        Gated {
            reached: Arc::default(),
            open: Arc::default(),
        },
    ))
}

/// A batch that writes events (the notification policy's) holds readers of
/// the log back only from its first write: while it reads and decides,
/// events committed by others are readable at once.
#[tokio::test]
async fn a_batch_that_writes_events_holds_no_reader_back_before_it_writes() {
    let db = TestDb::new().await;
    let projection = gated(&db);
    let held = hold_a_batch(projection.clone()).await;
    insert_event(&mut db.pool.acquire().await.unwrap(), "meanwhile")
        .await
        .unwrap();
    until_readable(
        &db.pool,
        "an event committed while the batch reads is readable",
        &["Inbox:meanwhile:1"],
    )
    .await;
    assert_eq!(held.finish().await.unwrap().0, 2);
    assert_eq!(projection.checkpoint().await.unwrap(), 2);
    until_readable(
        &db.pool,
        "the batch's own event follows",
        &["Inbox:meanwhile:1", "Inbox:gated-2:1"],
    )
    .await;
}

/// Such a batch reads its checkpoint without a lock, so it checks at the
/// end that the checkpoint is still where it was and the lease still its
/// owner's: if not, nothing of it commits, its events included.
#[tokio::test]
async fn a_batch_that_writes_events_commits_nothing_once_its_checkpoint_moved_or_lease_went() {
    let db = TestDb::new().await;
    let projection = gated(&db);
    let held = hold_a_batch(projection.clone()).await;
    // Another applier moves the checkpoint meanwhile.
    sqlx::query("INSERT INTO projection_checkpoints (name, seq) VALUES ('gated', 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    match held.finish().await {
        Err(ApplyError::Gap { checkpoint: 1 }) => {}
        other => panic!("expected a gap at 1, got {other:?}"),
    }
    assert_eq!(projection.checkpoint().await.unwrap(), 1);
    assert_eq!(
        db.event_count().await,
        0,
        "the batch's event was not committed"
    );

    // A fenced one whose lease changes hands meanwhile.
    sqlx::query(
        "INSERT INTO leases (name, owner, token, expires_at)
         VALUES ('gated', 'this', 3, now() + interval '1 hour')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let fence = Fence::new("gated");
    fence.set_token(3);
    let fenced = Arc::new(
        Checkpointed::new(
            db.pool.clone(),
            Gated {
                reached: Arc::default(),
                open: Arc::default(),
            },
        )
        .fenced_by(fence),
    );
    sqlx::query("UPDATE projection_checkpoints SET seq = 0")
        .execute(&db.pool)
        .await
        .unwrap();
    let held = hold_a_batch(fenced.clone()).await;
    sqlx::query("UPDATE leases SET owner = 'another', token = 4")
        .execute(&db.pool)
        .await
        .unwrap();
    match held.finish().await {
        Err(ApplyError::Fenced { lease }) => assert_eq!(lease, "gated"),
        other => panic!("expected to be fenced, got {other:?}"),
    }
    assert_eq!(fenced.checkpoint().await.unwrap(), 0);
    assert_eq!(
        db.event_count().await,
        0,
        "the batch's event was not committed"
    );
}

/// A notification policy far behind the log reads the log itself, from its
/// checkpoint, before its worker starts (`CatchUp`): with no relay and no
/// NATS, the backlog's notifications are all there, each once, exactly
/// what the policy decides over the log in memory; a catch-up that finds
/// it close to the head does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_far_behind_reads_the_log_itself_from_its_checkpoint() {
    use crate::helpers::{notifications_created, policy_decisions};
    use podium::command::policy::NotificationPolicy;
    use podium::projector::operations::CatchUp;
    use podium_nats::Projection;

    let db = TestDb::new().await;
    let seeded = crate::helpers::seed_log(&db.pool, 6_000).await;
    let aggregates = Arc::new(Aggregates::new(&db.pool));
    let policy = PgProjection::new(Checkpointed::new(
        db.pool.clone(),
        NotificationPolicy::new(aggregates),
    ));
    // What it decides over the seeded log, in memory.
    let (expected, submissions) = policy_decisions(&db.pool, seeded).await;
    assert_eq!(submissions, 6_000);
    let mut reader = db.pool.acquire().await.unwrap();
    let log = crate::helpers::whole_log(&mut reader, 2_345).await;
    // The first part of the log through the worker's path: the catch-up
    // starts from a checkpoint inside the log, not from its start.
    policy.apply(&log[..2_345]).await.unwrap();
    let stop = CancellationToken::new();
    let no_relay = |rebuild_from| CatchUp {
        relay: "nothing-relays-this".into(),
        rebuild_from,
    };
    // Not far enough behind: left to the worker.
    no_relay(1_000_000)
        .run(&db.pool, &policy, "this-instance", &stop)
        .await;
    assert_eq!(policy.checkpoint().await.unwrap(), 2_345);

    no_relay(1_000)
        .run(&db.pool, &policy, "this-instance", &stop)
        .await;
    let (created, sources) = notifications_created(&db.pool).await;
    assert_eq!(created as usize, expected, "every notification, once");
    assert_eq!(sources, 6_000, "every submission notified");
    // It read on past the seeded log, through its own notifications (passed
    // over), to the head as it stood when it first came there: at most the
    // notifications of its last batch are left to its worker (all of them,
    // unless another test's DROP DATABASE held the log back meanwhile).
    let total = db.event_count().await as u64;
    assert_eq!(total, seeded + created as u64);
    let checkpoint = policy.checkpoint().await.unwrap();
    assert!(
        seeded < checkpoint && checkpoint <= total,
        "at {checkpoint} of {total}"
    );

    // A takeover at the head: nothing new.
    no_relay(1_000)
        .run(&db.pool, &policy, "another-instance", &stop)
        .await;
    assert_eq!(notifications_created(&db.pool).await, (created, sources));
    let after = policy.checkpoint().await.unwrap();
    assert!(
        checkpoint <= after && after <= total,
        "at {after} of {total}"
    );
}

/// Event `seq` of a made-up log, its payload `bytes` long or so.
fn made_up(seq: u64, bytes: usize) -> RecordedEvent {
    RecordedEvent {
        seq,
        position: seq as i64,
        aggregate_type: "Probe".into(),
        aggregate_id: format!("probe-{seq}"),
        sequence: 1,
        event_type: "Probed".into(),
        event_version: "1.0".into(),
        payload: podium_domain::log::payload_of(&serde_json::json!({"pad": "x".repeat(bytes)})),
        metadata: HashMap::new(),
        recorded_at: Utc::now(),
    }
}

/// The log seqs on the events stream, in stream order (`None`: a message
/// that carries none).
async fn stream_seqs(bus: &TestBus) -> Vec<Option<u64>> {
    let mut stream = bus.bus.events_stream().await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut seqs = Vec::new();
    for n in 1..=last {
        let message = stream.get_raw_message(n).await.unwrap();
        seqs.push(podium_nats::bus::seq_header(&message.headers));
    }
    seqs
}

/// Publishes `event` as another relay would, acknowledged, under the
/// de-duplication id `msg_id`.
async fn publish_as_another(bus: &TestBus, event: &RecordedEvent, msg_id: &str) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
    headers.insert(podium_nats::bus::SEQ_HEADER, event.seq.to_string().as_str());
    let subject = bus
        .bus
        .subjects()
        .event(&event.aggregate_type, &event.event_type);
    let payload = serde_json::to_vec(event).unwrap();
    bus.bus
        .jetstream()
        .publish_with_headers(subject, headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Publishes `events` after those `last` says, and returns what it says
/// then: the identity of the batch's last event if that ends the stream.
async fn published(
    bus: &TestBus,
    events: &[RecordedEvent],
    last: &mut Option<String>,
) -> Option<String> {
    bus.bus.publish_events(events, last).await.unwrap();
    last.clone()
}

/// Batches after the first go with one acknowledgement, each message
/// stored only right after the event before it. Whatever breaks that chain
/// (a message the stream refuses, another publisher's message in between)
/// sends the batch again event by event: the stream never misses an event
/// of a batch said to be published, and holds each once.
#[tokio::test]
async fn batches_published_with_one_acknowledgement_miss_nothing_when_the_chain_breaks() {
    let bus = TestBus::new().await;
    let events: Vec<RecordedEvent> = (1..=45)
        .map(|seq| made_up(seq, if seq == 23 { 4_000 } else { 10 }))
        .collect();
    let batch = |from: usize, to: usize| &events[from - 1..to];
    // The identity of event `seq`, as `last` holds it.
    let id = |seq: usize| Some(events[seq - 1].identity());
    let mut last = None;

    // The first batch goes event by event, the second chained to it.
    assert_eq!(published(&bus, batch(1, 10), &mut last).await, id(10));
    assert_eq!(published(&bus, batch(11, 20), &mut last).await, id(20));
    let expected: Vec<Option<u64>> = (1..=20).map(Some).collect();
    assert_eq!(stream_seqs(&bus).await, expected);

    // The stream refuses event 23 (too large for it): the events after it
    // in the batch are chained to it and refused too, the batch is sent
    // again event by event, and the refusal is reported, not passed over.
    let name = bus.bus.subjects().events_stream();
    let mut config = bus
        .bus
        .events_stream()
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    let limit = config.max_message_size;
    config.max_message_size = 2_000;
    bus.bus.jetstream().update_stream(&config).await.unwrap();
    let refused = bus.bus.publish_events(batch(21, 25), &mut last).await;
    assert!(refused.is_err(), "a refused event must fail the batch");
    assert_eq!(last, None);
    config.max_message_size = limit;
    bus.bus.jetstream().update_stream(&config).await.unwrap();
    // Event 25 was on the stream already: the stream ends with event 23.
    assert_eq!(published(&bus, batch(21, 25), &mut last).await, None);

    // Another relay stores event 33 ahead of its time. Sent event by event,
    // 26 to 30 follow it; 31 to 35 are chained to 30, and 33 among them is
    // a duplicate that breaks the chain: the batch goes again event by event.
    let ahead = &events[33 - 1];
    publish_as_another(&bus, ahead, &ahead.identity()).await;
    assert_eq!(published(&bus, batch(26, 30), &mut last).await, id(30));
    assert_eq!(published(&bus, batch(31, 35), &mut last).await, id(35));

    // Another relay's message lands after event 35 (one that lost the lead
    // sends an old event again, after the de-duplication window): the next
    // batch, chained to 35, goes again event by event; the one after it is
    // chained to that.
    publish_as_another(&bus, &events[5 - 1], "late-copy").await;
    assert_eq!(published(&bus, batch(36, 40), &mut last).await, id(40));
    assert_eq!(published(&bus, batch(41, 45), &mut last).await, id(45));

    let mut expected: Vec<Option<u64>> = (1..=22).map(Some).collect();
    expected.extend([24, 25, 23, 33].map(Some));
    expected.extend((26..=32).map(Some));
    expected.extend([34, 35, 5].map(Some));
    expected.extend((36..=45).map(Some));
    assert_eq!(stream_seqs(&bus).await, expected, "stream {name}");
}
