//! Several `podium serve` processes on one database and one NATS, as a
//! deployment runs them: one owner per projection, standbys that take over
//! when the owner is paused or killed, and read models that hold every
//! acknowledged submission exactly once, also across a Postgres outage.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use podium::auth::{JwtKeys, Role};
use podium_domain::UserId;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::Connection;
use sqlx::PgPool;

use crate::helpers::{
    podium_process, poll, refuse_attempts_of, sample_test, Killed, TestDb, SECRET,
};
use crate::nats::{delete_streams, nats_url, unique_prefix, wait_until};
use crate::postgres::PrivatePostgres;

/// The leases of a deployment: the relay and the five projections.
const ROLES: usize = 6;
const PROJECTIONS: [&str; 5] = [
    "leaderboard",
    "feed",
    "attempts",
    "catalog",
    "notification-policy",
];

/// A lease TTL short enough to keep the tests quick, long enough that a
/// busy machine does not lose leases by accident.
const LEASE_TTL_MS: &str = "3000";

/// How long Postgres stays down in the outage test.
const OUTAGE_SECS: u64 = 60;

/// A leaderboard row: test, user, best, max, attempts, achieved at.
type BoardRow = (
    uuid::Uuid,
    String,
    i32,
    i32,
    i32,
    chrono::DateTime<chrono::Utc>,
);

/// Several instances of one deployment, and what the test submitted.
struct Deployment {
    database_url: String,
    pool: PgPool,
    prefix: String,
    keys: JwtKeys,
    client: reqwest::Client,
    instances: Vec<Option<(Killed, String)>>,
    /// The NATS servers the instances are given (`NATS_URL`).
    nats: String,
    /// Settings every instance gets besides the defaults here.
    env: Vec<(String, String)>,
}

impl Deployment {
    /// Starts `n` instances; the first takes every lease before the others
    /// start, so the tests know who owns what.
    async fn start(database_url: String, pool: PgPool, n: usize) -> Self {
        Self::start_on(database_url, pool, n, nats_url(), Vec::new()).await
    }

    /// [`Self::start`] on the NATS servers `nats`, with `env` besides.
    async fn start_on(
        database_url: String,
        pool: PgPool,
        n: usize,
        nats: String,
        env: Vec<(String, String)>,
    ) -> Self {
        let mut deployment = Self {
            database_url,
            pool,
            prefix: unique_prefix(),
            keys: JwtKeys::new(SECRET).unwrap(),
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
            instances: Vec::new(),
            nats,
            env,
        };
        deployment.add_instance();
        let first = deployment.pid(0);
        wait_until(
            Duration::from_secs(30),
            "the first instance holds every lease",
            || async { deployment.owned_by(first).await == ROLES },
        )
        .await;
        for _ in 1..n {
            deployment.add_instance();
        }
        deployment
    }

    fn add_instance(&mut self) {
        let env = [
            ("NATS_URL", self.nats.clone()),
            ("PODIUM_NATS_PREFIX", self.prefix.clone()),
            ("PODIUM_LEASE_TTL_MS", LEASE_TTL_MS.to_string()),
            ("PODIUM_DB_MAX_CONNECTIONS", "4".to_string()),
            ("PODIUM_DB_ACQUIRE_TIMEOUT_SECS", "2".to_string()),
            // The tests know who owns what: the first instance keeps every
            // role (the spread is tested by itself, with this set to true).
            ("PODIUM_SPREAD_ROLES", "false".to_string()),
        ];
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .collect();
        self.instances
            .push(Some(podium_process(&self.database_url, &env)));
    }

    fn pid(&self, instance: usize) -> u32 {
        self.instances[instance].as_ref().unwrap().0 .0.id()
    }

    fn address(&self, instance: usize) -> &str {
        &self.instances[instance].as_ref().unwrap().1
    }

    fn signal(&self, instance: usize, signal: &str) {
        let sent = std::process::Command::new("kill")
            .args([signal, &self.pid(instance).to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    /// kill -9 of an instance.
    fn kill(&mut self, instance: usize) {
        self.signal(instance, "-KILL");
        self.instances[instance] = None;
    }

    /// How many live leases the process `pid` holds.
    async fn owned_by(&self, pid: u32) -> usize {
        let owners: Vec<String> =
            sqlx::query_scalar("SELECT owner FROM leases WHERE expires_at > now()")
                .fetch_all(&self.pool)
                .await
                .unwrap_or_default();
        owners
            .iter()
            .filter(|owner| owner.split('/').nth(1) == Some(pid.to_string().as_str()))
            .count()
    }

    fn token(&self, user: &str, role: Role) -> String {
        let user = UserId::parse(user).unwrap();
        self.keys.issue(&user, role, Duration::from_secs(600))
    }

    async fn post(&self, instance: usize, path: &str, token: &str, body: Value) -> Option<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.address(instance)))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json().await.ok()
    }

    async fn published_test(&self, instance: usize) -> String {
        let admin = self.token("admin-1", Role::Admin);
        let body = self
            .post(instance, "/v1/tests", &admin, sample_test())
            .await
            .expect("the test is published");
        body["id"].as_str().unwrap().to_string()
    }

    /// Takes the sample test as `user` through `instance`: the attempt id if
    /// its submission was acknowledged.
    async fn take(&self, instance: usize, test_id: &str, user: &str, seed: u64) -> Option<String> {
        let token = self.token(user, Role::User);
        let started = self
            .post(
                instance,
                &format!("/v1/tests/{test_id}/attempts"),
                &token,
                json!({}),
            )
            .await?;
        let attempt = started["attempt_id"].as_str()?.to_string();
        let answers = json!({"q1": seed % 3, "q2": seed % 2});
        self.post(
            instance,
            &format!("/v1/attempts/{attempt}/submit"),
            &token,
            json!({ "answers": answers }),
        )
        .await?;
        Some(attempt)
    }

