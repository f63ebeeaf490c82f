use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, spawn_app};

#[tokio::test]
async fn an_admin_notifies_users_who_mark_their_own_read() {
    let app = spawn_app().await;
    let body = json!({
        "user_ids": ["alice", "bob"],
        "kind": "announcement",
        "title": "Mock exam",
        "body": "Saturday at 10:00",
        "link": "https://example.org/mock"
    });
    let response = app
        .post("/v1/notifications", &app.admin(), Some(body))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let sent: Value = response.json().await.unwrap();
    let ids: Vec<String> = sent["notification_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    let (alice_note, bob_note) = (&ids[0], &ids[1]);

    let alice = app.user("alice");
    let read = format!("/v1/me/notifications/{alice_note}/read");
    assert_eq!(
        app.post(&read, &alice, None).await.status(),
        StatusCode::NO_CONTENT
    );
    let events = app.event_count().await;
    // Marking it read again is idempotent and records nothing.
    assert_eq!(
        app.post(&read, &alice, None).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(app.event_count().await, events);
    // Bob's notification is not Alice's to read.
    let response = app
        .post(
            &format!("/v1/me/notifications/{bob_note}/read"),
            &alice,
            None,
        )
        .await;
    assert_problem(response, StatusCode::FORBIDDEN).await;
    assert_eq!(app.event_count().await, events);

    let response = app
        .post("/v1/me/notifications/read-all", &app.user("bob"), None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let kinds: Vec<String> = sqlx::query_scalar("SELECT event_type FROM events ORDER BY position")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        kinds,
        [
            "NotificationCreated",
            "NotificationCreated",
            "NotificationRead",
            "AllNotificationsRead"
        ]
    );
    let payload: Value = sqlx::query_scalar(
        "SELECT payload FROM events WHERE event_type = 'NotificationCreated' AND aggregate_id = $1",
    )
    .bind(bob_note)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    let created = &payload["NotificationCreated"];
    assert_eq!(created["recipient"], "bob");
    assert_eq!(created["kind"], "announcement");
    assert_eq!(created["link"], "https://example.org/mock");
}

#[tokio::test]
async fn the_kind_defaults_to_announcement() {
    let app = spawn_app().await;
    let body = json!({"user_ids": ["alice"], "title": "Hi", "body": "Welcome"});
    let response = app
        .post("/v1/notifications", &app.admin(), Some(body))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let kind: String =
        sqlx::query_scalar("SELECT payload->'NotificationCreated'->>'kind' FROM events")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(kind, "announcement");
}

#[tokio::test]
async fn an_inbox_read_all_many_times_loads_from_a_snapshot() {
    let app = spawn_app().await;
    let bob = app.user("bob");
    let times = podium::command::INBOX_SNAPSHOT_EVERY * 2 + 3;
    for _ in 0..times {
        let response = app.post("/v1/me/notifications/read-all", &bob, None).await;
        assert_eq!(response.status(), reqwest::StatusCode::NO_CONTENT);
    }
    // A load reads the snapshot and the few events after it, not the
    // whole stream.
    let (snapshot_at, events): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT max(last_sequence) FROM snapshots
                  WHERE aggregate_type = 'Inbox' AND aggregate_id = 'bob'),
                (SELECT count(*) FROM events WHERE aggregate_type = 'Inbox' AND aggregate_id = 'bob')",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(events, times as i64);
    assert!(
        events - snapshot_at <= podium::command::INBOX_SNAPSHOT_EVERY as i64,
        "snapshot at {snapshot_at} of {events}"
    );
}

/// Inbox events of `user` in the log.
async fn read_alls(pool: &sqlx::PgPool, user: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type = 'Inbox' AND aggregate_id = $1",
    )
    .bind(user)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Waits until the relay has numbered every event and the feed applied it.
async fn feed_caught_up(pool: &sqlx::PgPool, relay: &str) {
    let check = || async {
        let (feed, relayed, head): (Option<i64>, Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT seq FROM projection_checkpoints WHERE name = 'feed'),
                    (SELECT seq FROM relay_checkpoints WHERE name = $1),
                    (SELECT count(*) FROM events)",
        )
        .bind(relay)
        .fetch_one(pool)
        .await
        .unwrap();
        if feed == Some(head) && relayed == Some(head) {
            Ok(())
        } else {
            Err((feed, relayed, head))
        }
    };
    crate::helpers::poll(
        "the feed to catch up",
        std::time::Duration::from_secs(30),
        check,
    )
    .await;
}

#[tokio::test]
async fn read_all_with_nothing_unread_records_nothing() {
    let (app, prefix) = crate::read_models::spawn_app_with_workers().await;
    app.published_test().await;
    feed_caught_up(&app.pool, &prefix).await;
    let bob = app.user("bob");
    let read_all = || app.post("/v1/me/notifications/read-all", &bob, None);
    for _ in 0..2 {
        assert_eq!(read_all().await.status(), StatusCode::NO_CONTENT);
    }
    assert_eq!(read_alls(&app.pool, "bob").await, 0, "nothing was unread");

    // Something unread: the read-all is recorded, once.
    let sent = app
        .post(
            "/v1/notifications",
            &app.admin(),
            Some(json!({"user_ids": ["bob"], "title": "Exam", "body": "Monday"})),
        )
        .await;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    feed_caught_up(&app.pool, &prefix).await;
    assert_eq!(read_all().await.status(), StatusCode::NO_CONTENT);
    assert_eq!(read_alls(&app.pool, "bob").await, 1);
    feed_caught_up(&app.pool, &prefix).await;
    let unread: Value = app
        .get("/v1/me/notifications/unread-count", &bob)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(unread["unread_count"], 0);
    assert_eq!(read_all().await.status(), StatusCode::NO_CONTENT);
    assert_eq!(read_alls(&app.pool, "bob").await, 1, "nothing unread again");
}
