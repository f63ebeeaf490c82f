//! One node on Postgres without NATS: its relay feeds its own projections.
//! (Its behaviour as a whole is the conformance suite's `single_node::*`.)

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::conformance::{eventually, services_or_skip};
use crate::helpers::spawn_single_node_with;

/// A projection that falls behind the relay (one added later, or reset by
/// hand) makes the relay read the log again from its start: it catches up
/// and nothing is applied twice.
#[tokio::test]
async fn a_projection_behind_the_relay_is_fed_the_log_again_from_its_start() {
    if !services_or_skip("single_node::a_projection_behind_the_relay").await {
        return;
    }
    let app = spawn_single_node_with(|_| {}).await;
    let test_id = app.published_test().await;
    let alice = app.user("alice");
    let take = |attempt: String| {
        let app = &app;
        let alice = alice.clone();
        async move {
            let answers = json!({"answers": {"q1": 1, "q2": 0}});
            let response = app.submit(&attempt, &alice, Some(answers)).await;
            assert_eq!(response.status(), StatusCode::OK);
        }
    };
    take(app.started_attempt(&test_id, &alice).await).await;
    let listed = |n: usize| {
        let app = &app;
        let alice = alice.clone();
        async move {
            let body: Value = app.get("/v1/me/attempts", &alice).await.json().await.ok()?;
            let items = body["items"].as_array()?;
            (items.len() == n && items.iter().all(|a| a["status"] == "submitted")).then_some(())
        }
    };
    eventually("the first attempt listed", || listed(1)).await;

    // The attempts projection loses its table and checkpoint.
    sqlx::query("TRUNCATE my_attempts")
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM projection_checkpoints WHERE name = 'attempts'")
        .execute(&app.pool)
        .await
        .unwrap();
    take(app.started_attempt(&test_id, &alice).await).await;
    eventually("both attempts listed again", || listed(2)).await;
    // The leaderboard was not applied twice: one entry, two attempts.
    let board: Value = app
        .get(&format!("/v1/tests/{test_id}/leaderboard"), &alice)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(board["total"], 1);
    assert_eq!(board["entries"][0]["attempts"], 2);
    // The policy ran once per submission: two graded notifications.
    eventually("two graded notifications", || async {
        let feed: Value = app
            .get("/v1/me/notifications", &alice)
            .await
            .json()
            .await
            .ok()?;
        let graded = feed["items"]
            .as_array()?
            .iter()
            .filter(|i| i["kind"] == "attempt_graded")
            .count();
        (graded == 2).then_some(())
    })
    .await;
}
