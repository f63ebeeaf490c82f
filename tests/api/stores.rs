//! Property test of the Postgres read-model stores: for random sequences of
//! submissions and notifications, applying them incrementally in random
//! batches (as the workers do) gives the same read models as a full replay
//! into fresh tables, and both match the rules applied directly.

use podium_domain::collection::CollectionEvent;
use podium_projections::collections;
use podium_projections::windows::{self, Window};
use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeDelta, Utc};
use podium_domain::attempt::AttemptEvent;
use podium_domain::log::RecordedEvent;
use podium_domain::notification::{
    InboxEvent, NotificationContent, NotificationEvent, NotificationKind, NotificationMessage,
};
use podium_domain::UserId;
use podium_projections::feed::FeedProjection;
use podium_projections::leaderboard::LeaderboardProjection;
use podium_projections::{Checkpointed, Generation};
use proptest::prelude::*;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::TestDb;

#[derive(Debug, Clone)]
enum Op {
    Submit {
        user: u8,
        test: u8,
        score: u32,
    },
    Notify {
        user: u8,
    },
    Read {
        user: u8,
        nth: usize,
    },
    ReadAll {
        user: u8,
    },
    /// The test joins the collection (created with it if it is the first).
    Join {
        test: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..5, 0u8..3, 0u32..6).prop_map(|(user, test, score)| Op::Submit { user, test, score }),
        1 => (0u8..3).prop_map(|test| Op::Join { test }),
        2 => (0u8..5).prop_map(|user| Op::Notify { user }),
        1 => (0u8..5, 0usize..4).prop_map(|(user, nth)| Op::Read { user, nth }),
        1 => (0u8..5).prop_map(|user| Op::ReadAll { user }),
    ]
}

fn at(seq: u64) -> DateTime<Utc> {
    DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(seq as i64)
}

fn recorded<E: Serialize>(seq: u64, aggregate: &str, event_type: &str, event: &E) -> RecordedEvent {
    RecordedEvent {
        seq,
        position: seq as i64,
        aggregate_type: aggregate.into(),
        aggregate_id: format!("agg-{seq}"),
        sequence: 1,
        event_type: event_type.into(),
        event_version: "1.0".into(),
        payload: podium_domain::log::payload_of(&event),
        metadata: HashMap::new(),
        recorded_at: at(seq),
    }
}

/// The log an op sequence writes, and the rules' answers computed alongside.
struct Expected {
    events: Vec<RecordedEvent>,
    /// (test, user) → (best, first reached, attempts)
    best: BTreeMap<(Uuid, String), (i32, DateTime<Utc>, i32)>,
    /// notification id → (user, read)
    items: BTreeMap<Uuid, (String, bool)>,
}

fn log_of(ops: &[Op]) -> Expected {
    let tests = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
    let collection = Uuid::from_u128(77);
    let mut members: Vec<Uuid> = Vec::new();
    let mut expected = Expected {
        events: Vec::new(),
        best: BTreeMap::new(),
        items: BTreeMap::new(),
    };
    let mut received: HashMap<String, Vec<Uuid>> = HashMap::new();
    for op in ops {
        let seq = expected.events.len() as u64 + 1;
        let event = match op {
            Op::Submit { user, test, score } => {
                let user = format!("u{user}");
                let test_id = tests[*test as usize];
                // On the test's board and on its day's, week's and month's.
                for window in [Window::All, Window::Day, Window::Week, Window::Month] {
                    let board = windows::board_at(test_id, window, at(seq));
                    let entry = expected.best.entry((board, user.clone())).or_insert((
                        *score as i32,
                        at(seq),
                        0,
                    ));
                    if *score as i32 > entry.0 {
                        *entry = (*score as i32, at(seq), entry.2);
                    }
                    entry.2 += 1;
                }
                let event = AttemptEvent::AttemptSubmitted {
                    attempt_id: Uuid::from_u128(1000 + seq as u128),
                    test_id,
                    user_id: UserId::parse(user).unwrap(),
                    answers: BTreeMap::new(),
                    score: *score,
                    max_score: 5,
                    correct: *score,
                    question_count: 5,
                    duration_ms: 1000,
                    submitted_at: at(seq),
                };
                recorded(seq, "Attempt", "AttemptSubmitted", &event)
            }
            Op::Notify { user } => {
                let user = format!("u{user}");
                let id = Uuid::from_u128(5000 + seq as u128);
                expected.items.insert(id, (user.clone(), false));
                received.entry(user.clone()).or_default().push(id);
                let message = NotificationMessage::new(
                    NotificationKind::Announcement,
                    "t".into(),
                    "b".into(),
                    None,
                )
                .unwrap();
                let event = NotificationEvent::NotificationCreated {
                    notification_id: id,
                    content: NotificationContent {
                        recipient: UserId::parse(user).unwrap(),
                        message,
                    },
                    created_at: at(seq),
                };
                recorded(seq, "Notification", "NotificationCreated", &event)
            }
            Op::Read { user, nth } => {
                let user = format!("u{user}");
                let Some(id) = received.get(&user).and_then(|ids| ids.get(*nth)).copied() else {
                    continue;
                };
                expected.items.get_mut(&id).unwrap().1 = true;
                let event = NotificationEvent::NotificationRead {
                    notification_id: id,
                    recipient: UserId::parse(user).unwrap(),
                    read_at: at(seq),
                };
                recorded(seq, "Notification", "NotificationRead", &event)
            }
            Op::Join { test } => {
                let test_id = tests[*test as usize];
                if members.contains(&test_id) {
                    continue;
                }
                members.push(test_id);
                if members.len() == 1 {
                    let event = CollectionEvent::CollectionCreated {
                        collection_id: collection,
                        title: "c".into(),
                        test_ids: vec![test_id],
                    };
                    recorded(seq, "Collection", "CollectionCreated", &event)
                } else {
                    let event = CollectionEvent::CollectionTestAdded {
                        collection_id: collection,
                        test_id,
                    };
                    recorded(seq, "Collection", "CollectionTestAdded", &event)
                }
            }
            Op::ReadAll { user } => {
                let user = format!("u{user}");
                for id in received.get(&user).into_iter().flatten() {
                    expected.items.get_mut(id).unwrap().1 = true;
                }
                let event = InboxEvent::AllNotificationsRead {
                    user_id: UserId::parse(user).unwrap(),
                    read_at: at(seq),
                };
                recorded(seq, "Inbox", "AllNotificationsRead", &event)
            }
        };
        expected.events.push(event);
    }
    // The collection's boards: for each period and user, the running sum
    // over its (final) tests of the user's best, dated by the submission that
    // last raised it (the first one while it is 0), with the tests taken.
    type Running = (HashMap<Uuid, u32>, i32, DateTime<Utc>);
    let mut sums: BTreeMap<(Uuid, String), Running> = BTreeMap::new();
    for event in &expected.events {
        let Ok(AttemptEvent::AttemptSubmitted {
            test_id,
            user_id,
            score,
            submitted_at,
            ..
        }) = serde_json::from_str(event.payload.get())
        else {
            continue;
        };
        if !members.contains(&test_id) {
            continue;
        }
        for window in [Window::All, Window::Day, Window::Week, Window::Month] {
            let board = collections::board_at(collection, window, submitted_at);
            let (bests, total, when) = sums.entry((board, user_id.to_string())).or_insert((
                HashMap::new(),
                0,
                submitted_at,
            ));
            let best = bests.entry(test_id).or_insert(0);
            if score > *best {
                *total += (score - *best) as i32;
                *best = score;
                *when = submitted_at;
            }
        }
    }
    for (key, (bests, total, when)) in sums {
        expected.best.insert(key, (total, when, bests.len() as i32));
    }
    expected
}

