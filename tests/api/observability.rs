//! The observability package (`deploy/observability/`): its alert rules
//! pass promtool's checks and unit tests, and the dashboard and the rules
//! name only metric families that `/metrics` serves, the dashboard every one
//! of them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::conformance::{serve, Adapters};
use crate::helpers::poll;

fn package() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/observability")
}

/// promtool, if installed; otherwise says the test was skipped, or fails it
/// when `PODIUM_REQUIRE_SERVICES` is set.
fn promtool_or_skip(test: &str) -> Option<PathBuf> {
    let promtool = std::env::var_os("PODIUM_PROMTOOL")
        .map_or_else(|| PathBuf::from("/usr/bin/promtool"), PathBuf::from);
    if promtool.exists() {
        return Some(promtool);
    }
    assert!(
        std::env::var_os("PODIUM_REQUIRE_SERVICES").is_none(),
        "{test}: {} is missing, and PODIUM_REQUIRE_SERVICES forbids skipping",
        promtool.display()
    );
    eprintln!("SKIPPED {test}: promtool is not installed (run scripts/promtool)");
    None
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let Some(promtool) = promtool_or_skip("observability::promtool") else {
        return;
    };
    let dir = package().join("prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts.test.yml"],
        &["check", "config", "prometheus.yml"],
    ] {
        let output = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The `podium_*` names in `text`, histogram series (`_bucket`, `_sum`,
/// `_count`) under their family's name when `families` has it.
fn names_in(text: &str, families: &BTreeSet<String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("podium_") {
        let start = at + found;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if !preceded {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .filter(|base| families.contains(*base))
                .unwrap_or(name);
            names.insert(family.to_string());
        }
        at = end;
    }
    names
}

/// The expressions of the dashboard's panels.
fn dashboard_exprs() -> String {
    let dashboard: Value = serde_json::from_slice(
        &std::fs::read(package().join("grafana/dashboards/podium.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(
        exprs.len() > 20,
        "the dashboard has {} queries",
        exprs.len()
    );
    exprs.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_rules_name_what_metrics_serves_and_the_dashboard_all_of_it() {
    let test = "observability::metric_names";
    let Some(app) = serve(Adapters::Production, test, |settings| {
        // Budgets generous enough to refuse nothing, so that they exist.
        settings.rate_limits = podium::config::RateLimits::On(Default::default());
    })
    .await
    else {
        return;
    };
    // What a working deployment does: a test, an attempt, reads, a stream
    // resumed, a 404.
    let test_id = app.published_test().await;
    let learner = app.user("learner");
    let attempt = app.started_attempt(&test_id, &learner).await;
    let submitted = app
        .submit(
            &attempt,
            &learner,
            Some(json!({"answers": {"q1": 1, "q2": 0}})),
        )
        .await;
    assert_eq!(submitted.status(), StatusCode::OK);
    let board = format!("/v1/tests/{test_id}/leaderboard");
    poll(
        "the submission on the board",
        Duration::from_secs(30),
        || async {
            let page: Value = app.get(&board, &learner).await.json().await.unwrap();
            if page["total"] == 1 {
                Ok(())
            } else {
                Err(page)
            }
        },
    )
    .await;
    let missing = app
        .get("/v1/tests/00000000-0000-0000-0000-000000000000", &learner)
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let stream = app
        .client
        .get(format!("{}{board}/stream", app.address))
        .bearer_auth(&learner)
        .header("last-event-id", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    // Every family, once the background sampling has seen the projections.
    let families = poll(
        "every family in /metrics",
        Duration::from_secs(30),
        || async {
            let text = app.metrics_text().await;
            let families: BTreeSet<String> = text
                .lines()
                .filter_map(|line| line.strip_prefix("# TYPE "))
                .filter_map(|line| line.split_whitespace().next())
                .map(str::to_string)
                .collect();
            if families.contains("podium_projection_lag_seconds")
                && families.contains("podium_lease_owner")
                && families.contains("podium_rank_index_reads_total")
            {
                Ok(families)
            } else {
                Err(families)
            }
        },
    )
    .await;
    drop(stream);
    let rules = std::fs::read_to_string(package().join("prometheus/alerts.yml")).unwrap();
    let ruled = names_in(&rules, &families);
    let charted = names_in(&dashboard_exprs(), &families);
    let unknown: Vec<&String> = ruled
        .union(&charted)
        .filter(|n| !families.contains(*n))
        .collect();
    assert!(unknown.is_empty(), "named but not served: {unknown:?}");
    let uncharted: Vec<&String> = families.difference(&charted).collect();
    assert!(
        uncharted.is_empty(),
        "served but not on the dashboard: {uncharted:?}"
    );
}
