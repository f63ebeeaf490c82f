use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_problem, sample_test, spawn_app, TestApp};

async fn post_with_key(
    app: &TestApp,
    path: &str,
    token: &str,
    key: &str,
    body: &Value,
) -> reqwest::Response {
    app.request(Method::POST, path, Some(token))
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_same_key_twice_records_one_set_of_events_and_answers_the_same() {
    let app = spawn_app().await;
    let admin = app.admin();
    let first = post_with_key(&app, "/v1/tests", &admin, "publish-1", &sample_test()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let events = app.event_count().await;
    let again = post_with_key(&app, "/v1/tests", &admin, "publish-1", &sample_test()).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.event_count().await, events);
    assert_eq!(events, 1);
}

#[tokio::test]
async fn a_retried_announcement_creates_each_notification_once() {
    let app = spawn_app().await;
    let admin = app.admin();
    let body =
        json!({"user_ids": ["alice", "bob", "carol"], "title": "Exam", "body": "Monday 9:00"});
    let first = post_with_key(&app, "/v1/notifications", &admin, "announce-1", &body).await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["notification_ids"].as_array().unwrap().len(), 3);
    let again = post_with_key(&app, "/v1/notifications", &admin, "announce-1", &body).await;
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.event_count().await, 3);
}

#[tokio::test]
async fn reusing_a_key_for_a_different_request_is_refused() {
    let app = spawn_app().await;
    let admin = app.admin();
    let first = post_with_key(&app, "/v1/tests", &admin, "k", &sample_test()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let mut other = sample_test();
    other["title"] = json!("Another title");
    let response = post_with_key(&app, "/v1/tests", &admin, "k", &other).await;
    let body = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert!(body["detail"].as_str().unwrap().contains("Idempotency-Key"));
    assert_eq!(app.event_count().await, 1);
}

#[tokio::test]
async fn keys_belong_to_their_caller() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let path = format!("/v1/tests/{test_id}/attempts");
    let alice = post_with_key(&app, &path, &app.user("alice"), "start", &json!({})).await;
    let bob = post_with_key(&app, &path, &app.user("bob"), "start", &json!({})).await;
    assert_eq!(alice.status(), StatusCode::CREATED);
    assert_eq!(bob.status(), StatusCode::CREATED);
    let alice: Value = alice.json().await.unwrap();
    let bob: Value = bob.json().await.unwrap();
    assert_ne!(alice["attempt_id"], bob["attempt_id"]);
    assert_eq!(app.event_count().await, 3);
}

#[tokio::test]
async fn a_rejected_request_is_replayed_as_rejected_and_a_bad_key_is_refused() {
    let app = spawn_app().await;
    let admin = app.admin();
    let invalid = json!({"title": "", "questions": []});
    let first = post_with_key(&app, "/v1/tests", &admin, "bad", &invalid).await;
    assert_eq!(first.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let again = post_with_key(&app, "/v1/tests", &admin, "bad", &invalid).await;
    assert_problem(again, StatusCode::UNPROCESSABLE_ENTITY).await;
    let too_long = "k".repeat(300);
    let response = post_with_key(&app, "/v1/tests", &admin, &too_long, &sample_test()).await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn a_request_whose_client_went_away_still_answers_its_retry() {
    let app = spawn_app().await;
    let admin = app.admin();
    // Writes to the log wait on this transaction's lock, so the request is
    // still running when its client gives up.
    let mut blocker = app.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE events IN EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let gave_up = app
        .request(Method::POST, "/v1/tests", Some(&admin))
        .header("idempotency-key", "impatient")
        .json(&sample_test())
        .timeout(std::time::Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.is_err(), "the request was still running");
    blocker.commit().await.unwrap();

    // The request ran to its end without its client, and its answer is kept.
    let pool = app.pool.clone();
    crate::helpers::poll(
        "the abandoned request's answer to be stored",
        std::time::Duration::from_secs(20),
        || async {
            let status: Option<Option<i16>> =
                sqlx::query_scalar("SELECT status FROM idempotency_keys WHERE key = 'impatient'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap();
            match status {
                Some(Some(status)) => Ok(status),
                other => Err(other),
            }
        },
    )
    .await;
    let retry = post_with_key(&app, "/v1/tests", &admin, "impatient", &sample_test()).await;
    assert_eq!(retry.status(), StatusCode::CREATED);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(app.event_count().await, 1);
}
