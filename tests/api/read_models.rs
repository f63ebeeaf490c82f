//! Read models kept live by the workers of a running app, compared with a
//! replay and with the rules applied directly to the log.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use podium::projector::replay::{replay, Rebuilt, Scope};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::helpers::{spawn_app_with, TestApp};
use crate::nats::{nats_url, unique_prefix, wait_until};

pub async fn spawn_app_with_workers() -> (TestApp, String) {
    let prefix = unique_prefix();
    let app = spawn_app_with(|settings| {
        settings.nats.nats_url = Some(nats_url());
        settings.nats.nats_prefix = prefix.clone();
    })
    .await;
    (app, prefix)
}

/// Leaderboards by test id: (user, best score, reached at, attempts), ranked.
type Boards = BTreeMap<String, Vec<(String, i64, DateTime<Utc>, i64)>>;

/// A small deterministic pseudo-random sequence (no seed to manage).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

/// Publishes `tests` tests and drives `rounds` rounds of traffic: attempts
/// with random answers, announcements, reads and read-alls.
async fn traffic(app: &TestApp, test_ids: &[String], rounds: usize, seed: u64) {
    let mut rng = Lcg(seed);
    let admin = app.admin();
    for _ in 0..rounds {
        let user = format!("user-{}", rng.next(12));
        let token = app.user(&user);
        match rng.next(10) {
            0 => {
                let to: Vec<String> = (0..1 + rng.next(3))
                    .map(|i| format!("user-{}", (rng.next(12) + i) % 12))
                    .collect();
                let mut to = to;
                to.sort();
                to.dedup();
                let body = json!({"user_ids": to, "title": "News", "body": "Read this"});
                assert_eq!(
                    app.post("/v1/notifications", &admin, Some(body))
                        .await
                        .status(),
                    StatusCode::ACCEPTED
                );
            }
            1 => {
                let response = app
                    .post("/v1/me/notifications/read-all", &token, None)
                    .await;
                assert_eq!(response.status(), StatusCode::NO_CONTENT);
            }
            2 => {
                let ids: Vec<uuid::Uuid> = sqlx::query_scalar(
                    "SELECT aggregate_id::uuid FROM events WHERE event_type = 'NotificationCreated'
                       AND payload->'NotificationCreated'->>'recipient' = $1",
                )
                .bind(&user)
                .fetch_all(&app.pool)
                .await
                .unwrap();
                if let Some(id) = ids.get(rng.next(ids.len().max(1) as u64) as usize) {
                    let path = format!("/v1/me/notifications/{id}/read");
                    assert_eq!(
                        app.post(&path, &token, None).await.status(),
                        StatusCode::NO_CONTENT
                    );
                }
            }
            _ => {
                let test_id = &test_ids[rng.next(test_ids.len() as u64) as usize];
                let attempt = app.started_attempt(test_id, &token).await;
                let answers = json!({"q1": rng.next(3), "q2": rng.next(2)});
                let response = app
                    .submit(&attempt, &token, Some(json!({"answers": answers})))
                    .await;
                assert_eq!(response.status(), StatusCode::OK);
            }
        }
    }
}

/// Waits until every projection has applied the whole log and the log has
/// stopped growing (the policy adds notifications as it goes).
async fn settle(pool: &PgPool) {
    let check = || async {
        let state: Vec<(String, i64)> = sqlx::query_as(
            "SELECT p.name, COALESCE(c.seq, 0)
               FROM (VALUES ('leaderboard'), ('feed'), ('attempts'), ('notification-policy')) p(name)
               LEFT JOIN projection_checkpoints c USING (name) ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        // The head after the checkpoints: the policy commits its commands
        // before its checkpoint, so events it added are counted here.
        let head: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await
            .unwrap();
        if state.iter().all(|(_, seq)| *seq == head) {
            Ok(())
        } else {
            Err(format!("head {head}, checkpoints {state:?}"))
        }
    };
    let what = "projections to reach the head of the log";
    crate::helpers::poll(what, Duration::from_secs(120), check).await;
}

/// Asserts two snapshots are equal, showing the first differing rows.
fn assert_same(
    actual: &BTreeMap<&'static str, Vec<Value>>,
    expected: &BTreeMap<&'static str, Vec<Value>>,
) {
    for (table, rows) in expected {
        let other = &actual[table];
        let differing: Vec<_> = rows
            .iter()
            .zip(other.iter())
            .filter(|(a, b)| a != b)
            .take(3)
            .collect();
        assert!(
            differing.is_empty() && rows.len() == other.len(),
            "{table}: {} rows expected, {} found; first differences (expected, found): {differing:?}",
            rows.len(),
            other.len()
        );
    }
}

/// Every read-model row, in a stable order, as JSON.
async fn snapshot(pool: &PgPool) -> BTreeMap<&'static str, Vec<Value>> {
    let queries = [
        (
            "lb_entries",
            "SELECT to_jsonb(t) FROM lb_entries t ORDER BY test_id, user_id",
        ),
        (
            "lb_score_counts",
            "SELECT to_jsonb(t) FROM lb_score_counts t WHERE entries > 0 ORDER BY test_id, score",
        ),
        (
            "feed_items",
            "SELECT to_jsonb(t) FROM feed_items t ORDER BY notification_id",
        ),
        (
            "feed_counters",
            "SELECT to_jsonb(t) FROM feed_counters t ORDER BY user_id",
        ),
        (
            "my_attempts",
            "SELECT to_jsonb(t) FROM my_attempts t ORDER BY attempt_id",
        ),
    ];
    let mut all = BTreeMap::new();
    for (name, query) in queries {
        all.insert(
            name,
            sqlx::query_scalar(query).fetch_all(pool).await.unwrap(),
        );
    }
    all
}

