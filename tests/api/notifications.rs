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
