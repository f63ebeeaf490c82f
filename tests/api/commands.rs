use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, sample_test, spawn_app};

#[tokio::test]
async fn a_learner_takes_a_test_and_gets_the_graded_score() {
    let app = spawn_app().await;
    let response = app.publish_test(sample_test()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let published: Value = response.json().await.unwrap();
    assert_eq!(published["max_score"], 10);
    let test_id = published["id"].as_str().unwrap();

    let alice = app.user("alice");
    let attempt_id = app.started_attempt(test_id, &alice).await;
    let response = app.answer(&attempt_id, "q1", &alice, 1).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // q2 answered wrong at submit time: only q1's 4 points count.
    let response = app
        .submit(&attempt_id, &alice, Some(json!({"answers": {"q2": 1}})))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let graded: Value = response.json().await.unwrap();
    assert_eq!(graded["attempt_id"], attempt_id.as_str());
    assert_eq!(graded["test_id"], test_id);
    assert_eq!(graded["score"], 4);
    assert_eq!(graded["max_score"], 10);
    assert_eq!(graded["correct"], 1);
    assert!(graded["duration_ms"].as_u64().is_some());
    assert!(graded["submitted_at"].as_str().is_some());

    let response = app.get(&format!("/v1/attempts/{attempt_id}"), &alice).await;
    assert_eq!(response.status(), StatusCode::OK);
    let attempt: Value = response.json().await.unwrap();
    assert_eq!(attempt["status"], "submitted");
    assert_eq!(attempt["user_id"], "alice");
    assert_eq!(attempt["answers"], json!({"q1": 1, "q2": 1}));
    assert_eq!(attempt["score"], 4);
}

#[tokio::test]
async fn a_perfect_submission_scores_the_maximum() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let bob = app.user("bob");
    let attempt_id = app.started_attempt(&test_id, &bob).await;
    let response = app
        .submit(
            &attempt_id,
            &bob,
            Some(json!({"answers": {"q1": 1, "q2": 0}})),
        )
        .await;
    let graded: Value = response.json().await.unwrap();
    assert_eq!(graded["score"], 10);
    assert_eq!(graded["correct"], 2);
}

#[tokio::test]
async fn submitting_twice_is_a_conflict() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt_id = app.started_attempt(&test_id, &alice).await;
    assert_eq!(
        app.submit(&attempt_id, &alice, None).await.status(),
        StatusCode::OK
    );
    let events = app.event_count().await;
    let body = assert_problem(
        app.submit(&attempt_id, &alice, None).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains("already been submitted"));
    let response = app.answer(&attempt_id, "q1", &alice, 0).await;
    assert_problem(response, StatusCode::CONFLICT).await;
    assert_eq!(app.event_count().await, events);
}

#[tokio::test]
async fn another_user_can_neither_answer_submit_nor_read_an_attempt() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let attempt_id = app.started_attempt(&test_id, &app.user("alice")).await;
    let mallory = app.user("mallory");
    let events = app.event_count().await;
    assert_problem(
        app.submit(&attempt_id, &mallory, None).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_problem(
        app.answer(&attempt_id, "q1", &mallory, 0).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let response = app
        .get(&format!("/v1/attempts/{attempt_id}"), &mallory)
        .await;
    assert_problem(response, StatusCode::FORBIDDEN).await;
    assert_eq!(app.event_count().await, events);
    // An admin may read it.
    let response = app
        .get(&format!("/v1/attempts/{attempt_id}"), &app.admin())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn repeating_a_start_with_the_same_attempt_id_answers_200_with_the_same_body() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt_id = uuid::Uuid::new_v4().to_string();
    let body = json!({"attempt_id": attempt_id});
    let first = app
        .start_attempt(&test_id, &alice, Some(body.clone()))
        .await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["attempt_id"], attempt_id.as_str());
    let events = app.event_count().await;
    let again = app
        .start_attempt(&test_id, &alice, Some(body.clone()))
        .await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    assert_eq!(app.event_count().await, events);
    // The same id from another user is a conflict, not their attempt.
    let response = app
        .start_attempt(&test_id, &app.user("bob"), Some(body))
        .await;
    assert_problem(response, StatusCode::CONFLICT).await;
}

#[tokio::test]
async fn attempts_need_a_published_test_that_is_not_archived() {
    let app = spawn_app().await;
    let alice = app.user("alice");
    let unknown = uuid::Uuid::new_v4();
    let response = app.start_attempt(&unknown.to_string(), &alice, None).await;
    assert_problem(response, StatusCode::NOT_FOUND).await;

    let test_id = app.published_test().await;
    let response = app
        .post(&format!("/v1/tests/{test_id}/archive"), &app.admin(), None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    // Archiving again is harmless.
    let events = app.event_count().await;
    let response = app
        .post(&format!("/v1/tests/{test_id}/archive"), &app.admin(), None)
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.event_count().await, events);
    let body = assert_problem(
        app.start_attempt(&test_id, &alice, None).await,
        StatusCode::CONFLICT,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("archived"));
}

#[tokio::test]
async fn the_test_as_served_hides_the_answer_key() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let response = app
        .get(&format!("/v1/tests/{test_id}"), &app.user("alice"))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let test: Value = response.json().await.unwrap();
    assert_eq!(test["id"], test_id.as_str());
    assert_eq!(test["title"], "Geography");
    assert_eq!(test["max_score"], 10);
    assert_eq!(
        test["questions"][0]["choices"],
        json!(["Lyon", "Paris", "Nice"])
    );
    assert!(!test.to_string().contains("answer"), "{test}");
}

#[tokio::test]
async fn a_client_chosen_test_id_is_kept_and_cannot_be_reused() {
    let app = spawn_app().await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut body = sample_test();
    body["id"] = json!(id);
    let response = app.publish_test(body.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.json::<Value>().await.unwrap()["id"], id.as_str());
    assert_problem(app.publish_test(body).await, StatusCode::CONFLICT).await;
}

#[tokio::test]
async fn an_odd_request_id_is_replaced_not_recorded() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    for odd in [
        "x".repeat(10_000),
        "two words".to_string(),
        "ünïcode".to_string(),
    ] {
        let response = app
            .request(
                reqwest::Method::POST,
                &format!("/v1/tests/{test_id}/attempts"),
                Some(&alice),
            )
            .header("x-request-id", odd.as_str())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let given = response.headers()["x-request-id"].to_str().unwrap();
        assert!(uuid::Uuid::parse_str(given).is_ok(), "{given:.40}");
    }
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT metadata->>'request_id' FROM events WHERE event_type = 'AttemptStarted'",
    )
    .fetch_all(&app.pool)
    .await
    .unwrap();
    assert_eq!(ids.len(), 3);
    assert!(
        ids.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()),
        "{ids:?}"
    );
}

#[tokio::test]
async fn every_event_records_its_actor_request_and_time() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let response = app
        .request(
            reqwest::Method::POST,
            &format!("/v1/tests/{test_id}/attempts"),
            Some(&alice),
        )
        .header("x-request-id", "req-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["x-request-id"], "req-abc-123");
    let (metadata, version, recorded): (Value, String, bool) = sqlx::query_as(
        "SELECT metadata, event_version, recorded_at > now() - interval '1 minute'
           FROM events WHERE event_type = 'AttemptStarted'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(metadata["actor"], "alice");
    assert_eq!(metadata["request_id"], "req-abc-123");
    assert!(metadata["recorded_at"].as_str().is_some());
    assert_eq!(version, "1.0");
    assert!(recorded);
}