/// The leaderboards and unread counts computed straight from the log by the
/// rules of API.md, without any projection code.
async fn naive(pool: &PgPool) -> (Boards, BTreeMap<String, i64>) {
    let mut conn = pool.acquire().await.unwrap();
    let mut best: HashMap<(String, String), (i64, DateTime<Utc>, i64)> = HashMap::new();
    let mut unread: HashMap<String, Vec<(String, bool)>> = HashMap::new();
    let mut owner: HashMap<String, String> = HashMap::new();
    {
        let events = crate::helpers::whole_log(&mut conn, 500).await;
        for e in &events {
            let payload = e.payload_value();
            let body = &payload[&e.event_type];
            match e.event_type.as_str() {
                "AttemptSubmitted" => {
                    use podium_projections::windows::{board_at, Window};
                    let test: uuid::Uuid = body["test_id"].as_str().unwrap().parse().unwrap();
                    let user = body["user_id"].as_str().unwrap().to_string();
                    let score = body["score"].as_i64().unwrap();
                    let at: DateTime<Utc> =
                        serde_json::from_value(body["submitted_at"].clone()).unwrap();
                    // On the test's board and on its day's, week's and month's.
                    for window in [Window::All, Window::Day, Window::Week, Window::Month] {
                        let key = (board_at(test, window, at).to_string(), user.clone());
                        let entry = best.entry(key).or_insert((score, at, 0));
                        if score > entry.0 {
                            *entry = (score, at, entry.2);
                        }
                        entry.2 += 1;
                    }
                }
                "NotificationCreated" => {
                    let user = body["recipient"].as_str().unwrap().to_string();
                    let id = body["notification_id"].as_str().unwrap().to_string();
                    owner.insert(id.clone(), user.clone());
                    unread.entry(user).or_default().push((id, false));
                }
                "NotificationRead" => {
                    let id = body["notification_id"].as_str().unwrap();
                    let user = &owner[id];
                    for item in unread.get_mut(user).unwrap() {
                        if item.0 == id {
                            item.1 = true;
                        }
                    }
                }
                "AllNotificationsRead" => {
                    let user = body["user_id"].as_str().unwrap();
                    for item in unread.entry(user.to_string()).or_default() {
                        item.1 = true;
                    }
                }
                _ => {}
            }
        }
    }
    let mut boards: Boards = BTreeMap::new();
    for ((test, user), (score, at, attempts)) in best {
        boards
            .entry(test)
            .or_default()
            .push((user, score, at, attempts));
    }
    for board in boards.values_mut() {
        board.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
    }
    let counts = unread
        .into_iter()
        .map(|(user, items)| (user, items.iter().filter(|i| !i.1).count() as i64))
        .collect();
    (boards, counts)
}

