//! The rank index: each instance's leaderboards in memory. Answers from it
//! equal the SQL answers, follow submissions on every instance, survive
//! instances coming and going, and stay within their byte budget.

use podium_projections::windows::{self, Window};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use podium::query::changes::ChangeHub;
use podium::query::rank_index::RankIndex;
use reqwest::StatusCode;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::helpers::{fill_board, poll, spawn_single_node_with, TestApp, TestDb};
use crate::nats::{nats_url, unique_prefix};
use crate::queries::take;

/// Ids that sort differently bytewise than in most locales, and many ties:
/// seven scores, one time for all; written before any event of the log.
const USERS: (&str, &str, &str) = (
    "(ARRAY['User-', 'user_', 'u.', 'Zed'])[n % 4 + 1] || n",
    "(n % 7) * 10",
    "0",
);

/// A GET's status and body.
async fn answer(app: &TestApp, path: &str) -> (StatusCode, Value) {
    let response = app.get(path, &app.user("reader")).await;
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// [`answer`], with the next page's cursor decoded and without the
/// checkpoint it names: a board that did not change reflects an older
/// checkpoint in memory than a fresh SQL snapshot (the log moved on with
/// other events), and both are exact.
async fn ranked_answer(app: &TestApp, path: &str) -> (StatusCode, Value) {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let (status, mut body) = answer(app, path).await;
    if let Some(cursor) = body["next_cursor"].as_str() {
        let mut cursor: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(cursor).unwrap()).unwrap();
        cursor.as_object_mut().unwrap().remove("since");
        body["next_cursor"] = cursor;
    }
    (status, body)
}

/// The paths whose answers rank: offset pages all along the board, a
/// user's neighbours near the top, the middle and the bottom, and a user
/// with no entry.
fn ranked_paths(test_id: &str, users: &[String]) -> Vec<String> {
    let mut paths: Vec<String> = [0, 1, 6, 1_500, 2_990, 2_999, 3_000, 9_000]
        .iter()
        .map(|offset| format!("/v1/tests/{test_id}/leaderboard?offset={offset}&limit=7"))
        .collect();
    for user in users {
        for radius in [0, 3] {
            paths.push(format!(
                "/v1/tests/{test_id}/leaderboard/users/{user}?radius={radius}"
            ));
        }
    }
    paths
}

/// Reads `test_id`'s board on `app` (which starts its warm-up) and waits
/// until the index holds it.
async fn warm_up(app: &TestApp, test_id: &str) {
    answer(app, &format!("/v1/tests/{test_id}/leaderboard?limit=1")).await;
    poll("the board to warm", Duration::from_secs(20), || async {
        let boards = app.metric("podium_rank_index_boards", &[]).await;
        if boards >= 1.0 {
            Ok(())
        } else {
            Err(boards)
        }
    })
    .await;
}

async fn index_reads(app: &TestApp) -> f64 {
    app.metric("podium_rank_index_reads_total", &["source=\"index\""])
        .await
}

/// Warm answers (from memory) are the cold ones (from SQL), byte for byte,
/// before and after a submission moves everyone below it.
#[tokio::test]
async fn warm_answers_equal_the_sql_answers() {
    let warm = spawn_single_node_with(|s| s.query.cache_max_bytes = 0).await;
    // On the same database, with nothing telling it of changes: no index.
    let cold = warm.another_instance(|s| s.query.cache_max_bytes = 0).await;
    let test_id = warm.published_test().await;
    fill_board(&warm.pool, test_id.parse().unwrap(), 3_000, USERS).await;
    let users: Vec<String> = ["User-4", "user_1", "u.2", "Zed3", "Zed2999", "nobody"]
        .map(String::from)
        .to_vec();
    let paths = ranked_paths(&test_id, &users);
    warm_up(&warm, &test_id).await;
    let before = index_reads(&warm).await;
    for path in &paths {
        assert_eq!(
            ranked_answer(&warm, path).await,
            ranked_answer(&cold, path).await,
            "{path}"
        );
    }
    assert!(index_reads(&warm).await >= before + paths.len() as f64);
    assert_eq!(
        cold.metric("podium_rank_index_reads_total", &[]).await,
        0.0,
        "the second instance has no index"
    );

    // A submission of a new user, at the top: every rank moves.
    take(&warm, &test_id, "newcomer", 10).await;
    let newcomer = format!("/v1/tests/{test_id}/leaderboard/users/newcomer?radius=2");
    poll(
        "the newcomer to be ranked",
        Duration::from_secs(20),
        || async {
            let (status, body) = answer(&warm, &newcomer).await;
            if status == StatusCode::OK {
                Ok(body)
            } else {
                Err(status)
            }
        },
    )
    .await;
    let before = index_reads(&warm).await;
    for path in paths.iter().chain([&newcomer]) {
        assert_eq!(
            ranked_answer(&warm, path).await,
            ranked_answer(&cold, path).await,
            "{path}"
        );
    }
    assert!(index_reads(&warm).await >= before + paths.len() as f64 + 1.0);
}

