//! The query API: leaderboard pages by offset and cursor, neighbours, feeds,
//! attempts, their errors, and the cache in front of them.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use podium_projections::leaderboard::LeaderboardQueries;

use crate::helpers::{assert_problem, TestApp};
use crate::nats::wait_until;
use crate::read_models::spawn_app_with_workers;

/// Answers to the sample test that score `score` (0, 4, 6 or 10 points).
fn answers_for(score: u32) -> Value {
    match score {
        10 => json!({"q1": 1, "q2": 0}),
        6 => json!({"q1": 0, "q2": 0}),
        4 => json!({"q1": 1, "q2": 1}),
        0 => json!({"q1": 0, "q2": 1}),
        other => panic!("the sample test cannot score {other}"),
    }
}

/// `user` takes the test and scores `score`.
pub async fn take(app: &TestApp, test_id: &str, user: &str, score: u32) {
    let token = app.user(user);
    let attempt = app.started_attempt(test_id, &token).await;
    let response = app
        .submit(
            &attempt,
            &token,
            Some(json!({ "answers": answers_for(score) })),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn get_json(app: &TestApp, path: &str, token: &str) -> (Value, Option<String>) {
    let response = app.get(path, token).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    let link = response
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_string());
    (response.json().await.unwrap(), link)
}

/// Waits until the leaderboard of `test_id` holds `total` entries.
pub async fn settle_board(app: &TestApp, test_id: &str, total: u64) {
    let token = app.user("watcher");
    let path = format!("/v1/tests/{test_id}/leaderboard?limit=1");
    wait_until(
        Duration::from_secs(20),
        "the leaderboard is projected",
        || {
            let (token, path) = (token.clone(), path.clone());
            async move {
                let response = app.get(&path, &token).await;
                let body: Value = response.json().await.unwrap();
                body["total"] == total
            }
        },
    )
    .await;
}

fn users(entries: &Value) -> Vec<(String, u64, u64)> {
    entries
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user_id"].as_str().unwrap().to_string(),
                e["score"].as_u64().unwrap(),
                e["rank"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test]
async fn leaderboard_pages_by_cursor_and_offset_and_shows_neighbours() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    for (user, score) in [("ann", 10), ("bob", 6), ("cat", 4), ("dan", 10), ("eve", 0)] {
        take(&app, &test_id, user, score).await;
    }
    settle_board(&app, &test_id, 5).await;
    let token = app.user("viewer");
    let base = format!("/v1/tests/{test_id}/leaderboard");

    let (first, link) = get_json(&app, &format!("{base}?limit=2"), &token).await;
    assert_eq!(first["test_id"], test_id.as_str());
    assert_eq!(first["total"], 5);
    // Ties go to whoever reached the score first.
    assert_eq!(
        users(&first["entries"]),
        [("ann".into(), 10, 1), ("dan".into(), 10, 2)]
    );
    assert_eq!(first["entries"][0]["max_score"], 10);
    assert_eq!(first["entries"][0]["attempts"], 1);
    let cursor = first["next_cursor"].as_str().unwrap();
    assert!(link
        .unwrap()
        .contains(&format!("cursor={cursor}>; rel=\"next\"")));

    let (second, _) = get_json(&app, &format!("{base}?limit=2&cursor={cursor}"), &token).await;
    assert_eq!(
        users(&second["entries"]),
        [("bob".into(), 6, 3), ("cat".into(), 4, 4)]
    );
    let cursor = second["next_cursor"].as_str().unwrap();
    let (last, link) = get_json(&app, &format!("{base}?limit=2&cursor={cursor}"), &token).await;
    assert_eq!(users(&last["entries"]), [("eve".into(), 0, 5)]);
    assert!(last["next_cursor"].is_null());
    assert!(link.is_none(), "the last page links nowhere");

    let (by_offset, link) = get_json(&app, &format!("{base}?limit=2&offset=2"), &token).await;
    assert_eq!(users(&by_offset["entries"]), users(&second["entries"]));
    assert!(link.unwrap().contains("offset=4"));

    let (around, _) = get_json(&app, &format!("{base}/users/cat?radius=1"), &token).await;
    assert_eq!(around["entry"]["user_id"], "cat");
    assert_eq!(around["entry"]["rank"], 4);
    assert_eq!(users(&around["above"]), [("bob".into(), 6, 3)]);
    assert_eq!(users(&around["below"]), [("eve".into(), 0, 5)]);
    let (top, _) = get_json(&app, &format!("{base}/users/ann"), &token).await;
    assert_eq!(top["above"], json!([]));
    assert_eq!(top["below"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn bad_pagination_input_is_refused_clearly() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    let other_test = app.published_test().await;
    for user in ["ann", "bob", "cat"] {
        take(&app, &test_id, user, 6).await;
        take(&app, &other_test, user, 6).await;
    }
    settle_board(&app, &test_id, 3).await;
    settle_board(&app, &other_test, 3).await;
    let token = app.user("viewer");
    let base = format!("/v1/tests/{test_id}/leaderboard");

    for limit in ["0", "201", "-1", "ten"] {
        let response = app.get(&format!("{base}?limit={limit}"), &token).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let (page, _) = get_json(&app, &format!("{base}?limit=1"), &token).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let response = app
        .get(&format!("{base}?cursor={cursor}&offset=1"), &token)
        .await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    for garbage in ["abc", "eyJ4IjoxfQ", "%00%01", "!!!"] {
        let response = app.get(&format!("{base}?cursor={garbage}"), &token).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(problem["type"], "urn:podium:problem:invalid-cursor");
    }
    // A cursor of another test, or of another listing, is foreign.
    let response = app
        .get(
            &format!("/v1/tests/{other_test}/leaderboard?cursor={cursor}"),
            &token,
        )
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
    let response = app
        .get(&format!("/v1/me/notifications?cursor={cursor}"), &token)
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;

    let unknown = uuid::Uuid::new_v4();
    let response = app
        .get(&format!("/v1/tests/{unknown}/leaderboard"), &token)
        .await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    let response = app.get(&format!("{base}/users/nobody"), &token).await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    let response = app
        .get(&format!("{base}/users/ann?radius=51"), &token)
        .await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    let response = app
        .request(reqwest::Method::GET, &base, None)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNAUTHORIZED).await;
}

/// Seeds `n` leaderboard entries straight into the read model: scores 0, 4
/// or 6 (the sample test's), reached at distinct times, users `seed-<i>`.
async fn seed_board(app: &TestApp, test_id: &str, n: i32) {
    let test_id: uuid::Uuid = test_id.parse().unwrap();
    sqlx::query(
        "INSERT INTO lb_entries (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                                 attempts, changed_seq)
         SELECT $1, 'seed-' || i, (ARRAY[0, 4, 6])[1 + i % 3], 10, gen_random_uuid(),
                now() - interval '1 day' + i * interval '1 second', 1, 0
           FROM generate_series(1, $2) i",
    )
    .bind(test_id)
    .bind(n)
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO lb_score_counts (test_id, score, entries)
         SELECT test_id, best_score, count(*) FROM lb_entries WHERE test_id = $1
          GROUP BY test_id, best_score",
    )
    .bind(test_id)
    .execute(&app.pool)
    .await
    .unwrap();
}

/// Moves recorded on all-time boards (a submission moves its entry on its
/// day's, week's and month's boards too).
async fn moves(app: &TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM lb_moves WHERE test_id IN (SELECT test_id FROM catalog_tests)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_cursor_walk_returns_every_entry_once_while_scores_change() {
    const ENTRIES: i32 = 5_000;
    const SUBMISSIONS: usize = 500;
    let (app, _) = spawn_app_with_workers().await;
    let app = std::sync::Arc::new(app);
    let test_id = app.published_test().await;
    seed_board(&app, &test_id, ENTRIES).await;
    // Seeded users jump from behind to the top while the walk goes on, and
    // newcomers join.
    let submitters: Vec<_> = (0..8)
        .map(|task| {
            let (app, test_id) = (app.clone(), test_id.clone());
            tokio::spawn(async move {
                for i in (task..SUBMISSIONS).step_by(8) {
                    let user = if i % 10 == 0 {
                        format!("new-{i}")
                    } else {
                        format!("seed-{}", ENTRIES as usize - i * 9)
                    };
                    take(&app, &test_id, &user, 10).await;
                }
            })
        })
        .collect();
    wait_until(
        Duration::from_secs(30),
        "submissions start landing",
        || async { moves(&app).await > 0 },
    )
    .await;
    let moves_before = moves(&app).await;
    let token = app.user("walker");
    let mut seen = Vec::new();
    let mut path = format!("/v1/tests/{test_id}/leaderboard?limit=20");
    loop {
        let (page, _) = get_json(&app, &path, &token).await;
        seen.extend(users(&page["entries"]).into_iter().map(|(user, _, _)| user));
        match page["next_cursor"].as_str() {
            Some(cursor) => {
                path = format!("/v1/tests/{test_id}/leaderboard?limit=20&cursor={cursor}")
            }
            None => break,
        }
    }
    let moved_during_walk = moves(&app).await - moves_before;
    for task in submitters {
        task.await.unwrap();
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "an entry came twice");
    for i in 1..=ENTRIES {
        let user = format!("seed-{i}");
        assert!(
            unique.contains(&user),
            "{user} existed throughout but was skipped"
        );
    }
    assert!(
        moved_during_walk > 0,
        "no entry moved during the walk: the test proved nothing"
    );
    println!(
        "walked {} entries in pages of 20 while {moved_during_walk} entries moved up",
        seen.len()
    );
}

#[tokio::test]
async fn concurrent_cold_requests_for_one_page_cause_one_database_load() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    for user in ["ann", "bob", "cat"] {
        take(&app, &test_id, user, 6).await;
    }
    settle_board(&app, &test_id, 3).await;
    let labels = ["cache=\"leaderboard_page\"", "outcome=\"miss\""];
    let loads_before = app.metric("podium_cache_lookups_total", &labels).await;
    let token = app.user("viewer");
    // A page nobody asked for yet: cold.
    let path = format!("/v1/tests/{test_id}/leaderboard?limit=7");
    let requests = (0..50).map(|_| {
        let (app, path, token) = (&app, path.clone(), token.clone());
        async move {
            let response = app.get(&path, &token).await;
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Value>().await.unwrap()
        }
    });
    let bodies = futures::future::join_all(requests).await;
    assert!(bodies.iter().all(|b| b == &bodies[0]));
    assert_eq!(bodies[0]["total"], 3);
    let loads = app.metric("podium_cache_lookups_total", &labels).await - loads_before;
    assert_eq!(
        loads, 1.0,
        "50 concurrent cold requests loaded {loads} times"
    );
    let hits = app
        .metric(
            "podium_cache_lookups_total",
            &["cache=\"leaderboard_page\"", "outcome=\"hit\""],
        )
        .await;
    assert!(hits >= 49.0);
}

#[tokio::test]
async fn a_cached_page_follows_new_submissions() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    take(&app, &test_id, "ann", 4).await;
    settle_board(&app, &test_id, 1).await;
    let token = app.user("viewer");
    let path = format!("/v1/tests/{test_id}/leaderboard");
    let (before, _) = get_json(&app, &path, &token).await;
    assert_eq!(users(&before["entries"]), [("ann".into(), 4, 1)]);
    take(&app, &test_id, "bob", 10).await;
    wait_until(Duration::from_secs(10), "the cached page shows bob", || {
        let (app, path, token) = (&app, path.clone(), token.clone());
        async move {
            let (page, _) = get_json(app, &path, &token).await;
            users(&page["entries"]) == [("bob".to_string(), 10, 1), ("ann".to_string(), 4, 2)]
        }
    })
    .await;
    let (around, _) = get_json(&app, &format!("{path}/users/ann"), &token).await;
    assert_eq!(around["entry"]["rank"], 2);
}

#[tokio::test]
async fn feeds_page_newest_first_with_exact_unread_counts() {
    let (app, _) = spawn_app_with_workers().await;
    let admin = app.admin();
    for i in 1..=5 {
        let body = json!({"user_ids": ["alice"], "title": format!("n{i}"), "body": "hello"});
        let response = app.post("/v1/notifications", &admin, Some(body)).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let alice = app.user("alice");
    wait_until(Duration::from_secs(20), "the feed is projected", || {
        let (app, alice) = (&app, alice.clone());
        async move {
            let (body, _) = get_json(app, "/v1/me/notifications/unread-count", &alice).await;
            body["unread_count"] == 5
        }
    })
    .await;
    let (first, link) = get_json(&app, "/v1/me/notifications?limit=2", &alice).await;
    let titles = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["title"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(titles(&first), ["n5", "n4"]);
    assert_eq!(first["unread_count"], 5);
    assert_eq!(first["items"][0]["kind"], "announcement");
    assert!(first["items"][0]["read_at"].is_null());
    assert!(link.is_some());
    let cursor = first["next_cursor"].as_str().unwrap();
    let (second, _) = get_json(
        &app,
        &format!("/v1/me/notifications?limit=2&cursor={cursor}"),
        &alice,
    )
    .await;
    assert_eq!(titles(&second), ["n3", "n2"]);
    // Someone else's cursor is refused.
    let response = app
        .get(
            &format!("/v1/me/notifications?cursor={cursor}"),
            &app.user("mallory"),
        )
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;

    let n4 = first["items"][1]["id"].as_str().unwrap();
    let response = app
        .post(&format!("/v1/me/notifications/{n4}/read"), &alice, None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    wait_until(Duration::from_secs(10), "the read is projected", || {
        let (app, alice) = (&app, alice.clone());
        async move {
            let (body, _) = get_json(app, "/v1/me/notifications/unread-count", &alice).await;
            body["unread_count"] == 4
        }
    })
    .await;
    let (unread, _) = get_json(&app, "/v1/me/notifications?unread_only=true", &alice).await;
    assert_eq!(titles(&unread), ["n5", "n3", "n2", "n1"]);
    assert_eq!(unread["unread_count"], 4);
    assert!(unread["next_cursor"].is_null());
    let response = app
        .get("/v1/me/notifications?unread_only=maybe", &alice)
        .await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
}

#[tokio::test]
async fn my_attempts_list_newest_first_with_their_scores() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    take(&app, &test_id, "ann", 6).await;
    take(&app, &test_id, "ann", 10).await;
    let token = app.user("ann");
    let open = app.started_attempt(&test_id, &token).await;
    take(&app, &test_id, "bob", 4).await;
    wait_until(Duration::from_secs(20), "attempts are projected", || {
        let (app, token) = (&app, token.clone());
        async move {
            let (body, _) = get_json(app, "/v1/me/attempts", &token).await;
            body["items"].as_array().unwrap().len() == 3
                && body["items"][1]["status"] == "submitted"
        }
    })
    .await;
    let (first, _) = get_json(&app, "/v1/me/attempts?limit=2", &token).await;
    assert_eq!(first["items"][0]["attempt_id"], open.as_str());
    assert_eq!(first["items"][0]["status"], "in_progress");
    assert!(first["items"][0].get("score").is_none());
    assert_eq!(first["items"][1]["score"], 10);
    assert_eq!(first["items"][1]["user_id"], "ann");
    let cursor = first["next_cursor"].as_str().unwrap();
    let (second, _) = get_json(
        &app,
        &format!("/v1/me/attempts?limit=2&cursor={cursor}"),
        &token,
    )
    .await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_eq!(second["items"][0]["score"], 6);
    assert!(second["next_cursor"].is_null());
}

/// ann, bob and cat at 6 points on a new test: the app, the test, a
/// viewer's token and the leaderboard's path.
async fn board_of_three() -> (TestApp, String, String, String) {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    for user in ["ann", "bob", "cat"] {
        take(&app, &test_id, user, 6).await;
    }
    settle_board(&app, &test_id, 3).await;
    let token = app.user("viewer");
    let base = format!("/v1/tests/{test_id}/leaderboard");
    (app, test_id, token, base)
}

#[tokio::test]
async fn a_cursor_older_than_the_moves_kept_is_refused_as_expired_and_a_new_walk_works() {
    let (app, test_id, token, base) = board_of_three().await;
    let (page, _) = get_json(&app, &format!("{base}?limit=1"), &token).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    // cat moves up, then the move is forgotten.
    take(&app, &test_id, "cat", 10).await;
    wait_until(
        Duration::from_secs(10),
        "cat's move is recorded",
        || async { moves(&app).await == 1 },
    )
    .await;
    let pruned = LeaderboardQueries::prune_moves(&app.pool, Duration::ZERO)
        .await
        .unwrap();
    assert!(pruned >= 1, "cat's move on each of its boards");
    assert_eq!(moves(&app).await, 0);
    let response = app
        .get(&format!("{base}?limit=1&cursor={cursor}"), &token)
        .await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(problem["type"], "urn:podium:problem:cursor-expired");
    // Starting again works at once, though the first page was cached.
    let (again, _) = get_json(&app, &format!("{base}?limit=1"), &token).await;
    assert_eq!(users(&again["entries"]), [("cat".into(), 10, 1)]);
    let cursor = again["next_cursor"].as_str().unwrap();
    let (next, _) = get_json(&app, &format!("{base}?limit=1&cursor={cursor}"), &token).await;
    assert_eq!(users(&next["entries"]), [("ann".into(), 6, 2)]);
}

#[tokio::test]
async fn a_rebuild_of_a_caught_up_leaderboard_keeps_cursors_valid() {
    let (app, _, token, base) = board_of_three().await;
    let (page, _) = get_json(&app, &format!("{base}?limit=1"), &token).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let mut progress = |_, _| {};
    podium::projector::replay::replay(
        &app.pool,
        &podium::projector::replay::Scope::Leaderboard.read_models(),
        &mut progress,
    )
    .await
    .unwrap();
    let (next, _) = get_json(&app, &format!("{base}?limit=2&cursor={cursor}"), &token).await;
    assert_eq!(
        users(&next["entries"]),
        [("bob".into(), 6, 2), ("cat".into(), 6, 3)]
    );
}

/// `cursor` decoded, changed by `edit`, encoded again: what a client that
/// edits its cursors sends.
fn forge(cursor: &str, edit: impl FnOnce(&mut Value)) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    let mut fields: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(cursor).unwrap()).unwrap();
    edit(&mut fields);
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&fields).unwrap())
}

