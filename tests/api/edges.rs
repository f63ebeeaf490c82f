//! Production edges: shared rate limits, compression, CORS, metrics and
//! graceful shutdown.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_problem, spawn_app_with, TestApp};
use crate::nats::wait_until;
use crate::queries::{settle_board, take};
use crate::read_models::spawn_app_with_workers;
use crate::sse::SseClient;

/// Waits, if needed, until the current hour has at least a minute left, so
/// that a test counting one hourly window stays inside it.
/// A manual clock half way through an hour: a burst never straddles two
/// windows, and no test waits on the wall clock for that.
fn mid_hour_clock() -> podium::clock::Clock {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let hour = now.as_secs() / 3600 * 3600;
    podium::clock::Clock::manual(UNIX_EPOCH + Duration::from_secs(hour + 1800))
}

/// Sends `n` GETs of `path` as `token`, alternating between `apps`, eight
/// at a time; returns the responses' statuses and headers.
async fn burst(apps: &[&TestApp], path: &str, token: &str, n: usize) -> Vec<reqwest::Response> {
    let mut responses = Vec::new();
    for round in (0..n).collect::<Vec<_>>().chunks(8) {
        let requests = round.iter().map(|i| apps[i % apps.len()].get(path, token));
        responses.extend(futures::future::join_all(requests).await);
    }
    responses
}

#[tokio::test]
async fn two_instances_share_one_users_budget() {
    let limits = "user_queries=100/h,ip=100000/h";
    let clock = mid_hour_clock();
    let a = spawn_app_with(|s| {
        s.rate_limits = limits.parse().unwrap();
        s.clock = clock.clone();
    })
    .await;
    let b = a
        .another_instance(|s| {
            s.rate_limits = limits.parse().unwrap();
            s.clock = clock.clone();
        })
        .await;
    let token = a.user("alice");
    let responses = burst(&[&a, &b], "/v1/me/attempts", &token, 250).await;
    let mut accepted = 0;
    let mut refused = None;
    for response in responses {
        let headers = response.headers();
        for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert!(headers.contains_key(name), "{name} missing");
        }
        match response.status() {
            StatusCode::OK => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => refused = Some(response),
            other => panic!("unexpected {other}"),
        }
    }
    // Leases are atomic: never more than the budget. An instance may hold up
    // to a chunk (100 / 20 = 5 tokens) it has not spent when the other one
    // runs dry.
    assert!(
        accepted <= 100,
        "{accepted} requests got through a budget of 100"
    );
    assert!(
        accepted >= 95,
        "only {accepted} of a budget of 100 got through"
    );
    let refused = refused.expect("the budget ran out");
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry_after));
    assert_eq!(refused.headers()["ratelimit-remaining"], "0");
    let problem = assert_problem(refused, StatusCode::TOO_MANY_REQUESTS).await;
    assert_eq!(problem["type"], "urn:podium:problem:rate-limited");
    // Another user has a budget of their own; commands have theirs.
    let response = b.get("/v1/me/attempts", &a.user("bob")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        a.metric("podium_rate_limited_total", &["budget=\"user_queries\""])
            .await
            + b.metric("podium_rate_limited_total", &["budget=\"user_queries\""])
                .await
            >= 150.0
    );
}

