//! Server-Sent Events: live changes on every instance, resume with
//! `Last-Event-ID` (nothing lost, nothing repeated), heartbeats and limits.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, TestApp};
use crate::nats::{nats_url, wait_until};
use crate::queries::{settle_board, take};
use crate::read_models::spawn_app_with_workers;
use crate::sse::SseClient;

const WAIT: Duration = Duration::from_secs(20);

async fn announce(app: &TestApp, user: &str, title: &str) {
    let body = json!({"user_ids": [user], "title": title, "body": "hello"});
    let response = app
        .post("/v1/notifications", &app.admin(), Some(body))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

async fn unread(app: &TestApp, user: &str) -> u64 {
    let response = app
        .get("/v1/me/notifications/unread-count", &app.user(user))
        .await;
    let body: Value = response.json().await.unwrap();
    body["unread_count"].as_u64().unwrap()
}

#[tokio::test]
async fn a_submission_reaches_both_instances_queries_and_streams() {
    let (a, prefix) = spawn_app_with_workers().await;
    let b = a
        .another_instance(|settings| {
            settings.nats.nats_url = Some(nats_url());
            settings.nats.nats_prefix = prefix.clone();
            settings.workers = false;
        })
        .await;
    let test_id = a.published_test().await;
    take(&a, &test_id, "warmup", 4).await;
    settle_board(&a, &test_id, 1).await;
    settle_board(&b, &test_id, 1).await;
    let viewer = a.user("viewer");
    let stream = format!("/v1/tests/{test_id}/leaderboard/stream");
    // A stream answers once it is subscribed: both see what follows.
    let mut on_a = SseClient::open(&a, &stream, &viewer, None).await;
    let mut on_b = SseClient::open(&b, &stream, &viewer, None).await;

    let token = a.user("zoe");
    let attempt = a.started_attempt(&test_id, &token).await;
    let submitted = Instant::now();
    let response = a
        .submit(
            &attempt,
            &token,
            Some(json!({"answers": {"q1": 1, "q2": 0}})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);

    let ((sse_a, event_a), (sse_b, event_b)) = tokio::join!(
        entry_after(&mut on_a, submitted),
        entry_after(&mut on_b, submitted)
    );
    for event in [&event_a, &event_b] {
        assert_eq!(event.data["user_id"], "zoe");
        assert_eq!(event.data["score"], 10);
        assert_eq!(event.data["rank"], 1);
        assert!(event.data["previous_rank"].is_null());
        assert!(event.id.parse::<u64>().is_ok());
    }
    assert_eq!(event_a.id, event_b.id);
    let (query_a, query_b) = tokio::join!(
        visible_after(&a, &test_id, &viewer, submitted),
        visible_after(&b, &test_id, &viewer, submitted)
    );
    println!(
        "submit → SSE: instance a {sse_a:?}, instance b {sse_b:?}; \
         submit → query: instance a {query_a:?}, instance b {query_b:?}"
    );
}

/// The next `entry` event and how long after `since` it came.
async fn entry_after(stream: &mut SseClient, since: Instant) -> (Duration, crate::sse::SseEvent) {
    let event = stream
        .next_named("entry", WAIT)
        .await
        .expect("an entry event");
    (since.elapsed(), event)
}

/// How long after `since` the leaderboard query of `app` shows zoe on top.
async fn visible_after(app: &TestApp, test_id: &str, token: &str, since: Instant) -> Duration {
    let path = format!("/v1/tests/{test_id}/leaderboard");
    wait_until(WAIT, "the query shows zoe", || {
        let path = path.clone();
        async move {
            let body: Value = app.get(&path, token).await.json().await.unwrap();
            body["entries"][0]["user_id"] == "zoe"
        }
    })
    .await;
    since.elapsed()
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed_then_live_events() {
    let (app, _) = spawn_app_with_workers().await;
    let alice = app.user("alice");
    let path = "/v1/me/notifications/stream";
    let mut stream = SseClient::open(&app, path, &alice, None).await;
    let initial = stream.next_named("unread_count", WAIT).await.unwrap();
    assert_eq!(initial.data["unread_count"], 0);
    announce(&app, "alice", "first").await;
    let first = stream.next_named("notification", WAIT).await.unwrap();
    assert_eq!(first.data["title"], "first");
    assert!(first.data["read_at"].is_null());
    let count = stream.next_named("unread_count", WAIT).await.unwrap();
    assert_eq!(count.data["unread_count"], 1);
    let last_seen = stream.last_event_id.clone().unwrap();
    drop(stream);

    for title in ["second", "third", "fourth"] {
        announce(&app, "alice", title).await;
    }
    wait_until(WAIT, "the missed notifications are projected", || async {
        unread(&app, "alice").await == 4
    })
    .await;

    let mut resumed = SseClient::open(&app, path, &alice, Some(&last_seen)).await;
    let mut missed = Vec::new();
    loop {
        let event = resumed.next(WAIT).await.expect("the catch-up arrives");
        match event.event.as_str() {
            "notification" => missed.push(event.data["title"].as_str().unwrap().to_string()),
            "unread_count" => {
                assert_eq!(event.data["unread_count"], 4);
                break;
            }
            other => panic!("unexpected {other} event while catching up"),
        }
    }
    assert_eq!(missed, ["second", "third", "fourth"]);

    announce(&app, "alice", "fifth").await;
    let live = resumed.next(WAIT).await.unwrap();
    assert_eq!(live.event, "notification", "no repeats before live ones");
    assert_eq!(live.data["title"], "fifth");
    assert!(live.id.parse::<u64>().unwrap() > last_seen.parse::<u64>().unwrap());
    let count = resumed.next(WAIT).await.unwrap();
    assert_eq!(
        (count.event.as_str(), &count.data["unread_count"]),
        ("unread_count", &json!(5))
    );

    // Reads come live as `read` events with the new count.
    let id = live.data["id"].as_str().unwrap().to_string();
    let response = app
        .post(&format!("/v1/me/notifications/{id}/read"), &alice, None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let read = resumed.next(WAIT).await.unwrap();
    assert_eq!(read.event, "read");
    assert_eq!(read.data["ids"], json!([id]));
    let count = resumed.next(WAIT).await.unwrap();
    assert_eq!(count.data["unread_count"], 4);
}

#[tokio::test]
async fn a_resumed_feed_stream_reports_reads_it_missed() {
    let (app, _) = spawn_app_with_workers().await;
    let bob = app.user("bob");
    announce(&app, "bob", "one").await;
    announce(&app, "bob", "two").await;
    wait_until(WAIT, "projected", || async {
        unread(&app, "bob").await == 2
    })
    .await;
    let path = "/v1/me/notifications/stream";
    let mut stream = SseClient::open(&app, path, &bob, None).await;
    stream.next_named("unread_count", WAIT).await.unwrap();
    let last_seen = stream.last_event_id.clone().unwrap();
    drop(stream);
    let response = app.post("/v1/me/notifications/read-all", &bob, None).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    announce(&app, "bob", "three").await;
    wait_until(WAIT, "projected", || async {
        unread(&app, "bob").await == 1
    })
    .await;
    let mut resumed = SseClient::open(&app, path, &bob, Some(&last_seen)).await;
    let read = resumed.next(WAIT).await.unwrap();
    assert_eq!(read.event, "read");
    assert_eq!(read.data["ids"].as_array().unwrap().len(), 2);
    let created = resumed.next(WAIT).await.unwrap();
    assert_eq!(created.event, "notification");
    assert_eq!(created.data["title"], "three");
    let count = resumed.next(WAIT).await.unwrap();
    assert_eq!(count.data["unread_count"], 1);
}

#[tokio::test]
async fn a_leaderboard_stream_resumes_with_the_entries_that_changed() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    let viewer = app.user("viewer");
    let path = format!("/v1/tests/{test_id}/leaderboard/stream");
    let mut stream = SseClient::open(&app, &path, &viewer, None).await;
    take(&app, &test_id, "bob", 4).await;
    let bob = stream.next_named("entry", WAIT).await.unwrap();
    assert_eq!(
        (bob.data["user_id"].as_str(), bob.data["rank"].as_u64()),
        (Some("bob"), Some(1))
    );
    let last_seen = stream.last_event_id.clone().unwrap();
    drop(stream);

    take(&app, &test_id, "cat", 6).await;
    take(&app, &test_id, "dan", 10).await;
    settle_board(&app, &test_id, 3).await;
    // `?last_event_id=` serves clients that cannot set the header.
    let resume = format!("{path}?last_event_id={last_seen}");
    let mut resumed = SseClient::open(&app, &resume, &viewer, None).await;
    let cat = resumed.next(WAIT).await.unwrap();
    let dan = resumed.next(WAIT).await.unwrap();
    assert_eq!(
        [
            &cat.data["user_id"],
            &cat.data["rank"],
            &dan.data["user_id"],
            &dan.data["rank"]
        ],
        [&json!("cat"), &json!(2), &json!("dan"), &json!(1)]
    );
    take(&app, &test_id, "eve", 0).await;
    let eve = resumed.next(WAIT).await.unwrap();
    assert_eq!(
        (eve.event.as_str(), &eve.data["user_id"], &eve.data["rank"]),
        ("entry", &json!("eve"), &json!(4))
    );
}

#[tokio::test]
async fn streams_authenticate_by_query_token_send_heartbeats_and_are_limited_per_user() {
    let (app, prefix) = spawn_app_with_workers().await;
    let limited = app
        .another_instance(|settings| {
            settings.nats.nats_url = Some(nats_url());
            settings.nats.nats_prefix = prefix.clone();
            settings.workers = false;
            settings.query.sse_heartbeat_secs = 1;
            settings.query.sse_max_streams_per_user = 2;
        })
        .await;
    let token = app.user("carol");
    let path = "/v1/me/notifications/stream";

    let response = limited
        .client
        .get(format!("{}{path}", limited.address))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNAUTHORIZED).await;
    let response = limited
        .client
        .get(format!("{}{path}", limited.address))
        .bearer_auth(&token)
        .header("Last-Event-ID", "yesterday")
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::BAD_REQUEST).await;

    let by_query = limited
        .client
        .get(format!("{}{path}?access_token={token}", limited.address))
        .send()
        .await
        .unwrap();
    assert_eq!(by_query.status(), StatusCode::OK);
    assert_eq!(by_query.headers()["cache-control"], "no-cache");
    assert_eq!(by_query.headers()["x-accel-buffering"], "no");
    let mut second = SseClient::open(&limited, path, &token, None).await;
    let third = limited
        .client
        .get(format!("{}{path}", limited.address))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert!(third.headers().contains_key("retry-after"));
    assert_problem(third, StatusCode::TOO_MANY_REQUESTS).await;
    // Another user is not limited by carol's streams.
    SseClient::open(&limited, path, &limited.user("dave"), None).await;

    // The opening comment plus at least two heartbeats, a second apart.
    assert!(second.until_comments(3, WAIT).await, "no heartbeats");
    drop(by_query);
    wait_until(WAIT, "a closed stream frees its slot", || async {
        limited
            .client
            .get(format!("{}{path}", limited.address))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status()
            == StatusCode::OK
    })
    .await;
}

#[tokio::test]
async fn a_stream_for_an_unknown_test_is_not_found() {
    let (app, _) = spawn_app_with_workers().await;
    let path = format!("/v1/tests/{}/leaderboard/stream", uuid::Uuid::new_v4());
    let response = app.get(&path, &app.user("viewer")).await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
}

#[tokio::test]
async fn a_client_behind_a_tiny_buffer_still_gets_every_change_once() {
    let (app, prefix) = spawn_app_with_workers().await;
    let tiny = app
        .another_instance(|settings| {
            settings.nats.nats_url = Some(nats_url());
            settings.nats.nats_prefix = prefix.clone();
            settings.workers = false;
            settings.query.sse_buffer = 1;
        })
        .await;
    let path = "/v1/me/notifications/stream";
    let mut stream = SseClient::open(&tiny, path, &app.user("frank"), None).await;
    stream.next_named("unread_count", WAIT).await.unwrap();
    // One request, five notifications to frank: one worker batch, five
    // changes in a burst.
    let body = json!({"user_ids": ["frank"], "title": "burst", "body": "x"});
    for _ in 0..5 {
        let response = app
            .post("/v1/notifications", &app.admin(), Some(body.clone()))
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let mut ids = std::collections::HashSet::new();
    let mut unread = 0;
    while unread < 5 {
        let event = stream.next(WAIT).await.expect("the changes arrive");
        match event.event.as_str() {
            "notification" => assert!(ids.insert(event.data["id"].to_string()), "a repeat"),
            "unread_count" => unread = event.data["unread_count"].as_u64().unwrap(),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ids.len(), 5);
    println!(
        "slow-client catch-ups: {}",
        tiny.metric("podium_sse_slow_clients_total", &[]).await
    );
}

#[tokio::test]
async fn streams_end_cleanly_when_the_server_shuts_down() {
    let (app, prefix) = spawn_app_with_workers().await;
    let leaving = app
        .another_instance(|settings| {
            settings.nats.nats_url = Some(nats_url());
            settings.nats.nats_prefix = prefix.clone();
            settings.workers = false;
        })
        .await;
    let mut stream = SseClient::open(
        &leaving,
        "/v1/me/notifications/stream",
        &app.user("gina"),
        None,
    )
    .await;
    stream.next_named("unread_count", WAIT).await.unwrap();
    drop(leaving);
    assert!(
        stream.ends_within(WAIT).await,
        "the stream outlived the server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_resuming_from_zero_on_a_large_board_leave_commands_answering() {
    let app = crate::helpers::spawn_app().await;
    let test_id = app.published_test().await;
    let test: uuid::Uuid = test_id.parse().unwrap();
    // A 100,000-entry board, every entry changed since seq 0.
    crate::helpers::fill_board(&app.pool, test, 100_000, ("'u' || n", "n % 50", "n")).await;
    sqlx::query("ANALYZE lb_entries")
        .execute(&app.pool)
        .await
        .unwrap();

    // Twenty clients reconnect from 0 again and again (each resume is told
    // to reload) while a learner takes tests.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let resumes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let (client, address) = (app.client.clone(), app.address.clone());
            let token = app.user(&format!("watcher{i}"));
            let path = format!("{address}/v1/tests/{test_id}/leaderboard/stream");
            let (done, resumes) = (done.clone(), resumes.clone());
            tokio::spawn(async move {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = client
                        .get(&path)
                        .bearer_auth(&token)
                        .header("Last-Event-ID", "0")
                        .timeout(Duration::from_secs(30));
                    if let Ok(mut response) = request.send().await {
                        // The first event (the resync), then hang up.
                        let _ = response.chunk().await;
                        resumes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let learner = app.user("learner");
    for _ in 0..20 {
        let response = app.start_attempt(&test_id, &learner, None).await;
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    assert!(resumes.load(std::sync::atomic::Ordering::Relaxed) >= 20);

    // A resume that missed too much is told to reload, from the first event.
    let mut stream = SseClient::open(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/stream"),
        &learner,
        Some("0"),
    )
    .await;
    let first = stream.next(Duration::from_secs(10)).await.unwrap();
    assert_eq!(first.event, "resync");
}

#[tokio::test]
async fn a_change_lost_on_the_way_is_caught_up_from_the_read_model() {
    let (app, prefix) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    let viewer = app.user("viewer");
    let path = format!("/v1/tests/{test_id}/leaderboard/stream");
    let mut stream = SseClient::open(&app, &path, &viewer, None).await;
    take(&app, &test_id, "ann", 4).await;
    let ann = stream.next_named("entry", WAIT).await.unwrap();
    assert_eq!(ann.data["user_id"], "ann");
    let ann_seq: u64 = ann.id.parse().unwrap();

    // Bob's entry reaches the read model, but its change notification is
    // lost on the way (core NATS drops messages to slow subscribers).
    let lost = ann_seq + 1_000;
    let bob = ("'bob'", "10", &*lost.to_string());
    let test = test_id.parse::<uuid::Uuid>().unwrap();
    crate::helpers::fill_board(&app.pool, test, 1, bob).await;
    // The next change names it as its predecessor.
    let next = podium_domain::log::Change {
        topic: "leaderboard".into(),
        key: test_id.clone(),
        seq: lost + 1,
        data: json!({"user_id": "cat", "score": 1, "rank": 3, "previous_rank": null, "attempts": 1}),
        prev: Some(lost),
    };
    let client = async_nats::connect(nats_url()).await.unwrap();
    let subject = format!("{prefix}.changed.leaderboard.{test_id}");
    client
        .publish(subject, serde_json::to_vec(&next).unwrap().into())
        .await
        .unwrap();
    client.flush().await.unwrap();

    let caught = stream.next_named("entry", WAIT).await.unwrap();
    assert_eq!(
        (&caught.data["user_id"], caught.id.as_str()),
        (&json!("bob"), lost.to_string().as_str()),
        "the lost change, from the read model"
    );
    let then = stream.next_named("entry", WAIT).await.unwrap();
    assert_eq!(then.data["user_id"], "cat");
}