#[tokio::test]
async fn forged_cursors_are_bad_requests_never_server_errors() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    for (user, score) in [("ann", 10), ("bob", 6)] {
        take(&app, &test_id, user, score).await;
    }
    settle_board(&app, &test_id, 2).await;
    let token = app.user("viewer");
    let base = format!("/v1/tests/{test_id}/leaderboard");
    let (page, _) = get_json(&app, &format!("{base}?limit=1"), &token).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    let forgeries = [
        ("score", json!(2_147_483_648u64)),
        ("since", json!(u64::MAX)),
        ("user", json!("")),
        ("user", json!("x".repeat(10_000))),
        ("at", json!("0001-01-01T00:00:00Z")),
        ("score", json!(-1)),
    ];
    for (field, value) in forgeries {
        let forged = forge(&cursor, |c| c[field] = value);
        let response = app.get(&format!("{base}?cursor={forged}"), &token).await;
        let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(
            problem["type"], "urn:podium:problem:invalid-cursor",
            "{field}"
        );
    }
    // The real one still works.
    let (next, _) = get_json(&app, &format!("{base}?cursor={cursor}"), &token).await;
    assert_eq!(next["entries"][0]["user_id"], "bob");
}

#[tokio::test]
async fn a_cursor_that_too_many_entries_passed_is_expired_not_a_huge_page() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    take(&app, &test_id, "ann", 4).await;
    take(&app, &test_id, "bob", 0).await;
    settle_board(&app, &test_id, 2).await;
    let token = app.user("viewer");
    let base = format!("/v1/tests/{test_id}/leaderboard");
    let (page, _) = get_json(&app, &format!("{base}?limit=1"), &token).await;
    let cursor = page["next_cursor"].as_str().unwrap().to_string();
    // 300 entries that stood behind ann when the cursor was made and stand
    // ahead of her now: as 300 submissions since would leave the read model.
    let test: uuid::Uuid = test_id.parse().unwrap();
    let entries = ("'u' || n", "10", "1000000 + n");
    crate::helpers::fill_board(&app.pool, test, 300, entries).await;
    sqlx::query(
        "INSERT INTO lb_moves (seq, test_id, user_id, old_score, old_achieved_at)
         SELECT 1000000 + n, $1, 'u' || n, 0, now() FROM generate_series(1, 300) n",
    )
    .bind(test)
    .execute(&app.pool)
    .await
    .unwrap();
    let response = app.get(&format!("{base}?cursor={cursor}"), &token).await;
    let problem = assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(problem["type"], "urn:podium:problem:cursor-expired");
}