#[tokio::test]
async fn a_query_token_counts_only_on_streams() {
    let clock = mid_hour_clock();
    let app = spawn_app_with(|s| {
        s.rate_limits = "user_queries=2/h,ip=100/h".parse().unwrap();
        s.clock = clock.clone();
    })
    .await;
    let token = app.user("alice");
    // Outside streams `?access_token=` proves nothing: these are anonymous,
    // refused by the handler, and spend none of alice's budget.
    for _ in 0..3 {
        let response = app
            .request(
                reqwest::Method::GET,
                &format!("/v1/me/attempts?access_token={token}"),
                None,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    for _ in 0..2 {
        let response = app.get("/v1/me/attempts", &token).await;
        assert_eq!(response.status(), StatusCode::OK);
    }
    let spent = app.get("/v1/me/attempts", &token).await;
    assert_eq!(spent.status(), StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn client_ips_come_from_forwarded_for_only_behind_a_trusted_proxy() {
    let clock = mid_hour_clock();
    let app = spawn_app_with(|s| {
        s.rate_limits = "ip=3/h".parse().unwrap();
        s.trusted_proxies = "127.0.0.1".parse().unwrap();
        s.clock = clock.clone();
    })
    .await;
    let untrusting = app
        .another_instance(|s| {
            s.rate_limits = "ip=3/h".parse().unwrap();
            s.clock = clock.clone();
        })
        .await;
    let get = |app: &TestApp, ip: &'static str| {
        let request = app
            .request(
                reqwest::Method::GET,
                "/v1/me/attempts",
                Some(&app.user("u")),
            )
            .header("x-forwarded-for", ip);
        async move { request.send().await.unwrap().status() }
    };
    for _ in 0..3 {
        assert_eq!(get(&app, "203.0.113.1").await, StatusCode::OK);
    }
    assert_eq!(
        get(&app, "203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(get(&app, "203.0.113.2").await, StatusCode::OK);
    // Without trust, the header is ignored: every request is 127.0.0.1's,
    // whose budget the proxy's clients did not touch.
    for ip in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
        assert_eq!(get(&untrusting, ip).await, StatusCode::OK);
    }
    assert_eq!(
        get(&untrusting, "198.51.100.4").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Probes are never limited.
    let health = untrusting
        .client
        .get(format!("{}/healthz", untrusting.address))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::decode_all(body).unwrap(),
        other => panic!("no decoder for {other}"),
    };
    out
}

#[tokio::test]
async fn responses_are_compressed_as_asked_but_streams_never() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    for i in 0..20 {
        take(&app, &test_id, &format!("user-{i}"), 6).await;
    }
    settle_board(&app, &test_id, 20).await;
    let token = app.user("viewer");
    let path = format!("/v1/tests/{test_id}/leaderboard");
    let plain: Value = app.get(&path, &token).await.json().await.unwrap();
    for encoding in ["br", "gzip", "zstd"] {
        let response = app
            .request(reqwest::Method::GET, &path, Some(&token))
            .header("accept-encoding", encoding)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-encoding"], encoding);
        let body = response.bytes().await.unwrap();
        let decoded: Value = serde_json::from_slice(&decode(encoding, &body)).unwrap();
        assert_eq!(decoded, plain);
        assert!(body.len() < serde_json::to_vec(&plain).unwrap().len());
    }
    let stream = app
        .request(
            reqwest::Method::GET,
            &format!("{path}/stream"),
            Some(&token),
        )
        .header("accept-encoding", "gzip, br, zstd")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(!stream.headers().contains_key("content-encoding"));
}

#[tokio::test]
async fn browsers_on_allowed_origins_get_cors_grants_and_others_do_not() {
    let app = spawn_app_with(|s| s.cors_origins = "https://app.example.org".parse().unwrap()).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/v1/me/notifications/stream", app.address),
            )
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "authorization, last-event-id",
            )
            .send()
    };
    let allowed = preflight("https://app.example.org").await.unwrap();
    assert!(allowed.status().is_success());
    let headers = allowed.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.org"
    );
    let allowed_headers = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed_headers.contains("authorization") && allowed_headers.contains("last-event-id"));
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
    // A simple request from the allowed origin can read the rate-limit headers.
    let response = app
        .request(
            reqwest::Method::GET,
            "/v1/me/attempts",
            Some(&app.user("u")),
        )
        .header("origin", "https://app.example.org")
        .send()
        .await
        .unwrap();
    let exposed = response.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap();
    assert!(exposed.contains("ratelimit-remaining") && exposed.contains("retry-after"));
}