    /// Sums the series of metric `name` with `labels` on `instance`.
    async fn metric(&self, instance: usize, name: &str, labels: &[&str]) -> f64 {
        let Ok(response) = self
            .client
            .get(format!("{}/metrics", self.address(instance)))
            .send()
            .await
        else {
            return 0.0;
        };
        let text = response.text().await.unwrap_or_default();
        text.lines()
            .filter(|line| line.starts_with(name) && !line.starts_with('#'))
            .filter(|line| labels.iter().all(|label| line.contains(label)))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// `name` with `labels`, summed over `instances`.
    async fn summed(&self, instances: &[usize], name: &str, labels: &[&str]) -> f64 {
        let mut sum = 0.0;
        for &instance in instances {
            sum += self.metric(instance, name, labels).await;
        }
        sum
    }

    /// How many of `instances` apply `projection` now (running or catching
    /// up).
    async fn active_owners(&self, instances: &[usize], projection: &str) -> f64 {
        let label = format!("projection=\"{projection}\"");
        let mut owners = 0.0;
        for state in ["running", "catching_up"] {
            let state = format!("state=\"{state}\"");
            owners += self
                .summed(instances, "podium_projection_state", &[&label, &state])
                .await;
        }
        owners
    }

    async fn ready(&self, instance: usize) -> Option<StatusCode> {
        let response = self
            .client
            .get(format!("{}/readyz", self.address(instance)))
            .send()
            .await
            .ok()?;
        Some(response.status())
    }

    /// Whether every read model holds each of `acknowledged` and every
    /// submission in the log exactly once; `Err` says what is missing.
    async fn converged(&self, acknowledged: &HashSet<String>) -> Result<(), String> {
        let query = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(&self.pool);
        let submitted = query("SELECT count(*) FROM events WHERE event_type = 'AttemptSubmitted'")
            .await
            .map_err(|e| e.to_string())?;
        // The all-time boards (each submission is on its day's, week's and
        // month's boards too).
        let on_boards = query(
            "SELECT COALESCE(sum(attempts), 0)::bigint FROM lb_entries
              WHERE test_id IN (SELECT test_id FROM catalog_tests)",
        )
        .await
        .map_err(|e| e.to_string())?;
        // Every board: all time, day, week and month, each once.
        let on_every_board = query(
            // The tests' boards (a collection's count tests taken).
            "SELECT COALESCE(sum(attempts), 0)::bigint FROM lb_entries
              WHERE test_id IN (SELECT board_id FROM lb_boards)
                 OR test_id IN (SELECT test_id FROM catalog_tests)",
        )
        .await
        .map_err(|e| e.to_string())?;
        let graded = query("SELECT count(*) FROM feed_items WHERE kind = 'attempt_graded'")
            .await
            .map_err(|e| e.to_string())?;
        let mine: Vec<uuid::Uuid> =
            sqlx::query_scalar("SELECT attempt_id FROM my_attempts WHERE submitted_at IS NOT NULL")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| e.to_string())?;
        let mine: HashSet<String> = mine.iter().map(ToString::to_string).collect();
        let missing = acknowledged.difference(&mine).count();
        let positions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, seq FROM projection_checkpoints
             UNION ALL SELECT 'relay:' || name, seq FROM relay_checkpoints ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        if (submitted as usize) < acknowledged.len()
            || on_boards != submitted
            || on_every_board != 4 * submitted
            || graded != submitted
            || mine.len() as i64 != submitted
            || missing > 0
        {
            return Err(format!(
                "{} acknowledged, {submitted} in the log, {on_boards} on the all-time boards \
                 ({on_every_board} on every board), \
                 {graded} graded notifications, {} in my attempts ({missing} missing); \
                 positions {positions:?}",
                acknowledged.len(),
                mine.len()
            ));
        }
        Ok(())
    }

