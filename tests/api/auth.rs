use std::time::{SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{assert_problem, sample_test, spawn_app, SECRET};

fn signed(secret: &str, exp_offset_secs: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({"sub": "admin-1", "role": "admin", "exp": now + exp_offset_secs});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn requests_without_a_valid_token_are_unauthorized_and_change_nothing() {
    let app = spawn_app().await;
    let cases = [
        ("no token", None),
        (
            "bad signature",
            Some(signed("another-secret-another-secret-another", 600)),
        ),
        ("expired", Some(signed(SECRET, -3600))),
        ("garbage", Some("not.a.jwt".to_string())),
    ];
    for (case, token) in cases {
        let response = app
            .request(Method::POST, "/v1/tests", token.as_deref())
            .json(&sample_test())
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        let body = assert_problem(response, StatusCode::UNAUTHORIZED).await;
        assert!(!body["detail"].as_str().unwrap().is_empty(), "{case}");
    }
    let expired = signed(SECRET, -3600);
    let body = assert_problem(
        app.request(
            Method::GET,
            "/v1/attempts/00000000-0000-0000-0000-000000000000",
            Some(&expired),
        )
        .send()
        .await
        .unwrap(),
        StatusCode::UNAUTHORIZED,
    )
    .await;
    assert!(body["detail"].as_str().unwrap().contains("expired"));
    assert_eq!(app.event_count().await, 0);
}

#[tokio::test]
async fn a_valid_token_signed_elsewhere_with_our_secret_is_accepted() {
    let app = spawn_app().await;
    let response = app
        .post("/v1/tests", &signed(SECRET, 600), Some(sample_test()))
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn users_cannot_do_what_only_admins_may() {
    let app = spawn_app().await;
    let alice = app.user("alice");
    let test_id = app.published_test().await;
    let events = app.event_count().await;
    assert_problem(
        app.post("/v1/tests", &alice, Some(sample_test())).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    let archive = app
        .post(&format!("/v1/tests/{test_id}/archive"), &alice, None)
        .await;
    assert_problem(archive, StatusCode::FORBIDDEN).await;
    let notify = json!({"user_ids": ["bob"], "title": "Hi", "body": "spam"});
    assert_problem(
        app.post("/v1/notifications", &alice, Some(notify)).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_eq!(app.event_count().await, events);
}