/// The live leaderboards in rank order, read through the rank queries.
async fn ranked_boards(pool: &PgPool) -> Boards {
    use podium_projections::leaderboard::LeaderboardQueries;
    let tests: Vec<uuid::Uuid> = sqlx::query_scalar("SELECT DISTINCT test_id FROM lb_entries")
        .fetch_all(pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mut boards = BTreeMap::new();
    for test in tests {
        let page = LeaderboardQueries::page_after(&mut conn, test, None, 1, 1000)
            .await
            .unwrap();
        for (i, ranked) in page.iter().enumerate() {
            assert_eq!(ranked.rank, i as u64 + 1);
            let by_lookup = LeaderboardQueries::entry_of(&mut conn, test, &ranked.entry.user_id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                by_lookup.rank, ranked.rank,
                "rank lookup agrees with the page"
            );
            let at_offset = LeaderboardQueries::page_at_offset(&mut conn, test, i as u64, 1)
                .await
                .unwrap();
            assert_eq!(at_offset[0].entry, ranked.entry, "offset page agrees");
        }
        assert_eq!(
            LeaderboardQueries::total(&mut *conn, test).await.unwrap(),
            page.len() as u64
        );
        let rows = page
            .into_iter()
            .map(|r| {
                (
                    r.entry.user_id,
                    r.entry.best_score as i64,
                    r.entry.achieved_at,
                    r.entry.attempts as i64,
                )
            })
            .collect();
        boards.insert(test.to_string(), rows);
    }
    boards
}

async fn unread_counts(pool: &PgPool) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i32)> = sqlx::query_as("SELECT user_id, unread FROM feed_counters")
        .fetch_all(pool)
        .await
        .unwrap();
    rows.into_iter().map(|(u, n)| (u, n as i64)).collect()
}

async fn published_tests(app: &TestApp, count: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..count {
        ids.push(app.published_test().await);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_read_models_equal_a_replay_and_the_rules_applied_to_the_log() {
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 3).await;
    // A collection of two of the tests, which the third joins halfway: its
    // boards are rebuilt by the fold, entry for entry (seqs included).
    let admin = app.admin();
    let body = serde_json::json!({"title": "Two", "test_ids": [tests[0], tests[1]]});
    let response = app.post("/v1/collections", &admin, Some(body)).await;
    assert_eq!(response.status(), reqwest::StatusCode::CREATED);
    let created: serde_json::Value = response.json().await.unwrap();
    let collection = created["id"].as_str().unwrap().to_string();
    traffic(&app, &tests, 75, 7).await;
    let joined = app
        .request(
            reqwest::Method::PUT,
            &format!("/v1/collections/{collection}/tests/{}", tests[2]),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(joined.status(), reqwest::StatusCode::NO_CONTENT);
    traffic(&app, &tests, 75, 8).await;
    settle(&app.pool).await;
    let collection_entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM lb_entries WHERE test_id NOT IN (SELECT board_id FROM lb_boards)
            AND test_id::text <> ALL($1)",
    )
    .bind(&tests)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(collection_entries > 0, "the collection has a board");

    let live = snapshot(&app.pool).await;
    let (boards, unread) = naive(&app.pool).await;
    // The tests' boards follow the rules; the others are the collection's
    // (which the fold must rebuild, below).
    let (tests_boards, others): (Boards, Boards) = ranked_boards(&app.pool)
        .await
        .into_iter()
        .partition(|(board, _)| boards.contains_key(board));
    assert_eq!(tests_boards, boards);
    let all_time = podium_projections::collections::board_at(
        collection.parse().unwrap(),
        podium_projections::windows::Window::All,
        chrono::Utc::now(),
    )
    .to_string();
    assert!(
        others.contains_key(&all_time),
        "the collection's all-time board"
    );
    let counted: BTreeMap<String, i64> = unread_counts(&app.pool).await;
    let expected: BTreeMap<String, i64> = unread
        .into_iter()
        .filter(|(u, _)| counted.contains_key(u))
        .collect();
    assert_eq!(counted, expected);
    let submitted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'AttemptSubmitted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let graded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM feed_items WHERE kind = 'attempt_graded'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(
        graded, submitted,
        "one attempt_graded notification per submission"
    );

    let shape = shapes(&app.pool).await;
    let mut progress = |_: u64, _: u64| {};
    replay(&app.pool, &Scope::All.read_models(), &mut progress)
        .await
        .unwrap();
    assert_same(&snapshot(&app.pool).await, &live);
    // The folds' copies are written without their keys, which are built
    // afterwards: every table keeps its keys, constraints and indexes, also
    // after a second replay.
    assert_eq!(shapes(&app.pool).await, shape);
    replay(&app.pool, &Scope::All.read_models(), &mut progress)
        .await
        .unwrap();
    assert_eq!(shapes(&app.pool).await, shape);
    assert_same(&snapshot(&app.pool).await, &live);
}

