//! The scenarios, driven over HTTP and SSE like real clients.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use podium::auth::{JwtKeys, Role};
use podium_domain::UserId;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::load::{histogram, record};
use crate::server::SECRET;

/// Questions per bench test; question `i` is worth `i` points (max 210).
const QUESTIONS: u32 = 20;

/// A client of one server.
#[derive(Clone)]
pub struct Api {
    pub client: reqwest::Client,
    pub base: String,
    keys: Arc<JwtKeys>,
}

impl Api {
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(60))
                .build()?,
            base: base.to_string(),
            keys: Arc::new(JwtKeys::new(SECRET)?),
        })
    }

    pub fn token(&self, user: &str, role: Role) -> String {
        let user = UserId::parse(user).expect("bench user ids are valid");
        self.keys.issue(&user, role, Duration::from_secs(4 * 3600))
    }

    /// `GET path` as `token`, as JSON.
    pub async fn get_json(&self, path: &str, token: &str) -> anyhow::Result<Value> {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?;
        Ok(response.json().await?)
    }

    /// The server's `/metrics` text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await?;
        Ok(response.text().await?)
    }

    pub async fn publish_test(&self) -> anyhow::Result<Uuid> {
        let questions: Vec<Value> = (1..=QUESTIONS)
            .map(|i| json!({"id": format!("q{i}"), "prompt": "?", "choices": ["a", "b"], "answer": 0, "points": i}))
            .collect();
        let body: Value = self
            .client
            .post(format!("{}/v1/tests", self.base))
            .bearer_auth(self.token("bench-admin", Role::Admin))
            .json(&json!({"title": "Bench", "questions": questions}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(body["id"].as_str().unwrap_or_default().parse()?)
    }

    /// Start, one answer, submit: returns each command's latency.
    pub async fn take(&self, test: Uuid, token: &str, seed: u64) -> anyhow::Result<[Duration; 3]> {
        let timed = |request: reqwest::RequestBuilder| async move {
            let started = Instant::now();
            let response = request.bearer_auth(token).send().await?;
            let status = response.status();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::ensure!(status.is_success(), "answered {status}: {body}");
            anyhow::Ok((started.elapsed(), body))
        };
        let (start, attempt) = timed(
            self.client
                .post(format!("{}/v1/tests/{test}/attempts", self.base)),
        )
        .await?;
        let id = attempt["attempt_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let (answer, _) = timed(
            self.client
                .put(format!("{}/v1/attempts/{id}/answers/q1", self.base))
                .json(&json!({"choice": seed % 2})),
        )
        .await?;
        let answers: serde_json::Map<String, Value> = (2..=QUESTIONS)
            .map(|i| (format!("q{i}"), json!((seed >> (i % 60)) & 1)))
            .collect();
        let (submit, _) = timed(
            self.client
                .post(format!("{}/v1/attempts/{id}/submit", self.base))
                .json(&json!({ "answers": answers })),
        )
        .await?;
        Ok([start, answer, submit])
    }
}

/// What ingest measured.
pub struct Ingest {
    pub submissions_per_second: f64,
    pub commands_per_second: f64,
    pub latency: Histogram<u64>,
    /// Submissions accepted in each second of the run.
    pub timeline: Vec<u64>,
}

/// `concurrency` virtual users take attempts on `tests` as fast as they are
/// answered, for `duration`; `users` distinct users in all.
pub async fn ingest(
    api: &Api,
    tests: &[Uuid],
    users: usize,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Ingest> {
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..users)
            .map(|u| api.token(&format!("user-{u}"), Role::User))
            .collect(),
    );
    let started = Instant::now();
    let seconds = duration.as_secs().max(1) as usize + 1;
    let mut tasks = Vec::new();
    for vu in 0..concurrency {
        let (api, tokens, tests) = (api.clone(), tokens.clone(), tests.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut latency = histogram();
            let mut timeline = vec![0u64; seconds];
            let mut n = vu as u64;
            while started.elapsed() < duration {
                let token = &tokens[(n as usize * 7919) % tokens.len()];
                let test = tests[n as usize % tests.len()];
                let times = api
                    .take(test, token, n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                    .await?;
                for time in times {
                    record(&mut latency, time);
                }
                let second = (started.elapsed().as_secs() as usize).min(seconds - 1);
                timeline[second] += 1;
                n += concurrency as u64;
            }
            anyhow::Ok((latency, timeline))
        }));
    }
    let mut latency = histogram();
    let mut timeline = vec![0u64; seconds];
    for task in tasks {
        let (l, t) = task.await??;
        latency.add(l)?;
        for (total, n) in timeline.iter_mut().zip(t) {
            *total += n;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let submissions: u64 = timeline.iter().sum();
    timeline.truncate(duration.as_secs().max(1) as usize);
    Ok(Ingest {
        submissions_per_second: submissions as f64 / elapsed,
        commands_per_second: latency.len() as f64 / elapsed,
        latency,
        timeline,
    })
}

/// An SSE stream's body, read frame by frame.
pub async fn open_stream(
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> anyhow::Result<hyper::body::Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header("host", "bench")
        .header("authorization", format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "stream answered {}",
        response.status()
    );
    Ok(response.into_body())
}

/// What freshness measured.
pub struct Freshness {
    /// From a submission's 200 to its entry in the around-user query.
    pub to_query: Histogram<u64>,
    /// From a submission's 200 to its SSE `entry` event.
    pub to_sse: Histogram<u64>,
    /// The mean wait of the events written meanwhile, in ms, from the start
    /// of their transaction: to the relay's publication, and to the commit
    /// of the leaderboard's batch that applied them (the server's own
    /// histograms, so only with NATS and workers).
    pub waited_ms: Option<(f64, f64)>,
}

/// The `_sum` and `_count` of histogram `name`'s `series` (its labels, or
/// empty) in Prometheus text.
pub fn sum_and_count(text: &str, name: &str, series: &str) -> (f64, f64) {
    let value = |suffix: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}_{suffix}{series} ")))
            .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

/// The relay's and the leaderboard's event delays in `text`, as
/// (relay sum, relay count, leaderboard sum, leaderboard count).
fn delays(text: &str) -> [f64; 4] {
    let (relay_sum, relay_count) = sum_and_count(text, "podium_relay_delay_seconds", "");
    let (board_sum, board_count) = sum_and_count(
        text,
        "podium_projection_delay_seconds",
        r#"{projection="leaderboard"}"#,
    );
    [relay_sum, relay_count, board_sum, board_count]
}

/// Submissions at `rate` per second (open loop) for `duration`, each timed
/// to its visibility in the query API and on an open stream.
pub async fn freshness(
    api: &Api,
    addr: SocketAddr,
    test: Uuid,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Freshness> {
    let board = format!("/v1/tests/{test}/leaderboard");
    freshness_on(api, addr, (test, &board), rate, duration).await
}

/// [`freshness`] of `board` (a leaderboard's path: a test's, or a
/// collection's that holds the test) while submissions go to `test`.
pub async fn freshness_on(
    api: &Api,
    addr: SocketAddr,
    (test, board): (Uuid, &str),
    rate: f64,
    duration: Duration,
) -> anyhow::Result<Freshness> {
    let viewer = api.token("fresh-viewer", Role::User);
    let before = delays(&api.metrics().await.unwrap_or_default());
    let mut body = open_stream(addr, &format!("{board}/stream"), &viewer).await?;
    // When each user's entry event arrived.
    let arrivals: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let reader = {
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let mut buffer = String::new();
            while let Some(Ok(frame)) = body.frame().await {
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                let now = Instant::now();
                buffer.push_str(&String::from_utf8_lossy(data));
                while let Some(end) = buffer.find("\n\n") {
                    let block: String = buffer.drain(..end + 2).collect();
                    let user = block
                        .lines()
                        .find_map(|l| l.strip_prefix("data: "))
                        .and_then(|d| serde_json::from_str::<Value>(d).ok())
                        .and_then(|d| d["user_id"].as_str().map(str::to_string));
                    if let Some(user) = user {
                        arrivals.lock().unwrap().insert(user, now);
                    }
                }
            }
        })
    };
    let run = Uuid::new_v4().simple().to_string();
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let sample = (rate / 20.0).ceil().max(1.0) as u64;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..total {
        let at = started + Duration::from_secs_f64(n as f64 / rate);
        let (api, viewer, board) = (api.clone(), viewer.clone(), board.to_string());
        let user = format!("fresh-{}-{n}", &run[..8]);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let token = api.token(&user, Role::User);
            api.take(test, &token, n).await?;
            let accepted = Instant::now();
            // Polling is load too: about 20 submissions a second are
            // followed to the query; every one is followed to SSE.
            if n % sample != 0 {
                return anyhow::Ok((user, accepted, None));
            }
            let path = format!("{}{board}/users/{user}", api.base);
            // Past saturation the backlog grows: what is not visible after
            // a minute counts as a minute.
            while accepted.elapsed() < Duration::from_secs(60) {
                let response = api.client.get(&path).bearer_auth(&viewer).send().await?;
                if response.status().is_success() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok((user, accepted, Some(accepted.elapsed())))
        }));
    }
    let mut to_query = histogram();
    let mut accepted_at = Vec::new();
    for task in tasks {
        let (user, accepted, visible) = task.await??;
        if let Some(visible) = visible {
            record(&mut to_query, visible);
        }
        accepted_at.push((user, accepted));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut to_sse = histogram();
    loop {
        let arrived = arrivals.lock().unwrap().clone();
        if accepted_at.iter().all(|(u, _)| arrived.contains_key(u)) || Instant::now() > deadline {
            for (user, accepted) in &accepted_at {
                if let Some(at) = arrived.get(user) {
                    // An event can beat its 200 to the client: no delay then.
                    record(&mut to_sse, at.saturating_duration_since(*accepted));
                }
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    reader.abort();
    let after = delays(&api.metrics().await.unwrap_or_default());
    let mean = |sum: usize, count: usize| {
        let events = after[count] - before[count];
        (events > 0.0).then(|| (after[sum] - before[sum]) / events * 1000.0)
    };
    let waited_ms = mean(0, 1).zip(mean(2, 3));
    Ok(Freshness {
        to_query,
        to_sse,
        waited_ms,
    })
}

/// What the SSE fan-out measured.
pub struct FanOut {
    pub streams: usize,
    pub rss_per_stream_kib: f64,
    /// The server's CPU over as long before the streams opened.
    pub baseline_cpu_percent: f64,
    /// How long each writer took to write the change to its streams.
    pub writing_ms: f64,
    /// The server's CPU while the streams sat idle (heartbeats only), in
    /// percent of one core.
    pub idle_cpu_percent: f64,
    /// How long that was watched.
    pub idle: Duration,
    /// From the submission's 200 to each stream's `entry` event.
    pub delivery: Histogram<u64>,
}

/// Opens `n` leaderboard streams, watches the server's CPU while they sit
/// idle for `idle`, then submits once and times the change's arrival on
/// each. `server` reads the server's memory and CPU.
pub async fn fan_out(
    api: &Api,
    addr: SocketAddr,
    test: Uuid,
    n: usize,
    idle: Duration,
    server: &crate::server::Server,
) -> anyhow::Result<FanOut> {
    let rss = || server.rss_kib();
    let viewer = api.token("fan-viewer", Role::User);
    let path = format!("/v1/tests/{test}/leaderboard/stream");
    let (cpu_before, idle_from) = (server.cpu_secs(), Instant::now());
    tokio::time::sleep(idle).await;
    let baseline_cpu_percent =
        (server.cpu_secs() - cpu_before) / idle_from.elapsed().as_secs_f64() * 100.0;
    let before = rss();
    // Opened in two halves, each read by a thread of its own (one thread
    // cannot hold more descriptors than the process may open, so neither
    // can hold all).
    let request =
        format!("GET {path} HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {viewer}\r\n\r\n");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for half in [n / 2, n - n / 2] {
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let (request, stop) = (request.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            crate::streams::run(addr, &request, half, opened_tx, &stop)
        }));
        tokio::task::spawn_blocking(move || opened_rx.recv())
            .await?
            .map_err(|_| anyhow::anyhow!("a client thread ended before its streams opened"))??;
    }
    let opened = n;
    // Let the server settle its buffers before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    let (cpu_before, idle_from) = (server.cpu_secs(), Instant::now());
    tokio::time::sleep(idle).await;
    let idle = idle_from.elapsed();
    let idle_cpu_percent = (server.cpu_secs() - cpu_before) / idle.as_secs_f64() * 100.0;
    // The writers' time for this one change, from their histogram's sums.
    let fan_out_sums = |text: String| {
        sum_and_count(
            &text,
            "podium_sse_fan_out_seconds",
            r#"{stream="leaderboard"}"#,
        )
    };
    let (sum_before, count_before) = fan_out_sums(api.metrics().await?);
    let token = api.token("fan-trigger", Role::User);
    let client = api.clone();
    let trigger = tokio::spawn(async move {
        // The clock starts at the submit's answer, as for freshness.
        let result = client.take(test, &token, 1).await;
        result.map(|_| Instant::now())
    });
    let accepted = trigger.await??;
    let mut delivery = histogram();
    let mut missed = 0;
    let waiting = tokio::task::spawn_blocking(move || {
        readers
            .into_iter()
            .map(|reader| reader.join().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    // A stream that has not got the change within a minute never will.
    let give_up = async {
        tokio::time::sleep(Duration::from_secs(60)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        std::future::pending::<()>().await;
    };
    let halves = tokio::select! {
        halves = waiting => halves?,
        () = give_up => unreachable!("pending"),
    };
    for arrived in halves.into_iter().flatten() {
        match arrived {
            // An event can beat the 200 to the client: no delay then.
            Some(arrived) => record(&mut delivery, arrived.saturating_duration_since(accepted)),
            None => missed += 1,
        }
    }
    anyhow::ensure!(missed == 0, "{missed} of {n} streams never got the change");
    let (sum_after, count_after) = fan_out_sums(api.metrics().await?);
    let writing_ms = (sum_after - sum_before) / (count_after - count_before).max(1.0) * 1000.0;
    Ok(FanOut {
        streams: opened,
        rss_per_stream_kib: after.saturating_sub(before) as f64 / opened.max(1) as f64,
        baseline_cpu_percent,
        writing_ms,
        idle_cpu_percent,
        idle,
        delivery,
    })
}

/// Waits (at most two minutes) until the relay and every projection in
/// Postgres have caught up with the log, read from the database itself
/// (`/metrics` samples its lags every few seconds: too coarse to time a
/// catch-up by).
pub async fn settle_log(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // The head after the positions: the policy appends notifications
        // before it moves its checkpoint, so they are counted here.
        let positions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, seq FROM projection_checkpoints WHERE name NOT LIKE '%\\_\\_next'
             UNION ALL SELECT 'relay:' || name, seq FROM relay_checkpoints",
        )
        .fetch_all(pool)
        .await?;
        let head: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(pool)
            .await?;
        let caught_up = positions.iter().filter(|(_, seq)| *seq == head).count();
        // The relay and the five projections.
        if caught_up >= 6 && positions.iter().all(|(_, seq)| *seq == head) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projections did not catch up with {head} events: {positions:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits (at most two minutes) until the relay and every projection have
/// caught up with the log, as `/metrics` reports (the embedded mode, whose
/// figures are read at each scrape).
pub async fn settle(api: &Api) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = api.metrics().await?;
        let lags: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with("podium_projection_lag_events")
                    || l.starts_with("podium_relay_lag_events")
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
            .collect();
        if !lags.is_empty() && lags.iter().all(|lag| *lag == 0.0) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projections did not catch up: {lags:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
