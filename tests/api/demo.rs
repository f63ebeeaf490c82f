//! `podium seed`: demo data through the public API of a running server.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::SECRET;
use crate::nats::wait_until;
use crate::read_models::spawn_app_with_workers;

#[tokio::test]
async fn the_demo_seed_fills_tests_leaderboards_and_feeds_through_the_api() {
    let (app, _) = spawn_app_with_workers().await;
    let keys = podium::auth::JwtKeys::new(SECRET).unwrap();
    let size = podium::demo::DemoSize {
        learners: 12,
        attempts: 60,
    };
    let seeded = podium::demo::seed(&app.address, &keys, size).await.unwrap();
    assert_eq!(seeded.tests.len(), 3);
    assert!(app.event_count().await >= 3 + 60 * 2 + 12 * 2);
    // The attempts reach the leaderboards; scores are spread, not all equal.
    let mut scores = std::collections::BTreeSet::new();
    for test in &seeded.tests {
        let path = format!("/v1/tests/{test}/leaderboard?limit=200");
        wait_until(
            Duration::from_secs(20),
            "the demo leaderboards fill",
            || {
                let path = path.clone();
                let app = &app;
                let token = seeded.learner_token.clone();
                async move {
                    let page: Value = app.get(&path, &token).await.json().await.unwrap();
                    page["total"].as_u64().unwrap_or(0) > 0
                }
            },
        )
        .await;
        let page: Value = app
            .get(&path, &seeded.learner_token)
            .await
            .json()
            .await
            .unwrap();
        for entry in page["entries"].as_array().unwrap() {
            scores.insert(entry["score"].as_u64().unwrap());
        }
    }
    assert!(scores.len() >= 3, "scores are not spread: {scores:?}");
    // The demo learner has the two announcements (and graded attempts).
    wait_until(
        Duration::from_secs(20),
        "the announcements arrive",
        || async {
            let feed: Value = app
                .get("/v1/me/notifications?limit=200", &seeded.learner_token)
                .await
                .json()
                .await
                .unwrap();
            feed["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|item| item["kind"] == "announcement")
                .count()
                == 2
        },
    )
    .await;
    let me = app.get("/v1/me/attempts", &seeded.learner_token).await;
    assert!(me.status().is_success());
}