    /// Whether `instance` ranks every entry of `test_id` as the read model
    /// does, in a whole page and in each user's neighbourhood, and has
    /// answered ranks from its rank index; `Err` says what differs.
    async fn ranks_agree(&self, instance: usize, test_id: &str) -> Result<(), String> {
        let expected: Vec<(String, i64)> = sqlx::query_as(
            "SELECT user_id, best_score::bigint FROM lb_entries WHERE test_id = $1
              ORDER BY best_score DESC, achieved_at, user_id",
        )
        .bind(test_id.parse::<uuid::Uuid>().unwrap())
        .fetch_all(&self.pool)
        .await
        .map_err(|e| e.to_string())?;
        let token = self.token("reader", Role::User);
        let get = |path: String| {
            let request = self
                .client
                .get(format!("{}{path}", self.address(instance)))
                .bearer_auth(&token);
            async move {
                let response = request.send().await.map_err(|e| e.to_string())?;
                response.json::<Value>().await.map_err(|e| e.to_string())
            }
        };
        let page = get(format!(
            "/v1/tests/{test_id}/leaderboard?offset=0&limit=200"
        ))
        .await?;
        let ranked: Vec<(u64, String, i64)> = page["entries"]
            .as_array()
            .ok_or_else(|| format!("no page: {page}"))?
            .iter()
            .map(|e| {
                let user = e["user_id"].as_str().unwrap_or_default().to_string();
                (
                    e["rank"].as_u64().unwrap_or(0),
                    user,
                    e["score"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        let want: Vec<(u64, String, i64)> = expected
            .iter()
            .enumerate()
            .map(|(i, (user, score))| (i as u64 + 1, user.clone(), *score))
            .collect();
        if ranked != want {
            return Err(format!(
                "instance {instance} ranks {ranked:?}, the read model {want:?}"
            ));
        }
        for (i, (user, _)) in expected.iter().enumerate() {
            let around = get(format!(
                "/v1/tests/{test_id}/leaderboard/users/{user}?radius=0"
            ))
            .await?;
            if around["entry"]["rank"].as_u64() != Some(i as u64 + 1) {
                return Err(format!(
                    "instance {instance}: {user} at {}: {around}",
                    i + 1
                ));
            }
        }
        let from_index = self
            .metric(
                instance,
                "podium_rank_index_reads_total",
                &["source=\"index\""],
            )
            .await;
        if from_index == 0.0 {
            return Err(format!("instance {instance} answered no rank from memory"));
        }
        Ok(())
    }

    /// Waits until every instance in `instances` ranks as the read model.
    async fn wait_ranks_agree(&self, instances: &[usize], test_id: &str, timeout: Duration) {
        for instance in instances {
            let what = "the instance to rank as the read model";
            poll(what, timeout, || self.ranks_agree(*instance, test_id)).await;
        }
    }

    /// Waits until [`Self::converged`] holds, at most `timeout`.
    async fn wait_converged(&self, acknowledged: &HashSet<String>, timeout: Duration) {
        let what = "the read models to converge";
        poll(what, timeout, || self.converged(acknowledged)).await;
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.instances.clear();
        delete_streams(self.nats.clone(), self.prefix.clone());
    }
}

async fn shared_deployment(n: usize) -> (TestDb, Deployment) {
    let db = TestDb::new().await;
    let deployment = Deployment::start(db.url(), db.pool.clone(), n).await;
    (db, deployment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_owner_per_projection_and_redeliver_almost_nothing() {
    let (_db, deployment) = shared_deployment(3).await;
    let test = deployment.published_test(1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..90 {
        let instance = i % 3;
        let user = format!("learner-{}", i % 30);
        acknowledged.extend(deployment.take(instance, &test, &user, i as u64).await);
    }
    assert_eq!(acknowledged.len(), 90, "every submission is acknowledged");
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    let log: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&deployment.pool)
        .await
        .unwrap();
    for projection in PROJECTIONS {
        let label = format!("projection=\"{projection}\"");
        let owners = deployment.active_owners(&[0, 1, 2], projection).await;
        let redeliveries = deployment
            .summed(
                &[0, 1, 2],
                "podium_projection_redeliveries_total",
                &[&label],
            )
            .await;
        assert_eq!(owners, 1.0, "{projection} has exactly one active owner");
        assert!(
            redeliveries * 100.0 <= log as f64,
            "{projection}: {redeliveries} redeliveries for {log} events"
        );
    }
}

/// Whether the processes `pids` hold every role, an equal share each.
async fn spread_over(deployment: &Deployment, pids: &[u32]) -> bool {
    let mut held = Vec::new();
    for pid in pids {
        held.push(deployment.owned_by(*pid).await);
    }
    let share = ROLES.div_ceil(pids.len());
    held.iter().sum::<usize>() == ROLES && held.iter().all(|&n| n == share)
}

/// The live leases' owners and tokens, by lease.
async fn lease_holders(pool: &PgPool) -> Vec<(String, String, i64)> {
    sqlx::query_as("SELECT name, owner, token FROM leases WHERE expires_at > now() ORDER BY name")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_roles_spread_over_the_instances_and_over_the_rest_when_one_is_killed() {
    let db = TestDb::new().await;
    let spread = vec![("PODIUM_SPREAD_ROLES".to_string(), "true".to_string())];
    // The first instance takes every role while it is alone.
    let mut deployment =
        Deployment::start_on(db.url(), db.pool.clone(), 1, nats_url(), spread).await;
    deployment.add_instance();
    deployment.add_instance();
    let all = vec![deployment.pid(0), deployment.pid(1), deployment.pid(2)];
    wait_until(
        Duration::from_secs(30),
        "two roles on each of three instances",
        || spread_over(&deployment, &all),
    )
    .await;
    // Spread, the leases stay where they are: nothing is handed back and
    // forth.
    let settled = lease_holders(&deployment.pool).await;
    let test = deployment.published_test(1).await;
    let mut acknowledged: HashSet<String> = HashSet::new();
    for i in 0..30 {
        acknowledged.extend(
            deployment
                .take(i % 3, &test, &format!("learner-{}", i % 12), i as u64)
                .await,
        );
    }
    assert_eq!(acknowledged.len(), 30, "every submission is acknowledged");
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    assert_eq!(lease_holders(&deployment.pool).await, settled);

    // One of them is killed mid-load: its roles go to the other two, three
    // each, and nothing is lost or doubled.
    for i in 30..60 {
        if i == 40 {
            deployment.kill(2);
        }
        let instance = if i < 40 { i % 3 } else { i % 2 };
        acknowledged.extend(
            deployment
                .take(instance, &test, &format!("learner-{}", i % 12), i as u64)
                .await,
        );
    }
    assert!(
        acknowledged.len() >= 55,
        "{} acknowledged",
        acknowledged.len()
    );
    let rest = vec![deployment.pid(0), deployment.pid(1)];
    wait_until(
        Duration::from_secs(30),
        "three roles on each of the two left",
        || spread_over(&deployment, &rest),
    )
    .await;
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    deployment
        .wait_ranks_agree(&[0, 1], &test, Duration::from_secs(30))
        .await;
    for projection in PROJECTIONS {
        let owners = deployment.active_owners(&[0, 1], projection).await;
        assert_eq!(owners, 1.0, "{projection} has exactly one active owner");
    }
    let dead_letters = deployment
        .summed(&[0, 1], "podium_projection_dead_letters_total", &[])
        .await;
    assert_eq!(dead_letters, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_is_replaced_within_seconds_and_applies_nothing_after_it_wakes() {
    let (_db, deployment) = shared_deployment(3).await;
    let test = deployment.published_test(1).await;
    let mut acknowledged: HashSet<String> = HashSet::new();
    for i in 0..10 {
        acknowledged.extend(
            deployment
                .take(1 + i % 2, &test, &format!("early-{i}"), i as u64)
                .await,
        );
    }
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(30))
        .await;
    // Every instance holds the board in memory before the pause.
    deployment
        .wait_ranks_agree(&[0, 1, 2], &test, Duration::from_secs(30))
        .await;

    // The owner of the relay and of every projection freezes.
    deployment.signal(0, "-STOP");
    let paused = Instant::now();
    for i in 0..10 {
        acknowledged.extend(
            deployment
                .take(1 + i % 2, &test, &format!("late-{i}"), i as u64)
                .await,
        );
    }
    assert_eq!(acknowledged.len(), 20);
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(10))
        .await;
    let taken_over = paused.elapsed();
    assert_eq!(deployment.owned_by(deployment.pid(0)).await, 0);

    // It wakes up with its batches and leases in hand, and writes nothing:
    // every lease is someone else's and nothing is applied twice.
    deployment.signal(0, "-CONT");
    wait_until(
        Duration::from_secs(30),
        "the woken instance stands by for every projection",
        || async {
            let mut standby = 0.0;
            for projection in PROJECTIONS {
                let label = format!("projection=\"{projection}\"");
                standby += deployment
                    .metric(0, "podium_projection_state", &[&label, "state=\"standby\""])
                    .await;
            }
            standby == PROJECTIONS.len() as f64
        },
    )
    .await;
    for i in 0..5 {
        acknowledged.extend(
            deployment
                .take(i % 3, &test, &format!("after-{i}"), i as u64)
                .await,
        );
    }
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(30))
        .await;
    assert_eq!(deployment.owned_by(deployment.pid(0)).await, 0);
    // The woken instance's board, frozen through the changes, caught up.
    deployment
        .wait_ranks_agree(&[0, 1, 2], &test, Duration::from_secs(30))
        .await;
    println!("a standby took over and applied the paused owner's work in {taken_over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_owner_mid_load_loses_and_doubles_nothing() {
    let (_db, mut deployment) = shared_deployment(3).await;
    let test = deployment.published_test(1).await;
    // A collection of it and another test, whose board must sum both.
    let other = deployment.published_test(1).await;
    let admin = deployment.token("admin-1", Role::Admin);
    let created = deployment
        .post(
            1,
            "/v1/collections",
            &admin,
            json!({"title": "Both", "test_ids": [test, other]}),
        )
        .await
        .expect("the collection is created");
    let collection: uuid::Uuid = created["id"].as_str().unwrap().parse().unwrap();
    let mut acknowledged: HashSet<String> = HashSet::new();
    for i in 0..60 {
        if i == 20 {
            deployment.kill(0);
        }
        let instance = if i < 20 { i % 3 } else { 1 + i % 2 };
        let on = if i % 4 == 3 { &other } else { &test };
        acknowledged.extend(
            deployment
                .take(instance, on, &format!("learner-{}", i % 25), i as u64)
                .await,
        );
    }
    assert!(
        acknowledged.len() >= 55,
        "{} acknowledged",
        acknowledged.len()
    );
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    deployment
        .wait_ranks_agree(&[1, 2], &test, Duration::from_secs(30))
        .await;
    // Each learner's collection entry sums their bests on both tests, once.
    let board = podium_projections::collections::board_at(
        collection,
        podium_projections::windows::Window::All,
        chrono::Utc::now(),
    );
    let tests: Vec<uuid::Uuid> = [&test, &other].map(|t| t.parse().unwrap()).to_vec();
    let summed: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT user_id, sum(best_score)::bigint, count(*) FROM lb_entries
          WHERE test_id = ANY($1) GROUP BY user_id ORDER BY user_id",
    )
    .bind(&tests)
    .fetch_all(&deployment.pool)
    .await
    .unwrap();
    let composed: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT user_id, best_score::bigint, attempts::bigint FROM lb_entries
          WHERE test_id = $1 ORDER BY user_id",
    )
    .bind(board)
    .fetch_all(&deployment.pool)
    .await
    .unwrap();
    assert_eq!(
        composed.len(),
        25,
        "every learner on the collection's board"
    );
    assert_eq!(composed, summed);
    let dead_letters = deployment
        .summed(&[1, 2], "podium_projection_dead_letters_total", &[])
        .await;
    assert_eq!(dead_letters, 0.0);
}

/// `n` instances on a Postgres server of the test's own (which it stops or
/// reconfigures), with a small pool of the test's on it.
async fn on_private_postgres(n: usize) -> (PrivatePostgres, PgPool, Deployment) {
    let postgres = PrivatePostgres::start();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&postgres.url())
        .await
        .unwrap();
    let deployment = Deployment::start(postgres.url(), pool.clone(), n).await;
    (postgres, pool, deployment)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_without_postgres_loses_nothing_and_heals_without_a_restart() {
    let (postgres, _pool, deployment) = on_private_postgres(1).await;
    let pid = deployment.pid(0);
    let test = deployment.published_test(0).await;
    let load = |from: usize, to: usize| {
        let deployment = &deployment;
        let test = test.clone();
        async move {
            let mut acknowledged = HashSet::new();
            for i in from..to {
                acknowledged.extend(
                    deployment
                        .take(0, &test, &format!("learner-{}", i % 40), i as u64)
                        .await,
                );
            }
            acknowledged
        }
    };
    let mut acknowledged = load(0, 30).await;

    postgres.stop();
    let down = Instant::now();
    // Load goes on while it is down (answers 503), and /readyz says so.
    let during = load(30, 40).await;
    assert_eq!(
        deployment.ready(0).await,
        Some(StatusCode::SERVICE_UNAVAILABLE)
    );
    let remaining = Duration::from_secs(OUTAGE_SECS).saturating_sub(down.elapsed());
    tokio::time::sleep(remaining).await;
    postgres.restart();
    acknowledged.extend(during);

    // Load during the recovery, then everything acknowledged is projected.
    poll("/readyz to answer 200", Duration::from_secs(30), || async {
        match deployment.ready(0).await {
            Some(StatusCode::OK) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    acknowledged.extend(load(40, 70).await);
    assert!(
        acknowledged.len() >= 60,
        "{} acknowledged",
        acknowledged.len()
    );
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    assert_eq!(deployment.pid(0), pid);
    assert_eq!(
        deployment
            .metric(0, "podium_projection_dead_letters_total", &[])
            .await,
        0.0
    );
    let mut states: HashMap<&str, f64> = HashMap::new();
    for projection in PROJECTIONS {
        let label = format!("projection=\"{projection}\"");
        let running = deployment
            .metric(0, "podium_projection_state", &[&label, "state=\"running\""])
            .await
            + deployment
                .metric(
                    0,
                    "podium_projection_state",
                    &[&label, "state=\"catching_up\""],
                )
                .await;
        states.insert(projection, running);
    }
    assert!(states.values().all(|running| *running == 1.0), "{states:?}");
}

/// Commits that hang (a synchronous standby gone: every commit waits for
/// it, as it would for a disk slow to sync) take the leases from nobody:
/// they are renewed on connections that do not wait for the log, so no
/// role lapses and changes hands while the instances' work is held up, and
/// the work goes on once the commits do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_that_hang_move_no_lease() {
    let (postgres, pool, deployment) = on_private_postgres(2).await;
    let test = deployment.published_test(1).await;
    let mut acknowledged: HashSet<String> = deployment
        .take(1, &test, "before", 1)
        .await
        .into_iter()
        .collect();
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    let leases = || async {
        let held: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT name, owner, token FROM leases WHERE expires_at > now() ORDER BY name",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        held
    };
    let before = leases().await;
    assert_eq!(before.len(), ROLES, "{before:?}");

    // Every commit now waits for a standby that does not exist; a write of
    // the test's own shows it.
    let stall = |names: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(&format!(
                "ALTER SYSTEM SET synchronous_standby_names = '{names}'"
            ))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query("SELECT pg_reload_conf()")
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    stall("nobody").await;
    poll("commits to hang", Duration::from_secs(10), || async {
        let mut probe = sqlx::PgConnection::connect(&postgres.url()).await.unwrap();
        let write = sqlx::query("CREATE TEMPORARY TABLE probe ()").execute(&mut probe);
        match tokio::time::timeout(Duration::from_millis(500), write).await {
            Err(_) => Ok(()),
            Ok(done) => Err(done.map(|_| ()).map_err(|e| e.to_string())),
        }
    })
    .await;
    // For three lease TTLs the leases stay live, with the same owners and
    // tokens (renewed only: no lapse, no takeover).
    let ttl = Duration::from_millis(LEASE_TTL_MS.parse().unwrap());
    let until = Instant::now() + 3 * ttl;
    let mut looks = 0;
    while Instant::now() < until {
        assert_eq!(leases().await, before, "after {looks} looks");
        looks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Commits go through again: what hung completes, and the work goes on.
    stall("").await;
    acknowledged.extend(deployment.take(0, &test, "after", 2).await);
    assert_eq!(acknowledged.len(), 2);
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
}

impl Deployment {
    /// `method path` on `instance` as `token`: the status and the JSON body
    /// (`Null` when there is none).
    async fn call(
        &self,
        instance: usize,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> (StatusCode, Value) {
        let response = self
            .client
            .request(method, format!("{}{path}", self.address(instance)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|err| panic!("{path}: {err}"));
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// `method` on the leaderboard's rebuild through `instance`, as an
    /// operator.
    async fn leaderboard_rebuild(
        &self,
        instance: usize,
        method: reqwest::Method,
    ) -> (StatusCode, Value) {
        let admin = self.token("operator", Role::Admin);
        let path = "/v1/admin/projections/leaderboard/rebuild";
        self.call(instance, method, path, &admin).await
    }

    /// Whether `owner` (an instance id in lease rows) is instance `instance`.
    fn is_instance(&self, owner: &str, instance: usize) -> bool {
        owner.split('/').nth(1) == Some(self.pid(instance).to_string().as_str())
    }

    /// The operator API's projection `name`, read through `instance`.
    async fn projection(&self, instance: usize, name: &str) -> Value {
        let admin = self.token("operator", Role::Admin);
        let admin = &admin;
        // A 503 (a busy instance's pool timed out) says to retry.
        let body = poll(
            "the projections to be listed",
            Duration::from_secs(30),
            || async move {
                let path = "/v1/admin/projections";
                let (status, body) = self.call(instance, reqwest::Method::GET, path, admin).await;
                match status {
                    StatusCode::OK => Ok(body),
                    StatusCode::SERVICE_UNAVAILABLE => Err(body),
                    _ => panic!("{path}: {status} {body}"),
                }
            },
        )
        .await;
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no projection {name} in {body}"))
    }

    /// Asserts that a fresh replay of the log makes the leaderboard
    /// `rebuilt` (rows as [`Self::boards`] reads them).
    async fn replays_to(&self, rebuilt: &[BoardRow]) {
        let mut quiet = |_, _| {};
        let models = podium::projector::replay::Scope::Leaderboard.read_models();
        let replay = podium::projector::replay::replay(&self.pool, &models, &mut quiet);
        tokio::time::timeout(Duration::from_secs(150), replay)
            .await
            .expect("a replay ends within 150 s")
            .unwrap();
        assert_eq!(self.boards().await, rebuilt);
    }

    /// The leaderboard read model, row by row.
    async fn boards(&self) -> Vec<BoardRow> {
        sqlx::query_as(
            "SELECT test_id, user_id, best_score, max_score, attempts, achieved_at
               FROM lb_entries ORDER BY test_id, user_id",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }
}

/// Every operator endpoint, as (method, path) for dead letter `letter`.
fn operator_endpoints(letter: i64) -> Vec<(reqwest::Method, String)> {
    use reqwest::Method;
    vec![
        (Method::GET, "/v1/admin/projections".into()),
        (
            Method::POST,
            "/v1/admin/projections/leaderboard/rebuild".into(),
        ),
        (
            Method::GET,
            "/v1/admin/projections/leaderboard/rebuild".into(),
        ),
        (Method::GET, "/v1/admin/dead-letters".into()),
        (
            Method::POST,
            format!("/v1/admin/dead-letters/{letter}/retry"),
        ),
        (
            Method::POST,
            format!("/v1/admin/dead-letters/{letter}/skip"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_asked_through_any_instance_runs_once_on_the_owner_while_submissions_flow() {
    use reqwest::Method;
    let (_db, deployment) = shared_deployment(3).await;
    let test = deployment.published_test(1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..40u64 {
        let user = format!("learner-{}", i % 20);
        acknowledged.extend(deployment.take(i as usize % 3, &test, &user, i).await);
    }
    // A learner's token opens none of it.
    let learner = deployment.token("learner-1", Role::User);
    for (method, path) in operator_endpoints(1) {
        let (status, body) = deployment.call(2, method.clone(), &path, &learner).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
    }
    let admin = deployment.token("operator", Role::Admin);
    // Every instance sees the same five projections, each with one owner:
    // the first instance, which took every lease, unless a lease changed
    // hands since (a starved instance may miss a renewal).
    let leases: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT name, owner, token FROM leases WHERE name LIKE 'projection:%'")
            .fetch_all(&deployment.pool)
            .await
            .unwrap();
    let mut owners: Vec<Vec<String>> = Vec::new();
    for instance in 0..3 {
        let (status, body) = deployment
            .call(instance, Method::GET, "/v1/admin/projections", &admin)
            .await;
        assert_eq!(status, StatusCode::OK);
        let names: Vec<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, PROJECTIONS);
        owners.push(
            body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["owner"].as_str().unwrap_or_default().to_string())
                .collect(),
        );
    }
    assert!(owners.windows(2).all(|w| w[0] == w[1]), "{owners:?}");
    for (name, owner) in PROJECTIONS.iter().zip(&owners[0]) {
        assert!(
            (0..3).any(|i| deployment.is_instance(owner, i)),
            "{name}: {owner}"
        );
        let handed_on = leases
            .iter()
            .any(|(lease, _, token)| lease == &format!("projection:{name}") && *token > 1);
        assert!(
            handed_on || deployment.is_instance(owner, 0),
            "{name}: {owner}, {leases:?}"
        );
    }
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    // The notification policy may still append (a personal best's notice)
    // after the boards converged: the head moves once more, then stops.
    wait_until(
        Duration::from_secs(30),
        "the leaderboard reports no lag",
        || async {
            let p = deployment.projection(2, "leaderboard").await;
            p["state"] == "running" && p["lag_events"] == 0 && p["checkpoint"] == p["head"]
        },
    )
    .await;
    let (status, body) = deployment.leaderboard_rebuild(1, Method::GET).await;
    assert_eq!((status, &body["state"]), (StatusCode::OK, &json!("none")));
    let (status, body) = deployment
        .call(
            1,
            Method::POST,
            "/v1/admin/projections/nonesuch/rebuild",
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = deployment
        .call(
            1,
            Method::POST,
            "/v1/admin/projections/notification-policy/rebuild",
            &admin,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Submissions flow through two instances while one asks for the rebuild
    // and another watches it.
    let flowing = std::sync::atomic::AtomicBool::new(true);
    let submit = async {
        let mut acknowledged = HashSet::new();
        let mut i = 1_000u64;
        while flowing.load(std::sync::atomic::Ordering::Relaxed) {
            let user = format!("learner-{}", i % 25);
            acknowledged.extend(deployment.take(1 + i as usize % 2, &test, &user, i).await);
            i += 1;
        }
        acknowledged
    };
    // The owner when the rebuild is asked for runs it (if the lease stays).
    let owner = leaderboard_lease(&deployment).await;
    let rebuild = async {
        let (status, body) = deployment.leaderboard_rebuild(1, Method::POST).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body, json!({"name": "leaderboard", "state": "rebuilding"}));
        let (status, body) = deployment.leaderboard_rebuild(2, Method::POST).await;
        assert_eq!(status, StatusCode::CONFLICT, "a second rebuild: {body}");
        let reader = deployment.token("reader", Role::User);
        let seen = std::sync::Mutex::new(Vec::new());
        let done = poll("the rebuild to finish", Duration::from_secs(60), || async {
            // The live read model answers throughout.
            let (status, page) = deployment
                .call(
                    0,
                    Method::GET,
                    &format!("/v1/tests/{test}/leaderboard"),
                    &reader,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            let (status, progress) = deployment.leaderboard_rebuild(2, Method::GET).await;
            assert_eq!(status, StatusCode::OK);
            seen.lock()
                .unwrap()
                .push(progress["processed"].as_i64().unwrap());
            match progress["state"].as_str() {
                Some("done") => Ok(progress),
                Some("rebuilding") => Err(progress),
                _ => panic!("the rebuild: {progress}"),
            }
        })
        .await;
        flowing.store(false, std::sync::atomic::Ordering::Relaxed);
        (done, seen.into_inner().unwrap())
    };
    let (more, (done, seen)) = tokio::join!(submit, rebuild);
    acknowledged.extend(more);
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "progress only rises: {seen:?}"
    );
    assert!(done["total"].as_i64().unwrap() > 0, "{done}");
    assert_eq!(done["processed"], done["total"], "{done}");
    assert_eq!(done["eta_secs"], 0.0, "{done}");
    assert!(
        done["finished_at"].is_string() && done["started_at"].is_string(),
        "{done}"
    );
    let runner = done["runner"].as_str().unwrap();
    let owner_after = leaderboard_lease(&deployment).await;
    match (&owner, &owner_after) {
        (Some((owner, token)), Some((_, token_after))) if token == token_after => {
            assert_eq!(runner, owner, "the owner ran it: {done}");
        }
        // The lease changed hands: the rebuild runs on whichever owner
        // picked the request up, on one of the instances.
        _ => assert!(
            (0..3).any(|i| deployment.is_instance(runner, i)),
            "an instance ran it: {done}, leases {owner:?} then {owner_after:?}"
        ),
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM projection_rebuilds")
        .fetch_one(&deployment.pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    // Nothing submitted meanwhile is lost or doubled, and what the rebuild
    // left is what a fresh replay of the log makes.
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    let rebuilt = deployment.boards().await;
    deployment.replays_to(&rebuilt).await;
    // `podium replay` is refused while a rebuild runs: here one holds the
    // lock as a runner would.
    let mut locks = sqlx::PgConnection::connect(&deployment.database_url)
        .await
        .unwrap();
    let _: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext('leaderboard'))")
        .bind(0x7064_7262_i32)
        .fetch_one(&mut locks)
        .await
        .unwrap();
    let mut quiet = |_, _| {};
    let refused = podium::projector::operations::rebuild(
        &deployment.pool,
        &podium::projector::replay::Scope::Leaderboard.read_models(),
        "a second runner",
        &mut quiet,
    )
    .await
    .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("a rebuild of leaderboard is already running"),
        "{refused}"
    );
    // And so is the command operators script.
    let replay = std::process::Command::new(env!("CARGO_BIN_EXE_podium"))
        .args(["replay", "--projection", "leaderboard"])
        .env("DATABASE_URL", &deployment.database_url)
        .env_remove("NATS_URL")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&replay.stderr);
    assert!(
        !replay.status.success(),
        "podium replay ran beside a rebuild"
    );
    assert!(
        said.contains("a rebuild of leaderboard is already running"),
        "podium replay said: {said}"
    );
}

/// Learners seeded for the rebuild tests: one start and one submission
/// each, a log of 40,001 events. Long enough for a rebuild to be caught
/// running (about ten seconds alone), short of the 100,000 events behind
/// from which a new owner would catch up by a rebuild of its own.
const REBUILT_LEARNERS: u64 = 20_000;

/// Three instances over a log of 40,001 events, the leaderboard's rebuild
/// asked through instance 1 and running on its owner; returns the owner
/// (the runner). Whichever instance holds the lease when the request is
/// seen runs it: on a busy machine a lease may move before that.
async fn a_rebuild_running() -> (TestDb, Deployment, usize) {
    use reqwest::Method;
    let (db, deployment) = shared_deployment(3).await;
    let mut quiet = |_, _| {};
    podium::cli::bulk_seed::bulk(&deployment.pool, REBUILT_LEARNERS, &mut quiet)
        .await
        .unwrap();
    let (status, body) = deployment.leaderboard_rebuild(1, Method::POST).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let runner = poll("the owner to run it", Duration::from_secs(60), || async {
        let (_, progress) = deployment.leaderboard_rebuild(2, Method::GET).await;
        let runner = progress["runner"].as_str().unwrap_or_default();
        let instance = (0..3).find(|&i| deployment.is_instance(runner, i));
        match instance {
            Some(instance) if progress["state"] == "rebuilding" => Ok(instance),
            _ => Err(progress),
        }
    })
    .await;
    (db, deployment, runner)
}

/// The leaderboard's rebuild once done (as instance `via` reports it).
async fn rebuild_done(deployment: &Deployment, via: usize) -> Value {
    poll(
        "the rebuild to finish",
        Duration::from_secs(150),
        || async {
            let (status, progress) = deployment
                .leaderboard_rebuild(via, reqwest::Method::GET)
                .await;
            match progress["state"].as_str() {
                Some("done") => Ok(progress),
                Some("rebuilding") => Err(progress),
                // A busy instance's pool may time out (its 503 says to
                // retry), as a swap holds the live tables for a moment.
                _ if status == StatusCode::SERVICE_UNAVAILABLE => Err(progress),
                _ => panic!("the rebuild: {progress}"),
            }
        },
    )
    .await
}

/// Once the live leaderboard has caught up (as instance `via` reports it),
/// the board holds every seeded entry and is what a fresh replay of the log
/// makes. The instances are stopped before that replay: it swaps the live
/// tables, and on a busy machine it would otherwise share it with three
/// processes warming their rank indexes again from the swapped-in tables.
async fn the_board_is_a_fresh_replay(mut deployment: Deployment, via: usize) {
    poll(
        "the leaderboard to catch up",
        Duration::from_secs(150),
        || async {
            let board = deployment.projection(via, "leaderboard").await;
            if board["lag_events"] == 0 && board["state"] == "running" {
                Ok(())
            } else {
                Err(board)
            }
        },
    )
    .await;
    let rebuilt = deployment.boards().await;
    // Each learner once on each of the four boards: all time, and the day,
    // week and month of their one submission.
    assert_eq!(rebuilt.len(), 4 * REBUILT_LEARNERS as usize);
    for instance in 0..deployment.instances.len() {
        if deployment.instances[instance].is_some() {
            deployment.kill(instance);
        }
    }
    deployment.replays_to(&rebuilt).await;
}

/// The instance holding the leaderboard's lease now.
async fn leaderboard_owner(deployment: &Deployment) -> Option<String> {
    leaderboard_lease(deployment).await.map(|(owner, _)| owner)
}

/// The leaderboard's live lease now: its owner and token (which grows each
/// time the lease changes hands).
async fn leaderboard_lease(deployment: &Deployment) -> Option<(String, i64)> {
    sqlx::query_as(
        "SELECT owner, token FROM leases
          WHERE name = 'projection:leaderboard' AND expires_at > now()",
    )
    .fetch_optional(&deployment.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_whose_runner_is_killed_is_finished_by_the_next_owner() {
    let (_db, mut deployment, runner) = a_rebuild_running().await;
    deployment.kill(runner);
    let via = (runner + 1) % 3;
    let done = rebuild_done(&deployment, via).await;
    let finisher = done["runner"].as_str().unwrap();
    assert!(
        (0..3)
            .filter(|&i| i != runner)
            .any(|i| deployment.is_instance(finisher, i)),
        "a surviving owner finished it: {done}"
    );
    the_board_is_a_fresh_replay(deployment, via).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_runner_keeps_its_rebuild_and_finishes_it_when_it_wakes() {
    let (_db, deployment, runner) = a_rebuild_running().await;
    let via = (runner + 1) % 3;
    deployment.signal(runner, "-STOP");
    // Another instance takes the projection over, and the rebuild's row
    // stands still well past the 5 s after which the new owner looks at it
    // (once a second) and finds the paused runner's lock held.
    poll(
        "another owner, and the rebuild standing still",
        Duration::from_secs(45),
        || async {
            let owner = leaderboard_owner(&deployment).await.unwrap_or_default();
            let still: f64 = sqlx::query_scalar(
                "SELECT EXTRACT(EPOCH FROM now() - heartbeat_at)::float8
                   FROM projection_rebuilds WHERE name = 'leaderboard'",
            )
            .fetch_one(&deployment.pool)
            .await
            .unwrap();
            let taken = (0..3)
                .filter(|&i| i != runner)
                .any(|i| deployment.is_instance(&owner, i));
            if taken && still > 9.0 {
                Ok(())
            } else {
                Err((owner, still))
            }
        },
    )
    .await;
    let (_, progress) = deployment
        .leaderboard_rebuild(via, reqwest::Method::GET)
        .await;
    assert_eq!(progress["state"], "rebuilding", "{progress}");
    assert!(
        deployment.is_instance(progress["runner"].as_str().unwrap(), runner),
        "no second runner started it: {progress}"
    );
    deployment.signal(runner, "-CONT");
    let done = rebuild_done(&deployment, via).await;
    assert!(
        deployment.is_instance(done["runner"].as_str().unwrap(), runner),
        "the woken runner finished it: {done}"
    );
    the_board_is_a_fresh_replay(deployment, via).await;
}

/// The rebuilds on record: name, state, runner and start, by name.
type RebuildRow = (
    String,
    String,
    Option<String>,
    chrono::DateTime<chrono::Utc>,
);

async fn rebuilds(pool: &PgPool) -> Vec<RebuildRow> {
    sqlx::query_as(
        "SELECT name, state, runner, started_at FROM projection_rebuilds
          WHERE started_at IS NOT NULL ORDER BY name",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_far_behind_catch_up_in_one_rebuild_then_live_and_a_takeover_rebuilds_nothing()
{
    let db = TestDb::new().await;
    let seeded = crate::helpers::seed_log(&db.pool, 3_000).await;
    // 6,001 events behind, over half the log: far behind for 1,000.
    let env = vec![(
        "PODIUM_CATCH_UP_REBUILD_FROM".to_string(),
        "1000".to_string(),
    )];
    let mut deployment = Deployment::start_on(db.url(), db.pool.clone(), 2, nats_url(), env).await;
    let first = poll(
        "the read models to be rebuilt",
        Duration::from_secs(120),
        || async {
            let rows = rebuilds(&deployment.pool).await;
            let done = rows.len() == 4 && rows.iter().all(|(_, state, ..)| state == "done");
            if done {
                Ok(rows)
            } else {
                Err(rows)
            }
        },
    )
    .await;
    let names: Vec<&str> = first.iter().map(|(name, ..)| name.as_str()).collect();
    assert_eq!(names, ["attempts", "catalog", "feed", "leaderboard"]);
    for (name, _, runner, started_at) in &first {
        assert!(
            deployment.is_instance(runner.as_deref().unwrap_or_default(), 0),
            "{name}: the instance holding the leases ran it: {first:?}"
        );
        assert_eq!(
            started_at, &first[0].3,
            "one rebuild of all four: {first:?}"
        );
    }
    let checkpoint: i64 =
        sqlx::query_scalar("SELECT seq FROM projection_checkpoints WHERE name = 'leaderboard'")
            .fetch_one(&deployment.pool)
            .await
            .unwrap();
    assert!(
        checkpoint as u64 >= seeded,
        "the rebuild swapped in the seeded log"
    );

    // Then live: what is submitted now reaches every read model, and the
    // policy (no read model of its own) worked the seeded log off by reading
    // it, then went on through NATS (a graded notification for each seeded
    // submission).
    let test = deployment.published_test(1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..10 {
        let user = format!("late-{i}");
        acknowledged.extend(deployment.take(i % 2, &test, &user, i as u64).await);
    }
    assert_eq!(acknowledged.len(), 10);
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(120))
        .await;

    // A takeover close to the head goes live without rebuilding.
    deployment.kill(0);
    let second = deployment.pid(1);
    wait_until(
        Duration::from_secs(30),
        "the second instance to hold every lease",
        || async { deployment.owned_by(second).await == ROLES },
    )
    .await;
    for i in 10..20 {
        let user = format!("late-{i}");
        acknowledged.extend(deployment.take(1, &test, &user, i as u64).await);
    }
    assert_eq!(acknowledged.len(), 20);
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(60))
        .await;
    assert_eq!(rebuilds(&deployment.pool).await, first, "no second rebuild");
    let board = deployment.boards().await;
    deployment.replays_to(&board).await;
}

/// The owner of a far-behind notification policy killed (kill -9) while it
/// reads the log itself: the standby takes the policy over and finishes the
/// backlog from the checkpoint the dead owner committed. Every notification
/// the policy decides over the log is created, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_owner_killed_while_it_reads_the_log_loses_and_doubles_nothing() {
    use crate::helpers::{notifications_created, policy_decisions};
    let db = TestDb::new().await;
    let seeded = crate::helpers::seed_log(&db.pool, 20_000).await;
    let (expected, submissions) = policy_decisions(&db.pool, seeded).await;
    let env = vec![(
        "PODIUM_CATCH_UP_REBUILD_FROM".to_string(),
        "1000".to_string(),
    )];
    let mut deployment = Deployment::start_on(db.url(), db.pool.clone(), 2, nats_url(), env).await;
    let policy = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT COALESCE(max(seq), 0) FROM projection_checkpoints
              WHERE name = 'notification-policy'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap_or(0)
    };
    // Killed once it has committed part of the seeded log.
    let at = poll(
        "the policy to be part-way through the seeded log",
        Duration::from_secs(120),
        || async {
            let checkpoint = policy().await;
            if checkpoint > 0 {
                Ok(checkpoint)
            } else {
                Err(checkpoint)
            }
        },
    )
    .await;
    deployment.kill(0);
    assert!(
        (at as u64) < seeded,
        "the owner was killed before it finished the seeded log (at {at} of {seeded})"
    );
    poll(
        "every seeded submission notified",
        Duration::from_secs(180),
        || async {
            let (created, sources) = notifications_created(&db.pool).await;
            if sources as usize == submissions {
                Ok(())
            } else {
                Err((created, sources, policy().await))
            }
        },
    )
    .await;
    // Once the standby has passed over the notifications too.
    poll(
        "the policy at the head",
        Duration::from_secs(120),
        || async {
            let head: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
                .fetch_one(&db.pool)
                .await
                .unwrap();
            let checkpoint = policy().await;
            if checkpoint >= head {
                Ok(())
            } else {
                Err((checkpoint, head))
            }
        },
    )
    .await;
    let (created, sources) = notifications_created(&db.pool).await;
    assert_eq!(created as usize, expected, "every notification, once");
    assert_eq!(sources as usize, submissions);
    assert!(
        deployment.owned_by(deployment.pid(1)).await > 0,
        "the standby took over"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_everywhere_and_retried_or_skipped_by_the_owner() {
    use reqwest::Method;
    let (_db, deployment) = shared_deployment(3).await;
    let test = deployment.published_test(1).await;
    let admin = deployment.token("operator", Role::Admin);
    let (deployment, test, admin) = (&deployment, &test, &admin);
    // The attempts read model refuses two learners' rows, as a bad
    // migration or a bug in a projection would.
    refuse_attempts_of(&deployment.pool, "poison-%").await;
    let start = move |user: &str, instance: usize| {
        let token = deployment.token(user, Role::User);
        let path = format!("/v1/tests/{test}/attempts");
        async move {
            deployment
                .post(instance, &path, &token, json!({}))
                .await
                .expect("the attempt starts")["attempt_id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let first = start("poison-1", 1).await;
    let second = start("poison-2", 2).await;
    let after = start("after-skip", 1).await;
    let letters = move |instance: usize| async move {
        let (status, body) = deployment
            .call(
                instance,
                Method::GET,
                "/v1/admin/dead-letters?projection=attempts",
                admin,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["items"].as_array().unwrap().clone()
    };
    let letter = poll("a dead letter", Duration::from_secs(60), || async {
        match letters(2).await.as_slice() {
            [letter] => Ok(letter.clone()),
            other => Err(other.to_vec()),
        }
    })
    .await;
    assert_eq!(letter["event_type"], "AttemptStarted", "{letter}");
    assert_eq!(letter["projection"], "attempts");
    assert_eq!(letter["failures"], 5, "{letter}");
    assert!(
        letter["error"]
            .as_str()
            .unwrap()
            .contains("refused poison-1"),
        "{letter}"
    );
    for instance in 0..3 {
        let attempts = deployment.projection(instance, "attempts").await;
        assert_eq!(attempts["state"], "halted", "{attempts}");
        assert_eq!(attempts["dead_letters"], 1, "{attempts}");
        assert_eq!(
            attempts["checkpoint"].as_i64().unwrap() + 1,
            letter["seq"].as_i64().unwrap()
        );
    }
    // The cause of the first goes away; it is retried through another
    // instance than the owner, and applied once, in order; the second
    // learner's start fails next.
    refuse_attempts_of(&deployment.pool, "poison-2").await;
    let id = letter["id"].as_i64().unwrap();
    let (status, body) = deployment
        .call(
            2,
            Method::POST,
            &format!("/v1/admin/dead-letters/{id}/retry"),
            admin,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let next = poll(
        "the second dead letter",
        Duration::from_secs(60),
        || async {
            match letters(1).await.as_slice() {
                [letter] if letter["id"] != id => Ok(letter.clone()),
                other => Err(other.to_vec()),
            }
        },
    )
    .await;
    assert!(
        next["error"].as_str().unwrap().contains("refused poison-2"),
        "{next}"
    );
    let rows = move |attempt: String| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM my_attempts WHERE attempt_id = $1::uuid")
            .bind(attempt)
            .fetch_one(&deployment.pool)
            .await
            .unwrap()
    };
    assert_eq!(
        rows(first.clone()).await,
        1,
        "the retried event is applied once"
    );
    let (status, body) = deployment
        .call(
            0,
            Method::POST,
            &format!("/v1/admin/dead-letters/{id}/retry"),
            admin,
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "resolved already: {body}");
    let (status, body) = deployment
        .call(0, Method::POST, "/v1/admin/dead-letters/999999/skip", admin)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // The second is skipped: the projection goes on without it.
    let skip = format!("/v1/admin/dead-letters/{}/skip", next["id"]);
    let (status, body) = deployment.call(1, Method::POST, &skip, admin).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    poll(
        "the projection to go on",
        Duration::from_secs(60),
        || async {
            let after_rows = rows(after.clone()).await;
            let attempts = deployment.projection(2, "attempts").await;
            if after_rows == 1 && attempts["state"] == "running" && attempts["dead_letters"] == 0 {
                Ok(())
            } else {
                Err((after_rows, attempts))
            }
        },
    )
    .await;
    assert_eq!(rows(second).await, 0, "the skipped event is not applied");
    assert!(letters(0).await.is_empty());
    let skipped = deployment
        .metric(
            0,
            "podium_projection_skipped_total",
            &["projection=\"attempts\""],
        )
        .await;
    assert_eq!(skipped, 1.0, "the owner counted the skip");
    let state: String = sqlx::query_scalar("SELECT state FROM dead_letters WHERE id = $1")
        .bind(next["id"].as_i64().unwrap())
        .fetch_one(&deployment.pool)
        .await
        .unwrap();
    assert_eq!(state, "skipped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_mid_load_loses_and_doubles_nothing() {
    let mut cluster = crate::nats::NatsCluster::start().await;
    let db = TestDb::new().await;
    let deployment = Deployment::start_on(
        db.url(),
        db.pool.clone(),
        2,
        cluster.url(),
        vec![("PODIUM_NATS_REPLICAS".into(), "3".into())],
    )
    .await;
    let test = deployment.published_test(1).await;
    // The events stream keeps three copies, one per node.
    let servers: Vec<String> = cluster.url().split(',').map(str::to_string).collect();
    let js = async_nats::jetstream::new(async_nats::connect(servers).await.unwrap());
    let name = podium_nats::Subjects::new(&deployment.prefix)
        .unwrap()
        .events_stream();
    let info = js
        .get_stream(&name)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    assert_eq!(peers, 2, "a leader and two replicas: {:?}", info.cluster);
    let flowing = std::sync::atomic::AtomicBool::new(true);
    let submitted = std::sync::atomic::AtomicUsize::new(0);
    let load = async {
        let mut acknowledged = HashSet::new();
        let mut i = 0u64;
        while flowing.load(std::sync::atomic::Ordering::Relaxed) {
            let user = format!("learner-{}", i % 40);
            if let Some(attempt) = deployment.take(i as usize % 2, &test, &user, i).await {
                acknowledged.insert(attempt);
                submitted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            i += 1;
        }
        acknowledged
    };
    let fault = async {
        poll(
            "submissions before the fault",
            Duration::from_secs(60),
            || async {
                let n = submitted.load(std::sync::atomic::Ordering::Relaxed);
                if n >= 40 {
                    Ok(())
                } else {
                    Err(n)
                }
            },
        )
        .await;
        cluster.kill(0);
        let before = submitted.load(std::sync::atomic::Ordering::Relaxed);
        poll(
            "submissions after the fault",
            Duration::from_secs(120),
            || async {
                let n = submitted.load(std::sync::atomic::Ordering::Relaxed);
                if n >= before + 40 {
                    Ok(())
                } else {
                    Err(n)
                }
            },
        )
        .await;
        flowing.store(false, std::sync::atomic::Ordering::Relaxed);
    };
    let (acknowledged, ()) = tokio::join!(load, fault);
    assert!(
        acknowledged.len() >= 80,
        "{} acknowledged",
        acknowledged.len()
    );
    deployment
        .wait_converged(&acknowledged, Duration::from_secs(120))
        .await;
}