/// Every read-model table's constraints and indexes, without their names.
async fn shapes(pool: &PgPool) -> Vec<(String, String)> {
    let tables: Vec<&str> = podium::projector::registry::ReadModel::ALL
        .iter()
        .flat_map(|model| model.tables().iter().copied())
        .collect();
    let shapes: Vec<(String, String)> = sqlx::query_as(
        "SELECT conrelid::regclass::text, contype::text || ' ' || pg_get_constraintdef(oid)
           FROM pg_constraint WHERE conrelid = ANY($1::text[]::regclass[])
         UNION ALL
         SELECT indrelid::regclass::text,
                regexp_replace(pg_get_indexdef(indexrelid), 'INDEX \\S+ ON', 'INDEX ON')
           FROM pg_index WHERE indrelid = ANY($1::text[]::regclass[])
          ORDER BY 1, 2",
    )
    .bind(&tables)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(
        shapes
            .iter()
            .any(|(table, shape)| table == "lb_entries"
                && shape == "p PRIMARY KEY (test_id, user_id)"),
        "{shapes:?}"
    );
    shapes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_keeps_flowing_during_a_replay_and_nothing_is_lost_or_doubled() {
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 2).await;
    traffic(&app, &tests, 60, 11).await;
    let pool = app.pool.clone();
    let rebuild = tokio::spawn(async move {
        let mut progress = |_: u64, _: u64| {};
        replay(&pool, &Scope::All.read_models(), &mut progress).await
    });
    traffic(&app, &tests, 80, 13).await;
    rebuild.await.unwrap().unwrap();
    traffic(&app, &tests, 20, 17).await;
    settle(&app.pool).await;
    let live = snapshot(&app.pool).await;
    let (boards, _) = naive(&app.pool).await;
    assert_eq!(ranked_boards(&app.pool).await, boards);
    let mut progress = |_: u64, _: u64| {};
    replay(&app.pool, &Scope::All.read_models(), &mut progress)
        .await
        .unwrap();
    assert_same(&snapshot(&app.pool).await, &live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivering_every_event_changes_nothing_and_notifies_no_one_twice() {
    let (app, prefix) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 2).await;
    traffic(&app, &tests, 60, 23).await;
    settle(&app.pool).await;
    let before = snapshot(&app.pool).await;
    let events = app.event_count().await;

    // Delete the events stream: the relay makes it again and publishes the
    // whole log into it, and every worker finds its place in the new stream,
    // reading again what it has applied.
    let client = async_nats::connect(nats_url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream_name = podium_nats::Subjects::new(&prefix).unwrap().events_stream();
    js.delete_stream(&stream_name).await.unwrap();
    wait_until(
        Duration::from_secs(60),
        "the relay fills a new stream with the whole log",
        || async {
            match js.get_stream(&stream_name).await {
                Ok(mut stream) => stream
                    .info()
                    .await
                    .is_ok_and(|info| info.state.messages == events as u64),
                Err(_) => false,
            }
        },
    )
    .await;
    settle(&app.pool).await;
    assert_eq!(
        app.event_count().await,
        events,
        "no notification was created twice"
    );
    assert_same(&snapshot(&app.pool).await, &before);

    // The policy forgets everything and decides again over the whole log:
    // the same notifications, under the same ids, so nothing new is recorded.
    sqlx::query("TRUNCATE policy_bests")
        .execute(&app.pool)
        .await
        .unwrap();
    let aggregates = std::sync::Arc::new(podium::command::Aggregates::new(&app.pool));
    let policy = podium_projections::Checkpointed::new(
        app.pool.clone(),
        Renamed(podium::command::policy::NotificationPolicy::new(aggregates)),
    );
    let mut conn = app.pool.acquire().await.unwrap();
    let log = crate::helpers::whole_log(&mut conn, 10_000).await;
    drop(conn);
    for batch in log.chunks(200) {
        policy.apply(batch).await.unwrap();
    }
    assert_eq!(
        app.event_count().await,
        events,
        "the policy decided the same again"
    );

    // The workers follow the new stream: later traffic reaches every read model.
    traffic(&app, &tests, 20, 29).await;
    settle(&app.pool).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_notifies_grades_personal_bests_and_overtaken_users() {
    let (app, _) = spawn_app_with_workers().await;
    let test = app.published_test().await;
    let submit = |user: &'static str, answers: Value| {
        let app = &app;
        let test = test.clone();
        async move {
            let token = app.user(user);
            let attempt = app.started_attempt(&test, &token).await;
            let response = app
                .submit(&attempt, &token, Some(json!({"answers": answers})))
                .await;
            assert_eq!(response.status(), StatusCode::OK);
        }
    };
    submit("alice", json!({"q1": 1})).await; // 4 points: rank 1
    submit("bob", json!({"q2": 0})).await; // 6 points: alice pushed to 2
    submit("alice", json!({"q1": 1, "q2": 0})).await; // 10: personal best, bob pushed to 2
    settle(&app.pool).await;
    let kinds = |user: &'static str| {
        let pool = app.pool.clone();
        async move {
            let kinds: Vec<String> = sqlx::query_scalar(
                "SELECT kind FROM feed_items WHERE user_id = $1 ORDER BY feed_seq",
            )
            .bind(user)
            .fetch_all(&pool)
            .await
            .unwrap();
            kinds
        }
    };
    assert_eq!(
        kinds("alice").await,
        [
            "attempt_graded",
            "rank_overtaken",
            "attempt_graded",
            "personal_best"
        ]
    );
    assert_eq!(kinds("bob").await, ["attempt_graded", "rank_overtaken"]);
    let unread: i32 =
        sqlx::query_scalar("SELECT unread FROM feed_counters WHERE user_id = 'alice'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(unread, 4);
}

/// The policy under another checkpoint name, to run it a second time.
struct Renamed(podium::command::policy::NotificationPolicy);

impl podium_projections::ProjectionLogic for Renamed {
    fn name(&self) -> &str {
        "again"
    }

    async fn apply_batch(
        &self,
        conn: &mut sqlx::PgConnection,
        events: &[podium_domain::log::RecordedEvent],
    ) -> Result<Vec<podium_domain::log::Change>, podium_projections::BoxError> {
        self.0.apply_batch(conn, events).await
    }

    fn writes_events(&self) -> bool {
        self.0.writes_events()
    }
}

/// A rebuild folds attempts left in progress as well as submitted ones, and
/// a user's repeated submissions into one entry, as the live projections did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_keeps_attempts_in_progress_and_repeated_submissions() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    for (user, submit) in [("ann", true), ("bob", false), ("ann", true), ("cy", false)] {
        let token = app.user(user);
        let attempt = app.started_attempt(&test_id, &token).await;
        if submit {
            let answers = serde_json::json!({"answers": {"q1": 1, "q2": 0}});
            let response = app.submit(&attempt, &token, Some(answers)).await;
            assert_eq!(response.status(), reqwest::StatusCode::OK);
        }
    }
    settle(&app.pool).await;
    let live = snapshot(&app.pool).await;
    let in_progress = live["my_attempts"]
        .iter()
        .filter(|row| row["status"] == "in_progress")
        .count();
    assert_eq!(in_progress, 2, "{:?}", live["my_attempts"]);
    let mut progress = |_: u64, _: u64| {};
    replay(&app.pool, &Scope::All.read_models(), &mut progress)
        .await
        .unwrap();
    assert_same(&snapshot(&app.pool).await, &live);
}