#[tokio::test]
async fn the_catalog_is_a_read_model_that_the_upgrade_fills_from_the_log() {
    let (app, _) = spawn_app_with_workers().await;
    let admin = app.admin();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.published_test().await);
    }
    let archived = app
        .post(&format!("/v1/tests/{}/archive", ids[0]), &admin, None)
        .await;
    assert_eq!(archived.status(), StatusCode::NO_CONTENT);
    let token = app.user("reader");
    let listed = |app: &TestApp, token: String| {
        let app_address = app.address.clone();
        let client = app.client.clone();
        async move {
            let response = client
                .get(format!("{app_address}/v1/tests"))
                .bearer_auth(token)
                .timeout(Duration::from_secs(3))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            response.json::<Value>().await.map_err(|e| e.to_string())
        }
    };
    let catalog = crate::helpers::poll("the catalog", Duration::from_secs(30), || async {
        let body = listed(&app, token.clone()).await?;
        let items = body["items"].as_array().cloned().unwrap_or_default();
        let archived = items.iter().filter(|t| t["archived"] == true).count();
        if items.len() == 3 && archived == 1 {
            Ok(body)
        } else {
            Err(body.to_string())
        }
    })
    .await;

    // Listing reads no event: it answers while the log is locked.
    let mut locker = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let while_locked = listed(&app, token.clone()).await;
    locker.rollback().await.unwrap();
    assert_eq!(while_locked.expect("the catalog answers"), catalog);

    // The upgrade's fill from the log gives what the projection keeps.
    sqlx::query("DELETE FROM catalog_tests")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM projection_checkpoints WHERE name = 'catalog'")
        .execute(&app.pool)
        .await
        .unwrap();
    let migration = include_str!("../../migrations/20261201000008_catalog.sql");
    let fill = &migration[migration
        .find("INSERT INTO projection_checkpoints")
        .unwrap()..];
    sqlx::raw_sql(fill).execute(&app.pool).await.unwrap();
    let refilled = listed(&app, token).await.unwrap();
    assert_eq!(refilled, catalog);
}