/// The board as the read model holds it, sorted by the rules:
/// (user, score, reached at).
async fn read_model(pool: &sqlx::PgPool, test_id: &str) -> Vec<(String, i32, DateTime<Utc>)> {
    sqlx::query_as(
        "SELECT user_id, best_score, achieved_at FROM lb_entries WHERE test_id = $1
          ORDER BY best_score DESC, achieved_at, user_id COLLATE \"C\"",
    )
    .bind(test_id.parse::<Uuid>().unwrap())
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Whether `app`'s whole board and every user's neighbourhood are `expected`.
async fn agrees(
    app: &TestApp,
    test_id: &str,
    expected: &[(String, i32, DateTime<Utc>)],
) -> Result<(), String> {
    let (_, page) = answer(
        app,
        &format!("/v1/tests/{test_id}/leaderboard?offset=0&limit=200"),
    )
    .await;
    let ranked: Vec<(u64, String, i64)> = page["entries"]
        .as_array()
        .ok_or_else(|| format!("no page: {page}"))?
        .iter()
        .map(|e| {
            (
                e["rank"].as_u64().unwrap(),
                e["user_id"].as_str().unwrap().to_string(),
                e["score"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(u64, String, i64)> = expected
        .iter()
        .enumerate()
        .map(|(i, (user, score, _))| (i as u64 + 1, user.clone(), i64::from(*score)))
        .collect();
    if ranked != want {
        return Err(format!(
            "{} has {ranked:?}, the read model {want:?}",
            app.address
        ));
    }
    for (i, (user, _, _)) in expected.iter().enumerate() {
        let path = format!("/v1/tests/{test_id}/leaderboard/users/{user}?radius=1");
        let (_, around) = answer(app, &path).await;
        let rank = around["entry"]["rank"].as_u64();
        let above = around["above"].as_array().map(Vec::len);
        if rank != Some(i as u64 + 1) || above != Some(i.min(1)) {
            return Err(format!("{user} at {} on {}: {around}", i + 1, app.address));
        }
    }
    Ok(())
}

/// An answer read while submissions flow is one the board had at some
/// point: ranks 1, 2, 3… in order, scores not rising down the page.
fn consistent(page: &Value) -> bool {
    let Some(entries) = page["entries"].as_array() else {
        return false;
    };
    entries.iter().enumerate().all(|(i, e)| {
        e["rank"].as_u64() == Some(i as u64 + 1)
            && (i == 0 || entries[i - 1]["score"].as_i64() >= e["score"].as_i64())
    })
}

/// Instances on one database and one NATS, one started mid-flow (cold) and
/// one stopped mid-flow, rank every entry as the read model does, from
/// their indexes.
#[tokio::test]
async fn instances_rank_as_the_read_model_while_submissions_flow() {
    let prefix = unique_prefix();
    let on_nats = |s: &mut podium::config::Settings| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = prefix.clone();
        s.query.cache_max_bytes = 0;
    };
    let first = crate::helpers::spawn_app_with(on_nats).await;
    let second = first.another_instance(on_nats).await;
    let test_id = first.published_test().await;
    let mut instances = vec![first, second];
    let scores = [0, 4, 6, 10];
    let mut seed = 7u64;
    for round in 0..3 {
        if round == 1 {
            // A restart: a cold instance joins, an old one leaves.
            let third = instances[0].another_instance(on_nats).await;
            instances.push(third);
        }
        if round == 2 {
            instances.remove(0);
        }
        for i in 0..16 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let user = format!("learner{}", (seed >> 33) % 12);
            let score = scores[((seed >> 40) % 4) as usize];
            let via = &instances[i % instances.len()];
            take(via, &test_id, &user, score).await;
            for app in &instances {
                let (_, page) = answer(
                    app,
                    &format!("/v1/tests/{test_id}/leaderboard?offset=0&limit=50"),
                )
                .await;
                assert!(consistent(&page), "{}: {page}", app.address);
            }
        }
        let expected = read_model(&instances[0].pool, &test_id).await;
        for app in &instances {
            poll(
                "the instance to rank as the read model",
                Duration::from_secs(30),
                || async {
                    let expected = read_model(&app.pool, &test_id).await;
                    agrees(app, &test_id, &expected).await
                },
            )
            .await;
        }
        assert!(!expected.is_empty());
    }
    for app in &instances {
        assert!(
            index_reads(app).await > 0.0,
            "{} read no rank from memory",
            app.address
        );
    }
}

/// Boards beyond the byte budget are evicted least recently read first.
#[tokio::test]
async fn boards_are_evicted_least_recently_read_first_under_the_byte_budget() {
    let db = TestDb::with_pool_size(2).await;
    let boards: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    for test_id in &boards {
        fill_board(&db.pool, *test_id, 1_000, USERS).await;
    }
    let stop = CancellationToken::new();
    let index = |budget: u64| {
        let hub = ChangeHub::new(16, Duration::from_secs(60));
        RankIndex::new(db.pool.clone(), hub, budget, stop.clone())
    };
    let warm = |index: Arc<RankIndex>, test_id: Uuid| async move {
        poll("a board to warm", Duration::from_secs(20), || async {
            match index.read(test_id, |board, _| board.len()).await {
                Some(len) => Ok(len),
                None => Err("cold"),
            }
        })
        .await
    };
    // What one board takes (the three are alike)…
    let measure = index(u64::MAX / 2);
    assert_eq!(warm(measure.clone(), boards[0]).await, 1_000);
    let one = measure.stats().bytes;
    // …and room for two boards, not three.
    let budget = one * 5 / 2;
    let index = index(budget);
    let warm = |test_id| warm(index.clone(), test_id);
    assert_eq!(warm(boards[0]).await, 1_000);
    assert_eq!(warm(boards[1]).await, 1_000);
    let two = index.stats();
    assert_eq!(two.boards, 2);
    assert!(two.bytes <= budget, "{two:?}");
    // The first is read again: the second is now the least recent.
    assert!(index.read(boards[0], |_, _| ()).await.is_some());
    assert_eq!(warm(boards[2]).await, 1_000);
    let stats = index.stats();
    assert_eq!((stats.boards, stats.entries), (2, 2_000), "{stats:?}");
    assert!(stats.bytes <= budget, "{stats:?}");
    assert!(index.read(boards[0], |_, _| ()).await.is_some());
    assert!(
        index.read(boards[1], |_, _| ()).await.is_none(),
        "the least recently read board was evicted"
    );
    stop.cancel();
}

/// A board larger than the whole budget is never loaded: SQL answers it,
/// and the boards already warm stay.
#[tokio::test]
async fn a_board_larger_than_the_budget_stays_in_sql() {
    let db = TestDb::with_pool_size(2).await;
    let (small, large) = (Uuid::new_v4(), Uuid::new_v4());
    fill_board(&db.pool, small, 100, USERS).await;
    fill_board(&db.pool, large, 5_000, USERS).await;
    let hub = ChangeHub::new(16, Duration::from_secs(60));
    let stop = CancellationToken::new();
    let index = RankIndex::new(db.pool.clone(), hub, 100_000, stop.clone());
    poll(
        "the small board to warm",
        Duration::from_secs(20),
        || async { index.read(small, |_, _| ()).await.ok_or("cold") },
    )
    .await;
    assert!(index.read(large, |_, _| ()).await.is_none());
    poll(
        "the large board to be refused",
        Duration::from_secs(20),
        || async {
            match index.refused() {
                1 => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
    assert!(index.read(large, |_, _| ()).await.is_none());
    assert_eq!(index.stats().boards, 1);
    assert!(index.read(small, |_, _| ()).await.is_some());
    stop.cancel();
}

/// The rank of `user` on `test_id` as the read model says, by counting.
async fn counted_rank(pool: &sqlx::PgPool, test_id: &str, user: &str) -> Option<u64> {
    let rank: Option<i64> = sqlx::query_scalar(
        "SELECT 1 + (SELECT count(*) FROM lb_entries x
                      WHERE x.test_id = me.test_id
                        AND (-x.best_score, x.achieved_at, x.user_id)
                          < (-me.best_score, me.achieved_at, me.user_id))
           FROM lb_entries me WHERE me.test_id = $1 AND me.user_id = $2",
    )
    .bind(test_id.parse::<Uuid>().unwrap())
    .bind(user)
    .fetch_optional(pool)
    .await
    .unwrap();
    rank.map(|r| r as u64)
}

/// The ranks a stream announces (`rank`, `previous_rank`) are counted in
/// memory on a warm board, and are the read model's.
#[tokio::test]
async fn announced_ranks_come_from_memory_and_are_the_read_models() {
    let app = spawn_single_node_with(|s| s.query.cache_max_bytes = 0).await;
    let test_id = app.published_test().await;
    // Odd scores, between those the sample test gives (0, 4, 6, 10).
    fill_board(
        &app.pool,
        test_id.parse().unwrap(),
        2_000,
        (USERS.0, "(n % 4) * 2 + 3", "0"),
    )
    .await;
    warm_up(&app, &test_id).await;
    let mut stream = crate::sse::SseClient::open(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/stream"),
        &app.user("watcher"),
        None,
    )
    .await;
    let plan = [
        ("a", 4),
        ("b", 10),
        ("a", 6),
        ("c", 0),
        ("b", 4),
        ("a", 10),
        ("d", 6),
        ("c", 10),
        ("d", 6),
    ];
    for (user, score) in plan {
        let before = counted_rank(&app.pool, &test_id, user).await;
        take(&app, &test_id, user, score).await;
        let event = stream
            .next_named("entry", Duration::from_secs(20))
            .await
            .expect("the submission is announced");
        assert_eq!(event.data["user_id"], user, "{event:?}");
        let after = counted_rank(&app.pool, &test_id, user).await;
        assert_eq!(
            event.data["rank"].as_u64(),
            after,
            "{user} {score}: {event:?}"
        );
        assert_eq!(
            event.data["previous_rank"].as_u64(),
            before,
            "{user} {score}: {event:?}"
        );
    }
    let batches = app
        .metric("podium_rank_index_reads_total", &["source=\"batch\""])
        .await;
    assert!(
        batches >= plan.len() as f64,
        "{batches} batches ranked in memory"
    );
}

/// Batches of several submissions each (some of one user twice) ranked in
/// memory announce, for every entry a batch changed, its rank before the
/// batch and after it, as the read model counts them.
#[tokio::test]
async fn batches_ranked_in_memory_announce_the_read_models_ranks() {
    batches_announce_the_read_models_ranks(true).await;
}

/// The same without a rank index: the ranks before and after each batch
/// follow from one rank query on the boards as they were.
#[tokio::test]
async fn batches_ranked_in_sql_announce_the_read_models_ranks() {
    batches_announce_the_read_models_ranks(false).await;
}

async fn batches_announce_the_read_models_ranks(in_memory: bool) {
    use podium_projections::leaderboard::{LeaderboardProjection, LiveBoards};
    use podium_projections::ranking::Submission;
    use podium_projections::{Checkpointed, Generation};

    let db = TestDb::with_pool_size(3).await;
    let test_id = Uuid::new_v4();
    fill_board(&db.pool, test_id, 500, (USERS.0, "(n % 4) * 2 + 3", "0")).await;
    let stop = CancellationToken::new();
    let hub = ChangeHub::new(16, Duration::from_secs(60));
    let index = RankIndex::new(db.pool.clone(), hub, 1 << 30, stop.clone());
    poll("the board to warm", Duration::from_secs(20), || async {
        index.read(test_id, |_, _| ()).await.ok_or("cold")
    })
    .await;
    let boards: Arc<dyn LiveBoards> = index.clone();
    let projection = Checkpointed::new(
        db.pool.clone(),
        LeaderboardProjection::new(Generation::Live).ranking_with(in_memory.then_some(boards)),
    );
    let mut seq = 0;
    let mut rng = 11u64;
    let mut next = |below: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % below
    };
    let at = DateTime::<Utc>::UNIX_EPOCH + chrono::TimeDelta::days(20_000);
    // The day's, week's and month's boards the batches also change, warm
    // (empty) before the first batch as the test's is.
    for window in [Window::Day, Window::Week, Window::Month] {
        let board = windows::board_at(test_id, window, at);
        poll(
            "a window's board to warm",
            Duration::from_secs(20),
            || async { index.read(board, |_, _| ()).await.ok_or("cold") },
        )
        .await;
    }
    for _ in 0..12 {
        let size = 1 + next(8);
        let batch: Vec<Submission> = (0..size)
            .map(|i| Submission {
                test_id,
                // A few users, so that a batch often moves one twice, and
                // ids from the board too.
                user_id: match next(3) {
                    0 => format!("learner{}", next(6)),
                    _ => format!(
                        "{}{}",
                        ["User-", "user_", "u.", "Zed"][(i % 4) as usize],
                        next(500) + 1
                    ),
                },
                attempt_id: Uuid::new_v4(),
                score: next(12) as u32,
                max_score: 12,
                correct: 0,
                submitted_at: at + chrono::TimeDelta::seconds(next(3) as i64),
            })
            .collect();
        let mut users: Vec<String> = batch.iter().map(|s| s.user_id.clone()).collect();
        users.sort();
        users.dedup();
        // Every board the batch changes: the test's, the day's, the week's
        // and the month's.
        let boards: Vec<String> = std::iter::once(test_id)
            .chain(
                [Window::Day, Window::Week, Window::Month]
                    .map(|window| windows::board_at(test_id, window, at)),
            )
            .map(|board| board.to_string())
            .collect();
        let mut before = std::collections::HashMap::new();
        for board in &boards {
            for user in &users {
                let rank = counted_rank(&db.pool, board, user).await;
                before.insert((board.clone(), user.clone()), rank);
            }
        }
        let events: Vec<_> = batch
            .iter()
            .map(|s| {
                seq += 1;
                s.recorded(seq)
            })
            .collect();
        let (_, changes) = projection.apply(&events).await.unwrap();
        assert_eq!(changes.len(), 4 * users.len(), "{changes:?}");
        for change in &changes {
            let (board, user) = (&change.key, change.data["user_id"].as_str().unwrap());
            assert!(boards.contains(board), "{change:?}");
            let after = counted_rank(&db.pool, board, user).await;
            assert_eq!(change.data["rank"].as_u64(), after, "{user}: {change:?}");
            assert_eq!(
                change.data["previous_rank"].as_u64(),
                before[&(board.clone(), user.to_string())],
                "{user}: {change:?}"
            );
        }
    }
    let expected = if in_memory { 4 * 12 } else { 0 };
    assert_eq!(
        index.batches_ranked(),
        expected,
        "every batch was ranked in memory (on each of its four boards), or none"
    );
    stop.cancel();
}

/// A stream resumed on a warm board catches up with ranks counted in
/// memory, and they are the read model's.
#[tokio::test]
async fn a_resumed_stream_is_ranked_from_memory() {
    let app = spawn_single_node_with(|s| s.query.cache_max_bytes = 0).await;
    let test_id = app.published_test().await;
    fill_board(
        &app.pool,
        test_id.parse().unwrap(),
        1_000,
        (USERS.0, "(n % 4) * 2 + 3", "0"),
    )
    .await;
    warm_up(&app, &test_id).await;
    let path = format!("/v1/tests/{test_id}/leaderboard/stream");
    let token = app.user("watcher");
    let mut stream = crate::sse::SseClient::open(&app, &path, &token, None).await;
    take(&app, &test_id, "a", 4).await;
    let seen = stream
        .next_named("entry", Duration::from_secs(20))
        .await
        .expect("the first submission is announced");
    drop(stream);
    for (user, score) in [("b", 10), ("c", 6), ("a", 10)] {
        take(&app, &test_id, user, score).await;
    }
    // The board in memory has every change: a read of it answers a's best.
    let around_a = format!("/v1/tests/{test_id}/leaderboard/users/a?radius=0");
    poll(
        "the index to hold a's best",
        Duration::from_secs(20),
        || async {
            let before = index_reads(&app).await;
            let (_, body) = answer(&app, &around_a).await;
            let from_index = index_reads(&app).await > before;
            match body["entry"]["score"].as_u64() {
                Some(10) if from_index => Ok(()),
                other => Err((other, from_index)),
            }
        },
    )
    .await;
    let sql_reads = || app.metric("podium_rank_index_reads_total", &["source=\"sql\""]);
    let (index_before, sql_before) = (index_reads(&app).await, sql_reads().await);
    let mut resumed = crate::sse::SseClient::open(&app, &path, &token, Some(&seen.id)).await;
    let mut caught_up = Vec::new();
    for _ in 0..3 {
        let event = resumed
            .next_named("entry", Duration::from_secs(20))
            .await
            .expect("a missed change");
        caught_up.push(event);
    }
    let users: Vec<&str> = caught_up
        .iter()
        .map(|e| e.data["user_id"].as_str().unwrap())
        .collect();
    assert_eq!(users, ["b", "c", "a"]);
    for event in &caught_up {
        let user = event.data["user_id"].as_str().unwrap();
        let counted = counted_rank(&app.pool, &test_id, user).await;
        assert_eq!(event.data["rank"].as_u64(), counted, "{event:?}");
    }
    assert!(index_reads(&app).await > index_before, "ranked in memory");
    assert_eq!(sql_reads().await, sql_before, "nothing ranked by counting");
}
