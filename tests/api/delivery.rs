//! Delivery channels against real peers: a real SMTP server process
//! (`scripts/smtp-sink`, one per test, on a port of its own) whose received
//! messages the tests read, and a real HTTP receiver (axum, in the test) that
//! verifies each webhook's signature with the secret from the create answer,
//! and fails, stalls or answers 410 on purpose.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode as AxumStatus};
use base64::Engine;
use hmac::{Hmac, Mac};
use podium::auth::Role;
use podium::Settings;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::{
    assert_problem, podium_process, poll, spawn_app_with, spawn_embedded_with, Killed, TestApp,
    TestDb, SECRET,
};
use crate::nats::{delete_streams, nats_url, unique_prefix};

/// Retries five times a second for a minute: the tests' schedule for email
/// (longer than any wait a test makes a delivery go through).
fn quick_retries() -> podium::config::Schedule {
    vec!["200ms"; 300].join(",").parse().unwrap()
}

// ---------------------------------------------------------------- the sink

/// `scripts/smtp-sink` on a port of its own, keeping messages in a folder of
/// its own.
struct MailSink {
    process: Option<Killed>,
    port: u16,
    dir: PathBuf,
    delay_ms: u64,
}

/// A message as the sink received it.
#[derive(Debug, Clone)]
struct Mail {
    recipients: Vec<String>,
    headers: HashMap<String, String>,
    text: String,
}

impl MailSink {
    fn start(delay_ms: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("podium-sink-{}", uuid::Uuid::new_v4()));
        let mut sink = Self {
            process: None,
            port: 0,
            dir,
            delay_ms,
        };
        sink.run();
        sink
    }

    /// Starts the process (again, on the same port once it has one).
    fn run(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/smtp-sink");
        let mut child = Command::new(script)
            .args(["--port", &self.port.to_string(), "--dir"])
            .arg(&self.dir)
            .args(["--delay-ms", &self.delay_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs scripts/smtp-sink");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the sink did not say where it listens: {line:?}"));
        self.port = port;
        self.process = Some(Killed(child));
    }

    /// Starts or ends an outage: every connection greeted with 421.
    fn toggle_outage(&self) {
        let pid = self.process.as_ref().unwrap().0.id().to_string();
        let sent = Command::new("kill").args(["-USR1", &pid]).status().unwrap();
        assert!(sent.success());
    }

    fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    fn mails(&self) -> Vec<Mail> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        paths.sort();
        paths
            .iter()
            .map(|path| parse_mail(&std::fs::read_to_string(path).unwrap()))
            .collect()
    }
}

impl Drop for MailSink {
    fn drop(&mut self) {
        self.process = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_mail(raw: &str) -> Mail {
    let (head, text) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let mut recipients = Vec::new();
    let mut headers = HashMap::new();
    let mut last: Option<String> = None;
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(name) = &last {
                headers
                    .entry(name.clone())
                    .and_modify(|v: &mut String| v.push_str(line.trim_start()));
            }
            continue;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        if name == "x-sink-rcpt" {
            recipients.push(value.trim().to_string());
        } else {
            headers
                .entry(name.clone())
                .or_insert_with(|| value.trim().to_string());
        }
        last = Some(name);
    }
    Mail {
        recipients,
        headers,
        text: text.to_string(),
    }
}

/// Every mail's Message-ID, counted.
fn message_ids(mails: &[Mail]) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for mail in mails {
        *ids.entry(mail.headers["message-id"].clone()).or_default() += 1;
    }
    ids
}

// ------------------------------------------------------------ the receiver

/// What one path of the receiver does.
#[derive(Clone, Copy)]
enum Behaviour {
    Ok,
    /// Answers 500 to every request.
    Fail,
    /// Answers 500 to the first `n` requests, then 200.
    FailFirst(usize),
    Gone,
    /// Answers 200 after this long.
    Slow(Duration),
}

#[derive(Debug, Clone)]
struct Received {
    path: String,
    id: String,
    body: Value,
    at: Instant,
}

#[derive(Default)]
struct ReceiverState {
    behaviours: HashMap<String, Behaviour>,
    secrets: HashMap<String, String>,
    received: Vec<Received>,
    counts: HashMap<String, usize>,
    /// Requests whose signature did not verify.
    forged: usize,
}

/// An HTTP receiver on a port of its own.
#[derive(Clone)]
struct Receiver {
    base: String,
    state: Arc<Mutex<ReceiverState>>,
}

/// Verifies a Standard Webhooks signature, independently of Podium's code.
fn verifies(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(timestamp), Some(signatures)) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    ) else {
        return false;
    };
    let Ok(sent) = timestamp.parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - sent).abs() > 300 {
        return false;
    }
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap())
        .unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    signatures.split(' ').any(|s| s == expected)
}

