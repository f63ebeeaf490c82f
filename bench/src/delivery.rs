//! Delivery channels: how many emails a second one instance sends to a local
//! SMTP sink (`scripts/smtp-sink`) and webhooks to a local receiver (hyper,
//! in this process); the time from a notification to its email at 90% of
//! that rate; and how long a personal best waits behind an announcement to
//! 10,000 users.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use podium::auth::Role;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

use crate::load::ms;
use crate::report::Report;
use crate::scenarios::Api;
use crate::server::{Options, Server};
use crate::support::ScratchDb;

/// Sends in flight per instance (the default).
const CONCURRENCY: usize = 16;

pub struct Sizes {
    /// Deliveries per throughput run.
    pub backlog: usize,
    /// Recipients of the large announcement.
    pub crowd: usize,
    /// How long notifications are sent at 90% of the email rate.
    pub secs: Duration,
}

/// `scripts/smtp-sink` on a free port, writing into a folder of its own.
struct Sink {
    _child: tokio::process::Child,
    port: u16,
    dir: PathBuf,
}

impl Sink {
    async fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("podium-bench-sink-{}", uuid::Uuid::new_v4()));
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/smtp-sink");
        let mut child = tokio::process::Command::new(script)
            .args(["--port", "0", "--dir"])
            .arg(&dir)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let line = tokio::io::BufReader::new(stdout)
            .lines()
            .next_line()
            .await?
            .unwrap_or_default();
        let port = line
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("the sink said {line:?}"))?;
        Ok(Self {
            _child: child,
            port,
            dir,
        })
    }

    /// When each recipient's latest email arrived (Unix seconds).
    fn arrivals(&self) -> HashMap<String, f64> {
        let mut arrivals = HashMap::new();
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return arrivals;
        };
        for path in entries.filter_map(Result::ok).map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "eml") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let header = |name: &str| {
                text.lines()
                    .take(4)
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            if let (Some(at), Some(to)) = (header("X-Sink-Received:"), header("X-Sink-Rcpt:")) {
                arrivals.insert(to, at.parse().unwrap_or_default());
            }
        }
        arrivals
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A webhook receiver that answers 204 at once and counts.
async fn receiver() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_request| {
                    count.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(204)
                                .body(http_body_util::Empty::<bytes::Bytes>::new())
                                .expect("a response"),
                        )
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    Ok((url, received))
}

fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Records `n` pending deliveries straight into the table (as intake would),
/// then waits until every one is delivered; returns deliveries per second.
async fn drain(
    db: &ScratchDb,
    n: usize,
    channel: &str,
    endpoint: Option<uuid::Uuid>,
) -> anyhow::Result<f64> {
    let payload = match channel {
        "email" => {
            json!({"kind": "announcement", "title": "Bench", "body": "A benchmark email.", "link": null})
        }
        _ => {
            json!({"type": "test.published", "timestamp": chrono::Utc::now(), "data": {"title": "Bench"}})
        }
    };
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO deliveries (id, channel, target, endpoint_id, event, message_id, priority, payload, next_attempt_at)
         SELECT gen_random_uuid(), $1,
                CASE WHEN $1 = 'email' THEN 'drain' || g || '@example.org' ELSE $2::text END,
                $2, 'bench', 'msg_' || g, 1, $3, now()
         FROM generate_series(1, $4) g",
    )
    .bind(channel)
    .bind(endpoint)
    .bind(&payload)
    .bind(n as i64)
    .execute(&db.pool)
    .await?;
    loop {
        let pending: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM deliveries WHERE status = 'pending' AND channel = $1",
        )
        .bind(channel)
        .fetch_one(&db.pool)
        .await?;
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "{pending} {channel} deliveries still pending after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM deliveries WHERE status = 'failed' AND channel = $1",
    )
    .bind(channel)
    .fetch_one(&db.pool)
    .await?;
    anyhow::ensure!(failed == 0, "{failed} {channel} deliveries failed");
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Gives `users` an address and the announcement and personal-best kinds.
async fn addresses(db: &ScratchDb, prefix: &str, n: usize) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO delivery_settings (user_id, email, email_kinds)
         SELECT $1 || g, $1 || g || '@example.org', ARRAY['announcement', 'personal_best']
         FROM generate_series(1, $2) g",
    )
    .bind(prefix)
    .bind(n as i64)
    .execute(&db.pool)
    .await?;
    Ok(())
}