type Rows = (
    Vec<(Uuid, String, i32, DateTime<Utc>, i32)>,
    Vec<(Uuid, String, bool)>,
    Vec<(String, i32)>,
);

async fn rows(pool: &PgPool, generation: Generation) -> Rows {
    let entries = sqlx::query_as(&format!(
        "SELECT test_id, user_id, best_score, achieved_at, attempts FROM {} ORDER BY test_id, user_id",
        generation.table("lb_entries")
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    let items = sqlx::query_as(&format!(
        "SELECT notification_id, user_id, read_at IS NOT NULL FROM {} ORDER BY notification_id",
        generation.table("feed_items")
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    let counters = sqlx::query_as(&format!(
        "SELECT user_id, unread FROM {} WHERE unread > 0 ORDER BY user_id",
        generation.table("feed_counters")
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    (entries, items, counters)
}

async fn check(ops: Vec<Op>, cuts: Vec<usize>) {
    let db = TestDb::new().await;
    for table in podium_projections::leaderboard::TABLES
        .into_iter()
        .chain(podium_projections::feed::TABLES)
    {
        sqlx::query(&format!(
            "CREATE TABLE {table}__next (LIKE {table} INCLUDING ALL)"
        ))
        .execute(&db.pool)
        .await
        .unwrap();
    }
    let expected = log_of(&ops);
    let events = &expected.events;
    // Incrementally, in batches cut where the strategy says, like a worker.
    let live_board = Checkpointed::new(
        db.pool.clone(),
        LeaderboardProjection::new(Generation::Live),
    );
    let live_feed = Checkpointed::new(db.pool.clone(), FeedProjection::new(Generation::Live));
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (events.len() + 1)).collect();
    cuts.push(events.len());
    cuts.sort();
    for cut in cuts {
        if cut > start {
            live_board.apply(&events[start..cut]).await.unwrap();
            live_feed.apply(&events[start..cut]).await.unwrap();
            // A redelivered batch changes nothing.
            live_feed.apply(&events[start..cut]).await.unwrap();
            start = cut;
        }
    }
    // A full replay into fresh tables, in one batch.
    let next_board = Checkpointed::new(
        db.pool.clone(),
        LeaderboardProjection::new(Generation::Next),
    );
    let next_feed = Checkpointed::new(db.pool.clone(), FeedProjection::new(Generation::Next));
    next_board.apply(events).await.unwrap();
    next_feed.apply(events).await.unwrap();

    let live = rows(&db.pool, Generation::Live).await;
    assert_eq!(
        live,
        rows(&db.pool, Generation::Next).await,
        "incremental = replay"
    );
    let naive_entries: Vec<_> = expected
        .best
        .iter()
        .map(|((t, u), (s, a, n))| (*t, u.clone(), *s, *a, *n))
        .collect();
    let naive_items: Vec<_> = expected
        .items
        .iter()
        .map(|(id, (u, r))| (*id, u.clone(), *r))
        .collect();
    let mut unread: BTreeMap<String, i32> = BTreeMap::new();
    for (user, read) in expected.items.values() {
        if !read {
            *unread.entry(user.clone()).or_default() += 1;
        }
    }
    assert_eq!(live.0, naive_entries, "leaderboard = rules");
    assert_eq!(live.1, naive_items, "feed = rules");
    assert_eq!(
        live.2,
        unread.into_iter().collect::<Vec<_>>(),
        "unread counts = rules"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn incremental_read_models_equal_a_replay_and_the_rules(
        ops in prop::collection::vec(op(), 1..60),
        cuts in prop::collection::vec(0usize..60, 0..6),
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(check(ops, cuts));
    }
}
