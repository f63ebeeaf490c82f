//! Query-API benchmark: cached reads at 64 connections, commit→SSE delay at
//! a steady submission rate, and server memory per open SSE connection.
//!
//!     ulimit -n 65536
//!     cargo run --release --example query_bench -- [ENTRIES] [SECONDS] [STREAMS] [RATE]
//!
//! Runs a Podium server as a child process (this binary in server mode, so
//! its RSS is the server's alone) on a scratch database and a NATS prefix of
//! its own. Seeds ENTRIES (default 100,000) leaderboard entries straight into
//! the read model, then, for SECONDS each (default 10), 64 connections
//! (plain HTTP/1.1 keep-alive, closed loop) ask for: `/healthz` (the HTTP
//! ceiling of this machine), the top page (50 entries, cached), one user's
//! neighbours (cached) and random users' neighbours (mostly uncached). Then
//! RATE submissions/s (default 50) for SECONDS, each timed from its 200 to
//! its `entry` event on an open stream; then STREAMS (default 10,000) open
//! leaderboard streams: the server's RSS before and after, and how long one
//! change takes to reach all of them. Needs Postgres and NATS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use podium::auth::{JwtKeys, Role};
use podium_domain::UserId;
use serde_json::{json, Value};
use tokio::io::AsyncBufReadExt;

mod support;
use support::{ms, numeric_args, percentile, ScratchDb};

const SECRET: &str = "query-bench-secret-0123456789abcdef0123";
const CONNECTIONS: usize = 64;
const HUGE_BUDGETS: &str =
    "user_commands=100000000/min,user_queries=100000000/min,ip=100000000/min";

/// The path of the `i`-th request of a scenario.
type Paths = Arc<dyn Fn(u64) -> String + Send + Sync>;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    if std::env::args().nth(1).as_deref() == Some("--serve") {
        return runtime.block_on(serve());
    }
    runtime.block_on(bench())
}

/// Server mode: `DATABASE_URL`, `NATS_URL`, `PODIUM_NATS_PREFIX` from the
/// parent; prints the port, serves until stdin closes.
async fn serve() -> anyhow::Result<()> {
    let mut settings = podium::Settings::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        std::env::var("DATABASE_URL")?,
        SECRET.into(),
    );
    settings.nats.nats_url = Some(std::env::var("NATS_URL")?);
    settings.nats.nats_prefix = std::env::var("PODIUM_NATS_PREFIX")?;
    settings.query.sse_max_streams_per_user = 100_000;
    settings.rate_limits = std::env::var("PODIUM_RATE_LIMITS")?;
    settings.http_metrics = std::env::var("PODIUM_HTTP_METRICS")? == "true";
    settings.workers = std::env::var("PODIUM_WORKERS")? == "true";
    let app = podium::Application::build(settings).await?;
    println!("PORT {}", app.port());
    app.run_until(async {
        let mut line = String::new();
        let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
        let _ = stdin.read_line(&mut line).await;
    })
    .await
}

struct Server {
    child: tokio::process::Child,
    address: String,
    addr: SocketAddr,
}

impl Server {
    fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Starts a server; `limits` and `metrics` set its rate limits and request metrics.
async fn start_server(
    db: &ScratchDb,
    prefix: &str,
    limits: &str,
    metrics: bool,
    workers: bool,
) -> anyhow::Result<Server> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("--serve")
        .env("DATABASE_URL", &db.url)
        .env(
            "NATS_URL",
            std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        )
        .env("PODIUM_NATS_PREFIX", prefix)
        .env("PODIUM_RATE_LIMITS", limits)
        .env("PODIUM_HTTP_METRICS", metrics.to_string())
        .env("PODIUM_WORKERS", workers.to_string())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let port: u16 = loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| anyhow::anyhow!("the server exited"))?;
        if let Some(port) = line.strip_prefix("PORT ") {
            break port.parse()?;
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    Ok(Server {
        child,
        address: format!("http://{addr}"),
        addr,
    })
}

