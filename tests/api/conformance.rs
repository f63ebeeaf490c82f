//! The conformance suite: one set of behaviour tests run against both
//! adapter sets — `embedded::*` (the in-process log, read models and
//! change delivery) and `production::*` (Postgres, the outbox relay, NATS
//! JetStream and the projection workers) — so that the embedded mode cannot
//! drift from production; and a third time on `single_node::*` (Postgres
//! without NATS: the relay feeds the node's own projections). Each scenario drives the public HTTP API only
//! (the demo seed included: `podium seed` works against either).
//!
//! The production variants need Postgres and NATS. Without them they say
//! they were skipped (and why), unless `PODIUM_REQUIRE_SERVICES` is set, as
//! `.ci/run` does: then they fail.

use std::future::Future;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::helpers::{
    sample_test, spawn_app_with, spawn_embedded_with, spawn_single_node_with, TestApp,
};
use crate::nats::{nats_url, unique_prefix};
use crate::sse::SseClient;

/// How long a read model may take to show a change.
const CONVERGE: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adapters {
    Embedded,
    Production,
    /// One node on Postgres without NATS: the relay feeds its projections.
    SingleNode,
}

/// Whether Postgres and NATS answer; if not, says the test was skipped —
/// or fails it when `PODIUM_REQUIRE_SERVICES` is set.
pub async fn services_or_skip(test: &str) -> bool {
    let postgres = reachable("127.0.0.1:5432").await;
    let nats = reachable(
        nats_url()
            .trim_start_matches("nats://")
            .trim_end_matches('/'),
    )
    .await;
    if postgres && nats {
        return true;
    }
    let missing = match (postgres, nats) {
        (false, false) => "Postgres (127.0.0.1:5432) and NATS",
        (false, true) => "Postgres (127.0.0.1:5432)",
        _ => "NATS",
    };
    assert!(
        std::env::var_os("PODIUM_REQUIRE_SERVICES").is_none(),
        "{test}: {missing} not reachable, and PODIUM_REQUIRE_SERVICES forbids skipping"
    );
    eprintln!("SKIPPED {test}: {missing} not reachable (start them with scripts/services)");
    false
}

async fn reachable(address: &str) -> bool {
    let connect = tokio::net::TcpStream::connect(address);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), connect).await,
        Ok(Ok(_))
    )
}

/// A server on `adapters`, with `configure` applied; `None` when the
/// production services are absent (and skipping is allowed).
pub async fn serve(
    adapters: Adapters,
    test: &str,
    configure: impl FnOnce(&mut podium::Settings),
) -> Option<TestApp> {
    Some(match adapters {
        Adapters::Embedded => spawn_embedded_with(configure).await,
        Adapters::Production => {
            if !services_or_skip(test).await {
                return None;
            }
            spawn_app_with(|settings| {
                settings.nats.nats_url = Some(nats_url());
                settings.nats.nats_prefix = unique_prefix();
                configure(settings);
            })
            .await
        }
        Adapters::SingleNode => {
            if !services_or_skip(test).await {
                return None;
            }
            spawn_single_node_with(configure).await
        }
    })
}

/// Waits until `check` returns `Some`, for at most [`CONVERGE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    crate::helpers::poll(what, CONVERGE, || {
        let checked = check();
        async move { checked.await.ok_or("not yet") }
    })
    .await
}

pub async fn json(app: &TestApp, path: &str, token: &str) -> (StatusCode, Value) {
    let response = app.get(path, token).await;
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Submits an attempt of `user` on the sample test with `q1`/`q2` right or
/// wrong (4 and 6 points), returns the score.
async fn take(app: &TestApp, test_id: &str, user: &str, q1: bool, q2: bool) -> u64 {
    let token = app.user(user);
    let attempt = app.started_attempt(test_id, &token).await;
    let answers = json!({"q1": if q1 { 1 } else { 0 }, "q2": if q2 { 0 } else { 1 }});
    let response = app
        .submit(&attempt, &token, Some(json!({ "answers": answers })))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    body["score"].as_u64().unwrap()
}

/// The leaderboard once it has `total` entries and `ready` holds.
async fn board_when(
    app: &TestApp,
    test_id: &str,
    total: u64,
    ready: impl Fn(&Value) -> bool,
) -> Value {
    let token = app.user("observer");
    let path = format!("/v1/tests/{test_id}/leaderboard?limit=200");
    eventually("the leaderboard", || async {
        let (status, body) = json(app, &path, &token).await;
        (status == StatusCode::OK && body["total"] == total && ready(&body)).then_some(body)
    })
    .await
}

fn users(entries: &Value) -> Vec<&str> {
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["user_id"].as_str().unwrap())
        .collect()
}

