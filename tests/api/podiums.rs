//! Period podiums with several instances: a period that closes while three
//! instances run notifies each of its first three once; an instance that
//! starts later without the ledger's record notifies the same period again,
//! and that changes nothing.
//!
//! The clock: every instance is given the same manual clock
//! (`Settings::clock`), which commands, leaderboard windows and the podium
//! loop read; the test moves it past midnight and the grace instead of
//! waiting for them.

use std::time::Duration;

use podium::Settings;

use crate::conformance::{eventually, manual_clock, notified, podium_day, services_or_skip};
use crate::helpers::spawn_app_with;
use crate::nats::{nats_url, unique_prefix};

/// `period_podium` notifications in the log, however many instances wrote.
async fn podium_events(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events
          WHERE aggregate_type = 'Notification' AND payload::text LIKE '%\"period_podium\"%'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Periods recorded as notified that had anyone on a podium (an instance
/// that starts records the last closed periods too, empty ones included).
async fn recorded(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT window_name, to_char(period_start AT TIME ZONE 'UTC', 'YYYY-MM-DD')
           FROM period_podiums WHERE notified > 0 ORDER BY window_name, period_start",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_period_closing_under_three_instances_notifies_each_place_once() {
    if !services_or_skip("a_period_closing_under_three_instances_notifies_each_place_once").await {
        return;
    }
    let clock = manual_clock("2028-02-29T23:58:00Z");
    let prefix = unique_prefix();
    let configure = |s: &mut Settings| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = prefix.clone();
        s.database.db_max_connections = 3;
        s.clock = clock.clone();
    };
    let first = spawn_app_with(configure).await;
    let second = first.another_instance(configure).await;
    let third = first.another_instance(configure).await;
    let test_id = first.published_test().await;
    podium_day(&second, &test_id).await;

    // Midnight and the grace pass for all three at once.
    clock.advance(Duration::from_secs(150));
    let closed = vec![
        ("day".to_string(), "2028-02-29".to_string()),
        ("month".to_string(), "2028-02-01".to_string()),
    ];
    eventually("both periods recorded", || async {
        (recorded(&first.pool).await == closed).then_some(())
    })
    .await;
    for user in ["gold", "silver", "bronze"] {
        notified(&third, user, "period_podium", 2).await;
    }
    assert_eq!(
        podium_events(&first.pool).await,
        6,
        "3 places × (day, month)"
    );

    // An instance that starts without the record (lost, or never written
    // before a crash) notifies the same periods again: nothing new.
    drop(second);
    sqlx::query("DELETE FROM period_podiums")
        .execute(&first.pool)
        .await
        .unwrap();
    let fourth = first.another_instance(configure).await;
    eventually("the periods recorded again", || async {
        (recorded(&first.pool).await == closed).then_some(())
    })
    .await;
    assert_eq!(podium_events(&first.pool).await, 6);
    for user in ["gold", "silver", "bronze"] {
        assert_eq!(notified(&fourth, user, "period_podium", 2).await.len(), 2);
    }
    // Podiums are read from the read model: no closed period's board is
    // warmed in the rank index of an instance nobody asked for it.
    assert_eq!(fourth.metric("podium_rank_index_boards", &[]).await, 0.0);
}