/// The value of the first series of `family` whose line contains every label.
fn series(text: &str, family: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[tokio::test]
async fn metrics_report_requests_database_cache_relay_projections_and_streams() {
    let (app, _) = spawn_app_with_workers().await;
    let test_id = app.published_test().await;
    take(&app, &test_id, "ann", 6).await;
    settle_board(&app, &test_id, 1).await;
    let token = app.user("viewer");
    let mut stream = SseClient::open(
        &app,
        &format!("/v1/tests/{test_id}/leaderboard/stream"),
        &token,
        None,
    )
    .await;
    take(&app, &test_id, "bob", 10).await;
    stream
        .next_named("entry", Duration::from_secs(20))
        .await
        .unwrap();
    let missing = app
        .get(&format!("/v1/tests/{}", uuid::Uuid::new_v4()), &token)
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    // Everything relayed and applied, so lags are back to zero (as sampled
    // in the background: a sample after the work has been done).
    wait_until(
        Duration::from_secs(20),
        "the projections catch up",
        || async {
            let text = scrape(&app).await;
            let leaderboard = ["projection=\"leaderboard\""];
            series(&text, "podium_relay_lag_events", &[]) == Some(0.0)
                && series(&text, "podium_projection_checkpoint_seq", &leaderboard)
                    .is_some_and(|seq| seq >= 6.0)
                && series(
                    &text,
                    "podium_projection_lag_seconds",
                    &["projection=\"feed\""],
                )
                .is_some()
                && series(
                    &text,
                    "podium_projection_lag_events",
                    &["projection=\"leaderboard\""],
                ) == Some(0.0)
                && series(
                    &text,
                    "podium_projection_lag_events",
                    &["projection=\"notification-policy\""],
                )
                .is_some()
        },
    )
    .await;
    let text = scrape(&app).await;
    let at_least = |family: &str, labels: &[&str], min: f64| {
        let value = series(&text, family, labels)
            .unwrap_or_else(|| panic!("{family} {labels:?} is missing"));
        assert!(
            value >= min,
            "{family} {labels:?} = {value}, expected at least {min}"
        );
    };
    let route = "route=\"/v1/tests/{test_id}/leaderboard\"";
    at_least(
        "podium_http_requests_total",
        &[route, "method=\"GET\"", "status=\"200\""],
        1.0,
    );
    at_least(
        "podium_http_requests_total",
        &["route=\"/v1/tests\"", "status=\"201\""],
        1.0,
    );
    at_least("podium_http_request_duration_seconds_count", &[route], 1.0);
    at_least("podium_http_errors_total", &["kind=\"not-found\""], 1.0);
    at_least("podium_db_seconds_count", &["op=\"command\""], 4.0);
    at_least("podium_db_seconds_count", &["op=\"load\""], 1.0);
    at_least("podium_db_seconds_count", &["op=\"query\""], 1.0);
    at_least(
        "podium_db_pool_connections",
        &["pool=\"primary\"", "state=\"idle\""],
        0.0,
    );
    at_least(
        "podium_db_pool_connections",
        &["pool=\"workers\"", "state=\"used\""],
        0.0,
    );
    at_least(
        "podium_cache_lookups_total",
        &["cache=\"leaderboard_page\"", "outcome=\"miss\""],
        1.0,
    );
    at_least("podium_relay_published_events_total", &[], 6.0);
    at_least("podium_relay_leader", &[], 1.0);
    at_least("podium_relay_publish_failures_total", &[], 0.0);
    at_least(
        "podium_projection_checkpoint_seq",
        &["projection=\"leaderboard\""],
        6.0,
    );
    at_least(
        "podium_projection_lag_seconds",
        &["projection=\"feed\""],
        0.0,
    );
    at_least(
        "podium_projection_apply_seconds_count",
        &["projection=\"leaderboard\""],
        1.0,
    );
    // Every event published and applied had its wait timed.
    at_least("podium_relay_delay_seconds_count", &[], 6.0);
    // Timed from when they were written: seconds at most here, never the
    // decades since 1970 of an event passed over without a time.
    for (family, labels) in [
        ("podium_relay_delay_seconds", &[][..]),
        (
            "podium_projection_delay_seconds",
            &["projection=\"leaderboard\""][..],
        ),
    ] {
        let count = series(&text, &format!("{family}_count"), labels).unwrap_or_default();
        let sum = series(&text, &format!("{family}_sum"), labels).unwrap_or_default();
        assert!(count >= 1.0, "{family} {labels:?} timed no event");
        assert!(
            sum / count < 30.0,
            "{family} {labels:?}: a mean wait of {} s",
            sum / count
        );
    }
    at_least(
        "podium_projection_redeliveries_total",
        &["projection=\"feed\""],
        0.0,
    );
    at_least(
        "podium_projection_retries_total",
        &["projection=\"attempts\""],
        0.0,
    );
    at_least(
        "podium_projection_dead_letters_total",
        &["projection=\"leaderboard\""],
        0.0,
    );
    at_least("podium_sse_streams_open", &["stream=\"leaderboard\""], 1.0);
    at_least("podium_sse_slow_clients_total", &["stream=\"feed\""], 0.0);
    at_least("podium_rate_limited_total", &["budget=\"ip\""], 0.0);
    at_least("podium_log_oldest_writer_age_seconds", &[], 0.0);
    // Raw paths never become labels.
    assert!(!text.contains(&test_id), "a test id leaked into a label");
}

async fn scrape(app: &TestApp) -> String {
    let response = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.text().await.unwrap()
}

#[tokio::test]
async fn sigterm_during_a_burst_loses_no_accepted_request() {
    let db = crate::helpers::TestDb::new().await;
    let (mut server, address) = crate::helpers::podium_binary(&db, &[]);
    let server = &mut server.0;
    let keys = podium::auth::JwtKeys::new(crate::helpers::SECRET).unwrap();
    let admin = keys.issue(
        &podium_domain::UserId::parse("admin").unwrap(),
        podium::auth::Role::Admin,
        Duration::from_secs(600),
    );
    let client = reqwest::Client::new();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (client, address, admin, sent) =
                (client.clone(), address.clone(), admin.clone(), sent.clone());
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for _ in 0..40 {
                    let id = uuid::Uuid::new_v4();
                    let mut body = crate::helpers::sample_test();
                    body["id"] = json!(id);
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let result = client
                        .post(format!("{address}/v1/tests"))
                        .bearer_auth(&admin)
                        .json(&body)
                        .send()
                        .await;
                    outcomes.push((id, result.map(|r| r.status())));
                }
                outcomes
            })
        })
        .collect();
    wait_until(
        Duration::from_secs(30),
        "the burst is under way",
        || async { sent.load(std::sync::atomic::Ordering::Relaxed) >= 100 },
    )
    .await;
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let mut answered = Vec::new();
    let mut unanswered = Vec::new();
    for task in tasks {
        for (id, outcome) in task.await.unwrap() {
            match outcome {
                Ok(status) => {
                    assert_eq!(status, StatusCode::CREATED);
                    answered.push(id);
                }
                Err(_) => unanswered.push(id),
            }
        }
    }
    let status = crate::helpers::wait_for_exit(server, Duration::from_secs(40));
    assert!(status.success(), "the server exited with {status}");
    let stored: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT aggregate_id::uuid FROM events WHERE event_type = 'TestPublished'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let stored: std::collections::HashSet<_> = stored.into_iter().collect();
    for id in &answered {
        assert!(
            stored.contains(id),
            "test {id} was answered 201 but is not stored"
        );
    }
    for id in &unanswered {
        assert!(
            !stored.contains(id),
            "test {id} was stored but its request got no answer"
        );
    }
    assert!(
        !answered.is_empty() && !unanswered.is_empty(),
        "SIGTERM did not land mid-burst"
    );
    println!(
        "{} answered, {} refused after SIGTERM",
        answered.len(),
        unanswered.len()
    );
}

