//! Every class of bad input gets its 4xx problem+json and records nothing.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_problem, sample_test, spawn_app, TestApp};

/// Sends a raw body with a content type to `path` as `token`.
async fn send_raw(
    app: &TestApp,
    method: Method,
    path: &str,
    token: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    app.request(method, path, Some(token))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn malformed_json_is_a_bad_request() {
    let app = spawn_app().await;
    let admin = app.admin();
    let response = send_raw(
        &app,
        Method::POST,
        "/v1/tests",
        &admin,
        "application/json",
        "{\"title\": ",
    )
    .await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_an_unsupported_media_type() {
    let app = spawn_app().await;
    let body = sample_test().to_string();
    let response = send_raw(
        &app,
        Method::POST,
        "/v1/tests",
        &app.admin(),
        "text/plain",
        body,
    )
    .await;
    assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let path = format!("/v1/tests/{test_id}/attempts");
    let response = send_raw(&app, Method::POST, &path, &alice, "text/plain", "{}").await;
    assert_problem(response, StatusCode::UNSUPPORTED_MEDIA_TYPE).await;
    assert_eq!(app.event_count().await, 1);
}

#[tokio::test]
async fn an_oversized_body_is_refused_with_413() {
    let app = spawn_app().await;
    let mut test = sample_test();
    test["title"] = json!("x".repeat(3 * 1024 * 1024));
    let body = test.to_string();
    let response = send_raw(
        &app,
        Method::POST,
        "/v1/tests",
        &app.admin(),
        "application/json",
        body.clone(),
    )
    .await;
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    // The idempotency layer reads bodies itself: the same limit applies there.
    let response = app
        .request(Method::POST, "/v1/tests", Some(&app.admin()))
        .header("content-type", "application/json")
        .header("idempotency-key", "big-1")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::PAYLOAD_TOO_LARGE).await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn malformed_ids_in_the_path_are_bad_requests() {
    let app = spawn_app().await;
    let alice = app.user("alice");
    for path in ["/v1/tests/not-a-uuid", "/v1/attempts/1234"] {
        assert_problem(app.get(path, &alice).await, StatusCode::BAD_REQUEST).await;
    }
    let response = app.post("/v1/tests/xyz/attempts", &alice, None).await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
    let response = app
        .post("/v1/me/notifications/xyz/read", &alice, None)
        .await;
    assert_problem(response, StatusCode::BAD_REQUEST).await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn unknown_ids_and_routes_are_not_found() {
    let app = spawn_app().await;
    let alice = app.user("alice");
    let unknown = uuid::Uuid::new_v4();
    assert_problem(
        app.get(&format!("/v1/tests/{unknown}"), &alice).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(
        app.get(&format!("/v1/attempts/{unknown}"), &alice).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(
        app.submit(&unknown.to_string(), &alice, None).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let response = app.answer(&unknown.to_string(), "q1", &alice, 0).await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    let response = app
        .post(&format!("/v1/tests/{unknown}/archive"), &app.admin(), None)
        .await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    let response = app
        .post(
            &format!("/v1/me/notifications/{unknown}/read"),
            &alice,
            None,
        )
        .await;
    assert_problem(response, StatusCode::NOT_FOUND).await;
    assert_problem(
        app.get("/v1/nothing-here", &alice).await,
        StatusCode::NOT_FOUND,
    )
    .await;
    let response = app
        .request(Method::DELETE, "/v1/tests", Some(&alice))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::METHOD_NOT_ALLOWED).await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn out_of_range_test_definitions_are_unprocessable_with_field_errors() {
    let app = spawn_app().await;
    let mut test = sample_test();
    test["questions"][0]["answer"] = json!(3);
    test["questions"][1]["points"] = json!(-2);
    test["time_limit_secs"] = json!(0);
    let body = assert_problem(
        app.publish_test(test).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "time_limit_secs",
            "questions[0].answer",
            "questions[1].points"
        ]
    );

    let no_questions = json!({"title": "Empty", "questions": []});
    assert_problem(
        app.publish_test(no_questions).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let mut duplicate = sample_test();
    duplicate["questions"][1]["id"] = json!("q1");
    assert_problem(
        app.publish_test(duplicate).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    let mut wrong_type = sample_test();
    wrong_type["questions"] = json!("many");
    assert_problem(
        app.publish_test(wrong_type).await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn out_of_range_answers_are_unprocessable_and_change_nothing() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt_id = app.started_attempt(&test_id, &alice).await;
    let events = app.event_count().await;
    for (question, choice) in [("q1", 3), ("q1", -1), ("nope", 0)] {
        let response = app.answer(&attempt_id, question, &alice, choice).await;
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    let response = app
        .submit(&attempt_id, &alice, Some(json!({"answers": {"q2": 9}})))
        .await;
    let body: Value = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(body["errors"][0]["field"], "answers.q2");
    let response = app
        .submit(
            &attempt_id,
            &alice,
            Some(json!({"answers": {"q2": "zero"}})),
        )
        .await;
    assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(app.event_count().await, events);
    // The attempt is still open: a valid submission goes through.
    assert_eq!(
        app.submit(&attempt_id, &alice, None).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_flood_of_answers_is_refused_briefly() {
    let app = spawn_app().await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let attempt_id = app.started_attempt(&test_id, &alice).await;
    let events = app.event_count().await;
    let flood: serde_json::Map<String, Value> =
        (0..100_000).map(|n| (format!("x{n}"), json!(0))).collect();
    let response = app
        .submit(&attempt_id, &alice, Some(json!({ "answers": flood })))
        .await;
    let text = response.text().await.unwrap();
    assert!(text.len() < 4_096, "a {} byte answer", text.len());
    let problem: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(problem["status"], 422);
    assert_eq!(problem["errors"][0]["field"], "answers");
    let message = problem["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("at most one per question"), "{message}");

    // As many wrong answers as questions: each is named.
    let wrong: serde_json::Map<String, Value> = ["nope1", "nope2"]
        .iter()
        .map(|q| (q.to_string(), json!(0)))
        .collect();
    let response = app
        .submit(&attempt_id, &alice, Some(json!({ "answers": wrong })))
        .await;
    let problem = assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2);
    assert_eq!(app.event_count().await, events);
}

#[tokio::test]
async fn invalid_notifications_are_unprocessable() {
    let app = spawn_app().await;
    let admin = app.admin();
    let cases = [
        json!({"user_ids": [], "title": "Hi", "body": "x"}),
        json!({"user_ids": ["bad id"], "title": "Hi", "body": "x"}),
        json!({"user_ids": ["a", "a"], "title": "Hi", "body": "x"}),
        json!({"user_ids": ["a"], "kind": "spam", "title": "Hi", "body": "x"}),
        json!({"user_ids": ["a"], "title": "", "body": "x"}),
        json!({"user_ids": ["a"], "title": "Hi"}),
    ];
    for case in cases {
        let response = app
            .post("/v1/notifications", &admin, Some(case.clone()))
            .await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{case}"
        );
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY).await;
    }
    assert_eq!(app.event_count().await, 0);
}