/// Whether a replay's swap waits for its lock on the live leaderboard.
const SWAP_WAITS: &str = "SELECT EXISTS(SELECT 1 FROM pg_locks
                                        WHERE relation = 'lb_entries'::regclass
                                          AND mode = 'AccessExclusiveLock' AND NOT granted)";

/// Waits until `statement` (a `SELECT EXISTS …`) answers true, asked on a
/// connection of its own (a held replay may hold the app's pool).
async fn until(app: &TestApp, what: &str, statement: &str) {
    use sqlx::Connection;
    let conn = tokio::sync::Mutex::new(sqlx::PgConnection::connect(&app.db.url()).await.unwrap());
    crate::helpers::poll(what, Duration::from_secs(60), || async {
        let yes: bool = sqlx::query_scalar(statement)
            .fetch_one(&mut *conn.lock().await)
            .await
            .unwrap();
        if yes {
            Ok(())
        } else {
            Err("not yet")
        }
    })
    .await
}

/// A session that has read the live leaderboard in a transaction it keeps
/// open (a report, a dump) until the test sends `COMMIT`.
async fn long_reader(app: &TestApp) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut report = sqlx::PgConnection::connect(&app.db.url()).await.unwrap();
    for statement in ["BEGIN", "SELECT count(*) FROM lb_entries"] {
        run(&mut report, statement).await;
    }
    report
}

/// Runs `statement` on `conn`.
async fn run(conn: &mut sqlx::PgConnection, statement: &str) {
    sqlx::query(statement).execute(conn).await.unwrap();
}

/// A session in a transaction that writes no events (so it holds no reader
/// of the log back), to hold a replay at one of its steps.
async fn holder(app: &TestApp) -> sqlx::PgConnection {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&app.db.url()).await.unwrap();
    for statement in ["BEGIN", "SELECT podium_writes_no_events()"] {
        run(&mut conn, statement).await;
    }
    conn
}

/// A holder that stops a leaderboard replay's fold write at its checkpoint,
/// behind a row it is inserting and has not committed (`ROLLBACK` lets it
/// go); the read of the log before it is not held.
async fn holding_the_fold_write(app: &TestApp) -> sqlx::PgConnection {
    let mut fold = holder(app).await;
    run(
        &mut fold,
        "INSERT INTO projection_checkpoints (name, seq) VALUES ('leaderboard__next', 0)",
    )
    .await;
    fold
}