#[tokio::test]
async fn an_unreachable_sentry_slows_nothing_and_a_bad_dsn_stops_the_start() {
    let db = crate::helpers::TestDb::new().await;
    // Port 9 refuses connections: every report fails to send.
    let (mut server, address) =
        crate::helpers::podium_binary(&db, &[("SENTRY_DSN", "http://public@127.0.0.1:9/1")]);
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    for _ in 0..50 {
        let response = client
            .get(format!("{address}/v1/tests/{}", uuid::Uuid::new_v4()))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // Generous: a blocking report would cost a connect timeout per request.
    assert!(started.elapsed() < Duration::from_secs(10));
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let status = crate::helpers::wait_for_exit(&mut server.0, Duration::from_secs(20));
    assert!(status.success(), "exited with {status}");

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_podium"))
        .arg("serve")
        .env("DATABASE_URL", db.url())
        .env("PODIUM_JWT_SECRET", crate::helpers::SECRET)
        .env("SENTRY_DSN", "not a dsn")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("SENTRY_DSN"));
}

#[tokio::test]
async fn nonsense_settings_stop_the_server_at_start_with_a_clear_message() {
    let db = crate::helpers::TestDb::new().await;
    for (variable, value) in [
        ("PODIUM_RATE_LIMITS", "ip=lots/min"),
        ("PODIUM_CORS_ORIGINS", "app.example.org"),
        ("PODIUM_TRUSTED_PROXIES", "a-proxy"),
    ] {
        let expected = variable;
        let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_podium"))
            .arg("serve")
            .env("DATABASE_URL", db.url())
            .env("PODIUM_JWT_SECRET", crate::helpers::SECRET)
            .env("PODIUM_LISTEN", "127.0.0.1:0")
            .env(variable, value)
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the server exits at once")
            .unwrap();
        assert!(!output.status.success(), "{variable}={value} was accepted");
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(err.contains(expected), "{err}");
    }
}

