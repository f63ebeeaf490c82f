//! `spawn_app()` and one helper per endpoint.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use podium::auth::{JwtKeys, Role};
use podium::Settings;
use podium_domain::UserId;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::oneshot;
use uuid::Uuid;

pub const SECRET: &str = "integration-test-secret-0123456789abcdef";

/// The maintenance database tests create their own databases from.
fn maintenance_url() -> String {
    std::env::var("PODIUM_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn database_url(name: &str) -> String {
    let base = maintenance_url();
    let (server, _) = base
        .rsplit_once('/')
        .expect("a database URL ends in /dbname");
    format!("{server}/{name}")
}

/// A fresh database of the test's own, migrated; dropped with the value.
pub struct TestDb {
    pub name: String,
    /// A small pool for the test's own queries and components.
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::with_pool_size(4).await
    }

    pub async fn with_pool_size(connections: u32) -> Self {
        let name = format!("podium_test_{}", Uuid::new_v4().simple());
        let mut admin = PgConnection::connect(&maintenance_url())
            .await
            .expect("Postgres must be reachable at PODIUM_TEST_DATABASE_URL (see README.md)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create the test database");
        // No query of a test waits for a lock for long: one stuck behind a
        // lock fails, naming it, instead of hanging the run.
        let options = PgConnectOptions::from_str(&database_url(&name))
            .expect("a valid database URL")
            .options([("lock_timeout", "120s")]);
        let pool = PgPoolOptions::new()
            .max_connections(connections)
            .connect_with(options)
            .await
            .expect("connect to the test database");
        podium::ops::db::migrate(&pool)
            .await
            .expect("migrations apply");
        Self { name, pool }
    }

    /// No database: the stand-in an embedded app carries. Its pool points
    /// nowhere and is never connected.
    pub fn none() -> Self {
        Self {
            name: String::new(),
            pool: PgPoolOptions::new()
                .connect_lazy("postgres://nobody@127.0.0.1:1/none")
                .expect("a lazy pool"),
        }
    }

    pub fn url(&self) -> String {
        database_url(&self.name)
    }

    /// How many events the log holds.
    pub async fn event_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return;
        }
        let name = self.name.clone();
        // Drop runs inside the test's runtime, so clean up on a thread of our own.
        run_blocking(async move {
            if let Ok(mut conn) = PgConnection::connect(&maintenance_url()).await {
                let drop = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                let _ = sqlx::query(&drop).execute(&mut conn).await;
            }
        });
    }
}

/// Runs `work` to completion on a runtime of its own, off the caller's.
pub fn run_blocking(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work);
    })
    .join();
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// Shared by every instance started with [`TestApp::another_instance`].
    pub db: std::sync::Arc<TestDb>,
    /// The test database's pool (the same as `db.pool`).
    pub pool: PgPool,
    keys: JwtKeys,
    shutdown: Option<oneshot::Sender<()>>,
    /// NATS server and prefix whose streams the app created, if any.
    nats: Option<(String, String)>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Starts the app with settings adjusted by `configure`.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    // Quiet unless asked: RUST_LOG=warn (say) shows the app's logs.
    if std::env::var_os("RUST_LOG").is_some() {
        podium::ops::telemetry::init();
    }
    let db = std::sync::Arc::new(TestDb::with_pool_size(2).await);
    start(db, configure, true).await
}

/// Starts an embedded app (no Postgres, no NATS: the in-process log and
/// read models) with settings adjusted by `configure`.
pub async fn spawn_embedded_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let db = std::sync::Arc::new(TestDb::none());
    start(
        db,
        |settings| {
            settings.database.database_url = None;
            configure(settings);
        },
        false,
    )
    .await
}

impl TestApp {
    /// A second API instance on the same database (and NATS prefix, when
    /// `configure` sets the same), as behind a load balancer.
    pub async fn another_instance(&self, configure: impl FnOnce(&mut Settings)) -> TestApp {
        start(self.db.clone(), configure, false).await
    }
}