/// A replay of the leaderboard held at its fold write (the log read), and
/// the holder that lets it go with `ROLLBACK`.
async fn replay_held_at_its_fold_write(
    app: &TestApp,
) -> (
    sqlx::PgConnection,
    tokio::task::JoinHandle<anyhow::Result<Vec<Rebuilt>>>,
) {
    let fold = holding_the_fold_write(app).await;
    let rebuild = replay_leaderboard(app);
    until(
        app,
        "the fold's write to wait for its checkpoint row",
        FOLD_WRITE_WAITS,
    )
    .await;
    (fold, rebuild)
}

/// Lets a held replay go (`release` on its holder) while a long reader of
/// the live table holds the swap at its lock; asserts that the copies stand
/// at `head` when the swap asks for it (`at` says so from where they stand),
/// then lets the swap through and waits for the replay.
async fn the_swap_asks_for_its_lock_with_the_copies_at(
    app: &TestApp,
    (holder, release): (&mut sqlx::PgConnection, &str),
    rebuild: tokio::task::JoinHandle<anyhow::Result<Vec<Rebuilt>>>,
    head: i64,
    at: impl FnOnce(i64) -> String,
) {
    let mut report = long_reader(app).await;
    run(holder, release).await;
    until(app, "the swap to wait for the live table", SWAP_WAITS).await;
    let copies: i64 = sqlx::query_scalar(
        "SELECT seq FROM projection_checkpoints WHERE name = 'leaderboard__next'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(copies, head, "{}", at(copies));
    run(&mut report, "COMMIT").await;
    rebuild.await.unwrap().unwrap();
}

/// The live read models go on: 5,001 events written straight into the log
/// and the policy's 2,500 notifications, all applied; their snapshot and
/// the log's length then.
async fn the_live_read_models_go_on(app: &TestApp) -> (BTreeMap<&'static str, Vec<Value>>, i64) {
    let mut quiet = |_, _| {};
    podium::cli::bulk_seed::bulk_from(&app.pool, 1_000_000, 2_500, &mut quiet)
        .await
        .unwrap();
    settle(&app.pool).await;
    let live = snapshot(&app.pool).await;
    let head: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    (live, head)
}

/// Whether a replay's fold write waits for its checkpoint row.
const FOLD_WRITE_WAITS: &str = "SELECT EXISTS(SELECT 1 FROM pg_stat_activity
                                               WHERE wait_event_type = 'Lock'
                                                 AND query LIKE '%INSERT INTO projection_checkpoints%')";