async fn notify(api: &Api, admin: &str, users: &[String], kind: &str) -> anyhow::Result<()> {
    api.client
        .post(format!("{}/v1/notifications", api.base))
        .bearer_auth(admin)
        .json(&json!({"user_ids": users, "kind": kind, "title": "Bench", "body": "Hello"}))
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

pub async fn scenario(
    db: &ScratchDb,
    nats: &str,
    prefix: &str,
    sizes: &Sizes,
    report: &mut Report,
) -> anyhow::Result<()> {
    let sink = Sink::start().await?;
    let (hook, received) = receiver().await?;
    let smtp = format!("smtp://127.0.0.1:{}", sink.port);
    let server = Server::start_with(
        Options::full(&db.url, nats, prefix),
        &[
            ("PODIUM_SMTP_URL", smtp),
            ("PODIUM_DELIVERY_CONCURRENCY", CONCURRENCY.to_string()),
        ],
    )
    .await?;
    let api = Api::new(&server.address)?;
    let admin = api.token("bench-admin", Role::Admin);
    let result = async {
        eprintln!("delivery: {} emails…", sizes.backlog);
        let email_rate = drain(db, sizes.backlog, "email", None).await?;
        report.row(
            &format!("delivery: {} emails to a local SMTP sink", sizes.backlog),
            format!("{email_rate:.0} emails/s ({CONCURRENCY} sends in flight, one instance)"),
            "—".into(),
            None,
            "measured",
            None,
        );

        eprintln!("delivery: {} webhooks…", sizes.backlog);
        let created: Value = api
            .client
            .post(format!("{}/v1/webhooks", api.base))
            .bearer_auth(&admin)
            .json(&json!({"url": hook, "events": ["test.published"]}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let endpoint: uuid::Uuid = created["id"].as_str().unwrap_or_default().parse()?;
        let before = received.load(Ordering::Relaxed);
        let webhook_rate = drain(db, sizes.backlog, "webhook", Some(endpoint)).await?;
        anyhow::ensure!(
            received.load(Ordering::Relaxed) - before >= sizes.backlog as u64,
            "the receiver got fewer webhooks than were delivered"
        );
        report.row(
            &format!("delivery: {} webhooks to a local receiver", sizes.backlog),
            format!("{webhook_rate:.0} webhooks/s (signed; {CONCURRENCY} in flight, one instance)"),
            "—".into(),
            None,
            "measured",
            None,
        );

        // Notifications at half and 90% of the email rate.
        for (share, label) in [(0.5, "half"), (0.9, "90%")] {
            let rate = (email_rate * share).max(10.0);
            let tag = format!("lat{}-", (share * 100.0) as u32);
            let latency = to_email(db, &api, &admin, &sink, rate, &tag, sizes.secs).await?;
            report.row(
                &format!(
                    "delivery: notification to email at {rate:.0} notifications/s ({label} of the email rate)"
                ),
                format!(
                    "p50 {:.0} / p99 {:.0} ms, max {:.0} ms",
                    ms(&latency, 0.5),
                    ms(&latency, 0.99),
                    ms(&latency, 1.0)
                ),
                "—".into(),
                None,
                "p99 reported",
                None,
            );
            report
                .latencies
                .push((format!("notification to email at {label}"), latency));
        }

        // A personal best behind an announcement to the crowd.
        eprintln!("delivery: a personal best behind an announcement to {}…", sizes.crowd);
        addresses(db, "crowd", sizes.crowd).await?;
        addresses(db, "vip", 1).await?;
        let crowd: Vec<String> = (1..=sizes.crowd).map(|n| format!("crowd{n}")).collect();
        // Every announcement is in the log (its POSTs answered, in parallel)
        // before the personal best: it is behind all of them at intake.
        let mut posts = Vec::new();
        for chunk in crowd.chunks(1_000) {
            let (api, admin, chunk) = (api.clone(), admin.clone(), chunk.to_vec());
            posts.push(tokio::spawn(async move {
                notify(&api, &admin, &chunk, "announcement").await
            }));
        }
        for post in posts {
            post.await??;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let sent = now_secs();
        notify(&api, &admin, &["vip1".to_string()], "personal_best").await?;
        let (waited, behind) = loop {
            let arrivals = sink.arrivals();
            if let Some(at) = arrivals.get("vip1@example.org") {
                let done = arrivals.keys().filter(|k| k.starts_with("crowd")).count();
                break (at - sent, sizes.crowd - done);
            }
            anyhow::ensure!(Instant::now() < deadline, "the personal best never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        report.row(
            &format!("delivery: a personal best during an announcement to {} users", sizes.crowd),
            format!(
                "emailed {:.0} ms after it was sent, ahead of {behind} announcement emails still queued",
                waited * 1000.0
            ),
            "—".into(),
            None,
            "≤ a few seconds",
            Some(waited <= 3.0),
        );
        anyhow::Ok(())
    }
    .await;
    server.stop().await;
    result
}

/// Sends notifications at `rate` a second for `secs`, ten recipients a
/// request, and measures the time from each request to its email's arrival
/// at the sink.
async fn to_email(
    db: &ScratchDb,
    api: &Api,
    admin: &str,
    sink: &Sink,
    rate: f64,
    tag: &str,
    secs: Duration,
) -> anyhow::Result<Histogram<u64>> {
    let per_request = 10usize;
    let requests = (rate / per_request as f64 * secs.as_secs_f64()).ceil() as usize;
    addresses(db, tag, requests * per_request).await?;
    eprintln!("delivery: notifications at {rate:.0}/s for {secs:?}…");
    let interval = Duration::from_secs_f64(per_request as f64 / rate);
    let mut sent_at: HashMap<String, f64> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut posts = Vec::with_capacity(requests);
    for r in 0..requests {
        ticker.tick().await;
        let users: Vec<String> = (1..=per_request)
            .map(|i| format!("{tag}{}", r * per_request + i))
            .collect();
        let at = now_secs();
        for user in &users {
            sent_at.insert(format!("{user}@example.org"), at);
        }
        let (api, admin) = (api.clone(), admin.to_string());
        posts.push(tokio::spawn(async move {
            notify(&api, &admin, &users, "personal_best").await
        }));
    }
    for post in posts {
        post.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let arrivals = loop {
        let arrivals = sink.arrivals();
        let arrived = sent_at.keys().filter(|k| arrivals.contains_key(*k)).count();
        if arrived == sent_at.len() || Instant::now() > deadline {
            break arrivals;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut latency = Histogram::<u64>::new(3)?;
    for (to, sent) in &sent_at {
        if let Some(at) = arrivals.get(to) {
            latency.record(((at - sent).max(0.0) * 1e6) as u64)?;
        }
    }
    anyhow::ensure!(
        latency.len() == sent_at.len() as u64,
        "{} of {} emails arrived",
        latency.len(),
        sent_at.len()
    );
    Ok(latency)
}