/// 64 connections asking for `paths(i)` in a closed loop for `secs`:
/// requests/s and latency percentiles.
async fn load(
    addr: SocketAddr,
    token: &str,
    secs: u64,
    paths: Paths,
) -> anyhow::Result<(f64, Duration, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let (token, paths) = (token.to_string(), paths.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut times = Vec::new();
            let mut i = c as u64;
            while Instant::now() < deadline {
                let request = hyper::Request::get(paths(i))
                    .header("host", "bench")
                    .header("authorization", format!("Bearer {token}"))
                    .body(Empty::<Bytes>::new())?;
                let started = Instant::now();
                let response = sender.send_request(request).await?;
                anyhow::ensure!(
                    response.status().is_success(),
                    "status {}",
                    response.status()
                );
                response.into_body().collect().await?;
                times.push(started.elapsed());
                i += CONNECTIONS as u64;
            }
            anyhow::Ok(times)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort();
    Ok((
        all.len() as f64 / secs as f64,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
    ))
}

/// A test worth 210 points: 20 questions of 1 to 20 points.
fn big_test() -> Value {
    let questions: Vec<Value> = (1..=20)
        .map(|i| json!({"id": format!("q{i}"), "prompt": "?", "choices": ["a", "b"], "answer": 0, "points": i}))
        .collect();
    json!({"title": "Bench", "questions": questions})
}

async fn bench() -> anyhow::Result<()> {
    let args = numeric_args();
    let entries = *args.first().unwrap_or(&100_000) as i64;
    let secs = *args.get(1).unwrap_or(&10);
    let streams = *args.get(2).unwrap_or(&10_000) as usize;
    let rate = *args.get(3).unwrap_or(&50);
    let db = ScratchDb::create(2).await?;
    let prefix = format!("qbench{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // Production-like: limits on (budgets too large to bite), metrics on.
    let mut server = start_server(&db, &prefix, HUGE_BUDGETS, true, true).await?;
    let keys = JwtKeys::new(SECRET)?;
    let token = |user: &str, role| {
        keys.issue(
            &UserId::parse(user).unwrap(),
            role,
            Duration::from_secs(7200),
        )
    };
    let client = reqwest::Client::new();
    let base = server.address.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_rss = server.rss_kib();

    let published: Value = client
        .post(format!("{base}/v1/tests"))
        .bearer_auth(token("admin", Role::Admin))
        .json(&big_test())
        .send()
        .await?
        .json()
        .await?;
    let test_id: uuid::Uuid = published["id"].as_str().unwrap().parse()?;
    eprintln!("seeding {entries} leaderboard entries…");
    sqlx::query(
        "INSERT INTO lb_entries (test_id, user_id, best_score, max_score, attempt_id, achieved_at, attempts)
         SELECT $1, 'user-' || i, ((random() + random() + random()) * 70)::int, 210, gen_random_uuid(),
                now() - interval '30 days' + i * interval '1 second', 1
           FROM generate_series(1, $2::bigint) i",
    )
    .bind(test_id)
    .bind(entries)
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "INSERT INTO lb_score_counts (test_id, score, entries)
         SELECT test_id, best_score, count(*) FROM lb_entries GROUP BY test_id, best_score",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("VACUUM ANALYZE lb_entries")
        .execute(&db.pool)
        .await?;

    let viewer = token("viewer", Role::User);
    let mut rows = Vec::new();
    let scenarios: Vec<(&str, Paths)> = vec![
        (
            "GET /healthz (HTTP ceiling)",
            Arc::new(|_| "/healthz".to_string()),
        ),
        (
            "top page, 50 entries (cached)",
            Arc::new(move |_| format!("/v1/tests/{test_id}/leaderboard?limit=50")),
        ),
        (
            "around one user, radius 5 (cached)",
            Arc::new(move |_| {
                format!("/v1/tests/{test_id}/leaderboard/users/user-{}", entries / 2)
            }),
        ),
        (
            "around random users, radius 5 (uncached)",
            Arc::new(move |i| {
                let user = 1 + (i.wrapping_mul(2654435761) % entries as u64);
                format!("/v1/tests/{test_id}/leaderboard/users/user-{user}")
            }),
        ),
    ];
    for (name, paths) in scenarios {
        eprintln!("{name}…");
        let (rps, p50, p99) = load(server.addr, &viewer, secs, paths).await?;
        rows.push(format!(
            "| {name} | {rps:.0} | {:.2} | {:.2} |",
            ms(p50),
            ms(p99)
        ));
    }

    // What the rate limiter and the request metrics cost on a cached page:
    // the same page on servers with each of them off.
    let top: Paths = Arc::new(move |_| format!("/v1/tests/{test_id}/leaderboard?limit=50"));
    let mut overhead = Vec::new();
    for (name, limits, metrics) in [
        ("limiter off, metrics off", "off", false),
        ("limiter on, metrics off", HUGE_BUDGETS, false),
        ("limiter off, metrics on", "off", true),
        ("limiter on, metrics on", HUGE_BUDGETS, true),
    ] {
        eprintln!("top page, {name}…");
        let other = start_server(&db, &prefix, limits, metrics, false).await?;
        // Warm its cache.
        client
            .get(format!(
                "{}/v1/tests/{test_id}/leaderboard?limit=50",
                other.address
            ))
            .bearer_auth(&viewer)
            .send()
            .await?;
        let (rps, p50, p99) = load(other.addr, &viewer, secs, top.clone()).await?;
        overhead.push(format!(
            "| {name} | {rps:.0} | {:.2} | {:.2} |",
            ms(p50),
            ms(p99)
        ));
        drop(other);
    }

    eprintln!("commit → SSE at {rate} submissions/s…");
    let stream_path = format!("{base}/v1/tests/{test_id}/leaderboard/stream");
    let (delays, live) = commit_to_sse(
        &client,
        &base,
        &stream_path,
        &viewer,
        &token,
        test_id,
        rate,
        secs,
    )
    .await?;
    drop(live);

    eprintln!("opening {streams} streams…");
    let before = server.rss_kib();
    let (opened, fanout) = fan_out(&base, &stream_path, &token, test_id, streams).await?;
    let after = server.rss_kib();

    println!("\n## Query API ({entries} entries, {CONNECTIONS} connections, {secs} s each)\n");
    println!("| scenario | requests/s | p50 ms | p99 ms |\n|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    println!("\n### Cached top page: what the rate limiter and request metrics cost\n");
    println!("| server | requests/s | p50 ms | p99 ms |\n|---|---|---|---|");
    for row in overhead {
        println!("{row}");
    }
    println!(
        "\ncommit → SSE `entry` at {rate}/s: {} submissions, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        delays.len(),
        ms(percentile(&delays, 0.5)),
        ms(percentile(&delays, 0.99)),
        ms(*delays.last().unwrap())
    );
    println!(
        "server RSS idle (before seeding): {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "{opened} open SSE streams: server RSS {:.1} → {:.1} MiB = {:.1} KiB per stream",
        before as f64 / 1024.0,
        after as f64 / 1024.0,
        (after.saturating_sub(before)) as f64 / opened as f64
    );
    println!(
        "one change to all {opened} streams: p50 {:.1} ms, last {:.1} ms",
        ms(percentile(&fanout, 0.5)),
        ms(*fanout.last().unwrap())
    );
    let _ = server.child.kill().await;
    db.drop().await?;
    podium_bench_cleanup(&prefix).await;
    Ok(())
}

/// Submits `rate` attempts a second for `secs` (open loop) and times each
/// from its 200 to its `entry` event on one stream.
#[allow(clippy::too_many_arguments)]
async fn commit_to_sse(
    client: &reqwest::Client,
    base: &str,
    stream_path: &str,
    viewer: &str,
    token: &impl Fn(&str, Role) -> String,
    test_id: uuid::Uuid,
    rate: u64,
    secs: u64,
) -> anyhow::Result<(Vec<Duration>, reqwest::Response)> {
    let mut stream = client.get(stream_path).bearer_auth(viewer).send().await?;
    let submitted: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Arc::default();
    let total = rate * secs;
    let mut submitters = Vec::new();
    let started = Instant::now();
    for n in 0..total {
        let at = started + Duration::from_secs_f64(n as f64 / rate as f64);
        let (client, base, submitted) = (client.clone(), base.to_string(), submitted.clone());
        let user = format!("live-{n}");
        let token = token(&user, Role::User);
        submitters.push(tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            let attempt: Value = client
                .post(format!("{base}/v1/tests/{test_id}/attempts"))
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            let id = attempt["attempt_id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let answers: serde_json::Map<String, Value> =
                (1..=20).map(|i| (format!("q{i}"), json!(0))).collect();
            let response = client
                .post(format!("{base}/v1/attempts/{id}/submit"))
                .bearer_auth(&token)
                .json(&json!({ "answers": answers }))
                .send()
                .await?;
            anyhow::ensure!(
                response.status().is_success(),
                "submit answered {}",
                response.status()
            );
            submitted.lock().unwrap().insert(user, Instant::now());
            anyhow::Ok(())
        }));
    }
    let mut delays = Vec::new();
    let mut buffer = String::new();
    let deadline = Instant::now() + Duration::from_secs(secs + 30);
    while (delays.len() as u64) < total && Instant::now() < deadline {
        let Ok(Some(chunk)) = tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await?
        else {
            continue;
        };
        let arrived = Instant::now();
        buffer.push_str(std::str::from_utf8(&chunk)?);
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let Ok(data) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let Some(user) = data["user_id"].as_str() else {
                continue;
            };
            // The event can beat the 200 to the client: count that as no delay.
            let sent = submitted.lock().unwrap().get(user).copied();
            delays.push(sent.map_or(Duration::ZERO, |sent| {
                arrived.saturating_duration_since(sent)
            }));
        }
    }
    for task in submitters {
        task.await??;
    }
    delays.sort();
    Ok((delays, stream))
}

/// Opens `n` streams, then submits once and times the `entry` event on each.
async fn fan_out(
    base: &str,
    stream_path: &str,
    token: &impl Fn(&str, Role) -> String,
    test_id: uuid::Uuid,
    n: usize,
) -> anyhow::Result<(usize, Vec<Duration>)> {
    let addr: SocketAddr = base.trim_start_matches("http://").parse()?;
    let path = stream_path.trim_start_matches(base).to_string();
    let viewer = token("fan", Role::User);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(n);
    let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut readers = Vec::new();
    for _ in 0..n {
        let (path, viewer, ready_tx, t0) =
            (path.clone(), viewer.clone(), ready_tx.clone(), t0.clone());
        readers.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let request = hyper::Request::get(path)
                .header("host", "bench")
                .header("authorization", format!("Bearer {viewer}"))
                .body(Empty::<Bytes>::new())?;
            let mut body = sender.send_request(request).await?.into_body();
            ready_tx.send(()).await.ok();
            while let Some(frame) = body.frame().await {
                let frame = frame?;
                if frame
                    .data_ref()
                    .is_some_and(|d| d.windows(12).any(|w| w == b"event: entry"))
                {
                    return anyhow::Ok(t0.get().map(|t| t.elapsed()));
                }
            }
            anyhow::Ok(None)
        }));
    }
    drop(ready_tx);
    let mut opened = 0;
    while opened < n && ready_rx.recv().await.is_some() {
        opened += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client = reqwest::Client::new();
    let user = "fan-out-trigger";
    let user_token = token(user, Role::User);
    let attempt: Value = client
        .post(format!("{base}/v1/tests/{test_id}/attempts"))
        .bearer_auth(&user_token)
        .send()
        .await?
        .json()
        .await?;
    let id = attempt["attempt_id"].as_str().unwrap_or_default();
    t0.set(Instant::now()).ok();
    client
        .post(format!("{base}/v1/attempts/{id}/submit"))
        .bearer_auth(&user_token)
        .json(&json!({"answers": {"q1": 0}}))
        .send()
        .await?;
    let mut times = Vec::new();
    for reader in readers {
        if let Ok(Ok(Ok(Some(time)))) = tokio::time::timeout(Duration::from_secs(30), reader).await
        {
            times.push(time);
        }
    }
    times.sort();
    anyhow::ensure!(!times.is_empty(), "no stream received the change");
    Ok((opened, times))
}

/// Deletes the benchmark's NATS streams.
async fn podium_bench_cleanup(prefix: &str) {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    if let Ok(bus) = podium_nats::EventBus::connect(&url, prefix).await {
        for stream in [
            bus.subjects().events_stream(),
            bus.subjects().dead_letter_stream(),
        ] {
            let _ = bus.jetstream().delete_stream(stream).await;
        }
    }
}