/// Starts a single node on Postgres without NATS, whose own relay feeds its
/// projections (and change hub) directly.
pub async fn spawn_single_node_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let db = std::sync::Arc::new(TestDb::with_pool_size(2).await);
    start_with(db, configure, false, true).await
}

/// Starts an app on `db`; `owns_streams`: it deletes its NATS streams when dropped.
/// Without NATS it runs no workers: most tests look at the command side alone.
async fn start(
    db: std::sync::Arc<TestDb>,
    configure: impl FnOnce(&mut Settings),
    owns_streams: bool,
) -> TestApp {
    start_with(db, configure, owns_streams, false).await
}

/// [`start`], with the single node's local projections when `local`.
async fn start_with(
    db: std::sync::Arc<TestDb>,
    configure: impl FnOnce(&mut Settings),
    owns_streams: bool,
    local: bool,
) -> TestApp {
    let mut settings = Settings::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        db.url(),
        SECRET.to_string(),
    );
    settings.database.db_max_connections = 5;
    configure(&mut settings);
    if settings.nats.nats_url.is_none() && !settings.is_embedded() {
        settings.workers = local;
    }
    let nats = settings
        .nats
        .nats_url
        .clone()
        .filter(|_| owns_streams)
        .map(|url| (url, settings.nats.nats_prefix.clone()));
    let app = podium::Application::build(settings)
        .await
        .expect("the app builds");
    let port = app.port();
    let (shutdown, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run_until(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        pool: db.pool.clone(),
        db,
        keys: JwtKeys::new(SECRET).unwrap(),
        shutdown: Some(shutdown),
        nats,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some((url, prefix)) = self.nats.take() {
            crate::nats::delete_streams(url, prefix);
        }
    }
}

/// A ten-point test: q1 (answer 1, 4 points), q2 (answer 0, 6 points).
pub fn sample_test() -> Value {
    json!({
        "title": "Geography",
        "time_limit_secs": 600,
        "questions": [
            {"id": "q1", "prompt": "Capital of France?", "choices": ["Lyon", "Paris", "Nice"], "answer": 1, "points": 4},
            {"id": "q2", "prompt": "Longest river?", "choices": ["Nile", "Seine"], "answer": 0, "points": 6}
        ]
    })
}

impl TestApp {
    pub fn token(&self, sub: &str, role: Role) -> String {
        let user = UserId::parse(sub).unwrap();
        self.keys.issue(&user, role, Duration::from_secs(600))
    }

    pub fn admin(&self) -> String {
        self.token("admin-1", Role::Admin)
    }

    pub fn user(&self, sub: &str) -> String {
        self.token(sub, Role::User)
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let builder = self
            .client
            .request(method, format!("{}{}", self.address, path));
        match token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    pub async fn post(&self, path: &str, token: &str, body: Option<Value>) -> Response {
        let builder = self.request(Method::POST, path, Some(token));
        let builder = match body {
            Some(body) => builder.json(&body),
            None => builder,
        };
        builder.send().await.expect("the request is sent")
    }

    /// The value of metric `name` with `labels` (each `key="value"`) from
    /// `/metrics`, 0 when absent.
    /// The text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.address))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|line| line.starts_with(name) && !line.starts_with('#'))
            .filter(|line| labels.iter().all(|label| line.contains(label)))
            .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.request(Method::GET, path, Some(token))
            .send()
            .await
            .expect("the request is sent")
    }

    pub async fn publish_test(&self, body: Value) -> Response {
        self.post("/v1/tests", &self.admin(), Some(body)).await
    }

