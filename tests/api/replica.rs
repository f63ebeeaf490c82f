//! Queries and streams on a real streaming replica: a private primary, a hot
//! standby made from it by `pg_basebackup`, Podium with `DATABASE_READ_URL`
//! on the standby. The standby's replay is paused to show what a reader sees
//! while it lags: whole answers as of an earlier checkpoint, never a mix, and
//! streams that stay live.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::conformance::{serve, Adapters};
use crate::helpers::{poll, TestApp};
use crate::postgres::PrivatePostgres;
use crate::sse::SseClient;

/// The leaderboard as the API serves it: (rank, user) from the first page.
async fn board(app: &TestApp, test_id: &str, token: &str) -> (u64, Vec<(u64, String)>) {
    let page: Value = app
        .get(&format!("/v1/tests/{test_id}/leaderboard?limit=200"), token)
        .await
        .json()
        .await
        .unwrap();
    let entries = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["rank"].as_u64().unwrap(),
                e["user_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (page["total"].as_u64().unwrap(), entries)
}

/// `user` scores `score` of 10 on the sample test.
async fn take(app: &TestApp, test_id: &str, user: &str, score: u32) {
    let token = app.user(user);
    let attempt = app.started_attempt(test_id, &token).await;
    // q1 is worth 4 and q2 6 (the sample test).
    let answers = match score {
        10 => json!({"q1": 1, "q2": 0}),
        6 => json!({"q1": 0, "q2": 0}),
        4 => json!({"q1": 1, "q2": 1}),
        _ => json!({"q1": 0, "q2": 1}),
    };
    let submitted = app
        .submit(&attempt, &token, Some(json!({ "answers": answers })))
        .await;
    assert_eq!(submitted.status(), StatusCode::OK);
}

async fn replica_lag(app: &TestApp) -> f64 {
    app.metric("podium_db_replica_lag_seconds", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_answers_whole_older_boards_and_streams_stay_live() {
    let test = "replica::lagging";
    let primary = PrivatePostgres::start();
    let replica = primary.replica();
    let (primary_url, replica_url) = (primary.url(), replica.url());
    let Some(app) = serve(Adapters::Production, test, |settings| {
        settings.database.database_url = Some(primary_url.clone().into());
        settings.database.database_read_url = Some(replica_url.clone().into());
    })
    .await
    else {
        return;
    };
    let mut standby = sqlx::PgConnection::connect(&replica.url()).await.unwrap();
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut standby)
        .await
        .unwrap();
    assert!(in_recovery, "the replica is a hot standby");
    let test_id = app.published_test().await;
    let reader = app.user("reader");
    for n in 0..10 {
        take(&app, &test_id, &format!("early-{n}"), [10, 6, 4, 0][n % 4]).await;
    }
    let before = poll(
        "the replica to show ten entries",
        Duration::from_secs(30),
        || async {
            match board(&app, &test_id, &reader).await {
                (10, entries) => Ok(entries),
                other => Err(other),
            }
        },
    )
    .await;
    let mut stream = SseClient::open(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/stream"),
        &reader,
        None,
    )
    .await;

    // The replica stops replaying: it falls behind as submissions go on.
    sqlx::query("SELECT pg_wal_replay_pause()")
        .execute(&mut standby)
        .await
        .unwrap();
    let late: BTreeSet<String> = (0..5).map(|n| format!("late-{n}")).collect();
    for user in &late {
        take(&app, &test_id, user, 10).await;
    }
    // Streams are live: their changes come from the projections' own
    // announcements, not from the replica.
    let mut announced = BTreeSet::new();
    while announced.len() < late.len() {
        let event = stream
            .next_named("entry", Duration::from_secs(30))
            .await
            .expect("an entry for each late submission");
        announced.insert(event.data["user_id"].as_str().unwrap().to_string());
    }
    assert_eq!(announced, late);
    // Queries answer the board as of the replica's checkpoint: the same
    // whole board as before, never some of the late entries.
    poll(
        "the replica's lag in /metrics",
        Duration::from_secs(30),
        || async {
            assert_eq!(board(&app, &test_id, &reader).await, (10, before.clone()));
            let lag = replica_lag(&app).await;
            if lag > 0.0 {
                Ok(())
            } else {
                Err(lag)
            }
        },
    )
    .await;

    // Replay resumes: the answers catch up, exactly.
    sqlx::query("SELECT pg_wal_replay_resume()")
        .execute(&mut standby)
        .await
        .unwrap();
    let after = poll(
        "the replica to catch up",
        Duration::from_secs(30),
        || async {
            match board(&app, &test_id, &reader).await {
                (15, entries) => Ok(entries),
                other => Err(other),
            }
        },
    )
    .await;
    let expected: Vec<(u64, String)> = sqlx::query_scalar::<_, String>(
        "SELECT user_id FROM lb_entries WHERE test_id = $1::uuid
          ORDER BY best_score DESC, achieved_at, user_id",
    )
    .bind(&test_id)
    .fetch_all(&mut sqlx::PgConnection::connect(&primary.url()).await.unwrap())
    .await
    .unwrap()
    .into_iter()
    .enumerate()
    .map(|(i, user)| (i as u64 + 1, user))
    .collect();
    assert_eq!(after, expected, "the replica's board is the primary's");
    poll("the lag back to zero", Duration::from_secs(30), || async {
        let lag = replica_lag(&app).await;
        if lag == 0.0 {
            Ok(())
        } else {
            Err(lag)
        }
    })
    .await;
}