impl Receiver {
    async fn start() -> Self {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let shared = state.clone();
        let app = axum::Router::new().route(
            "/{path}",
            axum::routing::post(
                move |axum::extract::Path(path): axum::extract::Path<String>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| {
                    let state = shared.clone();
                    async move {
                        let behaviour = {
                            let mut s = state.lock().unwrap();
                            let Some(secret) = s.secrets.get(&path).cloned() else {
                                return AxumStatus::NOT_FOUND;
                            };
                            if !verifies(&secret, &headers, &body) {
                                s.forged += 1;
                                return AxumStatus::UNAUTHORIZED;
                            }
                            let count = s.counts.entry(path.clone()).or_default();
                            *count += 1;
                            let count = *count;
                            s.received.push(Received {
                                path: path.clone(),
                                id: headers["webhook-id"].to_str().unwrap().to_string(),
                                body: serde_json::from_slice(&body).unwrap(),
                                at: Instant::now(),
                            });
                            let behaviour =
                                s.behaviours.get(&path).copied().unwrap_or(Behaviour::Ok);
                            (behaviour, count)
                        };
                        match behaviour {
                            (Behaviour::Ok, _) => AxumStatus::NO_CONTENT,
                            (Behaviour::Fail, _) => AxumStatus::INTERNAL_SERVER_ERROR,
                            (Behaviour::FailFirst(n), count) if count <= n => {
                                AxumStatus::INTERNAL_SERVER_ERROR
                            }
                            (Behaviour::FailFirst(_), _) => AxumStatus::OK,
                            (Behaviour::Gone, _) => AxumStatus::GONE,
                            (Behaviour::Slow(wait), _) => {
                                tokio::time::sleep(wait).await;
                                AxumStatus::OK
                            }
                        }
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { base, state }
    }

    /// Registers an endpoint at `path` of this receiver on `app`, for
    /// `events` (all when `None`); returns its id.
    async fn register(
        &self,
        app: &TestApp,
        path: &str,
        behaviour: Behaviour,
        events: Option<&[&str]>,
    ) -> String {
        let mut body = json!({"url": format!("{}/{path}", self.base)});
        if let Some(events) = events {
            body["events"] = json!(events);
        }
        let response = app.post("/v1/webhooks", &app.admin(), Some(body)).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        let created: Value = response.json().await.unwrap();
        let secret = created["secret"].as_str().unwrap().to_string();
        assert!(secret.starts_with("whsec_"), "{secret}");
        let mut s = self.state.lock().unwrap();
        s.secrets.insert(path.to_string(), secret);
        s.behaviours.insert(path.to_string(), behaviour);
        created["id"].as_str().unwrap().to_string()
    }

    fn received(&self, path: &str) -> Vec<Received> {
        let s = self.state.lock().unwrap();
        s.received
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Registers `/tests` for `test.published`, publishes `n` tests and
    /// waits until each was delivered and recorded so; returns the endpoint
    /// and the tests.
    async fn tests_delivered(&self, app: &TestApp, n: usize) -> (String, Vec<String>) {
        let endpoint = self
            .register(app, "tests", Behaviour::Ok, Some(&["test.published"]))
            .await;
        let mut published = Vec::new();
        for _ in 0..n {
            published.push(app.published_test().await);
        }
        self.wait_for_count("tests", n, Duration::from_secs(30))
            .await;
        // The receiver has answered; the outcomes are recorded right after.
        no_delivery_pending(&app.pool, Duration::from_secs(10)).await;
        (endpoint, published)
    }

    /// Waits until `path` got exactly `n` requests.
    async fn wait_for_count(&self, path: &str, n: usize, timeout: Duration) {
        poll(&format!("{n} requests at {path}"), timeout, || async {
            match self.received(path).len() {
                got if got == n => Ok(()),
                got => Err(got),
            }
        })
        .await;
    }

    /// Waits until `path` got the `test.published` of `test_id`.
    async fn wait_for_test(&self, path: &str, test_id: &str, timeout: Duration) {
        poll(&format!("test {test_id} at {path}"), timeout, || async {
            let got = self.received(path);
            if got.iter().any(|r| r.body["data"]["id"] == test_id) {
                Ok(())
            } else {
                Err(got.len())
            }
        })
        .await;
    }

    fn forged(&self) -> usize {
        self.state.lock().unwrap().forged
    }
}

// ------------------------------------------------------------------ set-up

/// An app on Postgres and NATS (a prefix of its own) that emails through
/// `sink`, with `configure` besides.
async fn app_with_mail(sink: &MailSink, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let smtp = sink.url();
    spawn_app_with(move |s| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = unique_prefix();
        s.delivery.smtp_url = Some(smtp.into());
        s.delivery.email_retry_schedule = quick_retries();
        s.delivery.delivery_poll_ms = 100;
        configure(s);
    })
    .await
}

async fn set_email(app: &TestApp, user: &str, email: Option<&str>, kinds: Option<&[&str]>) {
    let mut body = json!({"email": email});
    if let Some(kinds) = kinds {
        body["email_kinds"] = json!(kinds);
    }
    let response = app
        .request(Method::PUT, "/v1/me/delivery", Some(&app.user(user)))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn notify(app: &TestApp, users: &[&str], kind: &str, title: &str) {
    let response = app
        .post(
            "/v1/notifications",
            &app.admin(),
            Some(json!({"user_ids": users, "kind": kind, "title": title, "body": "Hello there"})),
        )
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
}

/// Waits until `sink` holds at least `n` messages; returns them.
async fn wait_for_mails(sink: &MailSink, n: usize, timeout: Duration) -> Vec<Mail> {
    poll(&format!("{n} emails"), timeout, || async {
        let mails = sink.mails();
        if mails.len() >= n {
            Ok(mails)
        } else {
            Err(mails.len())
        }
    })
    .await
}

async fn pending_deliveries(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM deliveries WHERE status = 'pending'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Gives users `{prefix}1` to `{prefix}{n}` the address
/// `{user}@example.org` for announcements.
async fn addresses(pool: &sqlx::PgPool, prefix: &str, n: usize) {
    sqlx::query(
        "INSERT INTO delivery_settings (user_id, email, email_kinds)
         SELECT $1 || g, $1 || g || '@example.org', ARRAY['announcement']
         FROM generate_series(1, $2) g",
    )
    .bind(prefix)
    .bind(n as i32)
    .execute(pool)
    .await
    .unwrap();
}

/// Waits until no delivery is pending.
async fn no_delivery_pending(pool: &sqlx::PgPool, timeout: Duration) {
    poll("no delivery pending", timeout, || async {
        match pending_deliveries(pool).await {
            0 => Ok(()),
            n => Err(n),
        }
    })
    .await;
}

/// Waits until the newest delivery of `endpoint`'s log is `status`; returns
/// the log's first page.
async fn newest_delivery(app: &TestApp, endpoint: &str, status: &str, timeout: Duration) -> Value {
    let path = format!("/v1/webhooks/{endpoint}/deliveries");
    poll(
        &format!("the newest delivery {status}"),
        timeout,
        || async {
            let log: Value = app.get(&path, &app.admin()).await.json().await.unwrap();
            if log["items"][0]["status"] == status {
                Ok(log)
            } else {
                Err(log)
            }
        },
    )
    .await
}

// ------------------------------------------------------------------- email

#[tokio::test]
async fn one_email_per_notification_of_a_chosen_kind_none_otherwise() {
    let sink = MailSink::start(0);
    let app = app_with_mail(&sink, |_| {}).await;
    set_email(&app, "alice", Some("alice@example.org"), None).await;
    set_email(
        &app,
        "carol",
        Some("carol@example.org"),
        Some(&["attempt_graded"]),
    )
    .await;
    // bob never gave an address; dave gave one, then took it back.
    set_email(&app, "dave", Some("dave@example.org"), None).await;
    set_email(&app, "dave", None, None).await;

    notify(
        &app,
        &["alice", "bob", "carol", "dave"],
        "announcement",
        "Exams next week",
    )
    .await;
    notify(&app, &["alice", "carol"], "attempt_graded", "Your score").await;
    // Intake is in log order: once this one is emailed, the others were planned.
    notify(&app, &["alice"], "personal_best", "A new best").await;

    let mails = wait_for_mails(&sink, 3, Duration::from_secs(30)).await;
    no_delivery_pending(&app.pool, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 3);
    let mails = sink.mails();
    let mut got: Vec<(String, String)> = mails
        .iter()
        .map(|m| (m.recipients.join(","), m.headers["x-podium-kind"].clone()))
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("alice@example.org".to_string(), "announcement".to_string()),
            ("alice@example.org".to_string(), "personal_best".to_string()),
            (
                "carol@example.org".to_string(),
                "attempt_graded".to_string()
            ),
        ]
    );
    let best = mails
        .iter()
        .find(|m| m.headers["x-podium-kind"] == "personal_best")
        .unwrap();
    assert_eq!(best.headers["subject"], "A new best");
    assert_eq!(best.headers["to"], "alice@example.org");
    assert!(best.headers["content-type"].starts_with("multipart/alternative"));
    assert!(best.text.contains("text/plain") && best.text.contains("text/html"));
    assert!(best.text.contains("Hello there"));
    // Every email's delivery is recorded as delivered, once.
    let delivered: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE channel = 'email' AND status = 'delivered' AND attempts = 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(delivered, 3);
    // Counted right after each outcome is recorded.
    poll(
        "three deliveries counted",
        Duration::from_secs(10),
        || async {
            let counted = app
                .metric("podium_deliveries_total", &["email", "delivered"])
                .await;
            if counted == 3.0 {
                Ok(())
            } else {
                Err(counted)
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_sink_outage_is_retried_until_every_email_arrives_once() {
    let sink = MailSink::start(0);
    sink.toggle_outage();
    let app = app_with_mail(&sink, |_| {}).await;
    let users: Vec<String> = (0..20).map(|n| format!("learner{n}")).collect();
    for user in &users {
        set_email(&app, user, Some(&format!("{user}@example.org")), None).await;
    }
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    notify(&app, &users, "announcement", "Down and up").await;
    // Every delivery was tried against the closed port and is waiting.
    poll(
        "every email tried and refused",
        Duration::from_secs(30),
        || async {
            let (tried, pending): (i64, i64) = sqlx::query_as(
                "SELECT count(*) FILTER (WHERE attempts > 0 AND last_error IS NOT NULL),
                    count(*) FILTER (WHERE status = 'pending')
             FROM deliveries",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap();
            if tried == 20 && pending == 20 {
                Ok(())
            } else {
                Err((tried, pending))
            }
        },
    )
    .await;
    sink.toggle_outage();
    let mails = wait_for_mails(&sink, 20, Duration::from_secs(30)).await;
    no_delivery_pending(&app.pool, Duration::from_secs(10)).await;
    assert_eq!(mails.len(), 20);
    let mails = sink.mails();
    assert_eq!(mails.len(), 20, "{:?}", message_ids(&mails));
    let ids = message_ids(&mails);
    assert_eq!(ids.len(), 20, "every email once: {ids:?}");
    let to: HashSet<&str> = mails.iter().map(|m| m.recipients[0].as_str()).collect();
    assert_eq!(to.len(), 20);
    assert!(
        app.metric("podium_deliveries_total", &["email", "retried"])
            .await
            >= 20.0
    );
}

#[tokio::test]
async fn a_permanent_refusal_is_not_retried_and_a_temporary_one_is() {
    let sink = MailSink::start(0);
    // The busy address stays pending (an hour's wait after five tries).
    let app = app_with_mail(&sink, |s| {
        s.delivery.email_retry_schedule = "200ms,200ms,200ms,200ms,1h".parse().unwrap();
    })
    .await;
    set_email(&app, "gone", Some("reject-gone@example.org"), None).await;
    set_email(&app, "busy", Some("busy-busy@example.org"), None).await;
    notify(&app, &["gone", "busy"], "announcement", "Hello").await;
    let failed: (i32, Option<i32>, String) = poll(
        "the refused email failed",
        Duration::from_secs(30),
        || async {
            sqlx::query_as(
                "SELECT attempts, last_status_code, last_error FROM deliveries
             WHERE target = 'reject-gone@example.org' AND status = 'failed'",
            )
            .fetch_optional(&app.pool)
            .await
            .unwrap()
            .ok_or("still pending")
        },
    )
    .await;
    assert_eq!((failed.0, failed.1), (1, Some(550)), "{}", failed.2);
    // The 451 is tried again and again, on the schedule.
    poll(
        "the busy address retried",
        Duration::from_secs(30),
        || async {
            let row: Option<(i32, String, Option<i32>)> = sqlx::query_as(
                "SELECT attempts, status, last_status_code FROM deliveries
             WHERE target = 'busy-busy@example.org'",
            )
            .fetch_optional(&app.pool)
            .await
            .unwrap();
            let Some((attempts, status, code)) = row else {
                return Err((0, "not recorded yet".to_string(), None));
            };
            if attempts >= 3 && status == "pending" && code == Some(451) {
                Ok(())
            } else {
                Err((attempts, status, code))
            }
        },
    )
    .await;
    let attempts: i32 = sqlx::query_scalar(
        "SELECT attempts FROM deliveries WHERE target = 'reject-gone@example.org'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1, "a 5xx is never tried again");
    assert!(sink.mails().is_empty());

    // Operators see it among the failed deliveries, and may send it again.
    let failed: Value = app
        .get(
            "/v1/admin/deliveries?channel=email&status=failed",
            &app.admin(),
        )
        .await
        .json()
        .await
        .unwrap();
    let items = failed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{failed}");
    assert_eq!(items[0]["target"], "reject-gone@example.org");
    assert_eq!(items[0]["channel"], "email");
    assert_eq!(items[0]["last_status_code"], 550);
    let id = items[0]["id"].as_str().unwrap().to_string();
    let retried = app
        .post(
            &format!("/v1/admin/deliveries/{id}/retry"),
            &app.admin(),
            None,
        )
        .await;
    assert_eq!(retried.status(), StatusCode::ACCEPTED);
    poll(
        "the retried email refused again",
        Duration::from_secs(20),
        || async {
            let (status, attempts): (String, i32) =
                sqlx::query_as("SELECT status, attempts FROM deliveries WHERE id = $1::uuid")
                    .bind(&id)
                    .fetch_one(&app.pool)
                    .await
                    .unwrap();
            if status == "failed" && attempts == 1 {
                Ok(())
            } else {
                Err((status, attempts))
            }
        },
    )
    .await;
    let pending: Value = app
        .get("/v1/admin/deliveries?status=pending", &app.admin())
        .await
        .json()
        .await
        .unwrap();
    let busy = pending["items"][0]["id"].as_str().unwrap();
    assert_problem(
        app.post(
            &format!("/v1/admin/deliveries/{busy}/retry"),
            &app.admin(),
            None,
        )
        .await,
        StatusCode::CONFLICT,
    )
    .await;
    assert_problem(
        app.post(
            &format!("/v1/admin/deliveries/{}/retry", uuid::Uuid::new_v4()),
            &app.admin(),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    for bad in ["channel=sms", "status=lost", "limit=500"] {
        assert_problem(
            app.get(&format!("/v1/admin/deliveries?{bad}"), &app.admin())
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    assert_problem(
        app.get("/v1/admin/deliveries", &app.user("gone")).await,
        StatusCode::FORBIDDEN,
    )
    .await;
}

#[tokio::test]
async fn personal_emails_go_ahead_of_a_large_announcement() {
    // A slow relay: about 400 emails a second through four connections.
    let sink = MailSink::start(10);
    let app = app_with_mail(&sink, |s| s.delivery.delivery_concurrency = 4).await;
    const CROWD: usize = 2_000;
    addresses(&app.pool, "crowd", CROWD).await;
    set_email(&app, "vip", Some("vip@example.org"), None).await;
    let crowd: Vec<String> = (1..=CROWD).map(|n| format!("crowd{n}")).collect();
    for chunk in crowd.chunks(1_000) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        notify(&app, &chunk, "announcement", "Term starts").await;
    }
    wait_for_mails(&sink, 50, Duration::from_secs(60)).await;
    notify(&app, &["vip"], "personal_best", "A new best").await;
    let mails = poll(
        "the personal best emailed",
        Duration::from_secs(60),
        || async {
            let mails = sink.mails();
            if mails.iter().any(|m| m.recipients == ["vip@example.org"]) {
                Ok(mails)
            } else {
                Err(mails.len())
            }
        },
    )
    .await;
    let announcements_before = mails
        .iter()
        .filter(|m| m.recipients[0].starts_with("crowd"))
        .count();
    assert!(
        announcements_before < CROWD - 500,
        "the personal best waited behind {announcements_before} of {CROWD} announcements"
    );
}

// ---------------------------------------------------------------- webhooks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_filtered_retried_on_schedule_and_disabled_by_410() {
    let receiver = Receiver::start().await;
    let app = spawn_app_with(|s| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = unique_prefix();
        s.delivery.webhook_retry_schedule = "300ms,600ms".parse().unwrap();
        s.delivery.webhook_timeout_ms = 2_000;
        s.delivery.delivery_poll_ms = 50;
    })
    .await;
    let all = receiver.register(&app, "all", Behaviour::Ok, None).await;
    let tests_only = receiver
        .register(&app, "tests", Behaviour::Ok, Some(&["test.published"]))
        .await;
    let failing = receiver
        .register(&app, "failing", Behaviour::Fail, Some(&["test.published"]))
        .await;
    let flaky = receiver
        .register(
            &app,
            "flaky",
            Behaviour::FailFirst(1),
            Some(&["test.published"]),
        )
        .await;
    let gone = receiver
        .register(
            &app,
            "gone",
            Behaviour::Gone,
            Some(&["test.published", "attempt.submitted"]),
        )
        .await;
    let slow = receiver
        .register(
            &app,
            "slow",
            Behaviour::Slow(Duration::from_secs(5)),
            Some(&["test.published"]),
        )
        .await;

    let test_id = app.published_test().await;
    let token = app.user("alice");
    let attempt = app.started_attempt(&test_id, &token).await;
    let submitted: Value = app
        .submit(
            &attempt,
            &token,
            Some(json!({"answers": {"q1": 1, "q2": 0}})),
        )
        .await
        .json()
        .await
        .unwrap();

    // "all": the test, the attempt and alice's notifications, each signed.
    let received = poll(
        "every event at the catch-all endpoint",
        Duration::from_secs(30),
        || async {
            let got = receiver.received("all");
            let types: HashSet<String> = got
                .iter()
                .map(|r| r.body["type"].as_str().unwrap().to_string())
                .collect();
            if types.len() == 3 {
                Ok(got)
            } else {
                Err(types)
            }
        },
    )
    .await;
    let of = |kind: &str| {
        received
            .iter()
            .find(|r| r.body["type"] == kind)
            .unwrap()
            .body
            .clone()
    };
    let published = of("test.published");
    assert_eq!(published["data"]["id"], test_id.as_str());
    assert_eq!(published["data"]["max_score"], 10);
    assert!(published["timestamp"].is_string());
    let attempt_event = of("attempt.submitted");
    for field in [
        "attempt_id",
        "test_id",
        "score",
        "max_score",
        "correct",
        "duration_ms",
        "submitted_at",
    ] {
        assert_eq!(attempt_event["data"][field], submitted[field], "{field}");
    }
    assert_eq!(attempt_event["data"]["user_id"], "alice");
    let notification = of("notification.created");
    assert_eq!(notification["data"]["recipient"], "alice");
    assert!(notification["data"]["kind"].is_string());
    assert_eq!(receiver.forged(), 0);

    // Filters: only test.published reaches "tests".
    receiver
        .wait_for_count("tests", 1, Duration::from_secs(10))
        .await;
    // The failing endpoint: tried at once, then after 300 ms and 600 ms, then failed.
    let tries = poll(
        "three tries of the failing endpoint",
        Duration::from_secs(20),
        || async {
            let got = receiver.received("failing");
            if got.len() >= 3 {
                Ok(got)
            } else {
                Err(got.len())
            }
        },
    )
    .await;
    assert!(
        tries.iter().all(|t| t.id == tries[0].id),
        "webhook-id is stable across retries"
    );
    assert!(tries[1].at - tries[0].at >= Duration::from_millis(300));
    assert!(tries[2].at - tries[1].at >= Duration::from_millis(600));
    let log = newest_delivery(&app, &failing, "failed", Duration::from_secs(10)).await;
    let item = &log["items"][0];
    assert_eq!(item["attempts"], 3);
    assert_eq!(item["last_status_code"], 500);
    assert_eq!(item["event"], "test.published");
    assert!(item["next_attempt_at"].is_null());
    assert_eq!(
        receiver.received("failing").len(),
        3,
        "no try after the schedule"
    );

    // Flaky: the retry delivers.
    let flaky_log = newest_delivery(&app, &flaky, "delivered", Duration::from_secs(10)).await;
    assert_eq!(flaky_log["items"][0]["attempts"], 2);
    assert!(flaky_log["items"][0]["delivered_at"].is_string());

    // Slow: a receiver that takes longer than the timeout is retried.
    poll(
        "the slow endpoint timed out and was retried",
        Duration::from_secs(20),
        || async {
            let log: Value = app
                .get(&format!("/v1/webhooks/{slow}/deliveries"), &app.admin())
                .await
                .json()
                .await
                .unwrap();
            let item = &log["items"][0];
            let timed_out = item["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("in time"));
            if item["attempts"].as_u64() >= Some(2) && timed_out {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;

    // 410: disabled at once; the next event is not sent to it.
    poll(
        "the endpoint answering 410 disabled",
        Duration::from_secs(10),
        || async {
            let list: Value = app
                .get("/v1/webhooks", &app.admin())
                .await
                .json()
                .await
                .unwrap();
            let status = list["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["id"] == gone.as_str())
                .map(|e| e["status"].clone());
            if status == Some(json!("disabled")) {
                Ok(())
            } else {
                Err(list)
            }
        },
    )
    .await;
    // Sends in flight when the 410 came back may still arrive (the test and
    // the attempt it subscribed to); nothing after it is sent.
    let second = app.published_test().await;
    receiver
        .wait_for_test("all", &second, Duration::from_secs(20))
        .await;
    let gone_got = receiver.received("gone");
    assert!(
        gone_got.len() <= 2,
        "{} requests to a 410 endpoint",
        gone_got.len()
    );
    assert!(
        gone_got
            .iter()
            .all(|r| r.body["data"]["id"] != second.as_str()),
        "nothing is sent to a disabled endpoint"
    );
    let gone_log: Value = app
        .get(&format!("/v1/webhooks/{gone}/deliveries"), &app.admin())
        .await
        .json()
        .await
        .unwrap();
    // The delivery that met the 410, and any other pending then: failed.
    let items = gone_log["items"].as_array().unwrap();
    assert!(
        items.iter().any(|d| d["last_status_code"] == 410),
        "{gone_log}"
    );
    assert!(items.iter().all(|d| d["status"] == "failed"), "{gone_log}");
    let _ = (all, tests_only);
}

#[tokio::test]
async fn the_delivery_log_pages_newest_first_and_deleting_an_endpoint_stops_it() {
    let receiver = Receiver::start().await;
    let app = spawn_app_with(|s| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = unique_prefix();
    })
    .await;
    let (endpoint, mut published) = receiver.tests_delivered(&app, 5).await;
    let path = format!("/v1/webhooks/{endpoint}/deliveries");
    let first = app.get(&format!("{path}?limit=2"), &app.admin()).await;
    assert!(first.headers().get("link").is_some());
    let first: Value = first.json().await.unwrap();
    let mut seen: Vec<Value> = first["items"].as_array().unwrap().clone();
    let mut cursor = first["next_cursor"].as_str().map(String::from);
    while let Some(c) = cursor {
        let page: Value = app
            .get(&format!("{path}?limit=2&cursor={c}"), &app.admin())
            .await
            .json()
            .await
            .unwrap();
        seen.extend(page["items"].as_array().unwrap().iter().cloned());
        cursor = page["next_cursor"].as_str().map(String::from);
    }
    assert_eq!(seen.len(), 5);
    assert!(seen
        .iter()
        .all(|d| d["status"] == "delivered" && d["attempts"] == 1));
    let ids: HashSet<&str> = seen.iter().map(|d| d["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "every delivery once");
    // Newest first: the last test published is the first delivery listed.
    let mut listed_tests = Vec::new();
    for delivery in &seen {
        let test: String = sqlx::query_scalar(
            "SELECT payload -> 'data' ->> 'id' FROM deliveries WHERE id = $1::uuid",
        )
        .bind(delivery["id"].as_str().unwrap())
        .fetch_one(&app.pool)
        .await
        .unwrap();
        listed_tests.push(test);
    }
    published.reverse();
    assert_eq!(listed_tests, published);
    // A cursor of another endpoint's log is refused.
    let other = receiver.register(&app, "other", Behaviour::Ok, None).await;
    let c = first["next_cursor"].as_str().unwrap();
    assert_problem(
        app.get(
            &format!("/v1/webhooks/{other}/deliveries?cursor={c}"),
            &app.admin(),
        )
        .await,
        StatusCode::BAD_REQUEST,
    )
    .await;

    let delete = || async {
        app.request(
            Method::DELETE,
            &format!("/v1/webhooks/{endpoint}"),
            Some(&app.admin()),
        )
        .send()
        .await
        .unwrap()
    };
    assert_eq!(delete().await.status(), StatusCode::NO_CONTENT);
    assert_problem(app.get(&path, &app.admin()).await, StatusCode::NOT_FOUND).await;
    assert_problem(delete().await, StatusCode::NOT_FOUND).await;
    let last = app.published_test().await;
    receiver
        .wait_for_test("other", &last, Duration::from_secs(20))
        .await;
    assert_eq!(
        receiver.received("tests").len(),
        5,
        "a deleted endpoint gets nothing"
    );
}

// ---------------------------------------------------------------- the API

#[tokio::test]
async fn settings_and_endpoints_refuse_bad_input_and_change_nothing() {
    let app = spawn_app_with(|_| {}).await;
    let alice = app.user("alice");
    let defaults: Value = app
        .get("/v1/me/delivery", &alice)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        defaults,
        json!({"email": null, "email_kinds": ["personal_best", "rank_overtaken", "period_podium", "announcement"]})
    );
    let put = |body: Value| {
        app.request(Method::PUT, "/v1/me/delivery", Some(&alice))
            .json(&body)
            .send()
    };
    let stored: Value = put(
        json!({"email": "alice@example.org", "email_kinds": ["attempt_graded", "attempt_graded"]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        stored,
        json!({"email": "alice@example.org", "email_kinds": ["attempt_graded"]})
    );
    for bad in [
        json!({"email": "not an address"}),
        json!({"email": "a@"}),
        json!({"email": format!("{}@example.org", "a".repeat(300))}),
        json!({"email": "a@example.org", "email_kinds": ["spam"]}),
    ] {
        let problem = assert_problem(
            put(bad.clone()).await.unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
        assert!(
            problem["errors"].as_array().is_some_and(|e| !e.is_empty()),
            "{bad}: {problem}"
        );
    }
    let malformed = app
        .request(Method::PUT, "/v1/me/delivery", Some(&alice))
        .header("content-type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_problem(malformed, StatusCode::BAD_REQUEST).await;
    let after: Value = app
        .get("/v1/me/delivery", &alice)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(after, stored, "refused settings change nothing");
    // Each user sees their own.
    let bob: Value = app
        .get("/v1/me/delivery", &app.user("bob"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bob["email"], Value::Null);

    // Webhooks are the admins'.
    let body = json!({"url": "https://hooks.example.org/podium"});
    assert_problem(
        app.post("/v1/webhooks", &alice, Some(body.clone())).await,
        StatusCode::FORBIDDEN,
    )
    .await;
    assert_problem(app.get("/v1/webhooks", &alice).await, StatusCode::FORBIDDEN).await;
    for bad in [
        json!({"url": "ftp://example.org/x"}),
        json!({"url": "not a url"}),
        json!({"url": "https://example.org/x", "events": []}),
        json!({"url": "https://example.org/x", "events": ["attempt.deleted"]}),
    ] {
        assert_problem(
            app.post("/v1/webhooks", &app.admin(), Some(bad)).await,
            StatusCode::UNPROCESSABLE_ENTITY,
        )
        .await;
    }
    let listed: Value = app
        .get("/v1/webhooks", &app.admin())
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["items"],
        json!([]),
        "refused endpoints are not registered"
    );
    let created = app.post("/v1/webhooks", &app.admin(), Some(body)).await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    assert_eq!(
        created["events"],
        json!([
            "attempt.submitted",
            "notification.created",
            "test.published"
        ])
    );
    let listed: Value = app
        .get("/v1/webhooks", &app.admin())
        .await
        .json()
        .await
        .unwrap();
    let item = &listed["items"][0];
    assert_eq!(
        (item["id"].clone(), item["status"].clone()),
        (created["id"].clone(), json!("active"))
    );
    assert!(
        item.get("secret").is_none(),
        "the secret is shown only once"
    );
    assert_problem(
        app.get("/v1/webhooks/not-a-uuid/deliveries", &app.admin())
            .await,
        StatusCode::BAD_REQUEST,
    )
    .await;
    assert_problem(
        app.get(
            &format!("/v1/webhooks/{}/deliveries", uuid::Uuid::new_v4()),
            &app.admin(),
        )
        .await,
        StatusCode::NOT_FOUND,
    )
    .await;
    assert_problem(
        app.get(
            &format!(
                "/v1/webhooks/{}/deliveries?limit=0",
                created["id"].as_str().unwrap()
            ),
            &app.admin(),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
    )
    .await;
}

// ------------------------------------------------------------- embedded

#[tokio::test]
async fn the_embedded_mode_delivers_with_the_same_code() {
    let sink = MailSink::start(0);
    let receiver = Receiver::start().await;
    let smtp = sink.url();
    let app = spawn_embedded_with(move |s| {
        s.delivery.smtp_url = Some(smtp.into());
        s.delivery.delivery_poll_ms = 50;
    })
    .await;
    receiver.register(&app, "all", Behaviour::Ok, None).await;
    set_email(
        &app,
        "alice",
        Some("alice@example.org"),
        Some(&["attempt_graded"]),
    )
    .await;
    let test_id = app.published_test().await;
    let token = app.user("alice");
    let attempt = app.started_attempt(&test_id, &token).await;
    assert_eq!(
        app.submit(&attempt, &token, None).await.status(),
        StatusCode::OK
    );
    let mails = wait_for_mails(&sink, 1, Duration::from_secs(20)).await;
    assert_eq!(mails[0].recipients, ["alice@example.org"]);
    assert_eq!(mails[0].headers["x-podium-kind"], "attempt_graded");
    poll("the webhooks, signed", Duration::from_secs(20), || async {
        let types: HashSet<String> = receiver
            .received("all")
            .iter()
            .map(|r| r.body["type"].as_str().unwrap().to_string())
            .collect();
        if types.len() == 3 {
            Ok(())
        } else {
            Err(types)
        }
    })
    .await;
    assert_eq!(receiver.forged(), 0);
}

// -------------------------------------------------- several processes

/// kill -9 of one of two instances while they send: every email still
/// arrives; at most the sends in flight at the kill arrive twice (the SMTP
/// server accepted them, the outcome was not recorded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_loses_no_email() {
    one_instance_fails_mid_send(Fault::Kill).await;
}

/// SIGSTOP of one of two instances while they send (a frozen VM, a long
/// pause): the other sends everything within the lease; when the paused one
/// wakes, its late outcomes are fenced and at most its sends in flight
/// arrive twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_instance_holds_up_no_email() {
    one_instance_fails_mid_send(Fault::Pause).await;
}

#[derive(Clone, Copy)]
enum Fault {
    Kill,
    Pause,
}

async fn one_instance_fails_mid_send(fault: Fault) {
    const USERS: usize = 300;
    const CONCURRENCY: usize = 4;
    let sink = MailSink::start(20);
    let db = TestDb::new().await;
    let prefix = unique_prefix();
    let concurrency = CONCURRENCY.to_string();
    let smtp = sink.url();
    let env = [
        ("NATS_URL", nats_url()),
        ("PODIUM_NATS_PREFIX", prefix.clone()),
        ("PODIUM_SMTP_URL", smtp),
        ("PODIUM_DELIVERY_CONCURRENCY", concurrency),
        ("PODIUM_DELIVERY_LEASE_MS", "2000".to_string()),
        ("PODIUM_WEBHOOK_TIMEOUT_MS", "1000".to_string()),
        ("PODIUM_DELIVERY_POLL_MS", "100".to_string()),
        ("PODIUM_LEASE_TTL_MS", "3000".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (mut first, first_address) = podium_process(&db.url(), &env);
    let (_second, _) = podium_process(&db.url(), &env);
    addresses(&db.pool, "u", USERS).await;
    let keys = podium::auth::JwtKeys::new(SECRET).unwrap();
    let admin = keys.issue(
        &podium_domain::UserId::parse("ops").unwrap(),
        Role::Admin,
        Duration::from_secs(600),
    );
    let users: Vec<String> = (1..=USERS).map(|n| format!("u{n}")).collect();
    let sent = reqwest::Client::new()
        .post(format!("{first_address}/v1/notifications"))
        .bearer_auth(&admin)
        .json(&json!({"user_ids": users, "title": "Kill test", "body": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::ACCEPTED);
    wait_for_mails(&sink, 30, Duration::from_secs(60)).await;
    let pid = first.0.id().to_string();
    match fault {
        Fault::Kill => {
            first.0.kill().unwrap();
            let _ = first.0.wait();
        }
        Fault::Pause => {
            assert!(Command::new("kill")
                .args(["-STOP", &pid])
                .status()
                .unwrap()
                .success());
        }
    }
    poll("every user's email", Duration::from_secs(90), || async {
        let got: HashSet<String> = sink
            .mails()
            .into_iter()
            .map(|m| m.recipients[0].clone())
            .collect();
        if got.len() == USERS {
            Ok(())
        } else {
            Err(got.len())
        }
    })
    .await;
    no_delivery_pending(&db.pool, Duration::from_secs(30)).await;
    if let Fault::Pause = fault {
        assert!(Command::new("kill")
            .args(["-CONT", &pid])
            .status()
            .unwrap()
            .success());
        // Awake and answering: what it held was sent by the other instance.
        poll(
            "the paused instance awake",
            Duration::from_secs(30),
            || async {
                match reqwest::get(format!("{first_address}/healthz")).await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await;
        no_delivery_pending(&db.pool, Duration::from_secs(30)).await;
    }
    let mails = sink.mails();
    let twice = mails.len() - USERS;
    assert!(
        twice <= CONCURRENCY,
        "{twice} emails arrived twice; at most the {CONCURRENCY} in flight may"
    );
    delete_streams(nats_url(), prefix);
}

// ------------------------------------------------------------- the stores

/// The Postgres and the in-memory store follow the same rules: a delivery is
/// recorded once, taken personal first, its outcome recorded only under the
/// claim that took it, given back when its lease lapses, purged once done;
/// a 410 disables the endpoint and fails what waits for it; deleting an
/// endpoint deletes its deliveries; a failed delivery may be sent again.
#[tokio::test]
async fn both_stores_keep_the_same_rules() {
    use podium::delivery::memory::MemoryDeliveries;
    use podium::delivery::postgres::PgDeliveries;
    use podium::delivery::{
        take_due, Channel, DeliveryFilter, DeliveryStore, Endpoint, Finish, Planned, Retry,
    };

    let db = TestDb::new().await;
    sqlx::migrate!("./migrations").run(&db.pool).await.unwrap();
    let stores: [(&str, Arc<dyn DeliveryStore>); 2] = [
        (
            "postgres",
            Arc::new(PgDeliveries {
                pool: db.pool.clone(),
            }),
        ),
        ("memory", Arc::new(MemoryDeliveries::default())),
    ];
    let email = |n: u128, priority: i16| Planned {
        id: uuid::Uuid::from_u128(n),
        seq: n as u64,
        channel: Channel::Email,
        target: format!("u{n}@example.org"),
        endpoint_id: None,
        event: "announcement".into(),
        message_id: format!("msg_{n}"),
        priority,
        payload: json!({"n": n}),
    };
    let finish = |status: &'static str, code: u16, disable: Option<uuid::Uuid>| Finish {
        status,
        retry_in: None,
        status_code: Some(code),
        error: None,
        disable,
    };
    let delivered = finish("delivered", 250, None);
    let lease = Duration::from_millis(300);
    for (name, store) in stores {
        let store = &*store;
        let batch = [email(1, 1), email(2, 1), email(3, 0)];
        assert_eq!(store.record(&batch).await.unwrap(), 3, "{name}");
        assert_eq!(
            store.record(&batch).await.unwrap(),
            0,
            "{name}: recorded once"
        );
        let first = uuid::Uuid::new_v4();
        let taken = take_due(store, Channel::Email, first, lease, 2, &[])
            .await
            .unwrap();
        assert_eq!(taken.len(), 2, "{name}");
        assert_eq!(
            taken[0].id,
            uuid::Uuid::from_u128(3),
            "{name}: personal first"
        );
        assert!(take_due(store, Channel::Webhook, first, lease, 10, &[])
            .await
            .unwrap()
            .is_empty());
        // Taken deliveries are nobody else's until their lease lapses.
        let other = uuid::Uuid::new_v4();
        let long = Duration::from_secs(60);
        let rest = take_due(store, Channel::Email, other, long, 10, &[])
            .await
            .unwrap();
        assert_eq!(rest.len(), 1, "{name}");
        assert!(store.finish(taken[0].id, first, &delivered).await.unwrap());
        assert!(
            !store.finish(taken[0].id, first, &delivered).await.unwrap(),
            "{name}: recorded once"
        );
        // The second one's taker is gone: after the lease another takes it,
        // and the first taker's late outcome is not recorded.
        let lapsed = taken[1].id;
        let again = poll(
            "the lapsed delivery taken again",
            Duration::from_secs(10),
            || async {
                let got = take_due(store, Channel::Email, other, long, 10, &[])
                    .await
                    .unwrap();
                if got.len() == 1 {
                    Ok(got)
                } else {
                    Err(got.len())
                }
            },
        )
        .await;
        assert_eq!(again[0].id, lapsed, "{name}");
        assert!(
            !store.finish(lapsed, first, &delivered).await.unwrap(),
            "{name}: fenced"
        );
        assert!(
            store.finish(lapsed, other, &delivered).await.unwrap(),
            "{name}"
        );
        // A permanent failure may be sent again, once it has failed.
        let refused = rest[0].id;
        assert_eq!(
            store.retry(refused).await.unwrap(),
            Retry::NotFailed,
            "{name}"
        );
        assert!(store
            .finish(refused, other, &finish("failed", 550, None))
            .await
            .unwrap());
        assert_eq!(
            store.retry(refused).await.unwrap(),
            Retry::Retried,
            "{name}"
        );
        assert_eq!(
            store.retry(uuid::Uuid::new_v4()).await.unwrap(),
            Retry::NoSuchDelivery,
            "{name}"
        );
        let backlog = store.backlog().await.unwrap();
        assert_eq!(backlog[&Channel::Email].pending, 1, "{name}");
        // Done ones are purged; the pending one stays.
        let future = chrono::Utc::now() + chrono::Duration::seconds(5);
        assert_eq!(store.purge(future).await.unwrap(), 2, "{name}");
        let left = store
            .deliveries(&DeliveryFilter::default(), 10, None)
            .await
            .unwrap();
        assert_eq!(left.len(), 1, "{name}");
        assert_eq!(left[0].id, refused, "{name}");

        // Webhooks: a 410 disables the endpoint and fails what waits for it.
        let endpoint = Endpoint {
            id: uuid::Uuid::new_v4(),
            url: "http://127.0.0.1:9/hook".into(),
            events: Vec::new(),
            secret: podium::delivery::new_secret(),
            status: "active".into(),
            created_at: chrono::Utc::now(),
        };
        store.create_endpoint(&endpoint).await.unwrap();
        let hook = |n: u128| Planned {
            channel: Channel::Webhook,
            target: endpoint.id.to_string(),
            endpoint_id: Some(endpoint.id),
            ..email(n, 0)
        };
        store.record(&[hook(10), hook(11), hook(12)]).await.unwrap();
        let claim = uuid::Uuid::new_v4();
        // At its limit, the endpoint's deliveries are left alone.
        let skipped = take_due(store, Channel::Webhook, claim, long, 10, &[endpoint.id])
            .await
            .unwrap();
        assert!(skipped.is_empty(), "{name}");
        let hooks = take_due(store, Channel::Webhook, claim, long, 1, &[])
            .await
            .unwrap();
        assert_eq!(
            hooks[0].endpoint.as_ref().map(|e| e.id),
            Some(endpoint.id),
            "{name}"
        );
        let gone = finish("failed", 410, Some(endpoint.id));
        assert!(
            store.finish(hooks[0].id, claim, &gone).await.unwrap(),
            "{name}"
        );
        let endpoints = store.endpoints().await.unwrap();
        assert!(!endpoints[0].active(), "{name}: disabled");
        let filter = DeliveryFilter {
            endpoint: Some(endpoint.id),
            ..DeliveryFilter::default()
        };
        let log = store.deliveries(&filter, 10, None).await.unwrap();
        assert_eq!(log.len(), 3, "{name}");
        assert!(log.iter().all(|d| d.status == "failed"), "{name}: {log:?}");
        assert_eq!(
            store.retry(hooks[0].id).await.unwrap(),
            Retry::EndpointDisabled,
            "{name}"
        );
        // Deleting the endpoint deletes its deliveries.
        assert!(store.delete_endpoint(endpoint.id).await.unwrap());
        assert!(
            store
                .deliveries(&filter, 10, None)
                .await
                .unwrap()
                .is_empty(),
            "{name}"
        );
        assert_eq!(
            store.retry(hooks[0].id).await.unwrap(),
            Retry::NoSuchDelivery,
            "{name}"
        );
        // The intake's mark only rises.
        assert_eq!(
            store.intake_mark(Channel::Email).await.unwrap(),
            None,
            "{name}"
        );
        store.note_intake(Channel::Email, 7).await.unwrap();
        store.note_intake(Channel::Email, 5).await.unwrap();
        assert_eq!(
            store.intake_mark(Channel::Email).await.unwrap(),
            Some(7),
            "{name}"
        );
    }
}

/// The events stream deleted (by hand, or by its limits) and made again by
/// the relay, which fills it from the log: delivery goes on after the last
/// event it took in and sends nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_events_stream_sends_nothing_twice() {
    let receiver = Receiver::start().await;
    let prefix = unique_prefix();
    let stream_prefix = prefix.clone();
    let app = spawn_app_with(move |s| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = prefix;
        s.delivery.delivery_poll_ms = 50;
    })
    .await;
    let (_, mut published) = receiver.tests_delivered(&app, 3).await;
    // Deliveries done and purged, as after their retention: only the
    // intake's mark remembers them.
    sqlx::query("DELETE FROM deliveries")
        .execute(&app.pool)
        .await
        .unwrap();
    let bus = podium_nats::EventBus::connect(&nats_url(), &stream_prefix)
        .await
        .unwrap();
    bus.jetstream()
        .delete_stream(bus.subjects().events_stream())
        .await
        .unwrap();
    // The next event makes the relay notice, make the stream again and fill
    // it from the log.
    published.push(app.published_test().await);
    let last = published.last().unwrap().clone();
    receiver
        .wait_for_test("tests", &last, Duration::from_secs(60))
        .await;
    // One more, so anything sent twice has had the time to arrive.
    published.push(app.published_test().await);
    let fifth = published.last().unwrap().clone();
    receiver
        .wait_for_test("tests", &fifth, Duration::from_secs(30))
        .await;
    let got: Vec<String> = receiver
        .received("tests")
        .iter()
        .map(|r| r.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(got.len(), 5, "each test once: {got:?}");
    assert_eq!(sorted.len(), 5);
}

/// With no active webhook endpoint, the webhook intakes of two instances
/// hold no consumer on the events stream: NATS hands them none of the log's
/// events. An endpoint registered later gets each event after it once
/// (both instances then make the consumer again, racing), none of those
/// before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_endpoints_webhooks_take_in_nothing_and_a_later_endpoint_gets_what_follows() {
    let receiver = Receiver::start().await;
    let prefix = unique_prefix();
    let stream_prefix = prefix.clone();
    let settings = move |s: &mut Settings| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = prefix;
        s.delivery.delivery_poll_ms = 50;
    };
    let app = spawn_app_with(settings.clone()).await;
    let second = app.another_instance(settings).await;
    let before = [app.published_test().await, second.published_test().await];
    webhook_mark_past_every_event(&app.pool).await;
    let bus = podium_nats::EventBus::connect(&nats_url(), &stream_prefix)
        .await
        .unwrap();
    let stream = bus.events_stream().await.unwrap();
    let consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(
            &podium::delivery::intake::consumer_name(podium::delivery::Channel::Webhook),
        )
        .await;
    if let Ok(mut consumer) = consumer {
        let info = consumer.info().await.unwrap();
        assert_eq!(
            info.delivered.stream_sequence, 0,
            "no event handed to the webhook intake: {info:?}"
        );
    }

    receiver
        .register(&app, "tests", Behaviour::Ok, Some(&["test.published"]))
        .await;
    let mut after = Vec::new();
    for _ in 0..2 {
        after.push(app.published_test().await);
        after.push(second.published_test().await);
    }
    for test in &after {
        receiver
            .wait_for_test("tests", test, Duration::from_secs(30))
            .await;
    }
    no_delivery_pending(&app.pool, Duration::from_secs(10)).await;
    let got: Vec<String> = receiver
        .received("tests")
        .iter()
        .map(|r| r.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    for test in &before {
        assert!(
            !got.contains(test),
            "{test}, from before the endpoint: {got:?}"
        );
    }
    assert_eq!(
        got.len(),
        after.len(),
        "each test after the endpoint once: {got:?}"
    );
}

/// A `podium serve` process beside an in-process instance, both starting
/// with no webhook endpoint (so neither holds the webhook consumer), then an
/// endpoint registered and the process paused (SIGSTOP) in the middle of
/// the tests being published: every test reaches the endpoint through the
/// other instance (what the paused one may hold comes back after
/// JetStream's ack wait), none from before it; after SIGCONT at most the
/// sends in flight arrive twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_endpoint_made_while_idle_gets_everything_though_an_instance_is_paused() {
    const CONCURRENCY: usize = 4;
    let receiver = Receiver::start().await;
    let prefix = unique_prefix();
    let app_prefix = prefix.clone();
    let app = spawn_app_with(move |s| {
        s.nats.nats_url = Some(nats_url());
        s.nats.nats_prefix = app_prefix;
        s.delivery.delivery_poll_ms = 100;
        s.delivery.delivery_lease_ms = 2_000;
        s.delivery.webhook_timeout_ms = 1_000;
        s.delivery.delivery_concurrency = CONCURRENCY;
    })
    .await;
    let concurrency = CONCURRENCY.to_string();
    let env = [
        ("NATS_URL", nats_url()),
        ("PODIUM_NATS_PREFIX", prefix.clone()),
        ("PODIUM_DELIVERY_CONCURRENCY", concurrency),
        ("PODIUM_DELIVERY_LEASE_MS", "2000".to_string()),
        ("PODIUM_WEBHOOK_TIMEOUT_MS", "1000".to_string()),
        ("PODIUM_DELIVERY_POLL_MS", "100".to_string()),
        ("PODIUM_LEASE_TTL_MS", "3000".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (paused, address) = podium_process(&app.db.url(), &env);
    let before = app.published_test().await;
    webhook_mark_past_every_event(&app.pool).await;
    receiver
        .register(&app, "tests", Behaviour::Ok, Some(&["test.published"]))
        .await;
    let mut published = Vec::new();
    for _ in 0..5 {
        published.push(app.published_test().await);
    }
    let pid = paused.0.id().to_string();
    let signal = |signal: &str| {
        assert!(Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    for _ in 0..5 {
        published.push(app.published_test().await);
    }
    for test in &published {
        receiver
            .wait_for_test("tests", test, Duration::from_secs(90))
            .await;
    }
    signal("-CONT");
    poll(
        "the paused instance awake",
        Duration::from_secs(30),
        || async {
            match reqwest::get(format!("{address}/healthz")).await {
                Ok(r) if r.status().is_success() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    no_delivery_pending(&app.pool, Duration::from_secs(30)).await;
    let got: Vec<String> = receiver
        .received("tests")
        .iter()
        .map(|r| r.body["data"]["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!got.contains(&before), "from before the endpoint: {got:?}");
    let twice = got.len() - published.len();
    assert!(
        twice <= CONCURRENCY,
        "{twice} tests arrived twice; at most the {CONCURRENCY} in flight may: {got:?}"
    );
    delete_streams(nats_url(), prefix);
}

/// Waits until the events written so far are published and marked taken in
/// by a webhook intake's look that found no endpoint.
async fn webhook_mark_past_every_event(pool: &sqlx::PgPool) {
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap();
    poll(
        "the webhook intake's mark past the events so far",
        Duration::from_secs(30),
        || async {
            let mark: Option<i64> =
                sqlx::query_scalar("SELECT seq FROM delivery_intake WHERE channel = 'webhook'")
                    .fetch_optional(pool)
                    .await
                    .unwrap();
            match mark {
                Some(mark) if mark >= events => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;
}