    /// Publishes [`sample_test`] and returns its id.
    /// The served OpenAPI document.
    pub async fn openapi(&self) -> Value {
        let response = self
            .client
            .get(format!("{}/openapi.json", self.address))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    pub async fn published_test(&self) -> String {
        let response = self.publish_test(sample_test()).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_string()
    }

    pub async fn start_attempt(&self, test_id: &str, token: &str, body: Option<Value>) -> Response {
        self.post(&format!("/v1/tests/{test_id}/attempts"), token, body)
            .await
    }

    /// Starts an attempt on `test_id` as `token` and returns its id.
    pub async fn started_attempt(&self, test_id: &str, token: &str) -> String {
        let response = self.start_attempt(test_id, token, None).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.unwrap();
        body["attempt_id"].as_str().unwrap().to_string()
    }

    pub async fn answer(
        &self,
        attempt_id: &str,
        question: &str,
        token: &str,
        choice: i64,
    ) -> Response {
        self.request(
            Method::PUT,
            &format!("/v1/attempts/{attempt_id}/answers/{question}"),
            Some(token),
        )
        .json(&json!({ "choice": choice }))
        .send()
        .await
        .unwrap()
    }

    pub async fn submit(&self, attempt_id: &str, token: &str, body: Option<Value>) -> Response {
        self.post(&format!("/v1/attempts/{attempt_id}/submit"), token, body)
            .await
    }

    /// How many events the log holds.
    pub async fn event_count(&self) -> i64 {
        self.db.event_count().await
    }
}

/// Asserts a problem+json response with `status` and returns its body.
pub async fn assert_problem(response: Response, status: StatusCode) -> Value {
    assert_eq!(response.status(), status, "unexpected status");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["detail"].as_str().is_some_and(|t| !t.is_empty()));
    body
}

/// Runs `podium serve` on `db` with `env` added; returns it and its address.
pub fn podium_binary(db: &crate::helpers::TestDb, env: &[(&str, &str)]) -> (Killed, String) {
    podium_process(&db.url(), env)
}

/// Runs `podium serve` on the database at `database_url` with `env` added;
/// returns it and its address.
pub fn podium_process(database_url: &str, env: &[(&str, &str)]) -> (Killed, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_podium"));
    command
        .arg("serve")
        .env("DATABASE_URL", database_url)
        .env("PODIUM_JWT_SECRET", crate::helpers::SECRET)
        .env("PODIUM_LISTEN", "127.0.0.1:0")
        .env("PODIUM_RATE_LIMITS", "off")
        .env("RUST_LOG", "info")
        .env_remove("NATS_URL")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut server = Killed(command.spawn().expect("the podium binary starts"));
    let stderr = server.0.stderr.take().unwrap();
    let pid = server.0.id();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    // PODIUM_TEST_SERVER_LOGS=1 shows what the server logs.
    let echo = std::env::var_os("PODIUM_TEST_SERVER_LOGS").is_some();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if echo {
                eprintln!("[server {pid}] {line}");
            }
            if let Some(rest) = line.split("address=127.0.0.1:").nth(1) {
                let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
                let _ = port_tx.send(port);
            }
        }
    });
    let port = port_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server listens");
    (server, format!("http://127.0.0.1:{port}"))
}

/// A child process killed when the test ends, however it ends.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_for_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `check` every 20 ms until it answers `Ok`, for at most `timeout`,
/// and returns its value; on timeout, panics naming `what` and the last
/// `Err` (the state that was still wrong). The one polling loop of the tests:
/// they wait on conditions with deadlines, never on fixed sleeps.
/// How long past its wait's deadline one check of [`poll`] may run.
const CHECK_GRACE: Duration = Duration::from_secs(30);