/// Commands: grading from the answer key, refusals, idempotent retries.
pub async fn commands_grade_refuse_and_replay(adapters: Adapters) {
    let Some(app) = serve(adapters, "commands_grade_refuse_and_replay", |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt = app.started_attempt(&test_id, &alice).await;
    assert_eq!(
        app.answer(&attempt, "q1", &alice, 1).await.status(),
        StatusCode::NO_CONTENT
    );
    let submitted = app
        .submit(&attempt, &alice, Some(json!({"answers": {"q2": 1}})))
        .await;
    assert_eq!(submitted.status(), StatusCode::OK);
    let body: Value = submitted.json().await.unwrap();
    assert_eq!(
        (body["score"].as_u64(), body["correct"].as_u64()),
        (Some(4), Some(1))
    );
    let again = app.submit(&attempt, &alice, None).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let (status, shown) = json(&app, &format!("/v1/attempts/{attempt}"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown["status"], "submitted");
    assert_eq!(shown["score"], 4);
    // Not the owner's: refused. A bad choice: refused, nothing recorded.
    let (status, _) = json(&app, &format!("/v1/attempts/{attempt}"), &app.user("bob")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let second = app.started_attempt(&test_id, &alice).await;
    let bad = app.answer(&second, "q1", &alice, 7).await;
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let (_, shown) = json(&app, &format!("/v1/attempts/{second}"), &alice).await;
    assert_eq!(shown["answers"], json!({}));
    // The same Idempotency-Key and body: the first answer, nothing new.
    let publish = || {
        app.request(reqwest::Method::POST, "/v1/tests", Some(&app.admin()))
            .header("Idempotency-Key", "publish-once")
            .json(&sample_test())
            .send()
    };
    let first = publish().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first_body: Value = first.json().await.unwrap();
    let repeat = publish().await.unwrap();
    assert_eq!(repeat.status(), StatusCode::CREATED);
    assert_eq!(repeat.headers()["idempotent-replayed"], "true");
    assert_eq!(repeat.json::<Value>().await.unwrap(), first_body);
    // The catalog is a read model too: it follows.
    eventually("both tests in the catalog", || async {
        let (_, catalog) = json(&app, "/v1/tests", &alice).await;
        (catalog["items"].as_array()?.len() == 2).then_some(())
    })
    .await;
}

/// The leaderboard: order (score, then earliest, then id), attempts, cursor
/// walks, offsets, neighbours.
pub async fn leaderboard_ranks_pages_and_neighbours(adapters: Adapters) {
    let Some(app) = serve(adapters, "leaderboard_ranks_pages_and_neighbours", |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    assert_eq!(take(&app, &test_id, "u1", true, true).await, 10);
    assert_eq!(take(&app, &test_id, "u2", true, false).await, 4);
    assert_eq!(take(&app, &test_id, "u3", false, true).await, 6);
    assert_eq!(take(&app, &test_id, "u4", true, true).await, 10);
    assert_eq!(take(&app, &test_id, "u5", false, false).await, 0);
    // u2 improves to 10, later than u1 and u4; a worse retry of u1 counts
    // as an attempt only.
    assert_eq!(take(&app, &test_id, "u2", true, true).await, 10);
    assert_eq!(take(&app, &test_id, "u1", false, false).await, 0);
    let board = board_when(&app, &test_id, 5, |b| {
        b["entries"][0]["attempts"] == 2 && b["entries"][2]["user_id"] == "u2"
    })
    .await;
    let entries = &board["entries"];
    assert_eq!(users(entries), ["u1", "u4", "u2", "u3", "u5"]);
    let ranks: Vec<u64> = (0..5)
        .map(|i| entries[i]["rank"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks, [1, 2, 3, 4, 5]);
    assert_eq!(entries[0]["score"], 10);
    assert_eq!(entries[2]["attempts"], 2);
    assert_eq!(entries[3]["max_score"], 10);
    assert!(board["next_cursor"].is_null());

    // A cursor walk two at a time sees each entry once, in order.
    let token = app.user("u1");
    let mut walked = Vec::new();
    let mut path = format!("/v1/tests/{test_id}/leaderboard?limit=2");
    loop {
        let (status, page) = json(&app, &path, &token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(page["total"], 5);
        walked.extend(users(&page["entries"]).into_iter().map(String::from));
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        path = format!("/v1/tests/{test_id}/leaderboard?limit=2&cursor={cursor}");
    }
    assert_eq!(walked, ["u1", "u4", "u2", "u3", "u5"]);
    let (_, page) = json(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard?limit=2&offset=3"),
        &token,
    )
    .await;
    assert_eq!(users(&page["entries"]), ["u3", "u5"]);
    assert_eq!(page["entries"][0]["rank"], 4);

    let (status, around) = json(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/users/u3?radius=1"),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(around["entry"]["rank"], 4);
    assert_eq!(users(&around["above"]), ["u2"]);
    assert_eq!(users(&around["below"]), ["u5"]);
    let (status, _) = json(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/users/nobody"),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let foreign = json(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard?cursor=bm90LWEtY3Vyc29y"),
        &token,
    )
    .await;
    assert_eq!(foreign.0, StatusCode::BAD_REQUEST);
}

/// The feed: announcements and the policy's notifications (graded,
/// personal best, overtaken), exact unread counts, reads.
pub async fn feed_counts_notifications_and_reads(adapters: Adapters) {
    let Some(app) = serve(adapters, "feed_counts_notifications_and_reads", |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    let sent = app
        .post(
            "/v1/notifications",
            &app.admin(),
            Some(json!({"user_ids": ["carol"], "title": "Welcome", "body": "Hello"})),
        )
        .await;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    take(&app, &test_id, "carol", true, false).await; // 4: rank 1
    take(&app, &test_id, "dave", true, true).await; // 10: carol overtaken
    take(&app, &test_id, "carol", true, true).await; // 10: carol's personal best
    let carol = app.user("carol");
    let feed = eventually("carol's five notifications", || async {
        let (_, feed) = json(&app, "/v1/me/notifications", &carol).await;
        (feed["unread_count"] == 5).then_some(feed)
    })
    .await;
    let kinds: Vec<&str> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "announcement",
            "attempt_graded",
            "attempt_graded",
            "personal_best",
            "rank_overtaken"
        ]
    );
    assert_eq!(kinds.last(), Some(&"announcement"), "newest first");
    let (_, count) = json(&app, "/v1/me/notifications/unread-count", &carol).await;
    assert_eq!(count["unread_count"], 5);

    let first = feed["items"][0]["id"].as_str().unwrap();
    let read = app
        .post(&format!("/v1/me/notifications/{first}/read"), &carol, None)
        .await;
    assert_eq!(read.status(), StatusCode::NO_CONTENT);
    eventually("one read", || async {
        let (_, count) = json(&app, "/v1/me/notifications/unread-count", &carol).await;
        (count["unread_count"] == 4).then_some(())
    })
    .await;
    let (_, unread) = json(&app, "/v1/me/notifications?unread_only=true", &carol).await;
    assert_eq!(unread["items"].as_array().unwrap().len(), 4);
    let all = app
        .post("/v1/me/notifications/read-all", &carol, None)
        .await;
    assert_eq!(all.status(), StatusCode::NO_CONTENT);
    let feed = eventually("all read", || async {
        let (_, feed) = json(&app, "/v1/me/notifications", &carol).await;
        (feed["unread_count"] == 0).then_some(feed)
    })
    .await;
    assert!(feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["read_at"].is_string()));
    // Paging by cursor: two pages of 3 and 2.
    let (_, page) = json(&app, "/v1/me/notifications?limit=3", &carol).await;
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, rest) = json(
        &app,
        &format!("/v1/me/notifications?limit=3&cursor={cursor}"),
        &carol,
    )
    .await;
    assert_eq!(rest["items"].as_array().unwrap().len(), 2);
    assert!(rest["next_cursor"].is_null());
    let (_, dave) = json(&app, "/v1/me/notifications", &app.user("dave")).await;
    assert_eq!(dave["items"].as_array().unwrap().len(), 1);
}

/// SSE: a client that reconnects with Last-Event-ID gets exactly what it
/// missed, then live events, nothing repeated.
pub async fn sse_resume_gets_exactly_what_was_missed(adapters: Adapters) {
    let Some(app) = serve(adapters, "sse_resume_gets_exactly_what_was_missed", |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    let token = app.user("watcher");
    let path = format!("/v1/tests/{test_id}/leaderboard/stream");
    let mut stream = SseClient::open(&app, &path, &token, None).await;
    take(&app, &test_id, "amy", true, true).await;
    let first = stream
        .next_named("entry", CONVERGE)
        .await
        .expect("amy's entry arrives live");
    assert_eq!(first.data["user_id"], "amy");
    assert_eq!(first.data["rank"], 1);
    drop(stream);

    take(&app, &test_id, "ben", true, false).await;
    take(&app, &test_id, "cat", true, true).await;
    board_when(&app, &test_id, 3, |_| true).await;
    let mut resumed = SseClient::open(&app, &path, &token, Some(&first.id)).await;
    let mut missed = Vec::new();
    for _ in 0..2 {
        let event = resumed
            .next_named("entry", CONVERGE)
            .await
            .expect("a missed entry");
        missed.push((event.data["user_id"].clone(), event.data["rank"].clone()));
    }
    assert_eq!(missed, [(json!("ben"), json!(3)), (json!("cat"), json!(2))]);
    take(&app, &test_id, "dan", false, true).await;
    let live = resumed
        .next_named("entry", CONVERGE)
        .await
        .expect("dan's entry arrives live");
    assert_eq!(live.data["user_id"], "dan", "nothing repeated before it");
    assert!(live.id.parse::<u64>().unwrap() > first.id.parse::<u64>().unwrap());

    // The feed stream resumes the same way.
    let amy = app.user("amy");
    let mut feed = SseClient::open(&app, "/v1/me/notifications/stream", &amy, None).await;
    let start = feed
        .next_named("unread_count", CONVERGE)
        .await
        .expect("the unread count first");
    drop(feed);
    app.post(
        "/v1/notifications",
        &app.admin(),
        Some(json!({"user_ids": ["amy"], "title": "Missed", "body": "while away"})),
    )
    .await;
    let mut feed =
        SseClient::open(&app, "/v1/me/notifications/stream", &amy, Some(&start.id)).await;
    let deadline = Instant::now() + CONVERGE;
    let missed = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = feed
            .next_named("notification", left)
            .await
            .expect("the missed announcement");
        if event.data["title"] == "Missed" {
            break event;
        }
    };
    assert_eq!(missed.data["kind"], "announcement");
}

/// Replay: read models rebuilt from the log answer exactly as before.
pub async fn a_rebuild_from_the_log_answers_the_same(adapters: Adapters) {
    let dir = std::env::temp_dir().join(format!("podium-conformance-{}", uuid::Uuid::new_v4()));
    let file = dir.join("events.jsonl");
    let data_file = file.clone();
    let Some(app) = serve(
        adapters,
        "a_rebuild_from_the_log_answers_the_same",
        move |s| {
            if adapters == Adapters::Embedded {
                s.data_file = Some(data_file);
            }
        },
    )
    .await
    else {
        return;
    };
    let test_id = app.published_test().await;
    let other = app.published_test().await;
    // A collection of the test, which the other test joins later.
    let admin = app.admin();
    let body = json!({"title": "Both", "test_ids": [test_id]});
    let response = app.post("/v1/collections", &admin, Some(body)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let collection: Value = response.json().await.unwrap();
    let collection = collection["id"].as_str().unwrap().to_string();
    for (user, q1, q2) in [
        ("p", true, true),
        ("q", false, true),
        ("r", true, false),
        ("q", true, true),
    ] {
        take(&app, &test_id, user, q1, q2).await;
    }
    take(&app, &other, "r", true, true).await;
    take(&app, &other, "s", false, true).await;
    let response = app
        .request(
            reqwest::Method::PUT,
            &format!("/v1/collections/{collection}/tests/{other}"),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    board_when(&app, &test_id, 3, |b| b["entries"][1]["user_id"] == "q").await;
    let token = app.user("q");
    let combined = eventually("the collection with both tests", || async {
        let path = format!("/v1/collections/{collection}/leaderboard");
        let (_, body) = json(&app, &path, &token).await;
        (body["total"] == 4).then_some(body)
    })
    .await;
    // r: 4 + 10 on both tests, reached at the second; p and q: 10 on one.
    assert_eq!(users(&combined["entries"]), ["r", "p", "q", "s"]);
    // Every notification of q (2 graded, 1 personal best) is in the feed.
    let q = app.user("q");
    eventually("q's notifications", || async {
        let (_, feed) = json(&app, "/v1/me/notifications", &q).await;
        (feed["unread_count"] == 3).then_some(())
    })
    .await;
    let before = views(&app, &test_id, &collection).await;
    let rebuilt = match adapters {
        Adapters::Embedded => {
            drop(app);
            // A new process on the same file: the log is read back and every
            // read model is rebuilt by replaying it.
            spawn_embedded_with(|s| s.data_file = Some(file.clone())).await
        }
        Adapters::Production | Adapters::SingleNode => {
            let mut progress = |_, _| {};
            podium::projector::replay::replay(
                &app.pool,
                &podium::projector::replay::Scope::All.read_models(),
                &mut progress,
            )
            .await
            .expect("the replay runs");
            // A fresh instance (an empty cache) reads the swapped-in models.
            app.another_instance(|_| {}).await
        }
    };
    let after = eventually("the rebuilt views", || async {
        let after = views(&rebuilt, &test_id, &collection).await;
        (after == before).then_some(after)
    })
    .await;
    assert_eq!(after[2]["total"], 3);
    assert_eq!(after[0]["total"], 4);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `podium seed`: demo data through the public API fills the catalog, the
/// leaderboards (with spread scores) and the demo learner's feed.
pub async fn the_demo_seed_fills_tests_leaderboards_and_feeds(adapters: Adapters) {
    let Some(app) = serve(
        adapters,
        "the_demo_seed_fills_tests_leaderboards_and_feeds",
        |_| {},
    )
    .await
    else {
        return;
    };
    let keys = podium::auth::JwtKeys::new(crate::helpers::SECRET).unwrap();
    let size = podium::cli::demo_seed::DemoSize {
        learners: 12,
        attempts: 60,
    };
    let seeded = podium::cli::demo_seed::seed(&app.address, &keys, size)
        .await
        .unwrap();
    assert_eq!(seeded.tests.len(), 3);
    let token = &seeded.learner_token;
    eventually("the three tests in the catalog", || async {
        let (_, catalog) = json(&app, "/v1/tests", token).await;
        (catalog["items"].as_array()?.len() == 3).then_some(())
    })
    .await;
    // Every attempt reaches a leaderboard; scores are spread, not all equal.
    let scores = eventually("the demo leaderboards fill", || async {
        let mut attempts = 0;
        let mut scores = std::collections::BTreeSet::new();
        for test in &seeded.tests {
            let path = format!("/v1/tests/{test}/leaderboard?limit=200");
            let (_, page) = json(&app, &path, token).await;
            for entry in page["entries"].as_array()? {
                attempts += entry["attempts"].as_u64()?;
                scores.insert(entry["score"].as_u64()?);
            }
        }
        (attempts == 60).then_some(scores)
    })
    .await;
    assert!(scores.len() >= 3, "scores are not spread: {scores:?}");
    // The collection of the three sums each learner's bests over them: its
    // board holds everyone who took any, and counts their tests.
    let collection = format!(
        "/v1/collections/{}/leaderboard?limit=200",
        seeded.collection
    );
    let (_, tests) = json(
        &app,
        &format!("/v1/collections/{}", seeded.collection),
        token,
    )
    .await;
    assert_eq!(tests["test_ids"], json!(seeded.tests));
    eventually("the collection's board", || async {
        let mut learners = std::collections::BTreeMap::new();
        for test in &seeded.tests {
            let path = format!("/v1/tests/{test}/leaderboard?limit=200");
            let (_, page) = json(&app, &path, token).await;
            for entry in page["entries"].as_array()? {
                *learners
                    .entry(entry["user_id"].as_str()?.to_string())
                    .or_insert(0) += 1;
            }
        }
        let (_, board) = json(&app, &collection, token).await;
        let taken: std::collections::BTreeMap<String, u64> = board["entries"]
            .as_array()?
            .iter()
            .map(|e| {
                Some((
                    e["user_id"].as_str()?.to_string(),
                    e["tests_taken"].as_u64()?,
                ))
            })
            .collect::<Option<_>>()?;
        (taken == learners).then_some(())
    })
    .await;
    // The demo learner has the two announcements (and graded attempts).
    eventually("the announcements arrive", || async {
        let (_, feed) = json(&app, "/v1/me/notifications?limit=200", token).await;
        let announcements = feed["items"]
            .as_array()?
            .iter()
            .filter(|item| item["kind"] == "announcement")
            .count();
        (announcements == 2).then_some(())
    })
    .await;
    let (status, _) = json(&app, "/v1/me/attempts", token).await;
    assert_eq!(status, StatusCode::OK);
}

/// Windows: each submission counts on its day's, week's and month's boards
/// beside all time; past periods are boards of their own; links and cursors
/// stay on their board; bad windows and periods are refused.
pub async fn leaderboard_windows(adapters: Adapters) {
    let Some(app) = serve(adapters, "leaderboard_windows", |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    assert_eq!(take(&app, &test_id, "w1", true, true).await, 10);
    assert_eq!(take(&app, &test_id, "w2", true, false).await, 4);
    assert_eq!(take(&app, &test_id, "w3", false, true).await, 6);
    let all = board_when(&app, &test_id, 3, |_| true).await;
    assert_eq!(
        (&all["window"], &all["period_start"], &all["period_end"]),
        (&json!("all"), &Value::Null, &Value::Null)
    );
    let token = app.user("observer");
    let time = |v: &Value| {
        chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    for (window, days) in [("day", 1..=1), ("week", 7..=7), ("month", 28..=31)] {
        let path = format!("/v1/tests/{test_id}/leaderboard?window={window}");
        let board = eventually("the windowed board", || async {
            let (status, body) = json(&app, &path, &token).await;
            (status == StatusCode::OK && body["total"] == 3).then_some(body)
        })
        .await;
        assert_eq!(users(&board["entries"]), ["w1", "w3", "w2"], "{window}");
        assert_eq!(board["window"], window);
        let (start, end) = (time(&board["period_start"]), time(&board["period_end"]));
        let now = chrono::Utc::now();
        assert!(start <= now && now < end, "{window}: {start} – {end}");
        assert!(days.contains(&(end - start).num_days()), "{window}");
        assert_eq!(start.time(), chrono::NaiveTime::MIN);
        use chrono::Datelike;
        match window {
            "week" => assert_eq!(start.weekday(), chrono::Weekday::Mon),
            "month" => assert_eq!(start.day(), 1),
            _ => {}
        }
        // The period before is a board of its own: empty.
        let before = (start - chrono::Duration::days(1)).format("%Y-%m-%d");
        let (status, past) = json(&app, &format!("{path}&period={before}"), &token).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (
                past["total"].as_u64(),
                past["entries"].as_array().map(Vec::len)
            ),
            (Some(0), Some(0))
        );
        assert_eq!(time(&past["period_end"]), start);
        // The same period named by a time inside it.
        let inside = (start + chrono::Duration::hours(5)).to_rfc3339();
        let (_, named) = json(
            &app,
            &format!("{path}&period={}", inside.replace('+', "%2B")),
            &token,
        )
        .await;
        assert_eq!(named["period_start"], board["period_start"]);
        assert_eq!(named["total"], 3);
    }
    // Neighbours in a window; a link and a cursor stay on their board.
    let (status, around) = json(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/users/w3?window=week&radius=1"),
        &token,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (around["entry"]["rank"].as_u64(), around["window"].as_str()),
        (Some(2), Some("week"))
    );
    assert_eq!(users(&around["above"]), ["w1"]);
    let month = format!("/v1/tests/{test_id}/leaderboard?window=month&limit=1");
    let (link, first, second) = first_and_next(&app, &month, &token).await;
    assert!(link.contains("window=month&period="), "{link}");
    assert_eq!(users(&second["entries"]), ["w3"]);
    assert_eq!(second["entries"][0]["rank"], 2);
    let cursor = first["next_cursor"].as_str().unwrap();
    let foreign = app
        .get(
            &format!("/v1/tests/{test_id}/leaderboard?cursor={cursor}"),
            &token,
        )
        .await;
    crate::helpers::assert_problem(foreign, StatusCode::BAD_REQUEST).await;
    // Refused: an unknown window, a malformed period, a period of all time;
    // on a stream, a past period (streams follow the current one).
    let board = format!("/v1/tests/{test_id}/leaderboard");
    let unknown = uuid::Uuid::new_v4();
    refused(
        &app,
        &token,
        StatusCode::UNPROCESSABLE_ENTITY,
        [
            format!("{board}?window=year"),
            format!("{board}?window=day&period=yesterday"),
            format!("{board}?window=day&period=2026-02-30"),
            format!("{board}?period=2026-12-01"),
            format!("{board}/stream?window=day&period=2026-12-01"),
            format!("{board}/stream?window=fortnight"),
        ],
    )
    .await;
    let nowhere = format!("/v1/tests/{unknown}/leaderboard?window=day");
    refused(&app, &token, StatusCode::NOT_FOUND, [nowhere]).await;
}

/// The page at `path` and the one its `Link: rel="next"` leads to, with
/// that link.
async fn first_and_next(app: &TestApp, path: &str, token: &str) -> (String, Value, Value) {
    let first = app.get(path, token).await;
    let link = first.headers()["link"].to_str().unwrap().to_string();
    let first: Value = first.json().await.unwrap();
    let next = link.trim_start_matches('<').split('>').next().unwrap();
    let (_, second) = json(app, next, token).await;
    (link, first, second)
}

/// Each of `paths`, read by `token`, is refused with `status` and a problem
/// document.
async fn refused(
    app: &TestApp,
    token: &str,
    status: StatusCode,
    paths: impl IntoIterator<Item = String>,
) {
    for path in paths {
        let response = app.get(&path, token).await;
        crate::helpers::assert_problem(response, status).await;
    }
}

/// A windowed stream at a period's end: the clock (a manual one, which the
/// server's commands, windows and stream writers read) is moved past
/// midnight into a leap day; the stream says `period` (id 0) and goes on
/// with the new day's board, which holds only what was submitted on it.
pub async fn a_windowed_stream_rolls_over_at_the_period_end(adapters: Adapters) {
    let Some((app, clock)) = serve_at(
        adapters,
        "a_windowed_stream_rolls_over_at_the_period_end",
        "2028-02-28T23:59:00Z",
    )
    .await
    else {
        return;
    };
    let test_id = app.published_test().await;
    let token = app.user("watcher");
    let path = format!("/v1/tests/{test_id}/leaderboard/stream?window=day");
    let mut stream = SseClient::open(&app, &path, &token, None).await;
    let opening = stream.next(CONVERGE).await.expect("the opening event");
    assert_eq!(
        (opening.event.as_str(), &opening.data["period_start"]),
        ("period", &json!("2028-02-28T00:00:00Z")),
        "a windowed stream says first which period it follows"
    );
    // More streams of the same board, one of them gone before midnight:
    // every stream left moves on.
    let mut second = SseClient::open(&app, &path, &token, None).await;
    let gone = SseClient::open(&app, &path, &token, None).await;
    take(&app, &test_id, "late", true, false).await;
    let late = stream
        .next_named("entry", CONVERGE)
        .await
        .expect("the entry of the day's last submission");
    assert_eq!(
        (&late.data["user_id"], &late.data["rank"]),
        (&json!("late"), &json!(1))
    );

    drop(gone);
    clock.advance(Duration::from_secs(90));
    let period = stream
        .next_named("period", CONVERGE)
        .await
        .expect("the period event at midnight");
    assert_eq!(period.id, "0");
    assert_eq!(
        period.data,
        json!({
            "window": "day",
            "period_start": "2028-02-29T00:00:00Z",
            "period_end": "2028-03-01T00:00:00Z",
        })
    );
    let opened = second
        .next_named("period", CONVERGE)
        .await
        .expect("opening");
    assert_eq!(opened.data["period_start"], "2028-02-28T00:00:00Z");
    let other = second
        .next_named("period", CONVERGE)
        .await
        .expect("every stream of the board moves on");
    assert_eq!(other.data["period_start"], "2028-02-29T00:00:00Z");
    take(&app, &test_id, "early", false, true).await;
    let early = stream
        .next_named("entry", CONVERGE)
        .await
        .expect("the new day's first entry");
    let also = second
        .next_named("entry", CONVERGE)
        .await
        .expect("the new day's first entry on the other stream");
    assert_eq!(also.data["user_id"], "early");
    assert_eq!(
        (&early.data["user_id"], &early.data["rank"]),
        (&json!("early"), &json!(1)),
        "the new day's board holds only its own submissions"
    );
    // The pages agree: each day is a board of its own.
    let day = |period: &str| format!("/v1/tests/{test_id}/leaderboard?window=day{period}");
    let (_, today) = json(&app, &day(""), &token).await;
    assert_eq!(users(&today["entries"]), ["early"]);
    assert_eq!(today["period_start"], "2028-02-29T00:00:00Z");
    let (_, eve) = json(&app, &day("&period=2028-02-28"), &token).await;
    assert_eq!(users(&eve["entries"]), ["late"]);
    // A client that was away at midnight and reconnects with the old day's
    // id is told the period first.
    let mut back = SseClient::open(&app, &path, &token, Some(&late.id)).await;
    let told = back.next(CONVERGE).await.expect("the opening event");
    assert_eq!(
        (told.event.as_str(), &told.data["period_start"]),
        ("period", &json!("2028-02-29T00:00:00Z"))
    );
    // A client that reconnects with the period event's id gets the new
    // day's board from its start.
    drop(stream);
    let mut resumed = SseClient::open(&app, &path, &token, Some("0")).await;
    let again = resumed
        .next_named("entry", CONVERGE)
        .await
        .expect("the new day's entries on resume");
    assert_eq!(again.data["user_id"], "early");
}

/// Boards as of past instants: submissions a minute apart on a manual
/// clock; each instant's board holds exactly what was submitted by then,
/// ranked as the live board ranks; links and cursors keep their instant.
pub async fn leaderboard_as_of(adapters: Adapters) {
    let Some((app, clock)) = serve_at(adapters, "leaderboard_as_of", "2027-05-10T10:00:00Z").await
    else {
        return;
    };
    let test_id = app.published_test().await;
    let minute = Duration::from_secs(60);
    take(&app, &test_id, "amy", true, false).await; // 10:00, 4
    clock.advance(minute);
    take(&app, &test_id, "bob", true, true).await; // 10:01, 10
    clock.advance(minute);
    take(&app, &test_id, "amy", true, true).await; // 10:02, 10 (after bob)
    clock.advance(minute);
    take(&app, &test_id, "cid", false, true).await; // 10:03, 6
    clock.advance(minute * 2);
    let token = app.user("observer");
    let page = |as_of: &str| format!("/v1/tests/{test_id}/leaderboard?as_of={as_of}");
    let now = page("2027-05-10T10:05:00Z");
    let latest = eventually("every attempt recorded", || async {
        let (_, body) = json(&app, &now, &token).await;
        (body["total"] == 3).then_some(body)
    })
    .await;
    let live = board_when(&app, &test_id, 3, |_| true).await;
    assert_eq!(
        latest["entries"], live["entries"],
        "as of now is the live board"
    );
    assert_eq!(latest["as_of"], "2027-05-10T10:05:00Z");
    let ranks = |body: &Value| -> Vec<(String, u64, u64)> {
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["user_id"].as_str().unwrap().to_string(),
                    e["score"].as_u64().unwrap(),
                    e["attempts"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    for (at, expected) in [
        ("2027-05-10T09:59:59Z", vec![]),
        ("2027-05-10T10:00:00Z", vec![("amy", 4, 1)]),
        ("2027-05-10T10:01:30Z", vec![("bob", 10, 1), ("amy", 4, 1)]),
        ("2027-05-10T10:02:00Z", vec![("bob", 10, 1), ("amy", 10, 2)]),
        (
            "2027-05-10T12:03:00%2B02:00",
            vec![("bob", 10, 1), ("amy", 10, 2), ("cid", 6, 1)],
        ),
    ] {
        let (status, body) = json(&app, &page(at), &token).await;
        assert_eq!(status, StatusCode::OK, "{at}");
        let expected: Vec<(String, u64, u64)> = expected
            .into_iter()
            .map(|(u, s, a)| (u.to_string(), s, a))
            .collect();
        assert_eq!(ranks(&body), expected, "as of {at}");
        assert_eq!(body["total"], expected.len());
    }
    // A cursor walk keeps its instant, in the link and in the cursor.
    let walk = format!("{}&limit=1", page("2027-05-10T10:02:00Z"));
    let (link, first, second) = first_and_next(&app, &walk, &token).await;
    assert!(link.contains("as_of=2027-05-10T10:02:00Z"), "{link}");
    assert_eq!(users(&second["entries"]), ["amy"]);
    assert_eq!(second["entries"][0]["rank"], 2);
    let cursor = first["next_cursor"].as_str().unwrap();
    for path in [
        format!("/v1/tests/{test_id}/leaderboard?cursor={cursor}"),
        format!("{}&cursor={cursor}", page("2027-05-10T10:03:00Z")),
    ] {
        let foreign = app.get(&path, &token).await;
        crate::helpers::assert_problem(foreign, StatusCode::BAD_REQUEST).await;
    }
    // Neighbours as of an instant; none before the user's first attempt.
    let around = |user: &str, at: &str| {
        format!("/v1/tests/{test_id}/leaderboard/users/{user}?radius=1&as_of={at}")
    };
    let (status, body) = json(&app, &around("amy", "2027-05-10T10:01:30Z"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            &body["entry"]["rank"],
            &body["as_of"],
            users(&body["above"])
        ),
        (&json!(2), &json!("2027-05-10T10:01:30Z"), vec!["bob"])
    );
    let (status, _) = json(&app, &around("cid", "2027-05-10T10:02:59Z"), &token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Refused: malformed, in the future, with a window, on a stream; an
    // unknown test is 404.
    let board = format!("/v1/tests/{test_id}/leaderboard");
    refused(
        &app,
        &token,
        StatusCode::UNPROCESSABLE_ENTITY,
        [
            format!("{board}?as_of=yesterday"),
            format!("{board}?as_of=2027-05-10T10:05:01Z"),
            format!("{board}?as_of=2027-05-10T10:00:00Z&window=day"),
            format!("{board}/stream?as_of=2027-05-10T10:00:00Z"),
        ],
    )
    .await;
    let unknown = uuid::Uuid::new_v4();
    let nowhere = format!("/v1/tests/{unknown}/leaderboard?as_of=2027-05-10T10:00:00Z");
    refused(&app, &token, StatusCode::NOT_FOUND, [nowhere]).await;
    // Later submissions count at later instants once recorded, and the
    // earlier instants' boards stay as they were.
    clock.advance(minute);
    take(&app, &test_id, "dan", true, true).await; // 10:06, 10 (after amy)
    clock.advance(minute * 3);
    let later = page("2027-05-10T10:06:30Z");
    let body = eventually("dan's attempt recorded", || async {
        let (_, body) = json(&app, &later, &token).await;
        (body["total"] == 4).then_some(body)
    })
    .await;
    let expected = [
        ("bob", 10, 1),
        ("amy", 10, 2),
        ("dan", 10, 1),
        ("cid", 6, 1),
    ];
    let expected: Vec<(String, u64, u64)> = expected
        .into_iter()
        .map(|(u, s, a)| (u.to_string(), s, a))
        .collect();
    assert_eq!(ranks(&body), expected);
    let (_, body) = json(&app, &page("2027-05-10T10:02:00Z"), &token).await;
    assert_eq!(users(&body["entries"]), ["bob", "amy"]);
}

/// Rank history: for each of a user's attempts, newest first, their best
/// and rank right after it; per window's period; paged; refusals.
pub async fn rank_history_of_a_learner(adapters: Adapters) {
    let Some((app, clock)) = serve_at(
        adapters,
        "rank_history_of_a_learner",
        "2027-05-10T10:00:00Z",
    )
    .await
    else {
        return;
    };
    let test_id = app.published_test().await;
    let minute = Duration::from_secs(60);
    for (user, q1, q2) in [
        ("amy", true, false), // 4: first
        ("bob", true, true),  // 10: amy second
        ("amy", false, true), // 6: still second
        ("cid", true, true),  // 10, later than bob
        ("amy", true, true),  // 10, latest of three: third
    ] {
        take(&app, &test_id, user, q1, q2).await;
        clock.advance(minute);
    }
    let token = app.user("observer");
    let path = format!("/v1/tests/{test_id}/leaderboard/users/amy/history");
    let items = |body: &Value| -> Vec<(u64, u64, u64)> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                let n = |k: &str| i[k].as_u64().unwrap();
                (n("score"), n("best_score"), n("rank"))
            })
            .collect()
    };
    let history = eventually("every attempt recorded", || async {
        let (_, body) = json(&app, &path, &token).await;
        (body["items"].as_array().map(Vec::len) == Some(3)).then_some(body)
    })
    .await;
    assert_eq!(items(&history), [(10, 10, 3), (6, 6, 2), (4, 4, 1)]);
    assert_eq!(history["items"][0]["submitted_at"], "2027-05-10T10:04:00Z");
    // Pages, newest first; a cursor belongs to its user and board.
    let (_, first, second) = first_and_next(&app, &format!("{path}?limit=2"), &token).await;
    assert_eq!(items(&first), [(10, 10, 3), (6, 6, 2)]);
    assert_eq!(items(&second), [(4, 4, 1)]);
    assert_eq!(second["next_cursor"], Value::Null);
    let cursor = first["next_cursor"].as_str().unwrap();
    for foreign in [
        format!("/v1/tests/{test_id}/leaderboard/users/bob/history?cursor={cursor}"),
        format!("{path}?window=day&cursor={cursor}"),
    ] {
        let response = app.get(&foreign, &token).await;
        crate::helpers::assert_problem(response, StatusCode::BAD_REQUEST).await;
    }
    // The next day: a board of its own, where amy is alone.
    clock.advance(Duration::from_secs(24 * 3600));
    take(&app, &test_id, "amy", false, false).await;
    let today = eventually("the new day's attempt", || async {
        let (status, body) = json(&app, &format!("{path}?window=day"), &token).await;
        (status == StatusCode::OK).then_some(body)
    })
    .await;
    assert_eq!(items(&today), [(0, 0, 1)]);
    assert_eq!(today["period_start"], "2027-05-11T00:00:00Z");
    let (_, yesterday) = json(
        &app,
        &format!("{path}?window=day&period=2027-05-10"),
        &token,
    )
    .await;
    assert_eq!(items(&yesterday).len(), 3);
    let (_, all) = json(&app, &path, &token).await;
    assert_eq!(items(&all)[0], (0, 10, 3), "all time: the best stays");
    // Refused: no such test, no attempts (on that board), as_of, an
    // unknown window.
    let unknown = uuid::Uuid::new_v4();
    refused(
        &app,
        &token,
        StatusCode::NOT_FOUND,
        [
            format!("/v1/tests/{unknown}/leaderboard/users/amy/history"),
            format!("/v1/tests/{test_id}/leaderboard/users/dan/history"),
            format!("{path}?window=week&period=2027-04-01"),
        ],
    )
    .await;
    refused(
        &app,
        &token,
        StatusCode::UNPROCESSABLE_ENTITY,
        [
            format!("{path}?as_of=2027-05-10T10:00:00Z"),
            format!("{path}?window=year"),
        ],
    )
    .await;
}

/// An app on `adapters` whose clock is a manual one stopped at `at`, with
/// that clock to move; `None` when the scenario is skipped.
pub async fn serve_at(
    adapters: Adapters,
    test: &str,
    at: &str,
) -> Option<(TestApp, podium::clock::Clock)> {
    let clock = manual_clock(at);
    let configured = clock.clone();
    let app = serve(adapters, test, move |s| s.clock = configured).await?;
    Some((app, clock))
}

/// A manual clock stopped at `at` (RFC 3339, whole seconds).
pub fn manual_clock(at: &str) -> podium::clock::Clock {
    let at = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    let secs = u64::try_from(at.timestamp()).unwrap();
    podium::clock::Clock::manual(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// `user`'s notifications of `kind`, once there are `count` of them.
pub async fn notified(app: &TestApp, user: &str, kind: &str, count: usize) -> Vec<Value> {
    let token = app.user(user);
    eventually("the notifications", || async {
        let (_, feed) = json(app, "/v1/me/notifications?limit=200", &token).await;
        let items: Vec<Value> = feed["items"]
            .as_array()?
            .iter()
            .filter(|item| item["kind"] == kind)
            .cloned()
            .collect();
        (items.len() == count).then_some(items)
    })
    .await
}

/// Period podiums: when a day (and a month) closes — the server's manual
/// clock is moved past the end and the grace — the first three of each
/// board of the period are told their place, once; the fourth is not.
pub async fn a_closed_period_notifies_its_first_three(adapters: Adapters) {
    let Some((app, clock)) = serve_at(
        adapters,
        "a_closed_period_notifies_its_first_three",
        "2028-02-29T23:58:00Z",
    )
    .await
    else {
        return;
    };
    let test_id = app.published_test().await;
    podium_day(&app, &test_id).await;
    clock.advance(Duration::from_secs(150));
    for (user, place) in [("gold", "1st"), ("silver", "2nd"), ("bronze", "3rd")] {
        let items = notified(&app, user, "period_podium", 2).await;
        let mut titles: Vec<&str> = items.iter().map(|i| i["title"].as_str().unwrap()).collect();
        titles.sort_unstable();
        assert_eq!(
            titles,
            [
                format!("{place} place of the day"),
                format!("{place} place of the month")
            ],
            "{user}"
        );
        let links: Vec<&str> = items.iter().map(|i| i["link"].as_str().unwrap()).collect();
        assert!(
            links.contains(
                &format!("/v1/tests/{test_id}/leaderboard?window=day&period=2028-02-29").as_str()
            ),
            "{links:?}"
        );
    }
    // The fourth is told nothing (its notifications would precede the
    // third's month podium in the log, which has arrived).
    let (_, feed) = json(&app, "/v1/me/notifications", &app.user("fourth")).await;
    let kinds: Vec<&str> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["attempt_graded"]);
}

/// Four learners on the day that holds the clock's time: gold (10), silver
/// (6), bronze (4), fourth (0); returns once the day's board holds them.
pub async fn podium_day(app: &TestApp, test_id: &str) {
    for (user, q1, q2) in [
        ("gold", true, true),
        ("silver", false, true),
        ("bronze", true, false),
        ("fourth", false, false),
    ] {
        take(app, test_id, user, q1, q2).await;
    }
    let token = app.user("observer");
    let path = format!("/v1/tests/{test_id}/leaderboard?window=day");
    let board = eventually("the day's board", || async {
        let (_, board) = json(app, &path, &token).await;
        (board["total"] == 4).then_some(board)
    })
    .await;
    assert_eq!(
        users(&board["entries"]),
        ["gold", "silver", "bronze", "fourth"]
    );
}

/// What users see of `test_id`, of `collection` and of user q: the views a
/// rebuild must keep.
async fn views(app: &TestApp, test_id: &str, collection: &str) -> Vec<Value> {
    let paths = [
        format!("/v1/collections/{collection}/leaderboard"),
        format!("/v1/collections/{collection}/leaderboard/users/q?window=week"),
        format!("/v1/tests/{test_id}/leaderboard"),
        format!("/v1/tests/{test_id}/leaderboard/users/r?radius=2"),
        format!("/v1/tests/{test_id}/leaderboard?window=week"),
        format!("/v1/tests/{test_id}/leaderboard/users/r?window=day"),
        "/v1/me/notifications".to_string(),
        "/v1/me/attempts".to_string(),
        "/v1/tests".to_string(),
    ];
    let token = app.user("q");
    let mut all = Vec::new();
    for path in &paths {
        all.push(json(app, path, &token).await.1);
    }
    all
}

/// Collections: created of published tests, read back by anyone, grown by
/// adding tests (twice is once); bad input refused with problem+json,
/// changing nothing.
pub async fn collections_are_created_read_and_grow(adapters: Adapters) {
    use crate::helpers::assert_problem;
    let Some(app) = serve(adapters, "collections_are_created_read_and_grow", |_| {}).await else {
        return;
    };
    let first = app.published_test().await;
    let second = app.published_test().await;
    let admin = app.admin();
    let body = json!({"title": " Term 1 ", "test_ids": [first]});
    let response = app.post("/v1/collections", &admin, Some(body)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/v1/collections/{id}"));
    let learner = app.user("learner");
    let (status, body) = json(&app, &location, &learner).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        json!({"id": id, "title": "Term 1", "test_ids": [first]})
    );
    // A test added twice is added once, after the first.
    let add = format!("{location}/tests/{second}");
    for _ in 0..2 {
        let response = app
            .request(reqwest::Method::PUT, &add, Some(&admin))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let (_, body) = json(&app, &location, &learner).await;
    assert_eq!(body["test_ids"], json!([first, second]));
    // Refusals, each with the fields at fault.
    let unknown = uuid::Uuid::new_v4();
    let fields = |problem: &Value| -> Vec<String> {
        problem["errors"]
            .as_array()
            .map(|errors| {
                errors
                    .iter()
                    .map(|e| e["field"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    for (body, expected) in [
        (
            json!({"title": " ", "test_ids": []}),
            vec!["title", "test_ids"],
        ),
        (
            json!({"title": "T", "test_ids": [first, first]}),
            vec!["test_ids[1]"],
        ),
        (
            json!({"title": "T", "test_ids": [first, unknown]}),
            vec!["test_ids[1]"],
        ),
    ] {
        let response = app.post("/v1/collections", &admin, Some(body)).await;
        let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
        assert_eq!(fields(&problem), expected, "{problem}");
    }
    let again = json!({"id": id, "title": "Again", "test_ids": [second]});
    let response = app.post("/v1/collections", &admin, Some(again)).await;
    assert_problem(response, StatusCode::CONFLICT).await;
    let by_learner = json!({"title": "Mine", "test_ids": [first]});
    let response = app
        .post("/v1/collections", &learner, Some(by_learner))
        .await;
    assert_problem(response, StatusCode::FORBIDDEN).await;
    for (path, token, status) in [
        (
            format!("{location}/tests/{unknown}"),
            &admin,
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/v1/collections/{unknown}/tests/{first}"),
            &admin,
            StatusCode::NOT_FOUND,
        ),
        (add.clone(), &learner, StatusCode::FORBIDDEN),
        (
            format!("{location}/tests/nope"),
            &admin,
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let response = app
            .request(reqwest::Method::PUT, &path, Some(token))
            .send()
            .await
            .unwrap();
        assert_problem(response, status).await;
    }
    refused(
        &app,
        &learner,
        StatusCode::NOT_FOUND,
        [format!("/v1/collections/{unknown}")],
    )
    .await;
    refused(
        &app,
        &learner,
        StatusCode::BAD_REQUEST,
        ["/v1/collections/nope".to_string()],
    )
    .await;
    let (_, body) = json(&app, &location, &learner).await;
    assert_eq!(
        body,
        json!({"id": id, "title": "Term 1", "test_ids": [first, second]})
    );
    // The catalog lists it, with both tests, once.
    let listed = eventually("the collection listed with both tests", || async {
        let (_, body) = json(&app, "/v1/collections", &learner).await;
        (body["items"][0]["test_ids"] == json!([first, second])).then_some(body)
    })
    .await;
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(
        (&items[0]["id"], &items[0]["title"]),
        (&json!(id), &json!("Term 1"))
    );
    // The projections read past the collections' events in the log.
    take(&app, &second, "after", true, true).await;
    let board = board_when(&app, &second, 1, |_| true).await;
    assert_eq!(users(&board["entries"]), ["after"]);
}

/// Collection leaderboards: the sum of each learner's bests over the
/// collection's tests, with `tests_taken` and `max_score`; ranked by total,
/// then when it was reached; pages, cursors, neighbours, windows, `as_of`
/// and the stream as for a test; a test added later counts everyone's
/// results on it at once.
pub async fn collection_leaderboards(adapters: Adapters) {
    let Some((app, clock)) =
        serve_at(adapters, "collection_leaderboards", "2027-05-10T10:00:00Z").await
    else {
        return;
    };
    let (a, b, c) = (
        app.published_test().await,
        app.published_test().await,
        app.published_test().await,
    );
    let admin = app.admin();
    let body = json!({"title": "Term", "test_ids": [a, b]});
    let response = app.post("/v1/collections", &admin, Some(body)).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    let board = format!("/v1/collections/{id}/leaderboard");
    let token = app.user("observer");
    // An empty board of a collection that exists; 404 for one that does not.
    let (status, empty) = json(&app, &board, &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (&empty["total"], &empty["collection_id"]),
        (&json!(0), &json!(id))
    );
    assert!(empty.get("test_id").is_none(), "{empty}");
    let mut stream = SseClient::open(&app, &format!("{board}/stream"), &token, None).await;
    let minute = Duration::from_secs(60);
    take(&app, &a, "amy", true, true).await; // 10:00, a: 10
    let first = stream
        .next_named("entry", CONVERGE)
        .await
        .expect("amy's collection entry arrives live");
    assert_eq!(
        (
            &first.data["user_id"],
            &first.data["score"],
            &first.data["rank"]
        ),
        (&json!("amy"), &json!(10), &json!(1))
    );
    drop(stream);
    clock.advance(minute);
    take(&app, &a, "bob", true, false).await; // 10:01, a: 4
    clock.advance(minute);
    take(&app, &b, "bob", true, true).await; // 10:02, b: 10 → 14
    clock.advance(minute);
    take(&app, &c, "cid", false, true).await; // 10:03, c: 6 (not in it yet)
    clock.advance(minute);
    take(&app, &c, "amy", true, false).await; // 10:04, c: 4
    clock.advance(minute);
    take(&app, &b, "bob", false, false).await; // 10:05, b: 0 (no better)
    let view = |body: &Value| -> Vec<(String, u64, u64, u64, String)> {
        body["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert!(e.get("attempts").is_none(), "{e}");
                (
                    e["user_id"].as_str().unwrap().to_string(),
                    e["score"].as_u64().unwrap(),
                    e["max_score"].as_u64().unwrap(),
                    e["tests_taken"].as_u64().unwrap(),
                    e["achieved_at"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let row = |u: &str, s: u64, m: u64, t: u64, at: &str| {
        (u.to_string(), s, m, t, format!("2027-05-10T{at}:00Z"))
    };
    let settled = eventually("bob's second attempt on the collection", || async {
        let (_, body) = json(&app, &board, &token).await;
        (body["total"] == 2 && body["entries"][0]["score"] == 14).then_some(body)
    })
    .await;
    assert_eq!(
        view(&settled),
        [
            row("bob", 14, 20, 2, "10:02"),
            row("amy", 10, 10, 1, "10:00")
        ]
    );
    // The day's board is the same; the day before is empty.
    let (_, day) = json(&app, &format!("{board}?window=day"), &token).await;
    assert_eq!(view(&day), view(&settled));
    assert_eq!(day["period_start"], "2027-05-10T00:00:00Z");
    let (_, before) = json(
        &app,
        &format!("{board}?window=day&period=2027-05-09"),
        &token,
    )
    .await;
    assert_eq!(before["total"], 0);
    // As it stood at 10:01:30: bob had only his 4 on a.
    let (status, then) = json(&app, &format!("{board}?as_of=2027-05-10T10:01:30Z"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        view(&then),
        [
            row("amy", 10, 10, 1, "10:00"),
            row("bob", 4, 10, 1, "10:01")
        ]
    );
    // c joins: amy's 4 and cid's 6 count at once, on every window.
    let response = app
        .request(
            reqwest::Method::PUT,
            &format!("/v1/collections/{id}/tests/{c}"),
            Some(&admin),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let expected = [
        row("bob", 14, 20, 2, "10:02"),
        row("amy", 14, 20, 2, "10:04"),
        row("cid", 6, 10, 1, "10:03"),
    ];
    for path in [board.clone(), format!("{board}?window=week")] {
        let grown = eventually("the collection with c", || async {
            let (_, body) = json(&app, &path, &token).await;
            (body["total"] == 3).then_some(body)
        })
        .await;
        assert_eq!(view(&grown), expected, "{path}");
    }
    // As of now it is the live board (once the attempts read model, which
    // past boards are folded from, holds every submission too).
    let now = format!("{board}?as_of=2027-05-10T10:05:00Z");
    eventually("the board as of now, with c", || async {
        let (_, body) = json(&app, &now, &token).await;
        (view(&body) == expected).then_some(())
    })
    .await;
    // A cursor walk, one entry a page, with links on the collection's path.
    let mut walked = Vec::new();
    let mut next = Some(format!("{board}?limit=1"));
    while let Some(path) = next {
        let response = app.get(&path, &token).await;
        assert_eq!(response.status(), StatusCode::OK);
        next = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            assert!(
                link.contains(&format!("</v1/collections/{id}/leaderboard?")),
                "{link}"
            );
            link[1..link.find('>').unwrap()].to_string()
        });
        let body: Value = response.json().await.unwrap();
        walked.extend(view(&body));
    }
    assert_eq!(walked, expected);
    let (status, around) = json(&app, &format!("{board}/users/amy?radius=1"), &token).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            &around["entry"]["rank"],
            &around["collection_id"],
            &around["total"]
        ),
        (&json!(2), &json!(id), &json!(3))
    );
    assert_eq!(
        users(&json!([around["above"][0], around["below"][0]])),
        ["bob", "cid"]
    );
    // Refusals.
    let unknown = uuid::Uuid::new_v4();
    refused(
        &app,
        &token,
        StatusCode::NOT_FOUND,
        [
            format!("/v1/collections/{unknown}/leaderboard"),
            format!("/v1/collections/{unknown}/leaderboard/stream"),
            format!("{board}/users/nobody"),
        ],
    )
    .await;
    refused(
        &app,
        &token,
        StatusCode::UNPROCESSABLE_ENTITY,
        [
            format!("{board}?window=year"),
            format!("{board}?as_of=2099-01-01T00:00:00Z"),
            format!("{board}?window=day&as_of=2027-05-10T10:00:00Z"),
            format!("{board}/stream?period=2027-05-10"),
        ],
    )
    .await;
    refused(
        &app,
        &token,
        StatusCode::BAD_REQUEST,
        ["/v1/collections/nope/leaderboard".to_string()],
    )
    .await;
}

/// One test per scenario and adapter set.
macro_rules! conformance {
    ($($scenario:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Adapters::Embedded).await;
                }
            )*
        }
        mod production {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Adapters::Production).await;
                }
            )*
        }
        mod single_node {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario(super::Adapters::SingleNode).await;
                }
            )*
        }
    };
}

conformance!(
    commands_grade_refuse_and_replay,
    leaderboard_ranks_pages_and_neighbours,
    leaderboard_windows,
    a_windowed_stream_rolls_over_at_the_period_end,
    a_closed_period_notifies_its_first_three,
    leaderboard_as_of,
    rank_history_of_a_learner,
    collections_are_created_read_and_grow,
    collection_leaderboards,
    feed_counts_notifications_and_reads,
    sse_resume_gets_exactly_what_was_missed,
    a_rebuild_from_the_log_answers_the_same,
    the_demo_seed_fills_tests_leaderboards_and_feeds,
);