#[tokio::test]
async fn queries_read_from_the_replica_when_one_is_configured() {
    // A "replica" that differs from the primary shows where reads go.
    let replica = crate::helpers::TestDb::new().await;
    let replica_url = replica.url();
    let app = spawn_app_with(|s| {
        s.database.database_read_url = Some(replica_url.into());
        s.database.db_read_max_connections = 2;
    })
    .await;
    let test_id = app.published_test().await;
    sqlx::query(
        "INSERT INTO lb_entries (test_id, user_id, best_score, max_score, attempt_id, achieved_at, attempts)
         VALUES ($1, 'seen-on-the-replica', 7, 10, gen_random_uuid(), now(), 1)",
    )
    .bind(test_id.parse::<uuid::Uuid>().unwrap())
    .execute(&replica.pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO lb_score_counts (test_id, score, entries) VALUES ($1, 7, 1)")
        .bind(test_id.parse::<uuid::Uuid>().unwrap())
        .execute(&replica.pool)
        .await
        .unwrap();
    let page: Value = app
        .get(
            &format!("/v1/tests/{test_id}/leaderboard"),
            &app.user("viewer"),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(page["entries"][0]["user_id"], "seen-on-the-replica");
    let text = scrape(&app).await;
    assert!(series(&text, "podium_db_pool_connections", &["pool=\"replica\""]).is_some());
}

#[tokio::test]
async fn a_scrape_reads_memory_and_answers_while_postgres_is_away() {
    let postgres = crate::postgres::PrivatePostgres::start();
    let settings = podium::Settings::new(
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        postgres.url(),
        crate::helpers::SECRET.into(),
    );
    let app = podium::Application::build(settings).await.unwrap();
    let address = format!("http://127.0.0.1:{}/metrics", app.port());
    tokio::spawn(app.run_until(std::future::pending()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let scrape = || async { client.get(&address).send().await.map(|r| r.status()) };
    assert_eq!(scrape().await.unwrap(), StatusCode::OK);
    postgres.stop();
    // Queried figures are sampled in the background; a scrape never waits
    // on the database (the pool would wait 5 s for a connection).
    for _ in 0..5 {
        assert_eq!(scrape().await.unwrap(), StatusCode::OK);
    }
}