pub async fn poll<T, E, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    E: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        // A check that itself never returns (a query behind a lock) fails
        // the wait too, a little after its deadline.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let last = match tokio::time::timeout(left + CHECK_GRACE, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(last)) => last,
            Err(_) => panic!("timed out after {timeout:?} waiting for {what}: a check hung"),
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last seen: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `count` entries straight into `test_id`'s leaderboard read model,
/// as if the projection had: for n in 1..=count, user `user`, best score
/// `score` and changed at seq `seq` (SQL expressions of `n`), reached now.
/// The test's score counts are recounted.
pub async fn fill_board(
    pool: &PgPool,
    test_id: Uuid,
    count: i64,
    (user, score, seq): (&str, &str, &str),
) {
    sqlx::query(&format!(
        "INSERT INTO lb_entries (test_id, user_id, best_score, max_score, attempt_id, achieved_at,
                                 attempts, changed_seq)
         SELECT $1, {user}, {score}, 100, gen_random_uuid(), now(), 1, {seq}
           FROM generate_series(1, $2) n"
    ))
    .bind(test_id)
    .bind(count)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM lb_score_counts WHERE test_id = $1")
        .bind(test_id)
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO lb_score_counts (test_id, score, entries)
         SELECT test_id, best_score, count(*) FROM lb_entries WHERE test_id = $1 GROUP BY 1, 2",
    )
    .bind(test_id)
    .execute(pool)
    .await
    .unwrap();
}

/// Makes the attempts read model refuse the rows of users matching `like`
/// (a SQL LIKE pattern), as a bug or a bad migration would: applying their
/// events fails, and they are dead-lettered. Called again, it changes the
/// pattern; `DROP TRIGGER refuse_users ON my_attempts` ends it.
pub async fn refuse_attempts_of(pool: &sqlx::PgPool, like: &str) {
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION refuse_users() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.user_id LIKE '{like}' THEN RAISE EXCEPTION 'refused %', NEW.user_id; END IF;
           RETURN NEW;
         END $$;
         CREATE OR REPLACE TRIGGER refuse_users BEFORE INSERT OR UPDATE ON my_attempts
           FOR EACH ROW EXECUTE FUNCTION refuse_users();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// Every event of the log, in its order, read `batch` at a time as a
/// tailer reads it, to its end: also what waits behind a transaction that
/// holds the log back ([`podium::log::postgres::ReadToEnd`]; another
/// test's `CREATE` or `DROP DATABASE` holds every database's log for up to
/// a second under load).
pub async fn whole_log(
    conn: &mut PgConnection,
    batch: i64,
) -> Vec<podium_domain::log::RecordedEvent> {
    use podium::log::postgres::{LogCursor, ReadToEnd};
    let mut to_end = ReadToEnd::default();
    let mut cursor = LogCursor::start();
    let mut log = Vec::new();
    loop {
        let (events, next) = cursor.peek(conn, batch).await.unwrap();
        if events.is_empty() {
            if to_end.at_end(conn, &cursor.key).await.unwrap() {
                return log;
            }
            continue;
        }
        log.extend(events);
        cursor = next;
    }
}

/// What the notification policy decides over the first `events` of the log,
/// in memory: the notifications it creates, and the submissions among them.
pub async fn policy_decisions(pool: &PgPool, events: u64) -> (usize, usize) {
    use podium::command::policy::{decide, MemoryBests};
    use podium_projections::ranking::Submission;
    let mut reader = pool.acquire().await.unwrap();
    let mut log = whole_log(&mut reader, 10_000).await;
    assert!(log.len() as u64 >= events, "{} events", log.len());
    log.truncate(events as usize);
    let mut bests = MemoryBests::default();
    let (mut notifications, mut submissions) = (0, 0);
    for event in &log {
        if let Some(submission) = Submission::of(event).unwrap() {
            notifications += decide(&mut bests, &submission).await.unwrap().len();
            submissions += 1;
        }
    }
    (notifications, submissions)
}

/// A log of `attempts` users' attempts written straight into the event
/// store (`podium seed --bulk`); its length in events.
pub async fn seed_log(pool: &PgPool, attempts: u64) -> u64 {
    let mut quiet = |_, _| {};
    let (_, events) = podium::cli::bulk_seed::bulk(pool, attempts, &mut quiet)
        .await
        .unwrap();
    events
}

/// The notifications in the log, and the source events they name.
pub async fn notifications_created(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT count(*), count(DISTINCT metadata->>'request_id') FROM events
          WHERE event_type = 'NotificationCreated'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}