/// A replay of the leaderboard, in a task of its own, on a pool of its own
/// (held at one of its steps, it keeps its connections).
fn replay_leaderboard(app: &TestApp) -> tokio::task::JoinHandle<anyhow::Result<Vec<Rebuilt>>> {
    let url = app.db.url();
    tokio::spawn(async move {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .connect(&url)
            .await?;
        let mut progress = |_: u64, _: u64| {};
        replay(&pool, &Scope::Leaderboard.read_models(), &mut progress).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_waiting_for_a_long_reader_leaves_the_leaderboard_readable() {
    use sqlx::Connection;
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 1).await;
    traffic(&app, &tests, 20, 5).await;
    settle(&app.pool).await;
    let live = snapshot(&app.pool).await;
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM lb_entries")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // A long reader of the leaderboard's table (a report, a dump), open
    // until the test ends it.
    let mut report = long_reader(&app).await;
    let rebuild = replay_leaderboard(&app);
    // The replay reaches its swap and asks for the table, again and again.
    let mut reader = sqlx::PgConnection::connect(&app.db.url()).await.unwrap();
    for _ in 0..2 {
        until(&app, "the replay to wait for the live table", SWAP_WAITS).await;
        // Other readers queue behind the waiting lock only as long as one
        // try lasts, not for as long as the report runs.
        let read =
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM lb_entries").fetch_one(&mut reader);
        let read = tokio::time::timeout(Duration::from_secs(30), read)
            .await
            .expect("a reader is answered while the replay waits")
            .unwrap();
        assert_eq!(read, entries);
    }
    assert!(!rebuild.is_finished(), "the replay waits for the report");
    run(&mut report, "COMMIT").await;
    rebuild.await.unwrap().unwrap();
    assert_same(&snapshot(&app.pool).await, &live);
}

/// A replay reads every event committed before it reached the end of the
/// log, also those that wait behind a running transaction holding the log
/// back (here one of this database that has an id; another test's `DROP
/// DATABASE` does the same to every database of the cluster): it waits for
/// that transaction to end instead of swapping in a board without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_reads_what_committed_behind_a_transaction_holding_the_log_back() {
    use sqlx::Connection;
    // No workers: nothing else reads the log.
    let app = crate::helpers::spawn_app().await;
    let test = app.published_test().await;
    let submit = |user: String| {
        let app = &app;
        let test = &test;
        async move {
            let token = app.user(&user);
            let attempt = app.started_attempt(test, &token).await;
            let answers = json!({"answers": {"q1": 1, "q2": 0}});
            let response = app.submit(&attempt, &token, Some(answers)).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
    };
    for i in 0..5 {
        submit(format!("before-{i}")).await;
    }
    // A transaction with an id that has said nothing: every event committed
    // after it waits behind it.
    let mut holder = sqlx::PgConnection::connect(&app.db.url()).await.unwrap();
    run(&mut holder, "BEGIN").await;
    run(&mut holder, "SELECT pg_current_xact_id()").await;
    for i in 0..5 {
        submit(format!("behind-{i}")).await;
    }
    let rebuild = replay_leaderboard(&app);
    // The replay has read what it may and asks where the log ends
    // (`log::postgres::last_key`, which nothing else runs here).
    let asked = "SELECT EXISTS(SELECT 1 FROM pg_stat_activity
                   WHERE datname = current_database() AND pid <> pg_backend_pid()
                     AND query LIKE '%ORDER BY events.epoch DESC%')";
    crate::helpers::poll(
        "the replay to wait behind the holder, or to end",
        Duration::from_secs(60),
        || async {
            let waits: bool = sqlx::query_scalar(asked)
                .fetch_one(&app.pool)
                .await
                .unwrap();
            if waits || rebuild.is_finished() {
                Ok(())
            } else {
                Err("neither")
            }
        },
    )
    .await;
    run(&mut holder, "COMMIT").await;
    tokio::time::timeout(Duration::from_secs(60), rebuild)
        .await
        .expect("the replay ends once the holder has")
        .unwrap()
        .unwrap();
    let users: Vec<String> =
        sqlx::query_scalar("SELECT user_id FROM lb_entries WHERE test_id::text = $1 ORDER BY 1")
            .bind(&test)
            .fetch_all(&app.pool)
            .await
            .unwrap();
    let expected: Vec<String> = (0..5)
        .map(|i| format!("before-{i}"))
        .chain((0..5).map(|i| format!("behind-{i}")))
        .collect();
    assert_eq!(
        users, expected,
        "every submission, also those behind the holder"
    );
}

/// What the log takes in while a replay writes its folds and builds its
/// indexes is applied to the copies before the swap asks for its lock on
/// the live tables, which every query of them waits behind: the swap then
/// applies only what came during its last batch, not a backlog's tail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_applies_what_came_while_it_wrote_before_it_locks_the_live_tables() {
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 1).await;
    traffic(&app, &tests, 20, 5).await;
    settle(&app.pool).await;
    let (mut fold, rebuild) = replay_held_at_its_fold_write(&app).await;
    let folded: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // The tail: submissions (and the policy's notifications) the fold did
    // not read.
    traffic(&app, &tests, 15, 7).await;
    settle(&app.pool).await;
    let head: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(head > folded, "the tail was written: {folded} then {head}");
    let live = snapshot(&app.pool).await;
    // Asking for the lock, the copies have the tail already.
    let at = |copies| {
        format!("the copies at {copies} when the swap asks for its lock, the log at {head} (folded to {folded})")
    };
    the_swap_asks_for_its_lock_with_the_copies_at(&app, (&mut fold, "ROLLBACK"), rebuild, head, at)
        .await;
    assert_same(&snapshot(&app.pool).await, &live);
}

/// A rebuilt leaderboard records no moves: when it holds submissions the
/// live one never applied (its owner stood still while they were written),
/// cursors from before them cannot be continued exactly, and the moves
/// horizon says so, though the swap itself applied none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_past_the_live_leaderboard_marks_the_moves_it_did_not_record() {
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 1).await;
    traffic(&app, &tests, 10, 3).await;
    settle(&app.pool).await;
    let live: i64 =
        sqlx::query_scalar("SELECT seq FROM projection_checkpoints WHERE name = 'leaderboard'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    // The leaderboard's lease taken by an owner that never applies: its
    // worker stands by, the fence keeps it from writing.
    sqlx::query(
        "UPDATE leases SET owner = 'elsewhere', token = token + 1,
                           expires_at = now() + interval '1 day'
          WHERE name = $1",
    )
    .bind(podium::projector::lease_name("leaderboard"))
    .execute(&app.pool)
    .await
    .unwrap();
    traffic(&app, &tests, 10, 4).await;
    assert_eq!(
        sqlx::query_scalar::<_, i64>(
            "SELECT seq FROM projection_checkpoints WHERE name = 'leaderboard'"
        )
        .fetch_one(&app.pool)
        .await
        .unwrap(),
        live,
        "the live leaderboard stood still"
    );
    let mut progress = |_: u64, _: u64| {};
    let rebuilt = replay(&app.pool, &Scope::Leaderboard.read_models(), &mut progress)
        .await
        .unwrap();
    // The last submission the rebuilt leaderboard holds (those the policy
    // still held back from readers of the log may come after it), by its
    // seq in the log.
    let last: i64 = sqlx::query_scalar(
        "SELECT max(seq) FROM (
             SELECT row_number() OVER (ORDER BY epoch, txid, position) AS seq, event_type
               FROM events) numbered
          WHERE event_type = 'AttemptSubmitted' AND seq <= $1",
    )
    .bind(rebuilt[0].checkpoint as i64)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        last > live,
        "submissions after the live checkpoint {live} in the rebuilt leaderboard: up to {last}"
    );
    let horizon: i64 = sqlx::query_scalar("SELECT seq FROM lb_moves_horizon")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(horizon, last, "the moves horizon after the replay");
}

