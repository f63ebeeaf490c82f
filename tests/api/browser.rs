//! The demo page in a real browser: headless Chromium driven over WebDriver
//! (ChromeDriver), on both adapter sets. The page is loaded once; an attempt
//! submitted through the API must show up in its leaderboard without a
//! reload, and a notification must be markable as read from the page. A
//! screenshot of each run is kept in `target/browser-artifacts/`.
//!
//! Needs `chromium` and `chromedriver` (`scripts/browser` installs them).
//! Without them the tests say they were skipped, unless
//! `PODIUM_REQUIRE_SERVICES` is set (as in `.ci/run`): then they fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::conformance::{eventually, serve, Adapters};
use crate::helpers::TestApp;

/// How long the page may take to show something.
const PAGE_DEADLINE: Duration = Duration::from_secs(30);

fn binary(env: &str, default: &str) -> PathBuf {
    std::env::var_os(env).map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// ChromeDriver and Chromium, if installed; otherwise says the test was
/// skipped, or fails it when `PODIUM_REQUIRE_SERVICES` is set.
fn browser_or_skip(test: &str) -> Option<(PathBuf, PathBuf)> {
    let driver = binary("PODIUM_CHROMEDRIVER", "/usr/bin/chromedriver");
    let chromium = binary("PODIUM_CHROMIUM", "/usr/bin/chromium");
    if driver.exists() && chromium.exists() {
        return Some((driver, chromium));
    }
    assert!(
        std::env::var_os("PODIUM_REQUIRE_SERVICES").is_none(),
        "{test}: {} or {} is missing, and PODIUM_REQUIRE_SERVICES forbids skipping",
        driver.display(),
        chromium.display()
    );
    eprintln!("SKIPPED {test}: Chromium and ChromeDriver are not installed (run scripts/browser)");
    None
}

/// A ChromeDriver process with one headless Chromium session.
struct Browser {
    driver: Child,
    client: reqwest::Client,
    session: String,
}

impl Browser {
    async fn start(driver: &Path, chromium: &Path) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + PAGE_DEADLINE;
        loop {
            let ready = client.get(format!("{base}/status")).send().await;
            if let Ok(response) = ready {
                let status: Value = response.json().await.unwrap_or_default();
                if status["value"]["ready"] == true {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not come up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }
        }}});
        let created: Value = client
            .post(format!("{base}/session"))
            .json(&capabilities)
            .send()
            .await
            .expect("a session")
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Self {
            driver: child,
            client,
            session: format!("{base}/session/{session}"),
        }
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let response: Value = self
            .client
            .post(format!("{}{path}", self.session))
            .json(&body)
            .send()
            .await
            .expect("a WebDriver command")
            .json()
            .await
            .unwrap();
        assert!(
            response["value"]["error"].is_null(),
            "WebDriver {path}: {response}"
        );
        response["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.command("/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body) in the page and returns its value.
    async fn eval(&self, script: &str) -> Value {
        self.command("/execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// Waits until `script` returns something truthy, and returns it.
    async fn until(&self, what: &str, script: &str) -> Value {
        crate::helpers::poll(what, PAGE_DEADLINE, || async {
            let value = self.eval(script).await;
            if value.is_null() || value == false || value == 0 || value == "" {
                Err(value)
            } else {
                Ok(value)
            }
        })
        .await
    }

    /// Saves a PNG screenshot of the page to `path`.
    async fn screenshot(&self, path: &Path) {
        let response: Value = self
            .client
            .get(format!("{}/screenshot", self.session))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(response["value"].as_str().expect("a screenshot"))
            .unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the driver ends its browser.
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Submits a full-score attempt of `user` on the sample test.
async fn ace(app: &TestApp, test_id: &str, user: &str) {
    let token = app.user(user);
    let attempt = app.started_attempt(test_id, &token).await;
    let answers = json!({"answers": {"q1": 1, "q2": 0}});
    let response = app.submit(&attempt, &token, Some(answers)).await;
    assert_eq!(response.status(), StatusCode::OK);
}

async fn the_demo_page_follows_the_leaderboard_live(adapters: Adapters, name: &str) {
    let test = format!("browser::{name}");
    let Some((driver, chromium)) = browser_or_skip(&test) else {
        return;
    };
    let Some(app) = serve(adapters, &test, |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    ace(&app, &test_id, "early-bird").await;
    // A collection of the test, which the board picker offers too.
    let created = app
        .post(
            "/v1/collections",
            &app.admin(),
            Some(json!({"title": "Term", "test_ids": [test_id]})),
        )
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let collection: Value = created.json().await.unwrap();
    let collection = collection["id"].as_str().unwrap().to_string();
    let viewer = app.user("viewer");
    // The catalog lists it before the page loads.
    eventually("the collection listed", || async {
        let list: Value = app
            .get("/v1/collections", &viewer)
            .await
            .json()
            .await
            .ok()?;
        (list["items"][0]["id"] == collection.as_str()).then_some(())
    })
    .await;
    let browser = Browser::start(&driver, &chromium).await;
    browser
        .open(&format!("{}/?token={viewer}#test={test_id}", app.address))
        .await;
    browser
        .until(
            "the first entry and a live stream",
            "return document.querySelector('#leaderboard tr[data-user=\"early-bird\"]') !== null
                && document.getElementById('live-status').dataset.state === 'live';",
        )
        .await;
    // Anything a reload would wipe, to prove there was none.
    browser
        .eval("window.podiumMarker = 'no reload'; return true;")
        .await;

    ace(&app, &test_id, "newcomer").await;
    let row = browser
        .until(
            "the newcomer's row",
            "const row = document.querySelector('#leaderboard tr[data-user=\"newcomer\"]');
             return row && row.cells[0].textContent.trim();",
        )
        .await;
    assert_eq!(row, "2", "the newcomer ranks behind the earlier full score");
    let total = browser
        .eval("return document.getElementById('lb-total').textContent;")
        .await;
    assert!(
        total.as_str().unwrap().contains('2'),
        "total shown: {total}"
    );
    let log = browser
        .eval("return document.getElementById('live-log').textContent;")
        .await;
    assert!(
        log.as_str().unwrap().contains("newcomer"),
        "live log: {log}"
    );
    assert_eq!(
        browser.eval("return window.podiumMarker;").await,
        "no reload"
    );
    // The window picker: this week's board holds both (both submitted just
    // now), and says which week it is and when it resets.
    let pick = |window: &str| {
        format!(
            "const s = document.getElementById('window-select'); s.value = '{window}';
             s.dispatchEvent(new Event('change')); return true;"
        )
    };
    browser.eval(&pick("week")).await;
    let period = browser
        .until(
            "this week's board",
            "const p = document.getElementById('lb-period').textContent;
             return p.startsWith('week:')
                 && document.querySelectorAll('#leaderboard tr[data-user]').length === 2 && p;",
        )
        .await;
    assert!(period.as_str().unwrap().contains("resets"), "{period}");
    // The stream follows the week's board now: a new entry shows live.
    ace(&app, &test_id, "weekly").await;
    browser
        .until(
            "a live entry on the week's board",
            "const row = document.querySelector('#leaderboard tr[data-user=\"weekly\"]');
             return row && document.getElementById('lb-period').textContent.startsWith('week:')
                 && row.cells[0].textContent.trim();",
        )
        .await;
    browser.eval(&pick("all")).await;
    browser
        .until(
            "the all-time board again",
            "return document.getElementById('lb-period').textContent === 'all time';",
        )
        .await;
    // A learner's neighbours, and their rank after each attempt as a chart.
    browser
        .eval(
            "document.getElementById('around-user').value = 'newcomer';
             document.getElementById('around-go').click(); return true;",
        )
        .await;
    let ranks = browser
        .until(
            "the newcomer's rank history",
            "const f = document.getElementById('rank-history');
             const dots = [...document.querySelectorAll('#rank-chart circle')];
             return !f.hidden && dots.length > 0 && dots.map((d) => d.dataset.rank).join(',');",
        )
        .await;
    assert_eq!(ranks, "2", "one attempt, second right after it");
    // The collection's board: the same learners, counted in tests taken,
    // and live too.
    browser
        .eval(&format!(
            "const s = document.getElementById('test-select'); s.value = 'collection:{collection}';
             s.dispatchEvent(new Event('change')); return s.value;"
        ))
        .await;
    browser
        .until(
            "the collection's board, live",
            "return document.querySelectorAll('#leaderboard tr[data-user]').length === 3
                && document.querySelector('#leaderboard th.count-col').textContent === 'tests taken'
                && document.getElementById('live-status').dataset.state === 'live';",
        )
        .await;
    ace(&app, &test_id, "collector").await;
    let taken = browser
        .until(
            "a live entry on the collection's board",
            "const row = document.querySelector('#leaderboard tr[data-user=\"collector\"]');
             return row && row.cells[3].textContent.trim();",
        )
        .await;
    assert_eq!(taken, "1", "one test of the collection taken");

    // A notification arrives live and is marked read from the page.
    let sent = app
        .post(
            "/v1/notifications",
            &app.admin(),
            Some(
                json!({"user_ids": ["viewer"], "title": "Hello from the test", "body": "Read me"}),
            ),
        )
        .await;
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    browser
        .until(
            "the notification, unread",
            "return document.getElementById('unread-count').textContent.trim() === '1'
                && document.querySelector('#feed li.unread .mark-read') !== null;",
        )
        .await;
    browser
        .eval("document.querySelector('#feed li.unread .mark-read').click(); return true;")
        .await;
    browser
        .until(
            "the unread count back to 0",
            "return document.getElementById('unread-count').textContent.trim() === '0'
                && document.querySelector('#feed li.unread') === null;",
        )
        .await;
    // The read model follows the command (at once embedded, soon in production).
    eventually("the read reaching the server's feed", || async {
        let feed: Value = app
            .get("/v1/me/notifications", &viewer)
            .await
            .json()
            .await
            .ok()?;
        (feed["unread_count"] == 0 && feed["items"][0]["read_at"].is_string()).then_some(())
    })
    .await;

    let shot = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/browser-artifacts")
        .join(format!("demo-page-{name}.png"));
    browser.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test]
async fn embedded() {
    the_demo_page_follows_the_leaderboard_live(Adapters::Embedded, "embedded").await;
}

#[tokio::test]
async fn production() {
    the_demo_page_follows_the_leaderboard_live(Adapters::Production, "production").await;
}

/// The operator page on a production deployment: it lists the projections,
/// runs a rebuild to 100% and retries a dead letter, all without a reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_page_rebuilds_and_retries_without_a_reload() {
    let test = "browser::operator_page";
    let Some((driver, chromium)) = browser_or_skip(test) else {
        return;
    };
    let Some(app) = serve(Adapters::Production, test, |_| {}).await else {
        return;
    };
    let test_id = app.published_test().await;
    ace(&app, &test_id, "early-bird").await;
    // The attempts read model refuses one learner's row: a dead letter.
    crate::helpers::refuse_attempts_of(&app.pool, "poison-1").await;
    let poisoned = app
        .start_attempt(&test_id, &app.user("poison-1"), None)
        .await;
    assert_eq!(poisoned.status(), StatusCode::CREATED);

    let browser = Browser::start(&driver, &chromium).await;
    browser
        .open(&format!("{}/admin?token={}", app.address, app.admin()))
        .await;
    browser
        .until(
            "five projections and the dead letter",
            "return document.querySelectorAll('#projections tr[data-projection]').length === 5
                && document.querySelector('#letters tr[data-letter] button.retry:not([disabled])') !== null
                && document.querySelector('#projections tr[data-projection=\"attempts\"] .state')
                     .textContent === 'halted';",
        )
        .await;
    browser
        .eval("window.podiumMarker = 'no reload'; return true;")
        .await;
    browser
        .until(
            "the leaderboard's rebuild button",
            "const b = document.querySelector('#projections tr[data-projection=\"leaderboard\"] button.rebuild');
             if (b && !b.disabled) { b.click(); return true; } return false;",
        )
        .await;
    browser
        .until(
            "the progress bar at 100%",
            "const bar = document.getElementById('progress-leaderboard');
             const eta = document.getElementById('eta-leaderboard');
             return bar && bar.value === 100 && eta.textContent.includes('done');",
        )
        .await;
    // The cause goes away; the dead letter is retried from the page.
    sqlx::raw_sql("DROP TRIGGER refuse_users ON my_attempts")
        .execute(&app.pool)
        .await
        .unwrap();
    browser
        .eval(
            "document.querySelector('#letters tr[data-letter] button.retry').click(); return true;",
        )
        .await;
    browser
        .until(
            "no dead letter left and the attempts projection running",
            "return document.querySelectorAll('#letters tr[data-letter]').length === 0
                && document.querySelector('#projections tr[data-projection=\"attempts\"] .state')
                     .textContent === 'running';",
        )
        .await;
    assert_eq!(
        browser.eval("return window.podiumMarker;").await,
        "no reload"
    );
    let rebuilt: String =
        sqlx::query_scalar("SELECT state FROM projection_rebuilds WHERE name = 'leaderboard'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(rebuilt, "done");
    let applied: i64 =
        sqlx::query_scalar("SELECT count(*) FROM my_attempts WHERE user_id = 'poison-1'")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert_eq!(applied, 1, "the retried start is applied once");
    let shot = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/browser-artifacts")
        .join("operator-page.png");
    browser.screenshot(&shot).await;
    eprintln!("screenshot: {}", shot.display());
}
