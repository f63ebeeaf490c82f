use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_fifty_concurrent_submits_exactly_one_succeeds() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt_id = app.started_attempt(&test_id, &alice).await;
    let submits = (0..50).map(|i| {
        let body = json!({"answers": {"q1": i % 3}});
        app.submit(&attempt_id, &alice, Some(body))
    });
    let statuses: Vec<StatusCode> = join_all(submits).await.iter().map(|r| r.status()).collect();
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let conflicts = statuses
        .iter()
        .filter(|s| **s == StatusCode::CONFLICT)
        .count();
    assert_eq!((ok, conflicts), (1, 49), "{statuses:?}");
    let submitted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'AttemptSubmitted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(submitted, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_with_one_attempt_id_create_one_attempt() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let body = json!({"attempt_id": uuid::Uuid::new_v4()});
    let starts = (0..20).map(|_| app.start_attempt(&test_id, &alice, Some(body.clone())));
    let statuses: Vec<StatusCode> = join_all(starts).await.iter().map(|r| r.status()).collect();
    let created = statuses
        .iter()
        .filter(|s| **s == StatusCode::CREATED)
        .count();
    let repeated = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!((created, repeated), (1, 19), "{statuses:?}");
    let started: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'AttemptStarted'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(started, 1);
}