/// A swap held at its lock while the live read models go on (thousands of
/// events, more than it applies beyond them) swaps its copies in no
/// further back than the live ones were: no read model goes back in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_held_while_the_live_read_models_went_on_swaps_in_as_far_as_they_got() {
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 1).await;
    traffic(&app, &tests, 10, 3).await;
    settle(&app.pool).await;
    let mut report = long_reader(&app).await;
    let rebuild = replay_leaderboard(&app);
    until(&app, "the swap to wait for the live table", SWAP_WAITS).await;
    // Applied by the live workers between the swap's tries.
    let (live, head) = the_live_read_models_go_on(&app).await;
    run(&mut report, "COMMIT").await;
    let rebuilt = rebuild.await.unwrap().unwrap();
    assert_eq!(
        rebuilt[0].checkpoint, head as u64,
        "the copies swapped in at"
    );
    assert_same(&snapshot(&app.pool).await, &live);
}

/// A rebuild held while it catches its copies up (a paused runner), while
/// the live read models go on by thousands of events: the copies catch up
/// with them too before the swap asks for its lock, so the swap applies
/// only a few batches under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_held_while_catching_up_reach_the_live_read_models_before_the_swap_locks() {
    let (app, _) = spawn_app_with_workers().await;
    let tests = published_tests(&app, 1).await;
    traffic(&app, &tests, 10, 3).await;
    settle(&app.pool).await;
    let (mut fold, rebuild) = replay_held_at_its_fold_write(&app).await;
    // The index builds, behind a writer of the copy whose lock is asked for
    // while the fold's write holds the table: it comes first when that
    // write commits.
    let mut builds = holder(&app).await;
    let builds = tokio::spawn(async move {
        run(
            &mut builds,
            "LOCK TABLE lb_entries__next IN ROW EXCLUSIVE MODE",
        )
        .await;
        builds
    });
    until(&app,
        "the copy's writer to wait for the fold's write",
        "SELECT EXISTS(SELECT 1 FROM pg_stat_activity
                        WHERE wait_event_type = 'Lock' AND query LIKE 'LOCK TABLE lb_entries__next%')",
    )
    .await;
    run(&mut fold, "ROLLBACK").await;
    let mut builds = builds.await.unwrap();
    until(
        &app,
        "an index build to wait",
        "SELECT EXISTS(SELECT 1 FROM pg_stat_activity
                        WHERE wait_event_type = 'Lock' AND query LIKE 'CREATE%lb_entries__next%')",
    )
    .await;
    // A tail for the catch-up, whose first batch then waits for the copies'
    // checkpoint row.
    traffic(&app, &tests, 5, 7).await;
    settle(&app.pool).await;
    let mut catch_up = holder(&app).await;
    run(
        &mut catch_up,
        "SELECT 1 FROM projection_checkpoints WHERE name = 'leaderboard__next' FOR UPDATE",
    )
    .await;
    run(&mut builds, "COMMIT").await;
    until(
        &app,
        "the catch-up to wait for the copies' checkpoint",
        "SELECT EXISTS(SELECT 1 FROM pg_stat_activity
                        WHERE wait_event_type = 'Lock' AND query LIKE '%FOR UPDATE OF c%')",
    )
    .await;
    let (live, head) = the_live_read_models_go_on(&app).await;
    let at = |_| "the copies when the swap asks for its lock, against the live read models".into();
    the_swap_asks_for_its_lock_with_the_copies_at(
        &app,
        (&mut catch_up, "COMMIT"),
        rebuild,
        head,
        at,
    )
    .await;
    assert_same(&snapshot(&app.pool).await, &live);
}
